# Charts of the benchmarks (scripts/bench.sh, bench-repair.sh, bench-kernel.sh). Sourced, not run.
#   plot_bars CSV PNG TITLE   nbd-plot bars (CSV: panel,group,series,value) into PNG; builds nbd-plot
#                             (Release) if it is not built. A chart is output, never part of the
#                             figures: without a plotter, or if drawing fails, one line says so and the
#                             benchmark goes on.
# shellcheck shell=bash

plot_bars() {
  local top bin err
  top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  bin="$top/src/Tools/Plot/bin/Release/net10.0/nbd-plot.dll"
  [ -f "$bin" ] || dotnet build "$top/src/Tools/Plot/Plot.csproj" -c Release -nologo -v quiet >/dev/null 2>&1 || true
  [ -f "$bin" ] || { echo "no chart: nbd-plot did not build (src/Tools/Plot)" >&2; return 0; }
  err=$(mktemp)
  if timeout 60 dotnet "$bin" bars --csv "$1" --out "$2" --title "$3" >/dev/null 2>"$err"; then
    echo "Chart: $2"
  else
    echo "no chart: $(tail -1 "$err")" >&2
  fi
  rm -f "$err"
  return 0
}
