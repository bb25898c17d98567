#!/usr/bin/env bash
# The whole test suite on a GPU machine (the device tool's H100/H200), in eight parallel pytest
# processes, each group limited to ${GROUP_TIMEOUT:-500} s. Eighteenth session, fresh H200 with an
# empty Triton cache, five groups: test_gemm + test_backend_choice ran only 68 of their 126 tests
# in 520 s beside the others (the rest then took 28 s), g4 took 464 s (test_fusion 55 s of it);
# so test_gemm's plan-by-plan reference test now runs in a group of its own and test_fusion
# beside test_compile. Twentieth session, fresh H100, GROUP_TIMEOUT=420: g4 ran 127 of its 130
# tests in 420 s (the other groups 172-396 s); test_modules alone took 102 s beside two other
# pytest processes, so it now runs as g7. Logs go to ${OUT:-/tmp}/g1..g8.log as they run;
# the summary lines are printed last. Twenty-ninth session, Triton 3.9 (carried, cold cache: its
# Gluon compiles take 2-9 s each), GROUP_TIMEOUT=570: g6 ran 83 of its 178 tests (the ws-heavy
# part of test_gemm first) in 570 s while the other groups finished in 179-453 s, so test_gemm's
# ws, cluster, ring, pairs and tail tests now run as g6, the rest with test_backend_choice as g8. A torchao wheel in .whl/ (see the device README) is installed
# first, since the GPU image has none.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
ls .whl/torchao-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile .whl/torchao-*.whl >/dev/null 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
run() {  # group name, test files...
    local name=$1; shift
    # ONLY="g1 g8" runs just those groups (a change that touches one path, when device time is short)
    if [ -n "${ONLY:-}" ] && ! grep -qw "$name" <<< "$ONLY"; then return; fi
    timeout "${GROUP_TIMEOUT:-500}" python3 -m pytest -q --tb=short -p no:cacheprovider -rfs --durations=5 "$@" \
        > "$out/$name.log" 2>&1
    echo "$name rc=$?" >> "$out/$name.log"
}
g1="test/test_quant.py test/test_numerics_doc.py test/test_ops.py"
g2="test/test_gemm.py test/test_backend_choice.py"  # split in three below
g3="test/test_tensor.py test/test_serialization.py test/test_usage_doc.py test/test_config.py"
g5="test/test_compile.py test/test_fusion.py"
g7="test/test_modules.py"
g4=$(ls test/test_*.py | grep -vxF -f <(tr ' ' '\n' <<< "$g1 $g2 $g3 $g5 $g7"))  # everything else
every_plan="test_every_plan_matches_reference"
ws_heavy="ws or cluster or ring or pairs or tail"
run g1 $g1 & run g2 test/test_gemm.py -k "$every_plan" &
run g6 test/test_gemm.py -k "not $every_plan and ($ws_heavy)" & run g8 $g2 -k "not $every_plan and not ($ws_heavy)" &
run g3 $g3 & run g4 $g4 & run g5 $g5 & run g7 $g7 &
wait
grep -hE "^FAILED|^ERROR| passed| failed|rc=" "$out"/g[1-8].log 2>/dev/null
