#!/usr/bin/env bash
# The long-sequence half of the scaling study of docs/scaling.md on the 16-core Xeon, in ONE
# device call: build the CLI (Boost from .debs unpacked with dpkg -x, as launch/device_round.sh),
# the fp32 kernel bench at 2 and 16 threads (fraction of the FMA peak), then launch/sweep over
#   A  s = 32768, h = 32/8, d = 128, fp32 causal zigzag: every ranks x threads split of 16 cores
#      x Ulysses degree (ring, hybrid, pure Ulysses), against 1 x 16 (the issue's shape)
#   B  s = 65536, h = 8: 8 and 16 ranks x U = 1, 2, 4, 8, against 1 rank x the same cores
#   C  s = 131072, h = 8: 16 ranks x U = 1, 4, 8 and the 4 x 4 split, against 1 x 16
# Everything lands in ONE tar (OUT/study.tgz): the device returns only a few files.
#   launch/device_study.sh OUT_DIR [DEB_DIR...]
# BUDGET_S (default 520): a sweep still running then is stopped; finished points are kept
# (launch/sweep appends each run to results.jsonl as it ends).
set -uo pipefail
OUT=${1:-out/device_study}
shift || true
DEB_DIRS=("${@:-.deps/boost-debs}")
BUDGET_S=${BUDGET_S:-520}
mkdir -p "$OUT/study"
T0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
pack() { tar -czf "$OUT/study.tgz" -C "$OUT" study; }
trap pack EXIT
PY=$(command -v python3)
source "$(dirname "$0")/device_common.sh"
device_unpack_debs "${DEB_DIRS[@]}"
device_host_line
device_build build-study "$OUT/study" ringattn_cli -- -DRINGATTN_PYTHON=OFF || exit 1
echo "== built in $(($(date +%s) - T0)) s"
BIN=$PWD/build-study/bin/ringattn
"$BIN" bench --threads 2,16 --case '^prefill_fp32,^prefill_causal_fp32' --repeats 3 \
  2>&1 | tee "$OUT/study/bench_fp32.txt"
sweep() {  # sweep NAME [launch/sweep options...]
  local name=$1
  shift
  if (($(left) < 30)); then echo "== sweep $name skipped (budget)"; return; fi
  echo "== sweep $name ($(left) s left)"
  timeout $(($(left) - 10)) "$PY" launch/sweep --bin "$BIN" --out "$OUT/study/$name" "$@" \
    2>"$OUT/study/$name.progress" | tail -24
  tail -3 "$OUT/study/$name.progress"
}
COMMON=(--cases zigzag:causal --mode pass-kv --dim 128 --iters 1 --baseline-iters 1)
sweep h32_s32k "${COMMON[@]}" --seqlen 32768 --heads 32 --kv-heads 8 --cores 16 \
  --ulysses 1,2,4,8,16 --baselines allcore
sweep h8_s64k "${COMMON[@]}" --seqlen 65536 --heads 8 --ranks 8,16 --threads 1 \
  --ulysses 1,2,4,8 --baselines allcore
sweep h8_s128k "${COMMON[@]}" --seqlen 131072 --heads 8 --ranks 16 --threads 1 \
  --ulysses 1,4,8 --baselines allcore
echo "== done, $(left) s of the budget left"
