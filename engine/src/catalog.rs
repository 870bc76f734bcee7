//! What Quiver keeps about itself in the store, under `_quiver/catalog/`.
//!
//! Each kind of metadata (streams, views, tokens, and what later features add) is one
//! [`Document`]: a JSON value stored as a sequence of immutable versions,
//! `_quiver/catalog/<name>/<seq>.json`. A change reads the newest version, applies
//! itself, and writes the next one with put-if-absent, the same primitive Delta commits
//! rely on (a local folder, memory and S3 all offer it). Two writers that race for the
//! same version do not overwrite each other: one wins, the other reads the winner's
//! version and applies its change again. So two servers on one store, or two DDL
//! statements at once, never drop each other's change.
//!
//! Every version carries a `format` number. A reader refuses a format newer than it
//! knows (a downgrade), and reads the files an earlier release wrote (`streams.json`,
//! `views.json`, `tokens.json`, format 0) when no version exists yet. The few newest
//! versions are kept; older ones are deleted after each write.

use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt as _, PutMode, PutOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::{Error, Result, Store};

/// The format this release writes.
pub const FORMAT: u32 = 1;

/// Versions of a document kept after a write.
const KEEP: u64 = 10;

/// Most attempts at one change when other writers keep winning.
const MAX_ATTEMPTS: u32 = 64;

/// One stored version.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Version<T> {
    format: u32,
    seq: u64,
    /// The node that wrote it.
    written_by: String,
    written_at: String,
    data: T,
}

/// Only the header of a version, to check its format before its data.
#[derive(Debug, serde::Deserialize)]
struct Header {
    format: u32,
}

/// One kind of metadata: a value of type `T`, versioned in the store.
#[derive(Debug)]
pub struct Document<T> {
    store: Store,
    name: &'static str,
    /// File an earlier release kept this value in, read when no version exists yet.
    legacy: Option<&'static str>,
    node: String,
    _value: PhantomData<fn() -> T>,
}

impl<T> Document<T>
where
    T: Serialize + DeserializeOwned + Default,
{
    /// The document `name` (a folder name) in `store`, written as node `node`.
    /// `legacy` names the file (relative to the store root) that held the value before
    /// the catalog existed; it is read as the starting value and never written.
    pub fn new(
        store: &Store,
        name: &'static str,
        legacy: Option<&'static str>,
        node: &str,
    ) -> Self {
        Self {
            store: store.clone(),
            name,
            legacy,
            node: node.to_owned(),
            _value: PhantomData,
        }
    }

    /// The newest value (the legacy file's, or the default, when nothing was written).
    pub async fn read(&self) -> Result<T> {
        Ok(self.newest().await?.1)
    }

    /// Applies `change` to the newest value and stores the result as the next version,
    /// retrying on the value another writer stored meanwhile. Returns what `change`
    /// returned on the attempt that was stored, and the value stored.
    ///
    /// `change` may run several times; it must only compute from its input. If it
    /// fails, nothing is written and its error is returned.
    pub async fn update<R>(&self, mut change: impl FnMut(&mut T) -> Result<R>) -> Result<(R, T)>
    where
        T: Clone,
    {
        let store = self.store.object_store();
        for attempt in 1..=MAX_ATTEMPTS {
            let (seq, mut value) = self.newest().await?;
            let before = serde_json::to_vec(&value)?;
            let out = change(&mut value)?;
            // A change that changes nothing (a restart saving the same views) is not
            // another version.
            if serde_json::to_vec(&value)? == before {
                return Ok((out, value));
            }
            let next = seq + 1;
            let version = Version {
                format: FORMAT,
                seq: next,
                written_by: self.node.clone(),
                written_at: chrono::Utc::now().to_rfc3339(),
                data: value,
            };
            let body = serde_json::to_vec_pretty(&version)?;
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match store
                .put_opts(&self.version_path(next)?, body.into(), opts)
                .await
            {
                Ok(_) => {
                    self.prune(next).await;
                    return Ok((out, version.data));
                }
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {
                    debug!(
                        document = self.name,
                        seq = next,
                        attempt,
                        "another writer stored this version first; applying the change again"
                    );
                    let jitter = rand::random::<u64>() % (5 * u64::from(attempt.min(20)));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable {
            reason: format!(
                "the catalog's '{}' kept changing under {MAX_ATTEMPTS} attempts to write it",
                self.name
            ),
            retry_after_secs: 1,
        })
    }

    fn dir(&self) -> Result<ObjectPath> {
        self.store.path(&format!("_quiver/catalog/{}/", self.name))
    }

    fn version_path(&self, seq: u64) -> Result<ObjectPath> {
        self.store
            .path(&format!("_quiver/catalog/{}/{seq:020}.json", self.name))
    }

    /// Sequence numbers of the stored versions, ascending.
    async fn versions(&self) -> Result<Vec<u64>> {
        let store = self.store.object_store();
        let dir = self.dir()?;
        let mut listed = store.list(Some(&dir));
        let mut seqs = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta?;
            if let Some(seq) = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// The newest version's number and value; `(0, legacy or default)` when none.
    async fn newest(&self) -> Result<(u64, T)> {
        let store = self.store.object_store();
        // A version listed may be pruned by another writer before it is read; the
        // newest never is, so a retry finds it.
        for _ in 0..3 {
            let Some(&seq) = self.versions().await?.last() else {
                return Ok((0, self.read_legacy().await?));
            };
            let bytes = match store.get(&self.version_path(seq)?).await {
                Ok(got) => got.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            return Ok((seq, self.parse(seq, &bytes)?));
        }
        Err(Error::Config(format!(
            "the catalog's '{}' versions keep disappearing while read",
            self.name
        )))
    }

    fn parse(&self, seq: u64, bytes: &Bytes) -> Result<T> {
        let what = || format!("_quiver/catalog/{}/{seq:020}.json", self.name);
        let header: Header = serde_json::from_slice(bytes)
            .map_err(|e| Error::Config(format!("{} is not a catalog version: {e}", what())))?;
        if header.format > FORMAT {
            return Err(Error::Config(format!(
                "{} has format {}, newer than this release's {FORMAT}; run a newer Quiver",
                what(),
                header.format
            )));
        }
        let version: Version<T> = serde_json::from_slice(bytes)
            .map_err(|e| Error::Config(format!("{} is unreadable: {e}", what())))?;
        Ok(version.data)
    }

    async fn read_legacy(&self) -> Result<T> {
        let Some(legacy) = self.legacy else {
            return Ok(T::default());
        };
        let store = self.store.object_store();
        match store.get(&self.store.path(legacy)?).await {
            Ok(got) => {
                let bytes = got.bytes().await?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Config(format!("{legacy} is unreadable: {e}")))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(T::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes versions older than the newest `KEEP`; a failure only leaves files.
    async fn prune(&self, newest: u64) {
        let Ok(seqs) = self.versions().await else {
            return;
        };
        let store = self.store.object_store();
        for seq in seqs.into_iter().filter(|s| s + KEEP <= newest) {
            let Ok(path) = self.version_path(seq) else {
                continue;
            };
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    warn!(document = self.name, seq, error = %e, "cannot delete an old catalog version");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
