#!/usr/bin/env bash
# Incident 1, disk full (the incident itself): replica 1's region lives on a small tmpfs; under load a
# ballast file fills it for 5 s, then is deleted. The region is sparse, so writes that allocate fail with
# a REAL ENOSPC from the filesystem; tmpfs fdatasync cannot fail, so flushes on that replica are made to
# fail with ENOSPC for the same 5 s by the test-only fault injector (test/Shared/faultio.c, LD_PRELOAD).
# Prints one INCIDENT summary line (real_enospc_lines counts the genuine ENOSPC reports in ds1's log).
source "$(dirname "$0")/lib.sh"
inc_init diskfull
PRE=8; FULL=5
[ "$INC_SHORT" = 1 ] && PRE=7
inc_small_fs "$W/small" 80m
DS_ENV[1]="LD_PRELOAD=$(inc_faultio) FAULTIO_FLUSHES_WHEN=$W/enospc-flush FAULTIO_LOG=$W/faultio1.log"
inc_create_regions "$W/ds0" "$W/small/ds1" "$W/ds2"
inc_start_all
inc_start_load 600
sleep "$PRE"
inc_fault_begin "ballast fills ds1's filesystem for ${FULL}s (+ injected ENOSPC on its flushes)"
dd if=/dev/zero of="$W/small/ballast" bs=1M 2>/dev/null || true   # stops at ENOSPC: the fs is full
echo ENOSPC >"$W/enospc-flush"
fact fs_free_kib_when_full "$(df -k --output=avail "$W/small" | tail -1 | tr -d ' ')"
sleep "$FULL"
rm -f "$W/small/ballast" "$W/enospc-flush"
inc_fault_end
inc_wait_active 90
# Six seconds of load after the repair: the recovery figure needs whole seconds of healthy IO to
# find (two were sometimes all spent in the second the repair ended; in one CI run four were all a
# little under a pre-fault median that had run high).
sleep 6
inc_stop_load
# The injected failures are all fdatasync (their count is in faultio1.log); the real ones are writes.
fact real_enospc_lines "$(grep -v 'fdatasync\|flushing' "$W/ds1.log" | grep -ci 'ENOSPC\|No space' || true)"
fact injected_lines "$(grep -ci 'fdatasync\|flushing' "$W/ds1.log" || true)"
fact injected_failures "$(wc -l <"$W/faultio1.log" 2>/dev/null || echo 0)"
inc_finish full
