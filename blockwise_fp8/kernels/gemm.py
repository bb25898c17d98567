"""Triton blockwise-scaled FP8 GEMM: out = (a * a_scale) @ (w * w_scale).T (+ bias).

Layout (NT, like ``nn.Linear``):
    a:        (M, K)  fp8, activation, one scale per row per 128 columns
    a_scale:  (M, ceil(K / 128)) float32 (any strides: row-major or "M-major" (1, M))
    w:        (N, K)  fp8, weight, one scale per 128 x 128 block
    w_scale:  (ceil(N / 128), ceil(K / 128)) float32
    bias:     (N,) any float dtype, optional
    out:      (M, N)  bf16 / fp16 / fp32
Every path steps K one scale block (128) at a time: each partial product of the tensor cores is
promoted to the float32 accumulator with both scales applied, as DeepSeek-V3 does.

Five kernels, chosen by :func:`plan` from the shape:

``gemv`` (M <= GEMV_MAX_M, single-token decode)
    CUDA cores, no tensor cores: each program streams a slab of w (BLOCK_N rows, GROUPS_K scale
    blocks per step) from global memory into registers and reduces it against each activation
    row. With no shared memory, more programs share an SM and keep more weight bytes in flight
    than the skinny kernel's tensor-core tiles (padded to 16 rows) allow. Split-K, members and
    PDL as in ``skinny``, through the same launcher.
``skinny`` (M <= SKINNY_MAX_M, decode and small batches; up to SKINNY_MID_MAX_M on smaller weights)
    Swapped operands: each program computes a (BLOCK_N x BLOCK_M) tile of out.T = w @ a.T, so
    the large N dimension fills the MMA's M side (64 rows per warpgroup) and the few tokens sit
    on its N side (>= 16). The kernel is bound by streaming w once; split-K over a second grid
    axis adds programs when N alone does not fill the card; the last program of each N tile to
    finish sums the float32 partials in split order (deterministic) and runs the epilogue, so
    split-K costs no second launch. One launch can serve up to three weights of one activation
    (``gemm_group``: a layer's q/k/v or gate/up), one ramp and tail instead of three. With
    ``FUSE_QUANT`` the program reads the high-precision activation and quantizes its 1x128 blocks
    in registers with exactly the arithmetic of ``quant.quantize_kernel`` (same helper), so the
    decode path is one launch.
``tma`` (large M, CUDA with tensor descriptors, K % 16 == 0)
    Persistent grid (one program per SM), grouped tile order so GROUP_M row-tiles share each
    weight tile in L2, operands fetched by the Hopper bulk-tensor copy engine through host-side
    tensor descriptors (zero-filled out of bounds, which handles ragged K and N), optionally a
    flattened tile/K loop (64-row tiles) so the next tile's loads overlap this tile's epilogue,
    and optionally the last, partial wave's tiles split over K (``tail_split``; a grid of fewer
    tiles than SMs is all tail, so every tile is split).
``ws`` (large M on Hopper, sm_90 only; ``kernels/gemm_hopper.py``)
    The 128 x 128 tiles of ``tma`` in Triton's Gluon dialect, warp-specialised: a producer warp
    feeds a shared-memory ring through TMA and two consumer warpgroups, 64 rows each, wait for
    their own products and promote them with no CTA-wide barrier in the K loop (the compiled
    ``tma`` kernel has three per K step), so one warpgroup's promotion overlaps the other's MMAs.
    +10-20% over ``tma`` on an H100 (benchmarks/NOTES.md); each consumer takes the K blocks in
    pairs, promoting one product while the next runs (another 7-10%). Where they need no more
    waves, three consumers and 192 x 128 tiles (``_wide_plan``), on Triton >= 3.9 run by pairs of
    CTAs (2-CTA clusters) that share each A box through multicast TMA (``Plan.cluster``); with
    128 x 128 tiles the split tail of ``tma``, and on short grids the activation scales carried by
    the ring (``Plan.scales_tma``, M-major scales). GPU-only: the interpreter cannot run Gluon.
``tiled`` (everything else, and the Triton interpreter)
    The same math with plain pointer loads and a one-program-per-tile grid.

Bias and the output cast are fused in every epilogue. Rounding to bf16 goes through
``rounding.cast_rtne`` so results agree between the GPU and the interpreter.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import gemm_hopper
from .card import card as device_card
from .quant import (
    allow_next_grid,
    hardware_fp8_cast,
    interpreting,
    pdl_launch_options,
    programmatic_launch,
    quantize_rows,
    wait_for_previous_grid,
)
from .launch import launch, persistent
from .rounding import cast_rtne, format_constexprs, output_format_constexprs

SCALE_BLOCK = 128
SKINNY_MAX_M = 32  # largest M served by the swapped-operand kernel on every shape (see plan())
# ... and on weights of at most SKINNY_MID_MAX_NK[0] rows and [1] columns up to this M, in
# 64-row token tiles (see _skinny_plan); 0 turns that range off, for A/B runs
SKINNY_MID_MAX_M = 64
SKINNY_MID_MAX_NK = (8192, 8192)
GEMV_MAX_M = 1  # largest M served by the gemv kernel (0 sends M = 1 to the skinny kernel, for A/B runs)

try:  # host-side tensor descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


# --------------------------------------------------------------------------- kernels


@triton.jit
def _epilogue_store(acc, rm, rn, M, N, bias_ptr, out_ptr, stride_om, stride_on,
                    HAS_BIAS: tl.constexpr,
                    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
                    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr):
    """acc is (len(rm), len(rn)) float32: add bias, round to out's dtype, store masked."""
    m_ok = rm < M
    n_ok = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = cast_rtne(
        acc, out_ptr.dtype.element_ty,
        OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND,
    )
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _finish_split(acc, tile_ptrs, split_stride, mask, split, counter_ptr, SPLIT_K: tl.constexpr,
                  rm, rn, M, N, bias_ptr, out_ptr, stride_om, stride_on,
                  HAS_BIAS: tl.constexpr,
                  OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
                  OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr):
    """Split-K without a second launch: store this split's float32 partial at tile_ptrs +
    split * split_stride and arrive on the tile's counter; the last of the SPLIT_K programs to
    arrive sums the partials in split order (so the result does not depend on who came last),
    runs the epilogue and leaves the counter at zero for the next launch."""
    tl.store(tile_ptrs + split * split_stride, acc, mask=mask)
    # Every thread's partial is stored before the (acq_rel, GPU-scope) arrival; the last to
    # arrive reads the others' partials past L1, which may hold none of them.
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr, 1) == SPLIT_K - 1:
        total = tl.load(tile_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        for k in range(1, SPLIT_K):
            total += tl.load(tile_ptrs + k * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
        _epilogue_store(total, rm, rn, M, N, bias_ptr, out_ptr, stride_om, stride_on, HAS_BIAS,
                        OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile index -> (pid_m, pid_n) in grouped order: GROUP_M row-tiles walk the columns together."""
    tiles_per_group = GROUP_M * num_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def gemm_tiled_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
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

    _epilogue_store(acc, rm, rn, M, N, bias_ptr, out_ptr, stride_om, stride_on, HAS_BIAS,
                    OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)


@triton.jit
def _tma_accumulate(a_desc, w_desc, a_s_ptrs, m_ok, w_s_ptr, stride_ask, stride_wsk, off_m, off_n,
                    kb_start, kb_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        a = a_desc.load([off_m, kb * BLOCK_K])
        w = w_desc.load([off_n, kb * BLOCK_K])
        a_s = tl.load(a_s_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
        w_s = tl.load(w_s_ptr + kb * stride_wsk)
        acc += tl.dot(a, w.T) * (a_s * w_s)[:, None]
    return acc


@triton.jit
def gemm_tma_kernel(
    a_desc, a_scale_ptr, w_desc, w_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    M, N, K, TAIL_START,
    stride_asm, stride_ask, stride_wsn, stride_wsk,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    TAIL_SPLIT: tl.constexpr,
):
    """Persistent blockwise GEMM over tensor descriptors (BLOCK_N <= 128: one weight scale per
    tile and K block, so the promotion is a row vector times a scalar).

    Tiles [0, TAIL_START) (whole waves) are computed whole. With TAIL_SPLIT > 1 the last, partial
    wave's tiles are each split over K among TAIL_SPLIT programs (work unit u: tile
    TAIL_START + u // TAIL_SPLIT, split u % TAIL_SPLIT) that finish through ``_finish_split``
    (partials: (tail tiles, TAIL_SPLIT, BLOCK_M, BLOCK_N) float32; one counter per tail tile),
    so a grid of 1.2 waves costs about 1.25 tile-times instead of 2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_blocks = tl.cdiv(K, BLOCK_K)
    num_tiles = num_m * num_n
    for tile in tl.range(tl.program_id(0), TAIL_START, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        acc = _tma_accumulate(a_desc, w_desc, a_scale_ptr + rm * stride_asm, m_ok,
                              w_scale_ptr + (off_n // BLOCK_K) * stride_wsn, stride_ask, stride_wsk,
                              off_m, off_n, 0, k_blocks, BLOCK_M, BLOCK_N, BLOCK_K)
        rn = off_n + tl.arange(0, BLOCK_N)
        _epilogue_store(acc, rm, rn, M, N, bias_ptr, out_ptr, stride_om, stride_on, HAS_BIAS,
                        OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)
    if TAIL_SPLIT > 1:
        kb_per = tl.cdiv(k_blocks, TAIL_SPLIT)
        lm = tl.arange(0, BLOCK_M)
        ln = tl.arange(0, BLOCK_N)
        for u in range(tl.program_id(0), (num_tiles - TAIL_START) * TAIL_SPLIT, NUM_PROGRAMS):
            tail = u // TAIL_SPLIT
            split = u % TAIL_SPLIT
            pid_m, pid_n = _grouped_tile(TAIL_START + tail, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            rm = off_m + lm
            m_ok = rm < M
            acc = _tma_accumulate(a_desc, w_desc, a_scale_ptr + rm * stride_asm, m_ok,
                                  w_scale_ptr + (off_n // BLOCK_K) * stride_wsn, stride_ask, stride_wsk,
                                  off_m, off_n, split * kb_per, min(split * kb_per + kb_per, k_blocks),
                                  BLOCK_M, BLOCK_N, BLOCK_K)
            tile_ptrs = partial_ptr + tail * (TAIL_SPLIT * BLOCK_M * BLOCK_N) + lm[:, None] * BLOCK_N + ln[None, :]
            _finish_split(acc, tile_ptrs, BLOCK_M * BLOCK_N, (lm[:, None] < BLOCK_M) & (ln[None, :] < BLOCK_N),
                          split, arrivals_ptr + tail, TAIL_SPLIT, rm, off_n + ln, M, N, bias_ptr, out_ptr,
                          stride_om, stride_on, HAS_BIAS,
                          OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the cache line at each pointer (no register result, no wait)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _weight_member(pid_n, N, N1, N2, stride_om, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
                   w1_ptr, w1_scale_ptr, bias1_ptr, out1_ptr, w2_ptr, w2_scale_ptr, bias2_ptr, out2_ptr,
                   MEMBERS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which of the 1-3 weights of a weight-streaming launch the N tile ``pid_n`` belongs to: the
    members' tiles follow one another along the grid. Returns (the tile within that member, its
    N, its output row stride, its weight / scale / bias / output pointers); members after the
    first have contiguous outputs (row stride N1, N2)."""
    tile = pid_n
    n_size = N
    out_row = stride_om
    if MEMBERS > 1:
        # int32 values, not constexprs: Triton specializes an argument equal to 1 to a constant,
        # which the branches below could not then reassign (N = 1 is a valid member)
        zero = pid_n * 0
        n_size = zero + N
        out_row = zero + stride_om
        tiles = tl.cdiv(N, BLOCK_N)
        if tile >= tiles:
            tile -= tiles
            n_size = zero + N1
            out_row = zero + N1
            w_ptr, w_scale_ptr, bias_ptr, out_ptr = w1_ptr, w1_scale_ptr, bias1_ptr, out1_ptr
            if MEMBERS > 2:
                tiles = tl.cdiv(N1, BLOCK_N)
                if tile >= tiles:
                    tile -= tiles
                    n_size = zero + N2
                    out_row = zero + N2
                    w_ptr, w_scale_ptr, bias_ptr, out_ptr = w2_ptr, w2_scale_ptr, bias2_ptr, out2_ptr
    return tile, n_size, out_row, w_ptr, w_scale_ptr, bias_ptr, out_ptr


@triton.jit
def _prefetch_then_wait(w_ptr, rn, n_size, kb_start, kb_end, stride_wn, stride_wk,
                        PREFETCH_BLOCKS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The PDL prologue of the weight-streaming kernels: ask L2 for each row's first
    PREFETCH_BLOCKS weight blocks (no register result; the weights do not depend on the grid
    before), then wait for that grid before any real memory access."""
    for j in tl.static_range(PREFETCH_BLOCKS):
        prefetch_l2(w_ptr + tl.minimum(rn, n_size - 1) * stride_wn
                    + tl.minimum(kb_start + j, kb_end - 1) * BLOCK_K * stride_wk)
    wait_for_previous_grid()


@triton.jit
def _finish_streaming(acc, rm, rn, M, n_size, m_ok, n_ok, pid_n, pid_k, partial_ptr, PARTIAL_N, arrivals_ptr,
                      bias_ptr, out_ptr, out_row, stride_on, HAS_BIAS: tl.constexpr,
                      OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
                      OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
                      SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) of a weight-streaming program: the epilogue, or with SPLIT_K > 1
    this split's partial ((SPLIT_K, M, PARTIAL_N) float32, the tile's columns at pid_n *
    BLOCK_N) and the last arrival's sum."""
    if SPLIT_K == 1:
        _epilogue_store(acc, rm, rn, M, n_size, bias_ptr, out_ptr, out_row, stride_on, HAS_BIAS,
                        OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)
    else:
        pc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _finish_split(acc, partial_ptr + rm[:, None] * PARTIAL_N + pc[None, :], M * PARTIAL_N,
                      m_ok[:, None] & n_ok[None, :], pid_k, arrivals_ptr + pid_n, SPLIT_K, rm, rn, M, n_size,
                      bias_ptr, out_ptr, out_row, stride_on, HAS_BIAS,
                      OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND)


@triton.jit
def _activation_scales(a_s_ptrs, kb, stride_ask, mask, FUSE_QUANT: tl.constexpr):
    """The activation scales of K block ``kb`` (float32, one per row), or with FUSE_QUANT a
    placeholder: the block's scales then come from quantizing it in registers."""
    if FUSE_QUANT:
        return tl.where(mask, 0.0, 0.0)
    return tl.load(a_s_ptrs + kb * stride_ask, mask=mask, other=0.0)


@triton.jit
def _skinny_block(acc, w_ptrs, a_ptrs, w_s, a_s, kb, K, rk, m_ok, n_ok, fp8_dtype: tl.constexpr,
                  FUSE_QUANT: tl.constexpr, FP8_MAX: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                  MIN_NORMAL: tl.constexpr, SUBNORMAL_SHIFTER: tl.constexpr, NAN_BITS: tl.constexpr,
                  CVT_FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) plus K block ``kb`` of w tile @ a.T, scaled by its block scales:
    the weight block at w_ptrs, the activation's at a_ptrs (high precision with FUSE_QUANT,
    quantized here, whose scales then replace a_s)."""
    k_ok = rk < K - kb * BLOCK_K
    w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    if FUSE_QUANT:
        x = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a, a_s = quantize_rows(x, fp8_dtype, FP8_MAX, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER, NAN_BITS, CVT_FP8)
    else:
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    return acc + tl.dot(w, tl.trans(a)) * (w_s[:, None] * a_s[None, :])


@triton.jit
def _skinny_block_tma(acc, w_desc, a_desc, n0, kb, w_s, a_s, BLOCK_K: tl.constexpr):
    """_skinny_block with both tiles loaded by tensor descriptor (TMA, zeros past N, M and K)."""
    w = w_desc.load([n0, kb * BLOCK_K])
    a = a_desc.load([0, kb * BLOCK_K])
    return acc + tl.dot(w, tl.trans(a)) * (w_s[:, None] * a_s[None, :])


@triton.jit
def gemm_skinny_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    w1_ptr, w1_scale_ptr, bias1_ptr, out1_ptr, w2_ptr, w2_scale_ptr, bias2_ptr, out2_ptr,
    a_tma, w_tma, w1_tma, w2_tma,
    M, N, K, KB_PER_SPLIT, N1, N2, PARTIAL_N,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
    FUSE_QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
    SUBNORMAL_SHIFTER: tl.constexpr, NAN_BITS: tl.constexpr, CVT_FP8: tl.constexpr,
    SPLIT_K: tl.constexpr, PDL: tl.constexpr, SCALES_AHEAD: tl.constexpr, TRIGGER_AFTER_LOOP: tl.constexpr,
    PREFETCH_BLOCKS: tl.constexpr, MEMBERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS_K: tl.constexpr,
    TMA: tl.constexpr, HOST_TMA: tl.constexpr,
):
    """out.T tile (BLOCK_N x BLOCK_M) = w tile @ a.T over one K range. With FUSE_QUANT, a_ptr is
    the high-precision activation and a_scale_ptr is unused. With SPLIT_K > 1 each program
    stores its float32 partial, and the last of a tile's SPLIT_K programs to arrive (counted in
    arrivals_ptr, one int32 per N tile, zero on entry and left zero) sums the partials in split
    order, so the result does not depend on who came last, and runs the epilogue. With PDL the
    grid may start while the kernel before it (the activation quantization) still runs, so it
    waits for that grid before touching memory, except for an L2 prefetch of its first
    PREFETCH_BLOCKS weight blocks: a hint with no result, and L2 is where global memory is
    coherent, so a line fetched early is still read fresh. With TRIGGER_AFTER_LOOP it lets the
    next grid launch once its own K loop is done (earlier measured slower, benchmarks/NOTES.md,
    fifth session); that grid must wait in turn before it reads what this one writes.

    MEMBERS (1-3) weights of one activation share the launch (the q/k/v or gate/up projections
    of a layer, see ``gemm_group``): w_ptr/w1_ptr/w2_ptr with N/N1/N2 rows, each with its own
    scales, bias and output; the weights and the scales have the same strides, the outputs are
    contiguous (the row stride of out1 and out2 is N1 and N2). The N tiles of the members follow one
    another along the first grid axis; the split-K partials are (SPLIT_K, M, PARTIAL_N) float32
    with PARTIAL_N >= the tiles' columns, one arrival counter per tile.

    TMA (not with FUSE_QUANT; the launcher checks the 16-byte alignments TMA needs and gives the
    kernels scratch for their descriptors): the weight and activation tiles come by tensor
    descriptors made in the kernel, after the PDL wait, instead of masked pointer loads, with the
    same zeros past N, M and K, so the same sums. Why: tiles written to shared memory by cp.async
    are generic-proxy writes, and from Triton 3.9 on each wgmma that reads them gets a proxy fence
    before it (MEMBAR.ALL.CTA in the SASS, two per paired K step; Triton 3.6 put none); TMA writes
    through the async proxy and needs none (``SKINNY_TMA``). With HOST_TMA the descriptors come
    made on the host instead (a_tma for the activation, w_tma / w1_tma / w2_tma one per member,
    picked by the program's N tile as its pointers are): in a CUDA graph the kernel then starts
    without making its own (``SKINNY_TMA_CAPTURED``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tile, n_size, out_row, w_ptr, w_scale_ptr, bias_ptr, out_ptr = _weight_member(
        pid_n, N, N1, N2, stride_om, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
        w1_ptr, w1_scale_ptr, bias1_ptr, out1_ptr, w2_ptr, w2_scale_ptr, bias2_ptr, out2_ptr, MEMBERS, BLOCK_N)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < n_size
    m_ok = rm < M
    kb_start = pid_k * KB_PER_SPLIT
    kb_end = min(kb_start + KB_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    if PDL:
        _prefetch_then_wait(w_ptr, rn, n_size, kb_start, kb_end, stride_wn, stride_wk, PREFETCH_BLOCKS, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (kb_start * BLOCK_K + rk)[None, :] * stride_wk
    a_ptrs = a_ptr + rm[:, None] * stride_am + (kb_start * BLOCK_K + rk)[None, :] * stride_ak
    if TMA and HOST_TMA:
        a_desc = a_tma
        w_desc = w_tma
        if MEMBERS > 1:
            if pid_n >= tl.cdiv(N, BLOCK_N):
                w_desc = w1_tma
                if MEMBERS > 2:
                    if pid_n >= tl.cdiv(N, BLOCK_N) + tl.cdiv(N1, BLOCK_N):
                        w_desc = w2_tma
    elif TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[n_size, K], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    w_s_ptrs = w_scale_ptr + (rn // BLOCK_K) * stride_wsn
    a_s_ptrs = a_scale_ptr + rm * stride_asm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # The compiler pipelines the tiles (cp.async, num_stages deep) but not the scales. With
    # SCALES_AHEAD the scales of the next step's K blocks are loaded at the end of this step, after
    # their registers' last use, so the loads are in flight during the next step's tile wait and
    # MMA; loaded where they are used, every K step waits a whole memory round trip for them.
    # With GROUPS_K = 2 a step takes two K blocks (even and odd): each program then asks for 256
    # contiguous bytes of every weight row at once, which streamed 0-6% faster from memory
    # (benchmarks/NOTES.md, twenty-second session); the odd block of a K range's last step may lie
    # past K (its masks then load nothing and its scales are zero).
    if SCALES_AHEAD:  # every program has at least one K block (the launcher makes no empty splits)
        w_s = tl.load(w_s_ptrs + kb_start * stride_wsk, mask=n_ok, other=0.0)
        a_s = _activation_scales(a_s_ptrs, kb_start, stride_ask, m_ok, FUSE_QUANT)
        if GROUPS_K == 2:
            w_s_odd = tl.load(w_s_ptrs + (kb_start + 1) * stride_wsk, mask=n_ok & (rn * 0 + kb_start + 1 < kb_end),
                              other=0.0)
            a_s_odd = _activation_scales(a_s_ptrs, kb_start + 1, stride_ask, m_ok & (rm * 0 + kb_start + 1 < kb_end),
                                         FUSE_QUANT)
    for kb in range(kb_start, kb_end, GROUPS_K):
        if not SCALES_AHEAD:
            w_s = tl.load(w_s_ptrs + kb * stride_wsk, mask=n_ok, other=0.0)
            a_s = _activation_scales(a_s_ptrs, kb, stride_ask, m_ok, FUSE_QUANT)
        if TMA:
            acc = _skinny_block_tma(acc, w_desc, a_desc, tile * BLOCK_N, kb, w_s, a_s, BLOCK_K)
        else:
            acc = _skinny_block(acc, w_ptrs, a_ptrs, w_s, a_s, kb, K, rk, m_ok, n_ok, w_ptr.dtype.element_ty, FUSE_QUANT,
                                FP8_MAX, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER, NAN_BITS, CVT_FP8, BLOCK_K)
        if GROUPS_K == 2:
            if not SCALES_AHEAD:
                w_s_odd = tl.load(w_s_ptrs + (kb + 1) * stride_wsk, mask=n_ok & (rn * 0 + kb + 1 < kb_end), other=0.0)
                a_s_odd = _activation_scales(a_s_ptrs, kb + 1, stride_ask, m_ok & (rm * 0 + kb + 1 < kb_end),
                                             FUSE_QUANT)
            if TMA:
                acc = _skinny_block_tma(acc, w_desc, a_desc, tile * BLOCK_N, kb + 1, w_s_odd, a_s_odd, BLOCK_K)
            else:
                acc = _skinny_block(acc, w_ptrs + BLOCK_K * stride_wk, a_ptrs + BLOCK_K * stride_ak, w_s_odd, a_s_odd,
                                    kb + 1, K, rk, m_ok, n_ok, w_ptr.dtype.element_ty, FUSE_QUANT, FP8_MAX,
                                    MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER, NAN_BITS, CVT_FP8, BLOCK_K)
        if SCALES_AHEAD:  # after the last step, a harmless reload of its own scales
            kb_next = tl.minimum(kb + GROUPS_K, kb_end - 1)
            w_s = tl.load(w_s_ptrs + kb_next * stride_wsk, mask=n_ok, other=0.0)
            a_s = _activation_scales(a_s_ptrs, kb_next, stride_ask, m_ok, FUSE_QUANT)
            if GROUPS_K == 2:
                w_s_odd = tl.load(w_s_ptrs + (kb_next + 1) * stride_wsk,
                                  mask=n_ok & (rn * 0 + kb_next + 1 < kb_end), other=0.0)
                a_s_odd = _activation_scales(a_s_ptrs, kb_next + 1, stride_ask,
                                             m_ok & (rm * 0 + kb_next + 1 < kb_end), FUSE_QUANT)
        w_ptrs += GROUPS_K * BLOCK_K * stride_wk
        a_ptrs += GROUPS_K * BLOCK_K * stride_ak

    if PDL and TRIGGER_AFTER_LOOP:
        allow_next_grid()
    acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)
    _finish_streaming(acc, rm, rn, M, n_size, m_ok, n_ok, pid_n, pid_k, partial_ptr, PARTIAL_N, arrivals_ptr,
                      bias_ptr, out_ptr, out_row, stride_on, HAS_BIAS,
                      OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND,
                      SPLIT_K, BLOCK_N)


@triton.jit
def gemm_gemv_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    w1_ptr, w1_scale_ptr, bias1_ptr, out1_ptr, w2_ptr, w2_scale_ptr, bias2_ptr, out2_ptr,
    M, N, K, KB_PER_SPLIT, N1, N2, PARTIAL_N,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    OUT_MANTISSA_BITS: tl.constexpr, OUT_MIN_NORMAL: tl.constexpr,
    OUT_SUBNORMAL_SHIFTER: tl.constexpr, OUT_NAN_BITS: tl.constexpr, OUT_ROUND: tl.constexpr,
    FUSE_QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
    SUBNORMAL_SHIFTER: tl.constexpr, NAN_BITS: tl.constexpr, CVT_FP8: tl.constexpr,
    SPLIT_K: tl.constexpr, PDL: tl.constexpr, TRIGGER_AFTER_LOOP: tl.constexpr,
    PREFETCH_BLOCKS: tl.constexpr, MEMBERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_K: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BLOCKS_OUTER: tl.constexpr, UNMASKED: tl.constexpr,
):
    """M <= BLOCK_M (a few tokens): out[m, n] = sum over K blocks of (sum of w[n, k] * a[m, k]
    over the block) * w_scale * a_scale[m], on the CUDA cores. Each program streams a (BLOCK_N,
    K range) slab of w straight into registers, GROUPS_K scale blocks per step, and reduces it
    against each activation row in turn: no shared memory and no tensor-core tile padded to 16
    rows, so many programs fit on an SM and keep more weight bytes in flight than the skinny
    kernel's shared-memory ring allows. The products of two FP8 values are exact in float32 and
    each block's sum is float32, so the result is at least as accurate as the tensor cores'
    (benchmarks/NOTES.md, eighth session, for the speed).

    Same arguments as ``gemm_skinny_kernel`` (one launcher serves both), plus GROUPS_K; BLOCK_N
    divides 128, so a tile lies in one weight-scale row, and KB_PER_SPLIT is a multiple of
    GROUPS_K. Split-K, the arrival counters, the members (1-3 weights of one activation),
    FUSE_QUANT (every program quantizes the blocks of the activation rows it reads) and PDL work
    as there.

    K_BLOCKS_OUTER only orders the weight slab's axes, (GROUPS_K, BLOCK_N, BLOCK_K) or (BLOCK_N,
    GROUPS_K, BLOCK_K); the same sums either way. It exists because Triton picks the slab's
    register layout from that order, and Triton 3.6 and 3.9 pick opposite ones from the same
    source (``GEMV_K_BLOCKS_OUTER`` says which layout is wanted and what was measured).

    UNMASKED: every load in range (the launcher checks: M rows = BLOCK_M, every member's N a
    multiple of BLOCK_N, K a multiple of GROUPS_K blocks of BLOCK_K), so no masks; the same sums.
    Why: under Triton 3.9 the masked 8 x 16 slab takes 129 registers, unmasked 96 with its loads
    back to back (``GEMV_UNMASKED``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tile, n_size, out_row, w_ptr, w_scale_ptr, bias_ptr, out_ptr = _weight_member(
        pid_n, N, N1, N2, stride_om, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
        w1_ptr, w1_scale_ptr, bias1_ptr, out1_ptr, w2_ptr, w2_scale_ptr, bias2_ptr, out2_ptr, MEMBERS, BLOCK_N)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < n_size
    m_ok = rm < M
    rg = tl.arange(0, GROUPS_K)
    kb_start = pid_k * KB_PER_SPLIT
    kb_end = min(kb_start + KB_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    k_end = min(kb_end * BLOCK_K, K)
    if PDL:
        _prefetch_then_wait(w_ptr, rn, n_size, kb_start, kb_end, stride_wn, stride_wk, PREFETCH_BLOCKS, BLOCK_K)
    rk = kb_start * BLOCK_K + rg[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]  # (GROUPS_K, BLOCK_K)
    if K_BLOCKS_OUTER:  # the weight slab as (GROUPS_K, BLOCK_N, BLOCK_K); see the docstring
        w_ptrs = w_ptr + rk[:, None, :] * stride_wk + rn[None, :, None] * stride_wn
    else:  # as (BLOCK_N, GROUPS_K, BLOCK_K)
        w_ptrs = w_ptr + rn[:, None, None] * stride_wn + rk[None, :, :] * stride_wk
    a_ptrs = a_ptr + rk * stride_ak  # row 0; row m at + m * stride_am
    w_s_ptrs = w_scale_ptr + (tile * BLOCK_N // BLOCK_K) * stride_wsn + (kb_start + rg) * stride_wsk
    a_s_ptrs = a_scale_ptr + (kb_start + rg) * stride_ask
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end, GROUPS_K):
        k_ok = rk < k_end
        g_ok = kb + rg < kb_end
        if UNMASKED:
            w = tl.load(w_ptrs).to(tl.float32)
            w_s = tl.load(w_s_ptrs)
        else:
            if K_BLOCKS_OUTER:
                w = tl.load(w_ptrs, mask=k_ok[:, None, :] & n_ok[None, :, None], other=0.0).to(tl.float32)
            else:
                w = tl.load(w_ptrs, mask=n_ok[:, None, None] & k_ok[None, :, :], other=0.0).to(tl.float32)
            w_s = tl.load(w_s_ptrs, mask=g_ok, other=0.0)
        for m in tl.static_range(BLOCK_M):  # the weight slab stays in registers for every row
            row_ok = m < M + rg * 0  # a tensor: the interpreter refuses a Python bool in a mask
            if UNMASKED:
                x = tl.load(a_ptrs + m * stride_am)
            else:
                x = tl.load(a_ptrs + m * stride_am, mask=k_ok & row_ok[:, None], other=0.0)
            if FUSE_QUANT:
                a_q, a_s = quantize_rows(
                    x.to(tl.float32), w_ptr.dtype.element_ty, FP8_MAX, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_SHIFTER,
                    NAN_BITS, CVT_FP8
                )
                a = a_q.to(tl.float32)
            else:
                a = x.to(tl.float32)
                if UNMASKED:
                    a_s = tl.load(a_s_ptrs + m * stride_asm)
                else:
                    a_s = tl.load(a_s_ptrs + m * stride_asm, mask=g_ok & row_ok, other=0.0)
            if K_BLOCKS_OUTER:
                part = tl.sum(tl.sum(w * a[:, None, :], axis=2) * (a_s * w_s)[:, None], axis=0)
            else:
                part = tl.sum(tl.sum(w * a[None, :, :], axis=2) * (a_s * w_s)[None, :], axis=1)
            if BLOCK_M == 1:
                acc += part[None, :]
            else:
                acc += tl.where(rm[:, None] == m, part[None, :], 0.0)
        rk += GROUPS_K * BLOCK_K
        w_ptrs += GROUPS_K * BLOCK_K * stride_wk
        a_ptrs += GROUPS_K * BLOCK_K * stride_ak
        w_s_ptrs += GROUPS_K * stride_wsk
        a_s_ptrs += GROUPS_K * stride_ask

    if PDL and TRIGGER_AFTER_LOOP:
        allow_next_grid()
    _finish_streaming(acc, rm, rn, M, n_size, m_ok, n_ok, pid_n, pid_k, partial_ptr, PARTIAL_N, arrivals_ptr,
                      bias_ptr, out_ptr, out_row, stride_on, HAS_BIAS,
                      OUT_MANTISSA_BITS, OUT_MIN_NORMAL, OUT_SUBNORMAL_SHIFTER, OUT_NAN_BITS, OUT_ROUND,
                      SPLIT_K, BLOCK_N)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    """Which kernel runs a shape, and its meta-parameters. ``kind`` is "gemv", "skinny", "tma", "ws"
    or "tiled"."""

    kind: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    group_m: int = 8
    flatten: bool = False
    warp_specialize: bool = False
    tail_split: int = 1  # "tma", "ws": split the last, partial wave's tiles over K among this many programs
    num_programs: int = 0  # "tma", "ws": persistent programs (0: one per SM); tests use fewer
    groups_k: int = 1  # "gemv", "skinny" (1 or 2): 128-wide K blocks per loop step
    scales_tma: bool = False  # "ws", 128-row tiles: the ring carries the activation scales where their layout allows
    cluster: int = 1  # "ws": CTAs per cluster sharing the A tile (2: multicast TMA, Triton >= 3.9; plans: 192-row tiles)


def _num_sms(device_index: int) -> int:
    return device_card(device_index)[1]


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_usable(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Tensor descriptors need a CUDA Hopper+ device, 16-byte aligned row strides and bases."""
    if TensorDescriptor is None or interpreting() or a.device.type != "cuda":
        return False
    if not _hopper_or_newer(a.device.index or 0):
        return False
    for t in (a, w):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def ws_usable(a: torch.Tensor, w: torch.Tensor) -> bool:
    """The Gluon kernel needs what the TMA kernel needs, Gluon itself, and Hopper's wgmma (sm_90
    exactly: later architectures dropped wgmma)."""
    return gemm_hopper.AVAILABLE and tma_usable(a, w) and _sm90(a.device.index or 0)


# The multiple of rows to which ``ops`` pads the storage of an activation it quantizes for our
# GEMMs from ACTIVATION_ROWS_FROM_M rows on (zero rows, written by the quantization's own launch):
# the ws kernel's TMA boxes (128 rows, or 64 for 192-row tiles) then never reach past the last row
# of their tensor, whose GEMM measured 1.25-1.49x slower than on padded rows at M = 257-513
# (``gemm_hopper.rows_view``). The tma kernel's 64-row tiles (M = 65-256) keep descriptors of M rows:
# over the padded rows they ran no faster (H200, M = 130-230: 0.999-1.004x, session 34). Below
# M = 65 the weight-streaming kernels run, and there the padding would only enlarge the quantization.
ACTIVATION_ROWS = 128
ACTIVATION_ROWS_FROM_M = 65


def activation_rows(M: int, scale_m_major: bool = False) -> int:
    """The multiple of rows for the storage of an (M, K) activation quantized for these kernels.
    M-major scales (``prefers_m_major_scales``) take a multiple of 4 at least: the ws kernel's ring
    loads scales whose column stride is a multiple of 16 bytes (``scales_ride_the_ring``)."""
    rows = ACTIVATION_ROWS if M >= ACTIVATION_ROWS_FROM_M else 1
    return max(rows, 4) if scale_m_major else rows  # (ACTIVATION_ROWS is a multiple of 4)


def prefers_m_major_scales(M: int, N: int, K: int, w: torch.Tensor) -> bool:
    """Whether a GEMM of an (M, K) activation quantized now against ``w`` should get its scales
    M-major with rows padded to a multiple of 4 (``quant.quantize(scale_m_major=True,
    rows_multiple_of=activation_rows(M, True))``): where its plan is the ws kernel's 128-row tiles,
    whose ring then carries the scales (``gemm_hopper.scales_ride_the_ring``) on the grids where that pays
    (``card_plans``); the other kernels were tuned with row-major scales, and the skinny kernel
    measured slower with M-major ones."""
    # (w's layout from its strides alone: under torch.compile it is a fake tensor with no address)
    if not gemm_hopper.AVAILABLE or w.device.type != "cuda" or K % 16 or w.stride(1) != 1 or w.stride(0) % 16:
        return False
    dev = w.device.index or 0
    if not _sm90(dev):
        return False
    return plan(M, N, K, tma=True, ws=True, num_sms=_num_sms(dev), scales_in_ring=True,
                card=card_plans(dev)).scales_tma


def _gemv_split_k(n_tiles: int, k_blocks: int, groups_k: int, num_sms: int) -> int:
    """Split K only where the N tiles give fewer than one program per 4 SMs (N <= 256 with 8-row
    tiles, N <= 512 with 16, on 132 SMs), then to about 2 per SM, in whole loop steps. On an H100
    no split beat none for the Llama and grid shapes, down to N = 1024 (64 tiles of 16 rows: 4.3
    us with 4 splits, 3.9 with none; K = 28672: 87.0 vs 80.3 us;
    results/tune-gemv-h100-2026-11-26-s8.txt): with many programs per
    SM and no shared memory the card is full without it, and the partials cost."""
    if 4 * n_tiles >= num_sms:
        return 1
    return max(1, min(-(-num_sms // (2 * n_tiles)), k_blocks // groups_k))


def _skinny_split_k(n_tiles: int, k_blocks: int, num_sms: int, short_k: int = 24) -> int:
    """No split where the N tiles alone give >= 1.2 programs per SM, or >= 0.7 with <= ``short_k``
    K blocks; elsewhere the smallest split giving >= 1.5 programs per SM, each keeping >= 4 K blocks.
    ``short_k`` is 24 for one K block per step (the sweeps below); the skinny plan passes 64 for
    its paired steps (see ``_skinny_plan``).

    H100 sweeps (benchmarks/tune_skinny.py, CUDA graphs, M = 1 and 16, eight N x K, splits 1-12):
    about 1.5 programs per SM was best or within 3% of best on every shape; splitting N = 14336
    in two lost 13-22% (27.0 vs 23.5 us at M = 1), and N = 1024 wants 8 splits of 4 blocks.
    With the weights streamed from memory (``--cold``, M = 2-32, 22 shapes,
    results/tune-skinny-cold-h100-2026-11-27-s21.txt), split 2 still won at 112-144 tiles, but at
    160-192 tiles (N = 10240-12288) no split was 1-11% faster than two (10240 x 5120, M = 16:
    22.2 vs 23.5 us; 12288 x 4096, M = 32: 21.6 vs 24.5), except 10240 x 8192 at M = 2 (0-1.5%
    slower). With a short K loop (K = 2048-3072) no split won from 96 tiles: 6144 x 2048, 7168 x
    2048 and 8192 x 3072 8-18%, 10-18% and 3-9% faster than the 2-3 splits of the 1.5 rule (7168 x
    2048, M = 16: 7.7 vs 9.0 us), while at 80 tiles (5120 x 3072) 3 splits stayed 3-7% faster, and
    at 112-128 tiles with 40-64 K blocks 2 splits 3-5% (7168 x 5120, 8192 x 8192)."""
    if 5 * n_tiles >= 6 * num_sms or (10 * n_tiles >= 7 * num_sms and k_blocks <= short_k):
        return 1
    return max(1, min(-(-3 * num_sms // (2 * n_tiles)), k_blocks // 4))


def _skinny_stages(n_tiles: int, k_blocks: int, split: int, num_sms: int) -> int:
    """6 stages for a long K loop in an unsplit grid of <= 2 programs per SM, or for any program of
    more than 64 K blocks; 4 otherwise.

    Cold sweep (results/tune-skinny-cold-h100-2026-11-27-s21.txt, M = 2-32): with 6 stages an SM
    holds fewer programs, so 4 were faster where the grid has more (28672 x 4096: 448 programs,
    43.3 vs 47.5 us at M = 2), and in split grids, whose programs run half the K loop or less
    (8192 x 8192, split 2: 26.8 vs 27.1 us; 6144 x 4096, split 3: 11.7 vs 12.7); 6 stages were
    faster in unsplit grids of <= 1.7 programs per SM at every M (12288 x 5120, M = 32: 26.1 vs
    26.7; 13824 x 5120, M = 2: 27.0 vs 27.6) and at 112 K blocks per program (8192 x 28672, split
    2: 83.4 vs 85.4). Programs of <= 8 K blocks keep 4 (3-9% on the Llama q/o/k/v shapes,
    results/tune-skinny-h100-2026-11-26-s5-ahead1.txt)."""
    k_per_program = triton.cdiv(k_blocks, split)
    if k_per_program <= 8:
        return 4
    return 6 if (split == 1 and n_tiles <= 2 * num_sms) or k_per_program > 64 else 4


def _paired_stages(n_tiles: int, split: int, num_sms: int) -> int:
    """Stages (of two K blocks each) for the skinny kernel's paired steps, up to 32 token rows: 3
    where the grid needs 3 programs on some SM (2 to 3 per SM; 4 stages fit 2 per SM) or is an
    unsplit grid of 1.25 to 2 programs per SM; 4 elsewhere.

    Cold sweep, M = 2 and 16, 15 shapes (results/tune-skinny-cold-h100-2026-11-27-s22.txt, run 1):
    4 stages at 1.2 programs per SM and below (10240 x 8192: 31.5 vs 32.0 us with 3), at 2 per SM
    in split grids (8192 x 8192 in 2: 25.8 vs 26.6) and from 3.4 per SM (28672 x 4096: 41.3 vs
    45.3; 57344 x 8192: 157.9 vs 160.9); 3 stages at 1.3-1.7 per SM unsplit (14336 x 4096: 21.8 vs
    22.5; 12288 x 4096: 19.5 vs 19.8) and 2.9 per SM (6144 x 4096 in 4 splits: 11.5 vs 13.5)."""
    programs = n_tiles * split
    if 2 * num_sms < programs <= 3 * num_sms or (split == 1 and 5 * num_sms <= 4 * n_tiles <= 8 * num_sms):
        return 3
    return 4


def _tail_split(tiles: int, k_blocks: int, num_sms: int) -> int:
    """How many programs share each tile of the last, partial wave (1: none). Only a tail that
    fills less than half a wave is split, into at most 4 pieces of >= 8 K blocks, so that the
    partials (written once, read once) stay small next to the work saved. Forced splits of fuller
    tails (and all-tail grids above half a wave) were slower on every H100 shape timed, even after
    the ws kernel's cheaper sum (results/tail-finish-h100-2026-11-27-s13.txt)."""
    rest = tiles % num_sms
    if rest == 0 or 2 * rest > num_sms:
        return 1
    return max(1, min(num_sms // rest, k_blocks // 8, 4))


# What a 192 x 128 tile of the ws kernel (three consumers, one K block per step) costs against
# 1.5 tiles of 128 x 128 (two consumers, K blocks in pairs): about even on an H100 (whole-GEMM
# times of the 192-row plan 0.95-1.08x the paired 128-row plan's at M = 2048-8192, e5m2;
# benchmarks/NOTES.md, sixteenth session), so the coarser tiles are taken only where they need no
# more waves.
WS192_COST = 1.0

# CTAs per cluster of the 192-row ws tiles where Triton has multicast TMA (``gemm_hopper.MULTICAST``):
# 2 (a pair shares each A box, so it crosses L2 once for two 192 x 128 tiles) or 1 (off, for A/B
# runs). H100, Triton 3.9, same process, bit-identical: 8192^3 1052 -> 1001 us (e5m2) and 1073 ->
# 1030 (e4m3; cuBLAS 999), M = 8192, N = 8192, K = 28672 3651 -> 3286 and 3741 -> 3371 (cuBLAS 3413)
# (benchmarks/NOTES.md, twenty-eighth session). Only the 192-row plans take pairs: at M = 1024-4096
# (128-row plans) a three-consumer pair prototype lost 0-14%, 128-row pairs 3-6% (session 29).
MULTICAST_CLUSTER = 2


# What the plans read per card family (``card.card``; ``card_plans``), each measured on that card.
#
# The ring (``ring_max_waves``, ``ring_max_k_blocks``): where the ws kernel's ring carries the
# activation scales (``gemm_hopper.scales_ride_the_ring``), with 6 stages: L1 then holds nothing the
# K loop needs, so the sixth stage costs nothing there. Each measured in one process against the
# plan with the scales read from memory, bit-identical outputs (benchmarks/ab_ws_ring.py):
# - H100 (80 GB HBM3, results/ws-scales-ring-h100-2026-11-27-s19.txt): the ring was 2-10% faster on
#   every grid of up to 7 waves, at K = 8192 and 28672 alike (M = 1024, N = 10240, 4.8 waves:
#   161.8 -> 153.8 us, e4m3; M = 256, N = 8192, K = 28672: 128.4 -> 112.9), within noise at 14 and
#   27 waves. (Why the cards differ was not profiled; the H100's HBM is the slower.)
# - H200 (results/ws-scales-ring-h200-2026-11-27-s18.txt): up to 12% faster on grids of up to 3
#   waves at K = 8192 (M = 256, N = 8192: 41.4 -> 36.4 us, e5m2), 0-5% slower on longer grids
#   (4-14 waves), even at K = 28672 and 1 wave, 3-5% slower at 2. The default for other cards.
# Elsewhere the scales stay in memory.
#
# Mid M (``wide_from_m``, ``wide_from_k_blocks``): from which M (above 64), and from how many K
# blocks, the ws kernel's 128 x 128 tiles (``_wide_plan``) serve M <= 256 whatever the waves, where
# below them the tma kernel's 64-row tiles or ``_half_card_plan`` run (see ``_large_plan``).
# - H100: M = 129-256 from K = 7168 (session 34, from the H200's probe and session 23's H100 one;
#   at M = 160 on 4096 x 4096 the H100 had lost 20% on these tiles, Triton 3.6). M = 65-128 keeps
#   ``_half_card_plan``, measured on the H100 only.
# - H200 (session 35; e5m2, activation in padded storage, same process, us, plan before / these
#   tiles; results/mid-m-h200-2026-11-28-s34/probe-mid-m-ws.txt and
#   results/mid-m-tight-rows-h200-2026-11-28-s35/half-card-*.txt): at M = 72-128 faster, or within
#   3%, on all 31 cells timed, most where K > 8192, which took the 64-row tiles (8192 x 28672 at M = 72 110.8
#   -> 75.9, cuBLAS e4m3 86.4; 7168 x 16384 63.3 -> 43.1; 4096 x 14336 31.2 -> 26.3; 4096 x 8192
#   17.9 -> 14.8; 6144 x 4096 at M = 128 15.5 -> 13.2; 8192 x 8192 and 1024 x 4096 within 3%),
#   and at M = 130-250 on 30 of 32 cells at every K (4096 x 4096 17.5 -> 13.7; 1024 x 4096 even).
#   So every M = 65-256. The default for other cards.
#
# Narrow weights at mid M (``narrow_sms_per_program``): at M = 65-256, from 16 K blocks, where the
# ws kernel's plan (``_wide_plan``: 128 x 128 tiles, split over K by ``_tail_split``) would run at
# most one program per this many SMs (0: never), the tma kernel's 64 x 64 tiles run instead
# (``_narrow_plan``). So few 128-wide tiles split over K reach few SMs, and each split's last
# arrival reads 32 KB of partials per split and consumer; 64 x 64 tiles are four times as many, and
# the last arrival of each reads 16 KB per split.
# - H200 (session 36; e5m2, CUDA graphs, same process, us, before / after): `linear` (quantize +
#   GEMM; results/small-weights-mid-m-h200-2026-11-28-s36/ab-narrow.txt) 1024 x 4096 at M = 80
#   12.6 -> 10.7 (bf16 7.0), at M = 128 12.6 -> 10.4; 1024 x 8192 at M = 128 15.6 -> 12.9; 1024 x
#   14336 at M = 96 20.2 -> 16.8; 2048 x 2048 at M = 128 11.6 -> 9.7; 512 x 4096 at M = 128 12.3 ->
#   10.1; 1000 x 2176 at M = 100 12.9 -> 10.4 (16-32 ws programs on 132 SMs: 0.81-0.85x).
#   Where the ws plan ran 64 programs the gain was small or a loss: 1024 x 4096 at M = 200 and 256
#   0.93-0.95x, 2048 x 7168 at M = 80 1.06x (GEMM alone 12.3 -> 12.5, narrow.txt); wider weights
#   lost more (GEMM alone: 3072 x 3072 at M = 200 11.4 against 17.4-19.7 on 64 x 64 tiles;
#   4096 x 4096 at M = 80 11.7 against 12.8). So 4 SMs a program: up to 33 programs on 132 SMs.
#   The default for other cards.
# - H100: not measured; off.
class CardPlans(NamedTuple):
    ring_max_waves: int  # of 128 x 128 tiles over the persistent grid
    ring_max_k_blocks: int
    wide_from_m: int
    wide_from_k_blocks: int
    narrow_sms_per_program: int


CARD_PLANS = {"H100": CardPlans(ring_max_waves=7, ring_max_k_blocks=1 << 30,  # no K limit measured
                                wide_from_m=129, wide_from_k_blocks=56, narrow_sms_per_program=0),
              "other": CardPlans(ring_max_waves=3, ring_max_k_blocks=64, wide_from_m=65, wide_from_k_blocks=1,
                                 narrow_sms_per_program=4)}


def card_plans(device_index: int) -> CardPlans:
    """The plans' per-card table for a card's family (``card.card``): the H100's, or the H200's elsewhere."""
    return CARD_PLANS[device_card(device_index)[0]]


def _wide_plan(M: int, N: int, k_blocks: int, *, ws: bool, num_sms: int, ws192_cost: float,
               scales_in_ring: bool, card: CardPlans, cluster: int = 1) -> Plan:
    """128 x 128 tiles, the last partial wave's tiles split over K where ``_tail_split`` says so:
    the ws kernel, or the tma kernel where Gluon's cannot run. The ws kernel takes 192 x 128
    tiles (unsplit) from 8 waves of 128-row tiles up where, counted in waves of the persistent
    grid, they cost no more: 1.5 x their waves x WS192_COST at most the 128-row tiles' waves
    (M = 8192, N = K = 8192: 21 waves against 32, 0-5% faster in two runs; M = 4096,
    N = 57344: 75 against 109, 7% slower, so 128 x 128). ``scales_in_ring``: the activation
    scales' layout lets the ring carry them, which pays on the grids ``card`` describes (see
    CARD_PLANS). ``cluster``: CTAs per cluster for the 192-row tiles (``MULTICAST_CLUSTER`` where
    Triton has multicast TMA, else 1)."""
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    split = _tail_split(tiles, k_blocks, num_sms)
    if not ws:
        return Plan("tma", 128, 128, num_warps=8, num_stages=4, flatten=False, tail_split=split)
    waves = triton.cdiv(tiles, num_sms)
    waves_192 = triton.cdiv(triton.cdiv(M, 192) * triton.cdiv(N, 128), num_sms)
    if waves >= 8 and 1.5 * waves_192 * ws192_cost <= waves:
        # 4 stages: 164 KB, as fast as 5
        return Plan("ws", 192, 128, num_warps=4, num_stages=4, cluster=cluster)
    # With the K blocks in pairs, 5 stages were 0-6% faster than 4 on grids of up to 4 waves
    # (M = 256, N = K = 8192: 40.2 -> 38.0 us) and 4 stages 0-3% faster on longer ones; 6 slower
    # still (less L1 for the scales; benchmarks/NOTES.md, sixteenth session).
    if scales_in_ring and waves <= card.ring_max_waves and k_blocks <= card.ring_max_k_blocks:
        return Plan("ws", 128, 128, num_warps=4, num_stages=6, tail_split=split, scales_tma=True)
    return Plan("ws", 128, 128, num_warps=4, num_stages=5 if waves <= 4 else 4, tail_split=split)


def plan(M: int, N: int, K: int, *, tma: bool, ws: bool = False, num_sms: int = 132,
         scales_in_ring: bool = False, card: CardPlans = CARD_PLANS["H100"], multicast: bool = False) -> Plan:
    """The shape heuristic: a small, fixed set of configs (no autotuning, so a new shape costs one
    compile of at most a few configs, not a sweep). ``tma``: tensor descriptors usable;
    ``ws``: the warp-specialised Gluon kernel usable (it then replaces the 128 x 128 ``tma``
    tiles, 10-22% faster on every measured shape, M = 256..8192, except where the tma kernel's
    tail split saves more, see ``_wide_plan``); ``scales_in_ring``: the ws kernel's ring can carry
    the activation scales (their layout allows it, ``gemm_hopper.scales_ride_the_ring``), which
    changes its stages where the grid is within the ring's limits in ``card``, the card's
    ``card_plans`` (default: the H100's, like ``num_sms``), which also says where mid M takes the
    ws kernel's tiles; ``multicast``: Triton can run the ws kernel on 2-CTA clusters
    (``gemm_hopper.MULTICAST``), which its 192-row tiles then use (``MULTICAST_CLUSTER``).
    Worked out once per shape (host time per call); the module's tunables are read here, so A/B
    runs that change them get fresh plans."""
    return _plan(M, N, K, tma, ws, num_sms, GEMV_MAX_M, SKINNY_MAX_M, SKINNY_MID_MAX_M, SKINNY_MID_MAX_NK,
                 WS192_COST, scales_in_ring, card, MULTICAST_CLUSTER if multicast else 1)


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, tma: bool, ws: bool, num_sms: int, gemv_max_m: int, skinny_max_m: int,
          skinny_mid_max_m: int, skinny_mid_max_nk: tuple, ws192_cost: float, scales_in_ring: bool,
          card: CardPlans, cluster: int = 1) -> Plan:
    k_blocks = triton.cdiv(K, SCALE_BLOCK)
    if M <= gemv_max_m:
        # 16 KB of weights per step, 4 warps: 8 rows x 16 K blocks up to K = 16384, 16 x 8 above.
        # Timed as in a decode step, each GEMM over weights not in L2 (tune_skinny.py --gemv
        # --cold; 48 configs: 8 / 16 rows, 8 / 16 blocks, 4 / 8 warps, 1 / 2 splits, 1-3 stages,
        # ten shapes; results/tune-gemv-cold-h100-2026-11-27-s10.txt): the 8-row tiles double the
        # programs, so N = 4096 gives an SM ~4 instead of ~2 and each reads 2 KB runs of a row;
        # 8 x 16 was best or within 1.5% at K <= 14336 (Llama's o 9.9 -> 8.1 us, q|k|v 12.0 ->
        # 11.2, down 26.3 -> 23.4, N = 57344 156.6 -> 153.0), and 3% slower at K = 28672, where
        # 16 x 8 stays. Stages (the compiler does not pipeline these loads) changed nothing.
        block_n, groups_k = (8, 16) if k_blocks <= 128 else (16, 8)
        split = _gemv_split_k(triton.cdiv(N, block_n), k_blocks, groups_k, num_sms)
        return Plan("gemv", triton.next_power_of_2(M), block_n, num_warps=4, num_stages=1, split_k=split,
                    groups_k=groups_k)
    # Past M = 32 the skinny kernel's 64-row token tiles re-read the activation from L2 for every
    # N tile, and its programs run slower: on weights of up to 8192 x 8192 it still beat the
    # 64 x 128 tma tiles by 3-26% at M = 40-64 (11 shapes; 8192 x 8192: 30.6 vs 33.5 us at M = 48,
    # 32.1 vs 34.1 at M = 64; 6144 x 4096: 15.1 vs 17.1; 4096 x 4096: 11.5 vs 14.4), but lost on
    # wider or longer ones (N = 10240: 43.9 vs 38.3; N = 57344: 204.0 vs 182.0; at M = 64, K = 14336
    # and 28672: 34.0 vs 31.9, 99.6 vs 95.9) and at M = 96-128 everywhere (cold sweeps,
    # results/tune-skinny-cold-h100-2026-11-27-s21.txt, runs 6 and 7).
    if M <= skinny_max_m or (M <= skinny_mid_max_m and N <= skinny_mid_max_nk[0] and K <= skinny_mid_max_nk[1]):
        return _skinny_plan(M, N, K, k_blocks, num_sms)
    return _large_plan(M, N, K, k_blocks, tma=tma, ws=ws, num_sms=num_sms, ws192_cost=ws192_cost,
                       scales_in_ring=scales_in_ring, card=card, cluster=cluster)


def _skinny_plan(M: int, N: int, K: int, k_blocks: int, num_sms: int) -> Plan:
    block_m = max(16, triton.next_power_of_2(M))
    block_n = 64
    n_tiles = triton.cdiv(N, block_n)
    if block_m > 32:
        # 64-row token tiles: at most 2 programs per SM and 4 splits, 4 stages. Past 2 per SM
        # the grid ran a second round (8192 x 8192 in 3 splits, 384 programs: 38-39 us against
        # 30.5-32 in 2; 6144 x 4096 in 3: 20-21 against 15-16 in 2); of splits 1-6, 6 never won
        # (1024 x 4096: 7.3-8.4 us in 4, 8.3-9.4 in 6), and 4 splits of 64 tiles (256 programs)
        # were the best (4096 x 4096: 11.0-12.3 us). Stages 3 and 4 were swept: 4 best, or 3
        # by 1-6% on the smallest weights (3072 x 3072: 10.0 vs 10.6 us at M = 64).
        # Paired K steps (3 stages of two blocks keep 2 programs per SM) where the split's K range
        # is whole pairs, and at least 16 blocks: 2-8% faster on 12 of 18 cold cells at M = 48-64
        # (8192 x 3072: 14.3 -> 13.2 us), 4-5% slower with 8 blocks (4096 x 4096 in 4 splits:
        # 11.3 -> 11.9; results/tune-skinny-cold-h100-2026-11-27-s22.txt, run 3).
        split = max(1, min(_skinny_split_k(n_tiles, k_blocks, num_sms), 4, 2 * num_sms // n_tiles))
        k_per_split = triton.cdiv(k_blocks, split)
        if split == 1 or (k_per_split % 2 == 0 and k_per_split >= 16):
            return Plan("skinny", block_m, block_n, num_warps=4, num_stages=3, split_k=split, groups_k=2)
        return Plan("skinny", block_m, block_n, num_warps=4, num_stages=4, split_k=split)
    # Paired K steps where the split's K range is whole pairs (so the split boundaries, and the
    # result, stay those of one block per step), of at least 8 blocks: 0-6% less time on each of
    # the 48 cold cells at M = 2-32 where they apply, none slower (results/tune-skinny-cold-h100-
    # 2026-11-27-s22.txt, runs 1-2: 57344 x 8192, M = 2: 167.4 -> 157.9 us; 8192 x 8192: 26.7 -> 25.8).
    # With the K blocks in pairs, unsplit grids of 0.7-1.2 programs per SM also won with 25-64 K
    # blocks: 0.964x the time of the split plans over 32 cold cells at M = 2-32 (8192 x 8192 at
    # M = 32: 28.5 -> 27.0 us; 6144 x 4096: 14.7 -> 12.8; 9216 x 7168 at M = 16: 27.9 -> 26.0), at
    # worst 3% slower (6144 x 8192 at M = 2; results/tune-skinny-cold-h100-2026-11-27-s22.txt, runs 4-5).
    split = _skinny_split_k(n_tiles, k_blocks, num_sms, short_k=64)
    k_per_split = triton.cdiv(k_blocks, split)
    if split == 1 or (k_per_split % 2 == 0 and k_per_split >= 8):
        return Plan("skinny", block_m, block_n, num_warps=4, num_stages=_paired_stages(n_tiles, split, num_sms),
                    split_k=split, groups_k=2)
    stages = _skinny_stages(n_tiles, k_blocks, split, num_sms)
    return Plan("skinny", block_m, block_n, num_warps=4, num_stages=stages, split_k=split)


def _large_plan(M: int, N: int, K: int, k_blocks: int, *, tma: bool, ws: bool, num_sms: int,
                ws192_cost: float, scales_in_ring: bool, card: CardPlans, cluster: int = 1) -> Plan:
    if tma:
        # 128x128 / 8 warps (two consumer warpgroups), 4 stages, un-flattened loop above M = 256
        # (H100 sweeps, benchmarks/NOTES.md). Up to M = 256 the grid is often one or two waves
        # short of full, so count them: a 64 x 128 tile (4 warps, flattened) costs about 2/3 of
        # a 128 x 128 one there (results/tune-mid-m-h100-2026-11-26.txt: 20 shapes x 2 dtypes,
        # M = 80..256, this rule picks the faster of the two or one within 3%). Where the ws
        # kernel runs, at M = 65-128 past 24 K blocks, its 128 x 128 tiles on about half the SMs
        # beat those 64 x 128 tiles (``_half_card_plan``).
        # Where the ws kernel runs, from the card's ``wide_from_m`` and ``wide_from_k_blocks``
        # (CARD_PLANS: on an H100 M = 129-256 from K = 7168, elsewhere M = 65-256) these M take its
        # 128 x 128 tiles whatever the waves (``_wide_plan``: the partial wave split over K).
        # H200, e5m2, activation in padded storage, same process, against the 64-row tma tiles at
        # M = 130-250 (results/mid-m-h200-2026-11-28-s34/probe-mid-m-ws.txt): 10240 x 8192 64.0 ->
        # 43.0 us at M = 130 (bf16 50.8), 4096 x 14336 54.1 -> 33.5, 4096 x 8192 31.6 -> 19.3,
        # 2048 x 7168 15.8 -> 14.3; H100, Triton 3.6 (results/probe-mid-m-ws-h100-2026-11-27-s23.txt):
        # 4096 x 14336 at M = 160 46.4 -> 37.3, 8192 x 28672 161.3 -> 153.9, 10240 x 8192 at M = 192
        # 57.1 -> 53.8. Shorter K keeps the waves rule on an H100: there the H200 also gained
        # (4096 x 4096 17.5 -> 13.7, 11008 x 4096 34.0 -> 26.8, 1024 x 4096 even), but the H100 lost
        # 20% on 4096 x 4096 at M = 160 (14.5 against 17.5 us, Triton 3.6), and no H100 has run it since.
        # Narrow weights go first to the 64 x 64 tiles where the card's table says (``_narrow_plan``).
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        if (ws and card.narrow_sms_per_program and NARROW_MIN_M <= M <= 256 and k_blocks >= NARROW_MIN_K_BLOCKS
                and tiles * _tail_split(tiles, k_blocks, num_sms) * card.narrow_sms_per_program <= num_sms):
            return _narrow_plan(M, N, k_blocks, num_sms)
        if M <= 256 and not (ws and M >= card.wide_from_m and k_blocks >= card.wide_from_k_blocks):
            n_tiles = triton.cdiv(N, 128)
            rounds = lambda bm: triton.cdiv(triton.cdiv(M, bm) * n_tiles, num_sms)  # noqa: E731
            if 2 * rounds(64) < 3 * rounds(128):
                # (64 < M <= 128 here means n_tiles <= num_sms / 2)
                if ws and 64 < M <= 128 and k_blocks > 24:
                    return _half_card_plan(n_tiles, k_blocks, num_sms, scales_in_ring)
                split = _tail_split(triton.cdiv(M, 64) * n_tiles, k_blocks, num_sms)
                return Plan("tma", 64, 128, num_warps=4, num_stages=4, flatten=True, tail_split=split)
        return _wide_plan(M, N, k_blocks, ws=ws, num_sms=num_sms, ws192_cost=ws192_cost,
                          scales_in_ring=scales_in_ring, card=card, cluster=cluster)
    block_m = 64 if M <= 128 else 128
    return Plan("tiled", block_m, 128, num_warps=4 if block_m == 64 else 8, num_stages=3)


# The range ``CardPlans.narrow_sms_per_program`` covers: the M and K blocks it was measured at (below
# M = 65 the skinny kernel or the 64 x 128 tma tiles run; K = 2048-8192 timed).
NARROW_MIN_M = 65
NARROW_MIN_K_BLOCKS = 16


def _narrow_plan(M: int, N: int, k_blocks: int, num_sms: int) -> Plan:
    """The tma kernel's 64 x 64 tiles for a narrow weight at mid M (see ``CardPlans``), each split
    over K into the most of 4 or 2 programs that keeps the grid within one program per SM and
    >= 8 K blocks a program. H200, GEMM alone (session 36, narrow.txt): 1024 x 4096 at M = 80 in 4
    splits 8.1 us, in 2 9.0, unsplit 12.2; 1024 x 8192 at M = 128 in 4 10.2, in 2 12.9; at M = 200
    (64 tiles) in 2 9.6, in 4 (two rounds of programs) 14.7; 2048 x 2048 at M = 128 (64 tiles, 16 K
    blocks) in 2 7.5, unsplit 7.1. 64 x 32 tiles were slower (1024 x 4096: 9.1-12.0), and 6 stages
    0.4-0.7 us slower than 4."""
    tiles = triton.cdiv(M, 64) * triton.cdiv(N, 64)
    split = next((t for t in (4, 2) if tiles * t <= num_sms and k_blocks >= 8 * t), 1)
    return Plan("tma", 64, 64, num_warps=4, num_stages=4, flatten=True, tail_split=split)


def _half_card_plan(n_tiles: int, k_blocks: int, num_sms: int, scales_in_ring: bool) -> Plan:
    """The ws kernel's 128 x 128 tiles for a grid of one row of at most half as many tiles as SMs
    (M = 65-128): each tile split over K into as many programs as keep them within half the SMs (at
    most 4, of >= 8 K blocks each). The activation scales ride the ring (6 stages) where each
    program runs more than 32 K blocks and their layout allows it; else they are read from memory
    (5 stages, as ``_wide_plan`` has on short grids), which is also what a compiled graph's
    row-major scales get.

    H100, e5m2, CUDA graphs, one process (results/probe-mid-m-ws-h100-2026-11-27-s23.txt): with the
    scales in the ring, against the 64 x 128 tma tiles on twice as many programs, at M = 96 and 128,
    7-13% faster on 4096 x 4096 (2 splits: 12.5 vs 13.5 us), 8192 x 8192 (unsplit: 31.6 vs 35.5),
    4096 x 14336 (2: 32.2 vs 37.1), 8192 x 28672 (unsplit: 96.4 vs 109.7) and 2048 x 8192 (4: 13.9 vs
    14.9), but 3-5% slower on 6144 x 4096 (14.9-15.4 vs 14.5-14.6). The K splits' partial sums cost
    more than the SMs they add: 8192 x 8192 ran 35.9 us in 2 splits (128 programs) and 43-46 in 3-4.
    With 24 K blocks (8192 x 3072) the tma tiles stayed 1-8% faster, and at M = 160 (two rows of
    tiles) the 64-row tiles won on 4096 x 4096 (14.5 vs 15.5), so neither changed. At M = 48-64 on
    weights past the skinny kernel's range the tma tiles stayed faster on 5 of 6 (57344 x 8192: 179.9
    vs 196.1 us; only 8192 x 28672 gained, in 2 splits, 92.0 vs 96.7), so M <= 64 keeps them too.
    Ring or memory (session 24, results/probe-half-card-memory-h100-2026-11-27-s24.txt, 16 weights at
    M = 80-128): the ring won where each program runs 56-224 K blocks, by 6-10% (8192 x 8192 30.5-31.8
    us against 33.3-35.0 from memory in 5 stages; 4096 x 14336 31.7-32.3 vs 34.4-35.2; 8192 x 28672
    92.7-96.9 vs 102.8-106.4), memory where they run 8-16, by 3-7% (1024 x 4096 10.2-10.3 vs
    10.8-11.0; 2048 x 8192 13.4-14.0 vs 13.8-14.5; 2048 x 7168 12.6-13.2 vs 13.1-14.0; 4096 x 4096 a
    tie), and at 28-32 neither by more than a few percent (4096 x 8192, 3072 x 8192, 2048 x 14336,
    6144 x 4096). From memory these tiles beat the tma tiles on 13 of the 16 weights at every M
    timed (not 6144 x 4096 and 7168 x 4096 at M = 128, 4096 x 8192 at M = 80: 3-5% slower). Measured
    on an H100 only; other cards take ``_wide_plan`` at these M (``CARD_PLANS``: on an H200 it was
    faster or even on every weight timed)."""
    split = max(1, min(4, k_blocks // 8, num_sms // (2 * n_tiles)))
    if scales_in_ring and k_blocks > 32 * split:
        return Plan("ws", 128, 128, num_warps=4, num_stages=6, tail_split=split, scales_tma=True)
    return Plan("ws", 128, 128, num_warps=4, num_stages=5, tail_split=split)


# --------------------------------------------------------------------------- launchers


_ARRIVALS: dict = {}
_MIN_ARRIVALS = 1 << 16  # N tiles (of 16 columns at least): N up to 1M before a bigger buffer is needed


def _arrival_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """int32 zeros, one counter per N tile, that the skinny kernel leaves zeroed after each
    launch, so one buffer per (device, stream) serves every call: launches on one stream run in
    turn, and concurrent streams get their own.

    The buffer outlives the call, so it must not come from a CUDA graph's private memory pool:
    torch.compile's reduce-overhead mode warms up and records with this thread's allocations
    routed to its pool, and refuses allocations that outlive the graph. So the buffer is made by
    another thread, and a capture reuses one made before it. Only a capture with none made
    before allocates in the graph's pool (plain ``torch.cuda.graph`` allows that)."""
    if device.type != "cuda":
        key = (-1, 0)
    else:
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    buf = _ARRIVALS.get(key)
    if buf is not None and buf.numel() >= n_tiles:
        return buf
    n = max(n_tiles, _MIN_ARRIVALS)
    if device.type != "cuda":
        buf = torch.zeros(n, dtype=torch.int32, device=device)
    elif torch.cuda.is_current_stream_capturing():
        made = [b for (index, _), b in _ARRIVALS.items() if index == device.index and b.numel() >= n_tiles]
        buf = made[0] if made else torch.zeros(n, dtype=torch.int32, device=device)
    else:
        buf = _zeros_on_another_thread(n, device)
    _ARRIVALS[key] = persistent(buf)  # a recorded call (blockwise_fp8.replay) keeps it
    return buf


def _zeros_on_another_thread(n: int, device: torch.device) -> torch.Tensor:
    made: list = []

    def make():
        try:
            with torch.cuda.device(device):
                made.append(torch.zeros(n, dtype=torch.int32, device=device))
                torch.cuda.current_stream(device).synchronize()  # zeroed before any kernel reads it
        except BaseException as e:  # noqa: BLE001 -- handed to the calling thread
            made.append(e)

    t = threading.Thread(target=make, name="blockwise_fp8-counters")
    t.start()
    t.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _cluster_plan(p: Plan, device_index: int, num_sms: int) -> Plan:
    """A cluster plan's grid trimmed to the clusters the card runs at once, where the driver has
    said that is fewer than one per ``p.cluster`` SMs (``gemm_hopper.pairs_fit``)."""
    most = p.num_programs or num_sms // p.cluster
    fit = gemm_hopper.pairs_fit(device_index, p.block_m // 64, p.num_stages, most)
    return replace(p, num_programs=fit) if fit < most else p


def _persistent_grid(p: Plan, M: int, N: int, K: int, num_sms: int, device: torch.device, *, counters_per_tile: int):
    """(programs, tail_start, tail_split, partials, counters) of a persistent kernel: up to one
    program per SM (or ``p.num_programs``); tiles [0, tail_start) in whole waves; with
    ``p.tail_split`` > 1 and a partial last wave, its tiles each split over K among tail_split
    programs, with a float32 partial per split (tail tiles, tail_split, block_m, block_n) and
    ``counters_per_tile`` zeroed arrival counters per tail tile (partials and counters None
    without a split). A grid of fewer tiles than programs is all tail: split-K on every tile."""
    programs, tail_start, split, tails = _grid_layout(p, M, N, K, num_sms)
    if split == 1:
        return programs, tail_start, 1, None, None
    partial = torch.empty((tails, split, p.block_m, p.block_n), dtype=torch.float32, device=device)
    return programs, tail_start, split, partial, _arrival_counters(device, tails * counters_per_tile)


@functools.lru_cache(maxsize=4096)
def _grid_layout(p: Plan, M: int, N: int, K: int, num_sms: int) -> tuple[int, int, int, int]:
    """(programs, tail_start, tail_split, tail tiles) of ``_persistent_grid``, once per shape."""
    num_tiles = triton.cdiv(M, p.block_m) * triton.cdiv(N, p.block_n * p.cluster)
    most = p.num_programs or num_sms // p.cluster  # (clusters, where the plan has them)
    split = min(p.tail_split, triton.cdiv(K, SCALE_BLOCK))
    if split == 1 or num_tiles % most == 0:
        return min(most, num_tiles), num_tiles, 1, 0
    tail_start = num_tiles - num_tiles % most
    tails = num_tiles - tail_start
    programs = most if tail_start else min(most, tails * split)
    return programs, tail_start, split, tails


def _tma_scratch(size: int, align: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_tma_allocator() -> None:
    # Device-side descriptors need scratch memory; host-side ones do not, but Triton asks for an
    # allocator on some versions whenever descriptors are present. A torch allocation is cheap.
    if hasattr(triton, "set_allocator"):
        triton.set_allocator(_tma_scratch)


def gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    plan_override: Plan | None = None,
) -> torch.Tensor:
    """Blockwise GEMM on 2-D fp8 operands (shapes checked by ``blockwise_fp8.ops``)."""
    assert a.dim() == 2 and w.dim() == 2 and a.shape[1] == w.shape[1]
    return _run(a, a_scale, w, w_scale, bias, out_dtype, fuse_quant=False, plan_override=plan_override)


def linear_fused(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    plan_override: Plan | None = None,
) -> torch.Tensor:
    """Quantize ``x`` (M <= SKINNY_MAX_M, high precision) in 1x128 blocks to ``w``'s FP8 dtype
    inside the gemv or skinny GEMM. Bit-identical to quantize-then-gemm with the same plan."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1]
    return _run(x, None, w, w_scale, bias, out_dtype, fuse_quant=True, plan_override=plan_override)


# Whether the installed Triton is 3.7 or later. Triton 3.7-3.9 lay out and fence the streaming
# kernels' code differently from 3.6 (below: the gemv's slab order and masks, the skinny kernel's
# tiles), so three of their settings follow the version; timed on 3.6 and 3.9 only.
TRITON_3_7 = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7)

# The gemv kernel's weight slab with its K blocks as the outer axis (see the kernel). Triton
# gives the slab a register layout from its axis order, with the 128 columns of a block across 8
# lanes at 16 bytes each; the question is where the 4 remaining lanes and the 4 warps go. Wanted
# (what Triton 3.6 builds with False, session 29's SASS): lanes across weight rows and each
# thread's 8 loads along K blocks of one row, so block sums add up in registers, its 8 16-byte
# loads issue back to back (96 registers). Triton 3.9 builds that from True (129 registers) and
# from False the other layout (each thread's loads on 8 rows, lanes across K blocks: 56 shuffles
# a step instead of 25, and ptxas, whatever its version, issues 5 of the 8 loads only as earlier
# registers free up: 79 registers); Triton 3.6 the reverse. Triton 3.7 and 3.8 choose as 3.9 does,
# and with True build the wanted layout at 3.6's 96 registers (3.9's PTX needs 128-129 whichever
# ptxas compiles it: 4 or 3 programs an SM instead of 5). At M = 1 under Triton 3.9 the gemv
# streamed 6-10% slower than under 3.6 on the 64 and 84 MB weights (H100s, two grid runs with
# self-heat 1 s, bf16 within 1% between them: 2344 against 2587 GB/s at N = K = 8192). Timed in
# one process per Triton (session 30, H100, results/ab-gemv-layout-triton3{6,9}-h100-2026-11-28-s30.txt,
# e5m2, us at N = 8192 / 10240 / 57344 with K = 8192): under 3.6 False 26.0 / 30.4 / 153.3, True
# 33.6 / 36.2 / 178.7; under 3.9 False 28.3 / 32.6 / 158.3, True 25.8 / 31.8 / 156.3 (K = 28672,
# 16-row slabs of 8 blocks: a tie either way). So each Triton takes the order that gives it the
# wanted layout: True from 3.7 on, which 3.7 and 3.8 get by the SASS only (untimed there).
GEMV_K_BLOCKS_OUTER = TRITON_3_7
# A cap on the gemv kernel's registers per thread (Triton's maxnreg), None for none. Why one might
# pay under Triton 3.9: with K blocks outer its 8 x 16 slab takes 129 registers, which the SM
# allocates as 136, room for 3 programs of 128 threads instead of 5 under 3.6 (96); capped at 128,
# 4 fit, and ptxas spills 5 registers, all outside the K loop (session 30, sass_of_launch.py;
# 120 already spills inside it). At M = 1 under 3.9 the gemv still streamed 4-8% slower than
# under 3.6 at N = 10240, where 1280 programs take 3.2 waves of 3 an SM. Timed (session 31, H100,
# e5m2, M = 1, us at N = 8192 / 10240 / 57344, K = 8192, benchmarks/ab_gemv_layout.py --maxnreg;
# results/ab-gemv-unmasked-skinny-tma-h100-2026-11-28-s31/): under 3.9, K blocks outer masked,
# capped 26.4 / 33.1 / 161.0 against 25.7 / 32.2 / 156.0 uncapped; and GEMV_UNMASKED (below)
# brings the slab to 96 registers without a cap. So None.
GEMV_MAXNREG = None
# Whether the gemv kernel drops its masks where every load is in range (see the kernel's UNMASKED;
# _gemv_unmasked says where). Why it pays under Triton 3.9: the masked 8 x 16 slab (K blocks
# outer) takes 129 registers, 3 programs an SM; unmasked it takes 96, 5 programs, and its 8 loads
# span 36 SASS lines instead of 82 (session 30, sass_of_launch.py). Under 3.6 (rows outer) it
# takes 95 registers instead of 96 and gains nothing. Timed (session 31, H100, e5m2, M = 1, us at
# N = 8192 / 10240 / 57344, K = 8192; results/ab-gemv-unmasked-skinny-tma-h100-2026-11-28-s31/):
# under 3.9, K blocks outer masked 25.7 / 31.9 / 156.0, unmasked 25.9 / 30.1 / 152.7 (best of 5,
# 57344 best of 2; a second run of best of 2: 25.7 / 32.2 vs 26.2 / 30.0); under 3.6, rows outer
# masked 25.7 / 30.5 / 153.1, unmasked 26.1 / 30.4 / 152.8. So on with the K-blocks-outer order
# (Triton 3.7 on, where 3.7 and 3.8 follow 3.9's SASS untimed), off before.
GEMV_UNMASKED = TRITON_3_7

# Whether the skinny kernel loads each K block's scales one block ahead (see the kernel).
SKINNY_SCALES_AHEAD = True
# The smallest block_m for which the skinny kernel loads its tiles by tensor descriptor (TMA)
# where the operands allow it (see the kernel, and _skinny_tma_fits); None: never. Why from
# Triton 3.7 on: under 3.9 the skinny kernel ran 0-3% slower than under 3.6 at M = 2-16 and 4-9%
# at M = 32-64 (the session-30 grids); its SASS holds a proxy fence (MEMBAR.ALL.CTA) before each
# wgmma that reads cp.async tiles, two per K step, which 3.6 did not emit, and at block_m = 64 it
# spills. With TMA the loop has no fence and takes 56 / 96 / 184 registers at block_m = 16 / 32 /
# 64 instead of 77 / 112-148 / 255 (CPU, sm_90). Timed (session 31, H100, e5m2, K = 8192, us,
# pointer -> TMA, two runs of best of 2 and 4; results/ab-gemv-unmasked-skinny-tma-h100-2026-11-28-s31/):
# under 3.9, N = 8192: M = 2 26.5 -> 26.7, M = 16 26.8 -> 26.8, M = 32 28.7-29.8 -> 28.1-28.4,
# M = 64 32.6-32.7 -> 31.7; N = 10240: M = 2 31.4-31.8 -> 32.7-33.1, M = 32 34.8-35.1 -> 34.0-34.3;
# under 3.6 TMA lost at every M (N = 8192: 25.7 / 27.0 / 31.1 -> 27.5 / 28.7 / 32.4 at M = 2 /
# 32 / 64). So TMA from block_m = 32 under Triton 3.7 on (3.7 and 3.8 untimed), never before.
# These descriptors are made in the kernel (each program writes two to scratch memory after its PDL
# wait, then fences them): an eager launch then costs no more host time than the pointer path's.
SKINNY_TMA = 32 if TRITON_3_7 else None
# The smallest block_m for which a skinny launch being captured into a CUDA graph loads its tiles
# by descriptors made on the host (kernel parameters, encoded by Triton's launcher); None: as an
# eager launch. Why only under capture: the host pays for the encoding once, at capture, and the
# kernel starts without making its own. Eager, each launch would pay it: 45 -> 72 us of host
# time a call (H200, M = 16-32, four descriptors), on calls that are host-bound already. Timed
# (session 37, H200, CUDA-graph medians, us, pointer / kernel-made / host-made descriptors;
# benchmarks/results/skinny-host-descriptors-h200-2026-11-28-s37/): K = 512, M = 16: 2.5 / 3.6 /
# 2.4 (a program spends about 1.2 us making its descriptors); 8192 x 8192, M = 2 and 16: 21.6-22.0
# / 20.9-21.0 / 19.6-19.9; M = 32: 24.6 / 21.9 / 21.2.
SKINNY_TMA_CAPTURED = 16 if TRITON_3_7 else None
# Under PDL, whether the skinny kernel lets the next grid (the GEMM of the next Linear on the
# same input) launch once its K loop is done, so that launch overlaps this kernel's split-K sum
# and epilogue: the Linears of a Llama layer 108.1 -> 106.4 us at M = 1, 117.1 -> 116.6 at M = 16
# (H100, diag_layer.py). Triggered at the kernel's start instead, it measured slower (115.9 vs
# 110.7 us): the next grid's programs then sit on the SMs through the whole weight stream.
SKINNY_TRIGGER_AFTER_LOOP = True
# Under PDL, how many of its first weight K blocks each skinny program asks L2 for before
# griddepcontrol.wait: the weights do not depend on the grid before, so their first DRAM round
# trip overlaps that grid's tail. H100, seven Linears of a layer in one CUDA graph, shared
# quantization: M = 1 107.3 -> 104.7 / 103.9 / 105.6 us with 1 / 2 / 3 blocks, 8 blocks 111.9;
# M = 16 116.8 -> 114.0 with 2 (benchmarks/NOTES.md, sixth session). Session 5's prefetch lost
# because it came with a trigger at the kernel's start.
SKINNY_PREFETCH_BLOCKS = 2


# Up to which M the ws kernel (on one CTA) launches under programmatic dependent launch, where
# ``quant.programmatic_launch`` allows it (0: never). The activation quantization lets the next
# grid launch at its start, so the GEMM's CTAs set up (shared memory, barriers) while it
# finishes instead of after the launch gap, and wait for it (griddepcontrol.wait) before any
# global access; same bits. Timed (session 38, H200, e5m2, `linear` in CUDA graphs, us, with /
# without; benchmarks/results/persistent-pdl-h200-2026-11-28-s38/): 3-8% less time at M = 80-256
# on 9 of 12 cells (4096 x 4096 at M = 128 13.7 / 14.2; 8192 x 8192 at M = 256 35.1 / 37.1;
# 1024 x 4096 at M = 256 12.1 / 13.1), level at 3 (within 0.5%); at M = 512-1024 0.955-1.027,
# 1-3% slower on 6 of 10 cells (28672 x 4096 at M = 512 138.1 / 134.4). The tma kernel (64 x 64
# tiles on narrow weights) lost 25-29% under PDL (1024 x 4096 at M = 80 13.5 / 10.5), so it
# launches as before; 2-CTA clusters (M >= 4096) were not tried.
WS_PDL_MAX_M = 256


def _run(a, a_scale, w, w_scale, bias, out_dtype, *, fuse_quant, plan_override):
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(M, N))
    dev = (a.device.index or 0) if a.device.type == "cuda" else 0
    num_sms = _num_sms(dev)
    if plan_override is not None:
        p = plan_override
    elif fuse_quant:  # only the weight-streaming kernels quantize in registers
        p = plan(M, N, K, tma=False, num_sms=num_sms)
        if p.kind not in STREAMING_KINDS:
            p = _skinny_plan(M, N, K, triton.cdiv(K, SCALE_BLOCK), num_sms)
    else:
        tma = tma_usable(a, w)  # checked once per call: ws_usable would repeat it
        ws = tma and gemm_hopper.AVAILABLE and _sm90(dev)
        p = plan(M, N, K, tma=tma, ws=ws, num_sms=num_sms,
                 scales_in_ring=ws and gemm_hopper.scales_ride_the_ring(a_scale, 2), card=card_plans(dev),
                 multicast=ws and gemm_hopper.MULTICAST)
    if fuse_quant and p.kind not in STREAMING_KINDS:
        raise ValueError(f"the fused activation quantization runs only in the gemv and skinny kernels, not {p.kind!r}")
    if p.cluster != 1 and p.kind != "ws":
        raise ValueError(f"only the 'ws' plan runs on CTA clusters, got cluster={p.cluster} for {p.kind!r}")
    if p.kind in STREAMING_KINDS:
        _launch_streaming(a, a_scale, [(w, w_scale, bias, out)], p, fuse_quant=fuse_quant)
        return out
    bias_arg = bias if bias is not None else w_scale
    if p.kind == "ws":
        if plan_override is not None and not ws_usable(a, w):  # plan() only picks ws where usable
            raise ValueError(
                "the 'ws' plan needs Triton's Gluon, an sm_90 GPU and 16-byte aligned operand rows; "
                f"got a on {a.device} with strides {tuple(a.stride())}, w with strides {tuple(w.stride())}"
            )
        if (p.block_m, p.block_n) not in gemm_hopper.TILES:
            tiles = ", ".join(f"{m} x {n}" for m, n in gemm_hopper.TILES)
            raise ValueError(f"the 'ws' plan has {tiles} tiles, got {p.block_m} x {p.block_n}")
        if p.cluster > 1:
            p = _cluster_plan(p, dev, num_sms)
        programs, tail_start, tail_split, partial, arrivals = _persistent_grid(
            p, M, N, K, num_sms, a.device, counters_per_tile=p.block_m // 64)
        return gemm_hopper.gemm_ws(a, a_scale, w, w_scale, bias, out, programs=programs, block_m=p.block_m,
                                   stages=p.num_stages, group_m=p.group_m, tail_start=tail_start,
                                   tail_split=tail_split, partial=partial, arrivals=arrivals,
                                   scales_tma=p.scales_tma, cluster=p.cluster,
                                   pdl=p.cluster == 1 and M <= WS_PDL_MAX_M and programmatic_launch(a.device))
    if p.kind == "tma":
        _set_tma_allocator()
        a_desc = TensorDescriptor.from_tensor(a, [p.block_m, SCALE_BLOCK])
        w_desc = TensorDescriptor.from_tensor(w, [p.block_n, SCALE_BLOCK])
        programs, tail_start, tail_split, partial, arrivals = _persistent_grid(
            p, M, N, K, num_sms, a.device, counters_per_tile=1)
        if tail_split == 1:
            partial = arrivals = w_scale
        launch(gemm_tma_kernel, (programs,), (
            a_desc, a_scale, w_desc, w_scale, bias_arg, out, partial, arrivals,
            M, N, K, tail_start,
            a_scale.stride(0), a_scale.stride(1), w_scale.stride(0), w_scale.stride(1),
            out.stride(0), out.stride(1),
        ), _tma_meta(p, programs, tail_split, bias is not None, out_dtype))
        return out
    launch(gemm_tiled_kernel, (-(-M // p.block_m) * -(-N // p.block_n),), (
        a, a_scale, w, w_scale, bias_arg, out,
        M, N, K,
        a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
        w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        out.stride(0), out.stride(1),
    ), _tiled_meta(p, bias is not None, out_dtype))
    return out


# The constexprs and launch options of each launch, built once per configuration (a hashable
# tuple for kernels.launch).
@functools.lru_cache(maxsize=1024)
def _tma_meta(p: Plan, programs: int, tail_split: int, has_bias: bool, out_dtype: torch.dtype) -> tuple:
    return tuple(dict(
        BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=SCALE_BLOCK, GROUP_M=p.group_m,
        NUM_PROGRAMS=programs, FLATTEN=p.flatten, WARP_SPECIALIZE=p.warp_specialize, TAIL_SPLIT=tail_split,
        num_warps=p.num_warps, num_stages=p.num_stages, HAS_BIAS=has_bias, **output_format_constexprs(out_dtype),
    ).items())


@functools.lru_cache(maxsize=1024)
def _tiled_meta(p: Plan, has_bias: bool, out_dtype: torch.dtype) -> tuple:
    return tuple(dict(
        BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=SCALE_BLOCK, GROUP_M=p.group_m,
        num_warps=p.num_warps, num_stages=p.num_stages, HAS_BIAS=has_bias, **output_format_constexprs(out_dtype),
    ).items())


STREAMING_KINDS = ("gemv", "skinny")  # the weight-streaming kernels: split-K, members, PDL


def _launch_streaming(a, a_scale, members, p: Plan, *, fuse_quant: bool = False) -> None:
    """One launch of the gemv or skinny kernel for 1-3 ``(w, w_scale, bias, out)`` members
    sharing ``a`` (and the strides of the first member; the caller checks)."""
    M, K = a.shape
    if p.kind == "gemv" and (M > p.block_m or p.block_n > SCALE_BLOCK or SCALE_BLOCK % p.block_n or p.groups_k < 1):
        raise ValueError(f"the 'gemv' plan needs M <= its block_m and a BLOCK_N dividing 128, got M = {M} and {p}")
    if p.kind == "skinny" and M > p.block_m:
        # one token tile per launch: rows past it would be left unwritten, not computed
        raise ValueError(f"the 'skinny' plan computes one tile of block_m tokens, so M <= block_m; got M = {M} and {p}")
    if p.kind == "skinny" and p.groups_k not in (1, 2):
        raise ValueError(f"the 'skinny' plan takes 1 or 2 K blocks per step (groups_k), got {p.groups_k}")
    w, w_scale, bias, out = members[0]
    sizes = tuple(m[0].shape[0] for m in members)
    split, kb_per, n_tiles, partial_n = _streaming_grid(p, M, K, sizes)
    partial = torch.empty((split, M, partial_n), dtype=torch.float32, device=a.device) if split > 1 else out
    arrivals = _arrival_counters(a.device, n_tiles) if split > 1 else w_scale
    s_arg = a_scale if a_scale is not None else w_scale
    padded = members + [members[0]] * (3 - len(members))  # unused pointer slots
    extra = [t if t is not None else w_scale for m in padded[1:] for t in m]
    pdl = programmatic_launch(a.device)
    tma, host_tma = _skinny_descriptors(p, a, members, sizes, out, fuse_quant)
    unmasked = GEMV_UNMASKED and p.kind == "gemv" and _gemv_unmasked(p, M, K, sizes)
    if tma and not host_tma:
        _set_tma_allocator()
    descriptors = ()  # the skinny kernel's a_tma, w_tma, w1_tma, w2_tma; placeholders where unread
    if host_tma:
        descriptors = (TensorDescriptor.from_tensor(a, [p.block_m, SCALE_BLOCK]),
                       *(TensorDescriptor.from_tensor(m[0], [p.block_n, SCALE_BLOCK]) for m in members))
    if p.kind == "skinny":
        descriptors += (w_scale,) * (4 - len(descriptors))
    meta = _streaming_meta(
        p, split, bias is not None, out.dtype, fuse_quant, w.dtype, hardware_fp8_cast(a.device), pdl, len(members),
        SKINNY_SCALES_AHEAD, SKINNY_TRIGGER_AFTER_LOOP, SKINNY_PREFETCH_BLOCKS, GEMV_K_BLOCKS_OUTER, GEMV_MAXNREG,
        unmasked, tma, host_tma,
    )
    launch(gemm_gemv_kernel if p.kind == "gemv" else gemm_skinny_kernel, (n_tiles, split), (
        a, s_arg, w, w_scale, bias if bias is not None else w_scale, out, partial, arrivals, *extra, *descriptors,
        M, sizes[0], K, kb_per, padded[1][0].shape[0], padded[2][0].shape[0], partial_n,
        a.stride(0), a.stride(1),
        s_arg.stride(0) if a_scale is not None else 0, s_arg.stride(1) if a_scale is not None else 0,
        w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        out.stride(0), out.stride(1),
    ), meta)


def _gemv_unmasked(p: Plan, M: int, K: int, sizes: tuple) -> bool:
    """Whether every load of a gemv launch is in range: its BLOCK_M rows all real, every member's
    N whole tiles, and K whole steps of GROUPS_K blocks (then every split is whole steps too)."""
    return M == p.block_m and all(n % p.block_n == 0 for n in sizes) and K % (SCALE_BLOCK * p.groups_k) == 0


# (device, plan, M and K, N of each member, dtypes, bias?) of skinny launches whose host-descriptor
# kernel an eager call has run once: a capture can only replay kernels an eager call has loaded
# (Triton cannot load one while a stream captures; see ops._quantize_inside).
_HOST_DESCRIPTORS_LOADED: set = set()


def _capturing(a: torch.Tensor) -> bool:
    """Whether ``a``'s device is capturing a CUDA graph on its current stream."""
    return a.is_cuda and torch.cuda.is_current_stream_capturing()


def _skinny_descriptors(p: Plan, a: torch.Tensor, members: list, sizes: tuple, out: torch.Tensor,
                        fuse_quant: bool) -> tuple:
    """(whether a streaming launch loads its tiles by tensor descriptor, whether the host makes
    them): the skinny kernel's, where TMA can load the operands, from SKINNY_TMA_CAPTURED's block_m
    with host-made descriptors while a CUDA graph is being captured on the current stream (and on
    the first eager call of the launch, which loads that kernel for a later capture), else from
    SKINNY_TMA's block_m with descriptors made in the kernel."""
    if p.kind != "skinny" or fuse_quant:
        return False, False
    captured = SKINNY_TMA_CAPTURED is not None and p.block_m >= SKINNY_TMA_CAPTURED
    eager = SKINNY_TMA is not None and p.block_m >= SKINNY_TMA
    if not (captured or eager) or not _skinny_tma_fits(a, members):
        return False, False
    if captured:
        if _capturing(a):
            return True, True
        key = (a.device, p, a.shape, sizes, a.dtype, out.dtype, members[0][2] is None)  # what the kernel specializes on
        if key not in _HOST_DESCRIPTORS_LOADED:
            _HOST_DESCRIPTORS_LOADED.add(key)
            return True, True
    return eager, False


def _skinny_tma_fits(a: torch.Tensor, members: list) -> bool:
    """Whether TMA can load the skinny kernel's tiles: FP8 rows contiguous along K, and each base
    address and row stride a multiple of 16 bytes (what a tensor descriptor requires)."""
    for t in [a] + [m[0] for m in members]:
        if t.stride(1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16:
            return False
    return True


@functools.lru_cache(maxsize=4096)
def _streaming_grid(p: Plan, M: int, K: int, sizes: tuple) -> tuple[int, int, int, int]:
    """(split, K blocks per split, N tiles, columns of the partials) of a streaming launch."""
    k_blocks = triton.cdiv(K, SCALE_BLOCK)
    step = p.groups_k  # K blocks per loop step; a split is whole steps
    split = max(1, min(p.split_k, k_blocks))
    kb_per = triton.cdiv(triton.cdiv(k_blocks, split), step) * step
    split = triton.cdiv(k_blocks, kb_per)  # no empty splits
    n_tiles = sum(triton.cdiv(n, p.block_n) for n in sizes)
    partial_n = sizes[0] if len(sizes) == 1 else n_tiles * p.block_n
    return split, kb_per, n_tiles, partial_n


@functools.lru_cache(maxsize=1024)
def _streaming_meta(p: Plan, split: int, has_bias: bool, out_dtype: torch.dtype, fuse_quant: bool,
                    w_dtype: torch.dtype, cvt: bool, pdl: bool, members: int,
                    scales_ahead: bool, trigger_after_loop: bool, prefetch_blocks: int, k_blocks_outer: bool,
                    gemv_maxnreg, unmasked: bool, tma: bool, host_tma: bool) -> tuple:
    kind_meta = (dict(GROUPS_K=p.groups_k, K_BLOCKS_OUTER=k_blocks_outer, UNMASKED=unmasked) if p.kind == "gemv"
                 else dict(SCALES_AHEAD=scales_ahead, GROUPS_K=p.groups_k, TMA=tma, HOST_TMA=host_tma))
    if p.kind == "gemv" and gemv_maxnreg is not None:
        kind_meta["maxnreg"] = gemv_maxnreg
    return tuple(dict(
        HAS_BIAS=has_bias, **output_format_constexprs(out_dtype),
        FUSE_QUANT=fuse_quant, FP8_MAX=float(torch.finfo(w_dtype).max), **format_constexprs(w_dtype),
        CVT_FP8=cvt, SPLIT_K=split, PDL=pdl,
        TRIGGER_AFTER_LOOP=trigger_after_loop, PREFETCH_BLOCKS=prefetch_blocks,
        MEMBERS=members, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=SCALE_BLOCK, **kind_meta,
        num_warps=p.num_warps, num_stages=p.num_stages, **pdl_launch_options(pdl),
    ).items())


MAX_GROUP = 3  # weights per launch of gemm_group (the pointer slots of the skinny kernel)


def _groupable(a: torch.Tensor, ws, w_scales, biases) -> bool:
    """Whether the skinny kernel can take these weights in one launch: same dtype and strides
    (weights, scales), K matching ``a``, no empty weight, biases all absent or all one dtype."""
    w0, s0 = ws[0], w_scales[0]
    if any(b is not None for b in biases):
        if any(b is None or b.dtype != biases[0].dtype or b.stride(0) != 1 for b in biases):
            return False
    return all(
        w.dtype == w0.dtype and w.shape[1] == a.shape[1] and w.shape[0] > 0 and w.stride() == w0.stride()
        and s.stride() == s0.stride()
        for w, s in zip(ws, w_scales)
    )


def gemm_group(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    ws: list,
    w_scales: list,
    biases: list,
    out_dtype: torch.dtype,
) -> list:
    """``[gemm(a, a_scale, w, s, b, out_dtype) for ...]``: one activation against several weights
    (a layer's q/k/v or gate/up projections). Where a weight-streaming kernel (gemv, skinny)
    serves M, up to MAX_GROUP weights run in one launch: one ramp and one tail instead of one per
    weight. Elsewhere, or
    where the weights differ in dtype or layout, one GEMM per weight. Results agree with the
    separate GEMMs to float32 summation order (the split over K follows the group's width)."""
    M, K = a.shape
    outs: list = [None] * len(ws)
    if len(ws) > 1 and M > 0 and K > 0 and _groupable(a, ws, w_scales, biases):
        num_sms = _num_sms((a.device.index or 0) if a.device.type == "cuda" else 0)
        block_n = plan(M, 1, K, tma=False, num_sms=num_sms).block_n
        for start in range(0, len(ws), MAX_GROUP):
            idx = list(range(start, min(start + MAX_GROUP, len(ws))))
            width = sum(-(-ws[i].shape[0] // block_n) for i in idx) * block_n  # the tiles' columns
            p = plan(M, width, K, tma=False, num_sms=num_sms)
            if len(idx) == 1 or p.kind not in STREAMING_KINDS:
                continue
            for i in idx:
                outs[i] = torch.empty((M, ws[i].shape[0]), dtype=out_dtype, device=a.device)
            _launch_streaming(a, a_scale, [(ws[i], w_scales[i], biases[i], outs[i]) for i in idx], p)
    for i, done in enumerate(outs):
        if done is None:
            outs[i] = _run(a, a_scale, ws[i], w_scales[i], biases[i], out_dtype, fuse_quant=False, plan_override=None)
    return outs
