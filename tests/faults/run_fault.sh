#!/bin/bash
# Fault-injection driver for ringattn under mpirun. Every scenario asserts that the
# job ENDS (no hang) within a bound, with a non-zero exit, and that the output says
# what failed. Output of mpirun is tagged (--tag-output: "[job,rank]<stderr>:") so
# that "on rank 0's stderr" can be checked.
#
# Usage: run_fault.sh SCENARIO MPIEXEC RINGATTN
#   sigkill     rank 1 of 3 is killed with SIGKILL mid-ring (its PID comes from a
#               wrapper `sh -c 'echo $$ > pidfile; exec ringattn ring ...'`)
#   early_exit  rank 1 of 2 exits (status 0) without ever joining the job
#   throw       rank 1 of 2 throws during setup (an option only it has is invalid):
#               every rank exits 2 and rank 0's stderr carries the message
#   mismatch    ranks disagree on an option (--causal only on rank 1): consistency
#               check before the first ring step stops the job with one message
#   oom         rank 1 of 2 runs under `ulimit -v`: its allocation fails and the job
#               reports "out of memory" (exit 1), not a segfault
#   oom_single  the same in a single process (no mpirun)
set -u
scenario=$1 mpiexec=$2 ringattn=$3
bound=30  # seconds: "ends within a bounded time"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mpi=("$mpiexec" --oversubscribe --tag-output)
small=(--heads 2 --kv-heads 1 --dim 32 --threads 1)
# Long enough to be mid-ring when killed (each iteration is a full ring pass).
long=(ring --seqlen 2048 --heads 4 --kv-heads 2 --dim 64 --iters 100000 --threads 1 --causal)

fail() {
  echo "--- output:"
  cat "$tmp/out" 2>/dev/null
  echo "FAIL ($scenario): $*" >&2
  exit 1
}

# Runs "$@" in the background, records its start; wait_job waits up to $bound.
start_job() {
  t0=$(date +%s)
  "$@" >"$tmp/out" 2>&1 &
  job=$!
}
wait_job() {
  local waited=0
  while kill -0 "$job" 2>/dev/null; do
    if [ "$waited" -ge $((bound * 10)) ]; then
      kill -9 "$job" 2>/dev/null
      fail "job still running after ${bound}s (hang)"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  wait "$job"
  rc=$?
  elapsed=$(($(date +%s) - t0))
}

case "$scenario" in
  sigkill)
    start_job "${mpi[@]}" -np 3 sh -c "echo \$\$ > $tmp/pid.\$OMPI_COMM_WORLD_RANK; exec $ringattn ${long[*]}"
    for _ in $(seq 300); do [ -s "$tmp/pid.1" ] && break; sleep 0.1; done
    [ -s "$tmp/pid.1" ] || fail "rank 1 never started"
    sleep 3  # MPI_Init and the first ring steps
    kill -0 "$job" 2>/dev/null || fail "job ended before the kill (rc file: $(cat "$tmp/out" | tail -3))"
    t0=$(date +%s)
    kill -9 "$(cat "$tmp/pid.1")"
    wait_job
    [ "$rc" -ne 0 ] || fail "exit status 0 after a rank was killed"
    grep -Eiq "rank 1\b.*(signal 9|killed)|process rank 1|rank 1 with PID" "$tmp/out" ||
      fail "output does not name rank 1 as the failed rank"
    ;;
  early_exit)
    start_job "${mpi[@]}" -np 1 "$ringattn" "${long[@]}" : -np 1 sh -c 'sleep 1; exit 0'
    wait_job
    [ "$rc" -ne 0 ] || fail "exit status 0 although rank 1 left early"
    grep -Eiq "rank 1\b" "$tmp/out" || fail "output does not name rank 1"
    ;;
  throw)
    start_job "${mpi[@]}" -np 1 "$ringattn" ring --seqlen 64 "${small[@]}" \
      : -np 1 "$ringattn" ring --seqlen 64 "${small[@]}" --backend no-such-backend
    wait_job
    [ "$rc" -eq 2 ] || fail "exit status $rc, expected 2 (bad usage on one rank)"
    grep -Eq "^\[[0-9]+,0\]<stderr>:.*no-such-backend" "$tmp/out" ||
      fail "rank 0's stderr does not carry rank 1's message"
    ;;
  mismatch)
    start_job "${mpi[@]}" -np 1 "$ringattn" ring --seqlen 64 "${small[@]}" \
      : -np 1 "$ringattn" ring --seqlen 64 "${small[@]}" --causal
    wait_job
    [ "$rc" -ne 0 ] || fail "exit status 0 although ranks disagree on --causal"
    grep -Eq "^\[[0-9]+,0\]<stderr>:.*(disagree|mismatch).*causal" "$tmp/out" ||
      fail "rank 0's stderr does not report the disagreement on causal"
    ;;
  oom)
    # ~1 GB of Q/K/V/out per rank; rank 1 may map only 1 GB in all (libraries included).
    start_job "${mpi[@]}" -np 1 "$ringattn" ring --seqlen 65536 --heads 16 --kv-heads 16 \
      --dim 128 --threads 1 : -np 1 sh -c "ulimit -v 1000000; exec $ringattn ring --seqlen 65536 \
      --heads 16 --kv-heads 16 --dim 128 --threads 1"
    wait_job
    [ "$rc" -eq 1 ] || fail "exit status $rc, expected 1 (resource error)"
    grep -Eiq "out of memory" "$tmp/out" || fail "no 'out of memory' message"
    grep -Eiq "segmentation|signal 11|core dumped" "$tmp/out" && fail "crashed instead of reporting"
    ;;
  oom_single)
    # One process (MPI singleton): the allocation failure surfaces as an exception
    # and main reports it.
    start_job sh -c "ulimit -v 1000000; exec $ringattn ring --seqlen 65536 --heads 16 --kv-heads 16 \
      --dim 128 --threads 1"
    wait_job
    [ "$rc" -eq 1 ] || fail "exit status $rc, expected 1 (resource error)"
    grep -Eiq "out of memory" "$tmp/out" || fail "no 'out of memory' message"
    ;;
  *)
    echo "unknown scenario '$scenario'" >&2
    exit 2
    ;;
esac
echo "ok: $scenario: exit $rc after ${elapsed}s"
grep -Ei "error|rank" "$tmp/out" | head -n 3
