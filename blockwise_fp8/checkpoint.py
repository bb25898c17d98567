"""The DeepSeek-V3 / Hugging Face FP8 checkpoint format: read it, write it, convert to it.

DeepSeek-V3/R1, Qwen3-*-FP8 and others ship every quantized Linear as two safetensors entries,

    <module>.weight            float8_e4m3fn (N, K)
    <module>.weight_scale_inv  float32 (ceil(N/128), ceil(K/128)), the dequantization multiplier

with, in config.json,

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "modules_to_not_convert": [...]}

``weight_scale_inv`` has exactly the meaning of :class:`BlockwiseFP8Tensor`'s ``scale``
(``w ~= weight.float() * weight_scale_inv`` per block), so both directions are copies, never a
conversion. Everything else in the checkpoint (embeddings, norms, biases, an unquantized
``lm_head``) is stored as it is.

* :func:`load_quantized` puts such a checkpoint into a model built in high precision (or on the
  meta device): quantized Linears get a ``BlockwiseFP8Tensor`` weight. It reads tensor by tensor
  through safetensors' memory map, so a checkpoint larger than host memory is never read whole.
* :func:`save_quantized` writes a model quantized with ``quantize_(model, BlockwiseFP8Config())``.
* :func:`quantize_checkpoint` converts a high-precision Hugging Face model directory into the
  format tensor by tensor, with bounded memory (the ``blockwise-fp8 quantize`` command).

All writers build the checkpoint in a hidden temporary directory beside the destination and
rename it into place at the end; ``config.json`` is written last. An interrupted write leaves no
directory under the destination's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from . import ops
from .config import DEFAULT_SKIP, compile_skip_patterns, show_quantization_in_repr
from .tensor import HP_DTYPES, WEIGHT_BLOCK, BlockwiseFP8Tensor

__all__ = [
    "CheckpointError",
    "PartialBlockWarning",
    "LoadResult",
    "DEFAULT_MAX_SHARD_SIZE",
    "DEFAULT_SKIP",
    "FMT_TO_DTYPE",
    "load_quantized",
    "save_quantized",
    "quantize_checkpoint",
    "quantization_config",
    "skip_filter",
]

SCALE_SUFFIX = "weight_scale_inv"
SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
FMT_TO_DTYPE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
DTYPE_TO_FMT = {v: k for k, v in FMT_TO_DTYPE.items()}
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # bytes per safetensors shard
# Output heads stay in high precision, as in the published FP8 checkpoints.

# safetensors' dtype names (as ``get_slice(k).get_dtype()`` reports them).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_LISTED = 12  # problems listed per kind in an error message


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or the format (missing/unexpected keys, bad shapes)."""


class PartialBlockWarning(UserWarning):
    """A saved weight has a dimension that is not a multiple of 128 (not every loader reads that)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scale_shape(shape) -> tuple[int, int]:
    return (_cdiv(shape[0], WEIGHT_BLOCK), _cdiv(shape[1], WEIGHT_BLOCK))


def _check_path(path, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


# --------------------------------------------------------------------------- the config entry


def quantization_config(
    weight_dtype: torch.dtype = torch.float8_e4m3fn, modules_to_not_convert: Sequence[str] = ()
) -> dict:
    """The ``quantization_config`` entry of config.json for weights stored in ``weight_dtype``."""
    if weight_dtype not in DTYPE_TO_FMT:
        raise ValueError(f"weight_dtype must be one of {', '.join(map(str, FMT_TO_DTYPE.values()))}, got {weight_dtype}")
    qc = {
        "quant_method": "fp8",
        "fmt": DTYPE_TO_FMT[weight_dtype],
        "activation_scheme": "dynamic",
        "weight_block_size": [WEIGHT_BLOCK, WEIGHT_BLOCK],
    }
    if modules_to_not_convert:
        qc["modules_to_not_convert"] = sorted(modules_to_not_convert)
    return qc


def _parse_quantization_config(qc, where: str) -> Optional[torch.dtype]:
    """Validate a ``quantization_config`` dict; return the weight dtype its ``fmt`` states (or None)."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise NotImplementedError(
            f"{where}: quant_method is {method!r}; only the blockwise FP8 format (quant_method 'fp8') can be loaded"
        )
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise NotImplementedError(
            f"{where}: activation_scheme is {scheme!r}; only 'dynamic' (activations quantized on the fly in "
            "1x128 blocks) is supported"
        )
    block = qc.get("weight_block_size")
    if block is None or list(block) != [WEIGHT_BLOCK, WEIGHT_BLOCK]:
        raise NotImplementedError(
            f"{where}: weight_block_size is {block!r}; only [{WEIGHT_BLOCK}, {WEIGHT_BLOCK}] blockwise checkpoints "
            "are supported (per-tensor FP8 checkpoints have no weight_block_size)"
        )
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt != "float":
        raise NotImplementedError(f"{where}: scale_fmt {scale_fmt!r} is not supported; only float32 scales ('float')")
    fmt = qc.get("fmt")
    if fmt is None:
        return None
    if fmt not in FMT_TO_DTYPE:
        raise CheckpointError(f"{where}: fmt must be one of {sorted(FMT_TO_DTYPE)}, got {fmt!r}")
    return FMT_TO_DTYPE[fmt]


# --------------------------------------------------------------------------- reading


@dataclass
class _Entry:
    file: Path
    shape: tuple
    dtype: Optional[torch.dtype]
    dtype_name: str


@dataclass
class _Checkpoint:
    entries: dict  # key -> _Entry
    config: Optional[dict]  # the whole config.json, when the checkpoint is a directory that has one
    root: Path


def _read_json_object(path: Path, error=CheckpointError) -> dict:
    """A JSON file that must hold an object; ``error`` (a ValueError) says what is wrong."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_index(index: Path) -> dict:
    data = _read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to shard files")
    return weight_map


def _open_checkpoint(path) -> _Checkpoint:
    """Find the safetensors files of ``path`` and read their headers (no tensor data)."""
    from safetensors import safe_open

    path = _check_path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} does not exist")
    config = None
    if path.is_dir():
        config_file = path / CONFIG_NAME
        if config_file.is_file():
            config = _read_json_object(config_file)
        if (path / INDEX_NAME).is_file():
            weight_map = _read_index(path / INDEX_NAME)
            files = sorted({path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{path / INDEX_NAME} names the shard {f.name}, which does not exist")
        elif (path / SAFETENSORS_NAME).is_file():
            weight_map, files = None, [path / SAFETENSORS_NAME]
        else:
            found = sorted(p.name for p in path.iterdir())[:10]
            raise FileNotFoundError(
                f"{path} holds neither {SAFETENSORS_NAME} nor {INDEX_NAME} (found: {found or 'nothing'}); "
                "a checkpoint is a directory with one of those, or a single .safetensors file"
            )
    else:
        weight_map, files = None, [path]
    entries = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e
        with handle:
            for key in handle.keys():
                if key in entries:
                    raise CheckpointError(f"tensor {key!r} is stored twice, in {entries[key].file.name} and {f.name}")
                s = handle.get_slice(key)
                name = s.get_dtype()
                entries[key] = _Entry(f, tuple(s.get_shape()), _ST_DTYPES.get(name), name)
    if weight_map is not None:
        for key, fname in weight_map.items():
            if key not in entries:
                raise CheckpointError(f"{path / INDEX_NAME} lists {key!r} in {fname}, but no shard holds it")
            if entries[key].file.name != Path(fname).name:
                raise CheckpointError(f"{path / INDEX_NAME} lists {key!r} in {fname}, but it is in {entries[key].file.name}")
    return _Checkpoint(entries, config, path)


@dataclass
class LoadResult:
    """What :func:`load_quantized` did (and, with ``strict=False``, what it could not match)."""

    quantized: list = field(default_factory=list)  # module names whose weight is now a BlockwiseFP8Tensor
    loaded: list = field(default_factory=list)  # other tensors loaded as they are
    missing_keys: list = field(default_factory=list)
    unexpected_keys: list = field(default_factory=list)
    weight_dtype: Optional[torch.dtype] = None


def _listing(title: str, items: list) -> str:
    head = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {head}{more}"


def _tie_groups(model: torch.nn.Module, names: Iterable[str]) -> dict:
    """name -> tuple of all state_dict names that are the same Parameter/buffer object."""
    by_id: dict = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    wanted = set(names)
    groups = {}
    for group in by_id.values():
        group = tuple(n for n in group if n in wanted)
        for n in group:
            groups[n] = group
    return groups


def _split(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def load_quantized(
    model: torch.nn.Module,
    path,
    *,
    activation_dtype: torch.dtype = torch.float8_e4m3fn,
    backend: str = "auto",
    device=None,
    strict: bool = True,
    _shard=None,
) -> LoadResult:
    """Load a DeepSeek/HF blockwise FP8 checkpoint into ``model``.

    Every ``<m>.weight`` stored with a ``<m>.weight_scale_inv`` becomes a
    :class:`BlockwiseFP8Tensor` weight of the ``nn.Linear`` ``<m>`` (its high-precision dtype is
    the one the model's weight had); every other tensor is loaded as it is, cast to the dtype of
    the model's tensor as ``load_state_dict`` does.

    Args:
        model: the model, in high precision, already quantized, or on the meta device.
        path: a directory with ``model.safetensors`` or ``model.safetensors.index.json`` (and
            optionally ``config.json`` with a ``quantization_config``), or one ``.safetensors`` file.
        activation_dtype: FP8 dtype of the activations of the quantized Linears.
        backend: the backend of the quantized Linears ("auto" | "triton" | "cublas" | "reference").
        device: where tensors of meta-device parameters go (default: CPU). Other tensors go to
            the device of the parameter they replace.
        strict: raise :class:`CheckpointError` for missing or unexpected keys (default). With
            ``strict=False`` they are returned in the result instead. Shape, dtype and format
            errors always raise.

    The whole checkpoint is checked against the model (from the safetensors headers only)
    before anything is loaded: on an error the model is left unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if activation_dtype not in ops.FP8_DTYPES:
        raise ValueError(f"activation_dtype must be one of {', '.join(map(str, ops.FP8_DTYPES))}, got {activation_dtype}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    device = None if device is None else torch.device(device)
    ckpt = _open_checkpoint(path)
    where = str(ckpt.root)

    fmt_dtype = None
    if ckpt.config is not None and "quantization_config" in ckpt.config:
        fmt_dtype = _parse_quantization_config(ckpt.config["quantization_config"], f"{where}/{CONFIG_NAME}")

    state = model.state_dict(keep_vars=True)
    ties = _tie_groups(model, state.keys())
    modules = dict(model.named_modules())
    problems: list[str] = []
    shape_errors: list[str] = []
    consumed: set = set()
    quantized: dict = {}  # module name -> (weight key, scale key)
    weight_dtypes: set = set()

    for key, e in ckpt.entries.items():
        if key.endswith("activation_scale") or key.endswith("input_scale"):
            raise NotImplementedError(
                f"{where}: {key!r} is a static activation scale; only dynamic activation quantization is supported"
            )
        if not key.endswith("." + SCALE_SUFFIX):
            continue
        prefix = key[: -len(SCALE_SUFFIX) - 1]
        wkey = prefix + ".weight"
        module = modules.get(prefix)
        if module is None or wkey not in state:
            continue  # reported as unexpected below
        if not isinstance(module, torch.nn.Linear):
            raise NotImplementedError(
                f"{where}: {key!r} quantizes the weight of {prefix!r}, a {type(module).__name__}; only nn.Linear "
                "weights can be loaded as BlockwiseFP8Tensors"
            )
        if wkey not in ckpt.entries:
            problems.append(f"{key!r} has no {wkey!r} beside it")
            continue
        w = ckpt.entries[wkey]
        if w.dtype not in ops.FP8_DTYPES:
            shape_errors.append(f"{wkey!r} is {w.dtype_name}, but a weight with a {SCALE_SUFFIX} must be F8_E4M3 or F8_E5M2")
            continue
        if e.dtype_name == "F8_E8M0":
            raise NotImplementedError(f"{where}: {key!r} holds UE8M0 (power of two) scales; only float32 scales are supported")
        if e.dtype != torch.float32:
            shape_errors.append(f"{key!r} is {e.dtype_name}; scales must be F32")
            continue
        expected_w = tuple(state[wkey].shape)
        if w.shape != expected_w:
            shape_errors.append(f"{wkey!r} has shape {w.shape}, the model's weight {expected_w}")
            continue
        if e.shape != _scale_shape(w.shape):
            shape_errors.append(
                f"{key!r} has shape {e.shape}, but a weight of shape {w.shape} in {WEIGHT_BLOCK}x{WEIGHT_BLOCK} "
                f"blocks needs {_scale_shape(w.shape)}"
            )
            continue
        weight_dtypes.add(w.dtype)
        quantized[prefix] = (wkey, key)
        consumed.update((wkey, key))

    if fmt_dtype is not None and weight_dtypes and weight_dtypes != {fmt_dtype}:
        raise CheckpointError(
            f"{where}/{CONFIG_NAME} states fmt {DTYPE_TO_FMT[fmt_dtype]!r}, but the quantized weights are "
            f"{', '.join(sorted(str(d) for d in weight_dtypes))}"
        )
    if len(weight_dtypes) > 1:
        raise CheckpointError(f"{where}: the quantized weights mix FP8 dtypes ({sorted(map(str, weight_dtypes))})")

    plain: dict = {}  # state name -> checkpoint key
    for key, e in ckpt.entries.items():
        if key in consumed or key not in state:
            continue
        if e.dtype in ops.FP8_DTYPES:
            shape_errors.append(f"{key!r} is stored in {e.dtype_name} without a {SCALE_SUFFIX} beside it")
            continue
        if e.dtype is None:
            shape_errors.append(f"{key!r} has dtype {e.dtype_name}, which this loader does not read")
            continue
        target = state[key]
        if e.shape != tuple(target.shape):
            shape_errors.append(f"{key!r} has shape {e.shape}, the model's tensor {tuple(target.shape)}")
            continue
        if e.dtype.is_floating_point != target.dtype.is_floating_point:
            shape_errors.append(f"{key!r} is {e.dtype_name}, the model's tensor {target.dtype}")
            continue
        plain[key] = key
        consumed.add(key)

    provided = set(consumed)
    missing = []
    for name in state:
        group = ties.get(name, (name,))
        if not any(n in provided for n in group):
            missing.append(name)
    unexpected = sorted(k for k in ckpt.entries if k not in consumed)
    # A tied duplicate stored twice is loaded once; its second copy is neither missing nor unexpected.
    if shape_errors or problems:
        raise CheckpointError(
            f"checkpoint {where} does not fit the model:\n  " + "\n  ".join((shape_errors + problems)[: 2 * _MAX_LISTED])
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        raise CheckpointError(f"checkpoint {where} does not match the model; " + "; ".join(parts))

    # ---- load: each tensor read from the memory map on its own, file by file
    import contextlib

    from safetensors import safe_open

    order: list = []
    for prefix, (wkey, skey) in quantized.items():
        order.append((str(ckpt.entries[wkey].file), "q", prefix, wkey, skey))
    for key in plain:
        order.append((str(ckpt.entries[key].file), "p", key, key, None))
    order.sort(key=lambda item: item[0])

    def target_device(t: torch.Tensor) -> torch.device:
        if t.is_meta:
            return device if device is not None else torch.device("cpu")
        return t.device

    done: set = set()
    with torch.no_grad(), contextlib.ExitStack() as stack:
        handles: dict = {}

        def read(key: str, index=None) -> torch.Tensor:
            f = str(ckpt.entries[key].file)
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="pt"))
            if index is None:
                return handles[f].get_tensor(key)
            return handles[f].get_slice(key)[index]

        # The hook of blockwise_fp8.distributed.load_sharded: ``_shard(name, old)`` returns None
        # (read the whole tensor) or (index, wrap): read only ``index`` (a tuple of slices, block
        # aligned for quantized weights) and store ``wrap(local tensor)`` (a DTensor).
        def shard_of(name: str, old: torch.Tensor):
            return (None, None) if _shard is None else (_shard(name, old) or (None, None))

        for _, kind, name, key, skey in order:
            if kind == "q":
                module = modules[name]
                old = module.weight
                dev = target_device(old)
                hp = old.dtype if old.dtype in HP_DTYPES else torch.bfloat16
                index, wrap = shard_of(key, old)
                sindex = None if index is None else tuple(
                    slice(s.start // WEIGHT_BLOCK, _cdiv(s.stop, WEIGHT_BLOCK)) for s in index
                )
                t = BlockwiseFP8Tensor(
                    read(key, index).to(dev), read(skey, sindex).to(dev), (WEIGHT_BLOCK, WEIGHT_BLOCK),
                    activation_dtype=activation_dtype, backend=backend, hp_dtype=hp,
                )
                if wrap is not None:
                    t = wrap(t)
                module.weight = torch.nn.Parameter(t, requires_grad=False)
                show_quantization_in_repr(module)
                continue
            if name in done:
                continue
            old = state[name]
            index, wrap = shard_of(name, old)
            value = read(key, index).to(device=target_device(old), dtype=old.dtype)
            if wrap is not None:
                value = wrap(value)
            is_param = isinstance(old, torch.nn.Parameter)
            new = torch.nn.Parameter(value, requires_grad=old.requires_grad) if is_param else value
            for n in ties.get(name, (name,)):
                prefix, leaf = _split(n)
                owner = modules[prefix]
                if is_param:
                    owner._parameters[leaf] = new
                else:
                    owner._buffers[leaf] = new
                done.add(n)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        warnings.warn(
            f"after loading {where}, {len(still_meta)} tensors of the model are still on the meta device "
            f"({', '.join(still_meta[:_MAX_LISTED])}): they are not in the checkpoint (non-persistent buffers such "
            "as rotary tables are computed at construction). Build the model with parameters only on meta, e.g. "
            "accelerate's init_empty_weights(include_buffers=False).",
            stacklevel=2,
        )
    return LoadResult(
        quantized=sorted(quantized), loaded=sorted(plain), missing_keys=missing, unexpected_keys=unexpected,
        weight_dtype=next(iter(weight_dtypes)) if weight_dtypes else None,
    )


# --------------------------------------------------------------------------- writing


def _parse_size(size) -> int:
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be an int (bytes) or a string such as '5GB', got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*", size, re.IGNORECASE)
        if m:
            units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                     "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
            value = int(float(m.group(1)) * units[(m.group(2) or "B").lower()])
            if value > 0:
                return value
        raise ValueError(f"max_shard_size must look like '5GB', '500MB' or a byte count, got {size!r}")
    raise TypeError(f"max_shard_size must be an int (bytes) or a string such as '5GB', got {type(size).__name__}")


def _prepare_destination(path, overwrite: bool) -> Path:
    path = _check_path(path).absolute()
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: the directory {parent} is not writable")
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"cannot write a checkpoint to {path}: it exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return path


class _Writer:
    """Builds a checkpoint in a temporary directory beside ``dst``, then renames it into place."""

    def __init__(self, dst: Path, max_shard_size: int, overwrite: bool):
        self.dst = dst
        self.max_shard_size = max_shard_size
        self.overwrite = overwrite
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        self.pending: dict = {}
        self.pending_bytes = 0
        self.parts: list = []  # (temporary file name, keys)
        self.total_size = 0
        self.keys: set = set()

    def add(self, key: str, t: torch.Tensor) -> None:
        if key in self.keys:
            raise ValueError(f"tensor {key!r} would be written twice")
        self.keys.add(key)
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_size:
            self.flush()
        self.pending[key] = t
        self.pending_bytes += size
        self.total_size += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.parts) + 1:05d}.safetensors"
        # safetensors refuses tensors sharing memory; views of one storage get their own copy.
        seen, tensors = set(), {}
        for k, t in self.pending.items():
            ptr = t.untyped_storage().data_ptr()
            tensors[k] = t.clone() if ptr in seen and t.numel() else t
            seen.add(ptr)
        save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        self.parts.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def copy_file(self, src: Path) -> None:
        shutil.copy2(src, self.tmp / src.name)

    def finish(self, config: dict) -> Path:
        self.flush()
        if not self.parts:
            raise ValueError("nothing to write: the checkpoint would hold no tensors")
        n = len(self.parts)
        if n == 1:
            os.rename(self.tmp / self.parts[0][0], self.tmp / SAFETENSORS_NAME)
        else:
            weight_map = {}
            for i, (name, keys) in enumerate(self.parts, 1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.rename(self.tmp / name, self.tmp / final)
                weight_map.update({k: final for k in keys})
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        # config.json last: a directory holding it has all its tensors.
        (self.tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if self.dst.exists():
            if any(self.dst.iterdir()) and not self.overwrite:
                raise FileExistsError(f"{self.dst} appeared while writing and is not empty; not replacing it")
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(self.dst, old)
            os.rename(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.dst)
        return self.dst

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _model_config_dict(model: torch.nn.Module, config) -> dict:
    if config is not None:
        if hasattr(config, "to_json_string"):
            return json.loads(config.to_json_string(use_diff=False))
        if isinstance(config, dict):
            return json.loads(json.dumps(config, default=str))
        raise TypeError(f"config must be a dict or a transformers PretrainedConfig, got {type(config).__name__}")
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        out = json.loads(cfg.to_json_string(use_diff=False))
        # What transformers' save_pretrained fills in: the class to build and the compute dtype.
        if not out.get("architectures"):
            out["architectures"] = [type(model).__name__]
        return out
    return {}


def save_quantized(
    model: torch.nn.Module,
    path,
    *,
    config=None,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write a model quantized with ``BlockwiseFP8Config`` as a DeepSeek/HF FP8 checkpoint.

    Every ``BlockwiseFP8Tensor`` weight ``<m>.weight`` is written as its FP8 ``qdata`` and
    ``<m>.weight_scale_inv`` (its float32 ``scale``); every other tensor of ``model.state_dict()``
    as it is. A tensor tied to an earlier one (``lm_head`` tied to the embeddings) is written once,
    under its first name. ``config.json`` is the model's Hugging Face config (or ``config``, a
    dict or ``PretrainedConfig``; or just the quantization entry for a plain module) with
    ``quantization_config`` set: ``fmt`` says the weight dtype (e4m3 or e5m2), and
    ``modules_to_not_convert`` lists the ``nn.Linear`` modules left in high precision.

    Above ``max_shard_size`` (bytes, or a string like "5GB") the tensors go to
    ``model-0000i-of-0000n.safetensors`` shards with a ``model.safetensors.index.json``.
    The checkpoint is built in a temporary directory beside ``path`` and renamed into place at the
    end, so ``path`` never holds a partial checkpoint. Returns ``path``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    max_shard_size = _parse_size(max_shard_size)
    dst = _prepare_destination(path, overwrite)
    cfg = _model_config_dict(model, config)

    state = model.state_dict()
    weight_dtypes, not_converted, items, seen = set(), [], [], {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not isinstance(module.weight, BlockwiseFP8Tensor):
            not_converted.append(name)
    for key, t in state.items():
        if t.is_meta:
            raise ValueError(f"{key!r} is on the meta device and has no values to save")
        if isinstance(t, BlockwiseFP8Tensor):
            prefix = key[: -len(".weight")] if key.endswith(".weight") else None
            if prefix is None:
                raise NotImplementedError(f"{key!r} is a BlockwiseFP8Tensor that is not a module's 'weight'; the format cannot name its scale")
            ident = ("q", t.qdata.untyped_storage().data_ptr(), t.qdata.storage_offset(), tuple(t.shape))
            if ident in seen:
                continue
            seen[ident] = key
            weight_dtypes.add(t.qdata.dtype)
            items.append((key, t.qdata))
            items.append((f"{prefix}.{SCALE_SUFFIX}", t.scale))
            continue
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            raise NotImplementedError(
                f"{key!r} is a {type(t).__name__}; only BlockwiseFP8Tensor weights and plain tensors can be saved in this format"
            )
        ident = ("t", t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied to an earlier tensor: written once
        seen[ident] = key
        items.append((key, t))
    if not weight_dtypes:
        raise ValueError(
            "the model has no BlockwiseFP8Tensor weights; quantize it first with "
            "quantize_(model, BlockwiseFP8Config())"
        )
    if len(weight_dtypes) > 1:
        raise ValueError(
            f"the quantized weights mix FP8 dtypes ({', '.join(sorted(map(str, weight_dtypes)))}); the format states "
            "one fmt for the whole checkpoint"
        )
    for key, t in items:
        if key.endswith(".weight") and t.dtype in ops.FP8_DTYPES and (t.shape[0] % WEIGHT_BLOCK or t.shape[1] % WEIGHT_BLOCK):
            warnings.warn(
                f"{key!r} has shape {tuple(t.shape)}, not a multiple of {WEIGHT_BLOCK}: its partial last blocks follow "
                "the DeepSeek convention (scales of shape ceil(N/128) x ceil(K/128)), which vLLM, SGLang and our loader "
                "read, but transformers' CPU dequantizing loader does not",
                PartialBlockWarning,
                stacklevel=2,
            )
            break
    cfg["quantization_config"] = quantization_config(next(iter(weight_dtypes)), not_converted)
    if "dtype" in cfg and cfg["dtype"] is None:
        hp = next(t.dtype for t in state.values() if isinstance(t, BlockwiseFP8Tensor))
        cfg["dtype"] = str(hp).replace("torch.", "")

    writer = _Writer(dst, max_shard_size, overwrite)
    try:
        for key, t in items:
            writer.add(key, t)
        return writer.finish(cfg)
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------- converting


def skip_filter(patterns: Sequence[str] = DEFAULT_SKIP) -> Callable[[torch.nn.Module, str], bool]:
    """A ``filter_fn`` for ``quantize_``: every ``nn.Linear`` except those whose name matches a
    pattern (a regular expression searched in the module's fully qualified name).

        quantize_(model, BlockwiseFP8Config(), filter_fn=skip_filter())   # lm_head stays bf16
    """
    compiled = compile_skip_patterns(patterns)

    def filter_fn(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not any(p.search(fqn) for p in compiled)

    return filter_fn


def _linear_names_from_config(config: dict, where: Path) -> set:
    """Names of the ``nn.Linear`` modules of the transformers model that ``config`` describes,
    built on the meta device (no memory, no download)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "converting a Hugging Face model directory needs transformers to know which weights are nn.Linear "
            "layers: pip install transformers"
        ) from e
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(where), local_files_only=True)
    except Exception as e:
        raise ValueError(f"transformers cannot read {where / CONFIG_NAME}: {e}") from e
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
        build = lambda: cls.from_config(hf_config)  # noqa: E731
    else:
        build = lambda: cls(hf_config)  # noqa: E731
    try:
        with torch.device("meta"):
            model = build()
    except Exception as e:
        raise ValueError(
            f"transformers cannot build the model of {where / CONFIG_NAME} (architectures {archs}): {e}"
        ) from e
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


class _Progress:
    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.stream, self.enabled = total, 0, stream or sys.stderr, enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.last = -1.0

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and self.done != self.total and now - self.last < 2.0:
            return
        self.last = now
        width = 30
        fill = int(width * self.done / max(self.total, 1))
        line = f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {now - self.start:5.1f}s {what}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:150])
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@dataclass
class ConvertResult:
    path: Path
    quantized: list
    kept: list  # 2-D floating weights of Linears left in high precision (skipped)
    not_linear: list  # 2-D floating ".weight"s that are not nn.Linear weights in transformers' model
    total_size: int


_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def quantize_checkpoint(
    src,
    dst,
    *,
    weight_dtype: torch.dtype = torch.float8_e4m3fn,
    skip: Sequence[str] = (),
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    device=None,
    progress: bool = True,
    linear_names: Optional[set] = None,
) -> ConvertResult:
    """Convert a local Hugging Face model directory (safetensors) into a blockwise FP8 checkpoint.

    Tensor by tensor: each is read through safetensors' memory map, quantized if it is the
    weight of an ``nn.Linear`` (found by building the transformers model of ``config.json`` on
    the meta device) not matched by ``DEFAULT_SKIP`` + ``skip``, and written to the current
    output shard; memory holds at most one output shard and one source tensor. Other files of
    ``src`` (tokenizer, generation config) are copied. ``config.json`` gets the
    ``quantization_config`` entry.

    ``device`` is where the quantization runs (default: CUDA if available, else CPU).
    ``linear_names`` overrides the set of nn.Linear module names (for models transformers
    cannot build).
    """
    from safetensors import safe_open

    if weight_dtype not in DTYPE_TO_FMT:
        raise ValueError(f"weight_dtype must be one of {', '.join(map(str, FMT_TO_DTYPE.values()))}, got {weight_dtype}")
    src = _check_path(src, "src")
    if not src.exists():
        raise FileNotFoundError(f"source model directory {src} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"source {src} is not a directory; expected a Hugging Face model directory")
    config_file = src / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{src} has no {CONFIG_NAME}; expected a Hugging Face model directory")
    config = _read_json_object(config_file, ValueError)
    if "quantization_config" in config:
        raise ValueError(
            f"{src} is already quantized (its config.json has a quantization_config: {config['quantization_config']}); "
            "convert a high-precision model"
        )
    if not (src / SAFETENSORS_NAME).is_file() and not (src / INDEX_NAME).is_file():
        others = sorted(p.name for p in src.iterdir() if p.suffix in _WEIGHT_FILE_SUFFIXES)
        raise FileNotFoundError(
            f"{src} has neither {SAFETENSORS_NAME} nor {INDEX_NAME}"
            + (f" (it has {others}: only safetensors weights are read)" if others else "")
        )
    patterns = compile_skip_patterns(list(DEFAULT_SKIP) + list(skip))
    max_shard_size = _parse_size(max_shard_size)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    dst = _check_path(dst, "dst").absolute()
    if dst == src.absolute():
        raise ValueError("dst must differ from src")
    dst = _prepare_destination(dst, overwrite)

    ckpt = _open_checkpoint(src)
    for key, e in ckpt.entries.items():
        if e.dtype in ops.FP8_DTYPES or key.endswith(SCALE_SUFFIX):
            raise ValueError(f"{src} already holds FP8 tensors ({key!r} is {e.dtype_name}); convert a high-precision model")
    if linear_names is None:
        linear_names = _linear_names_from_config(config, src)

    plan = []  # (key, action)
    quantized, kept, not_linear = [], [], []
    for key, e in ckpt.entries.items():
        prefix, leaf = _split(key)
        is_hp_matrix = len(e.shape) == 2 and e.dtype in HP_DTYPES
        if leaf == "weight" and is_hp_matrix and prefix in linear_names:
            if any(p.search(prefix) for p in patterns):
                kept.append(prefix)
                plan.append((key, "copy"))
            else:
                quantized.append(prefix)
                plan.append((key, "quantize"))
        else:
            if leaf == "weight" and is_hp_matrix and "embed" not in prefix:
                not_linear.append(key)
            plan.append((key, "copy"))
    if not quantized:
        raise ValueError(
            f"no nn.Linear weight of {src} is left to quantize (skip patterns {[p.pattern for p in patterns]}, "
            f"{len(kept)} Linear weights skipped)"
        )
    not_converted = sorted(set(linear_names) - set(quantized))

    writer = _Writer(dst, max_shard_size, overwrite)
    bar = _Progress(len(plan), enabled=progress)
    try:
        by_file: dict = {}
        for key, action in plan:
            by_file.setdefault(ckpt.entries[key].file, []).append((key, action))
        for f in sorted(by_file):
            with safe_open(str(f), framework="pt") as handle:
                for key, action in by_file[f]:
                    t = handle.get_tensor(key)
                    if action == "quantize":
                        try:
                            q, s = ops.quantize_weight(t.to(device), weight_dtype, WEIGHT_BLOCK)
                        except ValueError as err:
                            raise ValueError(f"cannot quantize {key!r}: {err}") from err
                        writer.add(key, q)
                        writer.add(key[: -len("weight")] + SCALE_SUFFIX, s)
                    else:
                        writer.add(key, t)
                    del t
                    bar.step(key)
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name not in (CONFIG_NAME, INDEX_NAME) and p.suffix not in _WEIGHT_FILE_SUFFIXES:
                writer.copy_file(p)
        config = dict(config)
        config["quantization_config"] = quantization_config(weight_dtype, not_converted)
        out = writer.finish(config)
    except BaseException:
        writer.abort()
        raise
    return ConvertResult(out, quantized, kept, not_linear, writer.total_size)
