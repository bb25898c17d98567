"""Development probe (GPU): at M = 48-256, the current plan against the ws kernel's 128 x 128 tiles
with the activation scales in its ring (6 stages) and 1-4 K splits of each tile of a partial wave,
and the tma kernel's 64 x 128 tiles; cuBLAS beside for e4m3. ``--memory``: also the half-card
plan's tiles and split with the scales in the ring (``half``) and read row-major from memory
(``mem4``, ``mem5``: 4 and 5 stages), whatever the plan picks. ``--wide``: also ``_wide_plan``'s
tiles as the card's table gives them (``wide``: what other cards than the H100 run at M = 65-256
since session 35; the question for an H100 is whether it should too). The data behind
``kernels/gemm.py::_half_card_plan`` (results/probe-mid-m-ws-h100-2026-11-27-s23.txt; ``--memory``:
results/probe-half-card-memory-h100-2026-11-27-s24.txt). The activation is quantized into padded
storage, as ``linear`` writes it (since session 35; before, exactly M rows).

    PYTHONPATH=. python benchmarks/probe_mid_m_ws.py --ms 96,128 --shapes 8192x8192,4096x14336 [--dtypes e5m2] [--wide]

Warm CUDA-graph medians (as the GEMM grid times), best of 2 rounds, the order rotated; every side's
output is compared with the plan's (a mismatch is printed)."""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import blockwise_fp8 as bf  # noqa: E402
from blockwise_fp8 import ops  # noqa: E402
from blockwise_fp8.kernels import gemm as G, quant as Q  # noqa: E402

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=30) * 1e3


def sides(M: int, N: int, K: int, dname: str, x16, w16, wq, ws, *, splits: bool = True,
          memory: bool = False, wide: bool = False) -> tuple[dict, str]:
    """The timed calls of one cell, and the current plan's label."""
    dt = DTYPES[dname]
    sms = G._num_sms(0)
    rows = G.activation_rows(M, True)  # storage padded as linear writes it
    aq, as_ = (t[:M] for t in Q.quantize(x16, 1, 128, dt, rows_multiple_of=rows))
    ring_s = Q.quantize(x16, 1, 128, dt, scale_m_major=True, rows_multiple_of=rows)[1][:M]  # as linear writes them for the ring
    cur = G.plan(M, N, K, tma=True, ws=True, num_sms=sms, scales_in_ring=G.prefers_m_major_scales(M, N, K, wq),
                 card=G.card_plans(0))
    cur_s = ring_s if cur.scales_tma else as_
    ts64 = G._tail_split(triton.cdiv(M, 64) * triton.cdiv(N, 128), triton.cdiv(K, 128), sms)
    tma64 = G.Plan("tma", 64, 128, 4, 4, flatten=True, tail_split=ts64)
    fns = {
        "bf16": lambda: F.linear(x16, w16),
        "plan": lambda: G.gemm(aq, cur_s, wq, ws, None, torch.bfloat16),
        "tma64": lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=tma64),
    }
    for t in (1, 2, 3, 4) if splits else ():
        p = G.Plan("ws", 128, 128, 4, 6, tail_split=t, scales_tma=True)
        fns[f"r6t{t}"] = (lambda p: lambda: G.gemm(aq, ring_s, wq, ws, None, torch.bfloat16, plan_override=p))(p)
    if memory:
        # the half-card plan's tiles and split with the scales row-major, read from memory (no ring)
        n_tiles, kb = triton.cdiv(N, 128), triton.cdiv(K, 128)
        split = G._half_card_plan(n_tiles, kb, sms, True).tail_split
        half = G.Plan("ws", 128, 128, 4, 6, tail_split=split, scales_tma=True)
        fns["half"] = lambda: G.gemm(aq, ring_s, wq, ws, None, torch.bfloat16, plan_override=half)
        for st in (4, 5):
            p = G.Plan("ws", 128, 128, 4, st, tail_split=split)
            fns[f"mem{st}"] = (lambda p: lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p))(p)
    if wide:
        wp = G._wide_plan(M, N, triton.cdiv(K, 128), ws=True, num_sms=sms, ws192_cost=G.WS192_COST,
                          scales_in_ring=True, card=G.card_plans(0))
        fns["wide"] = lambda: G.gemm(aq, ring_s if wp.scales_tma else as_, wq, ws, None, torch.bfloat16, plan_override=wp)
    if dname == "e4m3":
        mm = ops._m_major(as_)
        fns["cublas"] = lambda: bf.gemm(aq, mm, wq, ws, backend="cublas")
    label = f"{cur.kind}{cur.block_m}x{cur.block_n}/ts{cur.tail_split}{'r' if cur.scales_tma else ''}"
    return fns, label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="96,128,160")
    ap.add_argument("--shapes", default="8192x8192,4096x4096,8192x28672,6144x4096,4096x14336,8192x3072,2048x8192")
    ap.add_argument("--dtypes", default="e5m2")
    ap.add_argument("--no-splits", dest="splits", action="store_false", help="leave out the ring's 1-4 split sides")
    ap.add_argument("--wide", action="store_true", help="add _wide_plan's tiles as the card's table gives them")
    ap.add_argument("--memory", action="store_true",
                    help="add the half-card plan, and its tiles and split with row-major scales from memory, 4 and 5 stages")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for N, K in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        w16 = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
        for dname in args.dtypes.split(","):
            wq, ws = bf.quantize_weight(w16, DTYPES[dname])
            for M in (int(m) for m in args.ms.split(",")):
                x16 = torch.randn(M, K, device="cuda", generator=g).bfloat16()
                fns, label = sides(M, N, K, dname, x16, w16, wq, ws, splits=args.splits, memory=args.memory,
                                  wide=args.wide)
                ref = fns["plan"]().float()
                bad = [k for k, f in fns.items() if k != "bf16" and not torch.allclose(f().float(), ref, rtol=1e-2, atol=1e-2)]
                names, best = list(fns), {}
                for r in range(2):
                    for nm in names[r:] + names[:r]:
                        best[nm] = min(best.get(nm, math.inf), us(fns[nm]))
                print(f"{dname} M={M:4d} N={N:6d} K={K:6d} plan={label:16s} "
                      + " ".join(f"{k}={v:7.1f}" for k, v in best.items()) + (f"  MISMATCH {bad}" if bad else ""), flush=True)


if __name__ == "__main__":
    main()
