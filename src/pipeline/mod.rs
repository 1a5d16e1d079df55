//! One poll: read the window -> drop rows already handled -> normalise -> apply policy
//! -> deliver -> settle -> move the checkpoint.
//!
//! Why the checkpoint is safe:
//! - Rows come back in (PartitionKey, RowKey) order, not in Timestamp order, so the
//!   checkpoint moves only after a *complete* pass over the window; an interrupted poll
//!   leaves it where it was.
//! - It moves to the newest Timestamp seen, but never past the oldest row whose
//!   outcome is still open (the sink said "retry later"), so that row is read again.
//! - Every poll re-reads `checkpoint - overlap`, because a row can become visible after
//!   a later-stamped row was read; re-reading delivers nothing twice, and a row changed
//!   since (new ETag) is handled again. The (PartitionKey, RowKey, ETag) of every row
//!   settled without delivery is remembered for that window; a delivered row's version
//!   is in its customer's history (committed with its outcome), where the merge
//!   recognises it. The table store remembers delivered rows too.

mod deliver;
pub mod metrics;
mod page;
pub mod policy;
mod poll;
mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::identity::{CustomerState, IdentitySettings};
use crate::lead::LeadEvent;
use crate::pipeline::policy::PolicySettings;
use crate::sink::LeadSink;
use crate::source::row::RawRow;
use crate::source::{SourceError, TableSource};
use crate::state::{RowVersion, Settled, Settlement, StateError, StateStore};
use crate::timestamp;

pub use window::WINDOW_PAGES;

/// Why a poll did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
    /// The sink could not make what it delivered durable; the outcomes were not
    /// committed, so those rows are read and delivered again.
    #[error("{0}; the delivered leads were not committed and will be delivered again")]
    Sink(#[from] crate::sink::SinkError),
    /// Shutdown was requested between two pages; the checkpoint was not moved.
    #[error("poll interrupted by shutdown after {pages} pages; the checkpoint was not moved")]
    Interrupted { pages: u64 },
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollSummary {
    /// Entities returned by the table (including ones already handled).
    pub rows_read: u64,
    /// Rows skipped because this version was handled by an earlier poll (remembered by
    /// the store, or, for a delivered row, found in its customer's history).
    pub already_handled: u64,
    /// Rows whose customer record the sink acknowledged.
    pub delivered: u64,
    /// Rows deliberately not sent (test leads, do-not-contact).
    pub skipped: u64,
    /// Rows that cannot become a lead, or whose customer the sink refused for good.
    pub rejected: u64,
    /// Rows held because they cannot be attributed to a customer.
    pub unidentifiable: u64,
    /// Rows whose customer record was already delivered exactly as merged (replays).
    pub unchanged: u64,
    /// Rows whose CRM record is sales' now (converted, qualified): not updated, the
    /// people working it told instead (`Outcome::FollowedUp`).
    pub followed_up: u64,
    /// Merged customer records the sinks acknowledged (one per customer per batch per sink).
    pub records_sent: u64,
    /// `records_sent` by sink name.
    pub sent_by_sink: std::collections::BTreeMap<String, u64>,
    /// Pending rows waiting longer than `run.follow_up_warning` since their table Timestamp.
    pub overdue: u64,
    /// Age of the oldest pending row, from its table Timestamp.
    pub oldest_pending_age: Option<Duration>,
    /// Leads the sink could not take now; they are read and offered again next poll.
    pub pending: u64,
    pub pages: u64,
    pub duration: Duration,
    /// The checkpoint after this poll.
    pub checkpoint: Option<OffsetDateTime>,
}

/// The parts a poll needs.
pub struct Pipeline {
    pub source: TableSource,
    pub state: Arc<dyn StateStore>,
    /// Where every lead goes: one sink, or several (`[[sinks]]`), each with its own
    /// batches, pauses, dead letters and ledger ([`CustomerState::acked`]).
    pub sinks: Vec<Outlet>,
    pub policy: PolicySettings,
    pub identity: IdentitySettings,
    pub overlap: Duration,
    /// Pages merged before their customers go to the sink (see the delivery window, `window::Window`): a customer
    /// whose rows span them is sent once. [`WINDOW_PAGES`] unless a test says.
    pub window_pages: u32,
    /// A lead still undelivered this long after its table Timestamp is logged as overdue.
    pub follow_up_warning: Duration,
    /// What the pipeline remembers between polls of one process.
    pub memory: Memory,
}

/// In-process memory of the pipeline: which overdue leads were already warned about
/// (once per lead per process).
#[derive(Debug, Default)]
pub struct Memory {
    /// Counters and liveness shared with the metrics listener and the watchdog.
    pub metrics: Arc<metrics::Metrics>,
    warned_overdue: std::sync::Mutex<std::collections::HashSet<crate::source::row::RowId>>,
}

/// One sink of a pipeline, and what the pipeline remembers of it in this process: when
/// it asked to be left alone, and its endpoint-level failures in a row.
pub struct Outlet {
    /// The sink's name in state, logs, metrics and commands (`[[sinks]]` `name`).
    pub name: String,
    pub sink: Arc<dyn LeadSink>,
    /// Leads per delivery call.
    pub batch_size: usize,
    paused_until: std::sync::Mutex<Option<Instant>>,
    /// Endpoint-level failures in a row (see [`Pipeline::endpoint_health`]).
    endpoint_failures: std::sync::Mutex<u32>,
}

impl Outlet {
    pub fn new(name: impl Into<String>, sink: Arc<dyn LeadSink>, batch_size: usize) -> Self {
        Self {
            name: name.into(),
            sink,
            batch_size: batch_size.max(1),
            paused_until: Default::default(),
            endpoint_failures: Default::default(),
        }
    }
}

impl std::fmt::Debug for Outlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outlet")
            .field("name", &self.name)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// How a poll reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct PollMode {
    /// Read from this time instead of `checkpoint - overlap` (replay).
    pub since: Option<OffsetDateTime>,
    /// Process rows even if this version was handled before (replay).
    pub ignore_handled: bool,
    /// Send every customer touched, even when the merged record did not change.
    pub resend: bool,
    /// Deliver to this sink only (its index in [`Pipeline::sinks`]; `replay --sink`),
    /// whether or not it had the record; the others are left as they are.
    pub sink: Option<usize>,
}

/// What `retry_dead_letters` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterReport {
    pub delivered: Vec<String>,
    pub rejected: Vec<(String, String)>,
    pub pending: Vec<(String, String)>,
    pub missing: Vec<String>,
}

fn version(row: &RawRow) -> RowVersion {
    RowVersion {
        id: row.id.clone(),
        etag: row.etag.clone(),
        timestamp: row.timestamp,
    }
}

fn as_map(event: &LeadEvent) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(event) {
        Ok(serde_json::Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// A task of the poll that panicked or was cancelled: an I/O-level failure of the poll.
fn joined(e: tokio::task::JoinError) -> PollError {
    PollError::State(StateError::Io {
        operation: "poll task",
        message: e.to_string(),
    })
}

/// Settles every row with the same outcome.
fn settle_all(
    rows: impl Iterator<Item = RowVersion>,
    outcome: Settled,
    settlements: &mut Vec<Settlement>,
) {
    settlements.extend(rows.map(|row| Settlement {
        row,
        outcome: outcome.clone(),
        columns: None,
    }));
}

/// A customer whose merged record goes to the sink, with the rows it settles.
pub(super) struct Delivery {
    pub(super) customer: CustomerState,
    pub(super) rows: Vec<RowVersion>,
}

impl Pipeline {
    /// Reads the whole window once and settles what it can.
    pub async fn poll(&self, cancel: &CancellationToken) -> Result<PollSummary, PollError> {
        self.poll_with(PollMode::default(), cancel).await
    }

    /// As [`Pipeline::poll`], reading as `mode` says.
    pub async fn poll_with(
        &self,
        mode: PollMode,
        cancel: &CancellationToken,
    ) -> Result<PollSummary, PollError> {
        let mut summary = PollSummary::default();
        self.poll_counting(mode, cancel, &mut summary).await?;
        Ok(summary)
    }

    /// The sinks' names, comma-separated.
    pub fn sink_names(&self) -> String {
        let names: Vec<&str> = self.sinks.iter().map(|o| o.name.as_str()).collect();
        names.join(",")
    }

    /// Replaces the sinks with `sink` alone, in batches of the first sink's size (tests).
    pub fn with_sink(mut self, sink: Arc<dyn LeadSink>) -> Self {
        let batch_size = self.sinks.first().map_or(200, |o| o.batch_size);
        self.sinks = vec![Outlet::new(sink.name().to_owned(), sink, batch_size)];
        self
    }

    /// A dead letter's id: the customer's key; with several sinks, `<sink>:<key>`, so
    /// that each sink's letter of one customer is its own.
    fn dead_letter_id(&self, sink: &str, customer: &str) -> String {
        if self.sinks.len() == 1 {
            customer.to_owned()
        } else {
            format!("{sink}:{customer}")
        }
    }
}

/// The summary line of a poll, fields first.
pub fn log_summary(summary: &PollSummary) {
    tracing::info!(
        rows_read = summary.rows_read,
        new_leads = summary.delivered,
        skipped = summary.skipped,
        rejected = summary.rejected,
        unidentifiable = summary.unidentifiable,
        followed_up = summary.followed_up,
        records_sent = summary.records_sent,
        unchanged = summary.unchanged,
        pending = summary.pending,
        overdue = summary.overdue,
        oldest_pending_s = summary.oldest_pending_age.map(|a| a.as_secs()),
        already_handled = summary.already_handled,
        pages = summary.pages,
        duration_ms = summary.duration.as_millis() as u64,
        checkpoint = %summary.checkpoint.map(timestamp::format).unwrap_or_else(|| "none".into()),
        "Poll finished."
    );
}
