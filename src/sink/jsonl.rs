//! Appends one JSON object per lead to a file, or writes them to standard output.
//! A file is synced by [`LeadSink::sync`], which the pipeline calls once per page before
//! it commits that page's outcomes, in the task that commits them: the fsync is off the
//! path of the next page's delivery.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{CustomerLead, LeadSink, Outcome, SinkError};

/// The local sink: JSON Lines, one lead per line.
#[derive(Debug)]
pub struct JsonlSink {
    target: Target,
    lock: Mutex<()>,
    /// Files appended to since the last [`LeadSink::sync`], one handle per file.
    unsynced: std::sync::Mutex<Vec<std::fs::File>>,
    /// The last batch's buffer, cleared and reused by the next: a page of leads is a
    /// megabyte or two of JSON, which a fresh buffer would grow into by reallocating and
    /// page-faulting every time.
    spare: std::sync::Mutex<Vec<u8>>,
}

/// A spare buffer larger than this is dropped rather than kept (one unusually large
/// batch does not pin its memory for the life of the daemon).
const SPARE_MAX: usize = 8 << 20;

#[derive(Debug, Clone)]
enum Target {
    Stdout,
    File(PathBuf),
}

impl JsonlSink {
    /// `-` means standard output; anything else is a file, created if missing, appended to.
    pub fn new(path: &Path) -> Self {
        let target = if path == Path::new("-") {
            Target::Stdout
        } else {
            Target::File(path.to_owned())
        };
        Self {
            target,
            lock: Mutex::new(()),
            unsynced: std::sync::Mutex::new(Vec::new()),
            spare: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Writes `bytes` and keeps the buffer for the next batch.
    async fn write(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        let _guard = self.lock.lock().await;
        match &self.target {
            Target::Stdout => {
                let mut out = tokio::io::stdout();
                out.write_all(&bytes).await?;
                self.keep(bytes);
                out.flush().await
            }
            Target::File(path) => {
                // Open and append in one blocking call (not one per step): the file is
                // opened per batch, so a rotated file is followed. It is synced later, by
                // `sync`, before the pipeline commits these leads as delivered.
                let path = path.clone();
                let (file, bytes) = tokio::task::spawn_blocking(move || {
                    append(&path, &bytes).map(|file| (file, bytes))
                })
                .await
                .map_err(std::io::Error::other)??;
                self.keep(bytes);
                let mut unsynced = self.unsynced.lock().expect("not poisoned");
                if !unsynced.iter().any(|f| same_file(f, &file)) {
                    unsynced.push(file);
                }
                Ok(())
            }
        }
    }
}

impl JsonlSink {
    /// An empty buffer for a batch of `leads`: the spare one when there is one.
    fn buffer(&self, leads: usize) -> Vec<u8> {
        let mut bytes = std::mem::take(&mut *self.spare.lock().expect("not poisoned"));
        bytes.clear();
        bytes.reserve(leads * 512);
        bytes
    }

    fn keep(&self, bytes: Vec<u8>) {
        if bytes.capacity() <= SPARE_MAX {
            *self.spare.lock().expect("not poisoned") = bytes;
        }
    }
}

/// Appends `bytes` to the file at `path` (created with its directory if missing) and
/// returns the open file, not yet synced.
///
/// A write that fails half-way (disk full, a file size limit) is cut back off, so the
/// file never keeps a torn line for the next append to be glued to; and should a torn
/// line be there anyway (the process killed mid-write), the next append starts on a
/// line of its own. When the file is created (first run, or after a rotation) its
/// directory is synced too, so the file's name is as durable as its lines.
fn append(path: &Path, bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let open = |create: bool| {
        crate::private_fs::options()
            .create(create)
            .read(true)
            .append(true)
            .open(path)
    };
    let (mut file, created) = match open(false) {
        Ok(file) => (file, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(parent) = parent {
                crate::private_fs::create_dir_all(parent)?;
            }
            let file = open(true)?;
            sync_dir(parent.unwrap_or(Path::new(".")))?;
            (file, true)
        }
        Err(e) => return Err(e),
    };
    if bytes.is_empty() {
        return Ok(file);
    }
    let len = if created { 0 } else { file.metadata()?.len() };
    let mut torn = false;
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        torn = last[0] != b'\n';
    }
    let written = if torn {
        file.write_all(b"\n").and_then(|()| file.write_all(bytes))
    } else {
        file.write_all(bytes)
    };
    if let Err(e) = written {
        // Best effort: if even this fails, the next append starts a line of its own.
        let _ = file.set_len(len);
        return Err(e);
    }
    Ok(file)
}

/// Makes a new entry in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Two handles on one file: syncing either makes both's writes durable, so one is kept.
#[cfg(unix)]
fn same_file(a: &std::fs::File, b: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::File, _: &std::fs::File) -> bool {
    false
}

#[async_trait::async_trait]
impl LeadSink for JsonlSink {
    fn name(&self) -> &str {
        "jsonl"
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let mut bytes = self.buffer(batch.len());
        for lead in batch {
            // Exactly what serde_json writes for the lead, faster (see `json_line`).
            super::json_line::write_lead(&mut bytes, lead);
            bytes.push(b'\n');
        }
        match self.write(bytes).await {
            Ok(()) => vec![Outcome::Delivered; batch.len()],
            Err(e) => {
                let reason = format!("cannot write to {}: {e}", self.describe());
                vec![
                    Outcome::RetryLater {
                        after: None,
                        reason
                    };
                    batch.len()
                ]
            }
        }
    }

    /// Syncs every file appended to since the last call: delivered means on disk from
    /// here, as the pipeline commits these leads as delivered next.
    async fn sync(&self) -> Result<(), SinkError> {
        let files = std::mem::take(&mut *self.unsynced.lock().expect("not poisoned"));
        if files.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || files.iter().try_for_each(|f| f.sync_data()))
            .await
            .map_err(std::io::Error::other)
            .and_then(|synced| synced)
            .map_err(|e| SinkError::new("jsonl", format!("cannot sync {}: {e}", self.describe())))
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        self.write(Vec::new()).await.map_err(|e| {
            SinkError::new("jsonl", format!("cannot write to {}: {e}", self.describe()))
        })
    }
}

impl JsonlSink {
    fn describe(&self) -> String {
        match &self.target {
            Target::Stdout => "standard output".into(),
            Target::File(path) => path.display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentitySettings;
    use crate::identity::{CustomerKey, CustomerState};

    fn lead(email: &str) -> CustomerLead {
        let settings = IdentitySettings::default();
        let mut state = CustomerState::new(&CustomerKey::Email(email.into()), &settings);
        state.apply([], &settings);
        state.lead
    }

    #[tokio::test]
    async fn batches_are_appended_as_lines_into_a_directory_created_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/leads.jsonl");
        let sink = JsonlSink::new(&path);
        sink.healthcheck().await.unwrap();
        let first = sink.deliver(&[lead("a@b.c"), lead("d@e.f")]).await;
        let second = sink.deliver(&[lead("g@h.i")]).await;
        assert_eq!(first, vec![Outcome::Delivered; 2]);
        assert_eq!(second, vec![Outcome::Delivered]);
        let text = std::fs::read_to_string(&path).unwrap();
        let keys: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<CustomerLead>(l).unwrap().key)
            .collect();
        assert_eq!(keys, ["email:a@b.c", "email:d@e.f", "email:g@h.i"]);
    }

    #[tokio::test]
    async fn sync_syncs_each_file_appended_to_once_and_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leads.jsonl");
        let sink = JsonlSink::new(&path);
        let unsynced = || sink.unsynced.lock().unwrap().len();
        sink.deliver(&[lead("a@b.c")]).await;
        sink.deliver(&[lead("d@e.f")]).await;
        assert_eq!(
            unsynced(),
            1,
            "two batches into one file: one handle to sync"
        );
        std::fs::rename(&path, dir.path().join("leads.jsonl.1")).unwrap();
        sink.deliver(&[lead("g@h.i")]).await;
        assert_eq!(unsynced(), 2, "the rotated file and the new one");
        sink.sync().await.unwrap();
        assert_eq!(unsynced(), 0);
        sink.sync().await.unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("leads.jsonl.1")).unwrap();
        assert_eq!(rotated.lines().count(), 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[tokio::test]
    async fn a_torn_line_left_by_a_killed_process_is_not_glued_to_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leads.jsonl");
        std::fs::write(&path, "{\"key\":\"email:a@b.c\"}\n{\"key\":\"em").unwrap();
        let sink = JsonlSink::new(&path);
        assert_eq!(sink.deliver(&[lead("d@e.f")]).await, [Outcome::Delivered]);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1], "{\"key\":\"em", "the torn line stays alone");
        let last: CustomerLead = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(last.key, "email:d@e.f");
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_written_means_retry_later_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let sink = JsonlSink::new(dir.path());
        let outcomes = sink.deliver(&[lead("a@b.c")]).await;
        match &outcomes[..] {
            [Outcome::RetryLater { reason, .. }] => {
                assert!(
                    reason.contains(&dir.path().display().to_string()),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
