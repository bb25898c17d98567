"""Development sweep (GPU): variants of the persistent TMA kernel for large M, where our Triton
kernel (~820 TFLOPS at 8192^3) trails cuBLAS blockwise (~1100). Each K block's tensor-core product
must be waited for before its float32 promotion (acc += dot * scale), so the variants try to give
the card something else to do during that wait, or more MMA work per wait:

    base        the library's kernel and plan (128x128, 8 warps, 4 stages)
    pair_n      one program computes 128 x 256 as two 128 x 128 products sharing the A tile
    pair_m      one program computes 256 x 128 as two 128 x 128 products sharing the W tile
    wide_n      128 x 256 as one product (a per-column weight scale vector)
    ws_inner    base with Triton's warp specialisation on the K loop
    two_cta     64 x 128 / 4 warps with 2 programs per SM, so that one program's promotion can
                overlap the other's MMA
    mmajor      base with activation scales stored M-major (coalesced scale loads)

Prints TFLOPS per shape next to bf16 and cuBLAS, registers/spills and barrier counts per variant,
and writes the PTX/TTGIR of each variant under --out.

    python benchmarks/tune_large_m.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blockwise_fp8 import ops  # noqa: E402
from blockwise_fp8.kernels import gemm as G  # noqa: E402
from blockwise_fp8.kernels.rounding import output_format_constexprs  # noqa: E402


@triton.jit
def tma_variant_kernel(
    a_desc, a_scale_ptr, w_desc, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_asm, stride_ask, stride_wsn, stride_wsk,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, PAIR: tl.constexpr, WS_INNER: tl.constexpr, WIDE_N: tl.constexpr,
):
    """PAIR = 0: one (BLOCK_M x BLOCK_N) product per K block; 1: two sharing A (N pair);
    2: two sharing W (M pair). WIDE_N: BLOCK_N = 256 as one product with a scale per column."""
    span_m: tl.constexpr = BLOCK_M * 2 if PAIR == 2 else BLOCK_M
    span_n: tl.constexpr = BLOCK_N * 2 if PAIR == 1 else BLOCK_N
    num_m = tl.cdiv(M, span_m)
    num_n = tl.cdiv(N, span_n)
    k_blocks = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        pid_m, pid_n = G._grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * span_m
        off_n = pid_n * span_n
        rm = off_m + tl.arange(0, BLOCK_M)
        rm1 = rm + BLOCK_M
        rn = off_n + tl.arange(0, BLOCK_N)
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(k_blocks, warp_specialize=WS_INNER):
            a = a_desc.load([off_m, kb * BLOCK_K])
            w = w_desc.load([off_n, kb * BLOCK_K])
            a_s = tl.load(a_scale_ptr + rm * stride_asm + kb * stride_ask, mask=rm < M, other=0.0)
            if WIDE_N:
                w_s = tl.load(w_scale_ptr + (rn // BLOCK_K) * stride_wsn + kb * stride_wsk, mask=rn < N, other=0.0)
                acc0 += tl.dot(a, w.T) * (a_s[:, None] * w_s[None, :])
            else:
                w_s = tl.load(w_scale_ptr + (off_n // BLOCK_K) * stride_wsn + kb * stride_wsk)
                acc0 += tl.dot(a, w.T) * (a_s * w_s)[:, None]
            if PAIR == 1:
                w1 = w_desc.load([off_n + BLOCK_N, kb * BLOCK_K])
                w_s1 = tl.load(w_scale_ptr + (off_n // BLOCK_K + 1) * stride_wsn + kb * stride_wsk,
                               mask=off_n + BLOCK_N < N, other=0.0)
                acc1 += tl.dot(a, w1.T) * (a_s * w_s1)[:, None]
            if PAIR == 2:
                a1 = a_desc.load([off_m + BLOCK_M, kb * BLOCK_K])
                a_s1 = tl.load(a_scale_ptr + rm1 * stride_asm + kb * stride_ask, mask=rm1 < M, other=0.0)
                acc1 += tl.dot(a1, w.T) * (a_s1 * w_s)[:, None]
        G._epilogue_store(acc0, rm, rn, M, N, bias_ptr, out_ptr, stride_om, stride_on, HAS_BIAS,
                          OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)
        if PAIR == 1:
            G._epilogue_store(acc1, rm, rn + BLOCK_N, M, N, bias_ptr, out_ptr, stride_om, stride_on, HAS_BIAS,
                              OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)
        if PAIR == 2:
            G._epilogue_store(acc1, rm1, rn, M, N, bias_ptr, out_ptr, stride_om, stride_on, HAS_BIAS,
                              OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)


# name: (BLOCK_M, BLOCK_N, warps, stages, PAIR, WS_INNER, WIDE_N, programs per SM, maxnreg, m-major scales)
VARIANTS = {
    "v_base": (128, 128, 8, 4, 0, False, False, 1, None, False),
    "pair_n_s3": (128, 128, 8, 3, 1, False, False, 1, None, False),
    "pair_n_s4": (128, 128, 8, 4, 1, False, False, 1, None, False),
    "pair_m_s3": (128, 128, 8, 3, 2, False, False, 1, None, False),
    "pair_m_s4": (128, 128, 8, 4, 2, False, False, 1, None, False),
    "wide_n_s3": (128, 256, 8, 3, 0, False, True, 1, None, False),
    "ws_inner": (128, 128, 8, 4, 0, True, False, 1, None, False),
    "two_cta_64": (64, 128, 4, 4, 0, False, False, 2, None, False),
    "two_cta_64_s3": (64, 128, 4, 3, 0, False, False, 2, None, False),
    "two_cta_128": (128, 128, 8, 3, 0, False, False, 2, 128, False),
    "pair_m_64_2cta": (64, 128, 4, 3, 2, False, False, 2, None, False),
    "mmajor": (128, 128, 8, 4, 0, False, False, 1, None, True),
}


def launch(name, aq, as_, wq, ws, out):
    bm, bn, warps, stages, pair, ws_inner, wide, per_sm, maxnreg, mmajor = VARIANTS[name]
    M, K = aq.shape
    N = wq.shape[0]
    G._set_tma_allocator()
    a_desc = G.TensorDescriptor.from_tensor(aq, [bm, 128])
    w_desc = G.TensorDescriptor.from_tensor(wq, [bn, 128])
    span_m = bm * (2 if pair == 2 else 1)
    span_n = bn * (2 if pair == 1 else 1)
    tiles = triton.cdiv(M, span_m) * triton.cdiv(N, span_n)
    programs = min(per_sm * G._num_sms(0), tiles)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    return tma_variant_kernel[(programs,)](
        a_desc, as_, w_desc, ws, ws, out, M, N, K,
        as_.stride(0), as_.stride(1), ws.stride(0), ws.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=False, **output_format_constexprs(out.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, NUM_PROGRAMS=programs,
        PAIR=pair, WS_INNER=ws_inner, WIDE_N=wide, num_warps=warps, num_stages=stages, **extra)


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=50) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/tune_large_m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dtype", default="e4m3,e5m2")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = args.variants.split(",")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    shapes = [(8192, 8192, 8192), (4096, 57344, 8192), (2048, 10240, 8192), (1024, 8192, 28672),
              (512, 10240, 8192), (256, 10240, 8192)]
    dts = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    stats_done = set()
    torch.manual_seed(0)
    for dname in args.dtype.split(","):
        dt = dts[dname]
        for M, N, K in shapes:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
            wq, ws = ops.quantize_weight(w, dtype=dt)
            aq, as_ = ops.quantize_activation(x, dtype=dt)
            as_mm = as_.t().contiguous().t()
            flop = 2 * M * N * K
            row = {"bf16": us(lambda: F.linear(x, w))}
            if dt == torch.float8_e4m3fn:
                try:
                    row["cublas"] = us(lambda: ops.gemm(aq, as_, wq, ws, None, torch.bfloat16, backend="cublas"))
                except Exception as e:  # noqa: BLE001
                    print("cublas failed", type(e).__name__, str(e)[:120])
            ref = G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=G.Plan("tma", 128, 128, 8, 4))
            row["base"] = us(lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16,
                                            plan_override=G.Plan("tma", 128, 128, 8, 4)))
            flags = {}
            for name in names:
                out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                s = as_mm if VARIANTS[name][-1] else as_
                try:
                    k = launch(name, aq, s, wq, ws, out)
                    torch.cuda.synchronize()
                    flags[name] = "" if torch.equal(out, ref) else (
                        "~" if torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2) else "!")
                    row[name] = us(lambda: launch(name, aq, s, wq, ws, out))
                    if name not in stats_done:
                        stats_done.add(name)
                        ptx = k.asm.get("ptx", "")
                        with open(os.path.join(args.out, f"{name}.ptx"), "w") as f:
                            f.write(ptx)
                        with open(os.path.join(args.out, f"{name}.ttgir"), "w") as f:
                            f.write(k.asm.get("ttgir", ""))
                        print(f"  [{name}] regs={k.n_regs} spills={k.n_spills} smem={k.metadata.shared} "
                              f"bar.sync={ptx.count('bar.sync') + ptx.count('barrier.sync')} "
                              f"wgmma.wait={ptx.count('wgmma.wait_group')} wgmma={ptx.count('wgmma.mma_async')}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"  [{name}] FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            cells = " ".join(f"{k} {flop / t / 1e6:5.0f}{flags.get(k, '')}" for k, t in row.items())
            print(f"{dname} M={M:5d} N={N:6d} K={K:6d} TFLOPS: {cells}", flush=True)


if __name__ == "__main__":
    main()
