"""Development sweep (GPU): checks and times kernel variants on the shapes that decide the
heuristics in kernels/gemm.py, kernels/quant.py and ops.py. Not the published benchmark (that is
bench_gemm.py). Usage: python benchmarks/tune.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from blockwise_fp8 import ops, reference  # noqa: E402
from blockwise_fp8.kernels import gemm as G  # noqa: E402
from blockwise_fp8.kernels import quant as Q  # noqa: E402

E4 = torch.float8_e4m3fn
LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def quant_sweep():
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 3
    res = {}
    for dtype in (E4, torch.float8_e5m2):
        q0, s0 = (t.cuda() for t in reference.quantize(x.float().cpu(), (1, 128), dtype))  # CPU: torch CUDA division differs
        nbytes = x.numel() * 2 + x.numel() + s0.numel() * 4
        for t in [(8, 4, 4), (4, 4, 2), (2, 8, 4), (4, 8, 4), (16, 4, 4), (8, 4, 8), (16, 4, 8), (32, 4, 8), (8, 8, 8)]:
            try:
                q, s = Q.quantize(x, 1, 128, dtype, tiling=t)
                ok = torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
                us = bench(lambda: Q.quantize(x, 1, 128, dtype, tiling=t))
                us_mm = bench(lambda: Q.quantize(x, 1, 128, dtype, tiling=t, scale_m_major=True))
                log(f"quant {dtype} tiling={t} exact={ok} {us:.1f} us {nbytes / us / 1e6:.2f} TB/s  m-major scale {us_mm:.1f} us")
                res[f"{dtype} {t}"] = us
            except Exception as e:  # noqa: BLE001
                log(f"quant tiling={t} FAILED {type(e).__name__}: {str(e)[:200]}")
        w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        qw0, sw0 = (t.cuda() for t in reference.quantize(w.float().cpu(), (128, 128), dtype))
        qw, sw = Q.quantize(w, 128, 128, dtype)
        ok = torch.equal(qw.view(torch.uint8), qw0.view(torch.uint8)) and torch.equal(sw, sw0)
        log(f"weight quant {dtype} exact={ok} {bench(lambda: Q.quantize(w, 128, 128, dtype)):.1f} us")
    # which instructions round float32 -> fp8 in the compiled kernels (Triton's cache holds the PTX)
    import glob

    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    for path in sorted(glob.glob(os.path.join(cache, "*", "quantize_kernel.ptx")))[:4]:
        ptx = open(path).read()
        cvts = sorted({ln.split()[0] for ln in ptx.splitlines() if "cvt" in ln and ("e4m3" in ln or "e5m2" in ln)})
        log(f"ptx {os.path.basename(os.path.dirname(path))[:8]}: fp8 cvt {cvts} div.rn {ptx.count('div.rn')} fma {ptx.count('fma.rn')}")
    return res


def operands(M, N, K, dtype=E4):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    aq, as_ = Q.quantize(x, 1, 128, dtype)
    wq, ws = Q.quantize(w, 128, 128, dtype)
    return x, w, aq, as_, wq, ws


def gemm_case(M, N, K, plans, extra=True):
    x, w, aq, as_, wq, ws = operands(M, N, K)
    ref = reference.gemm(aq, as_, wq, ws, out_dtype=torch.float64).double()
    flops = 2 * M * N * K
    wbytes = N * K
    row = {}
    t_bf16 = bench(lambda: F.linear(x, w))
    row["bf16"] = t_bf16
    if extra:
        try:
            cub = ops._cublas_gemm(aq, as_, wq, ws, None, torch.bfloat16)
            e = rel_err(cub, ref)
            t = bench(lambda: ops._cublas_gemm(aq, as_, wq, ws, None, torch.bfloat16))
            row["cublas"] = t
            log(f"  M={M} N={N} K={K} cublas {t:.1f} us err={e:.2e} x{t_bf16 / t:.2f}")
        except Exception as e:  # noqa: BLE001
            log(f"  M={M} N={N} K={K} cublas FAILED {type(e).__name__}: {str(e)[:150]}")
    for name, p in plans:
        try:
            out = G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p)
            e = rel_err(out, ref)
            t = bench(lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p))
            row[name] = t
            log(f"  M={M} N={N} K={K} {name:38s} {t:8.1f} us {flops / t / 1e6:7.1f} TFLOPS {wbytes / t / 1e6:5.2f} TB/s(w) "
                f"x{t_bf16 / t:.2f} err={e:.2e}{' BAD' if not e < 1e-2 else ''}")
        except Exception as e:  # noqa: BLE001
            log(f"  M={M} N={N} K={K} {name} FAILED {type(e).__name__}: {str(e)[:300]}")
    log(f"  M={M} N={N} K={K} bf16 {t_bf16:.1f} us")
    return row


def skinny_plans(M):
    bm = max(16, triton.next_power_of_2(M))
    out = []
    for bn in (64, 128):
        for split in (1, 2, 4, 8):
            for st in (4, 6):
                if bm >= 64 and st == 6:
                    continue
                out.append((f"skinny bn{bn} s{split} st{st}", G.Plan("skinny", bm, bn, 4, st, split_k=split)))
    return out


def large_plans(M):
    ps = [
        ("tma 128x128 w8 st3 flat", G.Plan("tma", 128, 128, 8, 3, flatten=True)),
        ("tma 128x128 w8 st4 flat", G.Plan("tma", 128, 128, 8, 4, flatten=True)),
        ("tma 128x128 w8 st4", G.Plan("tma", 128, 128, 8, 4, flatten=False)),
        ("tma 128x128 w8 st4 flat ws", G.Plan("tma", 128, 128, 8, 4, flatten=True, warp_specialize=True)),
        ("tma 128x128 w4 st4 flat", G.Plan("tma", 128, 128, 4, 4, flatten=True)),
        ("tma 64x128 w4 st4 flat", G.Plan("tma", 64, 128, 4, 4, flatten=True)),
        ("tma 128x64 w4 st5 flat", G.Plan("tma", 128, 64, 4, 5, flatten=True)),
        ("tiled 128x128 w8 st3", G.Plan("tiled", 128, 128, 8, 3)),
        ("tiled 128x128 w8 st4", G.Plan("tiled", 128, 128, 8, 4)),
    ]
    if M <= 256:
        ps += [(f"skinny bm{M} bn64 s{s}", G.Plan("skinny", triton.next_power_of_2(M), 64, 4, 3, split_k=s)) for s in (1, 2)]
        ps += [(f"skinny bm{M} bn128 s1 w8", G.Plan("skinny", triton.next_power_of_2(M), 128, 8, 3, split_k=1))]
    return ps


def fused_case(M, N, K):
    x, w, aq, as_, wq, ws = operands(M, N, K)
    p = G.plan(M, N, K, tma=True)
    t2 = bench(lambda: G.gemm(*Q.quantize(x, 1, 128, E4), wq, ws, None, torch.bfloat16))
    t1 = bench(lambda: G.linear_fused(x, wq, ws, None, torch.bfloat16))
    a = G.gemm(*Q.quantize(x, 1, 128, E4), wq, ws, None, torch.bfloat16, plan_override=p)
    b = G.linear_fused(x, wq, ws, None, torch.bfloat16, plan_override=p)
    log(f"  fused M={M} N={N} K={K} plan={p} two-step {t2:.1f} us fused {t1:.1f} us identical={torch.equal(a, b)}")


def cublas_caps():
    x, w, aq, as_, wq, ws = operands(256, 1024, 1024)
    Fn = torch.nn.functional
    kb = 8
    wsp = ws.new_zeros((ws.shape[0], 8))
    wsp[:, :kb] = ws
    for od in (torch.bfloat16, torch.float16, torch.float32):
        for bias in (None, torch.randn(1024, device="cuda", dtype=od)):
            try:
                Fn.scaled_mm(aq, wq.t(), ops._m_major(as_), Fn.ScalingType.BlockWise1x128, wsp.t(),
                             Fn.ScalingType.BlockWise128x128, bias=bias, output_dtype=od)
                log(f"cublas caps out={od} bias={bias is not None}: ok")
            except Exception as e:  # noqa: BLE001
                log(f"cublas caps out={od} bias={bias is not None}: {type(e).__name__} {str(e)[:120]}")
    for M in (1, 2, 8):
        x, w, aq, as_, wq, ws = operands(M, 1024, 1024)
        try:
            ops._cublas_gemm(aq, as_, wq, ws, None, torch.bfloat16)
            log(f"cublas M={M}: ok")
        except Exception as e:  # noqa: BLE001
            log(f"cublas M={M}: {type(e).__name__} {str(e)[:120]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="cublas,quant,skinny,fused,large")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    log(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
    t0 = time.time()
    if "cublas" in parts:
        log("== cuBLAS capabilities")
        cublas_caps()
    if "quant" in parts:
        log("== quant")
        quant_sweep()
    for M in (1, 16, 64) if "skinny" in parts else ():
        for N, K in ((8192, 8192), (10240, 8192), (8192, 28672), (57344, 8192)):
            if N == 57344 and M != 16:
                continue
            gemm_case(M, N, K, skinny_plans(M))
    log(f"[{time.time() - t0:.0f}s] == fused")
    for M in (1, 4, 16, 32) if "fused" in parts else ():
        fused_case(M, 8192, 8192)
    log(f"[{time.time() - t0:.0f}s] == large")
    for M, N, K in () if "large" not in parts else ((128, 8192, 8192), (256, 8192, 8192), (1024, 8192, 8192), (8192, 8192, 8192), (4096, 8192, 28672), (1024, 57344, 8192)):
        gemm_case(M, N, K, large_plans(M))
    log(f"[{time.time() - t0:.0f}s] done")
    with open(os.path.join(args.out, "tune.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
