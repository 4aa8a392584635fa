#!/usr/bin/env bash
# The wheel carries everything flexedge needs at run time: build the sdist and the wheel
# (the wheel from the sdist, as `python -m build` does), install the wheel into a fresh
# virtual environment outside the source tree, and run what a site runs from there:
# `flexedge --version`, `flexedge check` on every shipped profile, every shipped template
# loaded, `flexedge run` started and stopped, and a 20 s demo.  Exits non-zero on the
# first failure.
#
#   packaging/check-wheel.sh   (FLEXEDGE_VENV: the venv that builds, default .venv, made if missing)
#
# Needs the package registry (the build back end and flexedge's dependencies).  Leaves
# the sdist and the wheel in dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
source=$PWD
venv=${FLEXEDGE_VENV:-.venv}
python="$venv/bin/python"
demo_s=${FLEXEDGE_DEMO_S:-20}

say() { printf '\033[1m[check-wheel %3ds]\033[0m %s\n' "$SECONDS" "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

if [ ! -x "$python" ]; then
    say "creating the build venv $venv (python3 -m venv)"
    python3 -m venv "$venv"
fi
work=$(mktemp -d -t flexedge-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT

say "building the sdist and the wheel (python -m build)"
"$python" -m pip install -q build
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
mkdir -p dist
rm -f "dist/flexedge-$version.tar.gz" "dist/flexedge-$version-py3-none-any.whl"
"$python" -m build --outdir dist . >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log"; fail "python -m build"; }
wheel="$source/dist/flexedge-$version-py3-none-any.whl"
sdist="$source/dist/flexedge-$version.tar.gz"
[ -f "$wheel" ] && [ -f "$sdist" ] || fail "python -m build made no $wheel and $sdist"

say "checking their contents: the data files are regular files"
"$python" - "$sdist" "$wheel" <<'PY'
import sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
needed = {"edge/profiles/demo.yaml", "edge/profiles/site-example.yaml", "edge/profiles/templates/deie.yaml",
          "edge/profiles/templates/bess-generic.yaml", "edge/py.typed"}
with tarfile.open(sdist) as tar:
    links = [m.name for m in tar.getmembers() if m.issym() or m.islnk()]
    regular = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
with zipfile.ZipFile(wheel) as whl:
    in_wheel = set(whl.namelist())
problems = [f"sdist holds links: {links}"] if links else []
problems += [f"sdist lacks {name}" for name in sorted(needed - regular)]
problems += [f"wheel lacks {name}" for name in sorted(needed - in_wheel)]
if problems:
    sys.exit("\n".join(problems))
print(f"  sdist {len(regular)} files, wheel {len(in_wheel)} files, shipped profiles and templates in both")
PY

say "installing the wheel into a new venv ($work/venv)"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel" >"$work/pip.log" 2>&1 \
    || { tail -n 40 "$work/pip.log"; fail "pip install $wheel"; }

# Outside the source tree, so that nothing can be imported or read from the checkout.
mkdir "$work/site"
cd "$work/site"
flexedge="$work/venv/bin/flexedge"

say "flexedge --version"
"$flexedge" --version

say "every shipped profile and template, from the installed package"
mapfile -t profiles < <("$work/venv/bin/python" - "$work/venv" <<'PY'
import sys
from pathlib import Path
from edge import resources
from drivers.deie.config import load_template as load_deie_template
from drivers.iec104.config import load_template as load_iec104_template

venv = Path(sys.argv[1]).resolve()
folder = resources.shipped_folder().resolve()
if not folder.is_relative_to(venv):
    sys.exit(f"shipped files come from {folder}, not from the installed wheel in {venv}")
for name in resources.template_names():
    points = load_deie_template(name) if name == "deie" else load_iec104_template(name)
    print(f"  template {name}: {len(points)} points", file=sys.stderr)
for path in resources.shipped_profiles():
    print(path)
PY
)
[ ${#profiles[@]} -gt 0 ] || fail "the installed package ships no profile"
for profile in "${profiles[@]}"; do
    say "flexedge check $profile"
    "$flexedge" check "$profile" >"$work/check.log" 2>&1 || { cat "$work/check.log"; fail "flexedge check $profile"; }
    head -n 1 "$work/check.log"
done

say "flexedge run on the demo profile, no devices there, stopped by SIGTERM after 6 s"
# Its files in the work folder, not in /var/lib/flexedge.
sed -e "s#/var/lib/flexedge/#$work/site/#" "${profiles[0]%/*}/demo.yaml" >"$work/site/run.yaml"
status=0
timeout --preserve-status -s TERM 6 "$flexedge" run "$work/site/run.yaml" >"$work/run.log" 2>&1 || status=$?
grep -q "flexedge.daemon: stopped" "$work/run.log" && [ $status -eq 0 ] \
    || { tail -n 40 "$work/run.log"; fail "flexedge run did not start and stop cleanly (exit $status)"; }
tail -n 1 "$work/run.log"

say "flexedge demo --duration-s $demo_s (from the installed wheel)"
# The demo counts its duration from the VPP's start, after every simulated asset answers.
status=0
timeout $((demo_s + 90)) "$flexedge" demo --duration-s "$demo_s" --workdir "$work/demo" >"$work/demo.log" 2>&1 \
    || status=$?
[ $status -eq 0 ] || { tail -n 40 "$work/demo.log"; fail "flexedge demo exited $status (124: timed out)"; }
grep -q "^sent [1-9][0-9]* setpoints" "$work/demo.log" || { tail -n 40 "$work/demo.log"; fail "the demo's VPP sent no setpoint"; }
tail -n 1 "$work/demo.log"
say "OK: the wheel installs and runs outside the source tree"
