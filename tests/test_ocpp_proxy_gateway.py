"""The local controller seen from the VPP: a proxied charger's telemetry says where its traffic
goes and whether that link is up, and events tell the changes (the gateway in process, the CPO
backend simulator, a station simulator, Mosquitto)."""

from __future__ import annotations

import pytest
import yaml

import drivers.ocpp.proxy.link as upstream_link
from edge.config.profile import Profile
from simulators.cpo_backend import CpoBackend
from simulators.ocpp import EvSpec, OcppSimulator, StationSpec
from simulators.vpp import VppSimulator
from tests.conftest import free_port
from tests.test_gateway import SITE, running_gateway, until


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch):
    monkeypatch.setattr(upstream_link, "RETRY_FIRST_S", 0.1)
    monkeypatch.setattr(upstream_link, "RETRY_CAP_S", 0.4)


def upstream_of(vpp, asset_id: str):
    return vpp.telemetry[-1]["assets"][asset_id].get("upstream") if vpp.telemetry else None


async def test_telemetry_and_events_show_the_upstream_link(tmp_path, mosquitto):
    ocpp_port = free_port()
    async with CpoBackend(id_tags={"BILLED"}) as backend:
        profile = Profile.model_validate({
            "site": {"id": SITE},
            "control": {"cycle_s": 0.5},
            "uplink": {"mqtt": {"host": "127.0.0.1", "port": mosquitto.port},
                       "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
            "ocpp": {"host": "127.0.0.1", "port": ocpp_port, "authorize": {"mode": "local_list", "id_tags": ["BILLED"]},
                     "id_tag_salt_file": str(tmp_path / "salt")},
            "assets": [
                {"id": "proxied", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": "CP1",
                 "ocpp_version": "2.0.1", "upstream": {"url": backend.url, "security_profile": 1,
                                                       "response_timeout_s": 2.0, "connect_timeout_s": 2.0}},
                {"id": "own", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": "CP2", "ocpp_version": "1.6"},
            ],
        })
        specs = [StationSpec("CP1", "2.0.1", meter_interval_s=0.2), StationSpec("CP2", "1.6", meter_interval_s=0.2)]
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp, \
                OcppSimulator(f"ws://127.0.0.1:{ocpp_port}/ocpp", specs) as sim:
            station = sim.stations[0]
            await station.wait_connected()
            await until(lambda: (upstream_of(vpp, "proxied") or {}).get("connected"), 5, "the backend link up")
            assert upstream_of(vpp, "proxied") == {"connected": True, "queued": 0, "host": "127.0.0.1"}
            assert "upstream" not in vpp.telemetry[-1]["assets"]["own"]  # not proxied
            assert await station.plug_in(EvSpec(id_tag="BILLED"))
            await backend.wait_message("CP1", "TransactionEvent", timeout_s=5)
            # The VPP curtails the site: the proxied charger gets the gateway's limit, under a purpose it
            # combines with the backend's by minimum, while the backend bills the session.
            await until(lambda: vpp.telemetry[-1]["site"]["band_up_kw"] > 5, 5, "the EV charging")
            await vpp.send_setpoint(vpp.telemetry[-1]["site"]["band_up_kw"] / 2, valid_s=60)
            record = await until(lambda: [p for p in station.profiles if p.purpose == "ChargingStationExternalConstraints"
                                          and p.limit is not None and 6 <= p.limit < 12], 5, "the curtailment")
            assert record[-1].stack_level == profile.assets[0].upstream.stack_level
            await until(lambda: len(backend.meter_values("CP1")) >= 2, 5, "meter values billed upstream")
            assert [t.id_tag for t in backend.transactions("CP1")] == ["BILLED"]

            await backend.stop()  # the CPO backend goes away: charging goes on, messages wait
            await until(lambda: upstream_of(vpp, "proxied")["connected"] is False, 5, "the link down in telemetry")
            await until(lambda: upstream_of(vpp, "proxied")["queued"] > 0, 5, "meter values queued")
            kinds = [e["type"] for e in vpp.events if e.get("asset_id") == "proxied"]
            assert "upstream_connected" in kinds and "upstream_disconnected" in kinds
            assert vpp.telemetry[-1]["assets"]["proxied"]["online"] is True

            await backend.start()
            await until(lambda: upstream_of(vpp, "proxied") == {"connected": True, "queued": 0, "host": "127.0.0.1"},
                        10, "the queue replayed")
            await until(lambda: [e for e in vpp.events if e["type"] == "upstream_replayed"], 5, "the replay event")


async def test_a_site_upstream_proxies_every_charger_without_its_own(tmp_path, mosquitto):
    """ocpp.upstream: CP1 (no upstream key) goes to the site's backend under its own id, CP2
    (upstream: null) to none, CP3 (its own upstream) to its own backend only."""
    ocpp_port = free_port()
    async with CpoBackend() as site_backend, CpoBackend() as own_backend:
        profile = Profile.model_validate({
            "site": {"id": SITE},
            "control": {"cycle_s": 0.5},
            "uplink": {"mqtt": {"host": "127.0.0.1", "port": mosquitto.port},
                       "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
            "ocpp": {"host": "127.0.0.1", "port": ocpp_port, "id_tag_salt_file": str(tmp_path / "salt"),
                     "upstream": {"url": site_backend.url, "security_profile": 1}},
            "assets": [
                {"id": "inherits", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": "CP1"},
                {"id": "kept_off", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": "CP2", "upstream": None},
                {"id": "own", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": "CP3",
                 "upstream": {"url": own_backend.url, "security_profile": 1, "charge_point_id": "CPO-3"}},
            ],
        })
        specs = [StationSpec(cp, "1.6", meter_interval_s=0.2) for cp in ("CP1", "CP2", "CP3")]
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp, \
                OcppSimulator(f"ws://127.0.0.1:{ocpp_port}/ocpp", specs):
            await site_backend.wait_message("CP1", "BootNotification", timeout_s=5)
            await own_backend.wait_message("CPO-3", "BootNotification", timeout_s=5)
            await until(lambda: (upstream_of(vpp, "inherits") or {}).get("connected")
                        and (upstream_of(vpp, "own") or {}).get("connected"), 5, "both backend links up")
            await until(lambda: vpp.telemetry[-1]["assets"]["kept_off"]["online"], 5, "CP2 connected")
            assert upstream_of(vpp, "kept_off") is None
            assert not site_backend.messages("CP2") and not site_backend.messages("CP3")
            assert not own_backend.messages("CP1") and not own_backend.messages("CP2")


@pytest.mark.parametrize("upstream, key, words", [
    ({"url": "ws://cpo.example/ocpp", "security_profile": 1, "charge_point_id": "X"},
     "ocpp.upstream.charge_point_id", "its own"),
    ({"url": "http://cpo.example/ocpp", "security_profile": 1}, "ocpp.upstream.url", "ws://host"),
])
def test_a_wrong_site_upstream_is_named_once_at_its_own_key(tmp_path, upstream, key, words):
    from edge.config.profile import read_profile

    doc = {"site": {"id": SITE}, "ocpp": {"port": 9000, "upstream": upstream},
           "assets": [{"id": f"ev{n}", "kind": "ev_charger", "driver": "ocpp", "charge_point_id": f"CP{n}"}
                      for n in range(3)]}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    errors = [p for p in read_profile(path).problems if not p.is_warning]
    assert [p.path for p in errors] == [key], errors  # not once more at every charger that inherits it
    assert words in errors[0].message
