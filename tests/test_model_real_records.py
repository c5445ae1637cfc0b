"""Real 12-lead records (../shared/ecg/cinc2021) through read -> tokenise -> CLEAR encoder -> HUG."""

import numpy as np
import torch
from _ecgdata import need_ecg
from model_fixtures import tiny_config

from clear_hug.data.readers import CinCFolderDataset, read_record
from clear_hug.data.tokenize import tokenize_beats
from clear_hug.heads import HUG
from clear_hug.model import CLEAR


def test_cinc_records_through_encoder_and_hug():
    root = need_ecg("cinc2021")
    index = CinCFolderDataset(root)
    assert len(index) >= 10
    items = []
    for path in index.paths[:12]:
        signal, fs, meta = read_record(path)
        bt = tokenize_beats(signal, fs, max_beats=15, missing_leads=meta["missing_leads"])
        items.append((bt.tokens, bt.valid, bt.time))
    tokens = torch.from_numpy(np.stack([t for t, _, _ in items])).float()
    valid = torch.from_numpy(np.stack([v for _, v, _ in items])).bool()
    time = torch.from_numpy(np.stack([t for _, _, t in items])).long()
    assert tokens.shape == (12, 12, 15, 96)
    assert (valid.flatten(1).sum(1) >= 12 * 5).all()  # 10 s strips: at least 5 beats in every lead
    torch.manual_seed(0)
    encoder = CLEAR(tiny_config())
    head = HUG(encoder.cfg.enc_dim, len(index.class_names))
    feats = encoder.forward_features(tokens, valid, time)
    logits = head(feats)
    assert logits.shape == (12, len(index.class_names)) and torch.isfinite(logits).all()
    labels = torch.from_numpy(np.asarray(index.labels[:12], dtype=np.float32))
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
    # Sparse and dense attention agree on real layouts (records have different beat counts).
    dense = CLEAR(tiny_config(attn_impl="dense"))
    dense.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(dense.forward_features(tokens, valid, time), feats, rtol=1e-5, atol=1e-5)
