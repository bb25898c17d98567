"""The gemv kernel (M = 1) with its weight slab in either axis order (``gemm.GEMV_K_BLOCKS_OUTER``)
and K blocks per step (``--groups-k``), in one process on one card, beside bf16 ``F.linear``:
microseconds and weight GB/s.

Why: Triton picks the slab's register layout from its axis order, and Triton 3.6 and 3.9 pick
opposite ones from the same source (see ``GEMV_K_BLOCKS_OUTER``); the twenty-ninth session read the
gemv 6-10% slower under 3.9 and found the cause in the SASS, but had no device time left to time
the other order. The defaults time 2 orders x 2 steps x 2 register caps x masks on and off (16
contenders a cell; ``--groups-k plan`` halves that). Run it under each Triton:

    PYTHONPATH=. python benchmarks/ab_gemv_layout.py OUT.txt                 # the image's Triton
    source benchmarks/use_slim_triton.sh; PYTHONPATH=$PYTHONPATH:. python benchmarks/ab_gemv_layout.py OUT39.txt

Timing as the grid's self-heat method: ``--heat`` seconds of the contender itself before each
timing, CUDA-graph median, best of ``--rounds`` rotated rounds. Each output's error against the
float64 product of the quantized operands is printed beside its time.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F

from blockwise_fp8 import ops, reference
from blockwise_fp8.kernels import gemm as G

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_gemm as B  # noqa: E402

CELLS = "8192x8192,10240x8192,57344x8192,8192x28672"  # the grid's (N, K)
DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def gemm_under(settings: dict, aq, a_scale, wq, w_scale, plan=None):
    """A call of our GEMM (bf16 out, no bias) with the tunables of ``blockwise_fp8.kernels.gemm``
    named in ``settings`` set to their values, put back after each call; with ``plan`` or, where
    None, the library's own."""

    def run():
        kept = {name: getattr(G, name) for name in settings}
        for name, value in settings.items():
            setattr(G, name, value)
        try:
            return G.gemm(aq, a_scale, wq, w_scale, None, torch.bfloat16, plan_override=plan)
        finally:
            for name, value in kept.items():
                setattr(G, name, value)
    return run


def slab_orders(aq, a_scale, wq, w_scale, plan=None, maxnreg=None, unmasked=False) -> dict:
    """name -> a call of our GEMM with the gemv slab in that order, ``gemm.GEMV_MAXNREG`` set to
    ``maxnreg`` and ``gemm.GEMV_UNMASKED`` to ``unmasked`` (the module's settings are put back
    after each call), with ``plan`` or, where None, the library's own (at M = 1 the gemv)."""
    return {name: gemm_under(dict(GEMV_K_BLOCKS_OUTER=outer, GEMV_MAXNREG=maxnreg, GEMV_UNMASKED=unmasked),
                             aq, a_scale, wq, w_scale, plan)
            for name, outer in (("rows_outer", False), ("k_blocks_outer", True))}


def contenders(aq, a_scale, wq, w_scale, groups_k: tuple, maxnregs: tuple = (None,),
               unmaskeds: tuple = (False,)) -> dict:
    """Both slab orders with the library's gemv plan and with that plan taking each of
    ``groups_k`` K blocks per step ("plan": its own), named ORDER_gkG, each under each register
    cap of ``maxnregs`` (None: Triton's choice; a cap adds _maxnregR to the name) and each of
    ``unmaskeds`` (True adds _unmasked: no masks, where the shape allows); a K-blocks-per-step
    count equal to the plan's is timed once. The slab is BLOCK_N rows x GROUPS_K blocks: under
    Triton 3.9 the plan's 8 x 16 in the K-blocks-outer order needs 129 registers, which leaves
    room for 3 programs an SM (4 at 128: the thirtieth session's SASS has its 5 spills outside the
    K loop there; unmasked it needs 96, 5 programs), and 8 x 8 needs 72 in either order (the
    twenty-ninth session's SASS), so a smaller step, a cap or no masks may stream better there."""
    M, K = aq.shape
    own = G.plan(M, wq.shape[0], K, tma=False, num_sms=G._num_sms(aq.device.index or 0))  # as G.gemm plans it
    out = {}
    for unmasked in unmaskeds:
        for cap in maxnregs:
            for g in groups_k:
                p = own if g == "plan" else dataclasses.replace(own, groups_k=int(g))
                for name, fn in slab_orders(aq, a_scale, wq, w_scale, p, cap, unmasked).items():
                    out.setdefault(f"{name}_gk{p.groups_k}" + (f"_maxnreg{cap}" if cap else "")
                                   + ("_unmasked" if unmasked else ""), fn)
    return out


def relative_error(out: torch.Tensor, aq, a_scale, wq, w_scale) -> float:
    """max |out - ref| / max |ref|, ref the float64 product of the dequantized operands."""
    a64 = reference.dequantize(aq.cpu(), a_scale.cpu(), (1, 128), torch.float64)
    w64 = reference.dequantize(wq.cpu(), w_scale.cpu(), (128, 128), torch.float64)
    ref = a64 @ w64.T
    return ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item()


def ab_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the weight-streaming A/B scripts (this one, ab_skinny_tma.py): the output
    file, the (N, K) cells, the dtypes, rounds and seconds of self-heat."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--cells", default=CELLS, help="comma-separated NxK")
    parser.add_argument("--dtypes", default="e5m2", help="e5m2 and/or e4m3 (the weights stream alike)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heat", type=float, default=0.5, help="seconds of self-heat before each timing")
    return parser


def ab_start(args, script: str, what: str):
    """The results log of a weight-streaming A/B run (``bench_gemm.results_log``), its header
    naming ``what`` is timed and how; without a GPU, a SystemExit that says so."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} times a GPU: no CUDA device here")
    return B.results_log(args.out, f"{what}bf16 out; self-heat {args.heat} s, best of {args.rounds}; "
                                   "us (weight GB/s) [relative error]")


def cell_line(label: str, N: int, K: int, best: dict, errors: dict) -> str:
    """One cell's line: each contender's best time in us, the weight's GB/s (bf16's weight has two
    bytes an element) and, for ours, the relative error of its output."""
    return f"{label}: " + "  ".join(f"{k} {t:.1f} ({N * K * (2 if k == 'bf16' else 1) / t / 1e3:.0f})"
                                   + (f" [{errors[k]:.1e}]" if k in errors else "") for k, t in best.items())


def time_cell(args, bf16, fns: dict) -> dict:
    """Best times of ``bf16`` and each of ``fns`` (name -> call), by the grid's self-heat method."""
    return B.time_contenders({"bf16": bf16, **fns}, 100, args.rounds, settle=B.self_heat(args.heat))


def weights(args):
    """(dtype name, dtype, N, K, generator, bf16 weight) per cell and dtype of ``args``, on the GPU,
    the generator seeded by the cell (it draws the activations after the weight)."""
    for cell in args.cells.split(","):
        N, K = (int(v) for v in cell.split("x"))
        for dname in args.dtypes.split(","):
            g = torch.Generator(device="cuda").manual_seed(N + K)
            w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
            yield dname, DTYPES[dname], N, K, g, w16


def main(argv=None) -> None:
    parser = ab_parser(__doc__)
    parser.add_argument("--groups-k", default="plan,8", help="K blocks per gemv step to time: 'plan' (its own) and/or counts")
    parser.add_argument("--maxnreg", default="none,128",
                        help="register caps to time each contender under: 'none' (Triton's choice) and/or counts")
    parser.add_argument("--unmasked", default="0,1", help="GEMV_UNMASKED settings to time each contender under")
    args = parser.parse_args(argv)
    say = ab_start(args, "ab_gemv_layout", "M = 1, ")
    for dname, dt, N, K, g, w16 in weights(args):
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
        aq, as_ = ops.quantize_activation(x, dt)
        wq, ws = ops.quantize_weight(w16, dt)
        p = G.plan(1, N, K, tma=False, num_sms=G._num_sms(0))
        caps = tuple(None if v == "none" else int(v) for v in args.maxnreg.split(","))
        orders = contenders(aq, as_, wq, ws, tuple(args.groups_k.split(",")), caps,
                            tuple(bool(int(v)) for v in args.unmasked.split(",")))
        errors = {name: relative_error(fn(), aq, as_, wq, ws) for name, fn in orders.items()}
        best = time_cell(args, lambda: F.linear(x, w16), orders)
        say(cell_line(f"{dname} {N}x{K} {p.kind} bn{p.block_n} groups_k{p.groups_k} split{p.split_k}", N, K, best, errors))


if __name__ == "__main__":
    main()
