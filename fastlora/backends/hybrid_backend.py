"""The ``hybrid`` plan: cuBLAS for the two big GEMMs, Triton kernels for the rank-r work.

cuBLAS is the bar on a GPU (docs/DESIGN.md section 3): measured on an H200, Triton GEMMs ran
at 83-86 % of it. So ``x W^T`` and ``g W`` are ``torch.addmm_`` calls that accumulate (beta = 1)
into the buffer a rank-r kernel wrote, and the kernels of ``triton_kernels/lora_rank.py`` (with
F1 and B1) do the rest, each reading its big operand once:

forward   F1 ``z = dropout(x) A^T`` (one read of x); ``y = s z B^T + bias`` written by
          ``lora_tail``; ``y += x W^T`` (cuBLAS).
backward  B1 ``dz = s g B``, ``dB = s g^T z`` (one read of g); ``lora_dA_tail`` writes
          ``keep * (dz A) / (1 - p)`` into dx and returns ``dA = dz^T dropout(x)`` (one read of
          x); ``dx += g W`` (cuBLAS).

``FASTLORA_HYBRID_TAIL=after`` runs cuBLAS first and adds the tail to its output instead
(one more read of y / dx, but a plain GEMM without beta = 1): which is faster is a measurement.
A quantized base is dequantized into the shared scratch buffer (Triton) at every M, then cuBLAS.

Eager calls go straight to the launchers (no ``torch.library`` dispatch: ~0.4 ms a call on the
host, measured); under ``torch.compile`` the same code runs as two registered ops.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import base_grads
from . import triton_backend as _fused

tk = _fused.tk
is_available = _fused.is_available
dropout_mask = _fused.dropout_mask

TAIL_FIRST = os.environ.get("FASTLORA_HYBRID_TAIL", "first") != "after"


def prepare_weight(weight, M: int, dtype: torch.dtype, route: str) -> Tensor:
    """Always the scratch route: W dequantized by the Triton kernel into the shared buffer."""
    return _fused.prepare_weight(weight, M, dtype, "scratch")


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float, seed: int):
    z = tk.lora_shrink(x, A, p, seed)
    if TAIL_FIRST:
        y = tk.lora_tail(z, B, bias, scale, x.new_empty((x.shape[0], weight.shape[0])), accumulate=False)
        y.addmm_(x, weight.t())
    else:
        y = tk.lora_tail(z, B, bias, scale, torch.mm(x, weight.t()), accumulate=True)
    return y, z


def _backward(g, x, z, weight, A, B, scale: float, p: float, seed: int, need_dx: bool, need_dA: bool, need_dB: bool):
    dx = dA = dB = None
    if not (need_dx or need_dA or need_dB):
        return dx, dA, dB
    dz, dB = tk.lora_bwd_dz_dB(g, z if need_dB else None, B, scale, need_dx or need_dA)
    dB = dB if need_dB else None
    if need_dx:
        if TAIL_FIRST:
            dx = g.new_empty((g.shape[0], weight.shape[1]))
            dA = tk.lora_dA_tail(dz, x if need_dA else None, A, p, seed, dx, accumulate=False)
            dx.addmm_(g, weight)
        else:
            dx = torch.mm(g, weight)
            dA = tk.lora_dA_tail(dz, x if need_dA else None, A, p, seed, dx, accumulate=True)
    elif need_dA:
        dA = tk.lora_dA_tail(dz, x, A, p, seed, None)
    return dx, dA, dB


def _fwd_fake(x, weight, bias, A, B, scale, p, seed, seed_t):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], A.shape[0]))


@_fused.register("hybrid_lora_fwd", _fwd_fake)
def _fwd_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    A: Tensor,
    B: Tensor,
    scale: float,
    p: float,
    seed: int,
    seed_t: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, bias, A, B, scale, p, _fused.host_seed(seed if seed_t is None else seed_t))


def _bwd_fake(g, x, z, weight, A, B, scale, p, seed, seed_t, need_dx, need_dA, need_dB):
    return (
        g.new_empty((g.shape[0], weight.shape[1])) if need_dx else g.new_empty((0,)),
        A.new_empty(A.shape) if need_dA else g.new_empty((0,)),
        B.new_empty(B.shape) if need_dB else g.new_empty((0,)),
    )


@_fused.register("hybrid_lora_bwd", _bwd_fake)
def _bwd_op(
    g: Tensor,
    x: Tensor | None,
    z: Tensor | None,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    p: float,
    seed: int,
    seed_t: Tensor | None,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    seed = _fused.host_seed(seed if seed_t is None else seed_t)
    dx, dA, dB = _backward(g, x, z, weight, A, B, scale, p, seed, need_dx, need_dA, need_dB)
    # an op's outputs never alias each other: a fresh empty for each one not computed
    return tuple(g.new_empty((0,)) if t is None else t for t in (dx, dA, dB))


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float, p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """x: (M, K), weight: (N, K) dense (a quantized base arrives dequantized), bias: (N,) | None,
    lora_A: (r, K), lora_B: (N, r) -> (y: (M, N), z: (M, r))."""
    tk.common.check_dtype(x)
    if torch.compiler.is_compiling():
        return torch.ops.fastlora.hybrid_lora_fwd(x, weight, bias, lora_A, lora_B, scale, p, *_fused.seed_args(seed))
    return _forward(x, weight, bias, lora_A, lora_B, scale, p, _fused.host_seed(seed))


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
    """g: (M, N) -> (dx, dW, dbias, dA, dB), None where ``needs`` says so."""
    need_dx, need_dW, need_db, need_dA, need_dB = needs
    if torch.compiler.is_compiling():
        dx, dA, dB = torch.ops.fastlora.hybrid_lora_bwd(
            g, x, z, weight, lora_A, lora_B, scale, p, *_fused.seed_args(seed), need_dx, need_dA, need_dB
        )
        dx, dA, dB = (t if need else None for t, need in ((dx, need_dx), (dA, need_dA), (dB, need_dB)))
    else:
        seed = _fused.host_seed(seed)
        dx, dA, dB = _backward(g, x, z, weight, lora_A, lora_B, scale, p, seed, need_dx, need_dA, need_dB)
    dW, db = base_grads(g, x, need_dW, need_db)
    return dx, dW, db, dA, dB
