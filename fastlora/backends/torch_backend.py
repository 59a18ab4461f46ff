"""The ``torch`` backend: the fused op written with ATen calls.

CPU default and GPU fallback. No M x N temporary besides ``y`` and no stored mask: dropout is
regenerated from the seed by ``fastlora._philox`` (a C++ op on CPU when the extension is built).
With dropout on the CPU the masked products run as fused C++ ops (csrc/lora_cpu.cpp) that never
write dropout(x) or the masked dx tail as an M x K tensor; elsewhere they are dropout + matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _philox
from ..quant import dequantize_scratch
from . import base_grads


def is_available(device: torch.device) -> bool:
    return True


def prepare_weight(weight, M: int, dtype: torch.dtype, route: str) -> Tensor:
    """Always the scratch route: the C++ (CPU) or PyTorch dequantization into the shared buffer,
    then ATen's GEMM; there are no in-register kernels to fuse it into."""
    return dequantize_scratch(weight, dtype)


def _fused(t: Tensor, p: float) -> bool:
    """Whether the fused C++ ops (fastlora._philox.dropout_shrink & co.) run the masked products:
    always on the CPU with dropout; without it only where their own kernels beat a plain
    matmul."""
    return _philox.fused_available(t.device) and (p > 0 or _philox.fused_kernels(t))


def dropout_mask(M: int, K: int, p: float, seed: int, device: torch.device) -> Tensor:
    return _philox.keep_mask(M, K, p, seed, device)


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    if _fused(x, p):
        # (M, r), dropout(x) never materialised; inputs checked by lora_linear: the op directly
        if isinstance(seed, int):
            z = torch.ops.fastlora.dropout_shrink(x, lora_A, p, seed, 0)
        else:
            z = _philox.dropout_shrink(x, lora_A, p, seed)
    else:
        xd = _philox.dropout(x, p, seed) if p > 0 else x
        z = torch.mm(xd, lora_A.t())  # (M, r)
        del xd  # an M x K temporary, never kept for backward
    # The rank-r tail writes y first, then the base GEMM accumulates into it (beta=1), so y is
    # the only M x N buffer. (lora_expand scales the (M, r) factor, not the (M, N) product.)
    y = _philox.lora_expand(z, lora_B, bias, scale)
    y.addmm_(x, weight.t())
    return y, z


def backward(
    g: Tensor,
    x: Tensor | None,
    z: Tensor | None,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    p: float,
    seed: int,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    need_dx, need_dW, need_db, need_dA, need_dB = needs
    dx = dW = db = dA = dB = None
    dz = None
    if need_dx or need_dA:
        # dz = s * g @ B and dB = s * g^T @ z (one pass over g where the C++ op runs)
        dz, dB = _philox.lora_gpass(g, lora_B, z if need_dB else None, scale)
    elif need_dB:
        dB = torch.mm(g.t(), z)
        if scale != 1.0:
            dB.mul_(scale)
    if (need_dx or need_dA) and _fused(g, p):
        # fused C++ ops: dA = dz^T @ dropout(x) and dx = g @ W + dropout(dz @ A) through
        # row-block buffers; with both, one pass draws the mask once for the two products.
        # (Adding the tail to g @ W measured as fast as writing it first and adding g @ W with
        # the GEMM's beta = 1, which needs no extra op.)
        if need_dx:
            dx = torch.mm(g, weight)
            if need_dA and isinstance(seed, int):
                dA = torch.ops.fastlora.dropout_dA_tail_add_(dx, dz, x, lora_A, p, seed, 0)
            elif need_dA:
                dA = _philox.dropout_dA_tail_add_(dx, dz, x, lora_A, p, seed)
            else:
                _philox.dropout_tail_add_(dx, dz, lora_A, p, seed)
        else:
            dA = _philox.dropout_dA(dz, x, p, seed)
        need_dx = need_dA = False
    if need_dA:
        # dA = dz^T @ dropout(x), mask regenerated from the seed
        xd = _philox.dropout(x, p, seed) if p > 0 else x
        dA = torch.mm(dz.t(), xd)
        del xd
    if need_dx:
        # dx = g @ W + mask * (dz @ A) / (1 - p): the tail is masked in place, then the base
        # GEMM accumulates into the same buffer.
        dx = torch.mm(dz, lora_A)
        if p > 0:
            _philox.dropout_(dx, p, seed)
        dx.addmm_(g, weight)
    dW, db = base_grads(g, x, need_dW, need_db)
    return dx, dW, db, dA, dB
