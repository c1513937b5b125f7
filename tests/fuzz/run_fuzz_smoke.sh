#!/bin/sh
# Fuzz smoke for CI: runs every libFuzzer target for a fixed time from its checked-in
# seed corpus. Builds nothing: configure and build the targets first, e.g.
#   cmake -S . -B build-fuzz -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
#         -DRINGATTN_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
#   ninja -C build-fuzz fuzz_kernels fuzz_npy
#   tests/fuzz/run_fuzz_smoke.sh build-fuzz 60
# Usage: run_fuzz_smoke.sh <builddir> [seconds per target, default 60]
# New inputs go to a scratch corpus (the checked-in one is never modified). A crash
# leaves crash-* / leak-* / timeout-* files in <builddir>/fuzz-artifacts/ and makes the
# script exit non-zero; turn each into a regression seed under corpus/<target>/.
set -eu
if [ $# -lt 1 ]; then
  echo "usage: $0 <builddir> [seconds]" >&2
  exit 2
fi
build=$1
seconds=${2:-60}
here=$(cd "$(dirname "$0")" && pwd)
artifacts="$build/fuzz-artifacts"
mkdir -p "$artifacts"
status=0
for target in fuzz_kernels fuzz_npy; do
  bin="$build/fuzz/$target"
  if [ ! -x "$bin" ]; then
    echo "run_fuzz_smoke: $bin not built (configure with -DRINGATTN_FUZZ=ON, clang++)" >&2
    exit 2
  fi
  scratch=$(mktemp -d)
  dict=""
  [ "$target" = fuzz_npy ] && dict="-dict=$here/npy.dict"
  echo "== $target: ${seconds}s"
  # -rss_limit_mb / -malloc_limit_mb: an input that makes the code allocate more than
  # 512 MB at once (e.g. trusting a huge declared shape) counts as a crash.
  if ! ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
      "$bin" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -malloc_limit_mb=512 \
      -max_len=4096 -print_final_stats=1 -artifact_prefix="$artifacts/$target-" $dict \
      "$scratch" "$here/corpus/$target"; then
    echo "run_fuzz_smoke: $target FAILED; reproducer in $artifacts" >&2
    status=1
  fi
  rm -rf "$scratch"
done
exit $status
