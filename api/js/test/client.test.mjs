// The push client under Node against a live server (started by the Rust integration
// test `the_javascript_client_under_node`, which sets QUIVER_URL and QUIVER_TOKEN).

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { after, test } from "node:test";
import WebSocket from "ws";

import { QuiverPush } from "../quiver-push.js";
import { inventoryIngest, token, untilEqual, url } from "../support.mjs";

const ingest = inventoryIngest({
  prefix: "js",
  skus: 4,
  warehouses: 2,
  eventTime: "2026-11-25T11:00:00Z",
});

/** Five W1 ingests from a separate process, while this one's event loop is held. */
const burstScript = `
import { inventoryIngest } from ${JSON.stringify(new URL("../support.mjs", import.meta.url).href)};
const ingest = inventoryIngest({ prefix: "burst", skus: 4, warehouses: 2, eventTime: "2026-11-25T11:00:00Z" });
for (let i = 0; i < 5; i++) await ingest(3, "W1");
`;

/** Waits until subscription `sub`'s copy equals `query`'s rows. */
const converges = (sub, query, what) => untilEqual(() => sub.rows(), query, what);

test("snapshot + deltas, filters, reconnect with resume, one callback per frame", async () => {
  await ingest(20);
  const statuses = [];
  const push = new QuiverPush(url, {
    token,
    WebSocket,
    minBackoffMs: 50,
    maxBackoffMs: 400,
    onStatus: (s) => statuses.push(s),
  });
  after(() => push.close());
  let calls = 0;
  const w1 = push.subscribe("stock_on_hand", {
    filter: { warehouse_id: "W1" },
    onChange: () => {
      calls += 1;
    },
  });
  const plenty = push.subscribe("stock_on_hand", { filter: { on_hand: { gte: 15 } } });
  const refused = [];
  const bad = push.subscribe("no_such_view", { onError: (e) => refused.push(e) });

  await converges(w1, "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'", "w1 after snapshot");
  await converges(plenty, "SELECT * FROM stock_on_hand WHERE on_hand >= 15", "plenty after snapshot");
  assert.equal(w1.stats.snapshots, 1);
  assert.deepEqual(w1.key, ["sku", "warehouse_id"]);
  assert.ok(w1.objects().every((o) => o.warehouse_id === "W1"));
  // The refusal comes in its own frame, which may trail the others.
  for (let i = 0; i < 200 && refused.length === 0; i++) {
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(refused[0]?.code, "unknown_view");
  assert.ok(bad.error);
  // The `ws` package offers permessage-deflate; the server takes it.
  assert.match(push._ws.extensions, /permessage-deflate/);

  for (let round = 0; round < 6; round++) {
    await ingest(15);
    await converges(w1, "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'", `w1 round ${round}`);
    await converges(plenty, "SELECT * FROM stock_on_hand WHERE on_hand >= 15", `plenty round ${round}`);
  }
  assert.ok(w1.stats.deltas >= 3, `w1 got ${w1.stats.deltas} deltas`);
  // Callbacks are coalesced per frame: never more than the changes applied.
  assert.ok(calls >= 1 && calls <= w1.stats.deltas + w1.stats.snapshots, `${calls} callbacks`);

  // A burst of changes that arrive together gives one callback, not one per delta, with
  // the client's own scheduler. The event loop is held while another process ingests
  // five batches and the deltas queue up in the socket; then they are read at once.
  await new Promise((r) => setTimeout(r, 100)); // callbacks already scheduled run first
  const before = calls;
  const deltasBefore = w1.stats.deltas;
  execFileSync(process.execPath, ["--input-type=module", "-e", burstScript], {
    env: process.env,
    stdio: "inherit",
  });
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 500);
  await converges(w1, "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'", "w1 burst");
  await new Promise((r) => setTimeout(r, 100));
  const burstDeltas = w1.stats.deltas - deltasBefore;
  assert.ok(burstDeltas >= 2, `burst gave ${burstDeltas} deltas`);
  assert.equal(calls - before, 1, `${calls - before} callbacks for ${burstDeltas} deltas`);

  // The network drops; events arrive meanwhile; the client reconnects and resumes.
  push._drop();
  await ingest(25);
  await converges(w1, "SELECT * FROM stock_on_hand WHERE warehouse_id = 'W1'", "w1 after resume");
  await converges(plenty, "SELECT * FROM stock_on_hand WHERE on_hand >= 15", "plenty after resume");
  assert.equal(push.status, "open");
  assert.ok(statuses.includes("reconnecting"), statuses.join(","));
  assert.equal(w1.stats.resumes, 1, "w1 resumed from its version");
  assert.equal(w1.stats.snapshots, 1, "no second snapshot: the missed deltas were kept");

  // Unsubscribe: no further changes reach the copy.
  w1.unsubscribe();
  const frozen = w1.version;
  await ingest(10, "W1");
  await converges(plenty, "SELECT * FROM stock_on_hand WHERE on_hand >= 15", "plenty after unsubscribe");
  assert.equal(w1.version, frozen);
  push.close();
});

test("a wrong token is refused and not retried", async () => {
  const statuses = [];
  const push = new QuiverPush(url, {
    token: "qv_wrong_token",
    WebSocket,
    minBackoffMs: 20,
    onStatus: (s) => statuses.push(s),
  });
  after(() => push.close());
  const errors = [];
  push.options.onError = (e) => errors.push(e);
  const deadline = Date.now() + 10_000;
  while (push.status !== "refused" && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(push.status, "refused");
  assert.equal(errors[0]?.code, "unauthorized");
  assert.ok(!statuses.includes("reconnecting"), statuses.join(","));
});
