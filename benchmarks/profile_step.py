"""Per-kernel time of one fwd+bwd step of each plan, so a regression shows where it is (issue #16).

    python -m benchmarks.profile_step                      # GPU: the headline shape, p=0 and 0.1
    python -m benchmarks.profile_step --device cpu --tiny  # CPU: a tiny shape (what CI runs)

For each plan (``base``: the frozen linear; ``peft``; ``torch``, ``hybrid``, ``fused``: fastlora
with that plan forced; ``auto``: what fastlora runs by default, with the plan it chose) on the
same tensors as the benchmark (benchmarks/cases.py's bank):

- ``step_ms``: the median time of one fwd+bwd step (GPU: ``triton.testing.do_bench``, L2
  flushed; CPU: wall clock);
- ``kernels``: per kernel name, the self device time per step (``torch.profiler``, CUDA
  activity; on CPU the self CPU time of each ATen op stands in for a kernel) and launches per
  step, over ``--steps`` profiled steps after one warm-up step;
- ``kernel_ms``: their sum; ``host_ms = step_ms - kernel_ms``: on a GPU the time the device
  waits for the host (launch and Python overhead), the loss DESIGN.md 3 measured first; on CPU
  the Python and dispatch time outside ATen ops. Profiling does not flush L2, timing does:
  a small negative host time is noise.

Writes ``<prefix>.txt`` (the tables) and ``<prefix>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import cases, harness

PLANS = {"base": "base", "peft": "peft", "torch": "fastlora-torch", "hybrid": "fastlora-hybrid",
         "fused": "fastlora-triton", "auto": "fastlora-auto"}  # fmt: skip
HEADLINE = dict(M=8192, K=4096, N=4096, r=16, dtype="bfloat16")
TINY = dict(M=64, K=64, N=48, r=8, dtype="float32")


def _kernel_table(prof, steps: int, device: torch.device) -> list[dict]:
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            if getattr(e, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
                continue  # host-side runtime calls (cudaLaunchKernel...) are not device time
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if e.key.startswith("ProfilerStep"):  # the profiler's own step marker, not an op
            continue
        if us > 0:
            rows.append({"name": e.key, "ms": us / steps / 1e3, "count": e.count / steps})
    rows.sort(key=lambda r: -r["ms"])
    return rows


def _step_ms(step, device: torch.device) -> float:
    if device.type == "cuda":
        return harness.quantile(harness._gpu_bench(step, harness.TimingConfig()), 0.5)
    ts, t_end = [], time.perf_counter() + 1.0
    while len(ts) < 5 or (time.perf_counter() < t_end and len(ts) < 200):
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
    return harness.quantile(ts, 0.5)


def profile_case(case: cases.OpCase, device: torch.device, plans: list[str], steps: int = 5) -> dict:
    """One entry per plan that runs here: step time, kernel table and sums; notes for the rest."""
    from torch.profiler import ProfilerActivity, profile, schedule

    bank = cases.make_bank(case, device)
    out, notes = [], []
    for plan in plans:
        impl = cases.IMPLS[PLANS[plan]]
        why = impl.available(device)
        if why is None and plan == "peft" and not bank.peft_layers:
            why = "peft is not installed"
        if why is not None:
            notes.append(f"{plan}: skipped ({why})")
            continue
        try:
            f = impl.layer(bank, 0)

            def step(f=f) -> None:
                bank.zero_grads()
                f(bank.x).backward(bank.g)

            for _ in range(3):
                step()
            harness._sync(device)
            chosen = cases.auto_plan(case, device)[0] if plan == "auto" else cases.PLAN_OF.get(impl.name)
            ms = _step_ms(step, device)
            act = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
            with profile(activities=[act], schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
                for _ in range(1 + steps):
                    step()
                    harness._sync(device)
                    prof.step()
            kernels = _kernel_table(prof, steps, device)
        except Exception as exc:
            notes.append(f"{plan}: failed ({type(exc).__name__}: {exc})")
            continue
        ksum = sum(k["ms"] for k in kernels)
        out.append(
            {
                "plan": plan,
                "impl": impl.name,
                "chosen": chosen,
                "step_ms": ms,
                "kernel_ms": ksum,
                "host_ms": ms - ksum,
                "launches": sum(k["count"] for k in kernels),
                "kernels": kernels,
            }
        )
    return {"p": case.p, "case": case.name, "plans": out, "notes": notes}


def format_run(run: dict, top: int = 12) -> str:
    unit = "device" if run.get("device_type") == "cuda" else "CPU (self time of ATen ops)"
    lines = [
        f"{run['case']}: one fwd+bwd step per plan, {unit} time in ms",
        f"{'plan':<7} {'impl':<16} {'chose':<8} {'step ms':>9} {'kernel ms':>10} {'host ms':>9} {'launches':>9}",
    ]
    for pl in run["plans"]:
        lines.append(
            f"{pl['plan']:<7} {pl['impl']:<16} {pl['chosen'] or '-':<8} {pl['step_ms']:>9.3f} "
            f"{pl['kernel_ms']:>10.3f} {pl['host_ms']:>9.3f} {pl['launches']:>9.1f}"
        )
    for pl in run["plans"]:
        lines.append(
            f"\n=== {pl['plan']} ({pl['impl']}{', chose ' + pl['chosen'] if pl['plan'] == 'auto' else ''}): "
            f"step {pl['step_ms']:.3f} ms = kernels {pl['kernel_ms']:.3f} + host {pl['host_ms']:.3f}"
        )
        for k in pl["kernels"][:top]:
            lines.append(f"  {k['ms']:9.4f} ms  x{k['count']:5.1f}  {k['name'][:110]}")
        if len(pl["kernels"]) > top:
            rest = pl["kernels"][top:]
            lines.append(f"  {sum(k['ms'] for k in rest):9.4f} ms  in {len(rest)} more")
    lines += [f"note: {n}" for n in run["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--tiny", action="store_true", help=f"the tiny shape {TINY} (the CPU default)")
    for k in ("M", "K", "N", "r"):
        ap.add_argument(f"--{k}", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--p", default="0,0.1", help="dropout values, comma-separated")
    ap.add_argument("--plans", default=",".join(PLANS), help="comma-separated, from " + ", ".join(PLANS))
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after one warm-up step)")
    ap.add_argument("--out", default=".", help="folder for <prefix>.txt and <prefix>.json")
    ap.add_argument("--prefix", default="profile")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    shape = dict(TINY if args.tiny or not cuda else HEADLINE)
    shape.update({k: getattr(args, k) for k in ("M", "K", "N", "r", "dtype") if getattr(args, k) is not None})
    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    bad = [p for p in plans if p not in PLANS]
    if bad:
        ap.error(f"unknown plans {bad}; choose from {list(PLANS)}")
    meta = harness.metadata(device, "profile", argv if argv is not None else sys.argv[1:])
    runs = []
    for p in (float(v) for v in args.p.split(",")):
        case = cases.OpCase(shape["M"], shape["K"], shape["N"], shape["r"], p, shape["dtype"], ("fwdbwd",))
        run = {**profile_case(case, device, plans, args.steps), "device_type": device.type}
        runs.append(run)
        print(format_run(run), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.prefix + ".txt"), "w") as f:
        f.write(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit'][:12]}, "
                f"{meta['date']}\n\n" + "\n\n".join(format_run(r, top=30) for r in runs) + "\n")  # fmt: skip
    with open(os.path.join(args.out, args.prefix + ".json"), "w") as f:
        json.dump({"meta": meta, "shape": shape, "steps": args.steps, "runs": runs}, f, indent=1)
        f.write("\n")
    print(f"profile: {os.path.join(args.out, args.prefix + '.txt')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
