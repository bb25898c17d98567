"""benchmarks/bench_model.py in its --smoke configuration: it runs on CPU, writes the CSV and the
table with the card/version/date header, and the quantized stack tracks the bf16 stack."""

import csv
import json
import importlib.util
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_model():
    return _load("bench_model")


def _rows(path):
    with open(path) as f:
        lines = f.read().splitlines()
    header = [line for line in lines if line.startswith("#")]
    return header, list(csv.DictReader(line for line in lines if not line.startswith("#")))


def test_smoke_run_writes_csv_and_table(tmp_path, capsys, bench_model):
    out = tmp_path / "model.csv"
    assert bench_model.main(["--smoke", "--out", str(out), "--device", "cpu"]) == 0
    header, rows = _rows(out)
    assert "torch " in header[0] and "triton " in header[0] and "torchao " in header[0]
    assert header[0].split("; ")[-1].count("-") == 2  # the date
    got = {(r["contender"], r["phase"], r["batch"]) for r in rows}
    for c in ("bf16", "ours"):
        assert {(c, "decode", "1"), (c, "decode", "2"), (c, "prefill", "1")} <= got
    for r in rows:
        assert float(r["ms"]) > 0 and math.isclose(float(r["tokens_per_s"]), int(r["tokens"]) / float(r["ms"]) * 1e3, rel_tol=1e-3)
        assert float(r["host_ms"]) > 0  # issue time per call (on CPU the same work as the step)
        if r["contender"] == "ours":
            # two e4m3 layers: each GEMM operand within 1/28 of its block amax, ~28 dB per layer
            assert float(r["sqnr_db"]) > 20
    printed = capsys.readouterr().out.rstrip().splitlines()
    table_at = max(i for i, line in enumerate(printed) if line.startswith("| phase |"))
    assert printed[table_at + 2].startswith("| decode | 1 x 1 | bf16 |")
    assert (tmp_path / "model.md").read_text().count("| ours |") == 3


def test_prefill_mode_reaches_torch_compile_and_the_header(tmp_path, bench_model, monkeypatch):
    """--prefill-mode: the prefill phase compiles with that mode (decode keeps reduce-overhead), and
    the CSV header says so (CPU: torch.compile replaced by a recorder that returns the model)."""
    modes = []

    def record(fn, **kw):
        modes.append((getattr(fn, "__name__", type(fn).__name__), kw.get("mode")))
        return fn

    monkeypatch.setattr(bench_model.torch, "compile", record)
    out = tmp_path / "model.csv"
    assert bench_model.main(["--smoke", "--out", str(out), "--device", "cpu", "--compile", "on", "--no-torchao",
                             "--prefill-mode", "reduce-overhead"]) == 0
    header, rows = _rows(out)
    assert {(c, p) for c, p in ((r["contender"], r["phase"]) for r in rows)} >= {("ours", "prefill"), ("bf16", "prefill")}
    assert [m for name, m in modes if name != "decode"] == ["reduce-overhead", "reduce-overhead"]  # bf16, ours
    assert [m for name, m in modes if name == "decode"] == ["reduce-overhead"] * 4  # 2 contenders x 2 batches
    assert any(h.startswith("# prefill: 1 x ") and "mode=reduce-overhead (CUDA graphs)" in h for h in header)
    assert any(h.startswith("# decode: ") for h in header)


def test_header_describes_only_the_phases_run(tmp_path, bench_model):
    """A --phases prefill run's files carry no decode line (session 26's prefill-only run said
    "decode: batch [1, 16]" though it timed no decode)."""
    out = tmp_path / "model.csv"
    assert bench_model.main(["--smoke", "--out", str(out), "--device", "cpu", "--no-torchao", "--phases", "prefill",
                             "--iters", "5"]) == 0
    header, rows = _rows(out)
    assert {r["phase"] for r in rows} == {"prefill"}
    assert not any(h.startswith("# decode:") for h in header)
    assert any(h.startswith("# prefill: 1 x ") for h in header)
    assert any("of the mean of 1 calls (prefill)" in h for h in header)


def test_torchao_missing_is_a_note_not_a_failure(tmp_path, capsys, bench_model, monkeypatch):
    monkeypatch.setattr(bench_model, "torchao_config", lambda: (None, "torchao not importable (ImportError: test)"))
    out = tmp_path / "m.csv"
    assert bench_model.main(
        ["--smoke", "--out", str(out), "--device", "cpu", "--decode-batches", "1", "--iters", "1", "--profile"]
    ) == 0
    _, rows = _rows(out)
    assert {r["contender"] for r in rows} == {"bf16", "ours"}
    # --profile: one kernel table per contender and phase; ours runs our custom op
    profile = (tmp_path / "m.profile.txt").read_text()
    assert profile.count("\n## ") == 4 and "blockwise_fp8::linear" in profile
    assert "note: torchao skipped: torchao not importable (ImportError: test)" in capsys.readouterr().out


def test_inductor_settings_are_the_run_s_and_the_same_for_every_contender(tmp_path, bench_model):
    # torchao's quantize_ would switch on coordinate-descent tuning for the whole process (and so
    # for bf16 compiled after it); the benchmark tells it not to and sets --inductor itself,
    # only for the run.
    from torch._inductor import config

    cfg, _ = bench_model.torchao_config()
    assert cfg is not None and cfg.set_inductor_config is False
    before = config.coordinate_descent_tuning
    seen = []
    real_run = bench_model.run

    def spy(args):
        seen.append(config.coordinate_descent_tuning)
        return real_run(args)

    bench_model.run = spy
    try:
        for which, expect in (("tuned", True), ("default", before)):
            out = tmp_path / f"{which}.csv"
            assert bench_model.main(["--smoke", "--out", str(out), "--device", "cpu", "--phases", "decode",
                                     "--decode-batches", "1", "--no-torchao", "--inductor", which]) == 0
            header, _ = _rows(out)
            assert any(h.startswith("# inductor: " + ("coordinate-descent" if which == "tuned" else "default"))
                       for h in header)
            assert seen[-1] is expect and config.coordinate_descent_tuning == before
    finally:
        bench_model.run = real_run


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_ab_gemv_formula_is_the_reference_linear(dtype):
    # benchmarks/ab_gemv.py's batch-1 linear in plain torch ops must compute what ours computes
    # (the reference: float64 products of the quantized operands), or its timings compare apples
    # with pears.
    ab_gemv = _load("ab_gemv")
    from blockwise_fp8 import quantize_weight, reference

    torch.manual_seed(0)
    N, K = 256, 384
    w_q, w_s = quantize_weight(torch.randn(N, K, dtype=torch.bfloat16), dtype)
    x, bias = torch.randn(1, 1, K, dtype=torch.bfloat16), torch.randn(N, dtype=torch.bfloat16)
    got = ab_gemv.gemv_linear(x, w_q, w_s, bias, dtype)
    want = reference.linear(x.reshape(1, K), w_q, w_s, bias, activation_dtype=dtype, out_dtype=torch.bfloat16)
    assert got.shape == (1, 1, N)
    torch.testing.assert_close(got.reshape(1, N), want, rtol=2**-8, atol=1e-3)


def test_inductor_pdl_and_freezing_are_on_for_the_run_only(tmp_path, bench_model):
    from torch._inductor import config

    if not hasattr(config.triton, "enable_pdl"):
        with pytest.raises(SystemExit):
            bench_model.main(["--smoke", "--out", str(tmp_path / "x.csv"), "--device", "cpu", "--inductor-pdl"])
        return
    before = (config.triton.enable_pdl, config.freezing)
    seen = []
    real_run = bench_model.run

    def spy(args):
        seen.append((config.triton.enable_pdl, config.freezing))
        return real_run(args)

    bench_model.run = spy
    try:
        out = tmp_path / "pdl.csv"
        assert bench_model.main(["--smoke", "--out", str(out), "--device", "cpu", "--phases", "decode",
                                 "--decode-batches", "1", "--no-torchao", "--inductor-pdl", "--freezing"]) == 0
        header, _ = _rows(out)
        line = [h for h in header if h.startswith("# inductor: ")]
        assert len(line) == 1 and "triton.enable_pdl" in line[0] and "freezing" in line[0]
        assert seen == [(True, True)] and (config.triton.enable_pdl, config.freezing) == before
    finally:
        bench_model.run = real_run


def test_profile_decode_cuts_steps_at_the_host_gaps_and_names_kernels():
    prof = _load("profile_decode")
    # three steps of four kernels, 0.1-0.5 us apart inside a step, 80-120 us between steps;
    # one kernel overlaps the next (PDL), so a gap counts from the latest end so far
    steps, kernels, t = 3, [], 0.0
    for s in range(steps):
        for i, (dur, gap) in enumerate(((2.0, 0.0), (10.0, 0.3), (1.0, -4.0), (5.0, 0.5))):
            t += gap
            kernels.append((f"k{i}", t, dur))
            t += dur
        t += 80.0 + 20 * s
    chunks = prof.split_steps(kernels, steps)
    assert [len(c) for c in chunks] == [4, 4, 4]
    assert [c[0][1] for c in chunks] == [kernels[0][1], kernels[4][1], kernels[8][1]]
    assert prof.split_steps(kernels, 1) == [kernels] and prof.split_steps([], 3) == []
    assert prof.category("gemm_gemv_kernel") == "ours: gemm"
    assert prof.category("quantize_kernel") == "ours: quant"
    # Inductor names its kernels after the nodes they fuse, ours among them
    assert prof.category("triton_red_fused__fused_rms_norm_add_quantize_input_view_8") == "inductor triton"
    assert prof.category("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16") == "attention"
    assert prof.category("nvjet_tst_128x64_64x8_1x2_h_bz_TNT") == "cublas"
    assert prof.category("Memcpy DtoD (Device -> Device)") == "other"


def test_tune_skinny_cold_is_refused_with_the_fused_comparison():
    tune = _load("tune_skinny")
    with pytest.raises(SystemExit) as e:
        tune.main(["--cold", "--fused"])
    assert e.value.code == 2


def test_tune_skinny_cold_copies_stream_the_set_bytes(monkeypatch):
    """--cold times each GEMM over distinct weight copies: COLD_BYTES of FP8 (2 x of bf16) per call."""
    tune = _load("tune_skinny")
    monkeypatch.setattr(tune, "COLD_BYTES", 100)
    w = torch.randn(4, 5, dtype=torch.bfloat16)
    wq, ws = w.to(torch.float8_e4m3fn), torch.ones(1, 1)
    wqs, w16s = tune.weight_copies(w, wq, ws, cold=True)
    assert (len(wqs), len(w16s)) == (5, 3)  # 100 / 20 FP8 bytes, 100 / 40 bf16 bytes, rounded up
    assert len({q.data_ptr() for q, _ in wqs}) == 5 and len({v.data_ptr() for v in w16s}) == 3
    assert all(torch.equal(q.view(torch.uint8), wq.view(torch.uint8)) for q, _ in wqs)
    (only,), (only16,) = tune.weight_copies(w, wq, ws, cold=False)
    assert only[0] is wq and only[1] is ws and only16 is w


def test_ab_auto_mid_off_turns_the_skinny_mid_range_off_for_one_call():
    """ab_auto --mid-off: the wrapped call plans M = 33-64 on the tma tiles; the tunable comes back
    afterwards, also when the call raises."""
    ab = _load("ab_auto")
    from blockwise_fp8.kernels import gemm as G

    before = G.SKINNY_MID_MAX_M
    assert ab.mid_off(lambda: G.plan(48, 4096, 4096, tma=True).kind) == "tma"
    assert G.SKINNY_MID_MAX_M == before and G.plan(48, 4096, 4096, tma=True).kind == "skinny"
    with pytest.raises(ZeroDivisionError):
        ab.mid_off(lambda: 1 / 0)
    assert G.SKINNY_MID_MAX_M == before


@pytest.mark.parametrize("n,programs,block", [(10_000, 3, 1024), (4096, 4, 1024), (100, 2, 1024), (9000, 1, 2048)])
def test_read_ceiling_kernel_reads_every_word_once(kernel_device, n, programs, block):
    """read_ceiling.py's read kernel: its per-program sums add up to the sum of all the words, so
    every timed byte was read (and none twice); ragged ends and idle programs included."""
    read = _load("read_ceiling")
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g).to(kernel_device)
    out = torch.zeros(programs, dtype=torch.int32, device=kernel_device)
    read.read_kernel[(programs,)](x, out, n, programs, BLOCK=block)
    assert int(out.sum()) == int(x.sum())


def test_ab_prefill_smoke_alternates_both_contenders(capsys):
    """benchmarks/ab_prefill.py on the tiny stack (CPU): each round times bf16 and ours, and the
    summary's ratio is the per-round step times' ratio."""
    ab = _load("ab_prefill")
    ab.main(["--smoke", "--rounds", "2"])
    out = capsys.readouterr().out.splitlines()
    per_round = [line.split() for line in out if line[:5].strip().isdigit()]
    assert [(r[0], r[1]) for r in per_round] == [("0", "bf16"), ("0", "ours"), ("1", "bf16"), ("1", "ours")]
    ratios = [float(b[2]) / float(o[2]) for b, o in zip(per_round[::2], per_round[1::2])]
    summary = next(line for line in out if line.startswith("ours x bf16 per round:"))
    printed = [float(q) for q in summary.split(": ")[1].split(";")[0].split(", ")]
    assert len(printed) == 2 and all(abs(p - q) <= 0.006 for p, q in zip(printed, ratios))  # from rounded times


def test_ab_ws_cluster_candidates_are_one_cta_and_pair_plans_the_launcher_accepts(monkeypatch):
    """benchmarks/ab_ws_cluster.py times each tile height on one CTA and on 2-CTA pairs: plans the
    ws launcher runs (no split tail, scales from memory); without multicast TMA it stops at once
    and says how to get it."""
    from blockwise_fp8.kernels import gemm_hopper

    ab = _load("ab_ws_cluster")
    got = ab.cluster_candidates(192, (4, 5))
    assert list(got) == ["ws192_s4", "ws192pair_s4", "ws192_s5", "ws192pair_s5"]
    for name, p in got.items():
        assert (p.kind, p.block_m, p.tail_split, p.scales_tma) == ("ws", 192, 1, False)
        assert p.cluster == (2 if "pair" in name else 1)
    assert {p.num_stages for p in got.values()} == {4, 5}
    assert all(p.block_m == 128 for p in ab.cluster_candidates(128).values())
    monkeypatch.setattr(gemm_hopper, "MULTICAST", False)
    monkeypatch.setattr("sys.argv", ["ab_ws_cluster.py", "/dev/null"])
    with pytest.raises(SystemExit, match="no multicast TMA: source benchmarks/use_slim_triton.sh"):
        ab.main()


def test_ab_gemv_layout_times_both_slab_orders_of_the_library_gemv(monkeypatch):
    """benchmarks/ab_gemv_layout.py: each contender is the library's M = 1 gemv plan, with the
    slab in one order and its own or another count of K blocks per step (one contender per
    distinct count), right against the float64 product, the module's setting put back after each
    call; without a GPU it stops and says so."""
    from blockwise_fp8.kernels import gemm as G

    from .conftest import KERNEL_DEVICE

    ab = _load("ab_gemv_layout")
    aq, as_, wq, ws = _quantized_operands(1, 130, 300, torch.float8_e5m2, seed=5)
    assert G.plan(1, 130, 300, tma=False).kind == "gemv"
    seen = []
    real_gemm, default, unmasked = G.gemm, G.GEMV_K_BLOCKS_OUTER, G.GEMV_UNMASKED
    monkeypatch.setattr(G, "gemm", lambda *a, **k: (seen.append((G.GEMV_K_BLOCKS_OUTER, k["plan_override"])),
                                                    real_gemm(*a, **k))[1])
    orders = ab.contenders(aq, as_, wq, ws, ("plan", "2", str(G.plan(1, 130, 300, tma=False).groups_k)))
    own = G.plan(1, 130, 300, tma=False).groups_k
    assert list(orders) == [f"rows_outer_gk{own}", f"k_blocks_outer_gk{own}", "rows_outer_gk2", "k_blocks_outer_gk2"]
    capped = ab.contenders(aq, as_, wq, ws, ("plan",), (None, 128))
    assert list(capped) == [f"rows_outer_gk{own}", f"k_blocks_outer_gk{own}",
                            f"rows_outer_gk{own}_maxnreg128", f"k_blocks_outer_gk{own}_maxnreg128"]
    both = ab.contenders(aq, as_, wq, ws, ("plan",), (None,), (False, True))
    assert list(both)[2:] == [f"rows_outer_gk{own}_unmasked", f"k_blocks_outer_gk{own}_unmasked"]
    caps = []
    monkeypatch.setattr(G, "gemm", lambda *a, **k: (caps.append((G.GEMV_MAXNREG, G.GEMV_UNMASKED)), real_gemm(*a, **k))[1])
    capped[f"k_blocks_outer_gk{own}_maxnreg128"]()
    both[f"rows_outer_gk{own}_unmasked"]()
    assert caps == [(128, False), (None, True)] and G.GEMV_MAXNREG is None and G.GEMV_UNMASKED is unmasked
    monkeypatch.setattr(G, "gemm", lambda *a, **k: (seen.append((G.GEMV_K_BLOCKS_OUTER, k["plan_override"])),
                                                    real_gemm(*a, **k))[1])
    for fn in orders.values():
        assert ab.relative_error(fn(), aq, as_, wq, ws) < 2.0 ** -7  # bf16 output
        assert G.GEMV_K_BLOCKS_OUTER is default
    assert [outer for outer, _ in seen] == [False, True, False, True]
    assert [p.groups_k for _, p in seen] == [own, own, 2, 2] and {p.kind for _, p in seen} == {"gemv"}
    if KERNEL_DEVICE == "cpu":
        with pytest.raises(SystemExit, match="ab_gemv_layout times a GPU: no CUDA device here"):
            ab.main(["/dev/null"])


def _quantized_operands(M: int, N: int, K: int, dtype: torch.dtype, seed: int) -> tuple:
    """(activation, its 1 x 128 scales, weight, its 128 x 128 scales) of seeded normal values,
    quantized by the reference, on the device the kernels run on in this suite."""
    from blockwise_fp8 import reference

    from .conftest import KERNEL_DEVICE

    g = torch.Generator().manual_seed(seed)
    aq, as_ = reference.quantize(torch.randn(M, K, generator=g), (1, 128), dtype)
    wq, ws = reference.quantize(torch.randn(N, K, generator=g), (128, 128), dtype)
    return tuple(t.to(KERNEL_DEVICE) for t in (aq, as_, wq, ws))


def test_compile_cost_rebuilds_each_launch_argument_as_recorded():
    """benchmarks/compile_cost.py writes each launch argument down and rebuilds it in another
    process for an sm_90 compile: a tensor comes back with its dtype, shape, strides and 16-byte
    alignment (what Triton specializes on), numbers and dtypes as they were."""
    cc = _load("compile_cost")
    base = torch.zeros(64, dtype=torch.float8_e5m2)
    for t in (torch.zeros(3, 5, dtype=torch.float32).t(), base[1:41].view(5, 8)[:, :6], torch.zeros(0, 4)):
        desc = json.loads(json.dumps(cc._describe(t)))
        back = cc._rebuild(desc)
        assert (back.dtype, back.shape, back.stride()) == (t.dtype, t.shape, t.stride())
        assert (back.data_ptr() % 16 == 0) == (t.data_ptr() % 16 == 0)
    assert cc._describe(base[1:]).get("aligned") is False
    for v in (7, 2.5, True, None):
        assert cc._rebuild(json.loads(json.dumps(cc._describe(v)))) == v
    assert cc._rebuild(cc._describe(torch.bfloat16)) is torch.bfloat16
    assert "unsupported" in cc._describe(object())


def test_ab_cell_line_reports_time_weight_bandwidth_and_error():
    """The weight-streaming A/Bs' line per cell: us, the weight's GB/s (bf16's weight two bytes an
    element, ours one) and our outputs' relative error."""
    ab = _load("ab_gemv_layout")
    line = ab.cell_line("e5m2 1000x500", 1000, 500, {"bf16": 2.0, "ours": 0.25}, {"ours": 1.5e-3})
    assert line == "e5m2 1000x500: bf16 2.0 (500)  ours 0.2 (2000) [1.5e-03]"


def test_ab_skinny_tma_times_the_ways_of_loading_the_skinny_kernel(monkeypatch):
    """benchmarks/ab_skinny_tma.py: its contenders, the library's own skinny plan with its tiles by
    pointer or by descriptor (made in the kernel, or on the host where a graph is captured) and its
    scales a step ahead or at use, each right against the float64 product, the module's settings
    put back after each call; at M = 1 the sides run the plan they are given (the M = 2 skinny
    plan, beside the gemv); an unknown side is refused; without a GPU it stops and says so."""
    from blockwise_fp8 import reference
    from blockwise_fp8.kernels import gemm as G

    from .conftest import KERNEL_DEVICE

    ab = _load("ab_skinny_tma")
    aq, as_, wq, ws = _quantized_operands(5, 130, 384, torch.float8_e4m3fn, seed=6)
    assert G.plan(5, 130, 384, tma=False).kind == "skinny"
    seen = []
    settings = lambda: (G.SKINNY_TMA, G.SKINNY_TMA_CAPTURED, G.SKINNY_SCALES_AHEAD)  # noqa: E731
    real_gemm, default = G.gemm, settings()
    monkeypatch.setattr(G, "gemm", lambda *a, **k: (seen.append(settings() + (k.get("plan_override"),)),
                                                    real_gemm(*a, **k))[1])
    sides = ("pointer", "pointer_at_use", "tma", "tma_at_use", "tma_host", "tma_host_at_use")
    fns = ab.contenders(aq, as_, wq, ws, sides)
    assert tuple(fns) == sides
    outs = {}
    for name, fn in fns.items():
        outs[name] = fn()
        assert settings() == default
    assert seen == [(None, None, True, None), (None, None, False, None), (1, None, True, None), (1, None, False, None),
                    (None, 1, True, None), (None, 1, False, None)]
    with pytest.raises(SystemExit, match="--sides: expected .* got 'tma_device'"):
        ab.contenders(aq, as_, wq, ws, ("tma_device",))
    w64 = reference.dequantize(wq, ws, (128, 128), torch.float64)
    errors = ab.relative_errors(outs, aq, as_, w64)
    assert set(errors) == set(fns) and all(0 < e < 2.0 ** -7 for e in errors.values())  # bf16 output
    seen.clear()
    aq1, as1, _, _ = _quantized_operands(1, 130, 384, torch.float8_e4m3fn, seed=7)
    p2 = G.plan(2, 130, 384, tma=False)
    assert G.plan(1, 130, 384, tma=False).kind == "gemv" and p2.kind == "skinny"
    one = ab.contenders(aq1, as1, wq, ws, ("tma_host",), p2)["tma_host"]()
    assert seen == [(None, 1, True, p2)]
    errors = ab.relative_errors({"tma_host": one}, aq1, as1, w64)
    assert 0 < errors["tma_host"] < 2.0 ** -7
    if KERNEL_DEVICE == "cpu":
        with pytest.raises(SystemExit, match="ab_skinny_tma times a GPU: no CUDA device here"):
            ab.main(["/dev/null"])


def test_results_log_heads_the_file_with_card_versions_and_method_and_keeps_each_line(tmp_path, monkeypatch, capsys):
    """bench_gemm.results_log, the A/B scripts' output: the first line names the card, torch,
    Triton and the method; each said line is printed and already in the file (a run stopped by
    the device call's limit keeps what it measured)."""
    import triton

    bench = _load("bench_gemm")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    path = tmp_path / "ab.txt"
    say = bench.results_log(str(path), "self-heat 0.5 s")
    say("e5m2 8192x8192: plan 1.0")
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# Some GPU torch {torch.__version__} triton {triton.__version__} ")
    assert lines[0].endswith("; self-heat 0.5 s") and lines[1] == "e5m2 8192x8192: plan 1.0"
    assert capsys.readouterr().out.splitlines()[-1] == "e5m2 8192x8192: plan 1.0"


def test_sass_of_launch_compiles_the_librarys_gemv_launch_for_sm90(tmp_path):
    """benchmarks/sass_of_launch.py, without a GPU: the M = 1 call's one kernel (the gemv) compiled
    for sm_90 in either slab order, its TTGIR/PTX/SASS written, a summary line with its registers,
    its 16-byte weight loads and no spills; a --set of no tunable is refused by name. And the
    library's default order (``GEMV_K_BLOCKS_OUTER``, chosen by Triton version) gives the installed
    Triton the wanted layout: fewer shuffles and its weight loads closer together than the other
    order (25 against 56 shuffles under Triton 3.6 and 3.9, session 29), so a Triton that flips its
    choice again fails here rather than only in a timing. Compiled with TRITON_DEFAULT_FP_FUSION=0
    (Triton 3.10's coming default): the tool compiles with the library's COMPILE_OPTIONS, which
    keep FMA contraction on, so the gemv keeps its FFMAs (none without them, session 29)."""
    import re
    import subprocess
    import sys

    import triton

    from blockwise_fp8.kernels import gemm as G

    tool = os.path.join(ROOT, "benchmarks", "sass_of_launch.py")
    bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bins, t)) for t in ("nvdisasm", "cuobjdump")):
        pytest.skip("this Triton ships no nvdisasm/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = ROOT
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    by_order = {}
    for k_blocks_outer in (False, True):
        out = tmp_path / f"out{int(k_blocks_outer)}"
        # K = 2048 takes the plan of the large weights (8 rows x 16 K blocks a step)
        run = subprocess.run([sys.executable, tool, str(out), "1", "256", "2048",
                              "--set", f"GEMV_K_BLOCKS_OUTER={int(k_blocks_outer)}"], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = [line for line in run.stdout.splitlines() if line.startswith("triton ")]
        assert len(lines) == 1 and " gemm_gemv_kernel: " in lines[0], run.stdout
        counts = by_order[k_blocks_outer] = {k: int(v) for k, v in (kv.split("=") for kv in lines[0].split(": ")[1].split())}
        assert counts["registers"] > 0 and counts["spills"] == 0 and counts["ffma"] > 0
        assert counts["ldg128"] >= 8  # 8 rows x 16 K blocks of FP8 in 16-byte loads per 128 threads
        for ext in ("ttgir", "ptx", "sass"):
            assert (out / f"gemm_gemv_kernel.{ext}").stat().st_size > 0
        assert re.search(r"order = \[2, [01], [01]\]", (out / "gemm_gemv_kernel.ttgir").read_text())
    default, other = by_order[G.GEMV_K_BLOCKS_OUTER], by_order[not G.GEMV_K_BLOCKS_OUTER]
    assert default["shfl"] < other["shfl"] and default["ldg128_span"] < other["ldg128_span"], by_order
    # GEMV_MAXNREG reaches the compiler: capped below what either order takes, the kernel fits it
    cap = (min(c["registers"] for c in by_order.values()) - 8) // 8 * 8
    run = subprocess.run([sys.executable, tool, str(tmp_path / "capped"), "1", "256", "2048", "--set", f"GEMV_MAXNREG={cap}"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    capped = [line for line in run.stdout.splitlines() if line.startswith("triton ")]
    registers = int(dict(kv.split("=") for kv in capped[0].split(": ")[1].split())["registers"])
    assert registers <= cap, (registers, cap, by_order)
    bad = subprocess.run([sys.executable, tool, str(tmp_path / "x"), "1", "256", "512", "--set", "NO_SUCH=1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--set NO_SUCH: blockwise_fp8.kernels.gemm has no such tunable" in bad.stderr


def test_first_call_times_each_call_and_the_table_names_first_and_slowest_later(tmp_path, monkeypatch):
    """benchmarks/first_call.py: every step's line holds one wall time per call (the weight's one,
    each M's CALLS), the linear it times is the library's (its output is the reference linear's),
    and the table shows the first call and the slowest later one, '-' where a step is missing."""
    fc = _load("first_call")
    lines, outs = [], []
    real = fc.linear_calls

    def spying(contender, dtype):
        quantize_weight, linear = real(contender, dtype)
        return quantize_weight, lambda x, weight: outs.append((x, weight, linear(x, weight))) or outs[-1][2]

    monkeypatch.setattr(fc, "linear_calls", spying)
    fc.run_sequence("ours_reference", 256, 384, [1, 3], torch.float8_e5m2, torch.device("cpu"), say=lines.append)
    steps = [json.loads(line) for line in lines]
    assert [s["step"] for s in steps] == ["weight", 1, 3]
    assert [len(s["seconds"]) for s in steps] == [1, fc.CALLS, fc.CALLS]
    assert all(t > 0 for s in steps for t in s["seconds"])
    from blockwise_fp8 import reference

    x, (wq, ws), y = outs[-1]
    assert x.shape == (3, 384) and y.shape == (3, 256)
    expect = reference.linear(x, wq, ws, activation_dtype=torch.float8_e5m2, out_dtype=torch.float64)
    torch.testing.assert_close(y.double(), expect, rtol=1e-2, atol=1e-2)

    results = {"a cold": [{"step": "weight", "seconds": [2.0]}, {"step": 1, "seconds": [1.5, 0.25, 0.5]}],
               "b cold": [{"step": "weight", "seconds": [0.5]}]}
    table = fc.table(results, [1])
    assert table[2] == "| weight quantization | 2.00 | 0.50 |"
    assert table[3] == "| M = 1 | 1.50 (0.5000) | - |"
    assert table[4] == "| sum of first calls | 3.5 | 0.5 |"
