"""Quantized frozen base weights (DESIGN.md section 5): NF4 and row-wise int8.

Both formats are bit-compatible with bitsandbytes (its CPU backend) and read/write its
``Linear4bit`` / ``Linear8bitLt`` state-dict entries, without importing bitsandbytes. The hot
loops run as ``fastlora._C`` ops where the extension is built (same bytes); inside
``with force_python():`` they run as plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import force_python
from .int8 import Int8Weight, dequantize_int8, quantize_int8
from .nf4 import (
    SUPPORTED_BLOCKSIZES,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    quantize_blockwise_8bit,
    quantize_nf4,
)
from .nf4_weight import NF4Weight, nf4_linear

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
    "dequantize_scratch",
    "release_scratch",
    "scratch_buffer",
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


# One scratch buffer per (dtype, device), grown to the largest layer seen: every quantized
# layer dequantizes into it for the length of one GEMM (bitsandbytes' strategy), so a model
# holds at most one dense weight's worth of memory instead of allocating one per call.
_SCRATCH: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def scratch_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A contiguous ``shape`` view of the shared scratch buffer of (dtype, device), grown when
    too small. Valid until the next call: fill it, use it for one op, drop it."""
    N, K = shape
    key = (dtype, torch.device(device))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < N * K:
        _SCRATCH.pop(key, None)  # free the smaller one first
        buf = _SCRATCH[key] = torch.empty(N * K, dtype=dtype, device=device)
    return buf[: N * K].view(N, K)


def dequantize_scratch(weight: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """``weight.dequantize(dtype)`` written into the shared scratch buffer (see
    :func:`scratch_buffer`). Under torch.compile a fresh tensor is returned (a global buffer
    mutated inside a graph is not worth the trouble)."""
    if torch.compiler.is_compiling():
        return weight.dequantize(dtype)
    return weight.dequantize(dtype, out=scratch_buffer(tuple(weight.shape), dtype, weight.device))


def release_scratch() -> None:
    """Free the dequantization scratch buffers (e.g. before switching to a full-precision model)."""
    _SCRATCH.clear()
