"""Development sweep (GPU) of the skinny (decode) GEMM's meta-parameters, CUDA-graph timing.

    python benchmarks/tune_skinny.py [--out FILE]

For Llama-3-8B and grid shapes at M = 1 and 16 it times every (BLOCK_N, stages, split-K) of a small
grid with ``do_bench_cudagraph`` next to bf16 ``F.linear`` and the current ``plan()`` choice, and
prints the best config per shape with its weight-streaming bandwidth. ``--gemv``: the same for the
M = 1 gemv kernel's meta-parameters, next to the skinny kernel. ``--cold``: either sweep times each
GEMM over rotating copies of the weight, so that a weight smaller than L2 streams from memory.
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

SHAPES = [(4096, 4096), (1024, 4096), (6144, 4096), (14336, 4096), (28672, 4096), (4096, 14336), (8192, 8192),
          (10240, 8192), (57344, 8192), (8192, 28672)]


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=30) * 1e3


def fused_vs_two_step(M: int, N: int, K: int) -> str:
    from blockwise_fp8.kernels import quant as Q

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    wq, ws = ops.quantize_weight(w)
    two = lambda: G.gemm(*Q.quantize(x, 1, 128, wq.dtype), wq, ws, None, torch.bfloat16)  # noqa: E731
    one = lambda: G.linear_fused(x, wq, ws, None, torch.bfloat16)  # noqa: E731
    same = torch.equal(two().view(torch.int16), one().view(torch.int16))
    t2, t1 = us(two), us(one)
    t_bf16 = us(lambda: F.linear(x, w))
    line = (f"fused M={M:3d} N={N:6d} K={K:6d} {G.plan(M, N, K, tma=True)} bf16 {t_bf16:7.1f} two-step {t2:7.1f} "
            f"fused {t1:7.1f} us  identical={same}")
    if M == 1:  # the gemv kernel's fused quantization: every program re-quantizes its K range
        cells = []
        for bn, g in itertools.product((16, 32, 64), (4, 8)):
            p = G.Plan("gemv", 1, bn, 4, 1, split_k=1, groups_k=g)
            cells.append(f"bn{bn}/g{g}={us(lambda: G.linear_fused(x, wq, ws, None, torch.bfloat16, plan_override=p)):.1f}")
        line += "\n      gemv fused, split 1: " + " ".join(cells)
    return line


GEMV_GRID = dict(bn=(16, 32), groups=(4, 8, 16), warps=(4, 8), splits=(1, 2, 3, 4), stages=(1,))


COLD_BYTES = 150 * 2**20  # weight bytes one timed call streams with --cold: three times the H100's L2


def fp8_copies(wq, ws, cold: bool) -> list:
    """The FP8 (data, scales) pairs one timed call loops over: the weight alone, or with ``cold``
    enough copies to stream COLD_BYTES per call (also used by ab_auto.py --cold)."""
    N, K = wq.shape
    return [(wq, ws)] + [(wq.clone(), ws.clone()) for _ in range(-(-COLD_BYTES // (N * K)) - 1 if cold else 0)]


def weight_copies(w, wq, ws, cold: bool):
    """``fp8_copies`` and the bf16 weights one timed call loops over (2 x COLD_BYTES with ``cold``)."""
    N, K = wq.shape
    return fp8_copies(wq, ws, cold), [w] + [w.clone() for _ in range(-(-COLD_BYTES // (2 * N * K)) - 1 if cold else 0)]


def gemm_over(aq, as_, wqs):
    """run(plan, first_only=False): our GEMM over every weight copy (or the first), last output."""
    def run(p, first_only=False):
        for q, s in wqs[:1] if first_only else wqs:
            out = G.gemm(aq, as_, q, s, None, torch.bfloat16, plan_override=p)
        return out
    return run


def per_gemm(fn, n: int) -> float:
    return us(fn) / n


def bf16_per_gemm(x, w16s) -> float:
    return per_gemm(lambda: [F.linear(x, v) for v in w16s], len(w16s))


def gemv_sweep(M: int, N: int, K: int, cold: bool = False) -> str:
    """plan()'s config, the skinny kernel's plan, and a small grid of gemv configs (GEMV_GRID;
    BLOCK_M = M rounded up to a power of two; plan() itself sends only M <= GEMV_MAX_M to the
    gemv kernel). ``cold``: each timed call runs the GEMM over enough copies of the weight to
    stream COLD_BYTES, and the time is per GEMM, so that a weight smaller than L2 (q|k|v: 25 MB)
    is read from memory as in a model's decode step, not from L2 as in a loop over one weight."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    wq, ws = ops.quantize_weight(w)
    aq, as_ = ops.quantize_activation(x)
    wqs, w16s = weight_copies(w, wq, ws, cold)
    run = gemm_over(aq, as_, wqs)

    cur = G.plan(M, N, K, tma=True)
    sk = G._skinny_plan(M, N, K, triton.cdiv(K, 128), G._num_sms(0))
    ref = run(sk, first_only=True).float()
    tb = lambda t: N * K / t / 1e6  # noqa: E731 -- FP8 weight bytes per us -> TB/s
    t_cur, t_sk = per_gemm(lambda: run(cur), len(wqs)), per_gemm(lambda: run(sk), len(wqs))
    t_bf16 = bf16_per_gemm(x, w16s)
    results = []
    for bn, g, nw, split, st in itertools.product(*GEMV_GRID.values()):
        p = G.Plan("gemv", triton.next_power_of_2(M), bn, nw, st, split_k=split, groups_k=g)
        out = run(p, first_only=True).float()
        if not torch.allclose(out, ref, rtol=2e-2, atol=2e-2):
            return f"N={N} K={K} {p} WRONG"
        results.append((per_gemm(lambda: run(p), len(wqs)), bn, g, nw, split, st))
    results.sort()
    return (f"M={M} N={N:6d} K={K:6d}{' cold x' + str(len(wqs)) if cold else ''} bf16 {t_bf16:6.1f} skinny {t_sk:6.1f} us {tb(t_sk):.2f} TB/s  "
            f"plan({cur.kind} bn{cur.block_n} g{cur.groups_k} nw{cur.num_warps} sk{cur.split_k} st{cur.num_stages}) "
            f"{t_cur:6.1f} us {tb(t_cur):.2f} TB/s "
            f"({t_sk / t_cur:.2f}x skinny)  top5 " +
            " ".join(f"{t:.1f}:bn{b}/g{g}/nw{n}/sk{k}/st{s}" for t, b, g, n, k, s in results[:5]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--scales-ahead", type=int, choices=[0, 1], default=None,
                    help="set gemm.SKINNY_SCALES_AHEAD for the whole sweep (default: the library's)")
    ap.add_argument("--ms", default=None, help="M values, comma-separated (default 1,16; with --gemv 1)")
    ap.add_argument("--bn", default="64,128")
    ap.add_argument("--stages", default="4,6,8")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--groups", default="1", metavar="G[:STAGES],...",
                    help="K blocks per loop step (1 or 2), each with its own stages list if given, e.g. "
                         "1:4/6,2:2/3/4 (default 1, with --stages)")
    ap.add_argument("--shapes", default=None, help="N:K,N:K,... (default: Llama-3-8B and grid shapes)")
    ap.add_argument("--repeat-check", type=int, default=0, help="re-run the plan N times, compare bits")
    ap.add_argument("--gemv", action="store_true",
                    help="instead of the sweep: the gemv kernel's (BLOCK_N, K blocks per step, warps, split) "
                         "next to plan()'s choice and the skinny kernel, at M = 1 unless --ms is given")
    ap.add_argument("--gemv-grid", default=None, metavar="BN/GROUPS/WARPS/SPLITS[/STAGES]",
                    help="with --gemv: the configs swept, e.g. 16,32/4,8/4,8/1 (default %s)"
                         % "/".join(",".join(map(str, v)) for v in GEMV_GRID.values()))
    ap.add_argument("--cold", action="store_true",
                    help="time each GEMM over rotating weight copies (COLD_BYTES per call), from memory "
                         "rather than L2, as in a model's decode step")
    ap.add_argument("--fused", action="store_true",
                    help="instead of the sweep: quantize + GEMM (two launches) vs linear_fused, current plan")
    args = ap.parse_args(argv)
    if args.cold and args.fused:
        ap.error("--cold applies to the skinny and --gemv sweeps, not --fused")
    if args.scales_ahead is not None:
        G.SKINNY_SCALES_AHEAD = bool(args.scales_ahead)
    ints = lambda v: [int(t) for t in v.split(",")]  # noqa: E731
    shapes = [tuple(int(t) for t in nk.split(":")) for nk in args.shapes.split(",")] if args.shapes else SHAPES
    ms = ints(args.ms) if args.ms else ([1] if args.gemv else [1, 16])
    if args.gemv_grid:
        fields = args.gemv_grid.split("/")
        if len(fields) not in (len(GEMV_GRID) - 1, len(GEMV_GRID)):
            ap.error(f"--gemv-grid wants {len(GEMV_GRID) - 1} or {len(GEMV_GRID)} '/'-separated lists, "
                     f"got {args.gemv_grid!r}")
        GEMV_GRID.update(zip(GEMV_GRID, (tuple(ints(f)) for f in fields)))
    lines = []
    say = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    torch.manual_seed(0)
    mode = gemv_sweep if args.gemv else fused_vs_two_step if args.fused else None
    if mode is not None:  # one line per (M, shape) instead of the skinny sweep
        for M in ms:
            for N, K in shapes:
                say(mode(M, N, K, cold=True) if args.cold else mode(M, N, K))
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return 0
    group_stages = [(int(g), [int(t) for t in st.split("/")] if st else ints(args.stages))
                    for g, _, st in (e.partition(":") for e in args.groups.split(","))]
    grid = [(bn, st, sk, nw, g) for g, stages in group_stages
            for bn, st, sk, nw in itertools.product(ints(args.bn), stages, ints(args.splits), ints(args.warps))]
    for M in ms:
        for N, K in shapes:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
            wq, ws = ops.quantize_weight(w)
            aq, as_ = ops.quantize_activation(x)
            wqs, w16s = weight_copies(w, wq, ws, args.cold)
            run = gemm_over(aq, as_, wqs)
            ref = G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
            t_bf16 = bf16_per_gemm(x, w16s)
            cur = G.plan(M, N, K, tma=True)
            t_cur = per_gemm(lambda: run(None), len(wqs))
            for _ in range(args.repeat_check):
                again = G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
                if not torch.equal(again.view(torch.int16), ref.view(torch.int16)):
                    say(f"  M={M} N={N} K={K} current plan NOT DETERMINISTIC")
                    break
            results = []
            for bn, st, sk, nw, g in grid:
                p = G.Plan("skinny", max(16, triton.next_power_of_2(M)), bn, num_warps=nw, num_stages=st, split_k=sk,
                           groups_k=g)
                if G._streaming_grid(p, M, K, (N,))[0] != sk:
                    continue  # the launcher would run a smaller split (no empty splits, whole steps)
                try:
                    out = run(p, first_only=True)
                    if not torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2):
                        say(f"  M={M} N={N} K={K} {p} WRONG")
                        continue
                    t = per_gemm(lambda: run(p), len(wqs))
                    results.append((t, bn, st, sk, nw, g))
                except Exception as e:  # noqa: BLE001 -- a config that does not compile is skipped, reported
                    say(f"  M={M} N={N} K={K} bn={bn} st={st} sk={sk} nw={nw} g={g} failed: {type(e).__name__}")
            results.sort()
            best = results[0]
            tb = lambda t: N * K / t / 1e6  # noqa: E731 -- FP8 weight bytes per us -> TB/s
            cfg = lambda b, s_, k, n, g: f"bn{b}/st{s_}/sk{k}/nw{n}" + (f"/g{g}" if g != 1 else "")  # noqa: E731
            say(f"M={M:3d} N={N:6d} K={K:6d}{' cold x' + str(len(wqs)) if args.cold else ''} bf16 {t_bf16:7.1f}  "
                f"current(bn{cur.block_n} st{cur.num_stages} sk{cur.split_k} g{cur.groups_k}) "
                f"{t_cur:7.1f} us {tb(t_cur):.2f} TB/s  best {best[0]:7.1f} us {tb(best[0]):.2f} TB/s "
                f"({cfg(*best[1:])})  top5 " + " ".join(f"{r[0]:.1f}:{cfg(*r[1:])}" for r in results[:5]))
            by_split = {}
            for r in results:
                by_split.setdefault(r[3], r[0])
            say("      best per split: " + " ".join(f"sk{k}={t:.1f}" for k, t in sorted(by_split.items())))
            say("      all: " + " ".join(f"{cfg(*r[1:])}={r[0]:.1f}" for r in sorted(results, key=lambda r: r[1:])))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
