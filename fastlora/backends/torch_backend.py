"""The ``torch`` backend: the fused op written with ATen calls.

CPU default and GPU fallback. No M x N temporary besides ``y`` and no stored mask: dropout is
regenerated from the seed by ``fastlora._philox`` (a C++ op on CPU when the extension is built).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _philox


def is_available(device: torch.device) -> bool:
    return True


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
    xd = _philox.dropout(x, p, seed) if p > 0 else x
    z = torch.mm(xd, lora_A.t())  # (M, r)
    del xd  # an M x K temporary, never kept for backward
    # The rank-r tail writes y first, then the base GEMM accumulates into it (beta=1), so y is
    # the only M x N buffer.
    if bias is None:
        # scale the (M, r) factor, not the (M, N) product: no extra pass over y
        y = torch.mm(z if scale == 1.0 else z * scale, lora_B.t())
    else:
        y = torch.addmm(bias, z, lora_B.t(), alpha=scale)
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
        # dz = s * g @ B
        dz = torch.mm(g, lora_B)
        if scale != 1.0:
            dz.mul_(scale)
    if need_dB:
        # dB = s * g^T @ z
        dB = torch.mm(g.t(), z)
        if scale != 1.0:
            dB.mul_(scale)
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
    if need_dW:
        # dW = g^T @ x (only when the caller unfroze the base weight)
        dW = torch.mm(g.t(), x)
    if need_db:
        db = g.sum(0)
    return dx, dW, db, dA, dB
