"""LoRA variants that ride on the fused op: LoRA+ parameter groups, LoRA-FA projection (and
DoRA's functional op, re-exported from fastlora/dora.py).

rsLoRA and DyLoRA only change the scale and the rank the fused op sees; they are parts of
``LoRALinear`` (fastlora/layers/).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .dora import dora_linear, dora_weight_norm
from .nn import LoRALinear

__all__ = ["LoRAFAOptimizer", "dora_linear", "dora_weight_norm", "lorafa_project_grads_", "loraplus_param_groups"]


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (B learns ``ratio`` times faster than A).

    The same four groups, in the same order, as PEFT's ``create_loraplus_optimizer``: A and other
    matrices (``lr``), embedding adapters (1e-6; none in fastlora), B and other 1-D trainable
    parameters (``lr * ratio``), and those without weight decay (biases, norms; ``lr * ratio``).
    """
    # PEFT's weight-decay split: parameters inside an nn.LayerNorm, or with "bias" in the name,
    # get no decay
    no_decay = {
        f"{mname}.{pname}" if mname else pname
        for mname, mod in model.named_modules()
        for pname, _ in mod.named_parameters(recurse=False)
        if isinstance(mod, nn.LayerNorm) or "bias" in (f"{mname}.{pname}" if mname else pname)
    }
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": [], "weight_decay": weight_decay, "lr": 1e-6},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]


@torch.no_grad()
def lorafa_project_grads_(model_or_layers: nn.Module | Iterable, delta: float = 1e-8) -> None:
    """LoRA-FA's gradient projection (PEFT's LoraFAOptimizer), in place on every LoRA-FA layer:
    ``B.grad <- B.grad @ pinv(A A^T + delta I) / scaling^2``. Call between ``backward()`` and
    ``optimizer.step()`` with any optimizer; :class:`LoRAFAOptimizer` does it for you."""
    mods = model_or_layers.modules() if isinstance(model_or_layers, nn.Module) else model_or_layers
    for m in mods:
        if isinstance(m, LoRALinear) and m.lora_fa and m.lora_B is not None and m.lora_B.grad is not None:
            A = m.lora_A.to(torch.float64 if m.lora_A.dtype == torch.float64 else torch.float32)
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            proj = torch.linalg.pinv(A @ A.T + delta * eye) / m.scaling**2
            m.lora_B.grad.copy_((m.lora_B.grad.to(A.dtype) @ proj).to(m.lora_B.grad.dtype))


class LoRAFAOptimizer:
    """Wraps any optimizer: projects LoRA-FA B gradients (:func:`lorafa_project_grads_`) before
    each ``step``. ``LoRAFAOptimizer(model, torch.optim.AdamW(params, lr=...))``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, delta: float = 1e-8) -> None:
        self.model, self.optimizer, self.delta = model, optimizer, delta

    def step(self, closure=None):
        lorafa_project_grads_(self.model, self.delta)
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)
