//! The one asset downloader: mirrors tried in order, SHA-256 computed while streaming, a temp
//! file renamed into place only once verified, a cross-process lock so parallel test processes
//! download once, and a record of the verified digest so a cache hit never re-hashes.

use crate::support::lock;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// A file known by its digest, with the places it can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub file_name: String,
    pub urls: Vec<String>,
    pub sha256: String,
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub url: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("artifact {file_name:?} is not valid: {reason}")]
    InvalidArtifact { file_name: String, reason: String },
    #[error(
        "cannot use the download cache {dir}: {source} (set DEVICELAB_DATA_DIR to a writable directory)"
    )]
    CacheDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another process held the download lock {path} for {waited:.0?} ({holder}): is it hung? \
         (it is released when that process exits)"
    )]
    LockTimeout {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
    #[error("could not download {file_name} from any of its {} mirror(s):\n{}", attempts.len(), Attempts(attempts))]
    AllMirrorsFailed {
        file_name: String,
        attempts: Vec<Attempt>,
    },
}

struct Attempts<'a>(&'a [Attempt]);
impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in self.0 {
            writeln!(f, "  {}: {}", a.url, a.reason)?;
        }
        Ok(())
    }
}

/// What is recorded beside a verified file: the digest, and the size and mtime it had then.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct VerifiedRecord {
    sha256: String,
    size: u64,
    mtime_ns: i64,
}

impl Artifact {
    fn validate(&self) -> Result<(), DownloadError> {
        let invalid = |reason: &str| DownloadError::InvalidArtifact {
            file_name: self.file_name.clone(),
            reason: reason.to_owned(),
        };
        if self.file_name.is_empty()
            || self.file_name.contains('/')
            || self.file_name.starts_with('.')
        {
            return Err(invalid(
                "the file name must be a plain name, without '/' or a leading '.'",
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid("sha256 must be 64 hex digits"));
        }
        if self.urls.is_empty() {
            return Err(invalid("no URL to download it from"));
        }
        Ok(())
    }
}

/// Shows a download's progress: file name, bytes so far, bytes expected.
pub type ShowProgress = Box<dyn Fn(&str, u64, Option<u64>) + Send + Sync>;

static PROGRESS: std::sync::OnceLock<ShowProgress> = std::sync::OnceLock::new();

/// Replaces the progress lines logged every 5 s with `show`, called on every chunk: a
/// terminal's progress bar (`devicelab fetch`). Once per process.
pub fn show_progress_with(show: ShowProgress) {
    let _ = PROGRESS.set(show);
}

/// How long a download waits for another process downloading the same file: a cloud image
/// over a slow link takes minutes, not an hour.
const DOWNLOAD_LOCK_BUDGET: Duration = Duration::from_secs(60 * 60);

/// Returns the path of the verified file in `cache_dir`, downloading it first if needed.
pub async fn fetch(cache_dir: &Path, artifact: &Artifact) -> Result<PathBuf, DownloadError> {
    artifact.validate()?;
    let cache_err = |source| DownloadError::CacheDir {
        dir: cache_dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(cache_dir).map_err(cache_err)?;
    let target = cache_dir.join(&artifact.file_name);
    let lock_path = cache_dir.join(format!(".{}.lock", artifact.file_name));
    // Another process may be downloading the same file: wait for it (within a budget), then
    // use its result.
    let holder = format!("downloading {}", artifact.file_name);
    let lock = {
        let path = lock_path.clone();
        tokio::task::spawn_blocking(move || lock::lock_within(&path, &holder, DOWNLOAD_LOCK_BUDGET))
            .await
            .map_err(|e| cache_err(std::io::Error::other(e)))?
            .map_err(|e| match e {
                lock::WaitError::Io(source) => cache_err(source),
                lock::WaitError::Timeout { holder, waited } => DownloadError::LockTimeout {
                    path: lock_path.clone(),
                    holder,
                    waited,
                },
            })?
    };

    if is_verified(&target, &artifact.sha256) {
        tracing::debug!(file = %target.display(), "cache hit");
        return Ok(target);
    }
    // A file without a matching record (copied in by hand, or an older run died between the
    // rename and the record): hash it once rather than downloading again.
    if target.exists() {
        match hash_file(&target).await {
            Ok(digest) if digest.eq_ignore_ascii_case(&artifact.sha256) => {
                record_verified(&target, &artifact.sha256).map_err(cache_err)?;
                return Ok(target);
            }
            // Downloaded again and renamed over it: a VM running from the old file keeps it.
            _ => {
                tracing::warn!(file = %target.display(), "cached file does not match its sha256; downloading again");
            }
        }
    }

    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| DownloadError::AllMirrorsFailed {
            file_name: artifact.file_name.clone(),
            attempts: vec![Attempt {
                url: "(no request made)".into(),
                reason: format!("cannot build the HTTP client: {e}"),
            }],
        })?;
    let mut attempts = Vec::new();
    for url in &artifact.urls {
        match download_one(&client, url, &target, artifact).await {
            Ok(()) => {
                record_verified(&target, &artifact.sha256).map_err(cache_err)?;
                drop(lock);
                return Ok(target);
            }
            Err(reason) => {
                tracing::warn!(%url, %reason, "download failed, trying the next mirror");
                attempts.push(Attempt {
                    url: url.clone(),
                    reason,
                });
            }
        }
    }
    Err(DownloadError::AllMirrorsFailed {
        file_name: artifact.file_name.clone(),
        attempts,
    })
}

/// Streams `url` into `<target>.part`, hashing as it goes; renames only a verified file.
/// Any failure removes the partial file.
async fn download_one(
    client: &reqwest::Client,
    url: &str,
    target: &Path,
    artifact: &Artifact,
) -> Result<(), String> {
    let part = target.with_file_name(format!(".{}.part", artifact.file_name));
    let result = stream_to(client, url, &part, artifact).await;
    match result {
        Ok(()) => std::fs::rename(&part, target).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            format!("cannot move the download into place: {e}")
        }),
        Err(reason) => {
            let _ = std::fs::remove_file(&part);
            Err(reason)
        }
    }
}

async fn stream_to(
    client: &reqwest::Client,
    url: &str,
    part: &Path,
    artifact: &Artifact,
) -> Result<(), String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let expected_len = artifact.size.or(response.content_length());
    // tokio's file: every write and the final fsync run off the runtime's workers.
    let mut file = tokio::fs::File::create(part)
        .await
        .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut stream = response.bytes_stream();
    let started = Instant::now();
    let mut last_report = Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| format!("transfer interrupted after {received} bytes: {e}"))?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| {
            format!(
                "cannot write {} after {received} bytes: {e} (is the disk full? free space in {})",
                part.display(),
                part.parent()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            )
        })?;
        received += chunk.len() as u64;
        if let Some(max) = artifact.size
            && received > max
        {
            return Err(format!("server sent more than the pinned {max} bytes"));
        }
        if let Some(show) = PROGRESS.get() {
            show(&artifact.file_name, received, expected_len);
        } else if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let mib = received as f64 / 1048576.0;
            let rate = mib / started.elapsed().as_secs_f64().max(0.001);
            match expected_len {
                Some(total) => tracing::info!(
                    "downloading {}: {mib:.0} of {:.0} MiB ({:.0}%), {rate:.1} MiB/s",
                    artifact.file_name,
                    total as f64 / 1048576.0,
                    received as f64 * 100.0 / total.max(1) as f64
                ),
                None => tracing::info!(
                    "downloading {}: {mib:.0} MiB, {rate:.1} MiB/s",
                    artifact.file_name
                ),
            }
        }
    }
    if let Some(expected) = expected_len
        && received != expected
    {
        return Err(format!("truncated: got {received} of {expected} bytes"));
    }
    let digest = hex::encode(hasher.finalize());
    if !digest.eq_ignore_ascii_case(&artifact.sha256) {
        return Err(format!(
            "sha256 mismatch: expected {}, got {digest} (the mirror serves a different file: fix the pinned digest)",
            artifact.sha256
        ));
    }
    file.sync_all()
        .await
        .map_err(|e| format!("cannot sync {}: {e}", part.display()))?;
    Ok(())
}

/// A cached file whose bytes no longer match the digest it was verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotted {
    /// The digest it was downloaded and verified against.
    pub expected: String,
    /// Its digest now.
    pub got: String,
}

/// Hashes a file of the download cache again, as after a boot from it failed (were its bytes
/// the cause?); at most once per file in a process. `None` for a file that still matches and
/// for one without a record. One whose bytes changed on disk loses its record: the next fetch
/// hashes it, finds it changed and downloads a good copy, renamed over it (VMs running from
/// the old file keep theirs).
pub async fn recheck(target: &Path) -> std::io::Result<Option<Rotted>> {
    static RECHECKED: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    if !RECHECKED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(target.to_owned())
    {
        return Ok(None);
    }
    let Ok(text) = tokio::fs::read_to_string(record_path(target)).await else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_str::<VerifiedRecord>(&text) else {
        return Ok(None);
    };
    let got = hash_file(target).await?;
    if got.eq_ignore_ascii_case(&record.sha256) {
        return Ok(None);
    }
    match tokio::fs::remove_file(record_path(target)).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(Some(Rotted {
        expected: record.sha256,
        got,
    }))
}

fn record_path(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.verified.json"))
}

fn is_verified(target: &Path, sha256: &str) -> bool {
    std::fs::metadata(target)
        .ok()
        .and_then(|meta| fresh_record(&record_path(target), &meta))
        .is_some_and(|record| record.sha256.eq_ignore_ascii_case(sha256))
}

/// The record at `record_file`, if it was made of a file of `meta`'s size and modification time.
fn fresh_record(record_file: &Path, meta: &std::fs::Metadata) -> Option<VerifiedRecord> {
    let record: VerifiedRecord =
        serde_json::from_str(&std::fs::read_to_string(record_file).ok()?).ok()?;
    (record.size == meta.len() && record.mtime_ns == mtime_ns(meta)).then_some(record)
}

fn record_verified(target: &Path, sha256: &str) -> std::io::Result<()> {
    let meta = std::fs::metadata(target)?;
    write_record(
        &record_path(target),
        &VerifiedRecord {
            sha256: sha256.to_ascii_lowercase(),
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
        },
    )
}

/// Writes `record` to `record_file` through a temp file of this writer's own and a rename: a
/// reader sees the old record or the new one, never half of one.
fn write_record(record_file: &Path, record: &VerifiedRecord) -> std::io::Result<()> {
    let name = record_file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    let tmp = record_file.with_file_name(format!(
        ".{name}.{}.{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = std::fs::write(&tmp, serde_json::to_vec(record).expect("record serializes"))
        .and_then(|()| std::fs::rename(&tmp, record_file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// The SHA-256 of a local file's bytes: hashed once, then read from a record in `records`
/// (named for the file's path) while the file keeps its size and modification time. Blocking.
pub fn local_digest(path: &Path, records: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let key = hex::encode(Sha256::digest(path.as_os_str().as_encoded_bytes()));
    let record_file = records.join(format!("{}.json", &key[..16]));
    if let Some(record) = fresh_record(&record_file, &meta) {
        return Ok(record.sha256);
    }
    let record = VerifiedRecord {
        sha256: sha256_of(path)?,
        // As it was before the hashing: a file changed meanwhile is hashed again next time.
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
    };
    // Only a shortcut for the next time: a record that cannot be written costs a hash then.
    if let Err(e) = lock::private_dir(records).and_then(|()| write_record(&record_file, &record)) {
        tracing::warn!(
            "cannot record the digest of {} in {}: {e} (it is hashed again next time)",
            path.display(),
            records.display()
        );
    }
    Ok(record.sha256)
}

/// SHA-256 of a file (lower-case hex). Blocking.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-256 of a file, off the async threads.
pub async fn hash_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || sha256_of(&path))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// A local image is hashed once: the digest comes from its record while the file keeps its
    /// size and modification time (here even over changed bytes, to show the record is what
    /// answers), and is hashed again once either changes.
    #[test]
    fn a_local_digest_is_recorded_and_rehashed_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (image, records) = (dir.path().join("image"), dir.path().join("records"));
        std::fs::write(&image, b"first bytes").unwrap();
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let touch = |at: SystemTime| {
            File::options()
                .write(true)
                .open(&image)
                .unwrap()
                .set_modified(at)
                .unwrap()
        };
        touch(when);
        let first = local_digest(&image, &records).unwrap();
        assert_eq!(first, hex::encode(Sha256::digest(b"first bytes")));

        std::fs::write(&image, b"other bytes").unwrap();
        touch(when);
        assert_eq!(
            local_digest(&image, &records).unwrap(),
            first,
            "from the record"
        );

        touch(when + Duration::from_secs(1));
        assert_eq!(
            local_digest(&image, &records).unwrap(),
            hex::encode(Sha256::digest(b"other bytes")),
            "hashed again"
        );
        let names: Vec<String> = std::fs::read_dir(&records)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "one record, no temp file left: {names:?}");
    }
}
