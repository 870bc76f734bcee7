// What the push client's tests share (under Node and in the browser): SQL and ingest
// against the server the Rust integration test started (QUIVER_URL, QUIVER_TOKEN), and
// waiting until a local copy equals a query.

import assert from "node:assert/strict";

export const url = process.env.QUIVER_URL;
export const token = process.env.QUIVER_TOKEN;

/** Rows of `query` over HTTP, as JSON arrays. */
export async function sql(query) {
  const r = await fetch(`${url}/v1/sql?format=json`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ sql: query }),
  });
  const body = await r.json();
  assert.equal(r.status, 200, JSON.stringify(body));
  return body.rows;
}

/**
 * An ingest function for inventory movements: `ingest(n, warehouse)` posts `n` events
 * with ids `<prefix>-<seq>` over `skus` SKUs, in `warehouse` or spread over
 * `warehouses`.
 */
export function inventoryIngest({ prefix, skus, warehouses, eventTime }) {
  let seq = 0;
  return async (n, warehouse) => {
    const lines = [];
    for (let i = 0; i < n; i++) {
      seq += 1;
      const qty = (seq * 7) % 11 === 0 ? -((seq % 5) + 1) : (seq % 13) + 1;
      lines.push(
        JSON.stringify({
          event_id: `${prefix}-${seq}`,
          event_time: eventTime,
          sku: `SKU-${seq % skus}`,
          warehouse_id: warehouse ?? `W${(seq % warehouses) + 1}`,
          kind: qty > 0 ? "receipt" : "sale",
          quantity: qty,
        }),
      );
    }
    const r = await fetch(`${url}/v1/streams/inventory/events`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/x-ndjson" },
      body: lines.join("\n"),
    });
    assert.equal(r.status, 200, await r.text());
  };
}

/**
 * Waits up to 20 s until the views have applied every event acknowledged so far
 * (`lag_ms` is 0 only then). Without it a copy and a query can agree only because the
 * view has not yet applied the last ingest, on a busy machine.
 */
export async function viewsCaughtUp() {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const r = await fetch(`${url}/v1/views`, { headers: { authorization: `Bearer ${token}` } });
    const body = await r.json();
    assert.equal(r.status, 200, JSON.stringify(body));
    const views = Array.isArray(body) ? body : body.views;
    if (views.every((v) => v.lag_ms === 0)) return;
    assert.ok(Date.now() < deadline, "the views did not catch up with ingest in 20 s");
    await new Promise((r) => setTimeout(r, 20));
  }
}

const canon = (rows) => rows.map((r) => JSON.stringify(r)).sort();

/**
 * Waits up to 20 s until `rowsNow()` (a local copy) equals `query`'s rows, read once
 * the views have caught up with ingest.
 */
export async function untilEqual(rowsNow, query, what) {
  const deadline = Date.now() + 20_000;
  let want;
  let got;
  for (;;) {
    await viewsCaughtUp();
    want = canon(await sql(query));
    got = canon(await rowsNow());
    if (JSON.stringify(got) === JSON.stringify(want)) return;
    if (Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.deepEqual(got, want, what);
}
