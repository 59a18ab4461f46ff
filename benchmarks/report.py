"""Results: the printed table, the JSON files, the plots and the regression check."""

from __future__ import annotations

import json
import os
from collections import defaultdict

from .harness import MiB


# --------------------------------------------------------------------------- table
def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    """One line per row: op rows first, then end-to-end rows. A ``plan`` column (the GPU plan
    "auto" chose, e.g. hybrid or fused) appears when any row carries one."""
    out = []
    op = [r for r in rows if r["kind"] == "op"]
    plans = any(r.get("plan") for r in op)
    if op:
        plan_hdr = f"{'plan':<10} " if plans else ""
        hdr = (
            f"{'impl':<16} {plan_hdr}{'shape MxKxN':<17} {'dtype':<9} {'r':>4} {'p':>5} {'mode':<7} {'median ms':>10} "
            f"{'spread%':>8} {'x base':>7} {'x PEFT':>7} {'TFLOP/s':>8} {'saved MiB':>10} {'qkv MiB':>9}"
        )
        out += [hdr, "-" * len(hdr)]
        for r in op:
            spread = 100 * (r["p75_ms"] - r["p25_ms"]) / r["median_ms"]
            shape = f"{r['M']}x{r['K']}x{r['N']}"
            plan = f"{r.get('plan') or '-':<10} " if plans else ""
            out.append(
                f"{r['impl']:<16} {plan}{shape:<17} {r['dtype']:<9} {r['r']:>4} {r['p']:>5g} {r['mode']:<7} "
                f"{r['median_ms']:>10.3f} {spread:>8.1f} {_f(r['ratio_to_base'], '.3f'):>7} "
                f"{_f(r['speedup_vs_peft'], '.2f'):>7} {_f(r['tflops'], '.3f'):>8} "
                f"{r['saved_bytes'] / MiB:>10.2f} {r['saved_bytes_qkv'] / MiB:>9.2f}"
            )
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        hdr = (
            f"{'impl':<16} {'end-to-end config':<46} {'step ms':>9} {'spread%':>8} {'tokens/s':>10} {'x PEFT':>7} "
            f"{'saved MiB':>10} {'peak MiB':>9}"
        )
        out += ["", hdr, "-" * len(hdr)]
        for r in e2e:
            spread = 100 * (r["p75_ms"] - r["p25_ms"]) / r["median_ms"]
            out.append(
                f"{r['impl']:<16} {r['case']:<46} {r['median_ms']:>9.1f} {spread:>8.1f} "
                f"{r['tokens_per_s']:>10.0f} {_f(r['speedup_vs_peft'], '.2f'):>7} {r['saved_bytes'] / MiB:>10.1f} "
                f"{_f(r['peak_mem_mib'], '.0f'):>9}"
            )
    return "\n".join(out)


# --------------------------------------------------------------------------- quantized bases
_SHAPE = ("M", "K", "N", "r", "p", "dtype", "bias", "mode")


def _dense_impl(impl: str) -> str:
    """The dense-base row an NF4 row is held against: a forced route is still fastlora-triton."""
    for route in ("-fused", "-scratch"):
        if impl.endswith(route):
            return impl[: -len(route)]
    return impl


def quant_summary(rows: list[dict]) -> list[dict]:
    """One entry per fastlora row on an NF4 base (the issue #4 targets): its time over the same
    backend's on the dense base of the same shape and dtype (``x_dense``, a ratio of medians
    from two cases, so not paired by round; None when the suite has no such dense case), its
    ratio to the frozen dense base linear (``x_base``: for "infer" at M <= 16 that is the
    decode target against F.linear) and its speedup over PEFT on a bitsandbytes Linear4bit."""
    op = [r for r in rows if r["kind"] == "op"]
    dense = {(*(r[f] for f in _SHAPE), r["impl"]): r for r in op if r["variant"] == "lora"}
    out = []
    for r in op:
        if r["variant"] != "nf4" or r["family"] != "fastlora":
            continue
        d = dense.get((*(r[f] for f in _SHAPE), _dense_impl(r["impl"])))
        out.append(
            {
                "row": r,
                "x_dense": r["median_ms"] / d["median_ms"] if d else None,
                "x_base": r["ratio_to_base"],
                "x_peft": r["speedup_vs_peft"],
            }
        )
    return out


def format_quant(rows: list[dict]) -> str:
    """The NF4 rows against the dense-base fastlora, the frozen base and PEFT + bitsandbytes
    (empty when the run had no NF4 case)."""
    summary = quant_summary(rows)
    if not summary:
        return ""
    hdr = (
        f"{'NF4 base: impl':<24} {'shape MxKxN':<17} {'dtype':<9} {'r':>4} {'mode':<7} {'median ms':>10} "
        f"{'x dense':>8} {'x base':>7} {'x PEFT':>7} {'peak MiB':>9}"
    )
    out = [hdr, "-" * len(hdr)]
    for s in summary:
        r = s["row"]
        shape = f"{r['M']}x{r['K']}x{r['N']}"
        out.append(
            f"{r['impl']:<24} {shape:<17} {r['dtype']:<9} "
            f"{r['r']:>4} {r['mode']:<7} {r['median_ms']:>10.3f} {_f(s['x_dense'], '.3f'):>8} "
            f"{_f(s['x_base'], '.3f'):>7} {_f(s['x_peft'], '.2f'):>7} {_f(r['peak_mem_mib'], '.0f'):>9}"
        )
    out.append(
        "x dense: time / the same backend on the dense base, same shape (targets: fwd+bwd <= 1.10 at training "
        "shapes); x base: / the frozen dense linear (decode, infer at M <= 16: <= 0.33); x PEFT: PEFT on a "
        "bitsandbytes Linear4bit / this (>= 1.3)"
    )
    return "\n".join(out)


# --------------------------------------------------------------------------- JSON
def write_results(rows: list[dict], meta: dict, out_dir: str) -> str:
    """Write ``<suite>.json`` (this run: meta + rows, overwritten) and append every row, with its
    metadata, to ``history.jsonl``. Returns the path of the run file."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [{**r, "meta": meta} for r in rows]
    path = os.path.join(out_dir, f"{meta['suite']}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_dir, "history.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def load_rows(path: str) -> list[dict]:
    """Rows of a run file (``{"meta", "rows"}``), a JSON list of rows, or a JSON-lines file."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return data["rows"] if isinstance(data, dict) else data


# --------------------------------------------------------------------------- regression check
def row_key(r: dict) -> tuple:
    return (r["kind"], r["case"], r["impl"], r["mode"])


def compare(rows: list[dict], baseline: list[dict], metric: str = "time", min_tol: float = 0.05) -> list[dict]:
    """Compare this run with a baseline, row by row (matched on kind, case, impl, mode).

    metric "time" compares the median time; "ratio" compares the ratio to the frozen base
    measured in the same run (robust to a machine that is uniformly slower or busier; op rows
    of non-base implementations only). A row regresses when ``now > before * (1 + tol)`` with
    ``tol = max(min_tol, 3 * spread)`` and spread the larger relative IQR of the two runs.
    For a baseline file with several rows of one key (a history), the last one is used.
    """
    base = {row_key(r): r for r in baseline}
    out = []
    for r in rows:
        b = base.get(row_key(r))
        if b is None:
            continue
        if metric == "ratio":
            if r.get("ratio_to_base") is None or b.get("ratio_to_base") is None or r["family"] == "base":
                continue
            before, now = b["ratio_to_base"], r["ratio_to_base"]
            spread = max((x["ratio_p75"] - x["ratio_p25"]) / x["ratio_to_base"] for x in (r, b))
        else:
            before, now = b["median_ms"], r["median_ms"]
            spread = max((x["p75_ms"] - x["p25_ms"]) / x["median_ms"] for x in (r, b))
        tol = max(min_tol, 3 * spread)
        change = now / before - 1
        out.append(
            {
                "key": row_key(r),
                "before": before,
                "now": now,
                "change": change,
                "tol": tol,
                "regressed": change > tol,
            }
        )
    return out


def format_compare(results: list[dict], metric: str) -> str:
    unit = "ms" if metric == "time" else "x base"
    lines = [f"{'row':<72} {'before':>9} {'now':>9} {'change':>8} {'tol':>6}  ({unit})"]
    for c in results:
        name = " ".join(str(k) for k in c["key"][1:])
        flag = "  REGRESSION" if c["regressed"] else ""
        lines.append(
            f"{name:<72} {c['before']:>9.3f} {c['now']:>9.3f} {100 * c['change']:>+7.1f}% {100 * c['tol']:>5.0f}%{flag}"
        )
    n = sum(c["regressed"] for c in results)
    lines.append(f"{len(results)} rows compared, {n} regressed")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
# A line joins the points of one implementation that differ only in the plotted axis: the same
# variant (LoRA, DoRA, NF4 base), the same mode and the same values of every other shape field.
_AXES = ("M", "K", "N", "r", "p", "dtype", "bias")
_VARIANT_LABEL = {"lora": "LoRA (dense base)", "dora": "DoRA (dense base)", "nf4": "LoRA on an NF4 base"}
_MODE_LABEL = {"fwd": "training forward", "fwdbwd": "forward+backward", "infer": "inference forward"}


def _variant(r: dict) -> str:
    return r.get("variant") or "lora"  # rows written before DoRA/NF4 cases existed are LoRA


def ratio_series(rows: list[dict], x: str) -> list[dict]:
    """The lines of the ratio-to-base plots against axis ``x`` ("r" or "M").

    One series per (variant, mode, shape family, impl), where the shape family is the value of
    every shape field except ``x``; only series with at least two values of ``x`` (a line).
    Each series: ``variant``, ``mode``, ``impl``, ``fixed`` (field -> value, x excluded) and
    ``points``, a list of ``(x, ratio, ratio_p25, ratio_p75)`` sorted by x."""
    fields = tuple(f for f in _AXES if f != x)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["kind"] != "op" or r["family"] == "base" or r.get("ratio_to_base") is None:
            continue
        groups[(_variant(r), r["mode"], tuple(r.get(f) for f in fields), r["impl"])].append(r)
    out = []
    for (variant, mode, family, impl), sel in groups.items():
        pts = sorted((r[x], r["ratio_to_base"], r["ratio_p25"], r["ratio_p75"]) for r in sel)
        if len({p[0] for p in pts}) != len(pts):
            raise ValueError(f"two rows of {impl} {variant} {mode} {family} share {x}={pts[0][0]}")
        if len(pts) >= 2:
            fixed = dict(zip(fields, family, strict=True))
            out.append({"variant": variant, "mode": mode, "impl": impl, "fixed": fixed, "points": pts})
    return out


def ratio_plots(rows: list[dict], x: str) -> list[dict]:
    """The ratio-to-base figures against ``x``: one per (variant, mode), holding the series of
    :func:`ratio_series` for that variant and mode (``series``), the shape fields every series
    shares (``common``) and those that tell its shape families apart (``varying``)."""
    by_plot: dict[tuple, list[dict]] = defaultdict(list)
    for s in ratio_series(rows, x):
        by_plot[(s["variant"], s["mode"])].append(s)
    order = {"lora": 0, "nf4": 1, "dora": 2}
    out = []
    for (variant, mode), series in sorted(by_plot.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0])):
        fields = list(series[0]["fixed"])
        common = {f: series[0]["fixed"][f] for f in fields if len({repr(s["fixed"][f]) for s in series}) == 1}
        varying = [f for f in fields if f not in common]
        series.sort(key=lambda s: (tuple(_order(s["fixed"][f]) for f in varying), s["impl"]))
        out.append({"x": x, "variant": variant, "mode": mode, "series": series, "common": common, "varying": varying})
    return out


def _order(v) -> tuple:
    """Sort key for a shape field's value: numbers numerically, then anything else by text."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _fmt_fields(d: dict) -> str:
    parts = []
    for f, v in d.items():
        if f == "bias":
            parts.append("bias" if v else "no bias")
        elif f == "dtype":
            parts.append(str(v))
        else:
            parts.append(f"{f}={v:g}" if isinstance(v, float) else f"{f}={v}")
    return ", ".join(parts)


def ratio_plot_name(prefix: str, fig: dict) -> str:
    """``<prefix>ratio_vs_<x>.png`` for LoRA forward+backward (the headline plots), else with the
    variant and mode in the name, e.g. ``<prefix>ratio_vs_M_nf4_fwd.png``."""
    tail = "" if (fig["variant"], fig["mode"]) == ("lora", "fwdbwd") else f"_{fig['variant']}_{fig['mode']}"
    return f"{prefix}ratio_vs_{fig['x']}{tail}.png"


def plot(rows: list[dict], out_dir: str, prefix: str) -> list[str]:
    """Write the ratio-to-base plots (against r and against M; one figure per variant and mode,
    one line per implementation and shape family) and the saved-bytes bars as PNGs; returns
    their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")  # with the line style: 8 families told apart
    for x in ("r", "M"):
        for figd in ratio_plots(rows, x):
            impls = sorted({s["impl"] for s in figd["series"]})
            families = list(dict.fromkeys(repr([s["fixed"][f] for f in figd["varying"]]) for s in figd["series"]))
            colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
            fig, ax = plt.subplots(figsize=(8.5, 4.5))
            for s in figd["series"]:
                fam = families.index(repr([s["fixed"][f] for f in figd["varying"]]))
                pts = s["points"]
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                err = [[max(p[1] - p[2], 0) for p in pts], [max(p[3] - p[1], 0) for p in pts]]
                shape = _fmt_fields({f: s["fixed"][f] for f in figd["varying"]})
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    color=colors[s["impl"]],
                    ls=styles[fam % len(styles)],
                    marker=markers[fam % len(markers)],
                    capsize=3,
                    label=s["impl"] + (f", {shape}" if shape else ""),
                )
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.set_ylabel("time / frozen base linear (median, IQR)")
            variant, mode = figd["variant"], figd["mode"]
            what = f"{_VARIANT_LABEL.get(variant, variant)}, {_MODE_LABEL.get(mode, mode)}"
            ax.set_title(
                f"{what}: ratio to base vs {x}\n{_fmt_fields(figd['common'])}; one line per implementation"
                + (f" and {', '.join(figd['varying'])}" if figd["varying"] else ""),
                fontsize=9,
            )
            ax.legend(
                fontsize=7,
                title=f"{figd['variant']}, {figd['mode']}",
                title_fontsize=7,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
            )
            fig.tight_layout()
            paths.append(os.path.join(out_dir, ratio_plot_name(prefix, figd)))
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)

    # saved bytes at the headline shape (the first LoRA row's), one layer and q/k/v, per p
    op = [r for r in rows if r["kind"] == "op" and _variant(r) == "lora"]
    if op:
        h = op[0]
        same = [r for r in op if r["mode"] == h["mode"] and all(r.get(f) == h.get(f) for f in _AXES if f != "p")]
        ps = sorted({r["p"] for r in same})
        impls = list(dict.fromkeys(r["impl"] for r in same))
        groups = [(f"1 layer, p={p:g}", "saved_bytes", p) for p in ps] + [
            (f"q/k/v sharing x, p={p:g}", "saved_bytes_qkv", p) for p in ps
        ]
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        w = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            vals = [next((r[f] / MiB for r in same if r["impl"] == impl and r["p"] == p), 0) for _, f, p in groups]
            bars = ax.bar([i + j * w for i in range(len(groups))], vals, w, label=impl, color=f"C{j}")
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks([i + w * (len(impls) - 1) / 2 for i in range(len(groups))], [g[0] for g in groups], fontsize=8)
        ax.set_ylabel("activations saved for backward (MiB)")
        ax.set_title(
            f"{_VARIANT_LABEL['lora']}: activations kept after one {_MODE_LABEL.get(h['mode'], h['mode'])}\n"
            f"{_fmt_fields({f: h.get(f) for f in _AXES if f != 'p'})}; one bar per implementation",
            fontsize=9,
        )
        ax.legend(fontsize=8, title=f"lora, {h['mode']}", title_fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{prefix}saved_memory.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------- plots from a file
def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report FILE [--out DIR]``: redraw the plots of a results file
    without rerunning the benchmarks (e.g. after a change to this module)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("file", help="a <suite>.json results file (or a JSON list of rows)")
    ap.add_argument("--out", help="where to write the PNGs (default: next to FILE)")
    ap.add_argument("--table", action="store_true", help="also print the results table")
    args = ap.parse_args(argv)
    rows = load_rows(args.file)
    if not rows:
        print(f"{args.file}: no rows")
        return 1
    suite = rows[0].get("meta", {}).get("suite") or os.path.splitext(os.path.basename(args.file))[0]
    if args.table:
        print(format_table(rows))
    for p in plot(rows, args.out or os.path.dirname(os.path.abspath(args.file)), f"{suite}_"):
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
