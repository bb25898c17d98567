"""Test-side oracles that do not use the code under test.

The error bound of a blockwise FP8 round trip is derived here from ``torch.finfo`` alone: an
element ``x`` in a block with scale ``s`` is stored as ``round(x / s)``, so its error is at most
half the FP8 spacing at ``|x| / s``, times ``s``.
"""

from __future__ import annotations

import math

import torch


def fp8_spacing(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Distance between adjacent values of ``dtype`` around ``|v|`` (float64)."""
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))
    min_exp = round(math.log2(info.tiny))
    v = v.abs().double()
    exp = torch.floor(torch.log2(v.clamp(min=info.tiny))).clamp(min=min_exp)
    return torch.exp2(exp - mantissa_bits)


def expand_blocks(scale: torch.Tensor, rows: int, cols: int, shape) -> torch.Tensor:
    """Per-element view of a per-block tensor over the last two dims."""
    full = scale.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)
    return full[..., : shape[-2], : shape[-1]]


def same_bits_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bitwise equality, where any NaN equals any NaN (NaN payloads are not part of
    the contract). ``a`` and ``b`` must have the same shape and dtype."""
    if a.dtype.is_floating_point:
        both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    else:
        both_nan = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    ia = a.view(torch.uint8) if a.element_size() == 1 else a.view(torch.int32 if a.element_size() == 4 else torch.int16)
    ib = b.view(ia.dtype)
    return (ia == ib) | both_nan


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of whole tensors (see :func:`same_bits_mask`)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(same_bits_mask(a, b).all())


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.double()
    noise = (ref - approx.double()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def gemm_accumulation_rel(backend: str, device, K: int) -> float:
    """Bound on the GEMM's accumulation error, relative to ``sum_k |a||w|`` per output element.

    The float64 reference is exact to far below this; Triton's interpreter (numpy float32) keeps
    float32 sums, ``K * 2**-23``; Hopper's FP8 tensor cores keep only about 14 bits inside each
    128-long K block before the kernel promotes to float32 (DeepSeek-V3, section 3.3.2), so on
    CUDA the bound is ``2**-12``.
    """
    if backend == "reference":
        return 2.0**-40
    if torch.device(device).type == "cuda":
        return 2.0**-12
    return K * 2.0**-23
