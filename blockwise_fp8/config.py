"""``BlockwiseFP8Config``: the torchao ``quantize_`` entry point.

    from torchao.quantization import quantize_
    quantize_(model, BlockwiseFP8Config())

swaps the weight of every ``nn.Linear`` (or of every module ``filter_fn`` picks) for a
:class:`~blockwise_fp8.tensor.BlockwiseFP8Tensor`. A weight that cannot be quantized is left as
it is with a warning that names the module; nothing is skipped silently.
"""

from __future__ import annotations

import os
import re
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torchao
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from . import ops
from .tensor import HP_DTYPES, WEIGHT_BLOCK, BlockwiseFP8Tensor

__all__ = [
    "BlockwiseFP8Config", "BlockwiseFP8SkipWarning", "BlockwiseFP8UntieWarning", "DEFAULT_SKIP", "MIN_FEATURES",
    "compile_skip_patterns",
]

# Below 16 in- or out-features the layer is too small for an FP8 GEMM to pay for the activation
# quantization, and 16 is the smallest tile tensor-core dot products take.
MIN_FEATURES = 16


# Modules left in high precision unless asked otherwise: the output projection, as DeepSeek-V3
# and Qwen3-FP8 checkpoints ship it (its logits feed a softmax over the whole vocabulary).
DEFAULT_SKIP = ("lm_head",)


class BlockwiseFP8SkipWarning(UserWarning):
    """A module selected for quantization was left in high precision."""


class BlockwiseFP8UntieWarning(UserWarning):
    """A quantized weight was shared with another module (a tied ``lm_head`` and embedding),
    which keeps the high-precision tensor: the two are no longer tied."""


def compile_skip_patterns(patterns) -> list:
    """Regular expressions (searched in a module's fully qualified name), checked and compiled."""
    if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)):
        raise TypeError(
            f"skip patterns must be a tuple or list of strings, got {patterns!r}; wrap a single pattern in a tuple"
        )
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"a skip pattern must be a string, got {type(p).__name__}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"skip pattern {p!r} is not a valid regular expression: {e}") from e
    return out


@dataclass
class BlockwiseFP8Config(AOBaseConfig):
    """DeepSeek-V3 blockwise FP8: weights in 128x128 blocks, activations quantized on the fly
    in 1x128 blocks, float32 scales, FP32 accumulation.

    Args:
        activation_dtype: FP8 dtype of the activations (``float8_e4m3fn`` or ``float8_e5m2``).
        weight_dtype: FP8 dtype of the weights.
        block_size: the weight block edge and activation block width; only 128 (the GEMM's K step).
        backend: "auto" (Triton on CUDA, reference on CPU), "triton", "cublas" or "reference".
        skip: regular expressions searched in each module's fully qualified name; matching
            modules stay in high precision. Default ``("lm_head",)``; ``()`` quantizes them all.
    """

    activation_dtype: torch.dtype = torch.float8_e4m3fn
    weight_dtype: torch.dtype = torch.float8_e4m3fn
    block_size: int = WEIGHT_BLOCK
    backend: str = "auto"
    skip: tuple = DEFAULT_SKIP

    def __post_init__(self):
        for name in ("activation_dtype", "weight_dtype"):
            value = getattr(self, name)
            if not isinstance(value, torch.dtype):
                raise TypeError(f"{name} must be a torch.dtype, got {type(value).__name__}")
            if value not in ops.FP8_DTYPES:
                names = ", ".join(str(d) for d in ops.FP8_DTYPES)
                raise ValueError(f"{name} must be one of {names}, got {value}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got {type(self.block_size).__name__}")
        if self.block_size != WEIGHT_BLOCK:
            raise ValueError(
                f"block_size must be {WEIGHT_BLOCK}: the blockwise GEMM steps K in {WEIGHT_BLOCK}-wide "
                f"blocks, one activation and one weight scale each; got {self.block_size}"
            )
        if self.backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {self.backend!r}")
        self._skip_patterns = compile_skip_patterns(self.skip)
        self.skip = tuple(self.skip)


def _module_fqn() -> str | None:
    """The fully qualified name of the module that ``quantize_`` is handing to our handler.

    torchao's handlers receive the module but not its name. ``quantize_`` walks the model in
    ``_replace_with_custom_fn_if_matches_filter`` whose local ``cur_fqn`` holds it, so look
    there; None when torchao walks differently (or the handler is called directly).
    """
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        if frame.f_code.co_name == "_replace_with_custom_fn_if_matches_filter" and "cur_fqn" in frame.f_locals:
            return frame.f_locals["cur_fqn"][:-1]
        frame = frame.f_back
    return None


def _walk_root() -> tuple:
    """(model, extra_args) of the outermost frame of ``quantize_``'s walk (see ``_module_fqn``):
    the model ``quantize_`` was called on and the argument tuple that call made, one object per
    call; (None, None) when torchao walks differently."""
    frame, found = sys._getframe(1), (None, None)
    while frame is not None:
        if frame.f_code.co_name == "_replace_with_custom_fn_if_matches_filter" and frame.f_locals.get("cur_fqn") == "":
            found = (frame.f_locals.get("model"), frame.f_locals.get("extra_args"))
        frame = frame.f_back
    return found


# The parameters held by more than one module of the model the current quantize_ call walks: the
# call's extra_args tuple (held here, so no later call's tuple can share its identity) and
# {id(parameter): names of its modules}. Built once per call: a per-weight walk over the model
# would be quadratic (a DeepSeek-V3-sized MoE has ~45k Linears).
_SHARED: dict = {}


def _shared_parameters(root: torch.nn.Module) -> dict:
    owners: dict = {}
    for name, m in root.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    return {k: names for k, names in owners.items() if len(names) > 1}


def _sharers(module: torch.nn.Module, weight: torch.Tensor) -> list:
    """Names of the other modules of the model being quantized that hold ``weight`` itself as a
    parameter (a tied ``lm_head`` and embedding; not ``module`` under another name), each
    checked against the live model."""
    root, call = _walk_root()
    if not isinstance(root, torch.nn.Module) or call is None:
        return []
    if _SHARED.get("call") is not call:
        _SHARED.clear()
        _SHARED.update(call=call, shared=_shared_parameters(root))
    others = ((name, root.get_submodule(name)) for name in _SHARED["shared"].get(id(weight), ()))
    return [name or "<root>" for name, m in others
            if m is not module and any(p is weight for p in m._parameters.values())]


_TORCHAO_DIR = os.path.dirname(torchao.__file__)


def _stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning raised in the function that calls this, that
    points at the user's ``quantize_`` call: the first frame outside this file and torchao
    (``quantize_``'s walk recurses once per module level, so no fixed count does)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(_TORCHAO_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def _module_name(module: torch.nn.Module) -> str:
    """The module's name in the model being quantized, for messages; its repr if unknown."""
    fqn = _module_fqn()
    return f"'{fqn}' ({module!r})" if fqn else repr(module)


def _skip(module: torch.nn.Module, why: str) -> torch.nn.Module:
    warnings.warn(
        f"BlockwiseFP8Config: not quantizing {_module_name(module)}: {why}; it stays in high precision",
        BlockwiseFP8SkipWarning,
        stacklevel=_stacklevel(),
    )
    return module


def _why_not_quantizable(weight) -> str | None:
    if not isinstance(weight, torch.Tensor):
        return f"its weight is a {type(weight).__name__}, not a tensor"
    if isinstance(weight, BlockwiseFP8Tensor):
        return "its weight is already a BlockwiseFP8Tensor"
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"its weight is already a {type(weight).__name__} tensor subclass"
    if weight.dim() != 2:
        return f"its weight has shape {tuple(weight.shape)}; only 2-D (out_features, in_features) weights are supported"
    if weight.dtype not in HP_DTYPES:
        return f"its weight dtype is {weight.dtype}; supported: {', '.join(str(d) for d in HP_DTYPES)}"
    if min(weight.shape) < MIN_FEATURES:
        return f"its weight has shape {tuple(weight.shape)}; both dimensions must be at least {MIN_FEATURES}"
    return None


def show_quantization_in_repr(module: torch.nn.Module) -> None:
    """Make ``module``'s repr name its BlockwiseFP8 weight (used by quantize_ and the loaders)."""
    module.extra_repr = types.MethodType(_quantized_extra_repr, module)


def _quantized_extra_repr(module: torch.nn.Module) -> str:
    # Computed from the current weight, so it stays true after load_state_dict or a weight swap.
    base = type(module).extra_repr(module)
    weight = getattr(module, "weight", None)
    if isinstance(weight, BlockwiseFP8Tensor):
        return f"{base}, weight=BlockwiseFP8({weight._quantization_type()})"
    return base


@register_quantize_module_handler(BlockwiseFP8Config)
def _blockwise_fp8_transform(
    module: torch.nn.Module, config: BlockwiseFP8Config, *, parameter_name: str = "weight"
) -> torch.nn.Module:
    if config.skip:
        fqn = _module_fqn()
        if fqn is None:
            warnings.warn(
                f"BlockwiseFP8Config: this torchao does not let the handler see module names, so skip="
                f"{config.skip} cannot be applied to {module!r}; pass "
                "filter_fn=blockwise_fp8.checkpoint.skip_filter(...) to quantize_ instead",
                BlockwiseFP8SkipWarning,
                stacklevel=_stacklevel(),
            )
        elif any(p.search(fqn) for p in config._skip_patterns):
            return module  # asked for by the config: stays in high precision, no warning
    weight = getattr(module, parameter_name, None)
    why = _why_not_quantizable(weight)
    if why is not None:
        return _skip(module, why)
    try:
        quantized = BlockwiseFP8Tensor.from_hp(
            weight,
            dtype=config.weight_dtype,
            activation_dtype=config.activation_dtype,
            backend=config.backend,
            block_size=config.block_size,
        )
    except ValueError as e:  # NaN/Inf weights: refuse loudly, naming the module
        raise ValueError(f"BlockwiseFP8Config: cannot quantize the {parameter_name} of {_module_name(module)}: {e}") from e
    sharers = _sharers(module, weight)
    setattr(module, parameter_name, torch.nn.Parameter(quantized, requires_grad=False))
    show_quantization_in_repr(module)
    if sharers:
        names = ", ".join(f"'{n}'" for n in sharers)
        warnings.warn(
            f"BlockwiseFP8Config: quantizing the {parameter_name} of {_module_name(module)} unties it from "
            f"{names}, which shared that tensor and keep it in high precision: the model now holds both, and "
            "a checkpoint saved with tie_word_embeddings=True would drop the FP8 copy. Leave the module to "
            "skip (the default skips 'lm_head') to keep the tie",
            BlockwiseFP8UntieWarning,
            stacklevel=_stacklevel(),
        )
    return module
