"""Compiled graphs: one GEMM launch for the Linears that read the same activation.

A Llama layer's q/k/v projections read one normalised activation, and so do the MLP's gate and
up projections. Compiled, each is a ``blockwise_fp8::gemm`` node on the same quantized input (the
quantization itself is shared already, see ``ops._shared_input``). At decode sizes every GEMM
launch pays a ramp and a tail of a few microseconds on top of streaming its weights, and the
small k and v projections are mostly that. This Inductor post-grad pass rewrites the gemm nodes
that share (quantized input, scales, output dtype, backend) into one ``blockwise_fp8::gemm_group``
node, which runs up to three weights in one launch of the skinny kernel where that kernel serves
M (and the same GEMMs one by one elsewhere), so the weights are neither copied nor concatenated.

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
    is computed after that point stays on its own. ``groups`` counts the groups made (tests)."""

    def __init__(self) -> None:
        self.groups = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
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
        return get_hash_for_files((__file__,))


_PASS = FuseSiblingGemms()


def _lists_of_passes() -> bool:
    # torch >= 2.10 runs a list (or tuple) of passes from each custom-pass setting
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
