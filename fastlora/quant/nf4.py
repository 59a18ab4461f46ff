"""NF4 base weights, bit-compatible with bitsandbytes (CPU backend), in plain PyTorch.

Layout (bitsandbytes ``quantize_4bit(..., quant_type="nf4")``): W (N, K) is flattened row-major
and cut into blocks of ``blocksize`` consecutive elements (the last one may be partial). Each
block keeps its fp32 absmax; each element becomes the index of the nearest NF4 code of
``w / absmax`` (ties go to the lower code); two indices share a byte, the first in the high
nibble, and an odd element count is padded with code 7 (0.0).

Double quant (``compress_statistics=True``): ``offset = mean(absmax)``, and ``absmax - offset`` is
quantized in blocks of 256 with bitsandbytes' signed 8-bit dynamic map. bitsandbytes' CPU kernel
does that through a 65536-entry lookup table over [-1, 1], not an exact nearest search, so it
is reproduced here table and all. (Matched against bitsandbytes' CPU backend; the same code runs
on any device, but bitsandbytes' CUDA kernels have their own rounding paths.)

The hot loops are the tensor-in/tensor-out functions ``quantize_nf4``, ``dequantize_nf4`` and
``dequantize_blockwise_8bit``: where ``fastlora._C`` has a kernel for the device they run as its
ops (csrc/quant_cpu.cpp, csrc/cuda/), with the same bytes; see ``fastlora.quant._ops``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ops

# Index = nibble. bitsandbytes.functional.get_4bit_type("nf4"); also DESIGN.md section 5.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what quantize_4bit accepts
NESTED_BLOCKSIZE = 256
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _FLOAT_DTYPES.items()}
_LUT_SIZE = 65536
_OP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # what the C++ ops take


@functools.cache
def _nf4_code(device: torch.device) -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def _nf4_midpoints() -> tuple[float, ...]:
    """The 15 fp32 midpoints (as exact Python floats) bnb's bucketize compares against."""
    code = _nf4_code(torch.device("cpu"))
    return tuple(((code[:-1] + code[1:]) / 2).tolist())


@functools.cache
def _nf4_byte_table(device: torch.device) -> Tensor:
    """int64 (256,): byte -> its two fp32 codes (high nibble first) in one 8-byte word, so
    dequantizing is a single gather per byte."""
    b = torch.arange(256, device=device)
    pairs = _nf4_code(device)[torch.stack([b >> 4, b & 15], dim=1)]
    return pairs.contiguous().view(torch.int64).view(256)


def _chunk(device: torch.device, blocksize: int) -> int:
    # Whole blocks per step, so temporaries stay ~1 MiB (cache-resident) on the CPU and bounded
    # (~64 MiB) on accelerators, where fewer, larger launches are what matters.
    elems = 1 << 18 if device.type == "cpu" else 1 << 24
    return max(1, elems // blocksize) * blocksize


def _nf4_index(scaled: Tensor) -> Tensor:
    """uint8 NF4 index of values in [-1, 1]: the number of midpoints strictly below each value,
    i.e. ``bucketize(scaled, midpoints)`` (ties go to the lower code), but 15 vectorised
    compares are several times faster than bucketize's binary search on the CPU."""
    mids = _nf4_midpoints()
    q = (scaled > mids[0]).to(torch.uint8)
    for m in mids[1:]:
        q += scaled > m
    return q


def _pack(codes: Tensor) -> Tensor:
    return (codes[0::2] << 4) | codes[1::2]


@functools.cache
def dynamic_map_signed() -> Tensor:
    """bitsandbytes ``create_dynamic_map(signed=True)`` (256 sorted fp32 codes in [-1, 1]).

    Same torch ops in the same order, so the values are bit-identical without bitsandbytes.
    """
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        bounds = torch.linspace(0.1, 1, 2 ** (i + non_sign - max_exp) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exp - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")


@torch.no_grad()
def quantize_nf4(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Blockwise NF4 codes of ``weight`` (any shape, fp32/fp16/bf16), flattened row-major.

    Returns ``packed``: uint8 ``(ceil(n / 2), 1)`` (bitsandbytes' layout) and ``absmax``: fp32
    ``(ceil(n / blocksize),)``. Mirrors bitsandbytes' CPU ``quantize_4bit`` op by op: full blocks
    scale by ``x * (1 / max(absmax, 1e-38))``, the partial tail block by ``x / max(absmax,
    1e-38)`` and stores that clamped absmax; an odd count is padded with code 7.
    """
    _check_blocksize(blocksize)
    if weight.dtype in _OP_DTYPES and (op := _ops.op("quantize_nf4", weight.device)) is not None:
        return op(weight, blocksize)
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    step = _chunk(flat.device, blocksize)
    for s in range(0, full, step):
        e = min(s + step, full)
        blk = flat[s:e].float().view(-1, blocksize)
        am = blk.abs().amax(dim=1)
        absmax[s // blocksize : e // blocksize] = am
        scaled = (blk * (1.0 / am.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
        packed[s // 2 : e // 2] = _pack(_nf4_index(scaled.view(-1)))
    if full < n:
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        codes = _nf4_index(torch.clamp(tail / am, -1, 1))
        if n % 2:  # bnb pads the scaled values with 0.0, i.e. code 7
            codes = torch.cat([codes, codes.new_full((1,), 7)])
        packed[full // 2 :] = _pack(codes)
    return packed.unsqueeze(1), absmax


def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    shape: Sequence[int],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Inverse of :func:`quantize_nf4`: ``code[nibble] * absmax[block]`` in fp32, then cast.

    packed: uint8 with ``ceil(n / 2)`` elements; absmax: fp32 ``(ceil(n / blocksize),)``;
    returns ``shape`` in ``dtype`` (round to nearest even, like bitsandbytes' CPU kernel).
    ``out``: a contiguous ``shape`` tensor of ``dtype`` to write into and return instead (one
    scratch buffer reused across calls saves the allocation, which costs as much as the work).
    """
    n = math.prod(shape)
    if out is not None:
        _check_out(out, shape, dtype, packed.device)
        if dtype in _OP_DTYPES and (op := _ops.op("dequantize_nf4_out", packed.device)) is not None:
            op(packed, absmax, out, blocksize)
            return out
    elif dtype in _OP_DTYPES and (op := _ops.op("dequantize_nf4", packed.device)) is not None:
        return op(packed, absmax, list(shape), blocksize, dtype)
    codes = packed.reshape(-1)
    table = _nf4_byte_table(codes.device)
    result = out
    out = torch.empty(n, dtype=dtype, device=codes.device) if out is None else out.view(-1)
    full = n - n % blocksize
    step = _chunk(codes.device, blocksize)
    for s in range(0, full, step):
        e = min(s + step, full)
        vals = torch.index_select(table, 0, codes[s // 2 : e // 2].int()).view(torch.float32)
        vals.view(-1, blocksize).mul_(absmax[s // blocksize : e // blocksize].unsqueeze(1))
        out[s:e] = vals
    if full < n:
        vals = torch.index_select(table, 0, codes[full // 2 :].int()).view(torch.float32)
        out[full:] = vals[: n - full] * absmax[-1]
    return out.view(tuple(shape)) if result is None else result


def _check_out(out: Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {dtype}")
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"out must be a contiguous {tuple(shape)} tensor on {device}, got shape {tuple(out.shape)} on "
            f"{out.device}{'' if out.is_contiguous() else ' (non-contiguous)'}"
        )


@functools.cache
def _lut_8bit(code_key: tuple[float, ...]) -> Tensor:
    """bitsandbytes' CPU quantize lookup table: 65536 bins over [-1, 1] -> nearest code index.

    Bin i stands for ``-1 + 2i / 65535`` (fp32) and maps to the number of code midpoints
    strictly below it. Built on the CPU in fp32 exactly as the C++ does.
    """
    code = torch.tensor(code_key, dtype=torch.float32)
    mid = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    val = (2.0 * i) / torch.tensor(_LUT_SIZE - 1.0) + -1.0  # tensor divisor: true division
    return torch.searchsorted(mid, val, right=False).to(torch.uint8)


def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """bitsandbytes ``quantize_blockwise`` (CPU kernel) of a 1-D fp32 ``x`` with a 256-entry code.

    Returns uint8 indices ``(n,)`` and fp32 absmax ``(ceil(n / blocksize),)``. Element v of a
    block becomes ``lut[int((clamp(v * (1 / absmax), -1, 1) + 1) * 0.5 * 65535 + 0.5)]``; an
    all-zero block gets index 0 (as the C++ does).
    """
    x = x.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    lut = _lut_8bit(tuple(code.tolist())).to(x.device)
    blk = torch.zeros(nblocks * blocksize, dtype=torch.float32, device=x.device)
    blk[:n] = x
    blk = blk.view(nblocks, blocksize)
    absmax = blk.abs().amax(dim=1)
    zero = absmax == 0
    inv = torch.where(zero, 0.0, torch.reciprocal(absmax))
    v = blk * inv.unsqueeze(1)
    tiny = torch.isinf(inv)
    if bool(tiny.any()):
        # a subnormal absmax has no finite reciprocal (bnb's C++ then multiplies by inf: 0 * inf is
        # NaN, an undefined index): divide those blocks instead. Normal inputs never get here.
        v = torch.where(tiny.unsqueeze(1), blk / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1), v)
    v = v.clamp_(-1, 1)
    idx = (((v + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int32)  # C++ order, truncation
    q = lut[idx.long()].masked_fill_(zero.unsqueeze(1), 0)
    return q.view(-1)[:n], absmax


def dequantize_blockwise_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> Tensor:
    """``code[q] * absmax[i // blocksize]`` in fp32; q: uint8 ``(n,)`` -> fp32 ``(n,)``."""
    if (op := _ops.op("dequantize_blockwise_8bit", q.device)) is not None:
        return op(q, absmax, code, blocksize)
    vals = code[q.reshape(-1).long()]
    n = vals.numel()
    full = n - n % blocksize
    if full:
        vals[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
    if full < n:
        vals[full:].mul_(absmax[-1])
    return vals


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _DTYPE_NAMES:
        raise TypeError(
            f"weight must be float32, float16 or bfloat16, got {weight.dtype} (shape {tuple(weight.shape)})"
        )
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D (N, K) tensor, got shape {tuple(weight.shape)}")


def _check_finite(stats: Tensor, weight: Tensor) -> None:
    # NaN/Inf propagate into the max-abs statistics, so checking them avoids a pass over W.
    if not bool(torch.isfinite(stats).all()):
        raise ValueError(f"weight (shape {tuple(weight.shape)}) has NaN or Inf entries")


# Loaded statistics may exceed the largest value of the weight's dtype by this factor (double
# quant's reconstruction rounds); beyond it they cannot come from a weight of that dtype.
_STATS_MARGIN = 1.01


def check_stats(stats: Tensor, dtype: torch.dtype, name: str, nonnegative: bool = True) -> None:
    """Loaded absmax-like statistics must be finite, within ``dtype``'s range (a weight of that
    dtype has no larger magnitude; larger ones overflow every output) and, where they are a max of
    magnitudes, >= 0. Raises ValueError (a corrupt or hostile file)."""
    s = stats.detach().float()
    if s.numel() == 0:
        return
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name}: NaN or Inf statistics (corrupt state dict)")
    limit = torch.finfo(dtype).max * _STATS_MARGIN
    if float(s.abs().max()) > limit:
        raise ValueError(
            f"{name}: statistics up to {float(s.abs().max()):.3g} exceed what a {dtype} weight can hold "
            f"({torch.finfo(dtype).max:.3g}; corrupt state dict)"
        )
    if nonnegative and float(s.min()) < 0:
        raise ValueError(f"{name}: negative absmax {float(s.min()):.3g} (corrupt state dict)")
