"""Model-level benchmark: a Llama-3-8B-shaped decoder stack, bf16 vs ours vs torchao, one run.

    python benchmarks/bench_model.py --out results/model.csv            # H100: ~3-5 minutes
    python benchmarks/bench_model.py --smoke --out /tmp/model.csv       # tiny, CPU or GPU, seconds

The stack: ``--layers`` (default 4) Llama-3-8B decoder layers (hidden 4096, MLP 14336, 32 query
and 8 KV heads, RoPE, RMSNorm, SwiGLU; random weights), hidden states in and out -- no embedding
and no lm_head, which the FP8 checkpoints keep in bf16 anyway. Contenders, on the same weights:

    bf16      the stack as it is
    ours      quantize_(stack, BlockwiseFP8Config())                          (blockwise_fp8)
    torchao   quantize_(stack, Float8DynamicActivationFloat8WeightConfig(
                  granularity=[PerBlock([1, 128]), PerBlock([128, 128])]))    (skipped if torchao
                                                                               is not importable)

Phases, each contender ``torch.compile``d:
    decode    batch 1 and 16, one token per sequence against a static KV cache of ``--ctx``
              positions, mode="reduce-overhead" (CUDA graphs); tokens/s = batch / step time
    prefill   1 x ``--prefill`` tokens, causal attention, default mode (``--prefill-mode
              reduce-overhead``: CUDA graphs, as docs/usage.md recommends for fixed lengths);
              tokens/s = tokens / time

Inductor's settings are the same for every contender (``--inductor``): "tuned" (the default) turns
on the coordinate-descent tuning that torchao's quantize_ turns on for the whole process unless
told not to; it makes bf16's decode faster (0.82 -> 0.73 ms at batch 1 on the H100), so it is the
harder baseline. "default" leaves torch's defaults.

Times are the median over 5 repeats of the mean over ``--iters`` back-to-back calls (CUDA events);
"host ms to issue" is the host time per call without waiting for the GPU: where it reaches the
step time, the row measures the host (marked host-bound), not the kernels.
SQNR (dB) of each contender's output against the bf16 stack's output on the same input.
Written: the CSV (``#`` header lines: card, versions, date, configuration) and a Markdown table
beside it (same name, .md). The table is printed last. A budget (``--budget-s``) skips what is
left, with a note, rather than overrun.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blockwise_fp8 import BlockwiseFP8Config  # noqa: E402
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig, DecoderStack, init_weights  # noqa: E402

SMOKE = DecoderConfig(hidden=256, ffn=512, heads=4, kv_heads=2, layers=2)
TARGET_DECODE_B1 = 1.6  # ours over bf16, tokens/s, decode at batch 1 (design.md standing target)


def log(*a):
    print(*a, flush=True)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.double()
    noise = (ref - approx.double()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def time_ms(fn, device: torch.device, iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` back-to-back calls, after a warm-up."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def issue_ms(fn, device: torch.device, calls: int = 20, rounds: int = 3) -> float:
    """Host time to issue one call, without waiting for the device: the median over ``rounds``
    of ``calls`` back-to-back calls, the queue emptied before each (a one-time stall, e.g. the
    H100 run where one 20-call span of ours' prefill took 12.7 ms a call against a 5.3 ms step,
    then counts once, not as the answer). Where it is close to the measured step time, the host,
    not the GPU, sets the pace."""
    spans = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        spans.append((time.perf_counter() - t0) * 1e3 / calls)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(spans)


def profile_table(call, device: torch.device, calls: int = 5, rows: int = 25) -> str:
    """The kernels one contender runs in ``calls`` calls, by total device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def torchao_config():
    """torchao's blockwise path, or (None, why) when it cannot be built here."""
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerBlock
    except Exception as e:  # noqa: BLE001 -- any import failure means: no torchao contender
        return None, f"torchao not importable ({type(e).__name__}: {e})"
    # set_inductor_config=False: by default torchao's quantize_ switches on Inductor's coordinate-descent
    # tuning for the whole process, so every contender compiled after it -- bf16 included -- would
    # be compiled differently from a run without torchao (bf16 decode b1 0.82 -> 0.73 ms on the
    # H100, 2026-11-26). The settings are --inductor's, the same for every contender.
    cfg = Float8DynamicActivationFloat8WeightConfig(
        granularity=[PerBlock([1, 128]), PerBlock([128, 128])], set_inductor_config=False
    )
    return cfg, f"torchao {torchao.__version__}"


# torchao's recommended_inductor_config_setter (what its quantize_ applies by default): the
# settings that change the generated kernels. "tuned" applies them for every contender.
TUNED_INDUCTOR = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}


def inductor_settings(which: str, pdl: bool = False, freezing: bool = False) -> tuple[dict, str]:
    """``--inductor``'s Inductor config patch (applied around the whole run) and its description.

    ``pdl``: also ``triton.enable_pdl`` (TORCHINDUCTOR_ENABLE_PDL, off by default in torch): Inductor's
    Triton kernels then launch under programmatic dependent launch, waiting on the grid before them
    only where they read what it wrote, so a kernel boundary (an Inductor kernel after ours, or
    before our PDL-launched quantization) need not drain the GPU first. A decode step has ~10 such
    boundaries per layer, each ~1-2 us on an H100; applied to every contender. ``freezing``: Inductor's
    freezing (parameters folded into the graph as constants), so that a CUDA-graph call has fewer
    inputs to check on the host (at 4 layers ours has 77 graph inputs, bf16 49)."""
    if which == "tuned":
        patch, what = dict(TUNED_INDUCTOR), "coordinate-descent tuning on (torchao's recommended settings)"
    else:
        patch, what = {}, "default settings (torchao's quantize_ told not to change them)"
    if pdl:
        patch["triton.enable_pdl"] = True
        what += " + triton.enable_pdl (Inductor kernels under programmatic dependent launch)"
    if freezing:
        patch["freezing"] = True
        what += " + freezing (parameters folded into the graph)"
    return patch, what + ", for every contender"


def check_inductor_pdl(ap: argparse.ArgumentParser, wanted: bool) -> None:
    from torch._inductor import config as inductor_config

    if wanted and not hasattr(inductor_config.triton, "enable_pdl"):
        ap.error(f"--inductor-pdl needs torch._inductor.config.triton.enable_pdl, which torch {torch.__version__} lacks")


def versions() -> str:
    import triton

    try:
        import torchao

        ao = torchao.__version__
    except Exception:  # noqa: BLE001
        ao = "absent"
    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""
    return f"torch {torch.__version__}{cuda}, triton {triton.__version__}, torchao {ao}, python {platform.python_version()}"


def build_contenders(base: DecoderStack, want_torchao: bool, want_ours: bool = True) -> tuple[dict, list]:
    from torchao.quantization import quantize_

    models, notes = {"bf16": base}, []
    if want_ours:
        ours = copy.deepcopy(base)
        quantize_(ours, BlockwiseFP8Config())
        models["ours"] = ours
    else:
        notes.append("ours skipped: --no-ours")
    if want_torchao:
        cfg, what = torchao_config()
        if cfg is None:
            notes.append(f"torchao skipped: {what}")
        else:
            ao = copy.deepcopy(base)
            try:
                quantize_(ao, cfg)
                models["torchao"] = ao
            except Exception as e:  # noqa: BLE001 -- report, do not stop the other contenders
                notes.append(f"torchao skipped: quantize_ failed ({type(e).__name__}: {str(e)[:200]})")
    else:
        notes.append("torchao skipped: --no-torchao")
    return models, notes


def bf16_and_ours_for_decode(cfg: DecoderConfig, ctx: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """The A/B harnesses' pair: the stack in bf16 (seed 0) and ours after ``unwrap_for_compile``,
    and the decode position (the last of a ``ctx``-long cache)."""
    from blockwise_fp8 import unwrap_for_compile

    with torch.device(device):
        base = DecoderStack(cfg, max_len=ctx).to(torch.bfloat16)
    init_weights(base, seed=0)
    base.eval()
    models, _ = build_contenders(base, False, True)
    unwrap_for_compile(models["ours"])
    return models, torch.tensor([ctx - 1], device=device)


def run(args) -> tuple[list, list, str]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile_ = device.type == "cuda" if args.compile == "auto" else args.compile == "on"
    cfg = SMOKE if args.smoke else LLAMA3_8B
    layers = args.layers or (SMOKE.layers if args.smoke else 4)
    cfg = DecoderConfig(cfg.hidden, cfg.ffn, cfg.heads, cfg.kv_heads, layers)
    prefill = args.prefill or (64 if args.smoke else 2048)
    ctx = args.ctx or (128 if args.smoke else 2048)
    batches = [int(b) for b in args.decode_batches.split(",")] if args.decode_batches else ([1, 2] if args.smoke else [1, 16])
    iters = args.iters or (3 if args.smoke else 50)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    header = [
        f"# {card}; {versions()}; {time.strftime('%Y-%m-%d')}",
        f"# stack: {layers} x Llama-3-8B layer (hidden {cfg.hidden}, MLP {cfg.ffn}, {cfg.heads} heads, {cfg.kv_heads} KV), "
        f"bf16 activations, random weights; no embedding/lm_head" if not args.smoke else
        f"# SMOKE stack: {layers} layers, hidden {cfg.hidden}, MLP {cfg.ffn} (not a measurement)",
        f"# decode: batch {batches}, KV cache {ctx}, torch.compile mode=reduce-overhead (CUDA graphs)" if compile_ else
        f"# decode: batch {batches}, KV cache {ctx}, eager (no torch.compile)",
        f"# prefill: 1 x {prefill} tokens, " + (f"torch.compile mode={args.prefill_mode}" + (
            " (CUDA graphs)" if args.prefill_mode == "reduce-overhead" else "") if compile_ else "eager"),
        f"# ours: {'blockwise_fp8.unwrap_for_compile before torch.compile' if compile_ and args.unwrap else 'tensor subclasses as quantize_ left them'}; torchao: as quantize_ left it",
        "# time: median of 5 repeats of the mean of " + ", ".join(
            f"{n} calls ({p})" for p, n in (("decode", iters), ("prefill", max(1, iters // 5)))
            if p in args.phases.split(",")) + "; SQNR: output vs the bf16 stack's output",
        f"# inductor: {inductor_settings(args.inductor, args.inductor_pdl, args.freezing)[1]}",
    ]
    # only the phases that run are described (the files carry this header too)
    header = [h for h in header if not any(h.startswith(f"# {p}:") and p not in args.phases.split(",")
                                           for p in ("decode", "prefill"))]
    for h in header:
        log(h)
    t_start = time.monotonic()
    with torch.device(device):
        base = DecoderStack(cfg, max_len=max(ctx, prefill)).to(torch.bfloat16)
    init_weights(base, seed=0)
    base.eval()
    models, notes = build_contenders(base, not args.no_torchao, not args.no_ours)
    if compile_ and args.unwrap and "ours" in models:
        # Plain FP8 parameters (blockwise_fp8.BlockwiseFP8Linear): as quantize_ left them, every
        # compiled call checks and flattens each subclass weight in Python, and torchao's
        # unwrap_tensor_subclass costs ~70 guards a weight; either can exceed the GPU time of a
        # CUDA-graph decode step on the H100 hosts (docs/design.md, "Host time"). Applied to ours
        # only: torchao 0.18's Float8Tensor fails to compile after torchao's own unwrap ("'Float8Tensor'
        # object has no attribute 'block_size'", H100 run of 2026-11-26), so torchao runs as quantize_ left it.
        from blockwise_fp8 import unwrap_for_compile

        unwrap_for_compile(models["ours"])
    for n in notes:
        log("note:", n)
    log(f"built {', '.join(models)} in {time.monotonic() - t_start:.1f} s")

    g = torch.Generator(device=device).manual_seed(1)
    wanted = set(args.phases.split(","))
    if not wanted or not wanted <= {"decode", "prefill"}:
        raise SystemExit(f"--phases takes decode and/or prefill, got {args.phases!r}")
    phases = [("decode", b) for b in batches if "decode" in wanted] + [("prefill", 1)] * ("prefill" in wanted)
    inputs = {
        ph: torch.randn((b, 1 if ph[0] == "decode" else prefill, cfg.hidden), generator=g, device=device, dtype=torch.bfloat16)
        for ph in phases for b in [ph[1]]
    }
    rows, ref_out, profiles = [], {}, []
    for name, model in models.items():
        for phase, batch in phases:
            elapsed = time.monotonic() - t_start
            if elapsed > args.budget_s:
                notes.append(f"{name} {phase} b{batch} skipped: budget of {args.budget_s:.0f} s used ({elapsed:.0f} s)")
                log("note:", notes[-1])
                continue
            x = inputs[(phase, batch)]
            t0 = time.monotonic()
            try:
                with torch.no_grad():
                    if phase == "decode":
                        model.setup_cache(batch, ctx, device=device)
                        pos = torch.tensor([ctx - 1], device=device)
                        fn = torch.compile(model.decode, mode="reduce-overhead") if compile_ else model.decode
                        call = lambda: fn(x, pos)  # noqa: E731
                    else:
                        fn = torch.compile(model, mode=args.prefill_mode) if compile_ else model
                        call = lambda: fn(x)  # noqa: E731
                    out = call().clone()
                    ms = time_ms(call, device, iters if phase == "decode" else max(1, iters // 5))
                    host = issue_ms(call, device, min(20, iters))
                    if args.profile:
                        profiles.append(f"## {name} {phase} batch {batch}: 5 calls\n{profile_table(call, device)}")
            except Exception as e:  # noqa: BLE001 -- one failing contender must not hide the others
                notes.append(f"{name} {phase} b{batch} failed: {type(e).__name__}: {str(e)[:300]}")
                log("note:", notes[-1])
                continue
            finally:
                if compile_:
                    torch._dynamo.reset()
            if name == "bf16":
                ref_out[(phase, batch)] = out
            ref = ref_out.get((phase, batch))
            tokens = batch * (1 if phase == "decode" else prefill)
            rows.append({
                "phase": phase, "batch": batch, "tokens": tokens, "contender": name, "ms": ms, "host_ms": host,
                "tokens_per_s": tokens / ms * 1e3, "sqnr_db": sqnr_db(ref, out) if ref is not None else float("nan"),
            })
            log(f"{name:8s} {phase:8s} b{batch:<3d} {ms:9.3f} ms  {tokens / ms * 1e3:12.0f} tok/s  "
                f"host {host:.3f} ms  (compile+bench {time.monotonic() - t0:.1f} s)")
            # written after every row: a process cut short by a time limit keeps what it measured
            write_outputs(args.out, rows, notes, "\n".join(header))
        if name != "bf16":
            models[name] = None  # free its weights before the next contender
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if profiles:
        path = os.path.splitext(args.out)[0] + ".profile.txt"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(header) + "\n\n" + "\n\n".join(profiles) + "\n")
        log(f"profiles written to {path}")
    return rows, notes, "\n".join(header)


def write_outputs(path: str, rows: list, notes: list, header: str) -> str:
    """Write the CSV and the Markdown table beside it (same name, .md); return the table."""
    for r in rows:
        b = next((s for s in rows if s["contender"] == "bf16" and (s["phase"], s["batch"]) == (r["phase"], r["batch"])), None)
        r["x_bf16"] = b["ms"] / r["ms"] if b else float("nan")
    text = table(rows, notes)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(header + "\n")
        fields = ["phase", "batch", "tokens", "contender", "ms", "host_ms", "tokens_per_s", "x_bf16", "sqnr_db"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in fields})
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join(h.lstrip("# ") for h in header.splitlines()) + "\n\n" + text)
    return text


def table(rows: list, notes: list) -> str:
    out = ["| phase | batch x tokens | contender | ms | host ms to issue | tokens/s | x bf16 | SQNR vs bf16 dB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bt = f"{r['batch']} x {r['tokens'] // r['batch']}"
        sq = "-" if r["contender"] == "bf16" else f"{r['sqnr_db']:.1f}"
        bound = " (host-bound)" if r["host_ms"] >= 0.9 * r["ms"] else ""
        out.append(f"| {r['phase']} | {bt} | {r['contender']} | {r['ms']:.3f} | {r['host_ms']:.3f}{bound} | "
                   f"{r['tokens_per_s']:.0f} | {r['x_bf16']:.2f}x | {sq} |")
    checks = []
    ours = {(r["phase"], r["batch"]): r for r in rows if r["contender"] == "ours"}
    ao = {(r["phase"], r["batch"]): r for r in rows if r["contender"] == "torchao"}
    d1 = ours.get(("decode", 1))
    if d1:
        ok = d1["x_bf16"] >= TARGET_DECODE_B1
        checks.append(f"decode batch 1: ours {d1['x_bf16']:.2f}x bf16 (target >= {TARGET_DECODE_B1}x): {'met' if ok else 'MISSED'}")
    if ao:
        behind = [f"{p} b{b}" for (p, b), r in ao.items() if (p, b) in ours and ours[(p, b)]["ms"] > r["ms"]]
        checks.append("ahead of torchao on every row: " + ("yes" if not behind else f"NO ({', '.join(behind)})"))
    else:
        checks.append("torchao: no rows (see notes)")
    return "\n".join(out + [""] + checks + [f"note: {n}" for n in notes]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model.csv"))
    ap.add_argument("--smoke", action="store_true", help="tiny stack, a few calls: checks the script, measures nothing")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 2048)")
    ap.add_argument("--ctx", type=int, default=None, help="KV cache length for decode (default 2048)")
    ap.add_argument("--decode-batches", default=None, help="comma-separated (default 1,16)")
    ap.add_argument("--phases", default="decode,prefill",
                    help="which phases to time, comma-separated: decode, prefill (a device call of at most "
                         "10 minutes fits one phase with all three contenders; torchao compiles for 2-3 min)")
    ap.add_argument("--iters", type=int, default=None, help="calls per timed repeat (default 50 decode, 10 prefill)")
    ap.add_argument("--prefill-mode", choices=["default", "reduce-overhead"], default="default",
                    help="torch.compile mode of the prefill phase (reduce-overhead: CUDA graphs, one per length; "
                         "without them ours' prefill can be host-bound, results/prefill-host-h100-2026-11-27-s25.md)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on with CUDA")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--no-ours", action="store_true",
                    help="bf16 and torchao only (torchao compiles for ~2 min a phase: a separate call fits the device's limit)")
    ap.add_argument("--no-unwrap", dest="unwrap", action="store_false",
                    help="compile ours as quantize_ left it, without blockwise_fp8.unwrap_for_compile (see run())")
    ap.add_argument("--profile", action="store_true",
                    help="also write <out>.profile.txt: the kernels of each contender and phase (torch.profiler)")
    ap.add_argument("--inductor", choices=["tuned", "default"], default="tuned",
                    help="Inductor settings for every contender: tuned = coordinate-descent tuning, as torchao's "
                         "quantize_ sets by default (the faster bf16 baseline); default = torch's defaults")
    ap.add_argument("--inductor-pdl", action="store_true",
                    help="also turn on Inductor's triton.enable_pdl for every contender (see inductor_settings)")
    ap.add_argument("--freezing", action="store_true",
                    help="also turn on Inductor's freezing for every contender (see inductor_settings)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="skip what is left after this many seconds")
    args = ap.parse_args(argv)
    check_inductor_pdl(ap, args.inductor_pdl)
    for name in ("layers", "prefill", "ctx", "iters"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name} must be a positive integer, got {v}")
    from torch._inductor import config as inductor_config

    with inductor_config.patch(inductor_settings(args.inductor, args.inductor_pdl, args.freezing)[0]):
        rows, notes, header = run(args)
    text = write_outputs(args.out, rows, notes, header)
    log("")
    log(header)
    log(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
