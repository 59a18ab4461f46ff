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
import json
import math
from collections.abc import Mapping, Sequence

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


class NF4Weight:
    """A frozen (N, K) weight stored as NF4, laid out exactly like a bitsandbytes ``Params4bit``.

    Tensors held: ``packed`` uint8 ``(ceil(NK / 2), 1)``; ``absmax`` fp32 ``(B,)`` with
    ``B = ceil(NK / blocksize)``, or uint8 ``(B,)`` with double quant, which adds ``offset``
    (fp32 scalar), ``nested_absmax`` fp32 ``(ceil(B / 256),)`` and ``nested_code`` fp32 (256,);
    ``code`` fp32 (16,) is the NF4 table. No dequantized copy is ever kept.
    """

    def __init__(
        self,
        packed: Tensor,
        absmax: Tensor,
        shape: Sequence[int],
        dtype: torch.dtype,
        blocksize: int = 64,
        *,
        code: Tensor | None = None,
        offset: Tensor | None = None,
        nested_absmax: Tensor | None = None,
        nested_code: Tensor | None = None,
        nested_blocksize: int = NESTED_BLOCKSIZE,
    ) -> None:
        self.packed = packed
        self.absmax = absmax
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.code = _nf4_code(packed.device) if code is None else code
        self.offset = offset
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_blocksize = nested_blocksize

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
        """weight: (N, K) fp32/fp16/bf16 -> NF4Weight (bitsandbytes ``quantize_4bit`` on CPU)."""
        _check_weight(weight)
        _check_blocksize(blocksize)
        packed, absmax = quantize_nf4(weight, blocksize)
        _check_finite(absmax, weight)
        if not double_quant:
            return cls(packed, absmax, weight.shape, weight.dtype, blocksize)
        offset = absmax.mean()  # same reduction as bnb, so the same fp32 sum order
        if not bool(torch.isfinite(offset)):
            # the fp32 sum overflowed (|W| near float32's max; bnb's offset is inf there): the
            # exact mean fits, as every absmax does
            offset = absmax.double().mean().float()
        nested_code = dynamic_map_signed().to(weight.device)
        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code)
        q = cls(
            packed,
            qabsmax,
            weight.shape,
            weight.dtype,
            blocksize,
            offset=offset,
            nested_absmax=nested_absmax,
            nested_code=nested_code,
        )
        if not bool(torch.isfinite(q.block_absmax()).all()):  # offset + code * nested_absmax overflowed
            raise ValueError(
                f"weight (shape {tuple(weight.shape)}): magnitudes up to {float(absmax.max()):.3g} are too close to "
                "float32's max for double quant; use double_quant=False"
            )
        return q

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _tensors(self) -> list[Tensor]:
        ts = [self.packed, self.absmax, self.code]
        if self.double_quant:
            ts += [self.offset, self.nested_absmax, self.nested_code]
        return ts

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (codes, statistics and the two code tables)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def block_absmax(self) -> Tensor:
        """fp32 ``(ceil(NK / blocksize),)`` per-block absmax (undoes double quant)."""
        if not self.double_quant:
            return self.absmax
        deq = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return deq.add_(self.offset)

    def dequantize(self, dtype: torch.dtype | None = None, *, out: Tensor | None = None) -> Tensor:
        """(N, K) in ``dtype`` (default: ``out``'s dtype, else the original one); equals bnb
        ``dequantize_4bit``. ``out``: a contiguous (N, K) buffer to fill and return instead."""
        dtype = dtype or (self.dtype if out is None else out.dtype)
        return dequantize_nf4(self.packed, self.block_absmax(), self.shape, self.blocksize, dtype, out=out)

    def to(self, device: torch.device | str) -> NF4Weight:
        mv = lambda t: None if t is None else t.to(device)
        return NF4Weight(
            mv(self.packed),
            mv(self.absmax),
            self.shape,
            self.dtype,
            self.blocksize,
            code=mv(self.code),
            offset=mv(self.offset),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
            nested_blocksize=self.nested_blocksize,
        )

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device})"
        )

    # ---- bitsandbytes Linear4bit state-dict format --------------------------------------------

    def state_dict_entries(self, prefix: str = "") -> dict[str, Tensor]:
        """The ``weight`` entries of a bitsandbytes ``Linear4bit`` state dict, key for key.

        ``{prefix}weight`` (packed uint8 ``(ceil(NK/2), 1)``), ``weight.absmax``,
        ``weight.quant_map``, [``weight.nested_absmax``, ``weight.nested_quant_map``] and
        ``weight.quant_state.bitsandbytes__nf4`` (uint8 bytes of bnb's JSON, same key order).
        Code tables are cloned (as bnb does) so safetensors sees no shared storage.
        """
        meta: dict = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        w = prefix + "weight"
        sd = {w: self.packed, f"{w}.absmax": self.absmax, f"{w}.quant_map": self.code.clone()}
        if self.double_quant:
            sd[f"{w}.nested_absmax"] = self.nested_absmax
            sd[f"{w}.nested_quant_map"] = self.nested_code.clone()
            meta["nested_blocksize"] = self.nested_blocksize
            meta["nested_dtype"] = "float32"
            meta["nested_offset"] = self.offset.item()
        blob = json.dumps(meta).encode("utf-8")
        sd[f"{w}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], prefix: str = "") -> NF4Weight:
        """Rebuild from a bitsandbytes ``Linear4bit`` (nf4) state dict; keys outside
        ``{prefix}weight[.*]`` are ignored. Raises ValueError on missing, unknown, corrupt or
        mismatched entries. Tensors are used as they are (no copy)."""
        w = prefix + "weight"
        if w not in sd:
            raise ValueError(f"missing {w!r} in state dict")
        ours = {k[len(w) + 1 :]: v for k, v in sd.items() if k.startswith(w + ".")}
        qs_keys = [k for k in ours if k.startswith("quant_state.")]
        if qs_keys != ["quant_state.bitsandbytes__nf4"]:
            raise ValueError(
                f"expected exactly one packed quant state '{w}.quant_state.bitsandbytes__nf4', "
                f"found {[w + '.' + k for k in qs_keys]} (only nf4 is supported)"
            )
        meta = _unpack_json(ours.pop("quant_state.bitsandbytes__nf4"), w)
        nested = "nested_absmax" in ours
        required = {"absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if nested else set())
        if set(ours) != required:
            missing, extra = required - set(ours), set(ours) - required
            raise ValueError(f"{w}: missing entries {sorted(missing)}, unexpected {sorted(extra)}")
        want_meta = {"quant_type", "blocksize", "dtype", "shape"}
        if nested:
            want_meta |= {"nested_blocksize", "nested_dtype", "nested_offset"}
        if set(meta) != want_meta:
            raise ValueError(f"{w}: quant_state keys {sorted(meta)}, expected {sorted(want_meta)}")
        if meta["quant_type"] != "nf4":
            raise ValueError(f"{w}: quant_type {meta['quant_type']!r} is not supported (nf4 only)")
        blocksize = meta["blocksize"]
        if not isinstance(blocksize, int) or blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"{w}: blocksize {blocksize!r} not in {SUPPORTED_BLOCKSIZES}")
        if meta["dtype"] not in _FLOAT_DTYPES:
            raise ValueError(f"{w}: dtype {meta['dtype']!r} not in {sorted(_FLOAT_DTYPES)}")
        shape = meta["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise ValueError(f"{w}: shape {shape!r} is not a 2-D (N, K) shape")
        n = shape[0] * shape[1]
        nblocks = -(-n // blocksize)
        packed = sd[w]
        if isinstance(packed, Tensor) and packed.dtype != torch.uint8:  # bnb quant_storage: same bytes in a wider dtype
            packed = packed.contiguous().view(torch.uint8).reshape(-1, 1)
        _expect(packed, f"{w}", torch.uint8, ((n + 1) // 2, 1))
        _expect(ours["quant_map"], f"{w}.quant_map", torch.float32, (16,))
        if not torch.equal(ours["quant_map"].cpu(), _nf4_code(torch.device("cpu"))):
            raise ValueError(f"{w}.quant_map is not the NF4 table")
        absmax_dtype = torch.uint8 if nested else torch.float32
        _expect(ours["absmax"], f"{w}.absmax", absmax_dtype, (nblocks,))
        kw: dict = {}
        if nested:
            nbs = meta["nested_blocksize"]
            if not isinstance(nbs, int) or nbs <= 0 or meta["nested_dtype"] != "float32":
                raise ValueError(f"{w}: bad nested_blocksize {nbs!r} / nested_dtype")
            off = meta["nested_offset"]
            if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
                raise ValueError(f"{w}: nested_offset {off!r} is not a finite number")
            _expect(ours["nested_absmax"], f"{w}.nested_absmax", torch.float32, (-(-nblocks // nbs),))
            _expect(ours["nested_quant_map"], f"{w}.nested_quant_map", torch.float32, (256,))
            kw = dict(
                offset=torch.tensor(float(meta["nested_offset"]), device=packed.device),
                nested_absmax=ours["nested_absmax"],
                nested_code=ours["nested_quant_map"],
                nested_blocksize=nbs,
            )
        q = cls(
            packed,
            ours["absmax"],
            shape,
            _FLOAT_DTYPES[meta["dtype"]],
            blocksize,
            code=ours["quant_map"],
            **kw,
        )
        # corrupt statistics would load and make every output NaN or Inf: refuse them here
        if nested:
            check_stats(ours["nested_quant_map"], torch.float32, f"{w}.nested_quant_map", nonnegative=False)
            check_stats(ours["nested_absmax"], torch.float32, f"{w}.nested_absmax")
            check_stats(q.block_absmax(), q.dtype, f"{w}.absmax (with nested_absmax and nested_offset)", False)
        else:
            check_stats(ours["absmax"], q.dtype, f"{w}.absmax")
        return q


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight.dequantize(x.dtype), bias)``: x (..., K), weight (N, K), bias (N,)
    -> (..., N).

    The ``fastlora::nf4_linear`` op runs it where compiled; on CUDA with bf16/fp16 x of at most
    16 rows (decode) one kernel reads the 4-bit weight once instead of writing and re-reading a
    dequantized copy. The op has no autograd formula, so a call that needs gradients (or x of
    another dtype) takes the dequantize + ``F.linear`` path.
    """
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} must end in the {weight.shape[1]} features of {weight}")
    op = _ops.op("nf4_linear", x.device)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if op is None or needs_grad or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)
    return op(x, weight.packed, weight.block_absmax(), weight.shape[0], weight.blocksize, bias)


def _expect(t: object, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")


def _unpack_json(t: object, name: str) -> dict:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{name}.quant_state.bitsandbytes__nf4 must be a 1-D uint8 tensor")
    try:
        meta = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{name}: quant_state JSON is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: quant_state is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: quant_state JSON is not an object")
    return meta
