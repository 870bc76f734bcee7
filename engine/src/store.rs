//! Where tables live: a local folder, an S3 bucket, or memory.

use std::sync::{Arc, Once};

use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef, StorageConfig, default_logstore,
    logstore_factories, object_store_factories,
};
use deltalake::{DeltaResult, DeltaTableError};
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use url::Url;

use crate::{Error, Result};

/// A store location and the object store that reaches it.
#[derive(Debug, Clone)]
pub struct Store {
    /// Root of the store, always ending in `/`.
    url: Url,
    /// Object store rooted at the scheme's root (filesystem root, bucket, memory).
    root: Arc<dyn ObjectStore>,
}

impl Store {
    /// Opens a store from a location string: `file://path`, a plain path, `s3://bucket/prefix`
    /// (configured by the standard `AWS_*` variables, `AWS_ENDPOINT_URL` included) or `memory://`.
    pub fn open(location: &str) -> Result<Self> {
        register_s3();
        let url = if location.starts_with("memory://") {
            Url::parse("memory:///").map_err(|e| Error::Config(e.to_string()))?
        } else if let Some(rest) = location.strip_prefix("file://") {
            local_url(rest)?
        } else if location.starts_with("s3://") || location.starts_with("s3a://") {
            let mut url = Url::parse(location)
                .map_err(|e| Error::Config(format!("bad store URL '{location}': {e}")))?;
            if url.scheme() == "s3a" {
                url = Url::parse(&location.replacen("s3a://", "s3://", 1))
                    .map_err(|e| Error::Config(e.to_string()))?;
            }
            url
        } else if location.contains("://") {
            return Err(Error::Config(format!(
                "unsupported store '{location}': use file://PATH, s3://BUCKET/PREFIX or memory://"
            )));
        } else {
            local_url(location)?
        };
        let url = with_trailing_slash(url);
        let root: Arc<dyn ObjectStore> = match url.scheme() {
            "memory" => Arc::new(InMemory::new()),
            "file" => Arc::new(LocalFileSystem::new()),
            "s3" => s3_store(&url, &[])?,
            other => return Err(Error::Config(format!("unsupported store scheme '{other}'"))),
        };
        Ok(Self { url, root })
    }

    /// The store's root URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The object store for this location (rooted at the scheme root; use [`Store::path`]).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.root)
    }

    /// URL of a location under the store root (`rel` uses `/`).
    pub fn child_url(&self, rel: &str) -> Result<Url> {
        self.url
            .join(rel)
            .map_err(|e| Error::Config(format!("bad path '{rel}': {e}")))
    }

    /// Object path of a location under the store root, for use with [`Store::object_store`].
    pub fn path(&self, rel: &str) -> Result<ObjectPath> {
        let url = self.child_url(rel)?;
        ObjectPath::from_url_path(url.path()).map_err(|e| Error::Config(e.to_string()))
    }

    /// URL of a stream's Delta table.
    pub fn table_url(&self, stream: &str) -> Result<Url> {
        self.child_url(&format!("tables/{stream}/"))
    }
}

fn with_trailing_slash(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    url
}

fn local_url(path: &str) -> Result<Url> {
    std::fs::create_dir_all(path)
        .map_err(|e| Error::Config(format!("cannot create store folder '{path}': {e}")))?;
    let abs = std::fs::canonicalize(path)
        .map_err(|e| Error::Config(format!("cannot resolve store folder '{path}': {e}")))?;
    Url::from_directory_path(&abs)
        .map_err(|()| Error::Config(format!("bad store folder '{}'", abs.display())))
}

/// Reads a secret kept in a file (a mounted secret, a `*_FILE` variable's target): its
/// text without the trailing newline. An empty file is an error, so a secret that
/// failed to mount is not taken for an empty password.
pub fn read_secret_file(path: &std::path::Path) -> std::result::Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(format!("the secret file {} is empty", path.display()));
    }
    Ok(secret.to_owned())
}

/// Builds an S3 store for the bucket in `url` from `AWS_*` variables and `options`.
fn s3_store(url: &Url, options: &[(String, String)]) -> Result<Arc<dyn ObjectStore>> {
    let bucket = url
        .host_str()
        .ok_or_else(|| Error::Config(format!("no bucket in '{url}'")))?;
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        // Delta commits need put-if-absent; S3 and compatible servers honour If-None-Match.
        .with_conditional_put(S3ConditionalPut::ETagMatch);
    if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL")
        && endpoint.starts_with("http://")
    {
        builder = builder.with_allow_http(true);
    }
    // Credentials may come from files (mounted secrets) rather than the environment.
    for (var, key) in [
        ("AWS_ACCESS_KEY_ID_FILE", AmazonS3ConfigKey::AccessKeyId),
        (
            "AWS_SECRET_ACCESS_KEY_FILE",
            AmazonS3ConfigKey::SecretAccessKey,
        ),
        ("AWS_SESSION_TOKEN_FILE", AmazonS3ConfigKey::Token),
    ] {
        if let Some(path) = std::env::var_os(var) {
            let value = read_secret_file(std::path::Path::new(&path))
                .map_err(|e| Error::Config(format!("{var}: {e}")))?;
            builder = builder.with_config(key, value);
        }
    }
    for (k, v) in options {
        if let Ok(key) = k.to_ascii_lowercase().parse() {
            builder = builder.with_config(key, v);
        }
    }
    Ok(Arc::new(builder.build()?))
}

#[derive(Debug)]
struct S3Factories;

impl ObjectStoreFactory for S3Factories {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, ObjectPath)> {
        let opts: Vec<(String, String)> = config
            .raw
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let store = s3_store(url, &opts).map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        let path = ObjectPath::from_url_path(url.path())
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        Ok((store, path))
    }
}

impl LogStoreFactory for S3Factories {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        // Commits use put-if-absent (`If-None-Match: *`), so the default log store is safe
        // for concurrent writers without an external lock table.
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// Teaches deltalake the `s3://` scheme, once per process.
pub(crate) fn register_s3() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(scheme) = Url::parse("s3://") else {
            return;
        };
        object_store_factories().insert(scheme.clone(), Arc::new(S3Factories));
        logstore_factories().insert(scheme, Arc::new(S3Factories));
    });
}
