#!/usr/bin/env bash
# Installs the published binaries (scripts/publish.sh), the systemd units and a default config.
# Usage: scripts/install.sh [--destdir DIR] [--prefix /usr/local] [--sysconfdir /etc]
#                           [--unitdir /etc/systemd/system] [--statedir /var/lib] [--from DIR]
#   --destdir DIR  stage under DIR (packaging, tests); paths inside files stay the real ones,
#                  and no user is created and systemd is not reloaded
#   --from DIR     the published binaries (default artifacts/publish/linux-x64)
# Existing config files are never overwritten; new versions land next to them as *.new.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
destdir=""
prefix=/usr/local
sysconfdir=/etc
unitdir=/etc/systemd/system
statedir=/var/lib
from="$root/artifacts/publish/linux-x64"
while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) destdir=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --sysconfdir) sysconfdir=$2; shift 2 ;;
    --unitdir) unitdir=$2; shift 2 ;;
    --statedir) statedir=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for b in nbd-server nbd-downstairs nbd-certs nbd-verify; do
  [ -x "$from/$b" ] || { echo "install.sh: $from/$b missing: run scripts/publish.sh first" >&2; exit 1; }
done
bindir="$prefix/bin"
confdir="$sysconfdir/nbd-server"
docdir="$prefix/share/doc/nbd-server"
src="$root/scripts/systemd"

# The units and configs in the repository name the default paths; rewrite them for this layout.
rewrite() {
  sed -e "s|/usr/local/bin/|$bindir/|g" \
      -e "s|/usr/local/share/doc/nbd-server|$docdir|g" \
      -e "s|/etc/nbd-server|$confdir|g" \
      -e "s|/var/lib/nbd-server|$statedir/nbd-server|g" "$1"
}
install_config() { # FILE NAME: never clobber an operator's edits
  local target="$destdir$confdir/$2"
  if [ -e "$target" ]; then
    rewrite "$1" >"$target.new"; chmod 0644 "$target.new"
    echo "install.sh: kept $target (new version: $target.new)"
  else
    rewrite "$1" >"$target"; chmod 0644 "$target"
  fi
}

install -d -m 0755 "$destdir$bindir" "$destdir$unitdir" "$destdir$unitdir/nbd@nbd0.service.d" "$destdir$confdir" "$destdir$docdir"
# TLS directory (README "Install as a service"): root only; the units pass the files on as credentials.
install -d -m 0700 "$destdir$confdir/tls"
install -m 0755 "$from/nbd-server" "$from/nbd-downstairs" "$from/nbd-certs" "$from/nbd-verify" "$destdir$bindir/"
for unit in nbd-server.service nbd-downstairs@.service; do
  rewrite "$src/$unit" >"$destdir$unitdir/$unit"; chmod 0644 "$destdir$unitdir/$unit"
done
rewrite "$src/nbd@nbd0.service.d/nbd-server.conf" >"$destdir$unitdir/nbd@nbd0.service.d/nbd-server.conf"
install_config "$src/nbd-server.json" nbd-server.json
install_config "$src/nbd-downstairs.json" nbd-downstairs.json
install_config "$src/nbd-server.env" nbd-server.env
install_config "$src/downstairs-r0.env" downstairs-r0.env.example
install -m 0644 "$src/nbdtab" "$destdir$docdir/nbdtab.example"
install -m 0644 "$root/README.md" "$destdir$docdir/README.md"
[ -e "$root/docs/configuration.md" ] && install -m 0644 "$root/docs/configuration.md" "$destdir$docdir/"

if [ -z "$destdir" ] && [ "$(id -u)" -eq 0 ]; then
  # The downstairs run as a dedicated user (the upstairs uses DynamicUser=).
  getent passwd nbd >/dev/null || useradd --system --user-group --no-create-home --home-dir "$statedir/nbd-server" --shell /usr/sbin/nologin nbd
  install -d -m 0755 -o nbd -g nbd "$statedir/nbd-server"
  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
fi
echo "install.sh: installed into ${destdir:-/}: $bindir/{nbd-server,nbd-downstairs,nbd-certs,nbd-verify}, $unitdir/{nbd-server.service,nbd-downstairs@.service}, $confdir/"
