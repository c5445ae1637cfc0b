"""Shared by the kernel tests: random layouts, the float64 ground truth, and tolerances measured from PyTorch.

Every backend's parity test goes through ``check_parity``: the kernel's forward and backward are compared with
the dense reference computed in float64 on the materialised mask, with a tolerance derived from the error that
PyTorch's own ``scaled_dot_product_attention`` makes on the same inputs in the same dtype.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clear_kernels import PADDING, SUMMARY, SegmentLayout
from clear_kernels.reference import masked_attention


# --------------------------------------------------------------------------------------------- random layouts
def random_ids(rng: random.Random, length: int, *, num_groups: int = 3, max_seg: int = 12,
               p_summary: float = 0.1, p_pad: float = 0.1, all_pad: bool = False) -> tuple[list[int], list[int]]:
    """One row of ids: segment runs of random lengths (ids shuffled, so not sorted), summary tokens and padding
    anywhere, random groups."""
    if all_pad:
        return [PADDING] * length, [0] * length
    segment: list[int] = []
    ids = list(range(length))
    rng.shuffle(ids)
    next_id = iter(ids)
    while len(segment) < length:
        r = rng.random()
        if r < p_summary:
            segment.append(SUMMARY)
        elif r < p_summary + p_pad:
            segment.append(PADDING)
        else:
            run = 1 if rng.random() < 0.25 else rng.randint(1, max_seg)
            segment.extend([next(next_id)] * min(run, length - len(segment)))
    group = [rng.randrange(num_groups) for _ in range(length)]
    return segment, group


def random_layout(seed: int, batch: int = 2, length: int = 40, **kw) -> SegmentLayout:
    rng = random.Random(seed)
    rows = [random_ids(rng, length, all_pad=(b == 1 and seed % 4 == 3), **kw) for b in range(batch)]
    segment = torch.tensor([r[0] for r in rows], dtype=torch.int32)
    group = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    return SegmentLayout.from_ids(segment, group, num_groups=kw.get("num_groups", 3))


def conduction_layout(seed: int, batch: int = 2, leads: int = 12, beats: int = 4, p_valid: float = 0.8,
                      compact: bool = False) -> SegmentLayout:
    gen = torch.Generator().manual_seed(seed)
    valid = torch.rand(batch, leads, beats, generator=gen) < p_valid
    return SegmentLayout.conduction(valid, compact=compact)


def layout_cases(length: int = 40) -> dict[str, SegmentLayout]:
    """Named layouts covering what the kernels must get right; small enough for the Triton interpreter."""
    cases = {
        "conduction": conduction_layout(0, batch=2, leads=12, beats=3),
        "conduction_compact": conduction_layout(1, batch=2, leads=4, beats=6, p_valid=0.5, compact=True),
        "block_diagonal_zeros": SegmentLayout.block_diagonal([[5, 0, 1, 9, 0], [0, 0, 3, 0, 0]]),
        "one_long_segment": SegmentLayout.block_diagonal([[70], [33]]),
        "one_token_segments": SegmentLayout.from_ids(torch.arange(length).repeat(2, 1)),
        "many_summary": random_layout(5, length=length, p_summary=0.5, p_pad=0.05, num_groups=2),
        "random_mixed": random_layout(2, length=length),
        "random_with_empty_row": random_layout(3, length=length, p_pad=0.3),
        "long_runs": random_layout(4, length=length, max_seg=30, p_summary=0.05),
    }
    return cases


# ------------------------------------------------------------------------------------------------ tolerances
@dataclass
class Errors:
    out: float
    grads: tuple[float, float, float]


def _inputs(layout: SegmentLayout, heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int,
            kv_heads: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    shape = (layout.batch_size, heads, layout.seq_len, head_dim)
    kv_shape = (layout.batch_size, kv_heads or heads, layout.seq_len, head_dim)
    q, k, v, dout = (torch.randn(s, generator=gen, dtype=torch.float64) for s in (shape, kv_shape, kv_shape, shape))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)], dout.to(device=device, dtype=dtype)


def ground_truth(q, k, v, dout, mask, scale):
    """float64 output and gradients of the dense reference."""
    leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v)]
    out, lse = masked_attention(*leaves, mask, scale)
    grads = torch.autograd.grad(out, leaves, dout.to(torch.float64))
    return out.detach(), lse.detach(), grads


def torch_errors(q, k, v, dout, mask, scale, truth) -> Errors:
    """How far PyTorch's SDPA lands from the float64 truth in the inputs' dtype (non-padding rows only)."""
    rows = mask.any(-1)  # [B, L]
    safe = mask | torch.diag_embed(~rows)  # let empty rows see themselves so SDPA stays finite there
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=safe[:, None], scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    out = torch.where(rows[:, None, :, None], out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, leaves, dout)
    def err(a, b):
        return float((a.detach().to(torch.float64) - b).abs().max()) if a.numel() else 0.0

    return Errors(err(out, truth[0]), tuple(err(g, t) for g, t in zip(grads, truth[2])))


def tolerance(dtype: torch.dtype, torch_err: float, magnitude: float) -> float:
    """Allowed max abs error: a few times PyTorch's own error, never below a couple of ulps of the result."""
    eps = torch.finfo(dtype).eps
    return 4.0 * torch_err + 4.0 * eps * max(1.0, magnitude)


# --------------------------------------------------------------------------------------------- parity check
def strided_views(q, k, v, dout):
    """The same values laid out as a model hands them over: q, k, v as head views of one ``[B, L, 3, H, D]``
    projection output, the output gradient as a head view of ``[B, L, H, D]``."""
    if k.shape != q.shape:  # grouped-query attention: q from [B, L, H, D], k and v from one [B, L, 2, H_kv, D]
        packed = torch.stack([k, v]).permute(1, 3, 0, 2, 4).contiguous()
        k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        return (q.transpose(1, 2).contiguous().transpose(1, 2), k, v), dout.transpose(1, 2).contiguous().transpose(1, 2)
    packed = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).contiguous()  # [B, L, 3, H, D]
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    return (q, k, v), dout.transpose(1, 2).contiguous().transpose(1, 2)


def check_parity(backend: str, layout: SegmentLayout, *, heads: int = 2, head_dim: int = 32,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 scale: float | None = None, backward: bool = True, strided: bool = False,
                 is_causal: bool = False, kv_heads: int | None = None) -> None:
    """Forward (and backward) of ``backend`` against the float64 dense reference; raises AssertionError.
    ``strided``: the kernel gets the inputs as strided views (``strided_views``). ``is_causal`` applies the causal
    rule; ``kv_heads`` (dividing ``heads``) makes it grouped-query attention."""
    import clear_kernels
    from clear_kernels import ops

    layout = layout.to(device)
    (q, k, v), dout = _inputs(layout, heads, head_dim, dtype, device, seed, kv_heads)
    if strided:
        (q, k, v), dout = strided_views(q, k, v, dout)
        assert not q.is_contiguous() and not dout.is_contiguous()
    scale = head_dim ** -0.5 if scale is None else scale
    mask = layout.materialize(is_causal)
    truth = ground_truth(q, k, v, dout, mask, scale)
    yard = torch_errors(q, k, v, dout, mask, scale, truth)

    features = frozenset(({"causal"} if is_causal else set()) | ({"gqa"} if k.shape[1] != heads else set()))
    chosen = clear_kernels.dispatch.select(backend, q, features)
    fwd, bwd = ops.op(chosen.op_prefix, "fwd"), ops.op(chosen.op_prefix, "bwd")
    with torch.no_grad():
        out, lse = fwd(q, k, v, *layout.kernel_args(), scale, is_causal)
    _compare("out", out, truth[0], tolerance(dtype, yard.out, float(truth[0].abs().max())))
    rows = mask.any(-1)[:, None, :].expand_as(lse)
    assert lse.dtype == ops.lse_dtype(dtype), f"lse: dtype {lse.dtype} for {dtype} inputs"
    lse_truth = torch.where(rows, truth[1].to(lse.dtype), torch.zeros_like(lse))
    _compare("lse", lse, lse_truth.double(), 1e-4 * max(1.0, float(lse_truth.abs().max())) if dtype != torch.float64
             else 1e-10)
    if not backward:
        return
    with torch.no_grad():
        grads = bwd(dout, q, k, v, out, lse, *layout.kernel_args(), scale, is_causal)
    for name, g, t, e in zip(("dq", "dk", "dv"), grads, truth[2], yard.grads):
        _compare(name, g, t, tolerance(dtype, e, float(t.abs().max()) if t.numel() else 1.0))


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got64 = got.detach().to("cpu", torch.float64)
    want64 = want.detach().to("cpu", torch.float64)
    assert got64.shape == want64.shape, f"{name}: shape {tuple(got64.shape)} != {tuple(want64.shape)}"
    assert torch.isfinite(got64).all(), f"{name}: {int((~torch.isfinite(got64)).sum())} non-finite values"
    err = float((got64 - want64).abs().max()) if got64.numel() else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3e} > tolerance {tol:.3e}"


def check_module_matches_reference(backend: str, *, heads: int, kv_heads: int | None = None, atol: float) -> None:
    """``SegmentAttention`` on ``backend`` against the same weights on the reference backend, on the conduction case:
    the output and every gradient (input and parameters), within ``atol`` (and the same rtol)."""
    from clear_kernels.nn import SegmentAttention

    layout = conduction_layout(0, batch=2, leads=12, beats=3)  # layout_cases()["conduction"]
    torch.manual_seed(0)
    fast = SegmentAttention(64, heads, num_kv_heads=kv_heads, backend=backend)
    slow = SegmentAttention(64, heads, num_kv_heads=kv_heads, backend="reference")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(layout.batch_size, layout.seq_len, 64)
    results = []
    for module in (fast, slow):
        xi = x.clone().requires_grad_(True)
        out = module(xi, layout)
        grads = torch.autograd.grad(out.square().sum(), [xi, *module.parameters()])
        results.append((out, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)
