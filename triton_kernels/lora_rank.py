"""Rank-r kernels of the hybrid plan: everything but the two big GEMMs, which cuBLAS runs.

Forward:  :func:`lora_shrink` (F1, in lora_fwd.py) gives z = dropout(x) A^T in one read of x;
          :func:`lora_tail` writes ``y = s z B^T + bias`` (or adds it to a y that already holds
          x W^T); cuBLAS accumulates the other term with beta = 1.
Backward: :func:`lora_bwd_dz_dB` (B1, in lora_bwd.py) gives dz and dB in one read of g;
          :func:`lora_dA_tail` reads x once, regenerates the mask, and writes both
          ``dA = dz^T dropout(x)`` and the masked tail ``keep * (dz A) / (1 - p)`` into dx (or
          adds it to a dx that holds g W); cuBLAS accumulates the other term.

Cross-program sums go through fp32 partial buffers summed afterwards (no atomics): bitwise
reproducible, as the other kernels.
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
    int32_safe,
    m_bucket,
    mma,
    new_buffer,
    rank_pad,
    sm_count,
    sum_partials,
)
from .gemm import prune_m, rank_tile
from .philox import keep_tile

_DROPOUT = ["seed_lo", "seed_hi", "thresh"]


@autotune(
    [cfg(4, 3, BLOCK_M=64, BLOCK_N=128), cfg(8, 3, BLOCK_M=128, BLOCK_N=128), cfg(4, 3, BLOCK_M=32, BLOCK_N=256)],
    cfg(1, 1, BLOCK_M=16, BLOCK_N=32),
    key=["M_BUCKET", "N", "R_PAD", "ACCUMULATE"],
    prune=prune_m,
    restore=["y_ptr"],
)
@triton.jit
def _lora_tail_kernel(
    z_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, R, M_BUCKET,
    stride_zm, stride_zr, stride_bn, stride_br, stride_ym, stride_yn,
    scale,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y (M, N) = [y +] s * z (M, R) @ B^T (R, N) + bias; one (BLOCK_M, BLOCK_N) tile a program.
    The sum is formed in fp32 and rounded once: with ACCUMULATE, ``y + (s z B^T + bias)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows < M
    n_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = rank_tile((z_ptr, stride_zm, stride_zr), (b_ptr, stride_br, stride_bn), rows, cols, m_ok, n_ok, R,
                    acc, IEEE, BLOCK_R) * scale  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _prune_dA_tail(configs_, named_args, R_PAD=16, IEEE=False, **_):
    """A wide rank keeps (R_PAD, BLOCK_K) and (BLOCK_M, R_PAD) tiles in registers: past r = 64 only
    the 32 x 64 tile;
    IEEE fp32 (FMA dots on register operands) only the 32 x 64 tile, the one that compiles for
    sm_90 without spills (the larger ones spilled 0.5-3 KB a thread). (Constexprs reach the
    pruning as keyword arguments, not in named_args.)"""
    kept = [c for c in configs_ if R_PAD <= 64 or c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_M"] <= 32 * 64]
    if IEEE:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 32 * 64] or kept
    return kept or configs_[:1]


@autotune(
    [cfg(4, 3, BLOCK_M=64, BLOCK_K=64), cfg(8, 3, BLOCK_M=64, BLOCK_K=128), cfg(4, 3, BLOCK_M=32, BLOCK_K=64)],
    cfg(1, 1, BLOCK_M=16, BLOCK_K=32),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT", "NEED_DA", "NEED_TAIL", "ACCUMULATE", "IEEE"],
    prune=_prune_dA_tail,
    restore=["dx_ptr"],
)
@triton.jit(do_not_specialize=_DROPOUT)
def _lora_dA_tail_kernel(
    dz_ptr, x_ptr, a_ptr, da_ptr, dx_ptr,
    M, K, R, M_BUCKET,
    stride_dzm, stride_dzr, stride_xm, stride_xk, stride_ar, stride_ak, stride_das, stride_dar,
    stride_dxm, stride_dxk,
    seed_lo, seed_hi, thresh, keep_scale,
    HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, NEED_DA: tl.constexpr, NEED_TAIL: tl.constexpr,
    ACCUMULATE: tl.constexpr, R_PAD: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (k, s) owns columns k*BLOCK_K.. and the row tiles s, s + S, ... (S = grid dim 1).

    NEED_DA: dA partial s (S, R, K) = dz^T @ (keep * x) / (1 - p) over its rows;
    NEED_TAIL: dx[rows, cols] = [dx +] keep * (dz @ A) / (1 - p). One mask per x tile for both.
    """
    k0 = tl.program_id(0) * BLOCK_K
    pid_s = tl.program_id(1)
    cols = k0 + tl.arange(0, BLOCK_K)
    k_ok = cols < K
    rs = tl.arange(0, R_PAD)
    r_ok = rs < R
    if NEED_TAIL:
        a = tl.load(
            a_ptr + rs[:, None] * stride_ar + cols[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0
        )
    acc = tl.zeros((R_PAD, BLOCK_K), tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, tl.num_programs(1) * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = rows < M
        ok = m_ok[:, None] & k_ok[None, :]
        dz = tl.load(
            dz_ptr + rows[:, None] * stride_dzm + rs[None, :] * stride_dzr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            keep = keep_tile(rows, k0, K, seed_lo, seed_hi, thresh, BLOCK_K, ALIGNED)
        if NEED_DA:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0)
            if HAS_DROPOUT:
                x = tl.where(keep, x, 0.0)
            # dA = dz^T (keep * x) / (1 - p)
            acc = mma(tl.trans(dz.to(x.dtype)), x, acc, IEEE)
        if NEED_TAIL:
            # dx_lora = keep * (dz A) / (1 - p)
            t = mma(dz.to(a.dtype), a, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), IEEE)
            if HAS_DROPOUT:
                t = tl.where(keep, t * keep_scale, 0.0)
            dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
            if ACCUMULATE:
                t += tl.load(dx_ptrs, mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, t.to(dx_ptr.dtype.element_ty), mask=ok)
    if NEED_DA:
        if HAS_DROPOUT:
            acc = acc * keep_scale
        da_ptrs = da_ptr + pid_s.to(tl.int64) * stride_das + rs[:, None] * stride_dar + cols[None, :]
        tl.store(da_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])


def lora_tail(
    z: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None, scale: float, out: torch.Tensor, accumulate: bool
) -> torch.Tensor:
    """``out = s z B^T + bias`` (``accumulate``: ``out += ...``) and return out.

    z: (M, r), lora_B: (N, r), bias: (N,) or None, out: (M, N) in z's dtype, any strides."""
    check_dtype(out)
    z, lora_B = int32_safe(z), int32_safe(lora_B)
    if out.dim() == 2 and int32_safe(out) is not out:
        raise ValueError("lora_tail: out's last-dim stride times its width passes 2**31; pass a contiguous out")
    M, N = out.shape
    R = z.shape[1]
    if M == 0 or N == 0:
        return out
    r_pad = rank_pad(R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    _lora_tail_kernel[grid](
        z, lora_B, bias if bias is not None else out, out,
        M, N, R, m_bucket(M),
        z.stride(0), z.stride(1), lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1),
        scale,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate, R_PAD=r_pad, BLOCK_R=min(r_pad, 64), **dot_flags(out.dtype),
    )  # fmt: skip
    return out


def lora_dA_tail(
    dz: torch.Tensor,
    x: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    p: float,
    seed: int,
    dx: torch.Tensor | None,
    accumulate: bool = False,
    splits: int | None = None,
) -> torch.Tensor | None:
    """dA and the masked dx tail from one read of x.

    dz: (M, r) fp32 from B1; x: (M, K) or None (dA not needed: x is not read); lora_A: (r, K),
    or None without a tail; dx: (M, K) or None (no tail). Writes ``dx = [dx +] keep * (dz A) / (1 - p)`` and returns
    ``dA = dz^T dropout(x)`` (r, K) in x's dtype, or None without x. ``splits``: row ranges
    reduced in parallel into fp32 partials (splits, r, K) (None: fill the GPU)."""
    need_da, need_tail = x is not None, dx is not None
    ref = x if need_da else dx
    if ref is None:
        return None
    check_dtype(ref)
    if need_tail and lora_A is None:
        raise ValueError("lora_dA_tail: the dx tail needs lora_A")
    x, lora_A = int32_safe(x), int32_safe(lora_A) if need_tail else ref
    if dx is not None and int32_safe(dx) is not dx:
        raise ValueError("lora_dA_tail: dx's last-dim stride times its width passes 2**31; pass a contiguous dx")
    M, K = ref.shape
    R = dz.shape[1]
    if M == 0:
        return x.new_zeros((R, K)) if need_da else None
    S = splits or max(1, min(triton.cdiv(2 * sm_count(ref.device), triton.cdiv(K, 128)), triton.cdiv(M, 64)))
    da_part = new_buffer((S, R, K), torch.float32, ref.device) if need_da else dz
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), S)
    _lora_dA_tail_kernel[grid](
        # an operand not needed is a small placeholder: dx_ptr is restored around each timed
        # run (restore=), which with x in its place would copy x four times a tuning run
        dz, x if need_da else ref, lora_A, da_part, dx if need_tail else dz,
        M, K, R, m_bucket(M),
        dz.stride(0), dz.stride(1), *(x.stride() if need_da else (0, 0)), lora_A.stride(0), lora_A.stride(1),
        R * K, K, *(dx.stride() if need_tail else (0, 0)),
        **dropout_args(p, seed), ALIGNED=K % 4 == 0, NEED_DA=need_da, NEED_TAIL=need_tail,
        ACCUMULATE=accumulate, R_PAD=rank_pad(R), **dot_flags(ref.dtype),
    )  # fmt: skip
    return sum_partials(da_part, x.dtype) if need_da else None
