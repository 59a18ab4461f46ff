"""The seeded dropout generator: one bit-exact definition shared by every backend.

Long module: the definition below and every entry point that must reproduce its bits (the
pure-PyTorch generator, the dispatch to the C++ and Triton kernels, the fused masked products
and their compile-time wrappers) stay in one file, so that a change of the spec is one diff.

The mask is never stored; forward and backward regenerate it from the seed, so the C++ ops
(``csrc/philox_dropout.cpp``), the Triton kernels and the pure-PyTorch path below must
produce the same bits:

- The input is viewed as logical (M, K) row-major; element offset ``e = m*K + k`` (int64,
  independent of memory strides). With ``row_offset``, the tensor's row 0 is logical row
  ``row_offset``, i.e. ``e = (row_offset + m)*K + k``.
- Philox4x32-10 (Random123), key ``k0 = seed & 0xFFFFFFFF``, ``k1 = (seed >> 32) & 0xFFFFFFFF``;
  counter ``c = e >> 2`` as ``(c0 = low 32 bits, c1 = high 32 bits, c2 = 0, c3 = 0)``.
  Round: ``hi0, lo0 = mulhilo32(0xD2511F53, c0)``; ``hi1, lo1 = mulhilo32(0xCD9E8D57, c2)``;
  ``(c0, c1, c2, c3) = (hi1^c1^k0, lo1, hi0^c3^k1, lo0)``; then ``k0 += 0x9E3779B9``,
  ``k1 += 0xBB67AE85`` (mod 2^32). 10 rounds. Output word ``e & 3`` of the 4 outputs is the
  element's uint32 ``r``. (Triton: ``tl.randint4x(seed, e >> 2)`` with an int64 offset.)
- Threshold ``t = int(p * 2**32)`` (exact for p in [0, 1)); kept iff ``r >= t``, so p == 0
  keeps everything.
- ``dropout(x) = where(keep, x * (1/(1-p)), 0)``: the factor ``1/(1-p)`` is computed in double,
  rounded to the compute dtype (fp32 for float16/bfloat16/float32, fp64 for float64) and
  multiplied in it; the product is rounded to x's dtype. Dropped elements are +0.
- ``seed`` is a python int in [0, 2**63).

Each function runs the C++ op when the extension is available and the tensor is on the CPU, the
Triton kernel (``fastlora.triton_kernels``) for CUDA tensors when triton imports, else the
pure-PyTorch path (any device); ``force_python=True`` selects the latter.
"""

from __future__ import annotations

import struct
import warnings

import torch
from torch import Tensor

from fastlora import _ext

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def threshold(p: float) -> int:
    """Elements whose Philox word is ``>= threshold(p)`` are kept."""
    return int(p * 2**32)


def philox4x32(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int | Tensor, k1: int | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (any device).

    The 32x32-bit products wrap in int64, which keeps their low 64 bits exact: the masks
    below recover both halves.
    """
    for _ in range(10):
        p0, p1 = c0 * _M0, c2 * _M1
        c0, c1, c2, c3 = ((p1 >> 32) & _U32) ^ c1 ^ k0, p1 & _U32, ((p0 >> 32) & _U32) ^ c3 ^ k1, p0 & _U32
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return c0, c1, c2, c3


def _check(p: float, seed: int, row_offset: int) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"fastlora dropout: p must be in [0, 1), got {p}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"fastlora dropout: seed must be in [0, 2**63), got {seed}")
    if row_offset < 0:
        raise ValueError(f"fastlora dropout: row_offset must be >= 0, got {row_offset}")


def _check_x(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"fastlora dropout: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"fastlora dropout: x must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _use_ext(device: torch.device, force_python: bool) -> bool:
    if force_python or device.type != "cpu":
        return False
    if not _ext.available():
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(
                f"fastlora: {_ext.unavailable_reason()}; using the pure-PyTorch dropout generator (same bits, "
                "slower). Reinstall with a C++ compiler present to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


_warned = False


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_kernels():
    """fastlora.triton_kernels when the mask runs there: for CUDA tensors whenever triton imports
    (the ~130 int64 ATen ops of the pure-PyTorch generator took ~7 ms a mask on an H200)."""
    from .backends import load

    mod = load("triton")
    return None if mod is None else mod.tk


_TRITON_BROKEN: set[torch.device] = set()


def _on_triton(device: torch.device, force_python: bool) -> bool:
    return device.type == "cuda" and not force_python and device not in _TRITON_BROKEN and _triton_kernels() is not None


def _triton_or_none(fn, device: torch.device, *args, **kwargs):
    """``fn(...)`` from the Triton kernels, or None (with one warning) when they fail to compile
    or launch on ``device``: the masks then come from the pure-PyTorch generator there, so the
    ``torch`` backend stays a working fallback."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        _TRITON_BROKEN.add(device)
        warnings.warn(
            f"fastlora: the Triton dropout kernels failed on {device} ({type(exc).__name__}: {exc}); "
            "using the pure-PyTorch generator (same bits, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _keep_mask_torch(M: int, K: int, p: float, seed: int, row_offset: int, device: torch.device) -> Tensor:
    e0, n = row_offset * K, M * K
    c = torch.arange(e0 >> 2, (e0 + n + 3) >> 2, dtype=torch.int64, device=device)
    zero = torch.zeros_like(c)
    words = philox4x32(c & _U32, c >> 32, zero, zero, seed & _U32, seed >> 32)
    # Compare before interleaving: a bool per element instead of an int64.
    t = threshold(p)
    keep = torch.stack([w >= t for w in words], dim=1).view(-1)
    return keep[e0 & 3 : (e0 & 3) + n].view(M, K)


def _dropout_torch(x: Tensor, p: float, seed: int, row_offset: int) -> Tensor:
    keep = _keep_mask_torch(x.shape[0], x.shape[1], p, seed, row_offset, x.device)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = 1.0 / (1.0 - p)
    if cdt == torch.float32:
        # Round the factor to fp32 first: the product is then the same whether torch multiplies
        # a python scalar in fp32 or in fp64.
        scale = struct.unpack("f", struct.pack("f", scale))[0]
    return torch.where(keep, (x.to(cdt) * scale).to(x.dtype), 0).contiguous()


def keep_mask(
    M: int,
    K: int,
    p: float,
    seed: int,
    device: torch.device | str = "cpu",
    *,
    row_offset: int = 0,
    force_python: bool = False,
) -> Tensor:
    """The keep-mask (True = kept), bool (M, K) on ``device``, of logical rows
    ``row_offset .. row_offset + M - 1``."""
    _check(p, seed, row_offset)
    if M < 0 or K < 0:
        raise ValueError(f"fastlora dropout: negative shape ({M}, {K})")
    device = torch.device(device)
    if p == 0.0:
        return torch.ones((M, K), dtype=torch.bool, device=device)
    if _use_ext(device, force_python):
        return torch.ops.fastlora.dropout_mask(M, K, p, seed, row_offset)
    if _on_triton(device, force_python) and row_offset == 0:
        mask = _triton_or_none(_triton_kernels().keep_mask, device, M, K, p, seed, device)
        if mask is not None:
            return mask
    return _keep_mask_torch(M, K, p, seed, row_offset, device)


def dropout(x: Tensor, p: float, seed: int | Tensor, *, row_offset: int = 0, force_python: bool = False) -> Tensor:
    """``where(keep, x * (1/(1-p)), 0)`` for ``x: (M, K)`` (any strides): contiguous, x's dtype.

    With p == 0 it returns ``x.contiguous()``, which is x itself when x is contiguous: callers
    must not mutate the result. ``seed`` may be a 0-d int64 CPU tensor (how torch.compile
    carries a seed drawn inside a graph).
    """
    if isinstance(seed, Tensor):
        return torch.ops.fastlora.dropout_tseed(x, p, seed)
    _check_x(x)
    _check(p, seed, row_offset)
    if p == 0.0:
        return x.contiguous()
    if _use_ext(x.device, force_python):
        return torch.ops.fastlora.dropout(x, p, seed, row_offset)
    if x.dtype in _TRITON_DTYPES and _on_triton(x.device, force_python):
        out = _triton_or_none(_triton_kernels().dropout, x.device, x, p, seed, row_offset=row_offset)
        if out is not None:
            return out
    return _dropout_torch(x, p, seed, row_offset)


def dropout_(x: Tensor, p: float, seed: int | Tensor, *, row_offset: int = 0, force_python: bool = False) -> Tensor:
    """In-place :func:`dropout` of a contiguous ``x: (M, K)``; returns x."""
    if isinstance(seed, Tensor):
        torch.ops.fastlora.dropout_tseed_(x, p, seed)
        return x
    _check_x(x)
    _check(p, seed, row_offset)
    if not x.is_contiguous():
        raise ValueError("fastlora dropout_: x must be contiguous")
    if p == 0.0:
        return x
    if _use_ext(x.device, force_python):
        torch.ops.fastlora.dropout_(x, p, seed, row_offset)
        return x
    if x.dtype in _TRITON_DTYPES and _on_triton(x.device, force_python):
        if _triton_or_none(_triton_kernels().dropout, x.device, x, p, seed, out=x, row_offset=row_offset) is not None:
            return x
    return x.copy_(_dropout_torch(x, p, seed, row_offset))


# Seeds held in tensors. Under torch.compile a seed drawn inside the graph is a tensor, and
# reading it (.item()) would break the graph; these ops read it inside their own body instead.


@torch.library.custom_op("fastlora::dropout_tseed", mutates_args=())
def _dropout_tseed(x: Tensor, p: float, seed: Tensor) -> Tensor:
    out = dropout(x, p, int(seed))
    return out.clone() if out is x else out  # an op's output never aliases its input


@_dropout_tseed.register_fake
def _(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("fastlora::dropout_tseed_", mutates_args=("x",))
def _dropout_tseed_(x: Tensor, p: float, seed: Tensor) -> None:
    dropout_(x, p, int(seed))


@_dropout_tseed_.register_fake
def _(x: Tensor, p: float, seed: Tensor) -> None:
    return None


# --------------------------------------------------------------------------------------------
# Fused LoRA products with dropout (csrc/lora_cpu.cpp): the product is computed per row block
# through a small reused buffer, so dropout(x) (or the masked tail) is never an M x K tensor.
# Same mask bits as dropout(); on other devices, without the extension, or with
# force_python=True each falls back to dropout() and a plain matmul. The same file's
# lora_expand / lora_gpass run the products without dropout (wrappers at the end).

_FUSED_OPS = _ext.available() and hasattr(torch.ops.fastlora, "dropout_shrink")  # a stale build lacks them
_EXPAND_OPS = _FUSED_OPS and hasattr(torch.ops.fastlora, "lora_gpass")
# The ops run hand-written float32 AVX-512 kernels where torch runs its own AVX-512 code
# (csrc/lora_cpu.cpp: cpu_avx512); elsewhere they call at::mm per row block.
_AVX512 = _FUSED_OPS and torch.backends.cpu.get_cpu_capability() == "AVX512"
_KERNEL_MIN_ROWS = 64  # below it the ops' fixed costs (~10-20 us a call) outweigh their gain


def fused_available(device: torch.device) -> bool:
    """True when the fused C++ ops run for tensors on ``device`` (CPU, extension built)."""
    return _FUSED_OPS and device.type == "cpu"


def fused_kernels(x: Tensor) -> bool:
    """True when the fused ops run their own kernels for ``x`` (M, .): float32 on the CPU,
    M >= 64. Then they beat a plain matmul even without dropout (p == 0)."""
    return _AVX512 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] >= _KERNEL_MIN_ROWS


def _use_fused(device: torch.device, force_python: bool) -> bool:
    return _use_ext(device, force_python) and _FUSED_OPS


def _check_operand(t: Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dim() != 2:
        raise ValueError(f"fastlora dropout: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"fastlora dropout: {name} must have dtype {dtype}, got {t.dtype}")


def dropout_shrink(
    x: Tensor, A: Tensor, p: float, seed: int | Tensor, *, row_offset: int = 0, force_python: bool = False
) -> Tensor:
    """``dropout(x) @ A.T`` for ``x: (M, K)``, ``A: (r, K)``: (M, r) in x's dtype."""
    if isinstance(seed, Tensor):
        return torch.ops.fastlora.dropout_shrink_tseed(x, A, p, seed)
    _check_x(x)
    _check_operand(A, "A", x.dtype)
    _check(p, seed, row_offset)
    if _use_fused(x.device, force_python):
        return torch.ops.fastlora.dropout_shrink(x, A, p, seed, row_offset)
    return torch.mm(dropout(x, p, seed, row_offset=row_offset, force_python=force_python), A.t())


def dropout_dA(
    dz: Tensor, x: Tensor, p: float, seed: int | Tensor, *, row_offset: int = 0, force_python: bool = False
) -> Tensor:
    """``dz.T @ dropout(x)`` for ``dz: (M, r)``, ``x: (M, K)``: (r, K) in x's dtype (the C++ op
    accumulates in fp32, fp64 for fp64)."""
    if isinstance(seed, Tensor):
        return torch.ops.fastlora.dropout_dA_tseed(dz, x, p, seed)
    _check_x(x)
    _check_operand(dz, "dz", x.dtype)
    _check(p, seed, row_offset)
    if _use_fused(x.device, force_python):
        return torch.ops.fastlora.dropout_dA(dz, x, p, seed, row_offset)
    return torch.mm(dz.t(), dropout(x, p, seed, row_offset=row_offset, force_python=force_python))


def _tail_python(dx: Tensor, dz: Tensor, A: Tensor, p: float, seed: int, row_offset: int, force_python: bool) -> None:
    t = torch.mm(dz, A)
    dx.add_(dropout_(t, p, seed, row_offset=row_offset, force_python=force_python))


def dropout_tail_add_(
    dx: Tensor, dz: Tensor, A: Tensor, p: float, seed: int | Tensor, *, row_offset: int = 0, force_python: bool = False
) -> Tensor:
    """``dx += dropout(dz @ A)`` in place for ``dx: (M, K)`` (rows of unit stride), ``dz: (M, r)``,
    ``A: (r, K)``; returns dx."""
    if isinstance(seed, Tensor):
        torch.ops.fastlora.dropout_tail_add_tseed_(dx, dz, A, p, seed)
        return dx
    _check_x(dx)
    _check_operand(dz, "dz", dx.dtype)
    _check_operand(A, "A", dx.dtype)
    _check(p, seed, row_offset)
    if _use_fused(dx.device, force_python):
        torch.ops.fastlora.dropout_tail_add_(dx, dz, A, p, seed, row_offset)
    else:
        _tail_python(dx, dz, A, p, seed, row_offset, force_python)
    return dx


def dropout_dA_tail_add_(
    dx: Tensor,
    dz: Tensor,
    x: Tensor,
    A: Tensor,
    p: float,
    seed: int | Tensor,
    *,
    row_offset: int = 0,
    force_python: bool = False,
) -> Tensor:
    """The LoRA backward's two masked products in one pass (the mask drawn once): returns
    ``dz.T @ dropout(x)`` (as :func:`dropout_dA`) and adds ``dropout(dz @ A)`` to dx in place."""
    if isinstance(seed, Tensor):
        return torch.ops.fastlora.dropout_dA_tail_add_tseed_(dx, dz, x, A, p, seed)
    _check_x(x)
    _check_x(dx)
    _check_operand(dz, "dz", x.dtype)
    _check_operand(A, "A", x.dtype)
    _check(p, seed, row_offset)
    if _use_fused(x.device, force_python):
        return torch.ops.fastlora.dropout_dA_tail_add_(dx, dz, x, A, p, seed, row_offset)
    dA = dropout_dA(dz, x, p, seed, row_offset=row_offset, force_python=force_python)
    _tail_python(dx, dz, A, p, seed, row_offset, force_python)
    return dA


def lora_expand(z: Tensor, B: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """``scale * z @ B.T + bias`` (no dropout): the forward's rank-r part of y, (M, N). Runs the
    C++ op where :func:`fused_kernels` (its kernels beat the plain matmul), else the matmul."""
    if _EXPAND_OPS and fused_kernels(z):
        return torch.ops.fastlora.lora_expand(z, B, bias, scale)
    # one ATen call either way (beta = 0 ignores the 0-d input): small shapes are host-bound
    return torch.addmm(_zero(z) if bias is None else bias, z, B.t(), beta=0 if bias is None else 1, alpha=scale)


def lora_gpass(g: Tensor, B: Tensor, z: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """``(scale * g @ B, scale * g.T @ z)`` (no dropout; dB None without z): the backward's two
    products with g, in one pass over g where :func:`fused_kernels`."""
    if _EXPAND_OPS and fused_kernels(g):
        dz, dB = torch.ops.fastlora.lora_gpass(g, B, z, scale)
        return dz, (dB if z is not None else None)
    zero = _zero(g)
    dz = torch.addmm(zero, g, B, beta=0, alpha=scale)
    dB = None if z is None else torch.addmm(zero, g.t(), z, beta=0, alpha=scale)
    return dz, dB


_ZEROS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _zero(t: Tensor) -> Tensor:
    """A cached 0-d zero of t's dtype and device: the ignored input of ``addmm(beta=0)``."""
    key = (t.dtype, t.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        if torch.compiler.is_compiling():  # a traced (fake) tensor must not outlive its trace
            return zero
        _ZEROS[key] = zero
    return zero


@torch.library.custom_op("fastlora::dropout_shrink_tseed", mutates_args=())
def _dropout_shrink_tseed(x: Tensor, A: Tensor, p: float, seed: Tensor) -> Tensor:
    return dropout_shrink(x, A, p, int(seed))


@_dropout_shrink_tseed.register_fake
def _(x: Tensor, A: Tensor, p: float, seed: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], A.shape[0]))


@torch.library.custom_op("fastlora::dropout_dA_tseed", mutates_args=())
def _dropout_dA_tseed(dz: Tensor, x: Tensor, p: float, seed: Tensor) -> Tensor:
    return dropout_dA(dz, x, p, int(seed))


@_dropout_dA_tseed.register_fake
def _(dz: Tensor, x: Tensor, p: float, seed: Tensor) -> Tensor:
    return x.new_empty((dz.shape[1], x.shape[1]))


@torch.library.custom_op("fastlora::dropout_tail_add_tseed_", mutates_args=("dx",))
def _dropout_tail_add_tseed_(dx: Tensor, dz: Tensor, A: Tensor, p: float, seed: Tensor) -> None:
    dropout_tail_add_(dx, dz, A, p, int(seed))


@_dropout_tail_add_tseed_.register_fake
def _(dx: Tensor, dz: Tensor, A: Tensor, p: float, seed: Tensor) -> None:
    return None


@torch.library.custom_op("fastlora::dropout_dA_tail_add_tseed_", mutates_args=("dx",))
def _dropout_dA_tail_add_tseed_(dx: Tensor, dz: Tensor, x: Tensor, A: Tensor, p: float, seed: Tensor) -> Tensor:
    return dropout_dA_tail_add_(dx, dz, x, A, p, int(seed))


@_dropout_dA_tail_add_tseed_.register_fake
def _(dx: Tensor, dz: Tensor, x: Tensor, A: Tensor, p: float, seed: Tensor) -> Tensor:
    return x.new_empty((dz.shape[1], x.shape[1]))
