"""The blockwise GEMM kernels against the float64 reference.

On CPU the kernels run through Triton's interpreter on tiny shapes; every plan kind ("gemv", "skinny",
"tiled", "tma") is forced through ``plan_override`` so each kernel's logic is covered, including
the descriptor-based kernel (the interpreter emulates tensor descriptors). What only the GPU run
covers: the real TMA copies, the persistent grid at full size, ``flatten``, the warp-specialised
Gluon kernel ("ws": the interpreter cannot run Gluon; on CPU it is only compiled for sm_90 and its
SASS checked) and the cuBLAS backend (``test_cublas_*``, skipped without an sm_90 CUDA device).
"""

from __future__ import annotations

import pytest
import torch

import blockwise_fp8 as bf
from blockwise_fp8 import ops, reference
from blockwise_fp8.kernels import gemm as G, gemm_hopper

from .conftest import KERNEL_DEVICE

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
ON_GPU = KERNEL_DEVICE == "cuda"

# (M, N, K): M in the skinny and large ranges, ragged N and K
SHAPES = [(1, 129, 128), (3, 200, 300), (40, 130, 300), (67, 129, 256)] if not ON_GPU else [
    (1, 129, 128), (3, 200, 300), (67, 129, 256), (16, 1000, 4096), (64, 256, 1152),
    (65, 384, 512), (300, 520, 1000), (1024, 1280, 2048), (2048, 2048, 1920),
]


def _operands(M, N, K, dtype, seed, device=KERNEL_DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g)
    aq, as_ = reference.quantize(x, (1, 128), dtype)
    wq, ws = reference.quantize(w, (128, 128), dtype)
    return [t.to(device) for t in (x, aq, as_, wq, ws, b)]


def _check(out, aq, as_, wq, ws, b, out_dtype, acc_rel=2.0**-12):
    a64 = reference.dequantize(aq.cpu(), as_.cpu(), (1, 128), torch.float64)
    w64 = reference.dequantize(wq.cpu(), ws.cpu(), (128, 128), torch.float64)
    ref = a64 @ w64.T
    if b is not None:
        ref = ref + b.cpu().double()
    got = out.cpu().double()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    # Bound per element: one rounding to out_dtype, plus the accumulation error of float32 --
    # and of Hopper's FP8 tensor cores, whose internal accumulation keeps fewer bits (about 14
    # below the leading one; the reason DeepSeek-V3 promotes every 128 elements of K) -- relative
    # to sum |a||w|, the magnitude the partial sums pass through.
    mag = a64.abs() @ w64.abs().T
    bound = torch.finfo(out_dtype).eps * ref.abs() + acc_rel * mag + 1e-30
    excess = ((got - ref).abs() - bound).max()
    assert excess <= 0, f"error exceeds bound by {excess:.3g}"


def _plans(M, K, ws=False):
    ps = [G.Plan("tiled", 16, 64, 4, 2), G.Plan("tiled", 64, 128, 4, 2)]
    if M <= 4:  # K blocks per step 1-4 against 1-3 blocks of K: ragged last steps and splits
        bm = 1 << (M - 1).bit_length()
        ps += [G.Plan("gemv", bm, bn, 4, 1, split_k=s, groups_k=g) for bn, g, s in ((16, 1, 1), (32, 2, 2), (8, 4, 1))]
    if M <= 64:
        bm = max(16, 1 << (M - 1).bit_length())
        ps += [G.Plan("skinny", bm, 64, 4, 2, split_k=s) for s in (1, 2, 3)]
        ps += [G.Plan("skinny", bm, 64, 4, 2, split_k=s, groups_k=2) for s in (1, 2)]  # K blocks in pairs
    if K % 16 == 0:
        ps += [G.Plan("tma", 64, 64, 4, 2, flatten=f) for f in (False, True)]
        ps += [G.Plan("tma", 64, 64, 4, 2, tail_split=3, num_programs=5)]
    if ws:
        ps += [G.Plan("ws", 128, 128, 4, st) for st in (2, 4)]
        ps += [G.Plan("ws", 192, 128, 4, 4), G.Plan("ws", 128, 128, 4, 2, tail_split=3, num_programs=2)]
        if gemm_hopper.MULTICAST:  # 2-CTA clusters: one pair per SM pair, and two pairs walking many tiles
            ps += [G.Plan("ws", 192, 128, 4, 4, cluster=2), G.Plan("ws", 192, 128, 4, 3, cluster=2, num_programs=2),
                   G.Plan("ws", 128, 128, 4, 4, cluster=2, num_programs=3)]
    return ps


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_every_plan_matches_reference(M, N, K, dtype):
    x, aq, as_, wq, ws, b = _operands(M, N, K, dtype, seed=M * 7 + N)
    for p in _plans(M, K, ws=G.ws_usable(aq, wq)):
        out = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p)
        _check(out, aq, as_, wq, ws, b, torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 40, 67])
def test_default_plan_out_dtypes_and_bias(M, out_dtype):
    x, aq, as_, wq, ws, b = _operands(M, 200, 300, torch.float8_e4m3fn, seed=M)
    if M == 40:  # the skinny kernel's M = 33-64 range
        assert G.plan(M, 200, 300, tma=G.tma_usable(aq, wq)).block_m == 64
    for bias in (None, b):
        out = bf.gemm(aq, as_, wq, ws, out_dtype=out_dtype, bias=bias, backend="triton")
        assert out.dtype == out_dtype
        _check(out, aq, as_, wq, ws, bias, out_dtype)


def test_m_major_scales_read_correctly():
    x, aq, as_, wq, ws, b = _operands(67, 129, 256, torch.float8_e4m3fn, seed=3)
    as_t = as_.t().contiguous().t()  # strides (1, M)
    for p in _plans(67, 256, ws=G.ws_usable(aq, wq)):
        a = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p)
        c = G.gemm(aq, as_t, wq, ws, b, torch.float32, plan_override=p)
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("M", [1, 3])
def test_fused_quant_is_bit_identical_to_two_step(M, dtype):
    """The gemv and skinny kernels' in-register quantization equals quant.quantize + the same plan."""
    from blockwise_fp8.kernels import quant

    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, 300, generator=g) * 3).to(torch.bfloat16).to(KERNEL_DEVICE)
    x[0, 5] = 0.0
    _, _, _, wq, ws, b = _operands(M, 200, 300, dtype, seed=1)
    plans = [G.Plan("skinny", 16, 64, 4, 2, split_k=split, groups_k=g) for split in (1, 2) for g in (1, 2)]
    plans += [G.Plan("gemv", 1 << (M - 1).bit_length(), 16, 4, 1, split_k=split, groups_k=2) for split in (1, 2)]
    for p in plans:
        aq, as_ = quant.quantize(x, 1, 128, dtype)
        two_step = G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=p)
        fused = G.linear_fused(x, wq, ws, b, torch.bfloat16, plan_override=p)
        assert torch.equal(two_step.view(torch.int16), fused.view(torch.int16))


@pytest.mark.parametrize("k_blocks_outer", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 129, 128), (3, 200, 1000), (4, 130, 2304)])
def test_gemv_slab_in_either_axis_order_matches_reference(monkeypatch, M, N, K, k_blocks_outer):
    """GEMV_K_BLOCKS_OUTER only reorders the gemv kernel's weight slab (which register layout
    Triton gives it): both orders match the reference, with ragged N and K, 1-4 rows, K blocks
    per step 1-8 against 1-18 blocks of K, split-K, members of one launch and the in-register
    quantization; and the in-register quantization still equals quantize-then-gemm."""
    from blockwise_fp8.kernels import quant

    monkeypatch.setattr(G, "GEMV_K_BLOCKS_OUTER", k_blocks_outer)
    x, aq, as_, wq, ws, b = _operands(M, N, K, torch.float8_e5m2, seed=M + N)
    bm = 1 << (M - 1).bit_length()
    # No slab larger than the planner's: 4 rows x 64 columns x 4 K blocks took 61 s to compile
    # for sm_90 under Triton 3.9 (a CPU core; 29 s more fused), and on the GPU a cold cache ran
    # this test past the suite's group limits (session 31); 16 columns take 4 s.
    for bn, groups_k, split in ((16, 1, 1), (32, 2, 2), (8, 8, 1), (16, 4, 3)):
        p = G.Plan("gemv", bm, bn, 4, 1, split_k=split, groups_k=groups_k)
        _check(G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p), aq, as_, wq, ws, b, torch.float32)
    x16 = x.to(torch.bfloat16)
    xq, xs = quant.quantize(x16, 1, 128, torch.float8_e5m2)
    fused = G.linear_fused(x16, wq, ws, b, torch.bfloat16, plan_override=p)
    assert torch.equal(fused.view(torch.int16), G.gemm(xq, xs, wq, ws, b, torch.bfloat16, plan_override=p).view(torch.int16))
    w2q, w2s = wq[:67], ws[:1]  # a second member of N = 67 in the same launch
    outs = G.gemm_group(aq, as_, [wq, w2q], [ws, w2s], [b, b[:67]], torch.float32)
    _check(outs[0], aq, as_, wq, ws, b, torch.float32)
    _check(outs[1], aq, as_, w2q, w2s, b[:67], torch.float32)


@pytest.mark.parametrize("programs,split,flatten", [(5, 3, False), (8, 2, True), (7, 4, False), (16, 2, True)])
def test_tma_tail_split_matches_reference_and_is_deterministic(programs, split, flatten):
    """The last, partial wave's tiles split over K among several programs and summed by the last
    to arrive: right, the same bits on every run, and the arrival counters left at zero. With
    more programs than tiles (16 for 12) every tile is split."""
    x, aq, as_, wq, ws, b = _operands(130, 200, 1024, torch.float8_e5m2, seed=programs)
    p = G.Plan("tma", 64, 64, 4, 2, flatten=flatten, tail_split=split, num_programs=programs)  # 12 tiles of 64 x 64
    assert 12 % programs, "the grid must leave a partial wave to split"
    launched = G._persistent_grid(p, 130, 200, 1024, 132, aq.device, counters_per_tile=1)
    assert launched[:3] == ((programs, 12 - 12 % programs, split) if programs < 12 else (min(programs, 12 * split), 0, split))
    first = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p)
    _check(first, aq, as_, wq, ws, b, torch.float32)
    assert torch.equal(first, G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p))
    assert int(G._arrival_counters(aq.device, 1).count_nonzero()) == 0


@pytest.mark.parametrize("M,N,K,split", [(80, 192, 4096, 4), (100, 200, 2176, 2), (65, 130, 1024, 1)])
def test_narrow_plan_matches_reference_and_is_deterministic(M, N, K, split):
    """``_narrow_plan`` as a card's table runs it (64 x 64 tma tiles, every tile split over K into
    4 or 2 programs where the SMs and K allow, else unsplit): right against the float64 reference,
    with ragged M, N and K and the bias, the same bits on every run, the counters left at zero."""
    x, aq, as_, wq, ws, b = _operands(M, N, K, torch.float8_e4m3fn, seed=M + K)
    p = G._narrow_plan(M, N, -(-K // 128), num_sms=132)
    assert (p.kind, p.block_m, p.block_n, p.tail_split) == ("tma", 64, 64, split)
    first = G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=p)
    _check(first, aq, as_, wq, ws, b, torch.bfloat16)
    assert torch.equal(first.view(torch.int16), G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=p).view(torch.int16))
    assert int(G._arrival_counters(aq.device, 1).count_nonzero()) == 0


@pytest.mark.parametrize("programs,split", [(4, 3), (7, 2), (6, 4), (40, 2)])
def test_ws_tail_split_matches_reference_and_is_deterministic(programs, split):
    """The ws kernel's split tail (GPU only): each consumer's 64 rows of a tail tile summed by
    the last of its splits to arrive; right, the same bits every run, counters left at zero."""
    x, aq, as_, wq, ws, b = _operands(300, 600, 1024, torch.float8_e4m3fn, seed=programs)
    if not G.ws_usable(aq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon")
    # 3 x 5 tiles, one row part-empty; 40 programs: all tiles split; 8 K blocks: with 3 splits
    # units of 3 and 2 (the odd last block after the consumers' pairs)
    p = G.Plan("ws", 128, 128, 4, 3, tail_split=split, num_programs=programs)
    tiles = 3 * 5
    assert tiles % programs, "the grid must leave a partial wave to split"
    first = G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=p)
    _check(first, aq, as_, wq, ws, b, torch.bfloat16)
    assert torch.equal(first, G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=p))
    whole = G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=G.Plan("ws", 128, 128, 4, 3))
    assert (first.float() - whole.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * whole.float().abs().max()
    assert int(G._arrival_counters(aq.device, 1).count_nonzero()) == 0


@pytest.mark.parametrize("M,K,split,programs", [
    (67, 1152, 1, 0), (300, 1152, 1, 0), (300, 128, 1, 0), (1000, 2048, 1, 0), (300, 1152, 3, 4), (1000, 2048, 2, 7),
])
def test_ws_scales_in_the_ring_give_the_bits_of_scales_from_memory(M, K, split, programs):
    """The ws kernel with its ring carrying the activation scales (M-major, rows padded to 4, as
    ``linear`` writes them for this kernel) against the same plan reading row-major scales from
    global memory (the plan's ``scales_tma`` does not apply to them; GPU only): the same bits,
    and right. Ragged M (the boxes' rows past M zero),
    an odd K block count (the pairs' odd last block), one K block, the split tail; 2 and 6
    stages."""
    x, aq, as_, wq, ws, b = _operands(M, 600, K, torch.float8_e5m2, seed=M + K)
    if not G.ws_usable(aq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon")
    padded = as_.new_zeros((as_.shape[1], -(-M // 4) * 4)).t()
    padded[:M] = as_
    in_ring = padded[:M]
    assert gemm_hopper.scales_ride_the_ring(in_ring, 2) and not gemm_hopper.scales_ride_the_ring(as_, 2)
    for stages in (2, 6):
        p = G.Plan("ws", 128, 128, 4, stages, tail_split=split, num_programs=programs, scales_tma=True)
        from_memory = G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=p)
        from_ring = G.gemm(aq, in_ring, wq, ws, b, torch.bfloat16, plan_override=p)
        assert torch.equal(from_memory, from_ring)
        _check(from_ring, aq, as_, wq, ws, b, torch.bfloat16)


def test_rows_view_reaches_only_rows_its_storage_holds():
    """``gemm_hopper.rows_view``: a [:M] view of a padded buffer gets its rows back up to the number
    asked (row-major and M-major), never past its storage or, M-major, into its next column; a
    tensor with no rows past its own is returned as it is."""
    buf = torch.arange(10 * 6, dtype=torch.float32).view(10, 6)
    v = gemm_hopper.rows_view(buf[:3], 8)
    assert v.shape == (8, 6) and v.stride() == (6, 1) and torch.equal(v, buf[:8])
    assert gemm_hopper.rows_view(buf[:3], 16).shape == (10, 6)  # all the storage holds
    assert gemm_hopper.rows_view(buf[2:5], 16).shape == (8, 6)  # from its offset
    assert gemm_hopper.rows_view(buf[:3, :4], 16).shape == (10, 4)
    assert gemm_hopper.rows_view(buf, 16) is buf and gemm_hopper.rows_view(buf[:3], 2).shape == (3, 6)
    m_major = torch.arange(4 * 12, dtype=torch.float32).view(4, 12).t()  # (12, 4), strides (1, 12)
    v = gemm_hopper.rows_view(m_major[:5], 8)
    assert v.shape == (8, 4) and v.stride() == (1, 12) and torch.equal(v, m_major[:8])
    assert gemm_hopper.rows_view(m_major[:5], 100).shape == (12, 4)  # not into the next column
    tight = torch.zeros(5, 4).t().contiguous().t()  # M-major without padding
    assert gemm_hopper.rows_view(tight, 8) is tight


def test_activation_rows_padded_where_the_large_m_kernels_read_them():
    """``linear``'s and ``quantize_activation``'s activation storage (kernel backend): rows padded
    with zeros to ``gemm.ACTIVATION_ROWS`` from ``ACTIVATION_ROWS_FROM_M`` on, the returned tensors
    of M rows; below, no padding."""
    assert G.activation_rows(G.ACTIVATION_ROWS_FROM_M - 1) == 1 and G.activation_rows(G.ACTIVATION_ROWS_FROM_M) == 128
    # M-major scales (the ws kernel's ring): a multiple of 4 at least
    assert G.activation_rows(3, True) == 4 and G.activation_rows(G.ACTIVATION_ROWS_FROM_M, True) == 128
    for M in (G.ACTIVATION_ROWS_FROM_M - 1, 67, 130):
        x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16).to(KERNEL_DEVICE)
        q, s = bf.quantize_activation(x, backend="triton")
        rows = G.activation_rows(M) * -(-M // G.activation_rows(M))
        assert q.shape == (M, 256) and s.shape == (M, 2)
        assert q.untyped_storage().nbytes() == rows * 256 and s.untyped_storage().nbytes() == rows * 2 * 4
        if rows > M:
            padded = gemm_hopper.rows_view(q, rows)
            assert padded.shape[0] == rows and not padded[M:].cpu().view(torch.uint8).any()
        q_ref, s_ref = reference.quantize(x.cpu(), (1, 128), torch.float8_e4m3fn)
        assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)


@pytest.mark.skipif(not ON_GPU, reason="the ws kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("plan", [G.Plan("ws", 128, 128, 4, 4), G.Plan("ws", 128, 128, 4, 3, tail_split=3, num_programs=4),
                                  G.Plan("ws", 128, 128, 4, 6, scales_tma=True), G.Plan("ws", 192, 128, 4, 4),
                                  G.Plan("ws", 192, 128, 4, 4, cluster=2)])
def test_ws_reads_rows_past_m_in_storage_without_storing_them(plan):
    """The ws kernel's boxes span the rows of the last tile where the activation's storage holds
    them (``rows_view``): with NaN in every byte past row M (data, and scales where the ring carries
    them), its output has the bits of the same call on tensors of exactly M rows, and is right;
    what the padded rows give is never stored, nor reaches a row below M."""
    M, N, K = 257, 600, 1152
    x, aq, as_, wq, ws, b = _operands(M, N, K, torch.float8_e4m3fn, seed=11)
    if not G.ws_usable(aq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon")
    if plan.cluster == 2 and not gemm_hopper.MULTICAST:
        pytest.skip("2-CTA clusters need Triton >= 3.9")
    rows = 384
    nan = torch.full((rows, K), 0x7F, dtype=torch.uint8, device="cuda").view(aq.dtype)  # NaN in e4m3
    nan[:M] = aq
    scales = torch.full((as_.shape[1], rows), float("nan"), device="cuda").t()  # M-major
    scales[:M] = as_
    view, s_view = nan[:M], scales[:M]
    assert gemm_hopper.rows_view(view, rows).shape[0] == rows and gemm_hopper.rows_view(s_view, rows).shape[0] == rows
    if plan.scales_tma:
        assert gemm_hopper.scales_ride_the_ring(s_view, 2)
    tight = G.gemm(aq.clone(), as_.contiguous(), wq, ws, b, torch.bfloat16, plan_override=plan)
    got = G.gemm(view, s_view if plan.scales_tma else as_, wq, ws, b, torch.bfloat16, plan_override=plan)
    assert got.shape == (M, N) and torch.equal(got, tight)
    _check(got, aq, as_, wq, ws, b, torch.bfloat16)


@pytest.mark.parametrize("M,held,rows,block_m,N,copied", [
    (257, 257, 384, 128, 4096, True),    # 127 rows past its storage
    (288, 288, 384, 128, 4096, True),    # 96 past: PAD_COPY_MIN_ROWS_PAST
    (289, 289, 384, 128, 4096, False),   # 95 past
    (200, 200, 256, 128, 8192, False),   # 56 past
    (257, 384, 384, 128, 4096, False),   # storage padded (ops'): a view, no copy
    (257, 280, 384, 128, 4096, True),    # storage padded short of the tile
    (257, 300, 384, 128, 4096, False),   # ... by fewer rows
    (641, 641, 768, 128, 4096, False),   # past PAD_COPY_MAX_M
    (257, 257, 384, 128, 4095, False),   # a weight under PAD_COPY_MIN_WEIGHT (N x 8192)
    (257, 257, 384, 192, 4096, False),   # 192-row tiles (64-row boxes): not measured, no copy
])
def test_ws_copies_only_tight_activations_whose_boxes_would_reach_far_past_them(M, held, rows, block_m, N, copied):
    """``gemm_hopper._rows_for_boxes``, the ws kernel's A tensor: a view of the rows its storage
    holds, or a copy with zero rows up to the last tile where PAD_COPY_MAX_M, PAD_COPY_MIN_ROWS_PAST
    and PAD_COPY_MIN_WEIGHT say so; the M rows unchanged either way."""
    K = 8192
    buf = torch.randint(-100, 100, (held, K), generator=torch.Generator().manual_seed(M), dtype=torch.int8)
    a = buf.view(torch.float8_e4m3fn)[:M]
    got = gemm_hopper._rows_for_boxes(a, rows, block_m, N)
    assert torch.equal(got[:M].view(torch.int8), a.view(torch.int8))
    if copied:
        assert got.shape == (rows, K) and got.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
        assert not got[M:].view(torch.int8).any()
    else:
        assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert got.shape == (min(held, rows), K)


@pytest.mark.skipif(not ON_GPU, reason="the ws kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("M", [130, 257])
def test_ws_gives_the_same_bits_whether_it_copies_a_tight_activation_or_not(M, monkeypatch):
    """A tight activation (storage of exactly M rows) that ``_rows_for_boxes`` copies into padded
    storage gives the bits of the same call without the copy, and is right."""
    N, K = 384, 1024
    x, aq, as_, wq, ws, b = _operands(M, N, K, torch.float8_e5m2, seed=M)
    if not G.ws_usable(aq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon")
    monkeypatch.setattr(gemm_hopper, "PAD_COPY_MIN_WEIGHT", N * K)  # (a small weight, to keep the test fast)
    plan = G.Plan("ws", 128, 128, 4, 4, tail_split=2)
    tight = aq.clone()
    assert gemm_hopper._rows_for_boxes(tight, 384, 128, N).shape[0] == 384  # this call copies
    copied = G.gemm(tight, as_, wq, ws, b, torch.bfloat16, plan_override=plan)
    monkeypatch.setattr(gemm_hopper, "PAD_COPY_MAX_M", 0)
    boxes_past = G.gemm(tight, as_, wq, ws, b, torch.bfloat16, plan_override=plan)
    assert torch.equal(copied, boxes_past)
    _check(copied, aq, as_, wq, ws, b, torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="the ws kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("M,N,K", [(257, 2048, 2048), (300, 2048, 2048), (130, 1024, 7168)])
def test_linear_at_ragged_m_quantizes_into_padded_rows(M, N, K):
    """At a ragged M above the weight-streaming range, ``linear`` (kernel backend, eager and
    through ``quantize_activation`` + ``gemm``) gives the bits of quantize + gemm on tensors of
    exactly M rows, right against the reference (M = 130, K = 7168: the ws kernel's tiles, every
    tile split over K)."""
    from blockwise_fp8.kernels import quant

    x, _, _, wq, ws, b = _operands(M, N, K, torch.float8_e5m2, seed=M)
    x = x.to(torch.bfloat16)
    aq, as_ = quant.quantize(x, 1, 128, torch.float8_e5m2)
    expected = G.gemm(aq, as_, wq, ws, b, torch.bfloat16)
    got = bf.linear(x, wq, ws, b, activation_dtype=torch.float8_e5m2, backend="triton")
    assert torch.equal(got, expected)
    q, s = bf.quantize_activation(x, torch.float8_e5m2, backend="triton")
    assert torch.equal(bf.gemm(q, s, wq, ws, bias=b, backend="triton"), expected)
    _check(got, aq, as_, wq, ws, b, torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="the ws kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("M,N,K", [(512, 8192, 8192), (2048, 8192, 8192), (512, 2048, 28672)])
def test_ws_ring_reuses_its_scale_stages_safely(M, N, K):
    """Stages refilled many times over a long K loop and several tiles per program, bf16 out: the
    shapes where, without a proxy fence between the consumers' scale reads and the stage's
    release, the producer's next TMA copy overtook the reads (wrong on 8 of 8 runs, H200); and
    K = 28672 (224 K blocks, where the H100's ring limits now put the scales in the ring). Every
    run must give the bits of the scales read from memory."""
    from blockwise_fp8.kernels import quant

    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    wq, ws = quant.quantize(w, 128, 128, torch.float8_e5m2)
    aq, as_ = quant.quantize(x, 1, 128, torch.float8_e5m2)
    _, in_ring = quant.quantize(x, 1, 128, torch.float8_e5m2, scale_m_major=True, rows_multiple_of=4)
    if not G.ws_usable(aq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon")
    assert gemm_hopper.scales_ride_the_ring(in_ring[:M], 2)
    p = G.Plan("ws", 128, 128, 4, 6, scales_tma=True)
    expected = G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p)
    for _ in range(4):
        assert torch.equal(G.gemm(aq, in_ring[:M], wq, ws, None, torch.bfloat16, plan_override=p), expected)


@pytest.mark.skipif(not ON_GPU, reason="the ws kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("M", [1001, 1024])
def test_linear_quantizes_for_the_ws_ring_where_its_plan_is_ws(monkeypatch, M):
    """Where the GEMM's plan is the ws kernel's 128-row tiles, ``linear`` writes M-major scales
    into rows padded to 4, and the kernel takes them through its ring (SCALES_TMA): the bits of
    quantize + gemm with row-major scales (which read them from memory)."""
    from blockwise_fp8.kernels import quant

    N, K = 1280, 2048
    x, _, _, wq, ws, b = _operands(M, N, K, torch.float8_e4m3fn, seed=M)
    if not G.ws_usable(wq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon")
    assert G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0), scales_in_ring=True,
                  card=G.card_plans(0)).scales_tma
    assert G.prefers_m_major_scales(M, N, K, wq)
    x = x.to(torch.bfloat16)
    aq, as_ = quant.quantize(x, 1, 128, torch.float8_e4m3fn)
    expected = G.gemm(aq, as_, wq, ws, b, torch.bfloat16)
    seen = []
    meta = gemm_hopper._ws_meta
    monkeypatch.setattr(gemm_hopper, "_ws_meta", lambda *args: seen.append(args[6]) or meta(*args))  # scales_tma
    got = bf.linear(x, wq, ws, b, backend="triton")
    assert seen == [True]
    assert torch.equal(got, expected)
    _check(got, aq, as_, wq, ws, b, torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="the ws kernel runs on an sm_90 GPU only")
@pytest.mark.parametrize("M,N,K,split,ring", [(96, 3072, 4096, 2, False), (100, 4096, 4096, 2, False),
                                              (128, 8448, 3200, 1, False), (96, 8192, 4480, 1, True)])
def test_linear_at_m_65_128_runs_the_ws_plan_of_its_card(monkeypatch, M, N, K, split, ring):
    """At M = 65-128, where the 128 x 128 tiles fill at most half the SMs, ``linear`` runs on an
    H100 ``_half_card_plan`` (tiles split over K within half the SMs), quantizing for the ws
    kernel's ring where each program runs more than 32 K blocks, and elsewhere ``_wide_plan``
    (CARD_PLANS): correct against the float64 reference, the scales taken through the ring or from
    memory as planned."""
    x, _, _, wq, ws, b = _operands(M, N, K, torch.float8_e5m2, seed=M)
    if not G.ws_usable(wq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon")
    sms, card = G._num_sms(0), G.card_plans(0)
    p = G.plan(M, N, K, tma=True, ws=True, num_sms=sms, scales_in_ring=True, card=card)
    assert (p.kind, p.block_m) == ("ws", 128)
    if card != G.CARD_PLANS["H100"]:
        assert p == G._wide_plan(M, N, -(-K // 128), ws=True, num_sms=sms, ws192_cost=G.WS192_COST,
                                 scales_in_ring=True, card=card)
    elif sms == 132:
        assert (p.tail_split, p.scales_tma) == (split, ring)
    assert G.prefers_m_major_scales(M, N, K, wq) == p.scales_tma
    seen = []
    meta = gemm_hopper._ws_meta
    monkeypatch.setattr(gemm_hopper, "_ws_meta", lambda *args: seen.append(args[6]) or meta(*args))  # scales_tma
    x = x.to(torch.bfloat16)
    got = bf.linear(x, wq, ws, b, activation_dtype=torch.float8_e5m2, backend="triton")
    assert seen == [p.scales_tma]
    from blockwise_fp8.kernels import quant

    aq, as_ = quant.quantize(x, 1, 128, torch.float8_e5m2)
    _check(got, aq, as_, wq, ws, b, torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="the plan's card reading and its kernels need a GPU")
@pytest.mark.parametrize("M,N,K,split", [(80, 1024, 4096, 4), (200, 1024, 4096, 0), (128, 2048, 2048, 2),
                                         (100, 1000, 2176, 2), (65, 512, 8192, 4)])
def test_linear_on_a_narrow_weight_runs_the_plan_of_its_card(monkeypatch, M, N, K, split):
    """At M = 65-256 on narrow weights, where the ws plan would run at most one program per 4 SMs,
    ``linear`` runs the tma kernel's 64 x 64 tiles split over K (``_narrow_plan``; ``split``: its
    pieces on the H200's table, 0: the ws plan stays) on cards whose ``CardPlans`` says so
    (measured on an H200; off on an H100): correct against the float64 reference, with ragged N
    and K, the bias, and the activation in ``linear``'s padded storage."""
    x, _, _, wq, ws, b = _operands(M, N, K, torch.float8_e5m2, seed=M + N)
    if not G.ws_usable(wq, wq):
        pytest.skip("the narrow plan replaces the ws kernel's plans: it needs an sm_90 GPU and Triton's Gluon")
    sms, card = G._num_sms(0), G.card_plans(0)
    p = G.plan(M, N, K, tma=True, ws=True, num_sms=sms, scales_in_ring=True, card=card)
    narrow = p.block_n == 64
    if card.narrow_sms_per_program == 0:
        assert not narrow
    elif sms == 132:  # the H200's table on its SM count: the cells it measured
        assert (p.kind, p.block_m, p.tail_split) == ("tma", 64, split) if split else not narrow
    assert not G.prefers_m_major_scales(M, N, K, wq) or not narrow
    seen = []
    meta = G._tma_meta
    monkeypatch.setattr(G, "_tma_meta", lambda *args: seen.append(args[0].block_n) or meta(*args))
    x = x.to(torch.bfloat16)
    got = bf.linear(x, wq, ws, b, activation_dtype=torch.float8_e5m2, backend="triton")
    if narrow:
        assert seen == [64]  # one launch, of the 64-column tiles
    from blockwise_fp8.kernels import quant

    aq, as_ = quant.quantize(x, 1, 128, torch.float8_e5m2)
    _check(got, aq, as_, wq, ws, b, torch.bfloat16)


@pytest.mark.parametrize("M,cluster,programmatic,under_pdl", [
    (80, 1, True, True), (256, 1, True, True), (257, 1, True, False), (1024, 1, True, False),
    (256, 2, True, False), (128, 1, False, False)])
def test_ws_launch_is_programmatic_up_to_ws_pdl_max_m(monkeypatch, M, cluster, programmatic, under_pdl):
    """The ws kernel launches under PDL (behind the activation quantization, which lets it launch
    at its start) at M <= gemm.WS_PDL_MAX_M on one CTA, where ``programmatic_launch`` allows PDL
    (not in the interpreter, nor with BLOCKWISE_FP8_PDL=0); larger M and 2-CTA clusters launch as
    before. The rule's logic, with the launch itself stubbed (the GPU suite runs the kernel)."""
    seen = []
    monkeypatch.setattr(G, "ws_usable", lambda a, w: True)
    monkeypatch.setattr(G, "programmatic_launch", lambda device: programmatic)
    monkeypatch.setattr(gemm_hopper, "gemm_ws", lambda *args, **kw: seen.append(kw["pdl"]) or args[5])
    _, aq, as_, wq, ws, _ = _operands(M, 512, 256, torch.float8_e5m2, seed=M)
    G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=G.Plan("ws", 128, 128, 4, 4, cluster=cluster))
    assert seen == [under_pdl]


def test_split_k_is_deterministic_and_leaves_counters_zero():
    """The last program of a tile adds the partials in split order: the same bits every call,
    equal to the float32 sum of the per-split products; the arrival counters end at zero."""
    x, aq, as_, wq, ws, b = _operands(5, 200, 1000, torch.float8_e4m3fn, seed=4)
    p = G.Plan("skinny", 16, 64, 4, 2, split_k=3)
    outs = [G.gemm(aq, as_, wq, ws, None, torch.float32, plan_override=p) for _ in range(4)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    # split k covers K blocks [3k, 3k + 3) (8 blocks in 3 splits): add the three products in order
    one = G.Plan("skinny", 16, 64, 4, 2, split_k=1)
    parts = [G.gemm(aq[:, k0:k1], as_[:, k0 // 128:-(-k1 // 128)], wq[:, k0:k1], ws[:, k0 // 128:-(-k1 // 128)],
                    None, torch.float32, plan_override=one) for k0, k1 in ((0, 384), (384, 768), (768, 1000))]
    assert torch.equal(outs[0], (parts[0] + parts[1]) + parts[2])
    assert not G._arrival_counters(aq.device, 4).any()


@pytest.mark.parametrize("K,split", [(1024, 2), (1000, 1), (640, 1), (2048, 2)])
def test_skinny_pairs_keep_the_bits_of_single_steps(K, split):
    """K blocks in pairs change how the skinny kernel loads, not what it adds: where every split's
    K range is whole pairs (or there is no split; an odd last block is added alone), the output
    is the one-block-per-step plan's, bit for bit. Three or more blocks per step are refused."""
    x, aq, as_, wq, ws, b = _operands(5, 200, K, torch.float8_e5m2, seed=K)
    one, pairs = (G.Plan("skinny", 16, 64, 4, 3, split_k=split, groups_k=g) for g in (1, 2))
    expected = G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=one)
    assert torch.equal(G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=pairs).view(torch.int16),
                       expected.view(torch.int16))
    with pytest.raises(ValueError, match="1 or 2 K blocks per step"):
        G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=G.Plan("skinny", 16, 64, 4, 3, groups_k=4))


def test_skinny_refuses_more_tokens_than_its_tile():
    """The skinny kernel computes one tile of block_m tokens: an override with fewer rows than M is
    refused, not run with the rows past the tile left unwritten (session 36 found such a probe
    side reading whatever the output's memory held)."""
    x, aq, as_, wq, ws, b = _operands(20, 64, 256, torch.float8_e4m3fn, seed=3)
    with pytest.raises(ValueError, match=r"M <= block_m; got M = 20"):
        G.gemm(aq, as_, wq, ws, b, torch.bfloat16, plan_override=G.Plan("skinny", 16, 64, 4, 3))
    with pytest.raises(ValueError, match=r"M <= block_m; got M = 20"):
        G.linear_fused(x.to(torch.bfloat16), wq, ws, b, torch.bfloat16, plan_override=G.Plan("skinny", 16, 64, 4, 3))
    out = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=G.Plan("skinny", 32, 64, 4, 3))
    _check(out, aq, as_, wq, ws, b, torch.float32)


@pytest.mark.parametrize("N,K,bn,groups_k,split", [(256, 1024, 8, 4, 2), (128, 2048, 16, 8, 1), (64, 512, 32, 2, 1)])
def test_gemv_unmasked_keeps_the_bits_of_masked_loads(monkeypatch, N, K, bn, groups_k, split):
    """GEMV_UNMASKED drops the gemv kernel's masks where every load is in range (one row, whole
    tiles, whole steps): bit for bit the masked kernel's output, right against the reference, also
    with split-K, group members, and the quantization in the kernel; where a load would be out of
    range (ragged N or K) the masked kernel serves the call."""
    monkeypatch.setattr(G, "GEMV_UNMASKED", False)
    x, aq, as_, wq, ws, b = _operands(1, N, K, torch.float8_e5m2, seed=N + K)
    p = G.Plan("gemv", 1, bn, 4, 1, split_k=split, groups_k=groups_k)
    w2q, w2s = (t.to(KERNEL_DEVICE) for t in reference.quantize(torch.randn(2 * bn, K), (128, 128), torch.float8_e5m2))
    b2 = torch.randn(2 * bn).to(KERNEL_DEVICE)  # both members biased: one grouped launch
    x16 = x.to(torch.bfloat16)
    expected = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p)
    expected_fused = G.linear_fused(x16, wq, ws, b, torch.bfloat16, plan_override=p)
    expected_group = G.gemm_group(aq, as_, [wq, w2q], [ws, w2s], [b, b2], torch.float32)
    seen = []
    real = G._streaming_meta
    monkeypatch.setattr(G, "_streaming_meta", lambda *a: (seen.append((a[-3], a[8])), real(*a))[1])  # (unmasked, members)
    monkeypatch.setattr(G, "GEMV_UNMASKED", True)
    assert torch.equal(G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p), expected)
    assert torch.equal(G.linear_fused(x16, wq, ws, b, torch.bfloat16, plan_override=p).view(torch.int16),
                       expected_fused.view(torch.int16))
    group = G.gemm_group(aq, as_, [wq, w2q], [ws, w2s], [b, b2], torch.float32)
    assert all(torch.equal(g, e) for g, e in zip(group, expected_group))
    own = G.plan(1, N, K, tma=False)
    assert seen == [(True, 1), (True, 1), (G._gemv_unmasked(own, 1, K, (N, 2 * bn)), 2)]
    _check(expected, aq, as_, wq, ws, b, torch.float32)
    seen.clear()  # ragged N, then ragged K: the masked kernel
    ragged = G.gemm(aq, as_, wq[: N - 1], ws, b[: N - 1], torch.float32, plan_override=p)
    assert seen == [(False, 1)] and torch.equal(ragged, expected[:, : N - 1])
    x2, aq2, as2, wq2, ws2, b2 = _operands(1, N, K - 3, torch.float8_e5m2, seed=N)
    seen.clear()
    _check(G.gemm(aq2, as2, wq2, ws2, b2, torch.float32, plan_override=p), aq2, as2, wq2, ws2, b2, torch.float32)
    assert seen == [(False, 1)]


@pytest.mark.parametrize("M,N,K,split,groups_k", [(1, 200, 1024, 2, 2), (5, 130, 640, 1, 2), (16, 64, 1000 + 8, 1, 1),
                                                   (33, 129, 2048, 3, 2)])
@pytest.mark.parametrize("host", [False, True], ids=["kernel_descriptors", "host_descriptors"])
def test_skinny_tma_loads_keep_the_bits_of_pointer_loads(monkeypatch, M, N, K, split, groups_k, host):
    """SKINNY_TMA changes how the skinny kernel's tiles reach shared memory (tensor descriptors made
    in the kernel, zeros past N, M and K), and so does SKINNY_TMA_CAPTURED while a CUDA graph is
    captured (descriptors made on the host; a capture is stood in for here), not what it adds: bit
    for bit the pointer path's output, and right against the reference, with ragged N, M and K,
    split-K, single and paired K steps and three group members in one launch (ragged weights, each
    member its own descriptor). Where TMA cannot load an operand (a row stride or base address not a multiple of
    16 bytes) the pointer path serves the call."""
    monkeypatch.setattr(G, "SKINNY_TMA", None)
    monkeypatch.setattr(G, "SKINNY_TMA_CAPTURED", None)
    x, aq, as_, wq, ws, b = _operands(M, N, K, torch.float8_e4m3fn, seed=M + N + K)
    p = G.Plan("skinny", max(16, 1 << (M - 1).bit_length()), 64, 4, 3, split_k=split, groups_k=groups_k)
    w2q, w2s = (t.to(KERNEL_DEVICE) for t in reference.quantize(torch.randn(70, K), (128, 128), torch.float8_e4m3fn))
    w3q, w3s = (t.to(KERNEL_DEVICE) for t in reference.quantize(torch.randn(40, K), (128, 128), torch.float8_e4m3fn))
    b2, b3 = torch.randn(70).to(KERNEL_DEVICE), torch.randn(40).to(KERNEL_DEVICE)  # all members biased: one launch
    group = ([wq, w2q, w3q], [ws, w2s, w3s], [b, b2, b3])
    expected = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p)
    expected_group = G.gemm_group(aq, as_, *group, torch.float32)  # the planner's plan
    seen, members = [], []
    real = G._streaming_meta
    monkeypatch.setattr(G, "_streaming_meta",
                        lambda *a: (seen.append(a[-2:]), members.append(a[8]), real(*a))[2])  # (tma, host_tma)
    if host:
        monkeypatch.setattr(G, "SKINNY_TMA_CAPTURED", 1)  # every block_m
        monkeypatch.setattr(G, "_capturing", lambda a: True)
    else:
        monkeypatch.setattr(G, "SKINNY_TMA", 1)
    got = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p)
    got_group = G.gemm_group(aq, as_, *group, torch.float32)
    group_skinny = G.plan(M, N, K, tma=False).kind == "skinny"  # else the gemv, which has no descriptors
    assert seen == [(True, host), (group_skinny, host and group_skinny)] and members == [1, 3]
    assert torch.equal(got, expected)
    for g, e in zip(got_group, expected_group):
        assert torch.equal(g, e)
    _check(got, aq, as_, wq, ws, b, torch.float32)
    # an activation whose rows are 8 bytes apart past K: no descriptor, the pointer path, same bits
    wide = torch.zeros(M, K + 8, dtype=aq.dtype, device=aq.device)
    wide[:, :K] = aq
    seen.clear()
    assert torch.equal(G.gemm(wide[:, :K], as_, wq, ws, b, torch.float32, plan_override=p), expected)
    assert seen == [(False, False)]


def test_skinny_first_eager_call_loads_the_kernel_a_capture_replays(monkeypatch):
    """A capture can only replay kernels an eager call has loaded, so the first eager call of a
    skinny launch that SKINNY_TMA_CAPTURED covers runs the host-descriptor kernel a capture of it
    will replay; later eager calls of it run the eager kind (here the pointer path), a new M or
    weight is a new launch; same bits throughout."""
    monkeypatch.setattr(G, "SKINNY_TMA", None)
    monkeypatch.setattr(G, "SKINNY_TMA_CAPTURED", 16)
    monkeypatch.setattr(G, "_HOST_DESCRIPTORS_LOADED", set())
    seen = []
    real = G._streaming_meta
    monkeypatch.setattr(G, "_streaming_meta", lambda *a: (seen.append(a[-2:]), real(*a))[1])  # (tma, host_tma)
    x, aq, as_, wq, ws, b = _operands(5, 130, 640, torch.float8_e5m2, seed=3)
    p = G.Plan("skinny", 16, 64, 4, 3, split_k=2, groups_k=2)
    outs = [G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p) for _ in range(2)]
    assert seen == [(True, True), (False, False)] and torch.equal(outs[0], outs[1])
    _check(outs[0], aq, as_, wq, ws, b, torch.float32)
    seen.clear()
    G.gemm(aq[:3], as_[:3], wq, ws, b, torch.float32, plan_override=p)
    G.gemm(aq, as_, wq[:129], ws, b[:129], torch.float32, plan_override=p)
    assert seen == [(True, True), (True, True)]
    seen.clear()  # a plan under SKINNY_TMA_CAPTURED's block_m: the eager kind at once
    G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=G.Plan("skinny", 8, 64, 4, 3))
    assert seen == [(False, False)]


@pytest.mark.skipif(not ON_GPU, reason="captures a CUDA graph")
@pytest.mark.parametrize("M", [2, 16, 40])
def test_skinny_host_descriptors_in_a_captured_graph(monkeypatch, M):
    """While a CUDA graph is captured, skinny launches from SKINNY_TMA_CAPTURED's block_m load their
    tiles by host-made descriptors (one per group member): replayed on new inputs, the outputs
    equal eager pointer-path launches bit for bit."""
    monkeypatch.setattr(G, "SKINNY_TMA_CAPTURED", 16)
    g = torch.Generator().manual_seed(M)
    ws_ = [bf.ops.quantize_weight((torch.randn(n, 1024, generator=g) * 0.05).to("cuda", torch.bfloat16))
           for n in (1024, 200, 264)]
    x = torch.randn(M, 1024, generator=g).to("cuda", torch.bfloat16)
    a_q, a_s = bf.ops.quantize_activation(x)
    static_q, static_s = a_q.clone(), a_s.clone()

    def calls(q, s):
        return [G.gemm(q, s, *ws_[0], None, torch.bfloat16),
                *G.gemm_group(q, s, [w for w, _ in ws_], [t for _, t in ws_], [None] * 3, torch.bfloat16)]

    assert G.plan(M, 1024, 1024, tma=False).kind == "skinny"
    calls(static_q, static_s)  # loads the kernels the capture replays
    torch.cuda.synchronize()
    seen = []
    real = G._streaming_meta
    monkeypatch.setattr(G, "_streaming_meta", lambda *a: (seen.append(a[-2:]), real(*a))[1])  # (tma, host_tma)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = calls(static_q, static_s)
    assert seen == [(True, True)] * 2
    a_q2, a_s2 = bf.ops.quantize_activation(x * 2)
    static_q.copy_(a_q2)
    static_s.copy_(a_s2)
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(G, "SKINNY_TMA", None)
    monkeypatch.setattr(G, "SKINNY_TMA_CAPTURED", None)
    for got, want in zip(static_out, calls(a_q2, a_s2)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA streams")
def test_split_k_on_concurrent_streams():
    """Each stream has its own arrival counters: split-K GEMMs racing on two streams stay exact."""
    x, aq, as_, wq, ws, b = _operands(4, 1024, 2048, torch.float8_e4m3fn, seed=5)
    assert G.plan(4, 1024, 2048, tma=True).split_k > 1
    expect = G.gemm(aq, as_, wq, ws, None, torch.float32)
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [[], []]
    torch.cuda.synchronize()
    for _ in range(20):
        for stream, out in zip(streams, outs):
            with torch.cuda.stream(stream):
                out.append(G.gemm(aq, as_, wq, ws, None, torch.float32))
    torch.cuda.synchronize()
    assert all(torch.equal(o, expect) for out in outs for o in out)



@pytest.mark.skipif(not ON_GPU, reason="programmatic dependent launch needs a CUDA device")
def test_programmatic_launch_chain_matches_plain_launch(monkeypatch):
    """With PDL the decode GEMM starts before the quantization it reads has finished and waits in
    the kernel: a chain of Linears (each reading the last one's output), eager and replayed from
    a CUDA graph, must equal the same chain launched plainly, bit for bit."""
    from blockwise_fp8.kernels import quant

    g = torch.Generator().manual_seed(11)
    ws_ = [bf.ops.quantize_weight((torch.randn(n, k, generator=g) * 0.05).to("cuda", torch.bfloat16))
           for n, k in ((1024, 4096), (4096, 1024), (4096, 4096))]
    x = torch.randn(1, 4096, generator=g).to("cuda", torch.bfloat16)

    def chain(inp):
        for q, s in ws_:
            inp = bf.ops.linear(inp, q, s)
        return inp

    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("BLOCKWISE_FP8_PDL", flag)
        assert quant.programmatic_launch(x.device) == (flag == "1" and torch.cuda.get_device_capability()[0] >= 9
                                                      and quant._PDL_IN_TRITON)
        eager = chain(x)
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        chain(static_x)  # compile outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static_out = chain(static_x)
        static_x.copy_(x * 2)
        graph.replay()
        torch.cuda.synchronize()
        results[flag] = (eager, static_out.clone())
    assert torch.equal(results["0"][0], results["1"][0])
    assert torch.equal(results["0"][1], results["1"][1])
    assert torch.equal(results["0"][1], chain(x * 2))


@pytest.mark.skipif(not ON_GPU, reason="programmatic dependent launch needs a CUDA device")
@pytest.mark.parametrize("M", [1, 16])
def test_programmatic_launch_gemm_after_gemm_matches_plain_launch(monkeypatch, M):
    """Linears that share one quantized input (q/k/v, gate/up in a compiled graph) run GEMM after
    GEMM. Under PDL each skinny GEMM lets the next one launch after its K loop, while it still sums
    its split-K partials through the per-stream arrival counters that the next one also uses: the
    outputs must equal plain launches bit for bit, eager and replayed from a CUDA graph."""
    g = torch.Generator().manual_seed(12)
    ws_ = [bf.ops.quantize_weight((torch.randn(n, 4096, generator=g) * 0.05).to("cuda", torch.bfloat16))
           for n in (4096, 1024, 256, 14336, 256)]
    x = torch.randn(M, 4096, generator=g).to("cuda", torch.bfloat16)
    assert G.plan(M, 256, 4096, tma=True).split_k > 1  # the counters are in play

    def layer(inp):
        a_q, a_s = bf.ops.quantize_activation(inp)
        return [bf.ops.gemm(a_q, a_s, q, s) for q, s in ws_]

    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("BLOCKWISE_FP8_PDL", flag)
        eager = layer(x)
        static_x = x.clone()
        layer(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x)
        static_x.copy_(x * 2)
        graph.replay()
        torch.cuda.synchronize()
        results[flag] = (eager, [o.clone() for o in static_out])
    for off, on in zip(results["0"], results["1"]):
        assert all(torch.equal(a, b) for a, b in zip(off, on))
    assert all(torch.equal(a, b) for a, b in zip(results["1"][1], layer(x * 2)))


def test_programmatic_launch_off_where_it_cannot_apply(monkeypatch):
    from blockwise_fp8.kernels import quant

    assert not quant.programmatic_launch(torch.device("cpu"))
    monkeypatch.setenv("BLOCKWISE_FP8_PDL", "0")
    if torch.cuda.is_available():
        assert not quant.programmatic_launch(torch.device("cuda"))

@pytest.mark.parametrize("M", [1, 3, 67])
def test_linear_auto_matches_reference(M):
    backend = "auto" if ON_GPU else "triton"
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 300, generator=g).to(torch.bfloat16).to(KERNEL_DEVICE)
    _, _, _, wq, ws, b = _operands(M, 200, 300, torch.float8_e4m3fn, seed=2)
    out = bf.linear(x, wq, ws, b, backend=backend)
    ref = reference.linear(x.cpu(), wq.cpu(), ws.cpu(), b.cpu(), out_dtype=torch.float64)
    rel = (out.cpu().double() - ref).norm() / ref.norm()
    assert out.dtype == torch.bfloat16 and rel < 1e-2


def test_nan_row_stays_in_its_row():
    x, aq, as_, wq, ws, b = _operands(3, 200, 300, torch.float8_e4m3fn, seed=9)
    as_ = as_.clone()
    as_[1, 0] = float("nan")
    for p in _plans(3, 300):
        out = G.gemm(aq, as_, wq, ws, None, torch.float32, plan_override=p)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_fused_rejects_large_plan():
    x, aq, as_, wq, ws, b = _operands(3, 129, 128, torch.float8_e4m3fn, seed=0)
    with pytest.raises(ValueError):
        G.linear_fused(x.to(torch.bfloat16), wq, ws, None, torch.bfloat16, plan_override=G.Plan("tiled", 16, 64, 4, 2))


def test_skinny_mid_range_follows_its_tunables(monkeypatch):
    monkeypatch.setattr(G, "SKINNY_MID_MAX_M", 0)  # A/B runs: M = 33-64 back on the tma tiles
    assert G.plan(48, 8192, 8192, tma=True).kind == "tma"
    monkeypatch.setattr(G, "SKINNY_MID_MAX_M", 64)
    monkeypatch.setattr(G, "SKINNY_MID_MAX_NK", (4096, 8192))
    assert G.plan(48, 8192, 8192, tma=True).kind == "tma"
    assert G.plan(48, 4096, 8192, tma=True).kind == "skinny"


def test_gemv_range_follows_gemv_max_m(monkeypatch):
    monkeypatch.setattr(G, "GEMV_MAX_M", 0)  # A/B runs: M = 1 back on the skinny kernel
    assert G.plan(1, 4096, 4096, tma=True).kind == "skinny"
    monkeypatch.setattr(G, "GEMV_MAX_M", 4)
    p = G.plan(3, 4096, 4096, tma=True)
    assert (p.kind, p.block_m) == ("gemv", 4)
    assert G.plan(5, 4096, 4096, tma=True).kind == "skinny"
    x, aq, as_, wq, ws, b = _operands(3, 200, 300, torch.float8_e4m3fn, seed=5)
    with pytest.raises(ValueError, match="block_m"):  # a plan too short for M
        G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=G.Plan("gemv", 2, 16, 4, 1))


def test_plan_heuristic_ranges():
    assert G.plan(1, 8192, 8192, tma=True).kind == "gemv"
    assert G.plan(2, 8192, 8192, tma=True).kind == "skinny"
    assert G.plan(G.SKINNY_MAX_M, 8192, 8192, tma=True).kind == "skinny"
    assert G.plan(G.SKINNY_MAX_M + 1, 10240, 8192, tma=True).kind == "tma"
    # past SKINNY_MAX_M on weights of up to 8192 x 8192: 64-row token tiles, <= 2 programs per SM,
    # <= 4 splits; paired K steps in 3 stages where each split is whole pairs of >= 16 blocks,
    # else one block per step in 4 stages
    mid = lambda M, N, K: (lambda p: (p.kind, p.block_m, p.split_k, p.num_stages, p.groups_k))(  # noqa: E731
        G.plan(M, N, K, tma=True, num_sms=132))
    assert mid(33, 8192, 8192) == ("skinny", 64, 2, 3, 2)
    assert mid(64, 6144, 4096) == ("skinny", 64, 2, 3, 2)  # 96 tiles: 3 splits would be 288 programs
    assert mid(64, 1024, 4096) == ("skinny", 64, 4, 4, 1)  # 8 K blocks per split
    assert mid(64, 8192, 2048) == ("skinny", 64, 1, 3, 2)
    assert mid(65, 8192, 8192)[0] == "tma"
    assert mid(64, 8256, 8192)[0] == "tma" and mid(64, 8192, 8320)[0] == "tma"
    assert G.plan(4096, 8192, 8192, tma=False).kind == "tiled"
    # split-K only where N alone leaves the card under-filled
    assert G.plan(16, 4096, 4096, tma=True).split_k > 1 and G.plan(16, 8192, 28672, tma=True).split_k > 1
    assert G.plan(16, 8192, 8192, tma=True).split_k == 1  # 128 tiles of 64 K blocks
    assert G.plan(16, 57344, 8192, tma=True).split_k == 1
    assert G.plan(16, 1024, 4096, tma=True, num_sms=132).split_k == 8  # at most 32 / 4 K blocks
    # ... and where the 64-column tiles give >= 1.2 programs per SM (132 x 1.2 = 158.4) none
    skinny = lambda M, N, K: (lambda p: (p.split_k, p.num_stages, p.groups_k))(  # noqa: E731
        G.plan(M, N, K, tma=True, num_sms=132))
    assert skinny(8, 10112, 8320)[0] == 2  # 158 tiles, 65 K blocks
    assert skinny(8, 10176, 8320)[0] == 1  # 159 tiles
    # ... or >= 0.7 per SM (92.4) with <= 64 K blocks (24 with one block per step: M = 33-64)
    assert skinny(8, 5952, 8192)[0] == 1  # 93 tiles, 64 K blocks
    assert skinny(8, 5888, 3072)[0] == 3  # 92 tiles
    assert skinny(8, 5952, 8320)[0] == 3  # 65 K blocks
    assert G._skinny_split_k(93, 24, 132) == 1 and G._skinny_split_k(93, 25, 132) == 3
    # K blocks in pairs where every split's K range is whole pairs of >= 8 blocks (unsplit: always),
    # in 3 stages for 2-3 programs per SM or unsplit grids of 1.25-2 per SM (165-264 tiles), else 4
    assert skinny(8, 10112, 8704) == (2, 3, 2)  # 316 programs of 34 K blocks
    assert skinny(8, 10176, 8192) == (1, 4, 2)  # 159 tiles, unsplit
    assert skinny(32, 12288, 4096) == (1, 3, 2)  # 192 tiles
    assert skinny(16, 16896, 4096) == (1, 3, 2)  # 264 tiles
    assert skinny(16, 16960, 4096) == (1, 3, 2)  # 265 programs: 3 per SM on some
    assert skinny(16, 28672, 4096) == (1, 4, 2)  # 448 programs
    assert skinny(16, 57344, 8192) == (1, 4, 2)  # 896
    assert skinny(8, 5952, 3072) == (1, 4, 2)  # 93 tiles
    assert skinny(8, 5888, 3072) == (3, 3, 2)  # 276 programs of 8 K blocks
    assert skinny(16, 8192, 28672) == (2, 4, 2)  # 256 programs of 112 K blocks
    assert skinny(16, 4096, 4096) == (4, 4, 2)  # 256 programs of 8 K blocks
    # ... else one block per step: 6 stages only for unsplit grids of <= 2 programs per SM or
    # programs of > 64 K blocks
    assert skinny(8, 4096, 4608) == (4, 4, 1)  # 9 K blocks per split: not whole pairs
    assert skinny(16, 5888, 4096) == (3, 4, 1)  # 11
    assert skinny(16, 6144, 4096) == (1, 4, 2)  # 96 tiles, 32 K blocks: unsplit
    assert skinny(16, 3072, 3072) == (5, 4, 1)  # 5
    assert G._skinny_stages(n_tiles=264, k_blocks=32, split=1, num_sms=132) == 6
    assert G._skinny_stages(n_tiles=265, k_blocks=32, split=1, num_sms=132) == 4
    assert G._skinny_stages(n_tiles=896, k_blocks=64, split=1, num_sms=132) == 4
    assert G._skinny_stages(n_tiles=128, k_blocks=224, split=2, num_sms=132) == 6  # 112 K blocks per program
    assert G._skinny_stages(n_tiles=128, k_blocks=128, split=2, num_sms=132) == 4  # 64
    assert G._skinny_stages(n_tiles=128, k_blocks=129, split=2, num_sms=132) == 6  # 65
    assert G._skinny_stages(n_tiles=64, k_blocks=32, split=4, num_sms=132) == 4  # 8
    # gemv: 8-row tiles of 16 K blocks up to K = 16384, 16-row tiles of 8 above
    assert (G.plan(1, 4096, 14336, tma=True).block_n, G.plan(1, 4096, 14336, tma=True).groups_k) == (8, 16)
    assert (G.plan(1, 4096, 28672, tma=True).block_n, G.plan(1, 4096, 28672, tma=True).groups_k) == (16, 8)
    # split only under one program per 4 SMs, to ~2 per SM in whole steps
    assert G.plan(1, 4096, 28672, tma=True, num_sms=132).split_k == 1
    assert G.plan(1, 512, 8192, tma=True, num_sms=132).split_k == 1  # 64 tiles of 8 rows
    assert G.plan(1, 256, 8192, tma=True, num_sms=132).split_k == 3  # 32 tiles: ceil(132 / 64)
    assert G.plan(1, 512, 28672, tma=True, num_sms=132).split_k == 3  # 32 tiles of 16 rows
    assert G.plan(1, 64, 4096, tma=True, num_sms=132).split_k == 2  # 8 tiles; 32 / 16 K blocks
    assert G.plan(1, 256, 512, tma=True, num_sms=132).split_k == 1  # 4 K blocks: one partial step
    # mid M: count waves (132 SMs): M = 128, N = 10240 is 160 tiles of 64 rows but 80 of 128
    assert G.plan(128, 10240, 8192, tma=True, num_sms=132).block_m == 128
    assert G.plan(128, 8192, 8192, tma=True, num_sms=132).block_m == 64
    assert G.plan(192, 10240, 8192, tma=True, num_sms=132).block_m == 64
    assert G.plan(512, 4096, 4096, tma=True, num_sms=132).block_m == 128
    # the warp-specialised kernel replaces every 128 x 128 TMA tile where it can run
    assert G.plan(4096, 8192, 8192, tma=True, ws=True).kind == "ws"
    assert G.plan(128, 10240, 8192, tma=True, ws=True, num_sms=132).kind == "ws"
    # ... and at M = 65-128 past 24 K blocks, 128 x 128 tiles split over K within half the SMs (at
    # most 4 ways, >= 8 K blocks each), the scales in the ring where each program runs > 32 K blocks
    # and the scales can ride it, else read from memory in 5 stages
    half = lambda M, N, K, ring=True: (lambda p: (p.kind, p.block_m, p.num_stages, p.tail_split, p.scales_tma))(  # noqa: E731
        G.plan(M, N, K, tma=True, ws=True, num_sms=132, scales_in_ring=ring))
    assert half(128, 8192, 8192) == half(96, 8192, 28672) == ("ws", 128, 6, 1, True)  # 64 tiles
    assert half(128, 8192, 8192, False) == half(96, 8192, 28672, False) == ("ws", 128, 5, 1, False)
    assert half(65, 4096, 14336) == ("ws", 128, 6, 2, True)  # 32 tiles: 56 K blocks a program
    assert half(128, 4096, 4096) == ("ws", 128, 5, 2, False)  # 16 K blocks a program
    assert half(128, 8192, 4224) == ("ws", 128, 6, 1, True) and half(128, 6144, 4096)[2:] == (5, 1, False)  # 33, 32
    assert half(96, 2048, 8192) == ("ws", 128, 5, 4, False) and half(96, 512, 8192)[3] == 4  # at most 4
    assert half(128, 2048, 3200)[3] == 3  # 25 K blocks: pieces of >= 8
    assert half(128, 8192, 3072)[:2] == ("tma", 64)  # 24 K blocks: the 64-row tiles stay
    assert half(64, 10240, 8192)[:2] == ("tma", 64)  # M <= 64: not measured, unchanged
    assert half(160, 4096, 4096)[:2] == ("tma", 64)  # two rows of tiles
    assert half(128, 10240, 8192)[:2] == ("ws", 128) and half(128, 10240, 8192)[3] == 1  # 80 tiles: _wide_plan
    # M = 129-256: the ws kernel's 128 x 128 tiles (_wide_plan) from K = 7168 (56 K blocks) whatever
    # the waves; shorter K keeps the waves rule (64-row tma tiles where they cost fewer rounds)
    wide = lambda M, N, K: G._wide_plan(M, N, -(-K // 128), ws=True, num_sms=132, ws192_cost=G.WS192_COST,  # noqa: E731
                                        scales_in_ring=True, card=G.CARD_PLANS["H100"])
    for M, N, K in ((129, 10240, 8192), (160, 4096, 14336), (256, 4096, 7168), (200, 2048, 7168)):
        assert G.plan(M, N, K, tma=True, ws=True, num_sms=132, scales_in_ring=True) == wide(M, N, K)
    assert half(160, 10240, 8192)[:4] == ("ws", 128, 6, 4)  # 160 tiles: the 28 of the tail split 4 ways
    assert half(200, 4096, 7040)[:2] == half(129, 11008, 4096)[:2] == ("tma", 64)  # 55, 32 K blocks
    assert G.plan(160, 4096, 14336, tma=True, ws=False, num_sms=132).block_m == 64  # no ws: the waves rule
    # other cards (the H200's measurements): _wide_plan at every M = 65-256 where the ws kernel
    # runs, whatever K and the waves, with the ring within their limits (up to 3 waves, 64 K blocks)
    other_card = G.CARD_PLANS["other"]
    other = lambda M, N, K, ws=True: G.plan(M, N, K, tma=True, ws=ws, num_sms=132, scales_in_ring=True,  # noqa: E731
                                            card=other_card)
    other_wide = lambda M, N, K: G._wide_plan(M, N, -(-K // 128), ws=True, num_sms=132,  # noqa: E731
                                              ws192_cost=G.WS192_COST, scales_in_ring=True, card=other_card)
    for M, N, K in ((65, 4096, 14336), (96, 8192, 28672), (128, 8192, 8192), (128, 4096, 4096), (80, 3072, 3072),
                    (160, 4096, 4096), (200, 11008, 4096), (256, 2048, 4096), (80, 1024, 1920)):
        assert other(M, N, K) == other_wide(M, N, K)
    # ... except narrow weights (CardPlans.narrow_sms_per_program): where that ws plan would run at
    # most one program per 4 SMs (its tiles times _tail_split's pieces), from 16 K blocks, the tma
    # kernel's 64 x 64 tiles, split over K into the most of 4 or 2 programs that stays within one
    # program per SM with >= 8 K blocks a program
    narrow = lambda M, N, K: (lambda p: (p.kind, p.block_m, p.block_n, p.tail_split))(other(M, N, K))  # noqa: E731
    assert narrow(80, 1024, 4096) == narrow(128, 1024, 8192) == narrow(65, 512, 4096) == ("tma", 64, 64, 4)
    assert narrow(96, 1024, 14336) == ("tma", 64, 64, 4)  # 8 tiles x 4 pieces: 32 ws programs
    assert narrow(128, 2048, 2048) == ("tma", 64, 64, 2)  # 16 tiles x 2 pieces (16 K blocks); 64 of 64 x 64
    assert narrow(80, 1024, 2304)[1:] == narrow(80, 1024, 3968)[1:] == (64, 64, 2)  # 18, 31 K blocks
    for M, N, K in ((200, 1024, 4096), (256, 1024, 4096), (80, 2048, 7168), (128, 2048, 3072)):
        assert other(M, N, K) == other_wide(M, N, K)  # 64, 64, 64, 48 ws programs
    assert other(80, 1024, 1920) == other_wide(80, 1024, 1920)  # 15 K blocks
    assert other(64, 1024, 14336).block_n == 128  # M <= 64: not measured on these tiles
    assert other(96, 1024, 4096, ws=False).block_n == 128  # no ws: as before
    for M, N, K in ((80, 1024, 4096), (128, 2048, 2048)):  # the H100: not measured, off
        assert G.plan(M, N, K, tma=True, ws=True, num_sms=132, scales_in_ring=True).block_n == 128
    assert G.plan(80, 1024, 4096, tma=True, ws=True, num_sms=127, scales_in_ring=True,
                  card=other_card).kind == "ws"  # 32 ws programs on 127 SMs: fewer than 4 SMs each
    assert other(96, 8192, 28672).scales_tma is False and other(128, 4096, 8192).scales_tma is True  # 224, 64 K blocks
    assert other(128, 4096, 8192).tail_split == 4 and half(128, 4096, 8192)[3] == 2  # H100: within half the SMs
    assert (other(64, 10240, 8192).kind, other(64, 10240, 8192).block_m) == half(64, 10240, 8192)[:2] == ("tma", 64)  # M <= 64
    assert (other(96, 8192, 28672, ws=False).kind, other(96, 8192, 28672, ws=False).block_m) == ("tma", 64)  # no ws: waves
    assert G.plan(16, 8192, 8192, tma=True, ws=True).kind == "skinny"
    assert G.plan(1, 8192, 8192, tma=True, ws=True).kind == "gemv"
    assert G.plan(4096, 8192, 8192, tma=False, ws=False).kind == "tiled"
    # a tail wave under half full is split over K (at most 4 ways, >= 8 K blocks each), by
    # whichever of the ws and tma kernels runs the 128 x 128 tiles
    assert G._tail_split(160, 64, 132) == 4 and G._tail_split(320, 64, 132) == 2
    assert G._tail_split(128, 64, 132) == 1 and G._tail_split(264, 64, 132) == 1
    assert G._tail_split(160, 16, 132) == 2  # 16 K blocks: pieces of 8
    for ws in (True, False):
        wide = G.plan(256, 10240, 8192, tma=True, ws=ws, num_sms=132)  # 160 tiles: 1.2 waves
        assert (wide.kind, wide.block_m, wide.tail_split) == ("ws" if ws else "tma", 128, 4)
    assert G.plan(2048, 10240, 8192, tma=True, ws=True, num_sms=132).kind == "ws"  # 1280 tiles
    assert G.plan(8192, 8192, 8192, tma=True, ws=True, num_sms=132).tail_split == 1  # 192-row tiles: never split


def test_ws_plan_takes_192_row_tiles_where_they_need_no_more_waves():
    """192 x 128 tiles (three consumers) from 8 waves of 128-row tiles up, where 1.5 x their waves
    x WS192_COST is at most the 128-row tiles' waves; never below 8 waves; 128 x 128 otherwise."""
    def rows(M, N, K=8192):
        p = G.plan(M, N, K, tma=True, ws=True, num_sms=132)
        assert p.kind == "ws" and p.block_n == 128
        return p.block_m
    assert rows(8192, 8192) == rows(8192, 8192, 28672) == 192  # 32 waves against 21 x 1.5 = 31.5
    assert rows(4096, 8192) == 128  # 16 against 11 x 1.5
    assert rows(8192, 10240) == rows(4096, 57344) == rows(2048, 57344) == 128  # 39 vs 40.5, 109 vs 112.5, 55 vs 57
    assert rows(1024, 8192) == rows(512, 10240) == rows(256, 8192) == 128  # < 8 waves
    assert G.plan(8192, 8192, 8192, tma=True, ws=False, num_sms=132).kind == "tma"
    # 128 x 128: 5 stages up to 4 waves, 4 above
    assert G.plan(1024, 8192, 8192, tma=True, ws=True, num_sms=132).num_stages == 5  # 3.9 waves
    assert G.plan(1280, 8192, 8192, tma=True, ws=True, num_sms=132).num_stages == 4  # 4.8 waves
    assert G.plan(2048, 8192, 8192, tma=True, ws=True, num_sms=132).num_stages == 4  # 7.8 waves
    # where the scales' layout lets the ring carry them: 6 stages and the ring within the card's
    # limits (the default plan: the H100's, up to 7 waves at any K), the plan above elsewhere
    ring = dict(tma=True, ws=True, num_sms=132, scales_in_ring=True)
    ringed = ((256, 8192, 8192), (256, 10240, 8192), (512, 10240, 8192), (384, 4096, 4096),
              (1024, 8192, 8192), (1024, 10240, 8192), (256, 57344, 8192), (512, 8192, 28672))  # 1-6.8 waves
    for M, N, K in ringed:
        p = G.plan(M, N, K, **ring)
        assert (p.kind, p.block_m, p.num_stages, p.scales_tma) == ("ws", 128, 6, True)
        assert p.tail_split == G.plan(M, N, K, tma=True, ws=True, num_sms=132).tail_split
    for M, N, K in ((2048, 8192, 8192), (512, 57344, 8192), (8192, 8192, 8192)):  # 7.8, 13.6 waves; 192 rows
        assert G.plan(M, N, K, **ring) == G.plan(M, N, K, tma=True, ws=True, num_sms=132)
    # other cards (the H200's measurements): up to 3 waves and 64 K blocks
    other = dict(ring, card=G.CARD_PLANS["other"])
    for M, N, K in ringed[:4]:
        assert G.plan(M, N, K, **other).scales_tma
    for M, N, K in ringed[4:]:
        assert G.plan(M, N, K, **other) == G.plan(M, N, K, tma=True, ws=True, num_sms=132)
    assert not G.plan(512, 8192, 8192, tma=True, ws=True, num_sms=132).scales_tma
    for M in (1024, 2048, 8192):
        for in_ring in (False, True):
            p = G.plan(M, 8192, 8192, tma=True, ws=True, num_sms=132, scales_in_ring=in_ring)
            scales = 128 * 4 if in_ring and p.block_m == 128 else 0
            assert p.num_stages * ((p.block_m + 128) * 128 + scales) <= 227 * 1024  # the ring fits in shared memory
            assert (p.block_m, p.block_n) in gemm_hopper.TILES


def test_m_major_scales_preferred_only_for_ring_plans(monkeypatch):
    """``prefers_m_major_scales`` (what eager ``linear`` asks before quantizing) is true exactly
    where the plan puts the scales in the ws kernel's ring: an sm_90 CUDA device with Gluon,
    K % 16 == 0, a TMA-able weight, a ws plan of 128-row tiles within the card's ``card_plans``
    (waves, K blocks). Checked by its logic on a stand-in weight (no GPU here)."""
    class Weight:  # what prefers_m_major_scales reads of w
        device = torch.device("cuda", 0)

        def __init__(self, strides):
            self.strides = strides

        def stride(self, dim):
            return self.strides[dim]

    monkeypatch.setattr(gemm_hopper, "AVAILABLE", True)
    monkeypatch.setattr(G, "_sm90", lambda index: True)
    monkeypatch.setattr(G, "_num_sms", lambda index: 132)
    monkeypatch.setattr(G, "card_plans", lambda index: G.CARD_PLANS["other"])
    w = Weight((8192, 1))
    assert G.prefers_m_major_scales(256, 8192, 8192, w) and G.prefers_m_major_scales(512, 10240, 8192, w)
    assert not G.prefers_m_major_scales(1024, 8192, 8192, w)  # 3.9 waves
    assert not G.prefers_m_major_scales(512, 8192, 28672, w)  # 224 K blocks
    monkeypatch.setattr(G, "card_plans", lambda index: G.CARD_PLANS["H100"])
    assert G.prefers_m_major_scales(1024, 8192, 8192, w) and G.prefers_m_major_scales(512, 8192, 28672, w)
    assert not G.prefers_m_major_scales(2048, 8192, 8192, w)  # 7.8 waves
    assert G.prefers_m_major_scales(128, 8192, 8192, w)  # the half-card plan: 64 K blocks a program
    assert not G.prefers_m_major_scales(128, 1024, 4096, Weight((4096, 1)))  # 8 K blocks a program
    monkeypatch.setattr(G, "card_plans", lambda index: G.CARD_PLANS["other"])
    assert not G.prefers_m_major_scales(16, 8192, 8192, w)  # skinny kernel
    assert not G.prefers_m_major_scales(128, 1024, 4096, Weight((4096, 1)))  # narrow: the tma kernel's 64 x 64 tiles
    assert G.prefers_m_major_scales(200, 1024, 4096, Weight((4096, 1)))  # 64 ws programs: the ws plan, its ring
    assert not G.prefers_m_major_scales(8192, 8192, 8192, w)  # 192-row tiles
    assert not G.prefers_m_major_scales(256, 8192, 8200, Weight((8200, 1)))  # K % 16
    assert not G.prefers_m_major_scales(256, 8192, 8192, Weight((1, 8192)))  # a transposed weight
    monkeypatch.setattr(G, "_sm90", lambda index: False)
    assert not G.prefers_m_major_scales(256, 8192, 8192, w)


@pytest.mark.parametrize("name,family", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"),
                                         ("NVIDIA H200", "other"), ("NVIDIA A100-SXM4-80GB", "other")])
def test_the_card_and_its_tables_follow_the_device_name(monkeypatch, name, family):
    """One reading of the device for every per-card table: the H100's limits where the device name
    says H100 (where they were measured), the H200's elsewhere; the SM count as the device
    reports it, for the plans and for auto's choice table alike."""
    from blockwise_fp8.kernels import card as C

    props = type("Props", (), {"name": name, "multi_processor_count": 114})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(C, "card", C.card.__wrapped__)  # no cached answer from the real device
    monkeypatch.setattr(G, "device_card", C.card)
    assert G.card_plans(0) == G.CARD_PLANS[family]
    assert G._num_sms(0) == 114
    monkeypatch.setattr(ops, "card", C.card)
    monkeypatch.setattr(ops, "_GEMM_CARD", {})
    assert ops.gemm_card(torch.device("cuda", 0)) == (family, 114)


def test_scales_ride_the_ring_only_where_tma_can_load_them():
    """The ring carries the activation scales for two consumers, M-major scales with a column
    stride of whole 16-byte units and a 16-byte aligned base: what quantize(rows_multiple_of=4)
    writes. Others (row-major, M-major of stride 67, an odd offset) are read from memory."""
    from blockwise_fp8.kernels import quant

    rides = gemm_hopper.scales_ride_the_ring
    x = torch.randn(67, 512, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    _, padded = quant.quantize(x, 1, 128, torch.float8_e4m3fn, scale_m_major=True, rows_multiple_of=4)
    assert padded.stride() == (1, 68)
    assert rides(padded[:67], 2) and rides(padded, 2)
    assert not rides(padded[:67], 3)  # 192-row tiles: no power-of-two box
    _, row_major = quant.quantize(x, 1, 128, torch.float8_e4m3fn)
    assert not rides(row_major, 2)
    assert not rides(row_major.t().contiguous().t(), 2)  # stride 67
    assert not rides(padded[1:], 2)  # base 4 bytes off


def test_ws_plan_takes_2_cta_clusters_for_its_192_row_tiles_where_triton_multicasts(monkeypatch):
    """With multicast TMA (Triton >= 3.9) the 192-row tiles run on pairs of CTAs sharing each A
    box (MULTICAST_CLUSTER); nothing else changes, and without it (or with the knob at 1) the
    plan is the one-CTA one."""
    big = dict(tma=True, ws=True, num_sms=132)
    for M, N, K in ((8192, 8192, 8192), (8192, 8192, 28672)):
        one = G.plan(M, N, K, **big)
        pair = G.plan(M, N, K, **big, multicast=True)
        assert (one.block_m, one.cluster) == (192, 1)
        assert pair == G.Plan("ws", 192, 128, 4, 4, cluster=2)
    for M, N in ((4096, 8192), (2048, 57344), (1024, 8192)):  # 128-row plans: no clusters
        assert G.plan(M, N, 8192, **big, multicast=True).cluster == 1
    assert G.plan(8192, 8192, 8192, tma=True, ws=False, num_sms=132, multicast=True).kind == "tma"
    monkeypatch.setattr(G, "MULTICAST_CLUSTER", 1)
    assert G.plan(8192, 8192, 8192, **big, multicast=True).cluster == 1


def test_cluster_grid_counts_pairs_of_256_column_tiles():
    """A cluster plan's persistent grid: num_sms / 2 pairs (or num_programs pairs), each walking
    tiles of 192 x 256 (128 columns per CTA); an odd count of column blocks leaves the last
    pair's second CTA a masked half."""
    p = G.Plan("ws", 192, 128, 4, 4, cluster=2)
    assert G._grid_layout(p, 8192, 8192, 8192, 132) == (66, 43 * 32, 1, 0)
    assert G._grid_layout(p, 8192, 8320, 8192, 132) == (66, 43 * 33, 1, 0)  # 65 column blocks
    assert G._grid_layout(p, 200, 300, 512, 132) == (4, 4, 1, 0)  # fewer tiles than pairs
    assert G._grid_layout(G.Plan("ws", 192, 128, 4, 4, cluster=2, num_programs=2), 8192, 8192, 8192, 132)[0] == 2


def test_only_the_ws_plan_takes_clusters():
    x, aq, as_, wq, ws, b = _operands(40, 200, 256, torch.float8_e4m3fn, seed=2)
    for p in (G.Plan("tiled", 64, 128, 4, 2, cluster=2), G.Plan("tma", 64, 64, 4, 2, cluster=2)):
        with pytest.raises(ValueError, match=f"only the 'ws' plan runs on CTA clusters, got cluster=2 for '{p.kind}'"):
            G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=p)


def test_cluster_grid_trimmed_to_the_pairs_the_driver_says_fit(monkeypatch):
    """A persistent grid of more pairs than run at once would leave the last ones a second wave:
    once the driver has said how many of a configuration fit (recorded at its first launch), the
    cluster plans use that many; unknown, or as many as one per two SMs, the plan is unchanged."""
    monkeypatch.setattr(gemm_hopper, "_PAIRS_FIT", {})
    p = G.Plan("ws", 192, 128, 4, 4, cluster=2)
    assert G._cluster_plan(p, 0, 132) is p  # nothing recorded yet
    gemm_hopper._PAIRS_FIT[(0, 3, 4)] = 66
    assert G._cluster_plan(p, 0, 132) is p
    gemm_hopper._PAIRS_FIT[(0, 3, 4)] = 55  # e.g. GPCs with odd SM counts
    trimmed = G._cluster_plan(p, 0, 132)
    assert trimmed == G.Plan("ws", 192, 128, 4, 4, cluster=2, num_programs=55)
    assert G._grid_layout(trimmed, 8192, 8192, 8192, 132)[0] == 55
    assert G._cluster_plan(p, 1, 132) is p  # another device: its own record
    assert G._cluster_plan(G.Plan("ws", 192, 128, 4, 5, cluster=2), 0, 132).num_programs == 0  # other stages
    gemm_hopper._PAIRS_FIT[(0, 3, 4)] = None  # the driver could not say
    assert G._cluster_plan(p, 0, 132) is p


def test_first_cluster_launch_records_how_many_pairs_fit(monkeypatch):
    """On the GPU: the driver's answer for the compiled pair kernel, at most one pair per two SMs
    (66 on an H100 or H200), and the GEMM's bits those of one CTA."""
    x, aq, as_, wq, ws, b = _operands(512, 1024, 1024, torch.float8_e5m2, seed=11)
    if not (G.ws_usable(aq, wq) and gemm_hopper.MULTICAST):
        pytest.skip("needs the ws kernel (sm_90, Gluon) and multicast TMA (Triton >= 3.9)")
    monkeypatch.setattr(gemm_hopper, "_PAIRS_FIT", {})
    pair = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=G.Plan("ws", 192, 128, 4, 4, cluster=2))
    one = G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=G.Plan("ws", 192, 128, 4, 4))
    assert torch.equal(pair, one)
    fit = gemm_hopper._PAIRS_FIT[(aq.device.index or 0, 3, 4)]
    assert fit is not None and 0 < fit <= G._num_sms(aq.device.index or 0) // 2


@pytest.mark.skipif(not gemm_hopper.AVAILABLE, reason="this Triton has no Gluon")
def test_pairs_fit_recorded_once_and_a_failed_query_only_warns(monkeypatch):
    monkeypatch.setattr(gemm_hopper, "_PAIRS_FIT", {})
    monkeypatch.setattr(gemm_hopper, "_max_active_clusters", lambda compiled, cluster: 60)
    gemm_hopper._record_pairs_fit(object(), (0, 3, 4), 2)
    assert gemm_hopper.pairs_fit(0, 3, 4, 66) == 60 and gemm_hopper.pairs_fit(0, 2, 4, 66) == 66

    def broken(compiled, cluster):
        raise RuntimeError("no such driver call")
    monkeypatch.setattr(gemm_hopper, "_max_active_clusters", broken)
    with pytest.warns(RuntimeWarning, match="could not ask the driver how many 2-CTA clusters.*no such driver call"):
        gemm_hopper._record_pairs_fit(object(), (0, 2, 4), 2)
    assert (0, 2, 4) in gemm_hopper._PAIRS_FIT and gemm_hopper.pairs_fit(0, 2, 4, 66) == 66
    monkeypatch.setattr(gemm_hopper, "_max_active_clusters", lambda compiled, cluster: 0)
    gemm_hopper._record_pairs_fit(object(), (1, 3, 4), 2)  # no answer: the plan's grid stays
    assert gemm_hopper.pairs_fit(1, 3, 4, 66) == 66


@pytest.mark.skipif(not gemm_hopper.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.parametrize("cluster,block_m,tail_split,scales_tma", [(3, 192, 1, False), (2, 128, 3, False),
                                                                   (2, 192, 2, False), (2, 128, 1, True)])
def test_ws_launcher_refuses_clusters_it_cannot_run(cluster, block_m, tail_split, scales_tma):
    """Pairs only, without a split tail or staged scales; and only where Triton multicasts.
    Checked before anything is launched, so on any device."""
    a = torch.zeros(256, 256, dtype=torch.float8_e4m3fn)
    s = torch.ones(256, 2)
    with pytest.raises(ValueError, match="cluster must be 1 or 2|2-CTA clusters need Triton >= 3.9"):
        gemm_hopper.gemm_ws(a, s, a, torch.ones(2, 2), None, torch.empty(256, 256), programs=1, block_m=block_m,
                            tail_split=tail_split, scales_tma=scales_tma, cluster=cluster)


@pytest.mark.skipif(not gemm_hopper.AVAILABLE or gemm_hopper.MULTICAST, reason="needs Gluon without multicast")
def test_ws_launcher_refuses_clusters_without_multicast():
    a = torch.zeros(256, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"Triton >= 3.9 \(multicast TMA\).*multicast=False"):
        gemm_hopper.gemm_ws(a, torch.ones(256, 2), a, torch.ones(2, 2), None, torch.empty(256, 256), programs=1,
                            block_m=192, cluster=2)


def test_ws_plan_refuses_other_tiles():
    x, aq, as_, wq, ws, b = _operands(300, 600, 1024, torch.float8_e4m3fn, seed=0)
    if not G.ws_usable(aq, wq):
        pytest.skip("the ws kernel needs an sm_90 GPU and Triton's Gluon (test_ws_plan_refused_where_it_cannot_run)")
    for bm, bn in ((64, 128), (128, 256)):
        with pytest.raises(ValueError, match=f"128 x 128, 192 x 128 tiles, got {bm} x {bn}"):
            G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=G.Plan("ws", bm, bn, 4, 3))


def test_ws_plan_refused_where_it_cannot_run():
    x, aq, as_, wq, ws, b = _operands(67, 129, 256, torch.float8_e4m3fn, seed=5)
    if G.ws_usable(aq, wq):
        pytest.skip("the ws kernel runs here; this test covers devices where it cannot")
    with pytest.raises(ValueError, match="'ws' plan needs"):
        G.gemm(aq, as_, wq, ws, b, torch.float32, plan_override=G.Plan("ws", 128, 128, 4, 5))


@pytest.mark.skipif(not gemm_hopper.AVAILABLE, reason="this Triton has no Gluon")
def test_ws_smem_layouts_built_once_and_equal_to_gluons_default():
    for dt, gl_dt in ((torch.float8_e4m3fn, gemm_hopper.gl.float8e4nv), (torch.float8_e5m2, gemm_hopper.gl.float8e5)):
        for rows in (64, 128):
            got = gemm_hopper.smem_layout(rows, 128, dt)
            assert got == gemm_hopper.gl.NVMMASharedLayout.get_default_for([rows, 128], gl_dt)
            assert gemm_hopper.smem_layout(rows, 128, dt) is got
            if gemm_hopper.MULTICAST:  # a cluster's boxes: the same swizzle, with the pair's split
                pair = gemm_hopper.smem_layout(rows, 128, dt, ((1, 0),))
                assert pair == gemm_hopper.gl.NVMMASharedLayout.get_default_for([rows, 128], gl_dt, cga_layout=[[1, 0]])


_SASS_PROBE = """
import inspect, json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from blockwise_fp8.kernels import gemm_hopper as H

import torch
gl = H.gl
consumers = int(sys.argv[2])
cluster = int(sys.argv[5])
def desc(rows, cga):  # the A box: 128 rows with two consumers, 64 with three; W: 128 per CTA
    layout = H.smem_layout(rows, 128, torch.float8_e4m3fn, cga)
    return f"tensordesc<fp8e4nv[{rows}, 128],{layout!r}>"
tail_split = int(sys.argv[3])
scales_tma = sys.argv[4] == "1"
names = list(inspect.signature(H.gemm_ws_kernel.fn).parameters)
mma, barriers, pair_barriers = H.cluster_layouts(cluster)
consts = dict(HAS_BIAS=True, CONSUMERS=consumers, GROUP_M=8, NUM_PROGRAMS=132 // cluster,
              STAGES=6 if scales_tma else 4, TAIL_SPLIT=tail_split, SCALES_TMA=scales_tma, CONSUMER_REGS=H.CONSUMER_REGS[consumers],
              PRODUCER_REGS=H.PRODUCER_REGS[consumers], CLUSTER=cluster, MMA=mma, BARRIERS=barriers,
              PAIR_BARRIERS=pair_barriers, PDL=cluster == 1)
s_desc = f"tensordesc<fp32[1, 128],{H.SCALE_SMEM!r}>" if scales_tma else "*fp32"
pointers = dict(a_desc=desc(128 if consumers == 2 else 64, H.A_BOX_CGA[cluster]),
                w_desc=desc(128 * cluster, H.W_BOX_CGA[cluster]), s_desc=s_desc, a_scale_ptr="*fp32", w_scale_ptr="*fp32",
                bias_ptr="*bf16", out_ptr="*bf16", partial_ptr="*fp32", arrivals_ptr="*i32")
types = [pointers.get(n, "constexpr" if n in consts else "i32") for n in names]
# 16-byte aligned pointers, as our launches have them (Triton specializes on it): what lets the
# split tail's sum load 16 bytes per thread
aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers if n.endswith("_ptr")}
src = GluonASTSource(H.gemm_ws_kernel, dict(zip(names, types)), {(names.index(k),): v for k, v in consts.items()}, aligned)
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_ctas": cluster})
ptx = kernel.asm["ptx"].splitlines()
wait = next((i for i, l in enumerate(ptx) if "griddepcontrol.wait" in l), len(ptx))
pdl = {"pdl_waits": sum("griddepcontrol.wait" in l for l in ptx),
       "memory_before_wait": sum(any(k in l for k in ("ld.global", "st.global", "cp.async", "atom.", "red.", "prefetch"))
                                 for l in ptx[:wait])}
try:  # TRITON_NVDISASM_PATH where set (a slim Triton on the GPU machines ships none), else Triton's own
    nvdisasm = triton.knobs.nvidia.nvdisasm.path
except Exception:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
if "cubin" not in kernel.asm or not nvdisasm or not os.path.exists(nvdisasm):
    print(json.dumps({"skip": "this Triton build does not ship nvdisasm"}))
    sys.exit(0)
cubin = os.path.join(sys.argv[1], "k.cubin")
with open(cubin, "wb") as f:
    f.write(kernel.asm["cubin"])
sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
# the K loops: the innermost spans from a label to a branch back to it that hold a GMMA (branches
# past the last EXIT are the out-of-line retries of barrier waits, not loops)
lines = sass.splitlines()
labels = {l.strip()[:-1]: i for i, l in enumerate(lines) if l.strip().startswith(".L") and l.strip().endswith(":")}
end = max(i for i, l in enumerate(lines) if "EXIT" in l)
loops = [(labels[t], i) for i, l in enumerate(lines[:end]) for t in re.findall(r"BRA `?\\(?(\\.L\\w+)", l)
         if t in labels and labels[t] < i and any("GMMA" in x for x in lines[labels[t]:i])]
inner = [(a, b) for a, b in loops if not any((a, b) != (c, d) and a <= c and d <= b for c, d in loops)]
loop_spills = sum(("STL" in x or "LDL" in x) for a, b in inner for x in lines[a:b])
loop_fences = sum("FENCE.VIEW.ASYNC" in x for a, b in inner for x in lines[a:b])
print(json.dumps({"gmma": sass.count("GMMA"), "depbar": sass.count("WARPGROUP.DEPBAR"),
                  "depbar1": sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x1"), "k_loops": len(inner),
                  "spills": sass.count("STL") + sass.count("LDL"), "loop_spills": loop_spills,
                  "loop_fences": loop_fences,
                  "ldg128": sass.count("LDG.E.128"), "multicast": sass.count("UTMALDG.2D.MULTICAST"), **pdl}))
"""


@pytest.mark.parametrize("consumers,tail_split,scales_tma,cluster",
                         [(2, 1, 0, 1), (2, 4, 0, 1), (3, 1, 0, 1), (2, 1, 1, 1), (2, 4, 1, 1), (3, 1, 0, 2), (2, 1, 0, 2)])
def test_ws_kernel_compiles_for_sm90_without_serialised_wgmma(tmp_path, consumers, tail_split, scales_tma, cluster):
    """ptxas silently serialises every wgmma when it cannot prove the accumulators safe, which
    made earlier versions of this kernel slower than the plain one: compile it for sm_90 (no GPU
    needed) and count the warpgroup waits in its SASS and the local-memory spills (none, also
    with three consumers at 160 registers each). Two consumers take K blocks in pairs: per K
    loop one wait that leaves the second product in flight (``DEPBAR.LE gsb0, 0x1``), one for
    it, one for the odd last block; three take one block per step. The split tail has a second
    K loop. The same with the activation scales carried by the ring (``scales_tma``: 6 stages, as
    the plan gives it). On one CTA it is compiled as launched under PDL (``gemm.WS_PDL_MAX_M``):
    its PTX must hold the wait and no global access before it. In a fresh process, without
    TRITON_INTERPRET and with an empty kernel cache: after
    this suite's interpreted kernels, Triton's Gluon front end mis-typed the descriptor
    arguments."""
    import json
    import os
    import subprocess
    import sys

    from blockwise_fp8.kernels import gemm_hopper as H

    if not H.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    if cluster > 1 and not H.MULTICAST:
        pytest.skip("this Triton has no multicast TMA (2-CTA clusters need Triton >= 3.9)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-c", _SASS_PROBE, str(tmp_path), str(consumers), str(tail_split), str(scales_tma),
                          str(cluster)],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in counts:
        pytest.skip(counts["skip"])
    loops = 2 if tail_split > 1 else 1
    blocks = 3 if consumers == 2 else 1  # wgmmas per K loop: a pair and the odd last one, or one
    assert counts["gmma"] == 4 * blocks * consumers * loops  # four k32 steps per 128-wide K block
    assert counts["depbar"] == blocks * consumers * loops, "ptxas serialised the wgmma pipeline"
    assert counts["depbar1"] == (consumers * loops if consumers == 2 else 0), "the pair's overlap is gone"
    # the pair's loop (the odd last block's runs at most once and is not compiled as a loop)
    assert counts["k_loops"] == consumers * loops
    # none in the K loops (session 15's 128 x 256 tiles spilled several hundred there until their
    # two products were ordered); outside them only with the split tail, once per tail unit: 11
    # local loads/stores with Triton 3.9's ptxas (9 with the scales in the ring), none with 3.6's
    # (the GPU machine's) but 19 with the scales in the ring (entry values reloaded)
    assert counts["loop_spills"] == 0
    assert counts["spills"] <= (24 if tail_split > 1 else 0)
    # with the scales in the ring, each pair's proxy fence between the consumers' reads of the
    # scales and the stages' release (without it the next TMA copy overtook the reads on an H200)
    assert counts["loop_fences"] == (consumers * loops if scales_tma else 0)
    # the split tail's last program reads each split's float32 partial 16 bytes per thread (row-major,
    # 16 loads per thread and partial): read in the wgmma layout (8 bytes a thread, 8 rows a warp) the
    # sum cost more than the split saved (benchmarks/results/tail-diag-h100-2026-11-27-s13.txt)
    assert counts["ldg128"] >= (16 * tail_split * consumers if tail_split > 1 else 0)
    # with 2-CTA clusters the lead CTA multicasts each K step's A boxes to the pair (three 64-row
    # ones, or one of 128 rows); the W box stays a plain copy (each CTA its half)
    assert counts["multicast"] == ((3 if consumers == 3 else 1) if cluster == 2 else 0)
    # compiled as launched under PDL (gemm.WS_PDL_MAX_M; one CTA only): one griddepcontrol.wait
    # per thread of the default partition, and no global access (nor TMA copy) before it
    if cluster == 1:
        assert counts["pdl_waits"] == 1 and counts["memory_before_wait"] == 0
    else:
        assert counts["pdl_waits"] == 0


_PDL_PROBE = """
import inspect, json
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blockwise_fp8.kernels import gemm as G, gemm_hopper
from blockwise_fp8.kernels.rounding import format_constexprs, output_format_constexprs

pointers = dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", w_ptr="*fp8e4nv", w_scale_ptr="*fp32", bias_ptr="*fp32",
                out_ptr="*bf16", partial_ptr="*fp32", arrivals_ptr="*i32")
for i in (1, 2):  # the other members' slots (three weights in one launch)
    pointers.update({f"w{i}_ptr": "*fp8e4nv", f"w{i}_scale_ptr": "*fp32", f"bias{i}_ptr": "*fp32", f"out{i}_ptr": "*bf16"})
streaming = dict(HAS_BIAS=False, **output_format_constexprs(torch.bfloat16), FUSE_QUANT=False, FP8_MAX=448.0,
                 **format_constexprs(torch.float8_e4m3fn), CVT_FP8=True, SPLIT_K=4, PDL=True, TRIGGER_AFTER_LOOP=True,
                 PREFETCH_BLOCKS=G.SKINNY_PREFETCH_BLOCKS, MEMBERS=3, BLOCK_K=128, K_BLOCKS_OUTER=G.GEMV_K_BLOCKS_OUTER,
                 UNMASKED=False, HOST_TMA=False, stride_ak=1, stride_wk=1, stride_on=1, stride_wsk=1)  # what Triton specializes for contiguous operands


def before_wait(kernel, consts, num_stages):
    names = list(inspect.signature(kernel.fn).parameters)
    consts = {k: v for k, v in consts.items() if k in names}
    sig = {n: pointers.get(n, "constexpr" if n in consts else "i32") for n in names}
    aligned = [n for n in names if n in pointers or n in ("N", "K", "KB_PER_SPLIT", "N1", "N2", "PARTIAL_N",
                                                          "stride_am", "stride_wn", "stride_om",
                                                          "stride_asm", "stride_ask", "stride_wsn")]
    src = ASTSource(kernel, sig, {(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": num_stages}).asm["ptx"]
    wait = next(i for i, line in enumerate(ptx.splitlines()) if "griddepcontrol.wait" in line)
    return [line.strip() for line in ptx.splitlines()[:wait]]


def count(lines, *keys):
    return sum(any(k in line for k in keys) for line in lines)


def gemm_counts(lines):
    return {"trigger": count(lines, "griddepcontrol.launch_dependents"), "prefetch": count(lines, "prefetch.global.L2"),
            "memory": count(lines, "ld.", "st.", "cp.async.ca", "cp.async.cg", "cp.async.bulk", "atom.", "red.")
                      - count(lines, "ld.param")}


skinny = gemm_counts(before_wait(G.gemm_skinny_kernel, dict(streaming, SCALES_AHEAD=True, BLOCK_M=16, BLOCK_N=64,
                                                            GROUPS_K=1, TMA=False), num_stages=6))
skinny_pairs = gemm_counts(before_wait(G.gemm_skinny_kernel, dict(streaming, SCALES_AHEAD=True, BLOCK_M=16, BLOCK_N=64,
                                                                  GROUPS_K=2, TMA=False), num_stages=4))
skinny_tma = gemm_counts(before_wait(G.gemm_skinny_kernel, dict(streaming, SCALES_AHEAD=True, BLOCK_M=16, BLOCK_N=64,
                                                                GROUPS_K=2, TMA=True), num_stages=4))
gemv = gemm_counts(before_wait(G.gemm_gemv_kernel, dict(streaming, BLOCK_M=1, BLOCK_N=8, GROUPS_K=16), num_stages=1))
gemv_rows = gemm_counts(before_wait(G.gemm_gemv_kernel, dict(streaming, BLOCK_M=4, BLOCK_N=16, GROUPS_K=4), num_stages=1))
gemv_other_order = gemm_counts(before_wait(G.gemm_gemv_kernel, dict(streaming, BLOCK_M=1, BLOCK_N=8, GROUPS_K=16,
                                                                     K_BLOCKS_OUTER=not G.GEMV_K_BLOCKS_OUTER), num_stages=1))
gemv_unmasked = gemm_counts(before_wait(G.gemm_gemv_kernel, dict(streaming, BLOCK_M=1, BLOCK_N=8, GROUPS_K=16,
                                                                  UNMASKED=True), num_stages=1))

from blockwise_fp8.kernels import quant as Q
consts = dict(FP8_MAX=448.0, **format_constexprs(torch.float8_e4m3fn), CVT_FP8=True, PDL=True, PDL_WAIT=True,
              BLOCK_M=1, GROUP_M=1, BLOCK_K=128, GROUPS_K=8, stride_xk=1, stride_qk=1)
pointers = dict(x_ptr="*bf16", q_ptr="*fp8e4nv", scale_ptr="*fp32", K="i32")
lines = before_wait(Q.quantize_kernel, consts, num_stages=3)
quantize = {"trigger": count(lines, "griddepcontrol.launch_dependents"),
            "memory": count(lines, "ld.", "st.", "cp.async", "atom.", "red.", "prefetch") - count(lines, "ld.param")}
print(json.dumps({"skinny": skinny, "skinny_pairs": skinny_pairs, "skinny_tma": skinny_tma, "gemv": gemv,
                  "gemv_rows": gemv_rows,
                  "gemv_other_order": gemv_other_order, "gemv_unmasked": gemv_unmasked, "quantize": quantize}))
"""


def test_pdl_prologues_compile_for_sm90(tmp_path):
    """Under PDL the weight-streaming GEMMs (gemv, skinny) and the activation quantization may
    start while the kernel before them still writes their input: nothing may read or write memory
    before griddepcontrol.wait. A GEMM only asks L2 for its first weight blocks there, and does
    not trigger the next grid (measured slower); the quantization triggers first (its GEMM may
    launch and wait). Compiled for sm_90 in a fresh process: the interpreter never runs the PDL
    path."""
    import json
    import os
    import subprocess
    import sys

    from blockwise_fp8.kernels import quant

    if not quant._PDL_IN_TRITON:
        pytest.skip("this Triton has no programmatic dependent launch")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-c", _PDL_PROBE], capture_output=True,
                         text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    before_wait = json.loads(run.stdout.strip().splitlines()[-1])  # PTX lines before griddepcontrol.wait
    assert before_wait["skinny"] == {"trigger": 0, "memory": 0, "prefetch": G.SKINNY_PREFETCH_BLOCKS}
    assert before_wait["skinny_pairs"] == before_wait["skinny"]  # two K blocks per step
    assert before_wait["skinny_tma"] == before_wait["skinny"]  # its descriptors are made after the wait
    assert before_wait["gemv"] == {"trigger": 0, "memory": 0, "prefetch": G.SKINNY_PREFETCH_BLOCKS}
    assert before_wait["gemv_rows"] == before_wait["gemv"]  # BLOCK_M = 4: not GPU-run yet, compiled here
    assert before_wait["gemv_other_order"] == before_wait["gemv"]  # GEMV_K_BLOCKS_OUTER flipped
    assert before_wait["gemv_unmasked"] == before_wait["gemv"]  # GEMV_UNMASKED
    assert before_wait["quantize"] == {"trigger": 1, "memory": 0}


needs_cublas = pytest.mark.skipif(
    not (ON_GPU and ops.cublas_blockwise_available(torch.device("cuda"))), reason="needs sm_90 + cuBLAS blockwise"
)


@needs_cublas
@pytest.mark.parametrize("M", [8, 128, 1000])
@pytest.mark.parametrize("K", [2048, 1152])  # weight scales used in place (K % 512 == 0) / padded
def test_cublas_matches_reference(M, K):
    x, aq, as_, wq, ws, b = _operands(M, 1024, K, torch.float8_e4m3fn, seed=M)
    for bias in (None, b):
        out = bf.gemm(aq, as_, wq, ws, bias=bias, backend="cublas")
        # cuBLAS's blockwise kernel accumulates less precisely than ours: on the H100 it exceeded
        # the 2**-12 bound by up to 0.005 absolute; its own bound is looser.
        _check(out, aq, as_, wq, ws, bias, torch.bfloat16, acc_rel=2.0**-9)


@needs_cublas
@pytest.mark.parametrize("M", [1, 4])
def test_cublas_refuses_what_it_cannot_run(M):
    x, aq, as_, wq, ws, b = _operands(M, 1024, 2048, torch.float8_e4m3fn, seed=0)
    with pytest.raises(bf.BackendUnavailableError, match="M >= 8"):
        bf.gemm(aq, as_, wq, ws, backend="cublas")


@needs_cublas
@pytest.mark.parametrize("M", [9, 65, 257, 1001])
def test_cublas_pads_m_to_a_multiple_of_4(M):
    """cuBLAS itself refuses an M that is not a multiple of 4 (CUBLAS_STATUS_NOT_SUPPORTED): the
    backend appends zero rows and drops their outputs. Checked against the float64 reference, and
    "auto" linear on a shape its table gives cuBLAS (which it used to pass on unpadded, and fail)
    gives the explicit cuBLAS call's bits."""
    N, K = 4096, 1024  # (at M = 257, 96 tiles: not a grid just over one wave, which auto gives ours)
    x, aq, as_, wq, ws, b = _operands(M, N, K, torch.float8_e4m3fn, seed=M)
    out = bf.gemm(aq, as_, wq, ws, bias=b, backend="cublas")
    assert out.shape == (M, N) and out.is_contiguous()
    _check(out, aq, as_, wq, ws, b, torch.bfloat16, acc_rel=2.0**-9)
    family, sms = ops.gemm_card(wq.device)
    if M >= ops.CUBLAS_MIN_M and (family == "H100" or M > 128):  # (other cards: ours at M = 65-128)
        assert ops.choose_gemm_backend(M, N, K, *(torch.float8_e4m3fn,) * 2, torch.bfloat16,
                                       cublas_available=True, num_sms=sms, card=family) == "cublas"
        xb, bb = x.to(torch.bfloat16), b.to(torch.bfloat16)
        explicit = bf.gemm(*bf.quantize_activation(xb), wq, ws, bias=bb, backend="cublas")
        assert torch.equal(bf.linear(xb, wq, ws, bias=bb).view(torch.int16), explicit.view(torch.int16))


# --------------------------------------------------------------------------- gemm_group


def _group_operands(M, Ns, K, dtypes, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, 1, generator=g))
    a = {dt: reference.quantize(x, (1, 128), dt) for dt in set(dtypes)}
    members = []
    for n, dt in zip(Ns, dtypes):
        wq, ws = reference.quantize(torch.randn(n, K, generator=g) * 0.05, (128, 128), dt)
        b = torch.randn(n, generator=g) if bias else None
        members.append((wq.to(KERNEL_DEVICE), ws.to(KERNEL_DEVICE), None if b is None else b.to(KERNEL_DEVICE)))
    return {dt: (q.to(KERNEL_DEVICE), s.to(KERNEL_DEVICE)) for dt, (q, s) in a.items()}, members


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,Ns,K,bias", [
    (1, (128, 64, 200), 256, False),   # three members, one launch, ragged last member
    (3, (64, 130), 300, True),         # two members, ragged N and K, bias
    (2, (128, 64), 1280, False),       # split over K: partials and arrival counters per member tile
    (1, (128, 48), 2304, True),        # gemv split over K in whole steps of 8 blocks: 16 + 2
    (1, (1, 100, 3), 300, True),       # gemv members of N = 1 and ragged N (int32 member sizes)
    (5, (1, 64, 64, 100, 3), 512, True),  # five members: a launch of three, then one of two
    (40, (64, 96), 256, True),         # M above the skinny kernel: one GEMM per weight
])
def test_gemm_group_matches_reference(M, Ns, K, bias, out_dtype):
    a, members = _group_operands(M, Ns, K, [torch.float8_e4m3fn] * len(Ns), seed=M + K, bias=bias)
    aq, as_ = a[torch.float8_e4m3fn]
    outs = G.gemm_group(aq, as_, [m[0] for m in members], [m[1] for m in members], [m[2] for m in members],
                        out_dtype)
    assert len(outs) == len(members)
    for out, (wq, ws, b) in zip(outs, members):
        assert out.dtype == out_dtype and out.shape == (M, wq.shape[0]) and out.is_contiguous()
        _check(out, aq, as_, wq, ws, b, out_dtype)


@pytest.mark.parametrize("M", [1, 2])  # the gemv and skinny kernels
def test_gemm_group_one_launch_where_it_can(monkeypatch, M):
    """Three weights of one dtype and layout take one weight-streaming launch; scales in another
    layout, or a bias on only some, send the group back to one GEMM per weight (still right)."""
    launches = []
    real = G._launch_streaming
    monkeypatch.setattr(G, "_launch_streaming", lambda a, s, members, p, **kw: (launches.append((len(members), p.kind)),
                                                                                real(a, s, members, p, **kw)))
    kind = "gemv" if M == 1 else "skinny"
    a, members = _group_operands(M, (64, 256, 64), 256, [torch.float8_e4m3fn] * 3, seed=1, bias=False)
    aq, as_ = a[torch.float8_e4m3fn]
    G.gemm_group(aq, as_, [m[0] for m in members], [m[1] for m in members], [None] * 3, torch.bfloat16)
    assert launches == [(3, kind)]
    launches.clear()
    G.gemm_group(aq, as_, [m[0] for m in members], [m[1] for m in members],
                 [None, torch.zeros(256, device=KERNEL_DEVICE), None], torch.bfloat16)
    assert launches == [(1, kind)] * 3
    launches.clear()
    scales = [members[0][1], members[1][1].t().contiguous().t(), members[2][1]]  # column-major (2 x 2) scales
    assert scales[1].stride() != members[1][1].stride()
    outs = G.gemm_group(aq, as_, [m[0] for m in members], scales, [None] * 3, torch.bfloat16)
    assert launches == [(1, kind)] * 3
    _check(outs[1], aq, as_, members[1][0], scales[1], None, torch.bfloat16)
