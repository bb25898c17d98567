"""Pure-torch semantics of blockwise FP8: the test oracle and the CPU fallback.

Every other implementation in the package (the Triton kernels, cuBLAS) is checked against the
functions here. This module imports nothing of ours, so a bug elsewhere cannot leak into it.

Conventions (docs/numerics.md has the full story):
  - ``scale`` is the float32 dequantization multiplier of a block: ``x ~= q.float() * scale``;
    ``scale = max(amax / finfo(fp8).max, 2**-126)``. The floor keeps all-zero blocks finite
    (they dequantize to exact zeros) and keeps the scale a normal float32.
  - ``q = round_to_nearest_even(clamp(x.float() / scale, -max, max))``: division, clamp, round.
  - a block holding a NaN or an Inf gets a NaN scale, so all of it dequantizes to NaN: a
    non-finite value poisons only its own block (and, through the GEMM, only its own row).
  - blocks tile the last two dimensions: ``(rows, cols)``; ``(1, 128)`` for activations,
    ``(128, 128)`` for weights. Partial blocks at the edges are fine: their amax is taken over
    the elements that exist.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_DTYPES",
    "SCALE_FLOOR",
    "fp8_max",
    "quantize",
    "dequantize",
    "gemm",
    "linear",
]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Smallest normal float32: the floor of every scale (an all-zero block would otherwise get 0).
SCALE_FLOOR = torch.finfo(torch.float32).tiny


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _blocked_view(t: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad the last two dims of ``t`` to block multiples and split them into blocks.

    Returns ``(blocks, R, C)``: ``blocks`` is ``(*lead, Rp/rows, rows, Cp/cols, cols)`` and
    ``R, C`` the unpadded sizes. Zero padding never changes an amax of absolute values, and
    every block holds at least one real element.
    """
    *lead, R, C = t.shape
    Rp, Cp = -(-R // rows) * rows, -(-C // cols) * cols
    if (Rp, Cp) != (R, C):
        t = torch.nn.functional.pad(t, (0, Cp - C, 0, Rp - R))
    return t.reshape(*lead, Rp // rows, rows, Cp // cols, cols), R, C


def quantize(
    x: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last two dims of ``x`` (at least 2-D) in ``block_size`` blocks.

    Returns ``(q, scale)``: ``q`` has x's shape in ``dtype``; ``scale`` is float32 of shape
    ``(*x.shape[:-2], ceil(R/rows), ceil(C/cols))``.
    """
    rows, cols = block_size
    fmax = fp8_max(dtype)
    blocks, R, C = _blocked_view(x.float(), rows, cols)
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True)  # NaN propagates
    scale = torch.clamp(amax / fmax, min=SCALE_FLOOR)
    scale = torch.where(torch.isfinite(amax), scale, torch.nan)  # any NaN/Inf: the block is NaN
    y = (blocks / scale).clamp(-fmax, fmax)  # clamp keeps NaN
    q = y.to(dtype).reshape(*x.shape[:-2], blocks.shape[-4] * rows, blocks.shape[-2] * cols)
    q = q[..., :R, :C].contiguous()
    return q, scale.squeeze(-1).squeeze(-2).contiguous()


def expand_scale(scale: torch.Tensor, block_size: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Broadcast a per-block ``scale`` to the element shape ``shape`` (last two dims blocked)."""
    rows, cols = block_size
    full = scale.repeat_interleave(rows, dim=-2).repeat_interleave(cols, dim=-1)
    return full[..., : shape[-2], : shape[-1]]


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``q.float() * scale`` per block, rounded once to ``dtype``."""
    return (q.float() * expand_scale(scale, block_size, q.shape)).to(dtype)


def _dequantize_f64(q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    return q.double() * expand_scale(scale.double(), block_size, q.shape)


def gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    block_size: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(a) @ dequantize(w).T + bias`` computed in float64, rounded once to ``out_dtype``.

    ``a_q``: (..., K) with ``a_scale`` (..., ceil(K/b)); ``w_q``: (N, K) with ``w_scale``
    (ceil(N/b), ceil(K/b)). This is the exact value every GEMM implementation approximates.
    """
    K = a_q.shape[-1]
    a2 = a_q.reshape(-1, K)
    s2 = a_scale.reshape(-1, a_scale.shape[-1])
    a = _dequantize_f64(a2, s2, (1, block_size))
    w = _dequantize_f64(w_q, w_scale, (block_size, block_size))
    out = a @ w.T
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype).reshape(*a_q.shape[:-1], w_q.shape[0])


def linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation_dtype: torch.dtype = torch.float8_e4m3fn,
    block_size: int = 128,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The quantized linear layer: quantize ``x`` in 1 x b blocks, then :func:`gemm`."""
    K = x.shape[-1]
    a_q, a_s = quantize(x.reshape(-1, K), (1, block_size), activation_dtype)
    out = gemm(a_q, a_s, w_q, w_scale, block_size=block_size, out_dtype=out_dtype or x.dtype, bias=bias)
    return out.reshape(*x.shape[:-1], w_q.shape[0])
