"""Host (CPU) time per call: where the Python side of a linear and of a compiled model step goes.

    python benchmarks/host_overhead.py --out results/host_overhead.txt

For one eager ``ops.linear`` per backend path (the gemv kernel at M=1, the tma kernel with split K
at M=64, cuBLAS at M=2048), layer by layer from the kernel launchers (``kernels.quant.quantize``,
``kernels.gemm.gemm``, ``torch._scaled_mm``) up to the public functions, and one compiled step of
the model benchmark's stack (decode with CUDA graphs, prefill without), it prints the wall time
per call, then a cProfile table of the calls (top functions by own time). Where a layer costs
more than the sum of the ones it calls, the difference is host time outside them.
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import io
import os
import pstats
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blockwise_fp8 import BlockwiseFP8Config, ops  # noqa: E402
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig, DecoderStack, init_weights  # noqa: E402
from host_timing import back_to_back_us  # noqa: E402


def host_us(fn, calls: int = 200) -> float:
    """Mean wall time per call of ``calls`` back-to-back calls, after a warm-up (no sync inside)."""
    return back_to_back_us(fn, calls)


def profile(fn, calls: int = 100, rows: int = 22) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(rows)
    return s.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    report = []
    say = lambda s="": (print(s, flush=True), report.append(s))  # noqa: E731

    torch.manual_seed(0)
    from blockwise_fp8.kernels import gemm as gemm_kernels
    from blockwise_fp8.kernels import quant

    for M, N, K in ((1, 4096, 4096), (64, 4096, 4096), (2048, 4096, 4096)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        wq, ws = ops.quantize_weight(w)
        aq, as_ = ops.quantize_activation(x)
        path = ops.choose_gemm_backend(M, N, K, aq.dtype, wq.dtype, torch.bfloat16,
                                       cublas_available=ops.cublas_blockwise_available(x.device),
                                       num_sms=ops.gemm_card(x.device)[1], card=ops.gemm_card(x.device)[0])
        aq_m, as_m = quant.quantize(x, 1, 128, torch.float8_e4m3fn, scale_m_major=True)  # cuBLAS's layout
        kind = gemm_kernels.plan(M, N, K, tma=gemm_kernels.tma_usable(aq, wq), ws=gemm_kernels.ws_usable(aq, wq)).kind
        fns = {
            "F.linear bf16": lambda: F.linear(x, w),
            "kernels: quant.quantize": lambda: quant.quantize(x, 1, 128, torch.float8_e4m3fn),
            f"kernels: gemm.gemm ({kind})": lambda: gemm_kernels.gemm(aq, as_, wq, ws, None, torch.bfloat16),
            "torch._scaled_mm (cuBLAS blockwise)": lambda: torch._scaled_mm(
                aq_m, wq.t(), as_m, ws.t(), out_dtype=torch.bfloat16),
            "ops._cublas_gemm": lambda: ops._cublas_gemm(aq_m, as_m, wq, ws, None, torch.bfloat16),
            f"ops.linear ({path})": lambda: ops.linear(x, wq, ws),
            "ops.quantize_activation": lambda: ops.quantize_activation(x),
            f"ops.gemm ({path})": lambda: ops.gemm(aq, as_, wq, ws),
            "torch.ops.blockwise_fp8.linear": lambda: torch.ops.blockwise_fp8.linear(
                x, wq, ws, None, torch.float8_e4m3fn, torch.bfloat16, "auto"),
        }
        say(f"## eager, M={M} N={N} K={K}: host us per call")
        for name, fn in fns.items():
            try:
                say(f"  {name:38s} {host_us(fn):8.1f}")
            except Exception as e:  # noqa: BLE001 -- e.g. cuBLAS refusing M = 1: say so, time the rest
                say(f"  {name:38s} failed: {type(e).__name__}: {str(e)[:100]}")
        say(profile(fns[f"ops.linear ({path})"]))

    cfg = DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads, LLAMA3_8B.kv_heads, args.layers)
    with torch.device("cuda"):
        base = DecoderStack(cfg, max_len=2048).to(torch.bfloat16)
    init_weights(base, seed=0)
    base.eval()
    from torchao.quantization import quantize_

    from torchao.utils import unwrap_tensor_subclass

    ours = copy.deepcopy(base)
    quantize_(ours, BlockwiseFP8Config())
    unwrapped = unwrap_tensor_subclass(copy.deepcopy(ours))
    for name, model in (("bf16", base), ("ours", ours), ("ours, unwrap_tensor_subclass", unwrapped)):
        with torch.no_grad():
            model.setup_cache(1, 2048, device="cuda")
            xd = torch.randn(1, 1, cfg.hidden, device="cuda", dtype=torch.bfloat16)
            pos = torch.tensor([2047], device="cuda")
            dec = torch.compile(model.decode, mode="reduce-overhead")
            xp = torch.randn(1, 2048, cfg.hidden, device="cuda", dtype=torch.bfloat16)
            for phase, fn in (("decode", lambda: dec(xd, pos)),):
                say(f"## {name} compiled {phase} ({args.layers} layers): host us per call {host_us(fn, 100):.1f}")
                say(profile(fn, 50))
            torch._dynamo.reset()
            pre = torch.compile(model)
            fn = lambda: pre(xp)  # noqa: E731
            say(f"## {name} compiled prefill 1x2048 ({args.layers} layers): host us per call {host_us(fn, 20):.1f}")
            say(profile(fn, 10))
            torch._dynamo.reset()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
