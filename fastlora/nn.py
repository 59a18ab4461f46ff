"""Modules: ``LoRALinear``, ``inject``, parameter counting."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .functional import _check_p, lora_linear


class LoRALinear(nn.Module):
    """A frozen linear layer with a trainable low-rank update, computed by the fused op.

    ``y = x W^T + bias + scaling * B(A(dropout(x)))`` with ``scaling = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``). Parameters use PEFT's layout and names:
    ``weight`` (out, in) and ``bias`` (out,) frozen, ``lora_A`` (r, in) and ``lora_B`` (out, r)
    trainable. Initialised as PEFT: A Kaiming-uniform (a=sqrt(5)), B zeros, so a fresh layer
    equals its base.
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
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_p(lora_dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base as nn.Linear; adapters as PEFT (A Kaiming-uniform, B zeros)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        with torch.device("meta"):
            layer = cls(
                linear.in_features,
                linear.out_features,
                r,
                lora_alpha,
                lora_dropout,
                bias=linear.bias is not None,
                use_rslora=use_rslora,
            )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x,
            self.weight,
            self.lora_A,
            self.lora_B,
            scale=self.scaling,
            bias=self.bias,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` (out, in), computed in float32 (or float64) and cast to W's dtype."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)).mul_(self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` so that forward is a plain linear (inference)."""
        if self.merged:
            return
        self.weight.copy_((self.weight.to(self.delta_weight().dtype) + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the rounding of W's dtype)."""
        if not self.merged:
            return
        d = self.delta_weight()
        self.weight.copy_((self.weight.to(d.dtype) - d).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}"
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
) -> nn.Module:
    """Replace matching ``nn.Linear`` modules of ``model`` with :class:`LoRALinear`, in place, and
    freeze every other parameter. Returns ``model``.

    ``target_modules``: a list of module names matched exactly or as a dotted suffix
    (``["q_proj", "v_proj"]``), or a regex string matched against the full name, as in PEFT.
    Raises ValueError when nothing matches.
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
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), r, lora_alpha, lora_dropout, use_rslora))
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
