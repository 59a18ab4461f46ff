"""Named adapters (hot-swap, add/delete/list, merge) and PEFT-format adapter files, both ways."""

import copy
import json
import pickle
import re
import struct
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

import fastlora
from fastlora import LoRALinear
from fastlora.adapters import (
    active_adapter,
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from fastlora.reference import dora_ref, lora_linear_ref

F64 = dict(rtol=1e-12, atol=1e-12)
F64_DORA = dict(rtol=1e-10, atol=1e-12)  # DoRA's row norm is summed in another order than PEFT's


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")  # a test dependency: installed by `make test`


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.mid = nn.Linear(16, 16, bias=False)
        self.down = nn.Linear(16, 5)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.norm(self.up(x))))))


def _base(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Net().to(dtype)


def _x(dtype=torch.float64):
    return torch.randn(7, 12, generator=torch.Generator().manual_seed(99), dtype=dtype)


@torch.no_grad()
def _randomize(model, name=None, seed=1):
    """Non-zero B (and A, magnitude) on every fastlora layer holding adapter ``name``."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in fastlora.lora_layers(model):
        if name is not None and name not in layer.adapter_names or name is None and layer.active_adapter is None:
            continue
        t = layer.adapter_tensors(name)
        t["lora_A"].copy_(torch.randn(t["lora_A"].shape, generator=g, dtype=t["lora_A"].dtype) * 0.3)
        t["lora_B"].copy_(torch.randn(t["lora_B"].shape, generator=g, dtype=t["lora_B"].dtype) * 0.3)
        if t["lora_magnitude_vector"] is not None:
            m = t["lora_magnitude_vector"]
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g, dtype=m.dtype))


@torch.no_grad()
def _randomize_peft(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    for mod in pm.modules():
        if hasattr(mod, "lora_B") and isinstance(mod.lora_B, nn.ModuleDict):
            for name in mod.lora_B:
                w = mod.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3)
                if name in getattr(mod, "lora_magnitude_vector", {}):
                    m = mod.lora_magnitude_vector[name].weight
                    m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g, dtype=m.dtype))


def _layer_ref(layer, x, name):
    """One layer's output for adapter ``name`` from the oracle formulas (None: base only)."""
    W = layer.dense_weight(x.dtype)
    if name is None:
        return F.linear(x, W, layer.bias)
    c, t = layer.adapter_config(name), layer.adapter_tensors(name)
    if c.use_dora:
        return dora_ref(x, W, t["lora_A"], t["lora_B"], t["lora_magnitude_vector"], c.scaling, layer.bias)
    return lora_linear_ref(x, W, t["lora_A"], t["lora_B"], c.scaling, layer.bias)


def _net_ref(model, x, name):
    """Net's forward with adapter ``name`` on the layers that hold it, base elsewhere."""

    def lin(mod, h):
        if isinstance(mod, LoRALinear):
            return _layer_ref(mod, h, name if name in mod.adapter_names else None)
        return mod(h)

    h = torch.relu(model.norm(lin(model.up, x)))
    return lin(model.down, torch.relu(lin(model.mid, h)))


def _snapshot(model):
    """Everything a failed load must leave as it was."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "adapters": {n: (m.adapter_names, m.active_adapter, m.merged) for n, m in layers.items()},
        "stored": {
            (n, a): {k: None if t is None else t.detach().clone() for k, t in m.adapter_tensors(a).items()}
            for n, m in layers.items()
            for a in m.adapter_names
        },
    }


def _assert_same(a, b):
    assert a["types"] == b["types"] and a["grad"] == b["grad"] and a["adapters"] == b["adapters"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["stored"].keys() == b["stored"].keys()
    for k, ts in a["stored"].items():
        for kind, t in ts.items():
            assert (t is None and b["stored"][k][kind] is None) or torch.equal(t, b["stored"][k][kind]), (k, kind)


# ---- named adapters on one layer --------------------------------------------------------------


def test_layer_hot_swap_gives_each_adapters_output_without_copies():
    torch.manual_seed(0)
    layer = LoRALinear(20, 12, r=4, lora_alpha=8, dtype=torch.float64).eval()
    layer.add_adapter("rs", r=2, lora_alpha=6, use_rslora=True)
    layer.add_adapter("dora", r=3, lora_alpha=3, use_dora=True)
    for name in layer.adapter_names:
        _randomize(layer, name)
    assert layer.adapter_names == ["default", "rs", "dora"] and layer.active_adapter == "default"
    params = {n: layer.adapter_tensors(n) for n in layer.adapter_names}
    w, w0 = layer.weight, layer.weight.detach().clone()
    x = torch.randn(5, 20, dtype=torch.float64)
    for name in ("rs", "dora", "default", "dora", "rs"):
        layer.set_adapter(name)
        assert layer.active_adapter == name
        cfg = layer.adapter_config(name)
        assert (layer.r, layer.scaling) == (cfg.r, cfg.scaling)
        for k, p in params[name].items():  # swapped by reference: the very same Parameter objects
            assert getattr(layer, k, None) is p
        keys = {"weight", "bias", "lora_A", "lora_B"} | ({"lora_magnitude_vector"} if name == "dora" else set())
        assert set(layer.state_dict()) == keys  # only the active adapter is registered
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == keys - {"weight", "bias"}
        torch.testing.assert_close(layer(x), _layer_ref(layer, x, name), **F64)
        assert layer.weight is w and torch.equal(layer.weight, w0)  # the base is never touched
    assert layer.scaling == 6 / 2**0.5
    layer.set_adapter(None)
    assert layer.scaling is None and set(layer.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(layer(x), F.linear(x, w0, layer.bias), **F64)
    assert "active_adapter=None" in repr(layer)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        layer.set_adapter("nope")
    layer.set_adapter("rs")
    with pytest.raises(ValueError, match="is active"):
        layer.delete_adapter("rs")
    layer.delete_adapter("dora")
    assert layer.adapter_names == ["default", "rs"]
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("rs")
    with pytest.raises(ValueError, match="adapter name"):
        layer.add_adapter("a.b")


def test_inactive_adapters_follow_moves_and_copies():
    layer = LoRALinear(8, 6, r=2)
    layer.add_adapter("b", r=3, use_dora=True)
    stored = layer.adapter_tensors("b")
    layer.double()
    after = layer.adapter_tensors("b")
    assert all(after[k] is stored[k] for k in after)  # same Parameter objects, as Module._apply
    assert {t.dtype for t in after.values()} == {torch.float64}
    clone = copy.deepcopy(layer)
    clone.set_adapter("b")
    assert clone.lora_A is not stored["lora_A"] and torch.equal(clone.lora_A, stored["lora_A"])
    assert layer.active_adapter == "default"  # the copy is independent
    y = clone(torch.randn(3, 8, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


def test_compiled_layer_follows_swaps():
    # a swap replaces Parameter objects: torch.compile's guards must notice (no stale adapter)
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=4).eval()
    layer.add_adapter("b", r=2, use_dora=True)
    _randomize(layer, "default")
    _randomize(layer, "b", seed=2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 16)
    outs = {}
    for name in ("default", "b", None, "default"):
        layer.set_adapter(name)
        outs[name] = layer(x)
        torch.testing.assert_close(compiled(x), outs[name], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs["default"], outs["b"]) and not torch.allclose(outs["b"], outs[None])


def test_optimizer_state_survives_swaps():
    torch.manual_seed(0)
    model = fastlora.inject(_base(), ["up", "down"], r=4)
    add_adapter(model, "x", r=2)
    set_adapter(model, "x")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = _x()
    model(x).square().sum().backward()
    opt.step()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    set_adapter(model, "default")
    set_adapter(model, "x")
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert any(p is q for group in opt.param_groups for q in group["params"]) and torch.equal(p, trained[n])


# ---- named adapters over a model ----------------------------------------------------------------


def test_model_add_list_set_delete():
    model = fastlora.inject(_base(), ["up", "down"], r=4, lora_alpha=8).eval()
    _randomize(model)
    x = _x()
    y_default = model(x)
    add_adapter(model, "x", r=2, lora_alpha=4, use_dora=True)
    assert list_adapters(model) == ["default", "x"] and active_adapter(model) == "default"
    add_adapter(model, "y", target_modules=["mid", "up"], r=3, lora_alpha=3)
    assert isinstance(model.mid, LoRALinear) and model.mid.adapter_names == ["y"]
    assert model.mid.active_adapter is None and not model.mid.weight.requires_grad  # added inactive
    _randomize(model, "x", seed=2)
    _randomize(model, "y", seed=3)
    torch.testing.assert_close(model(x), y_default, **F64)
    for name in ("y", "x", "default", "y"):
        set_adapter(model, name)
        assert active_adapter(model) == name
        torch.testing.assert_close(model(x), _net_ref(model, x, name), **F64_DORA)
    assert model.down.active_adapter is None  # "y" is not on down: base only there

    before = _snapshot(model)
    for call, match in (
        (lambda: delete_adapter(model, "y"), "is active"),
        (lambda: delete_adapter(model, "nope"), "no adapter 'nope'"),
        (lambda: delete_adapter(model, "y", new_active="nope"), "no adapter 'nope'"),
        (lambda: set_adapter(model, "nope"), "no adapter 'nope'"),
        (lambda: add_adapter(model, "x", r=2), "already exists"),
        (lambda: add_adapter(model, "z", target_modules=["nothing"]), "matched no"),
        (lambda: add_adapter(model, "z", r=0), "r must be"),
        (lambda: add_adapter(model, "z", bogus=1), "unexpected options"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            call()
        _assert_same(before, _snapshot(model))

    delete_adapter(model, "y", new_active="x")
    assert list_adapters(model) == ["default", "x"] and active_adapter(model) == "x"
    assert model.mid.adapter_names == [] and model.mid.active_adapter is None
    torch.testing.assert_close(model(x), _net_ref(model, x, "x"), **F64_DORA)
    set_adapter(model, None)
    torch.testing.assert_close(model(x), _net_ref(model, x, None), **F64)
    delete_adapter(model, "default")
    assert list_adapters(model) == ["x"] and active_adapter(model) is None


def test_add_adapter_to_plain_model_activates_it():
    model = _base()
    add_adapter(model, "a", target_modules=["up", "down"], r=2)
    assert active_adapter(model) == "a" and list_adapters(model) == ["a"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "up.lora_A",
        "up.lora_B",
        "down.lora_A",
        "down.lora_B",
    }


def test_merge_unmerge_with_swaps():
    model = fastlora.inject(_base(), ["up", "mid", "down"], r=4, lora_alpha=8).eval()
    add_adapter(model, "x", r=2, lora_alpha=5, use_dora=True)
    _randomize(model, "default")
    _randomize(model, "x", seed=2)
    w0 = {n: layer.weight.detach().clone() for n, layer in fastlora.lora_layers(model)}
    x = _x()
    y_default, y_x = _net_ref(model, x, "default"), _net_ref(model, x, "x")
    fastlora.merge(model)
    assert all(layer.merged for _, layer in fastlora.lora_layers(model))
    torch.testing.assert_close(model(x), y_default, **F64)
    with pytest.warns(UserWarning, match="unmerging"):
        set_adapter(model, "x")  # as PEFT: unmerge, then swap
    assert not any(layer.merged for _, layer in fastlora.lora_layers(model))
    for n, layer in fastlora.lora_layers(model):
        torch.testing.assert_close(layer.weight, w0[n], **F64)
    torch.testing.assert_close(model(x), y_x, **F64_DORA)
    fastlora.merge(model)
    torch.testing.assert_close(model(x), y_x, **F64_DORA)
    fastlora.unmerge(model)
    for n, layer in fastlora.lora_layers(model):
        torch.testing.assert_close(layer.weight, w0[n], **F64)
    set_adapter(model, None)
    fastlora.merge(model)  # no active adapter: nothing to merge
    assert not any(layer.merged for _, layer in fastlora.lora_layers(model))


# ---- files: fastlora <-> PEFT ---------------------------------------------------------------------

VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "dropout-patterns": dict(lora_dropout=0.25),  # + per-layer rank/alpha (rank_pattern/alpha_pattern)
}


def _fast_model(variant):
    kw = VARIANTS[variant]
    model = fastlora.inject(_base(), ["up", "down"], r=4, lora_alpha=8, **kw)
    if variant == "dropout-patterns":
        fastlora.inject(model, ["mid"], r=2, lora_alpha=3, **kw)
    else:
        fastlora.inject(model, ["mid"], r=4, lora_alpha=8, **kw)
    _randomize(model)
    return model.eval()


def _peft_model(peft, variant, targets=("up", "mid", "down"), seed=1):
    kw = VARIANTS[variant]
    if variant == "dropout-patterns":
        kw = dict(kw, rank_pattern={"mid": 2}, alpha_pattern={"mid": 3})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **kw)
    pm = peft.get_peft_model(_base(), cfg)
    _randomize_peft(pm, seed)
    return pm.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_adapter_loads_in_peft(peft, variant, tmp_path):
    fm = _fast_model(variant)
    save_adapter(fm, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.{m}.lora_{k}.weight" for m in ("up", "mid", "down") for k in "AB"}
    if variant == "dora":
        expected |= {f"base_model.model.{m}.lora_magnitude_vector" for m in ("up", "mid", "down")}
    assert keys == expected  # adapter tensors only, PEFT's names
    pm = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    x = _x()
    torch.testing.assert_close(pm(x), fm(x), **(F64_DORA if variant == "dora" else F64))
    cfg = pm.peft_config["default"]
    kw = VARIANTS[variant]
    assert cfg.lora_dropout == kw.get("lora_dropout", 0.0)
    assert cfg.use_rslora == kw.get("use_rslora", False) and cfg.use_dora == kw.get("use_dora", False)
    assert sorted(cfg.target_modules) == ["down", "mid", "up"]
    assert pm.base_model.model.mid.lora_dropout["default"].__class__.__name__ == (
        "Dropout" if kw.get("lora_dropout") else "Identity"
    )
    if variant == "dropout-patterns":
        assert pm.base_model.model.mid.r["default"] == 2 and pm.base_model.model.mid.scaling["default"] == 1.5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_saved_adapter_loads_into_plain_and_injected_models(peft, variant, tmp_path):
    pm = _peft_model(peft, variant)
    pm.save_pretrained(tmp_path)
    x = _x()
    y = pm(x)
    tol = F64_DORA if variant == "dora" else F64
    plain = load_adapter(_base(), tmp_path).eval()
    assert all(isinstance(getattr(plain, n), LoRALinear) for n in ("up", "mid", "down"))
    torch.testing.assert_close(plain(x), y, **tol)
    assert plain.mid.lora_dropout == VARIANTS[variant].get("lora_dropout", 0.0)
    assert plain.mid.use_rslora == VARIANTS[variant].get("use_rslora", False)
    assert plain.mid.r == (2 if variant == "dropout-patterns" else 4)
    assert not plain.norm.weight.requires_grad and plain.up.lora_B.requires_grad  # frozen like inject
    # into an already-injected model: replaces its "default" adapter in place
    injected = fastlora.inject(_base(), ["up", "mid", "down"], r=4, lora_alpha=8).eval()
    B = injected.up.lora_B
    load_adapter(injected, tmp_path)
    assert injected.up.lora_B is B  # same shape: written in place
    torch.testing.assert_close(injected(x), y, **tol)
    # and under another name: added inactive, then hot-swapped in
    other = fastlora.inject(_base(), ["up", "mid", "down"], r=4, lora_alpha=8).eval()
    y_other = other(x)
    load_adapter(other, tmp_path, adapter_name="task")
    assert list_adapters(other) == ["default", "task"] and active_adapter(other) == "default"
    torch.testing.assert_close(other(x), y_other, **F64)
    set_adapter(other, "task")
    torch.testing.assert_close(other(x), y, **tol)


def test_two_peft_adapters_hot_swap(peft, tmp_path):
    pa = _peft_model(peft, "lora", targets=("up", "down"), seed=1)
    pb = _peft_model(peft, "dora", targets=("mid",), seed=2)
    pa.save_pretrained(tmp_path / "a")
    pb.save_pretrained(tmp_path / "b")
    model = _base().eval()
    load_adapter(model, tmp_path / "a", adapter_name="a")
    load_adapter(model, tmp_path / "b", adapter_name="b")
    assert list_adapters(model) == ["a", "b"] and active_adapter(model) == "a"
    x = _x()
    ya, yb = pa(x), pb(x)
    for name, y in (("a", ya), ("b", yb), ("a", ya), (None, _base()(x))):
        set_adapter(model, name)
        torch.testing.assert_close(model(x), y, **F64_DORA)
    # save a named adapter back: PEFT reads it as the same adapter
    save_adapter(model, tmp_path / "b2", adapter_name="b")
    pb2 = peft.PeftModel.from_pretrained(_base(), tmp_path / "b2").eval()
    torch.testing.assert_close(pb2(x), yb, **F64_DORA)


def test_tiny_llama_both_ways(peft, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).double().eval()  # random weights, nothing downloaded
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    # PEFT -> fastlora
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    ).eval()
    _randomize_peft(pm)
    pm.save_pretrained(tmp_path / "peft")
    fm = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert len(fastlora.lora_layers(fm)) == 14
    with torch.no_grad():
        torch.testing.assert_close(fm(ids).logits, pm(ids).logits, **F64)
    # fastlora -> PEFT (rsLoRA; one layer with its own rank and alpha: an escaped dotted pattern)
    odd = "model.layers.1.self_attn.q_proj"
    fm2 = fastlora.inject(copy.deepcopy(base), [odd], r=2, lora_alpha=3, use_rslora=True)
    fastlora.inject(fm2, targets, r=4, lora_alpha=8, use_rslora=True).eval()
    _randomize(fm2, seed=5)
    save_adapter(fm2, tmp_path / "fast")
    saved = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(targets)
    assert saved["rank_pattern"] == {re.escape(odd): 2} and saved["alpha_pattern"] == {re.escape(odd): 3}
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast").eval()
    peft_odd = pm2.get_submodule("base_model.model." + odd)
    assert peft_odd.r["default"] == 2 and pm2.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 4
    with torch.no_grad():
        torch.testing.assert_close(pm2(ids).logits, fm2(ids).logits, **F64)


def test_quantized_base_adapter_files(tmp_path):
    torch.manual_seed(0)
    base = _base(dtype=torch.float32)
    fm = fastlora.inject(copy.deepcopy(base), ["up", "down"], r=4, quant="nf4").eval()
    _randomize(fm)
    save_adapter(fm, tmp_path)
    assert all(".lora_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))  # never the base
    x = _x(torch.float32)
    again = load_adapter(copy.deepcopy(base), tmp_path, quant="nf4").eval()
    assert again.up.is_quantized
    torch.testing.assert_close(again(x), fm(x), rtol=0, atol=0)
    injected = fastlora.inject(copy.deepcopy(base), ["up", "down"], r=4, quant="nf4").eval()
    load_adapter(injected, tmp_path)
    torch.testing.assert_close(injected(x), fm(x), rtol=0, atol=0)


def test_save_refuses_what_peft_cannot_hold(tmp_path):
    model = fastlora.inject(_base(), ["up"], r=4, lora_dropout=0.1)
    fastlora.inject(model, ["down"], r=4, lora_dropout=0.2)
    with pytest.raises(ValueError, match="lora_dropout"):
        save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        save_adapter(model, tmp_path, adapter_name="nope")
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_full_paths_when_short_names_select_more(peft, tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Net(), Net()

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    base = Two().double()
    fm = fastlora.inject(copy.deepcopy(base), ["a.up"], r=2).eval()  # b.up must stay plain in PEFT too
    _randomize(fm)
    save_adapter(fm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["a.up"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert type(pm.base_model.model.b.up) is nn.Linear
    x = _x()
    torch.testing.assert_close(pm(x), fm(x), **F64)


# ---- refusals: the model is left unchanged ---------------------------------------------------------


def _write_weights(d, tensors):
    save_file(tensors, d / "adapter_model.safetensors")


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    t = load_file(d / "adapter_model.safetensors")
    fn(t)
    _write_weights(d, t)


def _header_lie(d):
    raw = (d / "adapter_model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = "base_model.model.up.lora_A.weight"
    header[key]["shape"] = [header[key]["shape"][0] + 1, header[key]["shape"][1]]  # more than its bytes
    hb = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


A_KEY, B_KEY = "base_model.model.up.lora_A.weight", "base_model.model.up.lora_B.weight"
CORRUPTIONS = {
    "config-not-json": (lambda d: (d / "adapter_config.json").write_text("{r: 4,"), "not valid JSON"),
    "config-not-object": (lambda d: (d / "adapter_config.json").write_text("[1]"), "JSON object"),
    "peft-type": (lambda d: _edit_config(d, peft_type="IA3"), "peft_type"),
    "fan-in-fan-out": (lambda d: _edit_config(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "bias-all": (lambda d: _edit_config(d, bias="all"), "bias"),
    "r-not-int": (lambda d: _edit_config(d, r="4"), "r must be"),
    "pissa-init": (lambda d: _edit_config(d, init_lora_weights="pissa"), "init_lora_weights"),
    "rank-lies": (lambda d: _edit_config(d, r=3), "expected \\(r, in\\)"),
    "missing-config": (lambda d: (d / "adapter_config.json").unlink(), "not found"),
    "truncated": (lambda d: _truncate(d, 10), "not a valid safetensors"),
    "garbage": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x07" * 5), "not a valid safetensors"),
    "header-lies": (_header_lie, "not a valid safetensors"),
    "unknown-module": (lambda d: _edit_weights(d, lambda t: _rename(t, "up", "upp")), "not in the model"),
    "not-a-linear": (lambda d: _edit_weights(d, lambda t: _rename(t, "up", "norm")), "LayerNorm"),
    "wrong-shape": (lambda d: _edit_weights(d, lambda t: t.update({A_KEY: torch.randn(4, 13)})), "lora_A has shape"),
    "missing-B": (lambda d: _edit_weights(d, lambda t: t.pop(B_KEY)), "without lora_B"),
    "magnitude-without-dora": (
        lambda d: _edit_weights(d, lambda t: t.update({"base_model.model.up.lora_magnitude_vector": torch.ones(16)})),
        "use_dora=False",
    ),
    "int-dtype": (
        lambda d: _edit_weights(d, lambda t: t.update({A_KEY: t[A_KEY].to(torch.int32)})),
        "floating point",
    ),
    "nan": (lambda d: _edit_weights(d, lambda t: t[A_KEY].view(-1).__setitem__(3, float("nan"))), "NaN or inf"),
    "base-weight-key": (
        lambda d: _edit_weights(d, lambda t: t.update({"base_model.model.up.base_layer.weight": torch.ones(16, 12)})),
        "unsupported key",
    ),
}


def _truncate(d, n):
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-n])


def _rename(t, old, new):
    for k in [k for k in t if f".{old}." in k]:
        t[k.replace(f".{old}.", f".{new}.")] = t.pop(k)


def _target(kind):
    model = _base().eval()
    if kind == "injected":
        fastlora.inject(model, ["up", "down"], r=4, lora_alpha=8)
        add_adapter(model, "other", r=2)
        _randomize(model, "default")
        _randomize(model, "other", seed=4)
    return model


@pytest.fixture
def adapter_dir(tmp_path):
    src = fastlora.inject(_base(seed=5), ["up", "down"], r=4, lora_alpha=8)
    _randomize(src, seed=6)
    save_adapter(src, tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind", ["plain", "injected"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_refused_files_leave_model_unchanged(adapter_dir, corruption, kind):
    corrupt, match = CORRUPTIONS[corruption]
    corrupt(adapter_dir)
    model = _target(kind)
    before = _snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_adapter(model, adapter_dir)
    _assert_same(before, _snapshot(model))


def test_refused_replacement_and_late_injection_failure_leave_model_unchanged(adapter_dir):
    # "default" is on up, mid and down; the file covers up and down only
    model = fastlora.inject(_base(), ["up", "mid", "down"], r=4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="does not cover"):
        load_adapter(model, adapter_dir)
    _assert_same(before, _snapshot(model))
    # injection needed, and the second layer fails to build (NF4 takes fp32/fp16/bf16 only) after
    # the first one was built and froze its shared weight
    model = _base()
    model.up.float()
    with pytest.raises(TypeError):
        fastlora.quantize(model.down.weight.detach(), "nf4")
    before = _snapshot(model)
    with pytest.raises(TypeError):
        load_adapter(model, adapter_dir, quant="nf4")
    _assert_same(before, _snapshot(model))
    assert model.up.weight.requires_grad  # restored
    with pytest.raises(TypeError, match="unexpected options"):
        load_adapter(model, adapter_dir, r=3)


def test_load_replacing_merged_active_adapter_unmerges_first(adapter_dir):
    model = fastlora.inject(_base(), ["up", "down"], r=4, lora_alpha=8).eval()
    _randomize(model, seed=7)
    w0 = {n: layer.weight.detach().clone() for n, layer in fastlora.lora_layers(model)}
    fastlora.merge(model)
    before = _snapshot(model)
    with warnings.catch_warnings():  # warnings as errors: raised before anything changes
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="unmerging"):
            load_adapter(model, adapter_dir)
    _assert_same(before, _snapshot(model))
    with pytest.warns(UserWarning, match="unmerging"):
        load_adapter(model, adapter_dir)
    assert not any(layer.merged for _, layer in fastlora.lora_layers(model))
    for n, layer in fastlora.lora_layers(model):
        torch.testing.assert_close(layer.weight, w0[n], **F64)
    x = _x()
    torch.testing.assert_close(model(x), load_adapter(_base(), adapter_dir).eval()(x), **F64)


def test_pickle_files_are_refused_without_unpickling(adapter_dir, monkeypatch):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")

    def boom(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    model = _base()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="never unpickles"):
        load_adapter(model, adapter_dir)
    _assert_same(before, _snapshot(model))
    with pytest.raises(FileNotFoundError):
        load_adapter(model, adapter_dir / "missing")
