"""LoRA variants that ride on the fused op: DoRA, LoRA+ parameter groups, LoRA-FA projection.

rsLoRA and DyLoRA only change the scale and the rank the fused op sees; they live in
``LoRALinear`` (fastlora/nn.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import _philox
from .functional import _check_p, _check_seed, _draw_seed_tensor, draw_seed, lora_linear


def dora_weight_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, weight_sqnorm: Tensor | None = None
) -> Tensor:
    """``||W_i + scale * (B A)_i||`` for every row i, shape (N,), without forming the N x K matrix:

    ``||W_i||^2 + 2 s sum_j B_ij (W A^T)_ij + s^2 (B (A A^T) B^T)_ii``: one read of W (for W A^T,
    N x r) and r x r work, instead of writing and re-reading an N x K matrix as PEFT does.
    ``weight_sqnorm`` (N,) is ``||W_i||^2``, cacheable while W is frozen. Accumulates in fp32
    (fp64 for fp64 inputs); returns W's dtype. No autograd graph (DoRA detaches the norm).
    """
    with torch.no_grad():
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        A, B = lora_A.to(acc), lora_B.to(acc)
        if weight_sqnorm is None:
            weight_sqnorm = weight.to(acc).square().sum(1)
        WAt = (weight @ lora_A.to(weight.dtype).T).to(acc)  # (N, r), the only pass over W
        cross = (B * WAt).sum(1)
        quad = ((B @ (A @ A.T)) * B).sum(1)
        sq = weight_sqnorm.to(acc) + 2 * scale * cross + scale * scale * quad
        return sq.clamp_min_(0).sqrt_().to(weight.dtype)


class _Dropout(torch.autograd.Function):
    """``x * mask / (1 - p)`` with the seeded mask regenerated in backward (never stored)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int | Tensor) -> Tensor:
        ctx.p, ctx.shape = p, x.shape
        ctx.seed = None if isinstance(seed, Tensor) else seed
        ctx.save_for_backward(seed if isinstance(seed, Tensor) else None)
        return _philox.dropout(x.reshape(-1, x.shape[-1]), p, seed).view(x.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        (seed_t,) = ctx.saved_tensors
        # d(xd)/dx = mask / (1 - p)
        gx = g.reshape(-1, g.shape[-1]).contiguous().clone()
        _philox.dropout_(gx, ctx.p, ctx.seed if seed_t is None else seed_t)
        return gx.view(ctx.shape), None, None


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    *,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    backend: str | None = None,
    weight_sqnorm: Tensor | None = None,
) -> Tensor:
    """DoRA (PEFT semantics, DESIGN.md section 6) on top of the fused LoRA op.

    x: (..., K); weight: (N, K) tensor or fastlora.quant weight; lora_A: (r, K); lora_B: (N, r);
    magnitude: (N,). ``g = magnitude / ||W + s B A||_row`` (norm detached, computed low-rank). Without dropout:
    ``y = g * (x W^T + s (x A^T) B^T) + bias`` (one fused GEMM, then a per-column scale).
    With dropout (PEFT's formula): ``y = x W^T + bias + (g - 1) * (xd W^T) + g * s * (xd A^T) B^T``.
    """
    _check_p(dropout_p)
    if magnitude.dim() != 1 or magnitude.shape[0] != weight.shape[0]:
        raise ValueError(
            f"magnitude shape {tuple(magnitude.shape)} must be ({weight.shape[0]},) for weight {tuple(weight.shape)}"
        )
    # a quantized base is dequantized transiently for the norm; the fused op dequantizes its own
    # copy, so none is kept for backward
    dense = weight if isinstance(weight, Tensor) else weight.dequantize(x.dtype)
    norm = dora_weight_norm(dense, lora_A, lora_B, scale, weight_sqnorm)
    g = (magnitude / norm.to(magnitude.dtype)).to(x.dtype)
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        y = lora_linear(x, weight, lora_A, lora_B, scale=scale, backend=backend) * g
        return y if bias is None else y + bias
    if seed is None:
        seed = _draw_seed_tensor() if torch.compiler.is_compiling() else draw_seed()
    elif not isinstance(seed, Tensor):
        _check_seed(seed)
    xd = _Dropout.apply(x, p, seed)
    # PEFT: x W^T + b + (g - 1) * (xd W^T) + g * s * (xd A^T) B^T = (x - xd) W^T + b + g * lora(xd).
    # The first term goes through the fused op with a zero-scaled, detached adapter, so it keeps no
    # activation and re-dequantizes a quantized W in backward instead of saving it.
    y = lora_linear(x - xd, weight, lora_A.detach(), lora_B.detach(), scale=0.0, bias=bias, backend=backend)
    return y + g * lora_linear(xd, weight, lora_A, lora_B, scale=scale, backend=backend)


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
    from .nn import LoRALinear

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
