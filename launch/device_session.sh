#!/usr/bin/env bash
# Session, Ulysses and CLI front-door figures on the 16-core Xeon, one device call, after
# launch/device_python.sh has built build-py (or with BIN pointing at another ringattn; when
# BIN does not exist and DEBS names .deb folders, the CLI is built first, launch/device_common.sh):
#   [DEBS="DIR..."] launch/device_session.sh [OUT_DIR] [BIN]
# Parts (PARTS="a b c d e", default all):
#   a  machine read bandwidth (ringattn bench decode_bf16 at 16 threads: GB/s and % of it)
#   b  decode over a 1M-token context, b = 1, GQA 32/8, d 128, bf16: 16 ranks x 1 thread
#      against 1 rank x 16 threads (context filled without the prefill's attention); the
#      step's merge share apart from the imbalance wait, also with --merge-after-barrier
#   c  extend against a 64K context at 16 ranks: 128 and 16384 new tokens, auto, pass-Q, pass-KV
#   d  time to first token, 16 ranks x 1 thread, causal zigzag prefill of 32K, 64K and 128K
#      tokens, against the same causal attention in one process on 16 threads (32K, 128K)
#   e  Ulysses x ring at 16 ranks, s = 32768, h 32/8, causal zigzag: U = 1, 2, 4, 8
#   f  the scaling study of docs/scaling.md: launch/sweep with launch/sweeps/xeon_study.toml
#      and launch/sweeps/node_split.toml (s = 32768 only), CSV and JSON lines in OUT/sweep-*
#      (plots where matplotlib is installed; else `launch/sweep --report-only` elsewhere)
#   g  ring against pure Ulysses (U = ranks) on every ranks x threads split of the 16 cores,
#      s = 32768, h 32/8, fp32 causal zigzag (the issue's "Ulysses within 10 % of the ring"); G_ITERS
#      timed runs each (median; the first call of a process also pays first-touch page faults)
#   h  fp8 against bf16 KV-cache decode (ringattn bench decode_fp8_vs_bf16), 2 and 16 threads;
#      fp32 prefill at 16 threads against PyTorch SDPA fp32 (launch/compare_torch.py)
#   i  where a 128K ring's time goes outside its per-step columns: 16 ranks x 1 thread,
#      s = 131072, h 8, fp32 causal zigzag, one call (--iters 1: first-touch page faults of
#      every buffer included) against the median of 3 calls in one process
set -uo pipefail
OUT=${1:-out/device_session}
BIN=${2:-build-py/bin/ringattn}
PARTS=${PARTS:-a b c d e f}
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [[ ! -x $BIN && -n ${DEBS:-} ]]; then
  source "$(dirname "$0")/device_common.sh"
  # shellcheck disable=SC2086  # DEBS is a list
  device_unpack_debs $DEBS
  device_build build-session "$OUT/build" ringattn_cli -- -DRINGATTN_PYTHON=OFF \
    -DRINGATTN_BUILD_TESTS=OFF || exit 1
  BIN=$PWD/build-session/bin/ringattn
fi
MPI="mpirun --oversubscribe --bind-to core --map-by core"
G="--heads 32 --kv-heads 8 --dim 128 --dtype bf16"
has() { [[ " $PARTS " == *" $1 "* ]]; }
run() { echo "\$ $*" | tee -a "$OUT/session.txt"; "$@" 2>&1 | tee -a "$OUT/session.txt"; }
echo "== host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cpus" | tee -a "$OUT/session.txt"
has a && run "$BIN" bench --threads 16 --case '^decode_bf16' --repeats 3
if has b; then
  run $MPI -np 16 "$BIN" session --prompt-len 1048576 --decode-steps 30 $G --threads 1 \
    --skip-prefill-attention --json
  run $MPI -np 16 "$BIN" session --prompt-len 1048576 --decode-steps 30 $G --threads 1 \
    --skip-prefill-attention --merge-after-barrier --json
  run mpirun --bind-to none -np 1 "$BIN" session --prompt-len 1048576 --decode-steps 10 $G \
    --threads 16 --skip-prefill-attention --json
fi
if has c; then
  for s1 in 128 16384; do
    for m in auto pass-q pass-kv; do
      run $MPI -np 16 "$BIN" session --prompt-len 65536 --extend-len $s1 --extend-mode $m $G \
        --threads 1 --skip-prefill-attention --json
    done
  done
fi
if has d; then
  for s in 32768 65536 131072; do
    run $MPI -np 16 "$BIN" session --prompt-len $s --decode-steps 2 $G --threads 1 --json
  done
  # the same causal attention in one process on all 16 cores
  for s in 32768 131072; do
    run mpirun --bind-to none -np 1 "$BIN" ring --seqlen $s $G --causal --threads 16 --json
  done
fi
if has e; then
  for u in 1 2 4 8; do
    run $MPI -np 16 "$BIN" ring --ulysses $u --seqlen 32768 $G --causal --layout zigzag \
      --threads 1 --iters 2 --json
  done
fi
if has f; then
  PY=$(command -v python3)
  "$PY" launch/sweep --config launch/sweeps/xeon_study.toml --bin "$BIN" --out "$OUT/sweep-study" \
    2>&1 | tail -30 | tee -a "$OUT/session.txt"
  "$PY" launch/sweep --config launch/sweeps/node_split.toml --bin "$BIN" --seqlen 32768 \
    --out "$OUT/sweep-split" 2>&1 | tail -12 | tee -a "$OUT/session.txt"
fi
if has g; then
  F="--heads 32 --kv-heads 8 --dim 128 --dtype fp32 --seqlen 32768 --causal --layout zigzag --iters ${G_ITERS:-1}"
  for rt in 1:16 2:8 4:4 8:2 16:1; do
    r=${rt%:*} t=${rt#*:}
    for u in $(printf '%s\n' 1 "$r" | sort -un); do
      run launch/run -n "$r" -t "$t" -- "$BIN" ring --ulysses "$u" $F --threads "$t" --json
    done
  done
fi
if has h; then
  run "$BIN" bench --threads 2,16 --case '^decode_fp8_vs_bf16' --repeats 5
  run "$BIN" bench --threads 2,16 --case '^prefill_fp32,^prefill_causal_fp32' --repeats 3
  run python3 launch/compare_torch.py --threads 16 --dtype fp32 --prefill-only --repeats 3
fi
if has i; then
  for it in 1 3; do
    run $MPI -np 16 "$BIN" ring --seqlen 131072 --heads 8 --kv-heads 8 --dim 128 --dtype fp32 \
      --causal --layout zigzag --threads 1 --iters $it --json
  done
fi
