//! `GET /v1/ws`: live view changes over WebSocket, in the push protocol of
//! docs/CONTRACTS.md.
//!
//! One task ([`Push::run`]) reads the engine's change sets. For each, it visits only the
//! groups of subscribers of that view: a group is one distinct (view, filter), and the
//! change set is filtered and encoded once per group ([`delta::Delta`]). Each subscriber
//! then gets a shared pointer to it in its connection's queue ([`conn::Conn`]); the
//! connection's writer splices in the subscription id and writes.
//!
//! The queue is bounded in bytes. A subscriber that falls past the bound has its pending
//! deltas dropped and is marked to catch up from its group's kept deltas when its
//! connection can write again; that backlog, if more than the bound, is folded per key
//! ([`delta::Coalesced`]), and if the group no longer keeps it, a fresh snapshot is sent
//! instead. Neither ingest nor the fan-out task ever waits for a client, and the
//! fan-out does no more for a slow one than for a fast one.

mod conn;
mod delta;
mod filter;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use quiver_engine::{ChangeSet, Engine};
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use crate::auth::{Principal, Scope};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::state::AppState;
use conn::Conn;
use delta::{Delta, SnapshotRows};
use filter::Filter;

/// Subscriptions to the `notifications` channel, by (connection id, subscription id).
type NotificationSubs = HashMap<(u64, Arc<str>), std::sync::Weak<Conn>>;

/// The channel alert notifications are pushed on (subscribe to it as to a view).
pub(crate) const NOTIFICATIONS: &str = "notifications";

/// Limits and timings of the push endpoint.
#[derive(Debug, Clone)]
pub(crate) struct PushConfig {
    /// Origins browsers may connect from; empty: the server's own; `*`: any.
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_token: usize,
    pub(crate) max_subscriptions_per_token: usize,
    pub(crate) max_message_bytes: usize,
    /// Bytes of pending deltas a connection may hold before it is caught up from its
    /// group's kept deltas instead (folded per key, or a snapshot).
    pub(crate) queue_bytes: usize,
    /// Bytes of pending deltas all connections together may hold.
    pub(crate) total_queue_bytes: usize,
    /// Bytes of encoded snapshots held at once (cached or being written).
    pub(crate) snapshot_bytes: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) auth_timeout: Duration,
    pub(crate) compression: bool,
    /// Worker threads of the push runtime.
    pub(crate) threads: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// The push endpoint's metrics (`quiver_ws_*`).
#[derive(Debug)]
pub(crate) struct PushMetrics {
    connections: Gauge,
    subscriptions: Gauge,
    deltas_sent: Counter,
    snapshots_sent: Counter,
    frames_sent: Counter,
    bytes_sent: Counter,
    queue_bytes: Gauge<i64, AtomicI64>,
    snapshot_bytes: Gauge<i64, AtomicI64>,
    snapshot_waits: Counter,
    coalesced: Counter,
    catch_ups: Counter,
    resnapshots: Counter,
    delivery_seconds: Histogram,
    errors: Family<CodeLabel, Counter>,
    closed: Family<CodeLabel, Counter>,
}

impl PushMetrics {
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let m = Self {
            connections: Gauge::default(),
            subscriptions: Gauge::default(),
            deltas_sent: Counter::default(),
            snapshots_sent: Counter::default(),
            frames_sent: Counter::default(),
            bytes_sent: Counter::default(),
            queue_bytes: Gauge::default(),
            snapshot_bytes: Gauge::default(),
            snapshot_waits: Counter::default(),
            coalesced: Counter::default(),
            catch_ups: Counter::default(),
            resnapshots: Counter::default(),
            delivery_seconds: quiver_engine::metrics::seconds_histogram(),
            errors: Family::default(),
            closed: Family::default(),
        };
        // Every reason starts at zero, so `increase()` sees a connection's first close.
        for code in conn::close_reasons() {
            let _ = m.closed.get_or_create(&CodeLabel { code: code.into() });
        }
        let r = registry.sub_registry_with_prefix("quiver_ws");
        r.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        r.register(
            "subscriptions",
            "Live subscriptions",
            m.subscriptions.clone(),
        );
        r.register("deltas_sent", "Delta frames written", m.deltas_sent.clone());
        r.register(
            "snapshots_sent",
            "Snapshot frames written",
            m.snapshots_sent.clone(),
        );
        r.register(
            "frames_sent",
            "Frames of any kind written",
            m.frames_sent.clone(),
        );
        r.register(
            "bytes_sent",
            "Frame bytes written (before compression)",
            m.bytes_sent.clone(),
        );
        r.register(
            "queue_bytes",
            "Bytes of deltas waiting in connection queues",
            m.queue_bytes.clone(),
        );
        r.register(
            "snapshot_bytes",
            "Bytes of encoded snapshots held, cached or being written",
            m.snapshot_bytes.clone(),
        );
        r.register(
            "snapshot_waits",
            "Times a new snapshot waited for older ones to be written (--ws-snapshot-bytes)",
            m.snapshot_waits.clone(),
        );
        r.register(
            "coalesced",
            "Frames of a slow subscriber's backlog sent folded per key (64 KiB at most each)",
            m.coalesced.clone(),
        );
        r.register(
            "catch_ups",
            "Times a subscriber fell past its queue bound and was replayed the group's recent deltas",
            m.catch_ups.clone(),
        );
        r.register(
            "resnapshots",
            "Times a subscriber fell past its queue bound and was sent a fresh snapshot",
            m.resnapshots.clone(),
        );
        r.register(
            "delivery_seconds",
            "Event acknowledgement to the delta frame written to the socket",
            m.delivery_seconds.clone(),
        );
        r.register("errors", "Error frames sent, by code", m.errors.clone());
        r.register("closed", "Connections closed, by reason", m.closed.clone());
        m
    }

    fn error(&self, code: &str) {
        self.errors
            .get_or_create(&CodeLabel { code: code.into() })
            .inc();
    }
}

/// Subscribers of one (view, filter): the change set is filtered and encoded once for all.
#[derive(Debug)]
pub(crate) struct Group {
    view: String,
    filter: Filter,
    key: Vec<String>,
    /// Key column positions in the view's rows.
    key_idx: Vec<usize>,
    /// The last snapshot encoded for this group, with the epoch it was taken in.
    snapshot: tokio::sync::Mutex<Option<(u64, Arc<Charged>)>>,
    /// The size of the last snapshot encoded, to guess the next one's.
    snapshot_bytes: AtomicUsize,
    /// Bumped when the view's versions start again (dropped and created anew), so a
    /// snapshot of the old view is never served with the new view's deltas.
    epoch: AtomicU64,
    /// The last change set's version.
    last_version: AtomicU64,
    /// The deltas of the last change sets, shared with subscribers catching up:
    /// `(version, delta)`, `None` where the change did not concern this filter.
    recent: Mutex<VecDeque<(u64, Option<Arc<Delta>>)>>,
}

/// Change sets a group keeps encoded for subscribers that fell behind.
const RECENT_DELTAS: usize = 256;

impl Group {
    fn remember(&self, version: u64, delta: Option<Arc<Delta>>) {
        let mut recent = self.recent.lock();
        recent.push_back((version, delta));
        while recent.len() > RECENT_DELTAS {
            recent.pop_front();
        }
    }

    /// The kept deltas after `version`, if they reach back that far.
    fn recent_since(&self, version: u64) -> Option<Vec<Arc<Delta>>> {
        let recent = self.recent.lock();
        if recent.is_empty() {
            // Nothing kept (a new group, or the ring was cleared): only a subscriber
            // already at the last version is caught up.
            let last = self.last_version.load(Ordering::Acquire);
            return (version >= last).then(Vec::new);
        }
        let first = recent.front().map_or(u64::MAX, |(v, _)| *v);
        let newest = recent.back().map_or(0, |(v, _)| *v);
        if version >= newest {
            return Some(Vec::new());
        }
        // Versions of a view's change sets are consecutive.
        if first > version + 1 {
            return None;
        }
        Some(
            recent
                .iter()
                .filter(|(v, _)| *v > version)
                .filter_map(|(_, d)| d.clone())
                .collect(),
        )
    }

    /// The view's rows through this group's filter, encoded, and the kept deltas that
    /// follow them. A snapshot is encoded once and served again, with the deltas since
    /// it, for as long as the group keeps those deltas: a large view that changes every
    /// few milliseconds is not decoded and encoded again for every subscriber that
    /// needs a snapshot (the resnapshot storm of slow subscribers). A new one waits for
    /// room in the snapshot budget.
    async fn snapshot(
        &self,
        engine: &Engine,
        push: &Push,
    ) -> Result<(Arc<Charged>, Vec<Arc<Delta>>), (&'static str, String)> {
        let mut cached = self.snapshot.lock().await;
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some((taken_in, c)) = cached.as_ref()
            && *taken_in == epoch
            && c.version <= self.last_version.load(Ordering::Acquire)
            && let Some(after) = self.recent_since(c.version)
            && engine.views().view_version(&self.view).is_some()
        {
            return Ok((Arc::clone(c), after));
        }
        // The old one is of no more use here; it goes before the new one is made.
        *cached = None;
        let reserved = push
            .room_for_a_snapshot(self.snapshot_bytes.load(Ordering::Relaxed))
            .await;
        // Reading and encoding a large view takes seconds: off the push threads, so
        // the fan-out and every other connection go on meanwhile.
        let rows = off_the_push_threads(|| self.encode_snapshot(engine))?;
        self.snapshot_bytes.store(rows.bytes(), Ordering::Relaxed);
        let rows = Arc::new(push.snapshots.charge(rows));
        drop(reserved);
        *cached = Some((epoch, Arc::clone(&rows)));
        Ok((rows, Vec::new()))
    }

    fn encode_snapshot(&self, engine: &Engine) -> Result<SnapshotRows, (&'static str, String)> {
        let snap = match engine.views().view_snapshot(&self.view) {
            None => {
                return Err((
                    "unknown_view",
                    format!("the view '{}' no longer exists", self.view),
                ));
            }
            Some(Err(e)) => return Err(("internal", format!("reading the view failed: {e}"))),
            Some(Ok(s)) => s,
        };
        SnapshotRows::encode(snap.version, &snap.key, &snap.rows, &self.filter)
            .map_err(|e| ("internal", format!("encoding the view failed: {e}")))
    }
}

/// Runs `f`, which blocks for a while, where the push runtime's other tasks do not
/// wait for it (its worker hands them to another thread meanwhile).
fn off_the_push_threads<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The bytes of encoded snapshots alive: cached by a group or being written (shown as
/// `quiver_ws_snapshot_bytes`).
#[derive(Debug)]
struct SnapshotBudget {
    used: AtomicUsize,
    freed: tokio::sync::Notify,
    gauge: Gauge<i64, AtomicI64>,
}

impl SnapshotBudget {
    /// Holds `bytes` if they fit beside those held within `limit`, or if none are held.
    fn reserve(self: &Arc<Self>, bytes: usize, limit: usize) -> Option<Reserved> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used.saturating_add(bytes) <= limit).then(|| used + bytes)
            })
            .ok()?;
        self.gauge.inc_by(bytes as i64);
        Some(Reserved {
            bytes,
            budget: Arc::clone(self),
        })
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.gauge.dec_by(bytes as i64);
        self.freed.notify_waiters();
    }

    fn charge(self: &Arc<Self>, rows: SnapshotRows) -> Charged {
        let bytes = rows.bytes();
        self.used.fetch_add(bytes, Ordering::AcqRel);
        self.gauge.inc_by(bytes as i64);
        Charged {
            rows,
            bytes,
            budget: Arc::clone(self),
        }
    }
}

/// An encoded snapshot, counted in the snapshot budget until the last holder lets go.
#[derive(Debug)]
pub(crate) struct Charged {
    rows: SnapshotRows,
    bytes: usize,
    budget: Arc<SnapshotBudget>,
}

impl std::ops::Deref for Charged {
    type Target = SnapshotRows;

    fn deref(&self) -> &SnapshotRows {
        &self.rows
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Room held in the snapshot budget for a snapshot being made, at the size guessed
/// for it, until the snapshot itself is charged; so snapshots made at once on
/// several threads stay within the budget together.
#[derive(Debug)]
struct Reserved {
    bytes: usize,
    budget: Arc<SnapshotBudget>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[derive(Debug, Default)]
struct Members {
    group: Option<Arc<Group>>,
    /// `(connection, subscription id)` → connection.
    subs: HashMap<(u64, Arc<str>), Arc<Conn>>,
}

#[derive(Debug, Default)]
struct TokenUse {
    connections: usize,
    subscriptions: usize,
}

#[derive(Debug, Default)]
struct Hub {
    /// View → filter text → members.
    views: HashMap<String, HashMap<String, Members>>,
    tokens: HashMap<String, TokenUse>,
    connections: usize,
}

/// The push endpoint's shared state.
#[derive(Debug)]
pub(crate) struct Push {
    pub(crate) config: PushConfig,
    pub(crate) metrics: PushMetrics,
    hub: Mutex<Hub>,
    /// Subscriptions to the `notifications` channel: (connection, id) → connection.
    notified: Mutex<NotificationSubs>,
    snapshots: Arc<SnapshotBudget>,
    next_conn: AtomicU64,
    /// Turns true when the server shuts down: every connection says goodbye.
    stop: tokio::sync::watch::Sender<bool>,
    /// Connections and the fan-out run on their own threads, so however busy push is,
    /// ingest and queries keep theirs.
    runtime: tokio::runtime::Handle,
}

/// Why a subscription was refused: an error code and what to tell the client.
type Refusal = (&'static str, String);

impl Push {
    pub(crate) fn new(config: PushConfig, registry: &mut Registry) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            .thread_name("quiver-push")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        // The runtime lives as long as the process; this thread only keeps it.
        std::thread::Builder::new()
            .name("quiver-push-rt".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        let metrics = PushMetrics::new(registry);
        Ok(Self {
            runtime: handle,
            config,
            snapshots: Arc::new(SnapshotBudget {
                used: AtomicUsize::new(0),
                freed: tokio::sync::Notify::new(),
                gauge: metrics.snapshot_bytes.clone(),
            }),
            metrics,
            hub: Mutex::new(Hub::default()),
            notified: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            stop: tokio::sync::watch::channel(false).0,
        })
    }

    /// Starts feeding change sets to subscribers.
    pub(crate) fn start(self: &Arc<Self>, engine: Engine) {
        self.runtime
            .spawn(Arc::clone(self).run_notifications(engine.clone()));
        self.runtime.spawn(Arc::clone(self).run(engine));
    }

    /// Sends each alert notification (new, or marked read) to the subscribers of the
    /// `notifications` channel, as a control frame: they are few and small, and a
    /// client too slow for them is closed like one that does not read its errors.
    async fn run_notifications(self: Arc<Self>, engine: Engine) {
        let mut rx = engine.alerts().subscribe();
        loop {
            let n = match rx.recv().await {
                Ok(n) => n,
                Err(RecvError::Lagged(missed)) => {
                    warn!(
                        missed,
                        "notification subscribers missed notifications; they can read GET /v1/notifications"
                    );
                    continue;
                }
                Err(RecvError::Closed) => break,
            };
            let unread = engine.alerts().unread();
            let body = crate::alerts::notification_json(&n);
            let mut subs = self.notified.lock();
            subs.retain(|(_, id), conn| {
                let Some(conn) = conn.upgrade() else {
                    return false;
                };
                let frame = serde_json::json!({
                    "type": "notification",
                    "id": &**id,
                    "unread": unread,
                    "notification": body,
                });
                conn.control(frame.to_string().into_bytes());
                true
            });
        }
    }

    /// Subscribes `conn` to the `notifications` channel: the reply carries the unread
    /// count and the newest notifications.
    fn join_notifications(
        &self,
        conn: &Arc<Conn>,
        id: &Arc<str>,
        engine: &Engine,
    ) -> Result<(), Refusal> {
        let key = (conn.id, Arc::clone(id));
        let mut subs = self.notified.lock();
        if conn.has(id) || subs.contains_key(&key) {
            return Err((
                "duplicate_id",
                format!("this connection already has a subscription '{id}'"),
            ));
        }
        subs.insert(key, Arc::downgrade(conn));
        let recent: Vec<serde_json::Value> = engine
            .alerts()
            .notifications(false, 50)
            .iter()
            .map(crate::alerts::notification_json)
            .collect();
        conn.control(
            serde_json::json!({
                "type": "subscribed",
                "id": &**id,
                "channel": NOTIFICATIONS,
                "unread": engine.alerts().unread(),
                "recent": recent,
            })
            .to_string()
            .into_bytes(),
        );
        Ok(())
    }

    /// Who is connected now: per token id, connections and subscriptions.
    pub(crate) fn presence(&self) -> Vec<(String, usize, usize)> {
        let mut out: Vec<(String, usize, usize)> = self
            .hub
            .lock()
            .tokens
            .iter()
            .filter(|(_, u)| u.connections > 0)
            .map(|(t, u)| (t.clone(), u.connections, u.subscriptions))
            .collect();
        out.sort();
        out
    }

    /// Ends a `notifications` subscription; false when `id` is not one.
    fn leave_notifications(&self, conn: &Conn, id: &str) -> bool {
        self.notified
            .lock()
            .remove(&(conn.id, Arc::from(id)))
            .is_some()
    }

    /// Returns once a snapshot of about `expect` bytes fits beside those held within
    /// `snapshot_bytes`, or none is held (so a snapshot larger than the budget still
    /// goes, alone); a small view's snapshot does not wait for a large one's writes.
    /// Cached snapshots no subscriber is writing are let go first; then it waits for
    /// writes to end (a client too slow to take its frames is dropped after
    /// `write_timeout`). The room is held until the snapshot is charged; a snapshot
    /// larger than its guess may go past the budget by the difference.
    async fn room_for_a_snapshot(&self, expect: usize) -> Reserved {
        let limit = self.config.snapshot_bytes;
        let budget = &self.snapshots;
        let fits = || budget.reserve(expect, limit);
        if let Some(r) = fits() {
            return r;
        }
        self.evict_snapshots();
        let mut counted = false;
        loop {
            let freed = budget.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(r) = fits() {
                return r;
            }
            if !counted {
                self.metrics.snapshot_waits.inc();
                counted = true;
            }
            // (A timeout too, so a wake-up missed for any reason costs a second.)
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }

    /// Drops every group's cached snapshot (those being written stay until written).
    fn evict_snapshots(&self) {
        let groups: Vec<Arc<Group>> = self
            .hub
            .lock()
            .views
            .values()
            .flat_map(HashMap::values)
            .filter_map(|m| m.group.clone())
            .collect();
        for group in groups {
            // A group whose lock is held is making a new snapshot: it dropped its own.
            if let Ok(mut cached) = group.snapshot.try_lock() {
                *cached = None;
            }
        }
    }

    /// Closes every connection with a goodbye.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Feeds every change set to its subscribers until the engine stops; once a second,
    /// ends the subscriptions of views that were dropped.
    async fn run(self: Arc<Self>, engine: Engine) {
        let mut rx = engine.views().subscribe_changes();
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                got = rx.recv() => match got {
                    Ok(change) => self.fan_out(&engine, &change),
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed = n, "push fell behind the change stream; catching up from the views' kept changes");
                        self.catch_up(&engine);
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = sweep.tick() => self.end_dropped(&engine),
            }
        }
    }

    /// Ends every subscription to a view that no longer exists, with a `view_dropped`
    /// error frame.
    fn end_dropped(&self, engine: &Engine) {
        let mut hub = self.hub.lock();
        let gone: Vec<String> = hub
            .views
            .keys()
            .filter(|v| engine.views().view_version(v).is_none())
            .cloned()
            .collect();
        for view in gone {
            let Some(groups) = hub.views.remove(&view) else {
                continue;
            };
            for ((_, id), conn) in groups.into_values().flat_map(|m| m.subs) {
                if conn.remove(&id).is_some() {
                    self.metrics.subscriptions.dec();
                    self.metrics.error("view_dropped");
                    conn.control(conn::error_frame(
                        Some(&id),
                        "view_dropped",
                        &format!("the view '{view}' was dropped"),
                    ));
                }
                if let Some(used) = hub.tokens.get_mut(&conn.token) {
                    used.subscriptions = used.subscriptions.saturating_sub(1);
                }
            }
        }
    }

    fn fan_out(&self, engine: &Engine, change: &ChangeSet) {
        let hub = self.hub.lock();
        let Some(groups) = hub.views.get(&change.view) else {
            return;
        };
        for members in groups.values() {
            if let Some(group) = &members.group {
                self.deliver(engine, group, members, change);
            }
        }
    }

    /// One change set to one group: filtered and encoded once, queued for each member.
    fn deliver(&self, engine: &Engine, group: &Group, members: &Members, change: &ChangeSet) {
        let last = group.last_version.load(Ordering::Relaxed);
        if change.version <= last {
            // Either a change already delivered while catching up after a lag, or the
            // view was dropped and created anew, so its versions started again.
            let current = engine.views().view_version(&group.view).unwrap_or(0);
            if current < last {
                group.epoch.fetch_add(1, Ordering::AcqRel);
                group.recent.lock().clear();
                group.last_version.store(change.version, Ordering::Relaxed);
                for ((_, sub), conn) in &members.subs {
                    conn.restart(sub, self);
                }
            }
            return;
        }
        group.last_version.store(change.version, Ordering::Relaxed);
        match Delta::build(change, &group.filter, &group.key_idx) {
            Ok(Some(delta)) => {
                let delta = Arc::new(delta);
                group.remember(change.version, Some(Arc::clone(&delta)));
                for ((_, sub), conn) in &members.subs {
                    conn.push(sub, &delta, self);
                }
            }
            Ok(None) => group.remember(change.version, None),
            Err(e) => {
                warn!(view = %change.view, error = %e, "encoding a change for subscribers failed");
                // The kept deltas now have a gap: nobody may catch up across it, the
                // cached snapshot may not be served with them, and every member needs a
                // fresh snapshot to stay whole.
                group.epoch.fetch_add(1, Ordering::AcqRel);
                group.recent.lock().clear();
                for ((_, sub), conn) in &members.subs {
                    conn.resnapshot(sub, self);
                }
            }
        }
    }

    /// After falling behind the change stream: each group catches up from its view's
    /// kept change sets; only groups whose gap is no longer kept get fresh snapshots.
    fn catch_up(&self, engine: &Engine) {
        let hub = self.hub.lock();
        let mut resnapshots = 0;
        for (view, groups) in &hub.views {
            for members in groups.values() {
                let Some(group) = &members.group else {
                    continue;
                };
                let since = group.last_version.load(Ordering::Relaxed);
                match engine.views().view_changes_since(view, since) {
                    Some(changes) => {
                        for change in changes {
                            self.deliver(engine, group, members, &change);
                        }
                    }
                    None => {
                        for ((_, sub), conn) in &members.subs {
                            conn.resnapshot(sub, self);
                            resnapshots += 1;
                        }
                    }
                }
            }
        }
        if resnapshots > 0 {
            warn!(
                resnapshots,
                "push fell behind further than the views keep changes; some subscribers get fresh snapshots"
            );
        }
    }

    /// Counts a new connection for `token`, within the limits.
    fn open(&self, token: &str) -> Result<u64, Refusal> {
        let mut hub = self.hub.lock();
        if hub.connections >= self.config.max_connections {
            return Err((
                "too_many_connections",
                format!(
                    "the server holds its maximum of {} connections",
                    self.config.max_connections
                ),
            ));
        }
        let used = hub.tokens.entry(token.to_owned()).or_default();
        if used.connections >= self.config.max_connections_per_token {
            return Err((
                "too_many_connections",
                format!(
                    "this token already has its maximum of {} connections",
                    self.config.max_connections_per_token
                ),
            ));
        }
        used.connections += 1;
        hub.connections += 1;
        self.metrics.connections.inc();
        Ok(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }

    /// Forgets a closed connection and its subscriptions.
    fn close(&self, conn: &Conn) {
        self.notified.lock().retain(|(c, _), _| *c != conn.id);
        let subs = conn.take_all();
        let mut hub = self.hub.lock();
        for (id, view, filter) in subs {
            Self::leave(&mut hub, &self.metrics, conn, &id, &view, &filter);
        }
        if let Some(used) = hub.tokens.get_mut(&conn.token) {
            used.connections = used.connections.saturating_sub(1);
            if used.connections == 0 && used.subscriptions == 0 {
                hub.tokens.remove(&conn.token);
            }
        }
        hub.connections = hub.connections.saturating_sub(1);
        self.metrics.connections.dec();
    }

    /// Adds subscription `id` of `conn` to the group of (`view`, `filter`).
    fn join(
        &self,
        conn: &Arc<Conn>,
        id: &Arc<str>,
        engine: &Engine,
        view: &str,
        filter: Option<&serde_json::Value>,
        from_version: Option<u64>,
    ) -> Result<(), Refusal> {
        if conn.has(id) {
            return Err((
                "duplicate_id",
                format!("this connection already has a subscription '{id}'"),
            ));
        }
        let info = engine.views().view_info(view).ok_or_else(|| {
            let known: Vec<String> = engine
                .views()
                .views_info()
                .into_iter()
                .map(|v| v.name)
                .collect();
            (
                "unknown_view",
                format!("no view named '{view}' (views: {})", known.join(", ")),
            )
        })?;
        let filter = Filter::parse(filter, &info.schema, &info.key)
            .map_err(|e| ("bad_filter", e.to_string()))?;
        let mut hub = self.hub.lock();
        let used = hub.tokens.entry(conn.token.clone()).or_default();
        if used.subscriptions >= self.config.max_subscriptions_per_token {
            return Err((
                "too_many_subscriptions",
                format!(
                    "this token already has its maximum of {} subscriptions",
                    self.config.max_subscriptions_per_token
                ),
            ));
        }
        let canonical = filter.canonical().to_owned();
        let members = hub
            .views
            .entry(view.to_owned())
            .or_default()
            .entry(canonical.clone())
            .or_default();
        let group = match &members.group {
            Some(g) if g.key == info.key => Arc::clone(g),
            _ => {
                let key_idx = info
                    .key
                    .iter()
                    .map(|k| info.schema.index_of(k))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ("internal", e.to_string()))?;
                let g = Arc::new(Group {
                    view: view.to_owned(),
                    filter,
                    key: info.key.clone(),
                    key_idx,
                    snapshot: tokio::sync::Mutex::new(None),
                    snapshot_bytes: AtomicUsize::new(0),
                    epoch: AtomicU64::new(0),
                    last_version: AtomicU64::new(info.version),
                    recent: Mutex::new(VecDeque::new()),
                });
                members.group = Some(Arc::clone(&g));
                g
            }
        };
        if !conn.add(id, group, from_version) {
            return Err((
                "duplicate_id",
                format!("this connection already has a subscription '{id}'"),
            ));
        }
        members
            .subs
            .insert((conn.id, Arc::clone(id)), Arc::clone(conn));
        hub.tokens
            .entry(conn.token.clone())
            .or_default()
            .subscriptions += 1;
        self.metrics.subscriptions.inc();
        Ok(())
    }

    /// Removes subscription `id` of `conn`.
    fn unsubscribe(&self, conn: &Conn, id: &str) -> bool {
        let Some((view, filter)) = conn.remove(id) else {
            return false;
        };
        let mut hub = self.hub.lock();
        Self::leave(&mut hub, &self.metrics, conn, id, &view, &filter);
        true
    }

    fn leave(
        hub: &mut Hub,
        metrics: &PushMetrics,
        conn: &Conn,
        id: &str,
        view: &str,
        filter: &str,
    ) {
        let key = (conn.id, Arc::<str>::from(id));
        if let Some(groups) = hub.views.get_mut(view) {
            if let Some(members) = groups.get_mut(filter) {
                if members.subs.remove(&key).is_some() {
                    metrics.subscriptions.dec();
                }
                if members.subs.is_empty() {
                    groups.remove(filter);
                }
            }
            if groups.is_empty() {
                hub.views.remove(view);
            }
        }
        if let Some(used) = hub.tokens.get_mut(&conn.token) {
            used.subscriptions = used.subscriptions.saturating_sub(1);
        }
    }
}

/// `GET /v1/ws`: checks Origin and (when sent) the bearer token, then upgrades.
pub(crate) async fn ws(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    upgrade: yawc::IncomingUpgrade,
) -> ApiResult<Response> {
    let push = Arc::clone(&state.push);
    check_origin(&push.config, &headers)?;
    let principal: Option<Principal> = if headers.contains_key(header::AUTHORIZATION) {
        let p = state.tokens.authenticate(&headers)?;
        p.require(Scope::Read)?;
        Some(p)
    } else {
        None
    };
    let engine =
        state.engine.get().cloned().ok_or_else(|| {
            ApiError::unavailable("the server is still recovering; retry shortly", 1)
        })?;
    // With the token in the header, limits refuse the upgrade itself.
    let opened = match &principal {
        Some(p) => Some(push.open(&p.token_id).map_err(|(code, msg)| {
            push.metrics.error(code);
            ApiError::new(ErrorKind::RateLimited, code, msg)
        })?),
        None => None,
    };
    let mut options = yawc::Options::default().with_max_payload_read(push.config.max_message_bytes);
    if push.config.compression {
        options = options
            .with_low_latency_compression()
            .server_no_context_takeover()
            .client_no_context_takeover()
            .with_compression_threshold(512)
            .with_deflate_pool(deflate_pool().clone());
    } else {
        options = options.without_compression();
    }
    let (response, upgraded) = match upgrade.upgrade(options) {
        Ok(u) => u,
        Err(e) => {
            if let (Some(p), Some(id)) = (&principal, opened) {
                push.close(&Conn::new(id, &p.token_id));
            }
            return Err(ApiError::bad_request(
                "bad_upgrade",
                format!("WebSocket upgrade failed: {e}"),
            ));
        }
    };
    let tokens = Arc::clone(&state.tokens);
    push.runtime.clone().spawn(async move {
        match upgraded.await {
            Ok(socket) => {
                conn::serve(socket, push, engine, tokens, principal.zip(opened)).await;
            }
            Err(e) => {
                debug!(error = %e, "WebSocket upgrade did not complete");
                if let (Some(p), Some(id)) = (&principal, opened) {
                    push.close(&Conn::new(id, &p.token_id));
                }
            }
        }
    });
    Ok(response.map(axum::body::Body::new).into_response())
}

fn deflate_pool() -> &'static yawc::DeflatePool {
    static POOL: std::sync::OnceLock<yawc::DeflatePool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| yawc::DeflatePool::new(64))
}

/// Browsers always send `Origin`; others need not. A browser page from another origin
/// is refused unless the allow-list names it.
fn check_origin(config: &PushConfig, headers: &HeaderMap) -> ApiResult<()> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if config
        .allowed_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    if config.allowed_origins.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or("");
        if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
            return Ok(());
        }
    }
    Err(ApiError::new(
        ErrorKind::Forbidden,
        "forbidden_origin",
        format!(
            "Origin '{origin}' may not open a WebSocket here (allowed: {})",
            if config.allowed_origins.is_empty() {
                "this server's own origin".to_owned()
            } else {
                config.allowed_origins.join(", ")
            }
        ),
    ))
}

/// `GET /v1/ws/client.js`: the JavaScript push client, for pages to import.
pub(crate) async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../js/quiver-push.js"),
    )
        .into_response()
}
