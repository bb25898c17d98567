"""``BlockwiseFP8Linear``: a quantized Linear whose FP8 weight and scales are plain parameters.

``quantize_`` leaves each Linear's weight a ``BlockwiseFP8Tensor``. That is the form to save,
load, slice, shard and train around, but a compiled model pays for it on every call: Dynamo
guards each subclass weight's metadata in Python, and torchao's ``unwrap_tensor_subclass`` trades
that for about seventy guards per weight on its parametrization (docs/design.md, "Host time").
With CUDA graphs at batch 1 that host time can exceed the GPU time of a whole decode step.

``unwrap_for_compile(model)`` swaps those Linears for ``BlockwiseFP8Linear`` modules that hold
the same two tensors (no copy) as ordinary parameters, under the names and layout of DeepSeek /
Hugging Face FP8 checkpoints:

    weight            (N, K)                         float8_e4m3fn or float8_e5m2
    weight_scale_inv  (ceil(N / 128), ceil(K / 128)) float32, weight ~= weight.float() * scale per block
    bias              (N,) or None                   high precision, as it was

Dynamo then guards them like any parameter, and the forward is the same math as the subclass
path (``tensor.linear_nk``: activation quantized in 1x128 blocks, input and bias gradients,
frozen weight), so outputs are bit-identical.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import ops
from .tensor import HP_DTYPES, WEIGHT_BLOCK, BlockwiseFP8Tensor, _check_components, _dtype_names, linear_nk

__all__ = ["BlockwiseFP8Linear", "unwrap_for_compile"]


class BlockwiseFP8Linear(nn.Module):
    """``y = x @ dequant(weight).T + bias`` with the activation quantized on the fly in 1x128
    blocks to ``activation_dtype``; ``weight`` and ``weight_scale_inv`` as in the module docstring.
    Build it with :meth:`from_linear` (or :func:`unwrap_for_compile` for a whole model)."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale_inv: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        *,
        activation_dtype: torch.dtype = torch.float8_e4m3fn,
        backend: str = "auto",
        hp_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        _check_components(weight, weight_scale_inv, WEIGHT_BLOCK, activation_dtype, backend, hp_dtype)
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if tuple(bias.shape) != (weight.shape[0],):
                raise ValueError(f"bias must have shape ({weight.shape[0]},) for a weight of shape {tuple(weight.shape)}, "
                                 f"got {tuple(bias.shape)}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.activation_dtype, self.backend, self.hp_dtype = activation_dtype, backend, hp_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(weight_scale_inv, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        if weight.device.type == "cuda":
            # answered now so that tracing the forward reads cached answers (no device query)
            ops.cublas_blockwise_available(weight.device)
            ops.gemm_card(weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "BlockwiseFP8Linear":
        """The same layer, from an ``nn.Linear`` whose weight is a ``BlockwiseFP8Tensor`` in
        128x128 blocks (what ``quantize_(model, BlockwiseFP8Config())`` leaves). Shares storage."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if not isinstance(w, BlockwiseFP8Tensor):
            raise TypeError(
                f"expected an nn.Linear whose weight is a BlockwiseFP8Tensor (quantize_ it first), got a "
                f"weight of type {type(w).__name__}"
            )
        if tuple(w.block_size) != (WEIGHT_BLOCK, WEIGHT_BLOCK):
            raise NotImplementedError(
                f"the GEMM takes {WEIGHT_BLOCK}x{WEIGHT_BLOCK} weight blocks, got {w.block_size[0]}x{w.block_size[1]}"
            )
        if w.qdata.stride(1) != 1:
            raise NotImplementedError("expected the weight's FP8 data in (N, K) row-major layout, got a transposed one")
        return cls(w.qdata, w.scale, linear.bias, activation_dtype=w.activation_dtype, backend=w.backend,
                   hp_dtype=w.hp_dtype)

    def weight_tensor(self) -> BlockwiseFP8Tensor:
        """The weight as a ``BlockwiseFP8Tensor`` (shares storage): dequantize, save, re-wrap."""
        return BlockwiseFP8Tensor(self.weight.data, self.weight_scale_inv.data, (WEIGHT_BLOCK, WEIGHT_BLOCK),
                                  self.activation_dtype, self.backend, self.hp_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        return linear_nk(x, self.weight, self.weight_scale_inv, self.bias, self.activation_dtype, self.backend)

    def _apply(self, fn, recurse=True):
        # model.to(torch.float16) / .half() / .bfloat16() would cast the FP8 data and round the
        # scales like any floating-point parameter. As for a BlockwiseFP8Tensor weight, a dtype
        # change only changes the high-precision dtype (bias, outputs follow the input); the
        # two quantized tensors move to the new device and keep their dtypes.
        frozen = (self.weight, self.weight_scale_inv)
        new_hp = []

        def keep_quantized(t):
            out = fn(t)
            if any(t is f for f in frozen) and out.dtype != t.dtype:
                if t is self.weight and out.dtype in HP_DTYPES:
                    new_hp.append(out.dtype)
                out = t.to(out.device)
            return out

        result = super()._apply(keep_quantized, recurse)
        if new_hp:
            self.hp_dtype = new_hp[0]
        return result

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight.dtype} {WEIGHT_BLOCK}x{WEIGHT_BLOCK}, activation={self.activation_dtype} "
            f"1x{WEIGHT_BLOCK}, backend={self.backend}"
        )


def unwrap_for_compile(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose weight is a ``BlockwiseFP8Tensor``
    with a :class:`BlockwiseFP8Linear` holding the same tensors; return ``model``.

    Do it after ``quantize_`` (or ``load_quantized``) and before ``torch.compile``. The
    ``state_dict`` then names each weight's scales ``<name>.weight_scale_inv``, as FP8 checkpoints
    do. Raises ValueError when the model has no such Linear (nothing was quantized)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if _is_quantized_linear(model):
        raise TypeError("unwrap_for_compile takes the model that holds the Linears; for one Linear call "
                        "BlockwiseFP8Linear.from_linear(linear)")
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if _is_quantized_linear(child):
                setattr(parent, name, BlockwiseFP8Linear.from_linear(child))
                swapped += 1
    if swapped == 0 and any(type(m.weight).__name__ == "DTensor" for m in model.modules() if isinstance(m, nn.Linear)):
        raise TypeError(
            f"{type(model).__name__} has sharded (DTensor) weights: use blockwise_fp8.distributed.unwrap_for_compile "
            "for a parallelized model"
        )
    if swapped == 0:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear with a BlockwiseFP8Tensor weight: quantize_ it with "
            f"BlockwiseFP8Config() first (found weights of dtypes {_weight_dtypes(model)})"
        )
    return model


def _is_quantized_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and isinstance(m.weight, BlockwiseFP8Tensor)


def _weight_dtypes(model: nn.Module) -> str:
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    return _dtype_names(sorted(dtypes, key=str)) if dtypes else "none"
