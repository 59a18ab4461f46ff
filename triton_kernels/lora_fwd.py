"""Forward kernels (DESIGN.md section 3, F1 and F2).

F1 ``_lora_shrink_kernel``:  z = dropout(x) @ A^T, the mask regenerated in registers.
F2 ``_lora_fwd_kernel``:     y = x @ W^T + bias + s * z @ B^T, y written once (the GEMM with a
                             rank-r tail of triton_kernels/gemm.py); optionally computes z itself
                             from the x tiles it already loads; W dense, or NF4 / int8
                             dequantized tile by tile in registers.
"""

import torch
import triton
import triton.language as tl

from .common import (
    autotune,
    cfg,
    check_dtype,
    dot_flags,
    dropout_args,
    dtype_name,
    int32_safe,
    m_bucket,
    mma,
    new_buffer,
    operand,
    rank_pad,
)
from .gemm import GEMM_GPU, GEMM_INTERPRET, gemm_rank_tile, grouped_tile, prune_gemm, prune_m
from .philox import keep_tile
from .quant import QuantWeight, weight_operands

_DROPOUT = ["seed_lo", "seed_hi", "thresh"]


@autotune(
    [cfg(4, 3, BLOCK_M=32, BLOCK_K=128), cfg(8, 3, BLOCK_M=64, BLOCK_K=128), cfg(4, 4, BLOCK_M=16, BLOCK_K=256)],
    cfg(1, 1, BLOCK_M=16, BLOCK_K=32),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT"],
    prune=prune_m,
)
@triton.jit(do_not_specialize=_DROPOUT)
def _lora_shrink_kernel(
    x_ptr, a_ptr, z_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_zm, stride_zr,
    seed_lo, seed_hi, thresh, keep_scale,
    HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
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
        acc = mma(x, at, acc, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * keep_scale
    z_ptrs = z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr
    tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (rs[None, :] < R))


# HAS_DROPOUT is only read with FUSE_SHRINK (the launcher
# passes False otherwise), so the dense unfused kernel tunes once for both.
@autotune(
    GEMM_GPU,
    GEMM_INTERPRET,
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT", "FUSE_SHRINK", "WQ", "QBLOCK", "IEEE", "DTYPE"],
    prune=prune_gemm,
)
@triton.jit(do_not_specialize=_DROPOUT)
def _lora_fwd_kernel(
    x, w, bias_ptr, a, b, z, y,
    M, N, K, R, M_BUCKET,
    scale, seed_lo, seed_hi, thresh, keep_scale,
    FUSE_SHRINK: tl.constexpr, HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    WQ: tl.constexpr, QBLOCK: tl.constexpr, NQBLOCK: tl.constexpr, QALIGNED: tl.constexpr, IEEE: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y (M, N) = x @ W^T + s * z @ B^T + bias: :func:`gemm_rank_tile` over K with the tail
    z B^T, y written once. Operands as (pointer, stride, stride): x (M, K), lora_A a (R, K),
    lora_B b (N, R), z (M, R), y (M, N); w = (tensors, stride_n, stride_k), W dense or quantized
    (WQ, triton_kernels/quant.py); bias_ptr (N,) or None. DTYPE: x's dtype name, for the
    autotune key only (triton keys on the dtype of tensor arguments; a tuple has none).

    FUSE_SHRINK=False: z (M, R) was written by F1. FUSE_SHRINK=True: z = dropout(x) A^T is
    accumulated from the x tiles of the K loop (the mask regenerated per N tile), written by the
    pid_n == 0 programs and its tail added after the loop; costs R_PAD / BLOCK_N extra MMA
    work, saves F1's read of x and a launch.
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows < M
    n_ok = cols < N
    bt = (b[0], b[2], b[1])  # B^T (R, N)
    acc, zacc = gemm_rank_tile(
        x, w, z, bt, a, y,
        rows, cols, m_ok, n_ok, 0, K, K, R, scale, (seed_lo, seed_hi, thresh, keep_scale),
        tl.zeros((BLOCK_M, R_PAD), tl.float32),
        W_T=True, WQ=WQ, QBLOCK=QBLOCK, NQBLOCK=NQBLOCK, QALIGNED=QALIGNED,
        TAIL=not FUSE_SHRINK, MASK_TAIL=False, SIDE=FUSE_SHRINK, HAS_DROPOUT=HAS_DROPOUT, ALIGNED=ALIGNED,
        IEEE=IEEE, BLOCK_M=BLOCK_M, BLOCK_OUT=BLOCK_N, BLOCK_RED=BLOCK_K, BLOCK_R=BLOCK_R, R_PAD=R_PAD,
    )  # fmt: skip

    if FUSE_SHRINK:
        rs = tl.arange(0, R_PAD)
        if HAS_DROPOUT:
            zacc = zacc * keep_scale
        if pid_n == 0:
            z_ptrs = z[0] + rows[:, None] * z[1] + rs[None, :] * z[2]
            tl.store(z_ptrs, zacc.to(z[0].dtype.element_ty), mask=m_ok[:, None] & (rs[None, :] < R))
        btile = tl.load(
            bt[0] + rs[:, None] * bt[1] + cols[None, :] * bt[2],
            mask=(rs[:, None] < R) & n_ok[None, :],
            other=0.0,
        )
        # s is folded into the fp32 z before its one rounding to the operand dtype
        zs = (zacc * scale).to(btile.dtype)
        if IEEE:  # its own accumulator, added once (gemm_rank_tile's order of the sums). Not
            # parked in y: compiled for sm_90 that made this kernel spill more (96 bytes -> 0.75-6 KB)
            acc += mma(zs, btile, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE)
        else:
            acc = mma(zs, btile, acc, IEEE)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y[0] + rows[:, None] * y[1] + cols[None, :] * y[2]
    tl.store(y_ptrs, acc.to(y[0].dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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
    w_op, w_meta = weight_operands(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_fwd_kernel[grid](
        operand(x), w_op, bias, operand(lora_A), operand(lora_B), operand(z), operand(y),
        M, N, K, R, m_bucket(M),
        scale, **dropout_args(p if fuse_shrink else 0.0, seed),
        FUSE_SHRINK=fuse_shrink, ALIGNED=K % 4 == 0,
        R_PAD=r_pad, BLOCK_R=min(r_pad, 64), **w_meta, **dot_flags(x.dtype), DTYPE=dtype_name(x.dtype),
    )  # fmt: skip
    return y, z
