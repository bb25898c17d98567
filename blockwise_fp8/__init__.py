"""blockwise_fp8: DeepSeek-V3 blockwise FP8 quantization (1x128 activations, 128x128 weights)
for PyTorch, with Triton kernels and a pure-torch reference.

The public face: re-exports only, nothing is defined here. Importing it adds one Inductor
post-grad pass (``blockwise_fp8.fusion``: Linears that share an input run as one GEMM launch in
compiled graphs); ``BLOCKWISE_FP8_FUSE_GEMMS=0`` keeps it out.
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
from .modules import BlockwiseFP8Linear, unwrap_for_compile
from .checkpoint import CheckpointError, load_quantized, save_quantized
from . import fusion

fusion._install_on_import()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FP8_DTYPES",
    "BackendUnavailableError",
    "BlockwiseFP8Config",
    "BlockwiseFP8Linear",
    "BlockwiseFP8Tensor",
    "CheckpointError",
    "dequantize",
    "gemm",
    "linear",
    "load_quantized",
    "quantize_activation",
    "quantize_weight",
    "save_quantized",
    "unwrap_for_compile",
    "__version__",
]
