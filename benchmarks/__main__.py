"""``python -m benchmarks``: op-level and end-to-end benchmarks of fastlora against the frozen
base linear, PEFT and the reference; a table, JSON results, plots and a regression check."""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    ap.add_argument(
        "--suite", choices=("default", "full"), default="default", help="full: the M, (K,N), r, p, dtype sweeps"
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny shapes and few repetitions (a smoke test, not a measurement)"
    )
    ap.add_argument(
        "--out",
        help="results folder (default benchmarks/runs/<device>/, git-ignored: a run never rewrites tracked files)",
    )
    ap.add_argument(
        "--publish",
        action="store_true",
        help="write to the committed results, benchmarks/results/<device>/ (a deliberate update: commit it afterwards)",
    )
    ap.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        help="run only the cases whose name contains TEXT (repeatable: any of them), e.g. nf4",
    )
    ap.add_argument("--no-plot", action="store_true", help="skip the matplotlib plots")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end Llama training steps")
    ap.add_argument("--compare", metavar="FILE", help="a results JSON to check this run against for slowdowns")
    ap.add_argument(
        "--compare-metric",
        choices=("time", "ratio"),
        default="time",
        help="median time, or ratio to base (robust to a busier machine)",
    )
    ap.add_argument("--fail-on-regression", action="store_true", help="exit 1 when --compare finds a regression")
    args = ap.parse_args(argv)
    if args.publish and (args.out or args.quick):
        ap.error("--publish writes the committed results folder: not with --out, nor with --quick (not a measurement)")
    return args


def out_dir_for(args: argparse.Namespace, device_slug: str) -> str:
    """Where a run writes: ``--out``; with ``--publish`` the committed results of this device
    (``benchmarks/results/<device>/``); otherwise ``benchmarks/runs/<device>/``, git-ignored, so
    that a user's run leaves the working tree as it found it."""
    if args.out:
        return args.out
    return os.path.join(HERE, "results" if args.publish else "runs", device_slug)


class _NoBar:
    """Stand-in for tqdm when it is not installed: prints each case as it starts."""

    def __init__(self, total: int, **_):
        self.total, self.n = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, s: str) -> None:
        print(f"[{self.n + 1}/{self.total}] {s}", flush=True)

    def update(self) -> None:
        self.n += 1

    write = staticmethod(print)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    import torch

    from . import cases, e2e, harness, report

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = _NoBar

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    suite = "quick" if args.quick else args.suite
    meta = harness.metadata(device, suite, argv)
    out_dir = out_dir_for(args, meta["device_slug"])

    if args.quick:
        tcfg = harness.TimingConfig(warmup=1, budget_s=0.0, min_reps=3, max_reps=3, rounds=1, warmup_ms=5, rep_ms=20)
    elif suite == "full":
        tcfg = harness.TimingConfig(budget_s=6.0, max_reps=60)
    else:
        tcfg = harness.TimingConfig()
    impls, notes = cases.usable_impls(device)
    op_list = cases.op_cases(device, args.suite, args.quick)
    e2e_list = [] if args.no_e2e else e2e.e2e_configs(device, args.suite, args.quick)
    if args.only:
        op_list = [c for c in op_list if any(t in c.name for t in args.only)]
        e2e_list = [c for c in e2e_list if any(t in c.name for t in args.only)]
    print(f"fastlora benchmarks: suite={suite} device={meta['device']} commit={meta['commit'][:12]}")
    print(f"implementations: {', '.join(i.name for i in impls)}")
    for n in notes:
        print(f"note: {n}")

    tasks = [(c.name, lambda c=c: cases.run_case(c, device, impls, tcfg)) for c in op_list]
    tasks += [(c.name, lambda c=c: e2e.run_e2e(c, device)) for c in e2e_list]
    rows: list[dict] = []
    with tqdm(total=len(tasks), unit="case", dynamic_ncols=True) as bar:
        for name, task in tasks:
            bar.set_postfix_str(name)
            try:
                r, n = task()
            except Exception as exc:  # e.g. out of memory at a large shape: report it, go on
                r, n = [], [f"{name}: failed ({type(exc).__name__}: {exc}); case skipped"]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows += r
            for msg in n:
                bar.write(f"note: {msg}")
            bar.update()

    print()
    print(report.format_table(rows))
    quant = report.format_quant(rows)
    if quant:
        print("\n" + quant)
    path = report.write_results(rows, meta, out_dir)
    print(f"\nresults: {path} (rows also appended to {os.path.join(out_dir, 'history.jsonl')})")
    if args.publish:
        print("published: review and commit benchmarks/results/ to make this run the committed baseline")
    elif not args.out:
        print("(benchmarks/runs/ is git-ignored; --publish writes the committed benchmarks/results/<device>/)")
    if not args.no_plot and rows:
        try:
            for p in report.plot(rows, out_dir, f"{suite}_"):
                print(f"plot: {p}")
        except Exception as exc:  # matplotlib missing or broken: the numbers are already saved
            print(f"note: plots skipped ({type(exc).__name__}: {exc})")
    if args.compare:
        baseline = report.load_rows(args.compare)
        print(f"\ncompared with {args.compare} ({args.compare_metric}):")
        other = {r.get("meta", {}).get("device") for r in baseline} - {meta["device"], None}
        if other and args.compare_metric == "time":
            print(f"note: the baseline was taken on {', '.join(sorted(other))}; times across machines do not compare")
        results = report.compare(rows, baseline, args.compare_metric)
        print(report.format_compare(results, args.compare_metric))
        if args.fail_on_regression and any(c["regressed"] for c in results):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
