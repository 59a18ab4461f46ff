"""Backward kernels (DESIGN.md section 3, B1 to B3), given g = dL/dy (M, N).

B1 ``_lora_bwd_dz_dB_kernel``: dz = s g B and dB = s g^T z in one read of g.
B2 ``_lora_bwd_dx_kernel``:    dx = g W + keep * (dz A) / (1 - p), the GEMM over N with a rank-r
                               tail of triton_kernels/gemm.py, the mask regenerated for the tail;
                               W dense, or NF4 / int8 dequantized tile by tile in registers.
B3 :func:`lora_bwd_dA`:       dA = dz^T dropout(x), the mask regenerated (lora_rank.py's kernel).

Cross-program reductions go through fp32 partial buffers summed by torch afterwards, never
atomics, so gradients are bitwise reproducible.
"""

import functools

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
    sm_count,
    sum_partials,
)
from .gemm import GEMM_GPU, GEMM_INTERPRET, gemm_rank_tile, grouped_tile, prune_gemm, swap_nk
from .lora_rank import lora_dA_tail
from .quant import QuantWeight, weight_operands

_DROPOUT = ["seed_lo", "seed_hi", "thresh"]


# B2 reduces over N and tiles K: F2's configs with the roles of BLOCK_N and BLOCK_K swapped
_DX_GPU = [swap_nk(c) for c in GEMM_GPU]
_DX_INTERPRET = swap_nk(GEMM_INTERPRET)

# B2's output columns are K (BLOCK_K), its reduction N (BLOCK_N), its row operand g
_prune_dx = functools.partial(prune_gemm, out_block="BLOCK_K", red_block="BLOCK_N", a_arg="g")

# B1's row tile, fixed on the host (it sets how many dB partial buffers exist); the same under
# the interpreter, where tests/test_triton.py's split test spans several of these row tiles.
B1_BLOCK_M = 64


def _prune_dz_dB(configs_, named_args, IEEE=False, **_):
    """IEEE fp32 (FMA dots holding their operands in registers): column chunks of at most 128.
    Compiled for sm_90 the 256-column chunk gets 32 registers and 4.8 KB of local memory a
    thread (benchmarks/results/sm90-aot/)."""
    return [c for c in configs_ if not IEEE or c.kwargs["BLOCK_N"] <= 128] or configs_[:1]


@autotune(
    [cfg(4, 3, BLOCK_N=64), cfg(8, 3, BLOCK_N=128), cfg(8, 3, BLOCK_N=256)],
    cfg(1, 1, BLOCK_N=32),
    key=["M_BUCKET", "N", "R_PAD", "NEED_DZ", "NEED_DB", "IEEE"],
    prune=_prune_dz_dB,
)
@triton.jit
def _lora_bwd_dz_dB_kernel(
    g_ptr, b_ptr, z_ptr, dz_ptr, db_ptr,
    M, N, R, M_BUCKET,
    stride_gm, stride_gn, stride_bn, stride_br, stride_zm, stride_zr,
    stride_dzs, stride_dzm, stride_dbs, stride_dbn,
    scale,
    NEED_DZ: tl.constexpr, NEED_DB: tl.constexpr, R_PAD: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (i, j) takes row tiles i, i + P, ... (P = grid dim 0) and the column chunks
    j, j + S, ... of g (S = grid dim 1). dz partial j (S, M, R) is summed in registers over
    its chunks; dB partial i (P, N, R) is summed over its row tiles in place: only this program
    touches that slice, and a barrier orders one row tile's stores before the next one's loads.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    rs = tl.arange(0, R_PAD)
    r_ok = rs < R
    dbp_base = db_ptr + pid_m.to(tl.int64) * stride_dbs
    for t in range(pid_m, num_m, tl.num_programs(0)):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = rows < M
        if NEED_DB:
            z = tl.load(
                z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr,
                mask=m_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
        dz = tl.zeros((BLOCK_M, R_PAD), tl.float32)
        for n0 in range(pid_s * BLOCK_N, N, tl.num_programs(1) * BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            n_ok = cols < N
            g = tl.load(
                g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn,
                mask=m_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if NEED_DZ:
                # dz = s g B
                b = tl.load(
                    b_ptr + cols[:, None] * stride_bn + rs[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                dz = mma(g, b, dz, IEEE)
            if NEED_DB:
                # dB = s g^T z
                db = mma(tl.trans(g), z, tl.zeros((BLOCK_N, R_PAD), tl.float32), IEEE) * scale
                db_ptrs = dbp_base + cols[:, None] * stride_dbn + rs[None, :]
                db_mask = n_ok[:, None] & r_ok[None, :]
                if t != pid_m:
                    db += tl.load(db_ptrs, mask=db_mask, other=0.0)
                tl.store(db_ptrs, db, mask=db_mask)
        if NEED_DZ:
            dz_ptrs = dz_ptr + pid_s.to(tl.int64) * stride_dzs + rows[:, None] * stride_dzm + rs[None, :]
            tl.store(dz_ptrs, dz * scale, mask=m_ok[:, None] & r_ok[None, :])
        if NEED_DB:
            tl.debug_barrier()


@autotune(
    _DX_GPU,
    _DX_INTERPRET,
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_DROPOUT", "WQ", "QBLOCK", "IEEE", "DTYPE"],
    prune=_prune_dx,
)
@triton.jit(do_not_specialize=_DROPOUT)
def _lora_bwd_dx_kernel(
    g, w, dz, a, dx,
    M, N, K, R, M_BUCKET,
    seed_lo, seed_hi, thresh, keep_scale,
    HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, R_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    WQ: tl.constexpr, QBLOCK: tl.constexpr, NQBLOCK: tl.constexpr, QALIGNED: tl.constexpr, IEEE: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx (M, K) = g (M, N) @ W (N, K) + keep * (dz (M, R) @ A (R, K)) / (1 - p):
    :func:`gemm_rank_tile` over N with the masked tail dz A. Operands as (pointer, stride,
    stride); w = (tensors, stride_n, stride_k), W dense or quantized and dequantized tile by
    tile to g's dtype (as F2). BLOCK_N is the reduction tile here, BLOCK_K the output column tile.
    DTYPE: g's dtype name, for the autotune key only (as F2).
    """
    pid_m, pid_k = grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    m_ok = rows < M
    k_ok = cols < K
    acc, _ = gemm_rank_tile(  # no side product: its operand and accumulator are placeholders
        g, w, dz, a, a, dx,
        rows, cols, m_ok, k_ok, k0, N, K, R, keep_scale, (seed_lo, seed_hi, thresh, keep_scale), 0.0,
        W_T=False, WQ=WQ, QBLOCK=QBLOCK, NQBLOCK=NQBLOCK, QALIGNED=QALIGNED,
        TAIL=True, MASK_TAIL=HAS_DROPOUT, SIDE=False, HAS_DROPOUT=False, ALIGNED=ALIGNED,
        IEEE=IEEE, BLOCK_M=BLOCK_M, BLOCK_OUT=BLOCK_K, BLOCK_RED=BLOCK_N, BLOCK_R=BLOCK_R, R_PAD=R_PAD,
    )  # fmt: skip
    dx_ptrs = dx[0] + rows[:, None] * dx[1] + cols[None, :] * dx[2]
    tl.store(dx_ptrs, acc.to(dx[0].dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


def lora_bwd_dz_dB(
    g: torch.Tensor,
    z: torch.Tensor | None,
    lora_B: torch.Tensor,
    scale: float,
    need_dz: bool,
    row_programs: int | None = None,
    col_splits: int | None = None,
    block_m: int = B1_BLOCK_M,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B1: ``dz = s g B`` (fp32) and ``dB = s g^T z`` (lora_B's dtype) in one read of g.

    g: (M, N), z: (M, r) or None (dB not needed), lora_B: (N, r). Returns (dz: (M, r) fp32,
    dB: (N, r)); an output not asked for is an empty tensor. Tuning knobs (None: heuristic):
    ``row_programs`` (P) and ``col_splits`` (S) shape the grid (P, S) over row tiles of
    ``block_m``; the fp32 partials cost P*N*r (dB) and S*M*r (dz) elements.
    """
    check_dtype(g)
    g, z, lora_B = int32_safe(g), int32_safe(z), int32_safe(lora_B)
    M, N = g.shape
    R = lora_B.shape[1]
    need_dB = z is not None
    empty = g.new_empty((0,))
    if M == 0 or not (need_dz or need_dB):
        dz = g.new_zeros((M, R), dtype=torch.float32) if need_dz else empty
        return dz, (torch.zeros_like(lora_B) if need_dB else empty)
    P, S = _dz_dB_grid(M, N, sm_count(g.device), block_m, row_programs, col_splits)
    dz_part = new_buffer((S, M, R), torch.float32, g.device) if need_dz else empty
    db_part = new_buffer((P, N, R), torch.float32, g.device) if need_dB else empty
    _lora_bwd_dz_dB_kernel[(P, S)](
        g, lora_B, z if need_dB else g, dz_part, db_part,
        M, N, R, m_bucket(M),
        g.stride(0), g.stride(1), lora_B.stride(0), lora_B.stride(1),
        z.stride(0) if need_dB else 0, z.stride(1) if need_dB else 0,
        M * R, R, N * R, R,
        scale,
        NEED_DZ=need_dz, NEED_DB=need_dB, R_PAD=rank_pad(R), BLOCK_M=block_m, **dot_flags(g.dtype),
    )  # fmt: skip
    dz = sum_partials(dz_part, torch.float32) if need_dz else empty
    dB = sum_partials(db_part, lora_B.dtype) if need_dB else empty
    return dz, dB


def _dz_dB_grid(
    M: int, N: int, sms: int, block_m: int, row_programs: int | None = None, col_splits: int | None = None
) -> tuple[int, int]:
    """B1's grid (P row programs, S column splits): about 2 programs an SM, shaped so that the
    fp32 partials, P*N*r (dB) + S*M*r (dz) elements, are smallest: P ~ sqrt(2*SMs * M / N).
    (One row program per SM, as before, made dB's partials 470 MB at M=8192, N=14336, r=64;
    this grid: ~90 MB, against g's 235 MB in bf16.)"""
    num_m = triton.cdiv(M, block_m)
    target = 2 * sms
    if row_programs is None:
        row_programs = round((target * M / max(N, 1)) ** 0.5)
    P = max(1, min(row_programs, num_m))  # every program owns at least one row tile
    S = col_splits or max(1, min(triton.cdiv(target, P), triton.cdiv(N, 64)))
    return P, S


def lora_bwd_dx(
    g: torch.Tensor, dz: torch.Tensor, weight: torch.Tensor | QuantWeight, lora_A: torch.Tensor, p: float, seed: int
) -> torch.Tensor:
    """B2: ``dx = g W + keep * (dz A) / (1 - p)``.

    g: (M, N), dz: (M, r) fp32 from B1, weight: (N, K) tensor or :class:`QuantWeight`,
    lora_A: (r, K) -> dx: (M, K) in g's dtype.
    """
    check_dtype(g)
    g, lora_A = int32_safe(g), int32_safe(lora_A)
    if isinstance(weight, torch.Tensor):
        weight = int32_safe(weight)
    M, N = g.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    r_pad = rank_pad(R)
    dx = new_buffer((M, K), g.dtype, g.device)
    if M == 0:
        return dx
    w_op, w_meta = weight_operands(weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _lora_bwd_dx_kernel[grid](
        operand(g), w_op, operand(dz), operand(lora_A), operand(dx),
        M, N, K, R, m_bucket(M),
        **dropout_args(p, seed), ALIGNED=K % 4 == 0, R_PAD=r_pad, BLOCK_R=min(r_pad, 64),
        **w_meta, **dot_flags(g.dtype), DTYPE=dtype_name(g.dtype),
    )  # fmt: skip
    return dx


def lora_bwd_dA(dz: torch.Tensor, x: torch.Tensor, p: float, seed: int, splits: int | None = None) -> torch.Tensor:
    """B3: ``dA = dz^T dropout(x)``. dz: (M, r) fp32, x: (M, K) -> dA: (r, K) in x's dtype.
    ``splits`` row ranges reduce in parallel into fp32 partials (splits, r, K). The hybrid
    plan's kernel (:func:`lora_dA_tail`) with no dx tail: one kernel for the one job."""
    return lora_dA_tail(dz, x, None, p, seed, None, splits=splits)
