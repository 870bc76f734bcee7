//! `quiver backup`, `quiver restore` and `quiver verify`: consistent, incremental
//! backups of a store to any store URL, restores (to a point in time), and checks.
//! They work on the store directly, beside a running server or without one.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use quiver_engine::{Store, backup};

/// `quiver backup`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct BackupArgs {
    #[command(subcommand)]
    command: Option<BackupCommand>,
    /// The store to back up.
    #[arg(long, env = "QUIVER_STORE", default_value = "file://./quiver-data")]
    store: String,
    /// Where backups go: a folder, file://PATH or s3://BUCKET/PREFIX.
    #[arg(long, env = "QUIVER_BACKUP_TO")]
    to: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum BackupCommand {
    /// List the backups at a location, oldest first.
    List {
        /// The backup location.
        #[arg(long, env = "QUIVER_BACKUP_TO")]
        to: String,
        /// One JSON object per backup (id, cut, complete_before, tables, sizes) instead
        /// of text, for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// `quiver restore`.
#[derive(Debug, clap::Args)]
pub(super) struct RestoreArgs {
    /// The backup location.
    #[arg(long)]
    from: String,
    /// The empty store to restore into.
    #[arg(long)]
    store: String,
    /// Restore the tables as they were at this instant (RFC 3339): from the oldest
    /// backup taken at or after it, each table taken back to its last version committed
    /// by then. Default: the latest backup as it is.
    #[arg(long)]
    at: Option<DateTime<Utc>>,
    /// Restore this backup (an id from `quiver backup list`).
    #[arg(long, conflicts_with = "at")]
    id: Option<String>,
}

/// `quiver verify`.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(super) struct VerifyArgs {
    /// Check a store: every file its tables reference exists, has the size the log
    /// records, and is a whole Parquet file.
    #[arg(long)]
    store: Option<String>,
    /// Check a backup location: every file of every backup (or of --id) against its
    /// size and SHA-256.
    #[arg(long)]
    backups: Option<String>,
    /// With --backups, only this backup.
    #[arg(long, requires = "backups")]
    id: Option<String>,
}

fn open(url: &str, what: &str) -> anyhow::Result<Store> {
    Store::open(url).with_context(|| format!("opening the {what} {url}"))
}

pub(super) async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    if let Some(BackupCommand::List { to, json }) = args.command {
        let dest = open(&to, "backup location")?;
        let manifests = backup::list(&dest).await?;
        if json {
            for m in &manifests {
                let line = serde_json::json!({
                    "id": m.id,
                    "cut_at": m.cut_at,
                    "complete_before": m.complete_before,
                    "tables": m.tables,
                    "files": m.files.len(),
                    "bytes": m.bytes(),
                    "copied_bytes": m.copied_bytes,
                });
                println!("{line}");
            }
            return Ok(());
        }
        if manifests.is_empty() {
            println!("no backups at {to}");
        }
        for m in manifests {
            let tables: Vec<String> = m
                .tables
                .iter()
                .map(|(name, cut)| format!("{name}@{}", cut.version))
                .collect();
            println!(
                "{}  cut {}  {} files, {} bytes ({} copied)  {}",
                m.id,
                m.cut_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                m.files.len(),
                m.bytes(),
                m.copied_bytes,
                tables.join(" ")
            );
        }
        return Ok(());
    }
    let to = args
        .to
        .context("say where the backup goes: --to URL (or QUIVER_BACKUP_TO)")?;
    let store = open(&args.store, "store")?;
    let dest = open(&to, "backup location")?;
    let m = backup::backup(&store, &dest, None).await?;
    println!(
        "backup {}: {} files, {} bytes; copied {} files, {} bytes",
        m.id,
        m.files.len(),
        m.bytes(),
        m.copied_files,
        m.copied_bytes
    );
    Ok(())
}

pub(super) async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let dest = open(&args.from, "backup location")?;
    let target = open(&args.store, "store")?;
    let manifests = backup::list(&dest).await?;
    let chosen = backup::choose(&manifests, args.id.as_deref(), args.at)?;
    let started = std::time::Instant::now();
    let restored = backup::restore(&dest, chosen, &target, args.at).await?;
    println!(
        "restored backup {} into {}: {} files, {} bytes in {:.1} s",
        restored.backup,
        target.url(),
        restored.files,
        restored.bytes,
        started.elapsed().as_secs_f64()
    );
    for (table, version) in &restored.tables {
        println!("  {table} at version {version}");
    }
    Ok(())
}

pub(super) async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    if let Some(url) = args.store {
        let store = open(&url, "store")?;
        let checked = backup::verify_store(&store).await?;
        println!("{url}: {checked} data files present and whole");
        return Ok(());
    }
    let url = args.backups.context("--store or --backups")?;
    let dest = open(&url, "backup location")?;
    let manifests = backup::list(&dest).await?;
    anyhow::ensure!(!manifests.is_empty(), "no backups at {url}");
    for m in &manifests {
        if args.id.as_deref().is_some_and(|id| id != m.id) {
            continue;
        }
        let checked = backup::verify_backup(&dest, m).await?;
        println!("backup {}: {checked} files match their SHA-256", m.id);
    }
    Ok(())
}
