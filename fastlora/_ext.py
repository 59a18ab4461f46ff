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
    _reason = f"fastlora._C could not be imported ({type(exc).__name__}: {exc})"


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
