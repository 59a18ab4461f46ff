"""The quick GPU check (benchmarks/gpu_quick.py, `bash benchmarks/gpu_check.sh quick`) on CPU.

No GPU here: these tests prove what can be proven without one. The selection collects (every
entry names at least one real test), the pytest stage passes the pinned-config variable and
keeps to its deadline, the dry run fits the 8-minute call, the profile script runs at a tiny
shape, and the summary's pass/fail logic reads rows as the GPU run will write them.
"""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is not installed: it runs from the repository root
    sys.path.insert(0, ROOT)

from benchmarks import cases, gpu_quick, harness, profile_step  # noqa: E402

try:
    import peft  # noqa: F401

    HAS_PEFT = True
except ImportError:
    HAS_PEFT = False


def test_every_selected_test_is_collected(tmp_path):
    """pytest --collect-only with the quick check's own plugin: every entry whose file exists
    matches at least one collected test (a renamed test or id would otherwise drop out of the
    GPU run silently); entries of files not in this tree are the only unmatched ones."""
    files = sorted({t.path for t in gpu_quick.SELECTION if os.path.exists(os.path.join(ROOT, t.path))})
    report = tmp_path / "selection.json"
    env = {**os.environ, "GPU_QUICK_SELECT": "1", "GPU_QUICK_REPORT": str(report)}
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "benchmarks.gpu_quick",
        "-p",
        "no:cacheprovider",
    ]
    res = subprocess.run(argv + files, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    sel = json.loads(report.read_text())
    absent = [t.entry for t in gpu_quick.SELECTION if t.path not in files]
    assert sorted(sel["unmatched"]) == sorted(absent), sel["unmatched"]
    for t in gpu_quick.SELECTION:
        if t.path in files:
            ids = sel["matched"][t.entry]
            assert ids and all(t.matches(i) for i in ids), t.entry
    n = sum(len(v) for v in sel["matched"].values())
    assert f"{n}/" in res.stdout  # pytest kept exactly the selected items
    assert all(t.est_s > 0 for t in gpu_quick.SELECTION)


def test_selection_covers_kernel_dtype_dropout_and_base():
    """Each dtype x dropout on/off x dense/NF4/int8 appears, for the fused and the hybrid plan,
    plus the first-use self-check, the > 2^31-element offsets test and the csrc/cuda kernels."""
    entries = [t.entry for t in gpu_quick.SELECTION]
    for dt in ("float32", "float16", "bfloat16"):
        for p in ("0.0", "0.3"):
            assert f"tests/test_triton.py::test_parity_with_oracle[M37-K70-N33-r13-{dt}-{p}]" in entries
    for kind in ("nf4", "int8"):
        for dt in ("fp32", "fp16", "bf16"):
            mine = [e for e in entries if f"[{kind}-" in e and f"-{dt}-" in e]
            assert any("-r13-" in e and e.endswith("-fused]") for e in mine), (kind, dt)  # p = 0.3
            assert any("-r8-" in e and e.endswith("-fused]") for e in mine), (kind, dt)  # p = 0
            assert any(e.endswith("-scratch]") for e in mine) == (kind == "nf4" or dt == "bf16"), (kind, dt)
    for dt in ("float32", "float16", "bfloat16"):  # the hybrid plan: cuBLAS + the rank-r kernels
        for p in ("0.0", "0.3"):
            assert f"tests/test_hybrid.py::test_parity_with_oracle[tail-first-M37-K70-N33-r13-{dt}-{p}]" in entries
    assert "tests/test_plans.py -k first_use" in entries
    assert "tests/test_triton.py::test_offsets_past_int32_cuda" in entries
    assert any("test_quant_ext.py::test_cuda_nf4_linear" in e for e in entries)
    assert len(set(entries)) == len(entries)


def test_tests_command_pins_one_config():
    argv, env = gpu_quick.tests_command(["tests/test_triton.py"])
    assert env["FASTLORA_TRITON_PIN"] == "1" and env["GPU_QUICK_SELECT"] == "1"
    assert argv[argv.index("-p") + 1] == "benchmarks.gpu_quick"


_PROBE_TESTS = """
import os, time

def test_env():
    assert os.environ["FASTLORA_TRITON_PIN"] == "1"
    assert "TRITON_INTERPRET" not in os.environ  # compiled on the GPU machine, never interpreted
    os.environ["GPU_QUICK_DEADLINE"] = str(time.time() - 1)  # the plugin reads it before each test

def test_not_selected():
    raise AssertionError("deselected: must not run")

def test_late():
    raise AssertionError("past the deadline: must be skipped")
"""


def test_test_stage_passes_the_pin_and_keeps_its_deadline(tmp_path, monkeypatch):
    """The stage runner starts pytest with the pin and this module as its plugin: the selected
    tests run in the selection's order, the rest are deselected, one line each is written as it
    finishes, and a test that would start past the deadline is skipped."""
    (tmp_path / "test_probe.py").write_text(_PROBE_TESTS)
    selection = [{"entry": "test_probe.py::test_env", "est_s": 1, "covers": ""},
                 {"entry": "test_probe.py -k LATE", "est_s": 1, "covers": ""}]  # fmt: skip
    (tmp_path / "sel.json").write_text(json.dumps(selection))
    jsonl = tmp_path / "tests.jsonl"
    argv, env = gpu_quick.tests_command([str(tmp_path / "test_probe.py")])
    argv += ["--rootdir", str(tmp_path)]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # run_stage must drop it

    env.update(GPU_QUICK_SELECTION=str(tmp_path / "sel.json"), GPU_QUICK_TESTS_JSONL=str(jsonl),
               GPU_QUICK_DEADLINE=str(time.time() + 600))  # fmt: skip
    st = gpu_quick.run_stage(gpu_quick.Log(str(tmp_path / "log")), argv, 90, env)
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    got = [(r["nodeid"], r["outcome"]) for r in recs]
    assert got == [("test_probe.py::test_env", "passed"), ("test_probe.py::test_late", "skipped")], recs
    assert st["rc"] == 0 and not st["timed_out"]


def test_dry_run_fits_the_call():
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "quick", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    total = int(re.search(r"total \(required\): (\d+) s", res.stdout).group(1))
    assert 60 < total < 8 * 60
    for t in gpu_quick.SELECTION:
        assert t.entry in res.stdout
    for c in gpu_quick.bench_cases():
        assert c.name in res.stdout
    assert "FASTLORA_TRITON_PIN=1" in res.stdout and "MAX_JOBS=nproc" in res.stdout


def test_bench_selection_is_issue_15s_rows():
    names = {c.name for c in gpu_quick.bench_cases()}
    head = "M8192-K4096-N4096"
    assert names == {
        f"{head}-r16-p0-bfloat16", f"{head}-r16-p0.1-bfloat16", f"{head}-r64-p0.1-bfloat16",
        f"{head}-r16-p0-bfloat16-dora", f"{head}-r16-p0.1-bfloat16-dora", f"{head}-r16-p0-bfloat16-nf4",
        *(f"M{M}-K4096-N4096-r16-p0-bfloat16-nf4" for M in (1, 16, 64, 256, 1024)),
    }  # fmt: skip
    for variant in ("lora", "dora", "nf4"):
        want = {"base", "peft", "fastlora-torch", "fastlora-hybrid", "fastlora-triton", "fastlora-auto"}
        assert want <= set(cases.VARIANT_IMPLS[variant]), variant
    assert "nf4-gemv" in cases.VARIANT_IMPLS["nf4"]
    decode = [c for c in gpu_quick.bench_cases() if c.M <= 16]
    assert decode and all("infer" in c.modes for c in decode)


def test_profile_step_runs_on_cpu(tmp_path):
    plans = "base,peft,torch,hybrid,auto" if HAS_PEFT else "base,torch,hybrid,auto"
    argv = ["--device", "cpu", "--tiny", "--p", "0.1", "--plans", plans, "--steps", "2", "--out", str(tmp_path)]
    assert profile_step.main(argv) == 0
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["meta"]["device_type"] == "cpu" and data["shape"] == profile_step.TINY
    (run,) = data["runs"]
    got = {pl["plan"]: pl for pl in run["plans"]}
    assert set(got) == set(plans.split(",")) - {"hybrid"}  # a GPU plan: skipped with a note
    assert any(n.startswith("hybrid: skipped") for n in run["notes"])
    for pl in got.values():
        assert pl["step_ms"] > 0 and pl["kernel_ms"] > 0 and pl["kernels"]
        assert all(k["ms"] > 0 and k["count"] > 0 for k in pl["kernels"])
        assert abs(pl["kernel_ms"] - sum(k["ms"] for k in pl["kernels"])) < 1e-9
        assert pl["host_ms"] == pytest.approx(pl["step_ms"] - pl["kernel_ms"])
    assert any(k["name"].startswith("aten::") for k in got["base"]["kernels"])
    assert got["auto"]["chosen"] == "torch" and got["torch"]["chosen"] == "torch"
    text = (tmp_path / "profile.txt").read_text()
    assert "=== auto (fastlora-auto, chose torch)" in text and "kernel ms" in text


def test_host_overhead_case_is_in_the_cpu_suite():
    """Issue #15 item 1: the tiny case holds fastlora against PEFT's math in plain torch."""
    cpu = torch.device("cpu")
    ho = [c for c in cases.op_cases(cpu, "default") if c.variant == "host-overhead"]
    assert {(c.M, c.K, c.N, c.r, c.dtype, c.p) for c in ho} == {(4, 64, 64, 8, "float32", p) for p in (0.0, 0.1)}
    assert all(c.modes == ("fwdbwd",) and c.repeat > 1 and c.name.endswith("-host-overhead") for c in ho)
    impls, _ = cases.usable_impls(cpu)
    tcfg = harness.TimingConfig(warmup=1, budget_s=0.0, min_reps=3, max_reps=3)
    rows, notes = cases.run_case(replace(ho[1], repeat=3), cpu, impls, tcfg)
    assert not notes, notes
    by = {r["impl"]: r for r in rows}
    assert {"base", "fastlora-torch", "fastlora-auto", "peft-math"} <= set(by)
    assert ("peft" in by) == HAS_PEFT
    for r in rows:
        assert r["ratio_to_peft_math"] > 0 and r["repeat"] == 3 and r["first_call_s"] > 0
    assert by["peft-math"]["ratio_to_peft_math"] == 1.0
    assert by["fastlora-auto"]["plan"] == "torch" and by["base"]["plan"] is None


def test_peft_math_is_the_same_layer():
    case = cases.OpCase(4, 64, 64, 8, 0.0, "float32", ("fwdbwd",), variant="host-overhead")
    bank = cases.make_bank(case, torch.device("cpu"))
    got = cases.IMPLS["peft-math"].layer(bank, 0)(bank.x)
    want = cases.IMPLS["fastlora-torch"].layer(bank, 0)(bank.x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_plan_reads_the_plan_table(monkeypatch):
    """The row of the plan table that matches a case says what "auto" ran; the table's fields
    may be spelt as the lead's key spells them ("N4096", "dropout1") or as numbers."""
    import fastlora

    def entry(M, dropout, quant, plan, spelt=True):
        if spelt:
            return {"device": "NVIDIA H200", "dtype": "bfloat16", "N": "N4096", "K": "K4096", "r": "r16",
                    "M_bucket": f"M{M}", "dropout": f"dropout{int(dropout)}", "quant": quant, "plan": plan,
                    "times_ms": {"hybrid": 0.9, "fused": 1.0}}  # fmt: skip
        return {"dtype": "torch.bfloat16", "N": 4096, "K": 4096, "r": 16, "M_bucket": M, "dropout": dropout,
                "quant": None if quant == "dense" else quant, "plan": plan}  # fmt: skip

    dev = torch.device("cuda")
    for spelt in (True, False):
        table = [entry(8192, False, "dense", "hybrid", spelt), entry(8192, True, "dense", "fused", spelt),
                 entry(64, False, "nf4", "fused", spelt), entry(8192, False, "nf4", "hybrid", spelt)]  # fmt: skip
        monkeypatch.setattr(fastlora, "plan_table", lambda t=table: t, raising=False)
        assert cases.auto_plan(cases.OpCase(8192, 4096, 4096, 16, 0.0, "bfloat16"), dev) == ("hybrid", table[0])
        assert cases.auto_plan(cases.OpCase(8192, 4096, 4096, 16, 0.1, "bfloat16"), dev)[0] == "fused"
        nf4 = cases.OpCase(8192, 4096, 4096, 16, 0.0, "bfloat16", variant="nf4")
        assert cases.auto_plan(nf4, dev)[0] == "hybrid"
        assert cases.auto_plan(replace(nf4, M=64), dev)[0] == "fused"
        assert cases.auto_plan(cases.OpCase(8192, 4096, 4096, 64, 0.1, "bfloat16"), dev)[0] != "fused"  # r differs
    monkeypatch.setattr(fastlora, "plan_table", lambda: [], raising=False)  # nothing decided: what auto resolves to
    assert cases.auto_plan(cases.OpCase(4, 64, 64, 8, 0.0, "float32"), torch.device("cpu")) == ("torch", None)


def _row(impl, mode, ratio, speed, variant="lora", p=0.0, M=8192, ms=1.0, plan=None, **kw):
    fam = "base" if impl == "base" else ("peft" if impl == "peft" else "fastlora")
    case = f"M{M}-K4096-N4096-r16-p{p:g}-bfloat16" + ("" if variant == "lora" else f"-{variant}")
    return {"kind": "op", "case": case, "impl": impl, "family": fam, "mode": mode, "M": M, "K": 4096, "N": 4096,
            "r": 16, "p": p, "dtype": "bfloat16", "variant": variant, "median_ms": ms, "ratio_to_base": ratio,
            "speedup_vs_peft": speed, "plan": plan, "saved_qkv_vs_peft": kw.get("qkv"),
            "first_call_s": kw.get("first")}  # fmt: skip


def test_summary_targets_pass_and_fail():
    A = "fastlora-auto"
    rows = [
        _row("base", "fwdbwd", 1.0, 1.29), _row("peft", "fwdbwd", 1.29, 1.0),
        _row(A, "fwdbwd", 1.10, 1.17, ms=0.87, plan="hybrid", first=12.0),
        _row(A, "fwd", 1.05, 1.3, plan="hybrid"),
        _row(A, "fwdbwd", 1.15, 1.25, p=0.1, ms=0.9, plan="fused", first=25.0),  # misses both at p=0.1
        _row(A, "fwd", 1.07, 1.35, p=0.1, plan="fused", qkv=0.22),
        _row(A, "fwdbwd", 1.3, 1.1, variant="dora", ms=1.0, plan="hybrid"),
        _row(A, "fwdbwd", 1.5, 0.9, variant="dora", p=0.1, ms=1.2, plan="hybrid"),  # slower than PEFT
        _row(A, "fwdbwd", 1.2, 1.2, variant="nf4", ms=0.95, plan="hybrid"),
        _row(A, "infer", 0.5, None, variant="nf4", M=1), _row("nf4-gemv", "infer", 0.3, None, variant="nf4", M=1),
    ]  # fmt: skip
    tg = {t["target"]: t for t in gpu_quick.targets(rows)}
    assert tg and all(t["status"] in ("PASS", "FAIL", "n/a") for t in tg.values())

    def st(start):
        (hit,) = [t for k, t in tg.items() if k.startswith(start)]
        return hit["status"], hit["value"]

    assert st("headline 8192x4096x4096 r16 bfloat16 p=0 fwd+bwd: auto / frozen base") == ("PASS", 1.10)
    assert st("headline 8192x4096x4096 r16 bfloat16 p=0.1 fwd+bwd: auto / frozen base") == ("FAIL", 1.15)
    assert st("headline 8192x4096x4096 r16 bfloat16 p=0.1 fwd+bwd: auto speed") == ("FAIL", 1.25)
    assert st("every LoRA")[0] == "FAIL" and st("every LoRA")[1] == 0.9
    assert st("DoRA p=0 ") == ("PASS", 1.0 / 0.87) and st("DoRA p=0.1")[0] == "FAIL"
    assert st("NF4 base") == ("PASS", 0.95 / 0.87)
    assert st("NF4 decode M=1") == ("PASS", 0.3)
    assert st("saved activations") == ("PASS", 0.22)
    assert st("first fwd+bwd") == ("FAIL", 25.0)
    text = gpu_quick.summary_text(rows)
    assert "auto plan" in text and "hybrid" in text and "FAIL" in text and "PASS" in text
    assert gpu_quick.targets([])[0]["status"] == "n/a"  # no rows: nothing claimed
