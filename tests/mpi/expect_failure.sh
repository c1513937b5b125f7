#!/usr/bin/env bash
# Usage: expect_failure.sh EXPECTED_RC PATTERN COUNT -- mpirun ...
# 1. Runs the command: mpirun must exit with EXPECTED_RC (the code the ranks returned).
# 2. Runs it again with mpirun told not to kill the other ranks at the first non-zero
#    exit, and checks that PATTERN appears on exactly COUNT lines (one per rank).
set -u
want_rc=$1 pattern=$2 count=$3
shift 4
out=$("$@" 2>&1)
rc=$?
all=$(OMPI_MCA_orte_abort_on_non_zero_status=0 "$@" 2>&1)
n=$(grep -c -- "$pattern" <<<"$all")
if [[ $rc -ne $want_rc || $n -ne $count ]]; then
  echo "$out"
  echo "$all"
  echo "expected exit $want_rc and $count lines matching '$pattern'; got exit $rc and $n lines" >&2
  exit 1
fi
echo "ok: exit $rc, $n x '$pattern'"
