"""The oracle: plain, readable PyTorch for every op fastlora computes.

Nothing here is fast. Every backend is tested against these functions, in float64 where the
test asks for it. Dropout is given as an explicit boolean keep-mask so that the oracle owns no
random number generator. A dropped element contributes exactly zero whatever its value (NaN and
Inf included): ``where(keep, x / (1 - p), 0)``, not ``x * mask``, the rule every backend follows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    bias: Tensor | None = None,
    keep_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``y = x W^T + bias + scale * (dropout(x) A^T) B^T``.

    x: (..., K); weight: (N, K); lora_A: (r, K); lora_B: (N, r); bias: (N,) or None;
    keep_mask: bool, same shape as x (True = kept) or None for no dropout. Kept elements are
    scaled by ``1 / (1 - dropout_p)``. Differentiable by plain autograd.
    """
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    xd = x if keep_mask is None else _dropout(x, keep_mask, dropout_p)
    z = xd @ lora_A.T
    return y + scale * (z @ lora_B.T)


def lora_grads_ref(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    keep_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form gradients (dx, dA, dB, dbias) of :func:`lora_linear_ref` for 2-D x.

    g: (M, N) upstream gradient. Written out term by term from DESIGN.md section 1.
    """
    drop = (lambda t: t) if keep_mask is None else (lambda t: _dropout(t, keep_mask, dropout_p))
    xd = drop(x)
    z = xd @ lora_A.T
    dz = scale * (g @ lora_B)  # dz = s g B
    dB = scale * (g.T @ z)  # dB = s g^T z
    dA = dz.T @ xd  # dA = dz^T xd
    dx = g @ weight + drop(dz @ lora_A)  # dx = g W + mask * (dz A) / (1 - p)
    return dx, dA, dB, g.sum(0)


def _dropout(x: Tensor, keep_mask: Tensor, dropout_p: float) -> Tensor:
    """``where(keep, x / (1 - p), 0)``: a dropped element is exactly 0, even when x is NaN or Inf."""
    return torch.where(keep_mask, x * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=x.dtype, device=x.device))


def rslora_scale(lora_alpha: float, r: int) -> float:
    """rsLoRA: ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    return lora_alpha / math.sqrt(r)


def dylora_ref(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_alpha: float, b: int, bias=None
) -> Tensor:
    """DyLoRA at runtime rank ``b <= r``: the first b rows of A and columns of B, scale alpha/b."""
    return lora_linear_ref(x, weight, lora_A[:b], lora_B[:, :b], lora_alpha / b, bias)


def dora_weight_norm_ref(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``||W + scale * B A||`` per output row (N,), materialising the N x K matrix as PEFT does."""
    return torch.linalg.norm(weight + scale * (lora_B @ lora_A), dim=1)


def dora_ref(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scale: float,
    bias: Tensor | None = None,
    keep_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """DoRA in PEFT's semantics. ``g = magnitude / ||W + s B A||_row`` with the norm detached;
    without dropout ``y = g * (x W^T + s z B^T) + bias``; with dropout (xd = dropout(x))
    ``y = x W^T + bias + (g - 1) * (xd W^T) + g * s * (xd A^T) B^T``. magnitude: (N,)."""
    g = magnitude / dora_weight_norm_ref(weight, lora_A, lora_B, scale).detach()
    base = x @ weight.T
    if keep_mask is None:
        y = g * (base + scale * (x @ lora_A.T) @ lora_B.T)
    else:
        xd = _dropout(x, keep_mask, dropout_p)
        y = base + (g - 1) * (xd @ weight.T) + g * scale * ((xd @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


def lorafa_project_ref(grad_B: Tensor, lora_A: Tensor, scale: float, delta: float = 1e-8) -> Tensor:
    """LoRA-FA's projected B gradient (PEFT's LoraFAOptimizer):
    ``grad_B @ pinv(A A^T + delta I) / scale^2``."""
    AAt = lora_A @ lora_A.T
    eye = torch.eye(AAt.shape[0], dtype=AAt.dtype, device=AAt.device)
    return grad_B @ torch.linalg.pinv(AAt + delta * eye) / scale**2
