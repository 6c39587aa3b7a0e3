#!/usr/bin/env python3
"""Turns one incident run's records into ONE summary line of key=value figures, checked against the bars
of issue 5. Usage: analyze.py WORKDIR SCENARIO BARSET [SUFFIX [nodata]]   (BARSET: full | basic | twodown | none)
SUFFIX selects one numbered fault of a chaos run (events fault_begin_N ...); nodata skips the data checks.

Records in WORKDIR: verify.out (the verifier's per-second lines and summaries), events ("name epoch"),
rss ("epoch name pid kB", sampled every 0.25 s), loglines ("tag process count"), facts ("key=value").
Windows: a per-second bucket ending at epoch e covers (e-1, e]; "during the fault" = buckets that overlap
[fault_begin, fault_end]; latency also looks 2 s past fault_end (a stuck IO completes late);
RSS and log lines are counted from fault_begin until the replicas are all back in service (or the end).
"Full throughput" = a second with >= 80 % of the pre-fault median."""
import re
import statistics
import sys

work, scenario, bars = sys.argv[1], sys.argv[2], sys.argv[3]
sfx = sys.argv[4] if len(sys.argv) > 4 else ''
nodata = len(sys.argv) > 5 and sys.argv[5] == 'nodata'
KV = re.compile(r'(\w+)=(\S+)')


def lines(name):
    try:
        with open(f'{work}/{name}') as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


events = {}
for l in lines('events'):
    k, v = l.split()
    events.setdefault(k, float(v))  # first occurrence
facts = dict(l.split('=', 1) for l in lines('facts') if '=' in l)

buckets, summaries = [], []
for l in lines('verify.out'):
    kv = dict(KV.findall(l))
    if 'summary' in l:
        summaries.append(kv)
    elif 'epoch' in kv and 'ios' in kv:
        buckets.append(kv)

fb, fe = events.get('fault_begin' + sfx), events.get('fault_end' + sfx)
back = events.get('all_active' + sfx)
out = {'scenario': scenario}
fails = []


def lat(b):
    return max(float(b['max_lat_ms']), float(b['oldest_ms']))


pre = [int(b['ios']) for b in buckets if fb is not None and float(b['epoch']) <= fb][2:]  # skip JIT warm-up
if sfx:
    pre = pre[-10:]  # chaos: the 10 s before this fault, not the faults before it
median = statistics.median(pre) if pre else 0
out['pre_median_ios'] = int(median)
# Noise floor: the worst healthy second against the same median. When this too is under 50 %, the
# machine (not the fault) decides the per-second minimum and the 50 % bar cannot be judged from this run.
if pre and median:
    out['pre_min_pct'] = f'{100 * min(pre) / median:.0f}'
if fb is not None and fe is not None:
    during = [b for b in buckets if float(b['epoch']) > fb and float(b['epoch']) - 1 < fe]
    late = [b for b in buckets if float(b['epoch']) > fb and float(b['epoch']) - 1 < fe + 2]
    out['fault_s'] = f'{fe - fb:.1f}'
    if during:
        mn = min(int(b['ios']) for b in during)
        out['min_ios_fault'] = mn
        out['min_pct'] = f'{100 * mn / median:.0f}' if median else 'n/a'
        out['max_lat_fault_ms'] = f'{max(lat(b) for b in late):.0f}'
        out['errors_fault'] = sum(int(b['errors']) for b in during)
        out['reads_min_fault'] = min(int(b['reads']) for b in during)
        if bars in ('full', 'basic') and mn <= 0:
            fails.append('zero_ios_second')
        if bars == 'twodown':
            # Reads go on from the survivor; writes fail (EIO) within the bounded wait, not forever.
            timeout_ms = 1000 * float(facts.get('degraded_write_timeout_s', 3))
            probe = [b for b in (dict(KV.findall(l)) for l in lines('reads.out')) if 'epoch' in b and 'ios' in b
                     and float(b['epoch']) > fb and float(b['epoch']) - 1 < fe]
            if probe:
                out['probe_reads_min_fault'] = min(int(b['reads']) for b in probe)
                out['probe_read_lat_max_ms'] = f"{max(lat(b) for b in probe):.0f}"
            if min(int(b['reads']) for b in (probe or during)) <= 0:
                fails.append('reads_stopped')
            if sum(int(b['errors']) for b in during) <= 0:
                fails.append('no_eio')
            if max(lat(b) for b in late) >= timeout_ms + 1500:
                fails.append('write_wait_unbounded')
        if bars == 'full':
            if median and mn < 0.5 * median:
                fails.append('below_50pct')
            if max(lat(b) for b in late) >= 2000:
                fails.append('latency_2s')
    after = [b for b in buckets if float(b['epoch']) > fe]
    rec = None
    # "Full throughput": 80 % of the pre-fault median, or the worst healthy second before the fault if
    # that is lower. On a small shared machine healthy seconds swing well below 80 % (pre_min_pct), and
    # a bar tighter than the machine's own noise would measure the machine, not the recovery.
    full = min(0.8 * median, min(pre)) if (median and pre) else 0.8 * (median or 0)
    out['full_threshold_ios'] = f'{full:.0f}'
    for b in after:
        if median and int(b['ios']) >= full:
            rec = max(0.0, float(b['epoch']) - 1 - fe)
            break
    out['recovery_s'] = f'{rec:.2f}' if rec is not None else ('n/a' if not after else 'never')
    if bars == 'full' and after and (rec is None or rec >= 1.0):
        fails.append('recovery_1s')
    if bars == 'twodown' and after and rec is None:
        fails.append('service_not_resumed')

    # RSS growth per process name (a restarted process keeps its name).
    end = back if back is not None else (fe + 2)
    base, peak = {}, {}
    for l in lines('rss'):
        p = l.split()
        if len(p) != 4:
            continue
        t, name, kb = float(p[0]), p[1], int(p[3])
        if t <= fb:
            base[name] = kb
        elif t <= end:
            peak[name] = max(peak.get(name, 0), kb)
    growth = {n: max(0, peak.get(n, base[n]) - base[n]) / 1024 for n in base}
    out['rss_growth_mib'] = ','.join(f'{n}:{g:.1f}' for n, g in sorted(growth.items()))
    if growth and max(growth.values()) >= 64:
        fails.append('rss_64mib')

    marks = {}
    for l in lines('loglines'):
        tag, name, n = l.split()
        marks.setdefault(tag, {})[name] = int(n)
    begin = marks.get('fault_begin' + sfx, {})
    # Until all Active (or the wait gave up); else until the next fault began, else the end.
    nxt = f"_{int(sfx[1:]) + 1}" if sfx[1:].isdigit() else None
    stop = marks.get('recovered' + sfx) or (nxt and marks.get('fault_begin' + nxt)) or marks.get('end') or {}
    logs = {n: stop.get(n, 0) - begin[n] for n in begin}
    out['log_lines'] = ','.join(f'{n}:{c}' for n, c in sorted(logs.items()))
    if logs and max(logs.values()) >= 100:
        fails.append('log_100')

if back is not None and fe is not None:
    out['repair_s'] = f'{max(0.0, back - fe):.2f}'
    if 'repair_mib' in facts and 'repair_engine_s' in facts:
        out['repair_mib'] = facts['repair_mib']
        out['repair_mib_s'] = f'{float(facts["repair_mib"]) / max(0.01, float(facts["repair_engine_s"])):.1f}'
elif facts.get('all_active' + sfx) == 'no':
    out['repair_s'] = 'never'
    fails.append('not_repaired')

if nodata:
    summaries = [{'blocks_checked': 1}]
    facts['regions_equal'] = 'yes'
checked = max((int(s.get('blocks_checked', 0)) for s in summaries), default=0)
wrong = sum(int(s.get('blocks_wrong', 0)) + int(s.get('read_mismatches', 0)) for s in summaries)
out['blocks_checked'] = checked
out['blocks_wrong'] = wrong
out['io_errors'] = sum(int(s.get('io_errors', 0)) for s in summaries)
if wrong:
    fails.append('blocks_wrong')
if not summaries or checked == 0:
    fails.append('not_verified')
for k, v in facts.items():
    if k not in out and k not in ('repair_wait_s', 'repair_mib', 'repair_engine_s') and not k.startswith('all_active'):
        out[k] = v
if facts.get('regions_equal') != 'yes':
    fails.append('regions_differ')
for k in [k for k in facts if k.startswith('bar_') and facts[k] != 'yes']:
    fails.append(k[4:])

out['verdict'] = 'FAIL' if fails else 'PASS'
if fails:
    out['failed'] = ','.join(dict.fromkeys(fails))
print('INCIDENT ' + ' '.join(f'{k}={v}' for k, v in out.items()))
