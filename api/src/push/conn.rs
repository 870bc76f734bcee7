//! One WebSocket connection: its bounded queue of pending frames, and the task that
//! reads the client's requests and writes what is queued.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt as _, SinkExt as _};
use parking_lot::Mutex;
use quiver_engine::Engine;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::debug;
use yawc::close::CloseCode;
use yawc::{Frame, HttpStream, OpCode, WebSocket};

use super::delta::{Coalesced, Delta};
use super::{Group, Push};
use crate::auth::{Principal, Scope, Tokens};

/// Frames a subscription may queue before it is caught up from its group's kept
/// deltas instead, whatever their size.
const MAX_QUEUED_FRAMES: usize = 256;
/// Control frames (errors, pongs) a client may leave unread before it is disconnected.
const MAX_CONTROL_FRAMES: usize = 1024;
/// Bytes written between flushes.
const WRITE_BATCH_BYTES: usize = 256 << 10;
/// The longest subscription id.
const MAX_ID_CHARS: usize = 128;

#[derive(Debug)]
enum Need {
    Snapshot,
    /// Fell behind after `version` was sent: replay the group's recent deltas from
    /// there, or a snapshot if they no longer reach back.
    CatchUp(u64),
    Resume(u64),
}

#[derive(Debug)]
struct Sub {
    /// The id, JSON-quoted, as frames carry it.
    id_json: String,
    group: Arc<Group>,
    need: Option<Need>,
    /// A snapshot or resume for it is being written.
    in_flight: bool,
    pending: VecDeque<Arc<Delta>>,
    /// Bytes held in `pending`.
    bytes: usize,
    /// The last version sent.
    sent: u64,
    /// In the ready list.
    queued: bool,
}

#[derive(Debug, Default)]
struct Queue {
    control: VecDeque<Vec<u8>>,
    subs: HashMap<Arc<str>, Sub>,
    /// Subscriptions with something to write, in turn.
    ready: VecDeque<Arc<str>>,
    /// Bytes held by every subscription's pending deltas.
    bytes: usize,
}

/// What the writer does next.
enum Work {
    Control(Vec<u8>),
    Snapshot(Arc<str>, String, Arc<Group>),
    Resume(Arc<str>, String, Arc<Group>, u64),
    CatchUp(Arc<str>, String, Arc<Group>, u64),
    Frames(String, Vec<Arc<Delta>>),
}

/// A connection as the hub sees it.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) token: String,
    queue: Mutex<Queue>,
    notify: Notify,
    /// Too many unread control frames: the writer closes the connection.
    overrun: AtomicBool,
}

impl Conn {
    pub(crate) fn new(id: u64, token: &str) -> Self {
        Self {
            id,
            token: token.to_owned(),
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            overrun: AtomicBool::new(false),
        }
    }

    /// Queues `delta` for subscription `sub`; never waits. Past the queue's bound the
    /// subscription's pending deltas are dropped and it is marked to catch up from its
    /// group's kept deltas when the client is ready (folded per key there if they are
    /// many). Nothing here costs more for a slow client than for a fast one: the
    /// fan-out does this for every subscriber of every change.
    pub(crate) fn push(&self, sub: &Arc<str>, delta: &Arc<Delta>, push: &Push) {
        let limit = push.config.queue_bytes;
        // Past the budget all connections share, a subscription that already has
        // something pending gets a snapshot later instead of more pending deltas.
        let squeeze = push.metrics.queue_bytes.get() > push.config.total_queue_bytes as i64;
        let mut q = self.queue.lock();
        let total = q.bytes;
        let Some(s) = q.subs.get_mut(sub) else { return };
        if delta.version <= s.sent || (s.need.is_some() && !s.in_flight) {
            // Already sent, or a snapshot not yet taken will hold it.
            return;
        }
        let before = s.bytes;
        let size = delta.size();
        // One delta is always queued into an empty queue, however large.
        if total == 0 || (!squeeze && total + size <= limit && s.pending.len() < MAX_QUEUED_FRAMES)
        {
            s.pending.push_back(Arc::clone(delta));
            s.bytes += size;
        } else {
            // What it drops is in the group's kept deltas, shared by every subscriber.
            s.pending.clear();
            s.bytes = 0;
            s.need = Some(Need::CatchUp(s.sent));
            push.metrics.catch_ups.inc();
        }
        let after = s.bytes;
        let wake = !std::mem::replace(&mut s.queued, true);
        q.bytes = total - before + after;
        if wake {
            q.ready.push_back(Arc::clone(sub));
        }
        drop(q);
        push.metrics
            .queue_bytes
            .inc_by(after as i64 - before as i64);
        self.notify.notify_one();
    }

    /// Marks `sub` for a fresh snapshot, dropping what it has pending.
    pub(crate) fn resnapshot(&self, sub: &Arc<str>, push: &Push) {
        self.renew(sub, push, false);
    }

    /// As [`Conn::resnapshot`], for a view whose versions started again.
    pub(crate) fn restart(&self, sub: &Arc<str>, push: &Push) {
        self.renew(sub, push, true);
    }

    fn renew(&self, sub: &Arc<str>, push: &Push, versions_restart: bool) {
        let mut q = self.queue.lock();
        let Some(s) = q.subs.get_mut(sub) else {
            return;
        };
        if versions_restart {
            s.sent = 0;
        }
        let freed = std::mem::take(&mut s.bytes);
        s.pending.clear();
        s.need = Some(Need::Snapshot);
        let wake = !std::mem::replace(&mut s.queued, true);
        q.bytes -= freed;
        if wake {
            q.ready.push_back(Arc::clone(sub));
        }
        drop(q);
        push.metrics.resnapshots.inc();
        push.metrics.queue_bytes.dec_by(freed as i64);
        self.notify.notify_one();
    }

    /// Adds a subscription that starts with a snapshot, or resumes after `from_version`;
    /// false if this connection already has one named `id`.
    #[must_use]
    pub(crate) fn add(&self, id: &Arc<str>, group: Arc<Group>, from_version: Option<u64>) -> bool {
        let mut q = self.queue.lock();
        if q.subs.contains_key(id) {
            return false;
        }
        q.subs.insert(
            Arc::clone(id),
            Sub {
                id_json: Value::from(id.as_ref()).to_string(),
                group,
                need: Some(from_version.map_or(Need::Snapshot, Need::Resume)),
                in_flight: false,
                pending: VecDeque::new(),
                bytes: 0,
                sent: 0,
                queued: true,
            },
        );
        q.ready.push_back(Arc::clone(id));
        drop(q);
        self.notify.notify_one();
        true
    }

    pub(crate) fn has(&self, id: &str) -> bool {
        self.queue.lock().subs.contains_key(id)
    }

    /// Removes a subscription; returns its view and filter text.
    pub(crate) fn remove(&self, id: &str) -> Option<(String, String)> {
        let mut q = self.queue.lock();
        let s = q.subs.remove(id)?;
        q.bytes -= s.bytes;
        Some((s.group.view.clone(), s.group.filter.canonical().to_owned()))
    }

    /// Removes every subscription: `(id, view, filter text)`.
    pub(crate) fn take_all(&self) -> Vec<(String, String, String)> {
        let mut q = self.queue.lock();
        q.bytes = 0;
        q.ready.clear();
        q.subs
            .drain()
            .map(|(id, s)| {
                (
                    id.to_string(),
                    s.group.view.clone(),
                    s.group.filter.canonical().to_owned(),
                )
            })
            .collect()
    }

    pub(crate) fn control(&self, frame: Vec<u8>) {
        let mut q = self.queue.lock();
        if q.control.len() >= MAX_CONTROL_FRAMES {
            self.overrun.store(true, Ordering::Relaxed);
        } else {
            q.control.push_back(frame);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Takes the next frames to write, in turn across subscriptions.
    fn next_batch(&self, push: &Push) -> Vec<Work> {
        let mut out = Vec::new();
        let mut q = self.queue.lock();
        let mut bytes = 0;
        while let Some(c) = q.control.pop_front() {
            bytes += c.len();
            out.push(Work::Control(c));
        }
        let mut freed = 0;
        while bytes < WRITE_BATCH_BYTES {
            let Some(id) = q.ready.pop_front() else { break };
            let Some(s) = q.subs.get_mut(&id) else {
                continue;
            };
            s.queued = false;
            if s.in_flight {
                continue;
            }
            if let Some(need) = s.need.take() {
                s.in_flight = true;
                let group = Arc::clone(&s.group);
                out.push(match need {
                    Need::Snapshot => Work::Snapshot(id, s.id_json.clone(), group),
                    Need::Resume(v) => Work::Resume(id, s.id_json.clone(), group, v),
                    // The bound may have passed while a snapshot was being written,
                    // with `sent` still before it: replay only after what that sent.
                    Need::CatchUp(v) => Work::CatchUp(id, s.id_json.clone(), group, v.max(s.sent)),
                });
                continue;
            }
            freed += std::mem::take(&mut s.bytes);
            let sent = s.sent;
            let deltas: Vec<Arc<Delta>> =
                s.pending.drain(..).filter(|d| d.version > sent).collect();
            if let Some(last) = deltas.last() {
                s.sent = last.version;
                bytes += deltas.iter().map(|d| d.size()).sum::<usize>();
                out.push(Work::Frames(s.id_json.clone(), deltas));
            }
        }
        q.bytes -= freed;
        drop(q);
        push.metrics.queue_bytes.dec_by(freed as i64);
        out
    }

    /// A snapshot or resume of `id` up to `version` is written: drop what it covers.
    fn caught_up(&self, id: &str, version: u64, push: &Push) {
        let mut q = self.queue.lock();
        let Some(s) = q.subs.get_mut(id) else { return };
        s.in_flight = false;
        s.sent = s.sent.max(version);
        let before = s.bytes;
        while s.pending.front().is_some_and(|d| d.version <= s.sent) {
            if let Some(d) = s.pending.pop_front() {
                s.bytes -= d.size();
            }
        }
        let has_work = s.need.is_some() || s.bytes > 0 || !s.pending.is_empty();
        let freed = before - s.bytes;
        let wake = has_work && !s.queued;
        if wake {
            s.queued = true;
        }
        q.bytes -= freed;
        if wake {
            q.ready.push_back(Arc::from(id));
        }
        drop(q);
        push.metrics.queue_bytes.dec_by(freed as i64);
        if wake {
            self.notify.notify_one();
        }
    }
}

pub(crate) fn error_frame(id: Option<&str>, code: &str, message: &str) -> Vec<u8> {
    let mut v = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        v["id"] = Value::from(id);
    }
    v.to_string().into_bytes()
}

/// Why a connection ended, for `quiver_ws_closed`.
#[derive(Debug, Clone, Copy)]
enum End {
    Client,
    Idle,
    Slow,
    TooBig,
    Overrun,
    Unauthorized,
    Limit,
    Shutdown,
}

impl End {
    const ALL: [End; 8] = [
        End::Client,
        End::Idle,
        End::Slow,
        End::TooBig,
        End::Overrun,
        End::Unauthorized,
        End::Limit,
        End::Shutdown,
    ];

    fn label(self) -> &'static str {
        match self {
            End::Client => "client",
            End::Idle => "idle",
            End::Slow => "slow",
            End::TooBig => "message_too_big",
            End::Overrun => "unread_replies",
            End::Unauthorized => "unauthorized",
            End::Limit => "limit",
            End::Shutdown => "shutdown",
        }
    }
}

/// Every reason a connection may end, as `quiver_ws_closed` labels it.
pub(super) fn close_reasons() -> impl Iterator<Item = &'static str> {
    End::ALL.into_iter().map(End::label)
}

/// A connection's socket, with the bytes its task has written since it last let the
/// push thread's other connections run.
struct Socket {
    ws: WebSocket<HttpStream>,
    since_yield: usize,
}

impl std::ops::Deref for Socket {
    type Target = WebSocket<HttpStream>;

    fn deref(&self) -> &Self::Target {
        &self.ws
    }
}

impl std::ops::DerefMut for Socket {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.ws
    }
}

/// Serves one upgraded connection to its end. `authed` is the header's principal and
/// the connection id it was counted under, if the token came in the header.
pub(crate) async fn serve(
    ws: WebSocket<HttpStream>,
    push: Arc<Push>,
    engine: Engine,
    tokens: Arc<Tokens>,
    authed: Option<(Principal, u64)>,
) {
    let mut socket = Socket { ws, since_yield: 0 };
    let (principal, conn_id) = match authed {
        Some(a) => a,
        None => match first_message_auth(&mut socket, &push, &tokens).await {
            Ok(a) => a,
            Err(end) => {
                push.metrics
                    .closed
                    .get_or_create(&super::CodeLabel {
                        code: end.label().into(),
                    })
                    .inc();
                return;
            }
        },
    };
    let conn = Arc::new(Conn::new(conn_id, &principal.token_id));
    let end = run(&mut socket, &conn, &push, &engine).await;
    debug!(conn = conn.id, reason = end.label(), "WebSocket closed");
    push.metrics
        .closed
        .get_or_create(&super::CodeLabel {
            code: end.label().into(),
        })
        .inc();
    push.close(&conn);
}

/// Waits for `{"type":"auth","token":…}`; nothing else is served before it.
async fn first_message_auth(
    socket: &mut Socket,
    push: &Push,
    tokens: &Tokens,
) -> Result<(Principal, u64), End> {
    let refuse = |code: &str, message: &str| {
        push.metrics.error(code);
        Frame::text(error_frame(None, code, message))
    };
    let first = tokio::time::timeout(push.config.auth_timeout, socket.next_frame()).await;
    let message = match first {
        Err(_) => {
            let _ = socket
                .send(refuse("unauthorized", "no auth message in time"))
                .await;
            let _ = socket
                .send(Frame::close(CloseCode::Policy, "authentication timed out"))
                .await;
            return Err(End::Unauthorized);
        }
        Ok(Err(_)) => return Err(End::Client),
        Ok(Ok(f)) if f.opcode() == OpCode::Text => {
            serde_json::from_slice::<Value>(f.payload()).ok()
        }
        Ok(Ok(_)) => None,
    };
    let token = message
        .as_ref()
        .filter(|m| m["type"] == "auth")
        .and_then(|m| m["token"].as_str());
    let checked = match token {
        None => Err((
            "unauthorized",
            "send {\"type\":\"auth\",\"token\":\"…\"} first, or the token in the Authorization header".to_owned(),
        )),
        Some(t) => match tokens.check(t) {
            Err(why) => Err(("unauthorized", why)),
            Ok(p) if !p.has(Scope::Read) => {
                Err(("forbidden", "this token lacks the 'read' scope".to_owned()))
            }
            Ok(p) => Ok(p),
        },
    };
    let principal = match checked {
        Ok(p) => p,
        Err((code, message)) => {
            let _ = socket.send(refuse(code, &message)).await;
            let _ = socket.send(Frame::close(CloseCode::Policy, code)).await;
            return Err(End::Unauthorized);
        }
    };
    match push.open(&principal.token_id) {
        Ok(id) => Ok((principal, id)),
        Err((code, message)) => {
            let _ = socket.send(refuse(code, &message)).await;
            let _ = socket.send(Frame::close(CloseCode::Again, code)).await;
            Err(End::Limit)
        }
    }
}

/// Reads requests and writes queued frames until either side ends.
async fn run(socket: &mut Socket, conn: &Arc<Conn>, push: &Arc<Push>, engine: &Engine) -> End {
    let interval = push.config.ping_interval;
    let mut next_ping = tokio::time::Instant::now() + interval;
    // When the oldest ping the client has not answered (with any frame) went out.
    let mut unanswered: Option<Instant> = None;
    let mut shutdown = push.stopping();
    loop {
        // Requests first, without waiting, so a busy feed cannot starve them.
        while let Some(frame) = socket.next_frame().now_or_never() {
            unanswered = None;
            if let Some(end) = on_frame(frame, conn, push, engine) {
                return finish(socket, end).await;
            }
        }
        if conn.overrun.load(Ordering::Relaxed) {
            return finish(socket, End::Overrun).await;
        }
        // Pings go out on time whether the connection is busy or quiet; a client that
        // answers none of them for the idle timeout is gone.
        if tokio::time::Instant::now() >= next_ping {
            if unanswered.is_some_and(|t| t.elapsed() > push.config.idle_timeout) {
                return finish(socket, End::Idle).await;
            }
            let ping =
                tokio::time::timeout(push.config.write_timeout, socket.send(Frame::ping("")));
            if !matches!(ping.await, Ok(Ok(()))) {
                return End::Slow;
            }
            unanswered.get_or_insert_with(Instant::now);
            next_ping = tokio::time::Instant::now() + interval;
        }
        let work = conn.next_batch(push);
        if !work.is_empty() {
            if let Err(end) = write(socket, conn, push, engine, work).await {
                return end;
            }
            continue;
        }
        tokio::select! {
            frame = socket.next_frame() => {
                unanswered = None;
                if let Some(end) = on_frame(frame, conn, push, engine) {
                    return finish(socket, end).await;
                }
            }
            _ = conn.notify.notified() => {}
            _ = tokio::time::sleep_until(next_ping) => {}
            _ = shutdown.changed() => return finish(socket, End::Shutdown).await,
        }
    }
}

/// Says goodbye with a close frame that names the reason.
async fn finish(socket: &mut Socket, end: End) -> End {
    let close = match end {
        End::Client | End::Slow | End::Unauthorized | End::Limit => return end,
        End::Idle => Frame::close(CloseCode::Away, "idle timeout: no frame from the client"),
        End::TooBig => Frame::close(CloseCode::Size, "message over the size limit"),
        End::Overrun => Frame::close(CloseCode::Policy, "too many unread replies"),
        End::Shutdown => Frame::close(CloseCode::Away, "server shutting down"),
    };
    // The closing handshake: send ours, then give the client a moment to answer so it
    // reads the reason instead of a reset.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if socket.send(close).await.is_ok() {
            while let Ok(f) = socket.next_frame().await {
                if f.opcode() == OpCode::Close {
                    break;
                }
            }
        }
    })
    .await;
    end
}

/// Handles one frame from the client; `Some` ends the connection.
fn on_frame(
    frame: yawc::Result<Frame>,
    conn: &Arc<Conn>,
    push: &Arc<Push>,
    engine: &Engine,
) -> Option<End> {
    let frame = match frame {
        Ok(f) => f,
        Err(yawc::WebSocketError::FrameTooLarge) => return Some(End::TooBig),
        Err(_) => return Some(End::Client),
    };
    match frame.opcode() {
        OpCode::Text => {}
        OpCode::Close => return Some(End::Client),
        OpCode::Binary => {
            push.metrics.error("bad_message");
            conn.control(error_frame(
                None,
                "bad_message",
                "frames are JSON text, not binary",
            ));
            return None;
        }
        _ => return None,
    }
    let reply_error = |id: Option<&str>, code: &str, message: &str| {
        push.metrics.error(code);
        conn.control(error_frame(id, code, message));
    };
    let message: Value = match serde_json::from_slice(frame.payload()) {
        Ok(Value::Object(m)) => Value::Object(m),
        Ok(_) => {
            reply_error(
                None,
                "bad_message",
                "a request is a JSON object with a \"type\"",
            );
            return None;
        }
        Err(e) => {
            reply_error(None, "bad_message", &format!("not JSON: {e}"));
            return None;
        }
    };
    let id: Option<String> = match &message["id"] {
        Value::Null => None,
        Value::String(s) if !s.is_empty() && s.chars().count() <= MAX_ID_CHARS => Some(s.clone()),
        _ => {
            reply_error(
                None,
                "bad_message",
                &format!("\"id\" must be a non-empty string of at most {MAX_ID_CHARS} characters"),
            );
            return None;
        }
    };
    let kind = message["type"].as_str().unwrap_or_default().to_owned();
    let request = match serde_json::from_value::<Request>(message) {
        Ok(r) => r,
        Err(_) if kind.is_empty() => {
            reply_error(id.as_deref(), "bad_message", "a request needs a \"type\"");
            return None;
        }
        Err(_) if !Request::TYPES.contains(&kind.as_str()) => {
            reply_error(
                id.as_deref(),
                "bad_message",
                &format!("unknown message type '{kind}' (subscribe, unsubscribe, ping)"),
            );
            return None;
        }
        Err(e) => {
            reply_error(id.as_deref(), "bad_message", &format!("bad {kind}: {e}"));
            return None;
        }
    };
    match request {
        Request::Ping { .. } => conn.control(br#"{"type":"pong"}"#.to_vec()),
        Request::Pong { .. } => {}
        Request::Subscribe {
            id,
            view,
            filter,
            from_version,
        } => {
            let id: Arc<str> = Arc::from(id);
            let joined = if view == super::NOTIFICATIONS {
                push.join_notifications(conn, &id, engine)
            } else {
                push.join(conn, &id, engine, &view, filter.as_ref(), from_version)
            };
            if let Err((code, msg)) = joined {
                reply_error(Some(&id), code, &msg);
            }
        }
        Request::Unsubscribe { id } => {
            if push.leave_notifications(conn, &id) || push.unsubscribe(conn, &id) {
                conn.control(
                    json!({"type": "unsubscribed", "id": id})
                        .to_string()
                        .into_bytes(),
                );
            } else {
                reply_error(
                    Some(&id),
                    "unknown_subscription",
                    &format!("no subscription '{id}' on this connection"),
                );
            }
        }
        Request::Auth { .. } => reply_error(
            id.as_deref(),
            "bad_message",
            "this connection is already authenticated",
        ),
    }
    None
}

/// A request from a subscriber, as the push protocol (docs/CONTRACTS.md) spells it.
/// A field the protocol does not have is refused, not ignored.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Subscribe {
        id: String,
        view: String,
        #[serde(default)]
        filter: Option<Value>,
        #[serde(default)]
        from_version: Option<u64>,
    },
    Unsubscribe {
        id: String,
    },
    Ping {
        #[serde(default, rename = "id")]
        _id: Option<String>,
    },
    Pong {
        #[serde(default, rename = "id")]
        _id: Option<String>,
    },
    /// Only the first message of a connection may authenticate.
    Auth {
        #[serde(default, rename = "token")]
        _token: Option<Value>,
    },
}

impl Request {
    /// The `type` names, for telling an unknown type from a malformed request.
    const TYPES: [&'static str; 5] = ["subscribe", "unsubscribe", "ping", "pong", "auth"];
}

/// Writes one batch of work, then flushes; an error ends the connection.
async fn write(
    socket: &mut Socket,
    conn: &Conn,
    push: &Push,
    engine: &Engine,
    work: Vec<Work>,
) -> Result<(), End> {
    let mut delivered: Vec<Instant> = Vec::new();
    for w in work {
        let message = match w {
            Work::Control(bytes) => vec![Bytes::from(bytes)],
            Work::Frames(id, deltas) => {
                feed_deltas(socket, push, &id, &deltas, &mut delivered).await?;
                continue;
            }
            Work::Snapshot(id, id_json, group) => {
                send_snapshot(
                    socket,
                    conn,
                    push,
                    engine,
                    (&id, &id_json),
                    &group,
                    &mut delivered,
                )
                .await?;
                continue;
            }
            Work::CatchUp(id, id_json, group, from) => match group.recent_since(from) {
                Some(deltas) => {
                    let last = deltas.last().map_or(from, |d| d.version);
                    let bytes: usize = deltas.iter().map(|d| d.size()).sum();
                    if bytes > push.config.queue_bytes {
                        feed_folded(socket, push, &id_json, &deltas, &mut delivered).await?;
                    } else {
                        feed_deltas(socket, push, &id_json, &deltas, &mut delivered).await?;
                    }
                    conn.caught_up(&id, last, push);
                    continue;
                }
                None => {
                    push.metrics.resnapshots.inc();
                    send_snapshot(
                        socket,
                        conn,
                        push,
                        engine,
                        (&id, &id_json),
                        &group,
                        &mut delivered,
                    )
                    .await?;
                    continue;
                }
            },
            Work::Resume(id, id_json, group, from) => {
                match engine.views().view_changes_since(&group.view, from) {
                    Some(changes) => {
                        let last = changes.last().map_or(from, |c| c.version);
                        let head = json!({
                            "type": "subscribed", "id": id.as_ref(), "view": group.view,
                            "version": from, "key": group.key, "resumed": true,
                        });
                        feed(socket, push, vec![Bytes::from(head.to_string())]).await?;
                        for change in changes {
                            match Delta::build(&change, &group.filter, &group.key_idx) {
                                Ok(Some(d)) => {
                                    feed(socket, push, d.message(&id_json)).await?;
                                    push.metrics.deltas_sent.inc();
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    debug!(error = %e, "encoding a kept change failed");
                                }
                            }
                        }
                        conn.caught_up(&id, last, push);
                        continue;
                    }
                    None => {
                        send_snapshot(
                            socket,
                            conn,
                            push,
                            engine,
                            (&id, &id_json),
                            &group,
                            &mut delivered,
                        )
                        .await?;
                        continue;
                    }
                }
            }
        };
        feed(socket, push, message).await?;
    }
    match tokio::time::timeout(push.config.write_timeout, socket.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(End::Client),
        Err(_) => return Err(End::Slow),
    }
    for t in delivered {
        push.metrics
            .delivery_seconds
            .observe(t.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Writes delta frames for one subscription, counting them and noting when the
/// events behind each were acknowledged.
async fn feed_deltas(
    socket: &mut Socket,
    push: &Push,
    id: &str,
    deltas: &[Arc<Delta>],
    delivered: &mut Vec<Instant>,
) -> Result<(), End> {
    for d in deltas {
        feed(socket, push, d.message(id)).await?;
        push.metrics.deltas_sent.inc();
        delivered.extend(d.acked_at);
    }
    Ok(())
}

/// The most a folded frame holds before it is written and folding starts again: what
/// a connection holds of its own while catching up (deltas are otherwise shared).
const FOLD_BYTES: usize = 64 << 10;

/// Writes a backlog of deltas folded per key (`"coalesced":true` frames): consecutive
/// deltas are folded until the frame reaches [`FOLD_BYTES`], so a view whose changes
/// hit the same keys goes out as one frame of their last states, while one whose keys
/// are all new goes out in frames of bounded size rather than one copy of the backlog.
async fn feed_folded(
    socket: &mut Socket,
    push: &Push,
    id: &str,
    deltas: &[Arc<Delta>],
    delivered: &mut Vec<Instant>,
) -> Result<(), End> {
    let mut c = Coalesced::default();
    for d in deltas {
        if c.fold(d).is_err() {
            // (Keys that cannot be read back: this one goes as it is.)
            flush_folded(socket, push, id, &mut c, delivered).await?;
            feed_deltas(socket, push, id, std::slice::from_ref(d), delivered).await?;
            continue;
        }
        if c.bytes() >= FOLD_BYTES {
            flush_folded(socket, push, id, &mut c, delivered).await?;
        }
    }
    flush_folded(socket, push, id, &mut c, delivered).await
}

async fn flush_folded(
    socket: &mut Socket,
    push: &Push,
    id: &str,
    c: &mut Coalesced,
    delivered: &mut Vec<Instant>,
) -> Result<(), End> {
    if c.is_empty() {
        return Ok(());
    }
    let c = std::mem::take(c);
    let frame = Bytes::from(c.frame(id));
    push.metrics.coalesced.inc();
    push.metrics.deltas_sent.inc();
    delivered.extend(c.acked_at);
    drop(c);
    feed(socket, push, vec![frame]).await
}

/// Writes subscription `id`'s snapshot and the kept deltas after it (or an error frame
/// if the view is gone).
async fn send_snapshot(
    socket: &mut Socket,
    conn: &Conn,
    push: &Push,
    engine: &Engine,
    (id, id_json): (&str, &str),
    group: &Group,
    delivered: &mut Vec<Instant>,
) -> Result<(), End> {
    match group.snapshot(engine, push).await {
        Ok((snap, after)) => {
            feed(socket, push, snap.message(id_json, &group.view)).await?;
            push.metrics.snapshots_sent.inc();
            feed_deltas(socket, push, id_json, &after, delivered).await?;
            let last = after.last().map_or(snap.version, |d| d.version);
            conn.caught_up(id, last, push);
            Ok(())
        }
        Err((code, message)) => {
            push.metrics.error(code);
            feed(
                socket,
                push,
                vec![Bytes::from(error_frame(Some(id), code, &message))],
            )
            .await
        }
    }
}

/// Messages up to this size go out as one frame; larger ones as fragments that share
/// their bodies with other subscribers instead of copying them.
const ONE_FRAME_BYTES: usize = 16 << 10;

/// The largest fragment. The socket writer copies a frame into its buffer and takes
/// the next only once that has drained, so this bounds what a connection holds: a
/// snapshot of a large view goes out piece by piece, not as one copy per slow client.
const FRAGMENT_BYTES: usize = 256 << 10;

/// `part` cut into pieces of at most [`FRAGMENT_BYTES`] (sharing its memory), each cut
/// before a UTF-8 character, so every fragment of a text message is valid text.
fn fragments(part: Bytes) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(part.len() / FRAGMENT_BYTES + 1);
    let mut at = 0;
    while part.len() - at > FRAGMENT_BYTES {
        let mut cut = at + FRAGMENT_BYTES;
        // Back up over continuation bytes (10xxxxxx) to a character's first byte.
        while cut > at + 1 && part[cut] & 0xC0 == 0x80 {
            cut -= 1;
        }
        out.push(part.slice(at..cut));
        at = cut;
    }
    out.push(part.slice(at..));
    out
}

async fn feed(socket: &mut Socket, push: &Push, parts: Vec<Bytes>) -> Result<(), End> {
    let len: usize = parts.iter().map(Bytes::len).sum();
    push.metrics.frames_sent.inc();
    push.metrics.bytes_sent.inc_by(len as u64);
    let frames: Vec<Frame> = if len <= ONE_FRAME_BYTES || parts.len() == 1 && len <= FRAGMENT_BYTES
    {
        vec![Frame::text(Bytes::from(parts.concat()))]
    } else {
        let parts: Vec<Bytes> = parts
            .into_iter()
            .filter(|p| !p.is_empty())
            .flat_map(fragments)
            .collect();
        let last = parts.len() - 1;
        parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let f = if i == 0 {
                    Frame::text(p)
                } else {
                    Frame::continuation(p)
                };
                f.with_fin(i == last)
            })
            .collect()
    };
    for frame in frames {
        let size = frame.payload().len();
        match tokio::time::timeout(push.config.write_timeout, socket.feed(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(End::Client),
            Err(_) => return Err(End::Slow),
        }
        socket.since_yield += size;
        if socket.since_yield >= YIELD_BYTES {
            // The other connections' turn: one writing a large snapshot or backlog to a
            // client that keeps up would otherwise hold the push thread for tens of MB
            // (tokio lets a task make 128 socket writes before it must yield), while
            // connections with one small delta each wait behind it.
            socket.since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// Bytes a connection writes before it lets the push thread's other connections run.
const YIELD_BYTES: usize = 256 << 10;

#[cfg(test)]
mod fragment_tests {
    use super::*;

    #[test]
    fn fragments_share_the_part_and_never_split_a_character() {
        // 'é' is two bytes: a cut at every multiple of the fragment size would land
        // inside one of them somewhere.
        let text = "aé".repeat(FRAGMENT_BYTES);
        let part = Bytes::from(text.clone());
        let pieces = fragments(part.clone());
        assert!(pieces.len() > 2);
        assert!(
            pieces
                .iter()
                .all(|p| p.len() <= FRAGMENT_BYTES && !p.is_empty())
        );
        for p in &pieces {
            assert!(
                std::str::from_utf8(p).is_ok(),
                "a fragment split a character"
            );
            // Slices of the part, not copies.
            let offset = p.as_ptr() as usize - part.as_ptr() as usize;
            assert!(offset < part.len());
        }
        assert_eq!(pieces.concat(), text.as_bytes());
        assert_eq!(fragments(Bytes::from_static(b"small")).len(), 1);
    }
}
