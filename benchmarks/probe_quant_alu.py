"""What bounds the activation quantization: memory or instructions? (session 39)

    PYTHONPATH=. python benchmarks/probe_quant_alu.py OUT.txt

Times, in one process (medians of triton.testing.do_bench_cudagraph, us): torch's bf16 copy and
fp8 cast, a plain Triton bf16 -> fp8 cast on the quantization's 4 x 1024 tiles, the library's
``quant.quantize``, and variants of ``kernels/quant.py`` written to a temporary folder with one
piece of the per-element work removed. Most variants give wrong bits on purpose: they measure what
that piece costs. Each variant's q and scale are compared bit for bit with the library's on data
that covers the cases the pieces exist for (magnitudes from 2**-140 to 2**120 per row, NaN, +-Inf
and zero blocks, negative rows), e4m3 and e5m2, so the exact variants can be told apart.
"""
import importlib.util
import os
import sys
import tempfile

import torch
import triton
import triton.language as tl
import triton.testing

import blockwise_fp8.kernels.quant as Q

# (name, [(old, new) in kernels/quant.py])
VARIANTS = [
    ("no clamp on the cvt path", [(
        "    y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)\n    if not CVT_FP8:\n",
        "    if not CVT_FP8:\n")]),
    ("clamp on every path", [(
        "    if not CVT_FP8:\n        y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)\n",
        "    y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)\n    if not CVT_FP8:\n")]),
    ("no fma corrections (wrong)", [(
        "    neg_s = -s\n    q = tl.fma(tl.fma(q, neg_s, ax), r, q)\n    q = tl.abs(tl.fma(tl.fma(q, neg_s, ax), r, q))\n", "    q = tl.abs(q)\n")]),
    ("one fma correction (not exact)", [("    q = tl.fma(tl.fma(q, neg_s, ax), r, q)\n    q = tl.abs(", "    q = tl.abs(")]),
    ("no tiny-scale rescale (wrong)", [
        ("    f = tl.where(scale < _RESCALE_BELOW, _RESCALE, 1.0)\n    s = scale * f\n", "    s = scale\n"),
        ("    ax = tl.abs(x) * f\n", "    ax = tl.abs(x)\n")]),
    ("no sign restore (wrong)", [(
        "    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)\n", "    return q\n")]),
    ("approximate reciprocal (not exact)", [(
        "    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)\n", "    r = 1.0 / s\n")]),
    # Exact (fma(-q, s, ax) is fma(q, -s, ax): negation is exact, the fma rounds once): the form the
    # library had until session 40. Under Triton 3.6 the -q costs an FFMA and an FADD an element
    # (744 -> 808 SASS instructions per 32 elements, 96 -> 128 registers, sm_90) and 5-7% of the
    # time on an H200 (results/quant-negdiv-h200-2026-11-28-s40/); under 3.9 the counts are equal.
    ("negated quotient (exact, before session 40)", [(
        "    neg_s = -s\n    q = tl.fma(tl.fma(q, neg_s, ax), r, q)\n    q = tl.abs(tl.fma(tl.fma(q, neg_s, ax), r, q))\n",
        "    q = tl.fma(tl.fma(-q, s, ax), r, q)\n    q = tl.abs(tl.fma(tl.fma(-q, s, ax), r, q))\n")]),
]


@triton.jit
def cast_kernel(x_ptr, y_ptr, M, K, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    offs = rows[:, None] * K + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


def load_variants(folder):
    src = open(Q.__file__).read().replace("from .launch import", "from blockwise_fp8.kernels.launch import")
    src = src.replace("from .rounding import", "from blockwise_fp8.kernels.rounding import")
    mods = {}
    for i, (name, edits) in enumerate(VARIANTS):
        text = src
        for old, new in edits:
            if old not in text:  # the library has that piece already, or no longer
                text = None
                break
            text = text.replace(old, new)
        if text is None:
            continue
        path = os.path.join(folder, f"quant_variant_{i}.py")
        with open(path, "w") as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location(f"quant_variant_{i}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods


def main() -> None:
    out = open(sys.argv[1], "w")

    def say(s=""):
        print(s, flush=True)
        out.write(s + "\n")

    say(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; us, CUDA-graph medians")
    with tempfile.TemporaryDirectory() as folder:
        mods = load_variants(folder)
        torch.manual_seed(0)
        for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
            x = torch.randn(512, 4096, device="cuda") * torch.exp2(torch.randint(-140, 120, (512, 1), device="cuda").float())
            x[3, 100], x[5, 300], x[11, 5] = float("nan"), float("inf"), -float("inf")
            x[7, 260:390] = 0
            x[9] = -x[9].abs()
            x = x.to(torch.bfloat16)
            q0, s0 = Q.quantize(x, 1, 128, dt)
            for name, m in mods.items():
                q1, s1 = m.quantize(x, 1, 128, dt)
                same = torch.equal(q0.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s0.view(torch.int32), s1.view(torch.int32))
                say(f"bits {str(dt):22s} {name:36s} {'equal to the library' if same else 'differ'}")
        e4 = torch.float8_e4m3fn
        for M, K in ((8192, 8192), (2048, 8192), (256, 8192)):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y8, yb = torch.empty(M, K, device="cuda", dtype=e4), torch.empty_like(x)
            grid = (triton.cdiv(M, 4), triton.cdiv(K, 1024))
            rows = [("torch copy bf16", lambda: yb.copy_(x)), ("torch cast to fp8", lambda: y8.copy_(x)),
                    ("triton cast to fp8, 4 x 1024 tiles", lambda: cast_kernel[grid](x, y8, M, K, BM=4, BK=1024, num_warps=4)),
                    ("library quant.quantize", lambda: Q.quantize(x, 1, 128, e4))]
            rows += [(n, (lambda m=m: m.quantize(x, 1, 128, e4))) for n, m in mods.items()]
            for _ in range(2):  # two rounds: the spread between them is the noise
                for name, fn in rows:
                    say(f"M={M:5d} K={K:5d} {name:36s} {triton.testing.do_bench_cudagraph(fn, rep=300) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
