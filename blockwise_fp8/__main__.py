"""``python -m blockwise_fp8``: the ``blockwise-fp8`` command line (see :mod:`blockwise_fp8.cli`).

With no arguments it runs ``demo``: a small built-in transformer quantized to blockwise FP8,
its accuracy and time against bf16, on the GPU if there is one, else on the CPU.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
