//! The HTTP server: routes, start-up and graceful shutdown.

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use governor::{Quota, RateLimiter};
use prometheus_client::registry::Registry;
use quiver_engine::metrics::RouteLabel;
use quiver_engine::{Engine, EngineMetrics, Store};
use tokio::net::TcpListener;
use tracing::{error, info};

use crate::auth::Tokens;
use crate::config::ServeConfig;
use crate::routes;
use crate::state::AppState;

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    state: Arc<AppState>,
    /// Address the HTTP listener is bound to.
    pub http_addr: std::net::SocketAddr,
    /// A token generated on first start (admin), if one was.
    pub generated_admin_token: Option<String>,
    /// Address the Postgres listener is bound to, if it is on.
    pub pg_addr: Option<std::net::SocketAddr>,
    /// Address the Flight SQL listener is bound to, if it is on.
    pub flight_addr: Option<std::net::SocketAddr>,
    http: tokio::task::JoinHandle<()>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Set if recovery fails.
    failed: tokio::sync::watch::Receiver<Option<String>>,
}

impl RunningServer {
    /// Binds the listeners, loads tokens, and starts recovery in the background.
    pub async fn start(mut config: ServeConfig) -> anyhow::Result<Self> {
        config.resolve_secret_files()?;
        let http_cert = config
            .tls_files()
            .map(crate::tls::ReloadingCert::load)
            .transpose()
            .context("loading --tls-cert/--tls-key")?;
        let pg_cert = match (config.pg_tls_cert.is_some(), &http_cert) {
            (false, Some(shared)) => Some(Arc::clone(shared)),
            _ => config
                .pg_tls_files()
                .map(crate::tls::ReloadingCert::load)
                .transpose()
                .context("loading --pg-tls-cert/--pg-tls-key")?,
        };
        let mut reloadable: Vec<Arc<crate::tls::ReloadingCert>> =
            http_cert.iter().cloned().collect();
        if let Some(pg) = &pg_cert
            && !reloadable.iter().any(|c| Arc::ptr_eq(c, pg))
        {
            reloadable.push(Arc::clone(pg));
        }
        crate::tls::reload_on_sighup(reloadable);
        let cors = crate::edge::cors(&config.cors_origins)?;
        let request_limits =
            crate::edge::RequestLimits::new(config.rate_limit, config.rate_limit_burst);
        if let Some(limits) = &request_limits {
            limits.spawn_cleanup();
        }
        let mut registry = Registry::default();
        let metrics = Arc::new(EngineMetrics::new(&mut registry));
        let memory = crate::memory::MemoryMetrics::new(&mut registry);
        let push = Arc::new(
            crate::push::Push::new(config.push_config(), &mut registry)
                .context("starting the push runtime")?,
        );
        let store = Store::open(&config.store).context("opening the store")?;
        let node = quiver_engine::node_id(&config.wal_dir()).context("reading the node id")?;
        let (tokens, generated) = Tokens::load(&store, &node, config.admin_token.clone())
            .await
            .context("loading tokens")?;
        let jobs = Arc::new(config.jobs()?);
        let reports = Arc::new(crate::reports::Reports::new(
            config.report_options(),
            &store,
            &node,
            &mut registry,
        ));
        reports
            .load()
            .await
            .map_err(|e| anyhow::anyhow!("loading the reports: {e}"))?;
        let backups = crate::backups::Backups::new(
            config.backup_to.as_deref(),
            &config.backup_schedule,
            &mut registry,
        )?;
        let rate_limiter = NonZeroU32::new(config.ingest_rate_limit)
            .map(|n| RateLimiter::keyed(Quota::per_second(n)));
        let state = Arc::new(AppState {
            config: config.clone(),
            engine: OnceLock::new(),
            tokens: Arc::new(tokens),
            registry,
            metrics: Arc::clone(&metrics),
            memory,
            rate_limiter,
            request_limits,
            tls: http_cert.is_some(),
            query_slots: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_queries.max(1),
            )),
            push,
            jobs,
            reports,
        });

        let listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding HTTP on {}", config.http_addr))?;
        let http_addr = listener.local_addr()?;
        let scheme = if http_cert.is_some() { "https" } else { "http" };
        state
            .reports
            .default_public_url(format!("{scheme}://{http_addr}"));
        let mut app = router(Arc::clone(&state));
        if let Some(cors) = cors {
            app = app.layer(cors);
        }
        let listener = crate::tls::EdgeListener::new(
            listener,
            http_cert
                .as_ref()
                .map(|c| c.acceptor(&[b"http/1.1"]))
                .transpose()?,
        )?;
        let (shutdown, mut shutdown_rx) = tokio::sync::watch::channel(false);
        let http = tokio::spawn(async move {
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<crate::tls::PeerAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.changed().await;
            })
            .await;
            if let Err(e) = served {
                error!(error = %e, "HTTP server failed");
            }
        });
        info!(%http_addr, tls = state.tls, store = %config.store, wal = %config.wal_dir().display(), "HTTP listening; recovering");
        let mut listeners = Vec::new();
        let pg_addr = match config.pg_addr.0 {
            Some(addr) => {
                let (bound, task) = crate::pg::start(
                    Arc::clone(&state),
                    addr,
                    pg_cert.clone(),
                    shutdown.subscribe(),
                )
                .await?;
                listeners.push(task);
                Some(bound)
            }
            None => None,
        };
        let flight_addr = match config.flight_addr.0 {
            Some(addr) => {
                let tls = http_cert
                    .as_ref()
                    .map(|c| c.acceptor(&[b"h2"]))
                    .transpose()?;
                let (bound, task) =
                    crate::flight::start(Arc::clone(&state), addr, tls, shutdown.subscribe())
                        .await?;
                listeners.push(task);
                Some(bound)
            }
            None => None,
        };

        let mut engine_config = config.engine_config();
        engine_config.views.definitions = config.view_definitions()?;
        let recovering = Arc::clone(&state);
        let (failed_tx, failed) = tokio::sync::watch::channel(None);
        let jobs_stop = shutdown.subscribe();
        let reports_stop = shutdown.subscribe();
        let backups_stop = shutdown.subscribe();
        let report_examples = match config.report_examples() {
            Ok(examples) => examples,
            Err(e) => {
                tracing::warn!(error = %e, "the built-in reports are not loaded");
                Vec::new()
            }
        };
        let examples_scheduled = config.report_example_schedules;
        tokio::spawn(async move {
            match Engine::open(engine_config, Arc::clone(&recovering.metrics)).await {
                Ok(engine) => {
                    recovering.push.start(engine.clone());
                    recovering.jobs.load_last(&engine).await;
                    recovering.jobs.spawn(engine.clone(), jobs_stop);
                    if let Some(backups) = backups {
                        backups.spawn(engine.clone(), backups_stop);
                    }
                    recovering
                        .reports
                        .load_examples(&engine, report_examples, examples_scheduled)
                        .await;
                    recovering
                        .reports
                        .spawn(Arc::clone(&recovering), engine.clone(), reports_stop);
                    let _ = recovering.engine.set(engine);
                    info!("ready");
                }
                Err(e) => {
                    error!(error = %e, "recovery failed; stopping");
                    let _ = failed_tx.send(Some(e.to_string()));
                }
            }
        });

        Ok(Self {
            state,
            http_addr,
            generated_admin_token: generated.map(|t| t.token),
            pg_addr,
            flight_addr,
            http,
            listeners,
            shutdown,
            failed,
        })
    }

    /// Resolves with the reason if recovery fails (never, once it has succeeded); the
    /// caller stops the server and reports it.
    pub async fn recovery_failed(&self) -> String {
        let mut failed = self.failed.clone();
        loop {
            if let Some(reason) = failed.borrow_and_update().clone() {
                return reason;
            }
            if failed.changed().await.is_err() {
                // The recovery task ended without a failure: wait forever.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs batch job `kind` once as soon as no other run is in progress (the demo's
    /// first forecast); an error before recovery has finished.
    pub fn run_job_soon(&self, kind: quiver_models::job::JobKind) -> anyhow::Result<()> {
        let engine = self
            .state
            .engine
            .get()
            .context("the engine is still recovering")?;
        self.state.jobs.run_soon(engine.clone(), kind);
        Ok(())
    }

    /// Creates an alert rule unless one of its name exists (used by `quiver demo`).
    pub async fn ensure_alert(&self, sql: &str) -> anyhow::Result<()> {
        let engine = self
            .state
            .engine
            .get()
            .context("the engine is still recovering")?;
        let rule = quiver_engine::alerts::parse_create_alert(sql).map_err(anyhow::Error::msg)?;
        engine
            .alerts()
            .create(engine, rule, true)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// Makes a token directly in the registry (used by `quiver demo` for its feed).
    pub async fn create_token(
        &self,
        name: &str,
        scopes: Vec<crate::auth::Scope>,
    ) -> anyhow::Result<String> {
        Ok(self.state.tokens.create(name, scopes, None).await?.token)
    }

    /// Waits until recovery has finished; an error if it failed.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        while self.state.engine.get().is_none() {
            if let Some(reason) = self.failed.borrow().clone() {
                anyhow::bail!("recovery failed: {reason}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops taking writes, drains HTTP, flushes buffers into Delta.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        info!("shutting down: no new writes; flushing");
        if let Some(engine) = self.state.engine.get() {
            engine.stop_accepting();
        }
        let _ = self.shutdown.send(true);
        self.state.push.stop();
        // A job run in progress stops at its next check and writes nothing more.
        self.state
            .jobs
            .stop(std::time::Duration::from_secs(10))
            .await;
        let _ = self.http.await;
        for task in self.listeners {
            let _ = task.await;
        }
        if let Some(engine) = self.state.engine.get() {
            engine.shutdown().await.context("final flush")?;
        }
        Ok(())
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/v1/streams", get(routes::list_streams))
        .route("/v1/streams/{stream}/events", post(routes::ingest))
        .route("/v1/sql", post(crate::sql::sql))
        .route("/v1/ws", get(crate::push::ws))
        .route("/v1/ws/client.js", get(crate::push::client_js))
        .route(
            "/v1/views",
            get(crate::views::list).post(crate::views::create),
        )
        .route(
            "/v1/views/{name}",
            get(crate::views::get_one).delete(crate::views::delete),
        )
        .route(
            "/v1/tokens",
            post(routes::create_token).get(routes::list_tokens),
        )
        .route("/v1/tokens/{id}", delete(routes::delete_token))
        .route("/v1/tokens/{id}/rotate", post(routes::rotate_token))
        .route(
            "/v1/alerts",
            get(crate::alerts::list).post(crate::alerts::create),
        )
        .route(
            "/v1/alerts/{name}",
            get(crate::alerts::get_one).delete(crate::alerts::delete),
        )
        .route(
            "/v1/alerts/{name}/deliveries",
            get(crate::alerts::deliveries),
        )
        .route(
            "/v1/reports",
            get(crate::reports::http::list).post(crate::reports::http::create),
        )
        .route(
            "/v1/reports/{name}",
            get(crate::reports::http::get_one)
                .put(crate::reports::http::replace)
                .delete(crate::reports::http::delete),
        )
        .route("/v1/reports/{name}/run", post(crate::reports::http::run))
        .route("/v1/reports/{name}/runs", get(crate::reports::http::runs))
        .route(
            "/v1/reports/{name}/runs/{id}",
            get(crate::reports::http::run_one),
        )
        .route(
            "/v1/reports/{name}/runs/{id}/file",
            get(crate::reports::http::file),
        )
        .route(
            "/v1/silences",
            get(crate::alerts::list_silences).post(crate::alerts::create_silence),
        )
        .route("/v1/silences/{id}", delete(crate::alerts::delete_silence))
        .route("/v1/notifications", get(crate::alerts::list_notifications))
        .route(
            "/v1/notifications/{id}/read",
            post(crate::alerts::mark_read),
        )
        .route("/", get(crate::dashboards::page))
        .route("/ui/{*path}", get(crate::dashboards::ui))
        .route("/v1/dashboards", get(crate::dashboards::list))
        .route(
            "/v1/dashboards/{name}",
            get(crate::dashboards::get_one)
                .put(crate::dashboards::put)
                .delete(crate::dashboards::delete),
        )
        .route("/v1/presence", get(crate::dashboards::presence))
        .route("/v1/jobs", get(crate::jobs::list))
        .route(
            "/v1/jobs/{kind_or_id}",
            post(crate::jobs::start).delete(crate::jobs::cancel),
        )
        .fallback(routes::not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::edge::edge,
        ))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), observe))
        .with_state(state)
}

/// The client's `X-Request-Id` when it is a sane token, else a new random one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 8]>()))
}

/// Times every request into the route histogram, inside a tracing span that carries
/// its request id: every log line of the request (the WAL sequence an ingest got, an
/// error) names it, and the answer returns it as `X-Request-Id`.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let id = request_id(&req);
    let span =
        tracing::info_span!("http", request_id = %id, method = %req.method(), route = %route);
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "request done"
        );
    });
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    state
        .metrics
        .http_request_seconds
        .get_or_create(&RouteLabel {
            route,
            status: resp.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}
