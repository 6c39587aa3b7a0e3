#!/usr/bin/env bash
# Benchmarks one nbd-downstairs against fio on the same filesystem, in the same run.
#
#   scripts/bench-downstairs.sh [--dir DIR] [--seconds N] [--size SIZE] [--extent-size BLOCKS]
#
# Patterns (each write pattern with a flush / fdatasync every 64 writes, like fio's fdatasync=64):
#   seqwrite 1M depth 32, randwrite 4k depth 32, randread 4k depth 32.
# The downstairs is driven by `nbd-downstairs bench` (the protocol's own client, DownstairsClient);
# fio writes the same pattern to a file in the same directory (buffered IO + fdatasync, which is
# exactly what the downstairs does). Prints both and the ratio; targets: >= 0.8x fio for 1M
# writes, >= 0.5x for 4k.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="" seconds=10 size=1GiB extent_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --extent-size) extent_args=(--extent-size "$2"); shift 2 ;;   # fewer, larger extents: fewer fdatasyncs per flush
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench-downstairs: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v fio >/dev/null || { echo "bench-downstairs: fio is not installed" >&2; exit 2; }
owned_dir=0
if [ -z "$dir" ]; then dir=$(mktemp -d /var/tmp/bench-downstairs.XXXXXX); owned_dir=1; fi
mkdir -p "$dir"
bin="$root/artifacts/bench-downstairs/bin"
log="$dir/downstairs.log"
ds_pid=""
cleanup() {
  [ -n "$ds_pid" ] && kill "$ds_pid" 2>/dev/null && wait "$ds_pid" 2>/dev/null
  if [ "$owned_dir" = 1 ]; then rm -rf "$dir"; else rm -rf "$dir/region" "$dir/fio.dat"; fi
}
trap cleanup EXIT

echo "bench-downstairs: building (Release)…" >&2
dotnet build "$root/src/Downstairs" -c Release -nologo -v quiet -o "$bin" >/dev/null
ds="dotnet $bin/nbd-downstairs.dll"

rm -rf "$dir/region"
$ds create --data "$dir/region" --size "$size" --block-size 4096 "${extent_args[@]}" >/dev/null
start_ds() { # extra run options…
  $ds run --data "$dir/region" --listen 127.0.0.1:0 "$@" >"$log" 2>&1 &
  ds_pid=$!
  port=""
  for _ in $(seq 1 100); do
    port=$(sed -n 's/.*Listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -1)
    [ -n "$port" ] && return 0
    kill -0 "$ds_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "bench-downstairs: downstairs did not start" >&2; cat "$log" >&2; exit 1
}
stop_ds() { kill "$ds_pid"; wait "$ds_pid" 2>/dev/null || true; ds_pid=""; }
start_ds

fs=$(df -T "$dir" | awk 'NR==2 {print $2 " on " $1}')
echo "bench-downstairs: $dir ($fs), region $size ${extent_args[*]:-(default extents)}, ${seconds}s per pattern, $(nproc) CPUs"

declare -A ds_iops fio_iops
run_ds() { # name pattern io-size [--fill]
  local out
  out=$($ds bench --target "127.0.0.1:$port" --pattern "$2" --io-size "$3" --depth 32 --seconds "$seconds" --flush-every 64 ${4:-})
  ds_iops[$1]=$(sed -n 's/.* iops=\([0-9]*\).*/\1/p' <<<"$out")
}
run_fio() { # name rw bs
  local extra=()
  [ "$2" != randread ] && extra=(--fdatasync=64)
  fio_iops[$1]=$(fio --name="$1" --filename="$dir/fio.dat" --size="$size" --rw="$2" --bs="$3" --iodepth=32 \
      --ioengine=io_uring --direct=0 --time_based --runtime="$seconds" --group_reporting "${extra[@]}" \
      --output-format=json | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"] + j["write"]["iops"]))')
}

names=(seqwrite-1M randwrite-4k randwrite-4k-sd randread-4k)
# --fill writes the whole region once first, as fio lays out its whole file before measuring:
# both then measure overwrites of allocated blocks.
run_ds seqwrite-1M seqwrite 1M --fill
run_ds randwrite-4k randwrite 4K
run_ds randread-4k randread 4K
stop_ds
start_ds --sticky-dirty
run_ds randwrite-4k-sd randwrite 4K
stop_ds
run_fio seqwrite-1M write 1M
run_fio randwrite-4k randwrite 4k
fio_iops[randwrite-4k-sd]=${fio_iops[randwrite-4k]}
run_fio randread-4k randread 4k

printf '%-14s %12s %12s %12s %12s %7s %7s\n' pattern ds-IOPS ds-MiB/s fio-IOPS fio-MiB/s ratio target
for n in "${names[@]}"; do
  case $n in *-1M) mib=1 target=0.8 ;; *) mib=0.00390625 target=0.5 ;; esac   # -sd: run --sticky-dirty
  [ "$n" = randread-4k ] && target="-"
  python3 - "$n" "${ds_iops[$n]}" "${fio_iops[$n]}" "$mib" "$target" <<'PY'
import sys
n, d, f, mib, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
ratio = d / f if f else 0
ok = "" if target == "-" else ("  ok" if ratio >= float(target) else "  BELOW")
print(f"{n:<14} {d:>12} {d*mib:>12.1f} {f:>12} {f*mib:>12.1f} {ratio:>7.2f} {target:>7}{ok}")
PY
done
