#!/usr/bin/env bash
# Checks that QoS holds a volume to its limits: fio (ioengine=nbd) drives an nbd-server file volume
# harder than the limit, and the rate it measures must be within ±TOLERANCE % (default 10) of it.
#   1 read IOPS      --qos-read-iops IOPS from the command line; 4k randread, 1 connection
#   2 shared         the same limit, 4 connections (numjobs=4): the export's limit, not 4x it
#   3 total IOPS     `nbd-server qos set --read-iops 0 --total-iops IOPS` live; 4k randrw 50/50
#   4 write MiB/s    `qos set --total-iops 0 --write-mbps MBPS`; 128k sequential write
#   5 read MiB/s     `qos set --write-mbps 0 --read-mbps MBPS`; 128k sequential read
# Before them, one unlimited 4k randread run shows the volume can go well past IOPS (else the check
# would prove nothing). Each run discards its first RAMP seconds (the default 1 s burst is spent
# there) and measures RUNTIME seconds. Prints a table; exits 1 if a figure misses, 2 on setup errors.
#
# Usage: scripts/bench-qos.sh   (IOPS=2000 MBPS=40 RUNTIME=10 RAMP=3 PORT=<free> TOLERANCE=10)
# Needs: dotnet, fio (with the nbd engine), nbdinfo, jq.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
BENCH_NAME=bench-qos.sh
IOPS=${IOPS:-2000}
MBPS=${MBPS:-40}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-3}
TOLERANCE=${TOLERANCE:-10}
# shellcheck source=lib/bench-common.sh
source "$root/scripts/lib/bench-common.sh"

bench_require dotnet fio jq nbdinfo

echo "Building nbd-server (Release)..." >&2
dotnet build "$root/src/NbdFrontend" -c Release -nologo -v quiet >&2
server_dll="$root/src/NbdFrontend/bin/Release/net10.0/nbd-server.dll"
[ -f "$server_dll" ] || { echo "$BENCH_NAME: $server_dll not found after build" >&2; exit 2; }

bench_start_workdir
port=${PORT:-$(free_port)}
control="$work/control.sock"
dotnet "$server_dll" --file "$work/vol.img" --size 1GiB --listen "127.0.0.1:$port" --export vol0 \
  --control "$control" --qos-read-iops "$IOPS" > "$work/server.log" 2>&1 &
server_pid=$!
bench_track "$server_pid"
target="nbd://127.0.0.1:$port/vol0"
wait_for_export "$target" "nbd-server"

qos() { dotnet "$server_dll" qos "$@" --control "$control"; }

fio_rate() {   # $1 = rw, $2 = bs, $3 = jobs, $4 = what (iops | mibs), $5 = extra fio args; prints the figure
  local out
  # shellcheck disable=SC2086
  out=$(fio --output-format=json --name=qos --ioengine=nbd --uri="$target" --rw="$1" --bs="$2" \
      --iodepth=32 --numjobs="$3" --group_reporting --size=1G --time_based --runtime="$RUNTIME" \
      --ramp_time="$RAMP" --randrepeat=0 --norandommap ${5:-} 2>"$work/fio.err") || {
    echo "$BENCH_NAME: fio failed ($1 $2 x$3):" >&2; cat "$work/fio.err" >&2; exit 2; }
  sed -n '/^{/,$p' <<<"$out" | jq -r --arg what "$4" \
    '.jobs[0] | if $what == "iops" then .read.iops + .write.iops else (.read.bw_bytes + .write.bw_bytes) / 1048576 end'
}

misses=0
rows=()
check() {   # $1 = name, $2 = limit, $3 = measured, $4 = unit
  local verdict
  verdict=$(awk -v l="$2" -v m="$3" -v t="$TOLERANCE" 'BEGIN {d = (m - l) / l * 100; printf "%+.1f%% %s", d, (d <= t && d >= -t) ? "ok" : "MISS"}')
  [[ $verdict == *MISS ]] && misses=$((misses + 1))
  rows+=("$(printf '%-34s %10s %-5s %12.1f %-5s  %s' "$1" "$2" "$4" "$3" "$4" "$verdict")")
  echo "$1: limit $2 $4, measured $(printf '%.1f' "$3") $4 ($verdict)" >&2
}

echo "Unlimited baseline (4k randread, 1 connection)..." >&2
qos set --read-iops 0 >/dev/null
baseline=$(fio_rate randread 4k 1 iops)
echo "baseline: $(printf '%.0f' "$baseline") IOPS" >&2
if awk -v b="$baseline" -v l="$IOPS" 'BEGIN {exit !(b < 1.5 * l)}'; then
  echo "$BENCH_NAME: the unlimited volume does only $baseline IOPS, not 1.5x the limit $IOPS: lower IOPS" >&2
  exit 2
fi

qos set --read-iops "$IOPS" >/dev/null
check "read IOPS, 1 connection" "$IOPS" "$(fio_rate randread 4k 1 iops)" IOPS
check "read IOPS, 4 connections" "$IOPS" "$(fio_rate randread 4k 4 iops)" IOPS
qos set --read-iops 0 --total-iops "$IOPS" >/dev/null
check "total IOPS, randrw 50/50" "$IOPS" "$(fio_rate randrw 4k 1 iops --rwmixread=50)" IOPS
qos set --total-iops 0 --write-mbps "$MBPS" >/dev/null
check "write MiB/s, 128k sequential" "$MBPS" "$(fio_rate write 128k 1 mibs)" MiB/s
qos set --write-mbps 0 --read-mbps "$MBPS" >/dev/null
check "read MiB/s, 128k sequential" "$MBPS" "$(fio_rate read 128k 1 mibs)" MiB/s
status=$(qos)

kill -0 "$server_pid" 2>/dev/null || { echo "$BENCH_NAME: nbd-server died during the run" >&2; cat "$work/server.log" >&2; exit 2; }
if grep -qiE "error|fail" "$work/fio.err"; then
  echo "$BENCH_NAME: fio reported errors:" >&2; cat "$work/fio.err" >&2; misses=$((misses + 1))
fi

echo
echo "QoS check: fio ioengine=nbd, iodepth 32, ${RUNTIME}s measured after ${RAMP}s ramp, file volume, 127.0.0.1, tolerance ±${TOLERANCE}%"
echo "$(nproc) CPUs, $(uname -r), $(fio --version); unlimited 4k randread baseline $(printf '%.0f' "$baseline") IOPS"
echo
printf '%-34s %16s %18s  %s\n' check limit measured deviation
for row in "${rows[@]}"; do echo "$row"; done
echo
echo "$status"
if [ "$misses" -gt 0 ]; then
  echo "$BENCH_NAME: $misses check(s) missed" >&2
  exit 1
fi
