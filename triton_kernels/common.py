"""Shared pieces of the LoRA kernels: the dot wrapper, host-side argument packing, tuning
configs and the output allocator."""

import functools
import os

import torch
import triton
import triton.language as tl

# Read once, like triton itself does: the variable must be set before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# as jit code reads it (module globals reach jit code only as constexprs)
_INTERPRETED = tl.constexpr(INTERPRET)

# Test hook: when True every buffer a launcher allocates starts as NaN (or True for masks), so
# a kernel that skips a tile leaves a visible hole instead of stale memory.
POISON = False


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output or partial-sum buffer; uninitialised, or poisoned under ``POISON``."""
    if POISON:
        return torch.full(shape, True if dtype == torch.bool else float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(t: torch.Tensor) -> None:
    """The kernels keep fp32 accumulators, which tl.dot on float64 operands does not accept
    (the ``torch`` and ``reference`` backends cover float64)."""
    if t.dtype not in DTYPES:
        raise TypeError(f"fastlora triton kernels support float32, float16 and bfloat16, got {t.dtype}")


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32. IEEE: full fp32 products for fp32 inputs (matching
    torch's default matmul precision) instead of TF32.

    The interpreter multiplies the raw uint16 bit patterns of bf16 operands (triton issue
    11584), so when interpreting bf16 operands are widened to fp32 first; compiled kernels keep
    the bf16/fp16 tensor-core path. This is the only place the kernels' dots differ between the
    interpreter and the GPU (docs/DESIGN.md section 4).
    """
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype``, as torch's casts round. The interpreter
    truncates fp32 -> bf16 casts (it drops the rounding mode), so there the bf16 bits are made
    directly; compiled casts round to nearest even already. (Finite x: the values are weights.)"""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


def dot_flags(dtype: torch.dtype) -> dict:
    """The constexpr of :func:`mma` for operands of ``dtype``: IEEE fp32 unless torch allows TF32."""
    return {"IEEE": dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32}


# The compiled kernels may contract ``a * b + c`` into one FMA (one rounding instead of the two
# that fastlora.quant's host code makes); add_rounded keeps an add apart. The interpreter (numpy)
# never contracts, and runs no inline PTX; nor does ROCm's backend run NVIDIA's.
_EXACT_ADD = tl.constexpr(not INTERPRET and torch.version.hip is None)


@triton.jit
def add_rounded(a, b):
    """``a + b`` rounded on its own, never fused with the product that made ``a``: PTX
    ``add.rn.f32``, which ptxas does not contract, and without the flush-to-zero that triton
    compiles libdevice's ``add_rn`` with (``add.rn.ftz.f32``). (NF4 double quant's absmax sum.)"""
    if _EXACT_ADD:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    return a + b


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as a constexpr for autotune keys of kernels that take their tensors in tuples:
    triton adds the dtype of each tensor argument to the key, but a tuple carries none, and
    bf16, fp16 and fp32 tiles are tuned and pruned differently."""
    return str(dtype).removeprefix("torch.")


def operand(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A 2-D tensor as the GEMM kernels take it: (tensor, stride 0, stride 1)."""
    return t, t.stride(0), t.stride(1)


def int32_safe(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a contiguous copy of it when a column index times its last-dim stride could
    pass 2**31: the kernels form those offsets in int32 (row offsets are int64). Only a
    non-unit last-dim stride over a tensor that large (a transposed view of >= 2**31 elements)
    pays the copy."""
    if t is not None and t.dim() == 2 and t.stride(1) != 1 and (t.shape[1] - 1) * abs(t.stride(1)) >= 2**31:
        return t.contiguous()
    return t


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum over dim 0 of fp32 partials (S, ...) in ``dtype``; with S == 1 no reduction
    kernel runs (small M: every launch counts on the host)."""
    out = part[0] if part.shape[0] == 1 else part.sum(0)
    return out.to(dtype)


def rank_pad(r: int) -> int:
    """The rank padded to a power of two of at least 16, the smallest tl.dot dimension;
    A, B, z and dz are never copied into padded buffers, loads mask the padding."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(M: int) -> int:
    """Autotune key for the token count: batches of varying length share a tuning."""
    return min(triton.next_power_of_2(max(M, 1)), 8192)


def as_int32_bits(v: int) -> int:
    """A uint32 passed as the int32 with the same bits, so its triton type is always i32 (an
    unsigned value >= 2**31 would otherwise compile a second u32 variant)."""
    return v - (1 << 32) if v >= (1 << 31) else v


def dropout_args(p: float, seed: int) -> dict:
    """Kernel arguments of the seeded dropout (bit-exact definition: fastlora/_philox.py).

    The Philox key is (seed & 0xFFFFFFFF, seed >> 32); kept iff word >= int(p * 2**32); the
    kept value is scaled by 1 / (1 - p), computed in double here and applied in fp32.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be in [0, 2**63), got {seed}")
    return {
        "seed_lo": as_int32_bits(seed & 0xFFFFFFFF),
        "seed_hi": as_int32_bits(seed >> 32),
        "thresh": as_int32_bits(int(p * 2**32)),
        "keep_scale": 1.0 / (1.0 - p),
        "HAS_DROPOUT": p > 0.0,
    }


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant when interpreting), used to
    size split reductions so that the grid fills the GPU."""
    if device.type != "cuda" or INTERPRET:
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def max_shared_memory() -> int | None:
    """Bytes of shared memory one block may use on the current device, the bound triton checks
    at launch (None when interpreting: there is no limit)."""
    if INTERPRET:
        return None
    active = triton.runtime.driver.active
    return _device_shared_memory(active, active.get_current_device())


@functools.cache
def _device_shared_memory(active, device: int) -> int:
    return active.utils.get_device_properties(device)["max_shared_mem"]


def configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The autotune space: one small config under the interpreter, the GPU list otherwise.
    Tuning there is slow and meaningless, and small tiles are the point: the tests' shapes of
    tens of rows then cross several tiles, partial last tiles and multi-program reductions,
    which GPU-sized tiles would hide (the GPU configs are compiled for sm_90 by
    tests/sm90_aot.py, and FASTLORA_TRITON_PIN runs the compiled tests on the first of them;
    docs/DESIGN.md section 4)."""
    return [interpret] if INTERPRET else gpu


# FASTLORA_TRITON_PIN=1: every kernel runs one config (the first that survives its pruning), so
# nothing is timed and each kernel compiles once per specialisation (the compiled test runs).
PIN_ENV = "FASTLORA_TRITON_PIN"


def pinned() -> bool:
    return os.environ.get(PIN_ENV, "0") not in ("", "0")


def _pin(prune):
    def prune_then_pin(configs_, named_args, **kwargs):
        kept = prune(configs_, named_args, **kwargs) if prune is not None else configs_
        return kept[:1] if pinned() else kept

    return prune_then_pin


def autotune(
    gpu: list[triton.Config], interpret: triton.Config, key: list[str], prune=None, restore: list[str] | None = None
):
    """``triton.autotune`` as every fastlora kernel uses it: the space of :func:`configs`, at
    most 4 configs (GEMMs) or 3 (side kernels) so that the first call at a new shape tunes in
    seconds, ``prune`` then the pin (:data:`PIN_ENV`), and the timings kept on disk by triton
    (``cache_results``: a new process at a known shape does not tune again). ``key`` holds only
    the arguments that change which config is fastest. ``restore``: the pointer arguments a
    kernel reads and writes (``out += ...``): the autotuner restores them after each timed run,
    or the call that tunes would add its result once per run."""
    if len(gpu) > 4:
        raise ValueError(f"at most 4 autotune configs per kernel, got {len(gpu)}")
    return triton.autotune(
        configs=configs(gpu, interpret),
        key=key,
        prune_configs_by={"early_config_prune": _pin(prune)},
        restore_value=restore,
        cache_results=not INTERPRET,
    )


def cfg(num_warps: int = 4, num_stages: int = 3, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)
