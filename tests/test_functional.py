"""The torch backend and the public functional API against the float64 oracle."""

import math

import pytest
import torch
from helpers import assert_close_fa, make_problem

import fastlora
from fastlora.reference import lora_grads_ref, lora_linear_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 16, 16, 1), (37, 33, 70, 13), (64, 128, 96, 8), (19, 70, 33, 64), (5, 24, 40, 128)]


def _id(M, K, N, r, dtype):
    return f"M{M}-K{K}-N{N}-r{r}-{str(dtype).split('.')[-1]}"


CASES = [pytest.param(*s, d, id=_id(*s, d)) for s in SHAPES for d in DTYPES]


@pytest.mark.parametrize("M,K,N,r,dtype", CASES)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_forward_backward_parity(M, K, N, r, dtype, p):
    x, W, A, B, b = make_problem(M, K, N, r, dtype=dtype, seed=M + K + N + r)
    seed, s = 1234, 2.0 / r
    mask = fastlora.dropout_mask((M, K), p, seed) if p else None
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = fastlora.lora_linear(x, W, A, B, scale=s, bias=b, dropout_p=p, seed=seed, backend="torch")
    assert y.dtype == dtype and y.shape == (M, N)
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), g)

    d64 = [t.detach().double() for t in (x, W, A, B, b)]
    y64 = lora_linear_ref(d64[0], d64[1], d64[2], d64[3], s, d64[4], mask, p)
    g64 = lora_grads_ref(g.double(), d64[0], d64[1], d64[2], d64[3], s, mask, p)
    xl, Wl, Al, Bl, bl = (t.detach() for t in (x, W, A, B, b))
    # PyTorch's own error in this dtype: the oracle's formula evaluated in `dtype`
    y_naive = lora_linear_ref(xl, Wl, Al, Bl, s, bl, mask, p)
    gn = lora_grads_ref(g, xl, Wl, Al, Bl, s, mask, p)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert_close_fa(y, y64, y_naive, atol, "y")
    for got, exp, naive, what in zip((dx, dA, dB), g64[:3], gn[:3], ("dx", "dA", "dB"), strict=True):
        assert_close_fa(got, exp, naive, atol * math.sqrt(M), what)


def test_gradcheck_torch_backend_with_dropout():
    x, W, A, B, b = make_problem(6, 9, 7, 3, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, W, A, B, b)]

    def f(x, W, A, B, b):
        return fastlora.lora_linear(x, W, A, B, scale=0.5, bias=b, dropout_p=0.4, seed=99, backend="torch")

    assert torch.autograd.gradcheck(f, inputs)
    # dropout really is on: the output differs from p=0
    y0 = fastlora.lora_linear(x, W, A, B, scale=0.5, bias=b, backend="torch")
    assert not torch.allclose(f(*inputs), y0)


def test_3d_and_noncontiguous_inputs():
    x, W, A, B, b = make_problem(0, 24, 20, 4, lead=(3, 5), dtype=torch.float64)
    xt = x.transpose(0, 1)  # (5, 3, 24) non-contiguous
    assert not xt.is_contiguous()
    xt.requires_grad_(True)
    A.requires_grad_(True)
    y = fastlora.lora_linear(xt, W, A, B, scale=1.0, bias=b, dropout_p=0.3, seed=5)
    mask = fastlora.dropout_mask((15, 24), 0.3, 5).view(5, 3, 24)
    torch.testing.assert_close(y, lora_linear_ref(xt.detach(), W, A.detach(), B, 1.0, b, mask, 0.3))
    g = torch.randn_like(y).transpose(0, 1).contiguous().transpose(0, 1)  # strided grad
    dx, dA = torch.autograd.grad(y, (xt, A), g)
    xr = xt.detach().requires_grad_(True)
    Ar = A.detach().requires_grad_(True)
    ex, eA = torch.autograd.grad(lora_linear_ref(xr, W, Ar, B, 1.0, b, mask, 0.3), (xr, Ar), g)
    torch.testing.assert_close(dx, ex)
    torch.testing.assert_close(dA, eA)
    assert dx.shape == xt.shape


def test_backends_agree_and_reference_backend():
    x, W, A, B, b = make_problem(10, 12, 8, 2, dtype=torch.float64)
    ys = [
        fastlora.lora_linear(x, W, A, B, scale=3.0, bias=b, dropout_p=0.5, seed=11, backend=n)
        for n in ("torch", "reference", "auto")
    ]
    torch.testing.assert_close(ys[0], ys[1])
    torch.testing.assert_close(ys[0], ys[2])


def test_training_false_disables_dropout_and_consumes_no_rng():
    x, W, A, B, b = make_problem(8, 12, 8, 2)
    torch.manual_seed(0)
    y_eval = fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b, dropout_p=0.5, training=False)
    after = torch.rand(1)
    torch.manual_seed(0)
    y_p0 = fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b)
    assert torch.equal(torch.rand(1), after)  # neither call drew a random number
    torch.testing.assert_close(y_eval, y_p0)
    torch.testing.assert_close(y_p0, lora_linear_ref(x, W, A, B, 1.0, b))


def test_seed_none_follows_manual_seed():
    x, W, A, B, b = make_problem(16, 32, 8, 4)
    torch.manual_seed(3)
    y1 = fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5)
    torch.manual_seed(3)
    y2 = fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5)
    y3 = fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)
    y4 = fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5, seed=42)
    assert torch.equal(y4, fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5, seed=42))


def test_nan_stays_in_its_row():
    x, W, A, B, b = make_problem(6, 10, 7, 2)
    x[2, 3] = float("nan")
    x.requires_grad_(True)
    y = fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b, dropout_p=0.2, seed=1)
    bad = torch.isnan(y).any(1)
    assert bad.tolist() == [False, False, True, False, False, False]


def test_empty_batch():
    x, W, A, B, b = make_problem(0, 10, 7, 2)
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b, dropout_p=0.1, seed=1)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A))


def test_autocast_cpu_bf16():
    x, W, A, B, b = make_problem(8, 16, 12, 4)
    A.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32
    ref = lora_linear_ref(*(t.bfloat16().double() for t in (x, W, A.detach(), B)), 1.0, b.bfloat16().double())
    assert (y.double() - ref).abs().max() < 0.1


def test_fp32_adapters_on_bf16_base():
    x, W, A, B, b = make_problem(8, 16, 12, 4, dtype=torch.bfloat16)
    A32 = A.float().requires_grad_(True)
    B32 = B.float().requires_grad_(True)
    y = fastlora.lora_linear(x, W, A32, B32, scale=1.0, bias=b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A32.grad.dtype == torch.float32 and B32.grad.dtype == torch.float32
    assert A32.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (dict(x=torch.ones(4, 9)), ValueError, ["x's last dim 9", "(4, 9)", "in_features 8"]),
        (dict(weight=torch.ones(6, 8, 1)), ValueError, ["weight must be 2-D", "(6, 8, 1)"]),
        (dict(lora_A=torch.ones(3, 7)), ValueError, ["lora_A shape (3, 7)", "K=8"]),
        (dict(lora_B=torch.ones(6, 2)), ValueError, ["lora_B shape (6, 2)", "(6, 3)"]),
        (dict(lora_A=torch.ones(0, 8), lora_B=torch.ones(6, 0)), ValueError, ["rank must be >= 1"]),
        (dict(bias=torch.ones(5)), ValueError, ["bias shape (5,)", "(6,)"]),
        (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
        (dict(dropout_p=-0.1), ValueError, ["dropout_p"]),
        (dict(dropout_p=float("nan")), ValueError, ["dropout_p"]),
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, ["floating-point", "int64"]),
        (dict(x=torch.ones(4, 8, dtype=torch.float64)), TypeError, ["float64", "weight dtype"]),
        (dict(bias=torch.ones(6, dtype=torch.float64)), TypeError, ["bias dtype"]),
        (dict(x=torch.ones(4, 8, device="meta")), ValueError, ["one device", "meta"]),
        (dict(scale=float("inf")), TypeError, ["scale"]),
        # issue 17: these raised RuntimeError / OverflowError, or passed at p=0 only
        (dict(scale=2**1030), TypeError, ["finite"]),
        (dict(x=torch.ones(4, 0), weight=torch.ones(6, 0), lora_A=torch.ones(3, 0)), ValueError, ["in_features"]),
        (dict(x=torch.ones(4, 8).to(torch.float8_e4m3fn)), TypeError, ["float8_e4m3fn"]),
        (dict(x=torch.ones(4, 8).to(torch.float8_e4m3fn), dropout_p=0.1), TypeError, ["float8_e4m3fn"]),
        (
            dict(
                x=torch.ones(4, 8, device="meta"),
                weight=torch.ones(6, 8, device="meta"),
                lora_A=torch.ones(3, 8, device="meta"),
                lora_B=torch.ones(6, 3, device="meta"),
                bias=None,
            ),
            ValueError,
            ["meta"],
        ),
        (dict(seed=-1, dropout_p=0.1), ValueError, ["seed"]),
        (dict(backend="nope"), ValueError, ["backend must be one of"]),
    ],
)
def test_bad_input(change, exc, words):
    kw = dict(
        x=torch.ones(4, 8),
        weight=torch.ones(6, 8),
        lora_A=torch.ones(3, 8),
        lora_B=torch.ones(6, 3),
        scale=1.0,
        bias=torch.ones(6),
    )
    kw.update(change)
    with pytest.raises(exc) as info:
        fastlora.lora_linear(kw.pop("x"), kw.pop("weight"), kw.pop("lora_A"), kw.pop("lora_B"), **kw)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_backend_selection_api():
    assert fastlora.get_backend() == "auto"
    assert {"auto", "torch", "reference"} <= set(fastlora.available_backends())
    fastlora.set_backend("torch")
    try:
        assert fastlora.get_backend() == "torch"
    finally:
        fastlora.set_backend("auto")
    with pytest.raises(ValueError):
        fastlora.set_backend("cuda")


def test_output_can_be_modified_in_place():
    # model code does `out += residual` on a linear's output; autograd must allow it
    x, W, A, B, b = make_problem(6, 8, 5, 2, lead=(2, 3))
    A.requires_grad_(True)
    y = fastlora.lora_linear(x, W, A, B, scale=1.0, bias=b, dropout_p=0.2, seed=4)
    y += 1.0
    y.sum().backward()
    ref = A.detach().clone().requires_grad_(True)
    mask = fastlora.dropout_mask((6, 8), 0.2, 4).view(2, 3, 8)
    (lora_linear_ref(x, W, ref, B, 1.0, b, mask, 0.2) + 1.0).sum().backward()
    torch.testing.assert_close(A.grad, ref.grad)
