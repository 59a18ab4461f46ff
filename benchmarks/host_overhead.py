"""``python -m benchmarks.host_overhead``: the host cost of one ``lora_linear`` call at a tiny shape.

At M=4, K=N=64, r=8 (fp32, CPU, one thread) the arithmetic is negligible, so forward+backward
time is Python and dispatch overhead. It is compared with the same math written PEFT's way
(dropout -> linear -> linear -> scale -> add, plain torch). The two run as interleaved pairs, so
a busy machine slows both alike, and the median ratio of the pair times is reported
(issue 15's target: at most 1.25x).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def measure(p: float, pairs: int = 6000, warmup: int = 300) -> dict:
    import fastlora

    M, K, N, r = 4, 64, 64, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).requires_grad_(True)
    W, b = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    A = torch.randn(r, K, generator=gen).requires_grad_(True)
    B = torch.randn(N, r, generator=gen).requires_grad_(True)
    g = torch.ones(M, N)

    def fast():
        fastlora.lora_linear(x, W, A, B, scale=2.0, bias=b, dropout_p=p).backward(g)

    def peft_way():
        xd = F.dropout(x, p, True)
        (F.linear(x, W, b) + F.linear(F.linear(xd, A), B) * 2.0).backward(g)

    for _ in range(warmup):
        fast()
        peft_way()
    ta, tb = [], []
    clock = time.perf_counter
    for _ in range(pairs):
        t0 = clock()
        fast()
        t1 = clock()
        peft_way()
        t2 = clock()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    ta.sort()
    tb.sort()
    med = lambda v: v[len(v) // 2] * 1e6  # noqa: E731
    return {"p": p, "fastlora_us": med(ta), "peft_way_us": med(tb), "ratio": med(ta) / med(tb)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__)
    ap.add_argument("--pairs", type=int, default=6000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, M=4 K=N=64 r=8 fp32, 1 thread, {args.pairs} interleaved pairs (medians)")
    for p in (0.0, 0.1):
        m = measure(p, args.pairs)
        print(f"p={p}: lora_linear {m['fastlora_us']:.1f} us, PEFT's way {m['peft_way_us']:.1f} us, {m['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
