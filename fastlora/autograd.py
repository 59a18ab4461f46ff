"""The autograd.Function behind ``fastlora.lora_linear``: save/recompute policy, nothing else.

Saved for backward (docs/DESIGN.md section 1): ``x`` (only when dA or dW is needed; autograd
shares the storage with every other reader of x), ``z`` (M x r, only when dB is needed) and the
seed. Never a dropped copy of x, a mask, or any M x K / M x N temporary.

Double backward (``create_graph=True``): the backward then runs the same math with
differentiable ATen ops (the mask regenerated as a constant), so second derivatives are those
of plain autograd on the same expression. With A frozen (LoRA-FA) x is not saved; if x itself
needs a gradient and dB is asked for, the mixed second derivative through z needs x, and the
op refuses with an error instead of returning a silently wrong value.
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
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        W = weight if quant is None else backend.prepare_weight(quant, x2.shape[0], x.dtype, quant_route)
        y, z = backend.forward(x2, W, bias, lora_A, lora_B, scale, p, seed)
        nig = ctx.needs_input_grad
        # x is saved as the caller's tensor (not a reshaped copy) so its storage stays shared.
        # a seed drawn inside a compiled graph is a 0-d tensor: it is saved like one (8 bytes)
        seed_t = seed if isinstance(seed, Tensor) else None
        ctx.save_for_backward(
            x if (nig[3] or nig[1]) else None, z if nig[4] else None, None if quant else weight, lora_A, lora_B, seed_t
        )
        ctx.quant, ctx.quant_route, ctx.x_shape = quant, quant_route, x.shape
        ctx.scale, ctx.p, ctx.backend = scale, p, backend
        ctx.seed = seed if seed_t is None else None
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
        g = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
        seed = ctx.seed if seed_t is None else seed_t
        if x is not None and x.dim() != 2:
            x = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():  # create_graph=True: differentiable math, see the docstring
            dx, dW, db, dA, dB = _backward_differentiable(ctx, g, x, z, weight, lora_A, lora_B, seed, needs)
        else:
            if ctx.quant is not None:
                weight = ctx.backend.prepare_weight(ctx.quant, g.shape[0], g.dtype, ctx.quant_route)
            dx, dW, db, dA, dB = ctx.backend.backward(g, x, z, weight, lora_A, lora_B, ctx.scale, ctx.p, seed, needs)
        if dx is not None and dx.shape != ctx.x_shape:
            dx = dx.view(ctx.x_shape)
        return dx, dW, db, dA, dB, None, None, None, None, None


def _backward_differentiable(ctx, g, x, z, weight, lora_A, lora_B, seed, needs):
    """The backward formulas of docs/DESIGN.md section 1 in differentiable ATen ops."""
    need_dx, need_dW, need_db, need_dA, need_dB = needs
    p, s = ctx.p, ctx.scale
    if ctx.quant is not None:
        weight = ctx.quant.dequantize(g.dtype)
    if x is None and need_dB and need_dx:
        raise RuntimeError(
            "fastlora.lora_linear: double backward (create_graph=True) with a frozen lora_A needs x, which "
            "LoRA-FA does not save; make lora_A trainable or run this step without create_graph"
        )
    K = lora_A.shape[1]
    keep = None
    if p > 0:
        from .backends import load

        mask_fn = load("torch").dropout_mask
        keep = mask_fn(g.shape[0], K, p, int(seed), g.device)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)

    def drop(t: Tensor) -> Tensor:
        return t if keep is None else torch.where(keep, t * (1.0 / (1.0 - p)), zero)

    xd = None if x is None else drop(x)
    dz = s * (g @ lora_B)  # dz = s g B
    dx = g @ weight + drop(dz @ lora_A) if need_dx else None  # dx = g W + mask (dz A) / (1 - p)
    dA = dz.t() @ xd if need_dA else None  # dA = dz^T xd
    z_ = z if xd is None else xd @ lora_A.t()
    dB = s * (g.t() @ z_) if need_dB else None  # dB = s g^T z
    dW = g.t() @ x if need_dW else None
    db = g.sum(0) if need_db else None
    return dx, dW, db, dA, dB
