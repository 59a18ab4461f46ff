"""fastlora against PEFT on identical weights: outputs, grads and a 50-step loss curve."""

import copy

import pytest
import torch
from torch import nn

import fastlora

peft = pytest.importorskip("peft")  # a test dependency: installed by `make test`


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 32)
        self.mid = nn.Linear(32, 32, bias=False)
        self.down = nn.Linear(32, 5)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def _pair(r=4, alpha=8, rslora=False, dropout=0.0):
    torch.manual_seed(0)
    base = TinyNet().double()
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["up", "mid", "down"], lora_dropout=dropout, use_rslora=rslora
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    fm = fastlora.inject(
        copy.deepcopy(base), ["up", "mid", "down"], r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora
    )
    # copy PEFT's adapter init (and give B non-zero values so the branch matters)
    g = torch.Generator().manual_seed(1)
    for name in ("up", "mid", "down"):
        pl = getattr(pm.base_model.model, name)
        fl = getattr(fm, name)
        with torch.no_grad():
            pl.lora_B["default"].weight.copy_(
                torch.randn(pl.lora_B["default"].weight.shape, generator=g, dtype=torch.float64) * 0.1
            )
            fl.lora_A.copy_(pl.lora_A["default"].weight)
            fl.lora_B.copy_(pl.lora_B["default"].weight)
        assert fl.scaling == pl.scaling["default"]
    return pm, fm


@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_and_grads(rslora):
    pm, fm = _pair(rslora=rslora)
    x = torch.randn(7, 12, dtype=torch.float64)
    yp, yf = pm(x), fm(x)
    torch.testing.assert_close(yf, yp, rtol=1e-12, atol=1e-12)
    yp.square().sum().backward()
    yf.square().sum().backward()
    for name in ("up", "mid", "down"):
        pl, fl = getattr(pm.base_model.model, name), getattr(fm, name)
        torch.testing.assert_close(fl.lora_A.grad, pl.lora_A["default"].weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fl.lora_B.grad, pl.lora_B["default"].weight.grad, rtol=1e-10, atol=1e-12)


def test_trainable_parameter_counts_match_peft():
    pm, fm = _pair()
    assert sum(p.numel() for p in fm.parameters() if p.requires_grad) == sum(
        p.numel() for p in pm.parameters() if p.requires_grad
    )


def test_convergence_50_steps_same_loss_curve():
    pm, fm = _pair()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(64, 12, generator=g, dtype=torch.float64), torch.randn(64, 5, generator=g, dtype=torch.float64)
    curves = []
    for model in (pm, fm):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        losses = []
        for _ in range(50):
            loss = nn.functional.mse_loss(model(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
    assert curves[0][-1] < 0.9 * curves[0][0]  # it actually trained
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-9, atol=0)
