"""PEFT drop-in: ``patch_peft()`` makes PEFT's LoRA ``Linear`` layers run the fused op.

The patch replaces PEFT's own forward functions, so it reaches models built before and after the
call: ``peft.tuners.lora.layer.Linear.forward`` (dense ``nn.Linear`` bases) and, when
bitsandbytes imports, ``peft.tuners.lora.bnb.Linear4bit.forward`` (NF4 bases, run through
:class:`fastlora.NF4Weight` views of bitsandbytes' own bytes) and ``Linear8bitLt.forward`` (only
to log that it falls back). Modules, parameter names, state-dict keys, adapter switching,
merging and saving are PEFT's own and untouched. Every call first checks that the layer is in
the covered case (vanilla LoRA or DoRA adapters, PEFT's dtype rules, ...); anything else runs
PEFT's original forward and is logged once per reason on the ``fastlora.peft`` logger. peft
and bitsandbytes are imported only inside :func:`patch_peft`, so this module imports without
them.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .dora import dora_linear
from .functional import lora_linear
from .quant import SUPPORTED_BLOCKSIZES, NF4Weight
from .quant.bnb import nf4_view

logger = logging.getLogger("fastlora.peft")

# PEFT's forwards, captured by patch_peft; kept after unpatch_peft, so that a bound method taken
# while patched still falls back correctly.
_original_forward = None  # peft.tuners.lora.layer.Linear.forward
_original_forward_4bit = None  # peft.tuners.lora.bnb.Linear4bit.forward
_original_forward_8bit = None  # peft.tuners.lora.bnb.Linear8bitLt.forward
# Classes cached by patch_peft so that calls do no import.
_peft_linear: type | None = None
_peft_linear4bit: type | None = None
_bnb_linear4bit: type | None = None  # bitsandbytes.nn.Linear4bit
_dora_variant: type | None = None  # peft.tuners.lora.variants.DoraLinearVariant
_dora_layer: type | None = None  # peft.tuners.lora.dora.DoraLinearLayer
_variant_kwargs: frozenset[str] = frozenset()
_logged: set[str] = set()
_HALF = (torch.float16, torch.bfloat16)
_AUTOCAST_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))  # what autocast recasts
_PLAIN = (Tensor, nn.Parameter)


class _Plan(NamedTuple):
    names: list[str]  # active adapters to fuse
    dora: bool  # one DoRA adapter (names has one entry)
    compute_dtype: torch.dtype | None  # bitsandbytes: x and bias go to it, the result back; else None


def patch_peft() -> None:
    """Make PEFT's LoRA ``Linear`` layers, existing or created later, compute their forward with
    fastlora's fused op. Idempotent.

    Fused: ``peft.tuners.lora.layer.Linear`` on a plain ``nn.Linear`` base and, when
    bitsandbytes imports, ``peft.tuners.lora.bnb.Linear4bit`` on an NF4 ``bitsandbytes``
    ``Linear4bit`` base; vanilla LoRA (one adapter, or several summed) or DoRA (one adapter),
    with or without ``lora_dropout``. Layers outside the covered case fall back to PEFT's own
    forward, logged once per reason (logger ``"fastlora.peft"``, level INFO); that includes
    ``Linear8bitLt``. Other LoRA layer classes (Conv, Embedding, torchao, ...) are not touched.
    Raises ImportError when peft is not installed.
    """
    global _original_forward, _original_forward_4bit, _original_forward_8bit
    global _peft_linear, _peft_linear4bit, _bnb_linear4bit, _dora_variant, _dora_layer, _variant_kwargs
    try:
        from peft.tuners.lora import dora, layer, variants
    except ImportError as e:
        raise ImportError("fastlora.patch_peft needs the `peft` package (pip install peft)") from e
    changed = False
    if layer.Linear.__dict__["forward"] is not _patched_forward:
        _peft_linear, _variant_kwargs = layer.Linear, frozenset(layer.VARIANT_KWARG_KEYS)
        _dora_variant, _dora_layer = variants.DoraLinearVariant, dora.DoraLinearLayer
        _original_forward = layer.Linear.__dict__["forward"]
        layer.Linear.forward = _patched_forward
        changed = True
    lbnb = _peft_bnb()
    if lbnb is not None and hasattr(lbnb, "Linear4bit"):
        if lbnb.Linear4bit.__dict__["forward"] is not _patched_forward_4bit:
            import bitsandbytes

            _peft_linear4bit, _bnb_linear4bit = lbnb.Linear4bit, bitsandbytes.nn.Linear4bit
            _original_forward_4bit = lbnb.Linear4bit.__dict__["forward"]
            lbnb.Linear4bit.forward = _patched_forward_4bit
            changed = True
    if lbnb is not None and hasattr(lbnb, "Linear8bitLt"):
        if lbnb.Linear8bitLt.__dict__["forward"] is not _patched_forward_8bit:
            _original_forward_8bit = lbnb.Linear8bitLt.__dict__["forward"]
            lbnb.Linear8bitLt.forward = _patched_forward_8bit
            changed = True
    if changed:
        _logged.clear()


def _peft_bnb() -> Any:
    """``peft.tuners.lora.bnb``, or None when bitsandbytes is missing or fails to import."""
    try:
        import bitsandbytes  # noqa: F401
        from peft.tuners.lora import bnb
    except Exception as e:  # bitsandbytes can fail at import with more than ImportError
        logger.debug("fastlora: bitsandbytes LoRA layers not patched (%s: %s)", type(e).__name__, e)
        return None
    return bnb


def unpatch_peft() -> None:
    """Restore PEFT's original forwards (the same function objects). Idempotent; a no-op when not
    patched, and then neither peft nor bitsandbytes is imported."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    if layer is not None and layer.Linear.__dict__.get("forward") is _patched_forward:
        layer.Linear.forward = _original_forward
    lbnb = sys.modules.get("peft.tuners.lora.bnb")
    if lbnb is not None:
        for name, patched, original in (
            ("Linear4bit", _patched_forward_4bit, _original_forward_4bit),
            ("Linear8bitLt", _patched_forward_8bit, _original_forward_8bit),
        ):
            cls = getattr(lbnb, name, None)
            if cls is not None and cls.__dict__.get("forward") is patched:
                cls.forward = original


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.info("fastlora: PEFT's own forward runs for LoRA layers with %s", reason)


def _patched_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    plan = _plan(self, x, args, kwargs, quantized=False)
    if isinstance(plan, str):
        _log_once(plan)
        return _original_forward(self, x, *args, **kwargs)
    base = self.base_layer
    return _fused(self, x, plan, base.weight, base.bias)


def _patched_forward_4bit(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    plan = _plan(self, x, args, kwargs, quantized=True)
    if isinstance(plan, str):
        _log_once(plan)
        return _original_forward_4bit(self, x, *args, **kwargs)
    base = self.base_layer
    # bitsandbytes' Linear4bit.forward side effects, kept so that the layer ends in the same
    # state as under PEFT: the first call fixes compute_dtype, and the bias is cast in place.
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    bias = base.bias
    if bias is not None and bias.dtype != plan.compute_dtype:
        bias.data = bias.data.to(plan.compute_dtype)
    return _fused(self, x, plan, nf4_view(base), bias)


def _patched_forward_8bit(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    _log_once("a bitsandbytes 8-bit base (Linear8bitLt)")
    return _original_forward_8bit(self, x, *args, **kwargs)


def _fused(self: Any, x: Tensor, plan: _Plan, weight: Tensor | NF4Weight, bias: Tensor | None) -> Tensor:
    """The layer's output through the fused op. ``plan.compute_dtype`` (bitsandbytes) is what
    bitsandbytes computes the base in: x is cast to it and the result cast back to x's dtype,
    as ``Linear4bit.forward`` does."""
    out_dtype, c = x.dtype, plan.compute_dtype
    if c is not None and x.dtype != c:
        x = x.to(c)
    names = plan.names
    if plan.dora:
        name = names[0]
        drop = self.lora_dropout[name]
        y = dora_linear(
            x,
            weight,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.lora_magnitude_vector[name].weight,
            scale=self.scaling[name],
            bias=bias,
            dropout_p=drop.p if isinstance(drop, nn.Dropout) else 0.0,
            # PEFT's DoRA takes its dropout branch only when the LoRA layer is training too
            training=drop.training and self.training,
        )
    elif len(names) == 1:
        name = names[0]
        drop = self.lora_dropout[name]
        y = lora_linear(
            x,
            weight,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            scale=self.scaling[name],
            bias=bias,
            dropout_p=drop.p if isinstance(drop, nn.Dropout) else 0.0,
            training=drop.training,
        )
    else:
        # Several adapters, none dropping: sum_i s_i B_i A_i x is one adapter of rank sum(r_i) with
        # A = [A_1; A_2; ...] and B = [s_1 B_1, s_2 B_2, ...]. The cat/mul are tiny (r x K, N x r)
        # and autograd routes each adapter's gradient back through them.
        lora_A = torch.cat([self.lora_A[n].weight for n in names])
        lora_B = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in names], dim=1)
        y = lora_linear(x, weight, lora_A, lora_B, scale=1.0, bias=bias)
    return y if c is None or y.dtype == out_dtype else y.to(out_dtype)


def _hooked(m: nn.Module) -> bool:
    """True when calling ``m`` would do more than ``type(m).forward`` (hooks, accelerate's
    per-instance forward, ...), which the fused op would skip."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or "forward" in m.__dict__
    )


def _plan(self: Any, x: Any, args: tuple, kwargs: dict, quantized: bool) -> _Plan | str:
    """What to fuse, or the reason (a str) to run PEFT's forward instead.

    Mirrors the branches of PEFT's ``Linear.forward`` / ``Linear4bit.forward`` (peft 0.21):
    only the branch that runs the adapters (not disabled, no ``adapter_names``, not merged) is
    fused, for vanilla LoRA and DoRA adapters.
    """
    cls = _peft_linear4bit if quantized else _peft_linear
    if type(self) is not cls:
        return f"a subclass of lora.{cls.__name__} ({type(self).__name__})"
    if kwargs.get("adapter_names") is not None:
        return "a mixed-adapter batch (adapter_names)"
    # PEFT pops the variant kwargs and ignores them on vanilla and DoRA adapters; anything else
    # goes to the base layer, which the fused op cannot take.
    if args or any(k != "adapter_names" and k not in _variant_kwargs for k in kwargs):
        return "extra forward arguments"
    if self.disable_adapters:
        return "disabled adapters"
    if self.merged:
        return "merged adapters"
    if self.fan_in_fan_out:
        return "fan_in_fan_out=True"
    base = self.base_layer
    if quantized:
        if not isinstance(base, _bnb_linear4bit) or type(base).forward is not _bnb_linear4bit.forward:
            return f"a {type(base).__module__}.{type(base).__name__} base layer (not bitsandbytes' Linear4bit)"
    elif type(base) is not nn.Linear:
        return f"a {type(base).__module__}.{type(base).__name__} base layer (not torch.nn.Linear)"
    if _hooked(base):
        return "hooks on the base layer"
    if (
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    ):
        return "global module hooks"
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return "a non-floating-point input"
    autocast = torch.is_autocast_enabled(x.device.type)
    bias = base.bias
    if bias is not None and type(bias) not in _PLAIN:
        return "a tensor-subclass base weight"
    if quantized:
        compute = _plan_4bit(base, x, autocast)
        if isinstance(compute, str):
            return compute
    else:
        compute = None
        weight = base.weight
        if type(weight) not in _PLAIN:
            return "a tensor-subclass base weight"
        if weight.device != x.device:
            return "tensors on different devices"
        if autocast:
            # autocast recasts only these dtypes; others (float64) would stay as they are in PEFT
            dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
            if not dtypes <= _AUTOCAST_DTYPES:
                return "autocast with a tensor it does not recast (float64)"
        elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            return "an input dtype different from the base layer's"

    names = [n for n in self.active_adapters if n in self.lora_A]
    if not names:
        return "no active adapter on the layer"
    a_dtype = None
    dropping = dora = False
    for n in names:
        if n in self.lora_variant:
            variant = self.lora_variant[n]
            if type(variant) is not _dora_variant:
                return f"the LoRA variant {type(variant).__name__}"
            dora = True
        elif n in self.lora_magnitude_vector:
            return "a DoRA magnitude vector without the DoRA variant"
        if self.lora_bias.get(n, False):
            return "lora_bias=True"
        mod_A, mod_B, drop = self.lora_A[n], self.lora_B[n], self.lora_dropout[n]
        if type(mod_A) is not nn.Linear or type(mod_B) is not nn.Linear or mod_A.bias is not None:
            return "non-standard lora_A/lora_B modules"
        if mod_B.bias is not None:
            return "a bias on lora_B"
        if _hooked(mod_A) or _hooked(mod_B) or _hooked(drop):
            return "hooks on lora_A, lora_B or lora_dropout"
        if type(drop) is nn.Dropout:
            if drop.inplace:
                return "an in-place lora_dropout"
            dropping |= drop.training and drop.p > 0
        elif type(drop) is not nn.Identity:
            return f"a {type(drop).__name__} lora_dropout"
        s = self.scaling[n]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            return "a non-float scaling"
        A, B = mod_A.weight, mod_B.weight
        if type(A) not in _PLAIN or type(B) not in _PLAIN:
            return "tensor-subclass adapter weights"
        if A.dtype != B.dtype or (a_dtype is not None and A.dtype != a_dtype):
            return "adapters of different dtypes"
        a_dtype = A.dtype
        if A.device != x.device or B.device != x.device:
            return "tensors on different devices"
        if n in self.lora_variant:
            mag_layer = self.lora_magnitude_vector[n]
            if type(mag_layer) is not _dora_layer or mag_layer.fan_in_fan_out:
                return "a non-standard DoRA magnitude layer"
            if _hooked(mag_layer):
                return "hooks on the DoRA magnitude layer"
            m = mag_layer.weight
            if type(m) not in _PLAIN:
                return "a tensor-subclass DoRA magnitude"
            if m.dtype != a_dtype:
                return "a DoRA magnitude of another dtype than the adapters"
            if m.device != x.device:
                return "tensors on different devices"
    if dora and len(names) > 1:
        return "several active adapters with DoRA"
    if dora and autocast:
        return "DoRA under autocast"
    # PEFT runs the LoRA branch in the adapters' dtype (x cast to it); the fused op runs it in the
    # base's compute dtype. Fused: equal dtypes, and the usual mixed case of float32 adapters on
    # a half/bf16 base, where the only difference is rounding of the rank-r branch (see tests).
    base_dtype = compute if quantized else x.dtype
    if not autocast and a_dtype != base_dtype:
        cast_ok = getattr(self, "cast_input_dtype_enabled", True)
        if not (a_dtype == torch.float32 and base_dtype in _HALF and cast_ok):
            if quantized:
                return f"{a_dtype} adapters with a {base_dtype} compute dtype"
            return f"{a_dtype} adapters on a {x.dtype} input"
    if autocast and a_dtype not in _AUTOCAST_DTYPES:
        return "autocast with a tensor it does not recast (float64)"
    if quantized and x.dtype != a_dtype and not getattr(self, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled"
    # One fused call per layer needs one dropout mask; PEFT draws one per adapter.
    if dropping and len(names) > 1:
        return "several active adapters with dropout in training"
    return _Plan(names, dora, compute)


def _plan_4bit(base: nn.Module, x: Tensor, autocast: bool) -> torch.dtype | str:
    """The dtype bitsandbytes' ``Linear4bit.forward`` computes in for this input, or the reason
    to fall back."""
    if autocast:
        return "autocast on a bitsandbytes 4-bit base"
    weight = base.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None or not getattr(weight, "bnb_quantized", False):
        return "a bitsandbytes 4-bit weight that is not quantized (no quant_state)"
    if qs.quant_type != "nf4":
        return f"bitsandbytes {qs.quant_type} 4-bit weights (only nf4 is fused)"
    if getattr(qs, "packing_format_for_cpu", False):
        return "bitsandbytes' repacked CPU inference layout (packing_format_for_cpu)"
    N, K = base.out_features, base.in_features
    if tuple(qs.shape) != (N, K) or x.shape[-1] != K:
        return "a 4-bit weight of another shape than the layer's"
    if qs.blocksize not in SUPPORTED_BLOCKSIZES or (qs.nested and qs.state2 is None):
        return "an unsupported 4-bit quant state"
    data = weight.data
    if not data.is_contiguous() or data.numel() * data.element_size() != (N * K + 1) // 2:
        return "an unexpected bitsandbytes weight layout"
    qs_tensors = [qs.absmax] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
    if data.device != x.device or any(not isinstance(t, Tensor) or t.device != x.device for t in qs_tensors):
        return "tensors on different devices"
    # bitsandbytes' set_compute_type: the first float32/bfloat16 input fixes compute_dtype; with
    # none set, x's own dtype is used
    compute = base.compute_dtype
    if not base.compute_type_is_set and x.dtype in (torch.float32, torch.bfloat16):
        compute = x.dtype
    compute = compute or x.dtype
    if compute not in _AUTOCAST_DTYPES:
        return f"a {compute} compute dtype on a bitsandbytes base"
    return compute
