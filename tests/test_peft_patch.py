"""PEFT drop-in: with ``patch_peft()`` PEFT's LoRA Linear layers give PEFT's results through the
fused op, fall back (logged once) where they must, and ``unpatch_peft()`` restores PEFT exactly.

Models and configs follow PEFT's tests/test_custom_models.py: MLPs with and without bias, Conv1d
and Conv2d beside a Linear, an Embedding beside Linears, and a tiny random transformers model.
"""

import copy
import importlib
import logging
import sys

import pytest
import torch
from torch import nn

import fastlora
import fastlora.peft as fpeft
from fastlora.functional import draw_seed
from fastlora.peft import patch_peft, unpatch_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import layer as lora_layer  # noqa: E402

LOG = "fastlora.peft"


@pytest.fixture(autouse=True)
def _unpatched():
    unpatch_peft()
    yield
    unpatch_peft()


@pytest.fixture
def fused(monkeypatch):
    """Records the arguments of every call that the patch makes to the fused op."""
    calls = []
    real = fpeft.lora_linear

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(fpeft, "lora_linear", spy)
    return calls


# ---------------------------------------------------------------- models (as PEFT's tests)


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 20, bias=bias)
        self.lin2 = nn.Linear(20, 2, bias=bias)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(torch.relu(self.lin0(x)))))


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 4, 3)
        self.conv1d = nn.Conv1d(24, 8, 3)
        self.lin = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.conv2d(x)).reshape(x.shape[0], 24, 6)
        return self.lin(torch.relu(self.conv1d(h)).flatten(1))


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin0 = nn.Linear(16, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, ids):
        return self.lin1(torch.relu(self.lin0(self.emb(ids))))  # 3-D input to the Linears


class Smooth(nn.Module):
    """No relu: a low-precision rounding cannot flip a kink, so error ratios are stable."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(64, 96)
        self.lin1 = nn.Linear(96, 32)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _float_input(*shape):
    return lambda dtype: torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)


def _ids(*shape):
    return lambda dtype: torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(7))


MLP3 = ["lin0", "lin1", "lin2"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# id: (base factory, input factory, LoraConfig kwargs, fused calls per forward)
CASES = {
    "mlp": (MLP, _float_input(6, 10), dict(target_modules=MLP3), 3),
    "mlp-nobias": (lambda: MLP(bias=False), _float_input(6, 10), dict(target_modules=MLP3), 3),
    "mlp-rslora-regex": (
        MLP,
        _float_input(6, 10),
        dict(r=8, lora_alpha=16, use_rslora=True, target_modules="lin[02]"),
        2,
    ),
    "mlp-dropout-eval": (MLP, _float_input(6, 10), dict(target_modules=MLP3, lora_dropout=0.5), 3),
    "conv1d-conv2d-linear": (ConvModel, _float_input(4, 3, 8, 8), dict(target_modules=["conv2d", "conv1d", "lin"]), 1),
    "embedding-linear": (EmbModel, _ids(3, 5), dict(target_modules=["emb", "lin0", "lin1"]), 2),
    "llama": (tiny_llama, _ids(2, 7), dict(target_modules=LLAMA_ALL), 14),
    "llama-regex": (tiny_llama, _ids(2, 7), dict(r=2, lora_alpha=5, target_modules=r".*\.(q_proj|v_proj)"), 4),
}


def make(factory, dtype=torch.float64, seed=0, **cfg):
    """A PEFT model on a seeded random base. ``init_lora_weights=False`` (as PEFT's tests) leaves
    B non-zero, so the LoRA branch changes the outputs."""
    torch.manual_seed(seed)
    base = factory().to(dtype)
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **cfg}
    return peft.get_peft_model(base, peft.LoraConfig(**cfg))


def run(model, inp, **kwargs):
    """Forward and backward of a fixed loss: (output, {trainable param: grad}, input grad)."""
    if inp.is_floating_point():
        inp = inp.detach().clone().requires_grad_()
    out = model(inp, **kwargs)
    out = getattr(out, "logits", out)
    if torch.is_grad_enabled():
        out.double().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, inp.grad


def assert_same(a, b, tol):
    """a == b up to ``tol`` relative to b's largest magnitude (elementwise)."""
    pairs = [(a[0], b[0], "output")] + [(a[1][n], b[1][n], n) for n in b[1]]
    if b[2] is not None:
        pairs.append((a[2], b[2], "input grad"))
    assert a[1].keys() == b[1].keys()
    for x, y, what in pairs:
        assert x.dtype == y.dtype, what
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * y.abs().max().item(), msg=what)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fallback_logs(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOG]


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_patched_equals_peft(case, dtype, fused, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    factory, make_input, cfg, n_fused = CASES[case]
    model = make(factory, dtype, **cfg)
    if case == "mlp-dropout-eval":
        model.eval()
    inp = make_input(dtype)
    want = run(model, inp)
    patch_peft()
    got = run(model, inp)
    assert len(fused) == n_fused
    assert all(k["training"] is model.training for _, k in fused)
    assert_same(got, want, 1e-12 if dtype == torch.float64 else 2e-5)
    assert not fallback_logs(caplog)


def test_model_created_after_patch_and_trainable_base(fused):
    patch_peft()
    model = make(MLP, target_modules=MLP3)
    model.base_model.model.lin1.base_layer.weight.requires_grad_(True)  # dW flows through the op too
    x = torch.randn(5, 10, dtype=torch.float64)
    got = run(model, x)
    assert len(fused) == 3
    unpatch_peft()
    want = run(model, x)
    assert "base_model.model.lin1.base_layer.weight" in want[1]
    assert_same(got, want, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_base_fp32_adapters(dtype, fused):
    """PEFT keeps adapters in fp32 on a half base, casts x up for the rank-r branch and rounds the
    sum to the base dtype; the fused op runs that branch in the base dtype (fp32 accumulation).

    Tolerance, against a float64 run of the same weights (relative Frobenius error): outputs at
    most 2x PEFT's own error; gradients at most 2x PEFT's error with its adapters in the base
    dtype (i.e. plain PyTorch in the dtype the fused op computes in, FlashAttention's rule), and
    below the dtype's eps. PEFT's mixed run is more accurate for dA/dB (measured ~3x), by a
    branch that is rounded to the base dtype on output anyway."""
    model = make(Smooth, dtype, target_modules=["lin0", "lin1"])
    assert model.base_model.model.lin0.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = run(copy.deepcopy(model).double(), x.double())
    mixed = run(model, x)
    low = run(copy.deepcopy(model).to(dtype), x)  # PEFT, everything in the base dtype
    patch_peft()
    got = run(model, x)
    assert len(fused) == 2 and got[0].dtype == dtype
    assert rel_err(got[0], ref[0]) <= 2 * rel_err(mixed[0], ref[0])
    eps = torch.finfo(dtype).eps
    for n, g in got[1].items():
        assert g.dtype == torch.float32
        e = rel_err(g, ref[1][n])
        assert e <= 2 * rel_err(low[1][n], ref[1][n]) + 1e-6, n
        assert e <= eps, n
        assert rel_err(g, mixed[1][n]) <= 2 * eps, n


def test_autocast_bf16(fused):
    """Under CPU autocast PEFT's linears all run in bf16; so does the fused op."""
    model = make(Smooth, torch.float32, target_modules=["lin0", "lin1"])
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(3))
    ref = run(copy.deepcopy(model).double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = run(model, x)
        patch_peft()
        got = run(model, x)
    assert len(fused) == 2 and got[0].dtype == want[0].dtype == torch.bfloat16
    for a, b, r in [(got[0], want[0], ref[0])] + [(got[1][n], want[1][n], ref[1][n]) for n in ref[1]]:
        assert rel_err(a, r) <= 2 * rel_err(b, r) + 1e-6


def test_several_active_adapters_summed(fused):
    """Two adapters active at once (different r, alpha, rsLoRA): one fused call per layer with
    the ranks concatenated; a layer without the second adapter runs only the first."""
    model = make(MLP, target_modules=MLP3)
    model.add_adapter(
        "other",
        peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["lin0", "lin2"], init_lora_weights=False),
    )
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(6, 10, dtype=torch.float64)
    want = run(model, x)
    assert any(".other." in n for n in want[1])  # both adapters train
    patch_peft()
    got = run(model, x)
    assert [a[2].shape[0] for a, _ in fused] == [6, 4, 6]
    assert_same(got, want, 1e-12)


def test_adapter_switching(fused, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    model = make(MLP, target_modules=MLP3)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["lin0", "lin2"], init_lora_weights=False))
    x = torch.randn(6, 10, dtype=torch.float64)
    want_default = run(model, x)
    model.set_adapter("other")
    want_other = run(model, x)
    patch_peft()
    got_other = run(model, x)
    model.set_adapter("default")
    got_default = run(model, x)
    assert_same(got_other, want_other, 1e-12)
    assert_same(got_default, want_default, 1e-12)
    assert not torch.allclose(got_other[0], got_default[0])
    assert len(fused) == 2 + 3  # lin1 has no "other" adapter: PEFT's forward (base only)
    assert fallback_logs(caplog) == [
        "fastlora: PEFT's own forward runs for LoRA layers with no active adapter on the layer"
    ]


def test_training_loss_curve_matches_peft():
    """20 AdamW steps, dropout 0: the same loss curve as PEFT."""
    torch.manual_seed(0)
    x, target = torch.randn(32, 10), torch.randn(32, 2)

    def train(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(20):
            loss = nn.functional.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    model = make(MLP, torch.float32, target_modules=MLP3)
    twin = copy.deepcopy(model)
    want = train(model)
    patch_peft()
    got = train(twin)
    assert want[-1] < 0.8 * want[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


class FixedDropout(nn.Module):
    """Dropout with a given keep-mask: PEFT's own forward with fastlora's mask is the oracle."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(x.shape).to(x.dtype) / (1 - self.p)


def test_dropout_equals_oracle_with_fastlora_mask(fused):
    """p > 0 in training: the mask is fastlora's (Philox, seed from torch's generator), so the
    patched output and grads equal PEFT's forward with that mask put in place of nn.Dropout."""
    p, M = 0.3, 64
    model = make(MLP, target_modules=MLP3, lora_dropout=p)
    oracle = copy.deepcopy(model)
    x = torch.randn(M, 10, dtype=torch.float64)
    patch_peft()
    torch.manual_seed(1234)
    got = run(model, x)
    torch.manual_seed(1234)
    seeds = [draw_seed() for _ in MLP3]  # the op draws one seed per layer, in forward order
    assert [k["dropout_p"] for _, k in fused] == [p] * 3 and all(k["training"] for _, k in fused)
    unpatch_peft()
    for name, seed, K in zip(MLP3, seeds, (10, 20, 20), strict=True):
        keep = fastlora.dropout_mask((M, K), p, seed)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.05
        getattr(oracle.base_model.model, name).lora_dropout["default"] = FixedDropout(keep, p)
    assert_same(got, run(oracle, x), 1e-12)
    patch_peft()
    assert not torch.equal(run(model, x)[0], got[0])  # a fresh mask every step


# ---------------------------------------------------------------- fallbacks


def _mlp(**cfg):
    return make(MLP, target_modules=MLP3, **cfg)


def _two_adapters_dropout():
    model = _mlp(lora_dropout=0.2)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_dropout=0.2, target_modules=MLP3, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    return model, lambda m, x: run(m, x)


def _merged():
    model = _mlp()
    model.merge_adapter()
    return model, lambda m, x: run(m, x)


def _disabled():
    def fwd(m, x):
        with m.disable_adapter():
            return run(m, x)

    return _mlp(), fwd


def _mixed_batch():
    model = _mlp()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=MLP3, init_lora_weights=False))
    model.eval()
    names = ["default", "other", "__base__", "other", "default", "default"]

    def fwd(m, x):
        with torch.no_grad():  # PEFT's mixed batches are an inference feature
            return run(m, x, adapter_names=names)

    return model, fwd


def _base_hook():
    model = _mlp()
    for name in MLP3:  # e.g. accelerate's offload hooks, which the fused op would bypass
        getattr(model.base_model.model, name).base_layer.register_forward_hook(lambda mod, i, o: o * 2)
    return model, lambda m, x: run(m, x)


def _gpt2_fan_in_fan_out():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_gpt2().double(),
        peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    ids = torch.randint(0, 64, (2, 5))
    return model, lambda m, x: run(m, ids)


FALLBACKS = {
    "merged": (_merged, "merged adapters"),
    "disabled": (_disabled, "disabled adapters"),
    "adapter_names": (_mixed_batch, "a mixed-adapter batch (adapter_names)"),
    "dora": (lambda: (_mlp(use_dora=True), lambda m, x: run(m, x)), "the LoRA variant DoraLinearVariant"),
    "lora_bias": (lambda: (_mlp(lora_bias=True), lambda m, x: run(m, x)), "lora_bias=True"),
    "several-adapters-dropout": (_two_adapters_dropout, "several active adapters with dropout in training"),
    "base-hook": (_base_hook, "hooks on the base layer"),
    "fan_in_fan_out": (_gpt2_fan_in_fan_out, "fan_in_fan_out=True"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback_is_peft_and_logged_once(case, fused, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    build, reason = FALLBACKS[case]
    model, fwd = build()
    x = torch.randn(6, 10, dtype=torch.float64)
    torch.manual_seed(5)
    want = fwd(model, x)
    patch_peft()
    torch.manual_seed(5)
    got = fwd(model, x)
    fwd(model, x)  # more fallbacks, no more log lines
    assert_same(got, want, 0.0)  # PEFT's own code ran: bit-identical
    assert not fused
    assert fallback_logs(caplog) == [f"fastlora: PEFT's own forward runs for LoRA layers with {reason}"]


def test_non_floating_input_falls_back(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    layer = _mlp().base_model.model.lin0
    ids = torch.ones(2, 10, dtype=torch.long)
    with pytest.raises(RuntimeError) as want:
        layer(ids)
    patch_peft()
    with pytest.raises(type(want.value)):
        layer(ids)
    assert fallback_logs(caplog) == [
        "fastlora: PEFT's own forward runs for LoRA layers with a non-floating-point input"
    ]


def test_other_lora_layer_classes_untouched():
    """Conv, Embedding and bitsandbytes LoRA layers are other classes (not lora.Linear
    subclasses); the patch leaves their forward alone (they run PEFT's code as before)."""
    classes = [lora_layer.Conv1d, lora_layer.Conv2d, lora_layer.Embedding]
    bnb = pytest.importorskip("peft.tuners.lora.bnb")
    classes += [c for c in (getattr(bnb, "Linear4bit", None), getattr(bnb, "Linear8bitLt", None)) if c]
    before = [c.forward for c in classes]
    patch_peft()
    assert [c.forward for c in classes] == before
    assert not any(issubclass(c, lora_layer.Linear) for c in classes)


# ---------------------------------------------------------------- PEFT's workflows unchanged


def test_merge_and_unload():
    model = _mlp()
    x = torch.randn(6, 10, dtype=torch.float64)
    patch_peft()
    y = model(x)
    merged = model.merge_and_unload()
    assert type(merged.lin0) is nn.Linear
    torch.testing.assert_close(merged(x), y, rtol=1e-12, atol=1e-12)


def test_save_and_load_round_trip(tmp_path, fused):
    model = _mlp()
    keys = set(peft.get_peft_model_state_dict(model))
    x = torch.randn(6, 10, dtype=torch.float64)
    patch_peft()
    y = model(x)
    assert set(peft.get_peft_model_state_dict(model)) == keys
    assert "base_model.model.lin0.lora_A.weight" in keys
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = MLP().double()  # same seeded base as make()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    fused.clear()
    torch.testing.assert_close(loaded(x), y, rtol=1e-12, atol=1e-12)
    assert len(fused) == 3  # a model loaded after patching is fused too


# ---------------------------------------------------------------- patch / unpatch


def test_unpatch_restores_original_forward_bit_identical():
    original = lora_layer.Linear.__dict__["forward"]
    model = make(tiny_llama, torch.float32, target_modules=LLAMA_ALL)
    ids = torch.randint(0, 64, (2, 7))
    before = model(ids).logits
    patch_peft()
    patch_peft()  # idempotent
    assert lora_layer.Linear.__dict__["forward"] is fpeft._patched_forward
    model(ids)
    unpatch_peft()
    unpatch_peft()
    assert lora_layer.Linear.__dict__["forward"] is original
    assert torch.equal(model(ids).logits, before)


def test_import_without_peft(monkeypatch):
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import fails
    importlib.reload(fpeft)  # the module itself imports without peft
    unpatch_peft()  # nothing patched: a no-op that needs no peft
    with pytest.raises(ImportError, match="needs the `peft` package"):
        patch_peft()
