"""The fused CPU ops of the LoRA branch (csrc/lora_cpu.cpp, wrappers in fastlora/_philox.py):
equal to the unfused formulas (dropout, then matmul) on odd shapes, every dtype, row blocks that
do not divide M; opcheck; bad inputs; the torch backend's use of them; and the portable code
(ATEN_CPU_CAPABILITY=default: no hand-written AVX-512) in a subprocess."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close_fa, make_problem

from fastlora import _ext, _philox

pytestmark = pytest.mark.skipif(
    not _philox.fused_available(torch.device("cpu")) and os.environ.get("FASTLORA_NO_EXT", "0") not in ("", "0"),
    reason="C++ extension disabled (FASTLORA_NO_EXT)",
)
ops = torch.ops.fastlora

SHAPES = [(M, K, r) for M in (1, 37, 300) for K in (5, 130) for r in (1, 16)] + [(45, 17, 20), (70, 64, 33)]
BLOCK_ROWS = [0, 7, 64]  # 0: the op's choice; 7 and 64 do not divide 37 or 300
TIGHT = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _close(got, ref, dtype):
    """TIGHT, with atol relative to the largest entry of ref for float32 (sums of up to 300
    terms of size ~2 differ in the order of their additions)."""
    tol = dict(TIGHT[dtype])
    if dtype == torch.float32:
        tol["atol"] = max(tol["atol"], 2e-6 * float(ref.abs().max()))
    torch.testing.assert_close(got, ref, **tol)


SEED = 2**40 + 123


@pytest.fixture(autouse=True)
def ext():
    assert _ext.available(), _ext.unavailable_reason()
    assert _philox.fused_available(torch.device("cpu")), "a stale build: fastlora._C lacks the fused ops"


def _operands(M, K, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, A, dz, dx = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((M, K), (r, K), (M, r), (M, K)))
    return x.to(dtype), A.to(dtype), dz.to(dtype), dx.to(dtype)


def _unfused(x, A, dz, dx, p, seed, row_offset=0):
    """The formulas the fused ops replace, in x's dtype: dropout(x) @ A^T, dz^T @ dropout(x),
    dx + dropout(dz @ A)."""
    xd = _philox.dropout(x, p, seed, row_offset=row_offset) if p > 0 else x
    t = torch.mm(dz, A)
    if p > 0:
        _philox.dropout_(t, p, seed, row_offset=row_offset)
    return torch.mm(xd, A.t()), torch.mm(dz.t(), xd), dx + t


def _fused(x, A, dz, dx, p, seed, block_rows=0, row_offset=0):
    z = ops.dropout_shrink(x, A, p, seed, row_offset, block_rows)
    dA = ops.dropout_dA(dz, x, p, seed, row_offset, block_rows)
    dx1 = dx.clone()
    ops.dropout_tail_add_(dx1, dz, A, p, seed, row_offset, block_rows)
    dx2 = dx.clone()
    dA2 = ops.dropout_dA_tail_add_(dx2, dz, x, A, p, seed, row_offset, block_rows)
    return z, dA, dx1, dA2, dx2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M, K, r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_matches_unfused(dtype, M, K, r, p):
    x, A, dz, dx = _operands(M, K, r, dtype)
    z_ref, dA_ref, dx_ref = _unfused(x, A, dz, dx, p, SEED)
    for block_rows in BLOCK_ROWS:
        z, dA, dx1, dA2, dx2 = _fused(x, A, dz, dx, p, SEED, block_rows)
        for got, ref in ((z, z_ref), (dA, dA_ref), (dx1, dx_ref), (dA2, dA_ref), (dx2, dx_ref)):
            assert got.dtype == dtype and got.shape == ref.shape
            _close(got, ref, dtype)
        # the combined op is the two single ones (same blocks, same kernels)
        assert torch.equal(dx1, dx2) and torch.equal(dA, dA2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, K, r", [(37, 130, 16), (300, 5, 1), (300, 130, 20)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_half_flash_attention_rule(dtype, M, K, r, p):
    """Half types: the error against the float64 oracle (same mask, same dropped values) is at
    most twice the error of torch's own ops in that dtype."""
    x, A, dz, dx = _operands(M, K, r, dtype)
    naive = _unfused(x, A, dz, dx, p, SEED)
    xd64 = _philox.dropout(x, p, SEED).double()
    keep = _philox.keep_mask(M, K, p, SEED)
    tail64 = torch.where(keep, (dz.double() @ A.double()) / (1 - p), 0)
    oracle = (xd64 @ A.double().t(), dz.double().t() @ xd64, dx.double() + tail64)
    for block_rows in (0, 7):
        z, dA, dx1, dA2, dx2 = _fused(x, A, dz, dx, p, SEED, block_rows)
        for got, ref, nv, what in (
            (z, oracle[0], naive[0], "z"),
            (dA, oracle[1], naive[1], "dA"),
            (dx1, oracle[2], naive[2], "dx"),
            (dA2, oracle[1], naive[1], "dA (combined)"),
            (dx2, oracle[2], naive[2], "dx (combined)"),
        ):
            assert got.dtype == dtype
            assert_close_fa(got, ref, nv, atol=1e-3, what=what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_row_offset_and_strided_inputs(dtype):
    M, K, r, row_offset = 37, 130, 16, 2**33 + 3  # counters past 2**32
    x, A, dz, dx = _operands(M, K, r, dtype, seed=1)
    ref = _unfused(x, A, dz, dx, 0.3, SEED, row_offset)
    tol = TIGHT.get(dtype, dict(rtol=2e-2, atol=2e-1))
    # rows of x with a stride (read in place), a transposed x (copied), non-contiguous dz and A
    x_rows = torch.empty(M, K + 3, dtype=dtype)[:, :K].copy_(x)
    x_t = x.t().contiguous().t()
    dz_t, A_t = dz.t().contiguous().t(), A.t().contiguous().t()
    for xi, dzi, Ai in ((x, dz, A), (x_rows, dz_t, A_t), (x_t, dz, A)):
        z, dA, dx1, dA2, dx2 = _fused(xi, Ai, dzi, dx, 0.3, SEED, 7, row_offset)
        for got, want in ((z, ref[0]), (dA, ref[1]), (dx1, ref[2]), (dA2, ref[1]), (dx2, ref[2])):
            torch.testing.assert_close(got, want, **tol)
    # dx may have rows with a stride too (it is written in place)
    dx_rows = torch.empty(M, K + 5, dtype=dtype)[:, :K].copy_(dx)
    ops.dropout_tail_add_(dx_rows, dz, A, 0.3, SEED, row_offset, 7)
    torch.testing.assert_close(dx_rows, ref[2], **tol)


def test_dropped_elements_do_not_leak():
    """Dropped entries of x (here inf / nan) must not reach z or dA: where, not a multiply."""
    M, K, r = 40, 33, 5
    x, A, dz, dx = _operands(M, K, r, torch.float32)
    keep = _philox.keep_mask(M, K, 0.5, SEED)
    x[~keep] = float("nan")
    x[~keep & (torch.arange(K) % 2 == 0)] = float("inf")
    z, dA, _, dA2, _ = _fused(x, A, dz, dx, 0.5, SEED, 7)
    assert z.isfinite().all() and dA.isfinite().all() and dA2.isfinite().all()
    torch.testing.assert_close(z, torch.mm(torch.where(keep, x * 2.0, 0), A.t()), rtol=1e-5, atol=1e-5)


def test_deterministic_and_thread_count():
    x, A, dz, dx = _operands(300, 130, 16, torch.float32, seed=2)
    first = _fused(x, A, dz, dx, 0.1, SEED)
    again = _fused(x, A, dz, dx, 0.1, SEED)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused(x, A, dz, dx, 0.1, SEED)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_empty_shapes():
    for M, K, r in ((0, 5, 3), (4, 0, 3), (4, 5, 0)):
        x, A, dz, dx = _operands(M, K, r, torch.float32)
        z, dA, dx1, dA2, dx2 = _fused(x, A, dz, dx, 0.5, 1)
        assert z.shape == (M, r) and dA.shape == (r, K) and dA2.shape == (r, K)
        assert not z.any() and not dA.any() and not dA2.any()
        assert torch.equal(dx1, dx) and torch.equal(dx2, dx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_python_wrappers(dtype):
    """fastlora._philox wrappers: the C++ op, the pure-PyTorch fallback (force_python) and a
    0-d tensor seed (the torch.compile path) agree."""
    x, A, dz, dx = _operands(37, 130, 16, dtype, seed=3)
    tol = TIGHT[dtype]
    seed_t = torch.tensor(SEED)
    for kw in (dict(), dict(force_python=True)):
        torch.testing.assert_close(
            _philox.dropout_shrink(x, A, 0.2, SEED, **kw), _philox.dropout_shrink(x, A, 0.2, seed_t), **tol
        )
        dA = _philox.dropout_dA(dz, x, 0.2, SEED, **kw)
        torch.testing.assert_close(dA, _philox.dropout_dA(dz, x, 0.2, seed_t), **tol)
        a, b = dx.clone(), dx.clone()
        assert _philox.dropout_tail_add_(a, dz, A, 0.2, SEED, **kw) is a
        _philox.dropout_tail_add_(b, dz, A, 0.2, seed_t)
        torch.testing.assert_close(a, b, **tol)
        a, b = dx.clone(), dx.clone()
        dA_a = _philox.dropout_dA_tail_add_(a, dz, x, A, 0.2, SEED, **kw)
        dA_b = _philox.dropout_dA_tail_add_(b, dz, x, A, 0.2, seed_t)
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(dA_a, dA_b, **tol)


def test_python_wrapper_errors():
    x, A, dz, dx = _operands(6, 10, 3, torch.float32)
    with pytest.raises(ValueError, match="p must be"):
        _philox.dropout_shrink(x, A, 1.0, 1)
    with pytest.raises(ValueError, match="seed must be"):
        _philox.dropout_dA(dz, x, 0.5, -1)
    with pytest.raises(TypeError, match="dtype"):
        _philox.dropout_shrink(x, A.double(), 0.5, 1)
    with pytest.raises(ValueError, match="2-D"):
        _philox.dropout_tail_add_(dx, dz[0], A, 0.5, 1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, A, dz, dx: ops.dropout_shrink(x, A[:, :9], 0.5, 1), "A must be \\(r, K\\)"),
        (lambda x, A, dz, dx: ops.dropout_shrink(x, A.double(), 0.5, 1), "share a dtype"),
        (lambda x, A, dz, dx: ops.dropout_shrink(x[0], A, 0.5, 1), "x must be 2-D"),
        (lambda x, A, dz, dx: ops.dropout_shrink(x.int(), A.int(), 0.5, 1), "float32, float64"),
        (lambda x, A, dz, dx: ops.dropout_shrink(x, A, 1.0, 1), "p must be in"),
        (lambda x, A, dz, dx: ops.dropout_shrink(x, A, 0.5, -1), "seed must be in"),
        (lambda x, A, dz, dx: ops.dropout_shrink(x, A, 0.5, 1, 0, -1), "block_rows"),
        (lambda x, A, dz, dx: ops.dropout_dA(dz[:5], x, 0.5, 1), "dz must have M = 6"),
        (lambda x, A, dz, dx: ops.dropout_dA(dz, x, 0.5, 1, 2**62), "overflow"),
        (lambda x, A, dz, dx: ops.dropout_tail_add_(dx, dz[:, :2], A, 0.5, 1), "dz must be \\(M, r\\) with r = 3"),
        (lambda x, A, dz, dx: ops.dropout_tail_add_(dx.t(), dz, A, 0.5, 1), "rows of unit stride"),
        (lambda x, A, dz, dx: ops.dropout_dA_tail_add_(dx, dz, x[:, :9], A, 0.5, 1), "same shape"),
    ],
)
def test_op_errors(call, match):
    x, A, dz, dx = _operands(6, 10, 3, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        call(x, A, dz, dx)


def test_opcheck():
    x, A, dz, dx = _operands(37, 130, 16, torch.float32, seed=4)
    seed_t = torch.tensor(5)
    for dtype in (torch.float32, torch.bfloat16):
        xi, Ai, dzi, dxi = (t.to(dtype) for t in (x, A, dz, dx))
        torch.library.opcheck(ops.dropout_shrink.default, (xi, Ai, 0.5, 3))
        torch.library.opcheck(ops.dropout_shrink.default, (xi, Ai, 0.5, 3, 7, 8))
        torch.library.opcheck(ops.dropout_dA.default, (dzi, xi, 0.5, 3))
        torch.library.opcheck(ops.dropout_tail_add_.default, (dxi.clone(), dzi, Ai, 0.5, 3))
        torch.library.opcheck(ops.dropout_dA_tail_add_.default, (dxi.clone(), dzi, xi, Ai, 0.5, 3, 0, 8))
    torch.library.opcheck(ops.dropout_shrink_tseed, (x, A, 0.5, seed_t))
    torch.library.opcheck(ops.dropout_dA_tseed, (dz, x, 0.5, seed_t))
    torch.library.opcheck(ops.dropout_tail_add_tseed_, (dx.clone(), dz, A, 0.5, seed_t))
    torch.library.opcheck(ops.dropout_dA_tail_add_tseed_, (dx.clone(), dz, x, A, 0.5, seed_t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, r", [(1, 5, 1), (37, 130, 16), (300, 24, 8), (45, 17, 20), (70, 200, 64)])
def test_expand_and_gpass(dtype, M, N, r):
    """lora_expand: scale * z @ B^T + bias; lora_gpass: (scale * g @ B, scale * g^T @ z)."""
    g_ = torch.Generator().manual_seed(5)
    z, B, bias, g = (torch.randn(shape, generator=g_, dtype=torch.float64) for shape in ((M, r), (N, r), (N,), (M, N)))
    z, B, bias, g = (t.to(dtype) for t in (z, B, bias, g))
    s = 1.7
    refs = {
        "y": bias.double() + s * z.double() @ B.double().t(),
        "y0": s * z.double() @ B.double().t(),
        "dz": s * g.double() @ B.double(),
        "dB": s * g.double().t() @ z.double(),
    }
    naive = {
        "y": torch.addmm(bias, z, B.t(), alpha=s),
        "y0": torch.mm(z * s, B.t()),
        "dz": torch.mm(g, B) * s,
        "dB": torch.mm(g.t(), z) * s,
    }
    for block_rows in (0, 7):
        dz, dB = ops.lora_gpass(g, B, z, s, block_rows)
        dz_only, empty = ops.lora_gpass(g, B, None, s, block_rows)
        assert empty.numel() == 0 and torch.equal(dz, dz_only)
        got = {
            "y": ops.lora_expand(z, B, bias, s, block_rows),
            "y0": ops.lora_expand(z, B, None, s, block_rows),
            "dz": dz,
            "dB": dB,
        }
        for k, v in got.items():
            assert v.dtype == dtype and v.shape == refs[k].shape, k
            if dtype in TIGHT:
                _close(v, refs[k].to(dtype), dtype)
            else:
                assert_close_fa(v, refs[k], naive[k], atol=1e-3, what=k)
    # the Python wrappers, with and without the kernels (M >= 64 and float32 select them)
    dz, dB = _philox.lora_gpass(g, B, z, s)
    assert _philox.lora_gpass(g, B, None, s)[1] is None
    y = _philox.lora_expand(z, B, bias, s)
    for v, k in ((dz, "dz"), (dB, "dB"), (y, "y")):
        if dtype in TIGHT:
            _close(v, refs[k].to(dtype), dtype)


def test_expand_gpass_errors_and_opcheck():
    z, B, g = torch.randn(6, 3), torch.randn(10, 3), torch.randn(6, 10)
    with pytest.raises(RuntimeError, match="B must be \\(N, r\\) with r = z.size\\(1\\)"):
        ops.lora_expand(z, B[:, :2], None, 1.0)
    with pytest.raises(RuntimeError, match="bias must be \\(N,\\)"):
        ops.lora_expand(z, B, torch.randn(9), 1.0)
    with pytest.raises(RuntimeError, match="B must be \\(N, r\\) with N = g.size\\(1\\)"):
        ops.lora_gpass(g, B[:9], z, 1.0)
    with pytest.raises(RuntimeError, match="z must be \\(M, r\\)"):
        ops.lora_gpass(g, B, z[:5], 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.lora_gpass(g, B.double(), z, 1.0)
    for dtype in (torch.float32, torch.bfloat16):
        zi, Bi, gi = (t.to(dtype) for t in (torch.randn(70, 16), torch.randn(33, 16), torch.randn(70, 33)))
        torch.library.opcheck(ops.lora_expand.default, (zi, Bi, torch.randn(33, dtype=dtype), 2.0))
        torch.library.opcheck(ops.lora_expand.default, (zi, Bi, None, 2.0, 7))
        torch.library.opcheck(ops.lora_gpass.default, (gi, Bi, zi, 2.0))
        torch.library.opcheck(ops.lora_gpass.default, (gi, Bi, None, 2.0, 7))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backend_fused_matches_unfused(monkeypatch, p, dtype):
    """lora_linear's forward and every gradient, with the fused ops (and lora_expand /
    lora_gpass) and with the unfused path, for each subset of the inputs that need a gradient
    (LoRA-FA: no dA; frozen x: no dx)."""
    import fastlora

    x, W, A, B, b = make_problem(300, 130, 24, 16, dtype=dtype, lead=(3, 100))
    grad = torch.randn(3, 100, 24, dtype=dtype)

    def run(x_grad, A_grad):
        xi, Ai, Bi = x.clone().requires_grad_(x_grad), A.clone().requires_grad_(A_grad), B.clone().requires_grad_()
        y = fastlora.lora_linear(xi, W, Ai, Bi, scale=1.5, bias=b, dropout_p=p, seed=SEED, backend="torch")
        y.backward(grad)
        return [y.detach()] + [t.grad for t in (xi, Ai, Bi)]

    for x_grad, A_grad in ((True, True), (True, False), (False, True)):
        fused = run(x_grad, A_grad)
        with monkeypatch.context() as m:
            m.setattr(_philox, "fused_available", lambda device: False)
            m.setattr(_philox, "fused_kernels", lambda t: False)
            unfused = run(x_grad, A_grad)
        for a, b_ in zip(fused, unfused, strict=True):
            assert (a is None) == (b_ is None)
            if a is not None:
                _close(a, b_, dtype)


@pytest.mark.skipif(os.environ.get("FASTLORA_PORTABLE_SUBPROCESS") == "1", reason="already the subprocess")
def test_portable_code_subprocess():
    """ATEN_CPU_CAPABILITY=default turns off the hand-written AVX-512 code (Philox and the float32
    kernels), as it does torch's: the portable code passes the same tests (and the Philox bits
    still match the spec)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", FASTLORA_PORTABLE_SUBPROCESS="1")
    tests = ["tests/test_fused_cpu.py", "tests/test_philox.py"]
    k = "matches_unfused or row_offset or leak or wrappers or expand or backend or ext_matches_python or multithreaded"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", k, *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout
