"""Modules: ``LoRALinear`` (with named adapters), ``inject``, merge, parameter counting.

``LoRALinear`` is construction and ``forward``; its concerns are parts in fastlora/layers/:
named adapters (adapter_state.py), merge / unmerge (merging.py), quantized bases (quant_base.py),
DyLoRA's runtime rank (dylora.py) and DoRA (dora.py). The settings record and its helpers are
re-exported here (``AdapterConfig``, ``ADAPTER_TENSORS``, ``check_adapter_name``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .functional import _check_p, lora_linear
from .layers.adapter_state import ADAPTER_TENSORS, AdapterConfig, NamedAdapters, _Adapter, check_adapter_name
from .layers.dora import DoRAMagnitude
from .layers.dylora import DyLoRARank
from .layers.merging import Merging
from .layers.quant_base import QuantizedBase
from .quant import Int8Weight, NF4Weight

__all__ = [
    "ADAPTER_TENSORS",
    "AdapterConfig",
    "LoRALinear",
    "check_adapter_name",
    "inject",
    "lora_layers",
    "merge",
    "print_trainable_parameters",
    "unmerge",
]


class LoRALinear(NamedAdapters, Merging, QuantizedBase, DyLoRARank, DoRAMagnitude, nn.Module):
    """A frozen linear layer with a trainable low-rank update, computed by the fused op.

    ``y = x W^T + bias + scaling * B(A(dropout(x)))`` with ``scaling = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``). Parameters use PEFT's layout and names:
    ``weight`` (out, in) and ``bias`` (out,) frozen, ``lora_A`` (r, in) and ``lora_B`` (out, r)
    trainable. Initialised as PEFT: A Kaiming-uniform (a=sqrt(5)), B zeros, so a fresh layer
    equals its base.

    Keyword-only options (the same for ``from_linear`` and ``inject``):

    - ``lora_fa``: LoRA-FA, A frozen at init; backward keeps only z (M x r), never x.
    - ``dynamic_rank``: DyLoRA, a runtime rank b in [1, r] per training step (``active_rank``
      fixes it), with A[:b], B[:, :b] and scale alpha/b.
    - ``use_dora``: DoRA with a trainable ``lora_magnitude_vector`` (out,), PEFT's init.
    - ``quant``: ``"nf4"`` or ``"int8"`` base weight (``blocksize``, ``double_quant`` for NF4).
      ``weight`` is then a ``fastlora.quant`` object (dequantized inside each call, never kept)
      and the state dict carries bitsandbytes' Linear4bit / Linear8bitLt keys for it.
    - ``adapter_name``: the name of the adapter the layer is built with (``"default"``).

    Named adapters (inference hot-swap, as PEFT's): a layer holds several adapters over one base,
    each with its own r, lora_alpha, lora_dropout, use_rslora, use_dora (and magnitude);
    ``lora_fa``, ``dynamic_rank`` and the base (``quant``) are the layer's. The *active* adapter's
    tensors are the registered parameters ``lora_A``, ``lora_B`` (and ``lora_magnitude_vector``),
    and ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``, ``scaling`` are
    its settings, so state-dict keys, ``parameters()`` and every kernel path are those of a
    one-adapter layer. The other adapters' Parameters are kept aside, unregistered (not in the
    state dict, not seen by optimizers or DDP/FSDP; device and dtype moves do follow them).
    :meth:`set_adapter` swaps Parameter objects in and out: no tensor is copied, the base weight
    is never touched (unless the layer is merged, see there). With no active adapter
    (``set_adapter(None)``) the layer computes its base linear only and registers no LoRA tensors.

    Thread safety: the active adapter (settings and tensors) is one immutable record that
    :meth:`set_adapter` replaces in a single assignment, and ``forward`` reads it once, so a forward
    running while another thread swaps adapters uses one adapter (or none) whole. (Merging,
    unmerging and loading rewrite the base and are not safe against a concurrent forward.)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        lora_fa: bool = False,
        dynamic_rank: bool = False,
        use_dora: bool = False,
        quant: str | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_p(lora_dropout)
        if quant not in (None, "nf4", "int8"):
            raise ValueError(f"quant must be None, 'nf4' or 'int8', got {quant!r}")
        check_adapter_name(adapter_name)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        # every adapter's config; the active one's lives in the record self._active (its truth
        # while active, written back by _stash_active) and its tensors are the registered parameters
        self._adapter_configs: dict[str, AdapterConfig] = {
            adapter_name: AdapterConfig(r, lora_alpha, float(lora_dropout), bool(use_rslora), bool(use_dora))
        }
        self._stored: dict[str, dict[str, nn.Parameter | None]] = {}  # inactive adapters' tensors
        self._active: _Adapter | None = _Adapter(adapter_name, self._adapter_configs[adapter_name], None, None, None)
        self.lora_fa, self.dynamic_rank = lora_fa, dynamic_rank
        self.quant, self.blocksize, self.double_quant = quant, blocksize, double_quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.active_rank: int | None = None  # DyLoRA: fixed runtime rank (None: sample in training)
        self.merged = False
        # while merged: (rank merged, DoRA's row norm or None, the pre-merge base kept or None)
        self._merge_info: tuple[int, Tensor | None, Tensor | NF4Weight | Int8Weight | None] | None = None
        self._sqnorm_cache: tuple[tuple, Tensor] | None = None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_adapter(self.weight)

    def _init_adapter(self, weight: Tensor, init: bool = True) -> None:
        """Create the adapter parameters next to a float ``weight`` (N, K) and quantize the base if
        asked. DoRA's magnitude starts as the row norm of the base the layer computes with.
        ``init=False`` leaves the adapter uninitialised (the caller overwrites it)."""
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory), requires_grad=not self.lora_fa)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory)) if self.use_dora else None
        if self.quant is not None and weight.device.type != "meta":
            self._quantize_base(weight)
            weight = None  # DoRA's magnitude then starts from the dequantized base, as PEFT on bnb
        if init:
            self.reset_lora_parameters(weight)

    @torch.no_grad()
    def reset_lora_parameters(self, weight: Tensor | None = None) -> None:
        """A Kaiming-uniform (a=sqrt(5)), B zeros; DoRA magnitude ||W + s B A||_row = ||W||_row."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_magnitude_vector is not None:
            w = self.dense_weight() if weight is None else weight
            self.lora_magnitude_vector.copy_(torch.linalg.norm(w.float(), dim=1).to(self.lora_magnitude_vector.dtype))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        **options,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (not copied) and frozen;
        with ``quant=`` the weight is quantized instead. ``options``: the constructor's
        keyword-only options."""
        return cls._from_linear(linear, r, lora_alpha, lora_dropout, use_rslora, True, **options)

    @classmethod
    def _from_linear(cls, linear, r, lora_alpha, lora_dropout, use_rslora, init, **options) -> LoRALinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            layer = cls(
                linear.in_features,
                linear.out_features,
                r,
                lora_alpha,
                lora_dropout,
                bias=linear.bias is not None,
                use_rslora=use_rslora,
                **options,
            )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer._init_adapter(linear.weight, init)
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        rec = self._active  # read once: a concurrent set_adapter replaces the whole record
        if self.merged or rec is None:
            return nn.functional.linear(x, self.dense_weight(x.dtype), self.bias)
        cfg = rec.cfg
        A, B, scale = self._rank_and_scale(cfg, rec.lora_A, rec.lora_B)  # DyLoRA: rank b <= r
        kw = dict(scale=scale, bias=self.bias, dropout_p=cfg.lora_dropout, training=self.training)
        if cfg.use_dora:
            return self._dora_forward(x, A, B, rec.lora_magnitude_vector, **kw)
        return lora_linear(x, self.weight, A, B, **kw)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._refresh_active()  # Module._apply may have put new Parameter objects in _parameters
        self._merge_follow(fn)
        self._quant_follow(fn)
        self._stored_follow(fn)
        return out

    def extra_repr(self) -> str:
        opts = "".join(f", {k}=True" for k in ("lora_fa", "dynamic_rank", "use_dora") if getattr(self, k))
        if self.quant:
            opts += f", quant={self.quant!r}"
        if self.adapter_names != ["default"] or self.active_adapter != "default":
            opts += f", active_adapter={self.active_adapter!r}, adapters={self.adapter_names}"
        head = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.active_adapter is None:
            return f"{head}{opts}"
        return (
            f"{head}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}{opts}"
        )


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    **options,
) -> nn.Module:
    """Replace matching ``nn.Linear`` modules of ``model`` with :class:`LoRALinear`, in place, and
    freeze every other parameter. Returns ``model``.

    ``target_modules``: a list of module names matched exactly or as a dotted suffix
    (``["q_proj", "v_proj"]``), or a regex string matched against the full name, as in PEFT.
    ``options``: the same keyword options as :class:`LoRALinear` (``lora_fa``, ``dynamic_rank``,
    ``use_dora``, ``quant``, ``adapter_name``). Modules that already are LoRALinear are left as
    they are (add adapters to them with ``fastlora.add_adapter``). Raises ValueError when nothing
    matches.
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(
                f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}"
            )
    targets = [
        name
        for name, mod in model.named_modules()
        if name and type(mod) is nn.Linear and _matches(name, target_modules)
    ]
    if not targets:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(
            f"target_modules {target_modules!r} matched no nn.Linear; the model's Linear modules are: {linears[:20]}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent,
            child,
            LoRALinear.from_linear(getattr(parent, child), r, lora_alpha, lora_dropout, use_rslora, **options),
        )
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) for every :class:`LoRALinear` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer of ``model`` into its base weight (zero added latency)."""
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every LoRA layer of ``model``."""
    for _, m in lora_layers(model):
        m.unmerge()
    return model


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's format) and return
    (trainable, all)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
    return trainable, total
