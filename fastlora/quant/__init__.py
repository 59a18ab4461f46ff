"""Quantized frozen base weights (DESIGN.md section 5): NF4 and row-wise int8.

Both formats are bit-compatible with bitsandbytes (its CPU backend) and read/write its
``Linear4bit`` / ``Linear8bitLt`` state-dict entries, without importing bitsandbytes. The hot
loops run as ``fastlora._C`` ops where the extension is built (same bytes); inside
``with force_python():`` they run as plain PyTorch.
"""

from __future__ import annotations

from torch import Tensor

from ._ops import force_python
from .int8 import Int8Weight, dequantize_int8, quantize_int8
from .nf4 import (
    SUPPORTED_BLOCKSIZES,
    NF4Weight,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    nf4_linear,
    quantize_blockwise_8bit,
    quantize_nf4,
)

QuantizedWeight = NF4Weight | Int8Weight

__all__ = [
    "SUPPORTED_BLOCKSIZES",
    "Int8Weight",
    "NF4Weight",
    "QuantizedWeight",
    "dequantize_blockwise_8bit",
    "dequantize_int8",
    "dequantize_nf4",
    "force_python",
    "nf4_linear",
    "quantize",
    "quantize_blockwise_8bit",
    "quantize_int8",
    "quantize_nf4",
]


def quantize(weight: Tensor, kind: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> QuantizedWeight:
    """Quantize a frozen (N, K) fp32/fp16/bf16 weight.

    kind="nf4": blockwise NF4 (``blocksize`` in SUPPORTED_BLOCKSIZES, optional double quant of
    the block absmax), as bitsandbytes ``quantize_4bit(..., quant_type="nf4")``.
    kind="int8": row-wise absmax int8, as bitsandbytes ``int8_vectorwise_quant``;
    ``blocksize`` and ``double_quant`` do not apply and are ignored.
    """
    if kind == "nf4":
        return NF4Weight.quantize(weight, blocksize, double_quant)
    if kind == "int8":
        return Int8Weight.quantize(weight)
    raise ValueError(f"kind must be 'nf4' or 'int8', got {kind!r}")
