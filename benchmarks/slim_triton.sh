#!/usr/bin/env bash
# A Triton wheel small enough to carry to the device machines (their image has Triton 3.6; the
# device tool carries at most 64 MiB with the working tree, and Triton 3.9's wheel is 286 MB).
# Used in the twenty-eighth session to run the ws kernel's 2-CTA clusters (Triton >= 3.9) there.
#
#   benchmarks/slim_triton.sh 3.9.0 .t39        # writes .t39/triton-3.9.0-slim.tar.xz (~41 MB; .t39/ is git-ignored)
#
# What goes: libtriton.so's symbols (strip: 477 -> 192 MB), the AMD backend's libraries, CUPTI,
# proton, the test plugins, and the CUDA tools in backends/nvidia/bin (the device's CUDA 13.0
# ptxas, cuobjdump and nvdisasm serve instead; Triton then emits the PTX ISA that ptxas accepts).
# On the device (torch 2.11 there ran our kernels under it):
#   source benchmarks/use_slim_triton.sh     (or by hand:)
#   mkdir -p /tmp/t39 && tar xJf .t39/triton-*-slim.tar.xz -C /tmp/t39
#   PX=$(command -v ptxas); export PYTHONPATH=/tmp/t39:$PWD TRITON_PTXAS_PATH=$PX TRITON_PTXAS_BLACKWELL_PATH=$PX
set -eu
version=${1:?triton version}; dest=${2:?output folder}
work=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$work" "triton==$version"
(cd "$work" && unzip -q triton-*.whl)
t="$work/triton"
strip --strip-unneeded "$t/_C/libtriton.so"
rm -rf "$t/backends/amd/lib" "$t/backends/amd/include" "$t/backends/nvidia/lib/cupti" \
  "$t/backends/nvidia/lib/cupti-blackwell" "$t/_C/libproton.so" "$t/profiler" "$t/plugins" "$t/FileCheck"
rm -f "$t/backends/nvidia/bin/"* "$t/instrumentation/"*.so
mkdir -p "$dest"
(cd "$work" && tar cf - triton triton-*.dist-info) | xz -T0 -6 > "$dest/triton-$version-slim.tar.xz"
rm -rf "$work"
ls -la "$dest"
