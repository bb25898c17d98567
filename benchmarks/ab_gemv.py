"""Probe, measured and dropped: our batch-1 linear written as torch ops, for Inductor to generate.

Result (H200, eighth session, benchmarks/NOTES.md): with default Inductor settings the step took
1764 us against ours' 425 (bf16 654); with coordinate-descent tuning the compile did not finish
in 280 s. The library instead runs M = 1 on its own CUDA-core kernel (``kernels/gemm.py``, gemv).

With coordinate-descent tuning, Inductor rewrites a bf16 ``mm`` with M = 1 as a multiply-and-sum
reduction that it tunes and fuses with the ops around it; that made bf16's batch-1 decode ~12%
faster in bench_model (benchmarks/NOTES.md, seventh session). This probe gives ours the same
treatment: the activation quantization in the reference's torch ops, then

    out[n] = sum over k of  w_q[n, k] * w_scale[n // 128, k // 128] * a_q[k] * a_scale[k // 128]

as one reduction over (K/128, 128) views, so that Inductor may read the FP8 weights once in a
kernel of its own making, with the quantization and the RMSNorm / SiLU before it folded in. It
patches ``BlockwiseFP8Linear.forward`` for M = 1 (N and K multiples of 128) and times, in one
process with the same Inductor settings: bf16, ours, ours with the patch. Results are compared
with ours (max |diff|) and bf16 (SQNR). Eagerly the patch gives ours' bits exactly (tested); compiled
it differs by Inductor's float32 intermediates: fused into the quantization, the RMSNorm and
SiLU * up outputs skip the bf16 rounding that eager and ours (a custom-op boundary) apply
(``torch._inductor.config.emulate_precision_casts=True`` restores eager's bits, CPU smoke stack).

    PYTHONPATH=. python benchmarks/ab_gemv.py [--inductor tuned|default]   # H100: a few minutes
    python benchmarks/ab_gemv.py --smoke                                    # tiny stack, CPU: checks the script
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_model as bm  # noqa: E402
from blockwise_fp8 import BlockwiseFP8Linear, reference, unwrap_for_compile  # noqa: E402
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig, DecoderStack, init_weights  # noqa: E402

BLOCK = 128


def gemv_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias, activation_dtype) -> torch.Tensor:
    """x (..., K) with one row in all, weight (N, K) in 128x128 blocks; N, K multiples of 128."""
    N, K = w_q.shape
    nb, kb = N // BLOCK, K // BLOCK
    a_q, a_scale = reference.quantize(x.reshape(1, K), (1, BLOCK), activation_dtype)
    a = a_q.float().view(1, 1, kb, BLOCK) * a_scale.view(1, 1, kb, 1)
    w = w_q.float().view(nb, BLOCK, kb, BLOCK) * w_scale.view(nb, 1, kb, 1)
    out = (w * a).sum(dim=(2, 3)).reshape(1, N)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], N)


def patched_forward(self, x):
    if x.numel() == x.shape[-1] and self.weight.shape[0] % BLOCK == 0 and self.weight.shape[1] % BLOCK == 0:
        return gemv_linear(x, self.weight, self.weight_scale_inv, self.bias, self.activation_dtype)
    return ORIGINAL_FORWARD(self, x)


ORIGINAL_FORWARD = BlockwiseFP8Linear.forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inductor", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny stack on any device (checks the script)")
    args = ap.parse_args()
    from torch._inductor import config as inductor_config

    settings, what = bm.inductor_settings(args.inductor)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke: not a measurement)"
    print(f"# {card}; {bm.versions()}; {time.strftime('%Y-%m-%d')}; inductor: {what}", flush=True)
    cfg = bm.SMOKE if args.smoke else DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads,
                                                    LLAMA3_8B.kv_heads, args.layers)
    ctx = 128 if args.smoke else 2048
    with torch.device(dev):
        base = DecoderStack(cfg, max_len=ctx).to(torch.bfloat16)
    init_weights(base, seed=0)
    base.eval()
    models, _ = bm.build_contenders(base, False, True)
    ours = unwrap_for_compile(models["ours"])
    x = torch.randn(1, 1, cfg.hidden, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(1))
    pos = torch.tensor([ctx - 1], device=dev)
    mode = "reduce-overhead" if dev.type == "cuda" else None
    iters = 3 if args.smoke else 100
    rows, outs = [], {}
    with inductor_config.patch(settings), torch.no_grad():
        for label, model, patch in (("bf16", base, False), ("ours", ours, False), ("ours-gemv", copy.deepcopy(ours), True)):
            BlockwiseFP8Linear.forward = patched_forward if patch else ORIGINAL_FORWARD
            try:
                model.setup_cache(1, ctx, device=dev)
                fn = torch.compile(model.decode, mode=mode)
                call = lambda: fn(x, pos)  # noqa: E731
                outs[label] = call().clone()
                ms = bm.time_ms(call, dev, iters)
                host = bm.issue_ms(call, dev, min(20, iters))
            finally:
                BlockwiseFP8Linear.forward = ORIGINAL_FORWARD
                torch._dynamo.reset()
            rows.append((label, ms, host))
            print(f"{label:10s} {ms * 1e3:9.1f} us  host {host * 1e3:8.1f} us", flush=True)
    diff = float((outs["ours-gemv"].float() - outs["ours"].float()).abs().max())
    print(f"\nours-gemv vs ours: max |diff| {diff:.3g}; SQNR vs bf16: ours {bm.sqnr_db(outs['bf16'], outs['ours']):.2f} dB, "
          f"ours-gemv {bm.sqnr_db(outs['bf16'], outs['ours-gemv']):.2f} dB")
    print("\n| variant | b1 us | host us | x bf16 |\n|---|---|---|---|")
    for label, ms, host in rows:
        print(f"| {label} | {ms * 1e3:.1f} | {host * 1e3:.1f} | {rows[0][1] / ms:.2f}x |")


if __name__ == "__main__":
    main()
