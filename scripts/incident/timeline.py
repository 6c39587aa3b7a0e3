#!/usr/bin/env python3
"""Dumps one incident's per-second timeline for nbd-plot (it judges nothing; analyze.py does that).
Usage: timeline.py WORKDIR OUTPREFIX [SUFFIX | all]
Writes OUTPREFIX.csv (t_s,iops,latency_ms,errors[,probe_iops]: one row per verifier second, t_s = the middle of the
second, in seconds from the fault's start) and OUTPREFIX.marks (lines "fault START,END",
"repair START,END", "event SECONDS:LABEL", in the same seconds; read by inc_plot in lib.sh).
SUFFIX selects one numbered fault of a chaos run (events fault_begin_N ...): then the timeline runs from
10 s before that fault to 5 s after its repair (or to the next fault). "all": the whole run, every
fault and repair marked, seconds from the first verifier second.
probe_iops: the IOs of a second verifier (reads.out, twodown's read probe) in its second nearest to that
one (empty if none within 0.5 s).
Latency of a second = max(max_lat_ms, oldest_ms), as analyze.py reads it (a stuck IO counts while stuck).
Repairs and faults come from nbd-server's log (stamped with the time of day): each "back in service
after repairing ... in S s" line is a repair of S seconds ending there, each FAULTED / "faulted again"
line a moment; only lines within each fault's log lines (the loglines marks). A log without them
leaves the repair unmarked rather than guessed."""
import datetime
import re
import sys

work, prefix = sys.argv[1], sys.argv[2]
sel = sys.argv[3] if len(sys.argv) > 3 else ''
KV = re.compile(r'(\w+)=(\S+)')
CLOCK = re.compile(r'^(\d\d):(\d\d):(\d\d)\.(\d{3}) ')
REPLICA = re.compile(r'Replica \d+')
REPAIRED = re.compile(r'back in service after repairing .* in ([0-9.]+) s')
MAX_EVENTS = 8  # "replica faulted" lines drawn per fault; a flapping replica would draw a fence


def lines(name):
    try:
        with open(f'{work}/{name}') as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


events = {}
for l in lines('events'):
    p = l.split()
    if len(p) == 2:
        events.setdefault(p[0], float(p[1]))
marks = {}
for l in lines('loglines'):
    p = l.split()
    if len(p) == 3 and p[1] == 'up':
        marks.setdefault(p[0], int(p[2]))


def seconds(name):
    out = []
    for l in lines(name):
        kv = dict(KV.findall(l))
        if 'summary' not in l and 'epoch' in kv and 'ios' in kv:
            out.append((float(kv['epoch']), int(kv['ios']), max(float(kv['max_lat_ms']), float(kv['oldest_ms'])),
                        int(kv.get('errors', 0))))
    return out


buckets = seconds('verify.out')
# twodown's second client, reading the other half of the volume: its seconds beside the load's.
probe = seconds('reads.out')
up_log = lines('up.log')


def clock_to_epoch(line, near):
    """nbd-server stamps its lines with the local time of day; the date is the one around `near`."""
    m = CLOCK.match(line)
    if not m:
        return None
    day = datetime.datetime.fromtimestamp(near).replace(hour=0, minute=0, second=0, microsecond=0)
    t = day.timestamp() + int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000
    if t < near - 43200:
        t += 86400  # the repair ran past midnight
    elif t > near + 43200:
        t -= 86400
    return t


def fault_marks(sfx):
    """(fault window, [repair windows], [faulted moments]) of the fault with this suffix, as epochs.
    A repair is drawn from nbd-server's own account, "Replica N back in service after repairing ... in
    S s": it ran for the S seconds before that line. Attempts cut short (a full disk faults the
    replica again at its first write) show as their "faulted again" lines, not as repairs."""
    fb, fe = events.get('fault_begin' + sfx), events.get('fault_end' + sfx)
    if fb is None or fe is None:
        return None
    first = marks.get('fault_begin' + sfx, 0)
    last = marks.get('recovered' + sfx, len(up_log))
    repairs, faulted = [], []
    for l in up_log[first:last]:
        if not REPLICA.search(l):
            continue
        t = clock_to_epoch(l, fb)
        if t is None:
            continue
        done = REPAIRED.search(l)
        if done:
            repairs.append((t - float(done[1]), t))
        elif 'FAULTED' in l or 'faulted again' in l:
            faulted.append(t)
    return (fb, fe), repairs, faulted


if sel == 'all':
    suffixes = sorted({k[len('fault_begin'):] for k in events if k.startswith('fault_begin')},
                      key=lambda s: int(s[1:]) if s[1:].isdigit() else 0)
    if not buckets:
        sys.exit('timeline: no verifier seconds')
    origin, lo, hi = buckets[0][0] - 1, float('-inf'), float('inf')
else:
    suffixes = [sel]
    fb = events.get('fault_begin' + sel)
    if fb is None:
        sys.exit(f'timeline: no fault_begin{sel} event')
    origin, lo, hi = fb, float('-inf'), float('inf')
    if sel:
        nxt = events.get(f'fault_begin_{int(sel[1:]) + 1}') if sel[1:].isdigit() else None
        back = events.get('all_active' + sel, events.get('fault_end' + sel, fb))
        lo, hi = fb - 10, min(back + 5, nxt if nxt is not None else float('inf'))

out_marks = []
for sfx in suffixes:
    fm = fault_marks(sfx)
    if fm is None:
        continue
    (fb, fe), repairs, faulted = fm
    out_marks.append(f'fault {fb - origin:.2f},{fe - origin:.2f}')
    for start, end in repairs:
        out_marks.append(f'repair {start - origin:.2f},{end - origin:.2f}')
    if sel != 'all':
        for t in faulted[:MAX_EVENTS]:
            out_marks.append(f'event {t - origin:.2f}:replica faulted')

rows = [b for b in buckets if lo <= b[0] - 0.5 <= hi]
if not rows:
    sys.exit('timeline: no verifier seconds in the window')
with open(prefix + '.csv', 'w') as f:
    f.write('t_s,iops,latency_ms,errors' + (',probe_iops' if probe else '') + '\n')
    last = None
    for e, ios, lat, err in rows:
        t = round(e - 0.5 - origin, 3)
        if last is not None and t <= last:
            continue  # the verifier never repeats a second; a clock step back must not break the CSV
        row = f'{t},{ios},{lat:.1f},{err}'
        if probe:
            near = min(probe, key=lambda b: abs(b[0] - e))
            row += f',{near[1]}' if abs(near[0] - e) < 0.5 else ','
        f.write(row + '\n')
        last = t
with open(prefix + '.marks', 'w') as f:
    f.write(''.join(m + '\n' for m in out_marks))
