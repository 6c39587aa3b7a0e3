#!/usr/bin/env bash
# Chaos: random faults, one at a time, under a steady verifier load, for DURATION seconds (default 600).
# Faults: stuck (SIGSTOP 5-10 s), dead (SIGKILL, restart after 5-10 s), slow (+50..200 ms link for
# 10-20 s, through a delaying proxy), ioerr (writes and flushes fail with ENOSPC for 5 s: the
# test-only fault injector test/Shared/faultio.c, preloaded), each on a random replica. After each fault it waits for all replicas to
# be back in service and prints that fault's INCIDENT line; at the end it verifies the whole device
# against the write log and compares the three regions (last INCIDENT line).
# Pictures (when nbd-plot is built; see scripts/incident/lib.sh): the whole run with every fault shaded
# (chaos.png) and each fault's own timeline (chaos-N.png, the first CHAOS_PLOTS faults, default 30), in
# INCIDENT_PLOT_DIR.
# Usage: scripts/chaos.sh [DURATION]
source "$(dirname "$0")/incident/lib.sh"
DURATION=${1:-600}
inc_init chaos
inc_create_regions
for i in 0 1 2; do
  DS_ENV[$i]="LD_PRELOAD=$(inc_faultio) FAULTIO_WRITES_WHEN=$W/fail$i FAULTIO_FLUSHES_WHEN=$W/fail$i"
  inc_start_ds "$i"
  python3 -u "$INC_DIR/proxy.py" "${DS_PORT[$i]}" "$W/slow$i" 50 200 >"$W/proxy$i.out" 2>&1 &
  INC_HELPERS+=($!)
done
for i in 0 1 2; do
  for n in $(seq 1 50); do grep -q 'PROXY PORT' "$W/proxy$i.out" && break; sleep 0.1; done
  DS_CONNECT[$i]=$(awk '/PROXY PORT/ {print $3}' "$W/proxy$i.out")
done
inc_start_up
inc_start_sampler
inc_start_load $((DURATION + 120))
sleep 8
end=$(( $(date +%s) + DURATION ))
faults=(stuck dead slow ioerr)
k=0
RANDOM=${CHAOS_SEED:-$$}
while [ "$(date +%s)" -lt "$end" ] && [ "$k" -lt 500 ]; do
  k=$((k + 1)); INC_SUFFIX="_$k"
  f=${faults[$((RANDOM % 4))]}; r=$((RANDOM % 3)); t=$((5 + RANDOM % 6))
  case $f in slow) t=$((t * 2)) ;; ioerr) t=5 ;; esac
  inc_fault_begin "#$k $f on ds$r for ${t}s"
  case $f in
    stuck) kill -STOP "${DS_PID[$r]}"; sleep "$t"; kill -CONT "${DS_PID[$r]}" ;;
    dead) kill -KILL "${DS_PID[$r]}"; wait "${DS_PID[$r]}" 2>/dev/null || true; sleep "$t"; inc_start_ds "$r" ;;
    slow) touch "$W/slow$r"; sleep "$t"; rm -f "$W/slow$r" ;;
    ioerr) echo ENOSPC >"$W/fail$r"; sleep "$t"; rm -f "$W/fail$r" ;;
  esac
  inc_fault_end
  inc_wait_active 120
  python3 "$INC_DIR/analyze.py" "$W" "chaos#$k-$f-ds$r-${t}s" full "_$k" nodata || true
  sleep 3
done
INC_SUFFIX=""
inc_stop_load
fact faults "$k"
inc_plot "" chaos all
for n in $(seq 1 "$(( k < ${CHAOS_PLOTS:-30} ? k : ${CHAOS_PLOTS:-30} ))"); do inc_plot "_$n" "chaos-$n"; done
inc_finish none
