"""ours (backend="triton") vs cuBLAS on model shapes, e4m3, bf16 out, one process.

The data behind ops.choose_gemm_backend's M bands (results/ab-auto-mid-m-h100-2026-11-27-s12.txt,
M = 48..256, one timing per side, before this script alternated them; results/
ab-auto-decode-h100-2026-11-27-s20.txt, the H100's band at M = 8-32 and the one-wave margin).

    PYTHONPATH=. python benchmarks/ab_auto.py OUT.txt [--ms 48,64,...] [--shapes 8192x8192,...] [--rounds 2]
    PYTHONPATH=. python benchmarks/ab_auto.py OUT.txt --cells 256:10240x8192,384:6144x8192

``--ms`` x ``--shapes`` times every pair; ``--cells`` names single M:NxK cells instead. ``--cold``
times each side over weight copies (from memory, not L2); ``--mid-off`` adds our kernels without
the skinny kernel's M = 33-64 range as a third side.

Each side gets its activation as ``linear`` writes it for it, made outside the timing: cuBLAS
M-major scales in rows padded to 4 (as many output rows); ours row-major scales, or M-major in rows
padded to 4 where the ws kernel's ring carries them (gemm.prefers_m_major_scales), in storage of
rows padded to ``gemm.activation_rows`` (session 33; before, exactly M rows for ours, and cuBLAS
padded a copy inside its timing where M % 4). Each round times both, the order alternating from round to
round (under sustained FP8 load an H100's clocks drift, and the side timed first can gain or lose
a few percent; session 19 saw up to 20% in the GEMM grid's fixed order); the best median per
side is kept. Medians of triton.testing.do_bench_cudagraph, microseconds.
"""
import argparse
import os
import sys

import torch
import triton
import triton.testing

from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, quant as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gemm as B  # noqa: E402
from tune_skinny import fp8_copies  # noqa: E402

SHAPES = "6144x4096,4096x4096,28672x4096,4096x14336,10240x8192,8192x8192,57344x8192,8192x28672,1024x4096,14336x4096,7168x2048,2048x7168"
MS = "48,64,80,96,128,160,192,256"


def mid_off(fn):
    """fn() with the skinny kernel's M = 33-64 range off (plans are made per call, at capture)."""
    saved, G.SKINNY_MID_MAX_M = G.SKINNY_MID_MAX_M, 0
    try:
        return fn()
    finally:
        G.SKINNY_MID_MAX_M = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--ms", default=MS, help="comma-separated M values")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated NxK weight shapes")
    ap.add_argument("--cells", help="comma-separated M:NxK cells, instead of --ms x --shapes")
    ap.add_argument("--rounds", type=int, default=2, help="timings per side, the order alternating")
    ap.add_argument("--cold", action="store_true",
                    help="time each side over weight copies streaming tune_skinny.COLD_BYTES per call (per-GEMM time), "
                         "so that weights smaller than L2 come from memory, as in a model's forward")
    ap.add_argument("--mid-off", action="store_true",
                    help="a third side: ours with gemm.SKINNY_MID_MAX_M = 0 (M = 33-64 on the tma tiles)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    try:
        if args.cells:
            cells = [(int(m), *(int(v) for v in nk.split("x"))) for m, nk in (c.split(":") for c in args.cells.split(","))]
        else:
            cells = [(int(m), *(int(v) for v in s.split("x"))) for s in args.shapes.split(",") for m in args.ms.split(",")]
    except ValueError as e:
        ap.error(f"cells are M:NxK and shapes NxK, comma-separated integers ({e})")
    say = B.results_log(args.out, f"best of {args.rounds} alternating rounds")
    say("N,K,M,ours_us,cublas_us,auto_pick,ours/cublas" + (",ours_mid_off_us" if args.mid_off else ""))
    torch.manual_seed(0)
    weights = {}
    for M, N, K in cells:
        if (N, K) not in weights:
            weights[N, K] = ops.quantize_weight(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5)
        wq, ws = weights[N, K]
        copies = fp8_copies(wq, ws, args.cold)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ring = G.prefers_m_major_scales(M, N, K, wq)
        rows = G.activation_rows(M, ring)
        aq, as_ = Q.quantize(x, 1, 128, torch.float8_e4m3fn, scale_m_major=ring, rows_multiple_of=rows)
        aq, as_ = aq[:M], as_[:M]
        aq4, as4 = Q.quantize(x, 1, 128, torch.float8_e4m3fn, scale_m_major=True, rows_multiple_of=4)  # linear's, for cuBLAS
        calls = {"triton": lambda: [ops.gemm(aq, as_, q, s, backend="triton") for q, s in copies],
                 "cublas": lambda: [ops._cublas_gemm(aq4, as4, q, s, None, torch.bfloat16) for q, s in copies]}
        if args.mid_off:
            calls["mid_off"] = lambda: mid_off(lambda: [ops.gemm(aq, as_, q, s, backend="triton") for q, s in copies])
        best = {}
        for r in range(args.rounds):
            for side in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                t = triton.testing.do_bench_cudagraph(calls[side], rep=60, return_mode="median") * 1e3 / len(copies)
                best[side] = min(t, best.get(side, float("inf")))
        pick = ops.choose_gemm_backend(M, N, K, aq.dtype, wq.dtype, torch.bfloat16, cublas_available=True,
                                       num_sms=ops.gemm_card(wq.device)[1], card=ops.gemm_card(wq.device)[0])
        say(f"{N},{K},{M},{best['triton']:.1f},{best['cublas']:.1f},{pick},{best['triton'] / best['cublas']:.3f}"
            + (f",{best['mid_off']:.1f}" if args.mid_off else ""))


if __name__ == "__main__":
    main()
