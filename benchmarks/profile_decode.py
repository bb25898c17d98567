"""Where a compiled decode step spends its GPU time: bench_model's stack (4 Llama-3-8B layers,
mode="reduce-overhead"), bf16 and ours, kernels of the CUDA-graph replay read from torch.profiler.

    python benchmarks/profile_decode.py [--batches 1] [--steps 20] [--inductor tuned|default]

Per contender and batch: the step's GPU span (first kernel start to last kernel end, per step),
the busy time (sum of kernel durations) and the idle rest, then the kernels grouped into
categories (our GEMMs, our quantization, attention, Inductor's Triton kernels, cuBLAS, other)
and the top kernels by time, all in microseconds per step. The full kernel table goes to
``--out`` (CSV) when given.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig  # noqa: E402

# the first category with a matching name decides; Inductor's kernels are named "triton_..."
# after the nodes they fuse (a RMSNorm before our quantization is "..._quantize_input_...")
OUR_KERNELS = ("gemm_gemv_kernel", "gemm_skinny_kernel", "gemm_tma_kernel", "gemm_ws_kernel", "gemm_tiled_kernel")
CATEGORIES = (
    ("inductor triton", lambda k: k.startswith("triton_")),
    ("ours: gemm", lambda k: k.startswith(OUR_KERNELS)),
    ("ours: quant", lambda k: k.startswith(("quantize_kernel", "dequantize_kernel"))),
    ("attention", lambda k: any(s in k.lower() for s in ("flash", "fmha", "attention", "sdpa", "cudnn"))),
    ("cublas", lambda k: any(s in k.lower() for s in ("gemv", "gemm", "nvjet", "xmma", "cutlass"))),
)


def category(name: str) -> str:
    return next((cat for cat, match in CATEGORIES if match(name)), "other")


def split_steps(kernels: list, steps: int) -> list:
    """``kernels`` (name, start, duration), sorted by start, cut into ``steps`` runs at the
    ``steps - 1`` largest gaps: the host waits for the GPU between steps, so those gaps are far
    longer than any gap inside a CUDA-graph replay."""
    if not kernels:
        return []
    ends = list(itertools.accumulate((k[1] + k[2] for k in kernels), max))  # latest end so far
    gap = lambda i: kernels[i][1] - ends[i - 1]  # noqa: E731
    cuts = sorted(sorted(range(1, len(kernels)), key=gap)[len(kernels) - steps:]) if steps > 1 else []
    bounds = [0, *cuts, len(kernels)]
    return [kernels[a:b] for a, b in zip(bounds, bounds[1:])]


def profile_steps(fn, steps: int) -> tuple[list, float, list]:
    """Kernel (name, start us, duration us) of ``steps`` calls, the mean span of one step, and
    the kernels of the middle step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
            torch.cuda.synchronize()  # steps apart, so each span is one step's
    kernels = sorted(((e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0),
                     key=lambda k: k[1])
    chunks = split_steps(kernels, steps)
    spans = [max(k[1] + k[2] for k in c) - c[0][1] for c in chunks]
    return kernels, sum(spans) / max(len(spans), 1), chunks[len(chunks) // 2] if chunks else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--inductor", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--out", help="CSV of every kernel's time per step")
    ap.add_argument("--sequence", action="store_true",
                    help="also print one step's kernels in order: start (from the step's first), duration, gap")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("profile_decode.py needs a CUDA device")
    from torch._inductor import config as inductor_config

    settings, what = bm.inductor_settings(args.inductor)
    print(f"# {torch.cuda.get_device_name()}; {bm.versions()}; inductor: {what}", flush=True)
    dev = torch.device("cuda")
    cfg = DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads, LLAMA3_8B.kv_heads, 4)
    models, pos = bm.bf16_and_ours_for_decode(cfg, args.ctx, dev)
    rows = []
    with inductor_config.patch(settings), torch.no_grad():
        for b in (int(s) for s in args.batches.split(",")):
            x = torch.randn(b, 1, cfg.hidden, device=dev, dtype=torch.bfloat16)
            for name, model in models.items():
                model.setup_cache(b, args.ctx, device=dev)
                fn = torch.compile(model.decode, mode="reduce-overhead")
                kernels, span, step = profile_steps(lambda: fn(x, pos), args.steps)
                torch._dynamo.reset()
                per = defaultdict(lambda: [0.0, 0])
                for k, _, us in kernels:
                    per[k][0] += us / args.steps
                    per[k][1] += 1
                busy = sum(t for t, _ in per.values())
                cats = defaultdict(float)
                for k, (t, _) in per.items():
                    cats[category(k)] += t
                print(f"\n## {name}, batch {b}: span {span:.1f} us/step, kernels busy {busy:.1f}, "
                      f"idle {span - busy:.1f}, {sum(n for _, n in per.values()) / args.steps:.0f} kernels/step")
                for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
                    print(f"  {c:16s} {t:8.1f} us")
                for k, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[: args.top]:
                    print(f"  {t:8.1f} us  x{n / args.steps:4.0f}  {k[:110]}")
                if args.sequence and step:
                    print(f"  one step of {name} (start us, duration us, gap us after the previous kernel's end):")
                    t0, end = step[0][1], step[0][1]
                    for k, start, us in step:
                        print(f"    {start - t0:8.1f} {us:7.1f} {start - end:6.1f}  {k[:90]}")
                        end = max(end, start + us)
                rows += [(name, b, category(k), k, f"{t:.2f}", n / args.steps) for k, (t, n) in per.items()]
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["contender", "batch", "category", "kernel", "us_per_step", "launches_per_step"])
            w.writerows(rows)


if __name__ == "__main__":
    main()
