"""The save policy of DESIGN.md section 1, measured with saved_tensors_hooks."""

import pytest
import torch
from helpers import make_problem

import fastlora


def saved_tensors(fn):
    """Run fn() and return the tensors autograd saved for backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def activation_bytes(saved, params):
    """Bytes of saved tensors that are not parameters (parameters are not activations)."""
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    return sum(t.nbytes for t in saved if t.untyped_storage().data_ptr() not in ptrs)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_x_and_z_only(p):
    M, K, N, r = 64, 48, 40, 4
    x, W, A, B, b = make_problem(M, K, N, r)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y, saved = saved_tensors(lambda: fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b, dropout_p=p, seed=3))
    acts = [
        t for t in saved if t.untyped_storage().data_ptr() not in {q.untyped_storage().data_ptr() for q in (W, A, B, b)}
    ]
    # x itself (same storage, no copy) and z (M x r)
    assert sorted(tuple(t.shape) for t in acts) == sorted([(M, K), (M, r)])
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in acts)
    assert activation_bytes(saved, (W, A, B, b)) == x.nbytes + M * r * 4
    y.sum().backward()  # and backward works from exactly that


def test_frozen_A_saves_no_x():
    M, K, N, r = 64, 48, 40, 4
    x, W, A, B, b = make_problem(M, K, N, r)
    x.requires_grad_(True)
    B.requires_grad_(True)
    y, saved = saved_tensors(lambda: fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.1, seed=3))
    assert activation_bytes(saved, (W, A, B)) == M * r * 4
    y.sum().backward()
    assert x.grad is not None and B.grad is not None


def test_frozen_B_saves_no_z():
    M, K, N, r = 32, 16, 24, 4
    x, W, A, B, b = make_problem(M, K, N, r)
    A.requires_grad_(True)
    y, saved = saved_tensors(lambda: fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.1, seed=3))
    assert activation_bytes(saved, (W, A, B)) == x.nbytes


def test_needs_input_grad_is_honoured(monkeypatch):
    x, W, A, B, b = make_problem(16, 12, 10, 2)
    B.requires_grad_(True)
    seen = {}
    mod = fastlora.backends.load("torch")
    orig = mod.backward

    def spy(*args):
        seen["needs"] = args[-1]
        return orig(*args)

    monkeypatch.setattr(mod, "backward", spy)
    fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b).sum().backward()
    assert seen["needs"] == (False, False, False, False, True)
    assert A.grad is None and B.grad is not None


def test_unfrozen_base_gets_exact_grads():
    x, W, A, B, b = make_problem(9, 7, 5, 2, dtype=torch.float64)
    W.requires_grad_(True)
    b.requires_grad_(True)
    y = fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b, dropout_p=0.3, seed=2)
    g = torch.randn_like(y)
    dW, db = torch.autograd.grad(y, (W, b), g)
    torch.testing.assert_close(dW, g.T @ x)
    torch.testing.assert_close(db, g.sum(0))
