"""A/B (GPU): ``linear`` at mid M on narrow weights with the narrow plan on and off
(``gemm.CardPlans.narrow_sms_per_program``; session 36), bf16 ``F.linear`` beside. Both sides are the
library's default path (quantize into padded storage, then the plan ``plan()`` picks), in one
process, CUDA-graph medians, self-heat before each timing, best of ``--rounds`` rotated rounds.
"on" is the card's table with ``narrow_sms_per_program`` = ``--per-program`` (default: the card's
own value, or 4, the H200's, where the card's table has it off, as the H100's does: the question
for an H100 session), "off" the same table with 0.

    PYTHONPATH=. python benchmarks/ab_narrow.py OUT.txt --cells 80x1024x4096,200x1024x4096 [--dtype e5m2]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_gemm as B  # noqa: E402
import blockwise_fp8 as bf  # noqa: E402
from blockwise_fp8.kernels import gemm as G  # noqa: E402

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
CELLS = "80x1024x4096,128x1024x4096,200x1024x4096,128x1024x8192,128x2048x2048,80x2048x7168"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--cells", default=CELLS, help="comma-separated MxNxK")
    ap.add_argument("--dtype", default="e5m2", choices=sorted(DTYPES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--heat", type=float, default=0.2, help="seconds of self-heat before each timing")
    ap.add_argument("--per-program", type=int, default=0,
                    help="SMs per ws program for the 'on' side (default: the card's value, else 4)")
    args = ap.parse_args()
    if args.per_program < 0:
        ap.error(f"--per-program takes a positive number of SMs, got {args.per_program}")
    family = G.device_card(0)[0]
    table = G.CARD_PLANS[family]
    per_program = args.per_program or table.narrow_sms_per_program or 4
    card_on = table._replace(narrow_sms_per_program=per_program)
    card_off = table._replace(narrow_sms_per_program=0)
    say = B.results_log(args.out, f"{args.dtype}, linear (quantize + GEMM), self-heat {args.heat} s, best of "
                                  f"{args.rounds}, us; on/off: CARD_PLANS[{family!r}] with narrow_sms_per_program "
                                  f"{per_program} / 0 (the table has {table.narrow_sms_per_program})")
    dt = DTYPES[args.dtype]

    def under(card, fn):
        def run():
            G.CARD_PLANS[family] = card
            try:
                return fn()
            finally:
                G.CARD_PLANS[family] = table
        return run

    for M, N, K in (tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")):
        g = torch.Generator(device="cuda").manual_seed(M * N + K)
        w16 = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        wq, ws = bf.quantize_weight(w16, dt)
        ours = lambda: bf.linear(x, wq, ws, None, activation_dtype=dt, backend="triton")  # noqa: E731
        fns = {"bf16": lambda: F.linear(x, w16), "off": under(card_off, ours), "on": under(card_on, ours)}
        plans = {}
        for name, card in (("off", card_off), ("on", card_on)):
            p = G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0), scales_in_ring=True, card=card)
            plans[name] = f"{p.kind}{p.block_m}x{p.block_n}t{p.tail_split}"
        ref = fns["off"]().float()
        close = torch.allclose(fns["on"]().float(), ref, rtol=2e-2, atol=2e-2)
        best = B.time_contenders(fns, 100, args.rounds, settle=B.self_heat(args.heat))
        say(f"{M}x{N}x{K} off={plans['off']} on={plans['on']}: " + "  ".join(f"{k} {v:.1f}" for k, v in best.items())
            + f"  on/off {best['on'] / best['off']:.3f}" + ("" if close else "  MISMATCH"))


if __name__ == "__main__":
    main()
