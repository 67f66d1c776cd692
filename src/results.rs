//! The result store: where job results and kept duplicate-protection results live, named by
//! `[results] url`. A local folder on one node (`file://data/results`), S3-compatible object
//! storage when several replicas must read what one of them wrote (`s3://bucket/prefix`,
//! credentials and endpoint from the usual `AWS_*` environment variables).
//!
//! Everything goes through one `Arc<dyn ObjectStore>`: a single node runs the same code on a
//! folder that replicas run on S3. An object is visible only once it is whole: a write is
//! staged (a temporary file renamed into place, or an S3 multipart upload completed) and a
//! writer dropped before [`ResultWriter::finish`] leaves nothing behind.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use tokio::io::AsyncWriteExt;

use crate::private_fs;

/// What `[results] url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A folder on this machine (relative paths from the working directory).
    Folder(PathBuf),
    /// A bucket, and a prefix inside it (possibly empty).
    S3 { bucket: String, prefix: String },
}

impl Location {
    /// Reads `file://<path>` or `s3://<bucket>[/<prefix>]`; the message says what is wrong.
    pub fn parse(url: &str) -> Result<Location, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err("file:// must name a folder, as in file://data/results".into());
            }
            return Ok(Location::Folder(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err("s3:// must name a bucket, as in s3://imagegate-results/prod".into());
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        Err("must start with file:// (a local folder) or s3:// (S3-compatible storage)".into())
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Folder(path) => write!(f, "file://{}", path.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// The variables an S3 result store takes from the gateway's environment lookup (see
/// [`Results::open`]): where the server is and how to sign for it.
pub const S3_VARIABLES: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
];

/// A result store error, with its source kept.
#[derive(Debug, thiserror::Error)]
#[error("result store {location}: {source}")]
pub struct ResultsError {
    location: Arc<str>,
    #[source]
    source: object_store::Error,
}

/// One stored object, as a listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its name, as given to [`Results::writer`].
    pub name: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// An object being read: its size, then its bytes as they arrive.
pub struct Reading {
    pub size: u64,
    pub body: Body,
}

/// The result store. Cheap to clone.
#[derive(Clone)]
pub struct Results {
    store: Arc<dyn ObjectStore>,
    /// The S3 prefix (empty for a folder, whose root is the folder itself).
    prefix: Arc<str>,
    location: Arc<str>,
    /// The folder of a `file://` store: objects there are made imagegate's own (see
    /// [`private_fs`]), which `object_store` leaves to the umask.
    folder: Option<Arc<std::path::Path>>,
}

impl Results {
    /// Opens the store at `location`; a folder is created (0700) if missing. S3 reads its
    /// settings from the process environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT_URL` for servers other than AWS, `AWS_ALLOW_HTTP`, ...),
    /// then from `env` for the variables in [`S3_VARIABLES`]: the gateway's own lookup,
    /// the process environment again in production, the tests' S3 server in tests.
    pub fn open(
        location: &Location,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Results> {
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match location {
            Location::Folder(path) => {
                private_fs::create_dir_all(path).map_err(|e| {
                    anyhow::anyhow!("results.url {location}: cannot create the folder: {e}")
                })?;
                let store = LocalFileSystem::new_with_prefix(path).map_err(|e| {
                    anyhow::anyhow!("results.url {location}: cannot open the folder: {e}")
                })?;
                (Arc::new(store), String::new())
            }
            Location::S3 { bucket, prefix } => {
                let mut builder = AmazonS3Builder::from_env();
                for name in S3_VARIABLES {
                    if let (Some(value), Ok(key)) = (
                        env(name),
                        name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>(),
                    ) {
                        builder = builder.with_config(key, value);
                    }
                }
                let store = builder
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| anyhow::anyhow!("results.url {location}: {e}"))?;
                (Arc::new(store), prefix.clone())
            }
        };
        Ok(Results {
            store,
            prefix: prefix.into(),
            folder: match location {
                Location::Folder(path) => Some(Arc::from(path.as_path())),
                Location::S3 { .. } => None,
            },
            location: location.to_string().into(),
        })
    }

    /// Where the results are, for logs and messages (holds no secret).
    pub fn location(&self) -> &str {
        &self.location
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn err(&self, source: object_store::Error) -> ResultsError {
        ResultsError {
            location: Arc::clone(&self.location),
            source,
        }
    }

    /// Starts writing the object `name` (a `/`-separated name such as `jobs/imgjob_...`).
    pub fn writer(&self, name: &str) -> ResultWriter {
        self.private_parent(name);
        ResultWriter {
            inner: Some(BufWriter::new(Arc::clone(&self.store), self.path(name))),
            written: 0,
            results: self.clone(),
            name: name.to_owned(),
        }
    }

    /// Stores `bytes` whole as `name`.
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), ResultsError> {
        self.private_parent(name);
        self.store
            .put(&self.path(name), PutPayload::from_bytes(bytes))
            .await
            .map(|_| self.private_object(name))
            .map_err(|e| self.err(e))
    }

    /// In a folder, creates the object's parent folders 0700 before `object_store` would
    /// create them with the umask's mode. A failure is left to the write to report.
    fn private_parent(&self, name: &str) {
        if let Some(parent) = self
            .folder
            .as_ref()
            .and_then(|folder| folder.join(name).parent().map(|p| p.to_owned()))
        {
            let _ = private_fs::create_dir_all(&parent);
        }
    }

    /// In a folder, makes a finished object 0600 (it was staged with the umask's mode,
    /// inside folders only imagegate's user can enter).
    fn private_object(&self, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        if let Some(folder) = &self.folder {
            let mode = std::fs::Permissions::from_mode(private_fs::FILE_MODE);
            if let Err(err) = std::fs::set_permissions(folder.join(name), mode) {
                tracing::warn!(%err, "could not make a stored result imagegate's own (0600)");
            }
        }
    }

    /// Reads `name`; `None` when there is no such object.
    pub async fn read(&self, name: &str) -> Result<Option<Reading>, ResultsError> {
        match self.store.get(&self.path(name)).await {
            Ok(got) => {
                let size = got.meta.size;
                let location = Arc::clone(&self.location);
                let stream = got.into_stream().map_err(move |source| ResultsError {
                    location: Arc::clone(&location),
                    source,
                });
                Ok(Some(Reading {
                    size,
                    body: Body::from_stream(stream),
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Reads `name` whole; `None` when there is no such object.
    pub async fn read_all(&self, name: &str) -> Result<Option<Bytes>, ResultsError> {
        match self.store.get(&self.path(name)).await {
            Ok(got) => got.bytes().await.map(Some).map_err(|e| self.err(e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Deletes `name`; true when it existed (S3 cannot tell, and says true).
    pub async fn delete(&self, name: &str) -> Result<bool, ResultsError> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Every object whose name starts with `folder/` (retention sweeps read their ages).
    pub async fn list(&self, folder: &str) -> Result<Vec<Listed>, ResultsError> {
        let base = self.path(folder);
        let skip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut listed = Vec::new();
        let mut stream = self.store.list(Some(&base));
        while let Some(meta) = stream.next().await {
            let meta = match meta {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(self.err(e)),
            };
            let full = meta.location.as_ref();
            listed.push(Listed {
                name: full.get(skip..).unwrap_or(full).to_owned(),
                size: meta.size,
                last_modified: meta.last_modified,
            });
        }
        Ok(listed)
    }
}

/// An object being written. Nothing is visible under its name until [`finish`] returns;
/// dropped before that, the staged part is discarded.
///
/// [`finish`]: ResultWriter::finish
pub struct ResultWriter {
    inner: Option<BufWriter>,
    written: u64,
    results: Results,
    name: String,
}

impl ResultWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ResultsError> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(());
        };
        inner
            .write_all(chunk)
            .await
            .map_err(|e| self.results.err(io_to_store(e)))?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes the object visible, whole; returns its size.
    pub async fn finish(mut self) -> Result<u64, ResultsError> {
        if let Some(mut inner) = self.inner.take() {
            inner
                .shutdown()
                .await
                .map_err(|e| self.results.err(io_to_store(e)))?;
        }
        self.results.private_object(&self.name);
        Ok(self.written)
    }
}

impl Drop for ResultWriter {
    fn drop(&mut self) {
        if let Some(mut inner) = self.inner.take() {
            // Discards the staged upload; a folder's staging file is removed by the abort.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = inner.abort().await;
                });
            }
        }
    }
}

fn io_to_store(err: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "results",
        source: Box::new(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_folder_or_a_bucket() {
        assert_eq!(
            Location::parse("file://data/results"),
            Ok(Location::Folder(PathBuf::from("data/results")))
        );
        assert_eq!(
            Location::parse("file:///var/lib/imagegate"),
            Ok(Location::Folder(PathBuf::from("/var/lib/imagegate")))
        );
        assert_eq!(
            Location::parse("s3://bucket/a/b/"),
            Ok(Location::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            })
        );
        assert_eq!(
            Location::parse("s3://bucket"),
            Ok(Location::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            })
        );
        for bad in ["", "data/results", "file://", "s3://", "s3:///x", "gs://b"] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_folder_shows_an_object_only_once_it_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let results = Results::open(&Location::Folder(dir.path().join("r")), &|_| None).unwrap();
        let mut writer = results.writer("jobs/a");
        writer.write(b"hello ").await.unwrap();
        assert!(results.read_all("jobs/a").await.unwrap().is_none());
        writer.write(b"world").await.unwrap();
        assert_eq!(writer.finish().await.unwrap(), 11);
        assert_eq!(
            results.read_all("jobs/a").await.unwrap().unwrap(),
            Bytes::from_static(b"hello world")
        );
        let reading = results.read("jobs/a").await.unwrap().unwrap();
        assert_eq!(reading.size, 11);

        let mut dropped = results.writer("jobs/b");
        dropped.write(b"half").await.unwrap();
        drop(dropped);
        assert!(results.read_all("jobs/b").await.unwrap().is_none());

        results
            .put("kept/c", Bytes::from_static(b"c"))
            .await
            .unwrap();
        let mut names: Vec<_> = results
            .list("jobs")
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        names.sort();
        assert_eq!(names, ["jobs/a"]);
        assert!(results.delete("jobs/a").await.unwrap());
        assert!(results.read("jobs/a").await.unwrap().is_none());
        assert!(results.list("none").await.unwrap().is_empty());
    }
}
