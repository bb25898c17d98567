"""Our GEMM at a ragged M (not a multiple of the tile rows) on an activation of exactly M rows
against the same activation in storage padded with zero rows as ``linear`` writes it
(``gemm.activation_rows``: the ws kernel's TMA boxes then stay within the tensor, see
``gemm_hopper.rows_view``), in one process on one card, beside quantize + GEMM (``linear``), cuBLAS
and bf16. Since session 35 the ws launcher copies a tight activation into padded rows where that
measured faster (``gemm_hopper._rows_for_boxes``): ``tight`` is the call as it runs now, ``past``
the same call with the copy off (its boxes past the end of the tensor, what ``tight`` was before).

    source benchmarks/use_slim_triton.sh     # on the device image, with .t39/ carried (or Triton 3.6)
    PYTHONPATH=. python benchmarks/ab_ragged_m.py OUT.txt [--cells e4m3:257x8192x8192,...]

Outputs of the two GEMMs are compared bit for bit ('!' after a time: they differed). Timing as the
grid's self-heat method: ``--heat`` s of the contender itself before each timing, CUDA-graph
median, best of ``--rounds`` rotated rounds. Microseconds.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import blockwise_fp8 as bf
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, gemm_hopper as H, quant

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_gemm as B  # noqa: E402

CELLS = ",".join(f"{d}:{m}x{nk}" for d in ("e4m3", "e5m2") for nk in ("8192x8192", "10240x8192", "8192x28672")
                 for m in (257, 320, 513, 1100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--cells", default=CELLS, help="comma-separated dtype:MxNxK")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heat", type=float, default=0.3, help="seconds of self-heat before each timing")
    args = parser.parse_args()
    say = B.results_log(args.out, f"bf16 out; self-heat {args.heat} s, best of {args.rounds}, us; "
                                  "'!' after padded: its bits differed from tight's or past's")
    for cell in args.cells.split(","):
        dname, shape = cell.split(":")
        M, N, K = (int(v) for v in shape.split("x"))
        dt = B.DTYPES[dname]
        g = torch.Generator(device="cuda").manual_seed(M + N + K)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
        wq, ws = ops.quantize_weight(w16, dt)
        m_major = G.prefers_m_major_scales(M, N, K, wq)
        rows = G.activation_rows(M, m_major)
        pad_q, pad_s = quant.quantize(x, 1, 128, dt, scale_m_major=m_major, rows_multiple_of=rows)
        pad_q, pad_s = pad_q[:M], pad_s[:M]
        # as linear wrote them before session 33: M-major scales in rows padded to 4 only, and the
        # data's storage of exactly M rows
        old_q, old_s = quant.quantize(x, 1, 128, dt, scale_m_major=m_major, rows_multiple_of=4 if m_major else 1)
        tight_q, tight_s = old_q[:M].clone(), old_s[:M]

        def boxes_past():
            copy_max_m, H.PAD_COPY_MAX_M = H.PAD_COPY_MAX_M, 0
            try:
                return G.gemm(tight_q, tight_s, wq, ws, None, torch.bfloat16)
            finally:
                H.PAD_COPY_MAX_M = copy_max_m
        fns = {"bf16": lambda: F.linear(x, w16),
               "tight": lambda: G.gemm(tight_q, tight_s, wq, ws, None, torch.bfloat16),
               "past": boxes_past,
               "padded": lambda: G.gemm(pad_q, pad_s, wq, ws, None, torch.bfloat16),
               "linear": lambda: bf.linear(x, wq, ws, activation_dtype=dt, backend="triton")}
        if ops.cublas_supports(M, N, K, dt, dt, torch.bfloat16) and ops.cublas_blockwise_available(x.device):
            aq, as_ = ops.quantize_activation(x, dt)
            cs = B.operand_scales(aq, as_, wq, dt)["cublas"]
            fns["cublas"] = lambda: ops._cublas_gemm(aq, cs, wq, ws, None, torch.bfloat16)
        same = torch.equal(fns["tight"](), fns["padded"]()) and torch.equal(fns["past"](), fns["padded"]())
        p = G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0), card=G.card_plans(0),
                   scales_in_ring=m_major, multicast=True)
        best = B.time_contenders(fns, 100, args.rounds, settle=B.self_heat(args.heat))
        say(f"{cell} plan={p.kind}{p.block_m} split={p.tail_split} ring={p.scales_tma} cluster={p.cluster}: " +
            "  ".join(f"{k} {t:.1f}{'!' if k == 'padded' and not same else ''}" for k, t in best.items()) +
            f"  tight/padded {best['tight'] / best['padded']:.3f}  past/padded {best['past'] / best['padded']:.3f}")


if __name__ == "__main__":
    main()
