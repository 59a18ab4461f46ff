"""fastlora.quant: NF4 / int8 base weights, bit-exact against bitsandbytes on the CPU."""

import copy
import json

import pytest
import torch

from fastlora.quant import (
    SUPPORTED_BLOCKSIZES,
    Int8Weight,
    NF4Weight,
    dequantize_blockwise_8bit,
    quantize,
    quantize_blockwise_8bit,
)
from fastlora.quant.nf4 import NF4_CODE, dynamic_map_signed

try:
    import bitsandbytes as bnb

    F = bnb.functional
except ImportError:  # a test dependency: only the comparisons below skip without it
    bnb = F = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (N, K): odd element counts, partial last blocks, rows that do not split into whole blocks,
# a single element, and enough blocks for several (partial) nested blocks of 256.
SHAPES = [(7, 13), (33, 130), (64, 256), (3, 1000), (1, 1), (129, 257)]


@pytest.fixture(autouse=True)
def _eager_bnb(monkeypatch):
    # bnb wraps its PyTorch fallback kernels in torch.compile; eager is bit-identical and
    # avoids minutes of inductor compiles on a small CPU box.
    monkeypatch.setattr(torch._dynamo.config, "disable", True)


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Row scales spread the per-block absmax so the nested (double quant) stats are not flat.
    w = torch.randn(shape, generator=g) * (0.1 + 3 * torch.rand(shape[0], 1, generator=g))
    return w.to(dtype)


def _bnb_dequant(q, st, dtype):
    """bitsandbytes' dequantization of (q, st) into dtype.

    bnb 0.50.2's AVX-512 CPU kernel mis-indexes absmax when the rows of W are not made of whole
    blocks (K % blocksize != 0 with K even), so for those shapes this uses bnb's own PyTorch
    kernel, which indexes blocks over the flattened tensor as quantize_4bit (and fastlora) do.
    Everything else goes through bnb.functional.dequantize_4bit.
    """
    st = copy.copy(st)
    st.dtype = dtype
    if st.shape[1] % st.blocksize == 0 or st.shape[1] % 2:
        return F.dequantize_4bit(q, st, quant_type="nf4").reshape(st.shape)  # undo 1-byte .t()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = F.get_4bit_type("nf4", device="cpu")
    return fn(q.reshape(-1), absmax, code, st.blocksize, st.shape, dtype)


def _assert_same_as_bnb(W, blocksize, double_quant):
    q, st = F.quantize_4bit(W, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    ours = quantize(W, "nf4", blocksize, double_quant)
    assert torch.equal(ours.packed, q), "packed codes differ"
    assert torch.equal(ours.absmax, st.absmax), "absmax differs"
    assert torch.equal(ours.code, st.code)
    assert ours.double_quant == double_quant
    if double_quant:
        assert ours.offset.dtype == torch.float32 and torch.equal(ours.offset, st.offset)
        assert torch.equal(ours.nested_absmax, st.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.nested_code, st.state2.code)
    for dtype in {W.dtype, torch.float32, torch.bfloat16}:
        got, ref = ours.dequantize(dtype), _bnb_dequant(q, st, dtype)
        assert got.dtype == dtype and got.shape == W.shape
        assert torch.equal(got.view(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), dtype
    return ours


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_nf4_bit_exact_vs_bnb(shape, dtype, blocksize, double_quant):
    W = _weight(shape, dtype, seed=shape[0] * 1000 + shape[1])
    ours = _assert_same_as_bnb(W, blocksize, double_quant)
    assert ours.shape == W.shape and ours.dtype == dtype and ours.device == W.device
    assert ours.dequantize().dtype == dtype


@needs_bnb
@pytest.mark.parametrize("blocksize", [b for b in SUPPORTED_BLOCKSIZES if b not in (64, 128, 256)])
def test_nf4_other_blocksizes(blocksize):
    _assert_same_as_bnb(_weight((37, 300), torch.float32, seed=blocksize), blocksize, True)
    _assert_same_as_bnb(_weight((16, 512), torch.bfloat16, seed=blocksize), blocksize, False)


@needs_bnb
def test_nf4_special_values():
    """Exact zeros, +-absmax, values exactly on the code midpoints (ties go to the lower
    code), one ulp either side, all-zero blocks (full and tail) and a nested block of zeros."""
    code = torch.tensor(NF4_CODE)
    mid = (code[:-1] + code[1:]) / 2
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    row = torch.cat([mid, up, down, torch.tensor([0.0, -0.0, 1.0, -1.0]), code[:15]])
    g = torch.Generator().manual_seed(1)
    blocks = [row, -row, 2.0 * row, row[torch.randperm(64, generator=g)], torch.zeros(64)]
    blocks += [torch.randn(64, generator=g), torch.zeros(37)]  # 421 elements, zero tail block
    W = torch.cat(blocks).view(1, -1)
    _assert_same_as_bnb(W, 64, True)
    ours = _assert_same_as_bnb(W, 64, False)
    # Independent of bnb: a value on a midpoint takes the lower code, one ulp up the upper one.
    nib = torch.stack([ours.packed.view(-1) >> 4, ours.packed.view(-1) & 15], 1).view(-1)
    assert torch.equal(nib[:15], torch.arange(15, dtype=torch.uint8))
    assert torch.equal(nib[15:30], torch.arange(1, 16, dtype=torch.uint8))
    assert torch.equal(nib[30:45], torch.arange(15, dtype=torch.uint8))
    assert torch.equal(nib[128:143], torch.arange(15, dtype=torch.uint8))  # (2 * mid) / 2
    assert nib[-1] == 7  # odd count padded with code 7
    deq = ours.dequantize()[0]
    assert torch.equal(deq[:64], code[nib[:64].long()])  # absmax 1: +-1 and codes exact
    assert torch.equal(deq[128:192], 2.0 * code[nib[128:192].long()])
    assert torch.equal(deq[256:320], torch.zeros(64)) and torch.equal(deq[-37:], torch.zeros(37))

    # Every block has absmax 1, so absmax - mean(absmax) is an all-zero nested block.
    W = torch.randn(300, 64, generator=g).clamp(-0.9, 0.9)
    W[:, 5] = torch.where(torch.arange(300) % 2 == 0, 1.0, -1.0)
    ours = _assert_same_as_bnb(W, 64, True)
    assert torch.equal(ours.nested_absmax, torch.zeros(2))
    assert torch.equal(ours.dequantize()[:, 5], W[:, 5])


@needs_bnb
def test_nf4_scale_rounding():
    """bnb scales full blocks by ``x * (1 / absmax)`` but the partial tail block by
    ``x / absmax``; values whose code depends on that one rounding must match in both."""
    code = torch.tensor(NF4_CODE)
    mid = (code[:-1] + code[1:]) / 2  # fp32, as bnb
    am = torch.tensor(3.0)
    near = (mid.double() * 3.0).float().view(torch.int32)
    x = torch.cat([(near + d).view(torch.float32) for d in range(-4, 5)])
    x = x[torch.bucketize(x / am, mid) != torch.bucketize(x * (1.0 / am), mid)]
    assert x.numel() >= 4  # there are such values
    block = torch.zeros(64)
    block[0], block[1 : 1 + x.numel()] = am, x
    W = torch.cat([block, am.view(1), x]).view(1, -1)  # full block, then the same as tail
    for dq in (False, True):
        _assert_same_as_bnb(W, 64, dq)
    nib = quantize(W, "nf4", 64, False).packed.view(-1)
    nib = torch.stack([nib >> 4, nib & 15], 1).view(-1)
    assert torch.equal(nib[1 : 1 + x.numel()].long(), torch.bucketize(x * (1.0 / am), mid))
    assert torch.equal(nib[65 : 65 + x.numel()].long(), torch.bucketize(x / am, mid))


@needs_bnb
def test_dynamic_map_matches_bnb():
    assert torch.equal(dynamic_map_signed(), F.create_dynamic_map(signed=True))


@needs_bnb
def test_blockwise_8bit_vs_bnb():
    """The nested-stat quantizer reproduces bnb's CPU LUT kernel, including values sitting on
    the LUT's bin edges, where it differs from an exact nearest-code search."""
    code = dynamic_map_signed()
    k = torch.arange(65535, dtype=torch.float64)
    edge = ((k + 0.5) / 65535 * 2 - 1).float()
    cands = torch.cat([edge, torch.nextafter(edge, torch.tensor(2.0)), torch.nextafter(edge, torch.tensor(-2.0))])
    pad = torch.zeros(-(-cands.numel() // 255) * 255)
    pad[: cands.numel()] = cands
    blocks = torch.cat([torch.ones(pad.numel() // 255, 1), pad.view(-1, 255)], 1)  # absmax 1
    g = torch.Generator().manual_seed(2)
    for x in (blocks.view(-1), torch.randn(100_003, generator=g) * 0.01, torch.zeros(300)):
        q, absmax = quantize_blockwise_8bit(x, code, 256)
        ref_q, st = F.quantize_blockwise(x, code=code.clone(), blocksize=256)
        assert torch.equal(q, ref_q.view(-1)) and torch.equal(absmax, st.absmax)
        ref = F.dequantize_blockwise(ref_q, st)
        assert torch.equal(dequantize_blockwise_8bit(q, absmax, code, 256), ref)


def test_nf4_storage_bytes():
    W = _weight((512, 4096), torch.bfloat16)
    w = quantize(W)
    n, blocks = W.numel(), W.numel() // 64
    tables = 4 * (16 + 256)  # the two code tables, a fixed cost per weight
    assert w.nbytes == n // 2 + blocks + 4 * -(-blocks // 256) + 4 + tables
    bits = 8 * (w.nbytes - tables) / n
    assert abs(bits - 4.127) < 0.001, bits  # 4 + 8/64 + 32/(64*256)
    assert abs(16 / bits - 3.88) < 0.01  # vs bf16
    assert w.nbytes == sum(t.numel() * t.element_size() for t in _tensors(w))
    plain = quantize(W, double_quant=False)
    assert plain.nbytes == n // 2 + 4 * blocks + 4 * 16


def _tensors(obj):
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


def test_nf4_object_holds_no_dequantized_copy():
    W = _weight((96, 200), torch.float32)
    w = quantize(W)
    w.dequantize()
    assert all(not isinstance(t, torch.nn.Parameter) for t in _tensors(w))
    assert max(t.numel() for t in _tensors(w)) == W.numel() // 2
    moved = w.to("cpu")
    assert isinstance(moved, NF4Weight) and moved.device == torch.device("cpu")
    assert torch.equal(moved.dequantize(), w.dequantize())
    i8 = quantize(W, "int8")
    assert isinstance(i8, Int8Weight) and i8.to("cpu").shape == W.shape
    assert {t.dtype for t in _tensors(i8)} == {torch.int8, torch.float32}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_parameter_records_no_autograd(kind):
    lin = torch.nn.Linear(70, 12)
    w = quantize(lin.weight, kind)
    assert all(not t.requires_grad for t in _tensors(w))
    assert not w.dequantize().requires_grad
    assert torch.equal(w.dequantize(), quantize(lin.weight.detach(), kind).dequantize())


# ---- bitsandbytes state dicts ---------------------------------------------------------------


def _bnb_linear4bit(W, blocksize, double_quant):
    lin = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=True, compress_statistics=double_quant, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(
        W, requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
        quant_type="nf4", module=lin,
    )  # fmt: skip
    return torch.nn.Sequential(torch.nn.Identity(), lin.to("cpu"))  # quantizes; keys "1.*"


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
def test_state_dict_from_bnb(dtype, double_quant):
    W = _weight((48, 130), dtype, seed=5)
    model = _bnb_linear4bit(W, 64, double_quant)
    sd, lin = model.state_dict(), model[1]
    w = NF4Weight.from_state_dict(sd, prefix="1.")
    assert w.shape == W.shape and w.dtype == dtype and w.blocksize == 64
    ref = _bnb_dequant(lin.weight.data, lin.weight.quant_state, dtype)
    assert torch.equal(w.dequantize(), ref)
    # Same bytes as quantizing here, key for key (including the JSON quant_state blob).
    ours = quantize(W, "nf4", 64, double_quant).state_dict_entries("1.")
    theirs = {k: v for k, v in sd.items() if k != "1.bias"}
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_state_dict_into_bnb(double_quant):
    """Our entries load into a fresh bnb Linear4bit. bnb's Linear4bit has no
    _load_from_state_dict (bitsandbytes issue #1946), so load_state_dict cannot restore a
    quant state on any device; the prequantized path bnb and transformers use is
    Params4bit.from_prequantized, which parses the same entries with QuantState.from_dict."""
    W = _weight((40, 96), torch.bfloat16, seed=6)
    w = quantize(W, "nf4", 128, double_quant)
    entries = w.state_dict_entries("model.proj.")
    stats = {k[len("model.proj.weight.") :]: v for k, v in entries.items() if ".weight." in k}
    lin = bnb.nn.Linear4bit(96, 40, bias=False, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit.from_prequantized(
        data=entries["model.proj.weight"], quantized_stats=stats, device="cpu", module=lin
    )
    st = lin.weight.quant_state
    assert st.shape == W.shape and st.dtype == torch.bfloat16 and st.blocksize == 128
    assert torch.equal(_bnb_dequant(lin.weight.data, st, torch.bfloat16), w.dequantize())
    resaved = lin.state_dict(prefix="model.proj.")
    assert list(resaved) == list(entries)
    assert all(torch.equal(resaved[k], entries[k]) for k in entries)


def test_state_dict_safetensors_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    a, b = quantize(_weight((16, 64), torch.float16, 7)), quantize(_weight((8, 33), torch.float32))
    sd = {**a.state_dict_entries("a."), **b.state_dict_entries("b.")}
    safetensors.save_file(sd, tmp_path / "w.safetensors")  # refuses shared tensors
    loaded = safetensors.load_file(tmp_path / "w.safetensors")
    for prefix, w in (("a.", a), ("b.", b)):
        assert torch.equal(NF4Weight.from_state_dict(loaded, prefix).dequantize(), w.dequantize())


def _corrupt(sd, key, value=None):
    sd = dict(sd)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    return sd


def _blob(meta):
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def test_state_dict_errors():
    sd = quantize(_weight((10, 70), torch.float32)).state_dict_entries()
    qs = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[qs].tolist()))
    cases = {
        "missing 'weight'": _corrupt(sd, "weight"),
        "missing entries \\['absmax'\\]": _corrupt(sd, "weight.absmax"),
        "nested_quant_map": _corrupt(sd, "weight.nested_quant_map"),
        "exactly one packed quant state": _corrupt(sd, qs),
        "weight.absmax: expected torch.uint8": _corrupt(sd, "weight.absmax", sd["weight.absmax"].float()),
        "weight: expected torch.uint8 \\(350, 1\\)": _corrupt(sd, "weight", sd["weight"][:-1]),
        "nested_absmax: expected": _corrupt(sd, "weight.nested_absmax", torch.zeros(2)),
        "not the NF4 table": _corrupt(sd, "weight.quant_map", torch.zeros(16)),
        "not valid JSON": _corrupt(sd, qs, sd[qs][:-3]),
        "quant_type 'fp4'": _corrupt(sd, qs, _blob({**meta, "quant_type": "fp4"})),
        "blocksize 48": _corrupt(sd, qs, _blob({**meta, "blocksize": 48})),
        "dtype 'int8'": _corrupt(sd, qs, _blob({**meta, "dtype": "int8"})),
        "2-D": _corrupt(sd, qs, _blob({**meta, "shape": [700]})),
        "quant_state keys": _corrupt(sd, qs, _blob({k: v for k, v in meta.items() if k != "shape"})),
        "expected torch.uint8 \\(355, 1\\)": _corrupt(sd, qs, _blob({**meta, "shape": [10, 71]})),
        "unexpected \\['bogus'\\]": _corrupt(sd, "weight.bogus", torch.zeros(1)),
    }
    for msg, bad in cases.items():
        with pytest.raises(ValueError, match=msg):
            NF4Weight.from_state_dict(bad)
    fp4 = {k.replace("__nf4", "__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="only nf4"):
        NF4Weight.from_state_dict(fp4)
    with pytest.raises(ValueError, match="missing 'layer.weight'"):
        NF4Weight.from_state_dict(sd, prefix="layer.")


# ---- int8 -----------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", [(7, 13), (64, 256), (1, 1), (130, 33)], ids=str)
def test_int8_bit_exact_vs_bnb(shape, dtype):
    W = _weight(shape, dtype, seed=shape[1])
    W[0, -1] = W[0].abs().max() * -1.0  # an exact -absmax element
    w = quantize(W, "int8")
    cb, scb, _ = F.int8_vectorwise_quant(W.clone())
    assert torch.equal(w.CB, cb) and torch.equal(w.SCB, scb)
    assert w.CB.dtype == torch.int8 and w.SCB.dtype == torch.float32 and w.shape == W.shape
    assert w.CB[0, -1] == -127
    ref = F.int8_vectorwise_dequant(cb, scb)
    assert torch.equal(w.dequantize(torch.float32), ref)
    assert torch.equal(w.dequantize(), ref.to(dtype)) and w.dequantize().dtype == dtype
    assert w.nbytes == W.numel() + 4 * W.shape[0]
    err = (w.dequantize(torch.float32) - W.float()).abs()
    assert (err <= scb.view(-1, 1) / 254 * 1.001 + 1e-30).all()  # half a step per row


@needs_bnb
def test_int8_zero_rows():
    W = _weight((6, 40), torch.float32)
    W[2] = 0
    W[5] = -0.0
    w = quantize(W, "int8")
    deq = w.dequantize()
    assert torch.isfinite(deq).all() and (w.CB[[2, 5]] == 0).all() and (deq[[2, 5]] == 0).all()
    assert torch.equal(w.SCB[[2, 5]], torch.zeros(2))
    cb, scb, _ = F.int8_vectorwise_quant(W.clone())
    assert torch.equal(w.CB[[0, 1, 3, 4]], cb[[0, 1, 3, 4]]) and torch.equal(w.SCB, scb)


@needs_bnb
def test_int8_state_dict_round_trip():
    lin = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False)
    lin = torch.nn.Sequential(lin).to("cpu")  # quantizes (from float16, as bnb does)
    sd = lin.state_dict()
    w = Int8Weight.from_state_dict(sd, "0.")
    assert torch.equal(w.CB, sd["0.weight"]) and torch.equal(w.SCB, sd["0.SCB"])
    assert w.dtype == torch.float16
    ours = quantize(_weight((24, 40), torch.float16, seed=3), "int8")
    entries = ours.state_dict_entries("0.")
    assert {k: (v.dtype, v.shape) for k, v in entries.items()} == {
        k: (v.dtype, v.shape) for k, v in sd.items() if k != "0.bias"
    }
    lin.load_state_dict({**entries, "0.bias": torch.zeros(24)})  # strict
    assert torch.equal(lin[0].weight.data, ours.CB) and torch.equal(lin[0].weight.SCB, ours.SCB)
    back = Int8Weight.from_state_dict(lin.state_dict(), "0.", dtype=torch.float16)
    assert torch.equal(back.dequantize(), ours.dequantize())
    with pytest.raises(ValueError, match="SCB"):
        Int8Weight.from_state_dict(_corrupt(entries, "0.SCB"), "0.")
    with pytest.raises(ValueError, match="int8"):
        Int8Weight.from_state_dict(_corrupt(entries, "0.weight", ours.CB.float()), "0.")
    with pytest.raises(ValueError, match=r"float32 \(24,\)"):
        Int8Weight.from_state_dict(_corrupt(entries, "0.SCB", ours.SCB[:-1]), "0.")
    with pytest.raises(ValueError, match="row-major"):
        Int8Weight.from_state_dict(_corrupt(entries, "0.weight_format", torch.tensor(2)), "0.")


# ---- bad inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bad_inputs(kind):
    with pytest.raises(ValueError, match=r"2-D.*\(64,\)"):
        quantize(torch.randn(64), kind)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        quantize(torch.randn(2, 3, 4), kind)
    with pytest.raises(ValueError, match=r"\(0, 8\)"):
        quantize(torch.randn(0, 8), kind)
    with pytest.raises(TypeError, match=r"torch.int32.*\(4, 4\)"):
        quantize(torch.ones(4, 4, dtype=torch.int32), kind)
    with pytest.raises(TypeError, match="float64"):
        quantize(torch.randn(4, 4, dtype=torch.float64), kind)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([[1.0, 2.0]], kind)
    for bad in (float("nan"), float("inf")):
        W = torch.randn(4, 70)
        W[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize(W, kind)


def test_bad_blocksize_and_kind():
    for bs in (0, 16, 100, 8192):
        with pytest.raises(ValueError, match=r"\(32, 64, 128, 256, 512, 1024, 2048, 4096\)"):
            quantize(torch.randn(4, 64), "nf4", blocksize=bs)
    with pytest.raises(ValueError, match="'fp4'"):
        quantize(torch.randn(4, 64), "fp4")
