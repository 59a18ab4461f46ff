"""Seeded dropout mask: Philox4x32-10 keyed by (seed, element offset), regenerated in registers.

Written out here instead of using ``tl.rand`` so that the bits follow fastlora's definition
(fastlora/_philox.py) and not triton's version-specific offset handling.
"""

import torch
import triton
import triton.language as tl

from .common import autotune, cfg, check_dtype, dropout_args, int32_safe, new_buffer, round_to


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123 Philox4x32 with 10 rounds on uint32 counter words and key words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = tl.mul(c0, 0xD2511F53, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = tl.mul(c2, 0xCD9E8D57, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _philox_ctr(ctr, seed_lo, seed_hi):
    """The 4 words of counter ``ctr`` (int64 tensor) = (low32, high32, 0, 0)."""
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    return philox4x32_10(c0, c1, zero, zero, k0, k1)


@triton.jit
def keep_tile(rows, col0, K, seed_lo, seed_hi, thresh, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    """Keep-mask (BLOCK_M, BLOCK_K) of the logical (M, K) elements at ``rows`` (int64, (BLOCK_M,))
    and columns ``col0 + arange(BLOCK_K)``: element e = row * K + col is kept iff word e & 3 of
    philox(e >> 2) is >= thresh. Out-of-range positions return garbage; callers mask loads.

    ALIGNED (K % 4 == 0, col0 % 4 == 0): the 4 elements of one counter are adjacent in the row,
    so one Philox call yields 4 mask bits (4x less integer work); otherwise one call per element.
    """
    t = thresh.to(tl.uint32, bitcast=True)
    if ALIGNED:
        ctr = (rows[:, None] * K + col0) // 4 + tl.arange(0, BLOCK_K // 4)[None, :]
        r0, r1, r2, r3 = _philox_ctr(ctr, seed_lo, seed_hi)
        # (r0 r1 r2 r3) of counter j land on columns 4j .. 4j+3
        r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    else:
        e = rows[:, None] * K + (col0 + tl.arange(0, BLOCK_K))[None, :]
        r0, r1, r2, r3 = _philox_ctr(e >> 2, seed_lo, seed_hi)
        w = e & 3
        r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return r >= t


_DROPOUT = ["seed_lo", "seed_hi", "thresh"]


@autotune([cfg(BLOCK_M=32, BLOCK_K=128), cfg(BLOCK_M=8, BLOCK_K=512)], cfg(1, 1, BLOCK_M=16, BLOCK_K=32), key=["K"])
@triton.jit(do_not_specialize=_DROPOUT)
def _keep_mask_kernel(
    out_ptr, M, K, seed_lo, seed_hi, thresh, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = keep_tile(rows, col0, K, seed_lo, seed_hi, thresh, BLOCK_K, ALIGNED)
    ok = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep, mask=ok)


def keep_mask(M: int, K: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The dropout keep-mask (True = kept) of a logical (M, K) input: bool (M, K)."""
    args = dropout_args(p, seed)
    out = new_buffer((M, K), torch.bool, torch.device(device))
    if M * K == 0:
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))
    _keep_mask_kernel[grid](out, M, K, args["seed_lo"], args["seed_hi"], args["thresh"], ALIGNED=K % 4 == 0)
    return out


@autotune(
    [cfg(BLOCK_M=32, BLOCK_K=128), cfg(BLOCK_M=8, BLOCK_K=512)],
    cfg(1, 1, BLOCK_M=16, BLOCK_K=32),
    key=["K"],
    restore=["out_ptr"],  # out may be x (in place): each timed run must see the original
)
@triton.jit(do_not_specialize=_DROPOUT)
def _dropout_kernel(
    x_ptr, out_ptr, M, K, row_offset,
    stride_xm, stride_xk, stride_om, stride_ok,
    seed_lo, seed_hi, thresh, keep_scale,
    ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out = where(keep, x * (1/(1-p)), 0): fp32 product rounded once to out's dtype (the spec in
    fastlora/_philox.py); the mask of logical rows row_offset + m. out may be x (in place)."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = keep_tile(local + row_offset, col0, K, seed_lo, seed_hi, thresh, BLOCK_K, ALIGNED)
    ok = (local[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + local[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0)
    y = tl.where(keep, round_to(x.to(tl.float32) * keep_scale, out_ptr.dtype.element_ty), 0.0)
    tl.store(out_ptr + local[:, None] * stride_om + cols[None, :] * stride_ok, y, mask=ok)


def dropout(x: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None, row_offset: int = 0) -> torch.Tensor:
    """``where(keep, x / (1 - p), 0)`` of ``x: (M, K)`` (fp32/fp16/bf16, any strides) into ``out``
    (default: a new contiguous tensor; ``out=x`` drops in place) and return it."""
    check_dtype(x)
    M, K = x.shape
    x = int32_safe(x)
    if out is not None and int32_safe(out) is not out:
        raise ValueError("dropout: out's last-dim stride times its width passes 2**31; pass a contiguous out")
    args = dropout_args(p, seed)
    out = new_buffer((M, K), x.dtype, x.device) if out is None else out
    if M * K == 0:
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))
    _dropout_kernel[grid](
        x, out, M, K, row_offset, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        args["seed_lo"], args["seed_hi"], args["thresh"], args["keep_scale"], ALIGNED=K % 4 == 0,
    )  # fmt: skip
    return out
