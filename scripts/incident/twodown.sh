#!/usr/bin/env bash
# Incident 7, two down: SIGKILL two downstairs under load for 10 s (short: 5 s). Writes must fail with
# EIO within the bounded wait (--degraded-write-timeout, 3 s), reads go on from the survivor; then both
# come back and service resumes without restarting nbd-server. Blocks whose write failed may hold the old
# or the new data (the verifier accepts either); nothing acknowledged may be lost.
source "$(dirname "$0")/lib.sh"
inc_init twodown
PRE=8; DOWN=10; DEGRADED=3
[ "$INC_SHORT" = 1 ] && { PRE=7; DOWN=5; }
UP_EXTRA=(--degraded-write-timeout "$DEGRADED")
inc_create_regions
inc_start_all
# The writing load keeps the first half; a read-only probe (its own verifier, 4 readers) reads the second
# half, so "reads go on" is measured apart from the writers' closed loop (16 writers all waiting 3 s on
# EIO leave no room for reads in the same verifier).
HALF="$(( ${INC_SIZE%MiB} / 2 ))MiB"   # INCIDENT_SIZE in MiB
inc_start_load 600 --range "$HALF"
dotnet "$INC_BIN_VERIFY" --uri "nbd://$UP_NBD" --duration 600 --qd 4 --offset "$HALF" --read-percent 100 --seed 7 \
  >"$W/reads.out" 2>"$W/reads.err" &
READS_PID=$!
INC_HELPERS+=("$READS_PID")
sleep "$PRE"
inc_fault_begin "SIGKILL ds1 and ds2 for ${DOWN}s"
kill -KILL "${DS_PID[1]}" "${DS_PID[2]}"; wait "${DS_PID[1]}" "${DS_PID[2]}" 2>/dev/null || true
sleep "$DOWN"
inc_start_ds 1; inc_start_ds 2
inc_fault_end
inc_wait_active 120
sleep 3
inc_stop_load
kill -TERM "$READS_PID" 2>/dev/null || true
wait "$READS_PID" 2>/dev/null || true
fact degraded_write_timeout_s "$DEGRADED"
inc_finish twodown
