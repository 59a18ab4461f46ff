"""Shared test utilities: random LoRA problems and the FlashAttention error rule."""

from __future__ import annotations

import torch

import fastlora


def make_problem(M, K, N, r, dtype=torch.float32, bias=True, seed=0, lead=None, device="cpu"):
    """Random (never zero) x, W, A, B, bias; B is non-zero so the LoRA branch is exercised."""
    g = torch.Generator().manual_seed(seed)
    shape = (M, K) if lead is None else (*lead, K)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64) / r**0.5
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(W), cast(A), cast(B), cast(b)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_fa(out, ref64, naive, atol=1e-6, what="output"):
    """FlashAttention's rule: the error of ``out`` against the float64 oracle is at most twice
    the error that plain PyTorch makes in the same dtype (``naive``), plus a small atol."""
    e_out, e_naive = max_err(out, ref64), max_err(naive, ref64)
    assert e_out <= 2 * e_naive + atol, f"{what}: err {e_out:.3e} > 2 * torch's {e_naive:.3e} + {atol:g}"


def keep_mask(shape2d, p, seed):
    return fastlora.dropout_mask(shape2d, p, seed)
