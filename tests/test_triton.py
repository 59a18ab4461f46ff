"""The triton backend against the float64 oracle (fastlora/reference.py) and the dropout spec.

On CPU everything runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are small but
awkward: M = 1 and M not a multiple of the row tile, K and N not multiples of 16, r from 1 to
256. On a GPU the same tests run compiled.

Tolerance (FlashAttention's rule): the kernel's max error against the float64 oracle may be at
most twice PyTorch's own error computing the same thing in the same dtype, plus one ulp of the
dtype at the output's scale (slack for the one rounding of the output, which can land either
way when PyTorch's error happens to be tiny).
"""

import pytest
import torch
import triton  # a test dependency: its absence must fail the suite, not skip it

import fastlora
from fastlora import _philox, backends, reference

tl = triton.language

tb = backends.load("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# conftest.py sets TRITON_INTERPRET=1 without a GPU, so the backend must be usable here; a broken
# import or an unusable backend fails loudly instead of skipping the kernels' tests.
assert tb is not None and tb.is_available(DEVICE), "triton backend unusable: see the import warning above"
tk = tb.tk
from fastlora.triton_kernels.philox import keep_tile, philox4x32_10  # noqa: E402

SEED = 0x1234_5678_9ABC  # k1 != 0: both key words matter
ALL = (True, True, True, True, True)  # needs: dx, dW, dbias, dA, dB


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a launcher allocates starts as NaN, so a tile a kernel skips shows up."""
    monkeypatch.setattr(tk.common, "POISON", True)


def _case_id(M, K, N, r, dtype):
    return f"M{M}-K{K}-N{N}-r{r}-{str(dtype).removeprefix('torch.')}"


# (M, K, N, r): M=1 and M=37 (3 row tiles of 16 under the interpreter, the last partial);
# K=48 takes the 4-elements-per-Philox-call mask path, 33 and 70 the per-element one.
SHAPES = [(1, 33, 70, 1), (37, 70, 33, 13), (37, 48, 70, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [pytest.param(*s, dt, id=_case_id(*s, dt)) for s in SHAPES for dt in DTYPES]
CASES.append(pytest.param(37, 33, 33, 256, torch.float32, id=_case_id(37, 33, 33, 256, torch.float32)))
# M over four of B1's 64-row tiles (the GPU's tile, run here too): the default grid has a
# program sum two row tiles into one dB partial, and B3 reduces several row splits
CASES.append(pytest.param(197, 33, 70, 13, torch.bfloat16, id=_case_id(197, 33, 70, 13, torch.bfloat16)))


def _inputs(M, K, N, r, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=DEVICE)

    x, W, b = rnd(M, K), rnd(N, K, std=K**-0.5), rnd(N) if bias else None
    A, B, g = rnd(r, K, std=K**-0.5), rnd(N, r), rnd(M, N)
    return x, W, b, A, B, g


def _f64(t):
    return None if t is None else t.double()


def _assert_rule(out, ref64, ref_same_dtype, what):
    """FlashAttention's rule (module docstring)."""
    assert not out.isnan().any(), f"{what}: NaN (unwritten tile?)"
    err = (out.double() - ref64).abs().max().item()
    torch_err = (ref_same_dtype.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= 2 * torch_err + ulp, f"{what}: err {err:.3g} > 2 * torch err {torch_err:.3g} + ulp {ulp:.3g}"


# ---------------------------------------------------------------- dropout mask


@triton.jit
def _philox_kat_kernel(c_ptr, k_ptr, out_ptr):
    i = tl.arange(0, 2)
    c0, c1 = tl.load(c_ptr + 4 * i), tl.load(c_ptr + 4 * i + 1)
    c2, c3 = tl.load(c_ptr + 4 * i + 2), tl.load(c_ptr + 4 * i + 3)
    k0, k1 = tl.load(k_ptr + 2 * i), tl.load(k_ptr + 2 * i + 1)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i, r0)
    tl.store(out_ptr + 4 * i + 1, r1)
    tl.store(out_ptr + 4 * i + 2, r2)
    tl.store(out_ptr + 4 * i + 3, r3)


def _u32(values):
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32, device=DEVICE)


def test_philox_known_answers():
    """Random123's Philox4x32-10 known-answer vectors."""
    ctr = _u32([0, 0, 0, 0, 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344])
    key = _u32([0, 0, 0xA4093822, 0x299F31D0])
    out = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    _philox_kat_kernel[(1,)](ctr.view(torch.uint32), key.view(torch.uint32), out.view(torch.uint32))
    want = _u32([0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8, 0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])
    assert torch.equal(out, want)


def _spec_keep(e, p, seed):
    """The spec, one element at a time, in plain python."""
    c, k = [(e >> 2) & 0xFFFFFFFF, e >> 34, 0, 0], [seed & 0xFFFFFFFF, seed >> 32]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return c[e & 3] >= int(p * 2**32)


@pytest.mark.parametrize("M,K", [(37, 33), (5, 48), (1, 70)], ids=["M37-K33", "M5-K48", "M1-K70"])
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_keep_mask_matches_philox(M, K, p):
    mask = tb.dropout_mask(M, K, p, SEED, DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (M, K)
    want = _philox.keep_mask(M, K, p, SEED, DEVICE, force_python=True)
    assert torch.equal(mask, want)
    assert torch.equal(mask.cpu(), _philox.keep_mask(M, K, p, SEED, "cpu"))  # the C++ op when built
    assert torch.equal(mask, fastlora.dropout_mask((M, K), p, SEED, backend="triton", device=DEVICE))
    for e in (0, 1, 2, 3, M * K // 2, M * K - 1):
        assert bool(mask.view(-1)[e]) == _spec_keep(e, p, SEED), f"element {e}"
    assert abs(mask.float().mean().item() - (1 - p)) < 0.2
    assert tb.dropout_mask(M, K, 0.0, SEED, DEVICE).all()


@triton.jit
def _keep_rows_kernel(out_ptr, row0, K, seed_lo, seed_hi, thresh, ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = row0 + tl.arange(0, 16).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        keep = keep_tile(rows, k0, K, seed_lo, seed_hi, thresh, BLOCK_K, ALIGNED)
        ptrs = out_ptr + tl.arange(0, 16)[:, None] * K + (k0 + cols)[None, :]
        tl.store(ptrs, keep, mask=(k0 + cols)[None, :] < K)


@pytest.mark.parametrize("K", [33, 48])
def test_keep_mask_int64_offsets(K):
    """Element offsets past 2**34, where the Philox counter's high word turns 1, without
    allocating 2**34 elements: 16 rows at a logical row offset."""
    row0 = 2**34 // K - 1
    args = tk.common.dropout_args(0.5, SEED)
    out = torch.zeros(16, K, dtype=torch.bool, device=DEVICE)
    _keep_rows_kernel[(1,)](out, row0, K, args["seed_lo"], args["seed_hi"], args["thresh"], K % 4 == 0, 16)
    want = _philox.keep_mask(16, K, 0.5, SEED, DEVICE, row_offset=row0, force_python=True)
    assert torch.equal(out, want)


# ---------------------------------------------------------------- forward / backward parity


def _refs(x, W, b, A, B, g, s, p, mask):
    """(y, z, dx, dA, dB) from the oracle, given inputs already in the wanted dtype."""
    keep = mask if p > 0 else None
    xd = x if keep is None else x * keep.to(x.dtype) * (1.0 / (1.0 - p))
    y = reference.lora_linear_ref(x, W, A, B, s, b, keep, p)
    dx, dA, dB, _ = reference.lora_grads_ref(g, x, W, A, B, s, keep, p)
    return y, xd @ A.T, dx, dA, dB


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M,K,N,r,dtype", CASES)
def test_parity_with_oracle(M, K, N, r, dtype, p):
    check_parity(tb, M, K, N, r, dtype, p)


def check_parity(backend, M, K, N, r, dtype, p):
    """``backend``'s forward and backward against the oracle by FlashAttention's rule (the
    hybrid plan's tests run it too)."""
    bias = p == 0.0 or r == 13  # bias on and off, each with and without dropout
    x, W, b, A, B, g = _inputs(M, K, N, r, dtype, bias)
    s = 2.0 / r**0.5
    y, z = backend.forward(x, W, b, A, B, s, p, SEED)
    dx, dW, db, dA, dB = backend.backward(g, x, z, W, A, B, s, p, SEED, ALL)
    mask = backend.dropout_mask(M, K, p, SEED, DEVICE)

    want64 = _refs(*map(_f64, (x, W, b, A, B, g)), s, p, mask)
    want_dt = _refs(x, W, b, A, B, g, s, p, mask)
    for name, out, r64, rdt in zip(("y", "z", "dx", "dA", "dB"), (y, z, dx, dA, dB), want64, want_dt, strict=False):
        assert out.dtype == dtype and out.shape == r64.shape, name
        _assert_rule(out, r64, rdt, name)
    torch.testing.assert_close(dW, g.T @ x)  # dW and dbias are plain torch ops
    torch.testing.assert_close(db, g.sum(0))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_shrink(dtype, p):
    """F2 computing z from its own x tiles matches the F1 + F2 path."""
    M, K, N, r = 37, 70, 33, 13
    x, W, b, A, B, g = _inputs(M, K, N, r, dtype)
    y1, z1 = tk.lora_forward(x, W, b, A, B, 0.5, p, SEED, fuse_shrink=False)
    y2, z2 = tk.lora_forward(x, W, b, A, B, 0.5, p, SEED, fuse_shrink=True)
    mask = tb.dropout_mask(M, K, p, SEED, DEVICE)
    want64 = _refs(*map(_f64, (x, W, b, A, B, g)), 0.5, p, mask)
    want_dt = _refs(x, W, b, A, B, g, 0.5, p, mask)
    for out in (y1, y2):
        _assert_rule(out, want64[0], want_dt[0], "y")
    for out in (z1, z2):
        _assert_rule(out, want64[1], want_dt[1], "z")


def test_strided_inputs_are_bitwise_equal():
    """Non-contiguous x, g, W, A, B (strides passed, never copied) give the contiguous results
    bit for bit: same tiles, same reduction order."""
    M, K, N, r, p = 37, 33, 70, 13, 0.3
    x, W, b, A, B, g = _inputs(M, K, N, r, torch.float32)
    xs = torch.zeros(M, 2 * K, device=DEVICE)[:, ::2].copy_(x)
    gs = torch.zeros(N, M, device=DEVICE).t().copy_(g)
    Ws, As, Bs = (torch.zeros(t.shape[::-1], device=DEVICE).T.copy_(t) for t in (W, A, B))
    assert not any(t.is_contiguous() for t in (xs, gs, Ws, As, Bs))
    fwd = tb.forward(x, W, b, A, B, 0.5, p, SEED)
    fwd_s = tb.forward(xs, Ws, b, As, Bs, 0.5, p, SEED)
    bwd = tb.backward(g, x, fwd[1], W, A, B, 0.5, p, SEED, ALL)
    bwd_s = tb.backward(gs, xs, fwd_s[1], Ws, As, Bs, 0.5, p, SEED, ALL)
    for name, a, c in zip(("y", "z"), fwd, fwd_s, strict=False):
        assert torch.equal(a, c), name
    for name, a, c in zip(("dx", "dA", "dB"), (bwd[0], bwd[3], bwd[4]), (bwd_s[0], bwd_s[3], bwd_s[4]), strict=False):
        assert torch.equal(a, c), name


@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False, False), (False, False, False, True, False), (False, False, False, False, True)],
    ids=["dx", "dA", "dB"],
)
def test_backward_computes_only_what_is_needed(needs):
    """LoRA-FA and friends: what is not needed is None and the rest is right; z is not even
    passed when dB is not needed, x not when dA is not."""
    check_only_needed(tb, needs)


def check_only_needed(backend, needs):
    """``backend.backward`` computes exactly ``needs`` (the hybrid plan's tests run it too)."""
    M, K, N, r, p = 37, 33, 70, 13, 0.3
    x, W, _, A, B, g = _inputs(M, K, N, r, torch.float32)
    _, z = backend.forward(x, W, None, A, B, 0.5, p, SEED)
    out = backend.backward(g, x if needs[3] else None, z if needs[4] else None, W, A, B, 0.5, p, SEED, needs)
    mask = backend.dropout_mask(M, K, p, SEED, DEVICE)
    dx, dA, dB, _ = reference.lora_grads_ref(*map(_f64, (g, x, W, A, B)), 0.5, mask, p)
    for i, want in zip((0, 3, 4), (dx, dA, dB), strict=False):
        if needs[i]:
            torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-5)
        else:
            assert out[i] is None
    assert out[1] is None and out[2] is None


@pytest.mark.parametrize("P,S", [(1, 1), (1, 3), (3, 2)], ids=["P1-S1", "P1-S3", "P3-S2"])
def test_split_reductions(P, S):
    """B1's grid (P row programs, each summing its row tiles in place; S column splits) and
    B3's S row splits: right for every split, and deterministic run to run. M spans four of
    B1's 64-row tiles (the GPU's tiling, run here too), the last one partial, so with P = 3
    the first program sums two row tiles into its dB partial."""
    M, K, N, r, p = 3 * tk.lora_bwd.B1_BLOCK_M + 5, 33, 70, 13, 0.3
    x, W, _, A, B, g = _inputs(M, K, N, r, torch.float32)
    _, z = tb.forward(x, W, None, A, B, 0.5, p, SEED)
    dz, dB = tk.lora_bwd_dz_dB(g, z, B, 0.5, True, row_programs=P, col_splits=S)
    dA = tk.lora_bwd_dA(dz, x, p, SEED, splits=S)
    mask = tb.dropout_mask(M, K, p, SEED, DEVICE)
    # FlashAttention's rule against torch's fp32 of the same products: sums over ~200 rows of
    # terms up to ~10 cancel to small elements, which a fixed 1e-5 would judge by their own size
    # (torch's fp32 dA is 5e-5 off here). dA from the kernel's own dz, as dB from its z: this
    # checks B3's reduction, not B1's fp32 rounding of dz carried through the sum.
    _assert_rule(dz, 0.5 * _f64(g) @ _f64(B), 0.5 * g @ B, "dz")
    _assert_rule(dB, 0.5 * _f64(g).T @ _f64(z), 0.5 * g.T @ z, "dB")
    _assert_rule(dA, dz.double().T @ (mask * _f64(x)) / (1 - p), dz.T @ (mask * x) / (1 - p), "dA")
    again = tk.lora_bwd_dz_dB(g, z, B, 0.5, True, row_programs=P, col_splits=S)
    assert torch.equal(again[0], dz) and torch.equal(again[1], dB)
    assert torch.equal(tk.lora_bwd_dA(dz, x, p, SEED, splits=S), dA)


def test_rejects_float64():
    x, W, b, A, B, _ = _inputs(5, 20, 18, 3, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        tb.forward(x, W, b, A, B, 0.5, 0.0, SEED)


def test_lora_linear_autograd():
    """The whole chain (functional -> LoRAFunction -> triton backend) on a 3-D input agrees
    with the torch backend, dropout on."""
    K, N, r = 33, 70, 13
    x0, W, b, A0, B0, _ = _inputs(2 * 19, K, N, r, torch.float32)
    outs = []
    for backend in ("triton", "torch"):
        x, A, B = (t.clone().requires_grad_() for t in (x0.view(2, 19, K), A0, B0))
        y = fastlora.lora_linear(x, W, A, B, scale=0.5, bias=b, dropout_p=0.3, seed=SEED, backend=backend)
        y.backward(torch.ones_like(y))
        outs.append((y, x.grad, A.grad, B.grad))
    for name, a, c in zip(("y", "dx", "dA", "dB"), *outs, strict=False):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------- registration


def _op_args(M=5, K=20, N=18, r=3, p=0.3):
    x, W, b, A, B, g = _inputs(M, K, N, r, torch.float32)
    dz = torch.randn(M, r, device=DEVICE)
    _, z = tb.forward(x, W, b, A, B, 0.5, p, SEED)
    ops = torch.ops.fastlora
    seed_t = torch.tensor(SEED)  # a seed drawn inside a compiled graph: read in the op body
    return [
        (ops.triton_lora_fwd.default, (x, W, b, A, B, 0.5, p, SEED, None, False)),
        (ops.triton_lora_fwd.default, (x, W, None, A, B, 0.5, p, 0, seed_t, True)),
        (ops.triton_lora_bwd_dz_dB.default, (g, z, B, 0.5, True)),
        (ops.triton_lora_bwd_dz_dB.default, (g, None, B, 0.5, True)),
        (ops.triton_lora_bwd_dx.default, (g, dz, W, A, p, SEED, None)),
        (ops.triton_lora_bwd_dA.default, (dz, x, p, 0, seed_t)),
        (ops.hybrid_lora_fwd.default, (x, W, b, A, B, 0.5, p, 0, seed_t)),
        (ops.hybrid_lora_bwd.default, (g, x, z, W, A, B, 0.5, p, SEED, None, True, True, True)),
        (ops.hybrid_lora_bwd.default, (g, None, None, W, A, B, 0.5, p, 0, seed_t, True, False, False)),
    ]


def test_opcheck():
    for op, args in _op_args():
        torch.library.opcheck(op, args)


def test_torch_compile_has_no_graph_break():
    M, K, N, r = 5, 20, 18, 3
    x, W, b, A, B, g = _inputs(M, K, N, r, torch.float32)

    def step(x, W, b, A, B, g):
        y, z = tb.forward(x, W, b, A, B, 0.5, 0.3, SEED)
        return (y,) + tb.backward(g, x, z, W, A, B, 0.5, 0.3, SEED, ALL)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    for a, c in zip(compiled(x, W, b, A, B, g), step(x, W, b, A, B, g), strict=False):
        torch.testing.assert_close(a, c)


# ---------------------------------------------------------------- GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31+ elements need a GPU")
def test_offsets_past_int32_cuda():
    """x and dx with M*K > 2**31 elements: the last rows, whose offsets overflow int32, match
    the oracle computed on those rows alone (the mask at their logical row offset)."""
    K, N, r, p, tail = 4096, 64, 16, 0.1, 32
    M = 2**31 // K + tail
    x, W, b, A, B, _ = _inputs(M, K, N, r, torch.bfloat16)
    g = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
    y, z = tb.forward(x, W, b, A, B, 0.5, p, SEED)
    dx = tb.backward(g, None, None, W, A, B, 0.5, p, SEED, (True, False, False, False, False))[0]
    rows = slice(M - tail, M)
    mask = _philox.keep_mask(tail, K, p, SEED, DEVICE, row_offset=M - tail)
    args = (x[rows], W, b, A, B, g[rows], 0.5, p, mask)
    want64, want_dt = _refs(*map(_f64, args[:6]), *args[6:]), _refs(*args)
    for name, out, i in (("y", y, 0), ("z", z, 1), ("dx", dx, 2)):
        _assert_rule(out[rows], want64[i], want_dt[i], name)


def test_ieee_fp32_keeps_register_sized_tiles():
    """Without tensor cores (fp32, allow_tf32 off) the GEMMs keep only output tiles of at most
    64 fp32 accumulator registers a thread, at most 3 stages, 1 with a quantized W (compiled
    for sm_90 the others spill or overflow shared memory: benchmarks/results/sm90-aot/);
    other dtypes keep every tile."""
    gemm = tk.gemm
    space = [
        gemm.cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),  # 128 registers: dropped
        gemm.cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),  # 64: kept, 3 stages
        gemm.cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),  # fwd 64, dx 128
        gemm.cfg(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]
    args = {"M_BUCKET": 4096}
    assert gemm.prune_gemm(space, args, IEEE=False) == space
    kept = gemm.prune_gemm(space, args, IEEE=True)
    assert [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == [(128, 8, 3), (64, 4, 3), (64, 4, 2)]
    # a W dequantized in registers: no software pipelining (pipelined, every such tile spills)
    quant = gemm.prune_gemm(space, args, WQ=tk.quant.NF4, IEEE=True)
    assert [c.num_stages for c in quant] == [1, 1, 1] and [c.kwargs for c in quant] == [c.kwargs for c in kept]
    dx = gemm.prune_gemm(space, args, out_block="BLOCK_K", IEEE=True)
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in dx] == [(256, 64), (128, 64), (64, 64)]
    # the M pruning still applies first; nothing left still leaves one config to run
    assert [c.kwargs["BLOCK_M"] for c in gemm.prune_gemm(space, {"M_BUCKET": 16}, IEEE=True)] == [32]
    assert len(gemm.prune_gemm(space[:1], args, IEEE=True)) == 1


def test_ieee_fp32_dz_dB_keeps_register_sized_chunks():
    """B1 in IEEE fp32 drops its 256-column chunk (compiled for sm_90: 32 registers and 4.8 KB
    of local memory a thread); TF32 and 16-bit keep all three."""
    bwd = tk.lora_bwd
    space = [bwd.cfg(4, 3, BLOCK_N=64), bwd.cfg(8, 3, BLOCK_N=128), bwd.cfg(8, 3, BLOCK_N=256)]
    assert bwd._prune_dz_dB(space, {}, IEEE=False) == space
    assert bwd._prune_dz_dB(space, {}, IEEE=True) == space[:2]
    assert bwd._prune_dz_dB(space[2:], {}, IEEE=True) == space[2:]  # never empty


def test_gemm_autotune_keys_tell_dtypes_apart(monkeypatch):
    """triton's autotuner keys a call on its ``key`` arguments plus the dtype of each argument
    that has one (triton/runtime/autotuner.py, ``Autotuner.run``), and a cache hit skips the
    pruning. F2 and B2 take their tensors in tuples, which have none, so they key on DTYPE:
    without it a fp32 (TF32) call reused the tile tuned for bf16 at the same shape, 288 KiB of
    shared memory against an H100's 227 (found in review)."""
    keys = []

    def recording(kernel):
        run = kernel.run

        def run_and_record(*args, **kwargs):
            named = {**dict(zip(kernel.arg_names, args, strict=False)), **kwargs}
            key = [named[k] for k in kernel.keys if k in named]
            keys.append((kernel.fn.__name__, *key, *(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))))
            return run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run_and_record)

    recording(tk.lora_fwd._lora_fwd_kernel)
    recording(tk.lora_bwd._lora_bwd_dx_kernel)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, W, b, A, B, g = _inputs(37, 33, 70, 13, dtype)
        tk.lora_forward(x, W, b, A, B, 0.5, 0.0, SEED)
        tk.lora_bwd_dx(g, torch.zeros(37, 13, device=DEVICE), W, A, 0.0, SEED)
    for name in ("_lora_fwd_kernel", "_lora_bwd_dx_kernel"):
        assert len({k for k in keys if k[0] == name}) == 3, keys


def test_gemm_tiles_fit_shared_memory(monkeypatch):
    """F2/B2 keep the configs whose pipelined tiles fit the device's shared memory (a config
    over it only fails to launch); the byte count is the one compiled for sm_90 with wgmma."""
    gemm = tk.gemm
    monkeypatch.setattr(gemm, "max_shared_memory", lambda: 232448)  # an H100 block (opt-in)
    space = [
        gemm.cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        gemm.cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]
    x = torch.empty(1, 1)
    args = {"M_BUCKET": 4096, "x": tk.common.operand(x)}
    # fp32 in TF32: 3 stages x (128 + 256) x 64 x 4 bytes = 288 KiB, over
    assert gemm.prune_gemm(space, args, WQ=tk.quant.DENSE, IEEE=False) == space[1:]
    # bf16: 144 KiB fits; a quantized W is dequantized into one tile, not staged: 160 KiB fits
    bf16 = {**args, "x": tk.common.operand(x.bfloat16())}
    assert gemm.prune_gemm(space, bf16, WQ=tk.quant.DENSE, IEEE=False) == space
    assert gemm.prune_gemm(space, args, WQ=tk.quant.NF4, IEEE=False) == space
    # B2: g is the row operand, BLOCK_K the output and BLOCK_N the reduction
    dx = tk.lora_bwd._prune_dx(space, {"M_BUCKET": 4096, "g": tk.common.operand(x)}, WQ=tk.quant.DENSE, IEEE=False)
    assert dx == space[1:]
    assert gemm._shared_bytes(space[0], 4, "BLOCK_N", "BLOCK_K", FUSE_SHRINK=True, R_PAD=16) == 3 * 400 * 64 * 4
    # nothing fits: the smallest config is still there to launch
    monkeypatch.setattr(gemm, "max_shared_memory", lambda: 1024)
    assert gemm.prune_gemm(space[::-1], args, WQ=tk.quant.DENSE, IEEE=False) == space[1:]


@pytest.mark.parametrize("where", ["bias", "tail"])
def test_fp32_sums_the_gemm_before_adding_bias_and_tail(where, monkeypatch):
    """Issue 16: compiled for an H100, fp32 y was 3-6x less accurate than torch because F2 started
    its accumulator at s z B^T + bias, so each FMA of the K loop rounded at y's scale. The
    interpreter's dots are exact per K tile, so here the same fault shows as one rounding per K
    tile: y ~ 2**24 (ulp 2) plus 8 tiles of x W^T that each sum to ~1.2 lose ~0.8 per tile when
    added to the big accumulator, ~6 ulps in all, against torch's one rounding of the sum.
    B2 (dx = g W + tail) is held to the same order. With TF32 allowed (the tensor-core order,
    tail first, which is harmless at TF32's precision) the same inputs show the fault, so this
    test fails for a kernel that sums in the wrong order."""
    M, K, N = 4, 256, 16
    x = torch.ones(M, K, device=DEVICE)
    W = torch.full((N, K), 1.2 / 32, device=DEVICE)
    A = torch.zeros(1, K, device=DEVICE)
    B = torch.zeros(N, 1, device=DEVICE)
    bias = None
    if where == "bias":
        bias = torch.full((N,), 2.0**24, device=DEVICE)
    else:
        A[0] = 2.0**24 / K  # z = x A^T = 2**24 exactly; s = 1
        B[:, 0] = 1.0
    want = (
        x.double() @ W.double().T + (0 if bias is None else bias.double())
    ) + x.double() @ A.double().T @ B.double().T
    torch_err = ((x @ W.T + (0 if bias is None else bias)) + (x @ A.T) @ B.T).double().sub(want).abs().max().item()

    def err_y():
        y, _ = tk.lora_forward(x, W, bias, A, B, 1.0, 0.0, SEED)
        return (y.double() - want).abs().max().item()

    ulp = 2.0  # of fp32 at 2**24
    assert err_y() <= 2 * torch_err + ulp
    # B2: dx = g W + dz A with g W ~ 8 tiles of 1.2 and the tail 2**24
    g = torch.ones(M, N * 16, device=DEVICE)
    Wd = torch.full((N * 16, K), 1.2 / 32, device=DEVICE)
    dz = torch.full((M, 1), 2.0**24, device=DEVICE)
    Ad = torch.ones(1, K, device=DEVICE)
    want_dx = g.double() @ Wd.double() + dz.double() @ Ad.double()
    torch_dx_err = (g @ Wd + dz @ Ad).double().sub(want_dx).abs().max().item()
    dx = tk.lora_bwd_dx(g, dz, Wd, Ad, 0.0, SEED)
    assert (dx.double() - want_dx).abs().max().item() <= 2 * torch_dx_err + ulp
    # the tail-first order (what TF32 runs; the bias is added last in every order) on the same
    # inputs is what this test exists to catch
    if where == "tail":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        assert err_y() > 2 * torch_err + ulp
