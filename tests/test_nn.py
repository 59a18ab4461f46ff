import math

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRALinear
from fastlora.reference import lora_linear_ref


def test_lora_linear_module_init_and_params():
    torch.manual_seed(0)
    layer = LoRALinear(20, 12, r=4, lora_alpha=8, lora_dropout=0.1)
    assert layer.scaling == 2.0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert torch.equal(layer.lora_B, torch.zeros(12, 4))
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 20
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert LoRALinear(20, 12, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert "r=4" in repr(layer) and "scaling=2" in repr(layer)


def test_fresh_layer_equals_base_and_dropout_in_train_only():
    lin = nn.Linear(16, 8)
    layer = LoRALinear.from_linear(lin, r=4, lora_alpha=4, lora_dropout=0.5)
    assert layer.weight is lin.weight
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), lin(x))
    nn.init.normal_(layer.lora_B)
    layer.eval()
    expected = lora_linear_ref(x, lin.weight, layer.lora_A, layer.lora_B, 1.0, lin.bias)
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    assert not torch.allclose(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_unmerge_keep_outputs(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(24, 10, r=4, lora_alpha=16, dtype=dtype).eval()
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.clone()
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, **tol)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, **tol)
    torch.testing.assert_close(layer(x), y, **tol)


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4))


def test_inject_list_suffix_and_regex():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(3, 8)
    y0 = model(x)
    fastlora.inject(model, ["2.0", "3"], r=2, lora_alpha=4)
    assert isinstance(model[2][0], LoRALinear) and isinstance(model[3], LoRALinear)
    assert type(model[0]) is nn.Linear and not model[0].weight.requires_grad
    torch.testing.assert_close(model(x), y0)  # B = 0 at init
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"2.0.lora_A", "2.0.lora_B", "3.lora_A", "3.lora_B"}
    model2 = fastlora.inject(_mlp(), r"(0|3)")
    assert isinstance(model2[0], LoRALinear) and isinstance(model2[3], LoRALinear)
    assert type(model2[2][0]) is nn.Linear
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        fastlora.inject(_mlp(), ["q_proj"])


def test_inject_trains_small_mlp():
    torch.manual_seed(0)
    model = fastlora.inject(_mlp(), ["0", "3"], r=4, lora_alpha=8, lora_dropout=0.1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(64, 8)
    t = torch.tanh(x @ torch.randn(8, 4))  # learnable, unlike pure noise
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_print_trainable_parameters(capsys):
    model = fastlora.inject(_mlp(), ["3"], r=2)
    trainable, total = fastlora.print_trainable_parameters(model)
    assert trainable == 2 * 16 + 4 * 2
    out = capsys.readouterr().out.strip()
    assert (
        out
        == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_model_merge_helpers():
    torch.manual_seed(0)
    model = fastlora.inject(_mlp(), ["0", "3"], r=2).eval()
    for _, m in fastlora.lora_layers(model):
        nn.init.normal_(m.lora_B)
    x = torch.randn(4, 8)
    y = model(x)
    fastlora.merge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    fastlora.unmerge(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_bad_module_args():
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="dropout_p"):
        LoRALinear(4, 4, lora_dropout=1.5)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1))
