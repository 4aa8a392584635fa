#!/usr/bin/env bash
# Build the Debian package dist/flexedge_<version>-1_<arch>.deb with dpkg-deb.
#
#   packaging/deb/build.sh      (FLEXEDGE_VENV: the venv that builds, default .venv, made if missing)
#
# The package installs nothing from the network: it carries the flexedge wheel and a
# wheelhouse of its dependencies, and its postinst makes /opt/flexedge a virtual
# environment from them (pip --no-index).  Making the wheelhouse (`pip wheel`, below)
# is the one step that needs the package registry; it fetches the wheels for THIS
# machine's architecture and Python, so build on the kind of machine the package is for
# (Debian 12 amd64 for amd64, a Raspberry Pi OS 64-bit or Debian 12 arm64 machine for
# arm64), with Debian's Python 3.11.
#
# Why dpkg-deb and not debhelper: the package is an installer for a virtual environment,
# not a Debian-built Python module (most of flexedge's dependencies, c104 among them,
# are not in Debian), so dh_python/pybuild have nothing to do; the tree below plus three
# small maintainer scripts (packaging/deb/) is the whole package, readable in one sitting.
set -euo pipefail
cd "$(dirname "$0")/../.."
source=$PWD
venv=${FLEXEDGE_VENV:-.venv}
python="$venv/bin/python"

say() { printf '\033[1m[deb %3ds]\033[0m %s\n' "$SECONDS" "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

if [ ! -x "$python" ]; then
    say "creating the build venv $venv (python3 -m venv; apt-get install python3-venv if this fails)"
    python3 -m venv "$venv"
fi
command -v dpkg-deb >/dev/null || fail "dpkg-deb is missing: build on Debian or Raspberry Pi OS"

version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=${FLEXEDGE_DEB_REVISION:-1}
arch=$(dpkg --print-architecture)
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
maintainer=${DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>' 2>/dev/null || echo 'flexedge maintainers <root@localhost>')}
deb="dist/flexedge_${version}-${revision}_${arch}.deb"

# The wheelhouse's compiled wheels are for this Python: the target needs the same one.
[ -x "/usr/bin/python$pyver" ] || fail "Debian's python$pyver is not installed: the wheelhouse would be for python$pyver"

wheel="dist/flexedge-$version-py3-none-any.whl"
if [ ! -f "$wheel" ] || [ -n "$(find edge drivers simulators profiles pyproject.toml -newer "$wheel" -print -quit)" ]; then
    say "building the wheel (python -m build)"
    "$python" -m pip install -q build
    log=$(mktemp)
    "$python" -m build --wheel --outdir dist . >"$log" 2>&1 || { tail -n 40 "$log"; fail "python -m build"; }
    rm -f "$log"
fi

stage=$(mktemp -d -t flexedge-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/flexedge_${version}-${revision}_${arch}"
mkdir -p "$root/DEBIAN" "$root/usr/share/flexedge/wheels" "$root/lib/systemd/system" \
    "$root/usr/share/doc/flexedge/examples" "$root/usr/bin"

say "wheelhouse for $arch, Python $pyver (pip wheel: needs the package registry)"
"$python" -m pip wheel -q --disable-pip-version-check --wheel-dir "$root/usr/share/flexedge/wheels" "$wheel"
# Nothing may be compiled on the target: every wheel is pure Python or built for this machine.
"$python" - "$root/usr/share/flexedge/wheels" "$arch" <<'PY'
import sys
from pathlib import Path
folder, arch = Path(sys.argv[1]), sys.argv[2]
machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
wrong = [w.name for w in folder.glob("*.whl") if not (w.name.endswith("-none-any.whl") or machine in w.name)]
if wrong:
    sys.exit(f"wheels not for {arch}: {wrong}")
print(f"  {len(list(folder.glob('*.whl')))} wheels", file=sys.stderr)
PY

install -m 0644 systemd/flexedge.service "$root/lib/systemd/system/flexedge.service"
# Examples only: a live /etc/flexedge/site.yaml would start a site that is not this one.
install -m 0644 profiles/site-example.yaml profiles/demo.yaml "$root/usr/share/doc/flexedge/examples/"
# The journal cap for small SD cards (docs/install.md, "Logs"): the administrator's choice.
if [ -f systemd/journald-flexedge.conf ]; then
    install -m 0644 systemd/journald-flexedge.conf "$root/usr/share/doc/flexedge/examples/"
fi
install -m 0644 docs/install.md README.md "$root/usr/share/doc/flexedge/"
install -m 0644 packaging/deb/copyright "$root/usr/share/doc/flexedge/copyright"
ln -s /opt/flexedge/bin/flexedge "$root/usr/bin/flexedge"
date_rfc=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")
printf 'flexedge (%s-%s) unstable; urgency=medium\n\n  * Package built from the flexedge source tree (packaging/deb/build.sh).\n\n -- %s  %s\n' \
    "$version" "$revision" "$maintainer" "$date_rfc" | gzip -9n >"$root/usr/share/doc/flexedge/changelog.Debian.gz"

for script in postinst prerm postrm; do
    sed -e "s/@VERSION@/$version/g" -e "s/@PYTHON@/\/usr\/bin\/python$pyver/g" "packaging/deb/$script" >"$root/DEBIAN/$script"
    chmod 0755 "$root/DEBIAN/$script"
done
cat >"$root/DEBIAN/control" <<CONTROL
Package: flexedge
Version: ${version}-${revision}
Architecture: ${arch}
Maintainer: ${maintainer}
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: python${pyver}, python${pyver}-venv, adduser, init-system-helpers (>= 1.52)
Suggests: mosquitto
Section: net
Priority: optional
Description: field-edge gateway for virtual power plants
 One asyncio daemon on a site's PC or Raspberry Pi drives PV inverters and
 storage (SunSpec Modbus), batteries and power-to-X units (IEC 60870-5-104)
 and EV chargers (OCPP) under a VPP's control over MQTT, obeying the grid
 operator's DEIE orders first.
 .
 The package carries its Python dependencies as wheels and installs them into
 /opt/flexedge. The service starts once /etc/flexedge/site.yaml exists and it
 is enabled (see /usr/share/doc/flexedge/install.md).
CONTROL

mkdir -p dist
rm -f "$deb"
# --root-owner-group: every file root-owned without fakeroot or root.
dpkg-deb --build -Zxz --root-owner-group "$root" "$deb" >/dev/null
say "built $deb ($(du -h "$deb" | cut -f1))"
if command -v lintian >/dev/null; then
    lintian --info "$deb" || say "lintian reports the problems above"
else
    say "lintian is not installed: skipped"
fi
echo "$source/$deb"
