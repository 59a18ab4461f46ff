"""Issue #17: what a hostile or careless user found, each pinned by a test that failed before."""

import json
import math
import random
import re
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRALinear
from fastlora.adapters import _SafePattern, load_adapter, save_adapter
from fastlora.quant import Int8Weight, NF4Weight, quantize
from fastlora.reference import dora_ref, lora_linear_ref
from fastlora.variants import dora_linear


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = LoRALinear(64, 48, r=8, lora_alpha=16, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


# ---- item 2: an int8 layer loads its own state dict (layer and model level) -----------------


def test_int8_layer_loads_its_own_state_dict():
    src, dst = _layer(0, quant="int8"), _layer(1, quant="int8")
    x = torch.randn(5, 64)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.weight.CB, src.weight.CB) and torch.equal(dst.weight.SCB, src.weight.SCB)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_int8_model_loads_its_own_state_dict():
    def model(seed):
        torch.manual_seed(seed)
        return fastlora.inject(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)), ["0", "2"], quant="int8")

    src, dst = model(0), model(1)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ---- item 3: set_adapter while other threads run forward ------------------------------------


def test_set_adapter_is_atomic_for_concurrent_forwards():
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=4, lora_alpha=4).eval()
    layer.add_adapter("other", r=6, lora_alpha=30, use_rslora=True)  # another rank: a mix fails or differs
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.adapter_tensors("other")["lora_B"].normal_()
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = {}
        for name in ("default", "other", None):
            layer.set_adapter(name)
            want[name] = layer(x)
    assert (want["default"] - want["other"]).abs().min() > 0
    stop, errors, wrong, count = threading.Event(), [], [], [0]

    def worker():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    y = layer(x)
            except Exception as e:  # noqa: BLE001 (any error is the failure being tested)
                errors.append(repr(e))
                continue
            count[0] += 1
            if not any(torch.equal(y, w) for w in want.values()):
                wrong.append(y)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 3.0
    names = ["default", "other", None]
    i = 0
    while time.monotonic() < deadline:
        layer.set_adapter(names[i % 3])
        i += 1
    stop.set()
    for t in threads:
        t.join()
    assert count[0] > 100 and i > 100
    assert not errors, f"{len(errors)} forwards failed, e.g. {errors[0]}"
    assert not wrong, f"{len(wrong)} of {count[0]} forwards mixed adapters"


def test_direct_assignments_still_reach_forward():
    layer = _layer().eval()
    x = torch.randn(4, 64)
    new_B = nn.Parameter(torch.randn(48, 8))
    layer.lora_B = new_B  # as load_state_dict(assign=True) does
    layer.lora_dropout = 0.0
    layer.lora_alpha = 3.0
    want = lora_linear_ref(x, layer.weight, layer.lora_A, new_B, 3.0 / 8, layer.bias)
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(ValueError):
        layer.lora_dropout = 1.5


# ---- item 4: hostile rank_pattern / alpha_pattern keys ---------------------------------------


_HOSTILE_LOAD = """
import json, sys, torch
from torch import nn
import fastlora
from fastlora.adapters import load_adapter, save_adapter
path = "model.layers.10.self_attn.q_proj"
model = nn.Module()
model.model = nn.Module()
model.model.layers = nn.ModuleList([nn.Module() for _ in range(11)])
model.model.layers[10].self_attn = nn.Module()
model.model.layers[10].self_attn.q_proj = nn.Linear(8, 8)
src = fastlora.inject(model, ["q_proj"], r=2)
save_adapter(src, sys.argv[1])
cfg = json.loads(open(sys.argv[1] + "/adapter_config.json").read())
cfg["alpha_pattern"] = {"(.*.*)*z": 3.0, r"(.*\\.)*(.*)*q": 5.0}
open(sys.argv[1] + "/adapter_config.json", "w").write(json.dumps(cfg))
layer = load_adapter(src, sys.argv[1], adapter_name="h").get_submodule(path)
print("alpha", layer.adapter_config("h").lora_alpha)
"""


def test_hostile_pattern_key_does_not_hang_load_adapter(tmp_path):
    # in a subprocess: re's matcher holds the GIL, so a hang could not be timed out in a thread
    try:
        out = subprocess.run(
            [sys.executable, "-c", _HOSTILE_LOAD, str(tmp_path)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("load_adapter hung on a hostile rank_pattern / alpha_pattern key")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "alpha 8" in out.stdout  # neither key matches the path
    assert _SafePattern.of("(.*.*)*z").match("model.layers.10.self_attn.q_projz")


@pytest.mark.parametrize(
    "key", [r"(a)\1", r"(?=q)proj", r"(?<=\.)q_proj", r"\bq_proj", r"(?>a)", "a++", "x{100000}", "a" * 2000]
)
def test_unsafe_pattern_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError):
        _SafePattern(key)


def _random_regex(rng, depth=0):
    atoms = ["a", "b", ".", r"\.", r"\d", "[ab]", "[^a]", r"\w", "1"]
    parts = []
    for _ in range(rng.randint(1, 4)):
        if depth < 2 and rng.random() < 0.3:
            inner = _random_regex(rng, depth + 1)
            atom = f"({inner}|{_random_regex(rng, depth + 1)})" if rng.random() < 0.5 else f"(?:{inner})"
        else:
            atom = rng.choice(atoms)
        parts.append(atom + rng.choice(["", "", "*", "+", "?", "*?", "{1,2}", "{2}"]))
    return "".join(parts) if rng.random() < 0.9 else "^" + "".join(parts)


def test_safe_pattern_agrees_with_re():
    rng = random.Random(0)
    paths = ["", "a", "b.a", "ab.1a", "x.ab1.b", "a.b.a.b", "1.2.ab", "aa.bb.11", "q.aab", ".a", "a."]
    for _ in range(600):
        key = _random_regex(rng)
        for p in paths:
            want = re.match(rf"(.*\.)?({key})$", p) is not None
            assert _SafePattern(key).match(p) == want, (key, p)


# ---- item 5: corrupt NF4 / int8 statistics ---------------------------------------------------


def _nf4_sd(double_quant, dtype=torch.float16):  # huge: past float16's max
    torch.manual_seed(0)
    return LoRALinear(64, 48, quant="nf4", double_quant=double_quant, dtype=dtype).state_dict()


def _set_offset(sd, value):
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta["nested_offset"] = value
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


CORRUPT_STATS = {
    "absmax-nan": (False, lambda sd: sd["weight.absmax"].__setitem__(3, float("nan"))),
    "absmax-inf": (False, lambda sd: sd["weight.absmax"].__setitem__(0, float("inf"))),
    "absmax-huge": (False, lambda sd: sd["weight.absmax"].__setitem__(1, 1e38)),
    "absmax-negative": (False, lambda sd: sd["weight.absmax"].__setitem__(1, -1.0)),
    "nested-absmax-nan": (True, lambda sd: sd["weight.nested_absmax"].fill_(float("nan"))),
    "nested-absmax-inf": (True, lambda sd: sd["weight.nested_absmax"].fill_(float("inf"))),
    "nested-absmax-huge": (True, lambda sd: sd["weight.nested_absmax"].fill_(1e38)),
    "nested-offset-nan": (True, lambda sd: _set_offset(sd, float("nan"))),
    "nested-offset-inf": (True, lambda sd: _set_offset(sd, float("inf"))),
    "nested-offset-huge": (True, lambda sd: _set_offset(sd, 1e38)),
}


@pytest.mark.parametrize("case", list(CORRUPT_STATS))
def test_corrupt_nf4_statistics_are_refused(case):
    double_quant, corrupt = CORRUPT_STATS[case]
    sd = {k: v.clone() for k, v in _nf4_sd(double_quant).items()}
    corrupt(sd)
    with pytest.raises(ValueError):
        NF4Weight.from_state_dict(sd)  # bitsandbytes' bytes
    torch.manual_seed(1)
    layer = LoRALinear(64, 48, quant="nf4", double_quant=double_quant, dtype=torch.float16)
    before = layer.weight
    with pytest.raises(ValueError):
        layer.load_state_dict(sd)
    assert layer.weight is before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30, -1.0])
def test_corrupt_int8_statistics_are_refused(value):
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in LoRALinear(64, 48, quant="int8", dtype=torch.float16).state_dict().items()}
    layer = LoRALinear(64, 48, quant="int8", dtype=torch.float16)
    layer.load_state_dict(sd)  # the intact state dict loads
    sd["SCB"][2] = value
    with pytest.raises(ValueError):
        Int8Weight.from_state_dict(sd)
    with pytest.raises(ValueError):
        layer.load_state_dict(sd)


def test_valid_statistics_still_load():
    for dq in (False, True):
        sd = _nf4_sd(dq, torch.float32)
        assert NF4Weight.from_state_dict(sd).dequantize().isfinite().all()


# ---- item 6: load_state_dict with no active adapter ------------------------------------------


@pytest.mark.parametrize("quant", ["nf4", "int8", None])
def test_load_state_dict_with_no_active_adapter(quant):
    src = _layer(0, quant=quant)
    src.set_adapter(None)
    dst = _layer(1, quant=quant)
    dst.set_adapter(None)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ---- item 7 and the drift: merge / unmerge ---------------------------------------------------


def test_dylora_unmerge_removes_what_merge_added():
    layer = _layer(dynamic_rank=True)
    w0 = layer.weight.detach().clone()
    layer.active_rank = 2
    layer.merge()
    layer.active_rank = 5
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def _base_of(layer):
    return layer.weight.dequantize(torch.float32) if layer.is_quantized else layer.weight.detach().float()


@pytest.mark.parametrize(
    "kw",
    [
        dict(dtype=torch.bfloat16, use_dora=True),
        dict(dtype=torch.float16, use_dora=True),
        dict(quant="nf4"),
        dict(quant="nf4", use_dora=True),
        dict(quant="int8"),
    ],
    ids=["dora-bf16", "dora-fp16", "nf4", "nf4-dora", "int8"],
)
def test_merge_unmerge_100_cycles_is_exact(kw):
    layer = _layer(**kw)
    w0 = _base_of(layer)
    x = torch.randn(4, 64, dtype=kw.get("dtype", torch.float32))
    y0 = layer(x)
    for _ in range(100):
        layer.merge()
        layer.unmerge()
    assert torch.equal(_base_of(layer), w0)
    assert torch.equal(layer(x), y0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_unmerge_dense_drift_is_bounded(dtype):
    # a dense base keeps no copy: round(round(W + d) - d) is a fixed point after one cycle
    layer = _layer(dtype=dtype)
    w0 = layer.weight.detach().float().clone()
    layer.merge()
    layer.unmerge()
    one = (layer.weight.float() - w0).abs().max()
    for _ in range(99):
        layer.merge()
        layer.unmerge()
    assert (layer.weight.float() - w0).abs().max() <= one
    # one rounding of W + d (merge) and one of W (unmerge)
    assert one <= torch.finfo(dtype).eps * (w0.abs().max() + layer.delta_weight().abs().max())


def test_merge_without_keep_base_recomputes():
    layer = _layer(quant="nf4")
    kept = layer.weight
    layer.merge(keep_base=False)
    layer.unmerge()
    assert layer.weight is not kept  # requantized (lossy, as PEFT + bitsandbytes)


# ---- item 8: quantize at extreme magnitudes --------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 128), (64, 256)])
@pytest.mark.parametrize("magnitude", [5e36, 2e37, 1e-39, 1e-42, 1e-45])
@pytest.mark.parametrize("python", [False, True])
def test_quantize_nf4_extreme_magnitudes(magnitude, python, shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * magnitude
    with fastlora.quant.force_python(python):
        q = quantize(W, "nf4")
        d = q.dequantize()
    assert d.isfinite().all()
    if magnitude > 1:  # below float32's normal range bitsandbytes' clamp(1e-38) rounds codes to ~0
        assert (d - W).abs().max() <= 0.2 * W.abs().max()


def test_quantize_non_finite_weight_is_a_value_error():
    W = torch.randn(8, 64)
    W[1, 3] = float("inf")
    with pytest.raises(ValueError):
        quantize(W, "nf4")


# ---- item 9: NaN / Inf at dropped positions --------------------------------------------------


def _poisoned(M, K, p, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype)
    keep = fastlora.dropout_mask((M, K), p, seed)
    dropped = (~keep).nonzero()
    for i, v in enumerate((float("nan"), float("inf"), -float("inf"))):
        x[dropped[5 * i, 0], dropped[5 * i, 1]] = v
    return x, keep


@pytest.mark.parametrize("M", [8, 96])
def test_nan_at_dropped_positions_contributes_zero(M):
    K, N, r, p, seed = 40, 24, 4, 0.5, 7
    x, keep = _poisoned(M, K, p, seed)
    g = torch.Generator().manual_seed(1)
    W, A, B = torch.randn(N, K, generator=g) / 7, torch.randn(r, K, generator=g) / 7, torch.randn(N, r, generator=g)
    gy = torch.randn(M, N, generator=g)
    grads = {}
    for backend in ("reference", "torch", "triton"):
        A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
        if backend == "reference":
            y = lora_linear_ref(x, W, A_, B_, 0.5, keep_mask=keep, dropout_p=p)
        else:
            y = fastlora.lora_linear(x, W, A_, B_, scale=0.5, dropout_p=p, seed=seed, backend=backend)
        y.backward(gy)
        assert A_.grad.isfinite().all() and B_.grad.isfinite().all(), backend  # dB = s g^T z: z is finite
        grads[backend] = (A_.grad, B_.grad)
    for backend in ("torch", "triton"):
        for got, want in zip(grads[backend], grads["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nan_at_dropped_positions_dora():
    M, K, N, r, p, seed = 32, 40, 24, 4, 0.5, 3
    x, keep = _poisoned(M, K, p, seed)
    g = torch.Generator().manual_seed(1)
    W, A, B = torch.randn(N, K, generator=g) / 7, torch.randn(r, K, generator=g) / 7, torch.randn(N, r, generator=g)
    m = torch.rand(N, generator=g) + 1
    A1, A2 = A.clone().requires_grad_(), A.clone().requires_grad_()
    dora_linear(x, W, A1, B, m, scale=0.5, dropout_p=p, seed=seed).sum().backward()
    dora_ref(x, W, A2, B, m, 0.5, keep_mask=keep, dropout_p=p).sum().backward()
    assert A2.grad.isfinite().all()
    torch.testing.assert_close(A1.grad, A2.grad, rtol=1e-5, atol=1e-5)


# ---- error types at the edges -----------------------------------------------------------------


def test_huge_lora_alpha_is_refused_at_construction():
    with pytest.raises(ValueError):
        LoRALinear(8, 8, lora_alpha=1e300)
    layer = LoRALinear(8, 8, lora_alpha=1e30)  # large but representable: works
    assert layer(torch.randn(2, 8)).shape == (2, 8)


def test_float_blocksize_is_a_type_error():
    with pytest.raises(TypeError):
        quantize(torch.randn(8, 64), "nf4", 64.0)
    with pytest.raises(TypeError):
        LoRALinear(64, 8, quant="nf4", blocksize=64.0)


def test_deeply_nested_adapter_config_is_a_value_error(tmp_path):
    src = fastlora.inject(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2)
    save_adapter(src, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested"):
        load_adapter(src, tmp_path, adapter_name="deep")


def test_deeply_nested_quant_state_is_a_value_error():
    sd = dict(_nf4_sd(True))
    blob = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nested"):
        NF4Weight.from_state_dict(sd)


# ---- item 11, DyLoRA: the per-step rank is sampled inside a compiled graph ----------------------


def test_dylora_rank_sampling_traces_without_graph_break():
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, r=6, lora_alpha=12, dynamic_rank=True).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    # the traced sample gives the output of one of the ranks 1..r
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        outs = [compiled(x).detach() for _ in range(8)]
    candidates = []
    for b in range(1, 7):
        layer.active_rank = b
        candidates.append(layer(x).detach())
    layer.active_rank = None
    for y in outs:
        assert any(torch.allclose(y, c, rtol=1e-5, atol=1e-5) for c in candidates)
    assert math.isfinite(float(outs[0].sum()))
