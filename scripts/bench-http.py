#!/usr/bin/env python3
"""Interleaved A/B of two builds: time to serving and idle RSS of nbd-server (replicated, with
--control and --metrics) and nbd-downstairs (one with --metrics, one without).

usage: scripts/bench-http.py OLD_DIR NEW_DIR [ROUNDS] [BASE_PORT]
  each DIR holds frontend/ (nbd-server) and downstairs/ (nbd-downstairs), e.g. from
  dotnet build src/NbdFrontend/NbdFrontend.csproj -c Release -o DIR/frontend (same for Downstairs).
Rounds alternate old-new / new-old; prints each run and the medians. Uses ports BASE..BASE+5
(default 23200) on 127.0.0.1 and a scratch directory under /tmp.
"""
import os, socket, subprocess, sys, time, shutil, statistics, json, tempfile

if len(sys.argv) < 3:
    sys.exit(__doc__)
BUILDS = {"old": sys.argv[1], "new": sys.argv[2]}
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 5
BASE = int(sys.argv[4]) if len(sys.argv) > 4 else 23200
WORK = tempfile.mkdtemp(prefix="bench-http-")

def http_ok(addr, path="/status"):
    try:
        if isinstance(addr, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(1); s.connect(addr)
            req = f"GET {path} HTTP/1.0\r\n\r\n"
        else:
            s = socket.create_connection(addr, timeout=1)
            req = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
        s.sendall(req.encode()); data = b""
        while True:
            d = s.recv(65536)
            if not d: break
            data += d
        s.close()
        return data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    except OSError:
        return False

def tcp_open(addr):
    try:
        socket.create_connection(addr, timeout=1).close(); return True
    except OSError:
        return False

def wait(pred, start, limit=30):
    while time.monotonic() - start < limit:
        if pred(): return time.monotonic() - start
        time.sleep(0.005)
    return float("nan")

def rss_kib(pid, field="VmRSS:"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field): return int(line.split()[1])

def wait_all(preds, start, limit=30):
    got = {}
    while len(got) < len(preds) and time.monotonic() - start < limit:
        for k, p in preds.items():
            if k not in got and p(): got[k] = time.monotonic() - start
        time.sleep(0.005)
    return {k: got.get(k, float("nan")) for k in preds}

def run(build, rnd):
    root = BUILDS[build]; w = f"{WORK}/{build}{rnd}"
    shutil.rmtree(w, ignore_errors=True); os.makedirs(w)
    ds_bin = f"{root}/downstairs/nbd-downstairs"; up_bin = f"{root}/frontend/nbd-server"
    procs = []
    r = {}
    for i in range(3):
        subprocess.run([ds_bin, "create", "--data", f"{w}/ds{i}", "--size", "64MiB", "--block-size", "4096", "--extent-size", "1024"], check=True, stdout=subprocess.DEVNULL)
    for i in range(3):
        args = [ds_bin, "run", "--data", f"{w}/ds{i}", "--listen", f"127.0.0.1:{BASE+i}"]
        if i == 0: args += ["--metrics", f"127.0.0.1:{BASE+5}"]
        t = time.monotonic()
        p = subprocess.Popen(args, stdout=open(f"{w}/ds{i}.log", "w"), stderr=subprocess.STDOUT); procs.append(p)
        if i == 0:
            r["ds_metrics_s"] = wait(lambda: http_ok(("127.0.0.1", BASE+5), "/metrics"), t)
        r.setdefault("ds_listen_s", []).append(wait(lambda: tcp_open(("127.0.0.1", BASE+i)), t))
    ctl = f"{w}/control.sock"
    t = time.monotonic()
    up = subprocess.Popen([up_bin, "--downstairs", f"127.0.0.1:{BASE},127.0.0.1:{BASE+1},127.0.0.1:{BASE+2}", "--listen", f"127.0.0.1:{BASE+3}",
                           "--export", "vol0", "--control", ctl, "--metrics", f"127.0.0.1:{BASE+4}"], stdout=open(f"{w}/up.log", "w"), stderr=subprocess.STDOUT)
    r.update(wait_all({"up_control_s": lambda: http_ok(ctl), "up_serving_s": lambda: tcp_open(("127.0.0.1", BASE+3)),
                       "up_metrics_s": lambda: http_ok(("127.0.0.1", BASE+4), "/metrics")}, t))
    time.sleep(5)
    r["up_rss_mib"] = rss_kib(up.pid) / 1024
    r["up_anon_mib"] = rss_kib(up.pid, "RssAnon:") / 1024
    r["ds_metrics_rss_mib"] = rss_kib(procs[0].pid) / 1024
    r["ds_metrics_anon_mib"] = rss_kib(procs[0].pid, "RssAnon:") / 1024
    r["ds_plain_rss_mib"] = rss_kib(procs[1].pid) / 1024
    r["ds_plain_anon_mib"] = rss_kib(procs[1].pid, "RssAnon:") / 1024
    # one status and one scrape each, then RSS again
    for _ in range(20):
        http_ok(ctl); http_ok(("127.0.0.1", BASE+4), "/metrics"); http_ok(("127.0.0.1", BASE+5), "/metrics")
    time.sleep(1)
    r["up_rss_after20_mib"] = rss_kib(up.pid) / 1024
    r["ds_metrics_rss_after20_mib"] = rss_kib(procs[0].pid) / 1024
    r["ds_listen_s"] = statistics.median(r["ds_listen_s"])
    up.terminate(); up.wait(10)
    for p in procs: p.terminate()
    for p in procs: p.wait(10)
    shutil.rmtree(w, ignore_errors=True)
    return r

results = {b: [] for b in BUILDS}
for rnd in range(ROUNDS):
    order = ["old", "new"] if rnd % 2 == 0 else ["new", "old"]
    for b in order:
        load = os.getloadavg()[0]
        r = run(b, rnd); r["load1"] = load
        results[b].append(r)
        print(b, rnd, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
shutil.rmtree(WORK, ignore_errors=True)
print()
keys = [k for k in results["old"][0]]
print(f"{'metric':28}{'old median':>12}{'new median':>12}{'old min-max':>18}{'new min-max':>18}")
for k in keys:
    o = [x[k] for x in results["old"]]; n = [x[k] for x in results["new"]]
    print(f"{k:28}{statistics.median(o):12.3f}{statistics.median(n):12.3f}{min(o):9.3f}-{max(o):<8.3f}{min(n):9.3f}-{max(n):<8.3f}")
