"""PEFT drop-in: with ``patch_peft()`` PEFT's LoRA Linear layers give PEFT's results through the
fused op, fall back (logged once) where they must, and ``unpatch_peft()`` restores PEFT exactly.

Models and configs follow PEFT's tests/test_custom_models.py: MLPs with and without bias, Conv1d
and Conv2d beside a Linear, an Embedding beside Linears, and a tiny random transformers model.
"""

import copy
import gc
import importlib
import logging
import sys
import warnings
import weakref

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
    """Records the arguments of every call that the patch makes to the fused op (``lora_linear``,
    or ``dora_linear``, whose calls have the magnitude as a fifth positional argument)."""
    calls = []

    def spy(real):
        def call(*args, **kwargs):
            calls.append((args, kwargs))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(fpeft, "lora_linear", spy(fpeft.lora_linear))
    monkeypatch.setattr(fpeft, "dora_linear", spy(fpeft.dora_linear))
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


def perturb_magnitudes(model, seed=3):
    """PEFT starts DoRA's magnitude at the row norms (column scale g = 1); moving it off makes
    the scale matter. A no-op without DoRA."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


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


def assert_mixed_precision(got, mixed, low, ref, dtype):
    """The tolerance for fp32 adapters on a half/bf16 base, against a float64 run of the same
    weights (relative Frobenius error): outputs at most 2x PEFT's own error; gradients at most 2x
    PEFT's error with its adapters in the base dtype (``low``: plain PyTorch in the dtype the
    fused op computes in, FlashAttention's rule), and below the dtype's eps. PEFT's mixed run is
    more accurate for dA/dB (measured ~3x), by a branch that is rounded to the base dtype on
    output anyway."""
    assert got[0].dtype == mixed[0].dtype
    assert rel_err(got[0], ref[0]) <= 2 * rel_err(mixed[0], ref[0])
    eps = torch.finfo(dtype).eps
    assert got[1].keys() == mixed[1].keys()
    for n, g in got[1].items():
        assert g.dtype == mixed[1][n].dtype == torch.float32, n
        e = rel_err(g, ref[1][n])
        assert e <= 2 * rel_err(low[1][n], ref[1][n]) + 1e-6, n
        assert e <= eps, n
        assert rel_err(g, mixed[1][n]) <= 2 * eps, n


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_base_fp32_adapters(dtype, use_dora, fused):
    """PEFT keeps adapters (and DoRA's magnitude) in fp32 on a half base, casts x up for the
    rank-r branch and rounds the sum to the base dtype; the fused op runs that branch in the
    base dtype (fp32 accumulation), DoRA's column scale too. Tolerance: assert_mixed_precision
    (measured for DoRA: outputs ~1.8x PEFT's error, below PEFT's all-half error)."""
    model = make(Smooth, dtype, target_modules=["lin0", "lin1"], use_dora=use_dora)
    perturb_magnitudes(model)
    assert model.base_model.model.lin0.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = run(copy.deepcopy(model).double(), x.double())
    mixed = run(model, x)
    low = run(copy.deepcopy(model).to(dtype), x)  # PEFT, everything in the base dtype
    patch_peft()
    got = run(model, x)
    assert len(fused) == 2 and got[0].dtype == dtype
    assert all((len(a) == 5) == use_dora for a, _ in fused)
    assert_mixed_precision(got, mixed, low, ref, dtype)


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


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dropout_equals_oracle_with_fastlora_mask(use_dora, fused):
    """p > 0 in training: the mask is fastlora's (Philox, seed from torch's generator), so the
    patched output and grads equal PEFT's forward with that mask put in place of nn.Dropout.
    DoRA: PEFT's dropout formula, ``x W^T + b + (g - 1) xd W^T + g s (xd A^T) B^T``."""
    p, M = 0.3, 64
    model = make(MLP, target_modules=MLP3, lora_dropout=p, use_dora=use_dora)
    perturb_magnitudes(model)
    oracle = copy.deepcopy(model)
    x = torch.randn(M, 10, dtype=torch.float64)
    patch_peft()
    torch.manual_seed(1234)
    got = run(model, x)
    torch.manual_seed(1234)
    seeds = [draw_seed() for _ in MLP3]  # the op draws one seed per layer, in forward order
    assert [k["dropout_p"] for _, k in fused] == [p] * 3 and all(k["training"] for _, k in fused)
    assert all((len(a) == 5) == use_dora for a, _ in fused)  # dora_linear takes the magnitude
    unpatch_peft()
    for name, seed, K in zip(MLP3, seeds, (10, 20, 20), strict=True):
        keep = fastlora.dropout_mask((M, K), p, seed)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.05
        getattr(oracle.base_model.model, name).lora_dropout["default"] = FixedDropout(keep, p)
    assert_same(got, run(oracle, x), 1e-12)
    patch_peft()
    assert not torch.equal(run(model, x)[0], got[0])  # a fresh mask every step


# ---------------------------------------------------------------- DoRA

# id: (base factory, input factory, LoraConfig kwargs, fused calls per forward)
DORA_CASES = {
    "mlp": (MLP, _float_input(6, 10), dict(target_modules=MLP3), 3),
    "mlp-nobias-rslora": (lambda: MLP(bias=False), _float_input(6, 10), dict(target_modules=MLP3, use_rslora=True), 3),
    "mlp-dropout-eval": (MLP, _float_input(6, 10), dict(target_modules=MLP3, lora_dropout=0.5), 3),
    "llama": (tiny_llama, _ids(2, 7), dict(target_modules=["q_proj", "v_proj", "down_proj"]), 6),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(DORA_CASES))
def test_dora_equals_peft(case, dtype, fused, caplog):
    """DoRA (PEFT's DoraLinearVariant) runs fastlora.dora_linear: one fused GEMM and a column
    scale, the norm computed low-rank; the same outputs and grads (magnitude included)."""
    caplog.set_level(logging.INFO, logger=LOG)
    factory, make_input, cfg, n_fused = DORA_CASES[case]
    model = make(factory, dtype, use_dora=True, **cfg)
    perturb_magnitudes(model)
    if case == "mlp-dropout-eval":
        model.eval()
    inp = make_input(dtype)
    want = run(model, inp)
    assert any("lora_magnitude_vector" in n for n in want[1])
    patch_peft()
    got = run(model, inp)
    assert len(fused) == n_fused and all(len(a) == 5 for a, _ in fused)
    assert all(k["training"] is model.training for _, k in fused)
    assert_same(got, want, 1e-12 if dtype == torch.float64 else 2e-5)
    assert not fallback_logs(caplog)


# ---------------------------------------------------------------- fallbacks


def _mlp(**cfg):
    return make(MLP, target_modules=MLP3, **cfg)


def _two_adapters_dropout():
    model = _mlp(lora_dropout=0.2)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_dropout=0.2, target_modules=MLP3, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    return model, lambda m, x: run(m, x)


def _two_adapters_dora():
    model = _mlp(use_dora=True)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=MLP3, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    return model, lambda m, x: run(m, x)


def _dora_autocast():
    model = make(MLP, torch.float32, target_modules=MLP3, use_dora=True)

    def fwd(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(m, x.float())

    return model, fwd


def _other_variant():
    # aLoRA: PEFT's variant that adapts only the tokens after an invocation sequence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "aLoRA is only supported for CAUSAL_LM"
        model = _mlp(alora_invocation_tokens=[1])
    return model, lambda m, x: run(m, x, alora_offsets=[2] * x.shape[0])


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
    "dora-several-adapters": (_two_adapters_dora, "several active adapters with DoRA"),
    "dora-autocast": (_dora_autocast, "DoRA under autocast"),
    "alora-variant": (_other_variant, "the LoRA variant ALoraLinearVariant"),
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
    """Conv and Embedding LoRA layers are other classes (not lora.Linear subclasses); the patch
    leaves their forward alone (they run PEFT's code as before)."""
    classes = [lora_layer.Conv1d, lora_layer.Conv2d, lora_layer.Embedding]
    before = [c.forward for c in classes]
    patch_peft()
    assert [c.forward for c in classes] == before
    assert not any(issubclass(c, lora_layer.Linear) for c in classes)


# ---------------------------------------------------------------- bitsandbytes 4-bit bases


@pytest.fixture
def bnb(monkeypatch):
    """bitsandbytes, with torch.compile off: bnb wraps some PyTorch fallback kernels in it, and
    eager is bit-identical without minutes of inductor compiles on a small CPU box."""
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft.tuners.lora.bnb")
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    return bnb


class Smooth4(nn.Module):
    """Smooth's role (no relu) for 4-bit bases, with in_features multiples of 64."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(64, 128)
        self.lin1 = nn.Linear(128, 32)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


class MLP4(nn.Module):
    """Every in_features a multiple of the blocksizes used (32, 64): bitsandbytes 0.50.2's CPU
    dequantize_4bit mis-indexes absmax when rows are not whole blocks (K % blocksize != 0 with K
    even; tests/test_quant.py), where fastlora's NF4 (correct there) would differ from it. Every
    out_features a multiple of 32, which bnb's CPU inference repacking asserts."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(64, 128)
        self.lin1 = nn.Linear(128, 64, bias=False)
        self.lin2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.tanh(self.lin0(x)))))


def make_4bit(
    bnb, dtype=torch.float32, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=None, factory=None, **cfg
):
    """A PEFT model on a seeded ``factory()`` (MLP4) whose Linears are all bitsandbytes
    Linear4bit (quantized from the weights in ``dtype``), as transformers loads one with
    ``load_in_4bit``; and the float64 dense twin of that base (its dequantized weights)."""
    factory = factory or MLP4
    torch.manual_seed(0)
    base = factory()
    names = [n for n, m in base.named_children() if isinstance(m, nn.Linear)]
    for name in names:
        lin = getattr(base, name)
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.detach().to(dtype),
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
            module=q,
        )
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().to(dtype), requires_grad=False)
        setattr(base, name, q.to("cpu"))  # bitsandbytes quantizes on the move to a device
    dense = factory().double()
    with torch.no_grad():
        for name in names:
            q, lin = getattr(base, name), getattr(dense, name)
            lin.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).double())
            if q.bias is not None:
                lin.bias.copy_(q.bias.double())
    base.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": names, **cfg}
    return peft.get_peft_model(base, peft.LoraConfig(**cfg)), dense


def dense_twin(model, dense):
    """The PEFT model's adapters on the float64 dequantized base (a plain PEFT model)."""
    cfg = copy.deepcopy(model.peft_config["default"])
    twin = peft.get_peft_model(copy.deepcopy(dense), cfg)
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing, unexpected = twin.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return twin


def _x4(dtype=torch.float32):
    return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7)).to(dtype)


def _other_adapter(model):
    model.add_adapter(
        "other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["lin0", "lin2"], init_lora_weights=False)
    )
    model.base_model.set_adapter(["default", "other"])


# id: (make_4bit kwargs, extra setup, fused calls per forward)
BNB_CASES = {
    "nf4-double-quant": (dict(), None, 3),
    "nf4-bs32-no-double-quant": (dict(double_quant=False, blocksize=32), None, 3),
    "dropout-eval": (dict(lora_dropout=0.5), lambda m: m.eval(), 3),
    "two-adapters": (dict(), _other_adapter, 3),
    "dora": (dict(use_dora=True), perturb_magnitudes, 3),
    "dora-no-double-quant": (dict(use_dora=True, double_quant=False), perturb_magnitudes, 3),
}


@pytest.mark.parametrize("case", list(BNB_CASES))
def test_4bit_equals_peft(case, bnb, fused, caplog):
    """NF4 Linear4bit bases: the fused op reads bitsandbytes' own packed bytes and statistics
    through an NF4Weight view (no copy) and gives PEFT's outputs and grads (float32)."""
    caplog.set_level(logging.INFO, logger=LOG)
    kwargs, setup, n_fused = BNB_CASES[case]
    model, _ = make_4bit(bnb, **kwargs)
    if setup:
        setup(model)
    x = _x4()
    want = run(model, x)
    patch_peft()
    got = run(model, x)
    assert len(fused) == n_fused
    layers = [model.base_model.model.lin0, model.base_model.model.lin1, model.base_model.model.lin2]
    for (args, kw), layer in zip(fused, layers, strict=True):
        view, w = args[1], layer.base_layer.weight
        assert isinstance(view, fastlora.NF4Weight) and view.shape == (layer.out_features, layer.in_features)
        assert view.packed.data_ptr() == w.data_ptr() and view.absmax is w.quant_state.absmax  # no copy
        assert kw.get("training", True) is model.training and (len(args) == 5) == ("dora" in case)
    assert_same(got, want, 2e-5)
    assert not fallback_logs(caplog)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_4bit_dropout_equals_oracle_with_fastlora_mask(use_dora, bnb, fused):
    p = 0.3
    model, _ = make_4bit(bnb, lora_dropout=p, use_dora=use_dora)
    perturb_magnitudes(model)
    x = _x4()
    patch_peft()
    torch.manual_seed(1234)
    got = run(model, x)
    torch.manual_seed(1234)
    seeds = [draw_seed() for _ in MLP3]
    assert [k["dropout_p"] for _, k in fused] == [p] * 3 and all(k["training"] for _, k in fused)
    unpatch_peft()
    for name, seed, K in zip(MLP3, seeds, (64, 128, 64), strict=True):
        keep = fastlora.dropout_mask((15, K), p, seed)
        getattr(model.base_model.model, name).lora_dropout["default"] = FixedDropout(keep, p)
    assert_same(got, run(model, x), 2e-5)


def test_4bit_view_cached_and_rebuilt_when_the_weight_changes(bnb, fused):
    model, _ = make_4bit(bnb)
    layer = model.base_model.model.lin0
    assert layer.base_layer.compute_dtype is None
    x = _x4()
    patch_peft()
    run(model, x)
    assert layer.base_layer.compute_dtype == torch.float32  # bnb's first-call side effect, kept
    run(model, x)
    views = [args[1] for args, _ in fused]
    assert views[0] is views[3] and views[1] is views[4]  # built once per layer
    # a new weight (as PEFT's merge or a reload does): a new view, and PEFT's result again
    q = layer.base_layer
    w = torch.randn(q.out_features, q.in_features, generator=torch.Generator().manual_seed(1))
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, quant_type="nf4", module=q).to("cpu")
    fused.clear()
    got = run(model, x)
    assert fused[0][0][1] is not views[0] and fused[0][0][1].packed.data_ptr() == q.weight.data_ptr()
    unpatch_peft()
    assert_same(got, run(model, x), 2e-5)
    ref = weakref.ref(q)
    del model, layer, q
    gc.collect()
    assert ref() is None  # the cache holds its layers weakly


def assert_compute_dtype_precision(got, mixed, low, ref, dtype):
    """The tolerance for a 4-bit base computing in a half dtype with fp32 adapters, against the
    float64 dequantized twin (relative Frobenius error): the output and every gradient at most
    2x the error of PEFT with its adapters in the compute dtype (``low``; FlashAttention's
    rule), and within 2 eps of PEFT's own run. Measured: 0.9-1.2x ``low``'s error; against
    PEFT's mixed run, whose rank-r branch stays in fp32 (and, with fp32 inputs, is added to
    the bf16 base result in fp32, where the fused op rounds the sum to bf16), outputs 1.2-2x
    its error for LoRA, 2.4-2.9x for DoRA (whose column scale dora_linear applies in bf16)."""
    assert got[0].dtype == mixed[0].dtype
    eps = torch.finfo(dtype).eps
    assert got[1].keys() == mixed[1].keys()
    pairs = [("output", got[0], mixed[0], low[0], ref[0])]
    pairs += [(n, got[1][n], mixed[1][n], low[1][n], ref[1][n]) for n in got[1]]
    for what, g, m, lo, r in pairs:
        assert g.dtype == m.dtype, what
        assert rel_err(g, r) <= 2 * rel_err(lo, r) + 1e-6, what
        assert rel_err(g, m) <= 2 * eps, what


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("setup", ["bf16", "f32-input-bf16-compute"])
def test_4bit_half_compute_fp32_adapters(setup, use_dora, bnb, fused):
    """QLoRA's usual dtypes. "bf16": a bf16 model (bnb computes in bf16), fp32 adapters (PEFT's
    default). "f32-input-bf16-compute": ``bnb_4bit_compute_dtype=bfloat16`` with fp32 inputs
    (``prepare_model_for_kbit_training`` leaves the rest of the model in fp32): bnb casts x to
    bf16 for the base and its result back to fp32, PEFT runs the rank-r branch in fp32; the
    fused op runs all of it in bf16 and casts the result back to fp32."""
    dtype = torch.bfloat16
    x_dtype = dtype if setup == "bf16" else torch.float32
    compute = None if setup == "bf16" else dtype
    model, dense = make_4bit(bnb, dtype, compute_dtype=compute, factory=Smooth4, use_dora=use_dora)
    perturb_magnitudes(model)
    assert model.base_model.model.lin0.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    ref = run(dense_twin(model, dense), x.double())
    mixed = run(model, x)
    low = copy.deepcopy(model)
    for p in low.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)  # PEFT with its adapters in the compute dtype
    low = run(low, x)
    patch_peft()
    got = run(model, x)
    assert len(fused) == 2 and got[0].dtype == x_dtype
    assert all(a[0].dtype == dtype for a, _ in fused)  # the op runs in bnb's compute dtype
    assert model.base_model.model.lin0.base_layer.compute_dtype == dtype
    assert_compute_dtype_precision(got, mixed, low, ref, dtype)


def _fp4(bnb):
    return make_4bit(bnb, quant_type="fp4")[0], lambda m, x: run(m, x)


def _4bit_autocast(bnb):
    def fwd(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(m, x)

    return make_4bit(bnb)[0], fwd


def _8bit(bnb):
    torch.manual_seed(0)
    base = MLP4()
    for name in ("lin0", "lin1", "lin2"):
        lin = getattr(base, name)
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.detach(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        setattr(base, name, q.to("cpu"))
    base.is_loaded_in_8bit = True
    cfg = peft.LoraConfig(r=4, target_modules=MLP3, init_lora_weights=False)
    return peft.get_peft_model(base, cfg), lambda m, x: run(m, x)


def _4bit_bf16_adapters(bnb):
    model = make_4bit(bnb)[0]  # computes in float32
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # PEFT would run the rank-r branch in bf16
    return model, lambda m, x: run(m, x)


BNB_FALLBACKS = {
    "fp4": (_fp4, "bitsandbytes fp4 4-bit weights (only nf4 is fused)"),
    "autocast": (_4bit_autocast, "autocast on a bitsandbytes 4-bit base"),
    "8bit": (_8bit, "a bitsandbytes 8-bit base (Linear8bitLt)"),
    "bf16-adapters-f32-compute": (_4bit_bf16_adapters, "torch.bfloat16 adapters with a torch.float32 compute dtype"),
}


@pytest.mark.parametrize("case", list(BNB_FALLBACKS))
def test_4bit_fallback_is_peft_and_logged_once(case, bnb, fused, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    build, reason = BNB_FALLBACKS[case]
    model, fwd = build(bnb)
    x = _x4()
    want = fwd(model, x)
    patch_peft()
    got = fwd(model, x)
    fwd(model, x)
    assert_same(got, want, 0.0)
    assert not fused
    assert fallback_logs(caplog) == [f"fastlora: PEFT's own forward runs for LoRA layers with {reason}"]


def test_4bit_after_bnb_cpu_inference_repacking(bnb, fused, caplog):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight for inference on its
    first eval, no-grad call (in place, into a layout that is not NF4Weight's), after which those
    layers fall back. Patched before that, the fused op runs and nothing is repacked."""
    caplog.set_level(logging.INFO, logger=LOG)
    model, _ = make_4bit(bnb)
    model.eval()
    x = _x4()
    qs = lambda: model.base_model.model.lin0.base_layer.weight.quant_state
    repacked = lambda: getattr(qs(), "packing_format_for_cpu", False)
    ref = run(model, x)[0]  # x requires grad: bnb does not repack
    patch_peft()
    with torch.no_grad():
        got = model(x)
    assert len(fused) == 3 and not repacked()
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    unpatch_peft()
    with torch.no_grad():
        want = model(x)
    if not repacked():
        pytest.skip("bitsandbytes did not repack (no AVX512-BF16 on this CPU)")
    patch_peft()
    fused.clear()
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert not fused
    assert fallback_logs(caplog) == [
        "fastlora: PEFT's own forward runs for LoRA layers with "
        "bitsandbytes' repacked CPU inference layout (packing_format_for_cpu)"
    ]


def test_bnb_classes_patched_and_restored(bnb):
    from peft.tuners.lora import bnb as lora_bnb

    classes = [lora_bnb.Linear4bit, lora_bnb.Linear8bitLt]
    before = [c.__dict__["forward"] for c in classes]
    patch_peft()
    assert [c.__dict__["forward"] for c in classes] == [fpeft._patched_forward_4bit, fpeft._patched_forward_8bit]
    patch_peft()
    unpatch_peft()
    assert [c.__dict__["forward"] for c in classes] == before


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
