"""Named adapters: the settings record, and the part of ``LoRALinear`` that holds, adds, swaps
and deletes adapters over one base.

The active adapter (its settings and tensors) is one immutable :class:`_Adapter` record in
``layer._active``, replaced in a single assignment and read once by ``forward``: a forward running
while another thread calls ``set_adapter`` sees one adapter (or none) whole. Its tensors are also
the layer's registered parameters ``lora_A``, ``lora_B``, ``lora_magnitude_vector`` (so state-dict
keys are those of a one-adapter layer); the other adapters' Parameters wait, unregistered, in
``layer._stored``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..functional import _check_p

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


def _scale(cfg: AdapterConfig, b: int) -> float:
    """The scale at rank ``b``: ``lora_alpha / b`` (``/ sqrt(b)`` with rsLoRA)."""
    return cfg.lora_alpha / math.sqrt(b) if cfg.use_rslora else cfg.lora_alpha / b


class NamedAdapters:
    """``LoRALinear``'s adapters: the active adapter's settings as properties, and add / set /
    delete. Uses the layer's ``_adapter_configs`` (every adapter's settings), ``_active`` (the
    record), ``_stored`` (inactive adapters' Parameters), ``lora_fa``, ``merged`` / ``unmerge``
    (layers/merging.py) and ``dense_weight`` (layers/quant_base.py)."""

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

    def _refresh_active(self) -> None:
        """After ``Module._apply``: it may have put new Parameter objects in ``_parameters``."""
        rec = self._active
        if rec is not None:
            self._active = rec._replace(**{k: self._parameters.get(k) for k in ADAPTER_TENSORS})

    def _stored_follow(self, fn) -> None:
        """After ``Module._apply(fn)``: inactive adapters follow device/dtype moves too, keeping
        their Parameter objects as ``Module._apply`` does for registered ones."""
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
