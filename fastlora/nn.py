"""Modules: ``LoRALinear`` (with named adapters), ``inject``, merge, parameter counting."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .functional import QUANTIZED, _check_p, lora_linear
from .quant import NF4Weight, quantize
from .variants import dora_linear

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")


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
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
            raise ValueError(f"lora_alpha must be a finite number, got {a!r}")
        _check_p(self.lora_dropout)
        self.lora_dropout = float(self.lora_dropout)
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


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
        # every adapter's config; the active one's live in the attributes below (its truth while
        # active, written back by _stash_active) and its tensors are the registered parameters
        self._adapter_configs: dict[str, AdapterConfig] = {
            adapter_name: AdapterConfig(r, lora_alpha, float(lora_dropout), bool(use_rslora), bool(use_dora))
        }
        self._stored: dict[str, dict[str, nn.Parameter | None]] = {}  # inactive adapters' tensors
        self.active_adapter: str | None = adapter_name
        self._load_config(self._adapter_configs[adapter_name])
        self.lora_fa, self.dynamic_rank = lora_fa, dynamic_rank
        self.quant, self.blocksize, self.double_quant = quant, blocksize, double_quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.active_rank: int | None = None  # DyLoRA: fixed runtime rank (None: sample in training)
        self.merged = False
        self._dora_merge_norm: Tensor | None = None
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
        return None if self.r is None else self.scale_for(self.r)

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

    def _load_config(self, cfg: AdapterConfig | None) -> None:
        """Expose ``cfg`` as the active settings (None: no active adapter)."""
        if cfg is None:
            self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.use_dora = None, None, 0.0, False, False
        else:
            self.r, self.lora_alpha, self.lora_dropout = cfg.r, cfg.lora_alpha, cfg.lora_dropout
            self.use_rslora, self.use_dora = cfg.use_rslora, cfg.use_dora

    def _check_has(self, name: str) -> None:
        if name not in self._adapter_configs:
            raise ValueError(f"no adapter {name!r} on this layer; its adapters: {self.adapter_names}")

    def adapter_config(self, name: str | None = None) -> AdapterConfig:
        """A copy of adapter ``name``'s settings (default: the active adapter)."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("no active adapter on this layer; name one")
        self._check_has(name)
        if name == self.active_adapter:
            return AdapterConfig(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.use_dora)
        c = self._adapter_configs[name]
        return AdapterConfig(c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, c.use_dora)

    def adapter_tensors(self, name: str | None = None) -> dict[str, nn.Parameter | None]:
        """Adapter ``name``'s Parameters (the objects themselves, not copies) by PEFT name:
        ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_magnitude_vector`` (out,) or None."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("no active adapter on this layer; name one")
        self._check_has(name)
        if name == self.active_adapter:
            return {k: getattr(self, k, None) for k in ADAPTER_TENSORS}
        return dict(self._stored[name])

    def _adapter_dtype(self) -> torch.dtype:
        """The dtype a new adapter gets: that of the layer's adapters, else the base's."""
        if self.active_adapter is not None:
            return self.lora_A.dtype
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
            for k, v in new.items():
                setattr(self, k, v)
            self._load_config(cfg)
        else:
            self._stored[name] = new

    def _stash_active(self) -> None:
        """Move the active adapter's settings and Parameters aside; leaves no adapter active."""
        name = self.active_adapter
        if name is None:
            return
        self._adapter_configs[name] = self.adapter_config(name)
        self._stored[name] = self.adapter_tensors(name)
        for k in ADAPTER_TENSORS:
            setattr(self, k, None)
        self.active_adapter = None
        self._load_config(None)

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
        if name is not None:
            for k, v in self._stored.pop(name).items():
                setattr(self, k, v)
            self.active_adapter = name
            self._load_config(self._adapter_configs[name])

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
        if not self.dynamic_rank:
            return self.r
        if self.active_rank is not None:
            if not 1 <= self.active_rank <= self.r:
                raise ValueError(f"active_rank must be in [1, {self.r}], got {self.active_rank}")
            return self.active_rank
        return int(torch.randint(1, self.r + 1, ()).item()) if self.training else self.r

    def scale_for(self, b: int) -> float:
        return self.lora_alpha / math.sqrt(b) if self.use_rslora else self.lora_alpha / b

    def _weight_sqnorm(self) -> Tensor:
        """``||W_i||^2`` (N,), cached while W is unchanged (tracked by storage and version).
        Under torch.compile it is recomputed in the graph (storage checks are not traceable)."""
        if torch.compiler.is_compiling():
            acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
            return self.dense_weight().detach().to(acc).square().sum(1)
        t = self.weight.packed if isinstance(self.weight, NF4Weight) else getattr(self.weight, "CB", self.weight)
        key = (t.data_ptr(), t._version, id(self.weight))
        if self._sqnorm_cache is None or self._sqnorm_cache[0] != key:
            acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
            self._sqnorm_cache = (key, self.dense_weight().detach().to(acc).square().sum(1))
        return self._sqnorm_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.active_adapter is None:
            return nn.functional.linear(x, self.dense_weight(x.dtype), self.bias)
        b = self.runtime_rank()
        # DyLoRA slices are views: A[:b] is contiguous, B[:, :b] strided; no copies
        A, B = (self.lora_A, self.lora_B) if b == self.r else (self.lora_A[:b], self.lora_B[:, :b])
        kw = dict(scale=self.scale_for(b), bias=self.bias, dropout_p=self.lora_dropout, training=self.training)
        if self.use_dora:
            return dora_linear(
                x, self.weight, A, B, self.lora_magnitude_vector, weight_sqnorm=self._weight_sqnorm(), **kw
            )
        return lora_linear(x, self.weight, A, B, **kw)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` (out, in) at the runtime rank, in float32 (float64 for fp64 A)."""
        acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        b = self.r if not self.dynamic_rank or self.active_rank is None else self.active_rank
        return (self.lora_B[:, :b].to(acc) @ self.lora_A[:b].to(acc)).mul_(self.scale_for(b))

    @torch.no_grad()
    def _set_base(self, w: Tensor) -> None:
        """Write a new dense base (fp32/fp64) back: in place, or requantized (lossy, as PEFT+bnb)."""
        if self.is_quantized:
            self.weight = quantize(w.to(self.weight.dtype), self.quant, self.blocksize, self.double_quant)
        else:
            self.weight.copy_(w.to(self.weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` so that forward is a plain linear (inference).
        DoRA: ``W <- (m / ||W + dW||_row) * (W + dW)``, as PEFT. A quantized base is requantized,
        which rounds (as PEFT does with bitsandbytes)."""
        if self.merged or self.active_adapter is None:
            return
        d = self.delta_weight()
        w = self.dense_weight(d.dtype) + d
        if self.use_dora:
            self._dora_merge_norm = torch.linalg.norm(w, dim=1)
            w = w * (self.lora_magnitude_vector.to(d.dtype) / self._dora_merge_norm).unsqueeze(1)
        self._set_base(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the rounding of W's dtype or quantization)."""
        if not self.merged:
            return
        d = self.delta_weight()
        w = self.dense_weight(d.dtype)
        if self.use_dora:
            w = w / (self.lora_magnitude_vector.to(d.dtype) / self._dora_merge_norm).unsqueeze(1)
            self._dora_merge_norm = None
        self._set_base(w - d)
        self.merged = False

    # ---- quantized base: state dict and device moves ------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:  # bitsandbytes' keys and bytes for the base weight
            destination.update(self.weight.state_dict_entries(prefix))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self.is_quantized:
            own = {k: v for k, v in state_dict.items() if k == prefix + "weight" or k.startswith(prefix + "weight.")}
            if own:
                # validated by from_state_dict; a damaged entry raises before anything changes
                q = type(self.weight).from_state_dict(own, prefix)
                if tuple(q.shape) != (self.out_features, self.in_features):
                    raise ValueError(
                        f"{prefix}weight: shape {tuple(q.shape)} != ({self.out_features}, {self.in_features})"
                    )
                self.weight = q.to(self.lora_A.device)
                self._sqnorm_cache = None
            elif strict:
                missing_keys.append(prefix + "weight")
            state_dict = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.is_quantized:  # follow device moves; the packed format never changes dtype
            device = fn(torch.empty(0, device=self.weight.device)).device
            if device != self.weight.device:
                self.weight = self.weight.to(device)
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
