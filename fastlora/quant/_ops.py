"""Which of fastlora.quant's hot loops run as compiled ops of ``fastlora._C``.

The pure-PyTorch code in nf4.py and int8.py is the definition and the fallback. An op
(csrc/quant_cpu.cpp, csrc/cuda/nf4_cuda.cu) replaces it where the extension is loaded and has a
kernel for the tensor's device, unless :func:`force_python` is active. Both give the same bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from fastlora import _ext

OP_NAMES = (
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_nf4_out",
    "nf4_linear",
    "dequantize_blockwise_8bit",
    "quantize_int8",
    "dequantize_int8",
    "dequantize_int8_out",
)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _kernels() -> dict[str, frozenset[str]]:
    """Op name -> device types it has a kernel for. Reads the dispatcher's registry (no device is
    touched), once at import, so lookups stay plain dict reads that torch.compile traces."""
    if not _ext.available():
        return {}
    found = {}
    for name in OP_NAMES:
        try:
            if not hasattr(torch.ops.fastlora, name):  # a stale build without the quant ops
                continue
            found[name] = frozenset(
                dev
                for dev, key in _DISPATCH_KEYS.items()
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlora::{name}", key)
            )
        except Exception:  # a private torch API: if it ever changes, fall back to PyTorch, never fail import
            continue
    return found


_KERNELS = _kernels()
_forced_python = False


def op(name: str, device: torch.device) -> Callable | None:
    """``torch.ops.fastlora.<name>`` when it can run on ``device`` (and the extension is not
    switched off by :func:`force_python`), else None."""
    if _forced_python or device.type not in _KERNELS.get(name, ()):
        return None
    return getattr(torch.ops.fastlora, name)


def has_kernel(name: str, device: torch.device | str) -> bool:
    """Whether the compiled op ``name`` has a kernel for ``device`` (ignores :func:`force_python`)."""
    return torch.device(device).type in _KERNELS.get(name, ())


@contextlib.contextmanager
def force_python(enabled: bool = True) -> Iterator[None]:
    """Run fastlora.quant's pure-PyTorch code inside the block (tests, debugging). Not
    thread-safe: it flips a module-level switch."""
    global _forced_python
    previous, _forced_python = _forced_python, enabled
    try:
        yield
    finally:
        _forced_python = previous
