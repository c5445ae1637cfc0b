"""Two CPU processes (gloo, DDP) train exactly like one process that averages the two ranks' gradients."""

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp
from model_fixtures import ListDataset, tiny_config
from torch.utils.data import DistributedSampler

from clear_hug import checkpoint
from clear_hug.masking import random_mask
from clear_hug.model import CLEAR
from clear_hug.train import common
from clear_hug.train.pretrain import PretrainArgs, pretrain

WORLD = 2


def _args(out_dir):
    return PretrainArgs(epochs=2, batch_size=4, lr=2e-3, warmup_epochs=1, seed=5, out_dir=out_dir, progress=False,
                        device="cpu")


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = common.setup_distributed("cpu")
    assert info.world_size == WORLD and info.rank == rank
    history = pretrain(tiny_config(), ListDataset(14, seed=0), _args(out_dir), ListDataset(4, seed=1), info)
    # Each rank records its logged losses; the checkpoint (rank 0 only) holds the weights.
    torch.save({"history": history}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _simulate(out_dir_args):
    """One process: every step runs both ranks' shards and masks and averages their gradients."""
    args = out_dir_args
    cfg = tiny_config()
    common.seed_everything(args.seed)
    model = CLEAR(cfg)
    opt = common.make_optimizer(model.parameters(), args.lr, args.weight_decay, tuple(args.betas))
    data = ListDataset(14, seed=0)
    samplers = [DistributedSampler(data, WORLD, r, shuffle=True, seed=args.seed) for r in range(WORLD)]
    loaders = [torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=s) for s in samplers]
    steps = len(loaders[0])
    sched = common.warmup_cosine(opt, round(args.warmup_epochs * steps), args.epochs * steps, args.min_lr)
    gens = [torch.Generator().manual_seed(args.seed * 1000 + r) for r in range(WORLD)]
    losses = []
    for epoch in range(args.epochs):
        for s in samplers:
            s.set_epoch(epoch)
        for batches in zip(*loaders):
            opt.zero_grad()
            step = 0.0
            for r, b in enumerate(batches):
                mask = random_mask(b["valid"], cfg.mask_ratio, gens[r])
                loss = model(b["tokens"], b["valid"], b["time"], mask).loss
                (loss / WORLD).backward()
                step += float(loss.detach()) / WORLD
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            losses.append(step)
    return model.state_dict(), losses


def test_two_process_ddp_matches_gradient_averaging(tmp_path):
    out_dir = str(tmp_path)
    mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True, start_method="spawn")
    ckpt = checkpoint.load_checkpoint(tmp_path / "last.pt", "pretrain")
    h0 = torch.load(tmp_path / "rank0.pt", weights_only=True)["history"]
    h1 = torch.load(tmp_path / "rank1.pt", weights_only=True)["history"]
    # Logged losses are all-reduced, so both ranks report the same numbers.
    assert h0["steps"] == h1["steps"] and len(h0["steps"]) == 2 * 2  # 14 records / 2 ranks / batch 4 -> 2 steps
    assert len(ckpt["mask_generator"]) == WORLD
    # Same thread count as the workers, so the reference run sums in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state, losses = _simulate(_args(out_dir))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.tensor(h0["steps"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for k, v in state.items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-5)
    # Training moved the weights (the comparison above is not between two copies of the initial weights).
    common.seed_everything(5)
    init = CLEAR(tiny_config()).state_dict()
    assert any((ckpt["model"][k] - init[k]).abs().max() > 1e-4 for k in state)


def _finetune_worker(rank, port, cache, out_dir):
    from clear_hug.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(_finetune_argv(cache, out_dir)) == 0


def _finetune_argv(cache, out_dir):
    return ["finetune", "--cache", str(cache), "--preset", "tiny", "--out", str(out_dir), "--head", "linear",
            "--fractions", "1", "--epochs", "2", "--no-progress", "--device", "cpu"]


def test_torchrun_finetune_matches_one_process(tmp_path):
    from clear_hug.cli import main

    cache = tmp_path / "cache"
    assert main(["prepare", "--out", str(cache), "--n-records", "30", "--workers", "1", "--no-progress"]) == 0
    mp.start_processes(_finetune_worker, args=(_free_port(), cache, tmp_path / "two"), nprocs=WORLD, join=True,
                       start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_finetune_argv(cache, tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    two = checkpoint.load_checkpoint(tmp_path / "two" / "linear_f1_s0.pt", "head")
    one = checkpoint.load_checkpoint(tmp_path / "one" / "linear_f1_s0.pt", "head")
    # Rank 0 alone trained and wrote the head, on features both ranks extracted: the same as one process.
    for k, v in one["head_state"].items():
        torch.testing.assert_close(two["head_state"][k], v, rtol=1e-4, atol=1e-5)
    assert two["result"]["n_train"] == one["result"]["n_train"] == int((np.load(cache / "splits.npy") == 0).sum())
    assert (tmp_path / "two" / "pretrained" / "model.safetensors").is_file()


def _finetune_encoder_worker(rank, port, cache, out_dir):
    from clear_hug.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(_finetune_argv(cache, out_dir) + ["--finetune-encoder", "--batch-size", "4"]) == 0


def test_torchrun_finetune_encoder_trains_one_model(tmp_path):
    """--finetune-encoder under torchrun: DDP over the processes, one model written by rank 0, its encoder trained.
    (That DDP averages gradients as one process would is checked for pretraining above; not repeated here.)"""
    from clear_hug.cli import main
    from clear_hug.config import get_config

    cache = tmp_path / "cache"
    assert main(["prepare", "--out", str(cache), "--n-records", "30", "--workers", "1", "--no-progress"]) == 0
    mp.start_processes(_finetune_encoder_worker, args=(_free_port(), cache, tmp_path / "two"), nprocs=WORLD,
                       join=True, start_method="spawn")
    state = checkpoint.load_checkpoint(tmp_path / "two" / "linear_f1_s0.pt", "head")
    common.seed_everything(0)
    init = CLEAR(get_config("tiny")).state_dict()
    assert state["encoder_state"] is not None and set(state["encoder_state"]) == set(init)
    assert any((state["encoder_state"][k] - init[k]).abs().max() > 1e-6 for k in init)  # the encoder trained
    assert (tmp_path / "two" / "pretrained" / "model.safetensors").is_file()
    assert len((tmp_path / "two" / "results.jsonl").read_text().splitlines()) == 1  # rank 0 alone logged
