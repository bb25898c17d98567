"""``blockwise-fp8`` (also ``python -m blockwise_fp8``): demo, quantize, bench.

    blockwise-fp8 [demo]                  quantize a small built-in transformer; accuracy and time vs bf16
    blockwise-fp8 quantize SRC DST        a Hugging Face model directory -> a blockwise FP8 checkpoint
    blockwise-fp8 bench [--model]         the GEMM benchmark (or the model-level one) on a CUDA GPU

With no subcommand it runs ``demo``. Errors in what the user gave (paths, dtypes, patterns) end
with a one-line message and exit status 1 (2 for a malformed command line), not a traceback
(set BLOCKWISE_FP8_TRACEBACK=1 to see one).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROG = "blockwise-fp8"
WEIGHT_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


class CLIError(Exception):
    """A user error the CLI reports in one line (exit status 1)."""


# --------------------------------------------------------------------------- demo


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.double()
    noise = (ref - approx.double()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def demo(args) -> int:
    from torchao.quantization import quantize_

    from . import reference
    from .checkpoint import skip_filter
    from .config import BlockwiseFP8Config
    from .demo_model import DEMO_CPU, DEMO_GPU, TinyLM, init_weights

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA GPU is available here")
    cfg = DEMO_GPU if device.type == "cuda" else DEMO_CPU
    batch, seq = (4, 512) if device.type == "cuda" else (2, 64)
    weight_dtype = WEIGHT_DTYPES[args.weight_dtype]
    torch.manual_seed(args.seed)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (reference backend, float64 GEMM)"
    print(f"blockwise FP8 demo on {where}")
    print(
        f"model: {cfg.layers}-layer Llama-style decoder, hidden {cfg.hidden}, MLP {cfg.ffn}, {cfg.heads} heads "
        f"({cfg.kv_heads} KV), vocab {cfg.vocab}, random weights; input {batch}x{seq} tokens"
    )
    print(f"quantized: every Linear but lm_head, weights {weight_dtype} 128x128, activations float8_e4m3fn 1x128")

    with torch.device(device):
        bf16 = TinyLM(cfg, max_len=max(seq, 64)).to(torch.bfloat16)
    init_weights(bf16, args.seed)
    bf16.eval()
    ids = torch.randint(0, cfg.vocab, (batch, seq), device=device)

    inputs: dict = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0]))
        for name, m in bf16.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]
    with torch.no_grad():
        ref_logits = bf16(ids)
    for h in hooks:
        h.remove()

    q = copy.deepcopy(bf16)
    t0 = time.perf_counter()
    quantize_(q, BlockwiseFP8Config(weight_dtype=weight_dtype), filter_fn=skip_filter())
    if device.type == "cuda":
        torch.cuda.synchronize()
    quant_s = time.perf_counter() - t0

    # Per layer type: each quantized Linear on the exact input its bf16 twin saw, against the
    # float64 product of the bf16 operands; beside it the float64 simulation of the same numerics.
    per_type: dict = {}
    with torch.no_grad():
        for name, x in inputs.items():
            lin_bf16, lin_q = bf16.get_submodule(name), q.get_submodule(name)
            w = lin_q.weight
            exact = x.double() @ lin_bf16.weight.double().T
            sim = reference.linear(x, w.qdata, w.scale, out_dtype=torch.float64)
            rows = per_type.setdefault(name.rsplit(".", 1)[-1], [])
            rows.append((_sqnr_db(exact, lin_q(x)), _sqnr_db(exact, sim), _sqnr_db(exact, lin_bf16(x))))
        logits = q(ids)
    print(f"\nquantize_ took {quant_s:.2f} s")
    print(f"\n{'layer type':<12} {'count':>5} {'SQNR ours dB':>13} {'float64 sim dB':>15} {'bf16 dB':>8}")
    for kind, rows in per_type.items():
        cols = [statistics.mean(r[i] for r in rows) for i in range(3)]
        print(f"{kind:<12} {len(rows):>5} {cols[0]:>13.2f} {cols[1]:>15.2f} {cols[2]:>8.2f}")
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"\nlogits vs bf16: SQNR {_sqnr_db(ref_logits.float(), logits.float()):.2f} dB, top-1 agreement {100 * agree:.1f}%")

    repeats = 10 if device.type == "cuda" else 3
    with torch.no_grad():
        for _ in range(2 if device.type == "cuda" else 1):  # warm up (Triton compiles on first use)
            bf16(ids), q(ids)
        t_bf16 = _time_ms(lambda: bf16(ids), device, repeats)
        t_q = _time_ms(lambda: q(ids), device, repeats)
    tokens = batch * seq
    print(f"\n{'eager forward':<14} {'ms':>9} {'tokens/s':>11}")
    print(f"{'bf16':<14} {t_bf16:>9.2f} {tokens / t_bf16 * 1e3:>11.0f}")
    print(f"{'blockwise FP8':<14} {t_q:>9.2f} {tokens / t_q * 1e3:>11.0f}   ({t_bf16 / t_q:.2f}x bf16)")
    if device.type == "cpu":
        print("(on CPU the FP8 path is the float64 reference implementation, for checking, not for speed;"
              " run on a CUDA GPU for the Triton kernels)")
    return 0


# --------------------------------------------------------------------------- quantize


def quantize_cmd(args) -> int:
    from .checkpoint import quantize_checkpoint

    result = quantize_checkpoint(
        args.src,
        args.dst,
        weight_dtype=WEIGHT_DTYPES[args.weight_dtype],
        skip=args.skip,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.quiet,
    )
    print(
        f"wrote {result.path}: {len(result.quantized)} Linear weights in {args.weight_dtype} "
        f"(128x128 blocks), {len(result.kept)} skipped, {result.total_size / 1e9:.3f} GB"
    )
    if result.not_linear:
        print(
            f"note: {len(result.not_linear)} 2-D weights are not nn.Linear weights of the transformers model and were "
            f"copied unquantized (e.g. {result.not_linear[0]})"
        )
    return 0


# --------------------------------------------------------------------------- bench


def bench(args, rest: list) -> int:
    if not torch.cuda.is_available():
        raise CLIError("bench measures the CUDA kernels and needs a CUDA GPU; none is available here")
    script = BENCHMARKS / ("bench_model.py" if args.model else "bench_gemm.py")
    if not script.is_file():
        raise CLIError(
            f"{script} not found: the benchmarks ship with the source tree; run {PROG} from a git checkout "
            "installed with pip install -e ."
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        cmd = [sys.executable, str(script), "--out", str(out / "model.csv"), *rest]
    else:
        cmd = [sys.executable, str(script), "--out", str(out), *rest]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="DeepSeek-V3 blockwise FP8 (1x128 activations, 128x128 weights) for PyTorch. "
        "With no command: demo.",
    )
    sub = p.add_subparsers(dest="command", metavar="{demo,quantize,bench}")

    d = sub.add_parser("demo", help="quantize a small built-in transformer and compare it with bf16")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--weight-dtype", default="e4m3", choices=sorted(WEIGHT_DTYPES))
    d.add_argument("--seed", type=int, default=0)

    q = sub.add_parser(
        "quantize",
        help="convert a local Hugging Face model directory into a blockwise FP8 checkpoint",
        description="Read SRC (config.json + safetensors) tensor by tensor, quantize every nn.Linear weight but "
        "lm_head and --skip matches to FP8 in 128x128 blocks, write DST in the DeepSeek/Hugging Face FP8 format "
        "(weight + weight_scale_inv, quantization_config in config.json). DST appears only when complete.",
    )
    q.add_argument("src", help="Hugging Face model directory (config.json and model.safetensors or its index)")
    q.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    q.add_argument("--weight-dtype", default="e4m3", choices=sorted(WEIGHT_DTYPES), help="FP8 format of the weights")
    q.add_argument(
        "--skip", action="append", default=[], metavar="PATTERN",
        help="regular expression searched in module names; matching Linears stay in high precision "
        "(repeatable; lm_head is always skipped)",
    )
    q.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda if available, else cpu)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")

    b = sub.add_parser(
        "bench",
        help="run the GEMM benchmark (CSV + plot), or with --model the model-level one; needs a CUDA GPU",
        description="Runs benchmarks/bench_gemm.py (or bench_model.py with --model); further arguments are "
        "passed to the script.",
    )
    b.add_argument("--out", default="bench-results", help="output directory (default: bench-results)")
    b.add_argument("--model", action="store_true", help="the model-level benchmark instead of the GEMM grid")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        if argv:
            parser.error(f"unrecognized arguments: {' '.join(argv)}")
        args = parser.parse_args(["demo"])
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "demo":
            return demo(args)
        if args.command == "quantize":
            return quantize_cmd(args)
        return bench(args, rest)
    except KeyboardInterrupt:
        where = f"; nothing was written to {args.dst}" if args.command == "quantize" else ""
        print(f"{PROG} {args.command}: interrupted{where}", file=sys.stderr)
        return 130
    except (CLIError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ValueError,
            TypeError, ImportError, NotImplementedError) as e:
        if os.environ.get("BLOCKWISE_FP8_TRACEBACK"):
            raise
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
