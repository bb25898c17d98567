"""The backend choice of ops.py, tested by its logic (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

import blockwise_fp8 as bf
from blockwise_fp8 import ops

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
BF16 = torch.bfloat16


def test_cublas_in_backends():
    assert "cublas" in ops.BACKENDS


@pytest.mark.parametrize(
    "M,N,K,a,w,out,ok",
    [
        (8, 8192, 8192, E4, E4, BF16, True),
        (1, 8192, 8192, E4, E4, BF16, False),  # cuBLAS refuses M = 1
        (2, 8192, 8192, E4, E4, BF16, False),  # and M = 2
        (4, 8192, 8192, E4, E4, BF16, False),
        (1001, 8192, 8192, E4, E4, BF16, True),  # (run on rows padded to a multiple of 4)
        (128, 8192, 8192, E5, E5, BF16, False),  # e4m3 only
        (128, 8192, 8192, E4, E5, BF16, False),
        (128, 8192, 300, E4, E4, BF16, False),  # K % 128
        (128, 200, 8192, E4, E4, BF16, False),  # N % 16
        (128, 8192, 8192, E4, E4, torch.float32, torch.float32 in ops.CUBLAS_OUT_DTYPES),
    ],
)
def test_cublas_supports(M, N, K, a, w, out, ok):
    assert ops.cublas_supports(M, N, K, a, w, out) == ok


def test_choice_table():
    pick = lambda M, a=E4, avail=True, N=8192, K=8192: ops.choose_gemm_backend(  # noqa: E731
        M, N, K, a, a, BF16, cublas_available=avail)
    # decode range: our weight-streaming kernels
    assert pick(1) == "triton"
    assert pick(ops.CUBLAS_MIN_M - 1) == "triton"
    # large M: cuBLAS where it runs, Triton otherwise
    assert pick(ops.CUBLAS_MIN_M) == "cublas"
    assert pick(8192) == "cublas"
    assert pick(8192, a=E5) == "triton"
    assert pick(8192, avail=False) == "triton"
    assert pick(8192, K=300) == "triton"


# (M, N, K, auto's choice): each band's edges, on the shapes of the A/B the table was read from
# (benchmarks/results/ab-auto-mid-m-h100-2026-11-27-s12.txt; N <= 5120 at M <= 64 from
# ab-auto-mid-m-cold-h100-2026-11-27-s21.txt; N = 4096 from K = 2 N at M = 65-128 from ...-s23.txt)
@pytest.mark.parametrize(
    "M, N, K, expected",
    [
        (48, 5120, 4096, "triton"), (64, 5120, 4096, "triton"), (48, 5136, 4096, "cublas"),
        (64, 6144, 4096, "cublas"),
        (64, 7168, 2048, "cublas"), (64, 10240, 8192, "cublas"), (64, 14320, 4096, "cublas"),
        (64, 14336, 4096, "triton"), (64, 57344, 8192, "triton"),
        (65, 6144, 4096, "cublas"), (65, 14336, 4096, "cublas"), (65, 57344, 8192, "cublas"),
        (128, 4096, 4096, "cublas"), (128, 4096, 8064, "cublas"), (128, 4096, 8192, "triton"),
        (80, 4096, 8192, "triton"), (128, 4096, 12288, "triton"), (128, 4096, 14336, "triton"),
        (128, 4112, 14336, "cublas"), (128, 2048, 4096, "triton"),
        (129, 4096, 14336, "cublas"), (256, 2048, 7168, "triton"), (256, 2064, 7168, "cublas"),
        (257, 1024, 4096, "cublas"),
    ],
)
def test_choice_table_mid_m(M, N, K, expected):
    assert ops.choose_gemm_backend(M, N, K, E4, E4, BF16, cublas_available=True) == expected
    # e5m2 has no cuBLAS path, whatever the shape
    assert ops.choose_gemm_backend(M, N, K, E5, E5, BF16, cublas_available=True) == "triton"


# (M, N, K) at M < CUBLAS_MIN_M where sessions 20-21 gave an H100 cuBLAS (M >= 24, 6144 < N < 14336,
# K < 3 N): since the skinny kernel's paired K steps our kernel is faster there from memory
# (benchmarks/results/ab-auto-decode-cold-h100-2026-11-27-s22.txt), so every M < 33 is ours
@pytest.mark.parametrize("M, N, K", [(24, 8192, 8192), (32, 10240, 8192), (24, 6160, 4096), (32, 14320, 4096),
                                     (32, 8192, 24448), (32, 57344, 8192), (16, 10240, 8192)])
def test_choice_table_decode_range_is_ours(M, N, K):
    for sms in (132, 114):
        assert ops.choose_gemm_backend(M, N, K, E4, E4, BF16, cublas_available=True, num_sms=sms) == "triton"
    assert ops.choose_gemm_backend(ops.CUBLAS_MIN_M, N, K, E4, E4, BF16, cublas_available=True) == (
        "triton" if N >= ops.OURS_UP_TO_M64[1] else "cublas")


# (M, N, K, SMs, auto's choice) above M = 128: ours where its 128 x 128 tiles number more than the
# SMs and at most 4/3 of them, at K >= 7168 (cuBLAS would run a mostly empty second wave); cuBLAS
# otherwise
@pytest.mark.parametrize(
    "M, N, K, sms, expected",
    [
        (256, 10240, 8192, 132, "triton"),  # 160 tiles
        (256, 8192, 8192, 132, "cublas"),  # 128: one wave
        (256, 8320, 8192, 132, "cublas"), (256, 8576, 8192, 132, "triton"),  # 130 / 134 tiles
        (256, 11264, 8192, 132, "triton"), (256, 11392, 8192, 132, "cublas"),  # 176 / 178
        (384, 6144, 8192, 132, "triton"), (1024, 2304, 7168, 132, "triton"),  # 144
        (256, 10240, 7040, 132, "cublas"), (512, 5120, 4096, 132, "cublas"),  # K < 7168
        (512, 10240, 8192, 132, "cublas"), (8192, 8192, 8192, 132, "cublas"),  # 2.4 and 31 waves
        (129, 8960, 8192, 132, "triton"), (128, 18432, 8192, 132, "cublas"),  # 140 / 144: M <= 128 keeps its bands
        (256, 8192, 8192, 114, "triton"), (256, 10240, 8192, 114, "cublas"),  # 114 SMs: 128 / 160 tiles
    ],
)
def test_choice_table_one_wave_margin(M, N, K, sms, expected):
    assert ops.choose_gemm_backend(M, N, K, E4, E4, BF16, cublas_available=True, num_sms=sms) == expected


def test_resolve_backend_rules():
    cpu = torch.device("cpu")
    assert ops.resolve_backend("auto", cpu) == "reference"
    assert ops.resolve_backend("auto", cpu, op="gemm") == "reference"
    with pytest.raises(bf.BackendUnavailableError):
        ops.resolve_backend("cublas", cpu, op="gemm")
    with pytest.raises(bf.BackendUnavailableError):
        ops.resolve_backend("cublas", cpu, op="quantize")
    with pytest.raises(ValueError):
        ops.resolve_backend("cutlass", cpu, op="gemm")


def test_auto_on_cuda_defers_gemm_choice(monkeypatch):
    monkeypatch.setattr(ops, "_triton_importable", lambda: True)
    cuda = torch.device("cuda", 0)
    assert ops.resolve_backend("auto", cuda, op="gemm") == "auto"
    assert ops.resolve_backend("auto", cuda, op="linear") == "auto"
    assert ops.resolve_backend("auto", cuda, op="quantize") == "triton"


def test_explicit_cublas_on_cpu_tensors_raises():
    x = torch.randn(4, 256)
    aq, s = bf.quantize_activation(x, backend="reference")
    wq, ws = bf.quantize_weight(torch.randn(256, 256), backend="reference")
    with pytest.raises(bf.BackendUnavailableError):
        bf.gemm(aq, s, wq, ws, backend="cublas")
    with pytest.raises(bf.BackendUnavailableError):
        bf.linear(x, wq, ws, backend="cublas")
    with pytest.raises(bf.BackendUnavailableError):
        bf.quantize_activation(x, backend="cublas")


def test_cublas_scale_layout_helper():
    s = torch.randn(5, 3)
    m = ops._m_major(s)
    assert torch.equal(m, s) and m.stride() == (1, 5)
    assert ops._m_major(m) is m


@pytest.mark.parametrize("M, Kb", [(9, 3), (1001, 64), (6, 1)])
def test_cublas_row_padding(M, Kb):
    """The padded operands `_cublas_gemm` hands cuBLAS for an M it refuses (not a multiple of 4):
    zero rows up to one, the activation scales M-major with the padded M as their stride, as torch
    checks for cuBLAS."""
    g = torch.Generator().manual_seed(M)
    q = torch.randn(M, 128 * Kb, generator=g).to(E4)
    s = torch.rand(M, Kb, generator=g)
    m4 = -(-M // 4) * 4
    for scales in (s, ops._m_major(s)):  # row-major (a gemm call's) or M-major in
        pq, ps = ops._rows_padded_to_4(q, scales)
        assert pq.shape == (m4, 128 * Kb) and ps.shape == (m4, Kb) and ps.stride() == (1, m4)
        assert torch.equal(pq[:M].view(torch.uint8), q.view(torch.uint8)) and torch.equal(ps[:M], s)
        assert not pq[M:].float().any() and not ps[M:].any()


# (M, N, K, auto's choice on an "other" card, the H200's measurements): ours at every M = 65-128,
# and at M = 129-256 where the 128 x 128 tiles fill at most half the SMs at K >= 7168; elsewhere
# the H100's bands (benchmarks/results/mid-m-tight-rows-h200-2026-11-28-s35/ab-auto-mid-m.txt)
@pytest.mark.parametrize(
    "M, N, K, h100, other",
    [
        (64, 8192, 8192, "cublas", "cublas"),  # M <= 64: the H100's bands
        (65, 8192, 8192, "cublas", "triton"), (128, 6144, 4096, "cublas", "triton"),
        (128, 57344, 8192, "cublas", "triton"), (96, 4096, 4096, "cublas", "triton"),
        (130, 4096, 14336, "cublas", "triton"), (256, 4096, 7168, "cublas", "triton"),  # 64 tiles
        (256, 4224, 7168, "cublas", "triton"),  # 66 tiles: half of 132 SMs
        (256, 4352, 7168, "cublas", "cublas"),  # 68 tiles: more than half
        (200, 4096, 7040, "cublas", "cublas"),  # K < 7168
        (160, 8192, 28672, "cublas", "cublas"), (160, 6144, 4096, "cublas", "cublas"),
        (256, 10240, 8192, "triton", "triton"),  # just over one wave, on both
        (257, 4096, 14336, "cublas", "cublas"),  # M > 256
    ],
)
def test_choice_table_other_cards(M, N, K, h100, other):
    pick = lambda card: ops.choose_gemm_backend(M, N, K, E4, E4, BF16, cublas_available=True, card=card)  # noqa: E731
    assert (pick("H100"), pick("other")) == (h100, other)
    assert ops.choose_gemm_backend(M, N, K, E5, E5, BF16, cublas_available=True, card="other") == "triton"
