# The kernel test's fio suite (kt.suite=fio), sourced by the guest's init after the network is up:
# fio with libaio and direct=1 on /dev/nbd0, through the kernel's own NBD client, with the job files
# of scripts/fio (in /etc/fio here). Rounds, each ending with the device detached:
#   1. one connection:   4k random write+verify, 1M sequential write+verify, then the mixed 70/30
#      job in passes while the host kills a replica and restarts it; the passes go on until that
#      replica is back in service (live repair done), each pass verifying what it wrote;
#   2. four connections (-C 4), max_sectors_kb lowered so every 1M request is split: the same;
#   3. -timeout with a replica stalled (SIGSTOP) for longer than the timeout: no IO error;
#   4. four connections, nbd-server reloaded twice (SIGHUP: a new image of the process takes the
#      connections over between two requests) under the mixed job: no IO error, every pass verified;
#   5. nbd-server restarted (SIGTERM, new process on the same port) under an idle -persist device:
#      what was written before reads back intact (why idle, and why attached again: see the round).
# The faults are made by the host test (KernelFioTests), asked over TCP: the guest sends one line
# ("kill 1") to kt.ctl=PORT on the host and waits for "ok" (the host answers once it is done).
# Without kt.ctl (a hand run of scripts/kernel-test.sh) the faults are skipped and said so.
# The guest-side settings come from the kernel command line too: kt.rounds= (default 12345) picks rounds.

ctl_port=""
rounds=12345
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kt.ctl=*) ctl_port=${arg#kt.ctl=} ;;
        kt.rounds=*) rounds=${arg#kt.rounds=} ;;
    esac
done

# Sizes: small, since the guest CPU is emulated (TCG) and CI time is scarce; each job runs seconds.
RANDWRITE_SIZE=16M
SEQWRITE_SIZE=64M
MIXED_SIZE=32M
MIXED_PASS_IO=8M
# The host waits this long at most for a replica to be back in service (repair included).
HOST_EVENT_LIMIT_S=150
# max_sectors_kb of round 2: a 1M request becomes 16 requests of 64 KiB.
SPLIT_KB=64
# Round 3: the kernel's request timeout, and the stall (longer than it). The upstairs faults a replica
# that completes nothing for 5 s (--no-progress-timeout) and re-sends its reads, so a request
# waits at most ~5 s: the timeout must never fire while two replicas serve.
NBD_TIMEOUT_S=10
STALL_S=14

# host_event LINE: asks the host test to do something (a fault) and waits for its "ok".
host_event() {
    if [ -z "$ctl_port" ]; then
        say "no host control port (kt.ctl): skipping '$1'"
        return 0
    fi
    say ">>> host: $1"
    reply=$(echo "$1" | timeout "$HOST_EVENT_LIMIT_S" nc "$host" "$ctl_port" 2>&1)
    say "<<< host: ${reply:-(no answer)}"
    case "$reply" in
        ok*) ;;
        *) fail "host could not do '$1': ${reply:-no answer within ${HOST_EVENT_LIMIT_S}s}" ;;
    esac
}

# fio_job JOB VAR=VALUE...: runs /etc/fio/JOB.fio on /dev/nbd0 with verification (and $fio_args),
# prints its figures, fails the test on a non-zero exit (an IO error or a bad block: verify_fatal).
fio_args=""
fio_job() {
    job=$1
    shift
    say "\$ $* fio $job.fio"
    env FIO_DEV=/dev/nbd0 FIO_VERIFY=crc32c FIO_RUNTIME=0 FIO_TIME_BASED=0 FIO_IO_SIZE=0 "$@" \
        timeout 240 fio --eta=never $fio_args --output="/tmp/$job.out" "/etc/fio/$job.fio"
    status=$?
    grep -E '(read|write): IOPS=|err=' "/tmp/$job.out" | sed 's/^ */kt:   /'
    if [ "$status" -ne 0 ]; then
        cat "/tmp/$job.out"
        fail "fio $job exited with $status"
    fi
}

# The mixed job in passes (in the background) until /tmp/mixed.stop exists; the result goes to
# /tmp/mixed.result ("ok PASSES" or "failed ...").
mixed_loop() {
    passes=0
    while :; do
        env FIO_DEV=/dev/nbd0 FIO_VERIFY=crc32c FIO_RUNTIME=0 FIO_TIME_BASED=0 FIO_SIZE=$MIXED_SIZE \
            FIO_IO_SIZE=$MIXED_PASS_IO timeout 240 fio --eta=never --output=/tmp/mixed.out /etc/fio/mixed-70-30.fio
        status=$?
        passes=$((passes + 1))
        if [ "$status" -ne 0 ]; then
            echo "failed: pass $passes exited with $status" >/tmp/mixed.result
            return
        fi
        [ -e /tmp/mixed.stop ] && break
    done
    echo "ok $passes" >/tmp/mixed.result
}

start_mixed() {
    rm -f /tmp/mixed.stop /tmp/mixed.result
    mixed_loop &
    mixed_pid=$!
    say "mixed 70/30 job running in passes of $MIXED_PASS_IO (pid $mixed_pid)"
}

stop_mixed() {
    touch /tmp/mixed.stop
    wait "$mixed_pid"
    result=$(cat /tmp/mixed.result 2>/dev/null)
    grep -E '(read|write): IOPS=|err=' /tmp/mixed.out | sed 's/^ */kt:   /'
    case "$result" in
        ok*) say "mixed job: ${result#ok } passes, each verified" ;;
        *) cat /tmp/mixed.out; fail "mixed job ${result:-did not report}" ;;
    esac
}

# check_kernel_log ROUND [PATTERN]: the kernel must not have failed a request, timed one out or
# lost a connection during the round (PATTERN: what counts as such, when a connection loss is the point).
check_kernel_log() {
    if dmesg | grep -E "${2:-nbd0.*(I/O error|timed out|Dead connection|Receive control failed)|I/O error, dev nbd0|shutting down sockets}" >/tmp/dmesg.bad; then
        cat /tmp/dmesg.bad
        fail "the kernel logged NBD errors in round '$1'"
    fi
    dmesg -c >/dev/null
}

attach() {
    run nbd-client "$host" "$port" /dev/nbd0 -N "$export_name" -b 4096 "$@"
    wait_attached
    say "/dev/nbd0: $(device_size) bytes, max_sectors_kb $(cat /sys/block/nbd0/queue/max_sectors_kb)"
}

detach() {
    run nbd-client -d /dev/nbd0
    sleep 1
}

# write_requests: completed write requests of /dev/nbd0 and their sectors (fields 5 and 7 of stat).
write_requests() { awk '{ print $5, $7 }' /sys/block/nbd0/stat; }

# fault_round LABEL REPLICA NBD-CLIENT-ARGS...: the three jobs, a replica killed and restarted during
# the mixed one; the passes go on until the host says the replica is back in service.
fault_round() {
    label=$1
    replica=$2
    shift 2
    step "round $label: attach $*"
    dmesg -c >/dev/null
    attach "$@"
    fio_job randwrite-4k FIO_SIZE=$RANDWRITE_SIZE
    if [ -n "$split_kb" ]; then
        default_kb=$(cat /sys/block/nbd0/queue/max_sectors_kb)
        echo "$split_kb" >/sys/block/nbd0/queue/max_sectors_kb || fail "cannot set max_sectors_kb"
        set -- $(write_requests)
        before_ios=$1
        before_sectors=$2
    fi
    fio_job seqwrite-1m FIO_SIZE=$SEQWRITE_SIZE
    if [ -n "$split_kb" ]; then
        set -- $(write_requests)
        ios=$(($1 - before_ios))
        kib=$((($2 - before_sectors) / 2))
        say "1M writes went out as $ios requests for $kib KiB (max_sectors_kb $split_kb)"
        [ "$ios" -gt 0 ] && [ $((kib / ios)) -le "$split_kb" ] || fail "1M writes were not split at $split_kb KiB: $ios requests for $kib KiB"
        [ $((kib / split_kb)) -le "$ios" ] || fail "fewer requests ($ios) than $kib KiB / $split_kb KiB"
        # The queue limit outlives the connection: put it back for the next rounds.
        echo "$default_kb" >/sys/block/nbd0/queue/max_sectors_kb
    fi
    start_mixed
    sleep 2
    host_event "kill $replica"
    sleep 3
    host_event "start $replica"
    host_event "wait-active"
    stop_mixed
    check_kernel_log "$label"
    detach
}

step "fio suite (rounds $rounds; fio $(fio --version))"

case "$rounds" in *1*)
    split_kb=""
    fault_round "1 (one connection, replica 1 killed and restarted)" 1
esac

case "$rounds" in *2*)
    split_kb=$SPLIT_KB
    fault_round "2 (-C 4, max_sectors_kb $SPLIT_KB, replica 2 killed and restarted)" 2 -C 4
    split_kb=""
esac

case "$rounds" in *3*)
    step "round 3: -timeout $NBD_TIMEOUT_S, replica 0 stalled for ${STALL_S}s"
    dmesg -c >/dev/null
    attach -timeout "$NBD_TIMEOUT_S"
    start_mixed
    sleep 2
    host_event "stop 0"
    sleep "$STALL_S"
    host_event "cont 0"
    host_event "wait-active"
    stop_mixed
    check_kernel_log "3"
    detach
esac

case "$rounds" in *4*)
    # The way to upgrade or reconfigure nbd-server under a mounted device: `systemctl reload`.
    # The kernel sees a pause of a fraction of a second, never a closed connection or an error.
    step "round 4: -C 4, nbd-server reloaded twice (SIGHUP) under the mixed job"
    dmesg -c >/dev/null
    attach -C 4 -timeout 30
    start_mixed
    sleep 2
    host_event "reload-upstairs"
    sleep 2
    host_event "reload-upstairs"
    sleep 2
    stop_mixed
    check_kernel_log "4"
    detach
esac

case "$rounds" in *5*)
    # -persist of Debian 12's nbd-client (3.24) does not survive an nbd-server restart: over netlink
    # it does nothing (nbd 3.27 adds it there, with a dead-connection timeout that holds IO), and
    # over the ioctl interface (-nonetlink) it reconnects only when NBD_DO_IT ends with an error,
    # which this kernel reports for a request timeout but not for a connection the server closed:
    # nbd-client exits, and requests in flight fail. So the restart comes while the device is idle,
    # the guest attaches again, re-verifies the blocks written before the restart (fio
    # --verify_only, same seed) and runs new mixed IO.
    step "round 5: nbd-server restarted under -nonetlink -persist, blocks written before re-verified"
    dmesg -c >/dev/null
    attach -nonetlink -persist -timeout 30
    # A seed of its own: the blocks differ from what earlier rounds left there (same job, default seed).
    fio_args=--randseed=1304
    fio_job randwrite-4k FIO_SIZE=$RANDWRITE_SIZE
    host_event "restart-upstairs"
    sleep 3
    if nbd-client -c /dev/nbd0 >/dev/null 2>&1; then
        say "nbd-client -persist is still attached after the restart"
    else
        say "nbd-client -persist gave up when nbd-server closed the connection; attaching again"
        nbd-client -d /dev/nbd0 >/dev/null 2>&1
        sleep 1
        attach
    fi
    fio_args="--randseed=1304 --verify_only"
    fio_job randwrite-4k FIO_SIZE=$RANDWRITE_SIZE
    fio_args=""
    say "the blocks written before the restart read back intact"
    start_mixed
    sleep 3
    stop_mixed
    check_kernel_log "5" 'I/O error'
    detach
esac

step "all fio checks passed"
finish "KT-RESULT: KERNEL-NBD-OK"
