"""A charge point operator's (CPO) backend, simulated: the upstream peer of a proxied charger (issue #14).

An OCPP 1.6J / 2.0.1 / 2.1 central system that accepts boots, authorizes a list of ID tags,
records every message each way, sends its own requests (charging profiles, remote start), and
can be stopped and started again on the same port.  For tests and for a field engineer checking
a proxied site (``python -m simulators.cpo_backend --help``).  Standalone: imports neither
``edge`` nor ``drivers``.

Quick start (on the caller's event loop)::

    from simulators.cpo_backend import CpoBackend

    async with CpoBackend(id_tags={"04A1B2C3"}) as backend:      # ws://127.0.0.1:<free port>/ocpp
        ...  # point a charger (or the gateway's upstream) at backend.url + "/CP1"
        boot = await backend.wait_boot("CP1", timeout_s=3)
        await backend.set_charging_profile("CP1", 16, unit="A")   # answer payload: {"status": "Accepted"}
        print(backend.transactions("CP1"), backend.meter_values("CP1", "Power.Active.Import"))

API
---
``CpoBackend(host="127.0.0.1", port=0, *, path="/ocpp", id_tags=None, security_profile=1, passwords=None,
cert_file=None, key_file=None, ca_file=None, accept_unknown=True, versions=("1.6", "2.0.1", "2.1"),
heartbeat_interval_s=300, boot_status="Accepted", record_limit=100_000, ping_interval_s=20)``
    Async context manager, or ``await start()`` / ``await stop()``.  ``stop()`` closes every
    link (1001) and the listening socket and fails pending calls; ``start()`` again listens on
    the same port (port 0: the one first bound).  ``bound_port``, ``url``
    ("ws://127.0.0.1:PORT/ocpp", ``wss://`` for profiles 2-3), ``running``.  Invalid arguments
    raise ValueError naming them.
    Handshake: URL ``<path>/<charge point id>`` (else HTTP 404); subprotocol ``ocpp2.1``,
    ``ocpp2.0.1`` or ``ocpp1.6`` among ``versions``, the newest the charger offers; with
    ``passwords[cp_id]`` set, HTTP Basic (user = cp id) is required under profiles 1 and 2
    (401 otherwise); ``accept_unknown=False`` refuses ids not in ``passwords`` (404).
    Profile 2: TLS with ``cert_file``/``key_file``; profile 3: also a client certificate signed
    by ``ca_file``.  Every refusal is in ``backend.refusals`` (``Refusal``: ``charge_point_id``,
    ``status``, ``reason``, ``at_mono``).  A charger connecting again replaces its old link.
    ``id_tags`` (a set, changeable while running): tags answered Accepted, others Invalid;
    None accepts any non-empty tag.  ``boot_status`` and ``heartbeat_interval_s`` are what
    BootNotification answers (also changeable).
Answers: BootNotification, Heartbeat, StatusNotification, Authorize, MeterValues, DataTransfer
(Accepted), FirmwareStatusNotification; 1.6 StartTransaction (transaction ids 1, 2, 3, ...
across the backend, kept over stop/start), StopTransaction, DiagnosticsStatusNotification;
2.x TransactionEvent, NotifyReport, NotifyEVChargingNeeds (Accepted), NotifyEvent,
SecurityEventNotification, NotifyChargingLimit, ReportChargingProfiles.  Tags in Authorize,
StartTransaction, StopTransaction and TransactionEvent are checked against ``id_tags``.
Another action gets CALLERROR NotImplemented (NotSupported if not of the version), a payload
the schema refuses the ocpp library's CALLERROR, a frame that is not OCPP a CALLERROR with the
library's code (id "-1" when none can be read; recorded in ``malformed(cp_id)``).
Records (per charger, arrival order; at most ``record_limit`` each, oldest dropped):
``messages(cp_id, action=None)`` -> ``Received``: ``action``, ``unique_id``, ``payload``
(camelCase, as on the wire), ``received_at`` (wall), ``received_mono``, ``connection_no`` (1
for the first connection), ``ocpp_version``, ``answer`` (the CALLRESULT payload) or
``error_code`` (CALLERROR), ``answered``.
``sent(cp_id)`` -> ``Sent``: the backend's own CALLs: ``action``, ``unique_id`` ("cpo-N"),
``payload``, ``sent_at``, ``sent_mono``, ``connection_no``, ``answer`` or ``error_code`` /
``error_description``, ``answered_mono``.
``transactions(cp_id)`` -> ``Transaction`` (order of first message): ``transaction_id`` (str;
1.6: the id the backend gave), ``id_tag``, ``status`` (authorization at start),
``started_at`` / ``stopped_at`` (the charger's timestamps), ``meter_start_wh`` /
``meter_stop_wh``, ``stop_reason``, ``messages`` (start, meter values, stop in arrival order),
``ended``, ``seq_nos`` (2.x), ``meter_readings``.
``meter_values(cp_id, measurand=None)`` -> ``MeterReading``: ``transaction_id``, ``timestamp``
(the charger's), ``measurand``, ``value`` (float), ``unit``, ``phase``, ``context``,
``received_mono``, ``connection_no``; from MeterValues, TransactionEvent and 1.6
StopTransaction transactionData.
``boots(cp_id)`` -> ``Boot``: ``charge_point_id``, ``ocpp_version``, ``vendor``, ``model``,
``reason`` (2.x), ``received_at``, ``received_mono``, ``connection_no``, ``status`` (answered).
``authorizations(cp_id)`` -> ``Authorization``: ``id_tag``, ``status``, ``action``,
``received_mono``, ``connection_no``.
``connected(cp_id)``, ``connections(cp_id)`` (count), ``links(cp_id)`` (``Link``:
``connection_no``, ``ocpp_version``, ``remote``, ``opened_mono``), ``version(cp_id)`` (of the
current link), ``charge_point_ids()``.
Waiting (TimeoutError naming what did not come): ``wait_connected(cp_id, timeout_s=3, *,
after=0) -> Link`` (connected, and more than ``after`` connections so far),
``wait_boot(cp_id, timeout_s=3, after=0) -> Boot`` (the (after+1)-th boot, even if already
here), ``wait_message(cp_id, action, timeout_s=3, after=0, answered=True) -> Received``.
Backend-initiated calls (one outstanding per link, as OCPP asks):
``await call(cp_id, action, payload_camelcase, timeout_s=5, *, validate=True) -> dict`` the
CALLRESULT payload; raises ``ChargerNotConnected`` (at once when there is no link; also when
the link goes before the answer), ``CallTimeout`` (also a TimeoutError), ``CallErrorAnswer``
(``code``, ``description``, ``details``), all ``BackendCallError``; ValueError when
``validate`` and the payload fails the version's schema.  Helpers, in the shape of the
charger's version, each returning the answer payload:
``set_charging_profile(cp_id, limit, unit="A", purpose="TxDefaultProfile", stack_level=0,
profile_id=None (1001, 1002, ...), evse_or_connector=1, *, transaction_id=None (needed for
TxProfile), number_phases=None)`` (one Absolute period from now);
``clear_charging_profile(cp_id, profile_id=None, purpose=None, stack_level=None,
evse_or_connector=None)`` (nothing given: every profile); ``remote_start(cp_id, id_tag,
evse_or_connector=1)`` (RemoteStartTransaction / RequestStartTransaction);
``remote_stop(cp_id, transaction_id)``; ``get_configuration(cp_id, keys=None)`` (1.6).
"""

from __future__ import annotations

from simulators.cpo_backend.backend import CpoBackend, Malformed
from simulators.cpo_backend.records import (Authorization, BackendCallError, Boot, CallErrorAnswer, CallTimeout,
                                            ChargerNotConnected, Link, MeterReading, Received, Refusal, Sent,
                                            Transaction)

__all__ = ["Authorization", "BackendCallError", "Boot", "CallErrorAnswer", "CallTimeout", "ChargerNotConnected",
           "CpoBackend", "Link", "Malformed", "MeterReading", "Received", "Refusal", "Sent", "Transaction"]
