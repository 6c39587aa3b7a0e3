#!/usr/bin/env bash
# Starts a complete local replicated volume: three nbd-downstairs processes (regions under DATA/ds0..2,
# created on first run) and nbd-server serving them as export "vol0" (also the default, empty name)
# on 127.0.0.1:10809, its control socket at DATA/control.sock (nbd-server status --control DATA/control.sock).
# Ctrl-C stops all of it; the next run finds the same data.
# Usage: scripts/run.sh [--data DIR] [--size SIZE] [--tls] [extra nbd-server options]
#   --tls  mutual TLS on the upstairs-downstairs links (certificates made by nbd-certs under DATA/tls
#          on first use); without it the links stay plaintext, which is allowed on loopback only
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data="$root/data"
size=1GiB
tls=false
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --tls) tls=true; shift ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$data"
data=$(cd "$data" && pwd)
echo "building (Release)..."
dotnet build "$root/src/NbdFrontend/NbdFrontend.csproj" -c Release -v quiet -nologo >/dev/null
dotnet build "$root/src/Downstairs/Downstairs.csproj" -c Release -v quiet -nologo >/dev/null
bin_ds="$root/src/Downstairs/bin/Release/net10.0/nbd-downstairs"
bin_up="$root/src/NbdFrontend/bin/Release/net10.0/nbd-server"

ds_tls=()
up_tls=()
if [ "$tls" = true ]; then
  dotnet build "$root/src/Tools/Certs/Certs.csproj" -c Release -v quiet -nologo >/dev/null
  certs="$root/src/Tools/Certs/bin/Release/net10.0/nbd-certs"
  if [ ! -e "$data/tls/ca/ca-cert.pem" ]; then
    "$certs" ca --dir "$data/tls/ca" --name "run.sh CA"
    "$certs" client --ca "$data/tls/ca" --name upstairs --out "$data/tls/upstairs"
    for i in 0 1 2; do
      "$certs" server --ca "$data/tls/ca" --name "ds$i" --ip 127.0.0.1 --out "$data/tls/ds$i"
    done
  fi
  up_tls=(--downstairs-tls-dir "$data/tls/upstairs")
fi

pids=()
stop() {
  trap - INT TERM EXIT
  # The upstairs first: it drains the guest's requests and flushes before the replicas go.
  if [ -n "${upstairs:-}" ]; then
    kill -TERM "$upstairs" 2>/dev/null || true
    wait "$upstairs" 2>/dev/null || true
  fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

ports=(10820 10821 10822)
for i in 0 1 2; do
  dir="$data/ds$i"
  if [ ! -e "$dir/region.meta" ]; then
    # 4 MiB extents: live repair copies (and briefly holds guest writes to) one extent at a time.
    "$bin_ds" create --data "$dir" --size "$size" --block-size 4096 --extent-size 1024 >/dev/null
    echo "created region $dir ($size)"
  fi
  # Own session: a Ctrl-C in the terminal reaches nbd-server (which drains and flushes), not the replicas,
  # which are stopped after it.
  ds_tls=()
  if [ "$tls" = true ]; then ds_tls=(--tls-dir "$data/tls/ds$i" --tls-allow-client upstairs); fi
  setsid "$bin_ds" run --data "$dir" --listen "127.0.0.1:${ports[$i]}" "${ds_tls[@]}" >"$data/ds$i.log" 2>&1 &
  pids+=($!)
done
sleep 1

cat <<MSG
nbd-server: replicated volume "vol0" on 127.0.0.1:10809 (replicas on ports ${ports[*]}$([ "$tls" = true ] && echo ", mutual TLS"), logs in $data/ds*.log)
  attach:  nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0
  look:    nbdinfo nbd://127.0.0.1:10809/vol0
           $bin_up status --watch --control $data/control.sock
  poke:    qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://127.0.0.1:10809/vol0
Ctrl-C stops it; the next run finds the same data.
MSG
"$bin_up" --downstairs "127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}" --export vol0 --control "$data/control.sock" "${up_tls[@]}" "${args[@]}" &
upstairs=$!
wait "$upstairs"
