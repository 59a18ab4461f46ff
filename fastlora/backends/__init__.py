"""Backend table: one module per backend, one contract.

Every backend module exposes the same four functions, called by
:class:`fastlora.autograd.LoRAFunction` on 2-D, same-dtype, same-device tensors:

``prepare_weight(weight, M, dtype, route) -> Tensor | object``
    What ``forward`` / ``backward`` take as ``weight`` for a quantized base (a
    ``fastlora.quant`` weight) at M rows of ``dtype``: a dense (N, K) tensor in ``dtype`` (the
    "scratch" route: dequantized into the shared scratch buffer, valid for one op), or a
    backend-specific handle whose codes the kernels dequantize in registers (the "fused"
    route). ``route`` is "auto", "fused" or "scratch" (:func:`set_quant_route`); a backend
    without a fused route always takes the scratch one.

``dropout_mask(M, K, p, seed, device) -> BoolTensor (M, K)``
    The keep-mask (True = kept) of the seeded dropout generator (see ``fastlora/_philox.py``
    for the bit-exact definition shared by every backend).

``forward(x, weight, bias, lora_A, lora_B, scale, p, seed) -> (y, z)``
    ``x: (M, K)``, ``weight: (N, K)`` (or what ``prepare_weight`` returned), ``bias: (N,) | None``, ``lora_A: (r, K)``,
    ``lora_B: (N, r)``. Returns ``y = x W^T + bias + scale * z B^T`` of shape (M, N) and
    ``z = dropout(x) A^T`` of shape (M, r) (unscaled, x's dtype). ``p == 0`` means no dropout.

``backward(g, x, z, weight, lora_A, lora_B, scale, p, seed, needs) -> (dx, dW, dbias, dA, dB)``
    ``g: (M, N)``; ``x`` may be None when neither dA nor dW is needed; ``z`` may be None when
    dB is not needed. ``needs`` is a 5-tuple of bools in the same order as the result; an
    entry that is not needed is returned as None and never computed.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

# name -> module path; "auto" and "reference" are resolved by fastlora.functional.
_MODULES = {
    "torch": "fastlora.backends.torch_backend",
    "triton": "fastlora.backends.triton_backend",
    "hybrid": "fastlora.backends.hybrid_backend",
}
_loaded: dict[str, ModuleType | None] = {}
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load(name: str) -> ModuleType | None:
    """Import backend ``name`` lazily; None (with one warning) if it cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # missing triton, broken install, ...
            _loaded[name] = None
            _warn_once(f"import-{name}", f"fastlora: backend {name!r} unavailable ({exc}); using 'torch'")
    return _loaded[name]


QUANT_ROUTES = ("auto", "fused", "scratch")
_quant_route = "auto"


def set_quant_route(route: str) -> None:
    """How kernel backends read a quantized base weight (see ``prepare_weight`` above):
    "fused" (dequantize W tiles in registers inside the GEMMs), "scratch" (dequantize W into one
    reused buffer, then the dense GEMM) or "auto" (per shape; the backend's rule)."""
    global _quant_route
    if route not in QUANT_ROUTES:
        raise ValueError(f"quant route must be one of {QUANT_ROUTES}, got {route!r}")
    _quant_route = route


def get_quant_route() -> str:
    """The process-wide quantized-base route ("auto" unless changed)."""
    return _quant_route


def usable(name: str, device: torch.device) -> bool:
    """True when backend ``name`` can run on tensors of ``device``."""
    if name not in _MODULES:
        return False
    mod = load(name)
    return mod is not None and mod.is_available(device)


def base_grads(g: torch.Tensor, x: torch.Tensor | None, need_dW: bool, need_db: bool):
    """(dW, dbias) of the base layer, for a caller that unfroze it, else None: every backend's
    backward ends with these. g: (M, N), x: (M, K)."""
    # dW = g^T x
    dW = torch.mm(g.t(), x) if need_dW else None
    db = g.sum(0) if need_db else None
    return dW, db


def preload() -> None:
    """Import the torch backend, and the Triton backends wherever CUDA can be used (a CUDA build of torch) or the
    interpreter is on, so that their ops are registered before any ``torch.compile`` trace (a
    first import inside a traced call is a graph break). Checks no device; never raises."""
    import importlib.util
    import os

    load("torch")
    if importlib.util.find_spec("triton") is None:
        return
    if torch.version.cuda is None and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1":
        return
    load("triton")
    load("hybrid")


def installed() -> list[str]:
    """Backends whose module imports (not checking any device)."""
    return [n for n in _MODULES if load(n) is not None]
