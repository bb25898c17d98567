"""Host time per launch inside Triton's JITFunction.run, stage by stage, beside each layer of ours.

    PYTHONPATH=. python benchmarks/host_triton_stages.py OUT.txt

Issue time per call (median over 300 calls, a synchronize before each, so the queue is empty) at
four shapes (gemv, skinny, tma, ws plans): F.linear, our launchers and ops, then Triton's run()
split into its stages (argument binding, cache key, launch metadata, the compiled launcher) for
the GEMM and quantize kernels, and cProfile tables. Session 12 ran it before kernels/launch.py
existed (results/host-triton-stages-h100-2026-11-27-s12.txt); since then our launches bypass
run() after the first, so the capture below empties launch's table first.
"""
import cProfile, io, pstats, sys
import torch, torch.nn.functional as F
import triton
from triton.runtime import jit as tjit
from triton.runtime.driver import driver
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, gemm_hopper as H, quant as Q
from host_timing import issue_us

def capture(jitfn, call):
    from blockwise_fp8.kernels import launch
    launch._COMPILED.clear()  # so that this call goes through Triton's run()
    rec = {}
    orig = jitfn.run
    def run(*args, grid, warmup, **kw):
        rec.update(args=args, grid=grid, kw=kw)
        return orig(*args, grid=grid, warmup=warmup, **kw)
    jitfn.run = run
    try: call()
    finally: jitfn.run = orig
    return rec

def triton_stages(jitfn, rec, say):
    args, grid, kw = rec["args"], rec["grid"], dict(rec["kw"])
    kw["debug"] = kw.get("debug", jitfn.debug) or triton.knobs.runtime.debug
    kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    kernel_cache, kernel_key_cache, target, backend, binder = jitfn.device_caches[device]
    bound, spec, opts = binder(*args, **kw)
    key = tjit.compute_cache_key(kernel_key_cache, spec, opts)
    kern = kernel_cache[key]
    g = grid + (1,) * (3 - len(grid))
    vals = list(bound.values())
    rows = {
        "  jit run() whole": lambda: jitfn.run(*args, grid=grid, warmup=False, **rec["kw"]),
        "  get_current_device+stream": lambda: driver.active.get_current_stream(driver.active.get_current_device()),
        "  binder (specialize args)": lambda: binder(*args, **kw),
        "  compute_cache_key": lambda: tjit.compute_cache_key(kernel_key_cache, spec, opts),
        "  launch_metadata": lambda: kern.launch_metadata(grid, stream, *vals),
        "  CompiledKernel.run (launcher)": lambda: kern.run(g[0], g[1], g[2], stream, kern.function, kern.packed_metadata,
                                               None, None, None, *vals),
    }
    for name, fn in rows.items():
        say(f"{name:40s} {issue_us(fn):8.1f}")
    say(f"  ({len(args)} positional args, {len(rec['kw'])} keyword args; cache key length {len(key)})")

def main():
    out = open(sys.argv[1], "w")
    def say(s=""):
        print(s, flush=True)
        out.write(s + "\n")
    say(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    torch.manual_seed(0)
    for M, N, K in ((1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (2048, 6144, 4096)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        wq, ws = ops.quantize_weight(w)
        aq, as_ = ops.quantize_activation(x)
        aq_m, as_m = Q.quantize(x, 1, 128, torch.float8_e4m3fn, scale_m_major=True)
        p = G.plan(M, N, K, tma=G.tma_usable(aq, wq), ws=G.ws_usable(aq, wq))
        say(f"\n## M={M} N={N} K={K}: plan {p.kind}; issue us per call (median, queue empty)")
        rows = {
            "F.linear bf16": lambda: F.linear(x, w),
            "torch.empty out": lambda: torch.empty((M, N), dtype=torch.bfloat16, device="cuda"),
            "quant.quantize": lambda: Q.quantize(x, 1, 128, torch.float8_e4m3fn),
            "ops.quantize_activation": lambda: ops.quantize_activation(x),
            f"kernels.gemm ({p.kind})": lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16),
            "ops.gemm(triton)": lambda: ops.gemm(aq, as_, wq, ws, backend="triton"),
            "ops.gemm(auto)": lambda: ops.gemm(aq, as_, wq, ws),
            "ops.linear(auto)": lambda: ops.linear(x, wq, ws),
            "ops.linear(triton)": lambda: ops.linear(x, wq, ws, backend="triton"),
        }
        if M >= 8:
            rows.update({
                "torch._scaled_mm": lambda: torch._scaled_mm(aq_m, wq.t(), as_m, ws.t(), out_dtype=torch.bfloat16),
                "ops._cublas_gemm": lambda: ops._cublas_gemm(aq_m, as_m, wq, ws, None, torch.bfloat16),
                "ops.gemm(cublas)": lambda: ops.gemm(aq, as_, wq, ws, backend="cublas"),
                "ops.linear(cublas)": lambda: ops.linear(x, wq, ws, backend="cublas"),
            })
        if p.kind in ("tma", "ws"):
            rows["TensorDescriptor.from_tensor"] = lambda: G.TensorDescriptor.from_tensor(aq, [64, 128])
            rows["GluonDescriptor.from_tensor"] = lambda: H.GluonDescriptor.from_tensor(aq, [128, 128], H.smem_layout(128, 128, aq.dtype))
            rows["_persistent_grid"] = lambda: G._persistent_grid(p, M, N, K, 132, aq.device, counters_per_tile=1)
        for name, fn in rows.items():
            try:
                say(f"{name:40s} {issue_us(fn):8.1f}")
            except Exception as e:
                say(f"{name:40s} failed {type(e).__name__}: {str(e)[:120]}")
        jitfn = {"gemv": G.gemm_gemv_kernel, "skinny": G.gemm_skinny_kernel, "tma": G.gemm_tma_kernel, "ws": H.gemm_ws_kernel}[p.kind]
        rec = capture(jitfn, lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16))
        say(f"Triton stages of the {p.kind} launch:")
        try:
            triton_stages(jitfn, rec, say)
        except Exception:
            import traceback
            say(traceback.format_exc())
        rec = capture(Q.quantize_kernel if hasattr(Q, "quantize_kernel") else None, lambda: Q.quantize(x, 1, 128, torch.float8_e4m3fn)) if hasattr(Q, "quantize_kernel") else None
        if rec:
            say("Triton stages of the quantize launch:")
            triton_stages(Q.quantize_kernel, rec, say)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200): G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        say(f"cProfile, 200 x kernels.gemm ({p.kind}):\n" + s.getvalue())
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200): ops.linear(x, wq, ws)
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        say("cProfile, 200 x ops.linear:\n" + s.getvalue())
    out.close()

main()
