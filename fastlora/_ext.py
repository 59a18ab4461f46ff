"""The optional C++ extension ``fastlora._C``: loaded once at import, never raising.

Importing ``fastlora._C`` registers the ``torch.ops.fastlora`` C++ ops (``csrc/``). This module
adds their fake (meta) impls so that ``torch.compile`` traces through them. Callers check
:func:`available` and fall back to pure PyTorch; warning the user is left to them.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from fastlora import _C  # noqa: F401  (import registers the ops)

    _reason: str | None = None
except Exception as exc:  # not built (FASTLORA_NO_EXT, no compiler), ABI mismatch, ...
    import importlib.util

    _built = importlib.util.find_spec("fastlora._C") is not None
    _reason = (
        f"fastlora._C could not be imported ({type(exc).__name__}: {exc})"
        if _built
        else "the C++ extension fastlora._C is not built (FASTLORA_NO_EXT, or no compiler at install time)"
    )


def available() -> bool:
    """True when the C++ extension loaded and its ops are registered."""
    return _reason is None


def unavailable_reason() -> str | None:
    """Why the extension is unavailable, or None when it is available."""
    return _reason


if _reason is None:

    @torch.library.register_fake("fastlora::dropout_mask")
    def _dropout_mask_fake(M: int, K: int, p: float, seed: int, row_offset: int = 0) -> Tensor:
        return torch.empty((M, K), dtype=torch.bool, device="cpu")

    @torch.library.register_fake("fastlora::dropout")
    def _dropout_fake(x: Tensor, p: float, seed: int, row_offset: int = 0) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake("fastlora::dropout_")
    def _dropout_inplace_fake(x: Tensor, p: float, seed: int, row_offset: int = 0) -> None:
        return None

    # fused LoRA products with dropout (csrc/lora_cpu.cpp); a stale build may lack them.
    if hasattr(torch.ops.fastlora, "dropout_shrink"):

        @torch.library.register_fake("fastlora::dropout_shrink")
        def _dropout_shrink_fake(
            x: Tensor, A: Tensor, p: float, seed: int, row_offset: int = 0, block_rows: int = 0
        ) -> Tensor:
            return x.new_empty((x.shape[0], A.shape[0]))

        @torch.library.register_fake("fastlora::dropout_dA")
        def _dropout_dA_fake(
            dz: Tensor, x: Tensor, p: float, seed: int, row_offset: int = 0, block_rows: int = 0
        ) -> Tensor:
            return x.new_empty((dz.shape[1], x.shape[1]))

        @torch.library.register_fake("fastlora::dropout_tail_add_")
        def _dropout_tail_add_fake(
            dx: Tensor, dz: Tensor, A: Tensor, p: float, seed: int, row_offset: int = 0, block_rows: int = 0
        ) -> None:
            return None

        @torch.library.register_fake("fastlora::dropout_dA_tail_add_")
        def _dropout_dA_tail_add_fake(
            dx: Tensor, dz: Tensor, x: Tensor, A: Tensor, p: float, seed: int, row_offset: int = 0, block_rows: int = 0
        ) -> Tensor:
            return x.new_empty((dz.shape[1], x.shape[1]))

    if hasattr(torch.ops.fastlora, "lora_gpass"):

        @torch.library.register_fake("fastlora::lora_expand")
        def _lora_expand_fake(z: Tensor, B: Tensor, bias: Tensor | None, scale: float, block_rows: int = 0) -> Tensor:
            return z.new_empty((z.shape[0], B.shape[0]))

        @torch.library.register_fake("fastlora::lora_gpass")
        def _lora_gpass_fake(
            g: Tensor, B: Tensor, z: Tensor | None, scale: float, block_rows: int = 0
        ) -> tuple[Tensor, Tensor]:
            dB = g.new_empty((B.shape[0], B.shape[1])) if z is not None else g.new_empty((0,))
            return g.new_empty((g.shape[0], B.shape[1])), dB

    # fastlora.quant ops (csrc/quant_cpu.cpp, csrc/cuda/nf4_cuda.cu); a stale build may lack them.
    if hasattr(torch.ops.fastlora, "quantize_nf4"):

        @torch.library.register_fake("fastlora::quantize_nf4")
        def _quantize_nf4_fake(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
            n = weight.numel()
            packed = weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
            return packed, weight.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)

        @torch.library.register_fake("fastlora::dequantize_nf4")
        def _dequantize_nf4_fake(
            packed: Tensor, absmax: Tensor, shape: list[int], blocksize: int, dtype: torch.dtype
        ) -> Tensor:
            return packed.new_empty(shape, dtype=dtype)

        @torch.library.register_fake("fastlora::dequantize_nf4_out")
        def _dequantize_nf4_out_fake(packed: Tensor, absmax: Tensor, out: Tensor, blocksize: int) -> None:
            return None

        @torch.library.register_fake("fastlora::nf4_linear")
        def _nf4_linear_fake(
            x: Tensor, packed: Tensor, absmax: Tensor, N: int, blocksize: int, bias: Tensor | None = None
        ) -> Tensor:
            return x.new_empty((*x.shape[:-1], N))

        @torch.library.register_fake("fastlora::dequantize_blockwise_8bit")
        def _dequantize_blockwise_8bit_fake(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
            return absmax.new_empty((q.numel(),))

        @torch.library.register_fake("fastlora::quantize_int8")
        def _quantize_int8_fake(weight: Tensor) -> tuple[Tensor, Tensor]:
            cb = weight.new_empty(weight.shape, dtype=torch.int8)
            return cb, weight.new_empty(weight.shape[:1], dtype=torch.float32)

        @torch.library.register_fake("fastlora::dequantize_int8")
        def _dequantize_int8_fake(CB: Tensor, SCB: Tensor, dtype: torch.dtype) -> Tensor:
            return CB.new_empty(CB.shape, dtype=dtype)

        @torch.library.register_fake("fastlora::dequantize_int8_out")
        def _dequantize_int8_out_fake(CB: Tensor, SCB: Tensor, out: Tensor) -> None:
            return None
