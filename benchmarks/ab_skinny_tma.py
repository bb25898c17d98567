"""The skinny kernel (M = 2-64) with its tiles loaded by pointer (cp.async) or by tensor descriptor
(TMA, ``gemm.SKINNY_TMA``; the descriptors made in the kernel or, ``tma_host``, on the host:
``gemm.SKINNY_TMA_HOST``), each with and without its scales loaded a step ahead
(``gemm.SKINNY_SCALES_AHEAD``), in one process on one card, beside bf16 ``F.linear`` (and
cuBLAS's blockwise ``scaled_mm`` where it takes the cell): microseconds and weight GB/s. At M = 1
the library's own plan is the gemv kernel: it is timed as ``gemv`` beside the sides run on the
M = 2 skinny plan (session 37: on an H200 that plan with host-made descriptors beat the gemv).

Why: under Triton 3.9 the skinny kernel ran 0-9% slower than under 3.6 (the thirtieth session's
grids), and its SASS has a proxy fence (MEMBAR.ALL.CTA) before every wgmma that reads cp.async
tiles, which 3.6 did not emit; with TMA tiles the loop has none. If the fence waits for the scale
loads in flight, loading them a step ahead should buy less under 3.9, hence the four contenders.
Run it under each Triton:

    PYTHONPATH=. python benchmarks/ab_skinny_tma.py OUT.txt                 # the image's Triton
    source benchmarks/use_slim_triton.sh; PYTHONPATH=$PYTHONPATH:. python benchmarks/ab_skinny_tma.py OUT39.txt

Timing as ``ab_gemv_layout.py``: ``--heat`` seconds of the contender itself before each timing,
CUDA-graph median, best of ``--rounds`` rotated rounds; each output's error against the float64
product of the quantized operands beside its time.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from blockwise_fp8 import ops, reference
from blockwise_fp8.kernels import gemm as G

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ab_gemv_layout import ab_parser, ab_start, cell_line, gemm_under, time_cell, weights  # noqa: E402


def contenders(aq, a_scale, wq, w_scale, sides: tuple, plan_override=None) -> dict:
    """name -> a call of the library's GEMM (its own plan) with the tiles by pointer, by descriptors
    made in the kernel (``tma``: ``gemm.SKINNY_TMA``) or, in a CUDA graph, made on the host
    (``tma_host``: ``gemm.SKINNY_TMA_CAPTURED``; its eager calls after the first take the pointer
    path), the scales a step ahead or, with the suffix ``_at_use``, where used; the module's
    settings are put back after each. ``plan_override``: a skinny plan to run instead of the
    library's own (M = 1, whose own plan is the gemv)."""

    def with_settings(eager_from, captured_from, ahead: bool):
        return gemm_under(dict(SKINNY_TMA=eager_from, SKINNY_TMA_CAPTURED=captured_from, SKINNY_SCALES_AHEAD=ahead),
                          aq, a_scale, wq, w_scale, plan_override)

    known = {"pointer": (None, None), "tma": (1, None), "tma_host": (None, 1)}  # 1: every block_m
    fns = {}
    for side in sides:
        base = side.removesuffix("_at_use")
        if base not in known:
            raise SystemExit(f"--sides: expected {sorted(known)}, each optionally with _at_use, got {side!r}")
        fns[side] = with_settings(*known[base], ahead=not side.endswith("_at_use"))
    return fns


def replayed(fn):
    """``fn``'s output as a CUDA graph of it computes it (the timings' way: descriptors made on the
    host only there), after one eager call that loads its kernels."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


def relative_errors(outs: dict, aq, a_scale, w64) -> dict:
    """name -> max |out - ref| / max |ref|, ref the float64 product of the dequantized operands
    (made once, on the operands' device: at M = 64 a CPU float64 product of the 470 MB weight
    would take longer than the timings)."""
    ref = reference.dequantize(aq, a_scale, (1, 128), torch.float64) @ w64.T
    return {name: ((out.double() - ref).abs().max() / ref.abs().max()).item() for name, out in outs.items()}


def main(argv=None) -> None:
    parser = ab_parser(__doc__)
    parser.add_argument("--ms", default="2,8,16,32,64",
                        help="comma-separated M (the skinny kernel's range; M = 1 times the gemv plan beside the "
                             "sides on the M = 2 skinny plan)")
    parser.add_argument("--sides", default="pointer,tma,tma_host,pointer_at_use,tma_at_use",
                        help="contenders: pointer, tma, tma_host, each optionally with _at_use")
    args = parser.parse_args(argv)
    say = ab_start(args, "ab_skinny_tma", "")
    for dname, dt, N, K, g, w16 in weights(args):
        wq, ws = ops.quantize_weight(w16, dt)
        w64 = reference.dequantize(wq, ws, (128, 128), torch.float64)
        for M in (int(v) for v in args.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
            aq, as_ = ops.quantize_activation(x, dt)
            p = G.plan(M, N, K, tma=False, num_sms=G._num_sms(0))
            own = {}
            if p.kind == "gemv":  # M = 1: the sides run the M = 2 skinny plan beside the gemv
                own = {"gemv": lambda aq=aq, as_=as_, wq=wq, ws=ws: G.gemm(aq, as_, wq, ws, None, torch.bfloat16)}
                p = G.plan(2, N, K, tma=False, num_sms=G._num_sms(0))
            if p.kind != "skinny":
                say(f"{dname} M={M} {N}x{K}: the plan is {p.kind}, not the skinny kernel; skipped")
                continue
            fns = {**own, **contenders(aq, as_, wq, ws, tuple(args.sides.split(",")), p if own else None)}
            if ops.cublas_supports(M, N, K, dt, dt, torch.bfloat16) and ops.cublas_blockwise_available(x.device):
                m_major = ops._m_major(as_)  # the layout a scaled_mm user hands cuBLAS, made outside the timing
                fns["cublas"] = lambda aq=aq, m_major=m_major, wq=wq, ws=ws: ops._cublas_gemm(aq, m_major, wq, ws, None,
                                                                                              torch.bfloat16)
            errors = relative_errors({name: replayed(fn) for name, fn in fns.items()}, aq, as_, w64)
            best = time_cell(args, lambda: F.linear(x, w16), fns)
            say(cell_line(f"{dname} M={M} {N}x{K} bn{p.block_n} groups_k{p.groups_k} split{p.split_k} "
                          f"st{p.num_stages}", N, K, best, errors))


if __name__ == "__main__":
    main()
