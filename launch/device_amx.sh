#!/usr/bin/env bash
# The cpu-amx tier on the Sapphire Rapids Xeon (a machine without Debian's Boost
# packages): builds the unit tests and the CLI against .debs unpacked with dpkg -x,
# runs the attention unit tests (every backend, cpu-amx included), then the bf16
# prefill bench (cpu-amx, cpu-avx512) and PyTorch SDPA bf16 on the same threads.
#   launch/device_amx.sh [DEB_DIR] [OUT_DIR] [THREADS] [GTEST_FILTER]
# DEB_DIR holds the Boost / nlohmann-json .debs of launch/device_python.sh plus
# libgtest-dev (apt-get download on Debian 12); GTEST_FILTER 'none' skips the tests.
set -uo pipefail
DEBS=${1:-.deps/boost-debs} OUT_DIR=${2:-out/device} THREADS=${3:-$(nproc)}
FILTER=${4:-'*DenseForward*:*Varlen*:*KvCache*:*SplitKv*:*Numerics*:CpuBackend*:ValidationBackend*:*DenseThreads*:*DenseMaskCounts*'}
mkdir -p "$OUT_DIR"
source "$(dirname "$0")/device_common.sh"
device_unpack_debs "$DEBS"
device_host_line
t0=$(date +%s)
device_build build-amx "$OUT_DIR" "ringattn_unit_tests ringattn_cli" -- -DRINGATTN_PYTHON=OFF || exit 1
echo "== built in $(($(date +%s) - t0)) s"
CLI=build-amx/bin/ringattn
if [[ $FILTER != none ]]; then
  t0=$(date +%s)
  OMP_NUM_THREADS=$THREADS timeout ${UNIT_TIMEOUT:-240} build-amx/tests/ringattn_unit_tests --gtest_filter="$FILTER" \
    >"$OUT_DIR/unit.log" 2>&1
  echo "== unit tests ($FILTER): exit $? in $(($(date +%s) - t0)) s"
  grep -E '^\[  (FAILED|PASSED|SKIPPED) ' "$OUT_DIR/unit.log" | head -40
  grep -B1 -A3 "Failure" "$OUT_DIR/unit.log" | head -60
  tail -3 "$OUT_DIR/unit.log"
fi
echo "== bench, $THREADS threads"
for be in cpu-amx cpu-avx512; do
  OMP_PROC_BIND=close OMP_PLACES=cores "$CLI" bench --threads "$THREADS" --backend $be \
    --case '^prefill_bf16,^prefill_causal_bf16' --repeats ${REPEATS:-3} 2>&1
done | tee "$OUT_DIR/bench_amx.txt"
# VARIANTS="FLAGS1;FLAGS2": cpu-amx rebuilt with extra compile flags (tuning knobs such
# as -DRINGATTN_AMX_KEY_TILE=64, or -DRINGATTN_AMX_PROFILE for the phase cycle counts).
IFS=';' read -ra variants <<<"${VARIANTS:-}"
for i in "${!variants[@]}"; do
  v=${variants[$i]}
  device_build build-amx-v$i "$OUT_DIR/v$i" ringattn_cli -- -DRINGATTN_PYTHON=OFF \
    -DRINGATTN_BUILD_TESTS=OFF -DCMAKE_CXX_FLAGS="$v" || { echo "variant '$v' failed to build"; continue; }
  for c in prefill_bf16 prefill_causal_bf16; do
    echo "== variant: $v, $c"
    OMP_PROC_BIND=close OMP_PLACES=cores build-amx-v$i/bin/ringattn bench --threads "$THREADS" \
      --backend cpu-amx --case "^$c\$" --repeats ${REPEATS:-3} 2>&1 | grep -v '^$'
  done
done | tee -a "$OUT_DIR/bench_amx.txt"
PYTHONUNBUFFERED=1 python3 launch/compare_torch.py --threads "$THREADS" --dtype bf16 \
  --prefill-only --repeats ${REPEATS:-3} 2>&1 | tee -a "$OUT_DIR/bench_amx.txt"
