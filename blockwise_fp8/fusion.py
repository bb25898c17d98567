"""Compiled graphs: one GEMM launch for the Linears that read the same activation.

A Llama layer's q/k/v projections read one normalised activation, and so do the MLP's gate and
up projections. Compiled, each is a ``blockwise_fp8::gemm`` node on the same quantized input (the
pass first merges equal ``quantize_input`` nodes, which Dynamo's trace of ``BlockwiseFP8Linear``
records once per Linear; the subclass path shares them while tracing, ``ops._shared_input``). At decode sizes every GEMM
launch pays a ramp and a tail of a few microseconds on top of streaming its weights, and the
small k and v projections are mostly that. This Inductor post-grad pass rewrites the gemm nodes
that share (quantized input, scales, output dtype, backend) into one ``blockwise_fp8::gemm_group``
node, which runs up to three weights in one launch of a weight-streaming kernel (gemv, skinny)
where one serves M (and the same GEMMs one by one elsewhere), so the weights are neither copied
nor concatenated.

The pass is installed into ``torch._inductor.config.post_grad_custom_post_pass`` when
blockwise_fp8 is imported, beside any pass already there where this torch takes a list of passes
(2.10 and later); ``BLOCKWISE_FP8_FUSE_GEMMS=0`` in the environment, or :func:`uninstall`, leaves
the setting alone. Graphs without our gemm nodes are left as they are.
"""

from __future__ import annotations

import operator
import os
import warnings

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["FuseSiblingGemms", "install", "uninstall", "installed"]


class FuseSiblingGemms(CustomGraphPass):
    """Group ``blockwise_fp8::gemm`` nodes with the same activation operands into one
    ``gemm_group`` node placed where the first of them was. A gemm whose weight, scales or bias
    is computed after that point stays on its own. Equal activation quantizations are merged
    first. ``groups`` and ``merged`` count what was done (tests)."""

    def __init__(self) -> None:
        self.groups = 0
        self.merged = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._merge_quantizations(graph)
        self._group_gemms(graph)

    def _merge_quantizations(self, graph: torch.fx.Graph) -> None:
        """One ``quantize_input`` node per (input, dtype, scale layout, backend). Graphs traced
        through the tensor subclass share them already (``ops._shared_input``); Dynamo's trace of
        ``BlockwiseFP8Linear`` records a reshape and a quantization per Linear. Equal reshapes of
        one node, then equal quantizations of one reshape, then equal getitems of one quantization
        are merged, in graph order so that each merge exposes the next. Safe because the ops are
        functional and the graph reads a node only while its value is live (Inductor mutates a
        buffer in place only where the old value has no later reader)."""
        quantize = torch.ops.blockwise_fp8.quantize_input.default
        views = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
        first: dict = {}
        for n in list(graph.nodes):
            if n.op != "call_function" or n.kwargs:
                continue
            is_item = (n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node)
                       and n.args[0].target is quantize)
            if not (n.target is quantize or n.target in views or is_item):
                continue
            key = (n.target, *(tuple(a) if isinstance(a, (list, tuple)) else a for a in n.args))
            if n.target in views and not any(u.target is quantize for u in n.users):
                continue  # only the reshapes that feed a quantization
            try:
                seen = key in first
            except TypeError:  # an argument that cannot be a dict key: leave the node alone
                continue
            if seen:
                self.merged += n.target is quantize
                n.replace_all_uses_with(first[key])
                graph.erase_node(n)
            else:
                first[key] = n

    def _group_gemms(self, graph: torch.fx.Graph) -> None:
        gemm = torch.ops.blockwise_fp8.gemm.default
        group_op = torch.ops.blockwise_fp8.gemm_group.default
        order = {n: i for i, n in enumerate(graph.nodes)}
        siblings: dict = {}
        for n in graph.nodes:
            if n.op == "call_function" and n.target is gemm and len(n.args) == 7 and not n.kwargs:
                a_q, a_scale, _, _, _, out_dtype, backend = n.args
                siblings.setdefault((a_q, a_scale, out_dtype, backend), []).append(n)
        for (a_q, a_scale, out_dtype, backend), nodes in siblings.items():
            first = nodes[0]
            members = [first] + [
                n for n in nodes[1:]
                if all(not isinstance(t, torch.fx.Node) or order[t] < order[first] for t in n.args[2:5])
            ]
            if len(members) < 2:
                continue
            with graph.inserting_before(first):
                grouped = graph.call_function(group_op, (
                    a_q, a_scale, [n.args[2] for n in members], [n.args[3] for n in members],
                    [n.args[4] for n in members], out_dtype, backend,
                ))
                grouped.meta["val"] = [n.meta["val"] for n in members]
                items = [graph.call_function(operator.getitem, (grouped, i)) for i in range(len(members))]
            for n, item in zip(members, items):  # after the insertions: they are placed before `first`
                item.meta.update(n.meta)
                n.replace_all_uses_with(item)
                graph.erase_node(n)
            self.groups += 1

    def uuid(self):
        # Inductor's caches key compiled graphs on this: the pass and the ops it rewrites to
        from . import ops

        return get_hash_for_files((__file__, ops.__file__))


_PASS = FuseSiblingGemms()


def _lists_of_passes() -> bool:
    # torch runs a list (or tuple) of passes from each custom-pass setting since
    # pytorch/pytorch#184108 (merged 2026-05-20); before, one pass
    import torch._inductor.custom_graph_pass as cgp

    return hasattr(cgp, "get_custom_graph_passes")


def installed() -> bool:
    """Whether the pass is in Inductor's post-grad custom passes now."""
    from torch._inductor import config

    current = config.post_grad_custom_post_pass
    return current is _PASS or (isinstance(current, (list, tuple)) and any(p is _PASS for p in current))


def install() -> bool:
    """Add the pass to ``torch._inductor.config.post_grad_custom_post_pass``: set it where the
    setting is empty, append it where this torch takes a list. Where another pass holds the
    setting and this torch takes only one, leave it and warn. Returns whether it is installed."""
    from torch._inductor import config

    if installed():
        return True
    current = config.post_grad_custom_post_pass
    if current is None:
        config.post_grad_custom_post_pass = _PASS
    elif _lists_of_passes():
        rest = list(current) if isinstance(current, (list, tuple)) else [current]
        config.post_grad_custom_post_pass = rest + [_PASS]
    else:
        warnings.warn(
            "blockwise_fp8: torch._inductor.config.post_grad_custom_post_pass already holds "
            f"{current!r} and this torch takes one pass there, so compiled graphs will run one GEMM "
            "launch per Linear (install() after clearing it to group them)",
            stacklevel=2,
        )
        return False
    return True


def uninstall() -> None:
    """Take the pass out of Inductor's post-grad custom passes (compiled graphs then run one
    GEMM per Linear; graphs compiled before keep what they were compiled with)."""
    from torch._inductor import config

    current = config.post_grad_custom_post_pass
    if current is _PASS:
        config.post_grad_custom_post_pass = None
    elif isinstance(current, (list, tuple)):
        config.post_grad_custom_post_pass = [p for p in current if p is not _PASS] or None


def _install_on_import() -> None:
    if os.environ.get("BLOCKWISE_FP8_FUSE_GEMMS", "1") != "0":
        install()
