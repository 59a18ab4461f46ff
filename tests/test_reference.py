import pytest
import torch
from helpers import make_problem

from fastlora.reference import lora_grads_ref, lora_linear_ref


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_reference_matches_naive_autograd(p):
    x, W, A, B, b = make_problem(7, 11, 5, 3, dtype=torch.float64)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= p if p else None
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    b.requires_grad_(True)
    y = lora_linear_ref(x, W, A, B, 0.7, b, mask, p)
    # naive formula, written independently
    xd = x if mask is None else torch.where(mask, x / (1 - p), torch.zeros_like(x))
    y_naive = torch.nn.functional.linear(x, W, b) + 0.7 * torch.nn.functional.linear(
        torch.nn.functional.linear(xd, A), B
    )
    torch.testing.assert_close(y, y_naive, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    dx, dA, dB, db = torch.autograd.grad(y, (x, A, B, b), g)
    cx, cA, cB, cb = lora_grads_ref(g, x.detach(), W, A.detach(), B.detach(), 0.7, mask, p)
    for got, exp in ((dx, cx), (dA, cA), (dB, cB), (db, cb)):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    x, W, A, B, b = make_problem(4, 6, 5, 2, dtype=torch.float64)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) >= 0.3
    inputs = [t.requires_grad_(True) for t in (x, W, A, B, b)]
    assert torch.autograd.gradcheck(lambda x, W, A, B, b: lora_linear_ref(x, W, A, B, 1.5, b, mask, 0.3), inputs)
