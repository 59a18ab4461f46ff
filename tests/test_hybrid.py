"""The hybrid plan (cuBLAS GEMMs + Triton rank-r kernels) against the float64 oracle.

On CPU the "cuBLAS" calls are ATen's CPU GEMMs and the rank-r kernels run under the Triton
interpreter (tests/conftest.py), so this proves the plan's host code and kernels; on a GPU the
same tests run compiled. Tolerance: FlashAttention's rule, as tests/test_triton.py.
"""

import pytest
import torch
from test_triton import CASES, DEVICE, SEED, _assert_rule, _f64, _inputs, _refs, check_only_needed, check_parity

import fastlora
from fastlora import backends

hb = backends.load("hybrid")
assert hb is not None and hb.is_available(DEVICE), "hybrid backend unusable: see the import warning above"
tk = hb.tk
ALL = (True, True, True, True, True)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a Triton launcher allocates starts as NaN, so a tile a kernel skips shows up."""
    monkeypatch.setattr(tk.common, "POISON", True)


@pytest.fixture(params=["tail-first", "tail-after"])
def tail_order(request, monkeypatch):
    monkeypatch.setattr(hb, "TAIL_FIRST", request.param == "tail-first")
    return request.param


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M,K,N,r,dtype", CASES)
def test_parity_with_oracle(M, K, N, r, dtype, p, tail_order):
    check_parity(hb, M, K, N, r, dtype, p)


@pytest.mark.parametrize(
    "needs",
    [
        (True, False, False, False, False),
        (False, False, False, True, False),
        (False, False, False, False, True),
        (True, False, False, False, True),
    ],
    ids=["dx", "dA", "dB", "dx-dB (LoRA-FA)"],
)
def test_backward_computes_only_what_is_needed(needs, tail_order):
    check_only_needed(hb, needs)


def test_lora_tail_accumulates_with_one_rounding():
    """``lora_tail(accumulate=True)`` adds ``s z B^T + bias`` (formed in fp32) to y once."""
    M, N, r = 37, 70, 13
    gen = torch.Generator().manual_seed(3)
    z, B, b, y0 = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((M, r), (N, r), (N,), (M, N)))
    out = tk.lora_tail(z, B, b, 0.25, y0.clone(), accumulate=True)
    want = y0.double() + (0.25 * z.double() @ B.double().T + b.double())
    assert (out.double() - want).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * want.abs().max().item()
    fresh = tk.lora_tail(z, B, None, 0.25, torch.full((M, N), float("nan"), device=DEVICE), accumulate=False)
    # an fp32 rank-13 dot: a few ulps of its own
    torch.testing.assert_close(fresh.double(), 0.25 * z.double() @ B.double().T, rtol=4e-6, atol=4e-6)


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("K", [33, 48])
def test_dA_tail_reads_x_once_for_both(K, S):
    """dA and the masked tail from one kernel, for every row split, bitwise reproducible; the
    tail alone (LoRA-FA: no x) and dA alone give the same values."""
    M, r, p = 37, 13, 0.3
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(M, K, generator=gen).to(DEVICE)
    A = torch.randn(r, K, generator=gen).to(DEVICE)
    dz = torch.randn(M, r, generator=gen).to(DEVICE)
    mask = hb.dropout_mask(M, K, p, SEED, DEVICE)
    dx = torch.full((M, K), float("nan"), device=DEVICE)
    dA = tk.lora_dA_tail(dz, x, A, p, SEED, dx, splits=S)
    xd = torch.where(mask, x.double() / (1 - p), 0.0)
    torch.testing.assert_close(dA.double(), dz.double().T @ xd, rtol=1e-5, atol=1e-5)
    want_tail = torch.where(mask, (dz.double() @ A.double()) / (1 - p), 0.0)
    torch.testing.assert_close(dx.double(), want_tail, rtol=1e-5, atol=1e-5)  # fp32 rank-13 dots
    dx2 = torch.full((M, K), float("nan"), device=DEVICE)
    assert tk.lora_dA_tail(dz, None, A, p, SEED, dx2, splits=S) is None
    assert torch.equal(dx2, dx)
    assert torch.equal(tk.lora_dA_tail(dz, x, A, p, SEED, None, splits=S), dA)
    assert torch.equal(tk.lora_dA_tail(dz, x, A, p, SEED, None, splits=S), dA)  # run to run
    acc = torch.ones(M, K, device=DEVICE)
    tk.lora_dA_tail(dz, None, A, p, SEED, acc, accumulate=True, splits=S)
    torch.testing.assert_close(acc, dx + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K", [(37, 33), (5, 48)], ids=["M37-K33", "M5-K48"])
def test_triton_dropout_is_the_spec(M, K, dtype):
    """The Triton dropout kernel (the mask on CUDA for every backend) gives the bits of
    fastlora/_philox.py's pure-PyTorch definition, in place and strided too."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(M, K, generator=gen) * 3).to(dtype=dtype, device=DEVICE)
    want = fastlora._philox.dropout(x, 0.3, SEED, force_python=True)
    assert torch.equal(tk.dropout(x, 0.3, SEED), want)
    xs = torch.zeros(K, M, dtype=dtype, device=DEVICE).t().copy_(x)  # non-contiguous
    assert torch.equal(tk.dropout(xs, 0.3, SEED), want)
    inplace = x.clone()
    tk.dropout(inplace, 0.3, SEED, out=inplace)
    assert torch.equal(inplace, want)
    rows = fastlora._philox.dropout(x, 0.3, SEED, row_offset=2**33 // K, force_python=True)
    assert torch.equal(tk.dropout(x, 0.3, SEED, row_offset=2**33 // K), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "fmt,kw",
    [("nf4", {"double_quant": False}), ("nf4", {}), ("nf4", {"blocksize": 128}), ("int8", {})],
    ids=["nf4", "nf4-dq", "nf4-dq-b128", "int8"],
)
def test_quantized_base_takes_the_scratch_route(fmt, kw, dtype):
    """NF4 (with and without double quant, two blocksizes) and int8 bases: W dequantized into the
    scratch buffer by Triton, bit-exact with fastlora.quant, whatever route is asked for; then
    forward and backward by the dense plan against the oracle (FlashAttention's rule)."""
    M, K, N, r, p = 37, 64, 70, 13, 0.3
    x, W, b, A, B, g = _inputs(M, K, N, r, dtype)
    q = fastlora.quantize(W.float(), fmt, **kw)
    Wq = hb.prepare_weight(q, M, dtype, "fused")
    assert isinstance(Wq, torch.Tensor) and torch.equal(Wq, q.dequantize(dtype))
    y, z = hb.forward(x, Wq, b, A, B, 0.5, p, SEED)
    dx, _, _, dA, dB = hb.backward(g, x, z, Wq, A, B, 0.5, p, SEED, ALL)
    mask = hb.dropout_mask(M, K, p, SEED, DEVICE)
    want64 = _refs(*map(_f64, (x, Wq, b, A, B, g)), 0.5, p, mask)
    want_dt = _refs(x, Wq, b, A, B, g, 0.5, p, mask)
    for name, out, w64, wdt in zip(("y", "z", "dx", "dA", "dB"), (y, z, dx, dA, dB), want64, want_dt, strict=True):
        _assert_rule(out, w64, wdt, name)


def test_lora_linear_runs_the_hybrid_backend():
    """backend="hybrid" through the public op and autograd, 3-D input, dropout on."""
    M, K, N, r = 12, 33, 20, 4
    x, W, b, A, B, _ = _inputs(M, K, N, r, torch.float32)
    x = x.view(3, 4, K).requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = fastlora.lora_linear(x, W, A, B, scale=0.5, bias=b, dropout_p=0.2, seed=9, backend="hybrid")
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    ref = fastlora.lora_linear(x, W, A, B, scale=0.5, bias=b, dropout_p=0.2, seed=9, backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    ref.square().sum().backward()
    for got, t in zip(grads, (x, A, B), strict=True):
        # fp32 gradients of a squared loss (values ~10): a few fp32 roundings of ~1e-5 relative
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-4)


def test_cuda_masks_come_from_triton(monkeypatch):
    """On CUDA every backend's mask (the torch backend's and DoRA's dropout included) comes from
    the Triton kernel, never the int64 ATen generator (~7 ms a mask on an H200). Here the CPU
    stands in for CUDA: the C++ ops are switched off and the Triton route on, and the public
    functions must route there and give the spec's bits."""
    from fastlora import _philox

    calls = []
    real = tk.dropout

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_philox, "_use_ext", lambda device, force: False)
    monkeypatch.setattr(_philox, "fused_available", lambda device: False)
    monkeypatch.setattr(_philox, "_on_triton", lambda device, force: not force)
    monkeypatch.setattr(tk, "dropout", counting)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(37, 33, generator=gen).to(DEVICE)
    want = _philox.dropout(x, 0.3, SEED, force_python=True)
    assert torch.equal(_philox.dropout(x, 0.3, SEED), want)
    inplace = x.clone()
    assert torch.equal(_philox.dropout_(inplace, 0.3, SEED), want)
    assert torch.equal(_philox.keep_mask(37, 33, 0.3, SEED), _philox.keep_mask(37, 33, 0.3, SEED, force_python=True))
    assert len(calls) == 2
    # the torch backend end to end on this route
    W, A, B = torch.randn(20, 33, generator=gen), torch.randn(4, 33, generator=gen), torch.randn(20, 4, generator=gen)
    y = fastlora.lora_linear(x, W, A, B, scale=0.5, dropout_p=0.3, seed=SEED, backend="torch")
    ref = fastlora.lora_linear(x, W, A, B, scale=0.5, dropout_p=0.3, seed=SEED, backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) >= 3


def test_dz_dB_partials_stay_small():
    """B1's grid keeps both fp32 partial buffers small at the suite's widest layer (N=14336,
    r=64, M=8192, 132 SMs) while still filling the GPU: together under 40 % of g's bf16 bytes."""
    grid = tk.lora_bwd._dz_dB_grid
    M, N, r, sms = 8192, 14336, 64, 132
    P, S = grid(M, N, sms, 64)
    assert P * S >= sms
    assert (P * N * r + S * M * r) * 4 < 0.4 * M * N * 2
    assert grid(1, 4096, sms, 64)[0] == 1  # decode: one row tile
    assert grid(37, 70, 2, 16, row_programs=3, col_splits=2) == (3, 2)  # the tests' knobs win


def test_int32_offsets_are_safe_for_huge_strided_views():
    """Issue 17: the kernels form column offsets in int32 (rows in int64), so a view whose
    last-dim stride times its width reaches 2**31 (a transposed x of >= 2**31 elements) is made
    contiguous before launch. Allocating one needs > 8 GB, so the decision is tested on
    stand-ins with the shapes and strides of such views; real small views are untouched."""

    class View:
        def __init__(self, shape, stride):
            self.shape, self._stride, self.copied = shape, stride, False

        def dim(self):
            return len(self.shape)

        def stride(self, i=None):
            return self._stride if i is None else self._stride[i]

        def contiguous(self):
            self.copied = True
            return "copy"

    safe = tk.common.int32_safe
    M, K = 2**20, 2**12  # 2**32 elements
    transposed = View((M, K), (1, M))
    assert safe(transposed) == "copy"
    for ok in (View((M, K), (K, 1)), View((3, 5), (1, 3)), View((2, 2**16), (1, 2**15 - 1))):
        assert safe(ok) is ok and not ok.copied
    small = torch.randn(5, 7).t()
    assert safe(small) is small and safe(None) is None


def test_dA_tail_prunes_wide_tiles_for_wide_ranks():
    """The autotuner hands constexprs (R_PAD) to the pruning as keywords: wide ranks keep only
    64-column tiles (the sm_90 compile sweep caught a version that looked R_PAD up elsewhere)."""
    prune = tk.lora_rank._prune_dA_tail
    cfg = tk.common.cfg
    space = [cfg(BLOCK_M=64, BLOCK_K=64), cfg(BLOCK_M=64, BLOCK_K=128), cfg(BLOCK_M=32, BLOCK_K=64)]
    assert prune(space, {"M_BUCKET": 4096}, R_PAD=16) == space
    assert prune(space, {"M_BUCKET": 4096}, R_PAD=128) == space[2:]
    # IEEE fp32: only the tile that compiles for sm_90 without spilling
    assert prune(space, {"M_BUCKET": 4096}, R_PAD=16, IEEE=True) == space[2:]


@pytest.mark.parametrize("which", ["tail", "dA_tail", "dropout_"])
def test_tuning_call_of_an_accumulating_kernel_adds_once(which, monkeypatch):
    """A kernel that reads and writes its output (``y += tail``, ``dx += tail``, dropout in
    place) is run many times by the autotuner on the call that tunes it; each timed run must
    start from the original, or that call returns y + n * tail. On CPU the interpreter has one
    config, so two are given here and the timing runs each one three times, as a GPU would."""
    kernels = {
        "tail": tk.lora_rank._lora_tail_kernel,
        "dA_tail": tk.lora_rank._lora_dA_tail_kernel,
        "dropout_": tk.philox._dropout_kernel,
    }
    kern = kernels[which]
    blocks = ("BLOCK_M", "BLOCK_N") if which == "tail" else ("BLOCK_M", "BLOCK_K")
    configs = [
        tk.common.cfg(1, 1, **{blocks[0]: 16, blocks[1]: 32}),
        tk.common.cfg(1, 1, **{blocks[0]: 32, blocks[1]: 32}),
    ]

    def bench_three_times(fn, quantiles=None, **_):
        for _ in range(3):
            fn()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(kern, "configs", configs)
    monkeypatch.setitem(kern.__dict__, "do_bench", bench_three_times)  # a cached_property: no getattr
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setattr(kern, "cache_results", False)
    gen = torch.Generator().manual_seed(8)
    M, N, K, r = 64, 40, 48, 4
    z, B, A = torch.randn(M, r, generator=gen), torch.randn(N, r, generator=gen), torch.randn(r, K, generator=gen)
    if which == "tail":
        y0 = torch.randn(M, N, generator=gen)
        out = tk.lora_tail(z, B, None, 0.5, y0.clone(), accumulate=True)
        want = y0.double() + 0.5 * z.double() @ B.double().T
    elif which == "dA_tail":
        y0 = torch.randn(M, K, generator=gen)
        out = y0.clone()
        tk.lora_dA_tail(z, None, A, 0.0, SEED, out, accumulate=True)
        want = y0.double() + z.double() @ A.double()
    else:
        y0 = torch.randn(M, K, generator=gen)
        out = y0.clone()
        tk.dropout(out, 0.3, SEED, out=out)
        want = fastlora._philox.dropout(y0, 0.3, SEED, force_python=True).double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_cuda_masks_fall_back_when_triton_cannot_compile(monkeypatch):
    """With a triton that imports but cannot compile, the torch backend must still work on
    CUDA: one warning, then the pure-PyTorch generator's (identical) bits. CPU stands in."""
    from fastlora import _philox

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(_philox, "_use_ext", lambda device, force: False)
    monkeypatch.setattr(_philox, "_TRITON_BROKEN", set())
    monkeypatch.setattr(_philox, "_on_triton", lambda d, f: not f and d not in _philox._TRITON_BROKEN)
    monkeypatch.setattr(tk, "dropout", broken)
    x = torch.randn(9, 12)
    with pytest.warns(RuntimeWarning, match="Triton dropout kernels failed"):
        out = _philox.dropout(x, 0.3, SEED)
    assert torch.equal(out, _philox.dropout(x, 0.3, SEED, force_python=True))
    assert torch.device("cpu") in _philox._TRITON_BROKEN  # not tried again on this device
