#!/usr/bin/env bash
# Benchmarks live repair (issue 12) on real processes, all on 127.0.0.1: three nbd-downstairs
# (sparse regions, 4 MiB extents) and nbd-server --downstairs in front of them. For each region size
# (SIZES, GiB) it writes the first quarter of the volume (FILL_FRACTION) with fio and a flush, then
# kills downstairs 1 (SIGKILL), changes the volume while it is gone, restarts it on the same port and
# times its way back (state Repairing -> Active):
#   full repair, idle       nbd-server --change-record-max-bytes 0 (every repair compares extents);
#                           the first half of what was written (REWRITE_FRACTION) is rewritten while
#                           the replica is gone; guest idle during the repair
#   full repair, load       the same with fio 4k random writes (iodepth IODEPTH) over the written
#                           part running before, during and after the fault: repair MiB/s and the
#                           guest's write IOPS during the repair as % of its IOPS before the fault
#   catch-up N s            nbd-server with its defaults (the changed-block record on); 4k random
#                           writes over the written part at CATCHUP_IOPS (default 2000: the same
#                           bytes written whatever the build, and few enough that 10 s of them
#                           leave most blocks of even the 1 GiB volume's written part alone, so
#                           "what was written" and "every extent touched" differ; 0 = as fast as
#                           it goes), the replica gone N s (OUTAGES), the load stopped as the
#                           replica restarts (CATCHUP_LOAD=keep: it goes on until the replica is
#                           back): bytes the repair copied vs bytes the guest wrote while the
#                           replica was gone, and the catch-up time
# Each measurement RUNS times, interleaved (run 1 of every size, then run 2, ...); each (run, size)
# gets fresh regions. Prints every run as it goes and one table of medians at the end (also as TSV
# to the file OUT, if set).
#
# How it measures: the replica's state from the control socket (GET /status, the JSON `nbd-server
# status --json` prints; curl on the socket, since starting a .NET process every POLL seconds would
# take a CPU from what is measured), every POLL seconds. Repair time: the engine's own figure from
# its "back in service after repairing ... in S s" line (event 3004), else Repairing -> Active as
# polled. Bytes copied: the metric nbd_replica_repair_bytes_total (delta over the repair), else the
# status field repairBytesDone, else the MiB of that log line (on builds before issue 12: extents
# x extent size). Guest IOPS and bytes: the frontend's metrics nbd_frontend_requests_total{write}
# and nbd_frontend_written_bytes_total, sampled at the fault, the restart and the end of repair
# (exact windows; fio only makes the load; its JSON reports stay in the work dir with KEEP=1).
# If nbd-server does not know --change-record-max-bytes (builds before issue 12), the full-repair
# runs go without it (today's repair always compares extents) and the output says so.
#
# Usage: scripts/bench-repair.sh
#   QUICK=1        1 GiB only, RUNS=1, one 10 s outage (about a minute and a half)
#   SIZES="1 8 32" region sizes in GiB          RUNS=3       runs per measurement
#   OUTAGES="10 60" catch-up outages, seconds   OUT=FILE     also write the medians as TSV
#   IODEPTH=32     fio queue depth of the load  BASE_SECONDS=5  load before the fault (IOPS baseline)
#   FILL_FRACTION=0.25 REWRITE_FRACTION=0.5     EXTENT_BLOCKS=1024 (4 MiB extents of 4 KiB blocks)
#   PLOT=FILE.png  the medians as a chart (nbd-plot bars: repair seconds, and what catch-up copied per
#                  byte written), one colour per region size
#   PORT_BASE=19500 (uses PORT_BASE+1..+5; must stay in 19500-19599)
#   BIN_DIR=DIR    use nbd-server and nbd-downstairs (executables, or .dll run with dotnet) from DIR,
#                  e.g. artifacts/publish/linux-x64 or an older build for a before/after; default:
#                  build Release from this tree
#   CATCHUP_IOPS=2000  rate of the catch-up load (0: unlimited)   CATCHUP_LOAD=stop|keep
#   REPAIR_TIMEOUT=S  longest wait for one repair (default 300 + 60 per GiB)
#   COMPARE=1      compare the three regions (nbd-downstairs compare) after each (run, size)
#   KEEP=1         keep the work dir (/tmp/bench-repair.*)
#   UP_FLAGS="..." more nbd-server flags for every run, e.g. "--repair-duty-cycle 0.3"
#   RECONCILE_GIB=64  startup reconciliation of a clean region set this large, then of one left dirty
#                  by an upstairs killed under 4k random writes (0: skip; QUICK=1: 4)
# Needs: dotnet (unless BIN_DIR), fio (>= 3.x with the nbd engine), curl, jq, python3, and 3 x SIZE x FILL_FRACTION of free space under /tmp (plus what repairs allocate).
# This prints figures; it is not a test and asserts nothing. Figures from a busy machine mean little.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
if [ "${QUICK:-0}" = 1 ]; then
  SIZES=${SIZES:-1}
  RUNS=${RUNS:-1}
  OUTAGES=${OUTAGES:-10}
  RECONCILE_GIB=${RECONCILE_GIB:-4}
  BASE_SECONDS=${BASE_SECONDS:-3}
fi
BENCH_NAME=bench-repair
# shellcheck source=lib/bench-common.sh
source "$root/scripts/lib/bench-common.sh"

SIZES=${SIZES:-1 8 32}
OUTAGES=${OUTAGES:-10 60}
BASE_SECONDS=${BASE_SECONDS:-5}
FILL_FRACTION=${FILL_FRACTION:-0.25}
REWRITE_FRACTION=${REWRITE_FRACTION:-0.5}
EXTENT_BLOCKS=${EXTENT_BLOCKS:-1024}
CATCHUP_LOAD=${CATCHUP_LOAD:-stop}
CATCHUP_IOPS=${CATCHUP_IOPS:-2000}
POLL=${POLL:-0.1}
PORT_BASE=${PORT_BASE:-19500}
OUT=${OUT:-}
read -r -a sizes <<<"$SIZES"
read -r -a outages <<<"$OUTAGES"
case $CATCHUP_IOPS in ''|*[!0-9]*) echo "bench-repair: CATCHUP_IOPS is a whole number" >&2; exit 2 ;; esac
for v in "${sizes[@]}" "${outages[@]}" "$RUNS"; do
  case $v in ''|*[!0-9]*|0) echo "bench-repair: SIZES (GiB), OUTAGES (s) and RUNS are positive whole numbers, not '$v'" >&2; exit 2 ;; esac
done

bench_require fio curl jq python3 timeout
[ "$PORT_BASE" -ge 19500 ] && [ $((PORT_BASE + 5)) -le 19599 ] || { echo "bench-repair: PORT_BASE must keep ports in 19500-19599" >&2; exit 2; }
case $CATCHUP_LOAD in stop|keep) ;; *) echo "bench-repair: CATCHUP_LOAD is stop or keep" >&2; exit 2 ;; esac

# up=(...) and ds=(...): the commands that run nbd-server and nbd-downstairs.
if [ -n "${BIN_DIR:-}" ]; then
  for name in nbd-server nbd-downstairs; do
    if [ -x "$BIN_DIR/$name" ]; then cmd=("$BIN_DIR/$name")
    elif [ -f "$BIN_DIR/$name.dll" ]; then bench_require dotnet; cmd=(dotnet "$BIN_DIR/$name.dll")
    else echo "bench-repair: neither $BIN_DIR/$name nor $name.dll there" >&2; exit 2
    fi
    if [ "$name" = nbd-server ]; then up=("${cmd[@]}"); else ds=("${cmd[@]}"); fi
  done
else
  bench_require dotnet
  echo "Building nbd-server and nbd-downstairs (Release)..." >&2
  dotnet build "$root/src/NbdFrontend" -c Release -nologo -v quiet >&2
  dotnet build "$root/src/Downstairs" -c Release -nologo -v quiet >&2
  up=("$root/src/NbdFrontend/bin/Release/net10.0/nbd-server")
  ds=("$root/src/Downstairs/bin/Release/net10.0/nbd-downstairs")
  for b in "${up[0]}" "${ds[0]}"; do
    [ -x "$b" ] || { echo "bench-repair: $b not found after build" >&2; exit 2; }
  done
fi

# The whole-extent path: builds with the changed-block record take --change-record-max-bytes 0.
full_flags=()
if "${up[@]}" --help 2>/dev/null | grep -q -- '--change-record-max-bytes'; then
  full_flags=(--change-record-max-bytes 0)
  full_note="full repair: nbd-server --change-record-max-bytes 0 (whole-extent copies)"
else
  full_note="full repair: this nbd-server has no --change-record-max-bytes; ran without it (its repair always compares extents)"
fi
echo "bench-repair: $full_note" >&2

ds_port=("$((PORT_BASE + 1))" "$((PORT_BASE + 2))" "$((PORT_BASE + 3))")
nbd_port=$((PORT_BASE + 4))
metrics_port=$((PORT_BASE + 5))
for p in "${ds_port[@]}" "$nbd_port" "$metrics_port"; do
  # SO_REUSEADDR, as the servers' own listeners: a port in TIME_WAIT from a previous run is free.
  python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); s.close()' "$p" 2>/dev/null \
    || { echo "bench-repair: port $p on 127.0.0.1 is in use (set PORT_BASE)" >&2; exit 2; }
done

# Our own exit handling: bench_cleanup stops what bench_pids holds, so it holds only live processes
# we started (a pid we waited for is dropped, never signalled again).
bench_start_workdir
on_exit() {
  local rc=$?
  set +e
  local keep_dir=$work
  work=""   # bench_cleanup: stop the processes only
  bench_cleanup
  if [ "${KEEP:-0}" = 1 ]; then
    echo "bench-repair: work dir kept: $keep_dir" >&2
  elif [ "$rc" != 0 ]; then
    # The logs help; the regions (up to tens of GiB) go.
    find "$keep_dir" -mindepth 2 -maxdepth 2 -name 'ds[012]' -type d -exec rm -rf {} + 2>/dev/null
    echo "bench-repair: failed; logs kept in $keep_dir" >&2
  else
    rm -rf "$keep_dir"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM
untrack() {
  local keep=() p
  for p in "${bench_pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  bench_pids=("${keep[@]}")
}
stop_pid() {   # stop_pid PID [SECONDS]: TERM, bounded wait, then KILL
  local pid=$1 n
  kill -TERM "$pid" 2>/dev/null || true
  for n in $(seq $(( ${2:-30} * 10 ))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  untrack "$pid"
}

say() { echo "[$(date +%T)] $*" >&2; }
die() { say "bench-repair: $*"; exit 1; }
now() { date +%s.%N; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a - b}'; }
rate() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.0f", a / b; else print "NA"}'; }   # rate COUNT SECONDS

# ---- processes
declare -a ds_pid=("" "" "")
up_pid=""
control=""

start_ds() {   # start_ds I: (re)starts downstairs I on its port; waits (bounded) until it listens
  local i=$1 before n
  before=$(grep -c "Listening on 127.0.0.1:${ds_port[$i]}" "$dir/ds$i.log" 2>/dev/null || true)
  "${ds[@]}" run --data "$dir/ds$i" --listen "127.0.0.1:${ds_port[$i]}" >>"$dir/ds$i.log" 2>&1 &
  ds_pid[$i]=$!
  bench_track "${ds_pid[$i]}"
  for n in $(seq 300); do
    [ "$(grep -c "Listening on 127.0.0.1:${ds_port[$i]}" "$dir/ds$i.log" || true)" -gt "${before:-0}" ] && return 0
    kill -0 "${ds_pid[$i]}" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$dir/ds$i.log" >&2
  die "downstairs $i did not listen on 127.0.0.1:${ds_port[$i]} within 30 s"
}

create_regions() {   # create_regions: three fresh regions of $bytes in $dir, their downstairs started
  local i
  for i in 0 1 2; do
    "${ds[@]}" create --data "$dir/ds$i" --size "$bytes" --block-size 4096 --extent-size "$EXTENT_BLOCKS" >"$dir/create$i.out" 2>&1 \
      || { cat "$dir/create$i.out" >&2; die "nbd-downstairs create failed"; }
    start_ds "$i"
  done
}

stop_all_ds() {
  local i
  for i in 0 1 2; do [ -n "${ds_pid[$i]}" ] && stop_pid "${ds_pid[$i]}" 30; ds_pid[$i]=""; done
}

kill_ds() {   # kill_ds I: SIGKILL, as a crash
  kill -KILL "${ds_pid[$1]}" 2>/dev/null || true
  wait "${ds_pid[$1]}" 2>/dev/null || true
  untrack "${ds_pid[$1]}"
  ds_pid[$1]=""
}

up_mode=""
start_up() {   # start_up MODE (full|default): nbd-server; waits until it serves with 3 replicas Active
  local mode=$1 before n extra=()
  [ "$mode" = full ] && extra=("${full_flags[@]}")
  # shellcheck disable=SC2206 # UP_FLAGS is a list of words by design
  extra+=(${UP_FLAGS:-})
  before=$(grep -c 'Serving NBD on' "$dir/up.log" 2>/dev/null || true)
  "${up[@]}" --downstairs "127.0.0.1:${ds_port[0]},127.0.0.1:${ds_port[1]},127.0.0.1:${ds_port[2]}" \
    --listen "127.0.0.1:$nbd_port" --control "$control" --metrics "127.0.0.1:$metrics_port" --export vol0 \
    "${extra[@]}" >>"$dir/up.log" 2>&1 &
  up_pid=$!
  bench_track "$up_pid"
  for n in $(seq 600); do
    [ "$(grep -c 'Serving NBD on' "$dir/up.log" || true)" -gt "${before:-0}" ] && break
    kill -0 "$up_pid" 2>/dev/null || { tail -20 "$dir/up.log" >&2; die "nbd-server exited at start"; }
    sleep 0.1
  done
  [ "$(grep -c 'Serving NBD on' "$dir/up.log" || true)" -gt "${before:-0}" ] || { tail -20 "$dir/up.log" >&2; die "nbd-server did not serve within 60 s"; }
  up_mode=$mode
  wait_all_active 60
}

stop_up() {
  [ -n "$up_pid" ] || return 0
  stop_pid "$up_pid" 60
  up_pid=""
  up_mode=""
}

ensure_up() { [ "$up_mode" = "$1" ] && return 0; stop_up; start_up "$1"; }

# ---- observation
status_json() {
  if ! curl -s --max-time 2 --unix-socket "$control" http://localhost/status 2>/dev/null; then
    "${up[@]}" status --json --control "$control" 2>/dev/null || echo '{}'
  fi
}
states() { status_json | jq -r '[.replicas[]?.state] | join(",")' 2>/dev/null || echo "?"; }
metric() {   # metric NAME [LABELS]: the value (0 if absent), e.g. metric nbd_frontend_requests_total 'command="write"'
  curl -s --max-time 2 "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null \
    | awk -v n="$1" -v l="${2:-}" '$1 == (l == "" ? n : n "{" l "}") {printf "%.0f\n", $2 + 0; f = 1} END {if (!f) print 0}'
}
has_metric() { curl -s --max-time 2 "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null | grep -q "^$1[{ ]"; }

wait_all_active() {   # wait_all_active TIMEOUT
  local end s
  end=$(awk -v n="$(now)" -v t="$1" 'BEGIN {printf "%.0f", n + t}')
  while [ "$(date +%s)" -lt "$end" ]; do
    s=$(states)
    [ "$s" = "Active,Active,Active" ] && return 0
    sleep 0.2
  done
  die "replicas not all Active within $1 s (states: $s)"
}

wait_not_active() {   # wait_not_active I TIMEOUT: the engine has noticed the fault
  local end s
  end=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    s=$(status_json | jq -r ".replicas[$1].state" 2>/dev/null || echo "?")
    [ "$s" != Active ] && [ "$s" != "?" ] && return 0
    sleep 0.1
  done
  die "replica $1 still Active $2 s after its downstairs was killed"
}

# wait_repair I TIMEOUT LOGMARK: after downstairs I restarted, polls until replica I is Active again
# (having been seen Repairing, or the engine having logged the end of a repair since LOGMARK).
# Sets rep_polled_s (Repairing -> Active as polled; NA if Repairing was never seen), rep_engine_s,
# rep_log_mib (from event 3004), rep_bytes_done (status repairBytesDone, last seen), and
# rep_w0/rep_t0, rep_w1/rep_t1: guest write requests and time at the start and end of the repair.
wait_repair() {
  local i=$1 timeout=$2 mark=$3 end st t seen="" line line2 j
  end=$(( $(date +%s) + timeout ))
  rep_polled_s=NA rep_engine_s="" rep_log_mib="" rep_bytes_done=""
  rep_t0=$(now); rep_w0=$(metric nbd_frontend_requests_total 'command="write"')
  while :; do
    [ "$(date +%s)" -lt "$end" ] || die "replica $i not back in service within $timeout s (last state ${st:-?}; raise REPAIR_TIMEOUT)"
    j=$(status_json)
    t=$(now)
    st=$(jq -r ".replicas[$i].state // \"?\"" <<<"$j" 2>/dev/null || echo "?")
    case $st in
      Repairing)
        if [ -z "$seen" ]; then
          seen=$t
          rep_t0=$t; rep_w0=$(metric nbd_frontend_requests_total 'command="write"')
        fi
        line=$(jq -r ".replicas[$i].repairBytesDone // empty" <<<"$j" 2>/dev/null || true)
        [ -n "$line" ] && rep_bytes_done=$line
        ;;
      Active)
        line=$(tail -n +"$((mark + 1))" "$dir/up.log" | grep -o "Replica $i back in service after repairing [0-9]* extents ([0-9.]* MiB) in [0-9.]* s" | tail -1 || true)
        if [ -n "$seen" ] || [ -n "$line" ]; then
          rep_t1=$t; rep_w1=$(metric nbd_frontend_requests_total 'command="write"')
          [ -n "$seen" ] && rep_polled_s=$(fsub "$t" "$seen")
          # The final count, if the status keeps it after the repair.
          line2=$(jq -r ".replicas[$i].repairBytesDone // empty" <<<"$j" 2>/dev/null || true)
          [ -n "$line2" ] && [ "$line2" != 0 ] && rep_bytes_done=$line2
          for _ in $(seq 20); do   # the log line follows the state change closely
            [ -n "$line" ] && break
            sleep 0.1
            line=$(tail -n +"$((mark + 1))" "$dir/up.log" | grep -o "Replica $i back in service after repairing [0-9]* extents ([0-9.]* MiB) in [0-9.]* s" | tail -1 || true)
          done
          if [ -n "$line" ]; then
            rep_log_mib=$(sed 's/.*(\([0-9.]*\) MiB).*/\1/' <<<"$line")
            rep_engine_s=$(sed 's/.* in \([0-9.]*\) s$/\1/' <<<"$line")
          fi
          return 0
        fi
        ;;
    esac
    sleep "$POLL"
  done
}

# repair_result BYTES_METRIC_BEFORE: sets res_s (repair seconds), res_bytes (bytes copied), res_src.
repair_result() {
  local before=$1 after
  res_s=${rep_engine_s:-$rep_polled_s}
  if has_metric nbd_replica_repair_bytes_total; then
    after=$(metric nbd_replica_repair_bytes_total 'replica="1"')
    res_bytes=$((after - before)); res_src=metric
  elif [ -n "$rep_bytes_done" ] && [ "$rep_bytes_done" != 0 ]; then
    res_bytes=$rep_bytes_done; res_src=status
  elif [ -n "$rep_log_mib" ]; then
    res_bytes=$(awk -v m="$rep_log_mib" 'BEGIN {printf "%.0f", m * 1048576}'); res_src=log
  else
    res_bytes=NA; res_src=none
  fi
  sources[$res_src]=1
}

# settle: write back the page cache before a measurement. Without it the fill's and the last
# repair's dirty pages (GiBs on the larger sizes) are written back during the next baseline and
# repair, and a 32 GiB run measured the guest at 2500 IOPS before the fault and 5200 during repair.
settle() {
  timeout 600 sync || die "sync took longer than 600 s"
}

# ---- guest IO (fio over NBD)
fio_common=(--ioengine=nbd --uri="nbd://127.0.0.1:$nbd_port/vol0" --randrepeat=0 --norandommap --output-format=json)

fio_write_seq() {   # fio_write_seq BYTES TIMEOUT TAG: 1M sequential writes of [0, BYTES), then a flush
  timeout --kill-after=10 "$2" fio --name="$3" "${fio_common[@]}" --rw=write --bs=1M --iodepth=8 \
    --size="$1" --end_fsync=1 >"$dir/fio-$3.json" 2>"$dir/fio-$3.err" \
    || { cat "$dir/fio-$3.err" >&2; die "fio $3 failed or took longer than $2 s"; }
}

load_pid=""
start_load() {   # start_load TAG MAXSECONDS [IOPS]: 4k random writes over the written part, in the background
  local rate=()
  [ "${3:-0}" -gt 0 ] && rate=(--rate_iops="$3")
  fio --name="$1" "${fio_common[@]}" --rw=randwrite --bs=4k --iodepth="$IODEPTH" --size="$fill" \
    --time_based --runtime="$2" "${rate[@]}" >"$dir/fio-$1.json" 2>"$dir/fio-$1.err" &
  load_pid=$!
  bench_track "$load_pid"
  local w0 n
  w0=$(metric nbd_frontend_requests_total 'command="write"')
  for n in $(seq 100); do
    [ "$(metric nbd_frontend_requests_total 'command="write"')" -gt $((w0 + 50)) ] && { sleep 1; return 0; }
    kill -0 "$load_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$dir/fio-$1.err" >&2
  die "fio load $1 did not start writing within 10 s"
}
stop_load() {   # SIGINT: fio ends its jobs and still prints its report
  [ -n "$load_pid" ] || return 0
  kill -INT "$load_pid" 2>/dev/null || true
  local n
  for n in $(seq 150); do kill -0 "$load_pid" 2>/dev/null || break; sleep 0.1; done
  stop_pid "$load_pid" 5
  load_pid=""
}

# ---- samples
declare -A samples sources
add() { samples[$1]+="$2 "; }   # add KEY VALUE (NA values are skipped by med)
med() {   # the median of KEY's samples, NA if it has none
  local v
  v=$(tr ' ' '\n' <<<"${samples[$1]:-}" | grep -v -e '^$' -e '^NA$' || true)
  if [ -z "$v" ]; then echo NA; else median <<<"$v"; fi
}

# ---- the measurements
measure_full() {   # measure_full SIZE_GIB RUN idle|load
  local g=$1 r=$2 kind=$3 b0 mark base_iops="" rep_iops="" pct="" w0 t0 w1 t1 mibs
  ensure_up full
  settle
  if [ "$kind" = load ]; then
    start_load "load-$g-$r" $((repair_timeout + 600))
    t0=$(now); w0=$(metric nbd_frontend_requests_total 'command="write"')
    sleep "$BASE_SECONDS"
    t1=$(now); w1=$(metric nbd_frontend_requests_total 'command="write"')
    base_iops=$(rate "$((w1 - w0))" "$(fsub "$t1" "$t0")")
  fi
  kill_ds 1
  # An idle engine learns of the death from the first write it sends there (no traffic, no error).
  fio_write_seq "$rewrite" "$repair_timeout" "rewrite-$kind-$g-$r"
  wait_not_active 1 30
  b0=$(metric nbd_replica_repair_bytes_total 'replica="1"')
  mark=$(wc -l <"$dir/up.log")
  start_ds 1
  wait_repair 1 "$repair_timeout" "$mark"
  if [ "$kind" = load ]; then
    stop_load
    rep_iops=$(rate "$((rep_w1 - rep_w0))" "$(fsub "$rep_t1" "$rep_t0")")
    pct=$(awk -v a="$rep_iops" -v b="$base_iops" 'BEGIN {if (b > 0) printf "%.1f", 100 * a / b; else print "NA"}')
  fi
  repair_result "$b0"
  mibs=$(awk -v b="$res_bytes" -v s="$res_s" 'BEGIN {if (b != "NA" && s > 0) printf "%.1f", b / 1048576 / s; else print "NA"}')
  add "$g,full-$kind,s" "$res_s"; add "$g,full-$kind,mib" "$(mib "$res_bytes")"; add "$g,full-$kind,mibs" "$mibs"
  if [ "$kind" = load ]; then
    add "$g,full-load,base" "$base_iops"; add "$g,full-load,during" "$rep_iops"; add "$g,full-load,pct" "$pct"
    say "  ${g} GiB run $r full repair, load: $res_s s, $(mib "$res_bytes") MiB copied ($res_src), $mibs MiB/s; guest $rep_iops IOPS during repair vs $base_iops before ($pct %)  [polled ${rep_polled_s} s]"
  else
    say "  ${g} GiB run $r full repair, idle: $res_s s, $(mib "$res_bytes") MiB copied ($res_src), $mibs MiB/s  [polled ${rep_polled_s} s]"
  fi
  wait_all_active 60
}

measure_catchup() {   # measure_catchup SIZE_GIB RUN OUTAGE_SECONDS
  local g=$1 r=$2 o=$3 b0 mark g0 g1 t_kill
  ensure_up default
  settle
  start_load "catchup$o-$g-$r" $((o + repair_timeout + 600)) "$CATCHUP_IOPS"
  g0=$(metric nbd_frontend_written_bytes_total)
  t_kill=$(now)
  kill_ds 1
  wait_not_active 1 30
  sleep "$(awk -v o="$o" -v k="$t_kill" -v n="$(now)" 'BEGIN {d = o - (n - k); printf "%.2f", (d > 0 ? d : 0)}')"
  [ "$CATCHUP_LOAD" = stop ] && stop_load
  g1=$(metric nbd_frontend_written_bytes_total)
  b0=$(metric nbd_replica_repair_bytes_total 'replica="1"')
  mark=$(wc -l <"$dir/up.log")
  start_ds 1
  wait_repair 1 "$repair_timeout" "$mark"
  stop_load
  repair_result "$b0"
  local written=$((g1 - g0)) ratio
  ratio=$(awk -v c="$res_bytes" -v w="$written" 'BEGIN {if (c != "NA" && w > 0) printf "%.2f", c / w; else print "NA"}')
  add "$g,catchup$o,s" "$res_s"; add "$g,catchup$o,mib" "$(mib "$res_bytes")"; add "$g,catchup$o,written" "$(mib "$written")"
  add "$g,catchup$o,ratio" "$ratio"
  say "  ${g} GiB run $r catch-up after ${o} s: $res_s s, $(mib "$res_bytes") MiB copied ($res_src) for $(mib "$written") MiB written while out (${ratio}x)  [polled ${rep_polled_s} s]"
  wait_all_active 60
}

mib() { [ "$1" = NA ] && { echo NA; return; }; awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }

one_size() {   # one_size SIZE_GIB RUN: fresh regions, fill, every measurement, tear down
  local g=$1 r=$2 i need avail o t_start
  t_start=$(date +%s)
  bytes=$((g << 30))
  fill=$(awk -v b="$bytes" -v f="$FILL_FRACTION" 'BEGIN {printf "%.0f", int(b * f / 1048576) * 1048576}')
  rewrite=$(awk -v b="$fill" -v f="$REWRITE_FRACTION" 'BEGIN {printf "%.0f", int(b * f / 1048576) * 1048576}')
  repair_timeout=${REPAIR_TIMEOUT:-$((300 + 60 * g))}
  # Three copies of the written part, plus what repairs and the load may allocate beyond it.
  need=$(( fill * 3 / 1024 * 5 / 4 ))
  avail=$(df --output=avail -B1K "$work" | tail -1)
  [ "$avail" -ge "$need" ] || die "${g} GiB needs about $((need >> 20)) GiB free under $work, only $((avail >> 20)) GiB there"
  dir="$work/$g-$r"
  mkdir -p "$dir"
  control="$dir/control.sock"
  create_regions
  start_up full
  say "${g} GiB run $r: writing $(mib "$fill") MiB, rewriting $(mib "$rewrite") MiB while replica 1 is out"
  fio_write_seq "$fill" $((600 + 30 * g)) "fill-$g-$r"
  measure_full "$g" "$r" idle
  measure_full "$g" "$r" load
  for o in "${outages[@]}"; do measure_catchup "$g" "$r" "$o"; done
  stop_up
  stop_all_ds
  if [ "${COMPARE:-0}" = 1 ]; then
    "${ds[@]}" compare "$dir/ds0" "$dir/ds1" "$dir/ds2" >"$dir/compare.out" 2>&1 \
      && say "  regions identical" || { tail -5 "$dir/compare.out" >&2; die "regions differ after ${g} GiB run $r"; }
  fi
  [ "${KEEP:-0}" = 1 ] || rm -rf "$dir/ds0" "$dir/ds1" "$dir/ds2"
  say "${g} GiB run $r took $(( $(date +%s) - t_start )) s"
}

# ---- startup reconciliation: clean, then dirty
reconcile_line=""
measure_reconcile() {   # measure_reconcile SIZE_GIB: prints two lines of its own
  local g=$1 t0 t1 line written
  dir="$work/reconcile-$g"
  mkdir -p "$dir"
  control="$dir/control.sock"
  bytes=$(( g << 30 )); fill=$(( bytes / 16 ))
  create_regions
  start_up default
  fio_write_seq "$fill" 600 "reconcile-fill"
  stop_up
  t0=$(now); start_up default; t1=$(now)
  line=$(grep -o 'reconciled [0-9]* replicas, [0-9]* extents repaired' "$dir/up.log" | tail -1)
  reconcile_line="clean ${g} GiB ($((bytes / 4096 / EXTENT_BLOCKS)) extents, $(mib "$fill") MiB written and flushed): start to serving with 3 in service $(fsub "$t1" "$t0") s (includes the .NET start and the status polls); ${line}"
  say "$reconcile_line"
  start_load "reconcile-dirty" 30
  sleep 3
  kill -KILL "$up_pid" 2>/dev/null || true
  wait "$up_pid" 2>/dev/null || true
  untrack "$up_pid"; up_pid=""; up_mode=""
  stop_load
  # fio, cut off by the dead server, may print its errors ahead of the JSON.
  written=$(sed -n '/^{/,$p' "$dir/fio-reconcile-dirty.json" | jq -r '[.jobs[].write.io_bytes] | add' 2>/dev/null || echo NA)
  t0=$(now); start_up default; t1=$(now)
  line=$(grep -o 'reconciled [0-9]* replicas, [0-9]* extents repaired' "$dir/up.log" | tail -1)
  reconcile_line+=$'\n'"dirty ${g} GiB (upstairs SIGKILLed after 3 s of 4k random writes over the first $(mib "$fill") MiB = $((fill / 4096 / EXTENT_BLOCKS)) extents, $(mib "$written") MiB written, no flush): start to serving $(fsub "$t1" "$t0") s; ${line}"
  say "${reconcile_line##*$'\n'}"
  stop_up
  stop_all_ds
  rm -rf "$dir/ds0" "$dir/ds1" "$dir/ds2"
}

started=$(date +%s)
say "bench-repair: sizes ${SIZES} GiB, outages ${OUTAGES} s, ${RUNS} runs, load fio 4k randwrite iodepth $IODEPTH; work dir $work"
for r in $(seq "$RUNS"); do
  for g in "${sizes[@]}"; do one_size "$g" "$r"; done
done
[ "${RECONCILE_GIB:-0}" -gt 0 ] && measure_reconcile "${RECONCILE_GIB:-0}"
elapsed=$(( $(date +%s) - started ))

# ---- the table
rows=()
for g in "${sizes[@]}"; do
  rows+=("$g	full repair, idle	$(med "$g,full-idle,s")	$(med "$g,full-idle,mib")	$(med "$g,full-idle,mibs")	NA	NA	NA	NA	NA")
  rows+=("$g	full repair, 4k load	$(med "$g,full-load,s")	$(med "$g,full-load,mib")	$(med "$g,full-load,mibs")	NA	NA	$(med "$g,full-load,base")	$(med "$g,full-load,during")	$(med "$g,full-load,pct")")
  for o in "${outages[@]}"; do
    rows+=("$g	catch-up after ${o} s	$(med "$g,catchup$o,s")	$(med "$g,catchup$o,mib")	NA	$(med "$g,catchup$o,written")	$(med "$g,catchup$o,ratio")	NA	NA	NA")
  done
done

echo
echo "Repair benchmark: 3 nbd-downstairs + nbd-server on 127.0.0.1, ${EXTENT_BLOCKS} x 4 KiB extents, sparse regions with the first $(awk -v f="$FILL_FRACTION" 'BEGIN {print f * 100}') % written;"
echo "replica 1 killed (SIGKILL) and restarted; full repair after rewriting $(awk -v f="$FILL_FRACTION" -v r="$REWRITE_FRACTION" 'BEGIN {print f * r * 100}') % of the volume while it was out;"
echo "load: fio 4k randwrite iodepth $IODEPTH over the written part; catch-up load at $([ "$CATCHUP_IOPS" -gt 0 ] && echo "$CATCHUP_IOPS IOPS" || echo "full speed"), ${CATCHUP_LOAD}s at the restart. Medians of $RUNS run(s), runs interleaved."
echo "$full_note"
echo "Bytes copied from: ${!sources[*]} (metric: nbd_replica_repair_bytes_total; status: repairBytesDone; log: event 3004's MiB, extents x extent size before issue 12)"
echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end, $(uname -r), $(fio --version); took ${elapsed} s"
echo
printf '%-6s %-22s %9s %11s %8s %12s %9s %10s %10s %7s\n' GiB measurement "repair s" "copied MiB" "MiB/s" "written MiB" copied/wr "IOPS pre" "IOPS rep" "kept %"
printf '%s\n' "------------------------------------------------------------------------------------------------------------------"
for row in "${rows[@]}"; do
  IFS=$'\t' read -r c1 c2 c3 c4 c5 c6 c7 c8 c9 c10 <<<"$row"
  printf '%-6s %-22s %9s %11s %8s %12s %9s %10s %10s %7s\n' "$c1" "$c2" "$c3" "$c4" "$c5" "$c6" "$c7" "$c8" "$c9" "$c10" | sed 's/\bNA\b/ -/g'
done
[ -n "$reconcile_line" ] && { echo; echo "Startup reconciliation:"; echo "$reconcile_line"; }
if [ -n "$OUT" ]; then
  {
    printf 'size_gib\tmeasurement\trepair_s\tcopied_mib\tmib_per_s\twritten_mib\tcopied_per_written\tiops_before\tiops_during\tiops_kept_pct\n'
    printf '%s\n' "${rows[@]}"
  } >"$OUT"
  echo "TSV: $OUT"
fi
if [ -n "${PLOT:-}" ]; then
  # shellcheck source=lib/plot.sh
  source "$root/scripts/lib/plot.sh"
  # Labels lose their commas (the chart's CSV has no quoting); NA cells are left out.
  printf '%s\n' "${rows[@]}" | awk -F'\t' 'BEGIN {print "panel,group,series,value"}
    { m = $2; gsub(/, /, " ", m)
      if ($3 != "NA") print "repair time: s," m "," $1 " GiB," $3
      if ($7 != "NA") print "catch-up: copied per byte written," m "," $1 " GiB," $7 }' >"$work/chart.csv"
  plot_bars "$work/chart.csv" "$PLOT" "bench-repair.sh: live repair, medians of $RUNS run(s)"
fi
