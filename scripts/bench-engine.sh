#!/usr/bin/env bash
# The engine's 4 KiB write and read path (BenchmarkDotNet, bench/EngineBench) against replicas that
# answer inside the call: the engine's own time and allocations per IO, without sockets or disks.
# The "Allocated" column must read "-": nothing is allocated per IO in steady state.
# Usage: scripts/bench-engine.sh [BenchmarkDotNet arguments, e.g. --job short]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dotnet run -c Release --project bench/EngineBench -- --filter '*' "$@"
