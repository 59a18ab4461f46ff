"""How ``backend="auto"`` picks a plan for CUDA tensors: measured once per shape, kept on disk.

Two plans compute the op on a GPU: ``hybrid`` (cuBLAS for the big GEMMs, Triton for the
rank-r work; :mod:`.hybrid_backend`) and ``fused`` (single-pass Triton GEMMs carrying the
rank-r tail; backend name ``"triton"``, :mod:`.triton_backend`). Which is faster depends on the
GPU, dtype and shape, so "auto" decides per key (device, versions, dtype, N, K, r, M bucket,
dropout on/off, quantization) on the first call at that key:

1. each candidate runs a first-use check: forward and backward on a slice of the call's rows
   against the ``torch`` backend (same seed, same mask); a candidate that raises (fails to
   compile or launch) or disagrees is dropped with one warning and never runs for that key;
2. the survivors are timed (forward + backward at the call's shape) and the fastest is kept,
   in memory and in ``$FASTLORA_CACHE_DIR/plans.json`` (default ``~/.cache/fastlora``), so a
   new process at a known shape measures nothing; a corrupt cache file is ignored (one warning)
   and rewritten;
3. with every candidate dropped, the ``torch`` backend runs.

``FASTLORA_PLAN=hybrid|fused|torch`` pins the plan (no check, no timing); ``auto`` (default)
decides as above. :func:`plan_table` lists the decisions. Under ``torch.compile`` nothing can be
timed while tracing: a cached decision is used, else ``hybrid``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

PLAN_ENV = "FASTLORA_PLAN"
CACHE_ENV = "FASTLORA_CACHE_DIR"
PLANS = ("hybrid", "fused", "torch")
CANDIDATES = ("hybrid", "fused")
DEFAULT = "hybrid"
_MODULE_OF = {"hybrid": "hybrid", "fused": "triton", "torch": "torch"}
_CHECK_ROWS = 64
# A first-use check catches a plan that computes garbage (a wrong tile, a wrong mask, NaN), not
# rounding: max |plan - torch| <= tol * max |torch| per output, with room for TF32 / 16-bit GEMMs.
_CHECK_TOL = {torch.float32: 2e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_VERSION = 1

Timer = Callable[[Callable[[], object], torch.device], float]


def module_name(plan: str) -> str:
    """The backend module that runs ``plan``."""
    return _MODULE_OF[plan]


def pinned_plan() -> str | None:
    """The plan ``FASTLORA_PLAN`` pins, or None for "auto" (unset). "triton" means "fused"."""
    value = os.environ.get(PLAN_ENV, "auto").strip().lower() or "auto"
    value = "fused" if value == "triton" else value
    if value == "auto":
        return None
    if value not in PLANS:
        raise ValueError(f"{PLAN_ENV} must be one of auto, {', '.join(PLANS)}; got {value!r}")
    return value


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlora"
    return Path(root) / "plans.json"


def device_timer(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up call (which compiles and tunes)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover - the plans need triton anyway
        tv = "none"
    return f"torch{torch.__version__}-triton{tv}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("|", "/")
    return device.type


def _m_bucket(M: int) -> int:
    return min(1 << max(M - 1, 0).bit_length(), 8192)


class Chooser:
    """The decisions of "auto" (one process-wide instance, :data:`CHOOSER`; tests make their own
    with a fake ``timer`` and ``load`` of backend modules)."""

    def __init__(
        self,
        timer: Timer = device_timer,
        load: Callable[[str], ModuleType | None] | None = None,
        path: Path | None = None,
    ):
        self.timer = timer
        self._load_module = load
        self._path = path
        self._decisions: dict[str, dict] = {}
        self._disk_read = False
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # -- keys and the cache file ----------------------------------------------------------

    def key(self, x: Tensor, weight, lora_A: Tensor, p: float, quant: str) -> str:
        N, K = weight.shape
        return "|".join(
            (
                _device_name(x.device),
                _versions(),
                str(x.dtype).removeprefix("torch."),
                f"N{N}",
                f"K{K}",
                f"r{lora_A.shape[0]}",
                f"M{_m_bucket(x.shape[0])}",
                f"dropout{int(p > 0)}",
                quant,
            )
        )

    def path(self) -> Path:
        return self._path if self._path is not None else cache_path()

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _read_disk(self) -> dict[str, dict]:
        path = self.path()
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != _VERSION:
                raise ValueError("unknown layout")
            decisions = data["decisions"]
            ok = {k: v for k, v in decisions.items() if isinstance(v, dict) and v.get("plan") in PLANS}
            if len(ok) != len(decisions):
                raise ValueError("entries with an unknown plan")
            return ok
        except FileNotFoundError:
            return {}
        except Exception as exc:  # corrupt, truncated, hand-edited: measure again and rewrite
            self._warn(f"corrupt:{path}", f"fastlora: ignoring the plan cache {path} ({exc}); it will be rewritten")
            return {}

    def _write_disk(self) -> None:
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read_disk(), **self._decisions}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plans-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _VERSION, "decisions": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        except OSError as exc:
            self._warn(
                f"write:{path}", f"fastlora: could not write the plan cache {path} ({exc}); decisions stay in memory"
            )

    def _cached(self, key: str) -> dict | None:
        if key in self._decisions:
            return self._decisions[key]
        if not self._disk_read:
            self._disk_read = True
            for k, v in self._read_disk().items():
                self._decisions.setdefault(k, v)
        return self._decisions.get(key)

    # -- the decision ---------------------------------------------------------------------

    def module(self, plan: str) -> ModuleType:
        from . import load

        mod = (self._load_module or load)(_MODULE_OF[plan])
        if mod is None:
            raise RuntimeError(f"plan {plan!r} is unavailable in this install")
        return mod

    def choose(
        self,
        x: Tensor,
        weight,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scale: float,
        p: float,
        quant_route: str,
        quant: str = "dense",
    ) -> str:
        """The plan for this call (see the module docstring). x: (M, K); weight: (N, K) tensor
        or a ``fastlora.quant`` weight; the rest as ``lora_linear``'s."""
        pinned = pinned_plan()
        if pinned is not None:
            return pinned
        key = self.key(x, weight, lora_A, p, quant)
        found = self._cached(key)
        if found is not None:
            return found["plan"]
        if torch.compiler.is_compiling():
            return DEFAULT
        with self._lock:
            found = self._decisions.get(key)
            if found is None:
                found = self._decide(key, x, weight, bias, lora_A, lora_B, scale, p, quant_route)
                self._decisions[key] = found
                self._write_disk()
        return found["plan"]

    def _decide(self, key, x, weight, bias, lora_A, lora_B, scale, p, quant_route) -> dict:
        times: dict[str, float] = {}
        dropped: dict[str, str] = {}
        for plan in CANDIDATES:
            try:
                mod = self.module(plan)
                if not mod.is_available(x.device):
                    raise RuntimeError(f"not available on {x.device.type}")
                self._check(mod, x, weight, bias, lora_A, lora_B, scale, p, quant_route)
                times[plan] = self.timer(
                    self._step(mod, x, weight, bias, lora_A, lora_B, scale, p, quant_route), x.device
                )
            except Exception as exc:  # compile / launch failure, or a wrong answer: never run it here
                dropped[plan] = f"{type(exc).__name__}: {exc}"[:300]
                self._warn(f"drop:{key}:{plan}", f"fastlora: plan {plan!r} dropped for {key}: {dropped[plan]}")
        plan = min(times, key=times.get) if times else "torch"
        return {
            "plan": plan,
            "times_ms": {k: round(v * 1e3, 4) for k, v in times.items()},
            "dropped": dropped,
            "decided": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    @staticmethod
    def _step(mod, x, weight, bias, lora_A, lora_B, scale, p, quant_route):
        gen = torch.Generator(device=x.device).manual_seed(0)
        g = torch.randn((x.shape[0], weight.shape[0]), generator=gen, device=x.device).to(x.dtype)
        quant = not isinstance(weight, Tensor)
        needs = (True, False, False, True, True)

        def step():
            W = mod.prepare_weight(weight, x.shape[0], x.dtype, quant_route) if quant else weight
            y, z = mod.forward(x, W, bias, lora_A, lora_B, scale, p, 1234)
            if quant:
                W = mod.prepare_weight(weight, x.shape[0], x.dtype, quant_route)
            return mod.backward(g, x, z, W, lora_A, lora_B, scale, p, 1234, needs)

        return step

    def _check(self, mod, x, weight, bias, lora_A, lora_B, scale, p, quant_route) -> None:
        """Forward + backward on the first rows against the torch backend (same mask bits)."""
        ref_mod = self.module("torch")
        xs = x[:_CHECK_ROWS]
        gen = torch.Generator(device=x.device).manual_seed(1)
        g = torch.randn((xs.shape[0], weight.shape[0]), generator=gen, device=x.device).to(x.dtype)
        needs = (True, False, False, True, True)
        outs = []
        for m in (mod, ref_mod):
            W = (
                m.prepare_weight(weight, xs.shape[0], x.dtype, quant_route)
                if not isinstance(weight, Tensor)
                else weight
            )
            y, z = m.forward(xs, W, bias, lora_A, lora_B, scale, p, 1234)
            y = y.clone()  # a scratch-route W is reused by the next prepare_weight
            dx, _, _, dA, dB = m.backward(g, xs, z, W, lora_A, lora_B, scale, p, 1234, needs)
            outs.append((y, z, dx, dA, dB))
        tol = _CHECK_TOL.get(x.dtype, 1e-6)
        for name, got, want in zip(("y", "z", "dx", "dA", "dB"), *outs, strict=True):
            got, want = got.double(), want.double()
            scale_ = want.abs().max().item() if want.numel() else 0.0
            err = (got - want).abs().max().item() if want.numel() else 0.0
            if not math.isfinite(err) or err > tol * max(scale_, 1e-30):
                raise ValueError(
                    f"first-use check: {name} differs from the torch backend by {err:.3g} (scale {scale_:.3g})"
                )

    def table(self) -> list[dict]:
        """Every decision known to this process (made here or read from the cache file)."""
        self._cached("")
        rows = []
        for key, d in sorted(self._decisions.items()):
            fields = key.split("|")
            names = ("device", "versions", "dtype", "N", "K", "r", "M_bucket", "dropout", "quant")
            row = dict(zip(names, fields, strict=False))
            row.update(plan=d["plan"], times_ms=d.get("times_ms", {}), dropped=d.get("dropped", {}), key=key)
            rows.append(row)
        return rows

    def clear(self) -> None:
        """Forget this process's decisions (the cache file stays)."""
        self._decisions.clear()
        self._disk_read = False


CHOOSER = Chooser()


def plan_table() -> list[dict]:
    """The decisions of ``backend="auto"`` on CUDA, one dict per key: device, versions, dtype, N,
    K, r, M_bucket, dropout, quant, the chosen ``plan`` ("hybrid", "fused" or "torch"),
    ``times_ms`` per timed plan and ``dropped`` (plan -> why)."""
    return CHOOSER.table()
