#!/usr/bin/env bash
# A/B of MLA absorbed decode (h_q = 128) between two backends of one ringattn binary,
# alternated A, B for ROUNDS rounds on 1 and 2 threads (the runs behind
# docs/results/mla_dpbf16_ab_vm.txt). Usage:
#   docs/results/mla_decode_ab.sh [BIN] [ROUNDS] [wall|cpu]
# with A_BACKEND (default cpu-avx512: the fp32 tiles) and B_BACKEND (default auto), e.g. on a
# Xeon with AMX: A_BACKEND=cpu-avx512-bf16 B_BACKEND=cpu-amx.
#   wall: median ms of `ringattn bench` per run, then the median over rounds and the ratio A/B
#         (cases CASES, default the bf16 and fp8 b1 h128 s8192 decode).
#   cpu:  CPU time in the MLA kernels per call: perf record -e cpu-clock -F 4000 over one bench
#         process (repeats 10 + 1 warm-up call), samples in ringattn::detail::mla:: symbols;
#         steadier than wall clock on a shared machine (needs perf).
set -euo pipefail
bin=${1:-build/rel/bin/ringattn}
rounds=${2:-4}
mode=${3:-wall}
a_be=${A_BACKEND:-cpu-avx512}
b_be=${B_BACKEND:-auto}
cases=${CASES:-'^mla_decode_bf16_b1_h128_s8192$,^mla_decode_fp8_b1_h128_s8192$'}
tmp=$(mktemp)
trap 'rm -f "$tmp" "$tmp.perf" "$tmp.out"' EXIT
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
uptime
for r in $(seq 1 "$rounds"); do
  for side in A B; do
    be=$([ "$side" = A ] && echo "$a_be" || echo "$b_be")
    if [ "$mode" = cpu ]; then
      rep=10
      for th in 1 2; do
        perf record -q -e cpu-clock -F 4000 -o "$tmp.perf" "$bin" bench --backend "$be" \
          --case "$cases" --threads "$th" --repeats $rep >"$tmp.out" 2>&1
        n=$(perf report -i "$tmp.perf" --stdio -n --no-children --sort symbol 2>/dev/null |
              grep -E "mla::" | awk '{s += $2} END {print s + 0}')
        ms=$(echo "$n / 4 / ($rep + 1)" | bc -l)
        printf 'round %s %s %s threads=%s kernel_cpu_ms_per_call=%.3f\n' "$r" "$side" "$be" "$th" "$ms"
        echo "$side all $th $ms" >>"$tmp"
      done
    else
      "$bin" bench --backend "$be" --case "$cases" --threads 1,2 --repeats 5 2>&1 | grep -E "^mla" |
        while read -r name th ms rest; do
          echo "round $r $side $be $name t=$th $ms ms $(echo "$rest" | grep -oE '[0-9.]+ GFLOP/s')"
          echo "$side $name $th $ms" >>"$tmp"
        done
    fi
  done
done
echo "== median over rounds, ratio A/B (A = $a_be, B = $b_be)"
for key in $(awk '{print $2 "@" $3}' "$tmp" | sort -u); do
  n=${key%@*}
  t=${key#*@}
  a=$(awk -v n="$n" -v t="$t" '$1 == "A" && $2 == n && $3 == t {print $4}' "$tmp" | median)
  b=$(awk -v n="$n" -v t="$t" '$1 == "B" && $2 == n && $3 == t {print $4}' "$tmp" | median)
  printf '%s threads=%s  A %.3f ms  B %.3f ms  ratio %.2fx\n' "$n" "$t" "$a" "$b" "$(echo "$a / $b" | bc -l)"
done
