"""Compile, for sm_90 and without a GPU, the Triton kernels one ``gemm`` call of the library would
launch, and write their TTGIR, PTX and SASS with a summary line each: registers, 16-byte loads,
cp.async copies (the skinny kernel's), shuffles, spills. For reading what a Triton version makes of
our kernels on a machine with no GPU (the twenty-ninth session found the gemv's Triton 3.9
slowdown this way: the same source got another register layout).

    python benchmarks/sass_of_launch.py OUTDIR M N K [--dtype e5m2] [--set GEMV_K_BLOCKS_OUTER=1]

It replaces Triton's driver with one that names an sm_90 target, so ``JITFunction.warmup``
compiles each launch as the GPU would get it (the same arguments, constexprs and options; PDL
and the hardware FP8 conversion on, as on an H100), and nothing runs. The operands are CPU
tensors (the 16-byte alignment Triton specializes on is that of their storage, as on the GPU).
Kernels through ``gemm``'s streaming and tiled launchers are covered (gemv, skinny, tiled);
the "tma" and "ws" plans need a GPU (TMA descriptors), and the ws kernel has its own probe in
test_gemm.py. ``--set`` assigns a tunable of ``blockwise_fp8.kernels.gemm`` first (an int, or
0/1 for a bool).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
COUNTED = {"ldg128": "LDG.E.128", "ldgsts": "LDGSTS", "shfl": "SHFL", "ffma": "FFMA", "spills": ("STL", "LDL")}


class Sm90Driver:
    """Just enough of a Triton driver for ``warmup`` to compile for an H100 (sm_90, 32 lanes)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def summarize(sass: str, resource_usage: str) -> dict:
    """The counts of one kernel's SASS, its registers (from ``cuobjdump --dump-resource-usage``),
    and ``ldg128_span``: how many SASS lines lie from its first 16-byte load to its last (loads
    issued back to back keep more bytes in flight; the gemv's 8 spanned 70 lines under Triton 3.6
    and 293 under 3.9)."""
    regs = re.search(r"REG:(\d+)", resource_usage)
    out = {"registers": int(regs.group(1)) if regs else None}
    for key, ops in COUNTED.items():
        out[key] = sum(sass.count(op) for op in (ops if isinstance(ops, tuple) else (ops,)))
    loads = [i for i, line in enumerate(sass.splitlines()) if "LDG.E.128" in line]
    out["ldg128_span"] = loads[-1] - loads[0] if loads else 0
    return out


def compile_launches(M: int, N: int, K: int, dtype: torch.dtype, settings: dict) -> list:
    """[(kernel name, compiled kernel)] of one ``gemm`` call (bf16 out, no bias) compiled for sm_90."""
    driver.set_active(Sm90Driver())
    from blockwise_fp8 import reference
    from blockwise_fp8.kernels import gemm as G
    from blockwise_fp8.kernels.launch import COMPILE_OPTIONS

    for name, value in settings.items():
        if not hasattr(G, name):
            raise SystemExit(f"--set {name}: blockwise_fp8.kernels.gemm has no such tunable")
        setattr(G, name, value)
    G.programmatic_launch = lambda device: True  # as on an H100
    G.hardware_fp8_cast = lambda device: True
    compiled = []

    def launch(fn, grid, args, meta):  # as kernels.launch.launch compiles, without launching
        compiled.append((fn.__name__, fn.warmup(*args, grid=grid, **dict(meta + COMPILE_OPTIONS))))

    G.launch = launch
    g = torch.Generator().manual_seed(0)
    aq, a_s = reference.quantize(torch.randn(M, K, generator=g), (1, 128), dtype)
    wq, w_s = reference.quantize(torch.randn(N, K, generator=g), (128, 128), dtype)
    G.gemm(aq, a_s, wq, w_s, None, torch.bfloat16)
    return compiled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("M", type=int)
    parser.add_argument("N", type=int)
    parser.add_argument("K", type=int)
    parser.add_argument("--dtype", default="e5m2", choices=sorted(DTYPES))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    settings = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise SystemExit(f"--set takes NAME=INTEGER (0/1 for a bool), got {item!r}")
        settings[name] = int(value)
    if not all(os.path.exists(_tool(t)) for t in ("nvdisasm", "cuobjdump")):
        raise SystemExit(f"this Triton ({triton.__version__}) ships no nvdisasm/cuobjdump to read SASS with")
    os.makedirs(args.out, exist_ok=True)
    for name, kernel in compile_launches(args.M, args.N, args.K, DTYPES[args.dtype], settings):
        base = os.path.join(args.out, name)
        for ext in ("ttgir", "ptx"):
            with open(f"{base}.{ext}", "w") as f:
                f.write(kernel.asm[ext])
        with open(f"{base}.cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", f"{base}.cubin"], capture_output=True, text=True,
                              check=True).stdout
        with open(f"{base}.sass", "w") as f:
            f.write(sass)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f"{base}.cubin"], capture_output=True,
                               text=True, check=True).stdout
        counts = summarize(sass, usage)
        print(f"triton {triton.__version__} {name}: " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
