# Shared helpers of the incident scenarios (DESIGN §6, issue 5). Sourced, not run.
# A scenario: inc_init NAME; inc_create_regions; inc_start_all; inc_start_load SECONDS;
# sleep; inc_fault_begin; <inject>; inc_fault_end; <remove>; inc_wait_active; inc_finish.
# Everything listens on 127.0.0.1 only; every loop is bounded in count and time.
# Environment: INCIDENT_SHORT=1 (short timings for the test suite), INCIDENT_KEEP=1 (keep the temp dir),
# INCIDENT_NO_BUILD=1 (use the existing Release build), INCIDENT_BIN_DIR (see below), INCIDENT_SIZE
# (region size, default 64MiB), INCIDENT_TLS=1 (mutual TLS on every upstairs-downstairs link, with
# certificates made by nbd-certs in the work dir; the proxies of slow/stuck pass TLS through as bytes).
# Pictures: when nbd-plot is built (src/Tools/Plot), each scenario with a load through its fault also
# draws its per-second timeline as PNG (with the CSV it was drawn from) into INCIDENT_PLOT_DIR (default
# artifacts/plots); INCIDENT_PLOT=0 skips them. A picture is output, never a verdict: a plotting
# failure is one line on stderr and changes nothing else.
set -euo pipefail

INC_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
INC_DIR="$INC_ROOT/scripts/incident"
INC_BIN_DS="$INC_ROOT/src/Downstairs/bin/Release/net10.0/nbd-downstairs.dll"
INC_BIN_UP="$INC_ROOT/src/NbdFrontend/bin/Release/net10.0/nbd-server.dll"
INC_BIN_CERTS="$INC_ROOT/src/Tools/Certs/bin/Release/net10.0/nbd-certs.dll"
INC_BIN_VERIFY="$INC_ROOT/src/Tools/Verify/bin/Release/net10.0/nbd-verify.dll"
INC_BIN_PLOT="$INC_ROOT/src/Tools/Plot/bin/Release/net10.0/nbd-plot.dll"
# INCIDENT_BIN_DIR: a directory holding nbd-server.dll, nbd-downstairs.dll, nbd-certs.dll and
# nbd-verify.dll (the test suite's output directory); then nothing is built.
if [ -n "${INCIDENT_BIN_DIR:-}" ]; then
  INC_BIN_DS="$INCIDENT_BIN_DIR/nbd-downstairs.dll"
  INC_BIN_UP="$INCIDENT_BIN_DIR/nbd-server.dll"
  INC_BIN_CERTS="$INCIDENT_BIN_DIR/nbd-certs.dll"
  INC_BIN_VERIFY="$INCIDENT_BIN_DIR/nbd-verify.dll"
  [ -f "$INCIDENT_BIN_DIR/nbd-plot.dll" ] && INC_BIN_PLOT="$INCIDENT_BIN_DIR/nbd-plot.dll"
fi
INC_PLOT_DIR=${INCIDENT_PLOT_DIR:-$INC_ROOT/artifacts/plots}
INC_TLS=${INCIDENT_TLS:-0}
INC_SHORT=${INCIDENT_SHORT:-0}
INC_SIZE=${INCIDENT_SIZE:-64MiB}
INC_EXTENT_BLOCKS=${INCIDENT_EXTENT_BLOCKS:-256}   # 1 MiB extents: the unit of live repair
INC_QD=${INCIDENT_QD:-16}

declare -a DS_PID=("" "" "") DS_PORT=(0 0 0) DS_DIR=("" "" "") DS_EXTRA=("" "" "") DS_ENV=("" "" "") DS_CONNECT=("" "" "")
UP_PID="" UP_NBD="" UP_CONTROL="" LOAD_PID="" SAMPLER_PID="" INC_MOUNTS=() INC_HELPERS=()
UP_EXTRA=()
UP_TLS=()

say() { echo "[$(date +%T.%3N)] $INC_NAME: $*" >&2; }
now() { date +%s.%N; }
INC_SUFFIX=""   # chaos.sh numbers its faults: events and log marks then carry "_N"
event() { echo "$1$INC_SUFFIX $(now)" >>"$W/events"; }

# Build once (Release, like scripts/run.sh); other people build Debug concurrently, so retry a lock.
inc_build() {
  [ "${INCIDENT_NO_BUILD:-0}" = 1 ] || [ -n "${INCIDENT_BIN_DIR:-}" ] && return 0
  local p tries
  for p in src/Downstairs/Downstairs.csproj src/NbdFrontend/NbdFrontend.csproj src/Tools/Certs/Certs.csproj src/Tools/Verify/Verify.csproj; do
    for tries in 1 2 3; do
      if dotnet build "$INC_ROOT/$p" -c Release -v quiet -nologo >"/tmp/incident-build.$$.log" 2>&1; then break; fi
      [ "$tries" = 3 ] && { cat "/tmp/incident-build.$$.log" >&2; exit 1; }
      sleep 3
    done
  done
  rm -f "/tmp/incident-build.$$.log"
  # The plotter is optional: without it the scenarios run the same, only without pictures.
  [ "${INCIDENT_PLOT:-1}" = 1 ] && { dotnet build "$INC_ROOT/src/Tools/Plot/Plot.csproj" -c Release -v quiet -nologo >/dev/null 2>&1 \
    || echo "incident: nbd-plot did not build; no pictures this run" >&2; }
  return 0
}

inc_init() {
  INC_NAME=$1
  inc_build
  W=$(mktemp -d "/tmp/incident-$INC_NAME.XXXXXX")
  : >"$W/events"; : >"$W/facts"; : >"$W/up.log"
  trap inc_cleanup EXIT
  trap 'exit 130' INT TERM
  say "work dir $W"
}

fact() { echo "$1=$2" >>"$W/facts"; }

inc_cleanup() {
  local rc=$?
  set +e
  [ -n "$LOAD_PID" ] && kill -TERM "$LOAD_PID" 2>/dev/null
  [ -n "$SAMPLER_PID" ] && kill -TERM "$SAMPLER_PID" 2>/dev/null
  [ -n "$UP_PID" ] && kill -KILL "$UP_PID" 2>/dev/null
  local i
  for i in 0 1 2; do
    [ -n "${DS_PID[$i]}" ] && { kill -CONT "${DS_PID[$i]}" 2>/dev/null; kill -KILL "${DS_PID[$i]}" 2>/dev/null; }
  done
  for p in "${INC_HELPERS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  wait 2>/dev/null
  for m in "${INC_MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  if [ "${INCIDENT_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "$INC_NAME: work dir kept: $W" >&2
  else
    rm -rf "$W"
  fi
  return "$rc"
}

# inc_small_fs DIR SIZE: a size-limited tmpfs (a small real filesystem that really fills up).
inc_small_fs() {
  mkdir -p "$1"
  mount -t tmpfs -o "size=$2" tmpfs "$1"
  INC_MOUNTS+=("$1")
}

# inc_create_regions [DIR0 DIR1 DIR2]
inc_create_regions() {
  local i
  for i in 0 1 2; do
    DS_DIR[$i]=${1:-$W/ds$i}; shift || true
    dotnet "$INC_BIN_DS" create --data "${DS_DIR[$i]}" --size "$INC_SIZE" --block-size 4096 --extent-size "$INC_EXTENT_BLOCKS" >/dev/null
  done
  inc_tls_setup
}

# inc_tls_setup: with INCIDENT_TLS=1, a CA, a certificate per downstairs (IP 127.0.0.1) and one for
# the upstairs ("upstairs", the only client each downstairs allows) under $W/tls.
inc_tls_setup() {
  [ "$INC_TLS" = 1 ] || return 0
  [ -e "$W/tls/ca/ca-cert.pem" ] && return 0
  local i
  dotnet "$INC_BIN_CERTS" ca --dir "$W/tls/ca" --name "incident CA" >/dev/null
  dotnet "$INC_BIN_CERTS" client --ca "$W/tls/ca" --name upstairs --out "$W/tls/upstairs" >/dev/null
  for i in 0 1 2; do
    dotnet "$INC_BIN_CERTS" server --ca "$W/tls/ca" --name "ds$i" --ip 127.0.0.1 --out "$W/tls/ds$i" >/dev/null
  done
  UP_TLS=(--downstairs-tls-dir "$W/tls/upstairs")
  fact tls 1
  say "mutual TLS on the downstairs links (certificates in $W/tls)"
}

inc_ds_tls_args() { # inc_ds_tls_args I: the TLS options of downstairs I (none without INCIDENT_TLS)
  [ "$INC_TLS" = 1 ] && echo "--tls-dir $W/tls/ds$1 --tls-allow-client upstairs"
  return 0
}

# inc_faultio: builds test/Shared/faultio.c (LD_PRELOAD: writes/flushes fail while a trigger file
# exists; the downstairs itself has no such switch) and prints the path of the .so. Needs gcc.
inc_faultio() {
  command -v gcc >/dev/null || { echo "incident: gcc is needed to build the fault injector (test/Shared/faultio.c)" >&2; exit 2; }
  [ -f "$W/faultio.so" ] || gcc -shared -fPIC -O2 -o "$W/faultio.so" "$INC_ROOT/test/Shared/faultio.c" -ldl
  echo "$W/faultio.so"
}

# inc_start_ds I: starts (or restarts, on the same port) downstairs I; its log appends to $W/dsI.log.
# DS_ENV[I]: extra environment (VAR=VALUE ...) for that downstairs, e.g. the fault injector.
inc_start_ds() {
  local i=$1 port=${DS_PORT[$1]} n
  # shellcheck disable=SC2086
  env ${DS_ENV[$i]} setsid dotnet "$INC_BIN_DS" run --data "${DS_DIR[$i]}" --listen "127.0.0.1:$port" $(inc_ds_tls_args "$i") ${DS_EXTRA[$i]} >>"$W/ds$i.log" 2>&1 &
  DS_PID[$i]=$!
  echo "ds$i ${DS_PID[$i]}" >>"$W/pids"
  if [ "$port" = 0 ]; then
    for n in $(seq 1 100); do
      port=$(grep -o 'Listening on 127.0.0.1:[0-9]*' "$W/ds$i.log" | tail -1 | sed 's/.*://') || true
      [ -n "$port" ] && break
      sleep 0.1
    done
    [ -n "$port" ] || { say "ds$i did not start"; cat "$W/ds$i.log" >&2; exit 1; }
    DS_PORT[$i]=$port
  else
    # Restart on a known port: wait (bounded) until it listens again.
    for n in $(seq 1 100); do
      [ "$(grep -c "Listening on 127.0.0.1:$port" "$W/ds$i.log")" -ge 2 ] && break
      sleep 0.1
    done
  fi
}

inc_connect_list() {
  local i out=""
  for i in 0 1 2; do out+="${out:+,}127.0.0.1:${DS_CONNECT[$i]:-${DS_PORT[$i]}}"; done
  echo "$out"
}

# inc_start_up: starts nbd-server on a free port; sets UP_NBD and UP_CONTROL (the control socket,
# $W/control.sock). Its log appends to $W/up.log.
inc_start_up() {
  local n mark
  mark=$(wc -l <"$W/up.log" 2>/dev/null || echo 0)
  setsid dotnet "$INC_BIN_UP" --downstairs "$(inc_connect_list)" --listen 127.0.0.1:0 --control "$W/control.sock" "${UP_TLS[@]}" "${UP_EXTRA[@]}" >>"$W/up.log" 2>&1 &
  UP_PID=$!
  echo "up $UP_PID" >>"$W/pids"
  UP_NBD="" UP_CONTROL=""
  for n in $(seq 1 300); do
    UP_NBD=$(tail -n +$((mark + 1)) "$W/up.log" | grep -o 'Serving NBD on 127.0.0.1:[0-9]*' | tail -1 | sed 's/.*on //') || true
    UP_CONTROL=$(tail -n +$((mark + 1)) "$W/up.log" | grep -o "Control socket on $W/control.sock" | tail -1 | sed 's/.*on //') || true
    [ -n "$UP_NBD" ] && [ -n "$UP_CONTROL" ] && break
    kill -0 "$UP_PID" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$UP_NBD" ] || { say "nbd-server did not start"; cat "$W/up.log" >&2; exit 1; }
  say "nbd-server pid $UP_PID on $UP_NBD, control $UP_CONTROL"
}

inc_start_all() {
  local i
  for i in 0 1 2; do inc_start_ds "$i"; done
  inc_start_up
  inc_start_sampler
}

# RSS of every process (by the pids recorded so far) every 0.25 s, until killed (bounded by 2 h anyway).
inc_start_sampler() {
  (
    end=$(( $(date +%s) + 7200 ))
    while [ "$(date +%s)" -lt "$end" ]; do
      t=$(now)
      while read -r name pid; do
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || true
        [ -n "$rss" ] && echo "$t $name $pid $rss"
      done <"$W/pids"
      sleep 0.25
    done
  ) >>"$W/rss" 2>/dev/null &
  SAMPLER_PID=$!
}

inc_log_marks() { # inc_log_marks TAG: line counts of every process log
  local f
  for f in "$W"/ds0.log "$W"/ds1.log "$W"/ds2.log "$W"/up.log; do
    echo "$1$INC_SUFFIX $(basename "$f" .log) $(wc -l <"$f")" >>"$W/loglines"
  done
}

# inc_start_load SECONDS [extra verifier options]: the steady load, in the background.
inc_start_load() {
  local secs=$1; shift
  dotnet "$INC_BIN_VERIFY" --uri "nbd://$UP_NBD" --duration "$secs" --qd "$INC_QD" --log "$W/verify.log" --seed 42 "$@" \
    >>"$W/verify.out" 2>>"$W/verify.err" &
  LOAD_PID=$!
  local n
  for n in $(seq 1 100); do grep -q 'ios=' "$W/verify.out" 2>/dev/null && break; sleep 0.1; done
}

# inc_wait_load: waits for the verifier (its read-back included); its exit status lands in facts.
inc_wait_load() {
  local rc=0
  wait "$LOAD_PID" || rc=$?
  LOAD_PID=""
  fact verify_rc "$rc"
}

# inc_stop_load: ends the load phase now (SIGTERM); the verifier still flushes and reads everything back.
inc_stop_load() {
  [ -n "$LOAD_PID" ] || return 0
  kill -TERM "$LOAD_PID" 2>/dev/null || true
  inc_wait_load
}

inc_fault_begin() { inc_log_marks fault_begin; event fault_begin; printf '%s\t%s\n' "${INC_SUFFIX:--}" "$*" >>"$W/faults"; say "fault: $*"; }
inc_fault_end() { event fault_end; say "fault removed"; }

inc_status() { curl -s --max-time 2 --unix-socket "$UP_CONTROL" http://localhost/status || true; }

# inc_wait_active TIMEOUT: polls the control socket until every replica is Active; records repair time.
inc_wait_active() {
  local timeout=$1 start end states
  start=$(now)
  end=$(( $(date +%s) + timeout ))
  while [ "$(date +%s)" -lt "$end" ]; do
    states=$(inc_status | tee -a "$W/status.json" | python3 -c 'import json,sys
try:
  s=json.load(sys.stdin); r=s.get("replicas") or s.get("Replicas")
  print(",".join(str(x.get("state", x.get("State"))) for x in r))
except Exception: print("?")')
    if [ "$states" = "Active,Active,Active" ]; then
      event all_active
      inc_log_marks recovered
      fact repair_wait_s "$(python3 -c "print(f'{$(now)-$start:.2f}')")"
      return 0
    fi
    sleep 0.2
  done
  say "replicas not all Active after ${timeout}s: $states"
  fact "all_active$INC_SUFFIX" no
  inc_log_marks recovered   # still counts the log lines of this fault's window
  return 0
}

# inc_stop_clean: nbd-server first (drains, flushes), then the downstairs.
inc_stop_clean() {
  local i
  if [ -n "$UP_PID" ]; then kill -TERM "$UP_PID" 2>/dev/null || true; inc_wait_pid "$UP_PID" 30; UP_PID=""; fi
  for i in 0 1 2; do
    [ -n "${DS_PID[$i]}" ] && { kill -CONT "${DS_PID[$i]}" 2>/dev/null || true; kill -TERM "${DS_PID[$i]}" 2>/dev/null || true; }
  done
  for i in 0 1 2; do [ -n "${DS_PID[$i]}" ] && inc_wait_pid "${DS_PID[$i]}" 30; DS_PID[$i]=""; done
  [ -n "$SAMPLER_PID" ] && { kill -TERM "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""; }
}

inc_wait_pid() { # bounded wait for a pid to exit, then SIGKILL
  local pid=$1 n
  for n in $(seq 1 $(( $2 * 10 ))); do kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

inc_compare() {
  local rc=0
  dotnet "$INC_BIN_DS" compare "${DS_DIR[0]}" "${DS_DIR[1]}" "${DS_DIR[2]}" >"$W/compare.out" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then fact regions_equal yes; return 0; fi
  fact regions_equal no
  say "compare: $(tail -5 "$W/compare.out" | tr '\n' ' ')"
  # What the upstairs did to its replicas, for a failure seen only in CI (bounded: 20 lines).
  grep -E 'FAULTED|faulted again|live repair|back in service|reconnected|Shutting down|left' "$W/up.log" 2>/dev/null | tail -20 | while IFS= read -r l; do say "up.log: ${l:0:300}"; done || true
}

# inc_plot SUFFIX NAME [all]: draws the timeline of the fault with that event suffix ("" or _N; with
# "all", SUFFIX is ignored and the whole run is drawn, every fault marked) as INC_PLOT_DIR/NAME.png, from
# NAME.csv and NAME.marks written by timeline.py beside it. Never fails the scenario.
inc_plot() {
  [ "${INCIDENT_PLOT:-1}" = 1 ] || return 0
  [ -f "$INC_BIN_PLOT" ] || { say "no picture: nbd-plot is not built ($INC_BIN_PLOT)"; return 0; }
  local sfx=$1 out="$INC_PLOT_DIR/$2" what=${3:-one} title k v args=()
  mkdir -p "$INC_PLOT_DIR" 2>/dev/null || { say "no picture: cannot create $INC_PLOT_DIR"; return 0; }
  if [ "$what" = all ]; then
    title="$INC_NAME: $(wc -l <"$W/faults" 2>/dev/null || echo 0) faults"
    args=(--xlabel "seconds from the start of the load" --height 480)
    python3 "$INC_DIR/timeline.py" "$W" "$out" all 2>>"$W/plot.err" || { say "no picture: $(tail -1 "$W/plot.err")"; return 0; }
  else
    title="$INC_NAME: $(awk -F'\t' -v s="${sfx:--}" '$1 == s {print $2; exit}' "$W/faults" 2>/dev/null || true)"
    python3 "$INC_DIR/timeline.py" "$W" "$out" "$sfx" 2>>"$W/plot.err" || { say "no picture: $(tail -1 "$W/plot.err")"; return 0; }
  fi
  [ "$INC_SHORT" = 1 ] && title+=" (INCIDENT_SHORT=1)"
  while read -r k v; do [ -n "$k" ] && args+=("--$k" "$v"); done <"$out.marks"
  if timeout 60 dotnet "$INC_BIN_PLOT" timeline --csv "$out.csv" --out "$out.png" --title "$title" "${args[@]}" >>"$W/plot.out" 2>>"$W/plot.err"; then
    say "picture: $out.png"
  else
    say "no picture: $(tail -1 "$W/plot.err" 2>/dev/null)"
  fi
  return 0
}

# inc_finish BARSET: waits for the load, stops cleanly, compares, prints the summary line.
# BARSET: "full" (scenarios 1-5: ≥50% of median, latency < 2 s) or "basic" (> 0 IOs/s only) or "none".
inc_finish() {
  local bars=$1
  [ -n "$LOAD_PID" ] && inc_wait_load
  inc_log_marks end
  inc_stop_clean
  inc_compare
  # The engine's own account of the last live repair: "... after repairing N extents (X MiB) in Y s".
  local rep
  rep=$(grep -o 'after repairing [0-9]* extents ([0-9.]* MiB) in [0-9.]* s' "$W/up.log" | tail -1) || true
  if [ -n "$rep" ]; then
    fact repair_mib "$(echo "$rep" | sed 's/.*(\([0-9.]*\) MiB.*/\1/')"
    fact repair_engine_s "$(echo "$rep" | sed 's/.* in \([0-9.]*\) s/\1/')"
  fi
  # A picture of every scenario that ran its load through the fault (not rot, upcrash or chaos' end).
  if [ "$bars" != none ]; then inc_plot "" "$INC_NAME"; fi
  python3 "$INC_DIR/analyze.py" "$W" "$INC_NAME" "$bars"
}
