"""rsLoRA, LoRA+, LoRA-FA, DyLoRA and DoRA: oracle formulas, gradcheck, PEFT parity, memory."""

import copy

import pytest
import torch
from helpers import make_problem
from test_autograd import activation_bytes, saved_tensors
from torch import nn

import fastlora
from fastlora import LoRALinear
from fastlora.reference import dora_ref, dora_weight_norm_ref, dylora_ref, lorafa_project_ref, rslora_scale
from fastlora.variants import dora_linear, dora_weight_norm, lorafa_project_grads_, loraplus_param_groups

peft = pytest.importorskip("peft")  # a test dependency: installed by `make test`


class MaskDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout with fastlora's seeded mask, so PEFT's p > 0 semantics
    can be compared bit for bit."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        m = fastlora.dropout_mask((x.numel() // x.shape[-1], x.shape[-1]), self.p, self.seed).view(x.shape)
        return x * m.to(x.dtype) * (1.0 / (1.0 - self.p))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.down = nn.Linear(24, 6, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.up(x))))


def _peft_and_fast(use_dora=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = Net().double()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=dropout, use_dora=use_dora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    fm = fastlora.inject(
        copy.deepcopy(base), ["up", "down"], r=4, lora_alpha=8, lora_dropout=dropout, use_dora=use_dora
    )
    g = torch.Generator().manual_seed(seed + 1)
    for name in ("up", "down"):
        pl, fl = getattr(pm.base_model.model, name), getattr(fm, name)
        with torch.no_grad():
            pl.lora_B["default"].weight.normal_(generator=g)
            fl.lora_A.copy_(pl.lora_A["default"].weight)
            fl.lora_B.copy_(pl.lora_B["default"].weight)
            if use_dora:
                mag = pl.lora_magnitude_vector["default"].weight
                torch.testing.assert_close(fl.lora_magnitude_vector, mag)  # same init as PEFT
                mag.mul_(1 + 0.1 * torch.rand(mag.shape, generator=g, dtype=mag.dtype))
                fl.lora_magnitude_vector.copy_(mag)
    return pm, fm


def _grads(model, names):
    return [p.grad for n, p in model.named_parameters() if p.requires_grad and any(k in n for k in names)]


# ---- rsLoRA -------------------------------------------------------------------------------


def test_rslora_scale():
    assert LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == rslora_scale(8, 16) == 2.0
    model = fastlora.inject(Net(), ["up"], r=4, lora_alpha=8, use_rslora=True)
    assert model.up.scaling == 4.0


# ---- LoRA+ --------------------------------------------------------------------------------


def test_loraplus_groups_equal_peft():
    from peft.optimizers import create_loraplus_optimizer

    pm, fm = _peft_and_fast()
    for model in (pm, fm):  # also train the LayerNorm and a bias: exercises the no-decay split
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("up.bias") or n.endswith("up.base_layer.bias"):
                p.requires_grad_(True)
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1)
    ours = loraplus_param_groups(fm, lr=1e-3, ratio=16.0, weight_decay=0.1)
    assert len(ours) == len(opt.param_groups)
    pnames = {
        id(p): n.replace("base_model.model.", "").replace(".default.weight", "").replace("base_layer.", "")
        for n, p in pm.named_parameters()
    }
    fnames = {id(p): n for n, p in fm.named_parameters()}
    for theirs, mine in zip(opt.param_groups, ours, strict=True):
        assert theirs["lr"] == mine["lr"] and theirs["weight_decay"] == mine["weight_decay"]
        assert [pnames[id(p)] for p in theirs["params"]] == [fnames[id(p)] for p in mine["params"]]
    assert ours[2]["lr"] == 16e-3 and any(n.endswith("lora_B") for n in (fnames[id(p)] for p in ours[2]["params"]))


# ---- LoRA-FA ------------------------------------------------------------------------------


def test_lorafa_freezes_A_and_saves_256x_less():
    M, K, N, r = 8, 4096, 64, 16
    full = LoRALinear(K, N, r=r)
    fa = LoRALinear(K, N, r=r, lora_fa=True)
    assert not fa.lora_A.requires_grad and fa.lora_B.requires_grad
    x = torch.randn(M, K, requires_grad=True)
    y_full, s_full = saved_tensors(lambda: full(x))
    y_fa, s_fa = saved_tensors(lambda: fa(x))
    b_full = activation_bytes(s_full, list(full.parameters()))
    b_fa = activation_bytes(s_fa, list(fa.parameters()))
    assert b_fa == M * r * 4  # z only, never x
    assert b_full / b_fa >= 256
    y_fa.sum().backward()
    assert fa.lora_A.grad is None and fa.lora_B.grad is not None and x.grad is not None
    model = fastlora.inject(Net(), ["up", "down"], lora_fa=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"up.lora_B", "down.lora_B"}


def test_lorafa_projection_matches_formula():
    layer = LoRALinear(10, 6, r=3, lora_alpha=6, lora_fa=True, dtype=torch.float64)
    nn.init.normal_(layer.lora_B)
    layer(torch.randn(5, 10, dtype=torch.float64)).square().sum().backward()
    expected = lorafa_project_ref(layer.lora_B.grad.clone(), layer.lora_A.detach(), layer.scaling)
    lorafa_project_grads_(layer)
    torch.testing.assert_close(layer.lora_B.grad, expected)
    opt = fastlora.LoRAFAOptimizer(layer, torch.optim.SGD([layer.lora_B], lr=0.1))
    before = layer.lora_B.detach().clone()
    layer(torch.randn(5, 10, dtype=torch.float64)).sum().backward()
    g = lorafa_project_ref(layer.lora_B.grad.clone(), layer.lora_A.detach(), layer.scaling)
    opt.step()
    torch.testing.assert_close(layer.lora_B.detach(), before - 0.1 * g)


# ---- DyLoRA -------------------------------------------------------------------------------


def test_dylora_active_rank_matches_reference_without_copies(monkeypatch):
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=8, lora_alpha=16, dynamic_rank=True, dtype=torch.float64)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16, dtype=torch.float64)
    seen = []
    real = fastlora.nn.lora_linear

    def spy(x, W, A, B, **kw):
        seen.append((A.data_ptr(), B.data_ptr(), B.stride(), A.shape[0], kw["scale"]))
        return real(x, W, A, B, **kw)

    monkeypatch.setattr(fastlora.nn, "lora_linear", spy)
    for b in (1, 3, 8):
        layer.active_rank = b
        torch.testing.assert_close(layer(x), dylora_ref(x, layer.weight, layer.lora_A, layer.lora_B, 16, b, layer.bias))
        assert seen[-1] == (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), (8, 1), b, 16 / b)
    layer.active_rank = 9
    with pytest.raises(ValueError, match="active_rank"):
        layer(x)


def test_dylora_samples_rank_in_training_and_trains_only_the_slice():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=8, lora_alpha=16, dynamic_rank=True, dtype=torch.float64)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16, dtype=torch.float64)
    outs = {b: dylora_ref(x, layer.weight, layer.lora_A, layer.lora_B, 16, b, layer.bias) for b in range(1, 9)}
    ranks = set()
    for step in range(40):
        torch.manual_seed(step)
        b = int(torch.randint(1, 9, ()).item())
        torch.manual_seed(step)
        y = layer(x)
        torch.testing.assert_close(y, outs[b])
        ranks.add(b)
    assert len(ranks) >= 6  # b really varies
    layer.zero_grad()
    layer.active_rank = 3
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad[3:].abs().sum() == 0 and layer.lora_A.grad[:3].abs().sum() > 0
    layer.active_rank = None
    layer.eval()
    torch.testing.assert_close(layer(x), outs[8])  # eval without active_rank: full rank


# ---- DoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dora_lowrank_norm(dtype):
    x, W, A, B, _ = make_problem(2, 40, 30, 5, dtype=dtype)
    exp = dora_weight_norm_ref(W.double(), A.double(), B.double(), 0.7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(dora_weight_norm(W, A, B, 0.7).double(), exp, rtol=tol, atol=tol)
    torch.testing.assert_close(
        dora_weight_norm(W, A, B, 0.7, W.double().square().sum(1)).double(), exp, rtol=tol, atol=tol
    )


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_equals_peft_outputs_and_grads(p):
    pm, fm = _peft_and_fast(use_dora=True, dropout=p)
    if p:
        for name in ("up", "down"):
            getattr(pm.base_model.model, name).lora_dropout["default"] = MaskDropout(p, seed=5)
    x = torch.randn(9, 12, dtype=torch.float64)
    torch.manual_seed(123)
    yp = pm(x)
    if p:  # fastlora draws its seeds from torch's RNG: hand each layer the seed PEFT's stand-in used
        real = fastlora.dora.draw_seed
        fastlora.dora.draw_seed = lambda: 5
    try:
        yf = fm(x)
    finally:
        if p:
            fastlora.dora.draw_seed = real
    torch.testing.assert_close(yf, yp, rtol=1e-10, atol=1e-12)
    yp.square().sum().backward()
    yf.square().sum().backward()
    for gp, gf in zip(_grads(pm, ["lora_"]), _grads(fm, ["lora_"]), strict=True):
        torch.testing.assert_close(gf, gp, rtol=1e-9, atol=1e-12)


def test_dora_gradcheck_with_dropout():
    x, W, A, B, b = make_problem(5, 8, 6, 2, dtype=torch.float64)
    m = torch.rand(6, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    m.requires_grad_(True)
    # The norm depends on A and B but is detached by design (DoRA section 4.3), so finite
    # differences only agree with autograd for x and the magnitude; A and B are checked against
    # the oracle's autograd below.
    assert torch.autograd.gradcheck(
        lambda x, m: dora_linear(x, W, A, B, m, scale=0.5, bias=b, dropout_p=0.4, seed=7), (x, m)
    )
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = dora_linear(x, W, A, B, m, scale=0.5, bias=b, dropout_p=0.4, seed=7)
    mask = fastlora.dropout_mask((5, 8), 0.4, 7)
    y_ref = dora_ref(x, W, A, B, m, 0.5, b, mask, 0.4)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    for got, exp in zip(
        torch.autograd.grad(y, (x, A, B, m), g), torch.autograd.grad(y_ref, (x, A, B, m), g), strict=True
    ):
        torch.testing.assert_close(got, exp)


def test_dora_merge_unmerge():
    torch.manual_seed(0)
    layer = LoRALinear(20, 10, r=4, lora_alpha=8, use_dora=True, dtype=torch.float64).eval()
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)
    w0 = layer.weight.clone()
    x = torch.randn(3, 20, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer(x), y)
    assert "lora_magnitude_vector" in dict(layer.named_parameters())


# ---- the variants on the Triton kernels (interpreter on CPU) --------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_variants_on_triton_match_torch_backend(p):
    torch.manual_seed(0)
    layers = {
        "dora": LoRALinear(40, 24, r=6, lora_alpha=12, lora_dropout=p, use_dora=True),
        "dylora": LoRALinear(40, 24, r=6, lora_alpha=12, lora_dropout=p, dynamic_rank=True),
        "lorafa": LoRALinear(40, 24, r=6, lora_alpha=12, lora_dropout=p, lora_fa=True),
    }
    layers["dylora"].active_rank = 4  # strided B[:, :4] view straight into the kernels
    x = torch.randn(3, 7, 40)
    for name, layer in layers.items():
        nn.init.normal_(layer.lora_B)
        outs = []
        for backend in ("torch", "triton"):
            fastlora.set_backend(backend)
            try:
                layer.zero_grad()
                xb = x.clone().requires_grad_(True)
                torch.manual_seed(5)  # same dropout seed for both backends
                y = layer(xb)
                y.square().sum().backward()
                outs.append([y.detach(), xb.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
            finally:
                fastlora.set_backend("auto")
        for a, b in zip(*outs, strict=True):
            # fp32 on both sides, only the summation order differs: with values and gradients of
            # order 10-50 and reductions over K=40 or M=21, a few fp32 ulps of the result is ~1e-4
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
