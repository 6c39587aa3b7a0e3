# The benchmark suite of the kernel-test guest (kt.suite=bench, driven by scripts/bench-kernel.sh),
# sourced by init after the network is up. It attaches every target with the kernel's nbd-client
# (/dev/nbd0, nbd1, ...), then runs the job files of scripts/fio (in /etc/fio here) without
# verification, time-based, on each target in turn (job by job, run by run: interleaved, so a
# change in the host's load hits every target alike), and prints one line per run:
#   KT-BENCH <target> <job> <run> <read IOPS> <read KiB/s> <write IOPS> <write KiB/s>
# Settings from the kernel command line: kt.targets=NAME:PORT,... (export vol0 on the host),
# kt.runtime= (seconds per run), kt.runs=, kt.size= (the range each job covers), kt.conns= (-C).

targets=""
bench_runtime=10
bench_runs=3
bench_size=256M
bench_conns=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kt.targets=*) targets=${arg#kt.targets=} ;;
        kt.runtime=*) bench_runtime=${arg#kt.runtime=} ;;
        kt.runs=*) bench_runs=${arg#kt.runs=} ;;
        kt.size=*) bench_size=${arg#kt.size=} ;;
        kt.conns=*) bench_conns=${arg#kt.conns=} ;;
    esac
done
[ -n "$targets" ] || fail "kt.suite=bench needs kt.targets=NAME:PORT,..."

step "bench: targets $targets, ${bench_runtime}s per run, $bench_runs runs, $bench_size, -C $bench_conns"
names=""
index=0
for target in $(echo "$targets" | tr ',' ' '); do
    name=${target%%:*}
    target_port=${target#*:}
    run nbd-client "$host" "$target_port" "/dev/nbd$index" -N "$export_name" -b 4096 -C "$bench_conns"
    names="$names $name:$index"
    index=$((index + 1))
done

# The sequential job first: it writes the whole range, so the mixed job's reads find written data
# on every target (a sparse file and a fresh region read alike only where nothing was written).
r=1
while [ "$r" -le "$bench_runs" ]; do
    for job in seqwrite-1m randwrite-4k mixed-70-30; do
        for entry in $names; do
            name=${entry%%:*}
            dev=/dev/nbd${entry#*:}
            env FIO_DEV="$dev" FIO_SIZE="$bench_size" FIO_IO_SIZE=0 FIO_VERIFY=0 FIO_RUNTIME="$bench_runtime" \
                FIO_TIME_BASED=1 timeout $((bench_runtime + 120)) fio --eta=never --output-format=terse \
                --terse-version=3 --output=/tmp/bench.out "/etc/fio/$job.fio" || fail "fio $job on $name exited with $?"
            # terse v3: field 8 read IOPS, 7 read KiB/s, 49 write IOPS, 48 write KiB/s
            awk -F';' -v t="$name" -v j="$job" -v r="$r" '{ print "KT-BENCH", t, j, r, $8, $7, $49, $48 }' /tmp/bench.out
        done
    done
    r=$((r + 1))
done

for entry in $names; do
    run nbd-client -d "/dev/nbd${entry#*:}"
done
step "bench done"
finish "KT-RESULT: KERNEL-NBD-OK"
