# Sourced by the launch scripts: installs the Debian packages ringattn needs when
# any is missing (needs root or sudo), and sets the Open MPI environment that lets
# mpirun start as root and oversubscribe small machines.

# The last lines are the Python package (pybind11 extension, its tests and the
# torch / mpi4py interop), nlohmann-json for the CLI's --json output and matplotlib
# for the plots of launch/sweep.
RINGATTN_PACKAGES=(build-essential cmake ninja-build pkg-config
  libopenmpi-dev openmpi-bin libboost-program-options-dev libgtest-dev
  python3 python3-numpy
  pybind11-dev python3-dev python3-pytest python3-torch python3-mpi4py nlohmann-json3-dev
  python3-matplotlib)

ringattn_install_deps() {
  local missing=()
  local p
  for p in "${RINGATTN_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "ringattn: installing missing packages: ${missing[*]}"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# mpirun as root, and more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1

ringattn_jobs() { nproc 2>/dev/null || echo 2; }

# Runs "$@" as root: directly when root already, else through sudo.
ringattn_as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  else
    sudo "$@"
  fi
}
