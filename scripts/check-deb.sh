#!/usr/bin/env bash
# Installs a .deb made by scripts/package-deb.sh into a clean Debian 12 chroot and checks it the way
# an operator meets it: `dpkg -i`; the "nbd" user, /var/lib/nbd-server, /etc/nbd-server and its
# 0700 tls/; every executable's --help runs inside the chroot; `systemd-analyze verify` passes on
# the installed units; installing again keeps an edited conffile; `dpkg -r` leaves only the conffiles and
# the state directory, and `dpkg -P` leaves nothing at all (every path and the user and group
# databases as they were before the install). Then once more with replica data in
# /var/lib/nbd-server: purge keeps the data and the user who owns it.
# Usage: scripts/check-deb.sh PACKAGE.deb     (as root)
# The chroot (mmdebstrap --variant=minbase, from this host's apt sources, plus the package's
# dependencies and systemd for systemd-analyze) is built once (~1 min) and cached as a tarball in
# $NBD_DEB_CHROOT_CACHE (default /var/cache/nbd-server-test); each run unpacks a fresh copy.
# Without mmdebstrap, or when it fails, a weaker check runs instead and says so on its last line:
# dpkg --unpack into a scratch root (no maintainer scripts) and systemd-analyze verify --root.
# NBD_DEB_NO_CHROOT=1 forces that fallback (to test it).
# Last line: "check-deb.sh: PASS (chroot)", "check-deb.sh: PASS (WEAKER: ...)" or a failure.
set -euo pipefail
deb=${1:?usage: scripts/check-deb.sh PACKAGE.deb}
deb=$(realpath "$deb")
[ "$(id -u)" -eq 0 ] || { echo "check-deb.sh: run as root (chroot, dpkg)" >&2; exit 2; }
package=$(dpkg-deb -f "$deb" Package)
cache=${NBD_DEB_CHROOT_CACHE:-/var/cache/nbd-server-test}
failures=0

say() { echo "check-deb.sh: $*"; }
ok() { say "ok: $*"; }
bad() { say "FAILED: $*"; failures=$((failures + 1)); }
check() { # DESCRIPTION COMMAND...: ok when the command succeeds
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}

work=$(mktemp -d "${TMPDIR:-/tmp}/nbd-deb-check.XXXXXX")
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT

# The chroot gets the package's own Depends (so `dpkg -i` needs no network) and systemd; the
# tarball's name carries that list, so a package with new dependencies builds a new one.
depends=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -e 's/([^)]*)//g' -e 's/|.*//' -e 's/ //g' | grep -v '^$' | sort -u)
include=$(printf '%s\n' "$depends" systemd | sort -u | paste -sd, -)
tarball="$cache/bookworm-minbase-$(echo "$include" | md5sum | cut -c1-12).tar"

make_chroot() {
  [ -z "${NBD_DEB_NO_CHROOT:-}" ] || { echo "NBD_DEB_NO_CHROOT is set"; return 1; }
  command -v mmdebstrap >/dev/null || { echo "mmdebstrap is not installed (apt-get install mmdebstrap)"; return 1; }
  [ -e "$tarball" ] && return 0
  mkdir -p "$cache"
  # This host's configured apt sources, so the chroot comes from the same mirror (and snapshot).
  local sources=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qE '^[[:space:]]*(deb |Types:)' "$f" && sources+=("$f")
  done
  say "building the chroot ($include) into $tarball"
  # mmdebstrap picks the output format from the name's extension.
  local partial="${tarball%.tar}.partial.tar"
  if ! mmdebstrap --quiet --variant=minbase --include="$include" bookworm "$partial" "${sources[@]}" >"$work/mmdebstrap.log" 2>&1; then
    rm -f "$partial"
    echo "mmdebstrap failed: $(tail -3 "$work/mmdebstrap.log" | tr '\n' ' ')"
    return 1
  fi
  mv "$partial" "$tarball"
}

# Runs a shell command inside the chroot, in a private mount and PID namespace (so /proc, /dev and
# /sys disappear with it, whatever happens to this script).
in_chroot() {
  unshare --mount --pid --fork --propagation private sh -c '
    c=$1; shift
    mount -t proc proc "$c/proc" && mount --rbind /dev "$c/dev" && mount --rbind /sys "$c/sys" &&
    exec chroot "$c" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      DEBIAN_FRONTEND=noninteractive /bin/sh -c "$*"' in_chroot "$chroot" "$@"
}

# Every path in the chroot but those dpkg and the logs are allowed to change, with owner and mode;
# and the user and group databases (their "-" backups are allowed to change).
snapshot() {
  (cd "$chroot" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./var/lib/dpkg \
      -o -path ./var/log -o -path ./var/cache/debconf -o -path ./tmp -o -path ./run \) -prune \
      -o \( -name 'passwd-' -o -name 'group-' -o -name 'shadow-' -o -name 'gshadow-' \) -prune \
      -o -printf '%p %u:%g %m\n' | LC_ALL=C sort)
  cat "$chroot/etc/passwd" "$chroot/etc/group" "$chroot/etc/shadow" "$chroot/etc/gshadow"
}

if reason=$(make_chroot); then
  chroot="$work/chroot"
  mkdir -p "$chroot"
  tar -C "$chroot" -xf "$tarball"
  cp "$deb" "$chroot/tmp/$package.deb"
  snapshot >"$work/before"

  if out=$(in_chroot "dpkg -i /tmp/$package.deb" 2>&1); then ok "dpkg -i"; else bad "dpkg -i: $out"; fi
  echo "$out" | sed 's/^/  | /'
  check "user nbd: system user, home /var/lib/nbd-server, no login shell" \
    in_chroot 'getent passwd nbd | awk -F: "\$3 < 1000 && \$6 == \"/var/lib/nbd-server\" && \$7 ~ /nologin\$/ {f=1} END {exit !f}"'
  check "group nbd" in_chroot 'getent group nbd >/dev/null'
  check "/var/lib/nbd-server: nbd:nbd 755" in_chroot '[ "$(stat -c "%U:%G %a" /var/lib/nbd-server)" = "nbd:nbd 755" ]'
  check "/etc/nbd-server/tls: root:root 700" in_chroot '[ "$(stat -c "%U:%G %a" /etc/nbd-server/tls)" = "root:root 700" ]'
  check "conffiles registered" in_chroot "[ \$(dpkg-query -W -f='\${Conffiles}' $package | grep -c /etc/nbd-server/) -eq 3 ]"
  for b in nbd-server nbd-downstairs nbd-certs nbd-verify; do
    if out=$(in_chroot "$b --help" 2>&1) && [ -n "$out" ]; then ok "$b --help (in the chroot)"; else bad "$b --help: $out"; fi
  done
  check "nbd-certs makes a CA in the chroot (OpenSSL from libssl3)" in_chroot 'nbd-certs ca --dir /tmp/ca >/dev/null && [ -s /tmp/ca/ca-cert.pem ]'
  check "user nbd makes a region with nbd-downstairs create, nbd-downstairs info reads it" \
    in_chroot 'install -d -o nbd -g nbd /tmp/nbd && runuser -u nbd -- nbd-downstairs create --data /tmp/nbd/r0 --size 16MiB >/dev/null && nbd-downstairs info --data /tmp/nbd/r0 >/dev/null'
  # --man=no: the units' Documentation=man: pages are checked with man(1), which a minbase root lacks
  # (DebianPackageTests checks that the package carries every page of docs/man).
  if out=$(in_chroot 'systemd-analyze verify --man=no nbd-server.service nbd-downstairs@r0.service' 2>&1) && [ -z "$out" ]; then
    ok "systemd-analyze verify nbd-server.service nbd-downstairs@r0.service"
  else
    bad "systemd-analyze verify: $out"
  fi

  # Upgrade (here: the same version again): an operator's edit of a conffile survives, and the
  # postinst asks for restarts instead of doing them.
  in_chroot 'echo "// local edit" >>/etc/nbd-server/nbd-server.json'
  if out=$(in_chroot "dpkg -i /tmp/$package.deb" 2>&1); then ok "dpkg -i again (upgrade path)"; else bad "dpkg -i again: $out"; fi
  if echo "$out" | grep -q "restart nbd-server"; then ok "the upgrade asks for restarts"; else bad "the upgrade said: $out"; fi
  check "the upgrade kept the edited conffile" in_chroot 'grep -q "^// local edit" /etc/nbd-server/nbd-server.json'

  if out=$(in_chroot "dpkg -r $package" 2>&1); then ok "dpkg -r"; else bad "dpkg -r: $out"; fi
  echo "$out" | sed 's/^/  | /'
  snapshot >"$work/removed"
  # What `dpkg -r` may leave (policy 6.8 and 10.7.3): the conffiles and their directory, the
  # state directory and the user (until purge).
  left=$(diff "$work/before" "$work/removed" | sed -n 's/^> //p' | grep -vE '^(\./etc/nbd-server(/tls)?|\./etc/nbd-server/(nbd-server\.json|nbd-downstairs\.json|nbd-server\.env)|\./var/lib/nbd-server) |^(nbd|_?nbd):' || true)
  if [ -z "$left" ]; then ok "dpkg -r left only the conffiles, /var/lib/nbd-server and the user"; else bad "dpkg -r left: $left"; fi
  check "binaries and units gone after dpkg -r" in_chroot '! [ -e /usr/bin/nbd-server ] && ! [ -e /lib/systemd/system/nbd-server.service ]'

  if out=$(in_chroot "dpkg -P $package" 2>&1); then ok "dpkg -P"; else bad "dpkg -P: $out"; fi
  echo "$out" | sed 's/^/  | /'
  snapshot >"$work/purged"
  if diff -u "$work/before" "$work/purged" >"$work/purge.diff"; then
    ok "dpkg -P left nothing (every path, owner and mode, passwd/group/shadow as before the install)"
  else
    bad "dpkg -P left changes:"; sed 's/^/  | /' "$work/purge.diff"
  fi
  check "dpkg has forgotten the package" in_chroot "! dpkg-query -W $package >/dev/null 2>&1"

  # With a replica on disk, purge must keep it and the user owning it (postrm).
  in_chroot "dpkg -i /tmp/$package.deb >/dev/null && install -d -o nbd -g nbd -m 0700 /var/lib/nbd-server/r0 && echo data >/var/lib/nbd-server/r0/extent && chown nbd:nbd /var/lib/nbd-server/r0/extent"
  out=$(in_chroot "dpkg -P $package" 2>&1) || bad "dpkg -P with data: $out"
  check "purge keeps replica data, the user owning it, and says so" \
    in_chroot "[ -s /var/lib/nbd-server/r0/extent ] && [ \"\$(stat -c %U /var/lib/nbd-server/r0/extent)\" = nbd ]"
  if echo "$out" | grep -q "kept /var/lib/nbd-server"; then ok "purge with data names what it kept"; else bad "purge with data said: $out"; fi
  label="chroot"
else
  # Weaker: no chroot, so the maintainer scripts (user, state directory) are not run.
  say "WARNING: no chroot ($reason): falling back to dpkg --unpack into a scratch root; maintainer scripts are NOT checked"
  scratch="$work/root"
  mkdir -p "$scratch/var/lib/dpkg/updates" "$scratch/var/lib/dpkg/info"
  : >"$scratch/var/lib/dpkg/status"
  if out=$(dpkg --root="$scratch" --force-depends --force-not-root --force-script-chrootless --no-triggers --unpack "$deb" 2>&1); then
    ok "dpkg --unpack into a scratch root"
  else
    bad "dpkg --unpack: $out"
  fi
  if [ "$(stat -c %a "$scratch/etc/nbd-server/tls")" = 700 ]; then ok "/etc/nbd-server/tls 700"; else bad "/etc/nbd-server/tls mode"; fi
  if out=$("$scratch/usr/bin/nbd-server" --help 2>&1); then ok "nbd-server --help (host, not chroot)"; else bad "nbd-server --help: $out"; fi
  mkdir -p "$scratch/usr/lib/systemd"
  cp -r /usr/lib/systemd/system "$scratch/usr/lib/systemd/"
  if out=$(systemd-analyze verify --root="$scratch" nbd-server.service nbd-downstairs@r0.service 2>&1) && [ -z "$out" ]; then
    ok "systemd-analyze verify --root"
  else
    bad "systemd-analyze verify: $out"
  fi
  label="WEAKER: dpkg --unpack into a scratch root, maintainer scripts not run; no chroot: $reason"
fi

if [ "$failures" -eq 0 ]; then
  say "PASS ($label)"
else
  say "$failures check(s) FAILED ($label)"
  exit 1
fi
