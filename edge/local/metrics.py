"""/metrics: the gateway's figures in the Prometheus text format, or OpenMetrics when asked.

Its own ``CollectorRegistry`` (never the process-wide one).  The cycle's duration and
lateness are histograms observed once a cycle (a few microseconds); everything else is
read from the gateway when a scrape comes, on the loop, and only the formatting of that
copy runs in a thread.  Names and labels: docs/local.md.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from edge import __version__
from edge.local.health import spool_problem
from edge.local.source import StatusSource, profile_sha256

CYCLE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ASSET_LABELS = ("asset", "kind", "driver")


class GatewayMetrics:
    def __init__(self, source: StatusSource, last_cycle_age_s):
        self.source = source
        self._last_cycle_age_s = last_cycle_age_s  # () -> float | None
        self.registry = CollectorRegistry(auto_describe=False)
        self.cycle_duration = Histogram(
            "flexedge_cycle_duration_seconds", "Time the control cycle took, from its tick to its telemetry.",
            buckets=CYCLE_BUCKETS_S, registry=self.registry)
        self.cycle_lateness = Histogram(
            "flexedge_cycle_lateness_seconds", "How late the control cycle started after its tick.",
            buckets=CYCLE_BUCKETS_S, registry=self.registry)
        self.registry.register(_GatewayCollector(self))

    def after_cycle(self) -> None:
        stats = self.source.stats
        if stats.durations_s:
            self.cycle_duration.observe(stats.durations_s[-1])
            self.cycle_lateness.observe(stats.lateness_s[-1])

    async def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for this ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        families = list(self.registry.collect())  # on the loop: the gateway is not thread-safe
        return await asyncio.to_thread(encoder, _Collected(families)), content_type


class _Collected:
    """Families already collected, for an encoder running in a thread."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class _GatewayCollector:
    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # registered without a describe-time collect: the gateway may not run yet

    def collect(self) -> Iterable[Metric]:
        source = self.metrics.source
        profile = source.profile
        stats = source.stats
        info = InfoMetricFamily("flexedge_gateway", "The gateway: version, site and profile.",
                                labels=("version", "site", "profile_sha256"))
        info.add_metric([__version__, profile.site.id, profile_sha256(source) or ""], {})
        yield info
        yield CounterMetricFamily("flexedge_cycles", "Control cycles run.", value=stats.cycles)
        yield CounterMetricFamily("flexedge_missed_cycles", "Control cycles skipped because a cycle started "
                                  "a whole period late.", value=stats.missed_cycles)
        yield GaugeMetricFamily("flexedge_cycle_period_seconds", "The control cycle's period (control.cycle_s).",
                                value=profile.control.cycle_s)
        age_s = self.metrics._last_cycle_age_s()
        if age_s is not None:
            yield GaugeMetricFamily("flexedge_last_cycle_age_seconds", "Time since the last control cycle ended.",
                                    value=age_s)
        yield GaugeMetricFamily("flexedge_loop_lag_p99_seconds", "Event-loop lag, 99th percentile of the last "
                                "5 minutes (a 100 ms sleep's overshoot).", value=stats.loop_lag.p99_s())
        yield GaugeMetricFamily("flexedge_loop_lag_max_seconds", "Event-loop lag, largest of the last 5 minutes.",
                                value=stats.loop_lag.max_s())
        yield CounterMetricFamily("flexedge_messages_repaired", "Outbound messages repaired to encode.",
                                  value=stats.messages_repaired)
        yield from self._assets()
        yield from self._site()
        yield from self._uplink_and_spool()
        yield from self._grid_orders()

    def _assets(self) -> Iterable[Metric]:
        source = self.metrics.source
        controller = source.controller
        reported = (controller.last_telemetry or {}).get("assets", {}) if controller is not None else {}
        online = GaugeMetricFamily("flexedge_asset_online", "1 while the asset's device answers.", labels=ASSET_LABELS)
        degraded = GaugeMetricFamily("flexedge_asset_degraded", "1 while the asset is online but degraded.",
                                     labels=ASSET_LABELS)
        power = GaugeMetricFamily("flexedge_asset_p_kw", "Measured active power, kW, + export.", labels=ASSET_LABELS)
        target = GaugeMetricFamily("flexedge_asset_setpoint_kw", "Target sent to the asset, kW, + export.",
                                   labels=ASSET_LABELS)
        soc = GaugeMetricFamily("flexedge_asset_soc_pct", "State of charge, %.", labels=ASSET_LABELS)
        succeeded = CounterMetricFamily("flexedge_command_successes", "Power commands the device accepted.",
                                        labels=("driver", "asset"))
        failed = CounterMetricFamily("flexedge_command_failures", "Power commands refused, unanswered or not sent.",
                                     labels=("driver", "asset"))
        for asset in source.assets:
            labels = [asset.id, asset.kind, asset.driver_name]
            values = reported.get(asset.id)
            if values is not None:
                online.add_metric(labels, 1.0 if values.get("online") else 0.0)
                degraded.add_metric(labels, 1.0 if values.get("degraded") else 0.0)
                for family, key in ((power, "p_kw"), (target, "setpoint_kw"), (soc, "soc_pct")):
                    if values.get(key) is not None:
                        family.add_metric(labels, values[key])
            log = getattr(asset.driver, "command_log", None)
            if log is not None:
                succeeded.add_metric([asset.driver_name, asset.id], log.succeeded)
                failed.add_metric([asset.driver_name, asset.id], log.failed)
        yield from (online, degraded, power, target, soc, succeeded, failed)

    def _site(self) -> Iterable[Metric]:
        controller = self.metrics.source.controller
        telemetry = controller.last_telemetry if controller is not None else None
        if not telemetry:
            return
        site = telemetry["site"]
        for key, meaning in (
            ("p_kw", "Site active power, kW, + export (the connection-point meter, else the assets' sum)."),
            ("setpoint_kw", "Site power the gateway aims at: baseline + activation, kW."),
            ("baseline_kw", "Site baseline, kW."),
            ("activation_requested_kw", "Activation asked for (setpoint, schedule, fallback, FCR), kW."),
            ("activation_kw", "Activation the assets were given, kW."),
            ("export_limit_kw", "Export limit in force (profile, schedule and grid operator), kW."),
            ("import_limit_kw", "Import limit in force, kW."),
        ):
            if site.get(key) is not None:
                yield GaugeMetricFamily(f"flexedge_site_{key}", meaning, value=site[key])

    def _uplink_and_spool(self) -> Iterable[Metric]:
        source = self.metrics.source
        uplink = source.uplink
        yield GaugeMetricFamily("flexedge_uplink_connected", "1 while connected to the VPP's MQTT broker.",
                                value=1.0 if uplink is not None and uplink.connected else 0.0)
        if uplink is not None:
            stats = uplink.stats
            yield CounterMetricFamily("flexedge_uplink_sent_messages", "Spooled messages the broker acknowledged "
                                      "since start.", value=stats.sent)
            yield CounterMetricFamily("flexedge_uplink_reconnects", "Broker connections after the first.",
                                      value=stats.reconnects)
            yield CounterMetricFamily("flexedge_uplink_live_dropped_messages", "Unspooled messages (acks) dropped "
                                      "while offline.", value=stats.live_dropped)
            yield GaugeMetricFamily("flexedge_spool_pending_messages", "Messages in the spool, not yet acknowledged.",
                                    value=stats.backlog_pending)
            yield CounterMetricFamily("flexedge_spool_dropped_messages", "Oldest messages dropped because the spool "
                                      "was full (since the spool file was created).", value=stats.dropped)
        writable = spool_problem(source.profile.control.cycle_s, source.spool_writes) is None
        yield GaugeMetricFamily("flexedge_spool_writable", "1 while the spool takes writes.",
                                value=1.0 if writable else 0.0)
        yield GaugeMetricFamily("flexedge_outbox_messages", "Messages waiting to be spooled.",
                                value=source.outbox.qsize())
        yield CounterMetricFamily("flexedge_outbox_dropped_messages", "Telemetry dropped because the outbox was "
                                  "full.", value=source.dropped_outbox)

    def _grid_orders(self) -> Iterable[Metric]:
        source = self.metrics.source
        if source.profile.grid.deie is None:
            return
        deie = source.deie
        yield GaugeMetricFamily("flexedge_deie_link_up", "1 while the grid operator's DEIE link is open.",
                                value=1.0 if deie is not None and getattr(deie, "link_up", False) else 0.0)
        controller = source.controller
        if controller is None:
            return
        orders: Any = controller.grid_orders
        yield GaugeMetricFamily("flexedge_grid_order_disconnected", "1 while the grid operator orders the site "
                                "disconnected.", value=1.0 if orders.disconnected else 0.0)
        limit_kw = 0.0 if orders.disconnected else orders.export_limit_kw
        if limit_kw is not None:
            yield GaugeMetricFamily("flexedge_grid_order_export_limit_kw", "The grid operator's export limit in "
                                    "force, kW (0 when disconnected); absent without one.", value=limit_kw)
