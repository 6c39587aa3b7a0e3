#!/usr/bin/env bash
# Incident 3, dead: SIGKILL one downstairs under load, restart it after 10 s (short mode: 4 s);
# it must come back through live repair while the guest goes on. Prints one INCIDENT summary line.
source "$(dirname "$0")/lib.sh"
inc_init dead
PRE=8; DOWN=10
[ "$INC_SHORT" = 1 ] && { PRE=7; DOWN=4; }
inc_create_regions
inc_start_all
inc_start_load 600
sleep "$PRE"
inc_fault_begin "SIGKILL ds1 for ${DOWN}s"
kill -KILL "${DS_PID[1]}"; wait "${DS_PID[1]}" 2>/dev/null || true
sleep "$DOWN"
inc_start_ds 1
inc_fault_end
inc_wait_active 60
# Six seconds of load after the repair: the recovery figure needs whole seconds of healthy IO to
# find (two were sometimes all spent in the second the repair ended; in one CI run four were all a
# little under a pre-fault median that had run high).
sleep 6
inc_stop_load
inc_finish full
