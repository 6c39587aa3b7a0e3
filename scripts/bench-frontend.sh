#!/usr/bin/env bash
# Benchmarks the NBD frontend against two peer servers with fio's NBD engine (libnbd), all on
# 127.0.0.1, all serving a preallocated, filled raw file of the same size through the host page
# cache (writeback; no O_DIRECT anywhere):
#   ours     nbd-server --file FILE                     (Release build, buffered pread/pwrite)
#   qemu-nbd qemu-nbd -f raw --cache=writeback --aio=threads --shared=8 FILE
#   nbdkit   nbdkit file FILE cache=default             (default 16 threads)
# Workloads (one connection each, iodepth 32): 4k random read, 4k random write, 1M sequential
# read, 1M sequential write; RUNTIME seconds each (default 15), median of RUNS runs (default 3).
# Runs are interleaved (workload, run, server) so drift in the machine hits every server alike.
# Prints a table (MiB/s and IOPS), ours/peer ratios and our peak RSS (VmHWM).
#
# Usage: scripts/bench-frontend.sh            (RUNTIME=3 RUNS=1 for a quick check; SIZE=1G)
# Needs: dotnet, fio (>= 3.x with the nbd engine), qemu-nbd (qemu-utils), nbdkit, jq.
# This prints figures; it is not a test and asserts nothing.
set -euo pipefail

RUNTIME=${RUNTIME:-15}
RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
IODEPTH=${IODEPTH:-32}
root=$(cd "$(dirname "$0")/.." && pwd)

for tool in dotnet fio qemu-nbd nbdkit jq nbdinfo; do
  command -v "$tool" >/dev/null || { echo "bench-frontend.sh: '$tool' is not installed" >&2; exit 2; }
done

echo "Building nbd-server (Release)..." >&2
dotnet build "$root/src/NbdFrontend" -c Release -nologo -v quiet >&2
server_dll="$root/src/NbdFrontend/bin/Release/net10.0/nbd-server.dll"
[ -f "$server_dll" ] || { echo "bench-frontend.sh: $server_dll not found after build" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-frontend.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for_export() {   # $1 = uri, $2 = name (for the message)
  for _ in $(seq 100); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "bench-frontend.sh: $2 did not start serving $1" >&2
  exit 1
}

# One filled file, copied per server (fully allocated: reads hit real data, writes never allocate).
echo "Preparing three ${SIZE} files of random data..." >&2
bytes=$(numfmt --from=iec "$SIZE")
head -c "$bytes" /dev/urandom > "$work/template.img"
for name in ours qemu nbdkit; do
  cp --sparse=never "$work/template.img" "$work/$name.img"
done
rm -f "$work/template.img"
sync

declare -A uri
port=$(free_port)
dotnet "$server_dll" --file "$work/ours.img" --listen "127.0.0.1:$port" --export vol0 > "$work/ours.log" 2>&1 &
ours_pid=$!
pids+=("$ours_pid")
uri[ours]="nbd://127.0.0.1:$port/vol0"

port=$(free_port)
qemu-nbd -f raw -t -x vol0 -b 127.0.0.1 -p "$port" --cache=writeback --aio=threads --shared=8 "$work/qemu.img" > "$work/qemu.log" 2>&1 &
pids+=("$!")
uri[qemu]="nbd://127.0.0.1:$port/vol0"

port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$port" -e vol0 file "$work/nbdkit.img" cache=default > "$work/nbdkit.log" 2>&1 &
pids+=("$!")
uri[nbdkit]="nbd://127.0.0.1:$port/vol0"

wait_for_export "${uri[ours]}" "nbd-server"
wait_for_export "${uri[qemu]}" "qemu-nbd"
wait_for_export "${uri[nbdkit]}" "nbdkit"

servers=(ours qemu nbdkit)
workloads=(randread-4k randwrite-4k read-1M write-1M)
declare -A rw=([randread-4k]=randread [randwrite-4k]=randwrite [read-1M]=read [write-1M]=write)
declare -A bs=([randread-4k]=4k [randwrite-4k]=4k [read-1M]=1M [write-1M]=1M)
declare -A samples_bw samples_iops

run_fio() {   # $1 = server, $2 = workload; prints "MiB/s IOPS"
  local out direction
  direction=$([[ ${rw[$2]} == *read ]] && echo read || echo write)
  out=$(fio --output-format=json --name=bench --ioengine=nbd --uri="${uri[$1]}" \
      --rw="${rw[$2]}" --bs="${bs[$2]}" --iodepth="$IODEPTH" --size="$SIZE" \
      --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 --norandommap 2>"$work/fio.err") || {
    echo "bench-frontend.sh: fio failed against $1 ($2):" >&2; cat "$work/fio.err" >&2; exit 1; }
  # fio may print "connected to NBD server" before the JSON.
  sed -n '/^{/,$p' <<<"$out" | jq -r --arg d "$direction" '.jobs[0][$d] | "\(.bw_bytes / 1048576) \(.iops)"'
}

total=$(( ${#workloads[@]} * RUNS * ${#servers[@]} ))
n=0
for w in "${workloads[@]}"; do
  for r in $(seq "$RUNS"); do
    for s in "${servers[@]}"; do
      n=$((n + 1))
      printf '[%d/%d] %-8s %-13s run %d ... ' "$n" "$total" "$s" "$w" "$r" >&2
      read -r bw iops < <(run_fio "$s" "$w")
      printf '%.1f MiB/s, %.0f IOPS\n' "$bw" "$iops" >&2
      samples_bw[$s,$w]+="$bw "
      samples_iops[$s,$w]+="$iops "
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2}'; }

rss_kib=$(awk '/^VmHWM/ {print $2}' "/proc/$ours_pid/status")
kill -0 "$ours_pid" 2>/dev/null || { echo "bench-frontend.sh: nbd-server died during the run" >&2; cat "$work/ours.log" >&2; exit 1; }

echo
echo "NBD frontend benchmark: fio ioengine=nbd, 1 connection, iodepth $IODEPTH, ${RUNTIME}s per run, median of $RUNS, ${SIZE} file, 127.0.0.1"
echo "Peers: qemu-nbd --cache=writeback --aio=threads; nbdkit file cache=default. All use the host page cache."
echo "$(nproc) CPUs, $(uname -r), $(fio --version), $(qemu-nbd --version | head -1), $(nbdkit --version)"
echo
printf '%-13s | %10s %9s | %10s %9s | %12s %9s | %10s %10s\n' workload "ours MiB/s" IOPS "qemu MiB/s" IOPS "nbdkit MiB/s" IOPS "ours/qemu" "ours/nbdkit"
printf '%s\n' "--------------+----------------------+----------------------+------------------------+----------------------"
for w in "${workloads[@]}"; do
  declare -A mbw miops
  for s in "${servers[@]}"; do
    mbw[$s]=$(median <<<"${samples_bw[$s,$w]}")
    miops[$s]=$(median <<<"${samples_iops[$s,$w]}")
  done
  printf '%-13s | %10.1f %9.0f | %10.1f %9.0f | %12.1f %9.0f | %9.2fx %10.2fx\n' "$w" \
    "${mbw[ours]}" "${miops[ours]}" "${mbw[qemu]}" "${miops[qemu]}" "${mbw[nbdkit]}" "${miops[nbdkit]}" \
    "$(awk -v a="${mbw[ours]}" -v b="${mbw[qemu]}" 'BEGIN {print (b > 0 ? a / b : 0)}')" \
    "$(awk -v a="${mbw[ours]}" -v b="${mbw[nbdkit]}" 'BEGIN {print (b > 0 ? a / b : 0)}')"
done
echo
printf 'nbd-server peak RSS (VmHWM): %d MiB\n' $((rss_kib / 1024))
