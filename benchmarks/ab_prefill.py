"""Prefill of the model benchmark's stack (4 Llama-3-8B layers, 1 x 2048 tokens, torch.compile
default mode), bf16 and ours compiled once each in one process, then timed in alternation, so
that both see the same host and GPU: per round each contender's step time (bench_model's timing),
its host time to issue one call, and once, its kernels' summed device time (torch.profiler).
A step well above its kernels' time while the host time comes close to it is set by the host.
Each row also counts the garbage collector's full (generation 2) collections during its timing;
``--gc-freeze`` moves every object alive after the first half of the rounds out of the
collector's reach (``gc.freeze()``, as serving engines do after warm-up) for the second half.

The kernels are profiled after the timed rounds, so that nothing torch.profiler leaves behind
reaches them (it can leave CUPTI attached to the process, pytorch/pytorch#144455).
``--after-profiler R`` times R more rounds after the profile, beside the clean ones: on an H100 in
session 25 the rounds before and after it were alike, fast and slow in turn as the host's speed
moved (results/prefill-host-h100-2026-11-27-s25.md).

``--mode reduce-overhead`` compiles both with CUDA graphs (one graph for the one prefill shape):
the host then issues one graph replay a call, whatever the kernels' launch cost.

    python benchmarks/ab_prefill.py [--rounds 5] [--tokens 2048] [--layers 4] [--gc-freeze] [--after-profiler R]
                                    [--mode default|reduce-overhead]
    python benchmarks/ab_prefill.py --smoke        # tiny stack, any device: checks the script
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as bm  # noqa: E402
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig  # noqa: E402


def kernel_ms(call, device: torch.device, calls: int = 3) -> float:
    """Device time of the kernels one call runs, summed (ms); 0 off CUDA."""
    if device.type != "cuda":
        return 0.0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before the second half of the rounds")
    ap.add_argument("--after-profiler", type=int, default=0, metavar="R",
                    help="time R more rounds after the kernels were profiled (torch.profiler can leave CUPTI attached)")
    ap.add_argument("--mode", choices=("default", "reduce-overhead"), default="default",
                    help="torch.compile mode of both contenders (reduce-overhead: CUDA graphs)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base_cfg = bm.SMOKE if args.smoke else LLAMA3_8B
    cfg = DecoderConfig(base_cfg.hidden, base_cfg.ffn, base_cfg.heads, base_cfg.kv_heads,
                        base_cfg.layers if args.smoke else args.layers)
    tokens = 64 if args.smoke else args.tokens
    iters = 2 if args.smoke else args.iters
    compile_ = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {card}; {bm.versions()}; {time.strftime('%Y-%m-%d')}; {cfg.layers} layers, prefill 1 x {tokens}, "
          f"{f'torch.compile mode={args.mode}' if compile_ else 'eager'}, inductor tuned", flush=True)
    patch, _ = bm.inductor_settings("tuned")
    from torch._inductor import config as inductor_config

    with inductor_config.patch(patch), torch.no_grad():
        models, _ = bm.bf16_and_ours_for_decode(cfg, tokens, device)
        x = torch.randn((1, tokens, cfg.hidden), generator=torch.Generator(device=device).manual_seed(1),
                        device=device, dtype=torch.bfloat16)
        calls = {}
        for name, model in models.items():
            fn = torch.compile(model, mode=args.mode) if compile_ else model
            calls[name] = (lambda fn: lambda: fn(x))(fn)
            t0 = time.monotonic()
            calls[name]()
            print(f"{name}: compiled and ran once in {time.monotonic() - t0:.1f} s", flush=True)
        rows = {name: [] for name in calls}
        full = [0]

        def count_full_collections(phase, info):
            if phase == "start" and info["generation"] == 2:
                full[0] += 1

        def timed_round(r: int, label: str) -> None:
            collections = {}
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                full[0] = 0
                rows[name].append((bm.time_ms(calls[name], device, iters), bm.issue_ms(calls[name], device, iters)))
                collections[name] = full[0]
            ratio = rows["bf16"][-1][0] / rows["ours"][-1][0]
            for name in calls:
                ms, host = rows[name][-1]
                print(f"{r:5d}  {name:9s}  {ms:7.3f}  {host:7.3f}  {ratio if name == 'ours' else 1.0:.2f}x  "
                      f"{collections[name]:7d}{label}", flush=True)

        gc.callbacks.append(count_full_collections)
        try:
            print("round  contender  step ms  host ms  x bf16  full gc", flush=True)
            for r in range(args.rounds):
                if args.gc_freeze and r == args.rounds // 2:
                    gc.collect()
                    gc.freeze()
                    print(f"gc.freeze(): {gc.get_freeze_count()} objects out of the collector's reach", flush=True)
                timed_round(r, "")
            kern = {name: kernel_ms(call, device) for name, call in calls.items()}
            clean = {name: list(v) for name, v in rows.items()}
            for r in range(args.rounds, args.rounds + args.after_profiler):
                timed_round(r, "  after torch.profiler")
        finally:  # leave the caller's collector as it was (the smoke test runs main() in pytest)
            gc.callbacks.remove(count_full_collections)
            gc.unfreeze()
        after = {name: v[len(clean[name]):] for name, v in rows.items()}
        rows = clean
        print("\ncontender  median step ms  min  max  median host ms  kernels ms/call")
        for name, v in rows.items():
            steps = [s for s, _ in v]
            print(f"{name:9s}  {statistics.median(steps):14.3f}  {min(steps):.3f}  {max(steps):.3f}  "
                  f"{statistics.median(h for _, h in v):14.3f}  {kern[name]:.3f}")
        ratios = [b[0] / o[0] for b, o in zip(rows["bf16"], rows["ours"])]
        print(f"ours x bf16 per round: {', '.join(f'{q:.2f}' for q in ratios)}; median {statistics.median(ratios):.2f}x")
        if args.after_profiler:
            print("after torch.profiler (same process, same compiled graphs):")
            for name, v in after.items():
                print(f"{name:9s}  median step {statistics.median(s for s, _ in v):.3f} ms  "
                      f"median host {statistics.median(h for _, h in v):.3f} ms")
            ratios = [b[0] / o[0] for b, o in zip(after["bf16"], after["ours"])]
            print(f"ours x bf16 after the profiler: median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
