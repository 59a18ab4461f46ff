"""Triton kernels of fastlora (installed as ``fastlora.triton_kernels``): @triton.jit kernels
and their launch helpers only; the autograd Function and the op registration live in
``fastlora``. Every launcher accepts strided 2-D inputs, allocates its outputs and returns them.

Forward:  :func:`lora_forward` (F1 shrink + F2 base GEMM with a rank-r tail).
Backward: :func:`lora_bwd_dz_dB` (B1), :func:`lora_bwd_dx` (B2), :func:`lora_bwd_dA` (B3).
Hybrid plan (cuBLAS for the big GEMMs): :func:`lora_tail` and :func:`lora_dA_tail` with F1
and B1 (lora_rank.py).
Shared building block: gemm.py, the GEMM with a rank-r tail that F2 and B2 are built on.
Dropout:  :func:`keep_mask` and :func:`dropout`, the same bits the kernels regenerate.
Quantized bases: :class:`QuantWeight` (NF4 / int8 codes) in place of a dense W in F2 and B2
(dequantized in registers), and :func:`dequantize` (the whole W into a scratch buffer).
"""

from . import common
from .lora_bwd import lora_bwd_dA, lora_bwd_dx, lora_bwd_dz_dB
from .lora_fwd import lora_forward, lora_shrink
from .lora_rank import lora_dA_tail, lora_tail
from .philox import dropout, keep_mask
from .quant import QuantWeight, dequantize

__all__ = [
    "QuantWeight",
    "common",
    "dequantize",
    "dropout",
    "keep_mask",
    "lora_dA_tail",
    "lora_bwd_dA",
    "lora_bwd_dx",
    "lora_bwd_dz_dB",
    "lora_forward",
    "lora_shrink",
    "lora_tail",
]
