"""The ws kernel with its ring carrying the activation scales against the same kernel reading them
from memory, in one process on one card (session 18: results/ws-scales-ring-h200-2026-11-27-s18.txt).

    PYTHONPATH=. python benchmarks/ab_ws_ring.py OUT.txt [--ms 256,512,1024,2048] [--repeats 8] [--stages 4,5,6]

For each grid shape (N, K) of bench_gemm, dtype and M: "mem", the plan for row-major scales (read
from global memory by the consumers) timed twice (first and last: the run-to-run spread), and the
same tiles with M-major scales (rows padded to 4, as ``linear`` writes them) carried by the ring at
4, 5 and 6 stages. Each ring output is compared bit for bit with mem's, ``--repeats`` times: the
proxy fence before each stage's release is what keeps them equal (without it they differed on
every run at M = 512-2048, N = K = 8192). Medians of ``triton.testing.do_bench``, microseconds.
"""
import argparse
import os
import sys

import torch
import triton
from triton.testing import do_bench

from blockwise_fp8.kernels import gemm as G, quant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gemm as B  # noqa: E402

SHAPES = ((8192, 8192), (10240, 8192), (57344, 8192), (8192, 28672))


def median_us(fn) -> float:
    return do_bench(fn, warmup=30, rep=200, return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--ms", default="256,512,1024,2048", help="comma-separated M values")
    parser.add_argument("--repeats", type=int, default=8, help="bit-for-bit comparisons per ring config")
    parser.add_argument("--stages", default="4,5,6", help="comma-separated ring stage counts to time")
    args = parser.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    say = B.results_log(args.out, "bf16 out, us; '!' after a ring time: its bits differed")
    for dt in (torch.float8_e5m2, torch.float8_e4m3fn):
        for N, K in SHAPES:
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
                wq, ws = quant.quantize(w, 128, 128, dt)
                aq, as_ = quant.quantize(x, 1, 128, dt)
                _, in_ring = quant.quantize(x, 1, 128, dt, scale_m_major=True, rows_multiple_of=4)
                in_ring = in_ring[:M]
                mem_plan = G.plan(M, N, K, tma=True, ws=True)
                ring_plan = G.plan(M, N, K, tma=True, ws=True, scales_in_ring=True, card=G.card_plans(0))
                if (mem_plan.kind, mem_plan.block_m) != ("ws", 128):  # 192-row tiles carry no scales
                    continue
                base = G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
                tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
                line = (f"{str(dt)[-6:]:6s} M={M:5d} N={N:6d} K={K:6d} tiles={tiles:5d} "
                        f"plan ring={ring_plan.scales_tma!s:5s} mem[st{mem_plan.num_stages} ts{mem_plan.tail_split}] "
                        f"{median_us(lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16)):8.1f}")
                for stages in (int(s) for s in args.stages.split(",")):
                    p = G.Plan("ws", 128, 128, 4, stages, tail_split=mem_plan.tail_split, scales_tma=True)
                    same = all(torch.equal(G.gemm(aq, in_ring, wq, ws, None, torch.bfloat16, plan_override=p), base)
                               for _ in range(args.repeats))
                    t = median_us(lambda: G.gemm(aq, in_ring, wq, ws, None, torch.bfloat16, plan_override=p))
                    line += f" ring{stages} {t:8.1f}{'' if same else '!'}"
                line += f" mem_again {median_us(lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16)):8.1f}"
                say(line)


if __name__ == "__main__":
    main()
