"""Named adapters over a model: add, list, hot-swap (``set_adapter``), delete.

``set_adapter(model, name)`` activates ``name`` on every layer that has it and leaves the others
with no active adapter (their base linear only), as PEFT does. A new adapter (``add_adapter``)
becomes active only when the model had no active adapter; otherwise it is added inactive.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from ..nn import ADAPTER_TENSORS, AdapterConfig, LoRALinear, _matches, check_adapter_name, lora_layers

_LAYER_OPTIONS = frozenset({"lora_fa", "dynamic_rank", "quant", "blocksize", "double_quant"})


def _layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no fastlora LoRALinear layers (see fastlora.inject / load_adapter)")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """Every adapter name on any LoRA layer of ``model``, in the order first seen."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter active on ``model``'s LoRA layers (None when none is). Raises ValueError when
    layers were set to different ones one by one."""
    active = {layer.active_adapter for _, layer in lora_layers(model)} - {None}
    if len(active) > 1:
        raise ValueError(f"layers have different active adapters {sorted(active)}; use set_adapter(model, name)")
    return next(iter(active), None)


def _had_active(model: nn.Module) -> bool:
    return any(layer.active_adapter is not None for _, layer in lora_layers(model))


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Activate adapter ``name`` on every LoRA layer that has it; the other layers get no active
    adapter (base linear only). ``None`` deactivates every adapter. O(number of layers): Parameter
    objects are swapped, no tensor is copied and the base weights are not touched. Merged layers
    are unmerged first, with a warning (as PEFT). Returns ``model``."""
    layers = _layers(model)
    if name is not None and not any(name in layer.adapter_names for _, layer in layers):
        raise ValueError(f"no adapter {name!r} in the model; its adapters: {list_adapters(model)}")
    changing = [(layer, name if name in layer.adapter_names else None) for _, layer in layers]
    changing = [(layer, new) for layer, new in changing if new != layer.active_adapter]
    for layer, _ in changing:
        if layer.active_adapter is not None:
            layer.adapter_config()  # validates the active settings now, not half-way through the swaps
    if any(layer.merged for layer, _ in changing):
        _warn_unmerge("set_adapter")
    for layer, new in changing:
        layer.unmerge()
        layer.set_adapter(new)
    return model


def _warn_unmerge(what: str) -> None:
    warnings.warn(f"fastlora: {what} on merged layers; unmerging them first (as PEFT)", stacklevel=3)


def delete_adapter(model: nn.Module, name: str, new_active: str | None = None) -> nn.Module:
    """Remove adapter ``name`` from every layer. The active adapter is deleted only when
    ``new_active`` names another adapter to activate first (or after ``set_adapter(model, None)``);
    otherwise ValueError, and nothing changes. Layers left without adapters compute their base
    linear. Returns ``model``."""
    layers = _layers(model)
    holders = [layer for _, layer in layers if name in layer.adapter_names]
    if not holders:
        raise ValueError(f"no adapter {name!r} in the model; its adapters: {list_adapters(model)}")
    if any(layer.active_adapter == name for layer in holders):
        if new_active is None:
            raise ValueError(
                f"adapter {name!r} is active; pass new_active=<another adapter> or call set_adapter(model, other "
                "or None) before deleting it"
            )
        if new_active == name:
            raise ValueError("new_active must name another adapter than the one deleted")
        set_adapter(model, new_active)  # validates new_active before anything changes
    for layer in holders:
        layer.delete_adapter(name)
    return model


def _check_targets(target_modules: str | Iterable[str]) -> str | list[str]:
    if isinstance(target_modules, str):
        return target_modules
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {targets!r}")
    return targets


def _check_options(options: dict) -> None:
    unknown = set(options) - _LAYER_OPTIONS
    if unknown:
        raise TypeError(f"unexpected options {sorted(unknown)}; layer options are {sorted(_LAYER_OPTIONS)}")


def _freeze_base(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter but the active adapters' (as ``inject``)."""
    keep = {
        id(p) for _, layer in lora_layers(model) for k in ADAPTER_TENSORS if (p := getattr(layer, k, None)) is not None
    }
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _build_new_layers(model: nn.Module, build):
    """Run ``build()``, which wraps nn.Linear modules in new LoRALinear layers without attaching
    them, and undo its only side effect on the model (shared weights frozen) if it raises."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        return build()
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def add_adapter(
    model: nn.Module,
    name: str,
    target_modules: str | Iterable[str] | None = None,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    **options,
) -> nn.Module:
    """Add a new adapter ``name`` (initialised as PEFT: equal to the base) to the LoRA layers of
    ``model`` (``target_modules=None``), or to the modules ``target_modules`` selects (as
    :func:`fastlora.inject`: names matched exactly or as a dotted suffix, or a regex), wrapping
    plain ``nn.Linear`` ones in new LoRALinear layers built with ``options`` (``lora_fa``,
    ``dynamic_rank``, ``quant``, ``blocksize``, ``double_quant``; the base of such a layer is
    frozen). The adapter is activated only if the model had no active adapter. Returns ``model``."""
    check_adapter_name(name)
    _check_options(options)
    cfg = AdapterConfig(r, lora_alpha, lora_dropout, use_rslora, use_dora)
    if target_modules is None:
        targets = _layers(model)
    else:
        targets_spec = _check_targets(target_modules)
        targets = [
            (n, m)
            for n, m in model.named_modules()
            if n and (isinstance(m, LoRALinear) or type(m) is nn.Linear) and _matches(n, targets_spec)
        ]
        if not targets:
            raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear or LoRALinear module")
    for n, m in targets:
        if isinstance(m, LoRALinear) and name in m.adapter_names:
            raise ValueError(f"adapter {name!r} already exists on {n!r}")
        if isinstance(m, LoRALinear) and use_dora and m.merged:
            raise ValueError(f"{n!r} is merged: unmerge first (a DoRA magnitude starts from the unmerged base)")
    had_active = _had_active(model)

    def build() -> dict:
        out = {}
        for n, m in targets:
            if isinstance(m, LoRALinear):
                out[n] = m._new_adapter_tensors(cfg)
            else:
                out[n] = LoRALinear.from_linear(
                    m, r, lora_alpha, lora_dropout, use_rslora, use_dora=use_dora, adapter_name=name, **options
                )
        return out

    built = _build_new_layers(model, build)
    # commit: nothing below can fail
    for n, m in targets:
        if isinstance(m, LoRALinear):
            m._put_adapter(name, cfg, built[n])
        else:
            _replace_module(model, n, built[n])
            if had_active:
                built[n].set_adapter(None)
    if any(not isinstance(m, LoRALinear) for _, m in targets):
        _freeze_base(model)
    if not had_active:
        set_adapter(model, name)
    return model
