"""Which card a CUDA device is, for the tables measured per card: the kernels' plans
(``gemm.plan``'s SM count, ``gemm.card_plans``) and ``ops.choose_gemm_backend``. Torch only, so
that ``ops`` imports it without Triton."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def card(device_index: int) -> tuple[str, int]:
    """(family, SM count): "H100" where the device's name says H100 (where the H100 tables were
    measured), "other" elsewhere. Without CUDA (the Triton interpreter) ("other", 132), so that
    plans are those of a card of an H100's size."""
    if not torch.cuda.is_available():
        return ("other", 132)
    props = torch.cuda.get_device_properties(device_index)
    return ("H100" if "H100" in props.name else "other", props.multi_processor_count)
