"""The seven Linears of one Llama-3-8B layer at decode sizes, replayed as one CUDA graph.

Contenders (all on the same inputs, CUDA-graph replay, median microseconds):
    bf16          seven F.linear
    ours-eager    seven blockwise_fp8.ops.linear (each quantizes its input)
    ours-shared   what a compiled graph runs since session 5: one quantize_input per distinct
                  input (q/k/v share one, gate/up share one) and seven gemm
each of ours with programmatic dependent launch on and off (``BLOCKWISE_FP8_PDL``), the skinny
kernel's L2 prefetch of its first weight blocks before the PDL wait (``gemm.SKINNY_PREFETCH_BLOCKS``)
and the activation quantization launched under PDL (``quant.QUANT_WAITS``). Ours' outputs must
be bit-identical across the variants.

    python benchmarks/diag_layer.py [--ms 1,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G
from blockwise_fp8.kernels import quant as Q

# name: (N, K, which input)
LAYER = {
    "q": (4096, 4096, "attn"), "k": (1024, 4096, "attn"), "v": (1024, 4096, "attn"), "o": (4096, 4096, "o"),
    "gate": (14336, 4096, "mlp"), "up": (14336, 4096, "mlp"), "down": (4096, 14336, "down"),
}
INPUT_K = {"attn": 4096, "o": 4096, "mlp": 4096, "down": 14336}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats; the table shows the best")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = {}
    for name, (N, K, _) in LAYER.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        weights[name] = (w, *ops.quantize_weight(w))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for M in (int(m) for m in args.ms.split(",")):
        xs = {k: torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for k, K in INPUT_K.items()}
        m_major = {src: ops._gemm_backend_for_call("auto", M, K, torch.float8_e4m3fn, weights[n][1], torch.bfloat16)
                   == "cublas" for n, (N, K, src) in LAYER.items()}

        def bf16():
            return [F.linear(xs[src], weights[n][0]) for n, (_, _, src) in LAYER.items()]

        def eager():
            return [ops.linear(xs[src], weights[n][1], weights[n][2]) for n, (_, _, src) in LAYER.items()]

        def shared():  # scales laid out as the compiled graph lays them out
            qs = {k: ops._quantize_input_op(x, torch.float8_e4m3fn, m_major[k], "auto") for k, x in xs.items()}
            return [ops._gemm_op(*qs[src], weights[n][1], weights[n][2], None, torch.bfloat16, "auto")
                    for n, (_, _, src) in LAYER.items()]

        variants = [("bf16", bf16, None, None, None)]
        for label, fn in (("eager", eager), ("shared", shared)):
            for pdl, prefetch, wait in (("off", 0, False), ("on", 0, False), ("on", 2, False), ("on", 2, True)):
                variants.append((f"ours-{label} pdl={pdl} prefetch={prefetch} quant-waits={int(wait)}", fn, pdl,
                                 prefetch, wait))
        best = {}
        first_out = None
        for _ in range(args.rounds):
            for label, fn, pdl, prefetch, wait in variants:
                if pdl is not None:
                    os.environ["BLOCKWISE_FP8_PDL"] = "1" if pdl == "on" else "0"
                    G.SKINNY_PREFETCH_BLOCKS, Q.QUANT_WAITS = prefetch, wait
                outs = fn()
                if label != "bf16":
                    if first_out is None:
                        first_out = [o.clone() for o in outs]
                    elif not all(torch.equal(a, b) for a, b in zip(first_out, outs)):
                        raise SystemExit(f"M={M} {label}: outputs differ from the first variant of ours")
                t = do_bench_cudagraph(fn, rep=200) * 1e3
                best[label] = min(best.get(label, float("inf")), t)
        os.environ.pop("BLOCKWISE_FP8_PDL", None)
        base = best["bf16"]
        print(f"\nM = {M}: seven Linears of a Llama-3-8B layer, one CUDA graph, best of {args.rounds} medians")
        print("| variant | us | x bf16 |\n|---|---|---|")
        for label, *_ in variants:
            print(f"| {label} | {best[label]:.1f} | {base / best[label]:.2f}x |")


if __name__ == "__main__":
    main()
