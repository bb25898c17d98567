"""Does a contender's place in the timing order move its time? (GEMM grid methodology probe)

    python benchmarks/probe_position.py [--idle 0,1] [--preheat 0.25] [--self-heat 1] [--interleave 3] [--shapes 2048x8192x8192,8192x8192x28672]

Two identical contenders, A and B (our GEMM on the same e5m2 operands), beside bf16 ``F.linear``,
timed as bench_gemm times a grid cell (``bench_gemm.timed``: median of do_bench_cudagraph, the
grid's rep) in every order of the three, back to back or with ``--idle`` seconds of idle card
before each timing, ``--preheat`` seconds of one fixed load (``bench_gemm.heat``) before each, or
``--self-heat`` seconds of the contender itself (``bench_gemm.self_heat``);
``--interleave R``: also R runs of ``bench_gemm.time_interleaved`` (the three sampled in turn).
Prints each contender's median by its place in the order, and A's over B's: where the card's
state does not depend on what ran before, A and B agree at every place.

Session 25, H100 (results/position-probe-h100-2026-11-27-s25.txt): back to back, A and B read
256-290 us by place at M = 2048, N = K = 8192 and 3612-3772 at M = 8192, K = 28672; with 1 s idle
before each timing, 251-258 and 3512-3538.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gemm as bg  # noqa: E402
from blockwise_fp8 import ops  # noqa: E402
from blockwise_fp8.kernels import gemm as G  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idle", default="0,1", help="comma-separated seconds of idle before each timing")
    ap.add_argument("--preheat", default="", help="comma-separated seconds of bf16 matmul load before each timing")
    ap.add_argument("--self-heat", default="", help="comma-separated seconds of the contender itself before its timing")
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="also time the three R times with bench_gemm.time_interleaved (seeds 0..R-1)")
    ap.add_argument("--shapes", default="2048x8192x8192,8192x8192x28672", help="MxNxK,...")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_position.py times CUDA kernels: no CUDA device here")
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}", flush=True)
    for shape in args.shapes.split(","):
        M, N, K = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K**0.5
        aq, a_s = ops.quantize_activation(x, dtype=torch.float8_e5m2)
        wq, w_s = ops.quantize_weight(w, dtype=torch.float8_e5m2)
        fns = {
            "bf16": lambda: F.linear(x, w),
            "A": lambda: G.gemm(aq, a_s, wq, w_s, None, torch.bfloat16),
            "B": lambda: G.gemm(aq, a_s, wq, w_s, None, torch.bfloat16),
        }
        rep = 20 if M * N * K < 2**38 else 60  # bench_gemm's
        # (label, what runs before each timing, handed the contender; None: back to back)
        states = [(f"idle={v}s", (lambda fn, s=float(v): time.sleep(s)) if float(v) else None)
                  for v in args.idle.split(",") if v]
        states += [(f"preheat={v}s", bg.heat(float(v))) for v in args.preheat.split(",") if v]
        states += [(f"self-heat={v}s", bg.self_heat(float(v))) for v in args.self_heat.split(",") if v]
        for label, settle in states:
            by_place: dict = {name: {} for name in fns}
            for order in itertools.permutations(fns):
                for place, name in enumerate(order):
                    if settle is not None:
                        settle(fns[name])
                    by_place[name].setdefault(place, []).append(bg.timed(fns[name], rep))
            print(f"M={M} N={N} K={K} e5m2 {label}: median us by place in the order (0, 1, 2)")
            for name, d in by_place.items():
                print(f"  {name:5s} " + "  ".join(f"{statistics.median(d[p]):8.1f}" for p in sorted(d)))
            a = statistics.median(sum(by_place["A"].values(), []))
            b = statistics.median(sum(by_place["B"].values(), []))
            print(f"  A/B ratio of all medians: {a / b:.3f}", flush=True)
        if args.interleave:
            print(f"M={M} N={N} K={K} e5m2 interleaved (bench_gemm.time_interleaved): us per call, one line per seed")
            for seed in range(args.interleave):
                t = bg.time_interleaved(fns, rep, seed=seed)
                print("  " + "  ".join(f"{n} {t[n]:8.1f}" for n in fns) + f"  A/B {t['A'] / t['B']:.3f}", flush=True)


if __name__ == "__main__":
    main()
