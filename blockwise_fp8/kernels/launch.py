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

Kernels registered with :func:`prefer_l1` also get, once per compiled kernel, the smallest
shared-memory configuration that fits them instead of Triton's largest (see there).
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

import torch
import triton

# Triton decides at import whether its kernels run in the interpreter (``TRITON_INTERPRET``);
# ours are jitted when this package imports, so the same reading holds for them.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Compile options every launch asks for, whatever the environment says. enable_fp_fusion: FMA
# contraction of a * b + c, Triton's default through 3.9 (TRITON_DEFAULT_FP_FUSION); 3.9 warns that
# 3.10 turns the default off. Every kernel here was tuned and timed with it on: without it, under
# 3.9, the gemv's 72 FFMAs become separate multiplies and adds (benchmarks/sass_of_launch.py,
# session 29), so ask for it rather than inherit a changed default.
COMPILE_OPTIONS = (("enable_fp_fusion", True),)

# (kernel, device, meta, argument key) -> (compiled kernel, values of the parameters after the
# positional arguments, in order: the constexprs, defaults applied)
_COMPILED: dict = {}
# New M values make new keys (prefill lengths vary); past this many the table starts over.
_MAX_ENTRIES = 4096


# Kernels (by id) that run with the largest L1 their shared memory leaves (prefer_l1).
_PREFER_L1: set = set()
_CARVEOUT_ATTRIBUTE = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
_CACHE_PREFER_L1 = 2  # CU_FUNC_CACHE_PREFER_L1
_LIBCUDA: list = []
_L1_SET: set = set()  # compiled kernels (CUfunction handles) already asked


def prefer_l1(kernel):
    """Register ``kernel`` to run with the smallest shared-memory carveout that fits it.

    Why: Triton's loader asks every kernel of more than 48 KB of shared memory for the largest
    carveout (CU_FUNC_CACHE_PREFER_SHARED): 233 KB on an H100, which leaves 23 KB of L1. The ws
    GEMM needs 164 KB; asked for the smallest carveout, the driver gives it 168 KB and 88 KB of L1,
    which holds the rows of activation scales its consumers read every K step (a 128-byte line
    holds 32 K blocks of a row). With 23 KB they missed L1, and the kernel is bound by L2
    throughput (ncu, H100, 8192^3, 192-row tiles: 81% of it either way, L2 traffic 8.3 -> 7.7 GB,
    1.04 -> 0.97 ms; cuBLAS moves 5.9 GB). Timed on an H100: 192-row tiles 5-7% faster (8192^3
    e5m2 1126.8 -> 1073.3 us), 128-row tiles 0-2% (benchmarks/results/carveout-probe-h100-2026-11-27-s14.txt).
    Only for kernels that run one program per SM (a persistent grid): a carveout sized to one
    program leaves no room for a second, which is why the gemv and skinny kernels, which count
    on several per SM, measured 9-14% slower with it and keep Triton's setting. Returns ``kernel``."""
    _PREFER_L1.add(id(kernel))
    return kernel


def _libcuda():
    if not _LIBCUDA:
        _LIBCUDA.append(ctypes.CDLL("libcuda.so.1"))
    return _LIBCUDA[0]


def _set_prefer_l1(function) -> None:
    """Ask the driver for the smallest carveout that fits the compiled ``function`` (a CUfunction
    handle); a hint the driver may round up. Where it cannot be set the kernel still runs, with
    Triton's carveout, and a warning says so."""
    try:
        lib = _libcuda()
        handle = ctypes.c_void_p(function)
        err = lib.cuFuncSetCacheConfig(handle, ctypes.c_int(_CACHE_PREFER_L1)) or lib.cuFuncSetAttribute(
            handle, ctypes.c_int(_CARVEOUT_ATTRIBUTE), ctypes.c_int(0)
        )
        why = f"CUDA error {err}"
    except (OSError, AttributeError, TypeError) as e:
        err, why = 1, f"{type(e).__name__}: {e}"
    if err:
        warnings.warn(
            f"blockwise_fp8: could not set the L1 carveout of a GEMM kernel ({why}); it runs with "
            "Triton's default (the largest shared-memory carveout), ~5% slower at large M",
            RuntimeWarning,
            stacklevel=3,
        )


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


# Launches being recorded on this thread (blockwise_fp8.replay): a list while a recording is on.
_RECORDING = threading.local()


def persistent(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as a buffer that outlives the calls launching kernels on it (the split-K arrival
    counters): a recorded call then keeps it by reference instead of refusing to be replayed.
    Returns ``t``."""
    t._blockwise_fp8_persistent = True
    return t


def is_persistent(t: torch.Tensor) -> bool:
    return getattr(t, "_blockwise_fp8_persistent", False)


def start_recording() -> list:
    """Record this thread's launches from now on, into the list returned: per launch ``("launch",
    kernel, grid, args, meta, compiled, tail, allocator)`` (``compiled`` and ``tail`` None where no
    compiled kernel and its trailing parameters are known: the interpreter, a launch hook;
    ``allocator`` that of its global scratch, see _scratch_allocator)."""
    launches: list = []
    _RECORDING.launches = launches
    return launches


def stop_recording() -> None:
    _RECORDING.launches = None


def launch(kernel, grid: tuple, args: tuple, meta: tuple):
    """``kernel[grid](*args, **dict(meta))``: ``args`` are the kernel's leading parameters in order
    (pointers, sizes, strides; no None: pass a placeholder tensor), ``meta`` its constexprs and
    launch options as (name, value) pairs (hashable; build it once per configuration). Returns
    the compiled kernel it launched (None under the interpreter)."""
    recording = getattr(_RECORDING, "launches", None)
    if recording is None:
        return _launch(kernel, grid, args, meta)[0]
    # a recording runs under a TorchDispatchMode that watches for torch ops; what a launch does
    # itself (the interpreter's copies, Triton's scratch allocations) is the launch's own business
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        compiled, tail = _launch(kernel, grid, args, meta)
    recording.append(("launch", kernel, grid, args, meta, compiled, tail, _scratch_allocator(compiled)))
    return compiled


def _scratch_allocator(compiled):
    """The allocator a compiled kernel's launches take global scratch from (device-side tensor
    descriptors), None where it takes none. Triton reads it from a context variable at each
    launch, which a replay on another thread would find unset."""
    if compiled is None or not getattr(compiled.run, "global_scratch_size", 0):
        return None
    from triton.runtime import _allocation

    return _allocation._allocator.get()


def _launch(kernel, grid: tuple, args: tuple, meta: tuple):
    """launch(); returns (compiled kernel, values of its parameters after ``args``), either None
    where unknown."""
    if INTERPRETING:
        kernel[grid](*args, **dict(meta))
        return None, None
    device = _current_device()
    # id(kernel): our kernels live as long as the process, and a JITFunction's own hash
    # recomputes its source hash under a lock
    key = (id(kernel), device, meta, _argument_key(args))
    entry = _COMPILED.get(key)
    hooked = _hooks_installed()
    if entry is None or hooked:
        options = dict(meta + COMPILE_OPTIONS)
        compiled = kernel[grid](*args, **options)
        if entry is None and hasattr(compiled, "packed_metadata"):
            binder = kernel.device_caches[device][-1]
            bound = binder(*args, **options)[0]
            if len(_COMPILED) >= _MAX_ENTRIES:
                _COMPILED.clear()
            _COMPILED[key] = entry = (compiled, tuple(bound.values())[len(args):])
            if id(kernel) in _PREFER_L1 and compiled.function not in _L1_SET:
                _L1_SET.add(compiled.function)  # one compiled kernel serves keys of many M
                _set_prefer_l1(compiled.function)
        # where a hook saw this launch, a replay would bypass it: no tail, so none is made
        return (compiled, None) if hooked or entry is None else entry
    compiled, tail = entry
    _run_compiled(compiled, tail, grid, args, device)
    return entry


def _run_compiled(compiled, tail: tuple, grid: tuple, args, device: int) -> None:
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = _current_stream(device)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


def relaunch(kernel, grid: tuple, args, meta: tuple, compiled, tail: tuple, allocator) -> None:
    """Launch again what :func:`launch` recorded, on new ``args`` (same kinds, same specialization:
    the caller's key guarantees it), without looking anything up."""
    if INTERPRETING:
        kernel[grid](*args, **dict(meta))
        return
    if allocator is not None:
        triton.set_allocator(allocator)
    _run_compiled(compiled, tail, grid, args, _current_device())
