"""Triton kernels only: no torchao, no input validation (``blockwise_fp8.ops`` does that)."""
