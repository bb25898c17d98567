"""The ``blockwise-fp8`` command line: demo, quantize (a Hugging Face directory in, an FP8
checkpoint out), bench, and the errors a user can run into."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from blockwise_fp8 import BlockwiseFP8Tensor, checkpoint
from blockwise_fp8.checkpoint import load_quantized
from blockwise_fp8.cli import main

from .helpers import expand_blocks, fp8_spacing

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_m_runs_the_demo():
    """The README's first command: ``python -m blockwise_fp8`` with no arguments."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "blockwise_fp8"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    rows = re.findall(r"^(\w+_proj)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert {name for name, *_ in rows} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, count, ours, sim, bf16 in rows:
        # our layers reach the SQNR of the float64 simulation of the same numerics (design target: 0.1 dB)
        assert abs(float(ours) - float(sim)) <= 0.1, name
        # e4m3 on both operands: about 28-29 dB for Gaussian-like data, far below bf16's ~55 dB
        assert 25 < float(ours) < float(bf16)
    top1 = float(re.search(r"top-1 agreement ([\d.]+)%", out).group(1))
    assert top1 > 50  # random-init logits are nearly flat; a broken layer gives chance level (0.05%)
    assert re.search(r"^blockwise FP8\s+[\d.]+\s+\d+", out, re.M) and re.search(r"^bf16\s+[\d.]+\s+\d+", out, re.M)


# ----------------------------------------------------------------------------------- quantize


def _hf_dir(tmp_path, name="src", shard=None):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=320, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    path = tmp_path / name
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    (path / "tokenizer.json").write_text('{"dummy": true}')
    return path, model


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(str(path / f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _linears(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("dtype_name, shard", [("e4m3", None), ("e5m2", "300KB")])
def test_quantize_a_hugging_face_directory(tmp_path, capsys, dtype_name, shard):
    src, model = _hf_dir(tmp_path, shard=shard)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    dst = tmp_path / "dst"
    args = ["quantize", str(src), str(dst), "--weight-dtype", dtype_name, "--skip", r"layers\.1\.mlp"]
    if shard:
        args += ["--max-shard-size", "200KB"]
    assert main(args) == 0
    dtype = {"e4m3": E4M3, "e5m2": E5M2}[dtype_name]
    captured = capsys.readouterr()
    assert f"/{len(_tensors(src))} " in captured.err  # the progress bar reached the end
    skipped = {"lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert "11 Linear weights" in captured.out and "4 skipped" in captured.out
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": dtype_name, "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": sorted(skipped),
    }
    assert config["model_type"] == "llama" and (dst / "tokenizer.json").read_text() == '{"dummy": true}'
    if shard:
        assert (dst / "model.safetensors.index.json").exists() and not (dst / "model.safetensors").exists()
    out, original = _tensors(dst), _tensors(src)
    for name in _linears(model):
        w = original[f"{name}.weight"]
        if name in skipped:
            assert torch.equal(out[f"{name}.weight"], w) and f"{name}.weight_scale_inv" not in out
            continue
        q, s = out[f"{name}.weight"], out[f"{name}.weight_scale_inv"]
        assert q.dtype == dtype and s.shape == (w.shape[0] // 128, w.shape[1] // 128)
        s_full = expand_blocks(s.double(), 128, 128, w.shape)
        err = (q.double() * s_full - w.double()).abs()
        # half an FP8 step, plus the float32 rounding of w / scale (docs/numerics.md: IEEE float32 division)
        bound = s_full * fp8_spacing(w.double() / s_full, dtype) / 2 + w.double().abs() * 2.0**-24
        assert bool((err <= bound).all()), name
    for key in original:
        if not key.endswith("proj.weight") and key != "lm_head.weight":
            assert torch.equal(out[key], original[key]), key
    # and it loads back into the model
    fresh = type(model)._from_config(model.config, dtype=torch.bfloat16)
    result = load_quantized(fresh, dst)
    assert len(result.quantized) == 11
    assert isinstance(fresh.model.layers[0].mlp.up_proj.weight, BlockwiseFP8Tensor)
    assert not isinstance(fresh.model.layers[1].mlp.up_proj.weight, BlockwiseFP8Tensor)


def test_quantize_errors(tmp_path, capsys):
    def run(*args):
        rc = main(["quantize", *map(str, args), "--quiet"])
        return rc, capsys.readouterr().err

    rc, err = run(tmp_path / "nope", tmp_path / "out")
    assert rc == 1 and "source model directory" in err and "does not exist" in err
    (tmp_path / "noconfig").mkdir()
    rc, err = run(tmp_path / "noconfig", tmp_path / "out")
    assert rc == 1 and "has no config.json" in err
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{oops")
    rc, err = run(bad, tmp_path / "out")
    assert rc == 1 and "not valid JSON" in err
    bin_only = tmp_path / "binonly"
    bin_only.mkdir()
    (bin_only / "config.json").write_text('{"model_type": "llama"}')
    (bin_only / "pytorch_model.bin").write_bytes(b"x")
    rc, err = run(bin_only, tmp_path / "out")
    assert rc == 1 and "only safetensors weights are read" in err
    src, _ = _hf_dir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    rc, err = run(src, tmp_path / "full")
    assert rc == 1 and "not empty" in err and (tmp_path / "full" / "keep").exists()
    rc, err = run(src, tmp_path / "missing" / "parent")
    assert rc == 1 and "parent directory" in err
    rc, err = run(src, tmp_path / "out2", "--skip", "(")
    assert rc == 1 and "not a valid regular expression" in err
    rc, err = run(src, tmp_path / "out3", "--skip", ".")
    assert rc == 1 and "no nn.Linear weight" in err
    assert main(["quantize", str(src), str(tmp_path / "ok"), "--quiet"]) == 0
    rc, err = run(tmp_path / "ok", tmp_path / "again")
    assert rc == 1 and "already quantized" in err
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(src), str(tmp_path / "x"), "--weight-dtype", "e3m4"])
    assert e.value.code == 2 and "invalid choice: 'e3m4'" in capsys.readouterr().err
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert leftovers == []


def test_interrupted_quantize_leaves_no_checkpoint(tmp_path, capsys, monkeypatch):
    src, _ = _hf_dir(tmp_path)
    real_add, calls = checkpoint._Writer.add, []

    def add(self, key, t):
        calls.append(key)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_add(self, key, t)

    monkeypatch.setattr(checkpoint._Writer, "add", add)
    assert main(["quantize", str(src), str(tmp_path / "dst"), "--quiet"]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_bench_without_cuda_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench"]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err
    assert main(["bench", "--model"]) == 1


def test_command_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--frobnicate"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["demo", "--weight-dtype", "int8"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "quantize" in capsys.readouterr().out


def test_bench_runs_the_benchmark_scripts(tmp_path, capsys, monkeypatch):
    """With a GPU, bench hands over to benchmarks/bench_gemm.py (or bench_model.py), passing the
    remaining arguments on; the scripts themselves are checked elsewhere (test_bench_model.py)."""
    from blockwise_fp8 import cli

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["bench", "--out", str(tmp_path / "r"), "--ms", "1,16"]) == 0
    assert main(["bench", "--model", "--out", str(tmp_path / "r"), "--layers", "2"]) == 0
    gemm, model = calls
    assert gemm[0] == sys.executable and gemm[1].endswith(os.path.join("benchmarks", "bench_gemm.py"))
    assert gemm[2:] == ["--out", str(tmp_path / "r"), "--ms", "1,16"] and os.path.isfile(gemm[1])
    assert model[1].endswith(os.path.join("benchmarks", "bench_model.py")) and os.path.isfile(model[1])
    assert model[2:] == ["--out", str(tmp_path / "r" / "model.csv"), "--layers", "2"]
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "nowhere")
    assert main(["bench"]) == 1 and "not found" in capsys.readouterr().err


def _bench_gemm():
    """benchmarks/bench_gemm.py as a module (it is a script, not part of the package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_gemm.py")
    spec = importlib.util.spec_from_file_location("bench_gemm_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_gemm_rotates_the_contender_order_between_rounds():
    """benchmarks/bench_gemm.time_contenders: every contender timed once per round, the order
    shifted by one each round, each keeping its best median (CPU: a fake timer records the order)."""
    bench = _bench_gemm()
    calls = []
    times = {"a": [5.0, 3.0, 4.0], "b": [1.0, 2.0, 0.5], "c": [7.0, 7.0, 6.0]}

    def timer(fn, rep):
        name = fn()
        calls.append(name)
        return times[name][sum(c == name for c in calls) - 1]

    best = bench.time_contenders({n: (lambda n=n: n) for n in "abc"}, rep=10, rounds=3, timer=timer)
    assert calls == list("abc" "bca" "cab")
    assert best == {"a": 3.0, "b": 0.5, "c": 6.0}
    calls.clear()
    assert bench.time_contenders({n: (lambda n=n: n) for n in "ab"}, rep=10, rounds=1, timer=timer) == {"a": 5.0, "b": 1.0}
    assert calls == ["a", "b"]


def test_bench_gemm_idles_before_every_timing(monkeypatch):
    """time_contenders(idle_s=... or settle=...): one sleep of idle_s, or one call of settle, before
    each timing; nothing without either."""
    bench = _bench_gemm()
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("sleep", s)))

    def timer(fn, rep):
        events.append(("time", fn()))
        return 1.0

    bench.time_contenders({n: (lambda n=n: n) for n in "ab"}, rep=10, rounds=2, timer=timer, idle_s=0.5)
    assert events == [("sleep", 0.5), ("time", "a"), ("sleep", 0.5), ("time", "b"),
                      ("sleep", 0.5), ("time", "b"), ("sleep", 0.5), ("time", "a")]
    events.clear()
    bench.time_contenders({n: (lambda n=n: n) for n in "ab"}, rep=10, rounds=1, timer=timer)
    assert events == [("time", "a"), ("time", "b")]
    events.clear()  # settle (--preheat, --self-heat): handed the contender about to be timed, no sleep
    bench.time_contenders({n: (lambda n=n: n) for n in "ab"}, rep=10, rounds=2, timer=timer,
                          settle=lambda fn: events.append(("heat", fn())))
    assert events == [("heat", "a"), ("time", "a"), ("heat", "b"), ("time", "b"),
                      ("heat", "b"), ("time", "b"), ("heat", "a"), ("time", "a")]


def test_bench_gemm_interleaved_orders_are_seeded_permutations():
    """bench_gemm.interleaved_orders: each sample a permutation of all contenders, the same orders
    for the same seed, and (over many samples) every contender first about equally often."""
    bench = _bench_gemm()
    names = ["bf16", "fp16", "ours_triton", "ours_auto"]
    orders = bench.interleaved_orders(names, 400, seed=3)
    assert len(orders) == 400 and all(sorted(o) == sorted(names) for o in orders)
    assert orders == bench.interleaved_orders(names, 400, seed=3)
    assert orders != bench.interleaved_orders(names, 400, seed=4)
    firsts = [o[0] for o in orders]
    assert all(60 <= firsts.count(n) <= 140 for n in names)  # 100 expected each


class _FakeCuda:
    """Just enough of torch.cuda for bench_gemm's graph timing on CPU: one clock in ms that eager
    calls and graph replays advance by their contenders' durations, and events that read it."""

    def __init__(self, monkeypatch):
        import contextlib

        self.clock, self.capturing, self.replays = 0.0, None, []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = fake.clock

            def elapsed_time(self, end):
                return end.t - self.t

        class CUDAGraph:
            def __init__(self):
                self.calls = []

            def replay(self):
                fake.replays.append(tuple(name for name, _ in self.calls))
                fake.clock += sum(ms for _, ms in self.calls)

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = g
            yield
            fake.capturing = None

        for name, value in (("Event", Event), ("CUDAGraph", CUDAGraph), ("graph", graph),
                            ("Stream", lambda: None), ("stream", lambda s: contextlib.nullcontext()),
                            ("synchronize", lambda: None)):
            monkeypatch.setattr(torch.cuda, name, value)

    def kernel(self, name, ms):
        def call():
            if self.capturing is not None:
                self.capturing.calls.append((name, ms))
            else:
                self.clock += ms
        return call


def test_bench_gemm_time_interleaved_samples_every_contender_in_turn(monkeypatch):
    """time_interleaved on a fake clock (CPU): each contender's graph holds about sample_ms of calls,
    samples follow interleaved_orders, every contender gets the same number, and the result is the
    time per call in us (exact here: the fake kernels take fixed times)."""
    bench = _bench_gemm()
    cuda = _FakeCuda(monkeypatch)
    fns = {"a": cuda.kernel("a", 0.01), "b": cuda.kernel("b", 1.5), "c": cuda.kernel("c", 5.0)}
    got = bench.time_interleaved(fns, rep=20, sample_ms=2.0, budget_reps=5, seed=1)
    assert got == pytest.approx({"a": 10.0, "b": 1500.0, "c": 5000.0})
    # graphs: a = 200 calls (2 ms), b and c one call each; the longest sample is c's 5 ms, so
    # max(10, ceil(5 * 20 / 5)) = 20 samples each. Replays: 6 of each one-call estimate graph, one
    # warm-up of each timed graph, then the 60 samples
    assert len(cuda.replays) == 3 * 6 + 3 + 60
    timed = cuda.replays[-60:]
    assert [r[0] for r in timed] == [n for order in bench.interleaved_orders(list(fns), 20, seed=1) for n in order]
    assert {len(r) for r in timed if r[0] == "a"} == {200}


def test_bench_gemm_self_heat_runs_the_contender_itself(monkeypatch):
    """self_heat(S)(fn): graph replays of fn itself until S seconds have passed (fake clock, CPU)."""
    bench = _bench_gemm()
    cuda = _FakeCuda(monkeypatch)
    bench.self_heat(0.02)(cuda.kernel("x", 0.5))
    heat = [r for r in cuda.replays if len(r) == 10]  # 5 ms of 0.5 ms calls per replay
    assert heat and all(set(r) == {"x"} for r in heat) and len(heat) % 4 == 0


@pytest.mark.parametrize("args,message", [
    (["--interleave", "--rounds", "3"], "--interleave times every contender in turn"),
    (["--interleave", "--idle", "1"], "--interleave times every contender in turn"),
    (["--interleave", "--preheat", "1"], "--interleave times every contender in turn"),
    (["--interleave", "--self-heat", "1"], "--interleave times every contender in turn"),
    (["--idle", "1", "--self-heat", "1"], "give one, got 1.0, 0.0 and 1.0"),
    (["--preheat", "1", "--idle", "2"], "give one, got 2.0, 1.0 and 0.0"),
])
def test_bench_gemm_refuses_two_timing_methods_at_once(monkeypatch, capsys, args, message):
    """bench_gemm's timing methods exclude each other; the error names what came (CPU: refused
    before any GPU work)."""
    bench = _bench_gemm()
    monkeypatch.setattr(sys, "argv", ["bench_gemm.py", *args])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("ring,auto", [(False, "triton"), (True, "triton"), (False, "cublas"), (True, "cublas")])
def test_bench_gemm_hands_each_contender_its_scale_layout(monkeypatch, ring, auto):
    """benchmarks/bench_gemm.operand_scales: the same scale values for every contender, laid out
    as each library writes them: cuBLAS M-major; ours M-major in rows padded to 4 where the ws
    kernel's ring would carry them, row-major elsewhere; auto the layout of the backend it picks
    (CPU: the kernels' and the table's answers stubbed)."""
    from blockwise_fp8 import ops
    from blockwise_fp8.kernels import gemm as G

    bench = _bench_gemm()
    monkeypatch.setattr(G, "prefers_m_major_scales", lambda M, N, K, w: ring)
    monkeypatch.setattr(ops, "_gemm_backend_for_call", lambda backend, M, K, a, w, o: auto)
    M, kb = 67, 3
    as_ = torch.rand(M, kb) + 0.5
    aq = torch.zeros(M, 128 * kb, dtype=torch.float8_e4m3fn)
    wq = torch.zeros(256, 128 * kb, dtype=torch.float8_e4m3fn)
    got = bench.operand_scales(aq, as_, wq, torch.float8_e4m3fn)
    for name, scales in got.items():
        assert torch.equal(scales, as_), name
    assert got["cublas"].stride() == (1, M)
    assert got["ours_triton"].stride() == ((1, 68) if ring else (kb, 1))
    assert got["ours_auto"] is (got["cublas"] if auto == "cublas" else got["ours_triton"])


def test_bench_gemm_merge_joins_runs_over_parts_of_the_grid(tmp_path):
    """benchmarks/bench_gemm.py --merge: the rows of runs over parts of the grid written as one
    (CSV and summary; every header line kept; a later run's row replaces an earlier one's for the
    same cell), numbers read back as written (CPU, no timing)."""
    from types import SimpleNamespace

    bench = _bench_gemm()

    def cell(M, N, us):
        r = {"M": M, "N": N, "K": 8192, "dtype": "e4m3", "bf16_us": 2.0 * us, "ours_auto_us": us, "ours_linear_us": us,
             "ours_triton_us": us, "ours_auto_backend": "triton", "ours_triton_plan": "ws128", "ours_triton_sqnr_db": 28.5}
        for c in ("bf16", "ours_auto", "ours_linear", "ours_triton"):
            r[f"{c}_x_bf16"] = r["bf16_us"] / r[f"{c}_us"]
        return r

    parts = {"a": [cell(1, 8192, 25.0), cell(2, 8192, 26.5)], "b": [cell(1, 57344, 150.25), cell(2, 8192, 24.0)]}
    for name, rows in parts.items():
        out = tmp_path / name
        out.mkdir()
        bench.write_outputs(rows, SimpleNamespace(out=str(out), plot=False), f"# H100; torch x; run {name}", "H100", "torch x",
                            final=False)
    merged = tmp_path / "merged"
    bench.merge([str(tmp_path / "a"), str(tmp_path / "b")], SimpleNamespace(out=str(merged), plot=False))
    header, rows = bench.read_grid(str(merged / "gemm_grid.csv"))
    assert rows == [parts["a"][0], parts["b"][1], parts["b"][0]]  # b's re-run of (2, 8192) replaces a's
    assert header.splitlines() == ["# H100; torch x; run a", "# + rows of H100; torch x; run b"]
    assert "| ours_auto | 3 | 2.00x |" in (merged / "summary.md").read_text()


def test_bench_gemm_plot_keeps_each_contenders_colour_in_every_panel(tmp_path):
    """benchmarks/bench_gemm.py's plot: one legend (in the first panel) names the lines of all
    panels, so a contender has one colour everywhere, also in the e5m2 panels, which have no
    cuBLAS line (the sessions 27-30 plots took their colours from the cycle: there ours_triton
    was drawn in cuBLAS's colour under the legend's name)."""
    bench = _bench_gemm()
    rows = []
    for dtype in ("e4m3", "e5m2"):
        for M in (1, 16, 1024):
            r = {"M": M, "N": 8192, "K": 8192, "dtype": dtype}
            for i, c in enumerate(bench.CONTENDERS[1:]):
                if c != "cublas" or dtype == "e4m3":
                    r[f"{c}_x_bf16"] = 1.0 + i / 10
            rows.append(r)
    fig = bench.plot(rows, str(tmp_path / "p.png"), "H100")
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in bench.CONTENDERS:
                colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == set(bench.CONTENDERS[1:])
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # and no two alike
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bench_gemm_summary_names_the_timing_method():
    """summary.md's first line says how the cells were timed, read from the CSV header that
    main() writes (session 26 ran grids four ways); headers without it keep the old wording."""
    bench = _bench_gemm()
    header = ("# NVIDIA H100 80GB HBM3; torch 2.11.0 (CUDA 13.0), triton 3.6.0; times: median us per call of "
              "CUDA-graph samples (interleaved: ~2 ms samples, contenders in a random order each sample); 2026-11-27")
    method = bench.timing_method(header)
    assert method == ("median us per call of CUDA-graph samples (interleaved: ~2 ms samples, contenders in a "
                      "random order each sample)")
    rows = [{"M": 1, "N": 8192, "K": 8192, "dtype": "e4m3", "bf16_us": 50.0, "ours_auto_us": 25.0, "ours_linear_us": 26.0,
             "ours_triton_us": 25.0, "ours_auto_backend": "triton", "ours_triton_sqnr_db": 28.5,
             "ours_auto_x_bf16": 2.0, "ours_linear_x_bf16": 50 / 26, "ours_triton_x_bf16": 2.0, "bf16_x_bf16": 1.0}]
    first = bench.summarize(rows, "H100", "torch x", method).splitlines()[0]
    assert first == f"Card: H100; torch x. Times: {method}; speedup = bf16 time / contender time."
    assert bench.timing_method("# H100; torch x; run a") == ""
    assert "Median us (CUDA-graph replay)" in bench.summarize(rows, "H100", "torch x").splitlines()[0]


def test_bench_gemm_summary_reports_the_targets_from_its_rows():
    """benchmarks/bench_gemm.targets: each of issue 3's targets measured on the rows it is given; a
    cell where "auto" ran the cuBLAS call itself is not counted as auto losing to cuBLAS (CPU,
    hand-made rows whose answers are worked out here)."""
    import math

    bench = _bench_gemm()

    def cell(M, dtype, bf16, auto, backend, triton, linear, torchao, cublas=None, sqnr=(28.5, 28.5)):
        r = {"M": M, "N": 8192, "K": 8192, "dtype": dtype, "bf16_us": bf16, "ours_auto_us": auto, "ours_auto_backend": backend,
             "ours_triton_us": triton, "ours_linear_us": linear, "torchao_us": torchao,
             "ours_triton_sqnr_db": sqnr[0], "torchao_sqnr_db": sqnr[1]}
        if cublas is not None:
            r["cublas_us"] = cublas
        for c in ("ours_auto", "ours_linear", "ours_triton"):
            r[f"{c}_x_bf16"] = bf16 / r[f"{c}_us"]
        r["ours_triton_tflops"] = 2 * M * 8192 * 8192 / triton / 1e6
        r["ours_triton_wGBps"] = 8192 * 8192 / triton / 1e3
        return r

    rows = [
        cell(1, "e4m3", 50.0, 25.0, "triton", 25.0, 26.0, 30.0, sqnr=(28.70, 28.75)),  # 2.68 TB/s
        cell(64, "e4m3", 48.0, 31.0, "triton", 31.0, 33.0, 35.0, cublas=30.0),  # ours 3.3% behind cuBLAS
        cell(1024, "e5m2", 100.0, 80.0, "triton", 80.0, 70.0, 90.0, sqnr=(22.60, 22.59)),
        cell(8192, "e4m3", 1500.0, 990.0, "cublas", 1150.0, 1050.0, 1600.0, cublas=1000.0),  # the same call, -1.0%
    ]
    text = "\n".join(bench.targets(rows))
    ratios = [50 / 25, 48 / 31, 100 / 80, 1500 / 990]
    gm = math.exp(sum(map(math.log, ratios)) / 4)
    e4m3 = math.exp((math.log(2.0) + math.log(48 / 31) + math.log(1500 / 990)) / 3)
    assert f"| {gm:.3f}x (e4m3 {e4m3:.2f}x, e5m2 1.25x) | no |" in text  # three decimals: 1.748 must not read 1.75
    assert "| min 1.25x; 1 shapes below (0 e4m3, 1 e5m2) | no |" in text
    assert ("our kernels on 1 of 2 cells, slower on 1, by up to 3.3%; 1 cells where auto is the cuBLAS call, "
            "the two timings differing by -1.0% to -1.0% | no |") in text
    assert "| slower on 0 of 4 | yes |" in text
    assert f"| e4m3 {2 * 8192**3 / 1150 / 1e6:.0f} | no |" in text
    assert f"| M = 1: {8192 * 8192 / 25 / 1e6:.2f}-{8192 * 8192 / 25 / 1e6:.2f} TB/s; M = 2-16: no cells | no |" in text
    assert "| 0 of 2 cells (1.43x at worst) | no |" in text
    assert "| ours - torchao in [-0.0500, +0.0100] dB | yes |" in text
    # the same rows with auto ahead of cuBLAS where it runs ours: that target is met
    rows[1]["ours_auto_us"] = 29.0
    line = next(t for t in bench.targets(rows) if t.startswith("| ours (auto) >= cuBLAS"))
    assert "our kernels on 1 of 2 cells, slower on 0; 1 cells where" in line and line.endswith("| yes |")
    # ours_auto against ours_triton where auto ran our kernel (M = 1, 64, 1024; not the cuBLAS cell):
    # 25/25, 29/31, 80/80 -> -6.5% to +0.0%, one beyond 2%
    # and auto's geomean with the slower / faster of each cell's two timings of its kernel:
    # M = 1: 25/25; M = 64: 29 (auto) / 31 (triton); M = 1024: 80/80; M = 8192: 990 (auto) / 1000 (cublas)
    low = math.exp((math.log(50 / 25) + math.log(48 / 31) + math.log(100 / 80) + math.log(1500 / 1000)) / 4)
    high = math.exp((math.log(50 / 25) + math.log(48 / 29) + math.log(100 / 80) + math.log(1500 / 990)) / 4)
    assert bench.same_kernel_spread(rows) == (
        "Same kernel timed twice (ours_auto where it ran our kernel, against ours_triton, same operands): "
        "3 cells, ours_auto -6.5% to +0.0%, 1 beyond 2%. Taking in every cell the slower, or the faster, of "
        "the two timings of auto's kernel (ours_triton or cublas beside ours_auto), auto's geomean x bf16 "
        f"reads {low:.3f}x to {high:.3f}x.")
    assert bench.same_kernel_spread(rows[3:]).endswith("no such cells.")
    del rows[3]["cublas_us"]  # a cuBLAS cell without the cublas column: no band
    assert bench.same_kernel_spread(rows).endswith("1 beyond 2%.")
