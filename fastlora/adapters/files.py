"""Adapter files in PEFT's format: ``save_adapter`` and ``load_adapter`` (see the package
docstring for the format and the guarantees)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..nn import ADAPTER_TENSORS, AdapterConfig, LoRALinear, _matches, check_adapter_name, lora_layers
from .format import _KEY_SUFFIXES, CONFIG_NAME, KEY_PREFIX, PICKLE_NAME, WEIGHTS_NAME, _FileConfig, _read_config
from .model import (
    _build_new_layers,
    _check_options,
    _freeze_base,
    _had_active,
    _replace_module,
    _warn_unmerge,
    active_adapter,
    list_adapters,
    set_adapter,
)


def _resolve_name(model: nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    name = active_adapter(model)
    if name is None:
        names = list_adapters(model)
        if len(names) != 1:
            raise ValueError(f"no active adapter; name the one to save (adapters: {names})")
        name = names[0]
    return name


def _only(values: list, what: str, name: str):
    distinct = list(dict.fromkeys(values))
    if len(distinct) != 1:
        raise ValueError(
            f"adapter {name!r} has {what} {distinct} on different layers; PEFT's format holds one value per "
            "adapter (rank and alpha may differ: rank_pattern / alpha_pattern)"
        )
    return distinct[0]


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]  # ties: the first seen


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("fastlora's adapter files need the `safetensors` package (pip install safetensors)") from e
    return safetensors.torch


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write adapter ``adapter_name`` (default: the active one) of ``model`` to directory ``path``
    in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter tensors
    only, never the base, so quantized bases change nothing). Ranks and alphas that differ by
    layer go to ``rank_pattern`` / ``alpha_pattern``; lora_dropout, use_rslora and use_dora must be
    the same on every layer (PEFT keeps one value). ``PeftModel.from_pretrained(base, path)``
    loads the result."""
    st = _safetensors()
    name = _resolve_name(model, adapter_name)
    entries = [(p, layer) for p, layer in lora_layers(model) if name in layer.adapter_names]
    if not entries:
        raise ValueError(f"no adapter {name!r} in the model; its adapters: {list_adapters(model)}")
    if any(p == "" for p, _ in entries):
        raise ValueError("the model is itself a LoRALinear; save the model that contains it")
    cfgs = {p: layer.adapter_config(name) for p, layer in entries}
    dropout = _only([c.lora_dropout for c in cfgs.values()], "lora_dropout", name)
    rslora = _only([c.use_rslora for c in cfgs.values()], "use_rslora", name)
    dora = _only([c.use_dora for c in cfgs.values()], "use_dora", name)
    r = _most_common([c.r for c in cfgs.values()])
    alpha = _most_common([c.lora_alpha for c in cfgs.values()])
    # PEFT reads a pattern key as a regex matched at a dotted boundary: escaped full paths are exact
    rank_pattern = {re.escape(p): c.r for p, c in cfgs.items() if c.r != r}
    alpha_pattern = {re.escape(p): c.lora_alpha for p, c in cfgs.items() if c.lora_alpha != alpha}
    paths = sorted(cfgs)
    short = sorted({p.rpartition(".")[2] for p in paths})
    matched = {n for n, _ in model.named_modules() if n and _matches(n, short)}
    target_modules = short if matched == set(paths) else paths  # short names only if they select exactly these
    tensors = {}
    for p, layer in entries:
        t = layer.adapter_tensors(name)
        tensors[f"{KEY_PREFIX}{p}.lora_A.weight"] = t["lora_A"]
        tensors[f"{KEY_PREFIX}{p}.lora_B.weight"] = t["lora_B"]
        if dora:
            tensors[f"{KEY_PREFIX}{p}.lora_magnitude_vector"] = t["lora_magnitude_vector"]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path if isinstance(name_or_path, str) and name_or_path else None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "use_dora": dora,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / WEIGHTS_NAME, st.save(tensors, metadata={"format": "pt"}))
    _write_atomic(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _read_tensors(file: Path) -> dict[str, Tensor]:
    st = _safetensors()
    try:
        tensors = st.load_file(file, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
        raise ValueError(f"{file}: not a valid safetensors file (damaged or truncated?): {e}") from e
    if not tensors:
        raise ValueError(f"{file}: holds no tensors")
    return tensors


def _group(tensors: dict[str, Tensor], file: Path) -> dict[str, dict[str, Tensor]]:
    """{module path: {"lora_A": ..., "lora_B": ..., "lora_magnitude_vector": ...}}"""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        kind = None
        if key.startswith(KEY_PREFIX):
            rest = key[len(KEY_PREFIX) :]
            for suffix, k in _KEY_SUFFIXES:
                if rest.endswith(suffix):
                    path, kind = rest[: -len(suffix)], k
                    break
        if kind is None:
            raise ValueError(
                f"{file}: unsupported key {key!r}; fastlora loads base_model.model.<module>.lora_A.weight, "
                ".lora_B.weight and .lora_magnitude_vector of Linear layers only (no base weights, biases, "
                "embeddings or modules_to_save)"
            )
        if kind in groups.setdefault(path, {}):
            raise ValueError(f"{file}: two {kind} tensors for module {path!r}")
        groups[path][kind] = t
    return groups


@dataclass
class _Plan:
    path: str
    module: nn.Module  # the LoRALinear to add to, or the nn.Linear to wrap
    cfg: AdapterConfig
    tensors: dict[str, Tensor | None]  # already on the target device and dtype
    new_layer: LoRALinear | None = None


def _plan_module(model: nn.Module, path: str, group: dict[str, Tensor], fcfg: _FileConfig, name: str, file: Path):
    where = f"{file}: module {path!r}"
    try:
        module = model.get_submodule(path)
    except AttributeError:
        some = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) or type(m) is nn.Linear][:10]
        raise ValueError(f"{where} is not in the model (its Linear modules include {some})") from None
    if not (isinstance(module, LoRALinear) or type(module) is nn.Linear):
        raise ValueError(f"{where} is a {type(module).__name__}, not an nn.Linear or fastlora LoRALinear")
    if path == "" and not isinstance(module, LoRALinear):
        raise ValueError(f"{where}: the model is itself an nn.Linear; wrap it in a module to load an adapter")
    for kind in ("lora_A", "lora_B"):
        if kind not in group:
            other = "lora_B" if kind == "lora_A" else "lora_A"
            raise ValueError(f"{where}: {other} without {kind}")
    has_m = "lora_magnitude_vector" in group
    if has_m != fcfg.use_dora:
        raise ValueError(
            f"{where}: {'a' if has_m else 'no'} lora_magnitude_vector but the config says use_dora={fcfg.use_dora}"
        )
    for kind, t in group.items():
        if not t.is_floating_point():
            raise ValueError(f"{where}: {kind} has dtype {t.dtype}; adapter tensors must be floating point")
        if not bool(torch.isfinite(t).all()):  # refused, not warned: NaN/inf would poison every output
            raise ValueError(f"{where}: {kind} has NaN or inf entries")
    cfg = fcfg.for_module(path)
    A, B = group["lora_A"], group["lora_B"]
    n_out, n_in = module.out_features, module.in_features
    if tuple(A.shape) != (cfg.r, n_in):
        raise ValueError(f"{where}: lora_A has shape {tuple(A.shape)}, expected (r, in) = ({cfg.r}, {n_in})")
    if tuple(B.shape) != (n_out, cfg.r):
        raise ValueError(f"{where}: lora_B has shape {tuple(B.shape)}, expected (out, r) = ({n_out}, {cfg.r})")
    if has_m and tuple(group["lora_magnitude_vector"].shape) != (n_out,):
        shape = tuple(group["lora_magnitude_vector"].shape)
        raise ValueError(f"{where}: lora_magnitude_vector has shape {shape}, expected ({n_out},)")
    if isinstance(module, LoRALinear):
        has = name in module.adapter_names
        dtype = module.adapter_tensors(name)["lora_A"].dtype if has else module._adapter_dtype()
    else:
        dtype = module.weight.dtype
    device = module.weight.device
    tensors = {k: group[k].to(device=device, dtype=dtype).contiguous() if k in group else None for k in ADAPTER_TENSORS}
    return _Plan(path, module, cfg, tensors)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", **options) -> nn.Module:
    """Load a PEFT-format LoRA adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``, e.g. from PEFT's ``save_pretrained`` or :func:`save_adapter`)
    into ``model`` as adapter ``adapter_name``.

    - Modules are taken from the file's keys: an ``nn.Linear`` is wrapped in a new LoRALinear
      (built with ``options``: ``lora_fa``, ``dynamic_rank``, ``quant``, ``blocksize``,
      ``double_quant``; the model's other parameters are then frozen, as ``inject``); a
      LoRALinear gets the adapter added, or replaced if it has one of that name (then the file
      must cover exactly the layers holding it).
    - The adapter becomes active if the model had no active adapter (a plain model) or it
      replaces the active one; otherwise it is added inactive (``set_adapter`` to use it).
    - Adapter tensors take the dtype of the layer's adapters (a new layer: its base's dtype).
    - Never unpickles: a directory with only ``adapter_model.bin`` is refused. A damaged,
      truncated or mismatched file (bad JSON, unsupported config, unknown module, wrong shape,
      non-floating dtype, missing lora_A/lora_B, NaN/inf) raises ValueError and leaves the model
      unchanged; everything is checked and built before the model is touched.

    Returns ``model``.
    """
    check_adapter_name(adapter_name)
    _check_options(options)
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} not found")
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        if (d / PICKLE_NAME).exists():
            raise ValueError(
                f"{d} holds only {PICKLE_NAME}, a pickle; fastlora loads safetensors only and never unpickles. Convert "
                f"it once, where you trust the file: safetensors.torch.save_file(torch.load('{PICKLE_NAME}', "
                f"weights_only=True), '{WEIGHTS_NAME}')"
            )
        raise FileNotFoundError(f"{weights} not found")
    fcfg = _read_config(d / CONFIG_NAME)
    groups = _group(_read_tensors(weights), weights)
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    paths = sorted(groups, key=lambda p: (order.get(p, len(order)), p))  # model order
    plans = [_plan_module(model, p, groups[p], fcfg, adapter_name, weights) for p in paths]
    holders = {p for p, layer in lora_layers(model) if adapter_name in layer.adapter_names}
    if holders and holders != set(groups):
        extra = sorted(holders - set(groups))[:5]
        raise ValueError(
            f"adapter {adapter_name!r} exists on layers the file does not cover ({extra}...) or the file covers "
            "layers without it; load it under another adapter_name, or delete_adapter first"
        )
    had_active = _had_active(model)
    if any(
        isinstance(p.module, LoRALinear) and p.module.merged and p.module.active_adapter == adapter_name for p in plans
    ):
        _warn_unmerge("load_adapter replacing the active adapter")

    def build() -> None:
        with torch.no_grad():
            for plan in plans:
                if isinstance(plan.module, LoRALinear):
                    continue
                c = plan.cfg
                layer = LoRALinear._from_linear(
                    plan.module, c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, False,
                    use_dora=c.use_dora, adapter_name=adapter_name, **options,
                )  # fmt: skip
                layer._put_adapter(adapter_name, c, plan.tensors)
                plan.new_layer = layer

    _build_new_layers(model, build)
    # commit: nothing below can fail
    for plan in plans:
        if plan.new_layer is None:
            plan.module._put_adapter(adapter_name, plan.cfg, plan.tensors)
        else:
            _replace_module(model, plan.path, plan.new_layer)
            if had_active:
                plan.new_layer.set_adapter(None)
    if any(plan.new_layer is not None for plan in plans):
        _freeze_base(model)
    if not had_active:
        set_adapter(model, adapter_name)
    return model
