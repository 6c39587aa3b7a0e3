# Shared parts of the fio benchmarks (scripts/bench.sh, scripts/bench-frontend.sh). Source it after
# setting BENCH_NAME; it reads RUNTIME, RUNS, SIZE and IODEPTH (with defaults) and provides:
#   bench_require TOOL...          exit 2 unless every tool is on PATH
#   bench_start_workdir            $work (temp dir) and a trap that stops every tracked pid
#   bench_track PID                stop PID (TERM, then KILL after 5 s) on exit
#   free_port, wait_for_export URI NAME, peak_rss_kib PID, median (stdin: numbers)
#   bench_fill_template            $work/template.img: SIZE bytes of random data
#   bench_run_all SERVER...        fio for every workload × run × server (interleaved, so machine
#                                  drift hits every server alike); needs uri[SERVER]; fills
#                                  samples_bw[SERVER,WORKLOAD] and samples_iops[...]
#   bench_median_of SERVER WORKLOAD  → "MiB/s IOPS" medians
# shellcheck shell=bash

RUNTIME=${RUNTIME:-15}
RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
IODEPTH=${IODEPTH:-32}
BENCH_NAME=${BENCH_NAME:-bench}

# WORKLOADS="read-1M write-1M" runs a subset.
read -r -a bench_workloads <<<"${WORKLOADS:-randread-4k randwrite-4k read-1M write-1M}"
declare -A bench_rw=([randread-4k]=randread [randwrite-4k]=randwrite [read-1M]=read [write-1M]=write)
declare -A bench_bs=([randread-4k]=4k [randwrite-4k]=4k [read-1M]=1M [write-1M]=1M)
declare -A uri samples_bw samples_iops
bench_pids=()

bench_require() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$BENCH_NAME: '$tool' is not installed" >&2; exit 2; }
  done
}

bench_cleanup() {
  for pid in "${bench_pids[@]}"; do
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${bench_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  [ -n "${work:-}" ] && rm -rf "$work"
}

bench_start_workdir() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/$BENCH_NAME.XXXXXX")
  trap bench_cleanup EXIT
}

bench_track() { bench_pids+=("$1"); }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for_export() {   # $1 = uri, $2 = name (for the message)
  for _ in $(seq 150); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "$BENCH_NAME: $2 did not start serving $1" >&2
  exit 1
}

peak_rss_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2}'; }

bench_fill_template() {
  local bytes
  bytes=$(numfmt --from=iec "$SIZE")
  head -c "$bytes" /dev/urandom > "$work/template.img"
}

run_fio() {   # $1 = server, $2 = workload; prints "MiB/s IOPS"
  local out direction
  direction=$([[ ${bench_rw[$2]} == *read ]] && echo read || echo write)
  out=$(fio --output-format=json --name=bench --ioengine=nbd --uri="${uri[$1]}" \
      --rw="${bench_rw[$2]}" --bs="${bench_bs[$2]}" --iodepth="$IODEPTH" --size="$SIZE" \
      --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 --norandommap 2>"$work/fio.err") || {
    echo "$BENCH_NAME: fio failed against $1 ($2):" >&2; cat "$work/fio.err" >&2; exit 1; }
  # fio may print "connected to NBD server" before the JSON.
  sed -n '/^{/,$p' <<<"$out" | jq -r --arg d "$direction" '.jobs[0][$d] | "\(.bw_bytes / 1048576) \(.iops)"'
}

bench_run_all() {   # $@ = servers
  local total n=0 w r s bw iops
  total=$(( ${#bench_workloads[@]} * RUNS * $# ))
  for w in "${bench_workloads[@]}"; do
    for r in $(seq "$RUNS"); do
      for s in "$@"; do
        n=$((n + 1))
        printf '[%d/%d] %-8s %-13s run %d ... ' "$n" "$total" "$s" "$w" "$r" >&2
        read -r bw iops < <(run_fio "$s" "$w")
        printf '%.1f MiB/s, %.0f IOPS\n' "$bw" "$iops" >&2
        samples_bw[$s,$w]+="$bw "
        samples_iops[$s,$w]+="$iops "
      done
    done
  done
}

bench_median_of() {   # $1 = server, $2 = workload
  echo "$(median <<<"${samples_bw[$1,$2]}") $(median <<<"${samples_iops[$1,$2]}")"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {print (b > 0 ? a / b : 0)}'; }
