"""Row-wise int8 base weights (LLM.int8() weight format), bit-compatible with bitsandbytes.

``SCB[i] = max_j |W[i, j]|`` (fp32), ``CB = round(W * (127 / SCB))`` (int8), and
``W ~= CB * SCB / 127``. Same ops, in the same order, as bitsandbytes'
``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``, except that an all-zero row gives
``CB = 0`` instead of bitsandbytes' ``0 * inf = NaN`` cast to int8. ``quantize_int8`` and
``dequantize_int8`` run as ``fastlora._C`` ops where compiled (same bytes; ``fastlora.quant._ops``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from . import _ops
from .nf4 import _OP_DTYPES, _check_finite, _check_out, _check_weight, check_stats

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.no_grad()
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight: (N, K) float -> (CB int8 (N, K), SCB fp32 (N,))."""
    op = _ops.op("quantize_int8", weight.device) if weight.dim() == 2 and weight.dtype in _OP_DTYPES else None
    if op is not None:
        return op(weight)
    scb = weight.abs().amax(dim=1).float()
    scale = 127.0 / scb.unsqueeze(1)  # bnb's expression: reciprocal(scb) * 127
    scale.masked_fill_(scb.unsqueeze(1) == 0, 0.0)  # zero rows: no 0 * inf
    return (weight * scale).round_().to(torch.int8), scb


def dequantize_int8(
    cb: Tensor, scb: Tensor, dtype: torch.dtype = torch.float32, *, out: Tensor | None = None
) -> Tensor:
    """``CB * SCB / 127`` computed as bitsandbytes does (fp32), then cast: (N, K).

    ``out``: a contiguous (N, K) tensor of ``dtype`` to write into and return instead.
    """
    if out is not None:
        _check_out(out, cb.shape, dtype, cb.device)
        if dtype in _OP_DTYPES and (op := _ops.op("dequantize_int8_out", cb.device)) is not None:
            op(cb, scb, out)
            return out
        return out.copy_((cb * scb.view(-1, 1)).mul_(7.874015718698502e-3))
    if dtype in _OP_DTYPES and (op := _ops.op("dequantize_int8", cb.device)) is not None:
        return op(cb, scb, dtype)
    return (cb * scb.view(-1, 1)).mul_(7.874015718698502e-3).to(dtype)


class Int8Weight:
    """A frozen (N, K) weight as int8 codes ``CB`` (N, K) plus fp32 row absmax ``SCB`` (N,)."""

    def __init__(self, CB: Tensor, SCB: Tensor, dtype: torch.dtype = torch.float16) -> None:
        self.CB = CB
        self.SCB = SCB
        self.dtype = dtype

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor) -> Int8Weight:
        """weight: (N, K) fp32/fp16/bf16 -> Int8Weight; bitwise bnb ``int8_vectorwise_quant``."""
        _check_weight(weight)
        cb, scb = quantize_int8(weight)
        _check_finite(scb, weight)
        return cls(cb, scb, weight.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.CB.shape

    @property
    def device(self) -> torch.device:
        return self.CB.device

    @property
    def nbytes(self) -> int:
        return self.CB.numel() + 4 * self.SCB.numel()

    def dequantize(self, dtype: torch.dtype | None = None, *, out: Tensor | None = None) -> Tensor:
        """(N, K) in ``dtype`` (default: ``out``'s dtype, else the original one); ``out``: a
        contiguous (N, K) buffer to fill and return instead."""
        dtype = dtype or (self.dtype if out is None else out.dtype)
        return dequantize_int8(self.CB, self.SCB, dtype, out=out)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.CB.to(device), self.SCB.to(device), self.dtype)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def state_dict_entries(self, prefix: str = "") -> dict[str, Tensor]:
        """bitsandbytes ``Linear8bitLt`` entries: ``weight`` (CB), ``SCB``, ``weight_format``."""
        return {
            f"{prefix}weight": self.CB,
            f"{prefix}SCB": self.SCB,
            f"{prefix}weight_format": torch.tensor(0, dtype=torch.uint8),  # 0 = "row"
        }

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, Tensor], prefix: str = "", dtype: torch.dtype = torch.float16
    ) -> Int8Weight:
        """From a ``Linear8bitLt`` state dict. bnb stores no original dtype; its Linear8bitLt
        quantizes from float16, hence the default ``dtype``."""
        w, s, f = f"{prefix}weight", f"{prefix}SCB", f"{prefix}weight_format"
        for k in (w, s):
            if k not in sd:
                raise ValueError(f"missing {k!r} in state dict")
        cb, scb = sd[w], sd[s]
        if not isinstance(cb, Tensor) or cb.dtype != torch.int8 or cb.dim() != 2:
            raise ValueError(f"{w}: expected an int8 (N, K) tensor, got {_describe(cb)}")
        if not isinstance(scb, Tensor) or scb.dtype != torch.float32 or scb.shape != cb.shape[:1]:
            raise ValueError(f"{s}: expected float32 ({cb.shape[0]},), got {_describe(scb)}")
        fmt = sd.get(f, 0)
        if (fmt.item() if isinstance(fmt, Tensor) else fmt) not in (0, "row"):
            raise ValueError(f"{f}: only the row-major format (0) is supported, got {fmt!r}")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        check_stats(scb, dtype, s)
        return cls(cb, scb, dtype)


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
