"""A/B of the decode knobs on the model benchmark's stack: 4 Llama-3-8B layers, compiled with CUDA
graphs (mode="reduce-overhead"), batch 1 and 16, bf16 beside ours under each combination of

    PREFETCH  kernels.gemm.SKINNY_PREFETCH_BLOCKS (weight blocks asked of L2 before the PDL wait)
    WAIT      kernels.quant.QUANT_WAITS (the activation quantization launched under PDL)
    FUSE      blockwise_fp8.fusion installed (Linears of one input as one gemm_group node)
    GEMV      kernels.gemm.GEMV_MAX_M (optional, default 1: M = 1 on the gemv kernel; 0: on skinny)

    python benchmarks/ab_decode.py --combos 2:1:0,2:1:1,2:1:1:0 [--rounds 2] [--batches 1]

Each combination recompiles ours; the table shows the best of ``--rounds`` medians (bench_model's
timing), and the host time to issue one call (no sync), which bounds the step where it exceeds the
GPU time. Ours' outputs are compared across combinations (same input): grouped and separate
GEMMs may differ in float32 summation order, so the largest difference is printed, not asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402
from blockwise_fp8 import fusion  # noqa: E402
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig, DecoderStack, init_weights  # noqa: E402
from blockwise_fp8.kernels import gemm as G, quant as Q  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--combos", default="0:0:0,2:1:0,2:1:1", help="PREFETCH:WAIT:FUSE[:GEMV], comma-separated")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="bench_model's tiny stack on any device (checks the script)")
    ap.add_argument("--inductor", choices=["tuned", "default"], default="tuned",
                    help="Inductor settings for bf16 and ours alike, as in bench_model.py")
    args = ap.parse_args()
    from torch._inductor import config as inductor_config

    settings, what = bm.inductor_settings(args.inductor)
    print(f"# inductor: {what}", flush=True)
    with inductor_config.patch(settings):
        run(args)


def run(args) -> None:
    from blockwise_fp8 import unwrap_for_compile

    combos = args.combos.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bm.SMOKE if args.smoke else DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads,
                                                    LLAMA3_8B.kv_heads, 4)
    if args.smoke:
        args.ctx = 128
    mode = "reduce-overhead" if dev.type == "cuda" else None
    with torch.device(dev):
        base = DecoderStack(cfg, max_len=args.ctx).to(torch.bfloat16)
    init_weights(base, seed=0)
    base.eval()
    models, _ = bm.build_contenders(base, False, True)
    unwrap_for_compile(models["ours"])
    pos = torch.tensor([args.ctx - 1], device=dev)
    g = torch.Generator(device=dev).manual_seed(1)
    xs = {b: torch.randn(b, 1, cfg.hidden, generator=g, device=dev, dtype=torch.bfloat16) for b in batches}

    def measure(model, b):
        model.setup_cache(b, args.ctx, device=dev)
        fn = torch.compile(model.decode, mode=mode)
        call = lambda: fn(xs[b], pos)  # noqa: E731
        out = call().clone()
        ms = bm.time_ms(call, dev, 3 if args.smoke else 50)
        host = bm.issue_ms(call, dev, 3 if args.smoke else 20)
        torch._dynamo.reset()
        return ms, host, out

    best: dict = {}
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke: not a measurement)"
    print(f"# {card}; {bm.versions()}; {time.strftime('%Y-%m-%d')}", flush=True)
    with torch.no_grad():
        for r in range(args.rounds):
            for b in batches:
                runs = [("bf16", models["bf16"], None)] + [(c, models["ours"], c) for c in combos]
                outs = {}
                for label, model, combo in runs:
                    if combo is not None:
                        pf, wait, fuse, gemv = (combo + ":1").split(":")[:4]
                        G.SKINNY_PREFETCH_BLOCKS, Q.QUANT_WAITS, G.GEMV_MAX_M = int(pf), wait == "1", int(gemv)
                        fusion.install() if fuse == "1" else fusion.uninstall()
                    ms, host, outs[label] = measure(model, b)
                    old = best.get((label, b), (float("inf"), 0.0))
                    best[(label, b)] = min(old, (ms, host))
                diffs = [float((outs[c].float() - outs[combos[0]].float()).abs().max()) for c in combos]
                print(f"round {r} batch {b}: ours max |diff| vs {combos[0]}: {diffs}", flush=True)
    print("\n| variant (PREFETCH:WAIT:FUSE[:GEMV]) | " + " | ".join(f"b{b} ms | host ms/call | x bf16" for b in batches) + " |")
    print("|---|" + "---|---|---|" * len(batches))
    for label in ["bf16"] + combos:
        cells = []
        for b in batches:
            ms, host = best[(label, b)]
            cells.append(f"{ms:.4f} | {host:.3f} | {best[('bf16', b)][0] / ms:.3f}x")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
