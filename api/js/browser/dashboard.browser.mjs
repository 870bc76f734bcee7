// The dashboard in a real browser: Debian's Chromium, headless, driven by
// playwright-core, against a live server started by the Rust integration test
// `the_dashboard_in_a_browser` (QUIVER_URL, QUIVER_TOKEN, QUIVER_ARTIFACTS, and the
// alert rule on SKU NOTE-1 it made).
//
// Signs in (and is refused with a bad token), watches a KPI tile and a chart move as
// events are ingested over HTTP, sets a filter and reloads, drills down to a SKU,
// exports a table as CSV, sees a notification arrive and marks it read, and keeps
// screenshots at laptop and phone widths. Any error in the browser console fails it.

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";

import { chromium } from "playwright-core";

import { token, url } from "../support.mjs";

const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const artifacts = process.env.QUIVER_ARTIFACTS ?? "target/dashboard-artifacts";
fs.mkdirSync(artifacts, { recursive: true });

let seq = 0;
async function post(stream, events) {
  const lines = events.map((e) => JSON.stringify({ event_id: `dash-${++seq}`, ...e }));
  const r = await fetch(`${url}/v1/streams/${stream}/events`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/x-ndjson" },
    body: lines.join("\n"),
  });
  assert.equal(r.status, 200, await r.text());
}

const now = () => new Date().toISOString();
const stock = (sku, warehouse, quantity) =>
  post("inventory", [{ event_time: now(), sku, warehouse_id: warehouse, kind: quantity > 0 ? "receipt" : "sale", quantity }]);
const paid = (minutesAgo, warehouse, quantity) =>
  post("orders", [
    {
      event_time: new Date(Date.now() - minutesAgo * 60e3).toISOString(),
      order_id: `o-${seq}`,
      customer_id: "c1",
      warehouse_id: warehouse,
      sku: "SKU-1",
      quantity,
      unit_price: "10.00",
      status: "paid",
      channel: "web",
    },
  ]);

async function until(what, check, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    assert.ok(Date.now() < deadline, `never: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// Something on every tile before the page opens.
for (const [sku, w, q] of [["SKU-1", "W1", 50], ["SKU-2", "W1", 3], ["SKU-3", "W2", 4], ["SKU-4", "W2", 40], ["NOTE-1", "W1", 30]]) {
  await stock(sku, w, q);
}
await paid(3, "W1", 2);
await paid(2, "W2", 1);

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const problems = [];
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`page error: ${e}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  // The page runs under the server's strict Content-Security-Policy; anything it
  // blocks (an inline script or style, a foreign origin) is a violation reported here.
  await page.addInitScript(() => {
    document.addEventListener("securitypolicyviolation", (e) =>
      console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`),
    );
  });

  // A bad token is refused on the sign-in form. (The refused request's 401 is logged
  // by the browser as a failed resource load; it is expected, and dropped below.)
  const first = await page.goto(`${url}/`);
  const csp = first.headers()["content-security-policy"] ?? "";
  assert.ok(csp.includes("script-src 'self'") && csp.includes("frame-ancestors 'none'"), `CSP: ${csp}`);
  await page.fill("#token", "not-a-token");
  await page.click("#signin-form button");
  await until("refusal shown", async () => (await page.textContent("#signin-error")).includes("refused"));
  assert.equal(await page.isVisible("#app"), false);
  problems.length = 0;

  // Sign in.
  await page.fill("#token", token);
  await page.click("#signin-form button");
  await page.waitForSelector('#conn[data-state="live"]');

  // Opening the page with the session's token: live data within a second?
  const opened = Date.now();
  await page.goto(`${url}/?d=operations`);
  await page.waitForSelector('[data-tile="low-stock"][data-version] tbody tr');
  const firstData = Date.now() - opened;
  console.log(`first live data ${firstData} ms after opening the page`);
  fs.writeFileSync(path.join(artifacts, "first-data-ms.txt"), `${firstData}\n`);
  await page.waitForSelector('#conn[data-state="live"]');

  // A KPI tile moves with ingest.
  const lowCount = async () => Number(await page.getAttribute('[data-tile="low-count"] .value', "data-value"));
  await until("low-count tile filled", async () => (await lowCount()) === 2);
  await stock("SKU-5", "W1", 2);
  await until("low-count tile went up", async () => (await lowCount()) === 3);

  // A time-series chart gains a point.
  const points = async () => Number(await page.getAttribute('[data-tile="revenue-chart"]', "data-points"));
  await until("chart drawn", async () => (await points()) >= 2);
  const before = await points();
  await paid(0, "W1", 5);
  await until("chart gained a point", async () => (await points()) === before + 1);

  // Renders at most once per frame: count frames and tile renders while a burst of
  // events arrives.
  const measuring = page.evaluate(async () => {
    const tile = document.querySelector('[data-tile="stock"]');
    let frames = 0;
    const start = Number(tile.dataset.renders || 0);
    let on = true;
    const tick = () => { frames += 1; if (on) requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
    await new Promise((r) => setTimeout(r, 1500));
    on = false;
    return { frames, renders: Number(tile.dataset.renders || 0) - start };
  });
  for (let i = 0; i < 20; i++) await stock(`SKU-${i % 4}`, "W1", 1);
  const renderCheck = await measuring;
  console.log(`stock tile: ${renderCheck.renders} renders in ${renderCheck.frames} frames during 20 ingests`);
  assert.ok(renderCheck.renders > 0, "the stock tile never redrew");
  assert.ok(renderCheck.renders <= renderCheck.frames + 1, JSON.stringify(renderCheck));

  await page.screenshot({ path: path.join(artifacts, "dashboard-laptop.png"), fullPage: true });

  // A filter goes into the URL and survives a reload.
  await page.selectOption("#f-warehouse", "W2");
  await until("filter in the URL", async () => page.url().includes("warehouse=W2"));
  await page.reload();
  await page.waitForSelector('[data-tile="low-stock"][data-version]');
  await until("the filter shown after the reload", async () => (await page.inputValue("#f-warehouse")) === "W2");
  const warehouses = await until("filtered rows", async () => {
    const cells = await page.$$eval('[data-tile="low-stock"] tbody tr', (rows) => rows.map((r) => r.children[1].textContent));
    return cells.length ? cells : null;
  });
  assert.deepEqual([...new Set(warehouses)], ["W2"]);

  // Drill down from a row to its SKU.
  await page.click('[data-tile="low-stock"] tbody tr.drill');
  await page.waitForSelector("#detail:not([hidden])");
  assert.match(await page.textContent("#detail-title"), /SKU SKU-3/);
  await page.waitForSelector('[data-tile="detail-stock"] tbody tr');
  assert.ok(page.url().includes("detail=SKU-3"));

  // CSV export of a table tile.
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.click('[data-tile="low-stock"] .tools button'),
  ]);
  const csv = fs.readFileSync(await download.path(), "utf8");
  assert.equal(csv.split("\n")[0], "sku,warehouse_id,on_hand");
  assert.match(csv, /SKU-3,W2,4/);

  // A notification: stock of NOTE-1 drops below the rule's line.
  await page.selectOption("#f-warehouse", "");
  const unread = async () => Number(await page.textContent("#unread"));
  const unreadBefore = await unread();
  await stock("NOTE-1", "W1", -29);
  await until("bell counted it", async () => (await unread()) === unreadBefore + 1);
  await page.click("#bell");
  await page.waitForSelector('#notes .note[data-read="false"]');
  assert.match(await page.textContent("#notes .note"), /NOTE-1/);
  await page.click("#notes .note .mark-read");
  await until("marked read", async () => (await unread()) === unreadBefore);
  await page.waitForSelector('#notes .note[data-read="true"]');

  // The same page at a phone's width.
  await page.click("#drawer-close");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `the page is ${overflow} px wider than a phone's screen`);
  await page.screenshot({ path: path.join(artifacts, "dashboard-phone.png"), fullPage: true });

  assert.deepEqual(problems, [], "errors in the browser console");
  console.log("dashboard ok");
} finally {
  await browser.close();
}
