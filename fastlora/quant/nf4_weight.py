"""``NF4Weight``: an NF4-quantized frozen weight in bitsandbytes' ``Params4bit`` layout, with its
state-dict entries (bitsandbytes' ``Linear4bit`` keys), and ``nf4_linear``. The format and the
quantize / dequantize functions are in nf4.py."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import _ops
from .nf4 import (
    _DTYPE_NAMES,
    _FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    SUPPORTED_BLOCKSIZES,
    _check_blocksize,
    _check_finite,
    _check_weight,
    _nf4_code,
    check_stats,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    dynamic_map_signed,
    quantize_blockwise_8bit,
    quantize_nf4,
)


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
