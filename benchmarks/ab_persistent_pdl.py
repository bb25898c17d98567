"""``linear`` (activation quantization + GEMM) at mid and large M with the ws GEMM kernel launched
under programmatic dependent launch at every M or at none (``gemm.WS_PDL_MAX_M``), in one process
on one card, beside bf16 ``F.linear``: microseconds, and whether both outputs have the same bits.
(Session 38 ran its first form, whose flag also put the tma kernel under PDL: that lost 25-29% on
the 64 x 64 tiles, so the tma kernel launches as before.)

Why: the quantization lets the next grid launch at its start, but until session 38 only the
weight-streaming kernels (M <= 64) were launched to take that; a tma or ws GEMM started after
the quantization had finished and the launch gap had passed. Under PDL the ws kernel's CTAs set up shared
memory and barriers during the quantization's tail and wait (griddepcontrol.wait) before their
first global access.

    PYTHONPATH=. python benchmarks/ab_persistent_pdl.py OUT.txt [--cells 4096x4096,...] [--ms 80,128]

Timing as ``ab_gemv_layout.py``: ``--heat`` seconds of the contender itself before each timing,
CUDA-graph median (the graph repeats the call, so each quantization also follows a GEMM), best of
``--rounds`` rotated rounds. e5m2 by default, where ``auto`` runs our kernels at every M.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ab_gemv_layout import ab_parser, ab_start, time_cell, weights  # noqa: E402

CELLS = "1024x4096,4096x4096,6144x4096,8192x8192,28672x4096,4096x14336"


def linear_under(pdl: bool, x, wq, ws):
    """A call of ``ops.linear`` with the ws kernel under PDL at every M or at none
    (``gemm.WS_PDL_MAX_M``, put back after)."""
    def run():
        kept = G.WS_PDL_MAX_M
        G.WS_PDL_MAX_M = 1 << 62 if pdl else 0
        try:
            return ops.linear(x, wq, ws)
        finally:
            G.WS_PDL_MAX_M = kept
    return run


def main(argv=None) -> None:
    parser = ab_parser(__doc__)
    parser.set_defaults(cells=CELLS)
    parser.add_argument("--ms", default="80,128,200,256,512,1024", help="comma-separated M")
    args = parser.parse_args(argv)
    say = ab_start(args, "ab_persistent_pdl", "linear (quantize + GEMM), ")
    for dname, dt, N, K, g, w16 in weights(args):
        wq, ws = ops.quantize_weight(w16, dt)
        for M in (int(v) for v in args.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
            p = G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0), card=G.card_plans(0))
            fns = {"pdl": linear_under(True, x, wq, ws), "no_pdl": linear_under(False, x, wq, ws)}
            outs = {name: fn() for name, fn in fns.items()}
            same = torch.equal(outs["pdl"].view(torch.int16), outs["no_pdl"].view(torch.int16))
            best = time_cell(args, lambda: F.linear(x, w16), fns)
            say(f"{dname} M={M} {N}x{K} {p.kind} {p.block_m}x{p.block_n} split{p.tail_split}: "
                + "  ".join(f"{k} {t:.1f}" for k, t in best.items())
                + f"  pdl/no_pdl {best['pdl'] / best['no_pdl']:.3f}  same bits {same}")


if __name__ == "__main__":
    main()
