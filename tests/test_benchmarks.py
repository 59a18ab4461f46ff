"""The benchmark suite (benchmarks/): a --quick run on tiny shapes, its JSON, plots and --compare.

Timings of a --quick run are noise; these tests check structure, sanity and the memory
numbers (which are exact), never speed.
"""

import copy
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is not installed: it runs from the repository root
    sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402

try:
    import peft  # noqa: F401

    HAS_PEFT = True
except ImportError:
    HAS_PEFT = False


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--no-plot", "--device", "cpu", "--out", str(out)]) == 0
    return out, report.load_rows(str(out / "quick.json"))


def test_cli_runs_from_repo_root():
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "--compare" in res.stdout and "--suite" in res.stdout


def test_rows_carry_metadata_and_sane_values(quick):
    out, rows = quick
    assert rows and not list(out.glob("*.png"))  # --no-plot
    for r in rows:
        m = r["meta"]
        for k in ("device", "torch", "triton", "cuda", "commit", "date", "command", "suite"):
            assert k in m, k
        assert m["device"] and m["torch"] and m["commit"] and m["suite"] == "quick" and "--quick" in m["command"]
        assert r["median_ms"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] and r["n"] >= 1
        assert r["saved_bytes"] >= 0
    op = [r for r in rows if r["kind"] == "op"]
    impls = {r["impl"] for r in op}
    assert {"base", "fastlora-torch", "reference"} <= impls and ("peft" in impls) == HAS_PEFT
    for r in op:
        assert r["mode"] in ("fwd", "fwdbwd", "infer") and r["ratio_to_base"] > 0 and r["tflops"] > 0
        if r["impl"] == "base":
            assert r["ratio_to_base"] == 1.0
        if HAS_PEFT:
            assert r["speedup_vs_peft"] > 0
    # one row per (case, impl, mode): no duplicates
    assert len({report.row_key(r) for r in rows}) == len(rows)
    e2e = [r for r in rows if r["kind"] == "e2e"]
    assert e2e and all(r["tokens_per_s"] > 0 for r in e2e)
    with open(out / "history.jsonl") as f:
        assert len(f.readlines()) == len(rows)


def test_saved_bytes_follow_the_save_policy(quick):
    """fastlora keeps x and z only (x once for q/k/v); PEFT keeps more when dropout is on."""
    _, rows = quick
    fl = [r for r in rows if r["kind"] == "op" and r["impl"] == "fastlora-torch"]
    for r in fl:
        elt = 4  # float32
        assert r["saved_bytes"] == elt * (r["M"] * r["K"] + r["M"] * r["r"])
        assert r["saved_bytes_qkv"] == elt * (r["M"] * r["K"] + 3 * r["M"] * r["r"])
    if not HAS_PEFT:
        pytest.skip("peft not installed")
    by_key = {(r["case"], r["impl"], r["mode"]): r for r in rows}
    for r in fl:
        if r["p"] > 0:
            pr = by_key[(r["case"], "peft", r["mode"])]
            assert r["saved_bytes"] < pr["saved_bytes"] and r["saved_bytes_qkv"] < pr["saved_bytes_qkv"]
            assert r["saved_vs_peft"] < 1 and r["saved_qkv_vs_peft"] < 0.5
    for r in (r for r in rows if r["kind"] == "e2e" and r["p"] > 0 and r["family"] == "fastlora"):
        assert r["saved_vs_peft"] < 1


def test_nf4_rows_and_summary(quick):
    """The NF4 case: fastlora on the quantized base saves what it saves on a dense one (no
    dequantized W kept for backward), and the summary holds it against the dense-base case."""
    _, rows = quick
    nf4 = [r for r in rows if r["kind"] == "op" and r["variant"] == "nf4"]
    assert {r["impl"] for r in nf4} >= {"base", "fastlora-torch"}
    summary = report.quant_summary(rows)
    assert [s["row"] for s in summary] == [r for r in nf4 if r["family"] == "fastlora"]
    held = 0
    for s in summary:
        r = s["row"]
        dense = next(
            (
                d
                for d in rows
                if d["kind"] == "op" and d["variant"] == "lora" and d["impl"] == r["impl"] and d["mode"] == r["mode"]
                and all(d[f] == r[f] for f in ("M", "K", "N", "r", "p", "dtype", "bias"))
            ),
            None,
        )  # fmt: skip
        assert s["x_base"] == r["ratio_to_base"] > 0
        if dense is None:  # the quick suite has no dense "infer" case
            assert s["x_dense"] is None and r["mode"] == "infer"
            continue
        held += 1
        assert s["x_dense"] == r["median_ms"] / dense["median_ms"]
        assert r["saved_bytes"] == dense["saved_bytes"]
    assert held and {s["row"]["mode"] for s in summary} == {"fwdbwd", "infer"}
    text = report.format_quant(rows)
    assert text.splitlines()[0].startswith("NF4 base: impl") and "fastlora-torch" in text
    assert report.format_quant([r for r in rows if r.get("variant") != "nf4"]) == ""


def test_plot_writes_pngs(quick, tmp_path):
    _, rows = quick
    paths = report.plot(rows, str(tmp_path), "t_")
    assert {os.path.basename(p) for p in paths} == {"t_ratio_vs_r.png", "t_ratio_vs_M.png", "t_saved_memory.png"}
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _scaled(rows, factor, impl=None, spread=None):
    """Copies of rows with times (and optionally their spread) scaled, for impl or all."""
    out = copy.deepcopy(rows)
    for r in out:
        if impl is None or r["impl"] == impl:
            for k in ("median_ms", "p25_ms", "p75_ms"):
                r[k] *= factor
        if spread is not None:
            r["p25_ms"], r["p75_ms"] = r["median_ms"] * (1 - spread), r["median_ms"] * (1 + spread)
    return out


def test_compare_flags_only_real_slowdowns(quick):
    _, rows = quick
    calm = _scaled(rows, 1.0, spread=0.02)  # 4% relative IQR: tolerance max(5%, 12%) = 12%
    same = report.compare(calm, calm)
    assert len(same) == len(rows) and not any(c["regressed"] for c in same)
    faster_before = report.compare(calm, _scaled(calm, 0.5, impl="fastlora-torch"))
    flagged = {c["key"] for c in faster_before if c["regressed"]}
    assert flagged == {report.row_key(r) for r in rows if r["impl"] == "fastlora-torch"}
    assert not any(c["regressed"] for c in report.compare(calm, _scaled(calm, 1 / 1.03)))  # 3%: noise
    ratio = report.compare(calm, calm, metric="ratio")
    assert ratio and not any(c["regressed"] for c in ratio)


def test_cli_compare_exit_code(quick, tmp_path):
    _, rows = quick
    for name, factor, expected in (("slow_before.json", 1e4, 0), ("fast_before.json", 1e-4, 1)):
        path = tmp_path / name
        path.write_text(json.dumps({"meta": rows[0]["meta"], "rows": _scaled(rows, factor, spread=0.01)}))
        argv = [
            "--quick",
            "--no-plot",
            "--no-e2e",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
            "--compare",
            str(path),
            "--fail-on-regression",
        ]
        assert main(argv) == expected, name


def test_only_selects_cases_by_name(tmp_path):
    out = tmp_path / "only"
    assert main(["--quick", "--no-plot", "--device", "cpu", "--only", "nf4", "--only", "llama", "--out", str(out)]) == 0
    rows = report.load_rows(str(out / "quick.json"))
    assert {r["kind"] for r in rows} == {"op", "e2e"}
    assert all("nf4" in r["case"] for r in rows if r["kind"] == "op")
    assert all("llama" in r["case"] for r in rows if r["kind"] == "e2e")


def test_gemv_row_computes_the_lora_layer():
    """The nf4-gemv row (timed on CUDA only) is the same layer as fastlora's on the NF4 base."""
    import torch

    from benchmarks import cases

    case = cases.OpCase(16, 128, 96, 8, 0.0, "float32", ("infer",), variant="nf4")
    bank = cases.make_bank(case, torch.device("cpu"))
    with torch.no_grad():
        got = cases.IMPLS["nf4-gemv"].layer(bank, 0)(bank.x)
        want = cases.IMPLS["fastlora-torch"].layer(bank, 0)(bank.x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32: only summation order differs
    assert cases.IMPLS["nf4-gemv"].available(torch.device("cpu")) == "the fused NF4 GEMV is a CUDA kernel"
