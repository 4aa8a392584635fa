#!/usr/bin/env bash
# Install the Debian package on this machine, check what it put in place, reinstall it
# (the upgrade path), remove it, purge it, and check that it is gone.
#
#   packaging/deb/check.sh [dist/flexedge_<version>-1_<arch>.deb]   (default: the newest in dist/)
#
# Needs root and a machine where flexedge is not installed: a disposable one (CI, a
# container).  Without root, or with flexedge installed, it says so and skips (exit 0).
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf '\033[1m[deb-check %3ds]\033[0m %s\n' "$SECONDS" "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

deb=${1:-$(ls -t dist/flexedge_*.deb 2>/dev/null | head -n 1)}
[ -n "$deb" ] && [ -f "$deb" ] || fail "no .deb: run packaging/deb/build.sh first"
deb=$(realpath "$deb")
if [ "$(id -u)" -ne 0 ]; then
    say "SKIPPED installing $deb: needs root (dpkg -i)"; exit 0
fi
if dpkg-query -W -f '${Status}' flexedge 2>/dev/null | grep -q installed || [ -e /opt/flexedge ]; then
    say "SKIPPED installing $deb: flexedge is installed here already (this check would replace it)"; exit 0
fi

# Whatever happens, leave the machine as it was.
trap 'dpkg --purge flexedge >/dev/null 2>&1 || true' EXIT

expect_mode() {  # path owner:group mode
    local actual; actual=$(stat -c '%U:%G %a' "$1") || fail "$1 does not exist"
    [ "$actual" = "$2 $3" ] || fail "$1 is $actual, expected $2 $3"
    echo "  $1 $actual"
}

missing=()
for dependency in $(dpkg-deb -f "$deb" Depends | sed -e 's/([^)]*)//g' -e 's/,/ /g'); do
    dpkg-query -W -f '${Status}' "$dependency" 2>/dev/null | grep -q "ok installed" || missing+=("$dependency")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing the package's dependencies first: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
say "dpkg -i $(basename "$deb")"
dpkg -i "$deb"
/opt/flexedge/bin/flexedge --version
say "flexedge check on the shipped examples (the example as the service's user)"
runuser -u flexedge -- /opt/flexedge/bin/flexedge check /usr/share/doc/flexedge/examples/site-example.yaml \
    >/dev/null 2>&1 || { runuser -u flexedge -- /opt/flexedge/bin/flexedge check \
    /usr/share/doc/flexedge/examples/site-example.yaml; fail "flexedge check of the example, as user flexedge"; }
echo "  site-example.yaml: OK as user flexedge"
summary=$(flexedge check /usr/share/doc/flexedge/examples/demo.yaml 2>/dev/null) || fail "flexedge check of demo.yaml"
echo "  ${summary%%$'\n'*}  (flexedge on PATH: /usr/bin/flexedge)"
say "the user, the folders, the unit"
id flexedge
expect_mode /etc/flexedge root:flexedge 750
expect_mode /var/lib/flexedge flexedge:flexedge 750
expect_mode /opt/flexedge/bin/flexedge root:root 755
[ ! -e /etc/flexedge/site.yaml ] || fail "the package put a live /etc/flexedge/site.yaml in place"
grep -q '^ConditionPathExists=/etc/flexedge/site.yaml$' /lib/systemd/system/flexedge.service \
    || fail "the unit does not wait for /etc/flexedge/site.yaml"
echo "  /lib/systemd/system/flexedge.service waits for /etc/flexedge/site.yaml"

say "dpkg -i again (the upgrade path: prerm upgrade, a fresh venv)"
echo state >/var/lib/flexedge/kept-until-purge
dpkg -i "$deb" >/dev/null
/opt/flexedge/bin/flexedge --version

say "dpkg --remove: the venv goes, the state and the user stay"
dpkg --remove flexedge >/dev/null
[ ! -e /opt/flexedge ] || fail "/opt/flexedge is still there after remove"
[ -f /var/lib/flexedge/kept-until-purge ] || fail "remove deleted the state in /var/lib/flexedge"

say "dpkg --purge"
dpkg --purge flexedge >/dev/null
for gone in /opt/flexedge /var/lib/flexedge /etc/flexedge /lib/systemd/system/flexedge.service /usr/bin/flexedge; do
    [ ! -e "$gone" ] && [ ! -L "$gone" ] || fail "$gone is still there after purge"
done
! dpkg-query -W -f '${Status}' flexedge 2>/dev/null | grep -q installed || fail "dpkg still lists flexedge"
echo "  /opt/flexedge, /var/lib/flexedge, /etc/flexedge, the unit: gone (the flexedge user stays, as Debian does)"
say "OK: $(basename "$deb") installs, upgrades, removes and purges"
