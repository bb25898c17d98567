"""M = 1 (and 2): the gemv plan against the skinny kernel's M = 2 plan with host-made descriptors (in
CUDA graphs) or pointer loads, on the grid's weights. Self-heat timing as ab_gemv_layout."""
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from ab_gemv_layout import ab_parser, ab_start, cell_line, time_cell, weights
from ab_skinny_tma import relative_errors, replayed
from blockwise_fp8 import ops, reference
from blockwise_fp8.kernels import gemm as G

parser = ab_parser(__doc__)
parser.add_argument("--ms", default="1")
args = parser.parse_args()
say = ab_start(args, "s37_m1", "")


def side(aq, as_, wq, ws, p, captured):
    def run():
        kept = G.SKINNY_TMA_CAPTURED
        G.SKINNY_TMA_CAPTURED = captured
        try:
            return G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p)
        finally:
            G.SKINNY_TMA_CAPTURED = kept
    return run


for dname, dt, N, K, g, w16 in weights(args):
    wq, ws = ops.quantize_weight(w16, dt)
    w64 = reference.dequantize(wq, ws, (128, 128), torch.float64)
    for M in (int(v) for v in args.ms.split(",")):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        aq, as_ = ops.quantize_activation(x, dt)
        own = G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0))
        sk = G.plan(2, N, K, tma=True, ws=True, num_sms=G._num_sms(0))
        fns = {"plan": side(aq, as_, wq, ws, own, 16), "skinny_ptr": side(aq, as_, wq, ws, sk, None),
               "skinny_host": side(aq, as_, wq, ws, sk, 16)}
        errors = relative_errors({k: replayed(f) for k, f in fns.items()}, aq, as_, w64)
        best = time_cell(args, lambda: F.linear(x, w16), fns)
        say(cell_line(f"{dname} M={M} {N}x{K} plan {own.kind} bn{own.block_n} gk{own.groups_k} s{own.split_k}; "
                      f"skinny bn{sk.block_n} gk{sk.groups_k} s{sk.split_k} st{sk.num_stages}", N, K, best, errors))
