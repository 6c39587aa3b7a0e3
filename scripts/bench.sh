#!/usr/bin/env bash
# Benchmarks the replicated volume against a single-copy peer with fio's NBD engine (libnbd), in
# the same run, all on 127.0.0.1:
#   ours     three nbd-downstairs (regions in a temp dir, 4 MiB extents, sparse files) and
#            nbd-server --downstairs in front of them (Release builds); every write goes to three
#            regions, acknowledged once two have it
#   qemu-nbd qemu-nbd -f raw --cache=writeback --aio=threads --shared=8 FILE (one copy)
# Both are filled with the same random data first, so reads hit real data; both go through the
# host page cache (no O_DIRECT anywhere).
# Workloads (one connection each, iodepth 32): 4k random read, 4k random write, 1M sequential read,
# 1M sequential write; RUNTIME seconds each (default 15), median of RUNS runs (default 3), runs
# interleaved. Prints the table, ours/qemu ratios against the targets (reads >= 1.0x, writes
# >= 0.5x), peak RSS (VmHWM) of every process, and the CPU seconds each process used.
#
# Usage: scripts/bench.sh            (RUNTIME=3 RUNS=1 for a quick check; SIZE=1G; IODEPTH=32)
# Needs: dotnet, fio (>= 3.x with the nbd engine), qemu-nbd (qemu-utils), nbdcopy, nbdinfo, jq.
# This prints figures; it is not a test and asserts nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
BENCH_NAME=bench.sh
# shellcheck source=lib/bench-common.sh
source "$root/scripts/lib/bench-common.sh"

bench_require dotnet fio qemu-nbd nbdcopy jq nbdinfo numfmt

echo "Building nbd-server and nbd-downstairs (Release)..." >&2
dotnet build "$root/src/NbdFrontend" -c Release -nologo -v quiet >&2
dotnet build "$root/src/Downstairs" -c Release -nologo -v quiet >&2
bin_up="$root/src/NbdFrontend/bin/Release/net10.0/nbd-server"
bin_ds="$root/src/Downstairs/bin/Release/net10.0/nbd-downstairs"
for b in "$bin_up" "$bin_ds"; do
  [ -x "$b" ] || { echo "bench.sh: $b not found after build" >&2; exit 2; }
done

bench_start_workdir
bytes=$(numfmt --from=iec "$SIZE")

echo "Preparing ${SIZE} of random data..." >&2
bench_fill_template
cp --sparse=never "$work/template.img" "$work/qemu.img"
sync

# ---- ours: three downstairs + nbd-server
ds_pids=()
ds_eps=()
for i in 0 1 2; do
  "$bin_ds" create --data "$work/ds$i" --size "$bytes" --block-size 4096 --extent-size 1024 >/dev/null
  "$bin_ds" run --data "$work/ds$i" --listen 127.0.0.1:0 > "$work/ds$i.log" 2>&1 &
  ds_pids+=("$!")
  bench_track "$!"
done
for i in 0 1 2; do
  ep=""
  for _ in $(seq 150); do
    ep=$(grep -o 'Listening on 127\.0\.0\.1:[0-9]*' "$work/ds$i.log" | head -1 | sed 's/Listening on //') && [ -n "$ep" ] && break
    kill -0 "${ds_pids[$i]}" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$ep" ] || { echo "bench.sh: downstairs $i did not start:" >&2; cat "$work/ds$i.log" >&2; exit 1; }
  ds_eps+=("$ep")
done
port=$(free_port)
control="$work/control.sock"
"$bin_up" --downstairs "$(IFS=,; echo "${ds_eps[*]}")" --listen "127.0.0.1:$port" --control "$control" --export vol0 > "$work/ours.log" 2>&1 &
up_pid=$!
bench_track "$up_pid"
uri[ours]="nbd://127.0.0.1:$port/vol0"

# ---- qemu-nbd on one file
port=$(free_port)
qemu-nbd -f raw -t -x vol0 -b 127.0.0.1 -p "$port" --cache=writeback --aio=threads --shared=8 "$work/qemu.img" > "$work/qemu.log" 2>&1 &
qemu_pid=$!
bench_track "$qemu_pid"
uri[qemu]="nbd://127.0.0.1:$port/vol0"

wait_for_export "${uri[ours]}" "nbd-server"
wait_for_export "${uri[qemu]}" "qemu-nbd"

echo "Filling the replicated volume with the same data (nbdcopy)..." >&2
nbdcopy --flush "$work/template.img" "${uri[ours]}"
rm -f "$work/template.img"
sync

cpu_seconds() {   # $1 = pid: user+system CPU seconds so far
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}
declare -A cpu_before
names=(nbd-server downstairs-0 downstairs-1 downstairs-2 qemu-nbd)
all_pids=("$up_pid" "${ds_pids[@]}" "$qemu_pid")
for k in "${!names[@]}"; do cpu_before[$k]=$(cpu_seconds "${all_pids[$k]}"); done

servers=(ours qemu)
bench_run_all "${servers[@]}"

for k in "${!names[@]}"; do
  kill -0 "${all_pids[$k]}" 2>/dev/null || { echo "bench.sh: ${names[$k]} died during the run" >&2; cat "$work"/*.log >&2; exit 1; }
done
if ! "$bin_up" status --control "$control" | grep -q '3/3 replicas in service'; then
  echo "bench.sh: WARNING: not all replicas stayed in service during the run:" >&2
  "$bin_up" status --control "$control" >&2 || true
fi

echo
echo "Replicated volume benchmark: fio ioengine=nbd, 1 connection, iodepth $IODEPTH, ${RUNTIME}s per run, median of $RUNS, ${SIZE}, 127.0.0.1"
echo "ours: nbd-server --downstairs + 3 nbd-downstairs (3 copies, ack on 2). Peer: qemu-nbd --cache=writeback --aio=threads (1 copy)."
echo "$(nproc) CPUs, $(uname -r), $(fio --version), $(qemu-nbd --version | head -1)"
echo
printf '%-13s | %10s %9s | %10s %9s | %9s %7s\n' workload "ours MiB/s" IOPS "qemu MiB/s" IOPS "ours/qemu" target
printf '%s\n' "--------------+----------------------+----------------------+------------------"
for w in "${bench_workloads[@]}"; do
  read -r ours_bw ours_iops < <(bench_median_of ours "$w")
  read -r qemu_bw qemu_iops < <(bench_median_of qemu "$w")
  r=$(ratio "$ours_bw" "$qemu_bw")
  target=$([[ ${bench_rw[$w]} == *read ]] && echo 1.0 || echo 0.5)
  verdict=$(awk -v r="$r" -v t="$target" 'BEGIN {print (r >= t ? "ok" : "MISS")}')
  printf '%-13s | %10.1f %9.0f | %10.1f %9.0f | %8.2fx %4s %s\n' "$w" "$ours_bw" "$ours_iops" "$qemu_bw" "$qemu_iops" "$r" "${target}x" "$verdict"
done
echo
printf '%-14s %14s %16s\n' process "peak RSS MiB" "CPU s (bench)"
for k in "${!names[@]}"; do
  rss=$(peak_rss_kib "${all_pids[$k]}")
  cpu=$(awk -v a="$(cpu_seconds "${all_pids[$k]}")" -v b="${cpu_before[$k]}" 'BEGIN {printf "%.1f", a - b}')
  printf '%-14s %14d %16s\n' "${names[$k]}" $((rss / 1024)) "$cpu"
done
