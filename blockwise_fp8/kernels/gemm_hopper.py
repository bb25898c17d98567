"""Warp-specialised blockwise FP8 GEMM for Hopper, written in Gluon (Triton's explicit dialect).

Same contract as ``gemm.gemm_tma_kernel``: out = (a * a_scale) @ (w * w_scale).T (+ bias), layout
stated in ``kernels/gemm.py``, one 128 x 128 output tile per step of a persistent grid.

Why a second large-M kernel: every K block's tensor-core product must be finished before it is
scaled into the float32 accumulator (acc += (a_s * w_s) * part). In the plain Triton kernel the
compiler puts three CTA-wide barriers in each K step (before re-arming and refilling a shared
memory stage), so both warpgroups promote in lockstep and the tensor cores idle meanwhile
(Nsight Compute, H100, 8192^3: ~48% of warp stall cycles at those barriers; ~830 TFLOPS).

Here the roles are split (``gl.warp_specialize``):
    producer (1 warp)       TMA-loads the A (64 C x 128) and W (128 x 128) tiles of each K step
                            into a STAGES-deep ring; ``ready[s]`` completes when all landed
    consumers (C x 4 warps) each owns 64 rows of the tile: waits ``ready[s]``, issues its
                            wgmma, waits for it, releases the stage through ``empty[s]`` (one
                            arrival per consumer), promotes; runs the epilogue (bias, output
                            cast, masked store)
C = 2 (128 x 128 tiles) or 3 (192 x 128). No CTA-wide barrier remains in the K loop (only each
warpgroup's own), so one consumer's promotion overlaps the others' MMAs, as in DeepGEMM's design.
Two consumers also take the K blocks in pairs, promoting one product while the next runs, and take
turns issuing them (``_mma_k_steps``): 7-10% faster on mid-M grids. Three consumers read 17% fewer
operand bytes from L2 per product and hide one more promotion: 4-10% faster per product on an H100
at M >= 4096 than two consumers were before they paired their K blocks (bit-identical;
benchmarks/results/ws-tiles-h100-2026-11-26-s9.log); about even with them since (``gemm._wide_plan``).

On Triton >= 3.9 (``MULTICAST``) the 192-row tiles run on 2-CTA clusters (``CLUSTER = 2``,
launched with ``num_ctas=2``): the pair computes a 192 x 256 tile, 128 columns per CTA, and the
lead CTA's producer multicasts the three A boxes of each K step into both CTAs' rings, so each A
box crosses L2 once for two CTAs (what cuBLAS's blockwise kernel does; session 14's ncu found ours
bound by L2 throughput). The lead refills a stage only when both CTAs' consumers have released it
(``empty_pair``, a barrier in the lead CTA that all six consumers arrive on). Same products in the
same order, so the same bits as one CTA. H100: 8192^3 1052 -> 1001 us (e5m2), 1073 -> 1030
(e4m3; cuBLAS 999); K = 28672: 9-10% faster, ahead of cuBLAS (benchmarks/NOTES.md, twenty-eighth
session). Triton 3.6's TMA load has no multicast (its Gluon has ``num_ctas`` and CGA layouts,
untried here): there the kernel is the one-CTA one, compiled from the same source (the layouts
come from ``cluster_layouts``).

Where the plan says so (``scales_tma``) and the activation scales are M-major with a column
stride TMA accepts, the producer also loads each K block's 128 scales of the tile rows into the
stage, and the consumers read them from shared memory (``_staged_scale``) instead of global
memory (``_block_scale``); see ``scales_ride_the_ring`` and ``gemm.CARD_PLANS``.

Where the grid ends in a partial wave, its tiles can be split over K (``TAIL_SPLIT``): both roles
walk the whole tiles, then the tail's (tile, split) units, and each consumer finishes its own 64
rows of a tail tile through float32 partials and an arrival counter (see ``_consumer``).

What ptxas accepts decides whether this pays: when it cannot prove a wgmma's accumulator
registers safe it serialises every wgmma (info C7511/C7514; 16 waits instead of 2 in the SASS),
which made two earlier versions slower than ``tma``: one kept a wgmma in flight across the loop's
back edge, one issued the next K step's wgmma before promoting this one. Here every wgmma issued
in an iteration of the K loop is waited for in it, and ``setmaxnreg`` (``warp_specialize``'s register list)
gives each consumer 232 registers and the producer 40 (the 12 warps would otherwise cap all at 168);
with three consumers 160 and 24.

The Triton interpreter cannot run Gluon, so this path is covered by the GPU test run only.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import triton

from .launch import launch, prefer_l1
from .quant import pdl_launch_options

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    AVAILABLE = True
except ImportError:  # pragma: no cover - Triton without Gluon
    AVAILABLE = False

# 2-CTA clusters sharing the A tile through multicast TMA (``CLUSTER = 2``): Gluon's multi-CTA
# layouts and ``async_load(..., multicast=True)``, in Triton >= 3.9 (3.6's TMA load has no multicast).
MULTICAST = AVAILABLE and hasattr(tma, "async_load") and "multicast" in inspect.signature(tma.async_load).parameters


if AVAILABLE:
    BLOCK = gl.constexpr(128)  # tile columns and K step (the scale block)
    ROWS = gl.constexpr(64)  # tile rows per consumer warpgroup (one wgmma's M)
else:
    BLOCK, ROWS = 128, 64


# Triton 3.6 names the TMA load async_copy_global_to_shared, later versions async_load (and make
# the old name raise). Triton hashes every attribute a kernel's source names, taken branch or not,
# so each version gets its own helper.
if AVAILABLE and hasattr(tma, "async_load"):

    @gluon.jit
    def _tma_load(desc, row, col, barrier, dest):
        tma.async_load(desc, [row, col], barrier, dest)

elif AVAILABLE:

    @gluon.jit
    def _tma_load(desc, row, col, barrier, dest):
        tma.async_copy_global_to_shared(desc, [row, col], barrier, dest)


# The lead CTA of a 2-CTA cluster loads the box into both CTAs' ``dest`` (whose layout broadcasts
# over the cluster). Only plans with ``CLUSTER = 2`` reach it, and ``gemm_ws`` refuses those where
# Triton lacks multicast; there the helper is a plain load that nothing calls.
if MULTICAST:

    @gluon.jit
    def _tma_load_multicast(desc, row, col, barrier, dest):
        tma.async_load(desc, [row, col], barrier, dest, multicast=True)

elif AVAILABLE:

    @gluon.jit
    def _tma_load_multicast(desc, row, col, barrier, dest):
        _tma_load(desc, row, col, barrier, dest)


# The barrier among the threads of one partition: gl.barrier in later Triton versions,
# gl.thread_barrier in 3.6 (same hashing reason as above).
if AVAILABLE and hasattr(gl, "barrier"):

    @gluon.jit
    def _partition_barrier():
        gl.barrier()

elif AVAILABLE:

    @gluon.jit
    def _partition_barrier():
        gl.thread_barrier()


if AVAILABLE:

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
        """Tile index -> (pid_m, pid_n), GROUP_M row-tiles walking the columns together (L2 reuse):
        the order of ``gemm._grouped_tile``, written again because Gluon kernels cannot call
        Triton functions."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows, (tile % per_group) // rows

    @gluon.jit
    def _cluster_rank(like):
        """This CTA's rank in its 2-CTA cluster, as an int32 tensor shaped like ``like``: the same in
        all its threads, different between the two CTAs. Gluon takes a tensor whose layout
        broadcasts over the cluster to be equal in both CTAs; this one is not, so it only feeds
        addresses each CTA uses for itself (its weight scales), never a store."""
        return gl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r,r", [gl.zeros_like(like)],
                                         dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _wait_for_previous_grid():
        """griddepcontrol.wait in each thread of the default partition: under PDL the grid before
        (the activation quantization) may still be running; this returns once it has finished
        and its writes are visible to this grid. The worker partitions start only when the
        default one reaches ``warp_specialize``, so nothing of the GEMM reads or writes global
        memory before it."""
        like = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
        gl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r,r", [gl.zeros_like(like)],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _tail_unit(u, tail_start, num_m, num_n, k_blocks, GROUP_M: gl.constexpr, TAIL_SPLIT: gl.constexpr):
        """Work unit u of the split tail -> (pid_m, pid_n, first K block, end K block): unit u is
        split u % TAIL_SPLIT of tile tail_start + u // TAIL_SPLIT."""
        kb_per = gl.cdiv(k_blocks, TAIL_SPLIT)
        kb_start = (u % TAIL_SPLIT) * kb_per
        pid_m, pid_n = _tile_coords(tail_start + u // TAIL_SPLIT, num_m, num_n, GROUP_M)
        return pid_m, pid_n, kb_start, gl.minimum(kb_start + kb_per, k_blocks)

    @gluon.jit
    def _load_k_steps(a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, off_m, off_n,
                      kb_start, kb_end, it, CONSUMERS: gl.constexpr, STAGES: gl.constexpr, SCALES_TMA: gl.constexpr,
                      CLUSTER: gl.constexpr):
        """TMA-loads K blocks [kb_start, kb_end) of one tile into the ring, from slot it % STAGES
        (with SCALES_TMA also the tile rows' activation scales of each block); returns the ring
        position after them. With CLUSTER = 2 the lead CTA multicasts the A box(es) into both
        CTAs' rings, once both CTAs' consumers have released the stage
        (``empty_pair``), and each CTA loads its own half of the 256-row W box."""
        for kb in range(kb_start, kb_end):
            s = it % STAGES
            # a fresh barrier counts as released in the phase before its first, so the first
            # lap over the ring does not wait
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            if CLUSTER == 2:
                # a barrier of the pair: only the lead CTA, which writes both rings, waits
                mbarrier.wait(empty_pair.index(s), ((it // STAGES) & 1) ^ 1)
            if CONSUMERS == 2:
                if SCALES_TMA:
                    mbarrier.expect(ready.index(s),
                                    a_desc.block_type.nbytes + w_desc.block_type.nbytes + s_desc.block_type.nbytes)
                    _tma_load(s_desc, kb, off_m, ready.index(s), s_bufs.index(s))
                else:
                    mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes // CLUSTER)
                if CLUSTER == 2:
                    _tma_load_multicast(a_desc, off_m, kb * BLOCK, ready.index(s), a_bufs.index(s))
                else:
                    _tma_load(a_desc, off_m, kb * BLOCK, ready.index(s), a_bufs.index(s))
            else:
                # bytes landing in this CTA: every A box (multicast or not), its share of the W box
                mbarrier.expect(ready.index(s), CONSUMERS * a_desc.block_type.nbytes + w_desc.block_type.nbytes // CLUSTER)
                for c in gl.static_range(CONSUMERS):
                    if CLUSTER == 2:
                        _tma_load_multicast(a_desc, off_m + c * ROWS, kb * BLOCK, ready.index(s),
                                            a_bufs.index(s * CONSUMERS + c))
                    else:
                        _tma_load(a_desc, off_m + c * ROWS, kb * BLOCK, ready.index(s), a_bufs.index(s * CONSUMERS + c))
            _tma_load(w_desc, off_n, kb * BLOCK, ready.index(s), w_bufs.index(s))
            it += 1
        return it

    @gluon.jit
    def _producer(a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, M, N, K, tail_start,
                  CONSUMERS: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGRAMS: gl.constexpr, STAGES: gl.constexpr,
                  TAIL_SPLIT: gl.constexpr, SCALES_TMA: gl.constexpr, CLUSTER: gl.constexpr):
        """Feeds the ring in the consumers' order: whole tiles, then the split tail's units. Three
        consumers get one 64-row A box each (shared memory shapes are powers of two, 192 is not);
        two share one 128-row box, as before the three-consumer variant existed (the same PTX as
        the GPU-tested two-consumer kernel)."""
        BLOCK_M: gl.constexpr = ROWS * CONSUMERS
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK * CLUSTER)
        k_blocks = gl.cdiv(K, BLOCK)
        it = 0
        for tile in range(gl.program_id(0), tail_start, NUM_PROGRAMS):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            it = _load_k_steps(a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, empty_pair,
                               pid_m * BLOCK_M, pid_n * (BLOCK * CLUSTER), 0, k_blocks, it, CONSUMERS, STAGES,
                               SCALES_TMA, CLUSTER)
        if TAIL_SPLIT > 1:
            for u in range(gl.program_id(0), (num_m * num_n - tail_start) * TAIL_SPLIT, NUM_PROGRAMS):
                pid_m, pid_n, kb_start, kb_end = _tail_unit(u, tail_start, num_m, num_n, k_blocks, GROUP_M, TAIL_SPLIT)
                it = _load_k_steps(a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, empty_pair,
                                   pid_m * BLOCK_M, pid_n * BLOCK, kb_start, kb_end, it, CONSUMERS, STAGES, SCALES_TMA,
                                   CLUSTER)

    @gluon.jit
    def _a_tile(a_bufs, s, CONSUMERS: gl.constexpr, PART: gl.constexpr):
        """This consumer's 64 rows of stage s's A box (one 128-row box with two consumers, one
        64-row box each with three)."""
        if CONSUMERS == 2:
            return a_bufs.index(s).slice(PART * ROWS, ROWS)
        else:
            return a_bufs.index(s * CONSUMERS + PART)

    @gluon.jit
    def _block_scale(a_s_ptrs, m_ok, w_s_ptr, stride_ask, stride_wsk, kb):
        """a_scale * w_scale of K block kb for this consumer's 64 rows, loaded from global memory
        (scales the ring does not carry). ptxas takes the product before the wgmma that follows
        these loads, so the wgmma waits for them: an L1 hit for row-major scales (a row's 32 K
        blocks share a line). Loading one step ahead, or after the wgmma issue, measured no faster
        (benchmarks/NOTES.md, fourteenth session)."""
        return gl.load(a_s_ptrs + kb * stride_ask, mask=m_ok, other=0.0) * gl.load(w_s_ptr + kb * stride_wsk)

    @gluon.jit
    def _staged_scale(s_bufs, s, w_scale, PART: gl.constexpr, STAGES: gl.constexpr, MMA: gl.constexpr):
        """a_scale * w_scale for this consumer's 64 rows, the activation scales read from ring
        stage s (landed with its A and W tiles). The caller must put a proxy fence
        (``fence_async_shared``) between these reads and the stage's release: they are generic
        shared-memory loads, and the producer's next TMA copy into the stage (the async proxy)
        is not ordered after them by the mbarrier alone. Without the fence the copy overtook
        the loads: wrong results on every one of 8 runs at M = 512-2048, N = K = 8192
        (H200, bf16 out; session 18), bit-exact with it."""
        rows = s_bufs.index(s).reshape([BLOCK]).slice(PART * ROWS, ROWS)
        return rows.load(gl.SliceLayout(1, MMA)) * w_scale

    @gluon.jit
    def _mma_k_steps(a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn, a_s_ptrs, m_ok, w_s_ptr, stride_ask,
                     stride_wsk, kb_start, kb_end, it, turns, CONSUMERS: gl.constexpr, STAGES: gl.constexpr,
                     PART: gl.constexpr, SCALES_TMA: gl.constexpr, CLUSTER: gl.constexpr, MMA: gl.constexpr):
        """This consumer's 64 rows of one tile over K blocks [kb_start, kb_end): each block's
        product waited for, its stage released, then promoted with both scales, in K order.
        Returns (float32 accumulator, ring position after, turns taken after).

        Two consumers (232 registers: acc + two products fit) take the K blocks in pairs: both
        wgmmas issued, the first waited for and promoted while the second runs, then the second.
        Nothing stays in flight across the loop's back edge, which is what made ptxas serialise
        every wgmma in session 4's attempt at this overlap. The two consumers also take turns
        issuing their pairs (``turn``: consumer p waits turn[p], hands turn[1 - p] over once its
        pair is issued), so one's promotions run under the other's products instead of both
        promoting at once. H100, e5m2: 7-10% faster than one block per step on mid-M grids
        (benchmarks/NOTES.md, sixteenth session). Three consumers (160 registers) keep one block
        per step, as does the odd last block of two.

        With SCALES_TMA the activation scales come from the ring (``_staged_scale``), read while
        the products run; otherwise from global memory before the wait (``_block_scale``).

        With CLUSTER = 2 the product is this CTA's 64 x 128 share of a 64 x 256
        one (MMA splits the columns over the pair), and each stage is also released to the pair's
        barrier, since the lead CTA refills both rings."""
        zero = gl.zeros([ROWS, BLOCK * CLUSTER], gl.float32, layout=MMA)
        acc = gl.zeros([ROWS, BLOCK * CLUSTER], gl.float32, layout=MMA)
        if CONSUMERS == 2:
            for kb in range(kb_start, kb_end - 1, 2):
                s0 = it % STAGES
                s1 = (it + 1) % STAGES
                if SCALES_TMA:
                    w_scale0 = gl.load(w_s_ptr + kb * stride_wsk)
                    w_scale1 = gl.load(w_s_ptr + (kb + 1) * stride_wsk)
                else:
                    scale0 = _block_scale(a_s_ptrs, m_ok, w_s_ptr, stride_ask, stride_wsk, kb)
                    scale1 = _block_scale(a_s_ptrs, m_ok, w_s_ptr, stride_ask, stride_wsk, kb + 1)
                mbarrier.wait(ready.index(s0), (it // STAGES) & 1)
                # a fresh barrier counts as completed in the phase before its first, so consumer
                # 0's first wait passes; every later one waits for the other's previous handover
                if PART == 0:
                    mbarrier.wait(turn.index(0), (turns & 1) ^ 1)
                else:
                    mbarrier.wait(turn.index(1), turns & 1)
                p0 = warpgroup_mma(_a_tile(a_bufs, s0, CONSUMERS, PART), w_bufs.index(s0).permute((1, 0)), zero,
                                   use_acc=False, is_async=True)
                mbarrier.wait(ready.index(s1), ((it + 1) // STAGES) & 1)
                p1 = warpgroup_mma(_a_tile(a_bufs, s1, CONSUMERS, PART), w_bufs.index(s1).permute((1, 0)), zero,
                                   use_acc=False, is_async=True)
                mbarrier.arrive(turn.index(1 - PART), count=1)
                if SCALES_TMA:
                    scale0 = _staged_scale(s_bufs, s0, w_scale0, PART, STAGES, MMA)
                    scale1 = _staged_scale(s_bufs, s1, w_scale1, PART, STAGES, MMA)
                    # before the stages are released: see _staged_scale
                    fence_async_shared()
                p0 = warpgroup_mma_wait(1, deps=(p0,))
                mbarrier.arrive(empty.index(s0), count=1)
                if CLUSTER == 2:
                    mbarrier.arrive(empty_pair.index(s0), count=1)
                acc += p0 * gl.expand_dims(scale0, 1)
                p1 = warpgroup_mma_wait(0, deps=(p1,))
                mbarrier.arrive(empty.index(s1), count=1)
                if CLUSTER == 2:
                    mbarrier.arrive(empty_pair.index(s1), count=1)
                acc += p1 * gl.expand_dims(scale1, 1)
                it += 2
                turns += 1
            kb_start = kb_end - (kb_end - kb_start) % 2
        for kb in range(kb_start, kb_end):
            s = it % STAGES
            if SCALES_TMA:
                w_scale = gl.load(w_s_ptr + kb * stride_wsk)
            else:
                scale = _block_scale(a_s_ptrs, m_ok, w_s_ptr, stride_ask, stride_wsk, kb)
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            part = warpgroup_mma(_a_tile(a_bufs, s, CONSUMERS, PART), w_bufs.index(s).permute((1, 0)), zero,
                                 use_acc=False, is_async=True)
            if SCALES_TMA:
                scale = _staged_scale(s_bufs, s, w_scale, PART, STAGES, MMA)
                fence_async_shared()
            part = warpgroup_mma_wait(0, deps=(part,))
            mbarrier.arrive(empty.index(s), count=1)
            if CLUSTER == 2:
                mbarrier.arrive(empty_pair.index(s), count=1)
            acc += part * gl.expand_dims(scale, 1)
            it += 1
        return acc, it, turns

    @gluon.jit
    def _store_rows(acc, rm, m_ok, rn, N, bias_ptr, out_ptr, stride_om, stride_on, HAS_BIAS: gl.constexpr):
        """Epilogue of 64 rows: bias, output cast, masked store."""
        n_ok = rn < N
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(gl.float32), 0)
        ptrs = out_ptr + gl.expand_dims(rm, 1) * stride_om + gl.expand_dims(rn, 0) * stride_on
        gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(m_ok, 1) & gl.expand_dims(n_ok, 0))

    @gluon.jit
    def _consumer(a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
                  partial_ptr, arrivals_ptr,
                  M, N, K, tail_start, stride_asm, stride_ask, stride_wsn, stride_wsk, stride_om, stride_on,
                  HAS_BIAS: gl.constexpr, CONSUMERS: gl.constexpr, GROUP_M: gl.constexpr,
                  NUM_PROGRAMS: gl.constexpr, STAGES: gl.constexpr, TAIL_SPLIT: gl.constexpr, SCALES_TMA: gl.constexpr,
                  CLUSTER: gl.constexpr, MMA: gl.constexpr, PART: gl.constexpr):
        """Rows [64 PART, 64 PART + 64) of each tile (with CLUSTER = 2, of this CTA's 128 columns
        of each 256-column tile of the pair)."""
        BLOCK_M: gl.constexpr = ROWS * CONSUMERS
        row_layout: gl.constexpr = gl.SliceLayout(1, MMA)
        col_layout: gl.constexpr = gl.SliceLayout(0, MMA)
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK * CLUSTER)
        k_blocks = gl.cdiv(K, BLOCK)
        rows = PART * ROWS + gl.arange(0, ROWS, layout=row_layout)
        cols = gl.arange(0, BLOCK * CLUSTER, layout=col_layout)
        if CLUSTER == 2:
            rank = _cluster_rank(rows)
        it = 0
        turns = 0
        for tile in range(gl.program_id(0), tail_start, NUM_PROGRAMS):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            rm = pid_m * BLOCK_M + rows
            m_ok = rm < M
            if CLUSTER == 2:
                # this CTA's column block; past the last one (an odd count) any row of scales
                # serves: those columns are all masked
                w_s_row = w_scale_ptr + gl.minimum(pid_n * CLUSTER + rank, gl.cdiv(N, BLOCK) - 1) * stride_wsn
            else:
                w_s_row = w_scale_ptr + pid_n * stride_wsn
            acc, it, turns = _mma_k_steps(a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn,
                                          a_scale_ptr + rm * stride_asm, m_ok, w_s_row, stride_ask, stride_wsk, 0,
                                          k_blocks, it, turns, CONSUMERS, STAGES, PART, SCALES_TMA, CLUSTER, MMA)
            _store_rows(acc, rm, m_ok, pid_n * (BLOCK * CLUSTER) + cols, N, bias_ptr, out_ptr, stride_om, stride_on,
                        HAS_BIAS)
        if TAIL_SPLIT > 1:
            # Split-K of the last, partial wave, finished without a second launch: each split
            # stores its float32 partial of these 64 rows (partials: (tail tiles, TAIL_SPLIT,
            # BLOCK_M, 128)) and arrives on the counter of (tile, PART); the last to arrive sums
            # the partials in split order (the result does not depend on who came last), runs
            # the epilogue and leaves the counter at zero for the next launch.
            # The last one reads the partials in a row-major layout, 16 contiguous bytes per
            # thread and 512 per warp: read in the wgmma layout (8 rows x 32 bytes per warp
            # access) the sum cost more than the split saved, H100, M = 1024, N = 1792, K = 8192,
            # 4 splits: 93.5 -> 58.9 us (results/tail-diag-h100-2026-11-27-s13.txt).
            fin: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
            for u in range(gl.program_id(0), (num_m * num_n - tail_start) * TAIL_SPLIT, NUM_PROGRAMS):
                pid_m, pid_n, kb_start, kb_end = _tail_unit(u, tail_start, num_m, num_n, k_blocks, GROUP_M, TAIL_SPLIT)
                rm = pid_m * BLOCK_M + rows
                m_ok = rm < M
                acc, it, turns = _mma_k_steps(a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn,
                                              a_scale_ptr + rm * stride_asm, m_ok, w_scale_ptr + pid_n * stride_wsn,
                                              stride_ask, stride_wsk, kb_start, kb_end, it, turns, CONSUMERS, STAGES,
                                              PART, SCALES_TMA, CLUSTER, MMA)
                tail = u // TAIL_SPLIT
                tile_base = partial_ptr + tail * (TAIL_SPLIT * BLOCK_M * BLOCK)
                # (offsets built here, after the K loop, so that they hold no registers through it)
                offs = gl.expand_dims(rows, 1) * BLOCK + gl.expand_dims(cols, 0)
                gl.store(tile_base + (u % TAIL_SPLIT) * (BLOCK_M * BLOCK) + offs, acc)
                # every thread's partial is stored before the (acq_rel, GPU-scope) arrival; the
                # last to arrive reads the others' partials past L1, which may hold none of them
                _partition_barrier()
                counter = arrivals_ptr + tail * CONSUMERS + PART
                if gl.atomic_add(counter, 1) == TAIL_SPLIT - 1:
                    fin_rows = PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, fin))
                    fin_cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, fin))
                    fin_ptrs = tile_base + gl.expand_dims(fin_rows, 1) * BLOCK + gl.expand_dims(fin_cols, 0)
                    total = gl.load(fin_ptrs, cache_modifier=".cg")
                    for k in gl.static_range(1, TAIL_SPLIT):
                        total += gl.load(fin_ptrs + k * (BLOCK_M * BLOCK), cache_modifier=".cg")
                    fin_rm = pid_m * BLOCK_M + fin_rows
                    _store_rows(total, fin_rm, fin_rm < M, pid_n * BLOCK + fin_cols, N, bias_ptr, out_ptr, stride_om,
                                stride_on, HAS_BIAS)
                    gl.atomic_xchg(counter, 0)

    @gluon.jit
    def gemm_ws_kernel(
        a_desc, w_desc, s_desc, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
        M, N, K, tail_start,
        stride_asm, stride_ask, stride_wsn, stride_wsk,
        stride_om, stride_on,
        HAS_BIAS: gl.constexpr, CONSUMERS: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
        STAGES: gl.constexpr, TAIL_SPLIT: gl.constexpr, SCALES_TMA: gl.constexpr, CONSUMER_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CLUSTER: gl.constexpr, MMA: gl.constexpr, BARRIERS: gl.constexpr,
        PAIR_BARRIERS: gl.constexpr, PDL: gl.constexpr,
    ):
        """Layouts as in ``kernels/gemm.py``; CONSUMERS 2 or 3; w_desc is a 128 x 128 fp8 TMA
        descriptor, a_desc 128 x 128 with two consumers, 64 x 128 with three. With SCALES_TMA
        (two consumers only) s_desc is a (1, 128) float32 descriptor over a_scale.T, (K blocks,
        M), and the ring carries the scales (``scales_ride_the_ring``); else s_desc is unused and
        the consumers load a_scale_ptr. Tiles [0, tail_start) are computed whole; with
        TAIL_SPLIT > 1 each later tile is split over K among TAIL_SPLIT programs (partial_ptr:
        (tiles - tail_start, TAIL_SPLIT, 64 CONSUMERS, 128) float32; arrivals_ptr: zeroed int32
        counters, CONSUMERS per tail tile).

        CLUSTER = 2 (no split tail, no staged scales; launched with num_ctas = 2): each pair of
        CTAs computes (64 CONSUMERS) x 256 tiles, 128 columns each, and the lead CTA multicasts the
        A boxes to both, so each A box crosses L2 once for two CTAs: a_desc's layout broadcasts over the pair,
        w_desc is a 256 x 128 box split between them, NUM_PROGRAMS counts pairs. MMA is the
        accumulators' layout, BARRIERS the per-CTA barriers' and PAIR_BARRIERS the pair's
        (``cluster_layouts``).

        PDL: launched programmatically (``launch_pdl``) behind the grid that wrote its operands;
        the shared memory and barriers are set up while that grid finishes, and every global
        access comes after ``_wait_for_previous_grid``."""
        if CONSUMERS == 2:
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, 2 * ROWS, BLOCK], a_desc.layout)
        else:
            a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * CONSUMERS, ROWS, BLOCK], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK * CLUSTER, BLOCK], w_desc.layout)
        if SCALES_TMA:
            s_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK], s_desc.layout)
        else:
            s_bufs = w_bufs  # (never read)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, CLUSTER], BARRIERS)
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, CLUSTER], BARRIERS)
        if CLUSTER == 2:
            empty_pair = gl.allocate_shared_memory(gl.int64, [STAGES, 1], PAIR_BARRIERS)
        else:
            empty_pair = empty  # (never used)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)  # one arrival per consumer warpgroup
            if CLUSTER == 2:
                mbarrier.init(empty_pair.index(i), count=CONSUMERS)  # of each CTA: Gluon counts the pair's
        # the two consumers' turns (three take none)
        turn = gl.allocate_shared_memory(gl.int64, [2, CLUSTER], BARRIERS)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        fence_async_shared()  # the initialised barriers must be visible to the TMA engine
        if PDL:
            _wait_for_previous_grid()
        # (warp_specialize takes its partitions as a literal list, hence the two spellings)
        if CONSUMERS == 2:
            gl.warp_specialize([
                (_consumer, (a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn, a_scale_ptr, w_scale_ptr, bias_ptr,
                             out_ptr, partial_ptr, arrivals_ptr, M, N, K, tail_start, stride_asm, stride_ask,
                             stride_wsn, stride_wsk, stride_om, stride_on, HAS_BIAS, CONSUMERS, GROUP_M,
                             NUM_PROGRAMS, STAGES, TAIL_SPLIT, SCALES_TMA, CLUSTER, MMA, 0)),
                (_consumer, (a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn, a_scale_ptr, w_scale_ptr, bias_ptr,
                             out_ptr, partial_ptr, arrivals_ptr, M, N, K, tail_start, stride_asm, stride_ask,
                             stride_wsn, stride_wsk, stride_om, stride_on, HAS_BIAS, CONSUMERS, GROUP_M,
                             NUM_PROGRAMS, STAGES, TAIL_SPLIT, SCALES_TMA, CLUSTER, MMA, 1)),
                (_producer, (a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, M, N, K,
                             tail_start, CONSUMERS, GROUP_M, NUM_PROGRAMS, STAGES, TAIL_SPLIT, SCALES_TMA, CLUSTER)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn, a_scale_ptr, w_scale_ptr, bias_ptr,
                             out_ptr, partial_ptr, arrivals_ptr, M, N, K, tail_start, stride_asm, stride_ask,
                             stride_wsn, stride_wsk, stride_om, stride_on, HAS_BIAS, CONSUMERS, GROUP_M,
                             NUM_PROGRAMS, STAGES, TAIL_SPLIT, SCALES_TMA, CLUSTER, MMA, 0)),
                (_consumer, (a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn, a_scale_ptr, w_scale_ptr, bias_ptr,
                             out_ptr, partial_ptr, arrivals_ptr, M, N, K, tail_start, stride_asm, stride_ask,
                             stride_wsn, stride_wsk, stride_om, stride_on, HAS_BIAS, CONSUMERS, GROUP_M,
                             NUM_PROGRAMS, STAGES, TAIL_SPLIT, SCALES_TMA, CLUSTER, MMA, 1)),
                (_consumer, (a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, turn, a_scale_ptr, w_scale_ptr, bias_ptr,
                             out_ptr, partial_ptr, arrivals_ptr, M, N, K, tail_start, stride_asm, stride_ask,
                             stride_wsn, stride_wsk, stride_om, stride_on, HAS_BIAS, CONSUMERS, GROUP_M,
                             NUM_PROGRAMS, STAGES, TAIL_SPLIT, SCALES_TMA, CLUSTER, MMA, 2)),
                (_producer, (a_desc, w_desc, s_desc, a_bufs, w_bufs, s_bufs, ready, empty, empty_pair, M, N, K,
                             tail_start, CONSUMERS, GROUP_M, NUM_PROGRAMS, STAGES, TAIL_SPLIT, SCALES_TMA, CLUSTER)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])

if AVAILABLE:
    # 164 KB of shared memory at 4 stages: the largest L1 left over holds the rows of activation
    # scales the consumers read where the ring does not carry them (launch.prefer_l1 says why and
    # what it measured)
    prefer_l1(gemm_ws_kernel)

# setmaxnreg per thread, by consumer count: a consumer holds acc + one product (64 each) + addresses;
# three consumers and the producer's warpgroup must share the 64K registers (3 x 128 x 160 + 128 x 24).
# At 160 neither Triton 3.6's ptxas nor 3.9's spills (sm_90 SASS, aligned pointers or not; session 9's
# kernel spilled 10 local loads/stores under 3.6). The producer only issues TMA copies.
CONSUMER_REGS = {2: 232, 3: 160}
PRODUCER_REGS = {2: 40, 3: 24}
TILES = ((128, 128), (192, 128))  # (rows, columns): 64 rows per consumer

_GL_FP8 = {}
if AVAILABLE:
    _GL_FP8 = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5}
    # The (1, 128) float32 boxes of activation scales: unswizzled, so a stage's 128 scales lie in
    # row order and the consumers read them as a plain row (``_staged_scale``).
    SCALE_SMEM = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def scales_ride_the_ring(a_scale: torch.Tensor, consumers: int) -> bool:
    """Whether the producer can TMA-load the activation scales with each ring stage: two consumers
    (a 128-row box; 192 is no power of two) and M-major scales whose column stride TMA accepts
    (a multiple of 16 bytes, so every box starts on 16 bytes: ``quant.quantize`` with
    ``rows_multiple_of=4`` writes such scales for any M), on a 16-byte aligned base.

    Why: loaded from global memory, each K block's scales are an L1 hit the wgmma waits for
    (``_block_scale``), and they need the L1 that more ring stages would take. From the ring they
    cost the consumers one shared-memory read under the running products. H100, same run, bit-
    identical: 0-4% faster at the same stages, 1-7% with 6 stages on grids of up to 5 waves
    (M = 1024, N = K = 8192, e5m2: 134.1 -> 126.6 us; results/ws-scales-ring-h100-2026-11-27-s17.txt)."""
    return (consumers == 2 and a_scale.stride(0) == 1 and a_scale.stride(1) % 4 == 0
            and a_scale.data_ptr() % 16 == 0)


@functools.lru_cache(maxsize=None)
def smem_layout(rows: int, cols: int, dtype: torch.dtype, cga: tuple = ()):
    """The shared-memory layout of a (rows, cols) TMA box of FP8 ``dtype``. Built once per shape:
    ``get_default_for`` costs ~8 us of Python and a launch needs two (the layouts are frozen
    values, so one object serves every call). ``cga``: how a 2-CTA cluster holds the box
    (``cluster_layouts``); empty for one CTA."""
    if not cga:
        return gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_FP8[dtype])
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_FP8[dtype], cga_layout=[list(b) for b in cga])


# Gluon's multi-CTA layouts (``cga_layout``: how the CTAs of the cluster split each dimension, one
# basis per CTA-id bit; a zero basis broadcasts): a 2-CTA pair computes a 256-column tile, each CTA
# 128 columns of it.
A_BOX_CGA = {1: (), 2: ((0, 0),)}  # the A boxes: the same in both CTAs (multicast)
W_BOX_CGA = {1: (), 2: ((1, 0),)}  # the 256 x 128 W box: rows split between them


@functools.lru_cache(maxsize=None)
def cluster_layouts(cluster: int) -> tuple:
    """(MMA, BARRIERS, PAIR_BARRIERS) of ``gemm_ws_kernel`` for clusters of ``cluster`` CTAs: the
    accumulators' wgmma layout (columns split over the pair), the per-CTA barriers', and the
    pair's barriers' (one barrier in the lead CTA that both CTAs arrive on)."""
    if cluster == 1:
        bar = mbarrier.MBarrierLayout()
        return (gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32]), bar, bar)
    return (gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32],
                                      cga_layout=[[0, 1]]),
            mbarrier.MBarrierLayout(cga_layout=[[1]]), mbarrier.MBarrierLayout(cga_layout=[[0]]))


# How many 2-CTA clusters of the ws kernel the card runs at once, by (device, consumers, stages),
# as the driver reports for the compiled kernel (cuOccupancyMaxActiveClusters): a persistent grid
# of more pairs than fit would leave the last ones waiting for a second wave, up to twice the time.
# An H100 or H200 fits 66 (= SMs / 2); a card whose GPCs hold odd SM counts fits fewer. Unknown
# until the first launch of a configuration has asked, after which ``gemm._cluster_plan`` trims the
# grid (that first launch, if oversubscribed, is slow but correct).
_PAIRS_FIT: dict = {}


def pairs_fit(device_index: int, consumers: int, stages: int, default: int) -> int:
    """The clusters of ``gemm_ws_kernel`` that fit at once, as recorded (``default`` if not yet,
    or if the driver could not say)."""
    fit = _PAIRS_FIT.get((device_index, consumers, stages))
    return default if fit is None else fit


def _max_active_clusters(compiled, cluster: int) -> int:
    return triton.runtime.driver.active.utils.cuOccupancyMaxActiveClusters(
        compiled.function, compiled.metadata.shared, cluster)


def _record_pairs_fit(compiled, key: tuple, cluster: int) -> None:
    """Ask once per configuration; where the driver cannot say, keep the grid as planned (warned)."""
    try:
        fit = int(_max_active_clusters(compiled, cluster))
    except Exception as e:  # noqa: BLE001 - an occupancy query must never fail a GEMM
        warnings.warn(f"blockwise_fp8: could not ask the driver how many {cluster}-CTA clusters of the ws GEMM "
                      f"fit at once ({type(e).__name__}: {e}); its grid keeps one pair per two SMs",
                      RuntimeWarning, stacklevel=3)
        fit = 0
    _PAIRS_FIT[key] = fit if fit > 0 else None


def rows_view(t: torch.Tensor, rows: int) -> torch.Tensor:
    """The 2-D ``t`` with up to ``rows`` rows, as many as its storage holds past its own without
    reaching into its next column (an M-major tensor's); ``t`` itself where it holds none.

    Why: a TMA box that reaches past the last row of its tensor is slow. H100, Triton 3.9, e4m3,
    the ws kernel's 128-row tiles, one process (session 33, benchmarks/NOTES.md): M = 257, N = K =
    8192, 69.5 us on the 257 rows against 52.6 on the same rows zero-padded to 384 (cuBLAS 59.4);
    M = 257, K = 28672, 228.2 against 163.1; M = 513, 110.1 against 82.4; bit-identical outputs.
    The rows past M are read and multiplied but never stored: a row of the product depends only on
    its own row of A (and its scale), and the epilogue masks rows >= M. ``ops`` quantizes the
    activation into zero rows up to a multiple of ``gemm.ACTIVATION_ROWS`` for that; a tensor
    without them (a user's own) is copied into such storage where that pays (``_rows_for_boxes``)."""
    if rows <= t.shape[0]:
        return t
    s0, s1 = t.stride()
    last_col = (t.shape[1] - 1) * s1
    held = (t.untyped_storage().nbytes() // t.element_size() - t.storage_offset() - last_col - 1) // s0 + 1
    if s0 < s1:
        held = min(held, s1 // s0)
    rows = min(rows, held)
    return t if rows <= t.shape[0] else t.as_strided((rows, t.shape[1]), (s0, s1))


# Where ``gemm_ws`` copies an activation whose storage ends inside its last 128-row tile into storage
# that holds the tile (``_rows_for_boxes``): at most PAD_COPY_MAX_M rows (0: never, for A/B runs),
# at least PAD_COPY_MIN_ROWS_PAST of the tile's rows past the storage, and a weight of at least
# PAD_COPY_MIN_WEIGHT elements. The boxes past the storage cost about in proportion to the weight
# (the last row of tiles spans N and K), the copy in proportion to M x K. H200, Triton 3.9, e5m2
# unless named, us, tight storage / copied in the call / already padded, bit-identical (session 35,
# benchmarks/results/mid-m-tight-rows-h200-2026-11-28-s35/pad-copy*.txt):
# - gained: M = 130, 10240 x 8192 62.9 / 46.4 / 44.2; M = 257, 8192 x 8192 63.3 / 52.6 / 49.7;
#   M = 513 91.9 / 86.0 / 82.1; e4m3 M = 257, 8192 x 28672 210.4 / 182.0 / 176.2; e4m3 M = 130,
#   4096 x 14336 43.6 / 38.1 / 34.6 (all 127 rows past);
# - lost: 64 or fewer rows past (M = 320, 8192 x 8192 53.2 / 54.5 / 48.1; M = 200, 56 past, 47.7 /
#   49.4 / 46.5); M = 897 (127 past) 133.5 / 135.3 / 130.4, M = 4097 542.9 / 559.7 / 537.4; a small
#   weight (M = 257, 2048 x 2048 10.6 / 12.6 / 10.2).
# H100 (session 33, results/ragged-m-h100-2026-11-28-s33/padded-rows-probe.txt): 96 rows past cost
# 1.25x (M = 288, 8192 x 8192: 66.4 against 53.3 padded), 64 past 1.08-1.14x. 65-95 not measured.
PAD_COPY_MAX_M = 640
PAD_COPY_MIN_ROWS_PAST = 96
PAD_COPY_MIN_WEIGHT = 1 << 25  # elements: 4096 x 8192


def _rows_for_boxes(a: torch.Tensor, rows: int, block_m: int, n: int) -> torch.Tensor:
    """``a`` (M rows) as the A descriptor's tensor for tiles of ``block_m`` rows up to ``rows``, of
    a GEMM against an (``n``, K) weight: its ``rows_view``, or (where PAD_COPY_MAX_M and the
    constants beside it say so) a copy with zero rows up to ``rows``. ``ops`` quantizes into padded
    storage; this is for a user's own tight activation."""
    view = rows_view(a, rows)
    M, K = a.shape
    if (block_m != 128 or M > PAD_COPY_MAX_M or rows - view.shape[0] < PAD_COPY_MIN_ROWS_PAST
            or n * K < PAD_COPY_MIN_WEIGHT):
        return view
    padded = a.new_empty((rows, K))
    padded[:M].copy_(a)
    padded[M:].zero_()
    return padded


def gemm_ws(a, a_scale, w, w_scale, bias, out, *, programs: int, block_m: int = 128, stages: int = 4,
            group_m: int = 8, tail_start: int | None = None, tail_split: int = 1, partial=None, arrivals=None,
            scales_tma: bool = False, cluster: int = 1, pdl: bool = False) -> torch.Tensor:
    """Launch ``programs`` persistent programs on operands that ``kernels.gemm._run`` has checked,
    into its ``out``; the split tail's buffers come from there too (``tail_start`` None: no tail).
    Tiles: 128 x 128 or 192 x 128 (``TILES``). With ``scales_tma`` (the plan's choice) the ring
    carries the activation scales where their layout lets it (``scales_ride_the_ring``); else
    the consumers read them from memory. ``cluster = 2``: 2-CTA clusters that share the A boxes
    (Triton >= 3.9, no split tail, scales from memory); ``programs`` then counts clusters. The
    plans take them for 192-row tiles only; 128-row tiles on pairs (K blocks in pairs, as on one
    CTA) pass the GPU tests but were 3-6% slower than on one CTA at M = 1024-4096 (session 29).
    ``pdl`` (one CTA only): launched behind the grid before under programmatic dependent launch
    (``quant.programmatic_launch``); the kernel waits for that grid before any global access."""
    M, K = a.shape
    N = w.shape[0]
    block = int(BLOCK)
    consumers = block_m // int(ROWS)
    if cluster not in (1, 2):
        raise ValueError(f"cluster must be 1 or 2 CTAs, got {cluster}")
    if cluster == 2 and not (MULTICAST and tail_split == 1 and not scales_tma):
        raise ValueError(
            "2-CTA clusters need Triton >= 3.9 (multicast TMA) and run without a split tail or staged scales; "
            f"got Triton multicast={MULTICAST}, tail_split={tail_split}, scales_tma={scales_tma}"
        )
    if pdl and cluster > 1:
        raise ValueError("the ws kernel waits for the grid before (pdl) on one CTA only, not on clusters")
    box = block_m if consumers == 2 else int(ROWS)  # A rows per TMA copy (see _producer)
    # The descriptors span the rows of the last tile where the storage holds them (see rows_view);
    # M stays the true row count, which masks the output
    tile_rows = -(-M // block_m) * block_m
    a_desc = GluonDescriptor.from_tensor(_rows_for_boxes(a, tile_rows, block_m, N), [box, block],
                                         smem_layout(box, block, a.dtype, A_BOX_CGA[cluster]))
    w_desc = GluonDescriptor.from_tensor(w, [block * cluster, block],
                                         smem_layout(block * cluster, block, w.dtype, W_BOX_CGA[cluster]))
    scales_tma = scales_tma and scales_ride_the_ring(a_scale, consumers)
    if scales_tma:
        # (K blocks, rows of the last tile where held), rows >= M zero
        s_desc = GluonDescriptor.from_tensor(rows_view(a_scale, tile_rows).t(), [1, block], SCALE_SMEM)
    else:
        s_desc = w_scale  # (unused)
    if tail_start is None:
        tail_start = -(-M // block_m) * -(-N // (block * cluster))
    compiled = launch(gemm_ws_kernel, (programs,), (
        a_desc, w_desc, s_desc, a_scale, w_scale, bias if bias is not None else w_scale, out,
        partial if partial is not None else w_scale, arrivals if arrivals is not None else w_scale,
        M, N, K, tail_start,
        a_scale.stride(0), a_scale.stride(1), w_scale.stride(0), w_scale.stride(1),
        out.stride(0), out.stride(1),
    ), _ws_meta(bias is not None, consumers, group_m, programs, stages, tail_split, scales_tma, cluster,
                pdl))
    if cluster > 1 and compiled is not None:
        key = (a.device.index or 0, consumers, stages)
        if key not in _PAIRS_FIT:
            _record_pairs_fit(compiled, key, cluster)
    return out


@functools.lru_cache(maxsize=1024)
def _ws_meta(has_bias: bool, consumers: int, group_m: int, programs: int, stages: int, tail_split: int,
             scales_tma: bool, cluster: int = 1, pdl: bool = False) -> tuple:
    mma, barriers, pair_barriers = cluster_layouts(cluster)
    meta = dict(
        HAS_BIAS=has_bias, CONSUMERS=consumers, GROUP_M=group_m, NUM_PROGRAMS=programs, STAGES=stages,
        TAIL_SPLIT=tail_split, SCALES_TMA=scales_tma, CONSUMER_REGS=CONSUMER_REGS[consumers],
        PRODUCER_REGS=PRODUCER_REGS[consumers], CLUSTER=cluster, MMA=mma, BARRIERS=barriers,
        PAIR_BARRIERS=pair_barriers, PDL=pdl, num_warps=4, **pdl_launch_options(pdl),
    )
    if cluster > 1:
        meta["num_ctas"] = cluster
    return tuple(meta.items())
