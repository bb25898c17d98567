"""Eager decode step with our Linears' calls replayed or not (session 40, blockwise_fp8/replay.py).

    PYTHONPATH=. python benchmarks/eager_decode_replay.py OUT.txt [--batches 1,16] [--reps 4]

4 Llama-3-8B layers (demo_model, random weights, KV cache of 2048), one token per sequence, no
torch.compile and no CUDA graphs: what a user running a model eagerly gets. Contenders on the
same weights: bf16; ours (quantize_ with BlockwiseFP8Config) with `ops.REPLAY_EAGER_CALLS` off
and on. Checked first: ours gives the same bits with replay off and on. Then alternating reps,
each 5 warm-up steps and 50 timed: ms per step (wall, the GPU's work included), and the host's
time to issue the 50 (ms per step) to show which side bounds it.
"""
import argparse
import os
import sys
import time

import torch
import triton

from blockwise_fp8 import ops
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig, DecoderStack, init_weights

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402


def step_ms(model, x, pos, steps=50):
    for _ in range(5):
        model.decode(x, pos)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        model.decode(x, pos)
    issue = (time.perf_counter() - t0) / steps * 1e3
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3, issue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    cfg = DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads, LLAMA3_8B.kv_heads, 4)
    with torch.device("cuda"):
        bf16 = DecoderStack(cfg, max_len=2048).to(torch.bfloat16)
    init_weights(bf16, seed=0)
    ours = bench_model.build_contenders(bf16.eval(), want_torchao=False)[0]["ours"]  # quantize_'d copy
    lines = [f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; eager decode, "
             f"4 Llama-3-8B layers, ctx 2048; ms per step: wall (host issue), {args.reps} alternating reps of 50 steps"]

    def say(s):
        print(s, flush=True)
        lines.append(s)

    saved = ops.REPLAY_EAGER_CALLS
    try:
        with torch.no_grad():
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, 1, cfg.hidden, device="cuda", dtype=torch.bfloat16)
                pos = torch.tensor([2047], device="cuda")
                for m in (bf16, ours):
                    m.setup_cache(batch, 2048, device="cuda")
                outs = {}
                for replay in (False, True, True, True):  # replay: the third call of a shape on
                    ops.REPLAY_EAGER_CALLS = replay
                    outs[replay] = ours.decode(x, pos).clone()
                say(f"batch {batch}: same bits with replay off and on: "
                    f"{torch.equal(outs[False].view(torch.int16), outs[True].view(torch.int16))}")
                times = {"bf16": [], "ours, replay off": [], "ours, replay on": []}
                for rep in range(args.reps):
                    order = list(times) if rep % 2 == 0 else list(reversed(times))
                    for name in order:
                        ops.REPLAY_EAGER_CALLS = name.endswith("on")
                        times[name].append(step_ms(bf16 if name == "bf16" else ours, x, pos))
                for name, ts in times.items():
                    wall = sorted(t[0] for t in ts)[len(ts) // 2]
                    issue = sorted(t[1] for t in ts)[len(ts) // 2]
                    say(f"batch {batch:3d} {name:18s} {wall:7.3f} ({issue:6.3f})   min {min(t[0] for t in ts):7.3f}")
    finally:
        ops.REPLAY_EAGER_CALLS = saved
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
