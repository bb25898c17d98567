#!/usr/bin/env bash
# The open H100 questions of sessions 34-38 (each measured on an H200 only), as one device call
# per PART (each about 5-8 minutes cold), writing to ${OUT:-/tmp}:
#   PART=1  mid M on the ws tiles: should the H100 take the "other" table's M = 65-256 rule
#           (probe_mid_m_ws.py --wide), and auto's M = 65-256 bands with today's plans (ab_auto.py)
#   PART=2  the tight-activation copy (ab_ragged_m.py, its `past` side: copy off) and the narrow
#           64 x 64 tiles switched on at 4 SMs a program (ab_narrow.py), both through the library
#   PART=3  the skinny kernel's host-made descriptors in graphs (session 37, SKINNY_TMA_CAPTURED):
#           pointer / kernel-made / host-made on the grid's four weights, M = 1-64, e5m2
#           (ab_skinny_tma.py; M = 1: the gemv plan beside the M = 2 skinny plan), then the GPU
#           tests that session could not run in their final form (test_launch's replay test)
#   PART=4  the ws kernel under PDL up to M = 256 (session 38, gemm.WS_PDL_MAX_M): linear with and
#           without, M = 80-1024 (ab_persistent_pdl.py), about 3 minutes
#   PART=5  session 39: is the H100's activation quantization bound by instructions too
#           (probe_quant_alu.py under Triton 3.9 and 3.6: the clamp's 2-3% on an H200, and the
#           negated divisor, 5-7% under 3.6 on an H200, adopted in session 40), and the eager dispatcher bypass on
#           the H100 machine's slower host (ab_eager_host.py), then the GPU tests the session's
#           last call could not confirm (test_launch, test_compile's CUDA tests); about 8 minutes
#   PART=6  session 40: eager calls replayed (blockwise_fp8/replay.py) on the H100 machine's slower
#           host: ab_eager_host.py --compare replay, eager_decode_replay.py (bf16 beside), then the
#           GPU tests not run with replay on the H200 (test_replay, test_gemm's linear tests,
#           test_compile's CUDA tests); about 8 minutes
# Carry .whl (torchao) and, for Triton 3.9, .t39 (benchmarks/slim_triton.sh).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
ls .whl/torchao-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile .whl/torchao-*.whl >/dev/null 2>&1
[ -d .t39 ] && source benchmarks/use_slim_triton.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
step() {  # seconds, log name, command...
    local limit=$1 name=$2; shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name rc=$?"
}
case "${PART:-1}" in
1)
    step 280 probe-mid-m-ws python3 benchmarks/probe_mid_m_ws.py --wide --memory --no-splits --ms 80,96,128,160,200 \
        --shapes 8192x28672,4096x14336,4096x8192,6144x4096,4096x4096,8192x8192,1024x4096
    step 280 ab-auto-mid-m python3 benchmarks/ab_auto.py "$out/ab-auto-mid-m.txt" --ms 80,128,130,160,200,250 \
        --shapes 10240x8192,4096x14336,8192x8192,8192x28672,6144x4096,4096x4096
    grep -v -i "leak\|nanobind" "$out/probe-mid-m-ws.log" | tail -40 ;;
2)
    step 250 ab-ragged-m python3 benchmarks/ab_ragged_m.py "$out/ab-ragged-m.txt" \
        --cells e5m2:130x10240x8192,e5m2:257x8192x8192,e5m2:513x8192x8192,e5m2:897x8192x8192
    step 250 ab-narrow python3 benchmarks/ab_narrow.py "$out/ab-narrow.txt" --per-program 4 \
        --cells 80x1024x4096,128x1024x4096,128x1024x8192,96x1024x14336,128x2048x2048,128x512x4096,100x1000x2176,200x1024x4096,80x2048x7168
    cat "$out/ab-ragged-m.txt" "$out/ab-narrow.txt" ;;
3)
    step 330 ab-skinny-tma python3 benchmarks/ab_skinny_tma.py "$out/ab-skinny-tma.txt" --dtypes e5m2 \
        --cells 8192x8192,10240x8192,57344x8192,8192x28672 --ms 1,2,16,32,64 --sides pointer,tma,tma_host --heat 0.4
    step 150 gpu-tests python3 -m pytest -q -p no:cacheprovider test/test_launch.py \
        test/test_gemm.py -k "replayed or skinny or capture or graph"
    grep -E "passed|failed" "$out/gpu-tests.log"
    cat "$out/ab-skinny-tma.txt" ;;
4)
    step 300 ab-persistent-pdl python3 benchmarks/ab_persistent_pdl.py "$out/ab-persistent-pdl.txt" \
        --cells 4096x4096,8192x8192,10240x8192,4096x14336,28672x4096 --ms 80,128,160,256,512,1024 --heat 0.3
    cat "$out/ab-persistent-pdl.txt" ;;
5)
    step 150 probe-quant-alu python3 benchmarks/probe_quant_alu.py "$out/probe-quant-alu.txt"
    # and under the image's Triton 3.6, where the negated divisor (session 40) saved 8% of the SASS
    step 150 probe-quant-alu-36 env -u TRITON_PTXAS_PATH -u TRITON_PTXAS_BLACKWELL_PATH -u TRITON_CUOBJDUMP_PATH \
        -u TRITON_NVDISASM_PATH PYTHONPATH="$PWD" python3 benchmarks/probe_quant_alu.py "$out/probe-quant-alu-36.txt"
    step 90 ab-eager-host python3 benchmarks/ab_eager_host.py "$out/ab-eager-host.txt"
    step 150 gpu-tests-launch python3 -m pytest -q -p no:cacheprovider test/test_launch.py
    step 120 gpu-tests-compile python3 -m pytest -q -p no:cacheprovider test/test_compile.py -k cuda
    grep -h -E "passed|failed" "$out/gpu-tests-launch.log" "$out/gpu-tests-compile.log"
    cat "$out/probe-quant-alu.txt" "$out/probe-quant-alu-36.txt" "$out/ab-eager-host.txt" ;;
6)
    step 120 ab-eager-replay python3 benchmarks/ab_eager_host.py "$out/ab-eager-replay.txt" --compare replay --rounds 4
    step 90 eager-decode-replay python3 benchmarks/eager_decode_replay.py "$out/eager-decode-replay.txt"
    step 200 gpu-tests-replay python3 -m pytest -q -p no:cacheprovider test/test_replay.py \
        test/test_gemm.py -k "linear or replay"
    step 120 gpu-tests-compile python3 -m pytest -q -p no:cacheprovider test/test_compile.py -k cuda
    grep -h -E "passed|failed" "$out/gpu-tests-replay.log" "$out/gpu-tests-compile.log"
    cat "$out/ab-eager-replay.txt" "$out/eager-decode-replay.txt" ;;
*)
    echo "PART is 1, 2, 3, 4, 5 or 6, got ${PART}" >&2; exit 2 ;;
esac
