"""Eager calls replayed from a recording of their kernel launches.

Why: an eager ``linear`` of ours spends most of its host time in Python deciding what to launch
(checks, the backend table, the kernel's plan, its grid and constexprs), the same way on every
call of one shape: 66-135 us a call on an H200 machine's host against 17-19 for bf16 ``F.linear``
(``benchmarks/results/quant-negdiv-h200-2026-11-28-s40/ab-eager-host-rerun.txt``), so an eager
decode step is bound by it. The decisions depend only on what the call's key holds (shapes,
strides, dtypes, devices, 16-byte alignment, the stream, the backend); the launches they lead
to can be recorded once and replayed.

How: :func:`call` runs the call normally, recording what it did: every kernel launch
(``kernels.launch``, with its compiled kernel and arguments) and every torch op, seen by a
TorchDispatchMode. The recording becomes a plan of instructions: allocate like the call did,
rebuild views, call the other torch ops again (cuBLAS's GEMM, copies), launch the same compiled
kernels again, each on the new call's tensors; a tensor an op or a launch takes must be an input,
an allocation or an op's output (or a view of one; also as the base of a host-made tensor
descriptor), or a buffer marked ``launch.persistent``. Refused: an op whose result is not tensors
(``.item()``, ``torch.equal``: a value may steer the Python around it), any other argument tied to
the call, inputs sharing a storage, a launch hook. A key's first call runs unrecorded (a shape
seen once pays no recording); a plan is kept only once two consecutive calls of one key recorded
the same plan: a call may differ from later ones (the first of a shape loads kernels for a later
CUDA-graph capture, ``ops._quantize_inside``, ``gemm._skinny_descriptors``), and this way no such
rule has to be known here. After three recordings without a plan the key runs normally for good.

The caller decides which calls may be replayed at all (``ops._eager_key``): plain tensors, no
autograd, nothing that intercepts ops (tracing, compiling, modes, the profiler), not capturing a
CUDA graph. A launch hook installed later (Triton's profiler) sends calls back to the normal path.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Torch ops that a plan does not repeat as they came: allocations (replayed as new uninitialized
# tensors of the same size and strides) and views (rebuilt by as_strided from the storage they
# view). Every other op becomes a step of the plan, called again on the new tensors; an op whose
# result is not tensors (``.item()``, ``torch.equal``) may steer the Python that called it, so a
# call running one is not replayed.
_ALLOCATIONS = frozenset((aten.empty.memory_format, aten.empty_strided.default))
_VIEWS = frozenset((
    aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int, aten.slice.Tensor,
    aten.as_strided.default, aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.select.int,
    aten.permute.default, aten.expand.default, aten.unflatten.int, aten.detach.default,
))
# Argument types an op step keeps as constants (besides tensors, and lists and tuples of these).
_CONSTANTS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)

# Calls of one key recorded this many times without giving a plan run normally from then on.
MAX_TRIES = 3
# Keys remembered (plans, and keys on trial or given up); past this many the table starts over.
MAX_KEYS = 4096

_NEVER = object()  # a key given up on
_PLANS: dict = {}  # key -> Plan, _NEVER, _SEEN, or (signature of the last recording, recordings so far)
_LOCAL = threading.local()


def watching() -> bool:
    """Whether this thread is recording a call (its TorchDispatchMode is on the stack)."""
    return getattr(_LOCAL, "on", False)


def clear() -> None:
    """Forget every plan (they hold compiled kernels and persistent buffers, not call tensors)."""
    _PLANS.clear()


class _Watch(TorchDispatchMode):
    """Adds the torch ops of a call, in order, to ``steps`` (where its launches go too), and keeps
    the tensors it allocates; notes the first op a plan could not repeat."""

    def __init__(self, steps: list):
        super().__init__()
        self.steps = steps
        self.allocations: list = []
        self.refused = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _ALLOCATIONS:
            self.allocations.append(out)
        elif func not in _VIEWS:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if all(isinstance(o, torch.Tensor) for o in outs):
                self.steps.append(("op", func, args, kwargs, tuple(outs)))
            elif self.refused is None:
                self.refused = func
        return out


class Plan:
    """One call as a list of instructions, replayed on new inputs by :meth:`run`. Each instruction
    may add tensors to the call's slots (the inputs come first):
        ("alloc", size, stride, dtype, device)        adds a new uninitialized tensor
        ("view", slot, size, stride, offset)          adds a view of a slot (offset from its own)
        ("op", func, args, fills, kwargs, kwfills)    calls a torch op, adds its outputs
        ("launch", kernel, grid, args, fills, descriptors, meta, compiled, tail, allocator)
                                                      launches a compiled kernel
    where ``args`` hold the constants and ``fills`` say which positions take which slot;
    ``descriptors`` (position, slot, class, fields) rebuild host-made tensor descriptors."""

    __slots__ = ("steps", "out")

    def __init__(self, steps: tuple, out: int):
        self.steps = steps
        self.out = out  # the slot returned

    def signature(self) -> tuple:
        """What two recordings must share for a plan to be kept (tensors kept as constants, the
        persistent buffers, by identity)."""
        return tuple(tuple(id(v) if isinstance(v, torch.Tensor) or callable(v) and not isinstance(v, type) else v
                           for v in step) for step in self.steps) + (self.out,)

    def run(self, inputs: tuple):
        relaunch = _launch_module().relaunch
        slots = list(inputs)
        for step in self.steps:
            kind = step[0]
            if kind == "launch":
                _, kernel, grid, template, fills, descriptors, meta, compiled, tail, allocator = step
                args = list(template)
                for position, slot in fills:
                    args[position] = slots[slot]
                for position, slot, cls, fields in descriptors:
                    # the recorded descriptor passed its checks (alignment, strides, block shape);
                    # this base has the same shape, strides and alignment (the key): not rerun
                    d = cls.__new__(cls)
                    d.__dict__.update(fields)
                    d.base = slots[slot]
                    args[position] = d
                relaunch(kernel, grid, args, meta, compiled, tail, allocator)
            elif kind == "alloc":
                slots.append(torch.empty_strided(step[1], step[2], dtype=step[3], device=step[4]))
            elif kind == "view":
                viewed = slots[step[1]]
                slots.append(viewed.as_strided(step[2], step[3], viewed.storage_offset() + step[4]))
            else:
                _, func, template, fills, kw_template, kw_fills = step
                args, kwargs = _filled(template, fills, slots), _filled(kw_template, kw_fills, slots)
                out = func(*args, **kwargs)
                slots.extend(out if isinstance(out, (tuple, list)) else (out,))
        return slots[self.out]


def _filled(template, fills, slots):
    """``template`` (a list, or a dict of keywords) with each fill's slot (or list of slots) put in."""
    if not fills:
        return template
    filled = template.copy()
    for position, slot in fills:
        filled[position] = [slots[s] for s in slot] if isinstance(slot, tuple) else slots[slot]
    return filled


_LAUNCH: list = []


def _launch_module():
    """kernels.launch, imported on first use (it imports Triton; this module must not)."""
    if not _LAUNCH:
        from .kernels import launch

        _LAUNCH.append(launch)
    return _LAUNCH[0]


def _is_descriptor(a) -> bool:
    """A host-side tensor descriptor: a dataclass over a ``base`` tensor and plain fields."""
    return (dataclasses.is_dataclass(a) and not isinstance(a, type) and isinstance(getattr(a, "base", None), torch.Tensor)
            and set(vars(a)) == {f.name for f in dataclasses.fields(a)})


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Refused(Exception):
    """A recorded call that a plan cannot stand for."""


def _make_plan(inputs: tuple, out, watch: _Watch, interpreting: bool):
    """The Plan of a recorded call, or None where it cannot be replayed."""
    try:
        return _PlanBuilder(inputs, watch, interpreting).build(out)
    except _Refused:
        return None


class _PlanBuilder:
    """Turns a recording into instructions. Each tensor a step takes (or the call returns) is
    matched to what owns its storage: an input, a tensor the call allocated, or the output of an
    op step before it. (By storage, not identity: a factory call under a TorchDispatchMode hands
    back an alias of what the mode saw.)"""

    def __init__(self, inputs: tuple, watch: _Watch, interpreting: bool):
        self.watch, self.interpreting = watch, interpreting
        self.is_persistent = _launch_module().is_persistent
        self.bases = list(inputs)  # slot -> the recorded tensor it stands for
        self.owners = {}  # (storage address, dtype) -> slot owning it, or an allocation not yet given one
        self.slot_of_id = {}  # id(tensor) -> (tensor, slot): tensors met before
        self.views = {}  # view spec -> slot
        self.steps: list = []
        storages = set()
        for i, t in enumerate(inputs):
            if t is not None and t.numel():
                if _storage(t) in storages:  # which one a view came from would be a guess
                    raise _Refused
                storages.add(_storage(t))
                self.owners[_storage(t), t.dtype] = i
        for t in watch.allocations:
            if t.numel():
                self.owners.setdefault((_storage(t), t.dtype), t)

    def _new_slot(self, t: torch.Tensor) -> int:
        self.bases.append(t)
        return len(self.bases) - 1

    def slot(self, t: torch.Tensor) -> int:
        found = self.slot_of_id.get(id(t))
        if found is not None and found[0] is t:  # (the tensor kept: its id is not reused meanwhile)
            return found[1]
        found = self._slot(t)
        self.slot_of_id[id(t)] = (t, found)
        return found

    def _slot(self, t: torch.Tensor) -> int:
        if not t.numel():
            raise _Refused
        # by dtype too: as_strided keeps the dtype of what it views (a view to another dtype is an op)
        owner = self.owners.get((_storage(t), t.dtype))
        if owner is None:
            raise _Refused
        if not isinstance(owner, int):  # an allocation, first used here
            self.steps.append(("alloc", tuple(owner.shape), owner.stride(), owner.dtype, owner.device))
            owner = self.owners[_storage(t), t.dtype] = self._new_slot(owner)
        base = self.bases[owner]
        if t.shape == base.shape and t.stride() == base.stride() and t.storage_offset() == base.storage_offset():
            return owner
        spec = (owner, tuple(t.shape), t.stride(), t.storage_offset() - base.storage_offset())
        if spec not in self.views:
            self.steps.append(("view",) + spec)
            self.views[spec] = self._new_slot(t)
        return self.views[spec]

    def _template(self, values, positions):
        """(constants, fills) of an op's arguments: tensors (and lists of them) become fills."""
        template = list(values) if not isinstance(values, dict) else dict(values)
        fills = []
        for p in positions:
            v = template[p]
            if isinstance(v, torch.Tensor):
                if self.is_persistent(v):
                    continue
                fills.append((p, self.slot(v)))
                template[p] = None
            elif isinstance(v, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in v):
                if not all(isinstance(e, torch.Tensor) and not self.is_persistent(e) for e in v):
                    raise _Refused
                fills.append((p, tuple(self.slot(e) for e in v)))
                template[p] = None
            elif not (isinstance(v, _CONSTANTS) or isinstance(v, (list, tuple)) and all(isinstance(e, _CONSTANTS) for e in v)):
                raise _Refused
        return template, tuple(fills)

    def _launch(self, step):
        _, kernel, grid, args, meta, compiled, tail, allocator = step
        if not self.interpreting and (compiled is None or tail is None):
            raise _Refused
        template, fills, descriptors = [], [], []
        for position, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if self.is_persistent(a):
                    template.append(a)
                    continue
                fills.append((position, self.slot(a)))
                template.append(None)
            elif a is None or type(a) in (int, float, bool):
                template.append(a)
            elif _is_descriptor(a):  # a host-made tensor descriptor (Triton's or Gluon's)
                descriptors.append((position, self.slot(a.base), type(a),
                                    {k: v for k, v in vars(a).items() if k != "base"}))
                template.append(None)
            else:  # anything else may be tied to this call's tensors
                raise _Refused
        self.steps.append(("launch", kernel, grid, tuple(template), tuple(fills), tuple(descriptors), meta,
                           compiled, tail, allocator))

    def _op(self, step):
        _, func, args, kwargs, outs = step
        template, fills = self._template(args, range(len(args)))
        kw_template, kw_fills = self._template(kwargs, list(kwargs))
        self.steps.append(("op", func, template, fills, kw_template, kw_fills))
        for o in outs:  # an in-place op's output is storage owned already
            slot = self._new_slot(o)
            if o.numel():
                self.owners.setdefault((_storage(o), o.dtype), slot)

    def build(self, out):
        if self.watch.refused is not None or type(out) is not torch.Tensor:
            raise _Refused
        for step in self.watch.steps:
            (self._launch if step[0] == "launch" else self._op)(step)
        out_slot = self.slot(out)  # (may add a view step)
        return Plan(tuple(self.steps), out_slot)


_SEEN = object()  # a key called once: the next call records


def call(key, fn, inputs: tuple, rest: tuple):
    """``fn(*inputs, *rest)``, replayed from its key's plan where there is one (see the module).
    A key's first call runs plainly (a shape seen once costs no recording: recording a call took
    about 5 times its host time on the CI machine); its next calls record until two agree."""
    L = _launch_module()
    entry = _PLANS.get(key)
    if type(entry) is Plan:
        if not L._hooks_installed():
            return entry.run(inputs)
        return fn(*inputs, *rest)
    if entry is _NEVER:
        return fn(*inputs, *rest)
    if len(_PLANS) >= MAX_KEYS:
        _PLANS.clear()
    if entry is None:
        _PLANS[key] = _SEEN
        return fn(*inputs, *rest)
    steps = L.start_recording()
    watch = _Watch(steps)
    _LOCAL.on = True
    try:
        with watch:
            out = fn(*inputs, *rest)
    finally:
        _LOCAL.on = False
        L.stop_recording()
    plan = _make_plan(inputs, out, watch, L.INTERPRETING)
    signature = plan.signature() if plan is not None else None
    last, tries = entry if entry is not _SEEN else (None, 0)
    if signature is not None and signature == last:
        _PLANS[key] = plan
    elif tries + 1 >= MAX_TRIES:
        _PLANS[key] = _NEVER
    else:
        _PLANS[key] = (signature, tries + 1)
    return out
