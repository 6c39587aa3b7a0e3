#!/usr/bin/env bash
# Incident 4, slow: replica 1 is reached through a delaying TCP proxy on loopback (proxy.py); for 30 s
# (short: 6 s) every chunk it forwards, both ways, is held 50-200 ms (order kept). The guest must not
# slow down to its pace: acks need 2 of 3.
source "$(dirname "$0")/lib.sh"
inc_init slow
PRE=8; SLOW=30
[ "$INC_SHORT" = 1 ] && { PRE=7; SLOW=6; }
inc_create_regions
for i in 0 1 2; do inc_start_ds "$i"; done
python3 -u "$INC_DIR/proxy.py" "${DS_PORT[1]}" "$W/slow-trigger" 50 200 >"$W/proxy.out" 2>&1 &
INC_HELPERS+=($!)
for n in $(seq 1 50); do grep -q 'PROXY PORT' "$W/proxy.out" && break; sleep 0.1; done
DS_CONNECT[1]=$(awk '/PROXY PORT/ {print $3}' "$W/proxy.out")
inc_start_up
inc_start_sampler
inc_start_load 600
sleep "$PRE"
inc_fault_begin "ds1 link +50..200 ms for ${SLOW}s"
touch "$W/slow-trigger"
sleep "$SLOW"
rm -f "$W/slow-trigger"
inc_fault_end
inc_wait_active 90
# Six seconds of load after the repair: the recovery figure needs whole seconds of healthy IO to
# find (two were sometimes all spent in the second the repair ended; in one CI run four were all a
# little under a pre-fault median that had run high).
sleep 6
inc_stop_load
inc_finish full
