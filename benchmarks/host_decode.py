"""Host time of a compiled decode step, by the form ours' weights take: bench_model's stack (4
Llama-3-8B layers, KV cache 2048), batch ``B`` (default 1), CUDA graphs, torch's default Inductor
settings (``INDUCTOR=tuned``: coordinate-descent tuning, as bench_model's default). Each variant prints the step time (bench_model.time_ms), the host time to issue one call
(median of 5 x bench_model.issue_ms) and the SQNR against bf16:

    bf16 / bf16+gf            the stack as it is; +gf: guard_filter_fn=skip_guard_on_all_nn_modules_unsafe
    ours-subclass             BlockwiseFP8Tensor weights as quantize_ left them
    ours-unwrap(+gf)          after torchao.utils.unwrap_tensor_subclass
    ours-plain(+gf)           after blockwise_fp8.unwrap_for_compile (BlockwiseFP8Linear)
    *-graph                   compiled (default mode) and captured by hand in one torch.cuda.CUDAGraph:
                              the GPU time with no per-call host work (the floor)

    PYTHONPATH=. python benchmarks/host_decode.py          # H100: ~1.5 min; ONLY=bf16,ours-plain B=16
    SMOKE=1 PROF=0 python benchmarks/host_decode.py        # tiny stack, CPU: checks the script

With PROF=1 (default) writes cProfile tables of ours-unwrap and ours-plain to $OUT (or /tmp).
"""
import cProfile, copy, io, os, pstats, sys, time
import torch
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..")); sys.path.insert(0, HERE)
import bench_model as bm
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig, DecoderStack, init_weights
from torchao.utils import unwrap_tensor_subclass

OUT = os.environ.get("OUT", "/tmp")
smoke = os.environ.get("SMOKE") == "1"
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
layers = int(os.environ.get("L", "4")); ctx = 128 if smoke else 2048
B = int(os.environ.get("B", "1"))
cfg = bm.SMOKE if smoke else DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads, LLAMA3_8B.kv_heads, layers)
only = os.environ.get("ONLY")
# INDUCTOR=tuned: coordinate-descent tuning for every variant (bench_model.py --inductor tuned)
torch._inductor.config.patch(bm.inductor_settings(os.environ.get("INDUCTOR", "default"))[0]).__enter__()


from blockwise_fp8 import unwrap_for_compile as plain_form


with torch.device(dev):
    base = DecoderStack(cfg, max_len=ctx).to(torch.bfloat16)
init_weights(base, seed=0); base.eval()
models, _ = bm.build_contenders(base, False, True)
ours = models["ours"]
x = torch.randn(B, 1, cfg.hidden, device=dev, dtype=torch.bfloat16)
pos = torch.tensor([ctx - 1], device=dev)
ro = {"mode": "reduce-overhead"} if dev.type == "cuda" else {}
gf = {"options": {"triton.cudagraphs": dev.type == "cuda",
                  "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}}

variants = [
    ("bf16", lambda: base, ro),
    ("bf16+gf", lambda: base, gf),
    ("ours-unwrap", lambda: unwrap_tensor_subclass(copy.deepcopy(ours)), ro),
    ("ours-subclass", lambda: ours, ro),
    ("ours-unwrap+gf", lambda: unwrap_tensor_subclass(copy.deepcopy(ours)), gf),
    ("ours-plain", lambda: plain_form(copy.deepcopy(ours)), ro),
    ("ours-plain+gf", lambda: plain_form(copy.deepcopy(ours)), gf),
    ("bf16-graph", lambda: base, "graph"),
    ("ours-unwrap-graph", lambda: unwrap_tensor_subclass(copy.deepcopy(ours)), "graph"),
    ("ours-plain-graph", lambda: plain_form(copy.deepcopy(ours)), "graph"),
]
if only:
    variants = [v for v in variants if v[0] in only.split(",")]
ref = None
rows = []
for name, make, opts in variants:
    t0 = time.time()
    with torch.no_grad():
        model = make()
        model.setup_cache(B, ctx, device=dev)
        if opts == "graph":
            if dev.type != "cuda":
                continue
            fn = torch.compile(model.decode)
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3): fn(x, pos)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = fn(x, pos)
            def call():
                g.replay(); return static_out
        else:
            fn = torch.compile(model.decode, **opts)
            call = lambda: fn(x, pos)
        out = call().clone()
        ms = bm.time_ms(call, dev, 3 if smoke else 100)
        hosts = sorted(bm.issue_ms(call, dev, 3 if smoke else 30) for _ in range(5))
        host = hosts[2]
        if ref is None: ref = out
        sq = bm.sqnr_db(ref, out)
        if name == "ours-plain":
            torch._dynamo.reset()
            ex = torch._dynamo.explain(model.decode)(x, pos)
            print("explain ours-plain: graphs", ex.graph_count, "breaks", ex.graph_break_count, ex.break_reasons[:3], flush=True)
        if name in ("ours-unwrap", "ours-plain") and os.environ.get("PROF", "1") == "1":
            pr = cProfile.Profile(); pr.enable()
            for _ in range(100): call()
            pr.disable()
            if dev.type == "cuda": torch.cuda.synchronize()
            s1 = io.StringIO(); pstats.Stats(pr, stream=s1).sort_stats("tottime").print_stats(25)
            open(f"{OUT}/cprofile-{name}.txt", "w").write(s1.getvalue())
    torch._dynamo.reset()
    rows.append((name, ms, host, sq))
    print(f"{name:18s} step {ms*1e3:8.1f} us  issue {host*1e3:8.1f} us  sqnr {sq:6.1f}  ({time.time()-t0:.0f} s)", flush=True)
print("\n| variant | step us | issue us | x bf16 |")
b = rows[0][1]
for name, ms, host, sq in rows:
    print(f"| {name} | {ms*1e3:.1f} | {host*1e3:.1f} | {b/ms:.2f} |")
