"""What compiling the test suite's kernels costs on a GPU machine, found without one: which tests
make the slowest sm_90 compiles.

Why: on the device tool's machines the GPU test groups start from an empty Triton cache, and a
test that compiles an outsized kernel can hold a group past its time limit (session 31: one
gemv config of a test took 61 s to compile under Triton 3.9 and stopped g8 under both Tritons).

    python benchmarks/compile_cost.py OUT.json [pytest args...]     # e.g. test/test_gemm.py -k gemv

Two steps, each in its own process:
1. record: the tests run as in the CPU suite (``TRITON_INTERPRET=1``), and every ``launch`` of
   our kernels is written down with its test: the kernel, its grid, each argument's dtype, shape,
   strides and 16-byte alignment (tensors) or value, and its constexprs;
2. compile: each distinct launch is compiled for sm_90 as ``benchmarks/sass_of_launch.py`` does
   (Triton's driver replaced, nothing runs), into an empty cache, and timed.
It prints the slowest compiles and each test's total, slowest first. Not covered: tests skipped
without a GPU (the Gluon ws kernel's among them) and launches with TMA descriptor arguments; and
the launches are the CPU's (no PDL, software FP8 conversion), which the GPU compiles with small
differences of code.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time


# constexprs that describe numbers (the dtypes' limits, the output rounding), not the kernel's shape
SCALAR_META = re.compile(r"MANTISSA|NAN|NORMAL|SHIFTER|FP8_MAX|OUT_ROUND|PREFETCH|TRIGGER")


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "stride": list(value.stride()), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, (bool, int, float)) or value is None:
        return {"value": value}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    return {"unsupported": type(value).__name__}


def record(out: str, pytest_args: list) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported, as the CPU suite sets it
    import pytest

    from blockwise_fp8.kernels import gemm, gemm_hopper, quant

    records, current = [], {"test": None}

    def recorder(real):
        def launch(kernel, grid, args, meta):
            fn = getattr(kernel, "fn", kernel)  # the interpreter's wrapper holds the Python function
            records.append({"test": current["test"], "module": fn.__module__, "kernel": fn.__name__, "grid": list(grid),
                            "args": [_describe(a) for a in args],
                            "meta": [[k, _describe(v)] for k, v in meta]})
            return real(kernel, grid, args, meta)
        return launch

    for module in (gemm, gemm_hopper, quant):
        module.launch = recorder(module.launch)

    class Plugin:
        @staticmethod
        def pytest_runtest_setup(item):
            current["test"] = item.nodeid

    code = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args], plugins=[Plugin()])
    with open(out, "w") as f:
        json.dump(records, f)
    print(f"recorded {len(records)} launches (pytest exit {int(code)})", flush=True)


def _rebuild(desc):
    import torch

    if "tensor" in desc:
        dtype = getattr(torch, desc["tensor"])
        span = 1 + sum((n - 1) * s for n, s in zip(desc["shape"], desc["stride"]) if n > 0)
        offset = 0 if desc["aligned"] else 1  # one element off a 16-byte boundary (dtypes <= 8 bytes)
        storage = torch.empty(span + offset + 16, dtype=dtype)
        return storage[offset:].as_strided(desc["shape"], desc["stride"])
    if "dtype" in desc:
        return getattr(torch, desc["dtype"])
    return desc["value"]


def compile_all(path: str, top: int) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_cost_")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import importlib

    from sass_of_launch import Sm90Driver
    from triton.runtime import driver

    driver.set_active(Sm90Driver())
    from blockwise_fp8.kernels.launch import COMPILE_OPTIONS

    with open(path) as f:
        records = json.load(f)
    seen, costs, by_test = {}, [], {}  # a compile's time counts for the first test that needs it
    unsupported, failed = 0, 0
    for r in records:
        if any("unsupported" in a for a in r["args"]):
            unsupported += 1  # e.g. TMA descriptors: not rebuilt here
            continue
        key = json.dumps([r["module"], r["kernel"], r["args"], r["meta"]], sort_keys=True)
        by_test.setdefault(r["test"], 0.0)
        if key in seen:
            continue
        kernel = getattr(importlib.import_module(r["module"]), r["kernel"])
        args = [_rebuild(a) for a in r["args"]]
        meta = {k: _rebuild(v) for k, v in r["meta"]}
        start = time.perf_counter()
        try:
            kernel.warmup(*args, grid=tuple(r["grid"]), **meta, **dict(COMPILE_OPTIONS))
            seen[key] = time.perf_counter() - start
        except Exception as e:  # a launch this tool cannot rebuild: say so, go on
            print(f"{r['test']} {r['kernel']}: not compiled ({type(e).__name__}: {str(e)[:120]})", flush=True)
            seen[key] = 0.0
            failed += 1
        by_test[r["test"]] += seen[key]
        costs.append((seen[key], r["test"], r["kernel"], {k: v.get("value") for k, v in r["meta"]}))
    tests = sorted(by_test.items(), key=lambda x: -x[1])
    print(f"{len(seen)} distinct launches, {sum(seen.values()):.0f} s of sm_90 compiles in all; "
          f"{failed} of them not compiled (above), {unsupported} launches with arguments not rebuilt")
    print("slowest compiles:")
    for secs, test, kernel, meta in sorted(costs, key=lambda c: -c[0])[:top]:
        shape = " ".join(f"{k}={v}" for k, v in meta.items() if isinstance(v, (bool, int)) and not SCALAR_META.search(k))
        print(f"  {secs:6.1f} s  {kernel}  {test}  {shape}")
    print("tests by the compiles they are first to need:")
    for test, secs in tests[:top]:
        print(f"  {secs:6.1f} s  {test}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--record"]:  # the first step, in its own process
        return record(argv[1], argv[2:])
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python benchmarks/compile_cost.py OUT.json [pytest args...]")
    out, pytest_args = argv[0], argv[1:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, __file__, "--record", out, *pytest_args], env=env)  # failing tests still record
    compile_all(out, top=int(os.environ.get("TOP", "15")))


if __name__ == "__main__":
    main()
