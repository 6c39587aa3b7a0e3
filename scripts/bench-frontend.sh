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

root=$(cd "$(dirname "$0")/.." && pwd)
BENCH_NAME=bench-frontend.sh
# shellcheck source=lib/bench-common.sh
source "$root/scripts/lib/bench-common.sh"

bench_require dotnet fio qemu-nbd nbdkit jq nbdinfo

echo "Building nbd-server (Release)..." >&2
dotnet build "$root/src/NbdFrontend" -c Release -nologo -v quiet >&2
server_dll="$root/src/NbdFrontend/bin/Release/net10.0/nbd-server.dll"
[ -f "$server_dll" ] || { echo "bench-frontend.sh: $server_dll not found after build" >&2; exit 2; }

bench_start_workdir

# One filled file, copied per server (fully allocated: reads hit real data, writes never allocate).
echo "Preparing three ${SIZE} files of random data..." >&2
bench_fill_template
for name in ours qemu nbdkit; do
  cp --sparse=never "$work/template.img" "$work/$name.img"
done
rm -f "$work/template.img"
sync

port=$(free_port)
dotnet "$server_dll" --file "$work/ours.img" --listen "127.0.0.1:$port" --export vol0 > "$work/ours.log" 2>&1 &
ours_pid=$!
bench_track "$ours_pid"
uri[ours]="nbd://127.0.0.1:$port/vol0"

port=$(free_port)
qemu-nbd -f raw -t -x vol0 -b 127.0.0.1 -p "$port" --cache=writeback --aio=threads --shared=8 "$work/qemu.img" > "$work/qemu.log" 2>&1 &
bench_track "$!"
uri[qemu]="nbd://127.0.0.1:$port/vol0"

port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$port" -e vol0 file "$work/nbdkit.img" cache=default > "$work/nbdkit.log" 2>&1 &
bench_track "$!"
uri[nbdkit]="nbd://127.0.0.1:$port/vol0"

wait_for_export "${uri[ours]}" "nbd-server"
wait_for_export "${uri[qemu]}" "qemu-nbd"
wait_for_export "${uri[nbdkit]}" "nbdkit"

servers=(ours qemu nbdkit)
bench_run_all "${servers[@]}"

rss_kib=$(peak_rss_kib "$ours_pid")
kill -0 "$ours_pid" 2>/dev/null || { echo "bench-frontend.sh: nbd-server died during the run" >&2; cat "$work/ours.log" >&2; exit 1; }

echo
echo "NBD frontend benchmark: fio ioengine=nbd, 1 connection, iodepth $IODEPTH, ${RUNTIME}s per run, median of $RUNS, ${SIZE} file, 127.0.0.1"
echo "Peers: qemu-nbd --cache=writeback --aio=threads; nbdkit file cache=default. All use the host page cache."
echo "$(nproc) CPUs, $(uname -r), $(fio --version), $(qemu-nbd --version | head -1), $(nbdkit --version)"
echo
printf '%-13s | %10s %9s | %10s %9s | %12s %9s | %10s %10s\n' workload "ours MiB/s" IOPS "qemu MiB/s" IOPS "nbdkit MiB/s" IOPS "ours/qemu" "ours/nbdkit"
printf '%s\n' "--------------+----------------------+----------------------+------------------------+----------------------"
for w in "${bench_workloads[@]}"; do
  declare -A mbw miops
  for s in "${servers[@]}"; do
    read -r "mbw[$s]" "miops[$s]" < <(bench_median_of "$s" "$w")
  done
  printf '%-13s | %10.1f %9.0f | %10.1f %9.0f | %12.1f %9.0f | %9.2fx %10.2fx\n' "$w" \
    "${mbw[ours]}" "${miops[ours]}" "${mbw[qemu]}" "${miops[qemu]}" "${mbw[nbdkit]}" "${miops[nbdkit]}" \
    "$(ratio "${mbw[ours]}" "${mbw[qemu]}")" "$(ratio "${mbw[ours]}" "${mbw[nbdkit]}")"
done
echo
printf 'nbd-server peak RSS (VmHWM): %d MiB\n' $((rss_kib / 1024))
