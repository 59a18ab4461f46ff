"""The seeded dropout generator (fastlora/_philox.py): Philox KATs, the C++ ops against the
pure-PyTorch path bit for bit, and the statistics of the mask."""

import math
import os

import pytest
import torch

from fastlora import _ext, _philox

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
U32 = 0xFFFFFFFF
# Logical row offsets; the last puts the element offsets (and counter high words) past 2**32.
ROW_OFFSETS = [0, 7, 2**33 + 3]


@pytest.fixture
def ext():
    """The C++ extension must be built (CI builds it) unless FASTLORA_NO_EXT says otherwise."""
    if os.environ.get("FASTLORA_NO_EXT", "0") not in ("", "0"):
        pytest.importorskip("fastlora._C")
    assert _ext.available(), _ext.unavailable_reason()


@pytest.fixture(params=[True, False], ids=["python", "ext"])
def force_python(request):
    """Both paths: the pure-PyTorch one and the C++ op."""
    if not request.param:
        request.getfixturevalue("ext")
    return request.param


def _word(e: int, seed: int) -> int:
    """The spec, one element at a time."""
    c = torch.tensor([e >> 2])
    z = torch.zeros_like(c)
    words = _philox.philox4x32(c & U32, c >> 32, z, z, seed & U32, seed >> 32)
    return int(words[e & 3])


@pytest.mark.parametrize(
    "ctr, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((U32,) * 4, (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    out = _philox.philox4x32(*(torch.tensor([c]) for c in ctr), *key)
    assert tuple(int(w) for w in out) == expected


def test_threshold():
    assert _philox.threshold(0.0) == 0
    assert _philox.threshold(0.5) == 2**31
    assert _philox.threshold(0.1) == 429496729
    assert _philox.threshold(math.nextafter(1.0, 0.0)) == 2**32 - 1


def test_mask_layout_matches_spec(force_python):
    M, K, p, seed, row_offset = 5, 7, 0.5, 2**40 + 11, 2**33
    mask = _philox.keep_mask(M, K, p, seed, row_offset=row_offset, force_python=force_python)
    t = _philox.threshold(p)
    for m, k in [(0, 0), (0, 6), (1, 2), (3, 5), (4, 6)]:
        assert bool(mask[m, k]) == (_word((row_offset + m) * K + k, seed) >= t)


@pytest.mark.parametrize("M", [1, 3, 37])
@pytest.mark.parametrize("K", [1, 5, 130])
@pytest.mark.parametrize("row_offset", ROW_OFFSETS)
def test_mask_ext_matches_python(ext, M, K, row_offset):
    for p, seed in [(0.1, 0), (0.5, 2**62 + 12345)]:
        a = _philox.keep_mask(M, K, p, seed, row_offset=row_offset)
        b = _philox.keep_mask(M, K, p, seed, row_offset=row_offset, force_python=True)
        assert a.dtype == torch.bool and a.shape == (M, K)
        assert torch.equal(a, b)


def test_row_offset_is_a_row_slice(force_python):
    full = _philox.keep_mask(40, 13, 0.3, 9, force_python=force_python)
    part = _philox.keep_mask(29, 13, 0.3, 9, row_offset=11, force_python=force_python)
    assert torch.equal(full[11:], part)


def test_multithreaded_ext_matches_python(ext):
    # Several parallel_for chunks and a counter group split at the first element.
    x = torch.randn(257, 1031)
    a = _philox.dropout(x, 0.25, 77, row_offset=3)
    b = _philox.dropout(x, 0.25, 77, row_offset=3, force_python=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 130)], ids=str)
@pytest.mark.parametrize("row_offset", ROW_OFFSETS)
def test_dropout_ext_matches_python(ext, dtype, shape, row_offset):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    a = _philox.dropout(x, 0.3, 5, row_offset=row_offset)
    b = _philox.dropout(x, 0.3, 5, row_offset=row_offset, force_python=True)
    assert a.dtype == dtype and a.is_contiguous()
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_values(force_python, dtype, p):
    x = torch.randn(37, 130, dtype=torch.float64).to(dtype)
    keep = _philox.keep_mask(37, 130, p, 3, force_python=force_python)
    out = _philox.dropout(x, p, 3, force_python=force_python)
    # The oracle's formula (fastlora/reference.py): torch multiplies by the python scalar in
    # fp32 for half types, like the spec.
    assert torch.equal(out, x * keep.to(dtype) * (1.0 / (1.0 - p)))
    assert torch.equal(out == 0, ~keep)


def test_dropped_nonfinite_are_zero(force_python):
    # where(), not a multiply by the mask: dropped inf/nan become +0.
    x = torch.tensor([[float("inf"), float("nan"), -float("inf"), -1.0]]).repeat(16, 4)
    keep = _philox.keep_mask(16, 16, 0.5, 1, force_python=force_python)
    out = _philox.dropout(x, 0.5, 1, force_python=force_python)
    assert torch.equal(out[~keep].view(torch.int32), torch.zeros(int((~keep).sum()), dtype=torch.int32))
    torch.testing.assert_close(out[keep], (2 * x)[keep], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_strided_input(force_python, dtype):
    base = torch.randn(130, 74, dtype=torch.float64).to(dtype)
    x = base.t()[:, ::2]  # (37, 130), neither row- nor column-contiguous
    out = _philox.dropout(x, 0.4, 8, force_python=force_python)
    assert out.is_contiguous()
    assert torch.equal(out, _philox.dropout(x.contiguous(), 0.4, 8, force_python=force_python))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_inplace_equals_dropout(force_python, dtype):
    x = torch.randn(37, 130, dtype=torch.float64).to(dtype)
    expected = _philox.dropout(x, 0.2, 4, row_offset=5, force_python=force_python)
    y = x.clone()
    assert _philox.dropout_(y, 0.2, 4, row_offset=5, force_python=force_python) is y
    assert torch.equal(y, expected)


def test_p_zero_is_identity(force_python):
    x = torch.randn(7, 9)
    assert bool(_philox.keep_mask(7, 9, 0.0, 1, force_python=force_python).all())
    assert torch.equal(_philox.dropout(x, 0.0, 1, force_python=force_python), x)
    y = x.clone()
    _philox.dropout_(y, 0.0, 1, force_python=force_python)
    assert torch.equal(y, x)


def test_p_zero_ops_are_identity(ext):
    x = torch.randn(7, 9)
    assert bool(torch.ops.fastlora.dropout_mask(7, 9, 0.0, 1).all())
    out = torch.ops.fastlora.dropout(x, 0.0, 1)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    y = x.clone()
    torch.ops.fastlora.dropout_(y, 0.0, 1)
    assert torch.equal(y, x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_six_sigma(p):
    n = 512 * 1024
    kept = int(_philox.keep_mask(512, 1024, p, 2024).sum())
    q = 1.0 - p
    assert abs(kept - n * q) <= 6 * math.sqrt(n * p * q)


def test_seeds(force_python):
    def mask(seed):
        return _philox.keep_mask(64, 64, 0.5, seed, force_python=force_python)

    assert torch.equal(mask(11), mask(11))
    assert not torch.equal(mask(11), mask(12))
    assert not torch.equal(mask(11), mask(11 + 2**32))  # the key's high word matters
    m = mask(11)
    assert torch.unique(m, dim=0).shape[0] == 64
    assert torch.unique(m, dim=1).shape[1] == 64


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(p=1.0), ValueError),
        (dict(p=-0.1), ValueError),
        (dict(p=float("nan")), ValueError),
        (dict(seed=-1), ValueError),
        (dict(seed=2**63), ValueError),
        (dict(row_offset=-1), ValueError),
        (dict(x=torch.randn(2, 3, 4)), ValueError),
        (dict(x=torch.randn(5)), ValueError),
        (dict(x=torch.ones(3, 4, dtype=torch.int32)), TypeError),
    ],
    ids=["p1", "pneg", "pnan", "seedneg", "seedbig", "rowneg", "3d", "1d", "int"],
)
def test_bad_input(kwargs, error):
    # The wrappers validate before choosing a path, so one path covers both.
    args = dict(x=torch.randn(3, 4), p=0.5, seed=1) | kwargs
    with pytest.raises(error):
        _philox.dropout(args.pop("x"), **args)


def test_inplace_needs_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        _philox.dropout_(torch.randn(4, 3).t(), 0.5, 1)


def test_bad_input_ops(ext):
    ops = torch.ops.fastlora
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.dropout(torch.randn(2, 3, 4), 0.5, 1)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        ops.dropout(x, 1.0, 1)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        ops.dropout_mask(3, 4, float("nan"), 1)
    with pytest.raises(RuntimeError, match="seed"):
        ops.dropout_(x, 0.5, -1)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        ops.dropout(x.to(torch.int32), 0.5, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.dropout_(x.t(), 0.5, 1)
    with pytest.raises(RuntimeError, match="overflow"):
        ops.dropout_mask(3, 4, 0.5, 1, 2**62)


def test_opcheck(ext):
    x = torch.randn(37, 130)
    torch.library.opcheck(torch.ops.fastlora.dropout_mask.default, (37, 130, 0.5, 3))
    torch.library.opcheck(torch.ops.fastlora.dropout.default, (x.t(), 0.5, 3, 2))
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.fastlora.dropout_.default, (x.to(dtype), 0.5, 3))


def test_triton_randint4x_is_the_same_philox():
    """The Triton kernels may use ``tl.randint4x(seed, e >> 2)`` with an int64 offset."""
    triton = pytest.importorskip("triton")
    tl = triton.language
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 (conftest)

    @triton.jit
    def words_kernel(out_ptr, off_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        r0, r1, r2, r3 = tl.randint4x(seed, tl.load(off_ptr + i))
        tl.store(out_ptr + 4 * i, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    for seed in (0, 2**32 + 7, 2**63 - 1):
        for base in (0, 2**32 - 8, 2**40 + 3):
            c = torch.arange(base, base + 16, dtype=torch.int64, device=device)
            out = torch.empty(64, dtype=torch.int64, device=device)
            words_kernel[(1,)](out, c, seed, N=16)
            z = torch.zeros_like(c)
            expected = torch.stack(_philox.philox4x32(c & U32, c >> 32, z, z, seed & U32, seed >> 32), 1)
            assert torch.equal(out, expected.view(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_python_path_on_cuda_matches_cpu():
    x = torch.randn(37, 130)
    a = _philox.dropout(x.cuda(), 0.3, 2**45 + 1, row_offset=2**30)
    assert torch.equal(a.cpu(), _philox.dropout(x, 0.3, 2**45 + 1, row_offset=2**30))
