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


def _plain(x, W, A, B, s, b, mask, p):
    """The same math in plain autograd (the oracle's expression)."""
    from fastlora.reference import lora_linear_ref

    return lora_linear_ref(x, W, A, B, s, b, mask, p)


@pytest.mark.parametrize("M,p", [(80, 0.0), (5, 0.3), (80, 0.3)], ids=["M80-p0", "M5-p0.3", "M80-p0.3"])
@pytest.mark.parametrize("backend", ["torch", "triton", "hybrid"])
def test_double_backward_matches_plain_autograd(M, p, backend):
    """Issue 17 item 1: create_graph=True through lora_linear gives plain autograd's second
    derivatives (it was silently wrong for M >= 64 or p > 0: the backward's C++ ops have no
    autograd). Every input's second-order gradient is compared."""
    import fastlora

    torch.manual_seed(0)
    x = torch.randn(M, 32, dtype=torch.float64 if backend == "torch" else torch.float32, requires_grad=True)
    dt = x.dtype
    W, b = torch.randn(16, 32, dtype=dt), torch.randn(16, dtype=dt)
    A = torch.randn(4, 32, dtype=dt, requires_grad=True)
    B = torch.randn(16, 4, dtype=dt, requires_grad=True)
    mask = fastlora.dropout_mask((M, 32), p, 11) if p > 0 else None

    def second(fn):
        y = fn(x, A, B)
        gx, gA, gB = torch.autograd.grad(y.square().sum(), (x, A, B), create_graph=True)
        return torch.autograd.grad((gx.square().sum() + gA.square().sum() + gB.sin().sum()), (x, A, B))

    def fast(x, A, B):
        return fastlora.lora_linear(x, W, A, B, scale=0.5, bias=b, dropout_p=p, seed=11, backend=backend)

    got = second(fast)
    want = second(lambda x, A, B: _plain(x, W, A, B, 0.5, b, mask, p))
    tol = 1e-9 if dt == torch.float64 else 2e-3
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, rtol=tol, atol=tol * w_.abs().max().item())


def test_double_backward_refuses_when_lora_fa_dropped_x():
    """LoRA-FA (A frozen) saves no x; the mixed second derivative through z needs it: an error,
    never a wrong value."""
    import fastlora

    x = torch.randn(8, 12, requires_grad=True)
    W, A = torch.randn(6, 12), torch.randn(3, 12)
    B = torch.randn(6, 3, requires_grad=True)
    y = fastlora.lora_linear(x, W, A, B, scale=1.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), (x, B), create_graph=True)
