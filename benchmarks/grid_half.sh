#!/usr/bin/env bash
# Half of the GEMM grid on a GPU machine, within one device call (600 s at most):
#     bash benchmarks/grid_half.sh A|B [bench_gemm.py options...]     # e.g. --self-heat 1 --rounds 1
# A: (N, K) = 8192 x 8192 and 10240 x 8192; B: 57344 x 8192 and 8192 x 28672. Writes
# ${OUT:-/tmp}/halfA or halfB (CSV, summary, plot), its log and a clock log beside it; join the two with
#     python benchmarks/bench_gemm.py --merge DIR/halfA,DIR/halfB --out DIR
# Device time of one half on an H100 (sessions 25-26): back to back with 2 rounds 222 / 267 s;
# --preheat 1 --rounds 1 503 / 519 s (so --self-heat 1 --rounds 1 should take about as long).
# --interleave runs the whole grid in about 221 s: no need to halve it.
set -u
cd "$(dirname "$0")/.."
half=${1:-}
case "$half" in
    A) nk=8192x8192,10240x8192 ;;
    B) nk=57344x8192,8192x28672 ;;
    *) echo "usage: bash benchmarks/grid_half.sh A|B [bench_gemm.py options...], got '${half}'" >&2; exit 2 ;;
esac
shift
out="${OUT:-/tmp}"
ls .whl/torchao-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile .whl/torchao-*.whl >/dev/null 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
# the card's SM clock, power and temperature every 100 ms while the grid runs (session 26 explained
# two timing methods' differences by clocks without logging them)
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu \
    --format=csv -lms 100 > "$out/clocks_half$half.csv" 2>&1 &
smi=$!
timeout "${GRID_TIMEOUT:-560}" python3 benchmarks/bench_gemm.py --nk "$nk" --out "$out/half$half" "$@" > "$out/half$half.log" 2>&1
echo "half $half rc=$?"
kill "$smi" 2>/dev/null
grep "^\[" "$out/half$half.log" | awk 'NR%8==0' | cut -c1-120
