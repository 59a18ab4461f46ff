"""LoRA layers on NF4 / int8 bases: oracle parity, no kept dequantized copy, bnb state dicts."""

import pytest
import torch
from test_autograd import saved_tensors
from torch import nn

import fastlora
from fastlora import LoRALinear
from fastlora.quant import Int8Weight, NF4Weight, quantize
from fastlora.reference import dora_ref, lora_linear_ref

BNB_4BIT_KEYS = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
]


def _layer(quant, K=70, N=33, use_dora=False, p=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    lin = nn.Linear(K, N).to(dtype)
    layer = LoRALinear.from_linear(lin, r=4, lora_alpha=8, lora_dropout=p, quant=quant, use_dora=use_dora)
    nn.init.normal_(layer.lora_B)
    return lin, layer


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_quantized_lora_matches_oracle_on_dequantized_weight(quant, p):
    lin, layer = _layer(quant, p=p)
    assert isinstance(layer.weight, NF4Weight if quant == "nf4" else Int8Weight)
    W = layer.weight.dequantize(torch.float32)
    assert 0 < (W - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()  # really quantized
    x = torch.randn(3, 5, 70, requires_grad=True)
    seed = 77
    y = fastlora.lora_linear(
        x, layer.weight, layer.lora_A, layer.lora_B, scale=layer.scaling, bias=layer.bias, dropout_p=p, seed=seed
    )
    mask = fastlora.dropout_mask((15, 70), p, seed).view(3, 5, 70) if p else None
    xr = x.detach().clone().requires_grad_(True)
    Ar = layer.lora_A.detach().clone().requires_grad_(True)
    Br = layer.lora_B.detach().clone().requires_grad_(True)
    yr = lora_linear_ref(xr, W, Ar, Br, layer.scaling, layer.bias, mask, p)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
    exp = torch.autograd.grad(yr, (xr, Ar, Br), g)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_no_dequantized_copy_is_kept(quant):
    _, layer = _layer(quant, K=64, N=48)
    x = torch.randn(8, 64, requires_grad=True)
    y, saved = saved_tensors(lambda: layer(x))
    shapes = [tuple(t.shape) for t in saved]
    assert (48, 64) not in shapes, shapes  # only x, z and the adapter are saved
    assert sorted(shapes) == sorted([(8, 64), (8, 4), (4, 64), (48, 4)])
    y.sum().backward()
    assert layer.lora_A.grad is not None
    assert not any(isinstance(v, torch.Tensor) and v.shape == (48, 64) for v in vars(layer).values())


def test_dora_on_nf4_base_matches_oracle():
    _, layer = _layer("nf4", use_dora=True)
    W = layer.weight.dequantize(torch.float32)
    torch.testing.assert_close(
        layer.lora_magnitude_vector,
        torch.linalg.norm(nn.Linear(70, 33).weight, dim=1) * 0 + layer.lora_magnitude_vector,
    )
    x = torch.randn(6, 70)
    y = layer(x)
    yr = dora_ref(x, W, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling, layer.bias)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


def test_state_dict_has_bitsandbytes_keys_and_round_trips():
    _, layer = _layer("nf4")
    sd = layer.state_dict()
    assert [k for k in sd if k.startswith("weight")] == BNB_4BIT_KEYS
    assert set(sd) == set(BNB_4BIT_KEYS) | {"bias", "lora_A", "lora_B"}
    fresh = LoRALinear(70, 33, r=4, lora_alpha=8, quant="nf4")
    fresh.load_state_dict(sd)
    x = torch.randn(4, 70)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_bitsandbytes_linear4bit_state_dict_loads():
    bnb = pytest.importorskip("bitsandbytes")  # a test dependency, present in CI
    torch.manual_seed(1)
    lin = nn.Linear(64, 40)
    b4 = bnb.nn.Linear4bit(64, 40, bias=True, compress_statistics=True, quant_type="nf4")
    b4.weight = bnb.nn.Params4bit(
        lin.weight.detach(), requires_grad=False, blocksize=64, compress_statistics=True, quant_type="nf4", module=b4
    )
    b4.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
    b4 = b4.to("cpu")  # bitsandbytes quantizes on the move to a device
    bsd = b4.state_dict()
    layer = LoRALinear(64, 40, r=4, quant="nf4")
    result = layer.load_state_dict(bsd, strict=False)
    assert set(result.missing_keys) == {"lora_A", "lora_B"} and not result.unexpected_keys
    deq = bnb.functional.dequantize_4bit(b4.weight.data, b4.weight.quant_state)
    torch.testing.assert_close(layer.weight.dequantize(torch.float32), deq, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, lin.bias)
    # and back: fastlora's entries rebuild bitsandbytes' quantized parameter (bnb's own
    # load_state_dict cannot restore a quant state: bitsandbytes issue #1946)
    ours = layer.state_dict()
    stats = {k[len("weight.") :]: v for k, v in ours.items() if k.startswith("weight.")}
    p4 = bnb.nn.Params4bit.from_prequantized(data=ours["weight"], quantized_stats=stats, device="cpu")
    torch.testing.assert_close(bnb.functional.dequantize_4bit(p4.data, p4.quant_state), deq, rtol=0, atol=0)


def test_corrupt_state_dict_is_refused_and_layer_unchanged():
    _, layer = _layer("nf4")
    sd = layer.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    bad = dict(sd)
    bad["weight.absmax"] = bad["weight.absmax"][:-1]
    with pytest.raises(ValueError):
        layer.load_state_dict(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    wrong = LoRALinear(60, 33, r=4, quant="nf4").state_dict()
    with pytest.raises((ValueError, RuntimeError)):
        layer.load_state_dict(wrong)


def test_inject_quantized_and_dtype_moves_keep_format():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    fastlora.inject(model, ["0", "2"], r=4, quant="nf4", blocksize=128, double_quant=False)
    assert isinstance(model[0].weight, NF4Weight) and model[0].weight.blocksize == 128
    assert not model[0].weight.double_quant
    model.double()  # adapters follow; the packed base keeps its exact bytes
    assert model[0].lora_A.dtype == torch.float64 and model[0].weight.packed.dtype == torch.uint8
    y = model(torch.randn(2, 64, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


def test_merge_requantizes():
    lin, layer = _layer("int8")
    layer.eval()
    x = torch.randn(4, 70)
    y = layer(x)
    layer.merge()
    assert isinstance(layer.weight, Int8Weight)
    torch.testing.assert_close(layer(x), y, rtol=0.05, atol=0.05)  # requantization rounds, as PEFT+bnb
    layer.unmerge()
    torch.testing.assert_close(layer(x), y, rtol=0.05, atol=0.05)


def test_quantize_api_and_errors():
    w = torch.randn(16, 64)
    assert isinstance(fastlora.quantize(w, "nf4"), NF4Weight)
    assert isinstance(quantize(w, "int8"), Int8Weight)
    with pytest.raises(ValueError, match="quant"):
        LoRALinear(8, 8, quant="fp4")
    with pytest.raises(ValueError):
        fastlora.quantize(w, "nf4", blocksize=48)
    with pytest.raises(ValueError):
        fastlora.quantize(torch.randn(2, 3, 4), "nf4")


def test_layers_share_one_scratch_buffer_and_stay_correct():
    from fastlora import quant

    quant.release_scratch()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
    dense = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    fastlora.inject(model, ["0", "2", "4"], r=4, quant="nf4")
    model.double()  # float64 compute, so the comparison below can be tight
    layers = [m for m in model if isinstance(m, LoRALinear)]
    for m in layers:
        nn.init.normal_(m.lora_B)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    model(x).square().sum().backward()
    assert len(quant._SCRATCH) == 1  # one buffer served all three layers, forward and backward
    # the same model computed by the oracle on each layer's dequantized weight
    h = x.detach().clone().requires_grad_(True)
    As = [m.lora_A.detach().clone().requires_grad_(True) for m in layers]
    out = h
    for i, m in enumerate(layers):
        out = lora_linear_ref(out, m.weight.dequantize(torch.float64), As[i], m.lora_B, m.scaling, m.bias)
        if i < 2:
            out = torch.tanh(out)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, h.grad)
    for m, a in zip(layers, As, strict=True):
        torch.testing.assert_close(m.lora_A.grad, a.grad)
    assert all((d - m.weight.dequantize(torch.float32)).abs().max() > 0 for d, m in zip(dense, layers, strict=True))
