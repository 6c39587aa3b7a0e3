#!/usr/bin/env bash
# Benchmarks /dev/nbd0 the way users do: the Linux kernel's nbd-client, fio with libaio and
# direct=1, the job files of scripts/fio (no verification, time-based), inside the qemu guest of
# scripts/kernel-test.sh (KT_SUITE=bench, scripts/kernel-test/bench-suite.sh). One boot attaches
# three servers on the host, each on its own /dev/nbdN, and runs every job on each in turn
# (interleaved run by run):
#   ours      three nbd-downstairs (sparse regions, 4 MiB extents) and nbd-server --downstairs in
#             front of them (Release builds; started with scripts/incident/lib.sh): three copies,
#             a write acknowledged once two have it
#   qemu-nbd  qemu-nbd -f raw --cache=writeback --aio=threads --shared=8 on a sparse file (one copy)
#   nbdkit    nbdkit file on a sparse file, cache=default (one copy)
# Prints a table (seqwrite-1m: write MiB/s; randwrite-4k: write IOPS; mixed-70-30: read+write
# IOPS), medians of RUNS, with our ratios to each peer.
#
# The guest runs under TCG: its CPU is emulated, so the guest's side of every request (fio, the
# block layer, the nbd driver, virtio-net and qemu's user-mode network) costs far more than on
# real hardware and caps every server alike. The absolute figures say little about a real host;
# the ratios between the servers are what to read.
#
# Usage: scripts/bench-kernel.sh       RUNTIME=10 (seconds per run) RUNS=3 SIZE_MIB=256 CONNS=1
#                                      (nbd-client -C); RUNTIME=3 RUNS=1 for a quick look
#                                      OUT=FILE: the medians as TSV (job, figure, server, value);
#                                      PLOT=FILE.png: them as a chart (nbd-plot bars)
# Needs: dotnet, fio, qemu-nbd (qemu-utils), nbdkit, nbdinfo (libnbd-bin), and what
# scripts/kernel-test.sh needs. This prints figures; it is not a test and asserts nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${RUNTIME:-10}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-256}
CONNS=${CONNS:-1}
for v in RUNTIME RUNS SIZE_MIB CONNS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "bench-kernel.sh: $v must be a positive integer" >&2; exit 2; }
done
for tool in dotnet fio qemu-nbd nbdkit nbdinfo qemu-system-x86_64; do
    command -v "$tool" >/dev/null || { echo "bench-kernel.sh: '$tool' is not installed" >&2; exit 2; }
done

export INCIDENT_SIZE="${SIZE_MIB}MiB" INCIDENT_EXTENT_BLOCKS=1024
# shellcheck source=incident/lib.sh
source "$root/scripts/incident/lib.sh"
inc_init bench-kernel
inc_create_regions
inc_start_all
ours_port=${UP_NBD##*:}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
wait_for_export() {
    for _ in $(seq 150); do
        nbdinfo --size "nbd://127.0.0.1:$1/vol0" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "bench-kernel.sh: $2 did not start serving on port $1" >&2
    exit 1
}

truncate -s "${SIZE_MIB}M" "$W/qemu.img" "$W/nbdkit.img"
qemu_port=$(free_port)
qemu-nbd -f raw -t -x vol0 -b 127.0.0.1 -p "$qemu_port" --cache=writeback --aio=threads --shared=8 "$W/qemu.img" >"$W/qemu-nbd.log" 2>&1 &
INC_HELPERS+=("$!")
nbdkit_port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$nbdkit_port" -e vol0 file "$W/nbdkit.img" cache=default >"$W/nbdkit.log" 2>&1 &
INC_HELPERS+=("$!")
wait_for_export "$ours_port" nbd-server
wait_for_export "$qemu_port" qemu-nbd
wait_for_export "$nbdkit_port" nbdkit

# 3 jobs x 3 servers x RUNS, each RUNTIME s plus fio's start, and the boot.
limit=$((9 * RUNS * (RUNTIME + 10) + 180))
say "guest: ${RUNTIME}s per run, $RUNS runs, ${SIZE_MIB} MiB, -C $CONNS (at most ${limit}s)"
KT_SUITE=bench KT_LOG="$W/console.log" KT_TIMEOUT=$limit \
    KT_GUEST_ARGS="kt.targets=ours:$ours_port,qemu-nbd:$qemu_port,nbdkit:$nbdkit_port kt.runtime=$RUNTIME kt.runs=$RUNS kt.size=${SIZE_MIB}M kt.conns=$CONNS" \
    "$root/scripts/kernel-test.sh" "$ours_port" || { say "the guest failed"; exit 1; }
kill -0 "$UP_PID" 2>/dev/null || { say "nbd-server died during the run"; cat "$W/up.log" >&2; exit 1; }

# KT-BENCH <target> <job> <run> <read IOPS> <read KiB/s> <write IOPS> <write KiB/s>
tr -d '\r' <"$W/console.log" | grep -a '^KT-BENCH ' >"$W/bench.txt" || { say "no results in the console"; exit 1; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print 0; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2}'; }
# figure TARGET JOB: the job's headline figure, median over the runs.
figure() {
    awk -v t="$1" -v j="$2" '$2 == t && $3 == j {
        if (j == "seqwrite-1m") print $8 / 1024; else if (j == "randwrite-4k") print $7; else print $5 + $7 }' "$W/bench.txt" | median
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

echo
echo "Kernel client benchmark: nbd-client -C $CONNS -b 4096 in a qemu TCG guest, fio libaio direct=1"
echo "(scripts/fio), ${RUNTIME}s per run, median of $RUNS, ${SIZE_MIB} MiB, $(date -u +%Y-%m-%d), $(nproc) host CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ours: nbd-server --downstairs + 3 nbd-downstairs (3 copies, ack on 2); peers serve one sparse file."
echo "UNDER TCG THE GUEST CPU IS EMULATED: the absolute figures say little about a real host; read the ratios."
echo
printf '%-13s %-12s | %10s | %10s | %10s | %13s | %11s\n' job figure ours qemu-nbd nbdkit ours/qemu-nbd ours/nbdkit
printf '%s\n' "--------------------------+------------+------------+------------+---------------+------------"
for job in seqwrite-1m randwrite-4k mixed-70-30; do
    case "$job" in
        seqwrite-1m) what="write MiB/s" ;;
        randwrite-4k) what="write IOPS" ;;
        *) what="r+w IOPS" ;;
    esac
    o=$(figure ours "$job")
    q=$(figure qemu-nbd "$job")
    n=$(figure nbdkit "$job")
    printf '%-13s %-12s | %10.1f | %10.1f | %10.1f | %13s | %11s\n' "$job" "$what" "$o" "$q" "$n" "$(ratio "$o" "$q")" "$(ratio "$o" "$n")"
    printf '%s\t%s\tours\t%.1f\n%s\t%s\tqemu-nbd\t%.1f\n%s\t%s\tnbdkit\t%.1f\n' "$job" "$what" "$o" "$job" "$what" "$q" "$job" "$what" "$n" >>"$W/results.tsv"
done
if [ -n "${OUT:-}" ]; then { printf 'job\tfigure\tserver\tvalue\n'; cat "$W/results.tsv"; } >"$OUT"; echo "TSV: $OUT"; fi
if [ -n "${PLOT:-}" ]; then
    # shellcheck source=lib/plot.sh
    source "$root/scripts/lib/plot.sh"
    awk -F'\t' 'BEGIN {print "panel,group,series,value"} {print $1 ": " $2 "," $1 "," $3 "," $4}' "$W/results.tsv" >"$W/chart.csv"
    plot_bars "$W/chart.csv" "$PLOT" "bench-kernel.sh: kernel nbd-client in a TCG guest, ${RUNTIME}s x $RUNS (medians; read the ratios)"
fi
echo
inc_stop_clean
