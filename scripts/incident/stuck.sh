#!/usr/bin/env bash
# Incident 2, stuck: SIGSTOP one downstairs under load for 10 s (short: 4 s), then SIGCONT.
# The engine must fault it (budget or no-progress timeout) without stalling the guest, then repair it.
source "$(dirname "$0")/lib.sh"
inc_init stuck
PRE=8; STOP=10
[ "$INC_SHORT" = 1 ] && { PRE=7; STOP=4; }
inc_create_regions
inc_start_all
inc_start_load 600
sleep "$PRE"
inc_fault_begin "SIGSTOP ds1 for ${STOP}s"
kill -STOP "${DS_PID[1]}"
sleep "$STOP"
kill -CONT "${DS_PID[1]}"
inc_fault_end
inc_wait_active 90
# Six seconds of load after the repair: the recovery figure needs whole seconds of healthy IO to
# find (two were sometimes all spent in the second the repair ended; in one CI run four were all a
# little under a pre-fault median that had run high).
sleep 6
inc_stop_load
inc_finish full
