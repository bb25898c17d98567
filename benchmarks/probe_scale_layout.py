"""Development probe (GPU): at M > 64, our GEMM with the activation scales row-major (what a compiled
graph gives our kernels today) against M-major ones as ``quantize_input`` writes them (no padded
rows: the ring plans take them where M is a multiple of 4, the other plans read them from memory),
and as an eager ``linear`` writes them (rows padded to 4). Also the quantization itself in both
layouts, and cuBLAS for e4m3. The data behind the compiled graphs' scale layout (``ops.linear``).

    PYTHONPATH=. python benchmarks/probe_scale_layout.py --ms 96,128,2048 --shapes 4096x4096,14336x4096

Warm CUDA-graph medians (as the GEMM grid times), best of 2 rounds, the order rotated; the three
GEMM sides must agree bit for bit (a mismatch is printed)."""
import argparse
import math
import os
import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import blockwise_fp8 as bf  # noqa: E402
from blockwise_fp8.kernels import gemm as G, quant as Q  # noqa: E402

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
LLAMA = "4096x4096,1024x4096,14336x4096,4096x14336,6144x4096"
GRID = "8192x8192,10240x8192,57344x8192,8192x28672"


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=30) * 1e3


def label(M: int, N: int, K: int, a_scale: torch.Tensor) -> str:
    from blockwise_fp8.kernels import gemm_hopper

    p = G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0),
               scales_in_ring=gemm_hopper.scales_ride_the_ring(a_scale, 2), card=G.card_plans(0))
    return f"{p.kind}{p.block_m}/ts{p.tail_split}{'r' if p.scales_tma else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="80,128,130,256,512,1024,2048,4096")
    ap.add_argument("--shapes", default=LLAMA + "," + GRID)
    ap.add_argument("--dtypes", default="e5m2")
    ap.add_argument("--max-flop", type=float, default=2e12, help="skip cells of more GEMM flops than this")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    totals: dict = {}
    for N, K in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        w16 = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
        for dname in args.dtypes.split(","):
            dt = DTYPES[dname]
            wq, ws = bf.quantize_weight(w16, dt)
            for M in (int(m) for m in args.ms.split(",")):
                if 2.0 * M * N * K > args.max_flop:
                    continue
                x16 = torch.randn(M, K, device="cuda", generator=g).bfloat16()
                aq, s_row = Q.quantize(x16, 1, 128, dt)
                _, s_mm = Q.quantize(x16, 1, 128, dt, scale_m_major=True)
                aq_p, s_p = Q.quantize(x16, 1, 128, dt, scale_m_major=True, rows_multiple_of=4)
                fns = {
                    "row": lambda: G.gemm(aq, s_row, wq, ws, None, torch.bfloat16),
                    "mmaj": lambda: G.gemm(aq, s_mm, wq, ws, None, torch.bfloat16),
                    "eager": lambda: G.gemm(aq_p[:M], s_p[:M], wq, ws, None, torch.bfloat16),
                    "q_row": lambda: Q.quantize(x16, 1, 128, dt),
                    "q_mmaj": lambda: Q.quantize(x16, 1, 128, dt, scale_m_major=True),
                }
                if dname == "e4m3":
                    fns["cublas"] = lambda: bf.gemm(aq_p, s_p, wq, ws, backend="cublas")
                ref = fns["row"]()
                bad = [k for k in ("mmaj", "eager") if not torch.equal(fns[k](), ref)]
                names, best = list(fns), {}
                for r in range(2):
                    for nm in names[r:] + names[:r]:
                        best[nm] = min(best.get(nm, math.inf), us(fns[nm]))
                for k in ("mmaj", "eager"):
                    totals.setdefault(k, []).append(best[k] / best["row"])
                print(f"{dname} M={M:5d} N={N:6d} K={K:6d} row:{label(M, N, K, s_row):12s} "
                      f"mmaj:{label(M, N, K, s_mm):12s} "
                      + " ".join(f"{k}={v:8.1f}" for k, v in best.items())
                      + f"  mmaj/row={best['mmaj'] / best['row']:.3f}" + (f"  MISMATCH {bad}" if bad else ""), flush=True)
    for k, v in totals.items():
        print(f"{k}/row over {len(v)} cells: geomean {math.exp(sum(map(math.log, v)) / len(v)):.3f}, "
              f"min {min(v):.3f}, max {max(v):.3f}")


if __name__ == "__main__":
    main()
