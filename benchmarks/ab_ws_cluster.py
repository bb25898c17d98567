"""The ws kernel on 2-CTA clusters (Triton >= 3.9) against the plans it would replace, in one
process on one card, beside bf16 and cuBLAS (session 28 timed the 192-row pairs this way, session
29 the 128-row pairs, K blocks in pairs as on one CTA: 3-6% slower than one CTA at M = 1024-4096).

    source benchmarks/use_slim_triton.sh     # on the device image (Triton 3.6), with .t39/ carried
    PYTHONPATH=. python benchmarks/ab_ws_cluster.py OUT.txt [--cells 2048x8192x8192,...] [--dtypes e5m2,e4m3]
        [--tail-splits 2,4]     # ragged M (session 33): also the 128-row tiles with a split tail

For each cell: "plan", the library's default plan (whatever Triton it runs); and each candidate of
``cluster_candidates``: the same tiles on one CTA and on pairs, stages as given. Outputs are checked
against the default plan's: bit for bit where both compute each tile whole (no split tail), else
to 1e-2 relative (the split tail sums float32 partials in another order). Timing as the grid's
self-heat method: 0.5 s of the contender itself before each timing, CUDA-graph median, best of
``--rounds`` rotated rounds. Microseconds and TFLOPS.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton

from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, gemm_hopper

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_gemm as B  # noqa: E402

CELLS = ("1024x8192x8192,2048x8192x8192,4096x8192x8192,2048x10240x8192,4096x10240x8192,"
         "2048x57344x8192,1024x8192x28672,4096x8192x28672")
DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def cluster_candidates(block_m: int, stages: tuple = (4, 5), tail_splits: tuple = ()) -> dict:
    """name -> Plan: ``block_m``-row ws tiles on one CTA and on 2-CTA pairs at each of ``stages``
    (no split tail, scales from memory: what the pairs support); with ``tail_splits``, also the
    one-CTA tiles with the last partial wave split over K into each of that many programs (the
    pairs cannot split)."""
    out = {}
    for st in stages:
        out[f"ws{block_m}_s{st}"] = G.Plan("ws", block_m, 128, 4, st)
        out[f"ws{block_m}pair_s{st}"] = G.Plan("ws", block_m, 128, 4, st, cluster=2)
        for split in tail_splits:
            if split > 1:
                out[f"ws{block_m}_s{st}_t{split}"] = G.Plan("ws", block_m, 128, 4, st, tail_split=split)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--cells", default=CELLS, help="comma-separated MxNxK")
    parser.add_argument("--dtypes", default="e5m2,e4m3")
    parser.add_argument("--block-m", default="128,192", help="tile rows of the candidates")
    parser.add_argument("--stages", default="4", help="comma-separated ring stages of the candidates")
    parser.add_argument("--tail-splits", default="", help="comma-separated tail splits of the one-CTA candidates (ragged M)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heat", type=float, default=0.5, help="seconds of self-heat before each timing")
    args = parser.parse_args()
    if not gemm_hopper.MULTICAST:
        raise SystemExit(f"this Triton ({triton.__version__}) has no multicast TMA: source benchmarks/use_slim_triton.sh")
    stages = tuple(int(s) for s in args.stages.split(","))
    tail_splits = tuple(int(s) for s in args.tail_splits.split(",") if s)
    say = B.results_log(args.out, f"bf16 out; self-heat {args.heat} s, best of {args.rounds}; "
                                  "'!' after a time: its output differed from the default plan's")
    for cell in args.cells.split(","):
        M, N, K = (int(v) for v in cell.split("x"))
        for dname in args.dtypes.split(","):
            dt = DTYPES[dname]
            g = torch.Generator(device="cuda").manual_seed(M + N + K)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
            w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
            aq, as_ = ops.quantize_activation(x, dt)
            wq, ws = ops.quantize_weight(w16, dt)
            scales = B.operand_scales(aq, as_, wq, dt)
            ours = scales["ours_triton"]
            default = G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0), card=G.card_plans(0),
                             scales_in_ring=G.prefers_m_major_scales(M, N, K, wq), multicast=True)
            ref = G.gemm(aq, ours, wq, ws, None, torch.bfloat16)
            fns = {"bf16": lambda: F.linear(x, w16), "plan": lambda: G.gemm(aq, ours, wq, ws, None, torch.bfloat16)}
            if dt == torch.float8_e4m3fn:
                fns["cublas"] = lambda: ops._cublas_gemm(aq, scales["cublas"], wq, ws, None, torch.bfloat16)
            differs = set()
            for bm in (int(b) for b in args.block_m.split(",")):
                for name, p in cluster_candidates(bm, stages, tail_splits if bm == 128 else ()).items():
                    fns[name] = lambda p=p: G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p)
                    got = fns[name]()
                    same = (torch.equal(got, ref) if default.tail_split == p.tail_split == 1
                            else torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2))
                    if not same:
                        differs.add(name)
            best = B.time_contenders(fns, 100, args.rounds, settle=B.self_heat(args.heat))
            flops = 2 * M * N * K
            say(f"{dname} {M}x{N}x{K} plan={default.kind}{default.block_m} cluster={default.cluster} "
                f"split={default.tail_split} ring={default.scales_tma}: " + "  ".join(
                    f"{k} {t:.1f}{'!' if k in differs else ''} ({flops / t / 1e6:.0f}T)" for k, t in best.items()))


if __name__ == "__main__":
    main()
