"""Timing, memory probes, FLOP/byte formulas and run metadata.

Timing is interleaved: every round runs each implementation once (in an order rotated per
round), so machine drift and other tenants hit all of them alike, and the ratio to the frozen
base is taken per round (paired) before the median.

- CPU: a wall-clock harness (``time.perf_counter``), warm-up calls, then as many rounds as fit a
  time budget (clamped to [min_reps, max_reps]). pytest-benchmark times one callable at a time,
  so it cannot pair rounds; the statistics it reports (median, IQR) are the ones used here.
- GPU: ``triton.testing.do_bench`` (L2 flushed before each call, CUDA events) once per
  implementation per round; a round's value is that call's median. Without triton, a CUDA-event
  loop does the same.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


# --------------------------------------------------------------------------- statistics
def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty list."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: list[float]) -> dict:
    """median, p25, p75 (ms) and n of a list of times in ms."""
    return {
        "median_ms": quantile(samples, 0.5),
        "p25_ms": quantile(samples, 0.25),
        "p75_ms": quantile(samples, 0.75),
        "n": len(samples),
    }


# --------------------------------------------------------------------------- timing
@dataclass
class TimingConfig:
    """CPU: ``warmup`` calls, then rounds until ``budget_s`` (clamped to [min_reps, max_reps]).
    GPU: ``rounds`` do_bench calls per implementation of ``warmup_ms`` / ``rep_ms``."""

    warmup: int = 2
    budget_s: float = 4.0
    min_reps: int = 8
    max_reps: int = 40
    rounds: int = 3
    warmup_ms: int = 25
    rep_ms: int = 100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_event_bench(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> list[float]:
    """do_bench without triton: CUDA events around each call, after a timed estimate."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(1, int(rep_ms / est))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in ev]


def _gpu_bench(fn: Callable[[], object], cfg: TimingConfig) -> list[float]:
    try:
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="all"))
    except (ImportError, AssertionError, TypeError):  # no triton, or one without return_mode="all"
        return _cuda_event_bench(fn, cfg.warmup_ms, cfg.rep_ms)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, cfg: TimingConfig
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every callable in ``fns`` round-robin.

    Returns (samples, rounds): ``samples[name]`` all timings in ms (for median/spread) and
    ``rounds[name]`` one value per round (for paired ratios); on CPU they are the same list.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    if device.type == "cuda":
        gc.collect()  # free the previous case's tensors held by reference cycles
        for i in range(cfg.rounds):
            for n in names[i % len(names) :] + names[: i % len(names)]:
                ts = _gpu_bench(fns[n], cfg)
                samples[n] += ts
                rounds[n].append(quantile(ts, 0.5))
        return samples, rounds

    t_round = 0.0
    for _ in range(max(1, cfg.warmup)):
        t_round = 0.0
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            t_round += time.perf_counter() - t0
    reps = min(cfg.max_reps, max(cfg.min_reps, int(cfg.budget_s / max(t_round, 1e-6))))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(reps):
            for n in names[i % len(names) :] + names[: i % len(names)]:
                t0 = time.perf_counter()
                fns[n]()
                rounds[n].append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return rounds, rounds


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, p25, p75 of the per-round ratios num[i] / den[i]."""
    rs = [a / b for a, b in zip(num, den, strict=True)]
    return quantile(rs, 0.5), quantile(rs, 0.25), quantile(rs, 0.75)


# --------------------------------------------------------------------------- memory
def saved_activation_bytes(fn: Callable[[], object], params: Iterable[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while running ``fn()`` (a training forward).

    Counts unique storages (a storage saved by several ops, e.g. an x read by q/k/v, counts once)
    that are not parameter storages (weights are resident anyway; they are not activations).
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # kept alive until counted, so no storage address is reused meanwhile
    total = sum(seen.values())
    del out
    return total


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak allocated bytes while running ``fn()``, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --------------------------------------------------------------------------- formulas
def op_flops(M: int, K: int, N: int, r: int, mode: str, lora: bool) -> int:
    """Useful FLOPs of one layer (README "Formulas"). Base: fwd 2MNK, bwd 2MNK (dx only, W is
    frozen). LoRA adds fwd 2Mr(K+N) (shrink + expand) and bwd 4Mr(K+N) (dz, dB, dA, dx tail)."""
    fwd_only = mode != "fwdbwd"  # "fwd" and "infer"
    base = 2 * M * N * K * (1 if fwd_only else 2)
    tail = (2 if fwd_only else 6) * M * r * (K + N) if lora else 0
    return base + tail


def op_bytes(M: int, K: int, N: int, r: int, mode: str, lora: bool, elt: int, w_elt: float | None = None) -> int:
    """Compulsory memory traffic (README "Formulas"). Base fwd reads x, W and writes y; bwd
    reads g, W and writes dx. LoRA adds A, B (fwd) and x again for dA, A, B, dA, dB (bwd).
    ``w_elt``: bytes per element of W when it is stored otherwise (NF4: 4.127 bits)."""
    w = (elt if w_elt is None else w_elt) * N * K
    fwd = elt * (M * K + M * N + (r * (K + N) if lora else 0)) + w
    bwd = elt * (M * N + M * K + (M * K + 2 * r * (K + N) if lora else 0)) + w
    return round(fwd + (bwd if mode == "fwdbwd" else 0))


# --------------------------------------------------------------------------- metadata
def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(cpu_name())}-{torch.get_num_threads()}t"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def metadata(device: torch.device, suite: str, argv: list[str]) -> dict:
    """Everything needed to tell two result files apart. Never imports triton (on CPU that
    would fix TRITON_INTERPRET for the rest of the process)."""
    import fastlora

    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = (
        bool(_git("status", "--porcelain", "--", "fastlora", "csrc", "triton_kernels")) if commit != "unknown" else None
    )
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "fastlora": getattr(fastlora, "__version__", "unknown"),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), "-m", "benchmarks", *argv]),
        "suite": suite,
    }
