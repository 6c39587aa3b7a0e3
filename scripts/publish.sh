#!/usr/bin/env bash
# Builds nbd-server, nbd-downstairs, nbd-certs and nbd-verify as self-contained single-file ReadyToRun executables for
# linux-x64 (no .NET needed on the target host) into artifacts/publish/linux-x64.
# Usage: scripts/publish.sh [--output DIR] [--no-r2r] [--rid RID]
#   --no-r2r   skip ReadyToRun (precompiled code: faster start, ~2x size; its compile takes
#              minutes on a small machine, so the tests publish without it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rid=linux-x64
out=""
r2r=true
while [ $# -gt 0 ]; do
  case "$1" in
    --output) out=$2; shift 2 ;;
    --no-r2r) r2r=false; shift ;;
    --rid) rid=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "publish.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
out=${out:-$root/artifacts/publish/$rid}
mkdir -p "$out"
# Intermediate files under artifacts/ (not src/*/obj): a RID-specific restore there would disturb
# concurrent `dotnet build`s of the same projects.
build="$root/artifacts/publish-build/$rid-$([ "$r2r" = true ] && echo r2r || echo jit)"
for project in src/NbdFrontend/NbdFrontend.csproj src/Downstairs/Downstairs.csproj src/Tools/Certs/Certs.csproj src/Tools/Verify/Verify.csproj; do
  echo "publish.sh: $project ($rid, self-contained, single file, ReadyToRun=$r2r)"
  dotnet publish "$root/$project" -c Release -r "$rid" --self-contained true -nologo -v quiet \
    -p:PublishSingleFile=true -p:PublishReadyToRun=$r2r -p:DebugType=embedded \
    -p:IncludeNativeLibrariesForSelfExtract=false -p:ErrorOnDuplicatePublishOutputFiles=false \
    --artifacts-path "$build" -o "$out"
done
rm -f "$out"/*.pdb
ls -l "$out"/nbd-server "$out"/nbd-downstairs "$out"/nbd-certs "$out"/nbd-verify
