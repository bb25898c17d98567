"""How long the first call of a new shape takes: ours (no autotuning, a plan per shape) against
torchao 0.18's blockwise path (its GEMM autotunes 48 configs per (N, K, ceil(log2 M))).

    PYTHONPATH=. python benchmarks/first_call.py OUT.txt [--nk 8192x8192] [--ms 1,16,128,...]
        [--dtype e4m3] [--contenders ours,ours_triton,torchao] [--timeout 300]

Each contender runs in child processes of its own with an empty Triton cache (``TRITON_CACHE_DIR``
a fresh temporary folder), as on a machine that never ran it: the weight is quantized, then
``linear`` (quantize + GEMM, eager) is called three times for each M in turn, in the order given, as
a server meets batch sizes. The first call's wall time (synchronised) holds every compile it
needs; the later ones are the steady eager call (at M = 1 our second call is the first of the
fused kernel, ``ops._quantize_inside``, which compiles too). A second child then does the same over
the cache the first one filled ("warm": a restarted server). CUDA context, imports and operands
are made before the timings start.

Contenders: ``ours`` (``blockwise_fp8.linear``, backend "auto"), ``ours_triton`` (backend
"triton": our kernels only, what e5m2 gets), ``torchao`` (``fp8_blockwise_act_quant`` +
``blockwise_fp8_gemm``, its weight by ``fp8_blockwise_weight_quant``); ``ours_reference`` (the
pure-torch backend, for a run on the CPU: ``--device cpu``). Not a GPU-time benchmark: seconds of
host wall time, one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
CONTENDERS = ("ours", "ours_triton", "torchao")
CALLS = 3  # per M: the first (compiles) and two more


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def linear_calls(contender: str, dtype: torch.dtype):
    """(quantize_weight(w) -> weight, linear(x, weight) -> y) of one contender."""
    if contender == "torchao":
        from torchao.kernel import blockwise_quantization as bq

        def quantize_weight(w):
            return bq.fp8_blockwise_weight_quant(w, 128, dtype)

        def linear(x, weight):
            xq, xs = bq.fp8_blockwise_act_quant(x, 128, dtype)
            return bq.blockwise_fp8_gemm(xq, xs, *weight, 128)

        return quantize_weight, linear
    import blockwise_fp8 as bf

    backend = {"ours": "auto", "ours_triton": "triton", "ours_reference": "reference"}[contender]

    def quantize_weight(w):
        return bf.quantize_weight(w, dtype, backend=backend)

    def linear(x, weight):
        return bf.linear(x, *weight, activation_dtype=dtype, backend=backend)

    return quantize_weight, linear


def run_sequence(contender: str, N: int, K: int, ms: list, dtype: torch.dtype, device: torch.device, say=print):
    """Quantize an (N, K) weight, then call linear CALLS times at each M of ``ms``; ``say`` gets one
    JSON line per step: {"step": "weight" | M, "seconds": [wall time of each call]}."""
    quantize_weight, linear = linear_calls(contender, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(N, K, generator=gen).to(device=device, dtype=torch.bfloat16)
    xs = {M: torch.randn(M, K, generator=gen).to(device=device, dtype=torch.bfloat16) for M in ms}
    _sync(device)
    weight = None

    def quantize():
        nonlocal weight
        weight = quantize_weight(w)

    say(json.dumps({"step": "weight", "seconds": [_wall(quantize, device)]}))
    for M in ms:
        say(json.dumps({"step": M, "seconds": [_wall(lambda: linear(xs[M], weight), device) for _ in range(CALLS)]}))


def child(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, outside the timings
    N, K = (int(v) for v in args.nk.split("x"))
    run_sequence(args.child, N, K, [int(m) for m in args.ms.split(",")], DTYPES[args.dtype], device,
                 say=lambda line: print(line, flush=True))


def spawn(contender: str, cache_dir: str, args) -> tuple[list, str]:
    """Run one child over ``cache_dir``; its steps, and its error text where it failed."""
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", contender, "--nk", args.nk, "--ms", args.ms,
           "--dtype", args.dtype, "--device", args.device]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return _steps(out), f"timed out after {args.timeout} s"
    err = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return _steps(done.stdout), err


def _steps(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def table(results: dict, ms: list) -> list[str]:
    """Markdown: one row per step, for each contender and cache state the first call's seconds
    and (in brackets) the slowest later one."""
    cols = list(results)
    out = ["| step | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for step in ["weight"] + ms:
        cells = []
        for c in cols:
            found = [s["seconds"] for s in results[c] if s["step"] == step]
            if not found:
                cells.append("-")
                continue
            first, *later = found[0]
            cells.append(f"{first:.2f}" + (f" ({max(later):.4f})" if later else ""))
        out.append(f"| {'weight quantization' if step == 'weight' else f'M = {step}'} | " + " | ".join(cells) + " |")
    totals = []
    for c in cols:
        totals.append(f"{sum(s['seconds'][0] for s in results[c]):.1f}")
    out.append("| sum of first calls | " + " | ".join(totals) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--nk", default="8192x8192", help="the weight's NxK")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096", help="the Ms, called in this order")
    ap.add_argument("--dtype", default="e4m3", choices=list(DTYPES))
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per child process")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.out:
        ap.error("the output file is required")
    try:
        N, K = (int(v) for v in args.nk.split("x"))
        ms = [int(m) for m in args.ms.split(",")]
    except ValueError as e:
        ap.error(f"--nk is NxK and --ms comma-separated integers, got {args.nk!r} and {args.ms!r} ({e})")
    if min(N, K, *ms) < 1:
        ap.error(f"sizes must be positive, got --nk {args.nk} --ms {args.ms}")
    contenders = args.contenders.split(",")
    unknown = [c for c in contenders if c not in CONTENDERS + ("ours_reference",)]
    if unknown:
        ap.error(f"unknown contenders {unknown}; expected some of {list(CONTENDERS)}")
    import triton

    dev = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    try:
        import torchao
        ao = torchao.__version__
    except Exception:  # noqa: BLE001
        ao = "absent"
    head = [f"# {dev}; torch {torch.__version__}, triton {triton.__version__}, torchao {ao}, "
            f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}",
            f"# first_call.py: weight {args.nk} {args.dtype}, M in order {args.ms}; seconds of wall time, "
            f"first call (slowest of the {CALLS - 1} later calls); cold = empty Triton cache, warm = "
            "a second process over the cache the cold one filled"]
    results, notes = {}, []
    for c in contenders:
        with tempfile.TemporaryDirectory(prefix="first_call_") as cache:
            for state in ("cold", "warm"):
                t0 = time.perf_counter()
                steps, err = spawn(c, cache, args)
                results[f"{c} {state}"] = steps
                line = f"{c} {state}: {len(steps)} steps in {time.perf_counter() - t0:.1f} s" + (f"; FAILED: {err}" if err else "")
                print(line, flush=True)
                if err:
                    notes.append(line)
    lines = head + [""] + table(results, ms) + [""] + notes
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
