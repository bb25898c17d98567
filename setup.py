from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("blockwise_fp8/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="blockwise_fp8",
    version=version["__version__"],
    description="DeepSeek-V3 blockwise FP8 quantization (1x128 activations, 128x128 weights) for PyTorch and torchao",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["blockwise_fp8", "blockwise_fp8.*"]),
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "torchao>=0.14",
        "safetensors>=0.4",
    ],
    extras_require={
        # numpy: Triton's CPU interpreter imports it; matplotlib: the benchmark plot's test
        "test": ["pytest>=8", "hypothesis>=6.100", "numpy", "transformers>=5", "accelerate>=1.0", "matplotlib>=3.8"],
        "bench": ["matplotlib>=3.8"],
        "hf": ["transformers>=5", "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["blockwise-fp8=blockwise_fp8.__main__:main"]},
)
