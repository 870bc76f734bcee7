// The push client in a real browser: Debian's Chromium, headless, driven by
// playwright-core, against a live server (started by the Rust integration test
// `the_javascript_client_in_a_browser`, which sets QUIVER_URL and QUIVER_TOKEN).
//
// What only a browser shows: the module loads from the server's own
// `/v1/ws/client.js`; the browser's own WebSocket authenticates by first message
// (a browser cannot set headers) from the server's origin, which the default
// allow-list accepts; callbacks follow requestAnimationFrame; a page of another
// origin is refused.

import assert from "node:assert/strict";
import http from "node:http";

import { chromium } from "playwright-core";

import { inventoryIngest, token, untilEqual, url } from "../support.mjs";

const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";

const ingest = inventoryIngest({
  prefix: "browser",
  skus: 6,
  warehouses: 3,
  eventTime: "2026-11-25T12:00:00Z",
});

/** Waits until the page's copy of subscription `name` equals `query`'s rows. */
const converges = (page, name, query, what) =>
  untilEqual(() => page.evaluate((n) => window.subs[n].rows(), name), query, what);

const browser = await chromium.launch({
  executablePath,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const foreign = http.createServer((_, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end("<!doctype html><title>elsewhere</title>");
});
try {
  await ingest(30);
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  // A page of the server's own origin imports the client the server serves.
  await page.goto(`${url}/v1/ws/client.js`);
  await page.evaluate(async (token) => {
    const { QuiverPush } = await import("/v1/ws/client.js");
    window.ticks = 0;
    // Per animation frame: the deltas applied to `all` and its onChange calls since
    // the frame before (only frames where either moved).
    window.frameLog = [];
    let seen = { deltas: 0, calls: 0 };
    const tick = () => {
      window.ticks += 1;
      if (window.subs) {
        const now = { deltas: window.subs.all.stats.deltas, calls: window.calls.all };
        const moved = { deltas: now.deltas - seen.deltas, calls: now.calls - seen.calls };
        if (moved.deltas || moved.calls) window.frameLog.push(moved);
        seen = now;
      }
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
    window.statuses = [];
    window.calls = { all: 0, w1: 0 };
    window.push = new QuiverPush(location.origin, {
      token,
      minBackoffMs: 50,
      maxBackoffMs: 400,
      onStatus: (s) => window.statuses.push(s),
    });
    window.subs = {
      all: window.push.subscribe("stock_on_hand", { onChange: () => (window.calls.all += 1) }),
      w1: window.push.subscribe("stock_on_hand", {
        filter: { warehouse_id: "W1" },
        onChange: () => (window.calls.w1 += 1),
      }),
    };
  }, token);
  await converges(page, "all", "SELECT * FROM stock_on_hand", "snapshot, unfiltered");
  await converges(
    page,
    "w1",
    "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'",
    "snapshot, filtered",
  );

  // Many small changes in a burst: every one is applied, and onChange runs at most
  // once per animation frame. The page's main thread is held busy while five batches
  // are ingested, so their deltas wait in the socket and reach the client together:
  // a client that called onChange per delta would call it several times in one frame.
  await page.evaluate(() => {
    window.frameLog = [];
  });
  const frozen = page.evaluate(() => {
    const until = performance.now() + 2500;
    while (performance.now() < until) {
      // hold the main thread
    }
  });
  for (let i = 0; i < 5; i++) await ingest(3);
  await frozen;
  for (let i = 0; i < 40; i++) await ingest(3);
  await converges(page, "all", "SELECT * FROM stock_on_hand", "after a burst of changes");
  await converges(
    page,
    "w1",
    "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'",
    "filtered, after a burst",
  );
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  const log = await page.evaluate(() => window.frameLog);
  const deltas = log.reduce((n, f) => n + f.deltas, 0);
  const calls = log.reduce((n, f) => n + f.calls, 0);
  const crowded = log.filter((f) => f.deltas >= 2);
  console.log(
    `burst: ${deltas} deltas, ${calls} onChange calls, ${log.length} frames with changes, ` +
      `${crowded.length} with two or more deltas (most ${Math.max(...log.map((f) => f.deltas))})`,
  );
  assert.ok(deltas >= 5, `only ${deltas} deltas arrived`);
  assert.ok(crowded.length >= 1, "no frame saw two deltas: the burst did not arrive together");
  const over = log.filter((f) => f.calls > 1);
  assert.deepEqual(over, [], "frames with more than one onChange call");

  // The connection drops; the client reconnects and resumes from its versions.
  await page.evaluate(() => window.push._ws.close(4000, "test drop"));
  await ingest(10);
  await converges(page, "all", "SELECT * FROM stock_on_hand", "after a reconnect");
  await converges(
    page,
    "w1",
    "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'",
    "filtered, after a reconnect",
  );
  const after = await page.evaluate(() => ({
    statuses: window.statuses,
    resumes: window.subs.all.stats.resumes + window.subs.w1.stats.resumes,
    snapshots: window.subs.all.stats.snapshots + window.subs.w1.stats.snapshots,
  }));
  assert.ok(
    after.statuses.filter((s) => s === "open").length >= 2,
    `statuses: ${after.statuses}`,
  );
  assert.equal(after.resumes, 2, "both subscriptions resumed");
  assert.equal(after.snapshots, 2, "a resume within the kept history sends no snapshot");

  // A wrong token is refused for good (close 1008), not retried.
  const refused = await page.evaluate(async () => {
    const { QuiverPush } = await import("/v1/ws/client.js");
    return await new Promise((resolve) => {
      const p = new QuiverPush(location.origin, {
        token: "not-a-token",
        onStatus: (s, detail) => {
          if (s === "refused") resolve({ status: s, detail });
        },
      });
      setTimeout(() => resolve({ status: p.status }), 10_000);
    });
  });
  assert.equal(refused.status, "refused", JSON.stringify(refused));
  assert.deepEqual(errors, [], "errors on the page");

  // A page of another origin cannot open a connection, whatever it sends.
  await new Promise((r) => foreign.listen(0, "127.0.0.1", r));
  const other = await browser.newPage();
  await other.goto(`http://localhost:${foreign.address().port}/`);
  const attempt = await other.evaluate(async (wsUrl) => {
    return await new Promise((resolve) => {
      const ws = new WebSocket(wsUrl);
      let opened = false;
      ws.onopen = () => {
        opened = true;
      };
      ws.onclose = (e) => resolve({ opened, code: e.code });
      setTimeout(() => resolve({ opened, code: null }), 10_000);
    });
  }, `${url.replace("http", "ws")}/v1/ws`);
  assert.equal(attempt.opened, false, `a foreign page connected: ${JSON.stringify(attempt)}`);
  assert.equal(attempt.code, 1006, "refused before the upgrade");
  console.log("browser client: ok");
} finally {
  foreign.close();
  await browser.close();
}
