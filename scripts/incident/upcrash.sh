#!/usr/bin/env bash
# Incident 6, upstairs crash: SIGKILL nbd-server in the middle of the write load, start it again
# (startup reconciliation), then check the device against the write log: every write acknowledged before
# a successful FLUSH must be there; unflushed ones may be old or new. Then a short load on the restarted
# server (service works) and a clean stop: the three regions must compare equal.
source "$(dirname "$0")/lib.sh"
inc_init upcrash
PRE=8; AFTER=5
[ "$INC_SHORT" = 1 ] && { PRE=5; AFTER=3; }
inc_create_regions
inc_start_all
inc_start_load 600
sleep "$PRE"
inc_fault_begin "SIGKILL nbd-server mid-write"
kill -KILL "$UP_PID"; wait "$UP_PID" 2>/dev/null || true
inc_wait_load   # the verifier sees the connection drop (exit 3) and saves its log, unflushed writes marked unknown
t0=$(now)
inc_start_up
fact restart_to_serving_s "$(python3 -c "print(f'{$(now)-$t0:.2f}')")"
inc_fault_end
fact reconcile_line "\"$(grep -o 'reconciled [0-9]* replicas, [0-9]* extents repaired' "$W/up.log" | tail -1)\""
dotnet "$INC_BIN_VERIFY" --uri "nbd://$UP_NBD" --check-only --log "$W/verify.log" >>"$W/verify.out" 2>>"$W/verify.err" || true
inc_start_load "$AFTER"
inc_wait_load
inc_wait_active 60
inc_finish none
