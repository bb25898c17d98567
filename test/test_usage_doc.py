"""Runs the Python blocks of docs/usage.md, in order, in one namespace, as a reader would."""

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "usage.md"
CUDA_MARK = "<!-- requires: cuda -->"


def _blocks():
    """(code, needs_cuda) for every ```python block; a CUDA_MARK line right before marks it."""
    text = DOC.read_text()
    out = []
    for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        before = text[: m.start()].rstrip().splitlines()
        out.append((m.group(1), bool(before) and before[-1].strip() == CUDA_MARK))
    return out


def _run(blocks):
    namespace = {"__name__": "usage_doc"}
    for i, (code, _) in enumerate(blocks):
        try:
            exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)
        except Exception as e:  # name the block: the traceback alone points into exec
            raise AssertionError(f"docs/usage.md block {i} failed:\n{code}") from e


def test_doc_has_its_examples():
    blocks = _blocks()
    assert len(blocks) >= 7 and sum(cuda for _, cuda in blocks) == 1


def test_cpu_examples_run():
    torch._dynamo.reset()
    _run([b for b in _blocks() if not b[1]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph example needs a CUDA GPU")
def test_all_examples_run_on_cuda():
    torch._dynamo.reset()
    _run(_blocks())
