"""fastlora.quant's compiled ops (csrc/quant_cpu.cpp, csrc/cuda/nf4_cuda.cu) against the pure-PyTorch
definitions in fastlora/quant/ byte for byte (tests/test_quant.py ties those to bitsandbytes), plus
the out= variants, bad inputs, torch.library.opcheck and, with a GPU, the CUDA kernels."""

import os
import subprocess
import sys

import pytest
import torch

from fastlora import _ext
from fastlora.quant import (
    Int8Weight,
    _ops,
    dequantize_blockwise_8bit,
    dequantize_int8,
    dequantize_nf4,
    force_python,
    nf4_linear,
    quantize,
    quantize_blockwise_8bit,
    quantize_int8,
    quantize_nf4,
)
from fastlora.quant.nf4 import NF4_CODE, dynamic_map_signed

if os.environ.get("FASTLORA_NO_EXT", "0") not in ("", "0"):
    pytest.skip("FASTLORA_NO_EXT is set: the C++ extension is not built", allow_module_level=True)

ops = torch.ops.fastlora
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Odd counts, partial last blocks, rows that are not whole blocks, one element, and one weight big
# enough (> 32K elements) to be split across threads.
SHAPES = [(7, 13), (33, 130), (64, 256), (3, 1000), (1, 1), (300, 1111)]


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    """CI builds the extension; a missing or stale build fails here instead of skipping."""
    assert _ext.available(), _ext.unavailable_reason()
    missing = [name for name in _ops.OP_NAMES if not _ops.has_kernel(name, "cpu")]
    assert not missing, f"fastlora._C lacks CPU kernels for {missing}: rebuild the extension"


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.1 + 3 * torch.rand(shape[0], 1, generator=g))
    return w.to(dtype)


def _same(a, b):
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _both(fn, *args, **kwargs):
    """fn's result through the compiled op and through plain PyTorch."""
    got = fn(*args, **kwargs)
    with force_python():
        ref = fn(*args, **kwargs)
    return got, ref


def _special_nf4_rows():
    """Values on the code midpoints (ties go down) and one ulp either side, +-0, +-1, an all-zero
    block, an all -0.0 block, denormals (absmax below the 1e-38 clamp), values near fp32 max."""
    code = torch.tensor(NF4_CODE)
    mid = (code[:-1] + code[1:]) / 2
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    row = torch.cat([mid, up, down, torch.tensor([0.0, -0.0, 1.0, -1.0]), code[:15]])  # 64
    tiny = torch.tensor(1e-40) * torch.linspace(-1, 1, 64)
    return torch.cat([row, -row, 3.0 * row, torch.zeros(64), torch.full((64,), -0.0), tiny, 3e38 * row])


# ---- NF4 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DT.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_nf4_matches_python(shape, dtype, blocksize):
    W = _weight(shape, dtype, seed=shape[0] * 7 + shape[1])
    (packed, absmax), (ref_packed, ref_absmax) = _both(quantize_nf4, W, blocksize)
    assert _same(packed, ref_packed) and _same(absmax, ref_absmax)
    assert packed.shape == ((W.numel() + 1) // 2, 1) and absmax.shape == (-(-W.numel() // blocksize),)
    for out_dtype in DTYPES + [torch.float64]:
        got, ref = _both(dequantize_nf4, packed, absmax, shape, blocksize, out_dtype)
        assert _same(got, ref), out_dtype


@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_special_values(blocksize):
    x = _special_nf4_rows()
    for W in (x.view(1, -1), torch.cat([x, x[:37]]).view(1, -1), x[: 64 * 5 + 1].view(1, -1)):
        for dtype in (torch.float32, torch.bfloat16):
            Wd = W.to(dtype)
            (packed, absmax), (ref_packed, ref_absmax) = _both(quantize_nf4, Wd, blocksize)
            assert _same(packed, ref_packed) and _same(absmax, ref_absmax)
            got, ref = _both(dequantize_nf4, packed, absmax, W.shape, blocksize, dtype)
            assert _same(got, ref)
    # Midpoints take the lower code, one ulp up the upper one (absmax 1 in the first block).
    nib = quantize_nf4(x.view(1, -1), 64)[0].view(-1)
    nib = torch.stack([nib >> 4, nib & 15], 1).view(-1)
    assert torch.equal(nib[:15], torch.arange(15, dtype=torch.uint8))
    assert torch.equal(nib[15:30], torch.arange(1, 16, dtype=torch.uint8))


@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
def test_public_quantize_matches_python(dtype, blocksize, double_quant):
    """Through fastlora.quant.quantize / NF4Weight: every stored tensor and the dequantized
    weight (which goes through the nested 8-bit dequantize op when double_quant)."""
    W = _weight((129, 257), dtype, seed=blocksize)
    w, ref = _both(quantize, W, "nf4", blocksize, double_quant)
    assert w.double_quant == ref.double_quant == double_quant
    for a, b in zip(w._tensors(), ref._tensors(), strict=True):
        assert _same(a, b)
    for out_dtype in {dtype, torch.float32, torch.bfloat16}:
        got = w.dequantize(out_dtype)
        with force_python():
            want = ref.dequantize(out_dtype)
        assert _same(got, want), out_dtype
    assert _same(*_both(w.block_absmax))


def test_blockwise_8bit_matches_python():
    code = dynamic_map_signed()
    g = torch.Generator().manual_seed(3)
    for n, blocksize in ((1, 256), (255, 256), (100_003, 256), (1000, 64), (300, 7)):
        q, absmax = quantize_blockwise_8bit(torch.randn(n, generator=g), code, blocksize)
        got, ref = _both(dequantize_blockwise_8bit, q, absmax, code, blocksize)
        assert _same(got, ref) and got.shape == (n,)


def test_nf4_same_with_one_thread():
    W = _weight((300, 1111), torch.bfloat16, seed=4)
    packed, absmax = ops.quantize_nf4(W, 64)
    deq = ops.dequantize_nf4(packed, absmax, list(W.shape), 64, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1, a1 = ops.quantize_nf4(W, 64)
        assert _same(p1, packed) and _same(a1, absmax)
        assert _same(ops.dequantize_nf4(packed, absmax, list(W.shape), 64, torch.bfloat16), deq)
    finally:
        torch.set_num_threads(threads)


def test_portable_kernels_subprocess():
    """ATEN_CPU_CAPABILITY=default turns off the hand-written AVX-512 kernels (as it does torch's):
    the portable C++ must give the same bytes as plain PyTorch too."""
    script = """
import torch
from fastlora.quant import dequantize_int8, dequantize_nf4, force_python, quantize_int8, quantize_nf4
g = torch.Generator().manual_seed(0)
for shape, bs in (((33, 130), 64), ((300, 1111), 32), ((5, 4096), 256)):
    W = torch.randn(shape, generator=g)
    packed, absmax = quantize_nf4(W, bs)
    cb, scb = quantize_int8(W)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a = dequantize_nf4(packed, absmax, shape, bs, dt)
        c = dequantize_int8(cb, scb, dt)
        with force_python():
            b = dequantize_nf4(packed, absmax, shape, bs, dt)
            d = dequantize_int8(cb, scb, dt)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (shape, bs, dt)
        assert torch.equal(c.view(torch.uint8), d.view(torch.uint8)), (shape, dt)
print("ok")
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_public_api_dispatches_to_ops(monkeypatch):
    """The public functions really run every compiled op (so the comparisons above compare two
    different implementations), and none inside force_python()."""
    called, real = [], _ops.op

    def spy(name, device):
        found = real(name, device)
        if found is not None:
            called.append(name)
        return found

    monkeypatch.setattr(_ops, "op", spy)
    W = _weight((16, 128), torch.float32, 15)

    def run_all():
        w, i8 = quantize(W, "nf4", 64, True), quantize(W, "int8")
        w.dequantize(), i8.dequantize(), nf4_linear(torch.randn(2, 128), w)
        w.dequantize(out=torch.empty(16, 128)), i8.dequantize(out=torch.empty(16, 128))

    run_all()
    assert set(called) == set(_ops.OP_NAMES)
    called.clear()
    with force_python():
        run_all()
    assert called == []


# ---- out= -----------------------------------------------------------------------------------


@pytest.mark.parametrize("python", [False, True], ids=["ext", "python"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
def test_dequantize_out(dtype, python):
    """One scratch buffer, poisoned first, filled for two different weights in turn."""
    buf = torch.full((33, 130), float("nan"), dtype=dtype)
    for seed, kind in ((1, "nf4"), (2, "nf4"), (3, "int8")):
        w = quantize(_weight((33, 130), torch.float32, seed), kind)
        want = w.dequantize(dtype)
        if python:
            with force_python():
                got = w.dequantize(out=buf)
        else:
            got = w.dequantize(out=buf)
        assert got is buf and _same(buf, want), (seed, kind)
        buf.fill_(float("nan"))
    assert quantize(_weight((4, 64), torch.float32), "nf4").dequantize(out=torch.empty(4, 64)).dtype == torch.float32


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantize_out_errors(kind):
    w = quantize(_weight((8, 64), torch.float32), kind)
    with pytest.raises(TypeError, match="dtype torch.float16, expected torch.bfloat16"):
        w.dequantize(torch.bfloat16, out=torch.empty(8, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"contiguous \(8, 64\) tensor.*got shape \(8, 65\)"):
        w.dequantize(out=torch.empty(8, 65))
    with pytest.raises(ValueError, match="non-contiguous"):
        w.dequantize(out=torch.empty(64, 8).t())
    with pytest.raises(TypeError, match="torch.Tensor"):
        w.dequantize(torch.float32, out=[0.0])


def test_dequantize_out_op_errors():
    packed, absmax = ops.quantize_nf4(_weight((8, 64), torch.float32), 64)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        ops.dequantize_nf4_out(packed, absmax, torch.empty(64, 8).t(), 64)
    with pytest.raises(RuntimeError, match="packed has 256 bytes, 510 elements need 255"):
        ops.dequantize_nf4_out(packed, absmax, torch.empty(510), 64)
    with pytest.raises(RuntimeError, match="out must be float32, float64, float16 or bfloat16, got Int"):
        ops.dequantize_nf4_out(packed, absmax, torch.empty(8, 64, dtype=torch.int32), 64)
    cb, scb = ops.quantize_int8(_weight((8, 64), torch.float32))
    with pytest.raises(RuntimeError, match=r"out must be contiguous with shape \[8, 64\]"):
        ops.dequantize_int8_out(cb, scb, torch.empty(8, 63))


# ---- int8 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DT.get)
@pytest.mark.parametrize("shape", [(7, 13), (64, 256), (1, 1), (130, 33), (40, 3000)], ids=str)
def test_int8_matches_python(shape, dtype):
    W = _weight(shape, dtype, seed=shape[1])
    W[0, -1] = -W[0].abs().max()  # an exact -absmax element
    if shape[0] > 2:
        W[2] = 0.0  # an all-zero row
    (cb, scb), (ref_cb, ref_scb) = _both(quantize_int8, W)
    assert _same(cb, ref_cb) and _same(scb, ref_scb)
    (cb_t, scb_t), (ref_cb_t, ref_scb_t) = _both(quantize_int8, W.t().contiguous().t())  # non-contiguous
    assert _same(cb_t, cb) and _same(ref_cb_t, cb) and _same(scb_t, scb) and _same(ref_scb_t, scb)
    for out_dtype in DTYPES + [torch.float64]:
        got, ref = _both(dequantize_int8, cb, scb, out_dtype)
        assert _same(got, ref), out_dtype


def test_int8_public_quantize_matches_python():
    W = _weight((70, 300), torch.bfloat16, seed=9)
    w, ref = _both(quantize, W, "int8")
    assert isinstance(w, Int8Weight) and _same(w.CB, ref.CB) and _same(w.SCB, ref.SCB)
    assert _same(*_both(w.dequantize))


# ---- nf4_linear -----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
def test_nf4_linear_cpu(dtype, bias):
    w = quantize(_weight((37, 130), torch.float32, 5), "nf4", 64, True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 130, generator=g).to(dtype)
    b = torch.randn(37, generator=g).to(dtype) if bias else None
    y = nf4_linear(x, w, b)
    ref = torch.nn.functional.linear(x, w.dequantize(dtype), b)
    assert y.shape == (2, 3, 37) and y.dtype == dtype and torch.equal(y, ref)
    # A call that needs gradients takes the differentiable dequantize + F.linear route.
    xg = x.float().requires_grad_()
    nf4_linear(xg, w).sum().backward()
    torch.testing.assert_close(xg.grad, w.dequantize(torch.float32).sum(0).expand_as(xg))
    with pytest.raises(ValueError, match=r"x \(2, 3, 129\) must end in the 130 features"):
        nf4_linear(x[..., :-1], w)


# ---- bad inputs to the ops ------------------------------------------------------------------


def test_op_errors():
    W = _weight((8, 64), torch.float32)
    packed, absmax = ops.quantize_nf4(W, 64)
    cases = [
        (lambda: ops.quantize_nf4(W, 48), "blocksize must be a power of two in \\[32, 4096\\], got 48"),
        (lambda: ops.quantize_nf4(W, 8192), "got 8192"),
        (lambda: ops.quantize_nf4(W.int(), 64), "weight must be float32, float64, float16 or bfloat16, got Int"),
        (lambda: ops.dequantize_nf4(packed.int(), absmax, [8, 64], 64, torch.float32), "packed must be uint8"),
        (lambda: ops.dequantize_nf4(packed, absmax.half(), [8, 64], 64, torch.float32), "absmax must be float32"),
        (lambda: ops.dequantize_nf4(packed, absmax, [8, 66], 64, torch.float32), "packed has 256 bytes"),
        (lambda: ops.dequantize_nf4(packed, absmax[:-1], [8, 64], 64, torch.float32), "absmax has 7 entries"),
        (lambda: ops.dequantize_nf4(packed, absmax, [8, 64], 32, torch.float32), "need 16"),
        (lambda: ops.dequantize_nf4(packed, absmax, [8, 64], 64, torch.int8), "dtype must be float32"),
        (lambda: ops.dequantize_nf4(packed, absmax, [-8, -64], 64, torch.float32), "negative dimension"),
        (lambda: ops.nf4_linear(torch.randn(2, 63), packed, absmax, 8, 64), "packed has 256 bytes"),
        (lambda: ops.nf4_linear(torch.randn(2, 64).int(), packed, absmax, 8, 64), "x must be float32"),
        (lambda: ops.nf4_linear(torch.randn(2, 64), packed, absmax, 8, 64, torch.randn(7)), "bias must be a \\(8,\\)"),
        (lambda: ops.quantize_int8(W.view(-1)), "weight must be 2-D"),
        (lambda: ops.dequantize_int8(W, absmax, torch.float32), "CB must be an int8"),
        (lambda: ops.dequantize_int8(W.to(torch.int8), absmax[:7], torch.float32), "SCB must be float32 \\(8,\\)"),
        (lambda: ops.dequantize_blockwise_8bit(packed.view(-1), absmax, absmax, 64), "code must have 256 entries"),
        (lambda: ops.dequantize_blockwise_8bit(packed.view(-1), absmax, torch.zeros(256), 0), "must be positive"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


def test_public_api_errors_unchanged():
    """The Python checks still run first, with their own messages, on the compiled path."""
    with pytest.raises(ValueError, match=r"\(32, 64, 128, 256, 512, 1024, 2048, 4096\)"):
        quantize(torch.randn(4, 64), "nf4", blocksize=48)
    for kind in ("nf4", "int8"):
        W = torch.randn(4, 70)
        W[1, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize(W, kind)


# ---- torch.library ------------------------------------------------------------------------------


def _opcheck_cases(device):
    """Sample arguments per op (built on the CPU, then moved)."""
    W = _weight((9, 70), torch.float32, 11)
    packed, absmax = ops.quantize_nf4(W, 64)
    cb, scb = ops.quantize_int8(W)
    code = dynamic_map_signed()
    q8, a8 = quantize_blockwise_8bit(absmax, code, 256)
    x = torch.randn(3, 70, dtype=torch.bfloat16)
    cases = {
        "quantize_nf4": (W.to(torch.bfloat16), 64),
        "dequantize_nf4": (packed, absmax, [9, 70], 64, torch.bfloat16),
        "dequantize_nf4_out": (packed, absmax, torch.empty(9, 70), 64),
        "nf4_linear": (x, packed, absmax, 9, 64),
        "nf4_linear-bias": (x, packed, absmax, 9, 64, torch.randn(9, dtype=torch.bfloat16)),
        "dequantize_blockwise_8bit": (q8, a8, code, 256),
        "quantize_int8": (W.to(torch.float16),),
        "dequantize_int8": (cb, scb, torch.float16),
        "dequantize_int8_out": (cb, scb, torch.empty(9, 70)),
    }
    return {k: tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in v) for k, v in cases.items()}


@pytest.mark.parametrize("case", list(_opcheck_cases("cpu")))
def test_opcheck(case):
    args = _opcheck_cases("cpu")[case]
    torch.library.opcheck(getattr(ops, case.split("-")[0]).default, args)


def test_compiles_without_graph_breaks():
    w = quantize(_weight((16, 128), torch.float32, 12), "nf4", 64, True)
    i8 = quantize(_weight((16, 128), torch.float32, 13), "int8")
    buf = torch.empty(16, 128, dtype=torch.bfloat16)

    def f(x):
        a = x @ w.dequantize(torch.bfloat16).t()
        b = x @ w.dequantize(out=buf).t()
        return a + b + x @ i8.dequantize(torch.bfloat16).t()

    x = torch.randn(4, 128, dtype=torch.bfloat16)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, f(x))


# ---- CUDA (csrc/cuda/nf4_cuda.cu) ---------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def cuda_kernels():
    for name in ("dequantize_nf4", "dequantize_nf4_out", "nf4_linear"):
        assert _ops.has_kernel(name, "cuda"), f"fastlora._C has no CUDA kernel for {name}: built without nvcc?"


@needs_cuda
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("shape", [(7, 13), (33, 130), (64, 256), (1, 1), (300, 1111), (4096, 4096)], ids=str)
def test_cuda_dequantize_matches_cpu(cuda_kernels, shape, blocksize):
    W = _weight(shape, torch.float32, seed=shape[1])
    packed, absmax = ops.quantize_nf4(W, blocksize)
    pc, ac = packed.cuda(), absmax.cuda()
    # A packed view at an odd byte offset takes the kernel's unaligned path.
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    shifted.copy_(pc.view(-1))
    for dtype in DTYPES + [torch.float64]:
        ref = ops.dequantize_nf4(packed, absmax, list(shape), blocksize, dtype)
        got = ops.dequantize_nf4(pc, ac, list(shape), blocksize, dtype)
        assert _same(got.cpu(), ref), dtype
        assert _same(ops.dequantize_nf4(shifted, ac, list(shape), blocksize, dtype).cpu(), ref)
        buf = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        ops.dequantize_nf4_out(pc, ac, buf, blocksize)
        assert _same(buf.cpu(), ref)
    w = quantize(W, "nf4", blocksize, True)
    assert _same(w.to("cuda").dequantize(torch.bfloat16).cpu(), w.dequantize(torch.bfloat16))


@needs_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize(
    "M, N, K",
    # fused: M <= 16 and K % 128 == 0 (bf16/fp16); the rest take dequantize + cuBLAS
    [(1, 4096, 4096), (2, 100, 128), (7, 17, 384), (16, 4104, 1024), (17, 64, 256), (4, 33, 192), (1, 8, 11008)],
    ids=lambda v: str(v),
)
def test_cuda_nf4_linear(cuda_kernels, M, N, K, dtype, bias):
    """Within 2x of torch's own error in the same dtype (against float64 on the same dequantized
    weight), plus a floor of a few output ulps."""
    w = quantize(_weight((N, K), torch.float32, seed=N + K), "nf4", 64, True).to("cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda").to(dtype) if bias else None
    Wd = w.dequantize(dtype)
    ref64 = torch.nn.functional.linear(x.double(), Wd.double(), None if b is None else b.double())
    y = nf4_linear(x, w, b)
    torch_y = torch.nn.functional.linear(x, Wd, b)
    assert y.shape == (M, N) and y.dtype == dtype
    err, torch_err = (y.double() - ref64).abs().max(), (torch_y.double() - ref64).abs().max()
    ulp = torch.finfo(dtype).eps * ref64.abs().max()
    assert err <= 2 * torch_err + 4 * ulp, (err.item(), torch_err.item())
    y3 = nf4_linear(x.view(1, M, K), w, b)  # leading dims
    assert y3.shape == (1, M, N) and torch.equal(y3[0], y)


@needs_cuda
@pytest.mark.parametrize("case", ["dequantize_nf4", "dequantize_nf4_out", "nf4_linear", "nf4_linear-bias"])
def test_cuda_opcheck(cuda_kernels, case):
    torch.library.opcheck(getattr(ops, case.split("-")[0]).default, _opcheck_cases("cuda")[case])
