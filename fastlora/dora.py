"""DoRA as a functional op on top of the fused LoRA op (PEFT semantics, DESIGN.md section 6).

``dora_linear`` is to ``LoRALinear(use_dora=True)`` what ``functional.lora_linear`` is to a plain
``LoRALinear``: the module computes its settings and calls it; it never reaches back up.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
