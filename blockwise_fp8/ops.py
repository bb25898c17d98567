"""The functional API: input checks, backend choice, and the ``torch.library`` custom ops.

Every public function here validates user input with real exceptions, resolves ``backend`` to
a concrete implementation, and calls a custom op (``torch.ops.blockwise_fp8.*``). The custom ops
have fake implementations, so ``torch.compile`` traces through them without graph breaks and
treats the kernels as opaque.

Backends:
    "auto"       the reference on CPU tensors. On CUDA: Triton for (de)quantization; for gemm and
                 linear, per call, the fastest supporting path of the table in
                 :func:`choose_gemm_backend` (our Triton kernels or cuBLAS).
    "triton"     our Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    "cublas"     gemm/linear only: ``torch.nn.functional.scaled_mm`` with BlockWise1x128 /
                 BlockWise128x128 scales (cuBLAS >= 12.9, sm_90, e4m3 only, M >= 8).
    "reference"  ``blockwise_fp8.reference`` (pure torch; float64 GEMM), any device.
An explicit backend that cannot run raises :class:`BackendUnavailableError`; nothing falls
back silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import reference, replay
from .kernels.card import card

__all__ = [
    "BackendUnavailableError",
    "BACKENDS",
    "FP8_DTYPES",
    "OUTPUT_DTYPES",
    "SUPPORTED_BLOCK_SIZES",
    "GEMM_BLOCK_SIZE",
    "quantize_activation",
    "quantize_weight",
    "dequantize",
    "gemm",
    "linear",
    "resolve_backend",
    "choose_gemm_backend",
    "cublas_supports",
    "cublas_blockwise_available",
    "gemm_card",
]

FP8_DTYPES = reference.FP8_DTYPES
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_BLOCK_SIZES = (32, 64, 128)  # powers of two: Triton tiles must be
GEMM_BLOCK_SIZE = 128  # the GEMM's K loop steps exactly one scale block
BACKENDS = ("auto", "triton", "cublas", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for these inputs on this machine."""


# --------------------------------------------------------------------------- validation


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d) for d in dtypes)


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_input_dtype(x: torch.Tensor, name: str) -> None:
    _check_tensor(x, name)
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} must be one of {_names(INPUT_DTYPES)}, got {x.dtype}")


def _check_fp8_dtype(dtype, name: str = "dtype") -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"{name} must be one of the supported FP8 dtypes {_names(FP8_DTYPES)}, got {dtype}")


def _check_fp8_tensor(q: torch.Tensor, name: str) -> None:
    _check_tensor(q, name)
    if q.dtype not in FP8_DTYPES:
        if q.dtype.is_floating_point and q.dtype.itemsize == 1:
            raise ValueError(f"{name} has unsupported FP8 dtype {q.dtype}; supported: {_names(FP8_DTYPES)}")
        raise TypeError(f"{name} must be an FP8 tensor ({_names(FP8_DTYPES)}), got {q.dtype}")


def _check_scale(scale: torch.Tensor, expected: tuple, name: str, of: str, of_shape) -> None:
    _check_tensor(scale, name)
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    if tuple(scale.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(scale.shape)}, but {of} of shape {tuple(of_shape)} needs "
            f"{tuple(expected)}"
        )


def _check_block_size(block_size, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    return block_size


def _check_out_dtype(dtype, name: str = "out_dtype") -> None:
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"{name} must be one of {_names(OUTPUT_DTYPES)}, got {dtype}")


def _check_same_device(**tensors) -> torch.device:
    first = None
    for t in tensors.values():
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            devices = {name: t.device for name, t in tensors.items() if t is not None}
            raise ValueError(f"all tensors must be on one device, got {devices}")
    return first


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- backend choice


# Found once at import (without importing triton): torch.compile traces `linear`, and a call
# into importlib there would break the graph at every Linear.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _TRITON_FOUND


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, *, op: str = "quantize") -> str:
    """Check ``backend`` for tensors on ``device`` and an ``op`` ("quantize", "dequantize", "gemm"
    or "linear"); return what the custom op receives, or raise.

    "auto" on CPU is "reference". "auto" on CUDA is "triton" for (de)quantization and stays
    "auto" for gemm/linear: those pick per call, by shape, in :func:`choose_gemm_backend`.
    "cublas" serves only gemm/linear, and only where :func:`cublas_blockwise_available`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gemm_like = op in ("gemm", "linear")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        if not _triton_importable():
            raise BackendUnavailableError(
                "backend='auto' on CUDA uses Triton, which is not installed; install triton or pass "
                "backend='reference'"
            )
        return "auto" if gemm_like else "triton"
    if backend == "cublas":
        if not gemm_like:
            raise BackendUnavailableError(f"backend='cublas' serves gemm and linear only, not {op}")
        if device.type != "cuda" or not cublas_blockwise_available(device):
            raise BackendUnavailableError(
                "backend='cublas' needs torch's blockwise torch._scaled_mm (torch.nn.functional.scaled_mm "
                f"with ScalingType.BlockWise1x128/BlockWise128x128, cuBLAS >= 12.9) on a Hopper (sm_90) GPU; "
                f"got tensors on {device}"
            )
    if backend == "triton":
        if not _triton_importable():
            raise BackendUnavailableError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not _interpreting():
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on CPU (slowly), or use backend='reference'"
            )
    return backend


# The per-call choice for gemm/linear under backend="auto" on CUDA.
#
# cuBLAS's blockwise kernel (torch._scaled_mm with 1x128 / 128x128 float32 scales) exists only on
# sm_90 with cuBLAS >= 12.9, takes only e4m3 operands, needs 16-byte aligned leading dimensions
# and refuses small M (M = 1 and 2 seen; 8 runs). Where it runs, whether it is faster than our Triton kernels depends on M:
# the weight-streaming Triton kernels (gemv at M = 1, skinny) win the decode range, the persistent TMA kernel and
# cuBLAS trade places above it. The thresholds below are read off the H100 benchmark
# (benchmarks/results/, benchmarks/NOTES.md); they are the only tuned numbers in the choice.
CUBLAS_MIN_M = 33  # below, the weight-streaming kernels (M <= 32) win (on an H100 since session 22, below);
# from here cuBLAS is considered, and our tma/ws kernels keep the shapes where their output grid
# leaves SMs idle and they split K over it (kernels/gemm.py, _persistent_grid) while cuBLAS does not:
OURS_UP_TO_M64 = (5120, 14336)  # M <= 64: ours for N <= 5120 or N >= 14336
OURS_UP_TO_M128 = 4096  # M <= 128: ours for N <= 2048, and for N <= 4096 where K >= 2 N (session 23)
OURS_UP_TO_M256 = 2048  # M <= 256: ours for N <= 2048
# Read off an H100 A/B of both on twelve Llama-3 / DeepSeek-V3 / grid shapes at M = 48-256 (e4m3,
# CUDA graphs; benchmarks/results/ab-auto-mid-m-h100-2026-11-27-s12.txt), ours / cuBLAS:
#   M = 48-64: N <= 6144 0.62-1.01 (4096 x 4096 0.85-0.86, 2048 x 7168 0.62-0.88, 6144 x 4096 0.99-1.01);
#              N >= 14336 0.94-1.02 (57344 x 8192 0.94-0.95); N = 7168-10240 1.03-1.28 (7168 x 2048 1.28)
#   M = 80-128: N <= 2048 0.63-0.83; 4096 x 14336 0.92-0.93; 4096 x 4096 1.01-1.04, 6144 x 4096 1.09-1.11
#   M = 160-256: N <= 2048 0.82-0.85; 4096 x 14336 1.15-1.18; every other shape 1.08-1.56
# (ours then ran the tma kernel's 64-row tiles on most of these. Since session 34, M = 129-256 with
# K >= 7168 runs the ws kernel's 128-row tiles, kernels/gemm.py. On an H200 those beat cuBLAS:
# 43.6 against 55.6 us at M = 130, 10240 x 8192; 35.3 against 41.1 at M = 200, 4096 x 14336;
# results/mid-m-h200-2026-11-28-s34/. The band waits for an H100 A/B.)
# Since session 21 the skinny kernel serves M = 33-64 on weights of up to 8192 x 8192 (kernels/
# gemm.py, plan()), so M = 40 and 64 were timed again, both sides over weights streamed from memory
# (ab_auto.py --cold; results/ab-auto-mid-m-cold-h100-2026-11-27-s21.txt): 4096 x 4096 0.78-0.86,
# 4096 x 8192 0.71-0.77, 2048 x 4096 0.69-0.80, 5120 x 3072 0.91-1.00, but 6144 x 4096 1.02-1.09
# (and 1.12-1.22 with the weight in L2, which favours cuBLAS, ab-auto-mid-m-h100-2026-11-27-s21.txt),
# so N = 6144 went to cuBLAS at M <= 64; 8192 x 8192 and 8192 x 4096 stay cuBLAS's (1.04-1.10).
# Since session 23 the ws kernel's 128 x 128 tiles on about half the SMs serve M = 65-128 where the
# scales ride its ring (kernels/gemm.py, _half_card_plan); timed again from memory at M = 80-128
# (results/ab-auto-mid-m-cold-h100-2026-11-27-s23.txt), ours / cuBLAS: 4096 x 8192 0.87-0.88 (21.5
# vs 24.5-24.7 us), so N = 4096 is ours from K = 2 N (was 3 N); 4096 x 14336 0.80, 2048 x 7168 0.68,
# 1024 x 4096 0.83; cuBLAS kept 4096 x 4096 (1.02-1.03), 3072 x 3072 (1.10), 6144 x 4096 (1.11-1.13)
# and 8192 x 4096 (1.08-1.12). (Since session 24 those tiles read the scales from memory where each
# program runs <= 32 K blocks, 1024 x 4096, 2048 x 7168 and 4096 x 8192 among them: as fast or 3-7%
# faster there, results/probe-half-card-memory-h100-2026-11-27-s24.txt, so the table stands.)
# Above M = 256 cuBLAS was faster wherever it runs (the Triton 3.6 GEMM grid,
# benchmarks/results/grid-selfheat-h100-2026-11-27-s27/), except on grids just over one wave
# (below). Under Triton 3.9 our ws kernel read 6.7% faster at M = 512, N = 10240, K = 8192 e4m3
# (83.9 against 89.9 us) and 1.8% at M = 512, N = 8192, K = 28672 in the grid (results/summary.md),
# one run each with a same-kernel spread of +-5%: not an A/B, so the table does not yet follow.
#
# Sessions 20-21 gave cuBLAS M = 24-32 on an H100 where 6144 < N < 14336 and K < 3 N (it was 1-8%
# faster there with the weight in L2, results/ab-auto-decode-h100-2026-11-27-s20.txt). Since the
# skinny kernel loads K blocks in pairs (session 22) it is faster at M = 24 and 32 on all five such
# shapes timed from memory, as in a model's decode step (rotated A/B, ours / cuBLAS,
# results/ab-auto-decode-cold-h100-2026-11-27-s22.txt): 8192 x 8192 0.97, 0.99; 10240 x 8192
# 0.98, 0.99; 11008 x 4096 0.94, 0.94; 12288 x 4096 0.84, 0.93; 7168 x 2048 0.84, 0.84. So every
# card now starts cuBLAS at CUBLAS_MIN_M.
# Grids just over one wave: where our 128 x 128 output tiles number more than the card's SMs but at
# most 4/3 of them (M > 128, K >= 7168), cuBLAS runs a second, mostly empty wave, and our ws
# kernel's tail split (`_tail_split`) spreads the tiles left over K on every SM instead. H100, e4m3,
# rotated A/B, ours / cuBLAS (results/ab-auto-decode-h100-2026-11-27-s20.txt), tiles on 132 SMs:
# K >= 7168: 136 tiles 0.90 (M = 256, N = 8704), 144 0.90 (384 x 6144) and 0.92 (1024 x 2304,
# K = 7168), 160 0.91 (512 x 5120) and 0.95 (256 x 10240; 50.3-51.4 us against 53.4-55.5 in three
# runs, and 44.4 against 51-52 on an H200), 168 0.93, 176 0.97 (256 x 11264); but 320 tiles (2.4
# waves) 1.03 and 128 (one wave) 1.10. At K = 4096 cuBLAS won at 144-160 tiles (1.08-1.12).
ONE_WAVE_MARGIN = 4 / 3
ONE_WAVE_MIN_K = 7168
CUBLAS_OUT_DTYPES = (torch.bfloat16,)  # output dtypes we route to cuBLAS
# The linear op (eager calls; compiled graphs record quantize_input + gemm instead, see `linear`):
# quantize inside the weight-streaming GEMM for M <= this, one launch instead of two. On the GPU
# the fused kernels are slower: the skinny one (which quantizes a 16-row padded tile per K block
# in every program) 47.5 vs 30.0 us at M = 1, 8192 x 8192, and slower at every M = 1..32 tried; the
# gemv kernel's (M = 1, session 8) 6.7 vs 6.3 us at N = K = 4096, 45.7 vs 42.1 at gate|up
# (benchmarks/tune_skinny.py --fused). But an eager decode step is bound by host time
# (results/model-eager-h100-2026-11-27-s12.md: 11.5 ms for a 4-layer step against 3.7 for bf16),
# where a launch saved outweighs that: H100, eager 4-layer Llama-3-8B decode step at batch 1,
# alternating in one process, 5.4-8.3 ms fused against 6.6-10.5 two-step, faster in 8 of 9
# alternations by 18-37% and 1.7% slower in one (results/eager-fused-ab-h100-2026-11-27-s12.txt).
# So M = 1 fuses in eager calls (session 12), but not while a stream is capturing a CUDA graph:
# replayed, where no host time is left to save, the two launches are faster, and by more since
# the gemv's 8-row tiles (session 10: twice the programs, each re-quantizing the activation): on
# the GEMM grid's weights (64-470 MB) 24-42% (N = K = 8192: 34.5 vs 26.8 us; N = 57344: 217.7 vs
# 153.8; H100, benchmarks/NOTES.md sixteenth session). A capture can only replay kernels an eager
# call has loaded (Triton cannot load one while a stream captures), so the first eager call of a
# shape takes the two launches and later ones fuse (`_quantize_inside`).
# Eagerly, one call costs ~70-110 us of host time (H100 machine, session 17); the fused kernel's
# extra GPU time stays hidden under it while the weight is at most FUSED_QUANT_MAX_WEIGHT
# elements. Eager loops of one M = 1 linear, fused vs two launches (us per call; results/
# eager-fused-ab-h100-2026-11-27-s17.txt): 4096 x 14336 115 vs 115, 28672 x 4096 (117 M) 66 vs 98,
# 10240 x 8192 106 vs 158, but 8192 x 28672 (235 M) 105 vs 100 and 57344 x 8192 219 vs 156.
FUSED_QUANT_MAX_M = 1
FUSED_QUANT_MAX_WEIGHT = 1 << 27
_TWO_STEP_LOADED: set = set()  # (device, N, K, dtypes, bias?) of M = 1 calls that ran the two launches once


def _quantize_inside(x: torch.Tensor, w_q: torch.Tensor, bias, activation_dtype, out_dtype) -> bool:
    """Whether an "auto" linear call quantizes its activation inside the GEMM (one launch)."""
    if x.shape[0] > FUSED_QUANT_MAX_M or activation_dtype != w_q.dtype or w_q.numel() > FUSED_QUANT_MAX_WEIGHT:
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    key = (x.device, w_q.shape, x.dtype, w_q.dtype, out_dtype, bias is None)
    if key not in _TWO_STEP_LOADED:
        _TWO_STEP_LOADED.add(key)  # this call loads the kernels a later capture replays
        return False
    return True


def cublas_supports(M: int, N: int, K: int, a_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Shape/dtype rules of cuBLAS's blockwise FP8 GEMM (pure logic, no device query)."""
    return (
        a_dtype == torch.float8_e4m3fn
        and w_dtype == torch.float8_e4m3fn
        and out_dtype in CUBLAS_OUT_DTYPES
        # seen on an H100 (cuBLAS 13.0, M = 1..139 and a few above): CUBLAS_STATUS_NOT_SUPPORTED
        # for every M < 8, and for every M not a multiple of 4, which `_cublas_gemm` pads
        and M >= 8
        and K % 128 == 0
        and N % 16 == 0
    )


# Other cards than the H100 (``gemm_card``'s "other": the H200's measurements, as for the plans'
# CARD_PLANS, where M = 65-256 runs the ws kernel's 128 x 128 tiles, kernels/gemm.py). H200, e4m3,
# our plans of session 35 against cuBLAS, best of 2 alternating rounds, ours / cuBLAS
# (results/mid-m-tight-rows-h200-2026-11-28-s35/ab-auto-mid-m.txt):
#   M = 80-128: 4096 x 14336 0.63-0.64, 8192 x 28672 0.86-0.88, 4096 x 4096 0.87-0.88, 6144 x 4096
#     0.94, 10240 x 8192 0.97-0.99; 8192 x 8192 1.01-1.02. So ours at every M = 65-128 there.
#   M = 130-250: 4096 x 14336 (64 tiles, K = 14336) 0.82 (and in session 34's probe 4096 x 8192
#     19.3-20.1 us against cuBLAS 24.7-29.9); 4096 x 4096 1.00-1.01, 6144 x 4096 1.04-1.13, 8192 x
#     28672 1.03-1.05 at M >= 160, 8192 x 8192 0.95-0.98. So ours where the tiles fill at most half
#     the SMs at K >= ONE_WAVE_MIN_K, the other bands as on an H100.
# (Like the H100's M = 65-128 bands, these assume the ws kernel runs: Gluon, kernels/gemm_hopper.py
# AVAILABLE. Without it our mid-M tiles are the tma kernel's, and no band was measured that way.)


def choose_gemm_backend(
    M: int, N: int, K: int, a_dtype: torch.dtype, w_dtype: torch.dtype, out_dtype: torch.dtype, *,
    cublas_available: bool, num_sms: int = 132, card: str = "H100",
) -> str:
    """The "auto" table: "cublas" where cuBLAS runs the call and was measured faster, else "triton".
    ``num_sms`` and ``card``: the card's SM count and family (``gemm_card``; the defaults are the
    H100's; "other" is measured on an H200)."""
    if not (cublas_available and M >= CUBLAS_MIN_M and cublas_supports(M, N, K, a_dtype, w_dtype, out_dtype)):
        return "triton"
    h100 = card == "H100"
    if M <= 64:
        ours = N <= OURS_UP_TO_M64[0] or N >= OURS_UP_TO_M64[1]
    elif M <= 128:
        ours = not h100 or N <= OURS_UP_TO_M256 or (N <= OURS_UP_TO_M128 and K >= 2 * N)
    else:
        tiles = _cdiv(M, 128) * _cdiv(N, 128)
        just_over_one_wave = K >= ONE_WAVE_MIN_K and num_sms < tiles <= num_sms * ONE_WAVE_MARGIN
        half_card_long_k = not h100 and M <= 256 and 2 * tiles <= num_sms and K >= ONE_WAVE_MIN_K
        ours = (M <= 256 and N <= OURS_UP_TO_M256) or just_over_one_wave or half_card_long_k
    return "triton" if ours else "cublas"


def _probe_cublas_blockwise(device_index: int) -> bool:
    F = torch.nn.functional
    if not (torch.cuda.is_available() and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return False
    if not hasattr(F.ScalingType, "BlockWise1x128") or torch.version.cuda is None:
        return False
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    return torch.cuda.get_device_capability(device_index) == (9, 0) and (major, minor) >= (12, 9)


# device index -> answer. A plain dict, not functools.lru_cache: torch.compile traces `linear`
# (BlockwiseFP8Linear) and reads a filled dict as a constant.
_CUBLAS_BLOCKWISE: dict = {}


def cublas_blockwise_available(device: torch.device) -> bool:
    """Whether this torch build and GPU offer the blockwise cuBLAS GEMM."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUBLAS_BLOCKWISE:
        _CUBLAS_BLOCKWISE[index] = _probe_cublas_blockwise(index)
    return _CUBLAS_BLOCKWISE[index]


def _m_major(a_scale: torch.Tensor) -> torch.Tensor:
    """cuBLAS wants the activation scales with strides (1, M)."""
    M = a_scale.shape[0]
    if a_scale.stride(0) == 1 and (a_scale.stride(1) == M or a_scale.shape[1] == 1):
        return a_scale
    return a_scale.t().contiguous().t()


def _rows_padded_to_4(a_q: torch.Tensor, a_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation with zero rows appended up to a multiple of 4, its scales (any layout in)
    M-major with the padded M as their stride: cuBLAS refuses other M
    (CUBLAS_STATUS_NOT_SUPPORTED, H100, cuBLAS 13.0; its M-major scales must start every column on 16
    bytes, and torch checks for stride M exactly, so a padded stride alone will not do). The eager
    linear quantizes into padded rows (no copy); a gemm call copies its FP8 rows. H100, e4m3, M = 257,
    1001, 4097 on four grid shapes, same run (results/cublas-padded-m-h100-2026-11-27-s17.txt):
    linear padded cuBLAS 4-26% faster than ours on all 12 (M = 4097, N = 57344: 3527 vs 3978 us);
    gemm 0-24% faster on 9, 2-5% slower on 3 (M = 1001, N = K = 8192: 135.8 vs 132.0)."""
    M, K = a_q.shape
    m4 = _cdiv(M, 4) * 4
    q = a_q.new_empty((m4, K))
    q[:M] = a_q
    q[M:] = 0
    s = a_scale.new_empty((a_scale.shape[1], m4)).t()
    s[:M] = a_scale
    s[M:] = 0
    return q, s


def _cublas_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype) -> torch.Tensor:
    F = torch.nn.functional
    M, K = a_q.shape
    N = w_q.shape[0]
    if not cublas_supports(M, N, K, a_q.dtype, w_q.dtype, out_dtype):
        raise BackendUnavailableError(
            f"backend='cublas' cannot run M={M}, N={N}, K={K}, {a_q.dtype} x {w_q.dtype} -> {out_dtype}: "
            f"cuBLAS blockwise needs e4m3 operands, M >= 8, K % 128 == 0, N % 16 == 0 and out_dtype in "
            f"{_names(CUBLAS_OUT_DTYPES)}"
        )
    kb = _cdiv(K, 128)
    kb4 = _cdiv(kb, 4) * 4
    # cuBLAS wants the weight scales as (round_up(Kb, 4), Nb) with strides (1, round_up(Kb, 4)).
    # A contiguous w_scale with Kb % 4 == 0 (K % 512 == 0: every Llama/DeepSeek shape) is already
    # that layout once transposed; only other K need a padded copy (one small kernel per call).
    if kb4 == kb and w_scale.is_contiguous():
        ws = w_scale
    else:
        ws = w_scale.new_zeros((w_scale.shape[0], kb4))
        ws[:, :kb] = w_scale
    if M % 4:
        a_q, a_s = _rows_padded_to_4(a_q, a_scale)  # (writes them M-major itself)
    else:
        a_s = _m_major(a_scale)
    out = F.scaled_mm(
        a_q, w_q.t(), a_s, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
        output_dtype=out_dtype,
    )
    if M % 4:  # (a slice is one more op of host time, a few us: only where rows were appended)
        out = out[:M]
    if bias is not None:
        out += bias.to(out_dtype)
    return out


# device index -> (card, SM count) for choose_gemm_backend; a plain dict, as _CUBLAS_BLOCKWISE.
_GEMM_CARD: dict = {}


def gemm_card(device: torch.device) -> tuple[str, int]:
    """("H100" where the device's name says H100, else "other"; its SM count): the choice table reads
    the SM count (("other", 1) off CUDA, where the table is not consulted: cuBLAS is unavailable
    there)."""
    if device.type != "cuda":
        return ("other", 1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _GEMM_CARD:
        _GEMM_CARD[index] = card(index)
    return _GEMM_CARD[index]


def _gemm_backend_for_call(backend: str, M: int, K: int, a_dtype: torch.dtype, w_q, out_dtype) -> str:
    """Resolve "auto" for one gemm/linear call on CUDA (explicit backends pass through)."""
    if backend != "auto":
        return backend
    family, num_sms = gemm_card(w_q.device)
    return choose_gemm_backend(
        M, w_q.shape[0], K, a_dtype, w_q.dtype, out_dtype, cublas_available=cublas_blockwise_available(w_q.device),
        num_sms=num_sms, card=family,
    )


_KERNEL_MODULES: list = []


def _kernels():
    """(kernels.gemm, kernels.quant), imported on first use: ``ops`` itself imports without Triton."""
    if not _KERNEL_MODULES:
        from .kernels import gemm, quant

        _KERNEL_MODULES.extend((gemm, quant))
    return _KERNEL_MODULES


def _on_device(t: torch.Tensor):
    """The CUDA device of ``t`` made current for the kernels' launches (a no-op context where it
    already is: entering and leaving torch.cuda.device costs a few microseconds a call)."""
    if t.device.type != "cuda" or t.device.index == torch._C._cuda_getDevice():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


# --------------------------------------------------------------------------- custom ops
#
# The ops are registered straight with the dispatcher (Library.define + impl), not with
# torch.library.custom_op: custom_op wraps every call in Python layers (an autograd shim, output
# aliasing checks) that measured 100-600 us of host time per call on the H100 machine
# (benchmarks/host_overhead.py), several times the GPU time of a decode-size GEMM. These ops have
# no autograd formula; BlockwiseFP8Tensor supplies gradients around them (tensor.py).

_LIB = torch.library.Library("blockwise_fp8", "DEF")


class _NoGradientFormula(torch.autograd.Function):
    """Runs an op on inputs that require grad; backward raises. Without an autograd kernel the
    dispatcher's fallback would hand back wrong gradients with only a warning."""

    @staticmethod
    def forward(ctx, op, *args):
        ctx.op_name = op.name()
        return op(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{ctx.op_name} has no gradient formula. Input and bias gradients through a quantized Linear "
            "come from BlockwiseFP8Tensor weights (quantize_ with BlockwiseFP8Config); otherwise call it "
            "under torch.no_grad()"
        )


# Eager calls with nothing to intercept them skip the dispatcher: they call the op's body, which is
# all its one kernel (CompositeExplicitAutograd) would run. The round trip through the dispatcher
# into a Python kernel measured about 10 us of an eager linear's 100-150 us of host time
# (benchmarks/NOTES.md, sessions 24 and 39). Everything that sees ops goes on through it: tracing
# and compiling (fake tensors, torch.compile, torch.jit.trace), tensor subclasses, TorchDispatchModes
# and TorchFunctionModes, functorch transforms (vmap, grad) and the profiler, which records the op's
# name. Set False to send every call through the dispatcher.
DIRECT_EAGER_CALLS = True


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # a Parameter overrides nothing
_NOT_TENSORS = (int, float, bool, str, torch.dtype, type(None))  # the ops' other argument types


def _plain_tensors(args) -> bool:
    for a in args:
        kind = type(a)
        if kind in _PLAIN_TENSOR_TYPES or kind in _NOT_TENSORS:
            continue
        if kind is list or kind is tuple:  # gemm_group's weights
            if not _plain_tensors(a):
                return False
        else:  # a tensor subclass (fake, functional, DTensor, ...) or anything unforeseen
            return False
    return True


def _nothing_intercepts(args) -> bool:
    """Whether an eager call of one of our ops on ``args`` would reach its kernel untouched (the
    mode of a call being recorded for replay watches it without intercepting)."""
    C = torch._C
    return (
        (C._len_torch_dispatch_stack() == 0 or (C._len_torch_dispatch_stack() == 1 and replay.watching()))
        and not C._is_torch_function_mode_enabled()
        and not C._are_functorch_transforms_active()
        and not C._autograd._profiler_enabled()
        and C._get_tracing_state() is None  # torch.jit.trace records ops through the dispatcher
        and _plain_tensors(args)
    )


# Eager ``linear`` calls replay the launches recorded from earlier calls of the same key
# (blockwise_fp8.replay): the checks, the backend table and the kernels' plans ran for that key
# already. Set False to run every call's Python in full.
REPLAY_EAGER_CALLS = True


def _eager_key(x, w_q, w_scale, bias, activation_dtype, out_dtype, backend):
    """What an eager ``linear`` call's launches depend on, or None where the call must run in full
    (see blockwise_fp8.replay): any tensor not plain, autograd to record, anything intercepting
    ops, a CUDA graph being captured, another device current, the reference backend."""
    plain = _PLAIN_TENSOR_TYPES
    if type(x) not in plain or type(w_q) not in plain or type(w_scale) not in plain:
        return None
    if type(backend) is not str or backend == "reference" or type(activation_dtype) is not torch.dtype:
        return None  # (a wrong type is for the checks to report)
    if out_dtype is not None and type(out_dtype) is not torch.dtype:
        return None
    device = x.device
    if device.type == "cuda":
        if device.index != torch._C._cuda_getDevice() or torch.cuda.is_current_stream_capturing():
            return None
        stream = torch._C._cuda_getCurrentRawStream(device.index)
    elif backend == "triton" and _interpreting():
        stream = None
    else:
        return None
    if bias is None:
        b = None
    elif type(bias) not in plain:
        return None
    else:
        b = (bias.shape, bias.stride(), bias.dtype, bias.device, bias.data_ptr() & 15, bias.requires_grad)
    if torch.is_grad_enabled() and (x.requires_grad or w_q.requires_grad or w_scale.requires_grad or (b and b[5])):
        return None
    if not _nothing_intercepts(()):
        return None
    return (
        x.shape, x.stride(), x.dtype, device, x.data_ptr() & 15,
        w_q.shape, w_q.stride(), w_q.dtype, w_q.device, w_q.data_ptr() & 15,
        w_scale.shape, w_scale.stride(), w_scale.dtype, w_scale.device, w_scale.data_ptr() & 15,
        b, activation_dtype, out_dtype, backend, stream, os.environ.get("BLOCKWISE_FP8_PDL"),
    )


def _custom_op(name: str):
    """Define ``torch.ops.blockwise_fp8.<name>`` from the annotated function; return a caller of
    it (the op itself is ``.op``) that refuses to be differentiated through, and that runs the
    function directly where nothing would intercept the op (``DIRECT_EAGER_CALLS``)."""

    def register(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        op = getattr(torch.ops.blockwise_fp8, name).default

        def call(*args):
            if torch.is_grad_enabled():
                for a in args:
                    if isinstance(a, torch.Tensor) and a.requires_grad:
                        return _NoGradientFormula.apply(op, *args)
            # is_compiling first: Dynamo folds it, and never traces the checks after it
            if not torch.compiler.is_compiling() and DIRECT_EAGER_CALLS and _nothing_intercepts(args):
                return fn(*args)
            return op(*args)

        call.op = op
        return call

    return register


@_custom_op("quantize")
def _quantize_op(
    x: torch.Tensor, group_m: int, block_k: int, dtype: torch.dtype, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "reference":
        return reference.quantize(x, (group_m, block_k), dtype)
    with _on_device(x):
        if group_m > 1:
            return _kernels()[1].quantize(x, group_m, block_k, dtype)
        return _quantize_for_gemm(x, dtype, block_k=block_k)  # an activation, for a gemm call to come


def _quantize_for_gemm(x: torch.Tensor, dtype: torch.dtype, *, block_k: int = GEMM_BLOCK_SIZE,
                       scale_m_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D activation ``x`` quantized in 1 x ``block_k`` blocks for our GEMM kernels: into
    storage of rows padded with zeros to ``kernels.gemm.activation_rows`` (the large-M kernels' TMA
    boxes then stay within it, ``kernels.gemm_hopper.rows_view``), handed on as views of its first
    M rows (no view where nothing was padded)."""
    M = x.shape[0]
    rows = _kernels()[0].activation_rows(M, scale_m_major)
    q, scale = _kernels()[1].quantize(x, 1, block_k, dtype, scale_m_major=scale_m_major, rows_multiple_of=rows)
    return (q, scale) if q.shape[0] == M else (q[:M], scale[:M])


@torch.library.register_fake(_quantize_op.op)
def _(x, group_m, block_k, dtype, backend):
    M, K = x.shape
    q = x.new_empty((M, K), dtype=dtype)
    return q, x.new_empty((_cdiv(M, group_m), _cdiv(K, block_k)), dtype=torch.float32)


@_custom_op("dequantize")
def _dequantize_op(
    q: torch.Tensor, scale: torch.Tensor, group_m: int, block_k: int, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    if backend == "reference":
        return reference.dequantize(q, scale, (group_m, block_k), dtype)
    with _on_device(q):
        return _kernels()[1].dequantize(q, scale, group_m, block_k, dtype)


@torch.library.register_fake(_dequantize_op.op)
def _(q, scale, group_m, block_k, dtype, backend):
    return q.new_empty(q.shape, dtype=dtype)


@_custom_op("gemm")
def _gemm_op(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    if backend == "reference":
        return reference.gemm(a_q, a_scale, w_q, w_scale, block_size=GEMM_BLOCK_SIZE, out_dtype=out_dtype, bias=bias)
    gemm_kernels = _kernels()[0]
    with _on_device(a_q):
        if _gemm_backend_for_call(backend, *a_q.shape, a_q.dtype, w_q, out_dtype) == "cublas":
            return _cublas_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype)
        return gemm_kernels.gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype)


@torch.library.register_fake(_gemm_op.op)
def _(a_q, a_scale, w_q, w_scale, bias, out_dtype, backend):
    return a_q.new_empty((a_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@_custom_op("gemm_group")
def _gemm_group_op(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: list[torch.Tensor],
    w_scale: list[torch.Tensor],
    bias: list[Optional[torch.Tensor]],
    out_dtype: torch.dtype,
    backend: str,
) -> list[torch.Tensor]:
    # gemm of one activation against several weights: what compiled graphs run for Linears that
    # share an input (blockwise_fp8.fusion). The gemv and skinny kernels take up to three weights
    # per launch; weights that "auto" sends to cuBLAS, and every other backend, run one by one.
    if backend == "reference":
        return [_gemm_op.op(a_q, a_scale, w, s, b, out_dtype, backend) for w, s, b in zip(w_q, w_scale, bias)]
    gemm_kernels = _kernels()[0]
    M, K = a_q.shape
    with _on_device(a_q):
        routes = [_gemm_backend_for_call(backend, M, K, a_q.dtype, w, out_dtype) for w in w_q]
        ours = [i for i, r in enumerate(routes) if r != "cublas"]
        outs: list = [None] * len(w_q)
        for i, out in zip(ours, gemm_kernels.gemm_group(
            a_q, a_scale, [w_q[i] for i in ours], [w_scale[i] for i in ours], [bias[i] for i in ours], out_dtype
        )):
            outs[i] = out
        for i, r in enumerate(routes):
            if r == "cublas":
                outs[i] = _cublas_gemm(a_q, a_scale, w_q[i], w_scale[i], bias[i], out_dtype)
        return outs


@torch.library.register_fake(_gemm_group_op.op)
def _(a_q, a_scale, w_q, w_scale, bias, out_dtype, backend):
    return [a_q.new_empty((a_q.shape[0], w.shape[0]), dtype=out_dtype) for w in w_q]


@_custom_op("linear")
def _linear_op(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation_dtype: torch.dtype,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    # One op for quantize + GEMM in eager calls: one dispatcher round trip, and the kernels are
    # free to fuse the activation quantization into the GEMM. Compiled graphs record the two
    # halves instead (quantize_input + gemm, see `linear`) so Linears of one input share the first.
    if backend == "reference":
        return reference.linear(
            x, w_q, w_scale, bias, activation_dtype=activation_dtype, block_size=GEMM_BLOCK_SIZE, out_dtype=out_dtype
        )
    gemm_kernels, quant = _kernels()
    M, K = x.shape
    with _on_device(x):
        if backend == "auto" and _quantize_inside(x, w_q, bias, activation_dtype, out_dtype):
            # one launch, bit-identical to the two below
            return gemm_kernels.linear_fused(x, w_q, w_scale, bias, out_dtype)
        backend = _gemm_backend_for_call(backend, M, K, activation_dtype, w_q, out_dtype)
        if backend == "cublas":
            # M-major scales written so directly, into zero rows appended up to a multiple of 4:
            # cuBLAS needs such M (see _rows_padded_to_4)
            a_q, a_scale = quant.quantize(x, 1, GEMM_BLOCK_SIZE, activation_dtype, scale_m_major=True,
                                          rows_multiple_of=4)
            out = _cublas_gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype)
            return out[:M] if M % 4 else out
        # M-major scales where the ws kernel's ring carries them; row-major for our other kernels
        # and plans, which were tuned with them (M-major measured slower in the skinny kernel)
        m_major = gemm_kernels.prefers_m_major_scales(M, w_q.shape[0], K, w_q)
        a_q, a_scale = _quantize_for_gemm(x, activation_dtype, scale_m_major=m_major)
        return gemm_kernels.gemm(a_q, a_scale, w_q, w_scale, bias, out_dtype)


@torch.library.register_fake(_linear_op.op)
def _(x, w_q, w_scale, bias, activation_dtype, out_dtype, backend):
    return x.new_empty((x.shape[0], w_q.shape[0]), dtype=out_dtype)


@_custom_op("quantize_input")
def _quantize_input_op(
    x: torch.Tensor, dtype: torch.dtype, scale_m_major: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # The first half of `linear` as its own node, for compiled graphs (see _shared_input): the
    # activation in 1 x 128 blocks, its scales laid out for the GEMM that will read them.
    if backend == "reference":
        q, scale = reference.quantize(x, (1, GEMM_BLOCK_SIZE), dtype)
        return q, (scale.t().contiguous().t() if scale_m_major else scale)
    with _on_device(x):
        if scale_m_major:  # (for cuBLAS, which wants their stride M exactly; see `linear`)
            return _kernels()[1].quantize(x, 1, GEMM_BLOCK_SIZE, dtype, scale_m_major=True)
        return _quantize_for_gemm(x, dtype)


@torch.library.register_fake(_quantize_input_op.op)
def _(x, dtype, scale_m_major, backend):
    M, K = x.shape
    kb = _cdiv(K, GEMM_BLOCK_SIZE)
    scale = x.new_empty((kb, M), dtype=torch.float32).t() if scale_m_major else x.new_empty((M, kb), dtype=torch.float32)
    return x.new_empty((M, K), dtype=dtype), scale


# --------------------------------------------------------------------------- one quantization per input
#
# Attention's q/k/v projections and the MLP's gate/up read the same activation, and each eager
# `linear` call quantizes it again: 7 activation quantizations per Llama layer where 4 differ.
# While torch.compile traces, `linear` is recorded as two nodes, quantize_input + gemm, and the
# quantization of an input already quantized in the same trace (same tensor object, same version,
# same dtype and scale layout) is reused, so the compiled graph quantizes each input once. Only
# under a proxy-tracing mode: there the reused result is a node of the graph being built. Eager
# calls keep the single `linear` op (one dispatcher round trip, and nothing held between calls).

_SHARED_INPUTS = WeakIdKeyDictionary()  # proxy mode -> (input tensor -> {key: (a_q, a_scale)})


def _tracing_mode(x: torch.Tensor):
    """The proxy mode tracing ``x`` into a graph, or None when ``x`` is a real tensor."""
    if type(x) is torch.Tensor:  # the eager hot path: a plain tensor is never a fake one
        return None
    from torch._subclasses.fake_tensor import is_fake
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() if is_fake(x) else None


def _shared_input(x: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype, scale_m_major: bool, backend: str, mode):
    per_input = _SHARED_INPUTS.setdefault(mode, WeakIdKeyDictionary())
    done = per_input.setdefault(x, {})
    key = (x._version, dtype, scale_m_major, backend)
    if key not in done:
        done[key] = _quantize_input_op(x2, dtype, scale_m_major, backend)
    return done[key]


# --------------------------------------------------------------------------- public API


def quantize_activation(
    x: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = GEMM_BLOCK_SIZE,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any leading shape, last dim K) in 1 x ``block_size`` blocks.

    Returns ``(q, scale)``: ``q`` has x's shape in ``dtype``; ``scale`` is float32 of shape
    ``(*x.shape[:-1], ceil(K / block_size))`` with ``x ~= q.float() * scale`` per block.
    With the kernel backends and 65 or more rows (``x`` flattened to 2-D), both are views of the
    first rows of storage padded with zero rows to a multiple of 128, which ``gemm`` reads to keep
    its TMA boxes within the tensor (faster at a ragged M); ``.clone()`` gives tight copies (which
    ``gemm`` copies back into padded rows at the M and weights where that measured faster).
    """
    _check_input_dtype(x, "x")
    _check_fp8_dtype(dtype)
    block_size = _check_block_size(block_size)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    backend = resolve_backend(backend, x.device)
    K = x.shape[-1]
    q, scale = _quantize_op(x.reshape(-1, K), 1, block_size, dtype, backend)
    return q.view(x.shape), scale.view(*x.shape[:-1], scale.shape[-1])


def quantize_weight(
    w: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = GEMM_BLOCK_SIZE,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the 2-D weight ``w`` (N, K) in ``block_size`` x ``block_size`` blocks.

    Returns ``(q, scale)`` with ``scale`` float32 of shape ``(ceil(N/b), ceil(K/b))``.
    Raises ValueError if ``w`` holds NaN or Inf: a non-finite weight would poison whole blocks.
    """
    _check_input_dtype(w, "w")
    _check_fp8_dtype(dtype)
    block_size = _check_block_size(block_size)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N, K), got shape {tuple(w.shape)}")
    backend = resolve_backend(backend, w.device)
    q, scale = _quantize_op(w, block_size, block_size, dtype, backend)
    # A block holding NaN/Inf has a non-finite scale: checking the (small) scale is enough.
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        rows, cols = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"w has NaN or Inf values (first in the block at rows {rows * block_size}.., columns "
            f"{cols * block_size}..); non-finite weights cannot be quantized"
        )
    return q, scale


def _normalize_block(block_size) -> tuple[int, int]:
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2):
        raise TypeError(f"block_size must be a pair (rows, cols) such as (1, 128) or (128, 128), got {block_size!r}")
    rows, cols = block_size
    if isinstance(rows, bool) or not isinstance(rows, int) or (rows != 1 and rows not in SUPPORTED_BLOCK_SIZES):
        raise ValueError(f"block_size rows must be 1 or one of {SUPPORTED_BLOCK_SIZES}, got {rows!r}")
    return rows, _check_block_size(cols, "block_size cols")


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_size,
    dtype: torch.dtype = torch.bfloat16,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``q.float() * scale`` per block, rounded once to ``dtype``.

    ``block_size`` is ``(rows, cols)`` over the last two dims: ``(1, 128)`` for activations
    (``q`` of any leading shape), ``(128, 128)`` for weights (``q`` 2-D).
    """
    _check_fp8_tensor(q, "q")
    rows, cols = _normalize_block(block_size)
    _check_out_dtype(dtype, "dtype")
    if rows == 1:
        if q.dim() == 0:
            raise ValueError("q must have at least one dimension, got a 0-d tensor")
        expected = (*q.shape[:-1], _cdiv(q.shape[-1], cols))
    else:
        if q.dim() != 2:
            raise ValueError(f"with block_size {(rows, cols)} q must be 2-D, got shape {tuple(q.shape)}")
        expected = (_cdiv(q.shape[0], rows), _cdiv(q.shape[1], cols))
    _check_scale(scale, expected, "scale", "q", q.shape)
    _check_same_device(q=q, scale=scale)
    backend = resolve_backend(backend, q.device)
    K = q.shape[-1]
    q2 = q.reshape(-1, K)
    s2 = scale.reshape(-1, expected[-1])
    return _dequantize_op(q2, s2, rows, cols, dtype, backend).view(q.shape)


def gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``dequantize(a) @ dequantize(w).T + bias`` with 1 x 128 activation and 128 x 128 weight
    scales, accumulated in float32 and written as ``out_dtype``. Shape ``(*a_q.shape[:-1], N)``.

    ``a_scale`` may have any strides. For 2-D operands on Hopper, M-major activation scales
    (``a_scale.t().contiguous().t()``, strides (1, M)) with M a multiple of 4 are read without a
    copy by cuBLAS and, on short grids, loaded by our large-M kernel together with its operand
    tiles (what ``linear`` writes for such calls); row-major scales are what our other kernels
    were tuned with.
    """
    _check_fp8_tensor(a_q, "a_q")
    _check_out_dtype(out_dtype)
    if a_q.dim() == 0:
        raise ValueError("a_q must have at least one dimension, got a 0-d tensor")
    K = a_q.shape[-1]
    N = _check_weight_operand(w_q, w_scale, K, "a_q", a_q.shape, bias)
    _check_scale(a_scale, (*a_q.shape[:-1], _cdiv(K, GEMM_BLOCK_SIZE)), "a_scale", "a_q", a_q.shape)
    device = _check_same_device(a_q=a_q, a_scale=a_scale, w_q=w_q, w_scale=w_scale, bias=bias)
    backend = resolve_backend(backend, device, op="gemm")
    a2 = a_q.reshape(-1, K)
    s2 = a_scale.reshape(-1, a_scale.shape[-1])
    out = _gemm_op(a2, s2, w_q, w_scale, bias, out_dtype, backend)
    return out.view(*a_q.shape[:-1], N)


def _check_weight_operand(w_q: torch.Tensor, w_scale: torch.Tensor, K: int, k_name: str, k_shape, bias) -> int:
    """Checks shared by :func:`gemm` and :func:`linear` (``k_name`` of shape ``k_shape`` gives K);
    returns N."""
    _check_fp8_tensor(w_q, "w_q")
    if w_q.dim() != 2:
        raise ValueError(f"w_q must be 2-D (N, K), got shape {tuple(w_q.shape)}")
    N = w_q.shape[0]
    if w_q.shape[1] != K:
        raise ValueError(f"{k_name} of shape {tuple(k_shape)} and w_q disagree on K: w_q has shape {tuple(w_q.shape)}")
    b = GEMM_BLOCK_SIZE
    _check_scale(w_scale, (_cdiv(N, b), _cdiv(K, b)), "w_scale", "w_q", w_q.shape)
    if bias is not None:
        _check_tensor(bias, "bias")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if tuple(bias.shape) != (N,):
            raise ValueError(
                f"bias must have shape ({N},) to match w_q of shape {tuple(w_q.shape)}, got {tuple(bias.shape)}"
            )
    return N


def linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation_dtype: torch.dtype = torch.float8_e4m3fn,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear`` with a pre-quantized weight: ``x`` (any leading shape, high precision) is
    quantized in 1 x 128 blocks to ``activation_dtype`` and multiplied by the blockwise weight.
    ``out_dtype`` defaults to ``x.dtype``.

    Eager calls replay the kernel launches that earlier calls of the same shapes, strides, dtypes,
    devices and stream made (``blockwise_fp8.replay``; ``REPLAY_EAGER_CALLS``), with the same bits.
    """
    # is_compiling first: Dynamo folds it, and never traces the key (which would graph-break)
    if not torch.compiler.is_compiling() and REPLAY_EAGER_CALLS:
        key = _eager_key(x, w_q, w_scale, bias, activation_dtype, out_dtype, backend)
    else:
        key = None
    if key is not None:
        return replay.call(key, _linear, (x, w_q, w_scale, bias), (activation_dtype, out_dtype, backend))
    return _linear(x, w_q, w_scale, bias, activation_dtype, out_dtype, backend)


def _linear(x, w_q, w_scale, bias, activation_dtype, out_dtype, backend) -> torch.Tensor:
    _check_input_dtype(x, "x")
    _check_fp8_dtype(activation_dtype, "activation_dtype")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    K = x.shape[-1]
    N = _check_weight_operand(w_q, w_scale, K, "x", x.shape, bias)
    device = _check_same_device(x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    backend = resolve_backend(backend, device, op="linear")
    x2 = x.reshape(-1, K)
    mode = _tracing_mode(x)
    if mode is None and not torch.compiler.is_dynamo_compiling():
        out = _linear_op(x2, w_q, w_scale, bias, activation_dtype, out_dtype, backend)
    else:
        # The scale layout _linear_op would pick, where M is a plain int. For a dynamic M the
        # per-M test would guard and recompile at each M band of the table, so the scales stay
        # row-major and a cuBLAS call transposes them (one small copy); M-major scales measured
        # slower in the skinny kernel (Llama layer at M = 16: 129.7 vs 123.1 us). Unlike an eager
        # call, the ws kernel's ring plans do not get M-major scales here: the Linears sharing
        # this quantization (q/k/v, gate/up) can have different plans (at M = 2048, Llama-3-8B's
        # q has 4 waves of tiles, k and v one), and two layouts would quantize the input twice.
        M = x2.shape[0]
        m_major = isinstance(M, int) and (
            backend == "cublas" or _gemm_backend_for_call(backend, M, K, activation_dtype, w_q, out_dtype) == "cublas"
        )
        if mode is None:
            # Dynamo traces this call (BlockwiseFP8Linear): it records the two halves, and the
            # fusion pass merges the quantizations of one input (fusion.FuseSiblingGemms).
            a_q, a_scale = _quantize_input_op(x2, activation_dtype, m_major, backend)
        else:
            a_q, a_scale = _shared_input(x, x2, activation_dtype, m_major, backend, mode)
        out = _gemm_op(a_q, a_scale, w_q, w_scale, bias, out_dtype, backend)
    return out.view(*x.shape[:-1], N)
