#!/usr/bin/env bash
# Builds the Debian package (.deb) of nbd-server: the four executables with the one private .NET
# runtime they share, the systemd units, the default configuration (conffiles under
# /etc/nbd-server), man pages and bash completions when the executables provide them, and
# maintainer scripts that create the "nbd" user.
# Usage: scripts/package-deb.sh [--from DIR | --publish-dir DIR [--publish-only]] [--rid RID] [--no-r2r]
#          [--output DIR] [--version V] [--compress xz|gzip] [--compress-level N] [--lintian]
#   --publish-dir DIR  publish the four projects there first (default artifacts/publish-deb/RID)
#   --publish-only     stop after publishing (the tests cache the result)
#   --from DIR     package what is already published in DIR instead: this script's layout or
#                  scripts/publish.sh's single-file executables (4x the size: a runtime each)
#   --no-r2r       publish without ReadyToRun (faster build, slower start; see publish.sh)
#   --output DIR   where the .deb goes (default artifacts/deb)
#   --version V    package version (default 0.1.0~gitYYYYMMDD.COMMIT from the checked-out commit)
#   --compress C   dpkg-deb compressor (default xz, the archive's; gzip builds several times faster)
#   --compress-level N  its level (default: dpkg-deb's; the tests use gzip at 1)
#   --lintian      check the result with lintian: fails on any error or warning not accepted below
# Needs the .NET SDK (to publish), dpkg-dev (dpkg-deb, dpkg-shlibdeps); --lintian needs lintian.
# Runs as any user. The last line printed is the path of the .deb.
#
# Self-contained, because bookworm has no .NET runtime package to depend on; but not single-file
# as scripts/publish.sh builds for copying by hand: four single-file executables carry four copies
# of the runtime (~300 MB installed without ReadyToRun), while the four published into one
# directory share one (~85 MB). That directory is /usr/lib/PACKAGE, with a symlink in /usr/bin
# for each executable (the .NET host resolves its own path through it to find the runtime).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# Not "nbd-server": Debian already ships a package of that name (the reference NBD server, with
# its own /usr/bin/nbd-server and /etc/nbd-server), at an epoch-1 version apt would "upgrade" ours to.
package=nbd-server-replicated
maintainer=${NBD_DEB_MAINTAINER:-"nbd-server developers <nbd-server@users.noreply.github.com>"}

# Lintian warnings this package accepts, each with why; they become the package's lintian
# overrides (usr/share/lintian/overrides), so `lintian` on the .deb reports them as overridden.
# Checked with bookworm's lintian 2.116; info tags (e.g. hardening-no-fortify-functions: Microsoft
# builds the .NET host) are left visible. dh_strip is never run: strip would cut off the
# application bundle appended to each executable's ELF file (lintian finds them stripped anyway).
accepted=(
  # An error tag, accepted: the .NET runtime links its own zlib-ng (System.IO.Compression) into
  # every self-contained executable, and Microsoft's runtime has no build that uses the system's.
  # Debian's way out would be a .NET runtime package, which bookworm does not have.
  "embedded-library zlib [usr/lib/$package/libSystem.IO.Compression.Native.so]"
  # The TLS directory holds private keys: root only; the units hand them to the services as
  # systemd credentials, so no service user reads /etc/nbd-server/tls itself.
  "non-standard-dir-perm 0700 != 0755 [etc/nbd-server/tls/]"
  # Added below for each executable without a page in docs/man.
)

from=""
publish_dir=""
publish_only=false
rid=linux-x64
r2r=true
out="$root/artifacts/deb"
version=""
compress=xz
level=""
check=false
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from=$2; shift 2 ;;
    --publish-dir) publish_dir=$2; shift 2 ;;
    --publish-only) publish_only=true; shift ;;
    --rid) rid=$2; shift 2 ;;
    --no-r2r) r2r=false; shift ;;
    --output) out=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --compress) compress=$2; shift 2 ;;
    --compress-level) level=$2; shift 2 ;;
    --lintian) check=true; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package-deb.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$rid" in
  linux-x64) arch=amd64 ;;
  linux-arm64) arch=arm64 ;;
  *) echo "package-deb.sh: no Debian architecture for RID $rid" >&2; exit 2 ;;
esac
for tool in dpkg-deb dpkg-shlibdeps; do
  command -v "$tool" >/dev/null || { echo "package-deb.sh: $tool missing: apt-get install dpkg-dev" >&2; exit 2; }
done
if [ "$check" = true ] && ! command -v lintian >/dev/null; then
  echo "package-deb.sh: lintian missing: apt-get install lintian" >&2; exit 2
fi

binaries=(nbd-server nbd-downstairs nbd-certs nbd-verify)
if [ -z "$from" ]; then
  from=${publish_dir:-$root/artifacts/publish-deb/$rid}
  rm -rf "$from"
  # Intermediate files under artifacts/ (not src/*/obj), as in publish.sh: a RID-specific restore
  # there would disturb concurrent `dotnet build`s of the same projects.
  build="$root/artifacts/publish-build/deb-$rid-$([ "$r2r" = true ] && echo r2r || echo jit)"
  for project in src/NbdFrontend/NbdFrontend.csproj src/Downstairs/Downstairs.csproj src/Tools/Certs/Certs.csproj src/Tools/Verify/Verify.csproj; do
    echo "package-deb.sh: publishing $project ($rid, self-contained, ReadyToRun=$r2r) into $from" >&2
    # The same central package versions for all four, so the files they share are the same files.
    dotnet publish "$root/$project" -c Release -r "$rid" --self-contained true -nologo -v quiet \
      -p:PublishSingleFile=false -p:PublishReadyToRun=$r2r -p:DebugType=embedded \
      -p:ErrorOnDuplicatePublishOutputFiles=false --artifacts-path "$build" -o "$from" >&2
  done
  rm -f "$from"/*.pdb
fi
[ "$publish_only" = false ] || exit 0
for b in "${binaries[@]}"; do
  [ -x "$from/$b" ] || { echo "package-deb.sh: $from/$b missing" >&2; exit 1; }
done
# This script's layout has the runtime beside the executables; publish.sh's has none.
if [ -e "$from/libcoreclr.so" ]; then shared=true; else shared=false; fi

# Reproducible: every date in the package is the commit's.
commit_epoch=$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$commit_epoch}
if [ -z "$version" ]; then
  version="0.1.0~git$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d).$(git -C "$root" rev-parse --short=7 HEAD 2>/dev/null || echo unknown)"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/nbd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage="$work/$package"
doc="/usr/share/doc/$package"
unitdir=/lib/systemd/system   # bookworm's place for packaged units (/usr/lib from trixie on)
src="$root/scripts/systemd"
pkgsrc="$root/packaging/deb"
umask 022

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage$unitdir" "$stage/etc/nbd-server" \
  "$stage$doc/examples/nbd@nbd0.service.d" "$stage$doc/examples/monitoring" "$stage/usr/share/lintian/overrides"
install -d -m 0700 "$stage/etc/nbd-server/tls"
if [ "$shared" = true ]; then
  libdir="/usr/lib/$package"
  install -d "$stage$libdir"
  # Files 0644 but the executables (the four and the runtime's createdump): policy 10.9, and
  # shared libraries are not executable (policy 8.1).
  # Not libcoreclrtraceptprovider.so: LTTng tracing, linked against liblttng-ust.so.0, which
  # bookworm does not have (it has .so.1); without the file the runtime simply does not trace.
  find "$from" -maxdepth 1 -type f ! -name '*.pdb' ! -name libcoreclrtraceptprovider.so \
    -exec install -m 0644 -t "$stage$libdir" {} +
  for b in "${binaries[@]}" createdump; do
    if [ -e "$stage$libdir/$b" ]; then chmod 0755 "$stage$libdir/$b"; fi
  done
  for b in "${binaries[@]}"; do
    ln -s "../lib/$package/$b" "$stage/usr/bin/$b"
  done
  elves=("$stage$libdir"/nbd-* "$stage$libdir"/*.so)
  if [ -e "$stage$libdir/createdump" ]; then elves+=("$stage$libdir/createdump"); fi
else
  for b in "${binaries[@]}"; do
    install -m 0755 "$from/$b" "$stage/usr/bin/$b"
  done
  elves=("${binaries[@]/#/$stage/usr/bin/}")
  accepted+=("embedded-library zlib [usr/bin/*]")
fi

# Man pages (docs/man/NAME.SECTION, when the CLI provides them) and bash completions (from
# `BINARY completion bash`, when the executable has that command).
shopt -s nullglob
for page in "$root"/docs/man/*.[1-8]; do
  name=$(basename "$page"); section=${name##*.}
  install -d "$stage/usr/share/man/man$section"
  gzip -9n <"$page" >"$stage/usr/share/man/man$section/$name.gz"
  chmod 0644 "$stage/usr/share/man/man$section/$name.gz"
done
shopt -u nullglob
for b in "${binaries[@]}"; do
  if [ ! -e "$root/docs/man/$b.1" ]; then
    echo "package-deb.sh: warning: no docs/man/$b.1: no man page packaged for $b" >&2
    # Accepted until docs/man has its page: the executable's --help is its manual meanwhile.
    accepted+=("no-manual-page [usr/bin/$b]")
  fi
done
for b in "${binaries[@]}"; do
  # A scratch HOME and directory: an executable without the command must not read or write anything real.
  if script=$(cd "$work" && HOME="$work" timeout 30 "$stage/usr/bin/$b" completion bash </dev/null 2>/dev/null) \
     && grep -q 'complete ' <<<"$script"; then
    install -d "$stage/usr/share/bash-completion/completions"
    printf '%s\n' "$script" >"$stage/usr/share/bash-completion/completions/$b"
    chmod 0644 "$stage/usr/share/bash-completion/completions/$b"
  else
    echo "package-deb.sh: warning: '$b completion bash' gave no completion script: none packaged for $b" >&2
  fi
done

# The repository's units and configs name install.sh's default paths (/usr/local); a package
# installs into /usr.
rewrite() {
  sed -e "s|/usr/local/bin/|/usr/bin/|g" \
      -e "s|file:/usr/local/share/doc/nbd-server/README.md|file:$doc/README.md.gz|g" \
      -e "s|/usr/local/share/doc/nbd-server|$doc|g" "$1"
}
for unit in nbd-server.service nbd-downstairs@.service; do
  rewrite "$src/$unit" >"$stage$unitdir/$unit"
  man=${unit%%@*}; man=${man%.service}
  if [ -e "$root/docs/man/$man.1" ]; then
    sed -i "s|^Documentation=|Documentation=man:$man(1) |" "$stage$unitdir/$unit"
  fi
  chmod 0644 "$stage$unitdir/$unit"
done
conffiles=(nbd-server.json nbd-downstairs.json nbd-server.env)
for f in "${conffiles[@]}"; do
  rewrite "$src/$f" >"$stage/etc/nbd-server/$f"; chmod 0644 "$stage/etc/nbd-server/$f"
  echo "/etc/nbd-server/$f" >>"$stage/DEBIAN/conffiles"
done
# Attaching /dev/nbd0 after nbd-server is the guest host's choice (a storage host may use nbd0 for
# something else), so the nbd-client drop-in is an example to copy, not an installed unit.
rewrite "$src/nbd@nbd0.service.d/nbd-server.conf" >"$stage$doc/examples/nbd@nbd0.service.d/nbd-server.conf"
install -m 0644 "$src/nbdtab" "$stage$doc/examples/nbdtab"
install -m 0644 "$src/downstairs-r0.env" "$stage$doc/examples/downstairs-r0.env"
for f in "$root"/monitoring/nbd-alerts.yml "$root"/monitoring/grafana-nbd.json; do
  [ -e "$f" ] && install -m 0644 "$f" "$stage$doc/examples/monitoring/"
done
chmod 0644 "$stage$doc/examples/nbd@nbd0.service.d/nbd-server.conf"
# Policy 12.3: documentation over 4 kB is compressed.
gzip -9n <"$root/README.md" >"$stage$doc/README.md.gz"
[ -e "$root/docs/configuration.md" ] && gzip -9n <"$root/docs/configuration.md" >"$stage$doc/configuration.md.gz"

bundled=$(grep -ho 'PackageReference Include="[^"]*"' "$root"/src/*/*.csproj "$root"/src/Tools/*/*.csproj | cut -d'"' -f2 | sort -u |
  while read -r id; do
    v=$(grep -o "PackageVersion Include=\"$id\" Version=\"[^\"]*\"" "$root/Directory.Packages.props" | cut -d'"' -f4)
    echo " $id $v"
  done)
awk -v bundled="$bundled" '{ if ($0 == "@BUNDLED@") print bundled; else print }' "$pkgsrc/copyright.in" >"$stage$doc/copyright"
{
  echo "$package ($version) unstable; urgency=medium"
  echo
  echo "  * Built from commit $(git -C "$root" log -1 --format=%h 2>/dev/null || echo unknown)."
  echo
  echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$stage$doc/changelog.gz"
chmod 0644 "$stage$doc/copyright" "$stage$doc"/*.gz
{
  echo "# Accepted warnings, each explained in scripts/package-deb.sh."
  for a in "${accepted[@]}"; do echo "$package: $a"; done
} >"$stage/usr/share/lintian/overrides/$package"
chmod 0644 "$stage/usr/share/lintian/overrides/$package"

# Depends: the libraries the executables link (dpkg-shlibdeps), adduser for the maintainer
# scripts, libssl3, which .NET loads at run time (dlopen) for every TLS link, and procps for the
# /bin/kill of nbd-server.service's ExecReload (a minbase root has none). No ICU: the
# executables are built with InvariantGlobalization.
mkdir -p "$work/shlibs/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$package" "$package" >"$work/shlibs/debian/control"
elf_files=()
for f in "${elves[@]}"; do
  case "$f" in *.json|*.dll) ;; *) elf_files+=("$f") ;; esac
done
# -l: libmscordbi.so (debugger support) links the runtime's private libmscordaccore.so.
shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O -l"$stage${libdir:-/usr/lib}" "${elf_files[@]}" 2>"$work/shlibdeps.log" | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "package-deb.sh: dpkg-shlibdeps failed:" >&2; cat "$work/shlibdeps.log" >&2; exit 1; }
depends="$shlibs, libssl3, adduser, procps"

for s in postinst prerm postrm; do
  install -m 0755 "$pkgsrc/$s" "$stage/DEBIAN/$s"
done
chmod 0644 "$stage/DEBIAN/conffiles"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums"
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@PACKAGE@|$package|g" -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" \
    -e "s|@MAINTAINER@|$maintainer|" -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" \
    "$pkgsrc/control.in" >"$stage/DEBIAN/control"
chmod 0644 "$stage/DEBIAN/control"

mkdir -p "$out"
deb="$out/${package}_${version}_${arch}.deb"
# --root-owner-group: every file root:root without fakeroot.
dpkg-deb --root-owner-group -Z"$compress" ${level:+-z"$level"} --build "$stage" "$deb" >/dev/null

if [ "$check" = true ]; then
  # Errors and unaccepted warnings fail; info tags are not shown. (Not --show-overrides: with it,
  # lintian 2.116 fails on the overridden tags too.)
  printf 'package-deb.sh: lintian overrides: %s\n' "${accepted[@]}" >&2
  lintian --fail-on error,warning --display-level '>=warning' "$deb" || {
    echo "package-deb.sh: lintian found errors or warnings not accepted in this script" >&2; exit 1; }
fi
echo "$deb"
