"""Modules: ``LoRALinear`` (with named adapters), ``inject``, merge, parameter counting."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .functional import QUANTIZED, _check_p, lora_linear
from .quant import Int8Weight, NF4Weight, quantize
from .dora import dora_linear

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")
# The largest |lora_alpha|: every scale (alpha / b, alpha / sqrt(b), b >= 1) then fits in float32,
# the type the kernels take it in.
_MAX_ALPHA = torch.finfo(torch.float32).max


def check_adapter_name(name: object) -> str:
    """Adapter names are non-empty strings without '.', as PEFT's (they end up in module paths)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")
    return name


@dataclass
class AdapterConfig:
    """One adapter's hyper-parameters: rank, alpha, dropout, rsLoRA, DoRA."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        a = self.lora_alpha
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or abs(a) > _MAX_ALPHA:
            raise ValueError(f"lora_alpha must be a finite number of at most float32's max in magnitude, got {a!r}")
        _check_p(self.lora_dropout)
        self.lora_dropout = float(self.lora_dropout)
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


class _Adapter(NamedTuple):
    """The active adapter as a forward sees it: replaced whole, never mutated, so that one read of
    ``LoRALinear._active`` gives a consistent adapter while another thread calls ``set_adapter``."""

    name: str
    cfg: AdapterConfig  # never mutated while in a record: settings changes build a new record
    lora_A: nn.Parameter | None
    lora_B: nn.Parameter | None
    lora_magnitude_vector: nn.Parameter | None


class LoRALinear(nn.Module):
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
            del self.weight
            self.weight = quantize(weight.detach(), self.quant, self.blocksize, self.double_quant)
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

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, QUANTIZED)

    @property
    def scaling(self) -> float | None:
        """The active adapter's scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); None
        when no adapter is active."""
        rec = self._active
        return None if rec is None else _scale(rec.cfg, rec.cfg.r)

    # The active adapter's settings, read from (and written as a new) record.

    @property
    def active_adapter(self) -> str | None:
        rec = self._active
        return None if rec is None else rec.name

    @property
    def r(self) -> int | None:
        rec = self._active
        return None if rec is None else rec.cfg.r

    @property
    def use_dora(self) -> bool:
        rec = self._active
        return False if rec is None else rec.cfg.use_dora

    @property
    def lora_alpha(self) -> float | None:
        rec = self._active
        return None if rec is None else rec.cfg.lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value: float) -> None:
        self._set_setting("lora_alpha", value)

    @property
    def lora_dropout(self) -> float:
        rec = self._active
        return 0.0 if rec is None else rec.cfg.lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, value: float) -> None:
        self._set_setting("lora_dropout", value)

    @property
    def use_rslora(self) -> bool:
        rec = self._active
        return False if rec is None else rec.cfg.use_rslora

    @use_rslora.setter
    def use_rslora(self, value: bool) -> None:
        self._set_setting("use_rslora", value)

    def _set_setting(self, name: str, value) -> None:
        rec = self._active
        if rec is None:
            raise ValueError(f"no active adapter on this layer: set_adapter(name) before setting {name}")
        self._active = rec._replace(cfg=replace(rec.cfg, **{name: value}))  # validated by AdapterConfig

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # a direct assignment (layer.lora_A = ..., load_state_dict(assign=True)) updates the record
        if name in ADAPTER_TENSORS and not self.__dict__.get("_swapping", False):
            rec = self.__dict__.get("_active")
            if rec is not None:
                self._active = rec._replace(**{name: self._parameters.get(name)})

    def _install(self, rec: _Adapter | None) -> None:
        """Register ``rec``'s tensors as the parameters and make it the active record, in one
        assignment as a forward sees it (forward reads only the record)."""
        self._swapping = True
        try:
            for k in ADAPTER_TENSORS:
                setattr(self, k, None if rec is None else getattr(rec, k))
        finally:
            self._swapping = False
        self._active = rec

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The base weight as a dense (out, in) tensor (a transient dequantized copy if quantized)."""
        if self.is_quantized:
            return self.weight.dequantize(dtype or self._adapter_dtype())
        return self.weight if dtype is None else self.weight.to(dtype)

    # ---- named adapters -------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter of this layer, in the order they were added."""
        return list(self._adapter_configs)

    def _check_has(self, name: str) -> None:
        if name not in self._adapter_configs:
            raise ValueError(f"no adapter {name!r} on this layer; its adapters: {self.adapter_names}")

    def adapter_config(self, name: str | None = None) -> AdapterConfig:
        """A copy of adapter ``name``'s settings (default: the active adapter)."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("no active adapter on this layer; name one")
        self._check_has(name)
        rec = self._active
        c = rec.cfg if rec is not None and name == rec.name else self._adapter_configs[name]
        return AdapterConfig(c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, c.use_dora)

    def adapter_tensors(self, name: str | None = None) -> dict[str, nn.Parameter | None]:
        """Adapter ``name``'s Parameters (the objects themselves, not copies) by PEFT name:
        ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_magnitude_vector`` (out,) or None."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("no active adapter on this layer; name one")
        self._check_has(name)
        rec = self._active
        if rec is not None and name == rec.name:
            return {k: getattr(rec, k) for k in ADAPTER_TENSORS}
        return dict(self._stored[name])

    def _adapter_dtype(self) -> torch.dtype:
        """The dtype a new adapter gets: that of the layer's adapters, else the base's."""
        rec = self._active
        if rec is not None and rec.lora_A is not None:
            return rec.lora_A.dtype
        for tensors in self._stored.values():
            return tensors["lora_A"].dtype
        return self.weight.dtype

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add a new, inactive adapter initialised as PEFT (A Kaiming-uniform, B zeros, so it
        equals the base; DoRA's magnitude = the base's row norm), in the dtype of the layer's
        other adapters. Activate it with :meth:`set_adapter`."""
        check_adapter_name(name)
        if name in self._adapter_configs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        cfg = AdapterConfig(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        if use_dora and self.merged:
            raise ValueError("unmerge first: a new DoRA adapter's magnitude starts from the unmerged base weight")
        self._put_adapter(name, cfg, self._new_adapter_tensors(cfg))

    @torch.no_grad()
    def _new_adapter_tensors(self, cfg: AdapterConfig) -> dict[str, Tensor | None]:
        """Fresh tensors for ``cfg`` as PEFT initialises them (this layer's device and dtype)."""
        dtype = self._adapter_dtype()
        factory = {"device": self.weight.device, "dtype": dtype}
        A = torch.empty(cfg.r, self.in_features, **factory)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, cfg.r, **factory)
        m = None
        if cfg.use_dora:
            m = torch.linalg.norm(self.dense_weight(dtype).float(), dim=1).to(dtype)
        return {"lora_A": A, "lora_B": B, "lora_magnitude_vector": m}

    @torch.no_grad()
    def _put_adapter(self, name: str, cfg: AdapterConfig, tensors: dict[str, Tensor | None]) -> None:
        """Add adapter ``name``, or replace its settings and values, from checked tensors on this
        layer's device (no checks here: callers validate everything first, so this cannot fail
        half-way). Existing Parameters of matching shape and dtype are written in place, so
        optimizers holding them stay valid. Replacing the active adapter of a merged layer
        unmerges it first (callers warn, before changing anything)."""
        old = self.adapter_tensors(name) if name in self._adapter_configs else {}
        if name == self.active_adapter and self.merged:
            self.unmerge()
        new: dict[str, nn.Parameter | None] = {}
        for k in ADAPTER_TENSORS:
            t, o = tensors.get(k), old.get(k)
            if t is None:
                new[k] = None
            elif o is not None and o.shape == t.shape and o.dtype == t.dtype and o.device == t.device:
                new[k] = o if o is t else o.copy_(t)
            else:
                new[k] = nn.Parameter(t, requires_grad=not (k == "lora_A" and self.lora_fa))
        self._adapter_configs[name] = cfg
        if name == self.active_adapter:
            self._install(_Adapter(name, cfg, *(new[k] for k in ADAPTER_TENSORS)))
        else:
            self._stored[name] = new

    def _stash_active(self) -> None:
        """Write the active adapter's settings and Parameters back to the inactive store (the
        layer keeps them active; the caller installs the next record)."""
        rec = self._active
        if rec is None:
            return
        self._adapter_configs[rec.name] = rec.cfg
        self._stored[rec.name] = {k: getattr(rec, k) for k in ADAPTER_TENSORS}

    def set_adapter(self, name: str | None) -> None:
        """Make adapter ``name`` the active one (None: none; the layer is then its base linear).

        O(1): Parameter objects are swapped, nothing is copied and the base is not touched. A
        merged layer is unmerged first, with a warning, as PEFT does (that step does rewrite the
        base); call :meth:`merge` again for the new adapter."""
        if name is not None:
            self._check_has(name)
        if name == self.active_adapter:
            return
        if self.merged:
            warnings.warn("fastlora: set_adapter on a merged layer; unmerging it first (as PEFT)", stacklevel=2)
            self.unmerge()
        self._stash_active()
        new = None
        if name is not None:
            t = self._stored[name]
            new = _Adapter(name, self._adapter_configs[name], *(t[k] for k in ADAPTER_TENSORS))
        self._install(new)  # the one swap a concurrent forward can see
        if name is not None:
            del self._stored[name]

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``. The active adapter cannot be deleted: ``set_adapter`` another
        one (or None) first."""
        self._check_has(name)
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is active; set_adapter(another name or None) before deleting it")
        del self._adapter_configs[name]
        del self._stored[name]

    def runtime_rank(self) -> int:
        """The rank this forward uses: ``r``, or for DyLoRA ``active_rank`` when set, else a
        uniform sample from [1, r] in training (torch's RNG, so checkpoint recomputation and
        ``torch.manual_seed`` reproduce it) and ``r`` in eval."""
        rec = self._active
        if rec is None:
            raise ValueError("no active adapter on this layer")
        return self._rank(rec.cfg.r)

    def _rank(self, r: int) -> int:
        if not self.dynamic_rank:
            return r
        if self.active_rank is not None:
            if not 1 <= self.active_rank <= r:
                raise ValueError(f"active_rank must be in [1, {r}], got {self.active_rank}")
            return self.active_rank
        return int(torch.randint(1, r + 1, ()).item()) if self.training else r

    def scale_for(self, b: int) -> float:
        return _scale(self._active.cfg, b)

    def _weight_sqnorm(self, acc: torch.dtype) -> Tensor:
        """``||W_i||^2`` (N,) in ``acc``, cached while W is unchanged (tracked by storage and
        version). Under torch.compile it is recomputed in the graph (storage checks are not
        traceable)."""
        if torch.compiler.is_compiling():
            return self.dense_weight().detach().to(acc).square().sum(1)
        t = self.weight.packed if isinstance(self.weight, NF4Weight) else getattr(self.weight, "CB", self.weight)
        key = (t.data_ptr(), t._version, id(self.weight), acc)
        if self._sqnorm_cache is None or self._sqnorm_cache[0] != key:
            self._sqnorm_cache = (key, self.dense_weight().detach().to(acc).square().sum(1))
        return self._sqnorm_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        rec = self._active  # read once: a concurrent set_adapter replaces the whole record
        if self.merged or rec is None:
            return nn.functional.linear(x, self.dense_weight(x.dtype), self.bias)
        cfg, A, B = rec.cfg, rec.lora_A, rec.lora_B
        if self.dynamic_rank and self.active_rank is None and self.training and torch.compiler.is_compiling():
            # DyLoRA traced: b is drawn as a tensor and B's columns past b are zeroed with the
            # scale folded in (no data-dependent shape, no graph break); equal to the slices below
            b = torch.randint(1, cfg.r + 1, (), device=B.device)
            s = cfg.lora_alpha / (b.double().sqrt() if cfg.use_rslora else b.double())
            cols = torch.arange(cfg.r, device=B.device) < b
            B, scale = B * torch.where(cols, s, 0.0).to(B.dtype), 1.0
        else:
            b = self._rank(cfg.r)
            # DyLoRA slices are views: A[:b] is contiguous, B[:, :b] strided; no copies
            if b != cfg.r:
                A, B = A[:b], B[:, :b]
            scale = _scale(cfg, b)
        kw = dict(scale=scale, bias=self.bias, dropout_p=cfg.lora_dropout, training=self.training)
        if cfg.use_dora:
            acc = torch.float64 if A.dtype == torch.float64 else torch.float32
            return dora_linear(
                x, self.weight, A, B, rec.lora_magnitude_vector, weight_sqnorm=self._weight_sqnorm(acc), **kw
            )
        return lora_linear(x, self.weight, A, B, **kw)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` (out, in) at the runtime rank, in float32 (float64 for fp64 A)."""
        rec = self._active
        b = rec.cfg.r if not self.dynamic_rank or self.active_rank is None else self.active_rank
        return _delta(rec, b)

    @torch.no_grad()
    def _set_base(self, w: Tensor) -> None:
        """Write a new dense base (fp32/fp64) back: in place, or requantized (lossy, as PEFT+bnb)."""
        if self.is_quantized:
            self.weight = quantize(w.to(self.weight.dtype), self.quant, self.blocksize, self.double_quant)
        else:
            self.weight.copy_(w.to(self.weight.dtype))

    @torch.no_grad()
    def merge(self, keep_base: bool = True) -> None:
        """Fold the adapter into ``weight`` so that forward is a plain linear (inference).
        DoRA: ``W <- (m / ||W + dW||_row) * (W + dW)``, as PEFT. A quantized base is requantized,
        which rounds (as PEFT does with bitsandbytes).

        ``keep_base``: where the merge is lossy in a way that repeated merge/unmerge would
        accumulate, keep the pre-merge base so that :meth:`unmerge` restores it exactly: the
        quantized object for NF4 / int8 bases (its packed bytes, no copy) and a copy of W for DoRA
        on a dense base. A plain dense base keeps nothing: unmerge subtracts the same delta (at
        the rank merged), off by at most one rounding of W's dtype, which does not grow with
        repetition. ``keep_base=False`` keeps nothing for any base (unmerge recomputes: DoRA and
        quantized bases then drift with every cycle)."""
        rec = self._active
        if self.merged or rec is None:
            return
        b = rec.cfg.r if not self.dynamic_rank or self.active_rank is None else self.active_rank
        d = _delta(rec, b)
        kept = None
        if keep_base and self.is_quantized:
            kept = self.weight  # _set_base replaces the object, so this one stays unchanged
        elif keep_base and rec.cfg.use_dora:
            kept = self.weight.detach().clone()
        w = self.dense_weight(d.dtype) + d
        norm = None
        if rec.cfg.use_dora:
            norm = torch.linalg.norm(w, dim=1)
            w = w * (rec.lora_magnitude_vector.to(d.dtype) / norm).unsqueeze(1)
        self._set_base(w)
        self._merge_info = (b, norm, kept)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: exactly where merge kept the base (see there), else by subtracting
        the delta merged (at the rank merged, for DyLoRA), up to the rounding of W's dtype or a
        requantization."""
        if not self.merged:
            return
        b, norm, kept = self._merge_info
        rec = self._active
        if kept is not None:
            if self.is_quantized:
                self.weight = kept
            else:
                self.weight.copy_(kept)
        else:
            d = _delta(rec, b)
            w = self.dense_weight(d.dtype)
            if norm is not None:
                w = w / (rec.lora_magnitude_vector.to(d.dtype) / norm).unsqueeze(1)
            self._set_base(w - d)
        self._merge_info = None
        self.merged = False

    # ---- quantized base: state dict and device moves ------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:  # bitsandbytes' keys and bytes for the base weight
            destination.update(self.weight.state_dict_entries(prefix))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self.merged and prefix + "weight" in state_dict and self._merge_info[2] is not None:
            # a loaded base replaces the merged one: unmerge can no longer restore the kept base
            self._merge_info = (*self._merge_info[:2], None)
        if self.is_quantized:
            # bitsandbytes' keys: Linear4bit's weight and weight.*, Linear8bitLt's weight, SCB, weight_format
            extra = (prefix + "SCB", prefix + "weight_format") if isinstance(self.weight, Int8Weight) else ()
            own = {
                k: v
                for k, v in state_dict.items()
                if k == prefix + "weight" or k.startswith(prefix + "weight.") or k in extra
            }
            if own:
                # validated by from_state_dict; a damaged entry raises before anything changes
                if isinstance(self.weight, Int8Weight):
                    q = Int8Weight.from_state_dict(own, prefix, dtype=self.weight.dtype)
                else:
                    q = NF4Weight.from_state_dict(own, prefix)
                if tuple(q.shape) != (self.out_features, self.in_features):
                    raise ValueError(
                        f"{prefix}weight: shape {tuple(q.shape)} != ({self.out_features}, {self.in_features})"
                    )
                self.weight = q.to(self.weight.device)
                self._sqnorm_cache = None
            elif strict:
                missing_keys.append(prefix + "weight")
            state_dict = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        rec = self._active
        if rec is not None:  # Module._apply may have put new Parameter objects in _parameters
            self._active = rec._replace(**{k: self._parameters.get(k) for k in ADAPTER_TENSORS})
        if self._merge_info is not None and isinstance(self._merge_info[2], Tensor):
            b, norm, kept = self._merge_info  # DoRA's kept dense base follows the weight
            with torch.no_grad():
                self._merge_info = (b, None if norm is None else fn(norm), fn(kept))
        if self.is_quantized:  # follow device moves; the packed format never changes dtype
            device = fn(torch.empty(0, device=self.weight.device)).device
            if device != self.weight.device:
                self.weight = self.weight.to(device)
            if self._merge_info is not None and isinstance(self._merge_info[2], QUANTIZED):
                b, norm, kept = self._merge_info
                self._merge_info = (b, None if norm is None else norm.to(device), kept.to(device))
        # inactive adapters follow device/dtype moves too, keeping their Parameter objects as
        # Module._apply does for registered ones
        for tensors in self._stored.values():
            for k, p in tensors.items():
                if p is None:
                    continue
                with torch.no_grad():
                    new = fn(p)
                if torch._has_compatible_shallow_copy_type(p, new):
                    p.data = new
                else:
                    tensors[k] = p = nn.Parameter(new, requires_grad=p.requires_grad)
                if p.grad is not None:
                    p.grad = fn(p.grad)
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


def _scale(cfg: AdapterConfig, b: int) -> float:
    """The scale at rank ``b``: ``lora_alpha / b`` (``/ sqrt(b)`` with rsLoRA)."""
    return cfg.lora_alpha / math.sqrt(b) if cfg.use_rslora else cfg.lora_alpha / b


def _delta(rec: _Adapter, b: int) -> Tensor:
    """``scale * B[:, :b] @ A[:b]`` (out, in) in float32 (float64 for fp64 A)."""
    acc = torch.float64 if rec.lora_A.dtype == torch.float64 else torch.float32
    return (rec.lora_B[:, :b].to(acc) @ rec.lora_A[:b].to(acc)).mul_(_scale(rec.cfg, b))


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
