"""The Triton kernels on quantized bases (NF4, int8): both routes against the oracle.

- "fused": F2 and B2 dequantize W tiles in registers (triton_kernels/quant.py).
- "scratch": the Triton dequantize kernel writes W into the shared scratch buffer, then the
  dense kernels run.

The dequantized values must be bit-identical to ``fastlora.quant``'s ``dequantize()`` (which
tests/test_quant.py proves bit-exact against bitsandbytes), and the GEMMs must follow
FlashAttention's rule against the float64 oracle run on that dequantized W. On CPU everything
runs under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled.
"""

import pytest
import torch
from test_autograd import saved_tensors
from test_triton import DEVICE, SEED, _assert_rule, _f64, _inputs, _refs, tb, tk

import fastlora
from fastlora import LoRALinear, quant
from fastlora.quant import Int8Weight, NF4Weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (N, K): odd element counts (a padded last byte), partial last blocks, rows that do not split
# into whole blocks (K odd or not a multiple of the blocksize), one element, several nested
# blocks of 256 absmax values (129 * 257 / 64 = 519 blocks).
SHAPES = [(7, 13), (33, 130), (3, 1000), (1, 1), (129, 257)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a launcher allocates starts as NaN, so a tile a kernel skips shows up."""
    monkeypatch.setattr(tk.common, "POISON", True)


@pytest.fixture(autouse=True)
def _auto_route():
    yield
    fastlora.set_quant_route("auto")


def _weight(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # row scales spread the block absmax, so the double-quant statistics are not flat
    w = torch.randn(shape, generator=g) * (0.1 + 3 * torch.rand(shape[0], 1, generator=g))
    return w.to(dtype)


def _quantized(kind, shape, dq=True, blocksize=64, dtype=torch.float32, seed=0):
    w = _weight(shape, seed, dtype)
    return (NF4Weight.quantize(w, blocksize, dq) if kind == "nf4" else Int8Weight.quantize(w)).to(DEVICE)


def _kernel_view(q):
    return tb._kernel_weight(q)


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-K{k}" for n, k in SHAPES])
def test_nf4_dequantize_kernel_is_bit_exact(shape, blocksize, double_quant):
    q = _quantized("nf4", shape, double_quant, blocksize)
    for dtype in DTYPES:
        out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        tk.dequantize(_kernel_view(q), out)
        assert torch.equal(out, q.dequantize(dtype)), DT[dtype]
        with quant.force_python():  # the pure-PyTorch definition as well as the C++ op
            assert torch.equal(out.cpu(), q.to("cpu").dequantize(dtype)), DT[dtype]


@pytest.mark.parametrize("blocksize", [32, 4096])
def test_nf4_dequantize_kernel_extreme_blocksizes(blocksize):
    q = _quantized("nf4", (33, 130), True, blocksize)
    out = torch.full((33, 130), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(tk.dequantize(_kernel_view(q), out), q.dequantize(torch.bfloat16))


def test_nf4_dequantize_kernel_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")  # a test dependency: CI fails without it (conftest)
    w = _weight((64, 256))
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    want = bnb.functional.dequantize_4bit(packed, state, quant_type="nf4").reshape(64, 256)
    q = NF4Weight.quantize(w, 64, True).to(DEVICE)
    out = tk.dequantize(_kernel_view(q), torch.empty(64, 256, device=DEVICE))
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-K{k}" for n, k in SHAPES])
def test_int8_dequantize_kernel_is_bit_exact(shape):
    q = _quantized("int8", shape)
    for dtype in DTYPES:
        out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        assert torch.equal(tk.dequantize(_kernel_view(q), out), q.dequantize(dtype)), DT[dtype]


def test_int8_strided_codes():
    """CB from a state dict may be any strided view: the kernels read its strides."""
    q = _quantized("int8", (33, 70))
    cb_t = torch.zeros(70, 33, dtype=torch.int8, device=DEVICE).t().copy_(q.CB)
    assert not cb_t.is_contiguous()
    strided = Int8Weight(cb_t, q.SCB, q.dtype)
    out = torch.empty(33, 70, device=DEVICE)
    assert torch.equal(tk.dequantize(_kernel_view(strided), out), q.dequantize(torch.float32))
    x, _, _, A, B, g = _inputs(5, 70, 33, 3, torch.float32)
    y1, z1 = tk.lora_forward(x, _kernel_view(strided), None, A, B, 0.5, 0.0, SEED)
    y2, _ = tk.lora_forward(x, _kernel_view(q), None, A, B, 0.5, 0.0, SEED)
    assert torch.equal(y1, y2)


def test_dequantize_errors():
    qw = _kernel_view(_quantized("nf4", (7, 13)))
    with pytest.raises(ValueError, match="shape"):
        tk.dequantize(qw, torch.empty(13, 7, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        tk.dequantize(qw, torch.empty(7, 13, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="kind"):
        tk.dequantize(qw._replace(kind=9), torch.empty(7, 13, device=DEVICE))
    with pytest.raises(TypeError, match="float64"):
        tb.prepare_weight(_quantized("nf4", (7, 13)), 4, torch.float64, "scratch")


# ---------------------------------------------------------------- the GEMMs on a quantized W

# (M, K, N, r): M=1 (decode); M=37 (partial row tiles) with K=70 (NF4 blocks straddle rows,
# odd element count); M=70 > FUSED_MAX_M so "auto" takes the scratch route.
GEMM_SHAPES = [(1, 33, 70, 1), (37, 70, 33, 13), (70, 48, 33, 8)]
GEMM_CASES = [
    pytest.param(kind, *s, dt, id=f"{kind}-M{s[0]}-K{s[1]}-N{s[2]}-r{s[3]}-{DT[dt]}")
    for kind in ("nf4", "int8")
    for s in GEMM_SHAPES
    for dt in DTYPES
]


@pytest.mark.parametrize("route", ["fused", "scratch", "auto"])
@pytest.mark.parametrize("kind,M,K,N,r,dtype", GEMM_CASES)
def test_quantized_parity_with_oracle(kind, M, K, N, r, dtype, route):
    p = 0.3 if r != 8 else 0.0
    x, _, b, A, B, g = _inputs(M, K, N, r, dtype)
    q = _quantized(kind, (N, K), dq=r != 1, dtype=dtype)
    s = 2.0 / r**0.5
    W_fwd = tb.prepare_weight(q, M, dtype, route)
    want_route = route if route != "auto" else ("fused" if M <= tb.FUSED_MAX_M else "scratch")
    assert isinstance(W_fwd, tk.QuantWeight) == (want_route == "fused")
    y, z = tb.forward(x, W_fwd, b, A, B, s, p, SEED)
    W_bwd = tb.prepare_weight(q, M, dtype, route)  # the scratch buffer was free to change in between
    dx, dW, db, dA, dB = tb.backward(g, x, z, W_bwd, A, B, s, p, SEED, (True, False, True, True, True))
    assert dW is None

    W = q.dequantize(dtype)  # the base the oracle runs on: bit-exact bitsandbytes values
    mask = tb.dropout_mask(M, K, p, SEED, DEVICE)
    want64 = _refs(*map(_f64, (x, W, b, A, B, g)), s, p, mask)
    want_dt = _refs(x, W, b, A, B, g, s, p, mask)
    for name, out, r64, rdt in zip(("y", "z", "dx", "dA", "dB"), (y, z, dx, dA, dB), want64, want_dt, strict=True):
        assert out.dtype == dtype and out.shape == r64.shape, name
        _assert_rule(out, r64, rdt, name)
    torch.testing.assert_close(db, g.sum(0))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_tiles_equal_scratch_weight(kind, dtype):
    """F2 and B2 reading the codes give bit for bit what they give on the scratch-dequantized W:
    the in-register values are the dequantized values. Interpreter only: compiled, the
    autotuner may pick other tiles per format (parity with the oracle is checked above)."""
    if not tk.common.INTERPRET:
        pytest.skip("compiled kernels autotune per format; parity is checked against the oracle")
    M, K, N, r, p = 37, 70, 33, 13, 0.3
    x, _, b, A, B, g = _inputs(M, K, N, r, dtype)
    q = _quantized(kind, (N, K), dtype=dtype)
    qw = _kernel_view(q)
    W = tk.dequantize(qw, torch.empty(N, K, dtype=dtype, device=DEVICE))
    for fuse in (False, True):
        yq, zq = tk.lora_forward(x, qw, b, A, B, 0.5, p, SEED, fuse_shrink=fuse)
        yd, zd = tk.lora_forward(x, W, b, A, B, 0.5, p, SEED, fuse_shrink=fuse)
        assert torch.equal(yq, yd) and torch.equal(zq, zd)
    dz = torch.randn(M, r, device=DEVICE)
    assert torch.equal(tk.lora_bwd_dx(g, dz, qw, A, p, SEED), tk.lora_bwd_dx(g, dz, W, A, p, SEED))


@pytest.mark.parametrize("K", [512, 300], ids=["K512", "K300"])
@pytest.mark.parametrize("block_k", [64, 256])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_tiles_wider_than_a_block(monkeypatch, blocksize, block_k, K):
    """The GPU configs' K tiles (64 to 256) against NF4 blocks of 64 to 256: a row's tile spans
    one block or several, and with K % blocksize != 0 blocks straddle rows, so every element
    picks its own block's absmax from the few a row's tile touches. The interpreter's one
    config (BLOCK_K=32) never spans two blocks; these force the wide tiles through the real
    launchers, bit for bit against the scratch route on the same tiles."""
    if not tk.common.INTERPRET:
        pytest.skip("forces interpreter-sized tiles; compiled, the GPU configs run in the other tests")
    cfg = tk.common.cfg
    for kernel, config in (
        (tk.quant._dequantize_kernel, cfg(1, 1, BLOCK_N=16, BLOCK_K=block_k)),
        (tk.lora_fwd._lora_fwd_kernel, cfg(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=2)),
        (tk.lora_bwd._lora_bwd_dx_kernel, cfg(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, GROUP_M=2)),
    ):
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
    M, N, r, p = 19, 21, 5, 0.3
    x, _, b, A, B, g = _inputs(M, K, N, r, torch.bfloat16)
    q = _quantized("nf4", (N, K), True, blocksize, torch.bfloat16)
    qw = _kernel_view(q)
    W = tk.dequantize(qw, torch.full((N, K), float("nan"), dtype=torch.bfloat16, device=DEVICE))
    assert torch.equal(W, q.dequantize(torch.bfloat16))
    yq, zq = tk.lora_forward(x, qw, b, A, B, 0.5, p, SEED)
    yd, zd = tk.lora_forward(x, W, b, A, B, 0.5, p, SEED)
    assert torch.equal(yq, yd) and torch.equal(zq, zd)
    dz = torch.randn(M, r, device=DEVICE)
    assert torch.equal(tk.lora_bwd_dx(g, dz, qw, A, p, SEED), tk.lora_bwd_dx(g, dz, W, A, p, SEED))


# ---------------------------------------------------------------- through lora_linear


@pytest.mark.parametrize("route", ["fused", "scratch"])
@pytest.mark.parametrize("quant_kind", ["nf4", "int8"])
def test_layer_on_triton_matches_torch_backend(quant_kind, route):
    """A quantized LoRALinear (3-D input, dropout) on the triton backend agrees with the torch
    backend (C++ dequantization into the scratch buffer + ATen)."""
    fastlora.set_quant_route(route)
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(70, 33), r=4, lora_alpha=8, lora_dropout=0.25, quant=quant_kind)
    torch.nn.init.normal_(layer.lora_B)
    layer.to(DEVICE)
    x0 = torch.randn(2, 9, 70, device=DEVICE)
    outs = []
    for backend in ("triton", "torch"):
        x = x0.clone().requires_grad_()
        layer.zero_grad()
        y = fastlora.lora_linear(
            x, layer.weight, layer.lora_A, layer.lora_B, scale=layer.scaling, bias=layer.bias,
            dropout_p=0.25, seed=SEED, backend=backend,
        )  # fmt: skip
        y.backward(torch.ones_like(y))
        outs.append((y, x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for name, a, c in zip(("y", "dx", "dA", "dB"), *outs, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)


def test_backward_keeps_the_forward_route(monkeypatch):
    """The route is decided when the op is called: changing it before backward changes nothing."""
    seen = []
    real = tb.prepare_weight
    monkeypatch.setattr(tb, "prepare_weight", lambda *a: seen.append(a[3]) or real(*a))
    q = _quantized("nf4", (33, 70))
    x, _, _, A, B, _ = _inputs(5, 70, 33, 3, torch.float32)
    A.requires_grad_()
    fastlora.set_quant_route("fused")
    y = fastlora.lora_linear(x, q, A, B, scale=0.5, backend="triton")
    fastlora.set_quant_route("scratch")
    y.sum().backward()
    assert seen == ["fused", "fused"]


@pytest.mark.parametrize("route", ["fused", "scratch"])
def test_no_dequantized_copy_is_saved(route):
    fastlora.set_quant_route(route)
    quant.release_scratch()
    q = _quantized("nf4", (48, 64))
    x, _, _, A, B, _ = _inputs(8, 64, 48, 4, torch.float32)
    x.requires_grad_()
    y, saved = saved_tensors(lambda: fastlora.lora_linear(x, q, A, B, scale=0.5, backend="triton"))
    assert (48, 64) not in [tuple(t.shape) for t in saved]
    y.sum().backward()
    # the scratch route reuses the one shared buffer; the fused route never dequantizes a W
    assert len(quant._SCRATCH) == (1 if route == "scratch" else 0)


def test_dora_on_nf4_triton_matches_torch():
    torch.manual_seed(2)
    layer = LoRALinear.from_linear(torch.nn.Linear(70, 33), r=4, lora_alpha=8, quant="nf4", use_dora=True).to(DEVICE)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 70, device=DEVICE)
    outs = []
    for backend in ("triton", "torch"):
        fastlora.set_backend(backend)
        try:
            outs.append(layer(x))
        finally:
            fastlora.set_backend("auto")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_route_names_are_checked():
    with pytest.raises(ValueError, match="route"):
        fastlora.set_quant_route("register")
    fastlora.set_quant_route("scratch")
    assert fastlora.get_quant_route() == "scratch"


# ---------------------------------------------------------------- registration


def _quant_op_args():
    ops = torch.ops.fastlora
    x, _, b, A, B, g = _inputs(5, 20, 18, 3, torch.float32)
    dz = torch.randn(5, 3, device=DEVICE)
    out = []
    for q in (_quantized("nf4", (18, 20)), _quantized("nf4", (18, 20), dq=False), _quantized("int8", (18, 20))):
        qw = _kernel_view(q).flat()
        out += [
            (ops.triton_lora_fwd_quant.default, (x, *qw, b, A, B, 0.5, 0.3, SEED, None, True)),
            (ops.triton_lora_fwd_quant.default, (x, *qw, None, A, B, 0.5, 0.0, 0, torch.tensor(SEED), False)),
            (ops.triton_lora_bwd_dx_quant.default, (g, dz, *qw, A, 0.3, SEED, None)),
            (ops.triton_dequantize.default, (*qw, torch.bfloat16)),
        ]
    return out


def test_opcheck():
    for op, args in _quant_op_args():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("route", ["fused", "scratch"])
def test_torch_compile_has_no_graph_break(route):
    q = _quantized("nf4", (18, 20))
    x, _, b, A, B, g = _inputs(5, 20, 18, 3, torch.float32)

    def step(x, b, A, B, g):
        W = tb.prepare_weight(q, 5, torch.float32, route)
        y, z = tb.forward(x, W, b, A, B, 0.5, 0.3, SEED)
        return (y,) + tb.backward(g, x, z, W, A, B, 0.5, 0.3, SEED, (True, False, False, True, True))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    for a, c in zip(compiled(x, b, A, B, g), step(x, b, A, B, g), strict=True):
        if a is None:
            assert c is None
        else:
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
def test_flat_and_tiled_dequantize_agree(blocksize, double_quant):
    """A contiguous out takes the flat NF4 kernel (whole quantization blocks per program), a
    strided one the 2-D tile kernel: the same bits, with an odd element count whose last block
    is partial and whose last byte is half padding."""
    shape = (37, 71)  # 2627 elements: odd, not a multiple of any blocksize
    q = _quantized("nf4", shape, dq=double_quant, blocksize=blocksize)
    for dtype in (torch.float32, torch.bfloat16):
        flat = tk.dequantize(_kernel_view(q), torch.full(shape, float("nan"), dtype=dtype, device=DEVICE))
        strided = torch.full(shape[::-1], float("nan"), dtype=dtype, device=DEVICE).t()
        tk.dequantize(_kernel_view(q), strided)
        assert torch.equal(flat, strided) and torch.equal(flat, q.dequantize(dtype))
