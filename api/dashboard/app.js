// Quiver's dashboard: tiles over views (kept live by the push client) and SQL queries
// (re-run on their own interval), global filters in the URL, notifications, presence.
//
// Plain ES module, standard browser APIs only, no build step. Each tile redraws at most
// once per animation frame, however many deltas arrive in between.

import { QuiverPush } from "/v1/ws/client.js";

const TOKEN_KEY = "quiver.token";
const RANGES = { "15m": 15 * 60e3, "1h": 3600e3, "6h": 6 * 3600e3, "24h": 24 * 3600e3, "7d": 7 * 86400e3, all: Infinity };
const $ = (id) => document.getElementById(id);

// ---- state -------------------------------------------------------------------------

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  push: null,
  views: new Map(), // name -> {columns, key, lag_ms}
  tiles: [], // live tile objects
  detailTiles: [],
  notes: [], // newest first
  unread: 0,
  lastOpen: null,
  status: "connecting",
  firstLive: null,
};

function params() {
  const p = new URLSearchParams(location.search);
  return {
    dashboard: p.get("d") || "operations",
    warehouse: p.get("warehouse") || "",
    sku: p.get("sku") || "",
    range: RANGES[p.get("range")] ? p.get("range") : "1h",
    detail: p.get("detail") || "",
  };
}

function setParams(changes) {
  const p = new URLSearchParams(location.search);
  for (const [k, v] of Object.entries(changes)) {
    if (v) p.set(k, v);
    else p.delete(k);
  }
  history.replaceState(null, "", `${location.pathname}?${p}`);
}

// ---- HTTP --------------------------------------------------------------------------

async function api(path, init = {}) {
  const res = await fetch(path, {
    ...init,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json", ...(init.headers || {}) },
  });
  let body = null;
  const text = await res.text();
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!res.ok) {
    const err = new Error(body?.error?.message || `${res.status} ${res.statusText}`);
    err.status = res.status;
    err.code = body?.error?.code;
    throw err;
  }
  return body;
}

async function sql(query, params = []) {
  return api("/v1/sql", { method: "POST", body: JSON.stringify({ sql: query, params }) });
}

function quote(s) {
  return `'${String(s).replace(/'/g, "''")}'`;
}

// ---- formatting --------------------------------------------------------------------

const numFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
const moneyFmt = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });

function fmt(v, kind) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number" || (typeof v === "string" && /^-?\d+(\.\d+)?$/.test(v))) {
    const n = Number(v);
    return kind === "money" ? moneyFmt.format(n) : numFmt.format(n);
  }
  return String(v);
}

function isNum(v) {
  return typeof v === "number" || (typeof v === "string" && /^-?\d+(\.\d+)?$/.test(v));
}

function timeMs(v) {
  if (typeof v === "number") return v;
  const t = Date.parse(v);
  return Number.isNaN(t) ? null : t;
}

function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// ---- frame scheduling --------------------------------------------------------------

const dirty = new Set();
let frameQueued = false;

function redraw(tile) {
  dirty.add(tile);
  if (frameQueued) return;
  frameQueued = true;
  requestAnimationFrame(() => {
    frameQueued = false;
    const tiles = Array.from(dirty);
    dirty.clear();
    for (const t of tiles) {
      if (t.alive) {
        t.render();
        t.el.dataset.renders = String(Number(t.el.dataset.renders || 0) + 1);
      }
    }
  });
}

// ---- tiles -------------------------------------------------------------------------

function filtersFor(view) {
  const f = params();
  const cols = state.views.get(view)?.columns || [];
  const filter = {};
  if (f.warehouse && cols.includes("warehouse_id")) filter.warehouse_id = f.warehouse;
  if (f.sku && cols.includes("sku")) filter.sku = f.sku;
  return Object.keys(filter).length ? filter : null;
}

class Tile {
  constructor(spec, container) {
    this.spec = spec;
    this.alive = true;
    this.el = document.createElement("article");
    this.el.className = "tile";
    this.el.dataset.tile = spec.id || spec.title;
    this.el.dataset.type = spec.type;
    if (spec.type === "timeseries") this.el.classList.add("wide");
    this.el.innerHTML = `<h3><span>${esc(spec.title || spec.view || "")}</span><span class="tools"></span></h3><div class="body"></div><p class="error"></p>`;
    this.body = this.el.querySelector(".body");
    this.tools = this.el.querySelector(".tools");
    this.errorEl = this.el.querySelector(".error");
    container.appendChild(this.el);
    this.columns = [];
    this.rows = [];
    this.start();
  }

  start() {
    if (this.spec.view) {
      const filter = filtersFor(this.spec.view);
      this.sub = state.push.subscribe(this.spec.view, {
        filter,
        onChange: (sub) => {
          this.columns = sub.columns;
          this.rows = sub.rows();
          this.version = sub.version;
          this.el.dataset.version = String(sub.version);
          redraw(this);
        },
        onError: (m) => this.fail(m.message),
      });
    } else if (this.spec.sql) {
      const run = async () => {
        try {
          const res = await sql(this.spec.sql);
          this.columns = res.columns.map((c) => c.name);
          this.rows = res.rows;
          this.errorEl.textContent = "";
          redraw(this);
        } catch (e) {
          this.fail(e.message);
        }
      };
      run();
      this.timer = setInterval(run, (this.spec.refresh_s || 30) * 1000);
    }
  }

  fail(message) {
    this.errorEl.textContent = message;
  }

  col(name) {
    return this.columns.indexOf(name);
  }

  stop() {
    this.alive = false;
    this.sub?.unsubscribe();
    clearInterval(this.timer);
    this.chart?.destroy();
    this.el.remove();
  }

  render() {}
}

/** A single number: the newest window's value and its change on the window before,
 * with a sparkline; or, without a time column, the sum (or row count) of the rows. */
class ValueTile extends Tile {
  render() {
    const { value, time, format } = this.spec;
    let current, previous, series = [];
    if (value === "count") {
      current = this.rows.length;
    } else if (time) {
      const ti = this.col(time), vi = this.col(value);
      if (ti < 0 || vi < 0) return;
      const byTime = new Map();
      for (const r of this.rows) {
        const t = timeMs(r[ti]);
        byTime.set(t, (byTime.get(t) || 0) + Number(r[vi] || 0));
      }
      series = Array.from(byTime.entries()).sort((a, b) => a[0] - b[0]);
      current = series.at(-1)?.[1];
      previous = series.at(-2)?.[1];
    } else {
      const vi = this.col(value);
      current = this.rows.reduce((s, r) => s + Number(r[vi] || 0), 0);
    }
    const change = previous ? ((current - previous) / Math.abs(previous)) * 100 : null;
    const dir = change === null ? "" : change >= 0 ? "up" : "down";
    this.body.innerHTML = `<div class="value" data-value="${current ?? ""}">${current === undefined ? "–" : fmt(current, format)}</div>
      <div class="change ${dir}">${change === null ? "&nbsp;" : `${change >= 0 ? "▲" : "▼"} ${Math.abs(change).toFixed(1)}% on the previous period`}</div>
      <svg class="spark" viewBox="0 0 100 36" preserveAspectRatio="none"></svg>`;
    const last = series.slice(-30);
    if (last.length > 1) {
      const ys = last.map((p) => p[1]);
      const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
      const pts = ys.map((y, i) => `${(i / (ys.length - 1)) * 100},${34 - ((y - lo) / span) * 32}`).join(" ");
      this.body.querySelector("svg").innerHTML = `<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="${pts}"/>`;
    }
  }
}

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

/** A line or bar chart of a windowed view, one series per value of `series`. */
class SeriesTile extends Tile {
  render() {
    const { x, y, series, chart } = this.spec;
    const xi = this.col(x), yi = this.col(y), si = series ? this.col(series) : -1;
    if (xi < 0 || yi < 0) return;
    const range = RANGES[params().range];
    const now = Date.now();
    const names = new Set();
    const byX = new Map();
    for (const r of this.rows) {
      const t = timeMs(r[xi]);
      if (t === null || now - t > range) continue;
      const s = si >= 0 ? String(r[si]) : y;
      names.add(s);
      if (!byX.has(t)) byX.set(t, new Map());
      const m = byX.get(t);
      m.set(s, (m.get(s) || 0) + Number(r[yi] || 0));
    }
    const xs = Array.from(byX.keys()).sort((a, b) => a - b);
    const labels = Array.from(names).sort();
    const data = [xs.map((t) => t / 1000), ...labels.map((s) => xs.map((t) => byX.get(t).get(s) ?? null))];
    this.el.dataset.points = String(xs.length);
    const marks = state.notes.filter((n) => n.view === this.spec.view).map((n) => ({ t: Date.parse(n.at) / 1000, state: n.state }));
    const width = Math.max(200, this.body.clientWidth || 300);
    const key = labels.join("|") + chart;
    if (!this.chart || this.chartKey !== key) {
      this.chart?.destroy();
      this.body.innerHTML = "";
      const bars = chart === "bar" && globalThis.uPlot?.paths?.bars ? globalThis.uPlot.paths.bars({ size: [0.8, 40] }) : undefined;
      this.chartKey = key;
      this.chart = new globalThis.uPlot(
        {
          width,
          height: 220,
          scales: {
            x: {
              time: true,
              // The chosen time range, not just the span of the points there are.
              range: (u, lo, hi) => {
                const r = RANGES[params().range];
                return Number.isFinite(r) ? [(Date.now() - r) / 1000, Date.now() / 1000 + 30] : [lo, hi];
              },
            },
          },
          series: [{}, ...labels.map((s, i) => ({ label: s, stroke: PALETTE[i % PALETTE.length], fill: chart === "bar" ? PALETTE[i % PALETTE.length] + "55" : undefined, paths: bars, width: 1.5, spanGaps: true, points: { show: true, size: 4 } }))],
          axes: [{}, { size: 60 }],
          hooks: {
            draw: [
              (u) => {
                // Alert state changes on this view, as vertical marks.
                const ctx = u.ctx;
                for (const m of this.marks || []) {
                  const px = u.valToPos(m.t, "x", true);
                  if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) continue;
                  ctx.save();
                  ctx.strokeStyle = m.state === "firing" ? "#b91c1c" : "#15803d";
                  ctx.setLineDash([4, 4]);
                  ctx.beginPath();
                  ctx.moveTo(px, u.bbox.top);
                  ctx.lineTo(px, u.bbox.top + u.bbox.height);
                  ctx.stroke();
                  ctx.restore();
                }
              },
            ],
          },
        },
        data,
        this.body,
      );
    } else {
      if (Math.abs(this.chart.width - width) > 8) this.chart.setSize({ width, height: 220 });
      this.chart.setData(data);
    }
    this.marks = marks;
    this.el.dataset.marks = String(marks.length);
  }
}

/** Rows with sort (click a header), a text filter, CSV export and drill-down by SKU. */
class TableTile extends Tile {
  constructor(spec, container) {
    super(spec, container);
    this.sort = spec.sort || null;
    this.desc = !!spec.desc;
    this.filterText = "";
    const input = document.createElement("input");
    input.className = "filter";
    input.placeholder = "Filter rows";
    input.setAttribute("aria-label", `Filter ${spec.title}`);
    input.addEventListener("input", () => {
      this.filterText = input.value.toLowerCase();
      redraw(this);
    });
    this.el.insertBefore(input, this.body);
    const csv = document.createElement("button");
    csv.className = "link";
    csv.textContent = "CSV";
    csv.title = "Download as CSV";
    csv.addEventListener("click", () => this.download());
    this.tools.appendChild(csv);
    this.body.classList.add("table-wrap");
  }

  visible() {
    let rows = this.rows;
    if (this.filterText) rows = rows.filter((r) => r.some((v) => String(v ?? "").toLowerCase().includes(this.filterText)));
    const si = this.sort ? this.col(this.sort) : -1;
    if (si >= 0) {
      rows = rows.slice().sort((a, b) => {
        const x = a[si], y = b[si];
        const c = isNum(x) && isNum(y) ? Number(x) - Number(y) : String(x ?? "").localeCompare(String(y ?? ""));
        return this.desc ? -c : c;
      });
    }
    return rows;
  }

  render() {
    const rows = this.visible();
    const shown = rows.slice(0, this.spec.limit || 500);
    const skuIdx = this.col("sku");
    const head = this.columns
      .map((c) => `<th data-col="${esc(c)}"${c === this.sort ? ` data-sort="${this.desc ? "desc" : "asc"}"` : ""}>${esc(c)}</th>`)
      .join("");
    const body = shown
      .map((r) => {
        const drill = skuIdx >= 0 ? ` class="drill" data-sku="${esc(r[skuIdx])}"` : "";
        return `<tr${drill}>${r.map((v) => `<td${isNum(v) ? ' class="num"' : ""}>${esc(fmt(v))}</td>`).join("")}</tr>`;
      })
      .join("");
    this.body.innerHTML = `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>${rows.length > shown.length ? `<p class="muted">${shown.length} of ${rows.length} rows</p>` : ""}`;
    this.el.dataset.rows = String(rows.length);
    for (const th of this.body.querySelectorAll("th")) {
      th.addEventListener("click", () => {
        const c = th.dataset.col;
        if (this.sort === c) this.desc = !this.desc;
        else { this.sort = c; this.desc = false; }
        redraw(this);
      });
    }
    for (const tr of this.body.querySelectorAll("tr.drill")) {
      tr.addEventListener("click", () => openDetail(tr.dataset.sku));
    }
  }

  download() {
    const cell = (v) => {
      const s = v === null || v === undefined ? "" : String(v);
      return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
    };
    const lines = [this.columns.map(cell).join(","), ...this.visible().map((r) => r.map(cell).join(","))];
    const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${this.spec.id || "table"}.csv`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }
}

function makeTile(spec, container) {
  switch (spec.type) {
    case "value": return new ValueTile(spec, container);
    case "timeseries": return new SeriesTile(spec, container);
    default: return new TableTile(spec, container);
  }
}

// ---- dashboard ---------------------------------------------------------------------

async function loadDashboard() {
  for (const t of state.tiles) t.stop();
  state.tiles = [];
  const { dashboard } = params();
  let spec;
  try {
    spec = await api(`/v1/dashboards/${encodeURIComponent(dashboard)}`);
  } catch (e) {
    $("tiles").innerHTML = `<p class="error">Dashboard '${esc(dashboard)}': ${esc(e.message)}</p>`;
    return;
  }
  $("title").textContent = spec.title || dashboard;
  document.title = `${spec.title || dashboard} · Quiver`;
  for (const t of spec.tiles || []) state.tiles.push(makeTile(t, $("tiles")));
}

async function loadDashboardList() {
  const { dashboard } = params();
  try {
    const list = await api("/v1/dashboards");
    $("dashboard").innerHTML = list.dashboards
      .map((d) => `<option value="${esc(d.name)}"${d.name === dashboard ? " selected" : ""}>${esc(d.title || d.name)}</option>`)
      .join("");
  } catch {
    // The selector stays empty; the dashboard itself reports its error.
  }
}

async function loadViews() {
  const list = await api("/v1/views");
  state.views = new Map(list.map((v) => [v.name, { columns: (v.columns || []).map((c) => c.name ?? c), key: v.key, lag_ms: v.lag_ms }]));
  return list;
}

async function loadFilterOptions() {
  try {
    const res = await sql("SELECT DISTINCT warehouse_id FROM stock_on_hand ORDER BY 1");
    const { warehouse } = params();
    $("f-warehouse").innerHTML =
      `<option value="">All warehouses</option>` +
      res.rows.map(([w]) => `<option value="${esc(w)}"${w === warehouse ? " selected" : ""}>${esc(w)}</option>`).join("");
    const skus = await sql("SELECT DISTINCT sku FROM stock_on_hand ORDER BY 1 LIMIT 500");
    $("skus").innerHTML = skus.rows.map(([s]) => `<option value="${esc(s)}">`).join("");
  } catch {
    // No stock view: the filters stay free text.
  }
}

function restartTiles() {
  loadDashboard();
  if (params().detail) openDetail(params().detail);
}

// ---- drill-down --------------------------------------------------------------------

async function openDetail(sku) {
  setParams({ detail: sku });
  for (const t of state.detailTiles) t.stop();
  state.detailTiles = [];
  $("detail").hidden = false;
  $("detail-title").textContent = `SKU ${sku}`;
  const body = $("detail-body");
  body.innerHTML = "";
  const where = `sku = ${quote(sku)}`;
  const specs = [
    { id: "detail-stock", type: "table", title: "Stock by warehouse", sql: `SELECT warehouse_id, on_hand, last_movement FROM stock_on_hand WHERE ${where} ORDER BY warehouse_id`, refresh_s: 5 },
    { id: "detail-sales", type: "table", title: "Sales per hour", sql: `SELECT hour, units, avg_price, customers FROM hourly_sales_by_sku WHERE ${where} ORDER BY hour DESC LIMIT 48`, refresh_s: 10 },
  ];
  try {
    const tables = await sql("SELECT table_name FROM information_schema.tables WHERE table_name = 'forecasts'");
    if (tables.rows.length) {
      specs.push({ id: "detail-forecast", type: "table", title: "Forecast", sql: `SELECT warehouse_id, date, yhat, yhat_lower, yhat_upper, model FROM forecasts WHERE ${where} ORDER BY warehouse_id, date LIMIT 200`, refresh_s: 60 });
    }
  } catch {
    // information_schema unavailable: no forecast tile.
  }
  for (const s of specs) state.detailTiles.push(makeTile(s, body));
  $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
}

function closeDetail() {
  setParams({ detail: "" });
  for (const t of state.detailTiles) t.stop();
  state.detailTiles = [];
  $("detail").hidden = true;
}

// ---- notifications -----------------------------------------------------------------

function renderNotes() {
  $("unread").textContent = String(state.unread);
  $("unread").dataset.zero = String(state.unread === 0);
  $("notes").innerHTML = state.notes
    .slice(0, 100)
    .map((n) => {
      const key = Object.entries(n.key || {}).map(([k, v]) => `${k}=${v}`).join(", ");
      return `<li class="note" data-id="${n.id}" data-read="${n.read_at ? "true" : "false"}">
        <div><span class="sev-${esc(n.severity)}">${esc(n.severity)}</span> <b>${esc(n.alert)}</b> ${esc(n.state)}</div>
        <div>${esc(key)}</div>
        <div class="muted">${esc(new Date(n.at).toLocaleString())}${n.silenced ? " · silenced" : ""}</div>
        ${n.read_at ? `<div class="muted">read by ${esc(n.read_by || "")}</div>` : `<button class="link mark-read" data-id="${n.id}">Mark read</button>`}
      </li>`;
    })
    .join("");
  for (const b of $("notes").querySelectorAll(".mark-read")) {
    b.addEventListener("click", async () => {
      try {
        await api(`/v1/notifications/${b.dataset.id}/read`, { method: "POST" });
      } catch (e) {
        b.textContent = e.message;
      }
    });
  }
  for (const t of state.tiles) if (t instanceof SeriesTile) redraw(t);
}

function onNotificationMessage(m) {
  if (m.type === "subscribed") {
    state.notes = m.recent || [];
    state.unread = m.unread ?? 0;
  } else if (m.type === "notification") {
    const n = m.notification;
    const i = state.notes.findIndex((x) => x.id === n.id);
    if (i >= 0) state.notes[i] = n;
    else state.notes.unshift(n);
    state.unread = m.unread ?? state.unread;
  }
  renderNotes();
}

// ---- connection state, freshness, presence -----------------------------------------

function showStatus() {
  const el = $("conn");
  let label = state.status, st = state.status;
  if (state.status === "open") {
    label = "live";
    st = "live";
  } else if (state.status === "reconnecting" || state.status === "connecting") {
    const since = state.lastOpen ? Math.round((Date.now() - state.lastOpen) / 1000) : 0;
    if (state.lastOpen && since >= 3) {
      label = `stale for ${since} s`;
      st = "stale";
    } else {
      label = state.status;
    }
  }
  el.textContent = label;
  el.dataset.state = st;
}

async function refreshFreshness() {
  try {
    const list = await loadViews();
    const used = new Set(state.tiles.map((t) => t.spec.view).filter(Boolean));
    const lags = list.filter((v) => used.has(v.name)).map((v) => v.lag_ms);
    const lag = lags.length ? Math.max(...lags) : 0;
    $("fresh").textContent = `data ${lag} ms behind`;
    $("fresh").dataset.lag = String(lag);
  } catch {
    // shown by the connection badge
  }
  try {
    const p = await api("/v1/presence");
    const others = p.watching.filter((w) => !w.you).map((w) => w.name);
    $("presence").textContent = others.length ? `Also watching: ${others.join(", ")}` : "Only you";
  } catch {
    $("presence").textContent = "";
  }
}

// ---- start -------------------------------------------------------------------------

async function start() {
  $("signin").hidden = true;
  $("app").hidden = false;
  const f = params();
  $("f-range").value = f.range;
  $("f-sku").value = f.sku;
  await loadViews();
  state.push = new QuiverPush(location.origin, {
    token: state.token,
    onStatus: (status) => {
      state.status = status;
      if (status === "open") state.lastOpen = Date.now();
      if (status === "refused") signOut("The token was refused.");
      showStatus();
    },
  });
  state.push.subscribe("notifications", { onMessage: onNotificationMessage });
  loadDashboardList();
  loadFilterOptions();
  restartTiles();
  refreshFreshness();
  setInterval(refreshFreshness, 5000);
  setInterval(() => {
    if (state.status === "open") state.lastOpen = Date.now();
    showStatus();
  }, 1000);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.push?.close();
  location.hash = "";
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  if (!message) location.reload();
}

$("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.token = $("token").value.trim();
  try {
    await api("/v1/views");
  } catch (err) {
    $("signin-error").textContent = err.status === 401 || err.status === 403 ? "That token was refused." : err.message;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, state.token);
  start();
});
$("signout").addEventListener("click", () => signOut());
$("bell").addEventListener("click", () => { $("drawer").hidden = !$("drawer").hidden; });
$("drawer-close").addEventListener("click", () => { $("drawer").hidden = true; });
$("detail-close").addEventListener("click", closeDetail);
$("dashboard").addEventListener("change", () => { setParams({ d: $("dashboard").value }); restartTiles(); });
$("f-warehouse").addEventListener("change", () => { setParams({ warehouse: $("f-warehouse").value }); restartTiles(); });
$("f-sku").addEventListener("change", () => { setParams({ sku: $("f-sku").value.trim() }); restartTiles(); });
$("f-range").addEventListener("change", () => {
  setParams({ range: $("f-range").value });
  for (const t of state.tiles) redraw(t);
});
window.addEventListener("resize", () => { for (const t of state.tiles) if (t instanceof SeriesTile) redraw(t); });

if (state.token) {
  api("/v1/views").then(start, () => signOut("The saved token was refused; sign in again."));
} else {
  $("signin").hidden = false;
}
