"""Round-to-nearest-even onto a narrower float format, done in float32 arithmetic.

Why not just ``x.to(tl.float8e4nv)``: Triton's interpreter (``TRITON_INTERPRET=1``, how CI runs
our kernels on CPU) rounds float32 -> fp8 and float32 -> bf16 wrongly (it drops the carry into
the exponent, rounds ties away from zero, truncates to bf16, turns NaN into a finite fp8, and
flushes bf16 subnormals when widening).
Rounding here first leaves a value that the format holds exactly, so the cast that follows is
exact on the GPU and in the interpreter alike, and both agree bit for bit with torch. On the GPU
this costs a handful of integer operations per element in memory-bound kernels.
"""

import functools
import math

import torch
import triton
import triton.language as tl


class FloatFormat:
    """Constexpr parameters of a target format for :func:`round_to_format`."""

    def __init__(self, dtype: torch.dtype):
        info = torch.finfo(dtype)
        mantissa_bits = {
            torch.float8_e4m3fn: 3,
            torch.float8_e5m2: 2,
            torch.bfloat16: 7,
            torch.float16: 10,
        }[dtype]
        min_normal_exp = round(math.log2(info.tiny))
        self.mantissa_bits = mantissa_bits
        self.min_normal = float(info.tiny)
        # Adding then subtracting 2**(min_normal_exp - mantissa_bits + 23) rounds a float32 below
        # min_normal to the format's subnormal grid (float32 addition is itself RTNE).
        self.subnormal_shifter = 2.0 ** (min_normal_exp - mantissa_bits + 23)
        # A quiet NaN whose top mantissa bits are all set: the interpreter's truncating cast then
        # still lands on the format's NaN encoding (e4m3fn has just one, S.1111.111).
        nan_bits = 0x7F800000 | (((1 << mantissa_bits) - 1) << (23 - mantissa_bits))
        self.nan_bits = nan_bits - (1 << 32) if nan_bits >= (1 << 31) else nan_bits

    def constexprs(self, prefix: str = "") -> dict:
        return {
            f"{prefix}MANTISSA_BITS": self.mantissa_bits,
            f"{prefix}MIN_NORMAL": self.min_normal,
            f"{prefix}SUBNORMAL_SHIFTER": self.subnormal_shifter,
            f"{prefix}NAN_BITS": self.nan_bits,
        }


@triton.jit
def widen_to_fp32(x):
    """Exact widening to float32. bf16 goes through its bits (a 16-bit shift) because the
    interpreter's bf16 -> fp32 cast loses subnormals; on the GPU the two are the same."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def round_to_format(
    x,
    MANTISSA_BITS: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUBNORMAL_SHIFTER: tl.constexpr,
    NAN_BITS: tl.constexpr,
):
    """RTNE of float32 ``x`` onto the format's grid, still as float32. Overflow is the caller's
    business (clamp first for fp8); infinities pass through unchanged."""
    DROP: tl.constexpr = 23 - MANTISSA_BITS
    bits = x.to(tl.int32, bitcast=True)
    # Normal range: add just under half an ulp plus the kept lsb, then cut (the carry into the
    # exponent is what makes this correct at binade edges).
    lsb = (bits >> DROP) & 1
    normal = ((bits + ((1 << (DROP - 1)) - 1) + lsb) & (-(1 << DROP))).to(tl.float32, bitcast=True)
    ax = tl.abs(x)
    subnormal = (ax + SUBNORMAL_SHIFTER) - SUBNORMAL_SHIFTER
    # Put x's sign bit back with an OR: on CUDA, Triton negates as 0 - v, which turns -0.0 into
    # +0.0 (seen on an H100; the interpreter keeps it), and a tiny negative must round to -0.0.
    subnormal = (subnormal.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    out = tl.where(ax < MIN_NORMAL, subnormal, normal)
    nan = tl.full(x.shape, NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(x != x, nan, out)


@triton.jit
def cast_rtne(
    x,
    dtype: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    SUBNORMAL_SHIFTER: tl.constexpr,
    NAN_BITS: tl.constexpr,
    ROUND: tl.constexpr,
):
    """Cast float32 ``x`` to ``dtype``, correctly rounded. ``ROUND`` is True for bf16 outputs
    and False for float32 and float16 (whose casts are right everywhere)."""
    if ROUND:
        # Rounded first, the value is a bf16 held in float32: its bf16 bits are the top half of
        # its float32 bits (the interpreter's cast would mangle subnormals; on the GPU this is
        # the same instruction count as a cvt).
        x = round_to_format(x, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER, NAN_BITS)
        return (x.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(dtype, bitcast=True)
    return x.to(dtype)


@functools.lru_cache(maxsize=None)
def format_constexprs(dtype: torch.dtype, prefix: str = "") -> dict:
    """:class:`FloatFormat` constexprs of ``dtype``, computed once (launchers call this per call).
    Callers spread the dict into kernel keywords and must not mutate it."""
    return FloatFormat(dtype).constexprs(prefix)


@functools.lru_cache(maxsize=None)
def output_format_constexprs(dtype: torch.dtype) -> dict:
    """Constexprs for :func:`cast_rtne` to ``dtype`` (bf16 / fp16 / fp32)."""
    if dtype == torch.bfloat16:
        return {**format_constexprs(dtype, "OUT_"), "OUT_ROUND": True}
    # Placeholders: not read when OUT_ROUND is False.
    return {
        "OUT_MANTISSA_BITS": 23,
        "OUT_MIN_NORMAL": 0.0,
        "OUT_SUBNORMAL_SHIFTER": 0.0,
        "OUT_NAN_BITS": 0,
        "OUT_ROUND": False,
    }
