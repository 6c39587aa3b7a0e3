#!/usr/bin/env bash
# Runs the engine's randomized model test (NUnit Category=Model in test/ReplicaEngine.Tests: random
# guest IO checked against an in-memory copy of the volume, one replica at a time disconnected,
# killed, failing writes or flushes, rotting, slow or stuck, then healed and repaired) for STEPS
# steps instead of the few thousand it gets in the normal test run.
# The run prints its seed; a failure replays with scripts/model.sh STEPS SEED (same operations and
# faults in the same order; the engine's own thread interleaving still varies).
# NBD_MODEL_FAULTS=Disconnect,Down,... limits the fault kinds (Disconnect, Down, WriteErrors,
# FlushErrors, Rot, Slow, Stuck), e.g. to look past a known bug; a replay needs the same list.
# Usage: scripts/model.sh [STEPS] [SEED]   (STEPS default 50000, at most 1000000; SEED default random)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
steps=${1:-50000}
seed=${2:-}
case "$steps" in -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
if ! [[ "$steps" =~ ^[0-9]+$ ]] || [ "$steps" -lt 1 ] || [ "$steps" -gt 1000000 ]; then
  echo "model.sh: STEPS must be 1 to 1000000 (got '$steps')" >&2
  exit 2
fi
if [ -n "$seed" ] && ! [[ "$seed" =~ ^-?[0-9]+$ ]]; then
  echo "model.sh: SEED must be an integer (got '$seed')" >&2
  exit 2
fi
project=test/ReplicaEngine.Tests
echo "model.sh: building..."
dotnet build "$project" -c Release -nologo -v quiet >/dev/null
echo "model.sh: NBD_MODEL_STEPS=$steps${seed:+, NBD_MODEL_SEED=$seed}${NBD_MODEL_FAULTS:+, NBD_MODEL_FAULTS=$NBD_MODEL_FAULTS}"
status=0
NBD_MODEL_STEPS=$steps NBD_MODEL_SEED=$seed dotnet test "$project" -c Release --no-build --filter "Category=Model" \
  --logger "console;verbosity=detailed" || status=1
[ "$status" -eq 0 ] && echo "model.sh: no failures in $steps steps" || echo "model.sh: FAILED (the seed is printed above the failure)"
exit "$status"
