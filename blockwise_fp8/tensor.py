"""``BlockwiseFP8Tensor``: a weight stored as FP8 in 128x128 blocks, used through torchao.

The tensor holds ``qdata`` (FP8, the weight's shape) and ``scale`` (float32, one per 128x128
block, ``x ~= qdata.float() * scale``) and reports the original high-precision dtype as its
``dtype``. Linear-like ops (``F.linear``, ``aten.linear/mm/addmm/matmul``) quantize the activation
on the fly in 1x128 blocks and call ``blockwise_fp8.ops.linear``; this module never launches a
kernel itself.

Layout ops keep the blocks intact or refuse: ``t``/``transpose`` return a view whose ``qdata`` and
``scale`` are transposed together (the GEMM reads it back as the NT layout it wants), and slices
must start and end on block boundaries (or at the end of the dimension), because a scale belongs
to a whole 128x128 block. Any other op runs on ``dequantize()`` with a one-time warning when that
gives the right answer (the op neither mutates nor aliases its input), and raises
NotImplementedError otherwise.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

from . import ops

__all__ = ["BlockwiseFP8Tensor"]

aten = torch.ops.aten

WEIGHT_BLOCK = ops.GEMM_BLOCK_SIZE  # the GEMM's K loop steps exactly one 128-wide weight block
HP_DTYPES = ops.OUTPUT_DTYPES  # what dequantize and the linear output can be


def _cdiv(a, b):
    return -(-a // b)


def _elementwise_backend(backend: str) -> str:
    """The backend that quantizes or dequantizes the weight of a tensor whose linears use ``backend``.

    ``backend`` chooses the GEMM. The weight is (de)quantized on whatever device it sits (often
    the CPU, before ``.to("cuda")``), and every implementation gives the same bits, so "auto" does
    it unless the reference was asked for; "cublas" has no quantizer of its own.
    """
    return "reference" if backend == "reference" else "auto"


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def _normalize_block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2):
        raise TypeError(f"block_size must be a pair such as (128, 128), got {block_size!r}")
    if tuple(block_size) != (WEIGHT_BLOCK, WEIGHT_BLOCK):
        raise ValueError(
            f"block_size must be ({WEIGHT_BLOCK}, {WEIGHT_BLOCK}): the blockwise GEMM applies one weight "
            f"scale per {WEIGHT_BLOCK}x{WEIGHT_BLOCK} block; got {tuple(block_size)}"
        )
    return (WEIGHT_BLOCK, WEIGHT_BLOCK)


def _check_components(qdata, scale, block_size, activation_dtype, backend, hp_dtype) -> tuple[int, int]:
    """Validate constructor arguments (also those of tensors built from checkpoints)."""
    if not isinstance(qdata, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError(
            f"qdata and scale must be torch.Tensors, got {type(qdata).__name__} and {type(scale).__name__}"
        )
    if isinstance(qdata, BlockwiseFP8Tensor) or isinstance(scale, BlockwiseFP8Tensor):
        raise TypeError("qdata and scale must be plain tensors, not BlockwiseFP8Tensors")
    if qdata.dtype not in ops.FP8_DTYPES:
        raise TypeError(f"qdata must have an FP8 dtype ({_dtype_names(ops.FP8_DTYPES)}), got {qdata.dtype}")
    if qdata.dim() != 2:
        raise ValueError(f"qdata must be 2-D (a Linear weight, (N, K)), got shape {tuple(qdata.shape)}")
    if scale.dtype != torch.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    block_size = _normalize_block_size(block_size)
    expected = (_cdiv(qdata.shape[0], block_size[0]), _cdiv(qdata.shape[1], block_size[1]))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)}, but qdata of shape {tuple(qdata.shape)} in "
            f"{block_size[0]}x{block_size[1]} blocks needs {expected}"
        )
    if qdata.device != scale.device:
        raise ValueError(f"qdata and scale must be on one device, got {qdata.device} and {scale.device}")
    if activation_dtype not in ops.FP8_DTYPES:
        raise ValueError(f"activation_dtype must be one of {_dtype_names(ops.FP8_DTYPES)}, got {activation_dtype}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if hp_dtype not in HP_DTYPES:
        raise ValueError(f"hp_dtype must be one of {_dtype_names(HP_DTYPES)}, got {hp_dtype}")
    return block_size


class BlockwiseFP8Tensor(TorchAOBaseTensor):
    """A 2-D weight ``(N, K)`` quantized to FP8 in 128x128 blocks.

    Args:
        qdata: FP8 values (``float8_e4m3fn`` or ``float8_e5m2``), the weight's shape.
        scale: float32 ``(ceil(N/128), ceil(K/128))``, the dequantization multipliers (the
            ``weight_scale_inv`` of DeepSeek-V3 / HF FP8 checkpoints).
        block_size: ``(128, 128)``.
        activation_dtype: FP8 dtype the activations are quantized to (1x128 blocks) in a matmul.
        backend: "auto" | "triton" | "reference", passed to ``blockwise_fp8.ops``.
        hp_dtype: the original high-precision dtype, reported as ``.dtype``.
    """

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "activation_dtype", "backend", "hp_dtype"]

    def __new__(
        cls,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        block_size=(WEIGHT_BLOCK, WEIGHT_BLOCK),
        activation_dtype: torch.dtype = torch.float8_e4m3fn,
        backend: str = "auto",
        hp_dtype: torch.dtype = torch.bfloat16,
    ):
        _check_components(qdata, scale, block_size, activation_dtype, backend, hp_dtype)
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, qdata.shape, strides=qdata.stride(), dtype=hp_dtype, device=qdata.device, requires_grad=False
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        block_size=(WEIGHT_BLOCK, WEIGHT_BLOCK),
        activation_dtype: torch.dtype = torch.float8_e4m3fn,
        backend: str = "auto",
        hp_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.qdata = qdata
        self.scale = scale
        self.block_size = _normalize_block_size(block_size)
        self.activation_dtype = activation_dtype
        self.backend = backend
        self.hp_dtype = hp_dtype

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hp(
        cls,
        w: torch.Tensor,
        dtype: torch.dtype = torch.float8_e4m3fn,
        activation_dtype: torch.dtype = torch.float8_e4m3fn,
        backend: str = "auto",
        block_size=(WEIGHT_BLOCK, WEIGHT_BLOCK),
    ) -> "BlockwiseFP8Tensor":
        """Quantize the high-precision 2-D weight ``w`` (N, K) to ``dtype`` in 128x128 blocks.

        Raises TypeError/ValueError for a non-tensor, an already quantized tensor, a dtype other
        than bf16/fp16/fp32, a shape that is not 2-D, or NaN/Inf values.
        """
        if isinstance(w, BlockwiseFP8Tensor):
            raise TypeError("w is already a BlockwiseFP8Tensor; call w.dequantize() first to requantize it")
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.dtype not in HP_DTYPES:
            raise TypeError(f"w must be one of {_dtype_names(HP_DTYPES)}, got {w.dtype}")
        if w.dim() != 2:
            raise ValueError(f"w must be 2-D (N, K), got shape {tuple(w.shape)}")
        if dtype not in ops.FP8_DTYPES:
            raise ValueError(f"dtype must be one of {_dtype_names(ops.FP8_DTYPES)}, got {dtype}")
        block_size = _normalize_block_size(block_size)
        if w.is_meta:
            # A model built on the meta device is quantized for its structure only; the values
            # arrive later through load_state_dict.
            qdata = torch.empty(w.shape, dtype=dtype, device="meta")
            scale = torch.empty(_cdiv(w.shape[0], block_size[0]), _cdiv(w.shape[1], block_size[1]), device="meta")
        else:
            with torch.no_grad():
                qdata, scale = ops.quantize_weight(
                    w.detach(), dtype, block_size[1], backend=_elementwise_backend(backend)
                )
        return cls(qdata, scale, block_size, activation_dtype, backend, w.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight in high precision (``dtype``, default ``self.dtype``) as a plain tensor."""
        dtype = self.dtype if dtype is None else dtype
        return ops.dequantize(self.qdata, self.scale, self.block_size, dtype, backend=_elementwise_backend(self.backend))

    @property
    def activation_block_size(self) -> tuple[int, int]:
        return (1, self.block_size[1])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, weight_dtype={self.qdata.dtype}, "
            f"block_size={self.block_size}, activation_dtype={self.activation_dtype}, "
            f"activation_block_size={self.activation_block_size}, backend={self.backend!r}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def _quantization_type(self) -> str:
        # torchao's module repr helpers call this.
        return (
            f"weight={self.qdata.dtype} {self.block_size[0]}x{self.block_size[1]}, "
            f"activation={self.activation_dtype} 1x{self.block_size[1]}, backend={self.backend}"
        )

    def _stable_hash_for_caching(self) -> str:
        # Compiled graphs take the tensors as inputs, so the cache key is the layout, not the values.
        return repr((
            type(self).__qualname__, tuple(self.shape), self.stride(), self.requires_grad,
            self.qdata.dtype, self.qdata.stride(), tuple(self.scale.shape), self.scale.stride(),
            self.block_size, self.activation_dtype, self.backend, self.hp_dtype, self.device.type,
        ))

    def _with(self, qdata: torch.Tensor, scale: torch.Tensor, **changes) -> "BlockwiseFP8Tensor":
        attrs = dict(
            block_size=self.block_size, activation_dtype=self.activation_dtype, backend=self.backend,
            hp_dtype=self.hp_dtype,
        )
        attrs.update(changes)
        return BlockwiseFP8Tensor(qdata, scale, **attrs)

    # ------------------------------------------------------------------ subclass protocol
    # Spelled out here rather than inherited, so the behaviour does not depend on which torchao
    # (>= 0.14) is installed: its base-class helpers and op tables have changed between releases.

    def __tensor_flatten__(self):
        return ["qdata", "scale"], {
            "block_size": self.block_size, "activation_dtype": self.activation_dtype,
            "backend": self.backend, "hp_dtype": self.hp_dtype,
        }

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, attrs, outer_size, outer_stride):
        return cls(inner_tensors["qdata"], inner_tensors["scale"], **attrs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        impl = _TORCH_FN_IMPLS.get(func)
        if impl is not None:
            return impl(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        impl = _ATEN_IMPLS.get(func)
        if impl is not None:
            return impl(func, types, args, kwargs)
        if _is_collective(func):
            if func._opname in _C10D_MOVES:
                return _c10d_move(func, args, kwargs)
            raise NotImplementedError(
                f"BlockwiseFP8Tensor does not support the collective {func}: only data movement (scatter, "
                "broadcast, all-gather, send/recv) is defined for quantized weights, not reductions"
            )
        return _dequantize_fallback(func, args, kwargs)


_ATEN_IMPLS: dict = {}
_TORCH_FN_IMPLS: dict = {}


def _registrar(table):
    def register(ops_or_fns):
        keys = ops_or_fns if isinstance(ops_or_fns, (list, tuple)) else [ops_or_fns]

        def decorator(impl):
            for key in keys:
                table[key] = impl
            return impl

        return decorator

    return register


implements = _registrar(_ATEN_IMPLS)  # aten ops, seen in __torch_dispatch__
implements_torch_function = _registrar(_TORCH_FN_IMPLS)  # Python-level functions, before decomposition


# ---------------------------------------------------------------------- the linear path


def _addmm_impl(
    x: torch.Tensor,
    weight: BlockwiseFP8Tensor,
    bias: Optional[torch.Tensor],
    *,
    weight_is_nk: bool,
    op: str,
) -> torch.Tensor:
    """``x @ W + bias`` for every linear-like op; ``weight`` is ``W.T`` (NK) or ``W`` (KN).

    The GEMM is NT: it wants the weight as (N, K) with 128x128 block scales. A KN weight (what
    ``F.linear`` produces by calling ``w.t()``) is a transposed view, so transposing ``qdata``
    and ``scale`` back is free and exact.
    """
    if isinstance(x, BlockwiseFP8Tensor):
        raise NotImplementedError(
            f"{op}: both operands are BlockwiseFP8Tensors; only the weight may be quantized "
            "(activations are quantized on the fly). Dequantize one of them first."
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: the input must be a torch.Tensor, got {type(x).__name__}")
    if weight_is_nk:
        w_q, w_scale = weight.qdata, weight.scale
    else:
        w_q, w_scale = weight.qdata.t(), weight.scale.t()
    if torch.is_grad_enabled() and weight.requires_grad:
        _warn_frozen_weight()
    return linear_nk(x, w_q, w_scale, bias, weight.activation_dtype, weight.backend)


def linear_nk(x, w_q, w_scale, bias, activation_dtype, backend) -> torch.Tensor:
    """``x @ W.T + bias`` for the NK weight ``(w_q, w_scale)``, in x's dtype, with gradients for
    ``x`` and ``bias`` where they are asked for (the weight is frozen). Shared with
    ``modules.BlockwiseFP8Linear``, which holds the same two tensors as plain parameters."""
    args = (x, w_q, w_scale, bias, activation_dtype, x.dtype, backend)
    needs_grad = x.requires_grad or (isinstance(bias, torch.Tensor) and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _QuantizedLinearFn.apply(*args)
    return _linear(*args)


_FROZEN_WARNED = [False]


def _warn_frozen_weight() -> None:
    # load_state_dict(assign=True) into a fresh model wraps our tensor in a Parameter that
    # requires grad; training it would silently do nothing, so say so once. Not while tracing:
    # warnings.warn would break the graph, and eager runs of the same model warn anyway.
    if _FROZEN_WARNED[0] or torch.compiler.is_compiling():
        return
    _FROZEN_WARNED[0] = True
    warnings.warn(
        "a BlockwiseFP8Tensor weight has requires_grad=True, but quantized weights are frozen: no "
        "gradient flows to them (inputs and biases still get theirs). Call weight.requires_grad_(False) "
        "or run under torch.no_grad() / torch.inference_mode() to silence this warning.",
        stacklevel=4,
    )


def _linear(x, w_q, w_scale, bias, activation_dtype, out_dtype, backend):
    return ops.linear(x, w_q, w_scale, bias, activation_dtype=activation_dtype, out_dtype=out_dtype, backend=backend)


class _QuantizedLinearFn(torch.autograd.Function):
    """Gradients for the input and the bias of a frozen quantized weight.

    A model whose non-quantized parameters (LayerNorm, biases, adapters) require grad still
    needs the forward to be differentiable: eagerly for training them, and under torch.compile
    even for inference, which traces the backward graph whenever an input requires grad. The
    input gradient treats the activation rounding as the identity (straight-through) and uses
    the dequantized weight: d(x @ W.T)/dx = W. The weight itself gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, w_q, w_scale, bias, activation_dtype, out_dtype, backend):
        ctx.save_for_backward(w_q, w_scale)
        ctx.x_dtype, ctx.backend = x.dtype, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _linear(x, w_q, w_scale, bias, activation_dtype, out_dtype, backend)

    @staticmethod
    def backward(ctx, grad_out):
        w_q, w_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ops.dequantize(
                w_q, w_scale, (WEIGHT_BLOCK, WEIGHT_BLOCK), torch.float32, backend=_elementwise_backend(ctx.backend)
            )
            grad_x = (grad_out.float() @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.float().reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None, None, None


def _check_2d(t, op: str, name: str) -> None:
    if isinstance(t, torch.Tensor) and t.dim() != 2:
        raise ValueError(f"{op} expects 2-D operands, got {name} of shape {tuple(t.shape)}")


def _matmul(a, b, op: str, *, two_d: bool) -> torch.Tensor:
    """``a @ b`` where ``a`` and/or ``b`` is a BlockwiseFP8Tensor."""
    if two_d:
        _check_2d(a, op, "self")
        _check_2d(b, op, "mat2")
    if isinstance(b, BlockwiseFP8Tensor):
        if b.dim() != 2:  # cannot happen for our 2-D tensors; kept for a clear message
            raise ValueError(f"{op}: the quantized operand must be 2-D, got {tuple(b.shape)}")
        if isinstance(a, torch.Tensor) and a.dim() == 0:
            raise ValueError(f"{op}: both arguments need at least one dimension, got a 0-d input")
        return _addmm_impl(a, b, None, weight_is_nk=False, op=op)
    # W @ x == (x.T @ W.T).T: the contraction still runs over W's columns, so the activation is
    # quantized along K in 1x128 blocks exactly as for x @ W.T.
    if not isinstance(b, torch.Tensor) or b.dim() != 2:
        raise NotImplementedError(
            f"{op}: a BlockwiseFP8Tensor on the left needs a 2-D right operand, got "
            f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}"
        )
    return _addmm_impl(b.t(), a, None, weight_is_nk=True, op=op).t()


@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(weight, BlockwiseFP8Tensor):
        # Quantized input with a plain weight is not a layout we compute.
        raise NotImplementedError(
            "F.linear: only the weight may be a BlockwiseFP8Tensor; the input is quantized on the fly"
        )
    return _addmm_impl(x, weight, bias, weight_is_nk=True, op="F.linear")


@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(weight, BlockwiseFP8Tensor):
        raise NotImplementedError("aten.linear: only the weight may be a BlockwiseFP8Tensor")
    return _addmm_impl(x, weight, bias, weight_is_nk=True, op="aten.linear")


@implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
def _(func, types, args, kwargs):
    return _matmul(args[0], args[1], "matmul", two_d=False)


@implements_torch_function(torch.Tensor.__rmatmul__)
def _(func, types, args, kwargs):
    return _matmul(args[1], args[0], "matmul", two_d=False)


@implements(aten.matmul.default)
def _(func, types, args, kwargs):
    return _matmul(args[0], args[1], "aten.matmul", two_d=False)


@implements(aten.mm.default)
def _(func, types, args, kwargs):
    return _matmul(args[0], args[1], "aten.mm", two_d=True)


@implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    if isinstance(bias, BlockwiseFP8Tensor):
        raise NotImplementedError("aten.addmm: the added tensor (self) cannot be a BlockwiseFP8Tensor")
    _check_2d(a, "aten.addmm", "mat1")
    _check_2d(b, "aten.addmm", "mat2")
    fusable = (
        isinstance(b, BlockwiseFP8Tensor)
        and beta == 1
        and alpha == 1
        and bias.dim() == 1
        and bias.shape[0] == b.shape[1]
    )
    if fusable:
        # The bias of F.linear: fused into the GEMM epilogue.
        return _addmm_impl(a, b, bias, weight_is_nk=False, op="aten.addmm")
    out = _matmul(a, b, "aten.addmm", two_d=True)
    if alpha != 1:
        out = out * alpha
    if beta == 0:  # torch.addmm ignores self (even NaN) when beta is 0
        return out
    return out + (bias * beta if beta != 1 else bias)


# ---------------------------------------------------------------------- layout ops


@implements([aten.t.default])
def _(func, types, args, kwargs):
    self = args[0]
    new = self._with(self.qdata.t(), self.scale.t())
    return return_and_correct_aliasing(func, args, kwargs, new)


@implements([aten.transpose.int])
def _(func, types, args, kwargs):
    self, dim0, dim1 = args[0], args[1], args[2]
    # A square block makes the transposed scale grid exactly the transposed tensor's grid.
    new = self._with(self.qdata.transpose(dim0, dim1), self.scale.transpose(dim0, dim1))
    return return_and_correct_aliasing(func, args, kwargs, new)


@implements([aten.permute.default])
def _(func, types, args, kwargs):
    self, dims = args[0], args[1]
    new = self._with(self.qdata.permute(dims), self.scale.permute(dims))
    return return_and_correct_aliasing(func, args, kwargs, new)


def _block_aligned_range(self: BlockwiseFP8Tensor, dim: int, start, end, op: str) -> tuple[int, int]:
    size = self.shape[dim]
    block = self.block_size[dim]
    start = 0 if start is None else start
    end = size if end is None else end
    start = max(start + size, 0) if start < 0 else min(start, size)
    end = max(end + size, 0) if end < 0 else min(end, size)
    end = max(end, start)
    if start % block != 0 or (end % block != 0 and end != size):
        raise ValueError(
            f"{op} of a BlockwiseFP8Tensor of shape {tuple(self.shape)} along dim {dim} must start and "
            f"end on a multiple of {block} (or at the end, {size}): a scale covers a whole "
            f"{self.block_size[0]}x{self.block_size[1]} block; got [{start}:{end}]. "
            "Dequantize first to slice through a block."
        )
    return start, end


def _slice(self: BlockwiseFP8Tensor, dim: int, start: int, end: int) -> BlockwiseFP8Tensor:
    block = self.block_size[dim]
    qdata = aten.slice.Tensor(self.qdata, dim, start, end, 1)
    scale = aten.slice.Tensor(self.scale, dim, start // block, _cdiv(end, block), 1)
    return self._with(qdata, scale)


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    self = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    dim = dim % self.dim()
    if step != 1:
        raise ValueError(f"slicing a BlockwiseFP8Tensor needs step 1 (strided slices cut through blocks), got {step}")
    start, end = _block_aligned_range(self, dim, start, end, "slice")
    return return_and_correct_aliasing(func, args, kwargs, _slice(self, dim, start, end))


def _split_at(self: BlockwiseFP8Tensor, sizes, dim: int, op: str) -> list:
    out, start = [], 0
    for size in sizes:
        s, e = _block_aligned_range(self, dim, start, start + size, op)
        out.append(_slice(self, dim, s, e))
        start += size
    return out


@implements(aten.split.Tensor)
def _(func, types, args, kwargs):
    self = args[0]
    split_size = args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % self.dim()
    size = self.shape[dim]
    if split_size <= 0:
        raise ValueError(f"split_size must be positive, got {split_size}")
    sizes = [min(split_size, size - s) for s in range(0, size, split_size)] or [0]
    return return_and_correct_aliasing(func, args, kwargs, _split_at(self, sizes, dim, "split"))


@implements(aten.split_with_sizes.default)
def _(func, types, args, kwargs):
    self, sizes = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % self.dim()
    if sum(sizes) != self.shape[dim]:
        raise ValueError(f"split sizes {list(sizes)} must sum to {self.shape[dim]}, the size of dim {dim}")
    return return_and_correct_aliasing(func, args, kwargs, _split_at(self, sizes, dim, "split"))


@implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _(func, types, args, kwargs):
    self, size = args[0], args[1]
    try:
        same = tuple(torch.Size(size)) == tuple(self.shape) or (
            len(size) == self.dim() and all(s in (-1, t) for s, t in zip(size, self.shape))
        )
    except TypeError:
        same = False
    if not same:
        raise NotImplementedError(
            f"{func}: a BlockwiseFP8Tensor of shape {tuple(self.shape)} cannot be viewed as {list(size)} "
            "(its scales tile two dimensions in 128x128 blocks); dequantize it first"
        )
    return return_and_correct_aliasing(func, args, kwargs, self._with(self.qdata, self.scale))


@implements(aten.view_as.default)
def _(func, types, args, kwargs):
    # DTensor.from_local calls input.view_as(input) (reached under inference_mode, where it does
    # not decompose): the same rule as view, with the other tensor's shape.
    return aten.view.default(args[0], list(args[1].shape))


# ---------------------------------------------------------------------- copies and moves


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    self = args[0]
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", None) or self.dtype
    device = kwargs.pop("device", None) or self.device
    non_blocking = kwargs.pop("non_blocking", False)
    kwargs.pop("layout", None)
    memory_format = kwargs.pop("memory_format", None)
    if kwargs.pop("pin_memory", None):
        raise NotImplementedError("_to_copy with pin_memory=True is not supported for BlockwiseFP8Tensor")
    if dtype not in HP_DTYPES:
        # The FP8 values and the scales are the tensor; a different dtype means a different
        # high-precision view of them, and only bf16/fp16/fp32 are such views.
        raise TypeError(
            f"a BlockwiseFP8Tensor can be converted to {_dtype_names(HP_DTYPES)} (its high-precision "
            f"dtype), got {dtype}; use .dequantize(dtype) for a plain tensor or .qdata for the FP8 values"
        )
    to = dict(device=device, non_blocking=non_blocking)
    if memory_format is not None:
        to["memory_format"] = memory_format
    new = self._with(self.qdata.to(**to), self.scale.to(**to), hp_dtype=dtype)
    return new


@implements([aten.empty_like.default])
def _(func, types, args, kwargs):
    # Module.to_empty() (meta-device models) calls this; the result must stay quantized so that
    # load_state_dict can copy_ a checkpoint into it.
    self = args[0]
    kwargs = dict(kwargs)
    device = kwargs.pop("device", None) or self.device
    dtype = kwargs.pop("dtype", None) or self.dtype
    if dtype not in HP_DTYPES:
        raise TypeError(f"empty_like of a BlockwiseFP8Tensor needs one of {_dtype_names(HP_DTYPES)}, got {dtype}")
    return self._with(torch.empty_like(self.qdata, device=device), torch.empty_like(self.scale, device=device),
                      hp_dtype=dtype)


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    self, src = args[0], args[1]
    if isinstance(src, BlockwiseFP8Tensor):
        if src.shape != self.shape:
            raise ValueError(f"copy_: shape mismatch, destination {tuple(self.shape)}, source {tuple(src.shape)}")
        if src.qdata.dtype != self.qdata.dtype:
            raise ValueError(
                f"copy_: the source holds {src.qdata.dtype} values but the destination {self.qdata.dtype}; "
                "converting FP8 formats would requantize. Copy src.dequantize() instead."
            )
        self.qdata.copy_(src.qdata)
        self.scale.copy_(src.scale)
        return self
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"copy_: the source must be a tensor, got {type(src).__name__}")
    if src.shape != self.shape:
        raise ValueError(f"copy_: shape mismatch, destination {tuple(self.shape)}, source {tuple(src.shape)}")
    # A high-precision source (a bf16 checkpoint loaded into a quantized model) is quantized
    # into this tensor's format: copying a value means storing its closest representation.
    q, s = ops.quantize_weight(
        src.to(self.qdata.device), self.qdata.dtype, self.block_size[1], backend=_elementwise_backend(self.backend)
    )
    self.qdata.copy_(q)
    self.scale.copy_(s)
    return self


@implements([aten.detach.default, aten.alias.default, aten.clone.default, aten.contiguous.default])
def _(func, types, args, kwargs):
    self = args[0]
    new = self._with(func(self.qdata, *args[1:], **kwargs), func(self.scale, *args[1:], **kwargs))
    return return_and_correct_aliasing(func, args, kwargs, new)


@implements_torch_function(torch.Tensor.contiguous)
def _(func, types, args, kwargs):
    self = args[0]
    return self._with(self.qdata.contiguous(**kwargs), self.scale.contiguous(**kwargs))


@implements_torch_function(torch._has_compatible_shallow_copy_type)
def _(func, types, args, kwargs):
    # Module._apply asks this before swapping a parameter's data for a moved/converted copy.
    return type(args[0]) is type(args[1]) and args[0].shape == args[1].shape


@implements([aten.is_pinned.default])
def _(func, types, args, kwargs):
    return args[0].qdata.is_pinned() and args[0].scale.is_pinned()


@implements([aten._pin_memory.default])
def _(func, types, args, kwargs):
    self = args[0]
    return self._with(self.qdata.pin_memory(), self.scale.pin_memory())


@implements(aten.cat.default)
def _(func, types, args, kwargs):
    tensors = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not all(isinstance(t, BlockwiseFP8Tensor) for t in tensors):
        raise NotImplementedError(
            "cat: every tensor must be a BlockwiseFP8Tensor to concatenate quantized weights; dequantize first"
        )
    first = tensors[0]
    dim = dim % first.dim()
    other = 1 - dim
    for t in tensors:
        if t.shape[other] != first.shape[other] or t.qdata.dtype != first.qdata.dtype:
            raise ValueError(
                f"cat along dim {dim}: all BlockwiseFP8Tensors need the same size of dim {other} and the same FP8 "
                f"dtype, got shapes {[tuple(x.shape) for x in tensors]} and dtypes {[x.qdata.dtype for x in tensors]}"
            )
    for t in tensors[:-1]:
        if t.shape[dim] % first.block_size[dim]:
            raise ValueError(
                f"cat along dim {dim}: every tensor but the last needs a multiple of {first.block_size[dim]} there, "
                f"so that the scales of the result tile it in whole blocks; got sizes {[x.shape[dim] for x in tensors]}"
            )
    qdata = torch.cat([t.qdata.view(torch.uint8) for t in tensors], dim).view(first.qdata.dtype)
    scale = torch.cat([t.scale for t in tensors], dim)
    return first._with(qdata, scale)


# ---------------------------------------------------------------------- collectives (DTensor)
# torch.distributed moves a BlockwiseFP8Tensor by moving its two components: the FP8 values
# (as uint8 bytes, which every backend carries) and the float32 scales. Only data movement is
# defined; a reduction of quantized weights has no meaning and is refused.

_C10D_MOVES = {"scatter_", "broadcast_", "allgather_", "_allgather_base_", "allgather_into_tensor_coalesced_",
               "send", "recv_", "recv_any_source_"}


def _component(part: str):
    def pick(t):
        return t.qdata.view(torch.uint8) if part == "qdata" else t.scale
    return pick


def _check_all_quantized(func, args, kwargs) -> None:
    flat = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    if not all(isinstance(a, BlockwiseFP8Tensor) for a in flat):
        raise NotImplementedError(
            f"{func}: mixes BlockwiseFP8Tensors and plain tensors; a collective moves either quantized weights "
            "or plain tensors, not both"
        )


def _wait_for_first(work, on_cuda: bool) -> None:
    """Make the caller's wait on the second (scale) collective cover the first (qdata) one too.

    NCCL issues both on one stream in order, so the second finishing implies the first: nothing to
    do (and calling ``wait`` on the TorchScript Work object an op returns inside __torch_dispatch__
    crashed the process with SIGSEGV on 2 H100s, torch 2.11). Gloo runs works on a thread pool that
    may finish them out of order, so the first is waited for here (safe with gloo)."""
    if not on_cuda and work is not None and hasattr(work, "wait"):
        work.wait()


def _c10d_move(func, args, kwargs):
    """In-place collectives (scatter_, broadcast_, allgather_, ...): run once per component."""
    _check_all_quantized(func, args, kwargs)
    a_args, a_kwargs = pytree.tree_map_only(BlockwiseFP8Tensor, _component("qdata"), (args, kwargs))
    out = func(*a_args, **a_kwargs)
    work = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
    on_cuda = any(t.is_cuda for t in pytree.tree_leaves((a_args, a_kwargs)) if isinstance(t, torch.Tensor))
    _wait_for_first(work, on_cuda)
    b_args, b_kwargs = pytree.tree_map_only(BlockwiseFP8Tensor, _component("scale"), (args, kwargs))
    out = func(*b_args, **b_kwargs)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return (args[0], out[1])  # every such op returns its first (output) argument and a Work
    return out


def _is_collective(func) -> bool:
    return getattr(func, "namespace", None) in ("c10d", "_c10d_functional", "_c10d_functional_autograd")


def _all_gather_into_tensor(func, types, args, kwargs):
    self, group_size, group_name = args[0], args[1], args[2]
    if self.shape[0] % self.block_size[0]:
        raise ValueError(
            f"all_gather of a BlockwiseFP8Tensor of shape {tuple(self.shape)} along dim 0 needs a multiple of "
            f"{self.block_size[0]} rows per rank, so that the gathered scales tile whole blocks"
        )
    qdata = func(self.qdata.view(torch.uint8), group_size, group_name).view(self.qdata.dtype)
    scale = func(self.scale, group_size, group_name)
    return self._with(qdata, scale)


def _functional_broadcast(func, types, args, kwargs):
    self = args[0]
    qdata = func(self.qdata.view(torch.uint8), *args[1:], **kwargs).view(self.qdata.dtype)
    scale = func(self.scale, *args[1:], **kwargs)
    return self._with(qdata, scale)


def _wait_tensor(func, types, args, kwargs):
    self = args[0]
    func(self.qdata)
    func(self.scale)
    return self


def _wait_components(func, types, args, kwargs):
    # _wrap_tensor_autograd (torch >= 2.12) would wrap the result in an AsyncCollectiveTensor to
    # wait lazily; a BlockwiseFP8Tensor waits for both components now and stays what it is.
    self = args[0]
    torch.ops._c10d_functional.wait_tensor(self.qdata)
    torch.ops._c10d_functional.wait_tensor(self.scale)
    return self


def _register_functional_collectives() -> None:
    # torch builds without distributed support have no _c10d_functional ops.
    if not torch.distributed.is_available():
        return
    ns = torch.ops._c10d_functional
    for name, impl in (("all_gather_into_tensor", _all_gather_into_tensor), ("broadcast", _functional_broadcast),
                       ("wait_tensor", _wait_tensor), ("_wrap_tensor_autograd", _wait_components)):
        try:
            op = getattr(ns, name).default
        except (AttributeError, RuntimeError):
            continue
        _ATEN_IMPLS[op] = impl


_register_functional_collectives()


# ---------------------------------------------------------------------- everything else


_WARNED_OPS: set = set()


def _is_pure(func) -> bool:
    """True if ``func`` neither mutates nor aliases any argument, nor returns a view.

    Only such ops give the right answer when run on a dequantized copy: a write to the copy
    would be lost, and a view of the copy would not alias the weight.
    """
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    return all(a.alias_info is None for a in schema.arguments) and all(
        r.alias_info is None for r in schema.returns
    )


def _dequantize_fallback(func, args, kwargs):
    # Collectives' schemas do not mark the tensors they write (c10d.scatter_ fills its outputs
    # in place), so _is_pure cannot vouch for them; they never reach this point.
    if not _is_pure(func):
        raise NotImplementedError(
            f"BlockwiseFP8Tensor does not support {func}: it mutates or aliases its input, so it "
            "cannot run on a dequantized copy. Call .dequantize() first and work on the plain tensor."
        )
    if func not in _WARNED_OPS:
        _WARNED_OPS.add(func)
        warnings.warn(
            f"BlockwiseFP8Tensor has no quantized implementation of {func}; computing it on the "
            "dequantized weight (correct, but slower and in high precision). This warning is shown once per op.",
            stacklevel=3,
        )
    args, kwargs = pytree.tree_map_only(BlockwiseFP8Tensor, lambda t: t.dequantize(), (args, kwargs))
    return func(*args, **kwargs)


# torch.load(weights_only=True) rebuilds only allow-listed classes.
torch.serialization.add_safe_globals([BlockwiseFP8Tensor])
