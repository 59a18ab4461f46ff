"""PEFT drop-in: ``patch_peft()`` makes PEFT's LoRA ``Linear`` layers run the fused op.

The patch replaces one function, ``peft.tuners.lora.layer.Linear.forward``, so it reaches
models built before and after the call. Modules, parameter names, state-dict keys, adapter
switching, merging and saving are PEFT's own and untouched. Every call first checks that the
layer is in the covered case (plain ``nn.Linear`` base, vanilla LoRA adapters, PEFT's dtype
rules, ...); anything else runs PEFT's original forward and is logged once per reason on the
``fastlora.peft`` logger. peft is imported only inside :func:`patch_peft`, so this module
imports without it.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .functional import lora_linear

logger = logging.getLogger("fastlora.peft")

_original_forward = None  # PEFT's Linear.forward, captured by patch_peft
_peft_linear: type | None = None  # peft.tuners.lora.layer.Linear, cached so calls do no import
_variant_kwargs: frozenset[str] = frozenset()
_logged: set[str] = set()
_HALF = (torch.float16, torch.bfloat16)
_AUTOCAST_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))  # what autocast recasts
_PLAIN = (Tensor, nn.Parameter)


def patch_peft() -> None:
    """Make every PEFT LoRA ``Linear`` layer (``peft.tuners.lora.layer.Linear``), existing or
    created later, compute its forward with :func:`fastlora.lora_linear`. Idempotent.

    Layers outside the covered case fall back to PEFT's own forward, logged once per reason
    (logger ``"fastlora.peft"``, level INFO). Other LoRA layer classes (Conv, Embedding,
    bitsandbytes ``Linear4bit``/``Linear8bitLt``, torchao, ...) are not touched.
    Raises ImportError when peft is not installed.
    """
    global _original_forward, _peft_linear, _variant_kwargs
    try:
        from peft.tuners.lora import layer
    except ImportError as e:
        raise ImportError("fastlora.patch_peft needs the `peft` package (pip install peft)") from e
    if layer.Linear.__dict__["forward"] is _patched_forward:
        return
    _peft_linear, _variant_kwargs = layer.Linear, frozenset(layer.VARIANT_KWARG_KEYS)
    _original_forward = layer.Linear.__dict__["forward"]
    _logged.clear()
    layer.Linear.forward = _patched_forward


def unpatch_peft() -> None:
    """Restore PEFT's original ``Linear.forward`` (the same function object). Idempotent; a no-op
    when not patched, and then peft is not imported."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    if layer is not None and layer.Linear.__dict__.get("forward") is _patched_forward:
        layer.Linear.forward = _original_forward
    # _original_forward is kept: a bound method taken while patched still falls back correctly.


def _patched_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    plan = _plan(self, x, args, kwargs)
    if isinstance(plan, str):
        if plan not in _logged:
            _logged.add(plan)
            logger.info("fastlora: PEFT's own forward runs for LoRA layers with %s", plan)
        return _original_forward(self, x, *args, **kwargs)
    base = self.base_layer
    if len(plan) == 1:
        name = plan[0]
        drop = self.lora_dropout[name]
        return lora_linear(
            x,
            base.weight,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            scale=self.scaling[name],
            bias=base.bias,
            dropout_p=drop.p if isinstance(drop, nn.Dropout) else 0.0,
            training=drop.training,
        )
    # Several adapters, none dropping: sum_i s_i B_i A_i x is one adapter of rank sum(r_i) with
    # A = [A_1; A_2; ...] and B = [s_1 B_1, s_2 B_2, ...]. The cat/mul are tiny (r x K, N x r)
    # and autograd routes each adapter's gradient back through them.
    lora_A = torch.cat([self.lora_A[n].weight for n in plan])
    lora_B = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in plan], dim=1)
    return lora_linear(x, base.weight, lora_A, lora_B, scale=1.0, bias=base.bias)


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


def _plan(self: Any, x: Any, args: tuple, kwargs: dict) -> list[str] | str:
    """The active adapter names to fuse, or the reason (a str) to run PEFT's forward instead.

    Mirrors the branches of PEFT's ``Linear.forward`` (peft 0.21): only its vanilla-LoRA branch
    (not disabled, no ``adapter_names``, not merged, no variant) is fused.
    """
    if type(self) is not _peft_linear:
        return f"a subclass of lora.Linear ({type(self).__name__})"
    if kwargs.get("adapter_names") is not None:
        return "a mixed-adapter batch (adapter_names)"
    # PEFT pops the variant kwargs and ignores them on vanilla adapters; anything else goes to
    # the base layer, which a fused nn.Linear cannot take.
    if args or any(k != "adapter_names" and k not in _variant_kwargs for k in kwargs):
        return "extra forward arguments"
    if self.disable_adapters:
        return "disabled adapters"
    if self.merged:
        return "merged adapters"
    if self.fan_in_fan_out:
        return "fan_in_fan_out=True"
    base = self.base_layer
    if type(base) is not nn.Linear:
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
    weight, bias = base.weight, base.bias
    if type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return "a tensor-subclass base weight"
    if weight.device != x.device:
        return "tensors on different devices"

    names = [n for n in self.active_adapters if n in self.lora_A]
    if not names:
        return "no active adapter on the layer"
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        # autocast recasts only these dtypes; others (float64) would stay as they are in PEFT
        dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
        if not dtypes <= _AUTOCAST_DTYPES:
            return "autocast with a tensor it does not recast (float64)"
    elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "an input dtype different from the base layer's"
    a_dtype = None
    dropping = False
    for n in names:
        if n in self.lora_variant:
            return f"the LoRA variant {type(self.lora_variant[n]).__name__}"
        if self.lora_bias.get(n, False):
            return "lora_bias=True"
        if n in self.lora_magnitude_vector:
            return "a DoRA magnitude vector"
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
    # PEFT runs the LoRA branch in the adapters' dtype (x cast to it); the fused op runs it in x's
    # dtype. Fused: equal dtypes, and the usual mixed case of float32 adapters on a half/bf16
    # base, where the only difference is rounding of the rank-r branch (see the tests).
    if not autocast and a_dtype != x.dtype:
        mixed_ok = a_dtype == torch.float32 and x.dtype in _HALF and getattr(self, "cast_input_dtype_enabled", True)
        if not mixed_ok:
            return f"{a_dtype} adapters on a {x.dtype} input"
    if autocast and a_dtype not in _AUTOCAST_DTYPES:
        return "autocast with a tensor it does not recast (float64)"
    # One fused call per layer needs one dropout mask; PEFT draws one per adapter.
    if dropping and len(names) > 1:
        return "several active adapters with dropout in training"
    return names
