"""How ``backend="auto"`` picks a plan for CUDA tensors: measured once per shape, kept on disk.

Long module: the key, the first-use check, the timing and the cache file are one decision
procedure whose parts share its invariants (what a key holds decides what a check proves and
what may be written to disk); they are read together.

Two plans compute the op on a GPU: ``hybrid`` (cuBLAS for the big GEMMs, Triton for the
rank-r work; :mod:`.hybrid_backend`) and ``fused`` (single-pass Triton GEMMs carrying the
rank-r tail; backend name ``"triton"``, :mod:`.triton_backend`). Which is faster depends on the
GPU, dtype and shape, so "auto" decides per key (device, versions, dtype, N, K, r, M bucket,
dropout on/off, quantization) on the first call at that key:

1. each candidate runs a first-use check: forward and backward on a slice of the call's rows,
   with random LoRA factors and gradient of the call's shapes, against the float64 oracle and
   the pure-PyTorch mask; a candidate that raises (fails to compile or launch) or disagrees is
   dropped with one warning and never runs for that key;
2. the survivors are timed (forward + backward at the call's shape) and the fastest is kept,
   in memory and in ``$FASTLORA_CACHE_DIR/plans.json`` (default ``~/.cache/fastlora``), so a
   new process at a known shape measures nothing; a corrupt cache file is ignored (one warning)
   and rewritten;
3. with every candidate dropped, the ``torch`` backend runs (kept for this process only). A
   measurement that cannot be made now (out of memory, inside a CUDA graph capture) drops
   nothing: the default plan runs and the key is measured again on a later call. Decisions
   timed with ``FASTLORA_TRITON_PIN`` (untuned) are not written to the file.

``FASTLORA_PLAN=hybrid|fused|torch`` pins the plan (no check, no timing); ``auto`` (default)
decides as above. :func:`plan_table` lists the decisions. Under ``torch.compile`` nothing can be
timed while tracing: a cached decision is used, else ``hybrid``.
"""

from __future__ import annotations

import functools
import hashlib
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


def device_timer(fn: Callable[[], object], device: torch.device, reps: int = 7) -> float:
    """Fastest of ``reps`` runs of ``fn()``, in seconds, after one warm-up call (which compiles
    and tunes): the minimum is the estimate least disturbed by other work."""
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
    return min(times)


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover - the plans need triton anyway
        tv = "none"
    from fastlora import __version__ as fv

    return f"fastlora{fv}-code{_code_digest()}-torch{torch.__version__}-triton{tv}"


@functools.cache
def _code_digest() -> str:
    """12 hex digits of a hash of the plans' source: the backends, the quantized formats they
    prepare, and the Triton kernels (wherever ``fastlora.triton_kernels`` was loaded from: the
    checkout's triton_kernels/ or the installed package). A decision on disk skips the first-use
    check, so it is reused only by the code it was checked and timed with: a source checkout
    changes that code without a version bump."""
    here = Path(__file__).resolve().parent
    dirs = [here, here.parent / "quant"]
    try:
        from . import triton_backend

        dirs.append(Path(triton_backend.tk.__file__).resolve().parent)
    except ImportError:  # pragma: no cover - the plans need triton anyway
        pass
    h = hashlib.sha256()
    for d in dirs:
        for path in sorted(d.glob("*.py")):
            h.update(f"{d.name}/{path.name}".encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


_DEVICE_NAMES: dict[tuple[str, int | None], str] = {}


def _device_name(device: torch.device) -> str:
    key = (device.type, device.index)
    name = _DEVICE_NAMES.get(key)
    if name is None:
        name = torch.cuda.get_device_name(device).replace("|", "/") if device.type == "cuda" else device.type
        _DEVICE_NAMES[key] = name
    return name


def _m_bucket(M: int) -> int:
    return min(1 << max(M - 1, 0).bit_length(), 8192)


def _parse_key(key: str) -> dict:
    """A cache key's fields as plain values (what :func:`plan_table` rows show)."""
    f = key.split("|")
    if len(f) != 11:  # a key of another layout (hand-edited file): shown as it is
        return {}
    device, versions, dtype, N, K, r, M, dropout, quant, bias, tail = f
    # quant: "dense", "int8-<route>", "nf4[-dq]-b<blocksize>-<route>"
    parts = quant.split("-")
    blocks = [int(q[1:]) for q in parts[1:] if q.startswith("b") and q[1:].isdigit()]
    named = [q for q in parts[1:] if q != "dq" and not (q.startswith("b") and q[1:].isdigit())]
    return {
        "device": device,
        "versions": versions,
        "dtype": dtype.removesuffix("-tf32"),
        "tf32": dtype.endswith("-tf32"),
        "N": int(N[1:]),
        "K": int(K[1:]),
        "r": int(r[1:]),
        "M_bucket": int(M[1:]),
        "dropout": dropout == "dropout1",
        "quant": parts[0],
        "double_quant": "dq" in parts[1:],
        "blocksize": blocks[0] if blocks else None,
        "route": named[-1] if named else None,
        "bias": bias == "bias1",
        "hybrid_tail": tail.removeprefix("tail-"),
    }


class _Transient(Exception):
    """A measurement that could not be made now (out of memory, a CUDA graph being captured):
    nothing is dropped and nothing is kept on disk."""


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
        self._decisions: dict[str, dict] = {}  # string key -> decision (this process and the file)
        self._fast: dict[tuple, str] = {}  # call key -> plan: the per-call lookup
        self._disk_read = False
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # -- keys and the cache file ----------------------------------------------------------

    @staticmethod
    def _fast_key(x: Tensor, weight, lora_A: Tensor, bias, p: float, quant: str, quant_route: str) -> tuple:
        """Everything the choice depends on, cheap to build on every call. x: (..., K)."""
        N, K = weight.shape
        tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        return (
            x.device.type,
            x.device.index,
            x.dtype,
            N,
            K,
            lora_A.shape[0],
            _m_bucket(x.numel() // K),
            p > 0,
            quant,
            quant_route if quant != "dense" else "",
            bias is not None,
            tf32,
            os.environ.get("FASTLORA_HYBRID_TAIL", "first"),
        )

    def key(self, x: Tensor, weight, lora_A: Tensor, p: float, quant: str, bias=None, quant_route="auto") -> str:
        """The cache file's key of a call: the fast key with the device's name and the versions."""
        f = self._fast_key(x, weight, lora_A, bias, p, quant, quant_route)
        _, _, dtype, N, K, r, bucket, dropout, quant, route, has_bias, tf32, tail = f
        fields = [
            _device_name(x.device),
            _versions(),
            str(dtype).removeprefix("torch.") + ("-tf32" if tf32 else ""),
            f"N{N}",
            f"K{K}",
            f"r{r}",
            f"M{bucket}",
            f"dropout{int(dropout)}",
            quant + (f"-{route}" if route else ""),
            f"bias{int(has_bias)}",
            f"tail-{tail}",
        ]
        return "|".join(fields)

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
            mine = {k: v for k, v in self._decisions.items() if v.get("persist", True)}
            merged = {**self._read_disk(), **mine}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plans-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _VERSION, "decisions": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        except OSError as exc:
            self._warn(
                f"write:{path}", f"fastlora: could not write the plan cache {path} ({exc}); decisions stay in memory"
            )

    def _load_disk_once(self) -> None:
        if not self._disk_read:
            self._disk_read = True
            for k, v in self._read_disk().items():
                self._decisions.setdefault(k, v)

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
        """The plan for this call (see the module docstring). x: (..., K); weight: (N, K) tensor
        or a ``fastlora.quant`` weight; the rest as ``lora_linear``'s."""
        pinned = pinned_plan()
        if pinned is not None:
            return pinned
        fast = self._fast_key(x, weight, lora_A, bias, p, quant, quant_route)
        plan = self._fast.get(fast)
        if plan is not None:
            return plan
        if torch.compiler.is_compiling():  # no file, no timing while tracing: decided eagerly, or the default
            return DEFAULT
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return DEFAULT  # nothing can be timed inside a CUDA graph capture
        with self._lock:
            key = self.key(x, weight, lora_A, p, quant, bias, quant_route)
            self._load_disk_once()
            found = self._decisions.get(key)
            if found is None:
                found = self._decide(key, x, weight, bias, lora_A, lora_B, scale, p, quant_route)
                if found is None:  # transient: the default now, measured again on a later call
                    return DEFAULT
                self._decisions[key] = found
                if found.get("persist", True):
                    self._write_disk()
            self._fast[fast] = found["plan"]
        return found["plan"]

    def _decide(self, key, x, weight, bias, lora_A, lora_B, scale, p, quant_route) -> dict | None:
        times: dict[str, float] = {}
        dropped: dict[str, str] = {}
        x2 = x.reshape(-1, x.shape[-1])
        try:
            with torch.no_grad():
                for plan in CANDIDATES:
                    try:
                        mod = self.module(plan)
                        if not mod.is_available(x.device):
                            raise RuntimeError(f"not available on {x.device.type}")
                        self._check(mod, x2, weight, bias, lora_A, lora_B, scale, p, quant_route)
                        step = self._step(mod, x2, weight, bias, lora_A, lora_B, scale, p, quant_route)
                        times[plan] = self.timer(step, x.device)
                    except torch.OutOfMemoryError as exc:
                        raise _Transient(f"out of memory while measuring {plan!r}") from exc
                    except Exception as exc:  # compile / launch failure, or a wrong answer: never run it here
                        dropped[plan] = f"{type(exc).__name__}: {exc}"[:300]
                        self._warn(f"drop:{key}:{plan}", f"fastlora: plan {plan!r} dropped for {key}: {dropped[plan]}")
        except _Transient as exc:
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            self._warn(f"transient:{key}", f"fastlora: {exc}; running {DEFAULT!r} for now ({key})")
            return None
        plan = min(times, key=times.get) if times else "torch"
        return {
            "plan": plan,
            "times_ms": {k: round(v * 1e3, 4) for k, v in times.items()},
            "dropped": dropped,
            "decided": time.strftime("%Y-%m-%dT%H:%M:%S"),
            # nothing measured (every plan dropped), or untuned timings (FASTLORA_TRITON_PIN):
            # this process only, never the file
            "persist": bool(times) and os.environ.get("FASTLORA_TRITON_PIN", "0") in ("", "0"),
        }

    @staticmethod
    def _step(mod, x, weight, bias, lora_A, lora_B, scale, p, quant_route):
        gen = torch.Generator(device=x.device).manual_seed(0)
        g = torch.randn((x.shape[0], weight.shape[0]), generator=gen, device=x.device, dtype=x.dtype)
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
        """Forward + backward on the first rows, with random (never zero) LoRA factors, bias and
        upstream gradient of the call's shapes and dtypes, against the float64 oracle with the
        mask from the pure-PyTorch generator: the rank-r path is exercised even on the first
        step (PEFT initialises B to zero), and a mask bug cannot agree with itself. The weight
        is prepared for the call's M, so the route checked is the route run."""
        from .. import _philox, reference

        xs = x[:_CHECK_ROWS]
        m, K = xs.shape
        N = weight.shape[0]
        gen = torch.Generator(device=x.device).manual_seed(1)

        def rnd(*shape, like, std=1.0):
            return (torch.randn(shape, generator=gen, device=x.device, dtype=torch.float32) * std).to(like.dtype)

        A = rnd(*lora_A.shape, like=lora_A, std=K**-0.5)
        B = rnd(*lora_B.shape, like=lora_B)
        b = None if bias is None else rnd(N, like=bias)
        g = rnd(m, N, like=xs)
        quant = not isinstance(weight, Tensor)
        W = mod.prepare_weight(weight, x.shape[0], x.dtype, quant_route) if quant else weight
        y, z = mod.forward(xs, W, b, A, B, scale, p, 1234)
        y = y.clone()  # a scratch-route W is reused by the next prepare_weight
        if quant:
            W = mod.prepare_weight(weight, x.shape[0], x.dtype, quant_route)
        dx, _, _, dA, dB = mod.backward(g, xs, z, W, A, B, scale, p, 1234, (True, False, False, True, True))
        dense = weight.dequantize(x.dtype) if quant else weight
        keep = _philox.keep_mask(m, K, p, 1234, x.device, force_python=True) if p > 0 else None
        f64 = [t.double() for t in (xs, dense, A, B, g)]
        bias64 = None if b is None else b.double()
        want_y = reference.lora_linear_ref(f64[0], f64[1], f64[2], f64[3], scale, bias64, keep, p)
        want_dx, want_dA, want_dB, _ = reference.lora_grads_ref(f64[4], f64[0], f64[1], f64[2], f64[3], scale, keep, p)
        tol = _CHECK_TOL.get(x.dtype, 1e-6)
        for name, got, want in (("y", y, want_y), ("dx", dx, want_dx), ("dA", dA, want_dA), ("dB", dB, want_dB)):
            err = (got.double() - want).abs().max().item()
            size = want.abs().max().item()
            if not math.isfinite(err) or err > tol * max(size, 1e-30):
                raise ValueError(f"first-use check: {name} differs from the oracle by {err:.3g} (scale {size:.3g})")

    def table(self) -> list[dict]:
        """Every decision known to this process (made here or read from the cache file)."""
        with self._lock:
            self._load_disk_once()
            items = sorted(self._decisions.items())
        return [
            dict(_parse_key(key), plan=d["plan"], times_ms=d.get("times_ms", {}), dropped=d.get("dropped", {}), key=key)
            for key, d in items
        ]

    def clear(self) -> None:
        """Forget this process's decisions (the cache file stays)."""
        with self._lock:
            self._decisions.clear()
            self._fast.clear()
            self._disk_read = False


CHOOSER = Chooser()


def plan_table() -> list[dict]:
    """The decisions of ``backend="auto"`` on CUDA, one dict per key: device, versions, dtype, N,
    K, r, M_bucket, dropout, quant, the chosen ``plan`` ("hybrid", "fused" or "torch"),
    ``times_ms`` per timed plan and ``dropped`` (plan -> why)."""
    return CHOOSER.table()
