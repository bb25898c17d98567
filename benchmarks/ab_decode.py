"""A/B of the decode knobs on the model benchmark's stack: 4 Llama-3-8B layers, compiled with CUDA
graphs (mode="reduce-overhead"), batch 1 and 16, bf16 beside ours under each combination of

    PREFETCH  kernels.gemm.SKINNY_PREFETCH_BLOCKS (weight blocks asked of L2 before the PDL wait)
    WAIT      kernels.quant.QUANT_WAITS (the activation quantization launched under PDL)
    FUSE      blockwise_fp8.fusion installed (Linears of one input as one gemm_group node)
    GEMV      kernels.gemm.GEMV_MAX_M (optional, default 1: M = 1 on the gemv kernel; 0: on skinny)

    python benchmarks/ab_decode.py --combos 2:1:0,2:1:1,2:1:1:0 [--rounds 2] [--batches 1] [--variants base,pdl]

``--variants`` compiles bf16 and every combination once per Inductor variant (rows suffixed with
it): ``pdl`` = ``triton.enable_pdl`` (Inductor's kernels under programmatic dependent launch),
``freezing`` = parameters folded into the graph as constants (fewer graph inputs for the CUDA-graph
call to check: ours has 77 at 4 layers, bf16 49), ``pdl+freezing`` both; each row's "x bf16" is
against bf16 compiled with the same variant.

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
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig  # noqa: E402
from blockwise_fp8.kernels import gemm as G, quant as Q  # noqa: E402


# Inductor config patches on top of --inductor's, from bench_model's definitions of the two flags
VARIANTS = {name: bm.inductor_settings("default", pdl="pdl" in name, freezing="freezing" in name)[0]
            for name in ("base", "pdl", "freezing", "pdl+freezing")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--combos", default="0:0:0,2:1:0,2:1:1", help="PREFETCH:WAIT:FUSE[:GEMV], comma-separated")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="bench_model's tiny stack on any device (checks the script)")
    ap.add_argument("--inductor", choices=["tuned", "default"], default="tuned",
                    help="Inductor settings for bf16 and ours alike, as in bench_model.py")
    ap.add_argument("--variants", default="base",
                    help=f"Inductor variants, comma-separated, from {', '.join(VARIANTS)} (see the module docstring)")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants takes {', '.join(VARIANTS)}; got {', '.join(unknown)}")
    bm.check_inductor_pdl(ap, any("pdl" in v for v in args.variants))
    from torch._inductor import config as inductor_config

    settings, what = bm.inductor_settings(args.inductor)
    print(f"# inductor: {what}", flush=True)
    with inductor_config.patch(settings):
        run(args)


def run(args) -> None:
    combos = args.combos.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bm.SMOKE if args.smoke else DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads,
                                                    LLAMA3_8B.kv_heads, 4)
    if args.smoke:
        args.ctx = 128
    mode = "reduce-overhead" if dev.type == "cuda" else None
    models, pos = bm.bf16_and_ours_for_decode(cfg, args.ctx, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    xs = {b: torch.randn(b, 1, cfg.hidden, generator=g, device=dev, dtype=torch.bfloat16) for b in batches}

    from torch._inductor import config as inductor_config

    def measure(model, b, variant):
        model.setup_cache(b, args.ctx, device=dev)
        fn = torch.compile(model.decode, mode=mode)
        call = lambda: fn(xs[b], pos)  # noqa: E731
        with inductor_config.patch(VARIANTS[variant]):
            out = call().clone()  # compiles
        ms = bm.time_ms(call, dev, 3 if args.smoke else 50)
        host = bm.issue_ms(call, dev, 3 if args.smoke else 20)
        torch._dynamo.reset()
        return ms, host, out

    variants = args.variants
    suffix = lambda v: "" if v == "base" else "+" + v  # noqa: E731

    best: dict = {}
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke: not a measurement)"
    print(f"# {card}; {bm.versions()}; {time.strftime('%Y-%m-%d')}", flush=True)
    with torch.no_grad():
        for r in range(args.rounds):
            for b in batches:
                runs = [("bf16" + suffix(p), models["bf16"], None, p) for p in variants]
                runs += [(c + suffix(p), models["ours"], c, p) for p in variants for c in combos]
                outs = {}
                for label, model, combo, variant in runs:
                    if combo is not None:
                        pf, wait, fuse, gemv = (combo + ":1").split(":")[:4]
                        G.SKINNY_PREFETCH_BLOCKS, Q.QUANT_WAITS, G.GEMV_MAX_M = int(pf), wait == "1", int(gemv)
                        fusion.install() if fuse == "1" else fusion.uninstall()
                    ms, host, outs[label] = measure(model, b, variant)
                    print(f"round {r} batch {b} {label}: {ms:.4f} ms, host {host:.3f} ms/call", flush=True)
                    old = best.get((label, b), (float("inf"), 0.0))
                    best[(label, b)] = min(old, (ms, host))
                first = combos[0] + suffix(variants[0])
                labels = [c + suffix(p) for p in variants for c in combos]
                diffs = [float((outs[c].float() - outs[first].float()).abs().max()) for c in labels]
                print(f"round {r} batch {b}: ours max |diff| vs {first}: {diffs}", flush=True)
    print("\n| variant (PREFETCH:WAIT:FUSE[:GEMV]) | " + " | ".join(f"b{b} ms | host ms/call | x bf16" for b in batches) + " |")
    print("|---|" + "---|---|---|" * len(batches))
    for p in variants:
        for label in ["bf16"] + combos:
            cells = []
            for b in batches:
                ms, host = best[(label + suffix(p), b)]
                cells.append(f"{ms:.4f} | {host:.3f} | {best[('bf16' + suffix(p), b)][0] / ms:.3f}x")
            print(f"| {label + suffix(p)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
