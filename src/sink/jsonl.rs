//! Appends one JSON object per lead to a file, or writes them to standard output.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{CustomerLead, LeadSink, Outcome, SinkError};

/// The local sink: JSON Lines, one lead per line.
#[derive(Debug)]
pub struct JsonlSink {
    target: Target,
    lock: Mutex<()>,
}

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
        }
    }

    async fn write(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        let _guard = self.lock.lock().await;
        match &self.target {
            Target::Stdout => {
                let mut out = tokio::io::stdout();
                out.write_all(&bytes).await?;
                out.flush().await
            }
            Target::File(path) => {
                // Open, append and sync in one blocking call (not one per step): the file
                // is opened per batch, so a rotated file is followed.
                let path = path.clone();
                tokio::task::spawn_blocking(move || append_durably(&path, &bytes))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }
}

/// Appends `bytes` to the file at `path` (created with its directory if missing) and
/// syncs it: delivered means on disk, as the checkpoint moves past these rows next.
fn append_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let mut file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            open()?
        }
        other => other?,
    };
    file.write_all(bytes)?;
    file.sync_data()
}

#[async_trait::async_trait]
impl LeadSink for JsonlSink {
    fn name(&self) -> &str {
        "jsonl"
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let mut bytes = Vec::with_capacity(batch.len() * 512);
        for lead in batch {
            // Serialising our own types cannot fail (string keys, no non-finite floats).
            serde_json::to_writer(&mut bytes, lead).expect("a lead serialises to JSON");
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

    async fn healthcheck(&self) -> Result<(), SinkError> {
        self.write(Vec::new()).await.map_err(|e| SinkError {
            sink: "jsonl".into(),
            message: format!("cannot write to {}: {e}", self.describe()),
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
    use crate::config::IdentitySettings;
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
