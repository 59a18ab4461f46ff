"""The ``triton`` backend: the fused kernels of ``fastlora.triton_kernels`` (docs/DESIGN.md section 3).

Each kernel launcher is registered as an opaque ``torch.ops.fastlora.triton_*`` op (with a
fake impl) so that torch.compile traces the backend without graph breaks, a seed drawn inside
the graph included; eager calls skip that dispatch and call the launchers directly
(``torch.library`` dispatch cost ~0.4 ms of host time a call on an H200).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from ..quant import NF4Weight, scratch_buffer
from . import base_grads


def _import_kernels() -> ModuleType:
    try:
        return importlib.import_module("fastlora.triton_kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "fastlora.triton_kernels":
            raise
    # Source checkout, not installed: setup.py maps triton_kernels/ (beside fastlora/) to
    # fastlora.triton_kernels; do the same mapping here.
    root = Path(__file__).resolve().parents[2] / "triton_kernels"
    spec = importlib.util.spec_from_file_location(
        "fastlora.triton_kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or not (root / "__init__.py").exists():
        raise ImportError(f"fastlora.triton_kernels is not installed and {root} does not exist")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return mod


tk = _import_kernels()


def register(name: str, fake):
    """Decorator: register ``fn`` as the opaque op ``fastlora::<name>`` with ``fake`` as its fake
    impl: what torch.compile calls in its graphs (eager calls skip the dispatch). Opaque
    (``custom_op``, not ``triton_op``) so that a seed drawn inside a compiled graph reaches the
    body as a CPU tensor and is read there, with no graph break; Inductor cannot fuse user Triton
    kernels anyway. Registration happens when this module is imported, which
    ``fastlora/__init__.py`` does up front wherever CUDA can be used (never inside a trace)."""

    def dec(fn):
        op = torch.library.custom_op(f"fastlora::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op

    return dec


def seed_args(seed: int | Tensor) -> tuple[int, Tensor | None]:
    """(seed, seed_t) as the registered ops take them: a seed drawn in a compiled graph is a 0-d
    int64 CPU tensor, passed as seed_t (read inside the op body)."""
    return (0, seed) if isinstance(seed, Tensor) else (seed, None)


def _seed(seed: int, seed_t: Tensor | None) -> int:
    return seed if seed_t is None else int(seed_t)


def _fwd_fake(x, weight, bias, lora_A, lora_B, scale, p, seed, seed_t, fuse_shrink):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@register("triton_lora_fwd", _fwd_fake)
def _fwd_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    p: float,
    seed: int,
    seed_t: Tensor | None,
    fuse_shrink: bool,
) -> tuple[Tensor, Tensor]:
    return tk.lora_forward(x, weight, bias, lora_A, lora_B, scale, p, _seed(seed, seed_t), fuse_shrink)


def _fwd_quant_fake(x, qtensors, qmeta, bias, lora_A, lora_B, scale, p, seed, seed_t, fuse):
    return x.new_empty((x.shape[0], qmeta[1])), x.new_empty((x.shape[0], lora_A.shape[0]))


# The quantized ops take a QuantWeight as ``QuantWeight.flat()``: its six tensor fields as one
# Tensor?[] list and its ints (kind, N, K, blocksize, nested blocksize) as another.
@register("triton_lora_fwd_quant", _fwd_quant_fake)
def _fwd_quant_op(
    x: Tensor,
    qtensors: list[Tensor | None],
    qmeta: list[int],
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    p: float,
    seed: int,
    seed_t: Tensor | None,
    fuse_shrink: bool,
) -> tuple[Tensor, Tensor]:
    qw = tk.QuantWeight.from_flat(qtensors, qmeta)
    return tk.lora_forward(x, qw, bias, lora_A, lora_B, scale, p, _seed(seed, seed_t), fuse_shrink)


def _dequantize_fake(qtensors, qmeta, dtype):
    return qtensors[0].new_empty((qmeta[1], qmeta[2]), dtype=dtype)


@register("triton_dequantize", _dequantize_fake)
def _dequantize_op(qtensors: list[Tensor | None], qmeta: list[int], dtype: torch.dtype) -> Tensor:
    qw = tk.QuantWeight.from_flat(qtensors, qmeta)
    return tk.dequantize(qw, torch.empty(qw.shape, dtype=dtype, device=qw.device))


def _dz_dB_fake(g, z, lora_B, scale, need_dz):
    R = lora_B.shape[1]
    dz = g.new_empty((g.shape[0], R), dtype=torch.float32) if need_dz else g.new_empty((0,))
    return dz, (torch.empty_like(lora_B) if z is not None else g.new_empty((0,)))


@register("triton_lora_bwd_dz_dB", _dz_dB_fake)
def _dz_dB_op(g: Tensor, z: Tensor | None, lora_B: Tensor, scale: float, need_dz: bool) -> tuple[Tensor, Tensor]:
    return tk.lora_bwd_dz_dB(g, z, lora_B, scale, need_dz)


def _dx_fake(g, dz, weight, lora_A, p, seed, seed_t):
    return g.new_empty((g.shape[0], weight.shape[1]))


@register("triton_lora_bwd_dx", _dx_fake)
def _dx_op(g: Tensor, dz: Tensor, weight: Tensor, lora_A: Tensor, p: float, seed: int, seed_t: Tensor | None) -> Tensor:
    return tk.lora_bwd_dx(g, dz, weight, lora_A, p, _seed(seed, seed_t))


def _dx_quant_fake(g, dz, qtensors, qmeta, lora_A, p, seed, seed_t):
    return g.new_empty((g.shape[0], qmeta[2]))


@register("triton_lora_bwd_dx_quant", _dx_quant_fake)
def _dx_quant_op(
    g: Tensor,
    dz: Tensor,
    qtensors: list[Tensor | None],
    qmeta: list[int],
    lora_A: Tensor,
    p: float,
    seed: int,
    seed_t: Tensor | None,
) -> Tensor:
    return tk.lora_bwd_dx(g, dz, tk.QuantWeight.from_flat(qtensors, qmeta), lora_A, p, _seed(seed, seed_t))


def _dA_fake(dz, x, p, seed, seed_t):
    return x.new_empty((dz.shape[1], x.shape[1]))


@register("triton_lora_bwd_dA", _dA_fake)
def _dA_op(dz: Tensor, x: Tensor, p: float, seed: int, seed_t: Tensor | None) -> Tensor:
    return tk.lora_bwd_dA(dz, x, p, _seed(seed, seed_t))


class _Ops(NamedTuple):
    dz_dB: object
    dx: object
    dx_quant: object
    dA: object


# the registered ops under torch.compile (the seed as (int, tensor)); their bodies, undispatched,
# in eager mode
_COMPILED = _Ops(
    lambda *a: torch.ops.fastlora.triton_lora_bwd_dz_dB(*a),
    lambda *a, seed: torch.ops.fastlora.triton_lora_bwd_dx(*a, *seed_args(seed)),
    lambda *a, seed: torch.ops.fastlora.triton_lora_bwd_dx_quant(*a, *seed_args(seed)),
    lambda *a, seed: torch.ops.fastlora.triton_lora_bwd_dA(*a, *seed_args(seed)),
)
_EAGER = _Ops(
    tk.lora_bwd_dz_dB,
    lambda *a, seed: tk.lora_bwd_dx(*a, host_seed(seed)),
    lambda g, dz, qt, qm, A, p, seed: tk.lora_bwd_dx(g, dz, tk.QuantWeight.from_flat(qt, qm), A, p, host_seed(seed)),
    lambda *a, seed: tk.lora_bwd_dA(*a, host_seed(seed)),
)


def is_available(device: torch.device) -> bool:
    """CUDA tensors whenever triton imports (it did, or this module would not exist); CPU
    tensors only when the kernels were built by the interpreter (TRITON_INTERPRET=1 set before
    triton was imported)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and tk.common.INTERPRET)


def dropout_mask(M: int, K: int, p: float, seed: int, device: torch.device) -> Tensor:
    """Keep-mask (True = kept), bool (M, K), the bits the kernels regenerate."""
    return tk.keep_mask(M, K, p, seed, torch.device(device))


# Up to this many rows a quantized base is read by the GEMMs themselves, its W tiles dequantized
# in registers (the "fused" route, which also computes z inside F2: one launch for decode);
# above it W is dequantized into the shared scratch buffer and the dense kernels run (the
# "scratch" route: at training sizes the GEMM is compute-bound and the tensor-core loop should
# not carry dequantization work). 64 is bitsandbytes' choice on H100 (DESIGN.md section 5),
# not yet a measurement of these kernels: the benchmark suite's nf4 cases time both routes
# (rows fastlora-triton-fused and fastlora-triton-scratch), and this follows what they show.
FUSED_MAX_M = 64


def _kernel_weight(weight) -> tk.QuantWeight:
    """The kernels' view of a ``fastlora.quant`` weight: the same tensors, no copy."""
    q = tk.quant
    if isinstance(weight, NF4Weight):
        return tk.QuantWeight(
            q.NF4_DQ if weight.double_quant else q.NF4,
            tuple(weight.shape),
            weight.packed,
            weight.absmax,
            weight.code,
            weight.nested_absmax,
            weight.nested_code,
            weight.offset,
            weight.blocksize,
            weight.nested_blocksize,
        )
    return tk.QuantWeight(q.INT8, tuple(weight.shape), weight.CB, weight.SCB)


def _route(route: str, M: int) -> str:
    if route == "auto":
        return "fused" if M <= FUSED_MAX_M else "scratch"
    return route


def prepare_weight(weight, M: int, dtype: torch.dtype, route: str) -> Tensor | tk.QuantWeight:
    """A quantized base for M rows of ``dtype``: its codes as a :class:`QuantWeight` for the
    fused kernels, or (scratch route) W dequantized by the Triton kernel into the shared
    scratch buffer (a fresh tensor under torch.compile)."""
    tk.common.check_dtype(torch.empty((), dtype=dtype))
    qw = _kernel_weight(weight)
    if _route(route, M) == "fused":
        return qw
    if torch.compiler.is_compiling():
        return torch.ops.fastlora.triton_dequantize(*qw.flat(), dtype)
    return tk.dequantize(qw, scratch_buffer(qw.shape, dtype, qw.device))


def host_seed(seed: int | Tensor) -> int:
    """The seed as the kernels take it (a launch argument). Eager only: under torch.compile the
    registered ops read a tensor seed inside their body (:func:`seed_args`)."""
    return int(seed) if isinstance(seed, Tensor) else seed


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """x: (M, K), weight: (N, K) or a QuantWeight from :func:`prepare_weight`, bias: (N,) | None,
    lora_A: (r, K), lora_B: (N, r) -> (y: (M, N), z: (M, r)); F1 shrink then F2 base GEMM with
    the rank-r tail (a quantized W at small M: z computed inside F2, one launch)."""
    eager = not torch.compiler.is_compiling()
    fuse = False
    if isinstance(weight, tk.QuantWeight):
        fuse = x.shape[0] <= FUSED_MAX_M and tk.common.rank_pad(lora_A.shape[0]) <= 128
        if not eager:
            return torch.ops.fastlora.triton_lora_fwd_quant(
                x, *weight.flat(), bias, lora_A, lora_B, scale, p, *seed_args(seed), fuse
            )
    if eager:
        return tk.lora_forward(x, weight, bias, lora_A, lora_B, scale, p, host_seed(seed), fuse)
    return torch.ops.fastlora.triton_lora_fwd(x, weight, bias, lora_A, lora_B, scale, p, *seed_args(seed), False)


def backward(
    g: Tensor,
    x: Tensor | None,
    z: Tensor | None,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    p: float,
    seed: int,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """g: (M, N) -> (dx: (M, K), dW: (N, K), dbias: (N,), dA: (r, K), dB: (N, r)), None where
    ``needs`` says so. dz = s g B stays an fp32 (M, r) internal."""
    need_dx, need_dW, need_db, need_dA, need_dB = needs
    dx = dW = db = dA = dB = None
    if need_dx or need_dA or need_dB:
        ops = _EAGER if not torch.compiler.is_compiling() else _COMPILED
        dz, dB = ops.dz_dB(g, z if need_dB else None, lora_B, scale, need_dx or need_dA)
        dB = dB if need_dB else None
        if need_dx and isinstance(weight, tk.QuantWeight):
            dx = ops.dx_quant(g, dz, *weight.flat(), lora_A, p, seed=seed)
        elif need_dx:
            dx = ops.dx(g, dz, weight, lora_A, p, seed=seed)
        if need_dA:
            dA = ops.dA(dz, x, p, seed=seed)
    dW, db = base_grads(g, x, need_dW, need_db)
    return dx, dW, db, dA, dB
