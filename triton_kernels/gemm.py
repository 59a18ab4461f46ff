"""The GEMM with a rank-r tail: the one building block of F2 and B2, and the tuning space they share.

F2 (``y = x W^T + s z B^T + bias``) and B2 (``dx = g W + keep * (dz A) / (1 - p)``) are the same
tile computation with the roles named differently::

    out[rows, outs] = a[rows, :] @ Wv[:, outs]  +  tail_scale * (L[rows, :] @ T[:, outs])   (masked)
                      the GEMM over RED           the rank-r tail

    F2: a = x (M, K), Wv = W^T, RED = K, OUT = N; tail L = z, T = B^T, scaled by s.
    B2: a = g (M, N), Wv = W,   RED = N, OUT = K; tail L = dz, T = A, scaled by 1 / (1 - p) and
        masked by the dropout keep-mask of (rows, outs).

:func:`gemm_rank_tile` is that tile; F2 and B2 are the launch grid, the bias, F2's fused shrink
and the store around it. Operands are passed as tuples: ``(pointer, stride_0, stride_1)`` for a
2-D tensor, ``(tensors, stride_n, stride_k)`` for W, whose ``tensors`` are the format's own (one
for a dense W, the codes and statistics of a quantized one: triton_kernels/quant.py).
"""

import triton
import triton.language as tl

from .common import cfg, max_shared_memory, mma, round_to
from .philox import keep_tile
from .quant import DENSE, dequant_tile

_DENSE = tl.constexpr(DENSE)


def prune_m(configs_, named_args, **_):
    """Tiles much taller than the batch only waste MMA work: keep BLOCK_M <= max(M, 32)."""
    kept = [c for c in configs_ if c.kwargs["BLOCK_M"] <= max(named_args["M_BUCKET"], 32)]
    return kept or configs_[:1]


def prune_gemm(configs_, named_args, out_block="BLOCK_N", red_block="BLOCK_K", a_arg="x", **kwargs):
    """The autotune space of F2 and B2 (``out_block`` / ``red_block``: which tile is the output's
    column and which the reduction's; ``a_arg``: the row operand, x or g) for one call:

    - :func:`prune_m`;
    - IEEE fp32 (no tensor cores: the dot is FMA loops holding their operands in registers):
      only output tiles whose accumulator takes at most 64 fp32 registers a thread, at most 3
      stages, and 1 (no software pipelining) when W is dequantized in registers. Compiled for
      sm_90 (tests/sm90_aot.py) larger tiles spill kilobytes, and pipelined quantized tiles all
      get 32 registers and 4-14 KB of local memory a thread (most are clean unpipelined);
    - tiles whose pipelined operands fit the device's shared memory (:func:`_shared_bytes`):
      128x256 fp32 tiles in TF32 need 288 KiB, and a config over the limit only fails to launch.
    One config is always left (the smallest), so a launch always has one."""
    kept = prune_m(configs_, named_args)
    if kwargs.get("IEEE"):
        small = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs[out_block] <= 64 * 32 * c.num_warps] or kept[-1:]
        stages = 3 if kwargs.get("WQ", DENSE) == DENSE else 1
        kept = [cfg(c.num_warps, min(c.num_stages, stages), **c.kwargs) for c in small]
    limit = max_shared_memory()
    if limit is not None:
        item = named_args[a_arg][0].element_size()
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
# decode-sized M (the pruning keeps BLOCK_M <= max(M, 32)). F2's names: BLOCK_N is the output
# column tile, BLOCK_K the reduction's; B2 swaps the two (:func:`swap_nk`).
GEMM_GPU = [
    cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8),
]
GEMM_INTERPRET = cfg(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def swap_nk(c: triton.Config) -> triton.Config:
    """``c`` with BLOCK_N and BLOCK_K exchanged: B2 reduces over N and tiles K, so its pipelined
    operand tiles stay the size of F2's."""
    return cfg(
        c.num_warps, c.num_stages, **{**c.kwargs, "BLOCK_N": c.kwargs["BLOCK_K"], "BLOCK_K": c.kwargs["BLOCK_N"]}
    )


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


@triton.jit
def rank_tile(left, right, rows, outs, m_ok, o_ok, R, acc, IEEE: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + L[rows, :] @ T[:, outs]`` over the rank in chunks of BLOCK_R; ``left`` = (L, stride
    over rows, stride over r), ``right`` = (T, stride over r, stride over outs). L is cast to T's
    dtype (B2's dz is fp32, A is the operand dtype)."""
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + rr < R
        lt = tl.load(
            left[0] + rows[:, None] * left[1] + (r0 + rr)[None, :] * left[2],
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        rt = tl.load(
            right[0] + outs[None, :] * right[2] + (r0 + rr)[:, None] * right[1],
            mask=r_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        acc = mma(lt.to(rt.dtype), rt, acc, IEEE)
    return acc


@triton.jit
def _add_tail(parked, left, right, rows, outs, m_ok, o_ok, out0, K, R, tail_scale, drop,
              MASK_TAIL: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_OUT: tl.constexpr):  # fmt: skip
    """``tail_scale * (L @ T)``, zero where dropped (MASK_TAIL: B2's keep-mask of the (rows,
    outs) elements of the (M, K) input), added to the tile :func:`park` left in ``parked`` (the
    output operand) unless that is None. The parked tile is read back only after the tail is
    formed, so the two are never in registers together. Unmasked onto the parked sum it is one
    FMA an element, one rounding (what the compiler made of ``acc += tail * scale`` before the
    sum was parked)."""
    t = rank_tile(left, right, rows, outs, m_ok, o_ok, R, tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32), IEEE, BLOCK_R)
    if MASK_TAIL:
        t = tl.where(keep_tile(rows, out0, K, drop[0], drop[1], drop[2], BLOCK_OUT, ALIGNED), t * tail_scale, 0.0)
        if parked is not None:
            t = unpark(parked, rows, outs, m_ok[:, None] & o_ok[None, :]) + t
    elif parked is not None:
        t = tl.fma(t, tail_scale, unpark(parked, rows, outs, m_ok[:, None] & o_ok[None, :]))
    else:
        t = t * tail_scale
    return t


@triton.jit
def park(out, rows, outs, ok, acc):
    """Store the fp32 ``acc`` in the output tile and fence the block, so that the caller's next
    accumulator does not sit beside it in registers; :func:`unpark` reads it back. IEEE fp32
    only, where the output is fp32 (exact). Compiled for sm_90, a 64x128 F2 tile holding both
    accumulators spilled 320 bytes a thread and B2's 1.4 KB; parked, neither spills."""
    tl.static_assert(out[0].dtype.element_ty == tl.float32)
    tl.store(out[0] + rows[:, None] * out[1] + outs[None, :] * out[2], acc, mask=ok)
    tl.debug_barrier()


@triton.jit
def unpark(out, rows, outs, ok):
    return tl.load(out[0] + rows[:, None] * out[1] + outs[None, :] * out[2], mask=ok, other=0.0)


@triton.jit
def gemm_rank_tile(
    a, w, left, right, side, out,
    rows, outs, m_ok, o_ok, out0, RED, K, R, tail_scale, drop, side_acc,
    W_T: tl.constexpr, WQ: tl.constexpr, QBLOCK: tl.constexpr, NQBLOCK: tl.constexpr, QALIGNED: tl.constexpr,
    TAIL: tl.constexpr, MASK_TAIL: tl.constexpr, SIDE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    R_PAD: tl.constexpr,
):  # fmt: skip
    """(out tile in fp32, side_acc): the GEMM ``a[rows] @ Wv[:, outs]`` over RED in BLOCK_RED
    steps, plus (TAIL) the rank-r tail :func:`_add_tail`.

    a: (pointer, stride over rows, stride over RED). w: (tensors, stride_n, stride_k) of W (N, K);
    W_T: Wv = W^T (F2: RED is W's K, outs its N), else Wv = W (B2: RED is N, outs are K columns
    starting at out0). WQ: W dense, or quantized and dequantized tile by tile in registers to a's
    dtype, rounded once. K: W's column count (the dequantization's flat index, the keep-mask's
    row length). drop: (seed_lo, seed_hi, thresh, keep_scale).

    Order of the sums: with 16-bit or TF32 operands the tail is computed first and the GEMM
    accumulates on top, one fp32 accumulator (the extra fp32 roundings vanish in the output's
    own). IEEE fp32 sums the GEMM from zero and adds the tail once at the end, as torch orders
    it: started from the tail, every FMA of the loop would round at the output's scale, which
    compiled on an H100 was 3-6x torch's error (issue 16). The GEMM's sum waits in the output
    tile ``out`` = (pointer, stride over rows, stride over outs) while the tail is formed
    (:func:`park`).

    SIDE (F2's fused shrink): ``side_acc += keep(a tile) @ S^T`` from the same a tiles, side =
    (S (R, RED), stride over r, stride over RED), keep the dropout mask of the a elements when
    HAS_DROPOUT; returned unscaled. Without SIDE side_acc comes back untouched.
    """
    if TAIL and not IEEE:
        acc = _add_tail(None, left, right, rows, outs, m_ok, o_ok, out0, K, R, tail_scale, drop,
                        MASK_TAIL, ALIGNED, IEEE, BLOCK_M, BLOCK_R, BLOCK_OUT)  # fmt: skip
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)

    reds = tl.arange(0, BLOCK_RED)
    a_ptrs = a[0] + rows[:, None] * a[1] + reds[None, :] * a[2]
    if W_T:  # the W^T tile (BLOCK_RED, BLOCK_OUT): k down, n across
        w_ptrs = w[0][0] + outs[None, :] * w[1] + reds[:, None] * w[2]
        w_step = BLOCK_RED * w[2]
    else:  # the W tile: n down, k across
        w_ptrs = w[0][0] + reds[:, None] * w[1] + outs[None, :] * w[2]
        w_step = BLOCK_RED * w[1]
    if SIDE:
        rs = tl.arange(0, R_PAD)
        s_ptrs = side[0] + rs[None, :] * side[1] + reds[:, None] * side[2]  # S^T tile (BLOCK_RED, R_PAD)
    for red0 in range(0, RED, BLOCK_RED):
        red_ok = red0 + reds < RED
        at = tl.load(a_ptrs, mask=m_ok[:, None] & red_ok[None, :], other=0.0)
        if WQ == _DENSE:
            wt = tl.load(w_ptrs, mask=red_ok[:, None] & o_ok[None, :], other=0.0)
        elif W_T:
            wt = dequant_tile(
                w[0], outs[None, :], (red0 + reds)[:, None], o_ok[None, :], red_ok[:, None], K, red0, w[1], w[2],
                WQ, QBLOCK, NQBLOCK, QALIGNED, BLOCK_RED,
            )  # fmt: skip
            wt = round_to(wt, a[0].dtype.element_ty)
        else:
            wt = dequant_tile(
                w[0], (red0 + reds)[:, None], outs[None, :], red_ok[:, None], o_ok[None, :], K, out0, w[1], w[2],
                WQ, QBLOCK, NQBLOCK, QALIGNED, BLOCK_OUT,
            )  # fmt: skip
            wt = round_to(wt, a[0].dtype.element_ty)
        acc = mma(at, wt, acc, IEEE)
        if SIDE:
            if HAS_DROPOUT:
                at = tl.where(keep_tile(rows, red0, K, drop[0], drop[1], drop[2], BLOCK_RED, ALIGNED), at, 0.0)
            st = tl.load(s_ptrs, mask=red_ok[:, None] & (rs[None, :] < R), other=0.0)
            side_acc = mma(at, st, side_acc, IEEE)
            s_ptrs += BLOCK_RED * side[2]
        a_ptrs += BLOCK_RED * a[2]
        w_ptrs += w_step

    if TAIL and IEEE:
        park(out, rows, outs, m_ok[:, None] & o_ok[None, :], acc)
        acc = _add_tail(out, left, right, rows, outs, m_ok, o_ok, out0, K, R, tail_scale, drop,
                        MASK_TAIL, ALIGNED, IEEE, BLOCK_M, BLOCK_R, BLOCK_OUT)  # fmt: skip
    return acc, side_acc
