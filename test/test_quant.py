"""Blockwise quantization and dequantization: properties of every backend, and the Triton kernels
(kernels/quant.py) against the reference bit for bit.

Without a GPU the Triton kernels run through the interpreter on CPU (see conftest.py), so the
shapes here stay small; with a GPU the same tests run them on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

import blockwise_fp8 as bf
from blockwise_fp8.kernels.quant import divide_by_block_scale
from blockwise_fp8.ops import SUPPORTED_BLOCK_SIZES

from .conftest import KERNEL_DEVICE
from .helpers import expand_blocks, fp8_spacing, same_bits, same_bits_mask

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
HP = [torch.bfloat16, torch.float16, torch.float32]
BACKENDS = ["reference", "triton"]


def _device(backend: str) -> str:
    return KERNEL_DEVICE if backend == "triton" else "cpu"


# Largest power-of-two exponent a block may be scaled by in each input dtype, leaving headroom
# so that randn * 2**e stays finite.
MAX_EXP = {torch.bfloat16: 120, torch.float16: 12, torch.float32: 120}


@st.composite
def blocky_tensors(draw, max_lead_dims=3, max_rows=24, max_k=300, block=128, rows_per_block=1):
    """A tensor whose blocks differ wildly in magnitude (tiny, huge, zero), of a drawn shape."""
    dtype = draw(st.sampled_from(HP))
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=max_lead_dims))
    if rows_per_block > 1:
        lead = [draw(st.integers(0, max_rows))]
    K = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "mixed", "tiny", "huge", "zeros"]))
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, K)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    rows = math.prod(lead) if lead else 1
    kb = -(-K // block)
    rb = -(-rows // rows_per_block) if rows else 0
    emax = MAX_EXP[dtype]
    if kind == "mixed":
        exps = torch.randint(-emax, emax + 1, (max(rb, 1), kb), generator=gen)
    elif kind == "tiny":
        exps = torch.full((max(rb, 1), kb), -emax)
    elif kind == "huge":
        exps = torch.full((max(rb, 1), kb), emax)
    else:
        exps = torch.zeros((max(rb, 1), kb), dtype=torch.int64)
    factor = expand_blocks(torch.exp2(exps.double()), rows_per_block, block, (max(rows, 1), K))
    x2 = x.reshape(rows, K).double() * factor[:rows]
    if kind in ("mixed", "zeros") and rows:
        # Zero out some whole blocks: they must come back as exact zeros with a finite scale.
        zero = torch.rand((max(rb, 1), kb), generator=gen) < (0.3 if kind == "mixed" else 1.0)
        x2 = x2 * ~expand_blocks(zero, rows_per_block, block, (rows, K))[:rows]
    return x2.reshape(shape).to(dtype)


def check_roundtrip(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, dtype) -> None:
    """The contract of a blockwise quantization of finite ``x``, checked with float64 math only."""
    fmax = torch.finfo(dtype).max
    assert q.dtype == dtype and q.shape == x.shape
    x2 = x.reshape(-1, x.shape[-1]) if rows == 1 else x
    q2 = q.reshape(x2.shape).double()
    s2 = scale.reshape(-1, scale.shape[-1]) if rows == 1 else scale
    assert s2.dtype == torch.float32
    assert s2.shape == (-(-x2.shape[0] // rows), -(-x2.shape[1] // cols))
    assert torch.isfinite(s2).all() and (s2 > 0).all()
    assert torch.isfinite(q2).all() and (q2.abs() <= fmax).all()
    s = expand_blocks(s2.double(), rows, cols, x2.shape)
    xd = x2.double()
    err = (q2 * s - xd).abs()
    # Half a spacing at |x|/s, plus the one float32 rounding of x/s before the FP8 rounding
    # (which can tip a value just past a midpoint).
    bound = s * fp8_spacing(xd / s, dtype) / 2 + xd.abs() * 2.0**-24
    assert (err <= bound).all(), f"max error excess {(err - bound).max().item()}"
    # The scale is amax/max: a block whose amax is in range reaches exactly +-max.
    blocks_q = torch.zeros_like(s2, dtype=torch.float64)
    blocks_x = torch.zeros_like(s2, dtype=torch.float64)
    bi = (torch.arange(x2.shape[0])[:, None] // rows).expand(x2.shape)
    bj = (torch.arange(x2.shape[1])[None, :] // cols).expand(x2.shape)
    idx = (bi * s2.shape[1] + bj).reshape(-1)
    blocks_q.view(-1).scatter_reduce_(0, idx, q2.abs().reshape(-1), "amax")
    blocks_x.view(-1).scatter_reduce_(0, idx, xd.abs().reshape(-1), "amax")
    in_range = blocks_x / fmax >= torch.finfo(torch.float32).tiny
    assert (blocks_q[in_range] == fmax).all()
    zero_blocks = blocks_x == 0
    assert (blocks_q[zero_blocks] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@given(x=blocky_tensors(), dtype=st.sampled_from(FP8))
def test_activation_roundtrip(backend, x, dtype):
    dev = _device(backend)
    q, scale = bf.quantize_activation(x.to(dev), dtype, backend=backend)
    assert scale.shape == (*x.shape[:-1], -(-x.shape[-1] // 128))
    check_roundtrip(x, q.cpu(), scale.cpu(), 1, 128, dtype)
    # Dequantizing an all-zero block gives exact zeros; everything else is the float64 product
    # rounded once to the output dtype.
    deq = bf.dequantize(q, scale, (1, 128), torch.float32, backend=backend).cpu()
    q2, s2 = q.cpu().reshape(-1, x.shape[-1]), scale.cpu().reshape(-1, scale.shape[-1])
    exact = q2.double() * expand_blocks(s2.double(), 1, 128, q2.shape)
    assert torch.equal(deq.reshape(exact.shape), exact.float())


@pytest.mark.parametrize("backend", BACKENDS)
@given(w=blocky_tensors(max_rows=260, max_k=260, rows_per_block=128), dtype=st.sampled_from(FP8))
def test_weight_roundtrip(backend, w, dtype):
    dev = _device(backend)
    q, scale = bf.quantize_weight(w.to(dev), dtype, backend=backend)
    check_roundtrip(w, q.cpu(), scale.cpu(), 128, 128, dtype)


def _with_specials(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Sprinkle NaN, +-Inf, -0.0 and values at the FP8 extremes into a few elements."""
    if x.numel() == 0:
        return x
    gen = torch.Generator().manual_seed(seed)
    flat = x.clone().reshape(-1)
    picks = torch.randint(0, flat.numel(), (4,), generator=gen)
    flat[picks[0]] = float("nan")
    flat[picks[1]] = float("inf")
    flat[picks[2]] = -float("inf")
    flat[picks[3]] = -0.0
    return flat.reshape(x.shape)


@pytest.mark.parametrize("fp8", FP8)
@given(x=blocky_tensors(max_lead_dims=2), specials=st.booleans(), seed=st.integers(0, 1000))
def test_triton_activation_quant_bitwise(fp8, x, specials, seed):
    if specials:
        x = _with_specials(x, seed)
    q_t, s_t = bf.quantize_activation(x.to(KERNEL_DEVICE), fp8, backend="triton")
    q_r, s_r = bf.quantize_activation(x, fp8, backend="reference")
    assert same_bits(q_t.cpu(), q_r) and same_bits(s_t.cpu(), s_r)


@pytest.mark.parametrize("fp8", FP8)
@given(w=blocky_tensors(max_rows=260, max_k=260, rows_per_block=128))
def test_triton_weight_quant_bitwise(fp8, w):
    q_t, s_t = bf.quantize_weight(w.to(KERNEL_DEVICE), fp8, backend="triton")
    q_r, s_r = bf.quantize_weight(w, fp8, backend="reference")
    assert same_bits(q_t.cpu(), q_r) and same_bits(s_t.cpu(), s_r)


@pytest.mark.parametrize("out_dtype", HP)
@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@given(x=blocky_tensors(max_lead_dims=1, max_rows=200, max_k=260), fp8=st.sampled_from(FP8), seed=st.integers(0, 99))
def test_triton_dequantize_bitwise(out_dtype, block, x, fp8, seed):
    x = _with_specials(x, seed) if block == (1, 128) else x
    if block == (1, 128):
        q, s = bf.quantize_activation(x, fp8, backend="reference")
    else:
        x2 = x.reshape(-1, x.shape[-1])
        q, s = bf.quantize_weight(x2, fp8, backend="reference")
    d_t = bf.dequantize(q.to(KERNEL_DEVICE), s.to(KERNEL_DEVICE), block, out_dtype, backend="triton")
    d_r = bf.dequantize(q, s, block, out_dtype, backend="reference")
    assert same_bits(d_t.cpu(), d_r)
    # The reference itself: the float32 product q * scale (the float64 product, which is exact,
    # rounded to float32), then rounded to the output dtype.
    rows, cols = block
    q2, s2 = (q.reshape(-1, q.shape[-1]), s.reshape(-1, s.shape[-1])) if rows == 1 else (q, s)
    exact = (q2.double() * expand_blocks(s2.double(), rows, cols, q2.shape)).float().to(out_dtype)
    assert same_bits(d_r.reshape(exact.shape), exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_activation_poisons_only_its_block(backend, fp8, value):
    dev = _device(backend)
    x = torch.randn(3, 300, dtype=torch.bfloat16)
    clean_q, clean_s = bf.quantize_activation(x.to(dev), fp8, backend=backend)
    x[1, 140] = value
    q, s = bf.quantize_activation(x.to(dev), fp8, backend=backend)
    q, s, clean_q, clean_s = q.cpu(), s.cpu(), clean_q.cpu(), clean_s.cpu()
    assert not torch.isfinite(s[1, 1])
    untouched = torch.ones(3, 300, dtype=torch.bool)
    untouched[1, 128:256] = False
    assert same_bits(q[untouched], clean_q[untouched])
    mask_s = torch.ones(3, 3, dtype=torch.bool)
    mask_s[1, 1] = False
    assert same_bits(s[mask_s], clean_s[mask_s])
    # Dequantized, the poisoned block is non-finite where the input was and never a finite lie.
    deq = bf.dequantize(q, s, (1, 128), torch.float32, backend="reference")
    assert not torch.isfinite(deq[1, 140])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_is_refused(backend, value):
    w = torch.randn(200, 300)
    w[150, 7] = value
    with pytest.raises(ValueError, match=r"NaN or Inf.*rows 128.*columns 0"):
        bf.quantize_weight(w.to(_device(backend)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    dev = _device(backend)
    w = torch.randn(300, 200, dtype=torch.bfloat16, device=dev).t()  # (200, 300), column-major
    assert not w.is_contiguous()
    assert all(same_bits(a.cpu(), b.cpu()) for a, b in zip(
        bf.quantize_weight(w, backend=backend), bf.quantize_weight(w.contiguous(), backend=backend)))
    x = torch.randn(2, 5, 600, device=dev)[:, ::2, ::2]  # strided in every dim, K = 300
    assert not x.is_contiguous()
    assert all(same_bits(a.cpu(), b.cpu()) for a, b in zip(
        bf.quantize_activation(x, backend=backend), bf.quantize_activation(x.contiguous(), backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors(backend):
    dev = _device(backend)
    q, s = bf.quantize_activation(torch.randn(0, 300, device=dev), backend=backend)
    assert q.shape == (0, 300) and s.shape == (0, 3)
    q, s = bf.quantize_activation(torch.randn(2, 0, 300, device=dev), backend=backend)
    assert q.shape == (2, 0, 300) and s.shape == (2, 0, 3)
    assert bf.dequantize(q, s, (1, 128), backend=backend).shape == (2, 0, 300)
    q, s = bf.quantize_weight(torch.randn(0, 300, device=dev), backend=backend)
    assert q.shape == (0, 300) and s.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [b for b in SUPPORTED_BLOCK_SIZES if b != 128])
def test_other_block_sizes(backend, block):
    dev = _device(backend)
    gen = torch.Generator().manual_seed(block)
    x = torch.randn(5, 100, generator=gen) * torch.logspace(-5, 5, 100)
    q, s = bf.quantize_activation(x.to(dev), block_size=block, backend=backend)
    check_roundtrip(x, q.cpu(), s.cpu(), 1, block, torch.float8_e4m3fn)
    w = torch.randn(70, 100, generator=gen)
    q, s = bf.quantize_weight(w.to(dev), block_size=block, backend=backend)
    check_roundtrip(w, q.cpu(), s.cpu(), block, block, torch.float8_e4m3fn)
    assert torch.equal(
        bf.dequantize(q, s, (block, block), torch.float32, backend=backend).cpu(),
        (q.cpu().double() * expand_blocks(s.cpu().double(), block, block, q.shape)).float(),
    )


def _division_cases(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, scale) pairs as quantization meets them, |x| <= ~448 * scale, and the edges of that:
    scales of every exponent from float32's smallest normal up (the tiny ones are where a
    residual could underflow), random and all-ones mantissas, x of random bits (subnormals
    included), +-0, and NaN scales (a block holding NaN/Inf)."""
    g = torch.Generator().manual_seed(seed)
    exp = torch.randint(-126, 100, (n,), generator=g)
    mant = torch.rand(n, generator=g, dtype=torch.float64) + 1
    mant[::7] = 2 - 2.0**-23  # all-ones mantissa: the hardest reciprocals
    scale = (mant * torch.pow(2.0, exp.double())).float()
    ratio = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 449
    ratio[::5] *= torch.pow(2.0, -torch.randint(0, 160, (n // 5 + 1,), generator=g).double())[: ratio[::5].numel()]
    x = (ratio * scale.double()).float()
    x[::11] = 0.0
    x[1::11] = -0.0
    scale[::13] = float("nan")
    return x, scale


@triton.jit
def _divide_both_ways_kernel(x_ptr, s_ptr, fast_ptr, ieee_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=1.0)
    s = tl.load(s_ptr + offs, mask=ok, other=1.0)
    tl.store(fast_ptr + offs, divide_by_block_scale(x, s), mask=ok)
    tl.store(ieee_ptr + offs, tl.math.div_rn(x, s), mask=ok)


@pytest.mark.parametrize("seed", [0, 1])
def test_block_scale_division_is_ieee_division(seed):
    """The kernels' reciprocal-and-fma division gives div_rn's bits wherever |quotient| >= 2**-40,
    and below that quotients that quantize to the same signed zero (NaN: any NaN)."""
    n = 1 << (20 if KERNEL_DEVICE == "cuda" else 14)
    x, s = (t.to(KERNEL_DEVICE) for t in _division_cases(n, seed))
    fast, ieee = torch.empty_like(x), torch.empty_like(x)
    _divide_both_ways_kernel[(triton.cdiv(n, 1024),)](x, s, fast, ieee, n, BLOCK=1024)
    expect = (x.double() / s.double()).float()  # float64 then float32: one rounding (53 >= 2*24+2)
    assert same_bits(ieee, expect), "div_rn itself is not IEEE division here"
    big = ~(ieee.abs() < 2.0**-40)  # NaN counts as big
    bad = big & ~same_bits_mask(fast, ieee)
    assert not bad.any(), f"{int(bad.sum())} of {n} differ, e.g. x={x[bad][:4].tolist()} scale={s[bad][:4].tolist()}"
    small = ~big
    assert torch.equal(torch.signbit(fast[small]), torch.signbit(ieee[small]))
    assert bool((fast[small].abs() < 2.0**-38).all())
    assert int(small.sum()) > n // 100, "the cases must reach the underflow region"
    for fp8 in FP8:
        assert same_bits(fast.to(fp8), ieee.to(fp8))


@pytest.mark.parametrize("M, K, multiple, m_major", [(1, 128, 4, True), (3, 200, 4, True), (67, 384, 4, True),
                                                   (68, 256, 4, True), (67, 384, 128, False), (200, 256, 128, True),
                                                   (130, 130, 128, False)])
def test_quantize_pads_rows_with_zeros(M, K, multiple, m_major):
    """``rows_multiple_of`` (4: the eager linear's cuBLAS path; 128: ``gemm.activation_rows``, the
    large-M GEMMs' TMA boxes) appends zero rows and zero scales up to that multiple, written by the
    quantization's own launch; M-major scales strided by the padded M; the first M rows are the
    reference's bits. (The memory is dirtied first, so rows left unwritten would show.)"""
    from blockwise_fp8.kernels import quant

    rows = -(-M // multiple) * multiple
    kb = -(-K // 128)
    for shape, dtype in (((rows, K), torch.uint8), ((rows, kb), torch.float32), ((kb, rows), torch.float32)):
        del_me = torch.full(shape, 0x7F if dtype == torch.uint8 else float("nan"), dtype=dtype, device=KERNEL_DEVICE)
        del del_me
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
    q, s = quant.quantize(x.to(KERNEL_DEVICE), 1, 128, torch.float8_e4m3fn, scale_m_major=m_major,
                          rows_multiple_of=multiple)
    assert q.shape == (rows, K) and s.shape == (rows, kb) and s.stride() == ((1, rows) if m_major else (kb, 1))
    q_ref, s_ref = bf.reference.quantize(x, (1, 128), torch.float8_e4m3fn)
    assert torch.equal(q[:M].cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s[:M].cpu(), s_ref)
    assert not q[M:].cpu().view(torch.uint8).any() and not s[M:].cpu().any()
