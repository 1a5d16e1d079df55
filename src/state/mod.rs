//! What leadsync remembers between polls and restarts: the checkpoint, the row
//! versions already handled inside the overlap window, the merged customers, the dead
//! letters, and the rows it rejected, skipped or could not attribute, with their reasons.
//!
//! [`StateStore`] is the boundary: what every backend must do, and all the pipeline
//! calls. [`RedbStore`] (`file`) keeps it all in one file under the state directory;
//! [`table::TableStore`] (`table`) in an Azure table, for jobs without a disk.

pub mod file;
pub mod personal;
pub mod table;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::identity::CustomerState;
use crate::source::row::RowId;
use crate::state::personal::{Forgotten, Person, Pruned};
use crate::timestamp::serde_ticks;

pub use file::RedbStore;

/// Failures of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file could not be opened (missing directory permissions, or another process has it).
    #[error("cannot open state file {path}: {message}")]
    Open { path: PathBuf, message: String },
    /// The state file is held by another leadsync process (a daemon, or a command
    /// such as `replay`): the file backend's counterpart of a held processing lease.
    #[error("a leadsync daemon or command is running on this state directory (state file {path} is locked by another leadsync process); try again when it has stopped")]
    Locked { path: PathBuf },
    /// A read or write of the state failed.
    #[error("state {operation} failed: {message}")]
    Io {
        operation: &'static str,
        message: String,
    },
    /// A stored record could not be decoded (written by a newer leadsync?).
    #[error("state record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
}

/// A row at one version: the unit of "already handled".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowVersion {
    pub id: RowId,
    pub etag: String,
    #[serde(with = "serde_ticks")]
    pub timestamp: OffsetDateTime,
}

/// How a row's outcome was settled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Settled {
    /// The sink acknowledged it.
    Delivered { sink: String },
    /// Deliberately not sent, by a stated policy.
    Skipped { policy: String },
    /// It cannot become a lead, or the sink refused it for good.
    Rejected { reason: String },
    /// A lead, but with too little to tell who the customer is; held for people to see.
    Unidentifiable { reason: String },
}

/// One row's settled outcome, as handed to [`StateStore::settle`].
#[derive(Debug, Clone)]
pub struct Settlement {
    pub row: RowVersion,
    pub outcome: Settled,
    /// The row's columns (kept for rejected and skipped rows, so a person can see and retry them).
    pub columns: Option<Map<String, Value>>,
}

/// A customer record the sink refused for good: kept with the sink's reason and the
/// payload sent, for `leadsync dlq list|retry|drop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The customer's external key: one dead letter per customer, the newest refusal.
    pub id: String,
    pub sink: String,
    pub reason: String,
    /// The merged record that was sent.
    pub payload: crate::identity::CustomerLead,
    /// The table rows whose delivery this was.
    pub rows: Vec<RowVersion>,
    #[serde(with = "serde_ticks")]
    pub at: OffsetDateTime,
    /// Times the sink refused it (retries through `dlq retry` included).
    pub attempts: u32,
}

/// How finely a store's lease clock tells time: a lease taken or renewed by a call of
/// [`StateStore::acquire_lease`] with `ttl` that began at instant `t` lasts at least
/// until `t + ttl - LEASE_CLOCK_RESOLUTION` (its expiry is judged by the storage
/// service's clock, which an HTTP `Date` header tells to the second).
pub const LEASE_CLOCK_RESOLUTION: Duration = Duration::from_secs(1);

/// Who may process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// This process holds the lease.
    Held,
    /// Another process holds it until `until`.
    HeldBy {
        owner: String,
        until: OffsetDateTime,
    },
}

/// Everything one settle writes.
#[derive(Debug, Clone, Default)]
pub struct SettleBatch {
    pub rows: Vec<Settlement>,
    pub customers: Vec<CustomerState>,
    pub dead_letters: Vec<DeadLetter>,
    /// Dead letters (by id) superseded by a successful delivery.
    pub resolved: Vec<String>,
}

impl SettleBatch {
    pub fn rows(rows: Vec<Settlement>) -> Self {
        Self {
            rows,
            ..Self::default()
        }
    }
}

/// A row that was rejected, skipped or held as unidentifiable, as kept for people to inspect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRow {
    pub row: RowVersion,
    pub outcome: Settled,
    #[serde(default)]
    pub columns: Option<Map<String, Value>>,
    #[serde(with = "serde_ticks")]
    pub recorded_at: OffsetDateTime,
}

/// The state leadsync keeps, whatever keeps it: what every backend must do.
///
/// A backend is correct when it passes the conformance suite (`tests/state_conformance.rs`),
/// which runs the same tests over every backend. How a backend batches, caches or
/// encodes its writes is its own business; the pipeline calls only these methods.
///
/// Every method is one read or one write as seen by its caller: a write that returned
/// `Ok` is kept (a process crash does not undo it; a power loss may roll a backend back
/// to its last [`StateStore::set_checkpoint`], see docs/state.md), and a read sees every
/// write that returned before it began. A failed write may have written part of its
/// work (the table backend's [`StateStore::settle`] is several transactions); the
/// caller then does not move the checkpoint, and the next poll reads and settles those
/// rows again. The pipeline never runs two writes at once on one store, and one process
/// works on a store at a time ([`StateStore::acquire_lease`]).
#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// The newest Timestamp up to which every row's outcome is settled; `None` before
    /// the first [`StateStore::set_checkpoint`]. Kept at its full 100 ns precision.
    async fn checkpoint(&self) -> Result<Option<OffsetDateTime>, StateError>;
    /// Moves the checkpoint (forwards or back: the caller decides, and moves it only
    /// past settled rows). Durable when it returns, with every settle before it.
    async fn set_checkpoint(&self, timestamp: OffsetDateTime) -> Result<(), StateError>;
    /// For each row version, in order, whether it was handled already: `true` when this
    /// row (PartitionKey, RowKey) was last settled at this ETag with an outcome other
    /// than [`Settled::Delivered`], and its marker was not pruned since; `false` for a
    /// version never settled, and for one a later settle of the row at another version
    /// replaced with an outcome other than delivered. A store remembers one version per
    /// row. For a delivered row a store may answer either way (the file store keeps no
    /// marker for it, and leaves the one of an earlier version; the table store marks
    /// it): a delivered row's version is in its customer's history, where the pipeline's
    /// merge recognises it.
    async fn handled(&self, rows: &[RowVersion]) -> Result<Vec<bool>, StateError>;
    /// Records a batch's outcomes, called once the sink has made the batch's deliveries
    /// durable: each row's outcome (a row not delivered is remembered as handled, see
    /// [`StateStore::handled`]; a row's latest settle decides on which of the rejected,
    /// skipped and unidentifiable lists it is, if any), the customers it changed
    /// (replacing the stored ones by key), its new dead letters (replacing one with the
    /// same id) and the dead letters it resolved (removed). All or none on the file
    /// backend; in steps on the table backend, in an order that never loses an outcome
    /// (docs/state.md).
    async fn settle(&self, batch: &SettleBatch) -> Result<(), StateError>;
    /// Every dead letter, in id order.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError>;
    /// Takes or renews the processing lease for `owner`, so two leadsync processes never
    /// process one store at once: `Held` when `owner` holds it now, `HeldBy` when another
    /// owner's lease runs. A lease `Held` lasts at least `ttl - LEASE_CLOCK_RESOLUTION`
    /// from when the call began, measured at the storage service's pace; expiry never
    /// depends on the local wall clock. A store that is exclusive by construction (the
    /// file store's file lock, taken when it was opened) always answers `Held`.
    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Lease, StateError>;
    /// Gives `owner`'s lease up (on shutdown), so another process can take over at once;
    /// nothing when `owner` does not hold it (any more).
    async fn release_lease(&self, owner: &str) -> Result<(), StateError>;
    /// The stored customers with these keys (`None` where there is none), in the order
    /// of `keys`, each complete (its summary included).
    async fn customers(&self, keys: &[String]) -> Result<Vec<Option<CustomerState>>, StateError>;
    /// Every stored customer, in key order.
    async fn all_customers(&self) -> Result<Vec<CustomerState>, StateError>;
    /// The rows whose latest settle was [`Settled::Unidentifiable`], with their columns.
    async fn unidentifiable(&self) -> Result<Vec<RecordedRow>, StateError>;
    /// Forgets the handled markers of rows stamped before `before` (they fall outside
    /// every future read); returns how many. The lists and customers are not touched.
    async fn prune_handled(&self, before: OffsetDateTime) -> Result<usize, StateError>;
    /// How many row versions are remembered as handled (delivered rows included only by
    /// a store that remembers them, see [`StateStore::handled`]).
    async fn handled_len(&self) -> Result<u64, StateError>;
    /// The rows whose latest settle was [`Settled::Rejected`], with their reasons.
    async fn rejected(&self) -> Result<Vec<RecordedRow>, StateError>;
    /// The rows whose latest settle was [`Settled::Skipped`], with their policies.
    async fn skipped(&self) -> Result<Vec<RecordedRow>, StateError>;
    /// Removes everything this store holds about `person` (see [`crate::state::personal`]):
    /// their merged customer, their dead letters, and the rejected, skipped and
    /// unidentifiable rows about them. The rows of the customer's history are first
    /// marked handled (a marker is a row's keys and version, no personal data), so that
    /// a re-read of the overlap window does not deliver them again. Callers hold the
    /// processing lease. Running it again after a failure finishes the work.
    async fn forget(&self, person: &Person) -> Result<Forgotten, StateError>;
    /// One step of retention: looks at up to `step` records of each list (customers,
    /// dead letters, rejected, skipped, unidentifiable rows), resuming after the last
    /// call's, and removes customers last seen before `before`, dead letters refused
    /// before it and recorded rows stamped before it; `complete` once every list went
    /// round since the step that began the round. A store may also keep what it wrote
    /// at or after `before` by its own clock (the table store filters on the service's
    /// `Timestamp`). Handled markers and the checkpoint are not touched. Callers hold the processing lease and keep `before` before the
    /// overlap window ([`crate::state::personal::retention_cutoff`]).
    async fn prune_older_than(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<Pruned, StateError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    /// One local file under `state.dir` (a VM with a disk).
    File,
    /// A table in the same storage account (jobs without a durable disk).
    Table,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Where state lives.
    #[serde(default = "default_state_backend")]
    pub backend: StateBackend,
    /// Directory of the state file `leadsync.redb` (backend "file").
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// State table in the source's storage account (backend "table").
    #[serde(default = "default_state_table")]
    pub table: String,
    /// How long a processing lease lasts without renewal (backend "table"); a holder
    /// that dies loses it after this long.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long lead data is kept (`"forever"`: `None`): a customer not seen for this
    /// long, and rejected, skipped and unidentifiable rows and dead letters older than
    /// this, are removed by the daemon, a bounded amount per poll.
    #[serde(default = "default_retention", deserialize_with = "retention")]
    pub retention: Option<Duration>,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            backend: default_state_backend(),
            dir: default_state_dir(),
            table: default_state_table(),
            lease_ttl: default_lease_ttl(),
            retention: default_retention(),
        }
    }
}

/// 400 days: a year of a customer's silence plus a month, so that a customer who comes
/// back yearly (a renewal, a yearly trial) is still the same customer to leadsync.
fn default_retention() -> Option<Duration> {
    Some(Duration::from_secs(400 * 24 * 3600))
}

/// `"forever"`, or a duration such as `"400d"`.
fn retention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim() == "forever" {
        return Ok(None);
    }
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| {
            serde::de::Error::custom(format!(
                "{e}: state.retention is a duration such as \"400d\", or \"forever\""
            ))
        })
}

fn default_state_backend() -> StateBackend {
    StateBackend::File
}
fn default_state_table() -> String {
    "LeadsyncState".into()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(60)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/leadsync")
}

impl StateSettings {
    /// Checks the `state.*` keys (some against `source.*`): `Err((key, why))` for the
    /// first one that is wrong.
    pub fn validate(&self, source: &crate::source::SourceSettings) -> Result<(), (String, String)> {
        let bad = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        if self.backend == StateBackend::Table {
            if !crate::source::valid_table_name(&self.table) {
                return bad(
                    "state.table",
                    "a table name is 3 to 63 letters and digits, starting with a letter",
                );
            }
            if self.table.eq_ignore_ascii_case(&source.table) {
                return bad("state.table", "must differ from source.table");
            }
            if self.lease_ttl < Duration::from_secs(5) {
                return bad("state.lease_ttl", "must be at least 5s");
            }
        }
        if let Some(retention) = self.retention {
            if retention <= source.overlap {
                return bad(
                    "state.retention",
                    "must be longer than source.overlap (a row re-read inside the overlap window must still find its state), or \"forever\"",
                );
            }
        }
        if self.dir.as_os_str().is_empty() {
            return bad("state.dir", "must not be empty");
        }
        Ok(())
    }
}
