# Shared steps of the launch/device_*.sh scripts (sourced, not run): the device machine has
# CMake, ninja, g++, Open MPI and Python but not Boost.Program_options, nlohmann-json or
# GoogleTest, so their Debian .debs (apt-get download on Debian 12) are unpacked with dpkg -x
# and the build points CMake at them.
#   device_unpack_debs DEB_DIR...          unpack every .deb into $DEVICE_ROOT (.deps/deb-root)
#   device_build BUILD_DIR LOG_DIR TARGETS [-- CMAKE_ARGS...]
#                                          configure + build TARGETS (space separated) against
#                                          $DEVICE_ROOT; logs in LOG_DIR; returns 1 on failure
#                                          after printing the first errors
#   device_host_line                       one line naming the CPU, its core count and AMX flags
DEVICE_ROOT=${DEVICE_ROOT:-$PWD/.deps/deb-root}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

device_unpack_debs() {
  mkdir -p "$DEVICE_ROOT"
  local dir d
  for dir in "$@"; do for d in "$dir"/*.deb; do dpkg -x "$d" "$DEVICE_ROOT"; done; done
}

device_build() {
  local build=$1 logs=$2 targets=$3
  shift 3
  [[ ${1:-} == -- ]] && shift
  mkdir -p "$logs"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
    -DCMAKE_C_COMPILER=/usr/bin/gcc -DBoost_ROOT="$DEVICE_ROOT/usr" -DBoost_NO_SYSTEM_PATHS=ON \
    -DCMAKE_PREFIX_PATH="$DEVICE_ROOT/usr" "$@" >"$logs/cmake.log" 2>&1 ||
    { tail -30 "$logs/cmake.log"; return 1; }
  # shellcheck disable=SC2086  # TARGETS is a list
  ninja -C "$build" $targets >"$logs/build.log" 2>&1 ||
    { grep -B2 -A12 'error' "$logs/build.log" | head -60; return 1; }
}

device_host_line() {
  echo "== host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cpus;" \
    "flags: $(grep -m1 -o 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
}
