#!/usr/bin/env bash
# Everything this round measures on the 16-core Xeon, in ONE device call (device time is
# scarce): one build (unit tests, CLI, Python package) against .debs unpacked with dpkg -x,
# the kernel unit tests on every backend (cpu-amx included), the Python tests, the Python
# benchmark against PyTorch SDPA (prefill fp32/bf16, decode; the decode overhead at 1
# thread too), then launch/device_session.sh (sessions, extend, TTFT, Ulysses, the study).
#   launch/device_round.sh OUT_DIR [DEB_DIR...]
# DEB_DIRs hold the Boost / nlohmann-json .debs (launch/device_python.sh) and libgtest-dev.
# BUDGET_S (default 540) stops starting new parts once that many seconds have passed.
set -uo pipefail
OUT=${1:-out/device_round}
shift || true
DEB_DIRS=("${@:-.deps/boost-debs}")
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
PY=$(command -v python3)
source "$(dirname "$0")/device_common.sh"
device_unpack_debs "${DEB_DIRS[@]}"
device_host_line
device_build build-round "$OUT" "ringattn_unit_tests ringattn_cli ringattn_python" -- \
  -DRINGATTN_PYTHON=ON -DRINGATTN_PYTHON_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" || exit 1
echo "== built in $(($(date +%s) - T0)) s"
BIN=$PWD/build-round/bin/ringattn
FILTER=${FILTER:-'*DenseForward*:*Varlen*:*KvCache*:*SplitKv*:*Numerics*:CpuBackend*:ValidationBackend*:*Sinks*:*AttentionChunk*'}
t=$(date +%s)
OMP_NUM_THREADS=16 timeout 150 build-round/tests/ringattn_unit_tests --gtest_filter="$FILTER" \
  >"$OUT/unit.log" 2>&1
echo "== unit tests: exit $? in $(($(date +%s) - t)) s: $(grep -E '^\[  PASSED|^\[  FAILED  \] [0-9]' "$OUT/unit.log" | tr '\n' ' ')"
grep -B1 -A3 "Failure" "$OUT/unit.log" | head -30
export PYTHONPATH=$PWD/build-round/python PYTHONUNBUFFERED=1
for f in tests/python/test_*.py; do
  OMP_NUM_THREADS=4 "$PY" -m pytest -q -p no:cacheprovider "$f" >"$OUT/$(basename "$f" .py).log" 2>&1
  echo "$f: exit $? $(tail -1 "$OUT/$(basename "$f" .py).log")"
done
echo "== bench_python, 16 threads"
"$PY" launch/bench_python.py --threads 16 --repeats 5 2>&1 | tee "$OUT/bench_python_16t.txt"
echo "== bench_python decode, 1 thread"
"$PY" launch/bench_python.py --threads 1 --case decode --decode-repeats 400 2>&1 |
  tee "$OUT/bench_python_decode_1t.txt"
echo "== $(left) s left for the session parts"
for part in ${PARTS:-b c a e d f}; do
  if (($(left) < 40)); then echo "== part $part skipped (budget)"; continue; fi
  PARTS=$part timeout $(($(left) - 5)) launch/device_session.sh "$OUT/session" "$BIN" >/dev/null 2>&1
  echo "== part $part done, $(left) s left"
done
cat "$OUT/session/session.txt" 2>/dev/null | grep -v '^\$' | cut -c1-400 | tail -60
