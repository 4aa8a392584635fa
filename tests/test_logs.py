"""Logs for people and machines (edge/runtime/logs.py): the text and JSON formats, key=value
fields, pymodbus's reconnect chatter folded into the SunSpec driver's own lines (against a
real closed port), and every flexedge logger under ``flexedge.``."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import pkgutil
import re
import socket
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from edge.runtime.logs import (
    LIBRARY_LOGGERS, JsonFormatter, LibraryChatter, TextFormatter, fold_pymodbus_chatter, log_fields, setup_logging,
    text_value,
)

ROOT = Path(__file__).resolve().parents[1]
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO |WARNING|ERROR|CRITICAL) [\w.]+: ")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def record(name: str = "flexedge.daemon", level: int = logging.INFO, message: str = "hello", **fields):
    handler = Records()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        if fields:
            log_fields(logger, level, message, **fields)
        else:
            logger.log(level, message)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    return handler.records[0]


# ------------------------------------------------------------------ formats


def test_text_lines_carry_a_utc_date_with_milliseconds_and_fields_as_key_value():
    plain = TextFormatter().format(record(message="flexedge 0.1.0: site demo"))
    assert TEXT_LINE.match(plain) and plain.endswith(" INFO  flexedge.daemon: flexedge 0.1.0: site demo"), plain
    line = TextFormatter().format(record(message="", event="command_failed", asset="pv1", reason="no answer",
                                         target_kw=-2.5, written=False, answer=None, assets=["pv1", "pv2"]))
    assert line.split("flexedge.daemon: ", 1)[1] == (
        'event=command_failed asset=pv1 reason="no answer" target_kw=-2.5 written=false answer=null assets=pv1,pv2')
    warning = TextFormatter().format(record(level=logging.WARNING, message="pv1: offline"))
    assert " WARNING flexedge.daemon: pv1: offline" in warning


def test_json_lines_put_the_fields_at_the_top_level_never_a_python_repr():
    entry = json.loads(JsonFormatter().format(record(
        message="profile reloaded", sha256="ab" * 32, added=["pv1"], detail={"a": 1}, ratio=float("nan"), msg="x")))
    assert entry["level"] == "info" and entry["logger"] == "flexedge.daemon" and entry["msg"] == "profile reloaded"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    assert entry["sha256"] == "ab" * 32 and entry["added"] == ["pv1"] and entry["detail"] == {"a": 1}
    assert entry["ratio"] == "nan" and entry["field_msg"] == "x"  # a field never overwrites ts/level/logger/msg
    events = json.loads(JsonFormatter().format(record(message="", event="asset_offline", asset="pv1")))
    assert events["event"] == "asset_offline" and events["msg"] == "event=asset_offline asset=pv1"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("flexedge.x", logging.ERROR, __file__, 1, "failed", None, __import__("sys").exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(failed))["exc"]


@given(st.text(max_size=40))
def test_a_text_value_is_bare_only_when_unambiguous_and_quoted_values_read_back(value):
    shown = text_value(value)
    if shown.startswith('"'):
        assert json.loads(shown) == value
    else:
        assert shown == value and value and not re.search(r'[\s"=\\]', value)


def test_events_are_logged_as_fields(tmp_path):
    from edge.config.profile import Profile
    from edge.runtime.daemon import Gateway

    profile = Profile.model_validate({"site": {"id": "s"}, "uplink": {"spool": {"path": str(tmp_path / "s.sqlite")}}})
    handler, logger = Records(), logging.getLogger("flexedge.daemon")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        Gateway(profile).emit_event("command_failed", "pv1", {"target_kw": 3.0, "reason": "device said \"no\"",
                                                              "asset": "shadowed"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    line = TextFormatter().format(handler.records[0])
    assert line.endswith(r'event=command_failed asset=pv1 target_kw=3.0 reason="device said \"no\"" detail_asset=shadowed')


def test_setup_logging_routes_the_libraries_through_one_handler_at_warning():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("json", "debug")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        for name in LIBRARY_LOGGERS:
            library = logging.getLogger(name)
            assert library.level == logging.WARNING and not library.handlers and library.propagate
        assert fold_pymodbus_chatter() in logging.getLogger("pymodbus.logging").filters
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


# ------------------------------------------------------------------ pymodbus's chatter


def test_the_fold_drops_connection_chatter_and_lets_other_warnings_through():
    fold = LibraryChatter()

    def passes(text: str) -> bool:
        return fold.filter(logging.LogRecord("pymodbus.logging", logging.WARNING, "", 1, text, None, None))

    assert not passes("Failed to connect [Errno 111] Connect call failed ('127.0.0.1', 1502)")
    assert not passes("Repeating....")
    assert not passes("No response received after 0 retries, continue with next request")
    assert passes("ERROR: received pdu without a corresponding request, IGNORING")
    assert passes("Repeating....")  # a repeat of a record that went through goes through
    assert fold.dropped == {"connect_failed": 1, "repeated": 1, "no_response": 1}
    assert fold.last_connect_failure == "[Errno 111] Connect call failed ('127.0.0.1', 1502)"


async def test_a_closed_port_gives_one_offline_line_with_its_cause_and_no_pymodbus_lines():
    from drivers import registry
    from edge.config.profile import Profile

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    profile = Profile.model_validate({"site": {"id": "s"}, "assets": [
        {"id": "pv1", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": port, "unit_id": 1,
         "timeout_s": 0.3}]})
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
    dropped_before = sum(fold_pymodbus_chatter().dropped.values())
    events = []
    driver = registry.create_driver(profile.assets[0], 0.5, lambda *event: events.append(event))
    task = asyncio.create_task(driver.run())
    try:
        deadline = asyncio.get_running_loop().time() + 6.0
        while asyncio.get_running_loop().time() < deadline and (driver.link.hub is None or driver.link.hub.attempts < 5):
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        root.removeHandler(handler)
        logging.getLogger("pymodbus").setLevel(logging.NOTSET)
    assert driver.link.hub.attempts >= 5, "several reconnects"
    lines = [(r.name, r.levelno, r.getMessage()) for r in handler.records if r.levelno >= logging.WARNING]
    assert not [line for line in lines if line[0].startswith("pymodbus")], lines
    offline = [line for line in lines if "offline" in line[2]]
    assert len(offline) == 1 and offline[0][0] == "flexedge.drivers.sunspec", lines
    assert offline[0][2] == f"pv1: offline: cannot connect to tcp:127.0.0.1:{port}: Connection refused"
    assert [e[0] for e in events] == ["asset_offline"]
    assert sum(fold_pymodbus_chatter().dropped.values()) > dropped_before


# ------------------------------------------------------------------ logger names


def test_every_logger_of_edge_and_drivers_is_under_flexedge():
    for package in ("edge", "drivers"):
        for module in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            importlib.import_module(module.name)
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in ("edge", "drivers")]
    assert not names, f"loggers named after their module instead of flexedge.*: {names}"
    # and in the source: every getLogger in edge/ and drivers/ names a flexedge.* logger
    for path in [*ROOT.glob("edge/**/*.py"), *ROOT.glob("drivers/**/*.py")]:
        if path == ROOT / "edge" / "runtime" / "logs.py":
            continue  # sets up the root and the libraries' loggers
        for call in re.findall(r"getLogger\(([^)]*)\)", path.read_text()):
            assert call.startswith(('"flexedge', "'flexedge")), f"{path.relative_to(ROOT)}: getLogger({call})"
