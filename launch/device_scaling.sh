#!/usr/bin/env bash
# The 16-core scaling measurement in one go (a machine with CMake, ninja, Open MPI and
# g++, but no Boost.Program_options): builds the CLI against Boost unpacked from
# Debian .deb files, then
#   (a) contention: the per-rank problem (s = S/sqrt(16) non-causal: 1/16 of the
#       non-causal work) on one core alone, then 16 copies at once, one per core,
#   (b) the efficiency table (launch/efficiency) for non-causal zigzag, causal zigzag
#       and causal contiguous at s = S,
#   (c) causal zigzag with 8 query pieces per chunk (--piece-rows S/256) against
#       the default whole chunks per kernel call (the CPU kernel has no run-time
#       query-block size to tune: kPrefillRows is a compile-time constant).
#   (d) T1 with every core busy: the whole causal problem on one core while 15
#       copies of it run on the others (E against that T1 removes the machine's
#       all-core slowdown from the comparison),
#   (e) 16-rank causal zigzag variants: pass-KV, pass-Q, two pieces per chunk,
#       with the spread of per-rank compute (the ring runs at its slowest rank's pace),
#   (f) `ringattn bench` decode and prefill cases on 2 pinned cores (a quiet machine
#       for the kernel figures the shared development VM measures only noisily),
#   (g) launch/sweep: every ranks x threads split of 16 cores and 1..16 ranks x 1 thread,
#       causal zigzag, pass-KV and pass-Q (results.jsonl / results.csv in
#       $OUT_DIR/sweep-split and $OUT_DIR/sweep-ranks;
#       plots drawn there when matplotlib is installed, else afterwards with
#       `launch/sweep ... --out DIR --report-only` on a machine that has it).
# Results go to $OUT_DIR (log, CSV). PARTS (default "a b d e") picks parts.
#   [PARTS="d e"] launch/device_scaling.sh [DEB_DIR] [OUT_DIR] [S]
# DEB_DIR holds libboost1.74-dev, libboost-program-options1.74-dev and
# libboost-program-options1.74.0 .debs (apt-get download ... on a Debian 12 machine).
set -uo pipefail
DEBS=${1:-.deps/boost-debs} OUT_DIR=${2:-out/device} S=${3:-32768}
mkdir -p "$OUT_DIR"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
log() { echo "== $*"; }
ncores=$(nproc)
log "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $ncores cpus, $(mpirun --version | head -1)"

BOOST=$PWD/.deps/boost-root
mkdir -p "$BOOST"
for d in "$DEBS"/*.deb; do dpkg -x "$d" "$BOOST"; done
t0=$(date +%s)
cmake -S . -B build-dev -G Ninja -DRINGATTN_BUILD_TESTS=OFF -DRINGATTN_BUILD_EXAMPLES=OFF \
  -DBoost_ROOT="$BOOST/usr" -DBoost_NO_SYSTEM_PATHS=ON >"$OUT_DIR/cmake.log" 2>&1 ||
  { tail -30 "$OUT_DIR/cmake.log"; exit 1; }
ninja -C build-dev -j "$ncores" ringattn_cli >"$OUT_DIR/build.log" 2>&1 || { tail -40 "$OUT_DIR/build.log"; exit 1; }
BIN=build-dev/bin/ringattn
log "built in $(($(date +%s) - t0)) s: $($BIN --version 2>/dev/null | head -1)"
MHZ() { awk -F: '/cpu MHz/ {s+=$2; n++} END {if (n) printf "%.0f", s/n}' /proc/cpuinfo; }

PARTS=${PARTS:-a b d e}
# (a) contention
if [[ $PARTS == *a* ]]; then
sp=$(awk -v s="$S" 'BEGIN{printf "%d", s/4}')
one() {  # core
  OMP_NUM_THREADS=1 taskset -c "$1" mpirun --bind-to none -np 1 $BIN ring --seqlen "$sp" \
    --heads 8 --dim 128 --threads 1 --iters 3 --json | sed -n 's/.*"time_s":\([^,]*\).*/\1/p'
}
log "(a) per-rank problem: ring -np 1 --seqlen $sp non-causal (1/16 of s=$S non-causal)"
alone=$(one 0)
log "alone on core 0: $alone s (avg cpu MHz now $(MHZ))"
for ((c = 0; c < 16 && c < ncores; c++)); do one "$c" >"$OUT_DIR/contention_$c.txt" & done
sleep 2; mhz=$(MHZ); wait
all=$(cat "$OUT_DIR"/contention_*.txt | sort -g | tr '\n' ' ')
log "16 at once (sorted): $all (avg cpu MHz during: $mhz)"
awk -v a="$alone" -v l="$all" 'BEGIN{n=split(l,x," "); m=(n%2)?x[(n+1)/2]:(x[n/2]+x[n/2+1])/2;
  printf "== contention: median %.3f s vs alone %.3f s: %.2fx slower\n", m, a, m/a}'
fi

# (b) efficiency table; (c) causal zigzag with 8 pieces per chunk (--piece-rows
# S/256, the earlier default) against whole chunks per kernel call (the default now).
if [[ $PARTS == *b* ]]; then
log "(b, c) efficiency, 16 ranks x 1 thread, s=$S"
launch/efficiency --bin $BIN --ranks 16 --seqlen "$S" --repeat ${REPEAT:-1} --iters 2 \
  --cases "${CASES:-zigzag:full zigzag:causal contiguous:causal}" \
  --csv "$OUT_DIR/efficiency.csv"
fi
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$2"; }
if [[ $PARTS == *d* ]]; then
  log "(d) T1 (s=$S causal, one rank) alone, then with 15 copies on the other cores"
  t1() {  # core
    OMP_NUM_THREADS=1 taskset -c "$1" mpirun --bind-to none -np 1 $BIN ring --seqlen "$S" \
      --heads 8 --dim 128 --causal --threads 1 --iters 1 --json
  }
  log "T1 alone: $(field time_s "$(t1 0)") s"
  for ((c = 1; c < 16 && c < ncores; c++)); do t1 "$c" >/dev/null & done
  log "T1 with 15 busy cores: $(field time_s "$(t1 0)") s"
  wait
fi
if [[ $PARTS == *e* ]]; then
  log "(e) T16, s=$S causal zigzag (median of 3 iterations each)"
  for v in "--mode pass-kv" "--mode pass-q" "--mode pass-kv --piece-rows $((S / 64))" \
    "--mode pass-kv --no-progress"; do
    # shellcheck disable=SC2086
    j=$(OMP_NUM_THREADS=1 mpirun --bind-to core --map-by core -np 16 $BIN ring --seqlen "$S" \
      --heads 8 --dim 128 --causal --layout zigzag --threads 1 --iters 3 --json $v)
    log "$v: T16 $(field time_s "$j") s, per step compute $(field step_compute_s "$j") s," \
      "wait $(field step_wait_s "$j") s, $(field step_bytes "$j") bytes, per-rank compute" \
      "min $(field min_rank_compute_s "$j") s / max $(field max_rank_compute_s "$j") s"
  done
fi
if [[ $PARTS == *f* ]]; then
  log "(f) ringattn bench on cores 0-1"
  for be in auto cpu-avx2; do
    OMP_PROC_BIND=close taskset -c 0,1 $BIN bench --threads 1,2 --backend $be --repeats 9 \
      --case '^decode_' --json "$OUT_DIR/bench_$be.json" | tee "$OUT_DIR/bench_$be.txt"
  done
fi
if [[ $PARTS == *g* ]]; then
  log "(g) launch/sweep, s=$S causal zigzag: ranks x threads splits of 16 cores, 1..16 ranks"
  PY=$(command -v python3)
  for grid in "split --cores 16" "ranks --ranks 1,2,4,8,16 --threads 1"; do
    # shellcheck disable=SC2086
    "$PY" launch/sweep --bin "$BIN" ${grid#* } --seqlen "$S" --cases zigzag:causal \
      --mode pass-kv,pass-q --iters 2 --baseline-iters 1 --out "$OUT_DIR/sweep-${grid%% *}" || true
  done
fi
log "done in $(($(date +%s) - t0)) s"
