"""Forward kernels (DESIGN.md section 3, F1 and F2).

F1 ``_lora_shrink_kernel``:  z = dropout(x) @ A^T, the mask regenerated in registers.
F2 ``_lora_fwd_kernel``:     y = x @ W^T + bias + s * z @ B^T, one accumulator, y written once;
                             optionally computes z itself from the x tiles it already loads;
                             W dense, or NF4 / int8 dequantized tile by tile in registers.
"""

import torch
import triton
import triton.language as tl

from .common import (
    autotune,
    cfg,
    check_dtype,
    configs,
    dot_flags,
    dropout_args,
    int32_safe,
    m_bucket,
    max_shared_memory,
    mma,
    new_buffer,
    rank_pad,
    round_to,
)
from .philox import keep_tile
from .quant import DENSE, QuantWeight, dequant_tile, weight_operands

_DROPOUT = ["seed_lo", "seed_hi", "thresh"]


def _prune_m(configs_, named_args, **_):
    """Tiles much taller than the batch only waste MMA work: keep BLOCK_M <= max(M, 32)."""
    kept = [c for c in configs_ if c.kwargs["BLOCK_M"] <= max(named_args["M_BUCKET"], 32)]
    return kept or configs_[:1]


def _prune_gemm(configs_, named_args, out_block="BLOCK_N", red_block="BLOCK_K", a_arg="x_ptr", **kwargs):
    """The autotune space of F2 and B2 (``out_block`` / ``red_block``: which tile is the output's
    column and which the reduction's; ``a_arg``: the row operand, x or g) for one call:

    - :func:`_prune_m`;
    - IEEE fp32 (no tensor cores: the dot is FMA loops holding their operands in registers):
      only output tiles whose accumulator takes at most 64 fp32 registers a thread, at most 3
      stages, and 1 (no software pipelining) when W is dequantized in registers. Compiled for
      sm_90 (tests/sm90_aot.py) larger tiles spill kilobytes, and pipelined quantized tiles all
      get 32 registers and 4-14 KB of local memory a thread (most are clean unpipelined);
    - tiles whose pipelined operands fit the device's shared memory (:func:`_shared_bytes`):
      128x256 fp32 tiles in TF32 need 288 KiB, and a config over the limit only fails to launch.
    One config is always left (the smallest), so a launch always has one."""
    kept = _prune_m(configs_, named_args)
    if kwargs.get("IEEE"):
        small = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs[out_block] <= 64 * 32 * c.num_warps] or kept[-1:]
        stages = 3 if kwargs.get("WQ", DENSE) == DENSE else 1
        kept = [cfg(c.num_warps, min(c.num_stages, stages), **c.kwargs) for c in small]
    limit = max_shared_memory()
    if limit is not None:
        item = named_args[a_arg].element_size()
        need = {c: _shared_bytes(c, item, out_block, red_block, **kwargs) for c in kept}
        kept = [c for c in kept if need[c] <= limit] or [min(kept, key=need.get)]
    return kept


def _shared_bytes(c, item, out_block, red_block, WQ=DENSE, FUSE_SHRINK=False, R_PAD=0, **_):
    """Shared memory of the pipelined K loop: num_stages buffers of the row operand's tile (and
    of a dense W's, and with the fused shrink of lora_A's) plus one tile of a dequantized W.
    Exact for the wgmma tiles compiled for sm_90, an upper bound for the smaller mma ones."""
    rows = c.kwargs["BLOCK_M"] + (R_PAD if FUSE_SHRINK else 0)
    out = c.kwargs[out_block]
    staged, once = (rows + out, 0) if WQ == DENSE else (rows, out)
    return (c.num_stages * staged + once) * c.kwargs[red_block] * item


# At most 4 configs (tuning cost): the large Hopper tile, two mid tiles, a short one for
# decode-sized M (the pruning keeps BLOCK_M <= max(M, 32)).
_GEMM_GPU = [
    cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8),
]
_GEMM_INTERPRET = cfg(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_GEMM_CONFIGS = configs(_GEMM_GPU, _GEMM_INTERPRET)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles at a time so that neighbouring programs
    share the row and column panels they read through L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@autotune(
    [cfg(4, 3, BLOCK_M=32, BLOCK_K=128), cfg(8, 3, BLOCK_M=64, BLOCK_K=128), cfg(4, 4, BLOCK_M=16, BLOCK_K=256)],
    cfg(1, 1, BLOCK_M=16, BLOCK_K=32),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT"],
    prune=_prune_m,
)
@triton.jit(do_not_specialize=_DROPOUT)
def _lora_shrink_kernel(
    x_ptr, a_ptr, z_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_zm, stride_zr,
    seed_lo, seed_hi, thresh, keep_scale,
    HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, R_PAD: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """z (M, R) = keep_scale * (keep * x) (M, K) @ A^T (K, R); one program per BLOCK_M rows,
    all R_PAD rank columns at once so x is read once."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, R_PAD)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    at_ptrs = a_ptr + rs[None, :] * stride_ar + ks[:, None] * stride_ak  # A^T tile (BLOCK_K, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_ptrs, mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_tile(rows, k0, K, seed_lo, seed_hi, thresh, BLOCK_K, ALIGNED), x, 0.0)
        at = tl.load(at_ptrs, mask=k_ok[:, None] & (rs[None, :] < R), other=0.0)
        acc = mma(x, at, acc, UPCAST, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * keep_scale
    z_ptrs = z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr
    tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (rs[None, :] < R))


@triton.jit
def _tail_tile(z_ptr, b_ptr, rows, cols, m_ok, n_ok, R, stride_zm, stride_zr, stride_bn, stride_br,
               acc, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """``acc + z[rows] @ B[cols]^T`` over the rank in chunks of BLOCK_R (unscaled)."""
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + rr < R
        z = tl.load(
            z_ptr + rows[:, None] * stride_zm + (r0 + rr)[None, :] * stride_zr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        bt = tl.load(
            b_ptr + cols[None, :] * stride_bn + (r0 + rr)[:, None] * stride_br,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = mma(z, bt, acc, UPCAST, IEEE)
    return acc


# HAS_BIAS changes no tile choice; HAS_DROPOUT is only read with FUSE_SHRINK (the launcher
# passes False otherwise), so the dense unfused kernel tunes once for both.
@autotune(
    _GEMM_GPU,
    _GEMM_INTERPRET,
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT", "FUSE_SHRINK", "WQ", "QBLOCK", "IEEE"],
    prune=_prune_gemm,
)
@triton.jit(do_not_specialize=_DROPOUT)
def _lora_fwd_kernel(
    x_ptr, w_ptr, qs_ptr, code_ptr, nabs_ptr, ncode_ptr, off_ptr, bias_ptr, a_ptr, b_ptr, z_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_zm, stride_zr, stride_ym, stride_yn,
    scale, seed_lo, seed_hi, thresh, keep_scale,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    WQ: tl.constexpr, QBLOCK: tl.constexpr, NQBLOCK: tl.constexpr, QALIGNED: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y (M, N) = [x | s*z] @ [W | B]^T + bias, the GEMM over K with a rank-R tail.

    WQ (triton_kernels/quant.py): W dense at w_ptr, or quantized codes whose W^T tiles are
    dequantized in registers to x's dtype (qs_ptr ... off_ptr: the format's statistics).

    FUSE_SHRINK=False: z (M, R) was written by F1; the tail runs first (acc = s * z B^T + bias)
    so one fp32 accumulator carries through the K loop. FUSE_SHRINK=True: z is accumulated
    from the x tiles of the K loop (dropout mask regenerated per N tile) and written by the
    pid_n == 0 programs; costs R_PAD / BLOCK_N extra MMA work, saves F1's read of x.
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_ok = rows < M
    n_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if not FUSE_SHRINK and not IEEE:
        # 16-bit / TF32 operands: the tail first, so one accumulator carries through the K loop
        # (the fp32 roundings this adds vanish in the output's own rounding).
        acc = _tail_tile(z_ptr, b_ptr, rows, cols, m_ok, n_ok, R, stride_zm, stride_zr, stride_bn, stride_br,
                         acc, UPCAST, IEEE, BLOCK_R) * scale  # fmt: skip

    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    wt_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # W^T tile (BLOCK_K, BLOCK_N)
    if FUSE_SHRINK:
        rs = tl.arange(0, R_PAD)
        at_ptrs = a_ptr + rs[None, :] * stride_ar + ks[:, None] * stride_ak
        zacc = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if WQ == 0:
            wt = tl.load(wt_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            wt = dequant_tile(
                w_ptr, qs_ptr, code_ptr, nabs_ptr, ncode_ptr, off_ptr,
                cols[None, :], (k0 + ks)[:, None], n_ok[None, :], k_ok[:, None], K, k0, stride_wn, stride_wk,
                WQ, QBLOCK, NQBLOCK, QALIGNED, BLOCK_K,
            )  # fmt: skip
            wt = round_to(wt, x_ptr.dtype.element_ty)
        acc = mma(x, wt, acc, UPCAST, IEEE)
        if FUSE_SHRINK:
            if HAS_DROPOUT:
                x = tl.where(keep_tile(rows, k0, K, seed_lo, seed_hi, thresh, BLOCK_K, ALIGNED), x, 0.0)
            at = tl.load(at_ptrs, mask=k_ok[:, None] & (rs[None, :] < R), other=0.0)
            zacc = mma(x, at, zacc, UPCAST, IEEE)
            at_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk

    if FUSE_SHRINK:
        if HAS_DROPOUT:
            zacc = zacc * keep_scale
        if pid_n == 0:
            z_ptrs = z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr
            tl.store(z_ptrs, zacc.to(z_ptr.dtype.element_ty), mask=m_ok[:, None] & (rs[None, :] < R))
        bt = tl.load(
            b_ptr + cols[None, :] * stride_bn + rs[:, None] * stride_br,
            mask=(rs[:, None] < R) & n_ok[None, :],
            other=0.0,
        )
        # s is folded into the fp32 z before its one rounding to the operand dtype
        zs = (zacc * scale).to(bt.dtype)
        if IEEE:  # its own accumulator, added once (see the unfused IEEE tail below)
            acc += mma(zs, bt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST, IEEE)
        else:
            acc = mma(zs, bt, acc, UPCAST, IEEE)

    if not FUSE_SHRINK and IEEE:
        # IEEE fp32 (FMA dots, one rounding per product at the accumulator's scale): x W^T is
        # summed from zero and the tail in its own accumulator, then added once, as torch
        # orders it. Started from the tail (or the bias), every one of the K FMAs would round at
        # y's scale: compiled on an H100 that was 3-6x torch's error (issue 16).
        tail = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        tail = _tail_tile(z_ptr, b_ptr, rows, cols, m_ok, n_ok, R, stride_zm, stride_zr, stride_bn, stride_br,
                          tail, UPCAST, IEEE, BLOCK_R)  # fmt: skip
        acc += tail * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """F1: ``z = dropout(x) @ A^T``. x: (M, K), lora_A: (r, K) -> z: (M, r) in x's dtype."""
    check_dtype(x)
    x, lora_A = int32_safe(x), int32_safe(lora_A)
    M, K = x.shape
    R = lora_A.shape[0]
    z = new_buffer((M, R), x.dtype, x.device)
    if M == 0:
        return z
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _lora_shrink_kernel[grid](
        x, lora_A, z,
        M, K, R, m_bucket(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), z.stride(0), z.stride(1),
        **dropout_args(p, seed), ALIGNED=K % 4 == 0, R_PAD=rank_pad(R), **dot_flags(x.dtype),
    )  # fmt: skip
    return z


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor | QuantWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    p: float,
    seed: int,
    fuse_shrink: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """F1 + F2: ``y = x W^T + bias + scale * z B^T`` and ``z = dropout(x) A^T``.

    x: (M, K), weight: (N, K) tensor or :class:`QuantWeight` (dequantized tile by tile in
    registers), bias: (N,) or None, lora_A: (r, K), lora_B: (N, r); any strides.
    Returns y: (M, N) and z: (M, r), both in x's dtype. ``fuse_shrink`` computes z inside F2
    instead of a separate F1 pass (a tuning knob: which wins depends on r, N and p).
    """
    check_dtype(x)
    x, lora_A, lora_B = int32_safe(x), int32_safe(lora_A), int32_safe(lora_B)
    if isinstance(weight, torch.Tensor):
        weight = int32_safe(weight)
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = rank_pad(R)
    if fuse_shrink and r_pad > 128:
        raise ValueError(f"fuse_shrink keeps z's (BLOCK_M, r) accumulator in registers: r <= 128, got {R}")
    y = new_buffer((M, N), x.dtype, x.device)
    if fuse_shrink:
        z = new_buffer((M, R), x.dtype, x.device)
    else:
        z = lora_shrink(x, lora_A, p, seed)
    if M == 0:
        return y, z
    w_ptrs, w_strides, w_meta = weight_operands(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_fwd_kernel[grid](
        x, *w_ptrs, bias if bias is not None else y, lora_A, lora_B, z, y,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), *w_strides, lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), z.stride(0), z.stride(1), y.stride(0), y.stride(1),
        scale, **dropout_args(p if fuse_shrink else 0.0, seed),
        HAS_BIAS=bias is not None, FUSE_SHRINK=fuse_shrink, ALIGNED=K % 4 == 0,
        R_PAD=r_pad, BLOCK_R=min(r_pad, 64), **w_meta, **dot_flags(x.dtype),
    )  # fmt: skip
    return y, z
