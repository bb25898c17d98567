"""Triton kernels for blockwise quantization and dequantization.

Layout (every tensor here is 2-D, strides passed explicitly, so views need no copy):
    x, q:   (M, K)                         high precision in / FP8 out
    scale:  (ceil(M / GROUP_M), ceil(K / BLOCK_K)) float32
One scale block is GROUP_M x BLOCK_K elements: GROUP_M = 1 for activations (1 x 128),
GROUP_M = BLOCK_M for weights (128 x 128). A program covers BLOCK_M rows and GROUPS_K scale
blocks along K, so activation programs move enough bytes to keep the memory system busy.

The launchers validate, allocate, launch, in that order; argument checking of user input
happens in ``blockwise_fp8.ops`` and is only asserted here.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from .launch import INTERPRETING, launch
from .rounding import cast_rtne, format_constexprs, output_format_constexprs, round_to_format, widen_to_fp32

try:  # programmatic dependent launch (Triton >= 3.3); see programmatic_launch()
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _PDL_IN_TRITON = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # pragma: no cover
    _PDL_IN_TRITON = False

# Triton hashes every name a kernel's source mentions, so the kernels call these wrappers, which
# exist with or without PDL support.
if _PDL_IN_TRITON:

    @triton.jit
    def wait_for_previous_grid():
        gdc_wait()

    @triton.jit
    def allow_next_grid():
        gdc_launch_dependents()

else:  # pragma: no cover

    @triton.jit
    def wait_for_previous_grid():
        pass

    @triton.jit
    def allow_next_grid():
        pass


def pdl_launch_options(enabled: bool) -> dict:
    """The launch keyword for a kernel that waits with ``wait_for_previous_grid``."""
    return {"launch_pdl": True} if enabled else {}

SCALE_FLOOR = float(torch.finfo(torch.float32).tiny)
# jit code may read only constexpr globals (Triton 3.6 on CUDA refuses a plain float)
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)


@triton.jit
def block_amax(x, axis: tl.constexpr):
    """Max of |x| along ``axis``. tl.max drops NaN, so NaN counts as +inf: a block holding any
    NaN or Inf gets amax = inf, which :func:`scale_from_amax` turns into a NaN scale."""
    return tl.max(tl.where(x != x, float("inf"), tl.abs(x)), axis=axis)


@triton.jit
def scale_from_amax(amax, FP8_MAX: tl.constexpr):
    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), _SCALE_FLOOR)
    return tl.where(amax == float("inf"), float("nan"), scale)


# Markstein's fma correction needs its residual x - q * scale to be exact in float32, which fails
# only when scale is tiny enough for that residual to underflow. Such blocks are first multiplied
# by a power of two (exact, quotient unchanged): scale below 2**-60 -> times 2**64.
_RESCALE_BELOW = tl.constexpr(2.0**-60)
_RESCALE = tl.constexpr(2.0**64)


@triton.jit
def divide_by_block_scale(x, scale):
    """x / scale rounded to float32, with the bits of ``tl.math.div_rn(x, scale)`` wherever the
    quotient is at least 2**-40 in magnitude; smaller quotients keep their sign and stay below
    2**-38, so they quantize to the same signed zero (fp8's smallest subnormal is 2**-16).

    ``scale`` has one positive value (or NaN) per block, shaped to broadcast against ``x``. IEEE
    division costs a dozen instructions per element, which made activation quantization
    ALU-bound on an H100 (benchmarks/NOTES.md). Here the per-block work is one correctly rounded
    reciprocal r; per element it is q = |x| * r and two fma corrections q += (|x| - q * s) * r.
    The first leaves q within a fraction of an ulp, the second returns the correctly rounded
    quotient (Markstein's theorem: r = RN(1/s), q faithful, the fma residual exact). The residual
    is exact unless it underflows: blocks with s < 2**-60 are first scaled by 2**64 (exact, same
    quotient); otherwise it underflows only for quotients below 2**-41. Working on |x| and
    putting x's sign bit back keeps -0.0 and the sign of tiny quotients."""
    f = tl.where(scale < _RESCALE_BELOW, _RESCALE, 1.0)
    s = scale * f
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    ax = tl.abs(x) * f
    q = ax * r
    # fma(q, -s, ax) is fma(-q, s, ax) (negating is exact, the fma rounds once), but Triton 3.6
    # computes a negated q apart (FFMA.RZ + FADD) instead of folding it in: written this way the
    # quantization compiles to 744 sm_90 instructions a thread instead of 808 (3.9: 688 either
    # way) and runs 5-7% faster under 3.6 on an H200, same bits (benchmarks/NOTES.md, session 40).
    neg_s = -s
    q = tl.fma(tl.fma(q, neg_s, ax), r, q)
    q = tl.abs(tl.fma(tl.fma(q, neg_s, ax), r, q))
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def scale_to_fp8(
    x, scale, dtype: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
    SUBNORMAL_SHIFTER: tl.constexpr, NAN_BITS: tl.constexpr,
    CVT_FP8: tl.constexpr,
):
    """x / scale (IEEE), clamped to +-FP8_MAX and rounded to nearest even, as ``dtype`` (fp8).

    ``CVT_FP8`` (compiled GPU code) lets the hardware convert float32 -> fp8: cvt.rn.satfinite
    rounds to nearest even and saturates, which is the clamp and the rounding in one instruction
    (a quotient above FP8_MAX, at most by the rounding of the scale, rounds onto FP8_MAX either way;
    NaN stays NaN). Dropping the separate clamp there took 2-3% off the activation quantization on an
    H200, same bits, NaN/Inf/zero blocks included (benchmarks/NOTES.md, session 39): the kernel is
    bound by its instruction count, not by memory. The Triton interpreter's cast rounds wrongly and
    does not saturate, so there the clamp and ``round_to_format`` come first and the cast is exact."""
    y = divide_by_block_scale(x, scale)
    if not CVT_FP8:
        y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        y = round_to_format(y, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER, NAN_BITS)
    return y.to(dtype)


@triton.jit
def quantize_rows(
    x, dtype: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
    SUBNORMAL_SHIFTER: tl.constexpr, NAN_BITS: tl.constexpr,
    CVT_FP8: tl.constexpr,
):
    """Quantize each row of the float32 tile ``x`` (R, BLOCK_K) as one 1 x BLOCK_K block: returns
    (the ``dtype`` values; the (R,) scales). Built from the same helpers as ``quantize_kernel``,
    so the GEMM's fused quantization is bit-identical."""
    scale = scale_from_amax(block_amax(x, 1), FP8_MAX)
    y = scale_to_fp8(x, scale[:, None], dtype, FP8_MAX, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER, NAN_BITS, CVT_FP8)
    return y, scale


@triton.jit
def quantize_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes (x has M rows; q and scale ROWS >= M, those past M written as zeros)
    M, ROWS, K,
    # strides
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sk,
    # meta-parameters
    FP8_MAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
    SUBNORMAL_SHIFTER: tl.constexpr, NAN_BITS: tl.constexpr,
    CVT_FP8: tl.constexpr, PDL: tl.constexpr, PDL_WAIT: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS_K: tl.constexpr,
):
    if PDL:  # the GEMM that reads q may start now; it waits for this grid before its first load of q
        allow_next_grid()
    if PDL_WAIT:  # launched programmatically: x may still be being written by the grid before
        wait_for_previous_grid()
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * (GROUPS_K * BLOCK_K) + tl.arange(0, GROUPS_K * BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = tl.reshape(widen_to_fp32(x), (BLOCK_M, GROUPS_K, BLOCK_K))

    amax = block_amax(x, 2)  # (BLOCK_M, GROUPS_K)
    if GROUP_M > 1:
        amax = tl.max(amax, axis=0, keep_dims=True)  # (1, GROUPS_K): one 128 x 128 block
    scale = scale_from_amax(amax, FP8_MAX)
    y = scale_to_fp8(
        x, scale[:, :, None], q_ptr.dtype.element_ty,
        FP8_MAX, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER, NAN_BITS, CVT_FP8,
    )
    q = tl.reshape(y, (BLOCK_M, GROUPS_K * BLOCK_K))
    # rows M..ROWS (x's zeros, quantized as such) are the zero rows of a padded q
    q_mask = (rows[:, None] < ROWS) & (cols[None, :] < K)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qk, q, mask=q_mask)

    kblocks = pid_k * GROUPS_K + tl.arange(0, GROUPS_K)
    if GROUP_M > 1:
        srows = pid_m + tl.arange(0, 1)
        smask = kblocks[None, :] * BLOCK_K < K
    else:
        srows = rows
        smask = (rows[:, None] < ROWS) & (kblocks[None, :] * BLOCK_K < K)
        scale = tl.where(rows[:, None] < M, scale, 0.0)  # a zero row's scale: 0, not the floor
    tl.store(scale_ptr + srows[:, None] * stride_sm + kblocks[None, :] * stride_sk, scale, mask=smask)


@triton.jit
def dequantize_kernel(
    # pointers
    q_ptr, scale_ptr, out_ptr,
    # sizes
    M, K,
    # strides
    stride_qm, stride_qk, stride_sm, stride_sk, stride_om, stride_ok,
    # meta-parameters
    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * (GROUPS_K * BLOCK_K) + tl.arange(0, GROUPS_K * BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qk, mask=mask, other=0.0)
    s = tl.load(
        scale_ptr + (rows // GROUP_M)[:, None] * stride_sm + (cols // BLOCK_K)[None, :] * stride_sk,
        mask=mask,
        other=0.0,
    )
    x = q.to(tl.float32) * s
    x = cast_rtne(
        x, out_ptr.dtype.element_ty,
        OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND,
    )
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_ok, x, mask=mask)


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1`` when Triton
    and these kernels were imported)."""
    return INTERPRETING


def programmatic_launch(device: torch.device) -> bool:
    """Whether to chain our decode kernels with programmatic dependent launch (PDL, sm_90+): the
    activation quantization lets the GEMM after it launch at once, and that GEMM waits for it
    with ``griddepcontrol.wait`` in place of the launch gap. Off in the interpreter, with a Triton
    that lacks it, and where ``BLOCKWISE_FP8_PDL=0``."""
    if not _PDL_IN_TRITON or device.type != "cuda" or interpreting():
        return False
    if os.environ.get("BLOCKWISE_FP8_PDL", "1") == "0":
        return False
    return _sm90_or_newer(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm90_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def hardware_fp8_cast(device: torch.device) -> bool:
    """Whether compiled kernels on ``device`` may round float32 -> fp8 with the GPU's own cvt
    (everywhere but the Triton interpreter)."""
    return device.type == "cuda" and not interpreting()


# Activation tiling (BLOCK_M rows x GROUPS_K blocks of 128, num_warps); tuned on an H100
# (benchmarks/NOTES.md). Overridable for tuning through ``quantize(..., tiling=...)``.
ACT_TILING = (4, 8, 4)  # 2.61 TB/s at 8192x8192 bf16 (reciprocal division + cvt); (8, 4, 4) 2.51


def _tiling(M: int, K: int, group_m: int, block_k: int, tiling=None) -> tuple[int, int, int]:
    """(BLOCK_M, GROUPS_K, num_warps): weights take one scale block per program; activations take
    several rows and up to GROUPS_K blocks along K."""
    if group_m > 1:
        return group_m, 1, 4
    block_m, groups_k, warps = tiling or ACT_TILING
    groups_k = min(groups_k, triton.next_power_of_2(triton.cdiv(K, block_k)))
    return min(block_m, triton.next_power_of_2(max(M, 1))), groups_k, warps


# Under PDL the quantization is also launched programmatically and waits for the grid before it
# (griddepcontrol.wait ahead of its first load): it then launches during that grid's tail (the
# skinny GEMM triggers after its K loop) instead of after it. H100, seven Linears of a Llama-3-8B
# layer in one CUDA graph (with SKINNY_PREFETCH_BLOCKS = 2): eager 113.0 -> 104.1 us at M = 1,
# shared quantization 104.6 -> 101.0; model decode (4 layers, compiled) batch 16 731.7 -> 722.6 us
# (benchmarks/NOTES.md, sixth session).
QUANT_WAITS = True


def quantize(
    x: torch.Tensor, group_m: int, block_k: int, dtype: torch.dtype, *, scale_m_major: bool = False, tiling=None,
    rows_multiple_of: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the 2-D ``x`` in ``group_m x block_k`` blocks. Returns ``(q, scale)``.

    ``scale_m_major`` stores the (same-valued) scale with strides (1, rows): the layout cuBLAS's
    blockwise GEMM requires, and a contiguous vector per K block for our GEMM kernels.
    ``rows_multiple_of`` (group_m 1 only): q and scale get zero rows appended up to a multiple of
    it, written by the same launch: as cuBLAS needs (4) without a copy, and so that the large-M
    GEMMs' TMA boxes over q's storage lie wholly in bounds (``gemm.activation_rows``)."""
    assert x.dim() == 2 and (rows_multiple_of == 1 or group_m == 1)
    M, K = x.shape
    device = x.device
    rows = -(-M // rows_multiple_of) * rows_multiple_of
    q = torch.empty((rows, K), dtype=dtype, device=device)
    s_rows, s_cols = -(-rows // group_m), -(-K // block_k)
    if scale_m_major:
        scale = torch.empty((s_cols, s_rows), dtype=torch.float32, device=device).t()
    else:
        scale = torch.empty((s_rows, s_cols), dtype=torch.float32, device=device)
    if rows == 0 or K == 0:
        return q, scale
    pdl = programmatic_launch(device)
    tiling = ACT_TILING if tiling is None else tuple(tiling)
    grid, meta = _quantize_launch(rows, K, group_m, block_k, dtype, tiling, pdl, pdl and QUANT_WAITS,
                                  hardware_fp8_cast(device))
    launch(quantize_kernel, grid, (
        x, q, scale,
        M, rows, K,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
    ), meta)
    return q, scale


@functools.lru_cache(maxsize=1024)
def _quantize_launch(M: int, K: int, group_m: int, block_k: int, dtype: torch.dtype, tiling: tuple, pdl: bool,
                     wait: bool, cvt: bool):
    """(grid, constexprs and launch options) of one quantization of M rows (with padding: the
    padded count), computed once per configuration (the module's tunables, read by the caller,
    are part of it)."""
    block_m, groups_k, warps = _tiling(M, K, group_m, block_k, tiling)
    grid = (-(-M // block_m), -(-K // (block_k * groups_k)))
    meta = dict(
        FP8_MAX=float(torch.finfo(dtype).max), **format_constexprs(dtype), CVT_FP8=cvt, PDL=pdl, PDL_WAIT=wait,
        BLOCK_M=block_m, GROUP_M=group_m, BLOCK_K=block_k, GROUPS_K=groups_k, num_warps=warps,
        **pdl_launch_options(wait),
    )
    return grid, tuple(meta.items())


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_m: int, block_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize the 2-D ``q`` with per-block ``scale`` into ``dtype``."""
    assert q.dim() == 2 and scale.dim() == 2
    M, K = q.shape
    out = torch.empty((M, K), dtype=dtype, device=q.device)
    if q.numel() == 0:
        return out
    grid, meta = _dequantize_launch(M, K, group_m, block_k, dtype)
    launch(dequantize_kernel, grid, (
        q, scale, out,
        M, K,
        q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), out.stride(0), out.stride(1),
    ), meta)
    return out


@functools.lru_cache(maxsize=1024)
def _dequantize_launch(M: int, K: int, group_m: int, block_k: int, dtype: torch.dtype):
    # Scales are gathered per element (row // GROUP_M), so any tiling works: use the wide one.
    block_m, groups_k, _ = _tiling(M, K, 1, block_k, (32, 4, 4))
    grid = (-(-M // block_m), -(-K // (block_k * groups_k)))
    meta = dict(**output_format_constexprs(dtype), BLOCK_M=block_m, GROUP_M=group_m, BLOCK_K=block_k, GROUPS_K=groups_k)
    return grid, tuple(meta.items())
