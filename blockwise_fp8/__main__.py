"""``python -m blockwise_fp8``: quantize a random matrix and report the error per FP8 dtype.

Runs on the GPU when there is one (Triton kernels), else on the CPU (reference backend).
"""

from __future__ import annotations

import argparse

import torch

from . import reference
from .ops import FP8_DTYPES, dequantize, gemm, quantize_activation, quantize_weight


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.double()
    noise = (ref - approx.double()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def demo(m: int, n: int, k: int, seed: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, torch.bfloat16)
    exact = x.double() @ w.double().T
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (reference backend)"
    print(f"blockwise FP8 on {where}: x {m}x{k}, w {n}x{k}, bf16 inputs")
    print(f"{'dtype':<16} {'x SQNR dB':>10} {'w SQNR dB':>10} {'max |w err|/amax':>17} {'GEMM SQNR dB':>13}")
    for dtype in FP8_DTYPES:
        a_q, a_s = quantize_activation(x, dtype)
        w_q, w_s = quantize_weight(w, dtype)
        w_hat = dequantize(w_q, w_s, (128, 128), torch.float32)
        per_elem_amax = reference.expand_scale(w_s, (128, 128), w.shape) * torch.finfo(dtype).max
        rel = ((w_hat - w.float()).abs() / per_elem_amax).max().item()
        out = gemm(a_q, a_s, w_q, w_s, out_dtype=torch.float32)
        print(
            f"{str(dtype).replace('torch.', ''):<16} "
            f"{_sqnr_db(x, dequantize(a_q, a_s, (1, 128), torch.float32)):>10.2f} "
            f"{_sqnr_db(w, w_hat):>10.2f} {rel:>17.4f} {_sqnr_db(exact, out):>13.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="blockwise-fp8", description=__doc__)
    parser.add_argument("--m", type=int, default=256, help="rows of the activation")
    parser.add_argument("--n", type=int, default=512, help="rows of the weight (output features)")
    parser.add_argument("--k", type=int, default=1024, help="reduction dimension")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("m", "n", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    demo(args.m, args.n, args.k, args.seed)


if __name__ == "__main__":
    main()
