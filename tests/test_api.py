"""The public boundary: bad input gets a clear error naming the argument; dispatch explains itself."""

import warnings

import pytest
import torch

import clear_kernels
from clear_kernels import SegmentLayout, dispatch, segment_attention
from clear_kernels.nn import SegmentAttention
from clear_kernels.reference import segment_attention_reference

LAYOUT = SegmentLayout.conduction(torch.ones(2, 3, 4, dtype=torch.bool))  # L = 15


def qkv(batch=2, heads=2, length=15, dim=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, length, dim, generator=gen, dtype=dtype) for _ in range(3)]


# Without the native extension "auto" falls back to the reference here, and says so: expected in this test only.
@pytest.mark.filterwarnings("ignore:.*falling back to the 'reference' backend.*:RuntimeWarning")
def test_backend_auto_gives_the_reference_answer():
    q, k, v = qkv()
    out = segment_attention(q, k, v, LAYOUT)
    torch.testing.assert_close(out, segment_attention_reference(q, k, v, LAYOUT), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, k, v, lay: (q[0], k, v, lay), ValueError, r"q must be \[B, H, L, D\]"),
    (lambda q, k, v, lay: (q, k[:, :1], v, lay), ValueError, "k must have the shape of q"),
    (lambda q, k, v, lay: (q, k, v[..., :8], lay), ValueError, "v must have the shape of q"),
    (lambda q, k, v, lay: (q, k.double(), v, lay), TypeError, "k has dtype torch.float64 but q has torch.float32"),
    (lambda q, k, v, lay: (q.int(), k.int(), v.int(), lay), TypeError, "q has dtype torch.int32"),
    (lambda q, k, v, lay: (q, k.to("meta"), v, lay), ValueError, "k is on meta but q is on cpu"),
    (lambda q, k, v, lay: (q.numpy(), k, v, lay), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v, lay: (q, k, v, lay.materialize()), TypeError, "layout must be a SegmentLayout"),
    (lambda q, k, v, lay: (q[:1], k[:1], v[:1], lay), ValueError, "layout was built for batch 2 and length 15"),
    (lambda q, k, v, lay: (q[:, :, :9], k[:, :, :9], v[:, :, :9], lay), ValueError, "layout was built for batch 2"),
    (lambda q, k, v, lay: (q, k, v, lay.to("meta")), ValueError, "layout is on meta but q is on cpu"),
])
def test_bad_inputs_name_the_argument(mutate, exc, match):
    with pytest.raises(exc, match=match):
        segment_attention(*mutate(*qkv(), LAYOUT), backend="reference")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        segment_attention(*qkv(), LAYOUT, scale=scale, backend="reference")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        segment_attention(*qkv(), LAYOUT, backend="flash")
    with pytest.raises(TypeError, match="backend must be a string"):
        segment_attention(*qkv(), LAYOUT, backend=None)


def test_environment_variable_forces_a_backend(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select("auto", q).name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=f"environment variable {dispatch.ENV_VAR} must be"):
        segment_attention(q, k, v, LAYOUT)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # cannot run CPU tensors: an error, not a silent fallback
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs"):
        segment_attention(q, k, v, LAYOUT)


def test_forced_backend_that_refuses_says_why():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs: .*"):
        segment_attention(q, k, v, LAYOUT, backend="cuda")


def test_fallback_warns_once_and_lists_every_refused_backend(monkeypatch):
    """A float16 CPU input is refused by the faster CPU backends; auto falls back and says why, once."""
    q, k, v = qkv(dtype=torch.float16)
    monkeypatch.setattr(dispatch, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segment_attention(q, k, v, LAYOUT)
        segment_attention(q, k, v, LAYOUT)
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    reasons = clear_kernels.available_backends(q)
    preferred = [name for name in dispatch._AUTO_ORDER["cpu"] if reasons[name] is not None]
    if not preferred:
        pytest.skip("every CPU backend accepts float16 here, so there is no fallback to observe")
    assert len(messages) == 1
    for name in preferred:
        assert f"'{name}' not used because {reasons[name]}" in messages[0]


def test_an_unexpected_fallback_fails_the_test(monkeypatch):
    """The suite turns the fallback warning into an error (pyproject.toml), so a test that silently runs the
    reference instead of the backend it means to test fails; tests that expect the fallback say so."""
    q, k, v = qkv(dtype=torch.float16)  # refused by the CPU kernel: auto falls back
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.raises(RuntimeWarning, match="falling back to the 'reference' backend"):
        segment_attention(q, k, v, LAYOUT)


def test_available_backends_reports_reasons():
    q, _, _ = qkv()
    table = clear_kernels.available_backends(q)
    assert set(table) == set(dispatch.BACKEND_NAMES)
    assert table["reference"] is None
    assert "cuda" in (table["cuda"] or "") or "extension" in (table["cuda"] or "")


def test_module_matches_manual_projection():
    torch.manual_seed(0)
    module = SegmentAttention(32, 4, backend="reference")
    x = torch.randn(2, 15, 32)
    q, k, v = module.in_proj(x).chunk(3, dim=-1)
    def split(t):
        return t.view(2, 15, 4, 8).transpose(1, 2)

    attn = segment_attention_reference(split(q), split(k), split(v), LAYOUT)
    want = module.out_proj(attn.transpose(1, 2).reshape(2, 15, 32))
    torch.testing.assert_close(module(x, LAYOUT), want)


def test_module_input_errors():
    with pytest.raises(ValueError, match="divisible"):
        SegmentAttention(30, 4)
    module = SegmentAttention(32, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, L, 32\]"):
        module(torch.randn(2, 15, 16), LAYOUT)


def test_import_without_the_extension_warns_once_and_uses_the_reference():
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['clear_kernels._C'] = None  # as if it was never built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, clear_kernels\n"
        "msgs = [str(w.message) for w in caught if 'native extension' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "reasons = clear_kernels.available_backends(q)\n"
        "assert 'native extension' in reasons['cpu'], reasons\n"
        "lay = clear_kernels.SegmentLayout.block_diagonal([[2, 2]])\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')\n"
        "    out = clear_kernels.segment_attention(q, q, q, lay)\n"
        "assert torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ------------------------------------------------------------------ what the op cannot differentiate raises
def _differentiable_backends() -> list[str]:
    q = qkv()[0]
    return [name for name in ("reference", "cpu", "triton") if dispatch.why_not(name, q) is None]


@pytest.mark.parametrize("backend", _differentiable_backends())
def test_double_backward_raises_after_exact_first_derivatives(backend):
    """create_graph=True gives the first derivatives; differentiating them again is an error, never zeros."""
    q, k, v = (t.double() if backend != "triton" else t for t in qkv(heads=1))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    plain = torch.autograd.grad(segment_attention(*leaves, LAYOUT, backend=backend).square().sum(), leaves)
    graphed = torch.autograd.grad(segment_attention(*leaves, LAYOUT, backend=backend).square().sum(), leaves,
                                  create_graph=True)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b.detach())
    with pytest.raises(NotImplementedError, match="double backward is not supported"):
        torch.autograd.grad(graphed[0].sum(), leaves)
    if backend != "triton":  # gradgradcheck needs float64
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.gradgradcheck(lambda a, b, c: segment_attention(a, b, c, LAYOUT, backend=backend),
                                         leaves, fast_mode=True)


@pytest.mark.parametrize("backend", _differentiable_backends())
def test_forward_mode_ad_raises(backend):
    import torch.autograd.forward_ad as fwAD

    q, k, v = qkv(heads=1)
    tangent = torch.ones_like(q)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: segment_attention(x, k, v, LAYOUT, backend=backend), (q,), (tangent,))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: segment_attention(q, k, x, LAYOUT, backend=backend), (v,), (tangent,))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        segment_attention(q, fwAD.make_dual(k, tangent), v, LAYOUT, backend=backend)


@pytest.mark.parametrize("scale", [3.4e38, -3.4e38, 2.4e38, 1e300, 10**400],
                         ids=["3.4e38", "-3.4e38", "2.4e38", "1e300", "int_10^400"])
def test_scale_beyond_float32_is_rejected(scale):
    """A scale whose float32 value (times log2(e), as the kernels use it) is inf gave NaN rows."""
    with pytest.raises(ValueError, match="scale must be"):
        segment_attention(*qkv(), LAYOUT, scale=scale, backend="reference")


def test_largest_allowed_scale_gives_finite_rows():
    from clear_kernels.api import MAX_ABS_SCALE

    q, k, v = qkv()
    out = segment_attention(torch.zeros_like(q), k, v, LAYOUT, scale=MAX_ABS_SCALE)
    assert torch.isfinite(out).all()
