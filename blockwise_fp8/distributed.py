"""Tensor parallelism of blockwise FP8 models through DTensor.

``BlockwiseFP8Tensor`` works inside ``torch.distributed.tensor.DTensor``: PyTorch's own
``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` shards a quantized Linear's
``qdata`` and ``scale`` together along 128-blocks (``tensor.py`` defines the slicing and the
collectives that move the two components). This module adds what PyTorch cannot know:

* :func:`check_plan` / :func:`parallelize`: every quantized weight a plan shards must split into
  whole 128x128 blocks. A size that does not (``ColwiseParallel`` of ``out_features = 384`` at
  TP=2: 192 rows per rank) is refused before anything is sharded, with the layer's name and
  sizes. We do not re-block: see ``docs/distributed.md``.
* :func:`load_sharded`: load a DeepSeek/HF FP8 checkpoint into a parallelized model, each rank
  reading only its slices of each tensor through safetensors' ``get_slice``.
* :func:`unwrap_for_compile`: store each sharded quantized weight as its two plain local tensors,
  rebuilt inside the compiled graph, so a compiled call does not take two levels of tensor
  subclass apart in Python for every weight.
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Union

import torch
import torch.nn as nn

from . import checkpoint
from .tensor import WEIGHT_BLOCK, BlockwiseFP8Tensor

__all__ = ["check_plan", "parallelize", "load_sharded", "unwrap_for_compile"]


def _dtensor_api():
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed; tensor parallelism needs it")
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return DTensor, Replicate, Shard, ColwiseParallel, RowwiseParallel


def _resolve(model: nn.Module, path: str) -> list:
    """Modules of ``model`` that a ``parallelize_module`` plan key names (``*`` wildcards per atom)."""
    found = [("", model)]
    for atom in path.split("."):
        nxt = []
        for prefix, module in found:
            for name, child in module.named_children():
                if fnmatch.fnmatch(name, atom):
                    nxt.append((f"{prefix}.{name}" if prefix else name, child))
        found = nxt
    return found


def _tp_size(mesh) -> int:
    if isinstance(mesh, int) and not isinstance(mesh, bool):
        if mesh < 1:
            raise ValueError(f"the tensor-parallel size must be at least 1, got {mesh}")
        return mesh
    if hasattr(mesh, "size") and hasattr(mesh, "ndim"):
        if mesh.ndim != 1:
            raise NotImplementedError(f"check_plan takes a 1-D DeviceMesh (tensor parallelism), got {mesh.ndim} dimensions")
        return mesh.size()
    raise TypeError(f"mesh must be a 1-D DeviceMesh or an int (the TP size), got {type(mesh).__name__}")


def _valid_sizes(size: int, upto: int = 64) -> list:
    return [w for w in range(1, upto + 1) if size % (WEIGHT_BLOCK * w) == 0]


def check_plan(model: nn.Module, mesh: Union[int, "torch.distributed.device_mesh.DeviceMesh"], plan: dict) -> list:
    """Check that ``plan`` shards every quantized weight into whole 128-blocks at this TP size.

    ``ColwiseParallel`` splits a Linear weight's dim 0 (``out_features``), ``RowwiseParallel``
    its dim 1 (``in_features``), into ``tp`` equal shards (``torch.chunk``). With a
    :class:`BlockwiseFP8Tensor` weight each shard must be a whole number of 128x128 blocks, so the
    sharded size must be a multiple of ``128 * tp``. Returns the ``(name, style, dim)`` of each
    quantized layer the plan shards; raises ValueError naming every layer that does not fit, its
    weight shape, the shard size, and the TP sizes that would work. Plain layers are not checked.
    """
    _, _, _, ColwiseParallel, RowwiseParallel = _dtensor_api()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict of module path -> ParallelStyle, got {type(plan).__name__}")
    tp = _tp_size(mesh)
    checked, problems = [], []
    for path, style in plan.items():
        if not isinstance(path, str):
            raise TypeError(f"plan keys must be module paths (str), got {path!r}")
        if isinstance(style, ColwiseParallel):
            dim, kind = 0, "ColwiseParallel shards out_features (dim 0)"
        elif isinstance(style, RowwiseParallel):
            dim, kind = 1, "RowwiseParallel shards in_features (dim 1)"
        else:
            continue
        modules = _resolve(model, path)
        if not modules:
            raise ValueError(f"plan key {path!r} matches no submodule of the model")
        for name, module in modules:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, BlockwiseFP8Tensor):
                continue
            size = weight.shape[dim]
            if size % (WEIGHT_BLOCK * tp):
                shards = [len(c) for c in torch.arange(size).chunk(tp)]
                valid = _valid_sizes(size)
                problems.append(
                    f"{name!r} ({type(module).__name__}, weight {tuple(weight.shape)}): {kind}; at TP={tp} its "
                    f"{size} {'rows' if dim == 0 else 'columns'} split into shards of {shards}, which are not all whole "
                    f"{WEIGHT_BLOCK}-blocks (a scale covers a {WEIGHT_BLOCK}x{WEIGHT_BLOCK} block, so {size} must be a "
                    f"multiple of {WEIGHT_BLOCK}*{tp} = {WEIGHT_BLOCK * tp}). TP sizes that fit this layer: "
                    f"{valid or 'none'}"
                )
                continue
            checked.append((name, type(style).__name__, dim))
    if problems:
        raise ValueError(
            "cannot shard these quantized layers along 128-blocks:\n  " + "\n  ".join(problems)
            + "\nLeave them out of the plan (replicated), keep them unquantized (filter_fn of quantize_), "
            "or pick a TP size that fits; see docs/distributed.md"
        )
    return checked


def parallelize(model: nn.Module, mesh, plan: dict, *, src_data_rank: Optional[int] = 0) -> nn.Module:
    """:func:`check_plan`, then ``torch.distributed.tensor.parallel.parallelize_module``.

    ``src_data_rank`` is passed on: 0 (PyTorch's default) scatters rank 0's weights to the others,
    so only rank 0's copy needs real values; None makes each rank slice its own copy, with no
    communication.
    """
    check_plan(model, mesh, plan)
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(model, mesh, plan, src_data_rank=src_data_rank)


def _shard_for(name: str, old: torch.Tensor):
    """The load_quantized hook: (index, wrap) of this rank's slice of a DTensor parameter."""
    DTensor, Replicate, Shard, _, _ = _dtensor_api()
    if not isinstance(old, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in old.placements:
        if not isinstance(p, (Shard, Replicate)):
            raise NotImplementedError(
                f"{name!r} is a DTensor placed as {old.placements}; sharded loading reads Shard and Replicate "
                "placements only"
            )
    mesh, placements = old.device_mesh, old.placements
    shape, stride = tuple(old.shape), old.stride()
    local_shape, offset = compute_local_shape_and_global_offset(old.shape, mesh, placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))

    def wrap(local: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)

    return index, wrap


def _check_quantized_shards(model: nn.Module, path) -> None:
    """Before anything is read: every sharded weight stored quantized must split on 128-blocks."""
    DTensor, _, _, _, _ = _dtensor_api()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    entries = checkpoint._open_checkpoint(path).entries  # headers only
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, DTensor) or f"{name}.{checkpoint.SCALE_SUFFIX}" not in entries or w.dim() != 2:
            continue
        local_shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        for dim, (o, n, size) in enumerate(zip(offset, local_shape, w.shape)):
            end = o + n
            if o % WEIGHT_BLOCK or (end % WEIGHT_BLOCK and end != size):
                raise ValueError(
                    f"{name!r} (weight {tuple(w.shape)}, placements {w.placements}): this rank's shard covers "
                    f"[{o}:{end}] of dim {dim}, which does not start and end on {WEIGHT_BLOCK}-blocks, so the "
                    f"checkpoint's {checkpoint.SCALE_SUFFIX} cannot be sliced with it (see check_plan)"
                )


def load_sharded(
    model: nn.Module,
    path,
    *,
    activation_dtype: torch.dtype = torch.float8_e4m3fn,
    backend: str = "auto",
    device=None,
    strict: bool = True,
) -> "checkpoint.LoadResult":
    """Load a DeepSeek/HF FP8 checkpoint into a model already parallelized with DTensor.

    Every DTensor parameter (or buffer) is filled with this rank's slice only, read through
    safetensors' ``get_slice`` (the FP8 weight and its ``weight_scale_inv`` block rows/columns
    together); no rank reads or holds a whole sharded tensor. Plain (not parallelized) tensors are
    read whole, as :func:`blockwise_fp8.load_quantized` does. The model may live on the meta
    device (``device`` says where the values go, e.g. ``f"cuda:{rank}"``): build it on meta,
    ``quantize_`` it, :func:`parallelize` it, then load. Checks, errors and the result are those of
    :func:`blockwise_fp8.load_quantized`, against the global shapes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_quantized_shards(model, path)
    return checkpoint.load_quantized(
        model, path, activation_dtype=activation_dtype, backend=backend, device=device, strict=strict,
        _shard=_shard_for,
    )


class _RebuildShardedWeight(nn.Module):
    """Parametrization: (local qdata, local scale) -> DTensor of a BlockwiseFP8Tensor, as it was."""

    def __init__(self, weight) -> None:
        super().__init__()
        local = weight.to_local()
        self.attrs = dict(block_size=local.block_size, activation_dtype=local.activation_dtype,
                          backend=local.backend, hp_dtype=local.hp_dtype)
        self.mesh, self.placements = weight.device_mesh, weight.placements
        self.shape, self.stride = tuple(weight.shape), weight.stride()

    def forward(self, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        DTensor = _dtensor_api()[0]
        local = BlockwiseFP8Tensor(qdata, scale, **self.attrs)
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride)

    def right_inverse(self, weight):
        local = weight.to_local()
        return local.qdata, local.scale


def unwrap_for_compile(model: nn.Module) -> nn.Module:
    """Before ``torch.compile`` of a parallelized quantized model: keep each Linear's
    DTensor(BlockwiseFP8Tensor) weight as its two local plain tensors (``qdata``, ``scale``) and
    rebuild the DTensor inside the forward, where the compiled graph absorbs it.

    Without this every compiled call flattens DTensor and BlockwiseFP8Tensor of every weight in
    Python. ``torchao.utils.unwrap_tensor_subclass`` does the same for unsharded models but does
    not reach through DTensor. Like it, this renames the weights in ``state_dict``
    (``...parametrizations.weight.original0/1``): save or load checkpoints before unwrapping.
    Returns ``model``; Linears whose weight is not a sharded BlockwiseFP8Tensor are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    DTensor = _dtensor_api()[0]
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        w = module._parameters.get("weight") if not parametrize.is_parametrized(module) else None
        if isinstance(w, DTensor) and isinstance(w.to_local(), BlockwiseFP8Tensor):
            parametrize.register_parametrization(module, "weight", _RebuildShardedWeight(w), unsafe=True)
    return model
