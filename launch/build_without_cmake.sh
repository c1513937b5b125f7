#!/usr/bin/env bash
# Builds the library and the ring example with mpicxx alone (for machines without
# CMake packages for Boost; the CLI needs Boost.Program_options and is skipped).
#   launch/build_without_cmake.sh OUT_DIR
set -euo pipefail
out=${1:-build-plain}
mkdir -p "$out/obj" "$out/bin"
# ringattn::version() comes from project(VERSION) in CMakeLists.txt (src/version.cpp).
version=$(sed -n 's/^project(ringattn VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)
[[ -n $version ]] || { echo "build_without_cmake.sh: no project(ringattn VERSION ...) in CMakeLists.txt" >&2; exit 1; }
inc="-DRINGATTN_VERSION_STRING=\"$version\" -Ikernels/include -Ikernels/src -Icomm/include -Isrc/include -Isrc"
objs=()
for f in $(find kernels/src comm/src src -name '*.cpp' ! -path 'src/cli/*' ! -path 'src/python/*'); do
  o=$out/obj/$(echo "$f" | tr / _).o
  isa=""
  [[ $f == *_avx512.cpp ]] && isa="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c"
  [[ $f == *_avx2.cpp ]] && isa="-mavx2 -mfma -mf16c"
  [[ $f == *_avx512_bf16.cpp ]] && isa="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mavx512bf16"
  [[ $f == *_amx.cpp ]] && isa="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mavx512bf16 -mamx-tile -mamx-bf16"
  mpicxx -std=c++20 -O3 -DNDEBUG -fopenmp $isa $inc -c "$f" -o "$o" &
  objs+=("$o")
  while [[ $(jobs -r | wc -l) -ge ${JOBS:-16} ]]; do sleep 0.1; done
done
wait
mpicxx -std=c++20 -O3 -fopenmp $inc examples/ring_attention_example.cpp "${objs[@]}" \
  -o "$out/bin/example_ring_attention_example"
echo "built $out/bin/example_ring_attention_example"
