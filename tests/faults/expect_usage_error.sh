#!/bin/sh
# Usage: expect_usage_error.sh PATTERN -- command...
# Passes when the command exits with code 2 (bad usage) within 60 s and its
# stderr contains PATTERN (a grep -E expression naming the offending option).
set -u
pattern=$1
shift 2
err=$(timeout 60 "$@" 2>&1 >/dev/null)
rc=$?
if [ "$rc" -ne 2 ]; then
  printf '%s\n' "$err"
  echo "expected exit 2, got $rc: $*" >&2
  exit 1
fi
if ! printf '%s\n' "$err" | grep -Eq -- "$pattern"; then
  printf '%s\n' "$err"
  echo "exit 2 but the message does not match '$pattern': $*" >&2
  exit 1
fi
echo "ok: exit 2: $(printf '%s\n' "$err" | head -n 1)"
