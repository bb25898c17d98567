"""blockwise_fp8: DeepSeek-V3 blockwise FP8 quantization (1x128 activations, 128x128 weights)
for PyTorch, with Triton kernels and a pure-torch reference.

The public face: re-exports only, nothing is defined here.
"""

from .ops import (
    BACKENDS,
    FP8_DTYPES,
    BackendUnavailableError,
    dequantize,
    gemm,
    linear,
    quantize_activation,
    quantize_weight,
)
from .tensor import BlockwiseFP8Tensor
from .config import BlockwiseFP8Config
from .checkpoint import CheckpointError, load_quantized, save_quantized

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FP8_DTYPES",
    "BackendUnavailableError",
    "BlockwiseFP8Config",
    "BlockwiseFP8Tensor",
    "CheckpointError",
    "dequantize",
    "gemm",
    "linear",
    "load_quantized",
    "quantize_activation",
    "quantize_weight",
    "save_quantized",
    "__version__",
]
