#!/usr/bin/env bash
# Starts the local volume: NBD on 127.0.0.1:10809, export "vol0" (also the default, empty name).
# Usage: scripts/run.sh [--data DIR] [extra nbd-server options]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data="$root/data"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$data"
dotnet build "$root/src/NbdFrontend/NbdFrontend.csproj" -c Release -v quiet -nologo >/dev/null
server="$root/src/NbdFrontend/bin/Release/net10.0/nbd-server"
image="$data/vol0.img"
size_arg=()
[ -e "$image" ] || size_arg=(--size 1GiB)
cat <<MSG
nbd-server: serving $image as export "vol0" on 127.0.0.1:10809
  attach:  nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0
  look:    nbdinfo nbd://127.0.0.1:10809/vol0
  poke:    qemu-io -f raw -c 'read -v 0 512' nbd://127.0.0.1:10809/vol0
Ctrl-C stops it; the next run finds the same data.
MSG
exec "$server" --file "$image" "${size_arg[@]}" --export vol0 "${args[@]}"
