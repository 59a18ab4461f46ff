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
    # what "auto" runs is a row of its own, and every fastlora row names its plan (issue #15)
    assert "fastlora-auto" in impls and all(r["plan"] for r in op if r["family"] == "fastlora")
    assert all(r["plan"] is None for r in op if r["family"] in ("base", "peft"))
    assert any(r["variant"] == "host-overhead" and r["ratio_to_peft_math"] > 0 for r in op)
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


# --------------------------------------------------------------------------- plot lines
def _op_row(impl, variant="lora", mode="fwdbwd", M=2048, K=1024, N=1024, r=16, p=0.1, ratio=1.1):
    return {
        "kind": "op", "case": f"M{M}-K{K}-N{N}-r{r}-p{p}-{variant}", "impl": impl, "family": impl.split("-")[0],
        "variant": variant, "mode": mode, "M": M, "K": K, "N": N, "r": r, "p": p, "dtype": "float32",
        "bias": False, "ratio_to_base": ratio, "ratio_p25": ratio, "ratio_p75": ratio,
    }  # fmt: skip


def _assert_one_line_one_thing(rows, x):
    """Every series holds rows of one impl, variant, mode and shape family, one point per x."""
    series = report.ratio_series(rows, x)
    for s in series:
        members = [
            r for r in rows
            if r["kind"] == "op" and r["impl"] == s["impl"] and r.get("variant", "lora") == s["variant"]
            and r["mode"] == s["mode"] and all(r.get(f) == v for f, v in s["fixed"].items())
        ]  # fmt: skip
        assert sorted((r[x], r["ratio_to_base"]) for r in members) == [p[:2] for p in s["points"]]
        assert len({p[0] for p in s["points"]}) == len(s["points"]) >= 2
    for fig in report.ratio_plots(rows, x):
        assert {(s["variant"], s["mode"]) for s in fig["series"]} == {(fig["variant"], fig["mode"])}
        keys = [(s["impl"], tuple(s["fixed"][f] for f in fig["varying"])) for s in fig["series"]]
        assert len(keys) == len(set(keys))  # a line is told apart by impl and its varying fields
    return series


def test_plot_lines_never_mix_variants_modes_or_shapes():
    """The DoRA / NF4 rows at r=16 share every shape field with a LoRA row: they must not join
    the LoRA line (the committed CPU plot once drew a vertical segment from 1.1 to 2.3 there)."""
    rows = [_op_row("base", ratio=1.0)]
    for impl, ratios in {"fastlora-torch": (1.07, 1.10, 1.22), "peft": (1.54, 1.47, 1.61)}.items():
        rows += [_op_row(impl, r=r, ratio=v) for r, v in zip((8, 16, 64), ratios, strict=True)]
        rows += [_op_row(impl, M=512, r=r, ratio=v + 0.05) for r, v in zip((8, 16, 64), ratios, strict=True)]
        rows += [_op_row(impl, "dora", ratio=2.3), _op_row(impl, "dora", p=0.0, ratio=1.14)]
        rows += [_op_row(impl, "nf4", p=0.0, ratio=1.07), _op_row(impl, "nf4", "fwd", p=0.0, ratio=1.05)]
        rows += [_op_row(impl, "nf4", "fwd", M=M, p=0.0, ratio=1.3) for M in (64, 256)]
        rows += [_op_row(impl, "nf4", "fwdbwd", M=M, p=0.0, ratio=1.4) for M in (64, 256)]
    by_r = _assert_one_line_one_thing(rows, "r")
    assert {(s["variant"], s["mode"], s["fixed"]["M"]) for s in by_r} == {("lora", "fwdbwd", M) for M in (512, 2048)}
    line = next(s for s in by_r if s["impl"] == "fastlora-torch" and s["fixed"]["M"] == 2048)
    assert [p[:2] for p in line["points"]] == [(8, 1.07), (16, 1.10), (64, 1.22)]
    by_m = _assert_one_line_one_thing(rows, "M")
    assert {(s["variant"], s["mode"]) for s in by_m} == {("lora", "fwdbwd"), ("nf4", "fwd"), ("nf4", "fwdbwd")}
    nf4 = next(s for s in by_m if s["impl"] == "peft" and s["variant"] == "nf4" and s["mode"] == "fwd")
    assert [p[0] for p in nf4["points"]] == [64, 256, 2048]
    names = {report.ratio_plot_name("d_", f) for x in ("r", "M") for f in report.ratio_plots(rows, x)}
    assert names == {"d_ratio_vs_r.png", "d_ratio_vs_M.png", "d_ratio_vs_M_nf4_fwd.png", "d_ratio_vs_M_nf4_fwdbwd.png"}
    # the committed CPU results: the same holds for the rows the published plots are drawn from
    committed = os.path.join(ROOT, "benchmarks", "results", "cpu-amd-epyc-2t", "default.json")
    if os.path.exists(committed):
        for x in ("r", "M"):
            _assert_one_line_one_thing(report.load_rows(committed), x)


def test_report_cli_redraws_plots_from_a_results_file(quick, tmp_path):
    out, _ = quick
    assert report.main([str(out / "quick.json"), "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert names == {"quick_ratio_vs_r.png", "quick_ratio_vs_M.png", "quick_saved_memory.png"}


# --------------------------------------------------------------------------- where a run writes
def _git(*args, input=None):
    return subprocess.run(["git", *args], cwd=ROOT, input=input, capture_output=True, text=True, timeout=60)


def test_a_run_with_default_output_leaves_the_tree_clean(capsys):
    """The main job writes to the git-ignored benchmarks/runs/<device>/ unless told otherwise:
    after a run, git status shows nothing new and the committed results are untouched."""
    if _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("not a git checkout")

    runs = os.path.join(ROOT, "benchmarks", "runs")

    def snapshot():
        # source files are left out: people editing the tree while the tests run must not fail
        # this test, and a run writes only data (JSON, JSON lines, PNG)
        src = (".py", ".sh", ".md", ".cpp", ".cu", ".h", ".toml", ".txt", ".cfg", "Makefile", ".gitignore")
        lines = _git("status", "--porcelain", "--untracked-files=all").stdout.splitlines()
        status = {line for line in lines if not line.rstrip().endswith(src)}
        committed = _git("ls-files", "--", "benchmarks/results").stdout.split()
        contents = _git("hash-object", "--stdin-paths", input="\n".join(committed)).stdout  # working-tree bytes
        return status, committed, contents

    before = snapshot()
    assert main(["--quick", "--no-e2e", "--device", "cpu"]) == 0
    after = snapshot()
    assert after[0] - before[0] == set(), "a default run left new or modified files in git status"
    assert after[1:] == before[1:], "a default run rewrote the committed benchmarks/results/"
    printed = capsys.readouterr().out
    path = next(line.split()[1] for line in printed.splitlines() if line.startswith("results: "))
    assert os.path.commonpath([path, runs]) == runs and os.path.exists(path)
    assert _git("check-ignore", "-q", path).returncode == 0
    assert "--publish" in printed


def test_publish_targets_the_committed_results():
    from benchmarks.__main__ import HERE, out_dir_for, parse_args

    assert out_dir_for(parse_args(["--publish"]), "dev") == os.path.join(HERE, "results", "dev")
    assert out_dir_for(parse_args([]), "dev") == os.path.join(HERE, "runs", "dev")
    assert out_dir_for(parse_args(["--out", "x"]), "dev") == "x"
    for bad in (["--publish", "--quick"], ["--publish", "--out", "x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_host_overhead_script_runs():
    """benchmarks.host_overhead measures what README quotes (a smoke run: no timing asserted)."""
    from benchmarks import host_overhead

    m = host_overhead.measure(0.1, pairs=20, warmup=5)
    assert m["fastlora_us"] > 0 and m["peft_way_us"] > 0 and m["ratio"] == m["fastlora_us"] / m["peft_way_us"]
