"""The autograd.Function behind ``fastlora.lora_linear``: save/recompute policy, nothing else.

Saved for backward (DESIGN.md section 1): ``x`` (only when dA or dW is needed; autograd shares
the storage with every other reader of x), ``z`` (M x r, only when dB is needed) and the seed.
Never a dropped copy of x, a mask, or any M x K / M x N temporary.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor


class LoRAFunction(torch.autograd.Function):
    """``y = x W^T + bias + scale * (dropout(x) A^T) B^T`` with a seeded, regenerated mask.

    x: (..., K); weight: (N, K) tensor or a fastlora.quant weight; bias: (N,) or None;
    lora_A: (r, K); lora_B: (N, r); all of one dtype and device (fastlora.functional checks).
    Returns (M, N) with M the product of x's leading dims.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scale: float,
        p: float,
        seed: int,
        backend: ModuleType,
        quant_route: str = "auto",
    ) -> Tensor:
        # A quantized base is dequantized here and again in backward, by the backend's route
        # (into the shared scratch buffer, or tile by tile inside its kernels); no dequantized
        # copy is kept per layer or saved for backward.
        quant = None if isinstance(weight, Tensor) else weight
        x2 = x.reshape(-1, x.shape[-1])
        W = weight if quant is None else backend.prepare_weight(quant, x2.shape[0], x.dtype, quant_route)
        y, z = backend.forward(x2, W, bias, lora_A, lora_B, scale, p, seed)
        del W
        need_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[1]
        need_z = ctx.needs_input_grad[4]
        # x is saved as the caller's tensor (not a reshaped copy) so its storage stays shared.
        # a seed drawn inside a compiled graph is a 0-d tensor: it is saved like one (8 bytes)
        seed_t = seed if isinstance(seed, Tensor) else None
        saved_W = None if quant else weight
        ctx.save_for_backward(x if need_x else None, z if need_z else None, saved_W, lora_A, lora_B, seed_t)
        ctx.quant, ctx.quant_route, ctx.x_shape = quant, quant_route, x.shape
        ctx.scale, ctx.p, ctx.backend = scale, p, backend
        ctx.seed = None if seed_t is not None else seed
        # (M, N): the caller views it as (..., N). A view made here would make the output a
        # Function-created view, which autograd forbids modifying in place (`y += residual`).
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, z, weight, lora_A, lora_B, seed_t = ctx.saved_tensors
        nig = ctx.needs_input_grad
        needs = (nig[0], nig[1], nig[2], nig[3], nig[4])
        if not any(needs):
            return (None,) * 10
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.quant is not None:
            weight = ctx.backend.prepare_weight(ctx.quant, g.shape[0], g.dtype, ctx.quant_route)
        x2 = None if x is None else x.reshape(-1, x.shape[-1])
        dx, dW, db, dA, dB = ctx.backend.backward(
            g, x2, z, weight, lora_A, lora_B, ctx.scale, ctx.p, ctx.seed if seed_t is None else seed_t, needs
        )
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dW, db, dA, dB, None, None, None, None, None
