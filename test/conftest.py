"""Test setup shared by the whole suite.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The
interpreter is chosen when triton is imported, so the variable is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "dev": random examples each run; "ci": derandomized, so a CI failure reproduces exactly.
settings.register_profile(
    "dev", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=30, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# "stress": many more examples, for a one-off hunt for edge cases (e.g. on the GPU).
settings.register_profile(
    "stress", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Where the Triton kernels run in this session: CUDA when present, else the interpreter on CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_replay_plans_across_tests():
    """Each test starts without the eager-call plans of the tests before it (blockwise_fp8.replay):
    a test that patches a tunable then sees its own setting at work, not a plan recorded before."""
    from blockwise_fp8 import replay

    replay.clear()
    yield


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture
def fresh_compile():
    """A clean torch.compile state around a test: Dynamo's caches and counters, and Inductor's
    post-grad pass setting (which the fusion tests change) restored afterwards."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    counters.clear()
    before = inductor_config.post_grad_custom_post_pass
    yield
    inductor_config.post_grad_custom_post_pass = before
    torch._dynamo.reset()
