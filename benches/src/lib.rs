//! Helpers shared by the load drivers.

pub mod alerts;

/// A process's resident memory in MiB, from `/proc`.
pub fn rss_mib(pid: u32) -> Option<f64> {
    quiver_engine::metrics::resident_bytes(pid).map(|b| b as f64 / (1 << 20) as f64)
}

/// The server a load driver talks to: loopback only.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Server base URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Token with the scopes the driver needs.
    #[arg(long, env = "QUIVER_TOKEN")]
    pub token: String,
}

impl Target {
    /// The base URL without a trailing slash; refuses anything but loopback.
    pub fn base(&self) -> anyhow::Result<String> {
        let base = self.url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base)?;
        let host = url.host_str().unwrap_or_default();
        if !(host == "localhost" || host.starts_with("127.") || host == "[::1]") {
            anyhow::bail!("load tests target loopback only, not '{host}'");
        }
        Ok(base)
    }
}
