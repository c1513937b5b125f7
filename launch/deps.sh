# Sourced by the launch scripts: installs the Debian packages ringattn needs when
# any is missing (needs root or sudo), and sets the Open MPI environment that lets
# mpirun start as root and oversubscribe small machines.

RINGATTN_PACKAGES=(build-essential cmake ninja-build pkg-config
  libopenmpi-dev openmpi-bin libboost-program-options-dev libgtest-dev
  python3 python3-numpy)

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
