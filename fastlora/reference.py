"""The oracle: plain, readable PyTorch for every op fastlora computes.

Nothing here is fast. Every backend is tested against these functions, in float64 where the
test asks for it. Dropout is given as an explicit boolean keep-mask so that the oracle owns no
random number generator.
"""

from __future__ import annotations

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
    xd = x
    if keep_mask is not None:
        xd = x * keep_mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))
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
    m = torch.ones_like(x) if keep_mask is None else keep_mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))
    xd = x * m
    z = xd @ lora_A.T
    dz = scale * (g @ lora_B)  # dz = s g B
    dB = scale * (g.T @ z)  # dB = s g^T z
    dA = dz.T @ xd  # dA = dz^T xd
    dx = g @ weight + (dz @ lora_A) * m  # dx = g W + mask * (dz A) / (1 - p)
    return dx, dA, dB, g.sum(0)
