#!/usr/bin/env bash
# Installs what the tests need (Debian packages; run as root) and runs every test.
# Ends with one line: "N passed, N failed".
# Usage: scripts/test.sh [extra `dotnet test` arguments, e.g. --filter Category!=Kernel]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(
  libnbd-bin nbdkit python3-libnbd   # nbdinfo, nbdsh, nbdcopy, nbdfuse; a peer server
  qemu-utils                         # qemu-io, qemu-img, qemu-nbd
  qemu-system-x86                    # boots a Linux guest to test the kernel nbd client
  fio nbd-client fuse3 e2fsprogs     # fio ioengine=nbd, nbd-client, nbdfuse's mount, mkfs/e2fsck
  busybox-static cpio                # the guest's initramfs
  prometheus                         # promtool: checks and unit-tests monitoring/nbd-alerts.yml
  dpkg-dev lintian mmdebstrap        # scripts/package-deb.sh, its lintian check, check-deb.sh's chroot
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: need root to install packages (or install them yourself)" >&2
    exit 2
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || {
    echo "test.sh: apt-get install failed" >&2; exit 2; }
fi

results="$root/artifacts/test-results"
rm -rf "$results"
mkdir -p "$results"
dotnet build nbd-server.sln -c Release -nologo -v quiet || { echo "0 passed, 1 failed"; exit 1; }
dotnet test nbd-server.sln -c Release --no-build --logger "trx" --logger "console;verbosity=normal" \
  --results-directory "$results" "$@"
status=$?

passed=0; failed=0
for trx in "$results"/*.trx; do
  [ -e "$trx" ] || continue
  counters=$(grep -o '<Counters [^>]*>' "$trx" | head -1)
  p=$(sed -n 's/.* passed="\([0-9]*\)".*/\1/p' <<<"$counters")
  f=$(sed -n 's/.* failed="\([0-9]*\)".*/\1/p' <<<"$counters")
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
done
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1   # the run itself failed (crash, timeout): never report green
fi
echo "$passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
