# Source on a device machine to run the next commands under a Triton carried as a slim tarball
# (benchmarks/slim_triton.sh) instead of the image's:
#     source benchmarks/use_slim_triton.sh [.t39/triton-3.9.0-slim.tar.xz]
#     bash benchmarks/grid_half.sh A --self-heat 1 --rounds 1      # (carry .t39, .whl)
# The image's CUDA tools stand in for the ones the tarball leaves out.
_slim=${1:-$(ls .t39/triton-*-slim.tar.xz 2>/dev/null | tail -1)}
if [ -z "$_slim" ] || [ ! -f "$_slim" ]; then
    echo "use_slim_triton: no tarball (give its path, or carry .t39/ with one)" >&2
    return 1 2>/dev/null || exit 1
fi
mkdir -p /tmp/slim_triton && tar xJf "$_slim" -C /tmp/slim_triton
_px=$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)
export PYTHONPATH="/tmp/slim_triton${PYTHONPATH:+:$PYTHONPATH}" TRITON_PTXAS_PATH=$_px TRITON_PTXAS_BLACKWELL_PATH=$_px
command -v cuobjdump >/dev/null && export TRITON_CUOBJDUMP_PATH=$(command -v cuobjdump)
command -v nvdisasm >/dev/null && export TRITON_NVDISASM_PATH=$(command -v nvdisasm)
export TRITON_DEFAULT_FP_FUSION=1  # Triton 3.9 warns without it; 1 is its default and 3.6's behaviour
python3 -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
