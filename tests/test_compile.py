"""torch.compile: no graph breaks, same numbers as eager, and opcheck on the registered ops."""

import pytest
import torch
import torch._dynamo
from torch import nn

import fastlora
from fastlora import LoRALinear


def _layer(**kw):
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, r=4, lora_alpha=8, **kw)
    nn.init.normal_(layer.lora_B)
    return layer


CASES = {
    "lora-p0": dict(lora_dropout=0.0),
    "lora-p0.1": dict(lora_dropout=0.1),
    "dora-p0": dict(use_dora=True),
    "dora-p0.2": dict(use_dora=True, lora_dropout=0.2),
    "lorafa-p0.1": dict(lora_fa=True, lora_dropout=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_fullgraph_no_breaks_and_matches_eager(case):
    layer = _layer(**CASES[case])
    x = torch.randn(2, 5, 32)
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, [str(b.reason)[:300] for b in explain.break_reasons]
    torch._dynamo.reset()

    def run(fn):
        torch.manual_seed(123)  # the dropout seed is drawn from torch's generator in both
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        layer.zero_grad()
        return [y.detach(), xi.grad] + grads

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_functional_fullgraph_with_explicit_seed_inductor():
    layer = _layer()
    x = torch.randn(7, 32, requires_grad=True)

    def f(x, A, B):
        return fastlora.lora_linear(x, layer.weight, A, B, scale=2.0, bias=layer.bias, dropout_p=0.3, seed=99)

    cf = torch.compile(f, fullgraph=True)  # inductor: the custom ops are opaque calls in its code
    y = cf(x, layer.lora_A, layer.lora_B)
    torch.testing.assert_close(y, f(x, layer.lora_A, layer.lora_B), rtol=1e-5, atol=1e-5)
    gx, gA = torch.autograd.grad(y.sum(), (x, layer.lora_A))
    ex, eA = torch.autograd.grad(f(x, layer.lora_A, layer.lora_B).sum(), (x, layer.lora_A))
    torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gA, eA, rtol=1e-5, atol=1e-5)


def test_opcheck_dropout_ops():
    x = torch.randn(6, 10)
    seed_t = torch.tensor(5, dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastlora.dropout_tseed, (x, 0.3, seed_t))
    torch.library.opcheck(torch.ops.fastlora.dropout_tseed_, (x.clone(), 0.3, seed_t))
    torch.library.opcheck(torch.ops.fastlora.dropout, (x, 0.3, 5))
    torch.library.opcheck(torch.ops.fastlora.dropout_, (x.clone(), 0.3, 5))
    torch.library.opcheck(torch.ops.fastlora.dropout_mask, (6, 10, 0.3, 5))


def test_tensor_seed_equals_int_seed():
    x, W, A, B = torch.randn(5, 12), torch.randn(8, 12), torch.randn(3, 12), torch.randn(8, 3)
    a = fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5, seed=31)
    b = fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5, seed=torch.tensor(31))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="0-d int64"):
        fastlora.lora_linear(x, W, A, B, scale=1.0, dropout_p=0.5, seed=torch.tensor([31]))


_FRESH_PROCESS = r"""
import os, sys, torch
import torch._dynamo
import fastlora

backend = sys.argv[1]
x = torch.randn(6, 32, requires_grad=True)
W, A, B = torch.randn(24, 32), torch.randn(4, 32, requires_grad=True), torch.randn(24, 4, requires_grad=True)


def f(x, A, B):  # seed=None with dropout: the seed is drawn inside the graph
    return fastlora.lora_linear(x, W, A, B, scale=2.0, dropout_p=0.3, backend=backend)


explain = torch._dynamo.explain(f)(x, A, B)
assert explain.graph_break_count == 0, [str(b.reason)[:300] for b in explain.break_reasons]
torch._dynamo.reset()
torch.manual_seed(7)
y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, A, B)
gx, gA = torch.autograd.grad(y.square().sum(), (x, A))
torch.manual_seed(7)
y2 = f(x, A, B)
ex, eA = torch.autograd.grad(y2.square().sum(), (x, A))
for a, b in ((y, y2), (gx, ex), (gA, eA)):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("backend", ["triton", "hybrid", "torch"])
def test_first_call_compiled_in_a_fresh_process_with_dropout(backend, tmp_path):
    """Issue 17 items 10 and 11: a process whose first fastlora call is compiled, with dropout
    and no explicit seed, traces with no graph break on every kernel backend (their ops are
    registered at import, and a seed drawn in the graph is read inside the ops) and gives
    eager's numbers. On CPU the Triton kernels run interpreted: the same host code as a GPU."""
    import os
    import subprocess
    import sys

    script = tmp_path / "first_call.py"
    script.write_text(_FRESH_PROCESS)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET")
    out = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
