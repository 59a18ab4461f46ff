"""The adapter file format (PEFT's): names, tensor keys, and ``adapter_config.json`` read and
checked into a :class:`_FileConfig`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..nn import AdapterConfig
from .patterns import _SafePattern

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# PEFT writes the DoRA magnitude without ".weight"; ".weight" is accepted too (a hand-made file)
_KEY_SUFFIXES = (
    (".lora_A.weight", "lora_A"),
    (".lora_B.weight", "lora_B"),
    (".lora_magnitude_vector", "lora_magnitude_vector"),
    (".lora_magnitude_vector.weight", "lora_magnitude_vector"),
)
# LoraConfig fields that, when set, mean something fastlora does not compute (variants, extra
# trained tensors, transposed weights): such files are refused instead of loaded wrongly
_UNSUPPORTED_FIELDS = (
    "fan_in_fan_out",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "megatron_config",
    "use_qalora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
# init_lora_weights values that only change the initialisation (the others, e.g. "pissa",
# "olora", "corda", "loftq", "lora_ga", rewrite the base weights, or are forward variants)
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


@dataclass
class _FileConfig:
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def for_module(self, path: str) -> AdapterConfig:
        return AdapterConfig(
            _pattern_value(self.rank_pattern, path, self.r),
            _pattern_value(self.alpha_pattern, path, self.lora_alpha),
            self.lora_dropout,
            self.use_rslora,
            self.use_dora,
        )


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's ``get_pattern_key``: the first key whose regex matches the path at a dotted boundary,
    ``re.match(rf"(.*\.)?({key})$", path)``, decided by :class:`_SafePattern` (linear time)."""
    for key, value in pattern.items():
        if _SafePattern.of(key).match(path):
            return value
    return default


def _read_config(file: Path) -> _FileConfig:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{file}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {raw.get('peft_type')!r}; fastlora loads LoRA adapters ('LORA') only")
    for key in _UNSUPPORTED_FIELDS:
        if raw.get(key):
            raise ValueError(f"{file}: {key}={raw[key]!r} is not supported by fastlora (LoRA on Linear layers only)")
    if raw.get("bias", "none") not in (None, "none"):
        raise ValueError(f"{file}: bias={raw['bias']!r} (trained base biases) is not supported; only 'none'")
    init = raw.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        raise ValueError(
            f"{file}: init_lora_weights={init!r} changes the base weights or the forward; convert the adapter with "
            "PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) first"
        )
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        pat = raw.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(k, str) for k in pat):
            raise ValueError(f"{file}: {key} must be an object of module patterns, got {pat!r}")
        for k in pat:
            try:
                _SafePattern.of(k)  # parsed and checked now: refused keys fail before any change
            except ValueError as e:
                raise ValueError(f"{file}: {key}: {e}") from e
        patterns[key] = pat
    try:
        cfg = _FileConfig(
            raw.get("r", 8),
            raw.get("lora_alpha", 8),
            raw.get("lora_dropout", 0.0),
            raw.get("use_rslora", False),
            raw.get("use_dora", False),
            patterns["rank_pattern"],
            patterns["alpha_pattern"],
        )
        AdapterConfig(cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora)
        for v in cfg.rank_pattern.values():
            AdapterConfig(v, cfg.lora_alpha)
        for v in cfg.alpha_pattern.values():
            AdapterConfig(cfg.r, v)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    return cfg
