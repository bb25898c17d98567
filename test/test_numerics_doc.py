"""The worked example of docs/numerics.md, worked by hand there, checked here on every backend."""

import pytest
import torch

import blockwise_fp8 as bf

from .conftest import KERNEL_DEVICE

BACKENDS = [("reference", "cpu"), ("triton", KERNEL_DEVICE)]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_worked_example(backend, device):
    x = torch.zeros(1, 128)
    x[0, :5] = torch.tensor([0.1, -2.5, 3.0, 7.0, 0.001])
    q, s = bf.quantize_activation(x.to(device), torch.float8_e4m3fn, backend=backend)
    assert s.item() == 2.0**-6
    assert q[0, :5].float().tolist() == [6.5, -160.0, 192.0, 448.0, 0.0625]
    assert (q[0, 5:].float() == 0).all()
    q, s = bf.quantize_activation(x.to(device), torch.float8_e5m2, backend=backend)
    assert s.item() == 2.0**-13
    assert q[0, :5].float().tolist() == [768.0, -20480.0, 24576.0, 57344.0, 8.0]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_and_nan_blocks(backend, device):
    q, s = bf.quantize_activation(torch.zeros(1, 4, device=device), backend=backend)
    assert s.item() == torch.finfo(torch.float32).tiny and (q.float() == 0).all()
    assert (bf.dequantize(q, s, (1, 128), backend=backend) == 0).all()
    q, s = bf.quantize_activation(torch.tensor([[1.0, float("nan"), 2.0]], device=device), backend=backend)
    assert torch.isnan(s).all() and torch.isnan(q.float()).all()
