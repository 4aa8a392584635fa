// flexedge status page (docs/local.md): /api/state once, then one /api/live message per cycle.
// Read-only.  Every text from the gateway goes into the page as text (textContent), never as
// markup: asset names come from the profile, event details from devices.
// GPL-3.0-or-later.
"use strict";

const HISTORY_S = 600;
const EVENTS_KEPT = 100;
const SVG_NS = "http://www.w3.org/2000/svg";

// The page's state, also read by the tests (tests/test_status_page.py).
const flexedge = window.flexedge = {
  state: null, history: [], events: [], connected: false, messages: 0, lastMessageAt: 0,
  chart: null,
};

const $ = (id) => document.getElementById(id);

function fmt(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  const text = value.toFixed(digits);
  return /^-0\.?0*$/.test(text) ? text.slice(1) : text;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function timeOf(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso || "") : date.toLocaleTimeString("en-GB");
}

// ------------------------------------------------------------------ data

function mergeHistory(points) {
  for (const point of points || []) {
    const last = flexedge.history[flexedge.history.length - 1];
    if (point && (!last || point.t > last.t)) flexedge.history.push(point);
  }
  const end = flexedge.history.length ? flexedge.history[flexedge.history.length - 1].t : 0;
  while (flexedge.history.length && flexedge.history[0].t < end - HISTORY_S) flexedge.history.shift();
}

function mergeEvents(events) {
  const seen = new Set(flexedge.events.map((e) => e.serial));
  for (const event of events || []) {
    if (event && !seen.has(event.serial)) flexedge.events.push(event);
  }
  flexedge.events.sort((a, b) => a.serial - b.serial);
  if (flexedge.events.length > EVENTS_KEPT) flexedge.events.splice(0, flexedge.events.length - EVENTS_KEPT);
}

function apply(document_) {
  flexedge.state = document_;
  mergeHistory(document_.history || (document_.point ? [document_.point] : []));
  mergeEvents(document_.events);
  flexedge.lastMessageAt = Date.now();
  render();
}

// ------------------------------------------------------------ connection

let retryMs = 1000;
let socket = null;

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/api/live`);
  socket.onopen = async () => {
    flexedge.connected = true;
    retryMs = 1000;
    showLink();
    try {
      const answer = await fetch("/api/state", { cache: "no-store" });
      if (answer.ok) apply(await answer.json());
    } catch (error) { /* the live messages fill the page anyway */ }
  };
  socket.onmessage = (message) => {
    flexedge.messages += 1;
    try { apply(JSON.parse(message.data)); } catch (error) { console.error(error); }
  };
  socket.onclose = () => {
    flexedge.connected = false;
    showLink(`disconnected – retrying in ${Math.round(retryMs / 1000)} s`);
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  };
}

function showLink(text) {
  const link = $("link");
  const state = flexedge.state;
  const cycleS = state && state.gateway ? state.gateway.cycle_s : 2;
  const silentS = (Date.now() - flexedge.lastMessageAt) / 1000;
  let up = flexedge.connected;
  if (!text) {
    if (!up) text = "disconnected";
    else if (flexedge.lastMessageAt && silentS > Math.max(5, 3 * cycleS)) {
      up = false;
      text = `connected, no update for ${Math.round(silentS)} s`;
    } else text = "live";
  }
  link.textContent = text;
  link.className = "link " + (up ? "up" : "down");
}

// ---------------------------------------------------------------- render

function render() {
  const s = flexedge.state;
  if (!s) return;
  const site = s.site || {};
  const gateway = s.gateway || {};
  $("site-name").textContent = gateway.site_name || gateway.site_id || "flexedge";
  $("site-id").textContent = gateway.site_name ? gateway.site_id : "";
  document.title = `flexedge – ${gateway.site_id || ""}`;
  showLink();
  renderBanners(s);

  const point = flexedge.history[flexedge.history.length - 1] || {};
  $("site-p").textContent = fmt(site.p_kw);
  $("site-metered").textContent = site.metered ? "connection-point meter" : "sum of the assets";
  $("site-requested").textContent = fmt(point.requested_kw);
  let mode = s.mode || "–";
  if (s.setpoint) mode += ` ${s.setpoint.id} (${fmt(s.setpoint.activation_kw)} kW)`;
  else if (s.schedule_id) mode += ` ${s.schedule_id}`;
  $("mode").textContent = `mode: ${mode}`;
  $("site-target").textContent = fmt(site.setpoint_kw);
  $("limited-by").textContent = site.limited_by ? `limited by ${site.limited_by}` : "";
  const limits = s.limits || {};
  $("export-limit").textContent = fmt(limits.export_limit_kw);
  $("import-limit").textContent = fmt(limits.import_limit_kw);

  const uplink = s.uplink || {};
  $("uplink").textContent = uplink.connected ? `connected (MQTT ${uplink.protocol || "?"})` : "offline";
  $("uplink").className = uplink.connected ? "" : "fail";
  const spool = s.spool || {};
  $("spool").textContent = `spool: ${spool.pending_messages ?? "–"} waiting, ${spool.dropped_messages_total ?? 0} dropped`
    + (spool.writable === false ? ` – NOT WRITABLE: ${spool.problem}` : "");

  const deie = s.deie || {};
  if (!deie.configured) $("deie").textContent = "not configured";
  else $("deie").textContent = deie.link_up ? "link up" : "link down";
  $("deie").className = deie.configured && !deie.link_up ? "fail" : "";
  $("deie-orders").textContent = orderText(s.grid_orders) || "no order in force";

  renderChart();
  renderAssets(s.assets || []);
  renderEvents();
  $("footer").textContent = `flexedge ${gateway.version || ""} · cycle ${gateway.cycle_s} s · `
    + `telemetry ${s.telemetry_ts || "–"} · ${flexedge.messages} live updates`;
}

function orderText(orders) {
  if (!orders || !orders.in_force) return "";
  const parts = [];
  if (orders.disconnected) parts.push("DISCONNECTION ordered: the site must not produce");
  else if (orders.export_limit_kw !== null && orders.export_limit_kw !== undefined) {
    parts.push(`export limited to ${fmt(orders.export_limit_kw)} kW`);
  }
  if (orders.reactive_setpoint_kvar !== null && orders.reactive_setpoint_kvar !== undefined) {
    parts.push(`Q ${fmt(orders.reactive_setpoint_kvar)} kvar`);
  }
  if (orders.tan_phi !== null && orders.tan_phi !== undefined) parts.push(`tan(phi) ${fmt(orders.tan_phi, 2)}`);
  return parts.join(", ") + (orders.source ? ` (${orders.source})` : "");
}

function renderBanners(s) {
  const banner = $("order-banner");
  const text = orderText(s.grid_orders);
  banner.hidden = !text;
  banner.textContent = text ? `Grid operator order in force: ${text}` : "";
  const health = s.health || {};
  const warn = $("health-banner");
  warn.hidden = health.status !== "unhealthy";
  warn.textContent = warn.hidden ? "" : `Gateway unhealthy: ${(health.reasons || []).join("; ")}`;
}

function renderAssets(assets) {
  const body = $("assets").tBodies[0];
  const rows = assets.map((asset) => {
    const row = document.createElement("tr");
    const name = el("td");
    name.append(el("strong", asset.id));
    if (asset.name) name.append(el("div", asset.name, "note"));
    row.append(name, el("td", `${asset.kind} / ${asset.driver}`));
    const state = el("td", asset.state, `st st-${asset.state}`);
    if (asset.detail) state.title = asset.detail;
    row.append(state);
    row.append(el("td", fmt(asset.p_kw), "num"));
    const band = asset.band_up_kw || asset.band_down_kw ? `−${fmt(asset.band_down_kw)} / +${fmt(asset.band_up_kw)}` : "–";
    row.append(el("td", band, "num"), el("td", fmt(asset.soc_pct, 0), "num"), el("td", fmt(asset.setpoint_kw), "num"));
    const command = asset.command || {};
    row.append(el("td", command.asked ? `${command.asked} at ${timeOf(command.at)}` : "–"));
    const answer = command.asked ? `${command.ok ? "✓" : "✗"} ${command.answer || ""}` : "–";
    row.append(el("td", `${answer} (${command.succeeded || 0} ok, ${command.failed || 0} failed)`,
      command.ok === false ? "fail" : ""));
    return row;
  });
  body.replaceChildren(...rows);
}

function renderEvents() {
  const body = $("events").tBodies[0];
  const rows = flexedge.events.slice().reverse().map((event) => {
    const row = document.createElement("tr");
    let detail = "";
    try { detail = JSON.stringify(event.detail); } catch (error) { detail = String(event.detail); }
    if (detail.length > 300) detail = detail.slice(0, 300) + "…";
    row.append(el("td", timeOf(event.ts)), el("td", event.type), el("td", event.asset_id || ""),
      el("td", detail, "detail"));
    return row;
  });
  body.replaceChildren(...rows);
}

// ----------------------------------------------------------------- chart

const SERIES = [  // [key in a history point, class, sign]
  ["export_limit_kw", "s-limit", 1],
  ["import_limit_kw", "s-limit", -1],  // a limit on import: below zero on the chart
  ["requested_kw", "s-req", 1],
  ["target_kw", "s-target", 1],
  ["p_kw", "s-p", 1],
  ["deie_limit_kw", "s-deie", 1],  // last, dashed: the operator's limit stays visible where the site sits on it
];

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceStep(span) {
  const raw = span / 5;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const factor of [1, 2, 2.5, 5, 10]) if (factor * magnitude >= raw) return factor * magnitude;
  return 10 * magnitude;
}

function renderChart() {
  const chart = $("chart");
  const width = Math.max(300, Math.round(chart.clientWidth || 960));
  const height = 300;
  const left = 48, right = 8, top = 10, bottom = 22;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const points = flexedge.history;
  const end = points.length ? points[points.length - 1].t : Date.now() / 1000;
  const start = end - HISTORY_S;
  let low = 0, high = 0;
  for (const point of points) {
    for (const [key, , sign] of SERIES) {
      const value = point[key];
      if (value !== null && value !== undefined) {
        low = Math.min(low, sign * value);
        high = Math.max(high, sign * value);
      }
    }
  }
  if (high - low < 1) { high += 1; low -= 1; }
  const step = niceStep(high - low);
  low = Math.floor(low / step) * step;
  high = Math.ceil(high / step) * step;
  const x = (t) => left + (t - start) / HISTORY_S * (width - left - right);
  const y = (v) => top + (high - v) / (high - low) * (height - top - bottom);

  const nodes = [];
  for (let v = low; v <= high + step / 2; v += step) {
    nodes.push(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: Math.abs(v) < 1e-9 ? "zero" : "grid" }));
    nodes.push(svg("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end" }, fmt(v, step < 1 ? 1 : 0)));
  }
  for (let minutes = 10; minutes >= 0; minutes -= 2) {
    const t = end - minutes * 60;
    nodes.push(svg("text", { x: x(t), y: height - 6, "text-anchor": minutes === 0 ? "end" : "middle" },
      minutes === 0 ? "now" : `−${minutes} min`));
  }
  const drawn = {};
  for (const [key, className, sign] of SERIES) {
    let d = "";
    let pen = false;
    let count = 0;
    for (const point of points) {
      const value = point[key];
      if (value === null || value === undefined || point.t < start) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(point.t).toFixed(1)} ${y(sign * value).toFixed(1)}`;
      pen = true;
      count += 1;
    }
    if (d) nodes.push(svg("path", { d, class: className, "data-series": key }));
    drawn[key] = count;
  }
  chart.replaceChildren(...nodes);
  flexedge.chart = { low, high, start, end, drawn };
}

// ------------------------------------------------------------------ start

setInterval(showLink, 1000);
window.addEventListener("resize", renderChart);
connect();
