"""Triton blockwise-scaled FP8 GEMM: out = (a * a_scale) @ (w * w_scale).T (+ bias).

Layout (NT, like ``nn.Linear``):
    a:        (M, K)  fp8, activation, one scale per row per 128 columns
    a_scale:  (M, ceil(K / 128)) float32
    w:        (N, K)  fp8, weight, one scale per 128 x 128 block
    w_scale:  (ceil(N / 128), ceil(K / 128)) float32
    bias:     (N,) any float dtype, optional
    out:      (M, N)  bf16 / fp16 / fp32
The K loop steps one scale block (BLOCK_K = 128) at a time: each partial product of the tensor
cores is promoted to the float32 accumulator with both scales applied, as DeepSeek-V3 does.
"""

import torch
import triton
import triton.language as tl

from .rounding import cast_rtne, output_format_constexprs

SCALE_BLOCK = 128


@triton.jit
def gemm_1x128_128x128_kernel(
    # pointers
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk
    a_s_ptrs = a_scale_ptr + rm * stride_asm
    w_s_ptrs = w_scale_ptr + (rn // BLOCK_K) * stride_wsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
        w_s = tl.load(w_s_ptrs + kb * stride_wsk, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(w)) * (a_s[:, None] * w_s[None, :])
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = cast_rtne(
        acc, out_ptr.dtype.element_ty,
        OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND,
    )
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out, mask=m_ok[:, None] & n_ok[None, :])


def _config(M: int, N: int) -> dict:
    """A simple shape heuristic; tuned configs arrive with the performance work."""
    block_m = 64 if M <= 64 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=SCALE_BLOCK, GROUP_M=8, num_warps=8 if block_m == 128 else 4, num_stages=3)


def gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Blockwise GEMM on 2-D operands (shapes checked by ``blockwise_fp8.ops``)."""
    assert a.dim() == 2 and w.dim() == 2 and a.shape[1] == w.shape[1]
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(M, N))
    cfg = _config(M, N)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    gemm_1x128_128x128_kernel[grid](
        a, a_scale, w, w_scale, bias if bias is not None else a_scale, out,
        M, N, K,
        a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
        w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        **output_format_constexprs(out_dtype),
        **cfg,
    )
    return out
