#!/usr/bin/env bash
# The Python package on a machine without Debian's Boost / nlohmann-json packages but
# with a Python 3 that has PyTorch 2.x, pybind11 and Python.h (the 16-core Xeon bench
# machine): builds the CLI and the package against .debs unpacked with dpkg -x, runs the
# Python tests (there the SDPA comparisons run too), then launch/bench_python.py.
#   launch/device_python.sh [DEB_DIR] [OUT_DIR] [THREADS]
# DEB_DIR holds libboost1.74-dev, libboost-program-options1.74-dev,
# libboost-program-options1.74.0 and nlohmann-json3-dev .debs (apt-get download on Debian 12).
set -uo pipefail
DEBS=${1:-.deps/boost-debs} OUT_DIR=${2:-out/device} THREADS=${3:-$(nproc)}
mkdir -p "$OUT_DIR"
PY=$(command -v python3)
ROOT=$PWD/.deps/deb-root
mkdir -p "$ROOT"
for d in "$DEBS"/*.deb; do dpkg -x "$d" "$ROOT"; done
echo "== host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cpus; python $PY"
t0=$(date +%s)
# The system g++ (the bench machine's default CXX links libstdc++ statically, which the
# CMake build refuses for the Python module: see src/python/CMakeLists.txt).
CXX_SYS=$(command -v /usr/bin/g++ || command -v g++)
CC_SYS=$(command -v /usr/bin/gcc || command -v gcc)
cmake -S . -B build-py -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$CXX_SYS" \
  -DCMAKE_C_COMPILER="$CC_SYS" -DRINGATTN_BUILD_TESTS=OFF \
  -DRINGATTN_BUILD_EXAMPLES=OFF -DRINGATTN_PYTHON=ON -DRINGATTN_PYTHON_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DBoost_ROOT="$ROOT/usr" \
  -DBoost_NO_SYSTEM_PATHS=ON -DCMAKE_PREFIX_PATH="$ROOT/usr" >"$OUT_DIR/cmake.log" 2>&1 ||
  { tail -30 "$OUT_DIR/cmake.log"; exit 1; }
ninja -C build-py ringattn_python ringattn_cli >"$OUT_DIR/build.log" 2>&1 || { tail -40 "$OUT_DIR/build.log"; exit 1; }
echo "== built in $(($(date +%s) - t0)) s"
export PYTHONPATH=$PWD/build-py/python PYTHONUNBUFFERED=1
echo "== python tests (single process)"
for t in tests/python/test_*.py; do
  OMP_NUM_THREADS=4 "$PY" -X faulthandler -m pytest -q -p no:cacheprovider "$t" >"$OUT_DIR/$(basename "$t" .py).log" 2>&1
  echo "$t: exit $? $(tail -1 "$OUT_DIR/$(basename "$t" .py).log")"
done
echo "== bench_python, $THREADS threads"
"$PY" launch/bench_python.py --threads "$THREADS" --repeats 5 2>&1 | tee "$OUT_DIR/bench_python_${THREADS}t.txt"
echo "== bench_python decode, 1 thread (the Python overhead without OpenMP workers spinning beside it)"
"$PY" launch/bench_python.py --threads 1 --case decode --decode-repeats 400 2>&1 | tee "$OUT_DIR/bench_python_decode_1t.txt"
