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

    async fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let _guard = self.lock.lock().await;
        match &self.target {
            Target::Stdout => {
                let mut out = tokio::io::stdout();
                out.write_all(bytes).await?;
                out.flush().await
            }
            Target::File(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let mut file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?;
                file.write_all(bytes).await?;
                // Delivered means on disk: the checkpoint moves past these rows next.
                file.sync_data().await
            }
        }
    }
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
        match self.write(&bytes).await {
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
        self.write(b"").await.map_err(|e| SinkError {
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
