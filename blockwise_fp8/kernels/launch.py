"""Launching our Triton kernels without Triton's per-call argument binding.

Why: ``kernel[grid](*args, **meta)`` runs Triton's ``JITFunction.run`` on every call: it binds and
specializes each argument (30-60 for our GEMMs), builds the kernel-cache key from them and the
keywords, then calls the compiled kernel's launcher. On the H100 machine's host that cost 36-56 us
of Python per launch (Triton 3.6, ``devrun`` probe, session 12), against 8-18 us for the launcher
itself; an eager ``linear`` makes two launches, and a compiled prefill without CUDA graphs makes
dozens per layer, so this was most of why those were host-bound.

:func:`launch` does the same launch. The first call of a kernel with a given *specialization key*
goes through ``kernel[grid]`` (compiling if needed) and remembers the compiled kernel it returns;
later calls with the same key call that compiled kernel's launcher directly, as Triton's run()
itself ends by doing. The key holds everything Triton specializes a compilation on: the constexpr
and launch keywords (``meta``), each integer argument's value, each tensor argument's dtype and
16-byte alignment, and the current device. A call that differs in any of them is a new key, so
it cannot reach a kernel compiled for other arguments.

Kept on Triton's own path: the interpreter (no compiled kernels), and any launch while a launch
hook is installed (Triton's profiler, proton, sees every launch as before).
"""

from __future__ import annotations

import os

import torch
import triton

# Triton decides at import whether its kernels run in the interpreter (``TRITON_INTERPRET``);
# ours are jitted when this package imports, so the same reading holds for them.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (kernel, device, meta, argument key) -> (compiled kernel, values of the parameters after the
# positional arguments, in order: the constexprs, defaults applied)
_COMPILED: dict = {}
# New M values make new keys (prefill lengths vary); past this many the table starts over.
_MAX_ENTRIES = 4096


def _argument_key(args: tuple) -> tuple:
    """What Triton specializes on in each positional argument: an int's value (1, divisibility by
    16, 32/64-bit), a tensor's dtype and 16-byte alignment (keyed finer: the address mod 16), a
    tensor descriptor's block; any other argument by its type and value."""
    key = []
    append = key.append
    for a in args:
        kind = type(a)
        if kind is int:
            append(a)
        elif kind is torch.Tensor or isinstance(a, torch.Tensor):
            append(a.dtype)
            append(a.data_ptr() & 15)
        elif hasattr(a, "block_shape"):  # host-side tensor descriptors (Triton's and Gluon's)
            append((kind, a.base.dtype, tuple(a.block_shape), getattr(a, "layout", None), getattr(a, "padding", None)))
        else:
            append((kind, a))
    return tuple(key)


def _current_device() -> int:
    return torch.cuda.current_device()  # what Triton's CUDA driver reports


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _hooks_installed() -> bool:
    runtime = triton.knobs.runtime
    return bool(getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)) or bool(
        getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook)
    )


def launch(kernel, grid: tuple, args: tuple, meta: tuple) -> None:
    """``kernel[grid](*args, **dict(meta))``: ``args`` are the kernel's leading parameters in order
    (pointers, sizes, strides; no None: pass a placeholder tensor), ``meta`` its constexprs and
    launch options as (name, value) pairs (hashable; build it once per configuration)."""
    if INTERPRETING:
        kernel[grid](*args, **dict(meta))
        return
    device = _current_device()
    # id(kernel): our kernels live as long as the process, and a JITFunction's own hash
    # recomputes its source hash under a lock
    key = (id(kernel), device, meta, _argument_key(args))
    entry = _COMPILED.get(key)
    if entry is None or _hooks_installed():
        compiled = kernel[grid](*args, **dict(meta))
        if entry is None and hasattr(compiled, "packed_metadata"):
            binder = kernel.device_caches[device][-1]
            bound = binder(*args, **dict(meta))[0]
            if len(_COMPILED) >= _MAX_ENTRIES:
                _COMPILED.clear()
            _COMPILED[key] = (compiled, tuple(bound.values())[len(args):])
        return
    compiled, tail = entry
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = _current_stream(device)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
