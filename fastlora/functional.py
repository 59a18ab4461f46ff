"""``lora_linear``: checks inputs, picks the backend, calls the Function."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends, reference
from .autograd import LoRAFunction
from .backends import plans
from .quant import Int8Weight, NF4Weight

QUANTIZED = (NF4Weight, Int8Weight)

_BACKEND_NAMES = ("auto", "torch", "reference", "triton", "hybrid", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_backend = "auto"
_SEED_LIMIT = 2**63


def available_backends() -> list[str]:
    """Backend names usable in this install: "auto", "torch", "reference", and any kernel backend
    whose module imports (it may still need a particular device, e.g. triton wants CUDA or
    ``TRITON_INTERPRET=1``)."""
    return ["auto", "torch", "reference"] + [n for n in backends.installed() if n != "torch"]


def set_backend(name: str) -> None:
    """Set the process-wide default backend used when ``lora_linear(..., backend=None)``."""
    global _backend
    _check_backend_name(name)
    _backend = name


def get_backend() -> str:
    """The process-wide default backend name ("auto" unless changed)."""
    return _backend


set_quant_route = backends.set_quant_route
get_quant_route = backends.get_quant_route


def _check_backend_name(name: str) -> None:
    if not isinstance(name, str) or name not in _BACKEND_NAMES:
        raise ValueError(f"backend must be one of {_BACKEND_NAMES}, got {name!r}")
    if name not in available_backends():
        raise ValueError(f"backend {name!r} is not available in this install; available: {available_backends()}")


_resolved: dict[tuple, str] = {}


def _resolve(name: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map a requested backend name to a concrete one for tensors on ``device``: "plans" stands
    for "auto" on CUDA, where :mod:`fastlora.backends.plans` picks per shape. Memoised: this
    runs on every call."""
    name = _backend if name is None else name
    key = (name, device.type, dtype)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve_uncached(name, device, dtype)
    return found


def _resolve_uncached(name: str, device: torch.device, dtype: torch.dtype | None) -> str:
    _check_backend_name(name)
    if name == "auto":
        if device.type == "cuda" and dtype != torch.float64:  # the kernels take fp32/fp16/bf16
            if backends.usable("triton", device) and backends.usable("hybrid", device):
                return "plans"
            backends._warn_once("auto-cuda", "fastlora: triton unavailable for CUDA tensors; using the 'torch' backend")
        return "torch"
    if name in ("torch", "reference"):
        return name
    if not backends.usable(name, device):
        hint = (
            " (set TRITON_INTERPRET=1 before importing triton to run it on CPU)" if name in ("triton", "hybrid") else ""
        )
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors{hint}")
    return name


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator, so torch.manual_seed reproduces it."""
    return int(torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64).item())


def _draw_seed_tensor() -> Tensor:
    """:func:`draw_seed` without leaving the graph: the same draw, kept as a 0-d tensor."""
    return torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64)


def dropout_mask(
    shape: tuple[int, int], p: float, seed: int, backend: str | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """The exact keep-mask (True = kept) that ``lora_linear`` uses for an input flattened to
    ``shape = (M, K)`` with dropout probability ``p`` and ``seed``. Every backend produces the
    same bits (fastlora/_philox.py defines them)."""
    if len(shape) != 2:
        raise ValueError(f"shape must be (M, K), got {tuple(shape)}")
    _check_p(p)
    _check_seed(seed)
    device = torch.device(device)
    name = _resolve(backend, device)
    # every backend gives the same bits; "auto" on CUDA ("plans") takes the hybrid plan's kernel
    mod = backends.load({"reference": "torch", "plans": "hybrid"}.get(name, name))
    return mod.dropout_mask(int(shape[0]), int(shape[1]), float(p), int(seed), device)


def _check_p(p: float) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < _SEED_LIMIT):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def _inputs_ok(x, weight, lora_A, lora_B, bias, scale) -> bool:
    """The common case in few operations (this runs on every call; small shapes are
    host-bound). False sends the call to :func:`_explain_bad_inputs`, which names the problem."""
    try:
        if (type(scale) is not float and type(scale) is not int) or not math.isfinite(scale):
            return False
        if not (isinstance(x, Tensor) and isinstance(lora_A, Tensor) and isinstance(lora_B, Tensor)):
            return False
        dev = x.device
        N, K = weight.shape
        r, K_A = lora_A.shape
        if x.dtype not in _FLOAT_DTYPES or x.dim() < 1 or x.shape[-1] != K or K_A != K or dev.type == "meta":
            return False
        if N == 0 or K == 0 or r == 0 or lora_B.shape != (N, r) or lora_A.device != dev or lora_B.device != dev:
            return False
        if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
            return False
        if isinstance(weight, Tensor):
            if weight.device != dev or not weight.is_floating_point():
                return False
        elif not isinstance(weight, QUANTIZED) or weight.device != dev:
            return False
        return bias is None or (isinstance(bias, Tensor) and bias.shape == (N,) and bias.device == dev)
    except Exception:  # wrong types or ranks: the slow path says which
        return False


def _check_inputs(x, weight, lora_A, lora_B, bias, scale) -> None:
    if not _inputs_ok(x, weight, lora_A, lora_B, bias, scale):
        _explain_bad_inputs(x, weight, lora_A, lora_B, bias, scale)


def _explain_bad_inputs(x, weight, lora_A, lora_B, bias, scale) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype} (cast it, or use autocast)")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    named = (("lora_A", lora_A), ("lora_B", lora_B))
    for name, t in named if isinstance(weight, QUANTIZED) else (("weight", weight), *named):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    N, K = weight.shape
    r = lora_A.shape[0]
    if K == 0 or N == 0:
        raise ValueError(f"weight must have in_features and out_features >= 1, got shape {tuple(weight.shape)}")
    if x.shape[-1] != K:
        raise ValueError(
            f"x's last dim {x.shape[-1]} (x shape {tuple(x.shape)}) != weight in_features {K} "
            f"(weight shape {tuple(weight.shape)})"
        )
    if r == 0:
        raise ValueError(f"LoRA rank must be >= 1, got lora_A shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != K:
        raise ValueError(
            f"lora_A shape {tuple(lora_A.shape)} must be (r, K) with K={K} (weight shape {tuple(weight.shape)})"
        )
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"lora_B shape {tuple(lora_B.shape)} must be (N, r) = ({N}, {r}) for weight {tuple(weight.shape)} "
            f"and lora_A {tuple(lora_A.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be ({N},) for weight {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1 or x.device.type == "meta":
        raise ValueError(
            f"all tensors must be on one device with data (meta tensors are not supported), got "
            f"{', '.join(f'{n}: {d}' for n, d in devices.items())}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not _finite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float's range (2**1030)
        return False


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Fused LoRA linear: ``y = x W^T + bias + scale * (dropout(x) A^T) B^T``.

    x: (..., K); weight: (N, K), a tensor or a quantized ``fastlora.quant`` weight (NF4/int8,
    dequantized to x's dtype inside the op, never kept); lora_A: (r, K); lora_B: (N, r);
    bias: (N,) or None. Returns (..., N) in x's dtype (the autocast dtype under autocast).

    Dropout (on the LoRA branch input only, as PEFT) applies when ``training`` and
    ``dropout_p > 0``. Its mask is regenerated from ``seed`` in backward, never stored; with
    ``seed=None`` a seed is drawn from torch's default generator (only when dropout is active).

    dtypes: x, weight and bias must share a dtype (TypeError otherwise). LoRA factors of another
    floating dtype (e.g. fp32 adapters on a bf16 model) are cast to x's dtype for the fused
    compute; their gradients come back in their own dtype through that cast.
    """
    _check_inputs(x, weight, lora_A, lora_B, bias, scale)
    _check_p(dropout_p)
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        seed = 0
    elif seed is None:
        seed = _draw_seed_tensor() if torch.compiler.is_compiling() else draw_seed()
    elif isinstance(seed, Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(
                f"a tensor seed must be a 0-d int64 CPU tensor, got {seed.dtype} {tuple(seed.shape)} on {seed.device}"
            )
    else:
        _check_seed(seed)

    device = x.device
    autocast = torch.is_autocast_enabled(device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(device.type)
        x, lora_A, lora_B = (t.to(dtype) for t in (x, lora_A, lora_B))
        weight = weight if isinstance(weight, QUANTIZED) else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    quant = isinstance(weight, QUANTIZED)
    if not quant and weight.dtype != x.dtype:
        raise TypeError(f"x dtype {x.dtype} != weight dtype {weight.dtype}; cast one (autocast does this)")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} != x dtype {x.dtype}")
    if lora_A.dtype != x.dtype:
        lora_A = lora_A.to(x.dtype)
    if lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)

    name = _resolve(backend, device, x.dtype)
    if name == "reference":
        mask = None
        if p > 0.0:
            K = x.shape[-1]
            mask = backends.load("torch").dropout_mask(x.numel() // max(K, 1), K, p, seed, device).view(x.shape)
        if quant:
            weight = weight.dequantize(x.dtype)
        return reference.lora_linear_ref(x, weight, lora_A, lora_B, float(scale), bias, mask, p)
    route = backends.get_quant_route()
    if name == "plans":
        name = _plan_backend(x, weight, bias, lora_A, lora_B, scale, p, route, quant)
    mod = backends.load(name)
    if autocast:
        with torch.autocast(device.type, enabled=False):
            y = LoRAFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), p, seed, mod, route)
    else:
        y = LoRAFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), p, seed, mod, route)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _plan_backend(x, weight, bias, lora_A, lora_B, scale, p, route, quant: bool) -> str:
    """ "auto" on CUDA: the backend module name of the plan chosen for this shape."""
    qname = "dense"
    if quant:
        qname = "int8" if isinstance(weight, Int8Weight) else ("nf4-dq" if weight.double_quant else "nf4")
    if qname.startswith("nf4"):
        qname += f"-b{weight.blocksize}"
    plan = plans.CHOOSER.choose(x, weight, bias, lora_A, lora_B, float(scale), p, route, qname)
    return plans.module_name(plan)
