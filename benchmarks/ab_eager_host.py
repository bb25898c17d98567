"""Eager host time of our Linears, A/B of host-side designs (sessions 39 and 40).

    PYTHONPATH=. python benchmarks/ab_eager_host.py OUT.txt [--rounds 6] [--compare dispatcher|replay]

Variants, alternated round by round in one process (a host's speed drifts):
  --compare dispatcher (session 39): the calls as before session 39 (every op through the
    dispatcher, `_on_device` entering torch.cuda.device each call), `ops.DIRECT_EAGER_CALLS` with
    the new `_on_device`, and the dispatcher with the new `_on_device`;
  --compare replay (session 40): `ops.REPLAY_EAGER_CALLS` off and on (blockwise_fp8/replay.py).
Rows: a quantize_'d nn.Linear and a BlockwiseFP8Linear at M = 1, 16, 256, and the functional
`linear`, `quantize_activation`, `gemm` at M = 16, beside bf16 `F.linear`; N = K = 4096 keeps each
call's GPU work short, so the host bounds every row. With --compare replay also a 28672 x 8192
weight (a 70B model's gate/up) at M = 1, 16, 128, where the GPU time is longer, beside bf16:
rows marked "wall" take host_timing.wall_us (the GPU's time included). The others: back-to-back
mean us per call (host_timing.back_to_back_us). Median and min over the rounds, torch.no_grad.
"""
import argparse
import contextlib
import os
import statistics
import sys

import torch
import torch.nn as nn
import triton
from torchao.quantization import quantize_

from blockwise_fp8 import BlockwiseFP8Config, ops, unwrap_for_compile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_timing import back_to_back_us, wall_us  # noqa: E402


def _on_device_before(t):  # ops._on_device before session 39
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--compare", choices=("dispatcher", "replay"), default="dispatcher")
    args = parser.parse_args()
    # (DIRECT_EAGER_CALLS, _on_device, REPLAY_EAGER_CALLS)
    if args.compare == "dispatcher":
        variants = {"before (dispatcher, device ctx)": (False, _on_device_before, False),
                    "direct + ctx skip": (True, ops._on_device, False),
                    "dispatcher + ctx skip": (False, ops._on_device, False)}
    else:
        variants = {"replay off": (True, ops._on_device, False), "replay on": (True, ops._on_device, True)}
    N = K = 4096
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    quantize_(lin, BlockwiseFP8Config())
    plain = nn.Sequential(nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16))
    quantize_(plain, BlockwiseFP8Config())
    plain = unwrap_for_compile(plain)[0]
    w_q, w_s, w_bf16 = lin.weight.qdata, lin.weight.scale, lin.weight.dequantize()
    xs = {m: torch.randn(m, K, device="cuda", dtype=torch.bfloat16) for m in (1, 16, 256)}
    a_q, a_s = ops.quantize_activation(xs[16])
    rows = {}
    for m, x in xs.items():
        rows[f"quantize_'d nn.Linear M={m}"] = lambda x=x: lin(x)
        rows[f"BlockwiseFP8Linear M={m}"] = lambda x=x: plain(x)
    rows["ops.linear M=16"] = lambda: ops.linear(xs[16], w_q, w_s)
    rows["ops.quantize_activation M=16"] = lambda: ops.quantize_activation(xs[16])
    rows["ops.gemm M=16"] = lambda: ops.gemm(a_q, a_s, w_q, w_s)
    rows["F.linear bf16 M=16 (for scale)"] = lambda: torch.nn.functional.linear(xs[16], w_bf16)
    if args.compare == "replay":
        big = nn.Linear(8192, 28672, bias=False, device="cuda", dtype=torch.bfloat16)
        big_bf16 = big.weight.detach().clone()
        quantize_(big, BlockwiseFP8Config())
        for m in (1, 16, 128):
            x = torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16)
            rows[f"wall: quantize_'d nn.Linear 28672x8192 M={m}"] = lambda x=x: big(x)
            rows[f"wall: F.linear bf16 28672x8192 M={m}"] = lambda x=x: torch.nn.functional.linear(x, big_bf16)
    times = {(r, v): [] for r in rows for v in variants}
    saved = ops.DIRECT_EAGER_CALLS, ops._on_device, ops.REPLAY_EAGER_CALLS
    try:
        with torch.no_grad():
            for rnd in range(args.rounds):
                for v in (list(variants) if rnd % 2 == 0 else list(reversed(variants))):
                    ops.DIRECT_EAGER_CALLS, ops._on_device, ops.REPLAY_EAGER_CALLS = variants[v]
                    for r, fn in rows.items():
                        times[(r, v)].append((wall_us if r.startswith("wall") else back_to_back_us)(fn))
    finally:
        ops.DIRECT_EAGER_CALLS, ops._on_device, ops.REPLAY_EAGER_CALLS = saved
    lines = [f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; N=K={K}; "
             f"us per call back to back, median (min) of {args.rounds} alternating rounds, torch.no_grad",
             f"{'row':40s} " + " ".join(f"{v:>32s}" for v in variants)]
    for r in rows:
        lines.append(f"{r:40s} " + " ".join(
            f"{statistics.median(times[(r, v)]):21.1f} ({min(times[(r, v)]):6.1f})  " for v in variants))
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
