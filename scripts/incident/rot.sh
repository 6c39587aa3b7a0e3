#!/usr/bin/env bash
# Incident 5, rot: after a load, with the volume idle, flip one byte in each of 32 written blocks of
# replica 1's extent files (behind the downstairs' back). Then read everything through NBD: every read
# must return the right data (a hash mismatch is retried on another replica and the bad copy repaired).
# Then a scrub checks every copy; at the end the three regions must compare equal.
source "$(dirname "$0")/lib.sh"
inc_init rot
LOAD=8; FLIPS=32
[ "$INC_SHORT" = 1 ] && LOAD=5
inc_create_regions
inc_start_all
inc_start_load "$LOAD"
inc_wait_load
inc_fault_begin "flip a byte in $FLIPS written blocks of ds1"
python3 - "${DS_DIR[1]}/extents" "$FLIPS" 4096 "$INC_EXTENT_BLOCKS" <<'PY' >>"$W/facts"
import os, random, sys
d, n, bs, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(5)
files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith('.dat'))
flipped, tries = 0, 0
while flipped < n and tries < 100000:
    tries += 1
    f = rng.choice(files)
    b = rng.randrange(per)
    with open(f, 'r+b') as h:
        h.seek(b * bs)
        block = h.read(bs)
        if len(block) < bs or not any(block):
            continue  # never written: rot there is not data rot
        off = b * bs + 64 + rng.randrange(bs - 128)
        h.seek(off)
        old = h.read(1)[0]
        h.seek(off)
        h.write(bytes([old ^ 0xFF]))
        flipped += 1
print(f'flipped_blocks={flipped}')
PY
# Read everything back (the verifier's check-only pass: every block, against the write log).
dotnet "$INC_BIN_VERIFY" --uri "nbd://$UP_NBD" --check-only --log "$W/verify.log" >>"$W/verify.out" 2>>"$W/verify.err" || true
# A read checks only the copy it happens to read; rot in copies no read touched is found by the scrub
# (every block of every replica against its own hash), which rewrites them from a good copy.
dotnet "$INC_BIN_UP" scrub --control "$UP_CONTROL" --wait --timeout 120 >>"$W/scrub.out" 2>&1 || true
fact scrub "$(tail -1 "$W/scrub.out" | tr ' ,:/' '____' | cut -c1-120)"
inc_fault_end
fact hash_mismatch_log_lines "$(grep -ci 'mismatch\|hash' "$W/up.log" || true)"
inc_wait_active 60
inc_finish none
