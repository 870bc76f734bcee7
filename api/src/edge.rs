//! What every HTTP answer passes through at the edge: per-client rate limits with
//! their headers, security headers, and CORS when it is configured.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};

use crate::error::{ApiError, ErrorKind};
use crate::state::AppState;
use crate::tls::PeerAddr;

type Limiter = governor::DefaultKeyedRateLimiter<String, StateInformationMiddleware>;

/// Per-client request limits: one bucket per token, or per IP address for requests
/// without a valid token.
#[derive(Debug)]
pub(crate) struct RequestLimits {
    limiter: Limiter,
    per_second: u32,
}

impl RequestLimits {
    /// `None` when `per_second` is 0 (no limit).
    pub(crate) fn new(per_second: u32, burst: u32) -> Option<Arc<Self>> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        let limiter = RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
            .with_middleware::<StateInformationMiddleware>();
        Some(Arc::new(Self {
            limiter,
            per_second,
        }))
    }

    /// Forgets clients whose bucket is full again, every minute, so addresses seen once
    /// do not stay in memory.
    pub(crate) fn spawn_cleanup(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(limits) = weak.upgrade() else { return };
                limits.limiter.retain_recent();
                limits.limiter.shrink_to_fit();
            }
        });
    }
}

/// Probes of a load balancer or orchestrator are never limited.
fn exempt(path: &str) -> bool {
    matches!(path, "/health" | "/ready")
}

/// The rate-limit key: the token's id when the request carries a valid one, else the
/// client's address.
fn client_key(state: &AppState, req: &Request) -> String {
    if let Ok(principal) = state.tokens.authenticate(req.headers()) {
        return format!("token:{}", principal.token_id);
    }
    match req.extensions().get::<ConnectInfo<PeerAddr>>() {
        Some(ConnectInfo(PeerAddr(addr))) => format!("ip:{}", addr.ip()),
        None => "ip:unknown".into(),
    }
}

/// Applies the request limit, then adds the security headers to whatever answers.
pub(crate) async fn edge(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let mut limit_headers = None;
    if let Some(limits) = state.request_limits.as_ref().filter(|_| !exempt(&path)) {
        let key = client_key(&state, &req);
        match limits.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let burst = snapshot.quota().burst_size().get();
                // Seconds until the bucket is full again.
                let reset = (burst - remaining).div_ceil(limits.per_second);
                limit_headers = Some((burst, remaining, reset));
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let retry = wait.as_secs_f64().ceil().max(1.0) as u64;
                let burst = not_until.quota().burst_size().get();
                let mut resp = ApiError::new(
                    ErrorKind::RateLimited,
                    "rate_limited",
                    format!(
                        "more than {} requests per second (burst {burst}) for this client; retry in {retry} s",
                        limits.per_second
                    ),
                )
                .retry_after(retry)
                .into_response();
                set_limit_headers(&mut resp, burst, 0, retry as u32);
                security_headers(&state, &path, &mut resp);
                return resp;
            }
        }
    }
    let mut resp = next.run(req).await;
    if let Some((limit, remaining, reset)) = limit_headers {
        set_limit_headers(&mut resp, limit, remaining, reset);
    }
    security_headers(&state, &path, &mut resp);
    resp
}

fn set_limit_headers(resp: &mut Response, limit: u32, remaining: u32, reset: u32) {
    let h = resp.headers_mut();
    h.insert(HeaderName::from_static("ratelimit-limit"), limit.into());
    h.insert(
        HeaderName::from_static("ratelimit-remaining"),
        remaining.into(),
    );
    h.insert(HeaderName::from_static("ratelimit-reset"), reset.into());
    h.insert(
        HeaderName::from_static("ratelimit-policy"),
        HeaderValue::from_str(&format!("{limit};w=1")).unwrap_or(HeaderValue::from_static("")),
    );
}

/// The dashboard may load its own scripts, styles and images and talk to its own
/// origin (HTTP and WebSocket), nothing else, and no one may frame it.
const DASHBOARD_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; \
base-uri 'none'; form-action 'self'; frame-ancestors 'none'";
/// API answers are data: nothing in them may run or be framed.
const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'; sandbox";

fn security_headers(state: &AppState, path: &str, resp: &mut Response) {
    // The dashboard and the push client script (which pages of this origin import) get
    // the page policy; everything else is data.
    let dashboard = path == "/" || path.starts_with("/ui/") || path == "/v1/ws/client.js";
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(if dashboard { DASHBOARD_CSP } else { API_CSP }),
    );
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) && !dashboard {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if state.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
}

/// CORS for the API when origins are configured (`--cors-origin`); off by default, so
/// browsers only let the dashboard's own origin call it.
pub(crate) fn cors(origins: &[String]) -> anyhow::Result<Option<tower_http::cors::CorsLayer>> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim_end_matches('/'))
                    .map_err(|_| anyhow::anyhow!("--cors-origin '{o}' is not a valid origin"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                HeaderName::from_static("ratelimit-limit"),
                HeaderName::from_static("ratelimit-remaining"),
                HeaderName::from_static("ratelimit-reset"),
                HeaderName::from_static("ratelimit-policy"),
            ])
            .max_age(Duration::from_secs(600)),
    ))
}
