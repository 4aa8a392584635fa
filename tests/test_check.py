"""`flexedge check` as a field engineer reads it: every problem in one pass, each at the line of
the key it is about, YAML mistakes in plain words, "did you mean", and warnings for what would
surprise at run time.  Through the real CLI (edge.cli.main), on the example profiles with edits.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "profiles" / "site-example.yaml").read_text()
DEMO = (ROOT / "profiles" / "demo.yaml").read_text()


def edit(text: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert text.count(old) >= 1, old
        text = text.replace(old, new, 1)
    return text


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The line of the nth line containing ``needle`` (1-based)."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if line.lstrip().startswith(needle.strip())]
    return hits[nth - 1]


def run_check(capsys, path: Path) -> tuple[int, str, str]:
    status = main(["check", str(path)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture()
def write(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "site.yaml"
        # keep the spool off this machine's /var/lib
        path.write_text(text.replace("/var/lib/flexedge/", f"{tmp_path}/"))
        return path

    return write


# ------------------------------------------------ errors: one pass, right line

ERRORS = {
    "misspelt key": (EXAMPLE, [("  cycle_s: 2.0", "  cycle_sec: 2.0")],
                     [("  cycle_sec:", "control.cycle_sec", "unknown key (did you mean 'cycle_s'?)")]),
    "allocation": (EXAMPLE, [("allocation: merit_order", "allocation: merit-order")],
                   [("allocation:", "control.allocation",
                     "must be 'pro_rata' or 'merit_order', got 'merit-order' (did you mean 'merit_order'?)")]),
    "driver": (EXAMPLE, [("driver: sunspec", "driver: sunspek")],
               [("driver: sunspek", "assets[0].driver", "unknown driver 'sunspek' (did you mean 'sunspec'?)")]),
    "duplicate id": (EXAMPLE, [("- id: bess-1", "- id: inv-north")],
                     [("- id: inv-north", "assets[2].id", "asset id 'inv-north' is used twice (also by assets[0] at line {first}): "
                                                        "ids must be unique", 2)]),
    "second connection point": (
        EXAMPLE + "\n  - id: meter-2\n    kind: meter\n    driver: sunspec\n    host: 192.0.2.41\n"
                  "    connection_point: true\n", [],
        [("connection_point: true\n", "assets[4].connection_point",
          "a second connection-point meter: 'meter-poc' (assets[3] at line {first}) is one already; at most one meter measures the "
          "site's connection point", 2)]),
    "source typo": (EXAMPLE, [("frequency_source: meter-poc", "frequency_source: meter-pco")],
                    [("frequency_source:", "functions.fcr.frequency_source",
                      "no asset 'meter-pco' in assets (did you mean 'meter-poc'?)")]),
    "missing required key": (EXAMPLE, [("  id: sainte-anne-pv-01\n", "")],
                             [("site:", "site.id", "required key is missing")]),
    "field and cross errors together": (
        EXAMPLE, [("    port: 502\n", "    port: 70000\n"), ("- id: bess-1", "- id: inv-north"),
                  ("voltage_source: meter-poc", "voltage_source: nowhere")],
        [("voltage_source:", "functions.q_u.voltage_source", "no asset 'nowhere' in assets"),
         ("port: 70000", "assets[0].port", "must be 1..65535, got 70000"),
         ("- id: inv-north", "assets[2].id", "asset id 'inv-north' is used twice", 2)]),
    "serial settings differ on one line": (
        EXAMPLE + "\n  - id: meter-rtu\n    kind: meter\n    driver: sunspec\n    unit_id: 4\n"
                  "    serial:\n      port: /dev/ttyUSB0\n      baudrate: 9600\n      parity: E\n", [],
        [("baudrate: 9600", "assets[4].serial.baudrate", "asset 'meter-rtu' sets baudrate 9600 on serial port")]),
    "template typo": (DEMO, [("template: bess-generic", "template: bess-generik")],
                      [("template: bess-generik", "assets[3].template",
                        "no template named 'bess-generik' (did you mean 'bess-generic'?)")]),
    "charge point id twice": (DEMO, [("charge_point_id: DEMO-CP16-2", "charge_point_id: DEMO-CP16-1")],
                              [("charge_point_id: DEMO-CP16-1", "assets[6].charge_point_id",
                                "charge point id 'DEMO-CP16-1' is used twice", 2)]),
    "a model's own check at its key": (DEMO, [("    soc_min_pct: 10\n    soc_max_pct: 90\n\n  - id: bess-2",
                                               "    soc_min_pct: 95\n    soc_max_pct: 90\n\n  - id: bess-2")],
                                       [("soc_min_pct: 95", "assets[2].soc_min_pct",
                                         "soc_min_pct (95) must be below soc_max_pct (90)")]),
    "unknown signal": (DEMO, [("    template: electric-boiler\n",
                               "    template: electric-boiler\n    points:\n      p_setpiont: {ioa: 9, type: C_SE_NC_1}\n")],
                       [("p_setpiont", "assets[4].points.p_setpiont", "unknown signal (did you mean 'p_setpoint'?)")]),
    "a list where a map is expected": (EXAMPLE, [("  fallback:\n    ramp_kw_per_s: 20",
                                                  "  fallback:\n    - ramp_kw_per_s: 20")],
                                       [("fallback:", "control.fallback", "must be a mapping")]),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_at_their_line_in_one_pass(name, write, capsys):
    base, replacements, expected = ERRORS[name]
    text = edit(base, *replacements)
    status, _, err = run_check(capsys, write(text))
    assert status == 2, err
    problems = [line.strip() for line in err.splitlines()[1:] if line.startswith("  site.yaml:")]
    assert len(problems) == len(expected), err
    for needle, key, message, *nth in expected:
        line = line_of(text, needle, *nth)
        message = message.format(first=line_of(text, needle))  # "also at line N": the first of them
        assert any(p.startswith(f"site.yaml:{line} {key}: {message}") for p in problems), (line, key, err)
    lines = [int(re.match(r"site\.yaml:(\d+)", p).group(1)) for p in problems]
    assert lines == sorted(lines), err  # in file order


# ------------------------------------------------------- YAML in plain words

SYNTAX = {
    "tab": ("site:\n\tid: x\n", 2, "column 1: a tab character; YAML indents with spaces only"),
    "indentation": ("site:\n    id: x\n  name: y\n", 3, "column 3: indentation does not match the lines above"),
    "indented too far": ("site:\n  id: x\n    name: y\n", 3, "column 5: indented more than line 2 above"),
    "unclosed quote": ("site:\n  id: x\n  name: \"Sainte-Anne\n", 3, "column 9: a quote opened here is never closed"),
    "unclosed quote, more below": ("site:\n  name: 'x\n  id: 'y'\ncontrol: {cycle_s: 2}\n", 2,
                                   "column 9: a quote opened on this line is not closed on it"),
    "unclosed bracket": ("site: {id: x}\nassets: [\n  {id: a}\n", 2, "column 9: a '[' opened here is never closed"),
    "unclosed brace": ("site: {id: x\ncontrol: {}\n", 1, "column 7: a '{' opened here is never closed"),
    "colon in a value": ("site:\n  id: x\n  name: PV: north\n", 3, "column 11: a second ': ' on this line"),
    "key without colon": ("site:\n  id x\n  name: y\n", 2, "column 3: this line has no ':'"),
    "windows path": ("site: {id: x}\nuplink:\n  spool:\n    path: \"C:\\flexedge\\spool\"\n", 4,
                     "column 24: a backslash in a double-quoted string"),
    "duplicate key": ("site:\n  id: x\n  name: y\n  id: z\n", 4, "site.id: duplicate key `id` (also at line 2)"),
    "list item among keys": ("site:\n  id: x\n  - y\n", 3, "column 3: a list item ('- ') where `key: value` lines"),
    "two documents": ("site: {id: x}\n---\nsite: {id: y}\n", 2, "column 1: a second document starts here"),
    "undefined alias": ("site: {id: x}\ncontrol: *defaults\n", 2, "column 10: *defaults is an alias"),
    "unknown tag": ("site: {id: !secret x}\n", 1, "column 12: unknown tag '!secret'"),
    "control character": ("site: {id: x\x07}\n", 1, "column 13: a control character (U+0007)"),
    "empty": ("", 1, "the file is empty"),
    "only comments": ("# site: {id: x}\n", 1, "the file is empty"),
    "a list at the top": ("- site\n- control\n", 1, "a profile is a mapping"),
}


@pytest.mark.parametrize("name", list(SYNTAX))
def test_yaml_mistakes_in_plain_words(name, tmp_path, capsys):
    text, line, message = SYNTAX[name]
    path = tmp_path / "site.yaml"
    path.write_text(text)
    status, _, err = run_check(capsys, path)
    assert status == 2 and "Traceback" not in err
    assert f"  site.yaml:{line} {message}" in err, err
    if "column" in message:  # the line itself, and a caret under the spot
        column = int(re.search(r"column (\d+)", message).group(1))
        shown, caret = err.splitlines()[2:4]
        assert shown.strip() == text.splitlines()[line - 1].replace("\t", "→").strip()
        assert caret.index("^") - 6 == column - 1


@pytest.mark.parametrize("name, content, message", [
    ("not utf-8", "site:\n  id: x\n  name: Saint-Andr\xe9\n".encode("latin-1"), "site.yaml:3 column 19: byte 0xe9 is not UTF-8"),
    ("binary", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "site.yaml:1 the file holds binary data"),
    ("utf-16", "site: {id: x}\n".encode("utf-16"), "site.yaml:1 the file is UTF-16 text: save it as UTF-8"),
    ("huge", b"# padding\n" * 300_000, "site.yaml: is 3.0 MB: a site profile is a few kB"),
])
def test_files_that_are_not_a_profile(name, content, message, tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_bytes(content)
    status, _, err = run_check(capsys, path)
    assert status == 2 and message in err, err


def test_a_folder_or_a_missing_file_is_one_line(tmp_path, capsys):
    assert run_check(capsys, tmp_path) == (2, "", f"{tmp_path}: is a folder, not a profile file\n")
    assert run_check(capsys, tmp_path / "nope.yaml") == (2, "", f"{tmp_path / 'nope.yaml'}: does not exist\n")


def test_anchors_that_expand_without_end_are_refused(tmp_path, capsys):
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 8)]
    path = tmp_path / "site.yaml"
    path.write_text("\n".join(rows) + "\n")
    status, _, err = run_check(capsys, path)
    assert status == 2 and "expand to more than" in err, err


# ------------------------------------------------------------------ warnings

WARNINGS = {
    "setpoint timeout within the cycle": (EXAMPLE, [("setpoint_timeout_s: 10 ", "setpoint_timeout_s: 2 ")],
                                          "setpoint_timeout_s: 2", "control.setpoint_timeout_s",
                                          "setpoint_timeout_s (2 s) is not longer than the cycle"),
    "revert timer within the cycle": (EXAMPLE, [("revert_timeout_s: 30", "revert_timeout_s: 1")],
                                      "revert_timeout_s: 1", "assets[0].revert_timeout_s",
                                      "revert_timeout_s (1 s) is not longer than the cycle (2 s)"),
    "request timeout beyond the cycle": (EXAMPLE, [("timeout_s: 0.5", "timeout_s: 5")], "  timeout_s: 5",
                                         "assets[0].timeout_s", "timeout_s (5 s) is not shorter than the cycle"),
    "meter shares an inverter's unit id": (EXAMPLE, [("host: 192.0.2.40", "host: 192.0.2.21")], "unit_id: 1",
                                           "assets[3].unit_id", "meter 'meter-poc' and pv 'inv-north' share unit id 1",
                                           3),
    "same IEC 104 station twice": (DEMO, [("port: 15026", "port: 15025")], "common_address: 1",
                                   "assets[4].common_address",
                                   "asset 'boiler-1' and asset 'bess-2' (assets[3]) both use common address 1", 2),
    "two protocols on one port": (DEMO, [("port: 15023", "port: 15025")], "port: 15025", "assets[3].port",
                                  "127.0.0.1:15025 is also the address of asset 'bess-1'", 2),
    "anyone may charge": (DEMO, [("mode: local_list\n    id_tags: [DEMO-EV-1, DEMO-EV-2, DEMO-EV-3, DEMO-EV-4, DEMO-EV-5]",
                                  "mode: accept_all")], "mode: accept_all", "ocpp.authorize.mode",
                          "accept_all: any ID tag may charge"),
    "chargers without a password": (DEMO, [("  host: 127.0.0.1\n  port: 15028", "  host: 0.0.0.0\n  port: 15028")],
                                     "- id: cp16-1", "assets[5]", "charger 'cp16-1' has no password"),
    "no central system section": (DEMO, [("ocpp:                         #", "# ocpp:")], "driver: ocpp", "assets[5].driver",
                                  "chargers but no `ocpp:` section"),
    "status page open to the network": (EXAMPLE, [("  host: 127.0.0.1             # reach it",
                                                   "  host: 0.0.0.0             # reach it")],
                                         "host: 0.0.0.0", "local_http.host",
                                         "the status page and metrics listen on 0.0.0.0 with no basic_auth_file"),
    "priorities ignored": (EXAMPLE, [("allocation: merit_order", "allocation: pro_rata")], "priority: 2",
                           "assets[0].priority", "2 asset(s) set priority or dispatch_cost_per_mwh, but "
                                                  "control.allocation is pro_rata"),
}


@pytest.mark.parametrize("name", list(WARNINGS))
def test_warnings_at_their_line_and_exit_0(name, write, capsys):
    base, replacements, needle, key, message, *nth = WARNINGS[name]
    if name == "no central system section":
        text = re.sub(r"\nocpp: .*?\n\n", "\n\n", base, count=1, flags=re.S)
    else:
        text = edit(base, *replacements)
    status, out, err = run_check(capsys, write(text))
    assert status == 0, err
    assert out.startswith(f"{Path(write(text))}: OK") or ": OK" in out.splitlines()[0]
    line = line_of(text, needle, *nth)
    assert f"warning: site.yaml:{line} {key}: {message}" in err, (line, err)


def test_a_missing_file_named_in_the_profile_warns_at_its_key(write, capsys, tmp_path):
    text = edit(EXAMPLE, ("    password_env: MQTT_PASSWORD", f"    password_file: {tmp_path}/nope"))
    status, _, err = run_check(capsys, write(text))
    assert status == 0, err
    line = line_of(text, "password_file:")
    assert f"warning: site.yaml:{line} uplink.mqtt.password_file: password file {tmp_path}/nope does not exist" in err


def test_warnings_also_come_with_errors(write, capsys):
    text = edit(EXAMPLE, ("revert_timeout_s: 30", "revert_timeout_s: 1"), ("    host: 192.0.2.30\n", "    host: 192.0.2.30\n    port: 0\n"))
    status, _, err = run_check(capsys, write(text))
    assert status == 2
    assert f"  site.yaml:{line_of(text, 'port: 0')} assets[2].port: must be 1..65535" in err
    assert f"warning: site.yaml:{line_of(text, 'revert_timeout_s: 1')} assets[0].revert_timeout_s" in err


def test_run_refuses_what_check_reports_and_ignores_warnings(tmp_path):
    text = edit(DEMO, ("- id: bess-1", "- id: pv-roof")).replace("/var/lib/flexedge/", f"{tmp_path}/")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    run = subprocess.run([sys.executable, "-m", "edge.cli", "run", str(path)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"site.yaml:{line_of(text, '- id: pv-roof', 2)} assets[2].id: asset id 'pv-roof' is used twice" in run.stderr


def test_check_in_a_subprocess_prints_no_traceback(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_bytes(b"site:\n  id: [\x00\xff\n")
    result = subprocess.run([sys.executable, "-m", "edge.cli", "check", str(path)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}: 1 problem\n  site.yaml:2 the file holds binary data")


# ------------------------------------------------------- mutations never crash

GARBAGE = st.sampled_from(["\t", "'", '"', "[", "]", "{", "}", ":", ": ", "- ", "&a", "*a", "!x", "#", "\\", "\x00",
                           "\xff", "é", "%", "@", "`", "|", ">", "---", "\n", "  ", "?"])
VALUES = st.sampled_from(["", "abc", "-5", "1e999", ".nan", "[1, 2]", "{a: 1}", "null", "yes", "0", "99999999",
                          "2024-01-01", "'quoted'", "~", "[", "0x1F"])


@st.composite
def mutated(draw, bases=(EXAMPLE, DEMO)):
    lines = draw(st.sampled_from(bases)).splitlines()
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(lines) - 1))
        line = lines[index]
        op = draw(st.sampled_from(["delete", "rename", "retype", "duplicate", "garbage"]))
        if op == "delete":
            del lines[index]
        elif op == "rename" and ":" in line:
            key, _, rest = line.partition(":")
            lines[index] = key + draw(st.sampled_from(["x", "_s", "s", ""])) + key[-1:] + ":" + rest
        elif op == "retype" and ": " in line:
            lines[index] = line.partition(": ")[0] + ": " + draw(VALUES)
        elif op == "duplicate":
            lines[index + 1:index + 1] = lines[index:index + draw(st.integers(1, 8))]
        else:
            at = draw(st.integers(0, len(line)))
            lines[index] = line[:at] + draw(GARBAGE) + line[at:]
        if not lines:
            lines = [""]
    return "\n".join(lines) + "\n"


@settings(max_examples=int(__import__("os").environ.get("CHECK_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated())
def test_mutated_profiles_never_crash_and_every_problem_has_a_line(text, tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_bytes(text.replace("/var/lib/flexedge/", f"{tmp_path}/").encode("utf-8", "surrogateescape"))
    count = len(path.read_bytes().splitlines()) or 1
    status, _, err = run_check(capsys, path)
    assert status in (0, 2, 3), err
    for line in err.splitlines():
        if line.startswith(("  site.yaml", "warning: site.yaml")):
            number = int(re.search(r"site\.yaml:(\d+)", line).group(1))
            assert 1 <= number <= count, (line, text)
        else:  # the header, or a syntax error's excerpt under its problem
            assert line.startswith((f"{path}:", "      ")), (line, err)


def test_cpo_backend_credentials_missing_here_warn_once_at_their_key(tmp_path, capsys, monkeypatch):
    """The site's upstream (taken by two chargers) and a charger's own: each problem once, at the key that
    names it; warnings, since `run` starts without them (only the backend link would fail)."""
    monkeypatch.delenv("FLEXEDGE_TEST_CPO_PW", raising=False)
    text = f"""site: {{id: s1}}
ocpp:
  port: 9000
  id_tag_salt_file: {tmp_path}/salt
  authorize: {{mode: local_list, id_tags: [CARD1]}}
  upstream:
    url: wss://cpo.example/ocpp
    password_file: {tmp_path}/cpo-password
assets:
  - {{id: ev1, kind: ev_charger, driver: ocpp, charge_point_id: CP1, password_file: {tmp_path}/pw}}
  - {{id: ev2, kind: ev_charger, driver: ocpp, charge_point_id: CP2, password_file: {tmp_path}/pw}}
  - id: ev3
    kind: ev_charger
    driver: ocpp
    charge_point_id: CP3
    password_file: {tmp_path}/pw
    upstream: {{url: "wss://other.example/ocpp", password_env: FLEXEDGE_TEST_CPO_PW, ca_file: {tmp_path}/ca.pem}}
"""
    (tmp_path / "pw").write_text("secret\n")
    path = tmp_path / "site.yaml"
    path.write_text(text)
    status, _, err = run_check(capsys, path)
    assert status == 0, err
    site_line, own_line = line_of(text, "password_file: " + str(tmp_path / "cpo-password")), line_of(text, "upstream: {url")
    assert err.count("ocpp.upstream.password_file") == 1, err
    assert f"warning: site.yaml:{site_line} ocpp.upstream.password_file: password file {tmp_path}/cpo-password " \
           "does not exist" in err
    assert f"warning: site.yaml:{own_line} assets[2].upstream.password_env: environment variable " \
           "FLEXEDGE_TEST_CPO_PW is not set" in err
    assert f"warning: site.yaml:{own_line} assets[2].upstream.ca_file: {tmp_path}/ca.pem does not exist" in err
