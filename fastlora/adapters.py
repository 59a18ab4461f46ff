"""Named adapters over a model (add, list, hot-swap, delete) and adapter files in PEFT's format.

Files: a directory with ``adapter_config.json`` (a PEFT ``LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` (r, in),
``.lora_B.weight`` (out, r) and, for DoRA, ``.lora_magnitude_vector`` (out,): what PEFT's
``save_pretrained`` writes, so ``PeftModel.from_pretrained`` loads fastlora's files and
:func:`load_adapter` loads PEFT's. Loading never unpickles (``adapter_model.bin`` is refused), and
it checks everything (config, keys, shapes, dtypes, finite values) and builds every new tensor and
layer before it changes the model: a refused file leaves the model as it was.

Which adapter is active: ``set_adapter(model, name)`` activates ``name`` on every layer that has it
and leaves the others with no active adapter (their base linear only), as PEFT does. A new adapter
(``add_adapter``, ``load_adapter``) becomes active only when the model had no active adapter;
otherwise it is added inactive, as PEFT's ``add_adapter`` / ``load_adapter``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .nn import ADAPTER_TENSORS, AdapterConfig, LoRALinear, _matches, check_adapter_name, lora_layers

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
_LAYER_OPTIONS = frozenset({"lora_fa", "dynamic_rank", "quant", "blocksize", "double_quant"})
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


# ---- named adapters over a model -----------------------------------------------------------


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


# ---- files ---------------------------------------------------------------------------------


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


# ---- rank_pattern / alpha_pattern keys from files, matched without backtracking ----------------
#
# A key from a file is a regex, and Python's backtracking engine can take exponential time on keys
# such as "(.*.*)*z": a hostile adapter_config.json would hang load_adapter. Keys are therefore
# parsed (Python's own regex parser, so the syntax is exactly re's) and matched as a Thompson NFA
# run as a lazily built DFA: time linear in the path for any key. Supported: literals, ".",
# classes and \d \w \s, groups, "|", greedy and lazy repeats (the same match/no-match answer),
# "^" "$" "\A" "\Z". Refused with ValueError: backreferences, lookarounds, atomic groups and
# possessive repeats, conditionals, \b \B, inline flags; keys over _MAX_KEY_CHARS characters or
# whose NFA exceeds _MAX_NFA_STATES states (e.g. "a{100000}"). "$" matches only at the end of the
# path (re's "$" also matches before a final newline, which module paths never have).

_MAX_KEY_CHARS = 1000
_MAX_NFA_STATES = 10_000
_MAX_DFA_STATES = 10_000  # cached subsets per key; past it the cache is dropped and rebuilt
_CHAR, _SPLIT, _BEGIN, _END, _ACCEPT = range(5)


class _SafePattern:
    _cache: dict[str, _SafePattern] = {}

    def __init__(self, key: str) -> None:
        from re import _constants as C
        from re import _parser

        if len(key) > _MAX_KEY_CHARS:
            raise ValueError(f"pattern key of {len(key)} characters (at most {_MAX_KEY_CHARS})")
        try:
            parsed = _parser.parse(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(f"pattern key {key!r} is not a valid regex ({e})") from e
        except RecursionError:
            raise ValueError(f"pattern key {key!r} is nested too deeply") from None
        if parsed.state.flags & ~re.UNICODE:
            raise ValueError(f"pattern key {key!r}: inline flags are not supported")
        self.C = C
        # the common key, an escaped module path (what save_adapter writes) or a plain name: a
        # literal, decided by a suffix compare
        self.literal = None
        if len(parsed) == 3 and parsed[1][0] is C.SUBPATTERN and parsed[2] == (C.AT, C.AT_END):
            lit = parsed[1][1][3]  # the items of group 2, the key itself
            if not parsed[1][1][1] and not parsed[1][1][2] and all(op is C.LITERAL for op, _ in lit):
                self.literal = "".join(chr(av) for _, av in lit)
        # states: [kind, arg, out1, out2]
        self.states: list[list] = [[_ACCEPT, None, None, None]]
        try:
            self.start = self._seq(parsed, 0, key)
        except RecursionError:
            raise ValueError(f"pattern key {key!r} is nested too deeply") from None
        self.key = key
        self._closures: dict[frozenset, tuple] = {}
        self._steps: dict[tuple, frozenset] = {}

    @classmethod
    def of(cls, key: str) -> _SafePattern:
        pat = cls._cache.get(key)
        if pat is None:
            if len(cls._cache) > 4096:
                cls._cache.clear()
            pat = cls._cache[key] = cls(key)
        return pat

    def _new(self, kind: int, arg=None, out1=None, out2=None) -> int:
        if len(self.states) >= _MAX_NFA_STATES:
            raise ValueError(f"pattern key is too large (over {_MAX_NFA_STATES} NFA states)")
        self.states.append([kind, arg, out1, out2])
        return len(self.states) - 1

    def _seq(self, items, nxt: int, key: str) -> int:
        for item in reversed(list(items)):
            nxt = self._item(item, nxt, key)
        return nxt

    def _item(self, item, nxt: int, key: str) -> int:
        C = self.C
        op, av = item
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            return self._new(_CHAR, (op, av), nxt)
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise ValueError(f"pattern key {key!r}: inline flags are not supported")
            return self._seq(sub, nxt, key)
        if op is C.BRANCH:
            alts = [self._seq(alt, nxt, key) for alt in av[1]]
            head = alts[-1]
            for a in reversed(alts[:-1]):
                head = self._new(_SPLIT, None, a, head)
            return head
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, sub = av
            if hi == C.MAXREPEAT:  # x{lo,}: lo copies, then a loop
                loop = self._new(_SPLIT, None, None, nxt)
                self.states[loop][2] = self._seq(sub, loop, key)
                head = loop
            else:  # x{lo,hi}: lo copies, then hi - lo optional ones, each skipping to nxt
                head = nxt
                for _ in range(hi - lo):
                    head = self._new(_SPLIT, None, self._seq(sub, head, key), nxt)
            for _ in range(lo):
                head = self._seq(sub, head, key)
            return head
        if op is C.AT:
            if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return self._new(_BEGIN, None, nxt)
            if av in (C.AT_END, C.AT_END_STRING):
                return self._new(_END, None, nxt)
        raise ValueError(
            f"pattern key {key!r}: {str(op).lower()} is not supported in rank_pattern / alpha_pattern keys "
            "(no backreferences, lookarounds, atomic groups, possessive repeats or word boundaries)"
        )

    def _char_ok(self, arg, ch: str) -> bool:
        C = self.C
        op, av = arg
        if op is C.LITERAL:
            return ord(ch) == av
        if op is C.NOT_LITERAL:
            return ord(ch) != av
        if op is C.ANY:
            return ch != "\n"
        negate, hit = False, False
        for iop, iav in av:
            if iop is C.NEGATE:
                negate = True
            elif iop is C.LITERAL:
                hit = hit or ord(ch) == iav
            elif iop is C.RANGE:
                hit = hit or iav[0] <= ord(ch) <= iav[1]
            elif iop is C.CATEGORY:
                hit = hit or _category(C, iav, ch)
            else:
                raise ValueError(f"pattern key {self.key!r}: {iop} in a character class is not supported")
        return hit != negate

    def _closure(self, seeds, at_start: bool, at_end: bool) -> frozenset:
        seen, stack = set(), list(seeds)
        while stack:
            i = stack.pop()
            if i is None or i in seen:
                continue
            seen.add(i)
            kind, _, out1, out2 = self.states[i]
            if kind == _SPLIT:
                stack += (out1, out2)
            elif (kind == _BEGIN and at_start) or (kind == _END and at_end):
                stack.append(out1)
        return frozenset(seen)

    def match(self, path: str) -> bool:
        """``re.match(rf"(.*\.)?({key})$", path) is not None``, in time linear in ``path``."""
        if self.literal is not None:
            return path == self.literal or path.endswith("." + self.literal)
        n = len(path)
        cur = self._closure([self.start], True, n == 0)
        for ch in path:
            if 0 in cur:
                return True
            step = self._steps.get((cur, ch))
            if step is None:
                if len(self._steps) > _MAX_DFA_STATES:
                    self._steps.clear()
                moved = [
                    self.states[i][2]
                    for i in cur
                    if self.states[i][0] == _CHAR and self._char_ok(self.states[i][1], ch)
                ]
                step = self._steps[(cur, ch)] = self._closure(moved, False, False)
            cur = step
            if not cur:
                return False
        return 0 in self._closure(cur, n == 0, True)


def _category(C, cat, ch: str) -> bool:
    if cat in (C.CATEGORY_DIGIT, C.CATEGORY_NOT_DIGIT):
        return ch.isdecimal() == (cat is C.CATEGORY_DIGIT)
    if cat in (C.CATEGORY_WORD, C.CATEGORY_NOT_WORD):
        return (ch.isalnum() or ch == "_") == (cat is C.CATEGORY_WORD)
    if cat in (C.CATEGORY_SPACE, C.CATEGORY_NOT_SPACE):
        return ch.isspace() == (cat is C.CATEGORY_SPACE)
    raise ValueError(f"regex category {cat} is not supported in pattern keys")


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
