"""Pretraining: checkpoints are atomic and a resumed CPU run repeats the uninterrupted run's losses exactly."""

import pytest
import torch
from model_fixtures import ListDataset, tiny_config

from clear_hug import checkpoint
from clear_hug.checkpoint import load_encoder
from clear_hug.train import common
from clear_hug.train.pretrain import PretrainArgs, pretrain


def _args(out_dir, **kw):
    base = dict(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=1, seed=3, out_dir=str(out_dir), progress=False)
    return PretrainArgs(**{**base, **kw})


def test_resume_reproduces_the_uninterrupted_losses_bitwise(tmp_path):
    # Dropout on, so the torch RNG state has to be restored too, not only the data order and masks.
    cfg = tiny_config(dropout=0.1)
    train, val = ListDataset(12, seed=0), ListDataset(4, seed=1)
    full = pretrain(cfg, train, _args(tmp_path / "full"), val)
    part = pretrain(cfg, train, _args(tmp_path / "part", stop_after_epochs=1), val)
    assert len(part["epochs"]) == 1
    resumed = pretrain(cfg, train, _args(tmp_path / "part"), val)
    assert len(resumed["steps"]) == len(full["steps"]) == 3 * 2
    assert resumed["steps"] == full["steps"]  # exact float equality, step by step
    assert [e["val_loss"] for e in resumed["epochs"]] == [e["val_loss"] for e in full["epochs"]]
    a = checkpoint.load_checkpoint(tmp_path / "full" / "last.pt", "pretrain")["model"]
    b = checkpoint.load_checkpoint(tmp_path / "part" / "last.pt", "pretrain")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A different seed gives different losses (the equality above is not vacuous).
    other = pretrain(cfg, train, _args(tmp_path / "other", seed=4, epochs=1), val)
    assert other["steps"][0] != full["steps"][0]


def test_training_lowers_the_loss_and_checkpoint_loads(tmp_path):
    cfg = tiny_config()
    train = ListDataset(8, seed=2)
    hist = pretrain(cfg, train, _args(tmp_path, epochs=6, lr=3e-3), None)
    assert hist["epochs"][-1]["train_loss"] < hist["epochs"][0]["train_loss"]
    model = load_encoder(tmp_path / "last.pt", attn_impl="dense")
    assert model.cfg.attn_impl == "dense"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save_checkpoint(path, "head", {"x": 1})

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):  # the failure reaches the caller
        checkpoint.save_checkpoint(path, "head", {"x": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path, "head") == {"format": checkpoint.FORMAT, "kind": "head", "x": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pt"]


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = common.warmup_cosine(opt, warmup_steps=4, total_steps=14, min_lr=0.01)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert abs(lrs[14] - 0.01) < 1e-12 and abs(lrs[15] - 0.01) < 1e-12


def test_an_empty_validation_set_is_an_error_not_a_zero_loss(tmp_path):
    empty = torch.utils.data.Subset(ListDataset(4, seed=1), [])
    with pytest.raises(ValueError, match="val_set is empty"):
        pretrain(tiny_config(), ListDataset(8, seed=2), _args(tmp_path, epochs=1), empty)


def test_resuming_with_more_epochs_is_refused_or_extends_the_schedule(tmp_path):
    cfg, train = tiny_config(), ListDataset(16, seed=2)  # 2 steps per epoch
    pretrain(cfg, train, _args(tmp_path, epochs=2, stop_after_epochs=1, min_lr=1e-5), None)
    with pytest.raises(ValueError, match=r"epochs 2 -> 4.*extend_schedule=True"):
        pretrain(cfg, train, _args(tmp_path, epochs=4, min_lr=1e-5), None)
    with pytest.raises(ValueError, match=r"lr 0.001 -> 0.002\) \(only epochs can change"):
        pretrain(cfg, train, _args(tmp_path, epochs=4, lr=2e-3, min_lr=1e-5, extend_schedule=True), None)
    hist = pretrain(cfg, train, _args(tmp_path, epochs=4, min_lr=1e-5, extend_schedule=True), None)
    assert [e["epoch"] for e in hist["epochs"]] == [0, 1, 2, 3]
    # From step 2 on the cosine runs to step 8, not 4: the lr after epoch 1 (step 4) is halfway down.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    reference = common.warmup_cosine(opt, warmup_steps=2, total_steps=8, min_lr=1e-5)
    lrs = []
    for _ in range(8):
        opt.step()
        reference.step()
        lrs.append(reference.get_last_lr()[0])
    assert [e["lr"] for e in hist["epochs"][1:]] == pytest.approx([lrs[3], lrs[5], lrs[7]], rel=1e-12)
    assert hist["epochs"][-1]["lr"] == pytest.approx(1e-5)


def test_make_optimizer_is_fused_adamw_with_decay_on_matrices_only():
    """The fused AdamW of make_optimizer takes the steps of the default one, to float rounding."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
    ref_w, ref_b = (torch.nn.Parameter(t.detach().clone()) for t in (weight, bias))
    opt = common.make_optimizer([weight, bias], 1e-2, 0.1, (0.9, 0.98))
    ref = torch.optim.AdamW([{"params": [ref_w], "weight_decay": 0.1}, {"params": [ref_b], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.98))
    assert opt.param_groups[0]["fused"] and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for _ in range(5):
        for p, q in ((weight, ref_w), (bias, ref_b)):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(weight, ref_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias, ref_b, rtol=1e-6, atol=1e-6)


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """After keep_freed_memory, a training-like step (tensors of 4 to 64 MB allocated, freed and allocated again)
    reuses the heap's pages instead of faulting in fresh ones from the OS, as glibc does by default for blocks
    above its mmap threshold. In a subprocess: it changes the allocator of the whole process."""
    import json
    import platform
    import subprocess
    import sys
    import textwrap

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_memory acts on glibc only")
    script = textwrap.dedent("""
        import json, resource, sys, torch
        from clear_hug.train.common import keep_freed_memory
        if sys.argv[1] == "1":
            assert keep_freed_memory()
        def faults_of_one_step():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            xs = [torch.empty(n).fill_(1.0) for n in (4 * 2**20, 16 * 2**20, 11 * 2**20, 2**20, 16 * 2**20)]
            del xs[1]
            y = torch.empty(9 * 2**20).fill_(2.0)
            del xs, y
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(json.dumps([faults_of_one_step() for _ in range(8)]))
    """)
    faults = {}
    for keep in ("0", "1"):
        run = subprocess.run([sys.executable, "-c", script, keep], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        faults[keep] = json.loads(run.stdout.strip().splitlines()[-1])
    # A step touches 48 M floats (about 48k pages of 4 KB): faulted in again every step by default; with the setting
    # the heap settles after a few steps (where each block lands depends on the ones before) and is then reused.
    default, kept = sum(faults["0"][-3:]), sum(faults["1"][-3:])
    assert default > 100_000 and kept < 0.05 * default, faults
