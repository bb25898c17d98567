"""Development sweep (GPU) of the skinny (decode) GEMM's meta-parameters, CUDA-graph timing.

    python benchmarks/tune_skinny.py [--out FILE]

For Llama-3-8B and grid shapes at M = 1 and 16 it times every (BLOCK_N, stages, split-K) of a small
grid with ``do_bench_cudagraph`` next to bf16 ``F.linear`` and the current ``plan()`` choice, and
prints the best config per shape with its weight-streaming bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blockwise_fp8 import ops  # noqa: E402
from blockwise_fp8.kernels import gemm as G  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (10240, 8192), (57344, 8192), (8192, 28672)]


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=30) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,16")
    args = ap.parse_args(argv)
    lines = []
    say = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    torch.manual_seed(0)
    grid = list(itertools.product([64, 128], [4, 6, 8], [1, 2, 4, 8], [4, 8]))
    for M in (int(m) for m in args.ms.split(",")):
        for N, K in SHAPES:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
            wq, ws = ops.quantize_weight(w)
            aq, as_ = ops.quantize_activation(x)
            ref = G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
            t_bf16 = us(lambda: F.linear(x, w))
            cur = G.plan(M, N, K, tma=True)
            t_cur = us(lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16))
            results = []
            for bn, st, sk, nw in grid:
                p = G.Plan("skinny", max(16, triton.next_power_of_2(M)), bn, num_warps=nw, num_stages=st, split_k=sk)
                try:
                    out = G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p)
                    if not torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2):
                        say(f"  M={M} N={N} K={K} {p} WRONG")
                        continue
                    results.append((us(lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p)), bn, st, sk, nw))
                except Exception as e:  # noqa: BLE001 -- a config that does not compile is skipped, reported
                    say(f"  M={M} N={N} K={K} bn={bn} st={st} sk={sk} nw={nw} failed: {type(e).__name__}")
            results.sort()
            best = results[0]
            tb = lambda t: N * K / t / 1e6  # noqa: E731 -- FP8 weight bytes per us -> TB/s
            say(f"M={M:3d} N={N:6d} K={K:6d} bf16 {t_bf16:7.1f}  current(bn{cur.block_n} st{cur.num_stages} sk{cur.split_k}) "
                f"{t_cur:7.1f} us {tb(t_cur):.2f} TB/s  best {best[0]:7.1f} us {tb(best[0]):.2f} TB/s "
                f"(bn{best[1]} st{best[2]} sk{best[3]} nw{best[4]})  top5 " +
                " ".join(f"{t:.1f}:bn{b}/st{s}/sk{k}/nw{n}" for t, b, s, k, n in results[:5]))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
