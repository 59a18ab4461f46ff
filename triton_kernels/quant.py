"""Quantized base weights read by the GEMM kernels (DESIGN.md section 5).

:func:`dequant_tile` turns the codes of a tile of W into W's values in registers, computed as
``fastlora.quant``'s ``dequantize()`` computes them: the same fp32 products, rounded once to
the GEMM's operand dtype. F2 and B2 call it for their W tiles (the "fused" route: W is read at
4 or 8 bits and never expanded in memory); :func:`dequantize` writes a whole W into a buffer
(the "scratch" route: one reused buffer, then the dense tensor-core GEMM).

Formats (the ``WQ`` constexpr), W (N, K) flattened row-major, e = n * K + k:

- ``NF4``: uint8 codes, two per byte, the even element in the high nibble;
  ``W[n, k] = code[nibble(e)] * absmax[e // BLOCKSIZE]``.
- ``NF4_DQ``: NF4 with a double-quantized absmax (uint8):
  ``absmax[b] = nested_code[q[b]] * nested_absmax[b // NESTED_BLOCKSIZE] + offset``.
- ``INT8``: row-wise ``CB`` int8 (N, K), any strides; ``W[n, k] = (CB[n, k] * SCB[n]) * c`` with
  c = 1/127 as bitsandbytes writes it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import add_rounded, autotune, cfg, round_to

DENSE, NF4, NF4_DQ, INT8 = 0, 1, 2, 3
# jit code reads module globals only as constexprs
_NF4_DQ, _INT8 = tl.constexpr(NF4_DQ), tl.constexpr(INT8)
_INT8_SCALE = tl.constexpr(7.874015718698502e-3)  # bitsandbytes' 1/127, applied in fp32


class QuantWeight(NamedTuple):
    """A quantized (N, K) base weight as the kernels read it (no dequantized copy).

    kind: NF4, NF4_DQ or INT8. data: NF4 packed uint8 codes (ceil(NK / 2) elements, any shape)
    or INT8 ``CB`` (N, K). scale: NF4 per-block absmax, fp32 (or uint8 with NF4_DQ),
    (ceil(NK / blocksize),); INT8 ``SCB`` fp32 (N,). code: NF4 fp32 (16,). NF4_DQ also has
    nested_absmax fp32 (ceil(blocks / nested_blocksize),), nested_code fp32 (256,) and offset
    (a 0-d fp32 tensor).
    """

    kind: int
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor
    code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize: int = 64
    nested_blocksize: int = 256

    @property
    def device(self) -> torch.device:
        return self.data.device

    def flat(self) -> tuple[list[torch.Tensor | None], list[int]]:
        """(tensors, ints): the fields as op arguments (``torch.library`` takes no tuples)."""
        tensors = [self.data, self.scale, self.code, self.nested_absmax, self.nested_code, self.offset]
        return tensors, [self.kind, *self.shape, self.blocksize, self.nested_blocksize]

    @classmethod
    def from_flat(cls, tensors: list[torch.Tensor | None], ints: list[int]) -> QuantWeight:
        kind, N, K, blocksize, nested_blocksize = ints
        return cls(kind, (N, K), *tensors, blocksize=blocksize, nested_blocksize=nested_blocksize)


def weight_operands(weight: torch.Tensor | QuantWeight) -> tuple[tuple, dict]:
    """W as F2 / B2 / the dequantize kernels take it: ``(tensors, stride_n, stride_k)`` and the
    constexprs. ``tensors`` holds the format's own tensors only: (W,) dense; (CB, SCB) int8;
    (codes, absmax, code) NF4; and (nested_absmax, nested_code, offset) after those with double
    quantization. stride_n / stride_k are W's, CB's, or (K, 1) for NF4's flat codes."""
    if isinstance(weight, torch.Tensor):
        meta = {"WQ": DENSE, "QBLOCK": 1, "NQBLOCK": 1, "QALIGNED": True}
        return ((weight,), weight.stride(0), weight.stride(1)), meta
    if weight.kind not in (NF4, NF4_DQ, INT8):
        raise ValueError(f"unknown quantized weight kind {weight.kind}")
    count = {INT8: 2, NF4: 3, NF4_DQ: 6}[weight.kind]
    tensors = tuple(weight.flat()[0][:count])
    if any(t is None for t in tensors):
        raise ValueError(f"quantized weight of kind {weight.kind} is missing one of its {count} tensors")
    strides = (weight.data.stride(0), weight.data.stride(1)) if weight.kind == INT8 else (weight.shape[1], 1)
    meta = {
        "WQ": weight.kind,
        "QBLOCK": weight.blocksize,
        "NQBLOCK": weight.nested_blocksize,
        "QALIGNED": weight.shape[1] % weight.blocksize == 0,
    }
    return (tensors, *strides), meta


@triton.jit
def _pick2(code_ptr, i: tl.constexpr, b0):
    return tl.where(b0, tl.load(code_ptr + i + 1), tl.load(code_ptr + i))


@triton.jit
def _pick4(code_ptr, i: tl.constexpr, b0, b1):
    return tl.where(b1, _pick2(code_ptr, i + 2, b0), _pick2(code_ptr, i, b0))


@triton.jit
def _pick8(code_ptr, i: tl.constexpr, b0, b1, b2):
    return tl.where(b2, _pick4(code_ptr, i + 4, b0, b1), _pick4(code_ptr, i, b0, b1))


@triton.jit
def _nf4_value(code_ptr, nibble):
    """code[nibble] by a select tree over the nibble's four bits on the table's 16 scalars: a
    per-element gather would be a tile-sized fp32 load, which the compiled pipeline stages
    through shared memory once per stage (over the sm_90 limit at every small-M tile)."""
    b0 = (nibble & 1) != 0
    b1 = (nibble & 2) != 0
    b2 = (nibble & 4) != 0
    return tl.where((nibble & 8) != 0, _pick8(code_ptr, 8, b0, b1, b2), _pick8(code_ptr, 0, b0, b1, b2))


@triton.jit
def _block_absmax(q, block, ok, WQ: tl.constexpr, NQBLOCK: tl.constexpr):
    """fp32 absmax of the NF4 blocks ``block`` (any shape), 0 where not ``ok``; q: the format's
    tensors (:func:`weight_operands`)."""
    if WQ == _NF4_DQ:
        quantized = tl.load(q[1] + block, mask=ok, other=0).to(tl.int32)
        absmax = tl.load(q[4] + quantized, mask=ok, other=0.0)
        absmax = absmax * tl.load(q[3] + block // NQBLOCK, mask=ok, other=0.0)
        absmax = add_rounded(absmax, tl.load(q[5]))
    else:
        absmax = tl.load(q[1] + block, mask=ok, other=0.0)
    return absmax  # one return: compiled triton types every return, taken or not


@triton.jit
def dequant_tile(
    q, n, k, n_ok, k_ok, K, k0, stride_wn, stride_wk,
    WQ: tl.constexpr, QBLOCK: tl.constexpr, NQBLOCK: tl.constexpr, QALIGNED: tl.constexpr,
    KSPAN: tl.constexpr,
):  # fmt: skip
    """fp32 W[n, k] of a quantized weight, 0 outside ``n_ok & k_ok``. q: the format's tensors
    (:func:`weight_operands`). n, k: integer index tensors that broadcast to the tile (e.g.
    ``cols[None, :]`` and ``ks[:, None]``); n_ok and k_ok: their bounds, shaped like them. The
    tile's k are k0 + [0, KSPAN), k0 a multiple of KSPAN (a power of two).

    NF4 statistics are loaded per (row, block), not per element: row n's k range touches the
    blocks ``first .. last`` of its flat index range, at most ``SPAN`` of them (one when
    QALIGNED, i.e. K % QBLOCK == 0, and KSPAN <= QBLOCK), and each element picks its own.
    """
    n = n.to(tl.int64)
    mask = n_ok & k_ok
    if WQ == _INT8:
        cb = tl.load(q[0] + n * stride_wn + k * stride_wk, mask=mask, other=0)
        scb = tl.load(q[1] + n, mask=n_ok, other=0.0)
        w = (cb.to(tl.float32) * scb) * _INT8_SCALE
    else:
        e = n * K + k
        byte = tl.load(q[0] + (e >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> (((e & 1) ^ 1) * 4).to(tl.int32)) & 0xF
        first = (n * K + k0) // QBLOCK
        if QALIGNED and KSPAN <= QBLOCK:
            absmax = _block_absmax(q, first, n_ok, WQ, NQBLOCK)
        else:
            SPAN: tl.constexpr = KSPAN // QBLOCK if QALIGNED else (KSPAN - 1) // QBLOCK + 2
            last = (n * K + tl.minimum(k0 + KSPAN, K) - 1) // QBLOCK
            block = e // QBLOCK
            absmax = tl.zeros(block.shape, tl.float32)
            for j in tl.static_range(SPAN):
                a = _block_absmax(q, first + j, n_ok & (first + j <= last), WQ, NQBLOCK)
                absmax = tl.where(block == first + j, a, absmax)
        w = tl.where(mask, _nf4_value(q[2], nibble) * absmax, 0.0)
    return w


@autotune(
    [cfg(4, 1, BLOCK_N=16, BLOCK_K=256), cfg(4, 1, BLOCK_N=32, BLOCK_K=256), cfg(8, 1, BLOCK_N=64, BLOCK_K=256)],
    cfg(1, 1, BLOCK_N=16, BLOCK_K=32),
    key=["N", "K", "WQ", "QBLOCK"],
)
@triton.jit
def _dequantize_kernel(
    w, out_ptr, N, K, stride_on, stride_ok,
    WQ: tl.constexpr, QBLOCK: tl.constexpr, NQBLOCK: tl.constexpr, QALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out (N, K) = W in out's dtype, one (BLOCK_N, BLOCK_K) tile per program; w = (tensors,
    stride_n, stride_k) (:func:`weight_operands`)."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    n_ok = (n < N)[:, None]
    k_ok = (k < K)[None, :]
    wt = dequant_tile(
        w[0], n[:, None], k[None, :], n_ok, k_ok, K, k0, w[1], w[2], WQ, QBLOCK, NQBLOCK, QALIGNED, BLOCK_K,
    )  # fmt: skip
    out_ptrs = out_ptr + n[:, None] * stride_on + k[None, :] * stride_ok
    tl.store(out_ptrs, round_to(wt, out_ptr.dtype.element_ty), mask=n_ok & k_ok)


# WQ in the key: a double-quantized absmax is a gather more per block (the statistics are
# tuple elements, whose dtypes triton's key does not see)
@autotune(
    [cfg(4, 1, ELEMS=2048), cfg(8, 1, ELEMS=4096), cfg(8, 1, ELEMS=8192)], cfg(1, 1, ELEMS=256), key=["QBLOCK", "WQ"]
)
@triton.jit
def _dequantize_nf4_flat_kernel(
    q, out_ptr, NUMEL,
    WQ: tl.constexpr, QBLOCK: tl.constexpr, NQBLOCK: tl.constexpr, ELEMS: tl.constexpr,
):  # fmt: skip
    """A contiguous out (N*K elements) from NF4 codes, the flat layout bitsandbytes uses: a
    program takes ELEMS / QBLOCK whole quantization blocks as the rows of a (blocks, QBLOCK)
    tile, so each element's absmax is its row's (one load a block) and the bytes and the output
    are read and written in order. The scratch route's dequantization at training M, where it
    must run near copy bandwidth (the 2-D kernel moved ~0.7 TB/s on an H200)."""
    NB: tl.constexpr = ELEMS // QBLOCK if ELEMS >= QBLOCK else 1
    HALF: tl.constexpr = QBLOCK // 2
    blocks = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    b_ok = blocks * QBLOCK < NUMEL
    absmax = _block_absmax(q, blocks, b_ok, WQ, NQBLOCK)
    # byte j of a block holds its elements 2j (high nibble) and 2j + 1 (low nibble)
    first = blocks[:, None] * QBLOCK + 2 * tl.arange(0, HALF)[None, :]
    byte = tl.load(q[0] + (first >> 1), mask=first < NUMEL, other=0).to(tl.int32)
    hi = tl.load(q[2] + (byte >> 4)) * absmax[:, None]
    lo = tl.load(q[2] + (byte & 0xF)) * absmax[:, None]
    w = tl.interleave(hi, lo)  # (NB, QBLOCK): element order within each block
    e = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    tl.store(out_ptr + e, round_to(w, out_ptr.dtype.element_ty), mask=e < NUMEL)


def dequantize(weight: QuantWeight, out: torch.Tensor) -> torch.Tensor:
    """Write W (N, K) into ``out`` ((N, K), fp32/fp16/bf16, any strides) and return it: the
    scratch route's dequantization, the same values as ``fastlora.quant``'s ``dequantize()``."""
    N, K = weight.shape
    if tuple(out.shape) != (N, K):
        raise ValueError(f"out shape {tuple(out.shape)} != weight shape {(N, K)}")
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out must be float32, float16 or bfloat16, got {out.dtype}")
    w, meta = weight_operands(weight)
    if weight.kind in (NF4, NF4_DQ) and out.is_contiguous() and weight.blocksize & (weight.blocksize - 1) == 0:
        numel = N * K
        grid = lambda m: (triton.cdiv(numel, max(m["ELEMS"], weight.blocksize)),)
        _dequantize_nf4_flat_kernel[grid](
            w[0], out, numel, WQ=meta["WQ"], QBLOCK=meta["QBLOCK"], NQBLOCK=meta["NQBLOCK"]
        )
        return out
    grid = lambda m: (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(K, m["BLOCK_K"]))
    _dequantize_kernel[grid](w, out, N, K, out.stride(0), out.stride(1), **meta)
    return out
