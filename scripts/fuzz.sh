#!/usr/bin/env bash
# Runs the wire fuzz tests (NUnit Category=Fuzz: NBD handshake and requests into the frontend,
# downstairs frames into the server, a lying downstairs against the client and the engine) for
# SECONDS each instead of the few seconds they get in the normal test run.
# Every test prints its seed; a failure replays with NBD_FUZZ_SEED=<seed> scripts/fuzz.sh SECONDS.
# Tests marked [Explicit] (known failures until another branch lands) run only by name, e.g.
#   NBD_FUZZ_SECONDS=60 dotnet test test/Downstairs.Tests -c Release --filter Name~Range_overflow_frames
# Usage: scripts/fuzz.sh [SECONDS]   (default 60, at most 3000)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${1:-60}
case "$seconds" in -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ] || [ "$seconds" -gt 3000 ]; then
  echo "fuzz.sh: SECONDS must be 1 to 3000 (got '$seconds')" >&2
  exit 2
fi
projects=(test/NbdFrontend.Tests test/Downstairs.Tests test/ReplicaEngine.Tests)
echo "fuzz.sh: building..."
for p in "${projects[@]}"; do
  dotnet build "$p" -c Release -nologo -v quiet >/dev/null
done
echo "fuzz.sh: NBD_FUZZ_SECONDS=$seconds per fuzz test (5 tests: about $((seconds * 5 / 60 + 1)) min)${NBD_FUZZ_SEED:+, NBD_FUZZ_SEED=$NBD_FUZZ_SEED}"
status=0
for p in "${projects[@]}"; do
  NBD_FUZZ_SECONDS=$seconds dotnet test "$p" -c Release --no-build --filter "Category=Fuzz" \
    --logger "console;verbosity=detailed" || status=1
done
[ "$status" -eq 0 ] && echo "fuzz.sh: no failures in ${seconds} s per test" || echo "fuzz.sh: FAILED (the seed is printed above the failure)"
exit "$status"
