// Quiver push client: live copies of materialized views over WebSocket.
//
// A plain ES module with no dependencies, for browsers and Node. In Node before 22, pass
// a WebSocket class (for example the `ws` package's) as `options.WebSocket`.
//
//   import { QuiverPush } from "./quiver-push.js";
//   const push = new QuiverPush("http://127.0.0.1:8080", { token });
//   const low = push.subscribe("low_stock", {
//     filter: { warehouse_id: "W1" },
//     onChange: (sub) => render(sub.rows()),
//   });
//   push.subscribe("notifications", { onMessage: (m) => bell(m.unread) });
//
// Each subscription keeps the view's rows by applying the snapshot and then every delta
// in version order. After a dropped connection the client reconnects with exponential
// backoff and resumes each subscription from the last version it applied; the server
// answers with the missed deltas, or with a fresh snapshot when they are no longer kept.
// `onChange` runs at most once per animation frame (or every 16 ms outside browsers),
// however many deltas arrived in between.

const defaults = {
  minBackoffMs: 250,
  maxBackoffMs: 30_000,
  pingIntervalMs: 15_000,
};

/** Errors that no reconnect can fix: the subscription stops. */
const FATAL_SUBSCRIBE_ERRORS = new Set([
  "unknown_view",
  "bad_filter",
  "bad_message",
  "duplicate_id",
  "too_many_subscriptions",
]);

function wsUrl(url) {
  const u = new URL(url);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  if (u.pathname === "/" || u.pathname === "") u.pathname = "/v1/ws";
  return u.toString();
}

function defaultSchedule(callback) {
  if (typeof globalThis.requestAnimationFrame === "function") {
    globalThis.requestAnimationFrame(() => callback());
  } else {
    setTimeout(callback, 16);
  }
}

/** One live subscription: a local copy of a view's (filtered) rows. */
export class Subscription {
  constructor(client, id, view, options) {
    this.client = client;
    this.id = id;
    this.view = view;
    this.filter = options.filter ?? null;
    this.onChange = options.onChange ?? null;
    this.onError = options.onError ?? null;
    /** For channels that are not views (`notifications`): each message as it comes. */
    this.onMessage = options.onMessage ?? null;
    /** Column names, from the snapshot. */
    this.columns = [];
    /** Key column names. */
    this.key = [];
    /** The last version applied; null until the first snapshot. */
    this.version = null;
    /** Set when the server refused the subscription for good. */
    this.error = null;
    this.stats = { snapshots: 0, deltas: 0, coalesced: 0, resumes: 0 };
    this._rows = new Map();
    this._keyIdx = [];
    this._active = true;
  }

  /** The rows now, as arrays in column order. */
  rows() {
    return Array.from(this._rows.values());
  }

  /** The rows as objects keyed by column name. */
  objects() {
    return this.rows().map((r) => Object.fromEntries(this.columns.map((c, i) => [c, r[i]])));
  }

  /** The row with these key values, if present. */
  get(...keyValues) {
    return this._rows.get(JSON.stringify(keyValues));
  }

  /** Stops the subscription. */
  unsubscribe() {
    if (!this._active) return;
    this._active = false;
    this.client._subs.delete(this.id);
    this.client._send({ type: "unsubscribe", id: this.id });
  }

  _request() {
    const m = { type: "subscribe", id: this.id, view: this.view };
    if (this.filter) m.filter = this.filter;
    if (this.version !== null) m.from_version = this.version;
    return m;
  }

  _keyOf(row) {
    return JSON.stringify(this._keyIdx.map((i) => row[i]));
  }

  _apply(m) {
    switch (m.type) {
      case "snapshot": {
        this.columns = m.columns.map((c) => c.name);
        this.key = m.key;
        this._keyIdx = m.key.map((k) => this.columns.indexOf(k));
        this._rows = new Map();
        for (const row of m.rows) this._rows.set(this._keyOf(row), row);
        this.version = m.version;
        this.stats.snapshots += 1;
        return true;
      }
      case "subscribed":
        this.stats.resumes += 1;
        return false;
      case "delta": {
        // After a resume the server may repeat what this copy already holds.
        if (this.version !== null && m.version <= this.version) return false;
        for (const key of m.deletes) this._rows.delete(JSON.stringify(key));
        for (const row of m.upserts) this._rows.set(this._keyOf(row), row);
        this.version = m.version;
        this.stats.deltas += 1;
        if (m.coalesced) this.stats.coalesced += 1;
        return true;
      }
      default:
        return false;
    }
  }
}

/** A connection to Quiver's push endpoint that survives drops. */
export class QuiverPush {
  /**
   * @param {string} url  `http(s)://host:port` or `ws(s)://host:port/v1/ws`
   * @param {object} options  `token` (required), `WebSocket`, `minBackoffMs`,
   *   `maxBackoffMs`, `pingIntervalMs`, `onStatus(status, detail)`, `onError(frame)`,
   *   `schedule(callback)` (defaults to requestAnimationFrame)
   */
  constructor(url, options = {}) {
    this.url = wsUrl(url);
    this.options = { ...defaults, ...options };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) {
      throw new Error("no WebSocket class: pass options.WebSocket (e.g. the 'ws' package in Node < 22)");
    }
    this.status = "connecting";
    this._subs = new Map();
    this._nextId = 1;
    this._attempt = 0;
    this._closed = false;
    this._changed = new Set();
    this._flushScheduled = false;
    this._schedule = options.schedule ?? defaultSchedule;
    this._connect();
  }

  /**
   * Subscribes to a view. `options.filter` is an object of column → value, or
   * `{in: [...]}`, or `{gte, gt, lte, lt, ne, eq}`; `onChange(sub)` runs after changes,
   * at most once per frame; `onError(frame)` on a refusal. The `notifications` channel
   * is subscribed to the same way; its messages go to `onMessage(message)`.
   */
  subscribe(view, options = {}) {
    const id = options.id ?? `s${this._nextId++}`;
    const sub = new Subscription(this, id, view, options);
    this._subs.set(id, sub);
    if (this.status === "open") this._send(sub._request());
    return sub;
  }

  /** Closes the connection for good. */
  close() {
    this._closed = true;
    clearTimeout(this._retryTimer);
    clearInterval(this._pingTimer);
    if (this._ws) this._ws.close(1000, "client closed");
    this._setStatus("closed");
  }

  _setStatus(status, detail) {
    this.status = status;
    this.options.onStatus?.(status, detail);
  }

  _connect() {
    if (this._closed) return;
    this._setStatus("connecting");
    const ws = new this.WebSocket(this.url);
    this._ws = ws;
    this._lastMessage = Date.now();
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this._attempt = 0;
      ws.send(JSON.stringify({ type: "auth", token: this.options.token }));
      this._setStatus("open");
      for (const sub of this._subs.values()) {
        if (sub._active && !sub.error) this._send(sub._request());
      }
      clearInterval(this._pingTimer);
      this._pingTimer = setInterval(() => this._heartbeat(), this.options.pingIntervalMs);
    };
    ws.onmessage = (event) => {
      if (ws !== this._ws) return;
      this._lastMessage = Date.now();
      let m;
      try {
        m = JSON.parse(typeof event.data === "string" ? event.data : String(event.data));
      } catch {
        return;
      }
      this._onMessage(m);
    };
    ws.onclose = (event) => {
      if (ws !== this._ws) return;
      clearInterval(this._pingTimer);
      this._ws = null;
      if (this._closed) return;
      // 1008: refused (bad token, wrong scope). Retrying cannot help.
      if (event.code === 1008) {
        this._closed = true;
        this._setStatus("refused", event.reason);
        return;
      }
      this._retry();
    };
    ws.onerror = () => {};
  }

  _retry() {
    const base = Math.min(
      this.options.maxBackoffMs,
      this.options.minBackoffMs * 2 ** this._attempt,
    );
    this._attempt += 1;
    const delay = base / 2 + Math.random() * (base / 2);
    this._setStatus("reconnecting", { attempt: this._attempt, delayMs: Math.round(delay) });
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  _heartbeat() {
    if (!this._ws || this.status !== "open") return;
    if (Date.now() - this._lastMessage > 2 * this.options.pingIntervalMs) {
      // Nothing heard for two intervals: the connection is dead even if the socket
      // has not noticed.
      this._drop();
      return;
    }
    this._send({ type: "ping" });
  }

  /** Drops the socket as if the network failed; the client reconnects and resumes. */
  _drop() {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    clearInterval(this._pingTimer);
    try {
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close();
    } catch {
      // already gone
    }
    this._retry();
  }

  _send(m) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(m));
  }

  _onMessage(m) {
    if (m.type === "error") {
      const sub = m.id ? this._subs.get(m.id) : null;
      if (sub) {
        if (FATAL_SUBSCRIBE_ERRORS.has(m.code) || m.code === "unknown_view") {
          sub.error = m;
          sub._active = false;
          this._subs.delete(sub.id);
        }
        sub.onError?.(m);
      } else {
        this.options.onError?.(m);
      }
      return;
    }
    const sub = m.id ? this._subs.get(m.id) : null;
    if (sub && (m.type === "notification" || (m.type === "subscribed" && m.channel))) {
      sub.onMessage?.(m);
      return;
    }
    if (sub && sub._apply(m)) this._changedSub(sub);
  }

  _changedSub(sub) {
    if (!sub.onChange) return;
    this._changed.add(sub);
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    this._schedule(() => {
      this._flushScheduled = false;
      const changed = Array.from(this._changed);
      this._changed.clear();
      for (const s of changed) if (s._active) s.onChange(s);
    });
  }
}
