"""The ``triton`` backend: the fused kernels of ``fastlora.triton_kernels`` (DESIGN.md section 3).

Each kernel launcher is registered as a ``torch.ops.fastlora.triton_*`` op so that
torch.compile traces the backend without graph breaks. Compiled (GPU) they are
``torch.library.triton_op``s, which Inductor sees through down to the kernels. Under
``TRITON_INTERPRET=1`` ``wrap_triton`` cannot trace interpreted kernels (its fake pass would run
them on fake tensors), so there they are opaque ``custom_op``s with explicit fake impls; same
names, same schemas.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor


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


def _register(name: str, fake):
    """Decorator: register ``fn`` as the op ``fastlora::<name>`` (see the module docstring)."""

    def dec(fn):
        if tk.common.INTERPRET:
            op = torch.library.custom_op(f"fastlora::{name}", fn, mutates_args=())
            op.register_fake(fake)
            return op
        return torch.library.triton_op(f"fastlora::{name}", fn, mutates_args=())

    return dec


def _fwd_fake(x, weight, bias, lora_A, lora_B, scale, p, seed, fuse_shrink):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@_register("triton_lora_fwd", _fwd_fake)
def _fwd_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    p: float,
    seed: int,
    fuse_shrink: bool,
) -> tuple[Tensor, Tensor]:
    return tk.lora_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, fuse_shrink)


def _dz_dB_fake(g, z, lora_B, scale, need_dz):
    R = lora_B.shape[1]
    dz = g.new_empty((g.shape[0], R), dtype=torch.float32) if need_dz else g.new_empty((0,))
    return dz, (torch.empty_like(lora_B) if z is not None else g.new_empty((0,)))


@_register("triton_lora_bwd_dz_dB", _dz_dB_fake)
def _dz_dB_op(g: Tensor, z: Tensor | None, lora_B: Tensor, scale: float, need_dz: bool) -> tuple[Tensor, Tensor]:
    return tk.lora_bwd_dz_dB(g, z, lora_B, scale, need_dz)


def _dx_fake(g, dz, weight, lora_A, p, seed):
    return g.new_empty((g.shape[0], weight.shape[1]))


@_register("triton_lora_bwd_dx", _dx_fake)
def _dx_op(g: Tensor, dz: Tensor, weight: Tensor, lora_A: Tensor, p: float, seed: int) -> Tensor:
    return tk.lora_bwd_dx(g, dz, weight, lora_A, p, seed)


def _dA_fake(dz, x, p, seed):
    return x.new_empty((dz.shape[1], x.shape[1]))


@_register("triton_lora_bwd_dA", _dA_fake)
def _dA_op(dz: Tensor, x: Tensor, p: float, seed: int) -> Tensor:
    return tk.lora_bwd_dA(dz, x, p, seed)


def is_available(device: torch.device) -> bool:
    """CUDA tensors whenever triton imports (it did, or this module would not exist); CPU
    tensors only when the kernels were built by the interpreter (TRITON_INTERPRET=1 set before
    triton was imported)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and tk.common.INTERPRET)


def dropout_mask(M: int, K: int, p: float, seed: int, device: torch.device) -> Tensor:
    """Keep-mask (True = kept), bool (M, K), the bits the kernels regenerate."""
    return tk.keep_mask(M, K, p, seed, torch.device(device))


def _host_seed(seed: int | Tensor) -> int:
    # The kernels take the seed as a launch argument. A seed drawn inside a compiled graph (a
    # tensor) is read here, which costs a graph break under torch.compile with dropout on the GPU;
    # passing ``seed=`` explicitly avoids it. (Reading it in-kernel from a pointer is the fix.)
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
    """x: (M, K), weight: (N, K), bias: (N,) | None, lora_A: (r, K), lora_B: (N, r) ->
    (y: (M, N), z: (M, r)); F1 shrink then F2 base GEMM with the rank-r tail."""
    seed = _host_seed(seed)
    return torch.ops.fastlora.triton_lora_fwd(x, weight, bias, lora_A, lora_B, scale, p, seed, False)


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
    seed = _host_seed(seed)
    if need_dx or need_dA or need_dB:
        dz, dB = torch.ops.fastlora.triton_lora_bwd_dz_dB(g, z if need_dB else None, lora_B, scale, need_dx or need_dA)
        dB = dB if need_dB else None
        if need_dx:
            dx = torch.ops.fastlora.triton_lora_bwd_dx(g, dz, weight, lora_A, p, seed)
        if need_dA:
            dA = torch.ops.fastlora.triton_lora_bwd_dA(dz, x, p, seed)
    if need_dW:
        # dW = g^T x (only when the caller unfroze the base weight)
        dW = torch.mm(g.t(), x)
    if need_db:
        db = g.sum(0)
    return dx, dW, db, dA, dB
