"""The quick GPU check (issue #16): everything a lent GPU must run, in one call of <= 8 minutes.

    bash benchmarks/gpu_check.sh quick            # on the GPU machine (= python3 -m benchmarks.gpu_quick run)
    bash benchmarks/gpu_check.sh quick --dry-run  # anywhere: what it would run, and its estimated time

A fresh H100/H200 machine has no registry and ~15 minutes of device time in all, its start
included, so this module decides everything up front and keeps to a time budget:

1. versions and device (torch, triton, CUDA, driver, GPU, nvcc, ninja, commit, command, date);
2. ``pip install -e .`` with the CUDA extension, built by ninja on every core (MAX_JOBS = nproc,
   TORCH_CUDA_ARCH_LIST = this GPU only); without csrc/cuda, then without any extension, if
   that fails;
3. a compiled selection of tests (:data:`SELECTION`, the one list) with one pinned Triton config
   per kernel (``FASTLORA_TRITON_PIN=1``), loaded into pytest by this module as a plugin;
4. the benchmark rows that decide issue #15 (:data:`BENCH_ONLY`, the ``--only`` patterns of
   ``python -m benchmarks``), written after every case;
5. the per-kernel profile of one fwd+bwd step per plan (benchmarks/profile_step.py);
6. the end-to-end Llama step (benchmarks/e2e.py), only when the budget still has room;
7. a summary table: ratios to the frozen base and to PEFT, the plan "auto" chose, pass/fail
   against DESIGN.md 7 / issue #15.

Every stage is a subprocess with a deadline; a stage past its deadline is stopped and the run
goes on. Results are written as the run goes, into a tree that mirrors the repository
(``benchmarks/results/<device>/gpu_quick*``), packed into ``$OUT/results.tgz`` after every
stage (the device tool returns at most 8 files, 2 folders deep, so the tree travels as one
archive), with the summary and the console log beside it. Landing them: ``tar xzf
results.tgz`` in the repository root, then commit ``benchmarks/results/<device>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 450  # the whole command: under the 8-minute call, leaving time to pack and return
PIN_ENV = {"FASTLORA_TRITON_PIN": "1"}  # issue #15: one pinned config per Triton kernel
ENV_PREFIXES = ("FASTLORA_", "TRITON_", "CUDA_", "TORCH_CUDA")  # the settings a run records


# --------------------------------------------------------------------------- the test selection
@dataclass(frozen=True)
class Selected:
    """``entry`` is a pytest node id (``path::name[id]``) or ``path -k WORD`` (every test of that
    file whose name contains WORD, case-insensitive, as pytest's ``-k`` with one word)."""

    entry: str
    est_s: float  # compiled, with pinned configs: an estimate (no pinned run has been timed yet)
    covers: str

    @property
    def path(self) -> str:
        return self.entry.split("::", 1)[0].split(" -k ", 1)[0].strip()

    def matches(self, nodeid: str) -> bool:
        if " -k " in self.entry:
            path, word = (s.strip() for s in self.entry.split(" -k ", 1))
            file, _, name = nodeid.partition("::")
            return file == path and word.lower() in name.lower()
        return nodeid == self.entry


_T, _Q, _X = "tests/test_triton.py::", "tests/test_triton_quant.py::", "tests/test_quant_ext.py::"
_H = "tests/test_hybrid.py::"
_DT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Kernel x dtype x dropout on/off x dense/NF4/int8, each once. Each parity test runs a whole
# plan against the float64 oracle: the fused one (F1 shrink, F2 GEMM + tail, B1 dz/dB, B2 dx
# GEMM, B3 dA) and the hybrid one (cuBLAS + the rank-r kernels). The quantized tests take M=37
# (p=0.3) and M=70 (p=0: the test gives r=8 no dropout) on the fused route (W tiles dequantized
# in registers), and M=70 on the scratch route (the dequant kernel, then the dense GEMMs, whose
# dropout variants the dense tests cover): every dtype for NF4, bf16 for int8. Order is
# priority: when the budget runs out, the tail is skipped.
SELECTION: list[Selected] = [
    Selected(_T + "test_parity_with_oracle[M37-K70-N33-r13-float32-0.0]", 5,
             "dense fp32 p=0, all five kernels (failed on the H200 at d396caf: issue #16 item 2)"),
    Selected(_T + "test_parity_with_oracle[M1-K33-N70-r1-float32-0.0]", 3,
             "dense fp32 p=0 at M=1, r=1 (the other H200 failure)"),
    *[Selected(_T + f"test_parity_with_oracle[M37-K70-N33-r13-{dt}-{p}]", 4 if p == "0.0" else 3,
               f"dense {dt} p={p}, all five kernels")
      for dt, p in (("float32", "0.3"), ("float16", "0.0"), ("float16", "0.3"), ("bfloat16", "0.0"),
                    ("bfloat16", "0.3"))],
    *[Selected(_H + f"test_parity_with_oracle[tail-first-M37-K70-N33-r13-{dt}-{p}]", 3,
               f"hybrid plan {dt} p={p}: cuBLAS GEMMs + the rank-r kernels")
      for dt in ("float32", "float16", "bfloat16") for p in ("0.0", "0.3")],
    Selected(_H + "test_parity_with_oracle[tail-after-M37-K70-N33-r13-bfloat16-0.3]", 3,
             "hybrid plan, the tail accumulated after the GEMM"),
    *[Selected(_Q + f"test_quantized_parity_with_oracle[{kind}-{shape}-{dt}-{route}]", 3,
               f"{kind} {dt} {route} route, p={p}")
      for kind in ("nf4", "int8") for dt in ("fp32", "fp16", "bf16")
      for shape, route, p in (("M37-K70-N33-r13", "fused", 0.3), ("M70-K48-N33-r8", "fused", 0),
                              ("M70-K48-N33-r8", "scratch", 0))
      if route == "fused" or kind == "nf4" or dt == "bf16"],
    Selected(_H + "test_quantized_base_takes_the_scratch_route[nf4-dq-torch.bfloat16]", 3,
             "hybrid plan on an NF4 base (scratch + cuBLAS)"),
    Selected(_H + "test_lora_linear_runs_the_hybrid_backend", 3, "functional -> autograd -> hybrid backend"),
    Selected("tests/test_plans.py -k first_use", 12,
             "the plans' first-use self-check (issue #15; the lead's tests, ~3 assumed)"),
    Selected(_T + "test_offsets_past_int32_cuda", 30,
             "x, dx with M*K > 2^31 elements, bf16 p=0.1 (8 GiB of CPU randn dominates)"),
    Selected(_X + "test_cuda_nf4_linear[1-4096-4096-bf16-nobias]", 2, "csrc/cuda NF4 GEMV, decode M=1, bf16"),
    Selected(_X + "test_cuda_nf4_linear[16-4104-1024-fp16-bias]", 2, "csrc/cuda NF4 GEMV, M=16, fp16, bias"),
    Selected(_X + "test_cuda_nf4_linear[17-64-256-fp32-nobias]", 1, "csrc/cuda nf4_linear fallback (M > 16), fp32"),
    Selected(_X + "test_cuda_dequantize_matches_cpu[(300, 1111)-64]", 2, "csrc/cuda NF4 dequant, odd shape"),
    Selected(_X + "test_cuda_opcheck[nf4_linear]", 3, "torch.library opcheck of the CUDA nf4_linear"),
    Selected(_T + "test_fused_shrink[torch.bfloat16-0.3]", 3, "F2 with the shrink fused in, bf16 p=0.3"),
    Selected(_T + "test_split_reductions[P3-S2]", 3, "B1's dB partials over several 64-row tiles, B3's splits"),
    Selected(_T + "test_keep_mask_matches_philox[0.3-M5-K48]", 2, "the Philox mask kernel (4 elements a call)"),
    Selected(_T + "test_lora_linear_autograd", 4, "functional -> LoRAFunction -> triton on a 3-D input"),
]  # fmt: skip
PYTEST_STARTUP_S = 15  # import torch + triton + collection of the files below

# --------------------------------------------------------------------------- the benchmark rows
# ``python -m benchmarks --only`` patterns over the default GPU suite (a case runs when its name
# contains any): LoRA r=16 p=0 and 0.1 and r=64 p=0.1 at bf16 M=8192 K=N=4096, DoRA p=0 and
# 0.1 and NF4 training at that shape (the r16 patterns match their -dora / -nf4 cases too), NF4
# decode M=1 and 16 (with the csrc/cuda GEMV row), and the NF4 fused/scratch crossover M.
BENCH_ONLY = [
    "M8192-K4096-N4096-r16-p0-bfloat16",
    "M8192-K4096-N4096-r16-p0.1-bfloat16",
    "M8192-K4096-N4096-r64-p0.1-bfloat16",
    "M1-K4096-N4096",
    "M16-K4096-N4096",
    "M64-K4096-N4096",
    "M256-K4096-N4096",
    "M1024-K4096-N4096",
]
BENCH_SKIP_IMPLS = ("reference",)  # the oracle decides nothing and costs 6 ms a call at p=0.1
BENCH_FIRST_EXTRA_S = 10  # the first case also compiles and tunes (<= 20 s target, issue #15)
# do_bench with 10 ms of warm-up and 50 ms of repetitions (the suite's: 25 / 100), 3 rounds: 150
# samples an implementation and mode, ~0.1 s a do_bench, so a case costs seconds, not tens
BENCH_TIMING = {"rounds": 3, "warmup_ms": 10, "rep_ms": 50}

STAGE_EST = {"env": 5, "install": 90, "profile": 35, "pack": 5}
E2E_EST_S = 150  # a Llama-3.2-1B-shaped step: model build, new shapes to tune, 2 x 13 steps
INSTALL_NOTE = "measured 19 s without the CUDA extension (H200, 2026-12-04); with csrc/cuda an estimate"


def bench_case_est(case) -> float:
    """Seconds for one case once tuning is pinned or cached (the autotuned ones took 22-38 s):
    banks, smoke calls and saved-bytes probes, then ~0.1 s a do_bench for each implementation
    (6 rows; 9 on an NF4 base), mode (2) and round (3)."""
    if case.M >= 4096:
        return 10.0 if case.variant == "nf4" else 8.0
    return 7.0


def bench_cases():
    """The default GPU suite's cases that :data:`BENCH_ONLY` selects (needs no GPU)."""
    import torch

    from . import cases

    return [c for c in cases.op_cases(torch.device("cuda"), "default") if any(t in c.name for t in BENCH_ONLY)]


# --------------------------------------------------------------------------- pytest plugin
# Active only when pytest loads this module with ``-p benchmarks.gpu_quick`` and GPU_QUICK_SELECT
# is set. It keeps the selected items (in SELECTION's order), skips what is left once the
# deadline passes, and writes one JSON line per test as it finishes (nothing is lost to a kill).
def _selection_from_env() -> list[Selected]:
    path = os.environ.get("GPU_QUICK_SELECTION")
    if not path:
        return SELECTION
    with open(path) as f:
        return [Selected(**d) for d in json.load(f)]


def pytest_collection_modifyitems(session, config, items):  # pragma: no cover - runs inside pytest
    if not os.environ.get("GPU_QUICK_SELECT"):
        return
    sel = _selection_from_env()
    rank, keep, drop = {}, [], []
    for it in items:
        i = next((i for i, s in enumerate(sel) if s.matches(it.nodeid)), None)
        if i is None:
            drop.append(it)
        else:
            rank[it.nodeid] = i
            keep.append(it)
    keep.sort(key=lambda it: rank[it.nodeid])  # stable: -k entries keep pytest's order
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    report = os.environ.get("GPU_QUICK_REPORT")
    if report:
        matched = {s.entry: [it.nodeid for it in keep if s.matches(it.nodeid)] for s in sel}
        with open(report, "w") as f:
            json.dump({"matched": matched, "unmatched": [e for e, ids in matched.items() if not ids]}, f, indent=1)


def pytest_runtest_setup(item):  # pragma: no cover
    deadline = os.environ.get("GPU_QUICK_DEADLINE")
    if os.environ.get("GPU_QUICK_SELECT") and deadline and time.time() > float(deadline):
        import pytest

        pytest.skip("the quick check's test budget is spent")


def pytest_runtest_logreport(report):  # pragma: no cover
    path = os.environ.get("GPU_QUICK_TESTS_JSONL")
    if not (os.environ.get("GPU_QUICK_SELECT") and path):
        return
    if report.when == "call" or report.outcome != "passed":  # one line a test: its call, or what stopped it
        msg = None
        if report.outcome != "passed":
            lr = report.longrepr
            msg = (lr[2] if isinstance(lr, tuple) else str(lr))[-1500:] if lr is not None else None
        with open(path, "a") as f:
            rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                   "duration_s": round(report.duration, 3), "message": msg}  # fmt: skip
            f.write(json.dumps(rec) + "\n")


def tests_command(files: list[str], junit: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The pytest command of the test stage and the environment it adds (the pin included)."""
    argv = [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_quick", "-p", "no:cacheprovider",
            "-q", "-rfEs", "--tb=short", "--durations=10", *files]  # fmt: skip
    if junit:
        argv.append(f"--junitxml={junit}")
    try:
        import pytest_timeout  # noqa: F401

        argv.append("--timeout=120")
    except ImportError:
        pass
    return argv, {**PIN_ENV, "GPU_QUICK_SELECT": "1"}


# --------------------------------------------------------------------------- running stages
class Log:
    """Prints to the console and appends to the run's log file."""

    def __init__(self, path: str | None):
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, msg: str = "") -> None:
        with self.lock:
            print(msg, flush=True)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(msg + "\n")


def run_stage(log: Log, argv: list[str], timeout: float, env: dict | None = None, logfile: str | None = None) -> dict:
    """Run one stage as a subprocess (its own process group), streaming its output; stop it at
    ``timeout`` seconds. Returns rc (None when stopped), seconds taken and whether it timed out."""
    t0 = time.time()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)  # compiled, never interpreted, on the GPU machine
    full_env["PYTHONUNBUFFERED"] = "1"
    log(f"$ {shlex.join(argv)}  (limit {timeout:.0f} s)")
    if timeout <= 1:
        log("  skipped: no time left in the budget")
        return {"rc": None, "seconds": 0.0, "timed_out": True, "skipped": True}
    proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)  # fmt: skip
    sink = open(logfile, "a") if logfile else None

    def pump() -> None:
        for line in proc.stdout:
            if sink:
                sink.write(line)
            if not sink or not line.startswith(" "):  # a build log goes to its file, not the console
                log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"  stopped: past its {timeout:.0f} s limit")
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # the group this call started, by its id
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    if sink:
        sink.close()
    return {"rc": None if timed_out else proc.returncode, "seconds": round(time.time() - t0, 1), "timed_out": timed_out}


_ENV_PROBE = r"""
import json, os, platform, shutil, subprocess
out = {"python": platform.python_version(), "cpus": os.cpu_count()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
                   gpu_mem_gib=round(p.total_memory / 2**30, 1))
    from torch.utils import cpp_extension
    out.update(ninja=cpp_extension.is_ninja_available(), cuda_home=cpp_extension.CUDA_HOME)
except Exception as exc:
    out["torch_error"] = repr(exc)
import importlib.metadata as md
for d in ("triton", "peft", "transformers", "bitsandbytes", "pytest", "numpy"):
    try:
        out[d] = md.version(d)
    except md.PackageNotFoundError:
        out[d] = None
nvcc = shutil.which("nvcc") or (out.get("cuda_home") and os.path.join(out["cuda_home"], "bin", "nvcc"))
try:
    res = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20)
    out["nvcc"] = res.stdout.strip().splitlines()[-1]
except Exception:
    out["nvcc"] = None
try:
    q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm"
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=" + q, "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    out["driver"] = out["nvidia_smi"].split(",")[1].strip()
except Exception:
    out["nvidia_smi"] = out["driver"] = None
print("GPU_QUICK_ENV " + json.dumps(out))
"""

_EXT_PROBE = r"""
import json, torch
out = {}
try:
    import fastlora
    from fastlora import _ext
    out["cpp_ext"] = getattr(_ext, "_C", None) is not None or getattr(_ext, "available", lambda: None)() is True
    from fastlora.quant import _ops
    out["cuda_ext"] = bool(torch.cuda.is_available() and _ops.has_kernel("nf4_linear", "cuda"))
    out["backends"] = fastlora.available_backends()
    out["plan_table_api"] = hasattr(fastlora, "plan_table")
except Exception as exc:
    out["error"] = repr(exc)
print("GPU_QUICK_EXT " + json.dumps(out))
"""


def _probe(log: Log, code: str, tag: str, timeout: float = 60) -> dict:
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                             env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    except subprocess.TimeoutExpired:
        log(f"  {tag}: probe timed out")
        return {}
    for line in res.stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    log(f"  {tag}: probe failed: {res.stderr.strip()[-500:]}")
    return {}


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def pin_supported() -> bool:
    """Whether this tree's Triton code reads FASTLORA_TRITON_PIN (issue #15, the lead's)."""
    for root in ("fastlora", "triton_kernels"):
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), errors="replace") as f:
                        if "FASTLORA_TRITON_PIN" in f.read():
                            return True
    return False


# --------------------------------------------------------------------------- dry run
def plan_lines(budget: float = BUDGET_S) -> tuple[list[str], float, float]:
    """What a run does, one line each with its estimated seconds; the required total and the
    total with the optional end-to-end step. Needs no GPU."""
    lines = [f"{'stage':<8} {'est s':>6}  item"]

    def add(stage: str, s: float, what: str) -> None:
        lines.append(f"{stage:<8} {s:>6.0f}  {what}")

    add("env", STAGE_EST["env"], "versions and device: nvidia-smi, torch, triton, CUDA, driver, nvcc, ninja, commit")
    add("install", STAGE_EST["install"], f"pip install -e . with csrc/cuda, ninja, MAX_JOBS=nproc ({INSTALL_NOTE})")
    tests_total = PYTEST_STARTUP_S
    add(
        "tests",
        PYTEST_STARTUP_S,
        "pytest startup and collection, FASTLORA_TRITON_PIN=1 (compiled, one config a kernel)",
    )
    for t in SELECTION:
        here = os.path.exists(os.path.join(REPO, t.path))
        add("tests", t.est_s, t.entry + ("" if here else "   (file not in this tree: skipped)") + f"  -- {t.covers}")
        tests_total += t.est_s
    bench_total = 0.0
    from .cases import VARIANT_IMPLS

    for i, c in enumerate(bench_cases()):
        s = bench_case_est(c) + (BENCH_FIRST_EXTRA_S if i == 0 else 0)
        impls = [n for n in VARIANT_IMPLS.get(c.variant, ()) if n not in BENCH_SKIP_IMPLS]
        add("bench", s, f"{c.name} [{', '.join(c.modes)}] {', '.join(impls)}")
        bench_total += s
    add(
        "profile",
        STAGE_EST["profile"],
        "per-kernel time of one fwd+bwd step: base, peft, torch, hybrid, fused, auto; p=0, 0.1",
    )
    add("pack", STAGE_EST["pack"], "results.tgz (benchmarks/results/<device>/gpu_quick*), summary, log into $OUT")
    required = (
        STAGE_EST["env"] + STAGE_EST["install"] + tests_total + bench_total + STAGE_EST["profile"] + STAGE_EST["pack"]
    )
    add("e2e", E2E_EST_S, f"optional: Llama step p=0.1 then p=0 (benchmarks/e2e.py), only if >= {E2E_EST_S} s remain")
    lines.append(
        f"subtotals: install {STAGE_EST['install']} s, tests {tests_total:.0f} s ({len(SELECTION)} entries), "
        f"bench {bench_total:.0f} s ({len(bench_cases())} cases), profile {STAGE_EST['profile']} s"
    )
    lines.append(
        f"total (required): {required:.0f} s = {required / 60:.1f} min; with e2e {required + E2E_EST_S:.0f} s; "
        f"budget {budget:.0f} s (the call's limit is 8 min = 480 s; the machine's start, 1-2 min, comes on top)"
    )
    return lines, required, required + E2E_EST_S


def dry_run(budget: float) -> int:
    lines, required, _ = plan_lines(budget)
    print("fastlora quick GPU check (issue #16), dry run: nothing is run. Estimates: compiled tests with pinned")
    print("configs are 2-4 s each (not yet timed on a GPU); benchmark cases 7-10 s once tuning is pinned/cached")
    print(
        "(22-38 s each when autotuned, measured); this tree reads FASTLORA_TRITON_PIN: "
        + ("yes" if pin_supported() else "NO (the tests would autotune)")
    )
    print("\n".join(lines))
    print(
        "bench selection = python -m benchmarks --device cuda --no-e2e "
        + " ".join(f"--only {t}" for t in BENCH_ONLY)
        + " (minus "
        + ", ".join(BENCH_SKIP_IMPLS)
        + ")"
    )
    print(
        "command: bash benchmarks/gpu_check.sh quick   "
        "(device tool: timeout_s=480; writes $OUT/results.tgz, summary.txt, quick.log)"
    )
    return 0 if required <= budget else 1


# --------------------------------------------------------------------------- bench and e2e
def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def bench_main(out: str, deadline: float) -> int:
    """The benchmark stage (a subprocess of ``run``): the selected cases one at a time, rows
    written after each; no case starts that its estimate says would end past ``deadline``."""
    import torch

    from . import cases, harness

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = harness.metadata(device, "gpu-quick", ["--only", *BENCH_ONLY])
    impls, notes = cases.usable_impls(device)
    impls = [i for i in impls if i.name not in BENCH_SKIP_IMPLS]
    for n in notes:
        print(f"note: {n}")
    todo = bench_cases() if device.type == "cuda" else []
    rows, all_notes, done = [], list(notes), []
    tcfg = harness.TimingConfig(**BENCH_TIMING)
    meta["timing"] = BENCH_TIMING
    for i, case in enumerate(todo):
        est = bench_case_est(case) + (BENCH_FIRST_EXTRA_S if i == 0 else 0)
        if done:  # scale the estimate by how the finished cases compared with theirs
            est *= sum(d for d, _ in done) / sum(e for _, e in done)
        if time.time() + est > deadline:
            msg = f"{case.name}: not run, the budget has {deadline - time.time():.0f} s left (needs ~{est:.0f} s)"
            print(f"note: {msg}")
            all_notes.append(msg)
            continue
        t0 = time.time()
        print(f"[{i + 1}/{len(todo)}] {case.name}", flush=True)
        try:
            r, n = cases.run_case(case, device, impls, tcfg)
        except Exception as exc:
            r, n = [], [f"{case.name}: failed ({type(exc).__name__}: {exc}); case skipped"]
            torch.cuda.empty_cache()
        dt = time.time() - t0
        done.append((dt, bench_case_est(case) + (BENCH_FIRST_EXTRA_S if i == 0 else 0)))
        for msg in n:
            print(f"note: {msg}")
        rows += [{**x, "case_seconds": round(dt, 1), "meta": meta} for x in r]
        all_notes += n
        _write_json(out, {"meta": meta, "rows": rows, "notes": all_notes, "plan_table": _plan_table()})
        print(f"  {len(r)} rows in {dt:.1f} s", flush=True)
    _write_json(out, {"meta": meta, "rows": rows, "notes": all_notes, "plan_table": _plan_table()})
    return 0


def _plan_table() -> list | None:
    try:
        import fastlora
    except Exception:
        return None
    table = getattr(fastlora, "plan_table", None)
    if table is None:
        return None
    try:
        return json.loads(json.dumps(list(table()), default=str))
    except Exception as exc:
        return [{"error": repr(exc)}]


def e2e_main(out: str, deadline: float) -> int:
    """The optional end-to-end stage: the default GPU suite's Llama configs, p=0.1 first."""
    import torch

    from . import e2e, harness

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = harness.metadata(device, "gpu-quick-e2e", [])
    cfgs = sorted(e2e.e2e_configs(device, "default"), key=lambda c: -c.p)
    rows, notes = [], []
    for cfg in cfgs:
        if time.time() + E2E_EST_S / 2 > deadline:
            notes.append(f"{cfg.name}: not run, {deadline - time.time():.0f} s left")
            continue
        r, n = e2e.run_e2e(cfg, device)
        rows += [{**x, "meta": meta} for x in r]
        notes += n
        _write_json(out, {"meta": meta, "rows": rows, "notes": notes})
    _write_json(out, {"meta": meta, "rows": rows, "notes": notes})
    return 0


# --------------------------------------------------------------------------- summary
AUTO = "fastlora-auto"
SUMMARY_IMPLS = ("peft", "fastlora-torch", "fastlora-hybrid", "fastlora-triton", AUTO, "nf4-gemv")
SHORT = {"peft": "peft", "fastlora-torch": "torch", "fastlora-hybrid": "hybrid", "fastlora-triton": "fused",
         AUTO: "auto", "nf4-gemv": "gemv"}  # fmt: skip


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def targets(rows: list[dict], e2e_rows: list[dict] | None = None) -> list[dict]:
    """DESIGN.md 7 / issue #15 targets from the rows of a run: name, value, limit, status
    (PASS, FAIL or n/a when the run has no row for it)."""
    op = [r for r in rows if r.get("kind") == "op"]
    out: list[dict] = []

    def get(impl, mode, variant="lora", **shape):
        for r in op:
            if r["impl"] == impl and r["mode"] == mode and r.get("variant", "lora") == variant:
                if all(r.get(k) == v for k, v in shape.items()):
                    return r
        return None

    def add(name, value, limit, ok, detail=""):
        status = "n/a" if value is None else ("PASS" if ok(value) else "FAIL")
        out.append({"target": name, "value": value, "limit": limit, "status": status, "detail": detail})

    lora = [r for r in op if r.get("variant", "lora") == "lora"]
    head = None
    if lora:
        r0 = lora[0]  # the first LoRA case of the run is its headline shape
        head = {k: r0[k] for k in ("M", "K", "N", "r", "dtype")}
    hs = "x".join(str(head[k]) for k in ("M", "K", "N")) + f" r{head['r']} {head['dtype']}" if head else "-"
    for p, speed in ((0.0, 1.15), (0.1, 1.3)):
        a = get(AUTO, "fwdbwd", p=p, **head) if head else None
        plan = f"plan {a['plan']}" if a else ""
        add(
            f"headline {hs} p={p:g} fwd+bwd: auto / frozen base",
            a and a["ratio_to_base"],
            "<= 1.12",
            lambda v: v <= 1.12,
            plan,
        )
        add(
            f"headline {hs} p={p:g} fwd+bwd: auto speed over PEFT",
            a and a["speedup_vs_peft"],
            f">= {speed}",
            lambda v, s=speed: v >= s,
            plan,
        )
        f = get(AUTO, "fwd", p=p, **head) if head else None
        add(
            f"headline {hs} p={p:g} fwd: auto / frozen base fwd",
            f and f["ratio_to_base"],
            "<= 1.08",
            lambda v: v <= 1.08,
            f"plan {f['plan']}" if f else "",
        )
    slow = [r for r in op if r["impl"] == AUTO and r["variant"] in ("lora", "dora", "nf4")
            and r.get("speedup_vs_peft") is not None]  # fmt: skip
    worst = min(slow, key=lambda r: r["speedup_vs_peft"]) if slow else None
    add(
        "every LoRA/DoRA/NF4 case and mode: auto not slower than PEFT (worst)",
        worst and worst["speedup_vs_peft"],
        ">= 1.0",
        lambda v: v >= 1.0,
        worst and f"{worst['case']} {worst['mode']}, plan {worst['plan']}",
    )
    for p in (0.0, 0.1):
        d = get(AUTO, "fwdbwd", "dora", p=p, **head) if head else None
        lo = get(AUTO, "fwdbwd", p=p, **head) if head else None
        v = d["median_ms"] / lo["median_ms"] if d and lo else None
        add(
            f"DoRA p={p:g} fwd+bwd: auto DoRA / auto LoRA",
            v,
            "<= 1.25",
            lambda v: v <= 1.25,
            d and f"plans {d['plan']} / {lo['plan']}" if d and lo else "",
        )
    q = get(AUTO, "fwdbwd", "nf4", p=0.0, **head) if head else None
    lo = get(AUTO, "fwdbwd", p=0.0, **head) if head else None
    add(
        "NF4 base fwd+bwd: auto on NF4 / auto on the dense base",
        q["median_ms"] / lo["median_ms"] if q and lo else None,
        "<= 1.10",
        lambda v: v <= 1.10,
        f"plan {q['plan']}" if q else "",
    )
    for M in sorted({r["M"] for r in op if r["variant"] == "nf4" and r["mode"] == "infer" and r["M"] <= 16}):
        cands = [r for r in op if r["variant"] == "nf4" and r["mode"] == "infer" and r["M"] == M
                 and r["impl"] in (AUTO, "nf4-gemv")]  # fmt: skip
        best = min(cands, key=lambda r: r["ratio_to_base"]) if cands else None
        add(
            f"NF4 decode M={M} (infer): best of auto / nf4-gemv over F.linear",
            best and best["ratio_to_base"],
            "<= 0.33",
            lambda v: v <= 0.33,
            best and ", ".join(f"{c['impl']} {c['ratio_to_base']:.2f}" for c in cands),
        )
    s = get(AUTO, "fwd", p=0.1, **head) if head else None
    add("saved activations q/k/v at p=0.1: auto / PEFT", s and s["saved_qkv_vs_peft"], "<= 0.25", lambda v: v <= 0.25)
    firsts = [
        r for r in op if r["impl"] == AUTO and r.get("first_call_s") is not None and r["variant"] != "host-overhead"
    ]
    fmax = max(firsts, key=lambda r: r["first_call_s"]) if firsts else None
    add(
        "first fwd+bwd at a new shape (compile + tuning + auto's timing), worst case",
        fmax and fmax["first_call_s"],
        "<= 20 s",
        lambda v: v <= 20,
        fmax and fmax["case"],
    )
    ho = [r for r in op if r["variant"] == "host-overhead" and r.get("ratio_to_peft_math") is not None
          and r["family"] == "fastlora"]  # fmt: skip
    for r in ho:
        add(
            f"host overhead M{r['M']} K{r['K']} N{r['N']} r{r['r']} p={r['p']:g}: {r['impl']} / PEFT's math (torch)",
            r["ratio_to_peft_math"],
            "<= 1.25",
            lambda v: v <= 1.25,
        )
    for r in e2e_rows or []:
        if r.get("kind") == "e2e" and r.get("family") == "fastlora" and r.get("p", 0) > 0:
            add(f"end to end {r['case']}: tokens/s over PEFT", r.get("speedup_vs_peft"), ">= 1.15", lambda v: v >= 1.15)
    return out


def summary_text(rows: list[dict], e2e_rows=None, profile=None, tests=None, stages=None, env=None) -> str:
    """The table printed at the end of a run (and saved as gpu_quick_summary.txt)."""
    out = []
    if env:
        out.append(f"device {env.get('gpu') or env.get('device') or '?'}; torch {env.get('torch')}, triton "
                   f"{env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}; commit "
                   f"{str(env.get('commit'))[:12]}{' (dirty)' if env.get('dirty') else ''}")  # fmt: skip
    if stages:
        parts = []
        for k, v in stages.items():
            stopped = " (stopped)" if v.get("timed_out") else ""
            rc = f" rc={v['rc']}" if v.get("rc") not in (0, None) else ""
            parts.append(f"{k} {v.get('seconds', 0):.0f} s{stopped}{rc}")
        out.append("stages: " + "; ".join(parts))
    if tests is not None:
        by = {}
        for t in tests:
            by[t["outcome"]] = by.get(t["outcome"], 0) + 1
        out.append("tests: " + (", ".join(f"{n} {k}" for k, n in sorted(by.items())) or "none ran"))
        for t in tests:
            if t["outcome"] == "failed":
                first = (t.get("message") or "").strip().splitlines()
                out.append(f"  FAILED {t['nodeid']}: {first[-1][:160] if first else ''}")
    op = [r for r in rows if r.get("kind") == "op"]
    if op:
        heads = [SHORT[i] for i in SUMMARY_IMPLS]
        hdr = (
            f"{'case':<40} {'mode':<7} {'base ms':>8} "
            + " ".join(f"{h:>7}" for h in heads)
            + f" {'auto plan':<10} {'auto xPEFT':>10}"
        )
        out += [
            "",
            "time / frozen base (x base), per implementation; auto xPEFT = PEFT's time / auto's",
            hdr,
            "-" * len(hdr),
        ]
        keys = []
        for r in op:
            k = (r["case"], r["mode"])
            if k not in keys:
                keys.append(k)
        for case, mode in keys:
            rs = {r["impl"]: r for r in op if r["case"] == case and r["mode"] == mode}
            base = rs.get("base")
            cells = " ".join(f"{_f(rs[i]['ratio_to_base']) if i in rs else '-':>7}" for i in SUMMARY_IMPLS)
            a = rs.get(AUTO)
            out.append(f"{case:<40} {mode:<7} {_f(base and base['median_ms'], '.3f'):>8} {cells} "
                       f"{(a and a.get('plan')) or '-':<10} {_f(a and a.get('speedup_vs_peft')):>10}")  # fmt: skip
    if profile:
        out += ["", "per-kernel profile, one fwd+bwd step (ms): step = kernels + host"]
        for p in profile.get("runs", []):
            for pl in p.get("plans", []):
                out.append(f"  p={p['p']:<4g} {pl['plan']:<7} {(pl.get('chosen') or ''):<8} step {pl['step_ms']:8.3f}  "
                           f"kernels {pl['kernel_ms']:8.3f}  host {pl['host_ms']:8.3f}  "
                           f"top: {pl['kernels'][0]['name'][:50] if pl['kernels'] else '-'}")  # fmt: skip
    tg = targets(rows, e2e_rows)
    if tg:
        out += ["", f"{'target (DESIGN.md 7 / issue #15)':<78} {'value':>8} {'limit':>8}  status"]
        for t in tg:
            v = t["value"]
            out.append(f"{t['target'][:78]:<78} {_f(v, '.3f') if isinstance(v, float) else _f(v, ''):>8} "
                       f"{t['limit']:>8}  {t['status']}{'  (' + t['detail'] + ')' if t['detail'] else ''}")  # fmt: skip
    return "\n".join(out)


# --------------------------------------------------------------------------- the whole run
def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _tests_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    end = t_start + args.budget
    out_root = os.environ.get("OUT") or args.out or os.path.join("/tmp", "fastlora-gpu-quick")
    work = args.work or os.path.join("/tmp", "fastlora-gpu-quick-work")
    os.makedirs(out_root, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    console = os.path.join(out_root, "quick.log")
    open(console, "w").close()
    log = Log(console)
    log(f"fastlora quick GPU check: budget {args.budget:.0f} s, results into {out_root}")

    env = _probe(log, _ENV_PROBE, "GPU_QUICK_ENV")
    env.update(commit=_git("rev-parse", "HEAD") or "unknown",
               dirty=bool(_git("status", "--porcelain", "--", "fastlora", "csrc", "triton_kernels", "benchmarks")),
               command="bash benchmarks/gpu_check.sh quick " + shlex.join(args.argv),
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"), budget_s=args.budget,
               env_vars={k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)})  # fmt: skip
    log("env: " + json.dumps(env))
    slug = re.sub(r"[^a-z0-9]+", "-", (env.get("gpu") or "no-gpu").lower()).strip("-")
    res = os.path.join(work, "tree", "benchmarks", "results", slug)
    os.makedirs(res, exist_ok=True)
    paths = {k: os.path.join(res, f"gpu_quick{k}") for k in ("", "_bench", "_e2e", "_tests", "_summary", "_profile")}
    stages: dict[str, dict] = {"env": {"seconds": round(time.time() - t_start, 1), "rc": 0}}
    install: dict = {}

    def left(reserve: float = 0) -> float:
        return end - time.time() - reserve

    def checkpoint(final: bool = False) -> None:
        bench = _load(os.path.join(work, "bench.json"))
        e2e_d = _load(os.path.join(work, "e2e.json"))
        prof = _load(paths["_profile"] + ".json")
        tests = _tests_records(os.path.join(work, "tests.jsonl"))
        rows, e2e_rows = bench.get("rows", []), e2e_d.get("rows", [])
        summary = summary_text(rows, e2e_rows, prof, tests, stages, env)
        with open(paths["_summary"] + ".txt", "w") as f:
            f.write(summary + "\n")
        meta = {
            **(bench.get("meta") or {}),
            "env": env,
            "suite": "gpu-quick",
            "command": env.get("command"),
            "bench_equivalent": bench.get("meta", {}).get("command"),
        }
        _write_json(paths[""] + ".json", {
            "meta": meta, "env": env, "install": install, "stages": stages, "tests": tests,
            "selection": [t.__dict__ for t in SELECTION], "bench_only": BENCH_ONLY,
            "rows": rows + e2e_rows, "notes": bench.get("notes", []) + e2e_d.get("notes", []),
            "plan_table": bench.get("plan_table"), "targets": targets(rows, e2e_rows),
            "profile_summary": [{k: v for k, v in pl.items() if k != "kernels"} | {"p": run["p"]}
                                for run in prof.get("runs", []) for pl in run.get("plans", [])],
        })  # fmt: skip
        for name in ("quick.log",):
            src = os.path.join(out_root, name)
            if os.path.exists(src):
                with open(src) as fi, open(paths[""] + ".log", "w") as fo:
                    fo.write(fi.read())
        tgz = os.path.join(out_root, "results.tgz")
        with tarfile.open(tgz + ".tmp", "w:gz") as tar:
            tar.add(os.path.join(work, "tree", "benchmarks"), arcname="benchmarks")
        os.replace(tgz + ".tmp", tgz)
        with open(os.path.join(out_root, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        if final:
            log("\n" + summary)

    # ---- install
    if args.no_install:
        log("install: skipped (--no-install)")
    else:
        build_log = paths[""] + "_build.log"
        jobs = str(os.cpu_count() or 1)
        base_env = {"MAX_JOBS": jobs}
        if env.get("capability") and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            base_env["TORCH_CUDA_ARCH_LIST"] = env["capability"]  # this GPU only: one nvcc pass
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
        for what, extra, cap in (("with csrc/cuda", {}, 180), ("CPU extension only", {"FASTLORA_NO_CUDA": "1"}, 90),
                                 ("no extension", {"FASTLORA_NO_EXT": "1"}, 45)):  # fmt: skip
            log(f"install ({what}; MAX_JOBS={jobs}, ninja={env.get('ninja')}):")
            st = run_stage(log, pip, min(cap, left(200)), {**base_env, **extra}, logfile=build_log)
            install.setdefault("attempts", []).append({"what": what, **st})
            if st["rc"] == 0:
                install.update(built=what, seconds=st["seconds"])
                break
        stages["install"] = {"seconds": sum(a["seconds"] for a in install["attempts"]),
                             "rc": 0 if install.get("built") else 1}  # fmt: skip
        install.update(_probe(log, _EXT_PROBE, "GPU_QUICK_EXT"))
        log("install: " + json.dumps(install))
        if not install.get("built"):
            log("install failed in every form: see gpu_quick_build.log")
    checkpoint()

    # ---- tests
    if "tests" not in args.skip:
        if not pin_supported():
            log("note: this tree does not read FASTLORA_TRITON_PIN yet: the tests autotune (~8 s a test)")
        files = sorted({t.path for t in SELECTION if os.path.exists(os.path.join(REPO, t.path))})
        missing = sorted({t.path for t in SELECTION} - set(files))
        if missing:
            log(f"note: not in this tree, their entries skipped: {', '.join(missing)}")
        jsonl = os.path.join(work, "tests.jsonl")
        open(jsonl, "w").close()
        argv, tenv = tests_command(files, os.path.join(work, "junit.xml"))
        cap = min(200.0, left(150))  # leave the bench and the profile their share
        tenv.update(GPU_QUICK_DEADLINE=str(time.time() + cap - 15), GPU_QUICK_TESTS_JSONL=jsonl,
                    GPU_QUICK_REPORT=os.path.join(work, "selection.json"),
                    # its own Triton cache: the bench's first calls compile as a user's would
                    TRITON_CACHE_DIR=os.path.join(work, "triton-cache-tests"))  # fmt: skip
        stages["tests"] = run_stage(log, argv, cap, tenv, logfile=paths["_tests"] + ".log")
        sel = _load(os.path.join(work, "selection.json"))
        if sel.get("unmatched"):
            log(f"note: selection entries that matched no test: {sel['unmatched']}")
        checkpoint()

    # ---- bench
    if "bench" not in args.skip:
        bench_deadline = end - STAGE_EST["profile"] - 15
        argv = [sys.executable, "-m", "benchmarks.gpu_quick", "bench", "--json", os.path.join(work, "bench.json"),
                "--deadline", str(bench_deadline)]  # fmt: skip
        benv = {"FASTLORA_CACHE_DIR": os.path.join(work, "cache")}
        stages["bench"] = run_stage(log, argv, bench_deadline - time.time() + 20, benv)
        checkpoint()

    # ---- profile
    if "profile" not in args.skip:
        argv = [sys.executable, "-m", "benchmarks.profile_step", "--out", res, "--prefix", "gpu_quick_profile"]
        penv = {"FASTLORA_CACHE_DIR": os.path.join(work, "cache")}
        stages["profile"] = run_stage(log, argv, min(90.0, left(10)), penv)
        checkpoint()

    # ---- e2e, when there is room
    if "e2e" not in args.skip:
        if left(15) >= E2E_EST_S:
            argv = [sys.executable, "-m", "benchmarks.gpu_quick", "e2e", "--json", os.path.join(work, "e2e.json"),
                    "--deadline", str(end - 15)]  # fmt: skip
            stages["e2e"] = run_stage(log, argv, left(10), {"FASTLORA_CACHE_DIR": os.path.join(work, "cache")})
        else:
            log(f"e2e: skipped, {left():.0f} s left (needs ~{E2E_EST_S} s)")
            stages["e2e"] = {"seconds": 0.0, "rc": None, "skipped": True}
    stages["total"] = {"seconds": round(time.time() - t_start, 1), "rc": 0}
    checkpoint(final=True)
    log(
        f"\nresults: {os.path.join(out_root, 'results.tgz')} (benchmarks/results/{slug}/gpu_quick*: "
        f"land with `tar xzf results.tgz` in the repository root), {os.path.join(out_root, 'summary.txt')}"
    )
    failed = [s for s in ("install", "tests") if stages.get(s, {}).get("rc") not in (0, None)]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_quick", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole quick check (what `gpu_check.sh quick` runs)")
    r.add_argument("--dry-run", action="store_true", help="list what it would run and its estimated time; run nothing")
    r.add_argument("--budget", type=float, default=float(os.environ.get("GPU_QUICK_BUDGET", BUDGET_S)))
    r.add_argument("--out", help="where results.tgz, summary.txt and quick.log go when $OUT is unset")
    r.add_argument("--work", help="scratch folder (default /tmp/fastlora-gpu-quick-work)")
    r.add_argument("--no-install", action="store_true", help="use the package as installed")
    r.add_argument("--skip", action="append", default=[], choices=("tests", "bench", "profile", "e2e"))
    for name in ("bench", "e2e"):
        s = sub.add_parser(name, help=f"(internal) the {name} stage")
        s.add_argument("--json", required=True)
        s.add_argument("--deadline", type=float, required=True)
    s = sub.add_parser("summary", help="print the summary of a gpu_quick.json")
    s.add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        args.argv = [a for a in argv if a != "run"]
        return dry_run(args.budget) if args.dry_run else run(args)
    if args.cmd == "bench":
        return bench_main(args.json, args.deadline)
    if args.cmd == "e2e":
        return e2e_main(args.json, args.deadline)
    d = _load(args.path)
    rows = [r for r in d.get("rows", []) if r.get("kind") == "op"]
    e2e_rows = [r for r in d.get("rows", []) if r.get("kind") == "e2e"]
    print(summary_text(rows, e2e_rows, None, d.get("tests"), d.get("stages"), d.get("env")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
