//! What leadsync remembers between polls and restarts: the checkpoint, the row
//! versions already handled inside the overlap window, and the rows it rejected or
//! skipped, with their reasons.
//!
//! [`StateStore`] is the boundary; [`RedbStore`] keeps it all in one file under the
//! state directory. A table-backed store for jobs without a disk can implement the same trait.

pub mod personal;
pub mod table;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::identity::{CustomerState, EarlierCustomerState, SummaryForm};
use crate::source::row::RowId;
use crate::state::personal::{Forgotten, Person, Pruned, Walk};
use crate::timestamp::serde_ticks;

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

/// Everything one settle writes, atomically.
#[derive(Debug, Clone, Default)]
pub struct SettleBatch {
    pub rows: Vec<Settlement>,
    pub customers: Vec<CustomerState>,
    pub dead_letters: Vec<DeadLetter>,
    /// Dead letters (by id) superseded by a successful delivery.
    pub resolved: Vec<String>,
    /// More pages of the same poll follow: a store may leave this batch written but
    /// uncommitted, to commit it with a later one (see [`StateStore::commit_held`]).
    pub continued: Continued,
}

/// Whether more pages of a poll follow a batch's, as the poll knows it when the batch
/// is committed: a poll often learns that its next page is the last only after this
/// page's settle has begun. Committing then, instead of holding, keeps the poll's
/// last commit to one page's work.
#[derive(Debug, Clone, Default)]
pub struct Continued(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Continued {
    pub fn new(more: bool) -> Self {
        Self(std::sync::Arc::new(more.into()))
    }

    /// No more pages follow, for every batch given this flag.
    pub fn end(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }

    pub fn more(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl SettleBatch {
    pub fn rows(rows: Vec<Settlement>) -> Self {
        Self {
            rows,
            ..Self::default()
        }
    }
}

/// A batch's customer records as a store writes them, encoded by [`StateStore::prepare`].
#[derive(Debug, Default)]
pub struct Prepared {
    /// Each customer's key, then its record.
    bytes: Vec<u8>,
    /// Where each customer's key and record end in `bytes`, in the batch's order.
    ends: Vec<(usize, usize)>,
}

impl Prepared {
    /// (key, record) of each customer.
    fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, end)| end));
        starts
            .zip(&self.ends)
            .map(|(start, &(key, end))| (&self.bytes[start..key], &self.bytes[key..end]))
    }

    /// Whether this was prepared for `batch`: the same customers, in the same order.
    fn is_for(&self, batch: &SettleBatch) -> bool {
        self.ends.len() == batch.customers.len()
            && self
                .records()
                .zip(&batch.customers)
                .all(|((key, _), c)| key == c.lead.key.as_bytes())
    }
}

/// A row that was rejected or skipped, as kept for people to inspect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRow {
    pub row: RowVersion,
    pub outcome: Settled,
    #[serde(default)]
    pub columns: Option<Map<String, Value>>,
    #[serde(with = "serde_ticks")]
    pub recorded_at: OffsetDateTime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointRecord {
    version: u32,
    #[serde(with = "serde_ticks")]
    timestamp: OffsetDateTime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HandledRecord {
    etag: String,
    #[serde(with = "serde_ticks")]
    timestamp: OffsetDateTime,
}

/// Says when a batch may be committed: `true` once its deliveries are durable.
pub type CommitWhen = tokio::sync::oneshot::Receiver<bool>;

/// A [`CommitWhen`] that says "now".
pub fn commit_now() -> CommitWhen {
    let (now, when) = tokio::sync::oneshot::channel();
    let _ = now.send(true);
    when
}

/// The state leadsync keeps. Every method is one atomic read or write.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// The newest Timestamp up to which every row's outcome is settled.
    async fn checkpoint(&self) -> Result<Option<OffsetDateTime>, StateError>;
    /// Moves the checkpoint. Callers only move it past settled rows.
    async fn set_checkpoint(&self, timestamp: OffsetDateTime) -> Result<(), StateError>;
    /// For each row version, whether it was handled already (same row, same ETag).
    /// A store may leave delivered rows out (the file store does): their versions are in
    /// their customers' histories, and the pipeline's merge recognises them there.
    async fn handled(&self, rows: &[RowVersion]) -> Result<Vec<bool>, StateError>;
    /// Records settled outcomes, the customers they changed and the dead letters, all or none.
    async fn settle(&self, batch: &SettleBatch) -> Result<(), StateError>;
    /// The work of [`StateStore::settle`] that writes nothing (the file store encodes the
    /// batch's customer records), done ahead so that a caller can do it while it waits,
    /// for the sink to make the batch's deliveries durable. `None`: nothing to do ahead.
    fn prepare(&self, _batch: &SettleBatch) -> Option<Prepared> {
        None
    }
    /// [`StateStore::settle`], with what [`StateStore::prepare`] returned for this batch,
    /// committed only when `when` says `true` (the sink has made the batch's deliveries
    /// durable; [`commit_now`] when there is nothing to wait for); with `false`, or if
    /// the sender is dropped, nothing is committed. A store may write everything but the
    /// commit before that (the file store does: the B-tree inserts overlap the JSONL
    /// file's fsync).
    async fn settle_prepared_when(
        &self,
        batch: &SettleBatch,
        _prepared: Option<Prepared>,
        when: CommitWhen,
    ) -> Result<(), StateError> {
        match when.await {
            Ok(true) => self.settle(batch).await,
            _ => Ok(()),
        }
    }
    /// Commits what settles of `continued` batches left uncommitted. A poll calls it
    /// when it ends (the last page's settle commits by itself; a poll that ends early
    /// may leave some held): whatever a store holds, its deliveries are durable. Every
    /// other write of a store commits it first; [`StateStore::customers`] and
    /// [`StateStore::customers_to_merge`] see it, other reads may not. (`handled` need
    /// not: one poll reads each row once.)
    async fn commit_held(&self) -> Result<(), StateError> {
        Ok(())
    }
    /// Every dead letter, by id.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError>;
    /// Takes or renews the processing lease for `owner`, so two leadsync processes
    /// never process at once. The file store's exclusive file lock already ensures it.
    /// A lease this returns `Held` for lasts at least `ttl - LEASE_CLOCK_RESOLUTION`
    /// from when the call began, measured at the storage service's pace; expiry never
    /// depends on the local wall clock.
    async fn acquire_lease(&self, _owner: &str, _ttl: Duration) -> Result<Lease, StateError> {
        Ok(Lease::Held)
    }
    /// Gives the lease up (on shutdown), so another process can take over at once.
    async fn release_lease(&self, _owner: &str) -> Result<(), StateError> {
        Ok(())
    }
    /// The stored customers with these keys (`None` where there is none yet), in order.
    async fn customers(&self, keys: &[String]) -> Result<Vec<Option<CustomerState>>, StateError>;
    /// As [`StateStore::customers`], for a merge into them, which rebuilds what follows
    /// from each record: a store may leave such parts out (the file store leaves out the
    /// summary, see `CustomerState::complete_summary`).
    async fn customers_to_merge(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<CustomerState>>, StateError> {
        self.customers(keys).await
    }
    /// Every stored customer, in key order.
    async fn all_customers(&self) -> Result<Vec<CustomerState>, StateError>;
    /// Leads held because they could not be attributed to a customer.
    async fn unidentifiable(&self) -> Result<Vec<RecordedRow>, StateError>;
    /// Forgets handled row versions stamped before `before` (they fall outside every future read).
    async fn prune_handled(&self, before: OffsetDateTime) -> Result<usize, StateError>;
    /// How many row versions are remembered as handled.
    async fn handled_len(&self) -> Result<u64, StateError>;
    /// Rejected rows with their reasons.
    async fn rejected(&self) -> Result<Vec<RecordedRow>, StateError>;
    /// Rows skipped by policy.
    async fn skipped(&self) -> Result<Vec<RecordedRow>, StateError>;
    /// Removes everything this store holds about `person` (see [`crate::state::personal`]):
    /// their merged customer, their dead letters, and the rejected, skipped and
    /// unidentifiable rows about them. The rows of the customer's history are first
    /// marked handled (a marker is a row's keys and version, no personal data), so that
    /// a re-read of the overlap window does not deliver them again. Callers hold the
    /// processing lease. Running it again after a failure finishes the work.
    async fn forget(&self, _person: &Person) -> Result<Forgotten, StateError> {
        Err(unsupported("forget a person"))
    }
    /// One step of retention: looks at up to `step` records of each list (customers,
    /// dead letters, rejected, skipped, unidentifiable rows), resuming after the last
    /// call's, and removes customers last seen before `before`, dead letters refused
    /// before it and recorded rows stamped before it. Handled markers and the
    /// checkpoint are not touched. Callers hold the processing lease and keep `before`
    /// before the overlap window ([`crate::state::personal::retention_cutoff`]).
    async fn prune_older_than(
        &self,
        _before: OffsetDateTime,
        _step: usize,
    ) -> Result<Pruned, StateError> {
        Err(unsupported("remove data older than state.retention"))
    }
}

fn unsupported(operation: &'static str) -> StateError {
    StateError::Io {
        operation,
        message: "this state store cannot".into(),
    }
}

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Handled rows by (PartitionKey, RowKey), and customers by key, as UTF-8 bytes: redb
/// checks that a `&str` key is UTF-8 on every comparison, which was 7% of a backfill's
/// instructions. Byte order is the string order, so the B-trees are the same.
const HANDLED: TableDefinition<(&[u8], &[u8]), &[u8]> = TableDefinition::new("handled_rows");
const CUSTOMERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("customer_records");
/// The same two tables as versions before byte keys wrote them; moved on open.
const HANDLED_STR: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("handled");
const CUSTOMERS_STR: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
const REJECTED: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rejected");
const SKIPPED: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("skipped");
const UNIDENTIFIABLE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("unidentifiable");
const DEAD_LETTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("dead_letters");
const CHECKPOINT_KEY: &str = "checkpoint";
const CHECKPOINT_VERSION: u32 = 1;

/// The embedded store: one redb file, `leadsync.redb`, in the state directory.
///
/// redb commits are atomic (page settles with `Durability::Eventual`, the checkpoint and
/// pruning commits with `Immediate`, which makes everything before them durable whatever
/// the platform does with `Eventual`), and it holds an exclusive lock on the file, so a
/// second leadsync pointed at the same directory fails to start instead of processing the
/// same rows.
pub struct RedbStore {
    db: Database,
    /// `identity.summary_template`: the file keeps a hash of each customer's summary,
    /// and a read rebuilds the text with this.
    summary_template: String,
    held: Held,
    /// [`HOLD_PAGES`] and [`HOLD_BYTES`] (tests set smaller ones).
    hold_limits: (usize, usize),
    /// Where the next step of retention resumes.
    retention: std::sync::Mutex<RetentionCursor>,
}

/// Where each list's retention step resumes.
#[derive(Default)]
struct RetentionCursor {
    customers: Walk<Vec<u8>>,
    dead_letters: Walk<String>,
    /// Rejected, skipped, unidentifiable.
    lists: [Walk<(String, String)>; 3],
}

impl RetentionCursor {
    /// Every list went round: the next step starts them all again.
    fn round_done(&self) -> bool {
        self.customers.is_done()
            && self.dead_letters.is_done()
            && self.lists.iter().all(Walk::is_done)
    }
}

/// The settles of one poll's pages left uncommitted (`SettleBatch::continued`), committed
/// as one transaction with a later page's, at most [`HOLD_PAGES`] pages together and
/// while their customer records take at most [`HOLD_BYTES`].
///
/// A commit rewrites every B-tree page its inserts touched, and a page's customers are
/// spread over the whole customer table (their keys are emails, in no order the table's
/// rows follow): on a small table each commit rewrote most of it. Committing up to ten
/// pages at a time takes about a sixth of a 10k-row backfill's CPU away (bench/results/history.md,
/// fourteenth round). A crash or a failed sync loses at most the held pages' outcomes,
/// not their deliveries: those rows are read again and delivered again as idempotent
/// upserts, as after a power loss.
///
/// Only a poll's batches are `continued`, and a poll settles its pages one after the
/// other; a settle started while another is writing would wait in `begin_write` for it.
#[derive(Default)]
struct Held {
    /// The open transaction and how many batches it holds.
    txn: std::sync::Mutex<Option<(redb::WriteTransaction, usize)>>,
    /// The customer records written by the held batches, newest for each key: a read
    /// of customers sees them, as it would once committed.
    customers: std::sync::Mutex<HeldRecords>,
}

#[derive(Default)]
struct HeldRecords {
    records: HashMap<Box<[u8]>, Box<[u8]>>,
    /// The keys' and records' bytes.
    bytes: usize,
}

impl HeldRecords {
    fn insert(&mut self, key: &[u8], record: &[u8]) {
        self.bytes += key.len() + record.len();
        if let Some(old) = self.records.insert(key.into(), record.into()) {
            self.bytes -= key.len() + old.len();
        }
    }

    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.records.get(key).map(|r| &**r)
    }
}

/// Settles committed together at most (see [`Held`]).
const HOLD_PAGES: usize = 10;

/// The held customer records' bytes (keys and records) after which a settle commits
/// instead of holding: the memory they take stays about the same at every table size
/// (a 10k table's 3,333 customers take 1.8 MB, so its polls hold all ten pages; on
/// larger tables a transaction holds five or six).
const HOLD_BYTES: usize = 3 << 20;

fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Forgets the held customer records when dropped armed: the held transaction was
/// committed (the snapshot has them now) or dropped (rolled back).
struct ForgetHeld<'a> {
    held: &'a Held,
    armed: bool,
}

impl Drop for ForgetHeld<'_> {
    fn drop(&mut self) {
        if self.armed {
            *locked(&self.held.customers) = HeldRecords::default();
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Err(e) = self.commit_held_now() {
            tracing::warn!(error = %e, "Could not commit the last settled pages on close; their rows will be delivered again.");
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    pub const FILE_NAME: &'static str = "leadsync.redb";

    /// The template the summaries of customers read from this file are rebuilt with
    /// (`identity.summary_template`; the default one until this is called).
    pub fn with_summary_template(mut self, template: &str) -> Self {
        self.summary_template = template.to_owned();
        self
    }

    /// Opens (or creates) the store in `dir`, creating the directory if needed.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(Self::FILE_NAME);
        let open_err = |message: String| StateError::Open {
            path: path.clone(),
            message,
        };
        crate::private_fs::create_dir_all(dir)
            .map_err(|e| open_err(format!("cannot create directory: {e}")))?;
        // redb creates a missing file with the umask's mode: it is created first, 0600
        // (an empty file is what redb initialises a new database in).
        crate::private_fs::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| open_err(format!("cannot create the state file: {e}")))?;
        crate::private_fs::warn_if_shared(&path, "state file");
        // redb's default page cache is 1 GiB, and it keeps what settle writes: RSS would
        // grow with the state file. 4 MiB keeps the process at about 37 MiB from 10k to
        // 100k rows (16 MiB: 45 -> 53 MiB) with no loss of throughput: what falls out of
        // it is read back from the kernel's page cache (bench/results/history.md).
        // redb's v3 file format, the only one redb 3 reads: a new file is created in it,
        // and a file of an earlier leadsync is upgraded below, so that moving to redb 3
        // strands no state file. Closing the file also writes less (no region tracker
        // page): 21.6 -> 15.1 million instructions at the end of a 10k-row backfill
        // (callgrind), of 1.17 billion in all.
        let mut db = Database::builder()
            .set_cache_size(4 << 20)
            .create_with_file_format_v3(true)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StateError::Locked { path: path.clone() }
                }
                other => open_err(other.to_string()),
            })?;
        // A few commits, once; a no-op for a v3 file. leadsync keeps no savepoints.
        if db.upgrade().map_err(upgrade)? {
            tracing::info!("State file upgraded to redb's v3 file format.");
        }
        let mut txn = db.begin_write().map_err(io("open"))?;
        // Creating the tables need not reach the disk before the first write that does
        // (a crash before it leaves a file without them, and they are created again): a
        // start-up saves an fsync.
        txn.set_durability(redb::Durability::None);
        for table in [REJECTED, SKIPPED, UNIDENTIFIABLE] {
            txn.open_table(table).map_err(io("open"))?;
        }
        txn.open_table(HANDLED).map_err(io("open"))?;
        txn.open_table(META).map_err(io("open"))?;
        txn.open_table(CUSTOMERS).map_err(io("open"))?;
        txn.open_table(DEAD_LETTERS).map_err(io("open"))?;
        // Only a file of a version before byte keys has the string-keyed tables: the
        // usual start-up looks for them in this transaction and begins no other.
        let upgrade_due = txn
            .list_tables()
            .map_err(io("open"))?
            .any(|t| t.name() == CUSTOMERS_STR.name() || t.name() == HANDLED_STR.name());
        txn.commit().map_err(io("open"))?;
        let store = Self {
            db,
            summary_template: crate::identity::IdentitySettings::default().summary_template,
            held: Held::default(),
            hold_limits: (HOLD_PAGES, HOLD_BYTES),
            retention: Default::default(),
        };
        let moved = match upgrade_due {
            true => store.move_string_keyed(MOVE_STEP)?,
            false => 0,
        };
        if moved > 0 {
            tracing::info!(
                records = moved,
                "State file upgraded: handled rows and customers are now keyed by bytes."
            );
        }
        Ok(store)
    }

    /// Moves the records of the string-keyed tables of earlier versions into the
    /// byte-keyed ones, `step` records per transaction (a transaction's dirty pages stay
    /// in memory until it commits), removing each from the old table in the transaction
    /// that copies it: a crash part way leaves every record in exactly one of the two,
    /// and the next open goes on. Returns the number of records moved.
    fn move_string_keyed(&self, step: usize) -> Result<usize, StateError> {
        let mut moved = 0;
        loop {
            let txn = self.db.begin_write().map_err(upgrade)?;
            let old: Vec<String> = txn
                .list_tables()
                .map_err(upgrade)?
                .map(|t| t.name().to_owned())
                .filter(|name| name == CUSTOMERS_STR.name() || name == HANDLED_STR.name())
                .collect();
            if old.is_empty() {
                return Ok(moved);
            }
            if old.iter().any(|name| name == CUSTOMERS_STR.name()) {
                moved += move_step(&txn, CUSTOMERS_STR, CUSTOMERS, step)?;
            }
            if old.iter().any(|name| name == HANDLED_STR.name()) {
                moved += move_step(&txn, HANDLED_STR, HANDLED, step)?;
            }
            txn.commit().map_err(upgrade)?;
        }
    }

    fn recorded(
        &self,
        table: TableDefinition<(&str, &str), &[u8]>,
    ) -> Result<Vec<RecordedRow>, StateError> {
        let txn = self.db.begin_read().map_err(io("read"))?;
        let table = txn.open_table(table).map_err(io("read"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(io("read"))? {
            let (key, value) = entry.map_err(io("read"))?;
            let (pk, rk) = key.value();
            out.push(decode(&format!("{}", RowId::new(pk, rk)), value.value())?);
        }
        Ok(out)
    }
}

fn upgrade(e: impl std::fmt::Display) -> StateError {
    io("upgrade the state file")(e)
}

/// A string key of an earlier version's table and its byte-keyed successor's key.
trait StringKey: redb::Key + 'static {
    type Bytes: redb::Key + 'static;
    type Owned;
    fn to_owned_key(key: Self::SelfType<'_>) -> Self::Owned;
    fn as_str_key(key: &Self::Owned) -> Self::SelfType<'_>;
    fn as_byte_key(key: &Self::Owned) -> <Self::Bytes as redb::Value>::SelfType<'_>;
}

impl StringKey for &'static str {
    type Bytes = &'static [u8];
    type Owned = String;
    fn to_owned_key(key: &str) -> String {
        key.to_owned()
    }
    fn as_str_key(key: &String) -> &str {
        key
    }
    fn as_byte_key(key: &String) -> &[u8] {
        key.as_bytes()
    }
}

impl StringKey for (&'static str, &'static str) {
    type Bytes = (&'static [u8], &'static [u8]);
    type Owned = (String, String);
    fn to_owned_key((a, b): (&str, &str)) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }
    fn as_str_key((a, b): &(String, String)) -> (&str, &str) {
        (a, b)
    }
    fn as_byte_key((a, b): &(String, String)) -> (&[u8], &[u8]) {
        (a.as_bytes(), b.as_bytes())
    }
}

/// One transaction's share of moving `from` into `to`: up to `step` records, and the old
/// table dropped once it is empty. Returns the number moved.
fn move_step<K: StringKey>(
    txn: &redb::WriteTransaction,
    from: TableDefinition<K, &[u8]>,
    to: TableDefinition<K::Bytes, &[u8]>,
    step: usize,
) -> Result<usize, StateError> {
    let moved = {
        let mut old = txn.open_table(from).map_err(upgrade)?;
        let mut new = txn.open_table(to).map_err(upgrade)?;
        let batch = old
            .iter()
            .map_err(upgrade)?
            .take(step)
            .map(|entry| {
                let (key, value) = entry.map_err(upgrade)?;
                Ok((K::to_owned_key(key.value()), value.value().to_vec()))
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        for (key, value) in &batch {
            new.insert(K::as_byte_key(key), value.as_slice())
                .map_err(upgrade)?;
            old.remove(K::as_str_key(key)).map_err(upgrade)?;
        }
        batch.len()
    };
    if moved < step {
        txn.delete_table(from).map_err(upgrade)?;
    }
    Ok(moved)
}

/// Records moved per transaction when a state file of an earlier version is upgraded.
const MOVE_STEP: usize = 10_000;

/// Handled rows looked at per pruning transaction: the dirty pages of one transaction
/// stay in memory until it commits, so pruning a million rows at once would hold them all.
const PRUNE_STEP: usize = 10_000;

impl RedbStore {
    /// A write transaction for anything but a page's settle, which may continue the held
    /// one: commits the held one first (redb has one writer at a time, and a second
    /// `begin_write` would wait for the held transaction for ever).
    fn begin_write(&self, operation: &'static str) -> Result<redb::WriteTransaction, StateError> {
        self.commit_held_now()?;
        self.db.begin_write().map_err(io(operation))
    }

    /// Commits the held transaction, if there is one.
    fn commit_held_now(&self) -> Result<(), StateError> {
        let Some((txn, _)) = locked(&self.held.txn).take() else {
            return Ok(());
        };
        let _forget = ForgetHeld {
            held: &self.held,
            armed: true,
        };
        txn.commit().map_err(io("settle rows"))
    }

    /// Forgets handled rows stamped before `before`, looking at `step` records per
    /// write transaction and resuming after the last key of the one before.
    fn prune_handled_in_steps(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<usize, StateError> {
        let mut pruned = 0;
        let mut after: Option<(Vec<u8>, Vec<u8>)> = None;
        loop {
            let txn = self.begin_write("prune handled rows")?;
            let mut stale: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut last = None;
            {
                let mut handled = txn.open_table(HANDLED).map_err(io("prune handled rows"))?;
                {
                    let entries = match &after {
                        Some((pk, rk)) => handled.range::<(&[u8], &[u8])>((
                            std::ops::Bound::Excluded((pk.as_slice(), rk.as_slice())),
                            std::ops::Bound::Unbounded,
                        )),
                        None => handled.range::<(&[u8], &[u8])>(..),
                    }
                    .map_err(io("prune handled rows"))?;
                    for entry in entries.take(step) {
                        let (key, value) = entry.map_err(io("prune handled rows"))?;
                        let (pk, rk) = key.value();
                        // An unreadable record is kept: pruning must never cause a re-delivery.
                        let old = decode_handled((pk, rk), value.value())
                            .is_ok_and(|r| r.timestamp < before);
                        if old {
                            stale.push((pk.to_vec(), rk.to_vec()));
                        }
                        last = Some((pk.to_vec(), rk.to_vec()));
                    }
                }
                for (pk, rk) in &stale {
                    handled
                        .remove((pk.as_slice(), rk.as_slice()))
                        .map_err(io("prune handled rows"))?;
                }
            }
            // A step that found nothing to forget (the usual poll) writes nothing: no
            // commit, and none of its fsyncs.
            match stale.is_empty() {
                true => txn.abort().map_err(io("prune handled rows"))?,
                false => txn.commit().map_err(io("prune handled rows"))?,
            }
            pruned += stale.len();
            match last {
                Some(key) => after = Some(key),
                None => return Ok(pruned),
            }
        }
    }
}

/// The three lists of recorded rows, in the order of [`RetentionCursor::lists`].
const LISTS: [TableDefinition<(&str, &str), &[u8]>; 3] = [REJECTED, SKIPPED, UNIDENTIFIABLE];

impl RedbStore {
    /// [`StateStore::forget`], in one transaction.
    fn forget_now(&self, person: &Person) -> Result<Forgotten, StateError> {
        const OP: &str = "forget a person";
        let txn = self.begin_write(OP)?;
        let mut forgotten = Forgotten::default();
        {
            let mut customers = txn.open_table(CUSTOMERS).map_err(io(OP))?;
            let mut found: Vec<(Vec<u8>, CustomerState)> = Vec::new();
            match &person.key {
                Some(key) => {
                    if let Some(bytes) = customers.get(key.as_bytes()).map_err(io(OP))? {
                        found.push((
                            key.as_bytes().to_vec(),
                            decode_customer(key, bytes.value())?,
                        ));
                    }
                }
                // Only an external key: every customer is looked at.
                None if person.external_key.is_some() => {
                    for entry in customers.iter().map_err(io(OP))? {
                        let (key, value) = entry.map_err(io(OP))?;
                        let text = String::from_utf8_lossy(key.value()).into_owned();
                        let customer = decode_customer(&text, value.value())?;
                        if person.is(&customer.lead) {
                            found.push((key.value().to_vec(), customer));
                        }
                    }
                }
                None => {}
            }
            // The customer's rows are marked handled before it goes (in the same
            // transaction): the file store keeps no marker of a delivered row, its
            // customer's history is the marker.
            let mut handled = txn.open_table(HANDLED).map_err(io(OP))?;
            for (key, customer) in &found {
                for version in crate::state::personal::history_versions(&customer.lead.history) {
                    let row = (
                        version.id.partition_key.as_bytes(),
                        version.id.row_key.as_bytes(),
                    );
                    let newer = match handled.get(row).map_err(io(OP))? {
                        Some(bytes) => decode_handled(row, bytes.value())
                            .is_ok_and(|h| h.timestamp >= version.timestamp),
                        None => false,
                    };
                    if !newer {
                        handled
                            .insert(row, encode_handled(&version).as_slice())
                            .map_err(io(OP))?;
                        forgotten.marked_handled += 1;
                    }
                }
                customers.remove(key.as_slice()).map_err(io(OP))?;
                forgotten.customers.push(customer.lead.log_key());
                forgotten.add_source_rows(customer.lead.history.iter().map(|h| &h.row));
            }
            let mut letters = txn.open_table(DEAD_LETTERS).map_err(io(OP))?;
            let mut gone = Vec::new();
            for entry in letters.iter().map_err(io(OP))? {
                let (key, value) = entry.map_err(io(OP))?;
                let letter: DeadLetter = decode_compact(key.value(), value.value())?;
                if person.is_in_dead_letter(&letter) {
                    forgotten.add_source_rows(letter.rows.iter().map(|r| &r.id));
                    forgotten.dead_letters.push(letter.payload.log_key());
                    gone.push(letter.id);
                }
            }
            for id in &gone {
                letters.remove(id.as_str()).map_err(io(OP))?;
            }
            let rows: HashSet<RowId> = forgotten.source_rows.iter().cloned().collect();
            for (i, list) in LISTS.into_iter().enumerate() {
                let mut table = txn.open_table(list).map_err(io(OP))?;
                let mut gone = Vec::new();
                for entry in table.iter().map_err(io(OP))? {
                    let (key, value) = entry.map_err(io(OP))?;
                    let (pk, rk) = key.value();
                    let row: RecordedRow = decode(&RowId::new(pk, rk).to_string(), value.value())?;
                    if person.is_in_row(&row, &rows) {
                        gone.push(row.row.id);
                    }
                }
                for id in &gone {
                    table
                        .remove((id.partition_key.as_str(), id.row_key.as_str()))
                        .map_err(io(OP))?;
                }
                forgotten.add_source_rows(&gone);
                match i {
                    0 => forgotten.rejected = gone,
                    1 => forgotten.skipped = gone,
                    _ => forgotten.unidentifiable = gone,
                }
            }
        }
        txn.commit().map_err(io(OP))?;
        Ok(forgotten)
    }

    /// [`StateStore::prune_older_than`], in one transaction.
    fn prune_older_now(&self, before: OffsetDateTime, step: usize) -> Result<Pruned, StateError> {
        const OP: &str = "remove data older than state.retention";
        use std::ops::Bound::{Excluded, Unbounded};
        let mut cursor = locked(&self.retention);
        let txn = self.begin_write(OP)?;
        let mut pruned = Pruned::default();
        let mut next = RetentionCursor::default();
        if let Walk::From(after) = &cursor.customers {
            let mut table = txn.open_table(CUSTOMERS).map_err(io(OP))?;
            let mut stale: Vec<Vec<u8>> = Vec::new();
            let mut last = None;
            let mut seen = 0;
            {
                let entries = match after {
                    Some(after) => table.range::<&[u8]>((Excluded(after.as_slice()), Unbounded)),
                    None => table.range::<&[u8]>(..),
                }
                .map_err(io(OP))?;
                for entry in entries.take(step) {
                    let (key, value) = entry.map_err(io(OP))?;
                    seen += 1;
                    let text = String::from_utf8_lossy(key.value()).into_owned();
                    // An unreadable record is kept, for a person to see.
                    if decode_customer(&text, value.value())
                        .is_ok_and(|c| c.lead.last_seen < before)
                    {
                        stale.push(key.value().to_vec());
                    }
                    last = Some(key.value().to_vec());
                }
            }
            for key in &stale {
                table.remove(key.as_slice()).map_err(io(OP))?;
            }
            pruned.customers = stale.len();
            next.customers = Walk::next(seen < step, last);
        } else {
            next.customers = Walk::Done;
        }
        if let Walk::From(after) = &cursor.dead_letters {
            let mut table = txn.open_table(DEAD_LETTERS).map_err(io(OP))?;
            let mut stale: Vec<String> = Vec::new();
            let mut last = None;
            let mut seen = 0;
            {
                let entries = match after {
                    Some(after) => table.range::<&str>((Excluded(after.as_str()), Unbounded)),
                    None => table.range::<&str>(..),
                }
                .map_err(io(OP))?;
                for entry in entries.take(step) {
                    let (key, value) = entry.map_err(io(OP))?;
                    seen += 1;
                    if decode_compact::<DeadLetter>(key.value(), value.value())
                        .is_ok_and(|l| l.at < before)
                    {
                        stale.push(key.value().to_owned());
                    }
                    last = Some(key.value().to_owned());
                }
            }
            for key in &stale {
                table.remove(key.as_str()).map_err(io(OP))?;
            }
            pruned.dead_letters = stale.len();
            next.dead_letters = Walk::next(seen < step, last);
        } else {
            next.dead_letters = Walk::Done;
        }
        for (i, list) in LISTS.into_iter().enumerate() {
            let Walk::From(after) = &cursor.lists[i] else {
                next.lists[i] = Walk::Done;
                continue;
            };
            let mut table = txn.open_table(list).map_err(io(OP))?;
            let mut stale: Vec<(String, String)> = Vec::new();
            let mut last = None;
            let mut seen = 0;
            {
                let entries = match after {
                    Some((pk, rk)) => table
                        .range::<(&str, &str)>((Excluded((pk.as_str(), rk.as_str())), Unbounded)),
                    None => table.range::<(&str, &str)>(..),
                }
                .map_err(io(OP))?;
                for entry in entries.take(step) {
                    let (key, value) = entry.map_err(io(OP))?;
                    seen += 1;
                    let (pk, rk) = key.value();
                    let old = decode::<RecordedRow>(&RowId::new(pk, rk).to_string(), value.value())
                        .is_ok_and(|r| r.row.timestamp < before);
                    if old {
                        stale.push((pk.to_owned(), rk.to_owned()));
                    }
                    last = Some((pk.to_owned(), rk.to_owned()));
                }
            }
            for (pk, rk) in &stale {
                table.remove((pk.as_str(), rk.as_str())).map_err(io(OP))?;
            }
            match i {
                0 => pruned.rejected = stale.len(),
                1 => pruned.skipped = stale.len(),
                _ => pruned.unidentifiable = stale.len(),
            }
            next.lists[i] = Walk::next(seen < step, last);
        }
        // A step that found nothing to remove (the usual poll) writes nothing.
        match pruned.removed() {
            0 => txn.abort().map_err(io(OP))?,
            _ => txn.commit().map_err(io(OP))?,
        }
        pruned.complete = next.round_done();
        *cursor = match pruned.complete {
            true => RetentionCursor::default(),
            false => next,
        };
        Ok(pruned)
    }

    /// Compacts the file (after [`StateStore::forget`]): the pages the removed records
    /// were on are given back, and the file shrinks.
    pub fn compact(mut self) -> Result<bool, StateError> {
        self.commit_held_now()?;
        self.db.compact().map_err(io("compact the state file"))
    }
}

/// Runs file work (a redb read, a commit) without stalling the async runtime: on a
/// multi-threaded runtime the worker first hands its other tasks (the next page being
/// fetched, the delivery) to another thread. A current-thread runtime just runs it.
fn blocking<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

fn io<E: std::fmt::Display>(operation: &'static str) -> impl Fn(E) -> StateError {
    move |e| StateError::Io {
        operation,
        message: e.to_string(),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state records serialise to JSON")
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

/// First byte of a record in the first compact format (postcard of the serde types,
/// times as text), as versions before the [`STORED`] form wrote handled rows and
/// customers. JSON records, as written before that, start with `{`. Both are still read.
const COMPACT: u8 = 1;

/// The records written once per row or per customer (handled rows, customers) are
/// written compactly: postcard is about 3x faster than JSON for them and half the size
/// (bench/results/history.md, "Bottlenecks"). postcard encodes enum variants by position: variants
/// of stored enums (e.g. `Stage`) may be added at the end only. Now only the tests
/// write this form, to check that it is still read.
#[cfg(test)]
fn encode_compact<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![COMPACT]).expect("state records serialise to postcard")
}

/// First byte of a customer or handled-row record in the stored form (times as ticks,
/// derived fields and the service's standard ETags left out: [`CustomerState::write_stored`],
/// [`encode_handled`]). Records in the two earlier forms are still read.
const STORED: u8 = 2;

/// First byte of a customer record in the form that keeps a hash of the summary
/// instead of its text ([`CustomerState::write_stored`]), about half the size. Customers
/// in the [`STORED`] form and the two before are still read.
const SUMMARY_HASHED: u8 = 3;

/// A handled row's record: `(ETag, Timestamp ticks)`, the ETag `None` when it is the
/// service's standard one for the Timestamp: at most 12 bytes instead of about 80.
fn encode_handled(row: &RowVersion) -> Vec<u8> {
    let etag = (!crate::source::row::is_standard_etag(&row.etag, row.timestamp))
        .then_some(row.etag.as_str());
    let record: (Option<&str>, i64) = (etag, crate::timestamp::to_ticks(row.timestamp));
    postcard::to_extend(&record, vec![STORED]).expect("handled rows serialise to postcard")
}

/// A handled row's record as read, in any form.
struct Handled {
    /// `None`: the service's standard ETag for `timestamp`, which is not built unless
    /// asked for (the prune scan reads every record, the overlap re-read many).
    etag: Option<String>,
    timestamp: OffsetDateTime,
}

impl Handled {
    /// The record is of the row at this ETag.
    fn has_etag(&self, etag: &str) -> bool {
        match &self.etag {
            Some(stored) => stored == etag,
            None => crate::source::row::is_standard_etag(etag, self.timestamp),
        }
    }
}

/// Reads the record of the handled row (`partition_key`, `row_key`) in any of the three forms.
fn decode_handled(
    (partition_key, row_key): (&[u8], &[u8]),
    bytes: &[u8],
) -> Result<Handled, StateError> {
    let key = || {
        RowId::new(
            String::from_utf8_lossy(partition_key),
            String::from_utf8_lossy(row_key),
        )
        .to_string()
    };
    if bytes.first() != Some(&STORED) {
        let record: HandledRecord = decode_compact(&key(), bytes)?;
        return Ok(Handled {
            etag: Some(record.etag),
            timestamp: record.timestamp,
        });
    }
    let corrupt = |message: String| StateError::Corrupt {
        key: key(),
        message,
    };
    let (etag, ticks): (Option<String>, i64) =
        postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(e.to_string()))?;
    let timestamp = crate::timestamp::from_ticks(ticks)
        .ok_or_else(|| corrupt(format!("time {ticks} is out of range")))?;
    Ok(Handled { etag, timestamp })
}

/// Reads a customer record in any of the four forms. One in the newest form has no
/// summary text until [`CustomerState::complete_summary`].
fn decode_customer(key: &str, bytes: &[u8]) -> Result<CustomerState, StateError> {
    let form = match bytes.first() {
        Some(&SUMMARY_HASHED) => SummaryForm::Hash,
        Some(&STORED) => SummaryForm::Text,
        _ => return decode_compact::<EarlierCustomerState>(key, bytes).map(Into::into),
    };
    CustomerState::read_stored(key, &bytes[1..], form).map_err(|message| StateError::Corrupt {
        key: key.to_owned(),
        message,
    })
}

/// Reads a record written by [`encode_compact`] or, by an earlier version, as JSON.
fn decode_compact<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StateError> {
    match bytes.first() {
        Some(&COMPACT) => postcard::from_bytes(&bytes[1..]).map_err(|e| StateError::Corrupt {
            key: key.to_owned(),
            message: e.to_string(),
        }),
        Some(b'{') => decode(key, bytes),
        other => Err(StateError::Corrupt {
            key: key.to_owned(),
            message: format!("unknown record format {other:?} (written by a newer leadsync?)"),
        }),
    }
}

#[async_trait::async_trait]
impl StateStore for RedbStore {
    async fn checkpoint(&self) -> Result<Option<OffsetDateTime>, StateError> {
        blocking(|| {
            let txn = self.db.begin_read().map_err(io("read checkpoint"))?;
            let meta = txn.open_table(META).map_err(io("read checkpoint"))?;
            let Some(bytes) = meta.get(CHECKPOINT_KEY).map_err(io("read checkpoint"))? else {
                return Ok(None);
            };
            let record: CheckpointRecord = decode(CHECKPOINT_KEY, bytes.value())?;
            if record.version > CHECKPOINT_VERSION {
                return Err(StateError::Corrupt {
                    key: CHECKPOINT_KEY.into(),
                    message: format!(
                    "written by a newer leadsync (format {}, this one reads {CHECKPOINT_VERSION})",
                    record.version
                ),
                });
            }
            Ok(Some(record.timestamp))
        })
    }

    async fn set_checkpoint(&self, timestamp: OffsetDateTime) -> Result<(), StateError> {
        blocking(|| {
            let record = CheckpointRecord {
                version: CHECKPOINT_VERSION,
                timestamp,
            };
            // Not `set_quick_repair`: it would save closing the file a commit of its own,
            // but it serialises redb's allocator state in every checkpoint commit, and a
            // daemon's RSS after a poll grew by 3-4 MiB (idle: 16 -> 20 MiB).
            let txn = self.begin_write("write checkpoint")?;
            {
                let mut meta = txn.open_table(META).map_err(io("write checkpoint"))?;
                meta.insert(CHECKPOINT_KEY, encode(&record).as_slice())
                    .map_err(io("write checkpoint"))?;
            }
            txn.commit().map_err(io("write checkpoint"))
        })
    }

    async fn handled(&self, rows: &[RowVersion]) -> Result<Vec<bool>, StateError> {
        blocking(|| {
            let txn = self.db.begin_read().map_err(io("read handled rows"))?;
            let table = txn.open_table(HANDLED).map_err(io("read handled rows"))?;
            rows.iter()
                .map(|row| {
                    let key = (row.id.partition_key.as_bytes(), row.id.row_key.as_bytes());
                    match table.get(key).map_err(io("read handled rows"))? {
                        None => Ok(false),
                        Some(bytes) => {
                            let record = decode_handled(key, bytes.value())?;
                            Ok(record.has_etag(&row.etag))
                        }
                    }
                })
                .collect()
        })
    }

    async fn settle(&self, batch: &SettleBatch) -> Result<(), StateError> {
        self.settle_prepared_when(batch, None, commit_now()).await
    }

    /// Encodes the batch's customers, a few milliseconds of a page's commit that can
    /// overlap the JSONL sink's fsync.
    fn prepare(&self, batch: &SettleBatch) -> Option<Prepared> {
        let mut prepared = Prepared {
            bytes: Vec::with_capacity(batch.customers.len() * 1024),
            ends: Vec::with_capacity(batch.customers.len()),
        };
        for customer in &batch.customers {
            prepared
                .bytes
                .extend_from_slice(customer.lead.key.as_bytes());
            let key = prepared.bytes.len();
            prepared.bytes.push(SUMMARY_HASHED);
            prepared.bytes = customer.write_stored(std::mem::take(&mut prepared.bytes));
            prepared.ends.push((key, prepared.bytes.len()));
        }
        Some(prepared)
    }

    async fn settle_prepared_when(
        &self,
        batch: &SettleBatch,
        prepared: Option<Prepared>,
        when: CommitWhen,
    ) -> Result<(), StateError> {
        let prepared = match prepared {
            Some(p) if p.is_for(batch) => p,
            _ => StateStore::prepare(self, batch).expect("the file store prepares"),
        };
        let held = locked(&self.held.txn).take();
        // Unless this batch is held in turn, the held records are forgotten on the way
        // out: committed with this batch, or rolled back with it.
        let mut forget = ForgetHeld {
            held: &self.held,
            armed: true,
        };
        let (txn, pages) = blocking(|| {
            let now = OffsetDateTime::now_utc();
            let settlements = &batch.rows;
            let (mut txn, pages) = match held {
                Some(held) => held,
                None => (self.db.begin_write().map_err(io("settle rows"))?, 0),
            };
            // redb promises only that an `Eventual` commit is persisted some time after it
            // returns: a process crash keeps it, and a power loss may roll it back to the last
            // checkpoint commit (`Immediate`, and with it everything before). What a roll-back
            // forgets is read again, as the checkpoint did not move past it, and delivered
            // again as an idempotent upsert. (redb 2.6 implements `Eventual` with an
            // `fdatasync` on Linux, a barrier on macOS: more than this relies on. The sync
            // runs in the commit task, off the page's path, and waits on the disk, not the CPU.)
            txn.set_durability(redb::Durability::Eventual);
            {
                let mut letters = txn.open_table(DEAD_LETTERS).map_err(io("settle rows"))?;
                // Every customer delivered resolves its dead letter, if it has one: an empty
                // table (the usual case) is not searched once per customer.
                if !letters.is_empty().map_err(io("settle rows"))? {
                    for id in &batch.resolved {
                        letters.remove(id.as_str()).map_err(io("settle rows"))?;
                    }
                }
                for letter in &batch.dead_letters {
                    letters
                        .insert(letter.id.as_str(), encode(letter).as_slice())
                        .map_err(io("settle rows"))?;
                }
                let mut stored = txn.open_table(CUSTOMERS).map_err(io("settle rows"))?;
                for (key, record) in prepared.records() {
                    stored.insert(key, record).map_err(io("settle rows"))?;
                }
                let mut handled = txn.open_table(HANDLED).map_err(io("settle rows"))?;
                let mut rejected = txn.open_table(REJECTED).map_err(io("settle rows"))?;
                let mut skipped = txn.open_table(SKIPPED).map_err(io("settle rows"))?;
                let mut held = txn.open_table(UNIDENTIFIABLE).map_err(io("settle rows"))?;
                // A row's latest version decides where it is listed, so each row settled
                // leaves the lists it was on. A list shorter than the batch (a backfill's
                // usual case: a few test leads) is read once and only the batch's rows on
                // it removed, instead of one B-tree search per row and list; a longer one
                // is searched per row.
                // An empty list (no test lead yet) costs nothing, not even the key set.
                let mut batch_keys: Option<HashSet<(&str, &str)>> = None;
                let mut search_per_row = [false; 3];
                for (table, per_row) in [&mut rejected, &mut skipped, &mut held]
                    .into_iter()
                    .zip(&mut search_per_row)
                {
                    let len = table.len().map_err(io("settle rows"))?;
                    if len == 0 {
                        continue;
                    }
                    if len > settlements.len() as u64 {
                        *per_row = true;
                        continue;
                    }
                    let keys = batch_keys.get_or_insert_with(|| {
                        settlements
                            .iter()
                            .map(|s| (s.row.id.partition_key.as_str(), s.row.id.row_key.as_str()))
                            .collect()
                    });
                    let mut on_list = Vec::new();
                    for entry in table.iter().map_err(io("settle rows"))? {
                        let (key, _) = entry.map_err(io("settle rows"))?;
                        let (pk, rk) = key.value();
                        if keys.contains(&(pk, rk)) {
                            on_list.push((pk.to_owned(), rk.to_owned()));
                        }
                    }
                    for (pk, rk) in &on_list {
                        table
                            .remove((pk.as_str(), rk.as_str()))
                            .map_err(io("settle rows"))?;
                    }
                }
                // Rows listed by this batch, and where: a second version of one in the
                // same batch moves it.
                let mut listed_here: HashMap<(&str, &str), usize> = HashMap::new();
                for s in settlements {
                    let key = (s.row.id.partition_key.as_str(), s.row.id.row_key.as_str());
                    // A delivered row is not remembered here: its version is in its
                    // customer's history, committed in this same transaction, and a re-read
                    // of it merges to no change, so nothing is sent (`Pipeline::merge`).
                    // That is one B-tree insert per delivered row saved, a tenth of a
                    // backfill's work; reading a customer from this file is cheap. (The
                    // table store keeps its markers: there a customer read is a request.)
                    if !matches!(s.outcome, Settled::Delivered { .. }) {
                        handled
                            .insert(
                                (key.0.as_bytes(), key.1.as_bytes()),
                                encode_handled(&s.row).as_slice(),
                            )
                            .map_err(io("settle rows"))?;
                    }
                    let recorded = || RecordedRow {
                        row: s.row.clone(),
                        outcome: s.outcome.clone(),
                        columns: s.columns.clone(),
                        recorded_at: now,
                    };
                    let mut lists = [&mut rejected, &mut skipped, &mut held];
                    for (table, per_row) in lists.iter_mut().zip(search_per_row) {
                        if per_row {
                            table.remove(key).map_err(io("settle rows"))?;
                        }
                    }
                    if let Some(i) = listed_here.remove(&key) {
                        lists[i].remove(key).map_err(io("settle rows"))?;
                    }
                    let list = match &s.outcome {
                        Settled::Delivered { .. } => None,
                        Settled::Rejected { .. } => Some(0),
                        Settled::Skipped { .. } => Some(1),
                        Settled::Unidentifiable { .. } => Some(2),
                    };
                    if let Some(i) = list {
                        lists[i]
                            .insert(key, encode(&recorded()).as_slice())
                            .map_err(io("settle rows"))?;
                        listed_here.insert(key, i);
                    }
                }
            }
            Ok::<_, StateError>((txn, pages + 1))
        })?;
        // Written, not committed: the outcomes become durable only after the deliveries
        // they record. A transaction dropped uncommitted is rolled back, with the
        // batches held in it.
        if when.await != Ok(true) {
            return Ok(());
        }
        let (max_pages, max_bytes) = self.hold_limits;
        if batch.continued.more() && pages < max_pages {
            let mut records = locked(&self.held.customers);
            if records.bytes + prepared.bytes.len() <= max_bytes {
                for (key, record) in prepared.records() {
                    records.insert(key, record);
                }
                drop(records);
                *locked(&self.held.txn) = Some((txn, pages));
                forget.armed = false;
                return Ok(());
            }
        }
        blocking(|| txn.commit().map_err(io("settle rows")))
    }

    async fn prune_handled(&self, before: OffsetDateTime) -> Result<usize, StateError> {
        blocking(|| self.prune_handled_in_steps(before, PRUNE_STEP))
    }

    async fn commit_held(&self) -> Result<(), StateError> {
        blocking(|| self.commit_held_now())
    }

    async fn handled_len(&self) -> Result<u64, StateError> {
        blocking(|| {
            let txn = self.db.begin_read().map_err(io("count handled rows"))?;
            let table = txn.open_table(HANDLED).map_err(io("count handled rows"))?;
            table.len().map_err(io("count handled rows"))
        })
    }

    async fn rejected(&self) -> Result<Vec<RecordedRow>, StateError> {
        blocking(|| self.recorded(REJECTED))
    }

    async fn skipped(&self) -> Result<Vec<RecordedRow>, StateError> {
        blocking(|| self.recorded(SKIPPED))
    }

    async fn forget(&self, person: &Person) -> Result<Forgotten, StateError> {
        blocking(|| self.forget_now(person))
    }

    async fn prune_older_than(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<Pruned, StateError> {
        blocking(|| self.prune_older_now(before, step))
    }

    async fn unidentifiable(&self) -> Result<Vec<RecordedRow>, StateError> {
        blocking(|| self.recorded(UNIDENTIFIABLE))
    }

    async fn customers(&self, keys: &[String]) -> Result<Vec<Option<CustomerState>>, StateError> {
        let mut read = self.customers_to_merge(keys).await?;
        for customer in read.iter_mut().flatten() {
            customer.complete_summary(&self.summary_template);
        }
        Ok(read)
    }

    /// Customers in the newest form come without their summary's text, which the merge
    /// rebuilds anyway.
    async fn customers_to_merge(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<CustomerState>>, StateError> {
        blocking(|| {
            // The snapshot and the held records are taken together: a commit of the held
            // transaction forgets its records only after the snapshot has them. The held
            // records asked for are copied out (a page's worth at most, some hundred KiB),
            // so that the lock is not held while they are decoded.
            let (txn, held) = {
                let records = locked(&self.held.customers);
                let txn = self.db.begin_read().map_err(io("read customers"))?;
                let held: Vec<Option<Box<[u8]>>> = match records.records.is_empty() {
                    true => Vec::new(),
                    false => keys
                        .iter()
                        .map(|key| records.get(key.as_bytes()).map(Box::from))
                        .collect(),
                };
                (txn, held)
            };
            let table = txn.open_table(CUSTOMERS).map_err(io("read customers"))?;
            keys.iter()
                .enumerate()
                .map(|(i, key)| {
                    if let Some(Some(record)) = held.get(i) {
                        return decode_customer(key, record).map(Some);
                    }
                    match table.get(key.as_bytes()).map_err(io("read customers"))? {
                        None => Ok(None),
                        Some(bytes) => decode_customer(key, bytes.value()).map(Some),
                    }
                })
                .collect()
        })
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError> {
        blocking(|| {
            let txn = self.db.begin_read().map_err(io("read dead letters"))?;
            let table = txn
                .open_table(DEAD_LETTERS)
                .map_err(io("read dead letters"))?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(io("read dead letters"))? {
                let (key, value) = entry.map_err(io("read dead letters"))?;
                out.push(decode_compact(key.value(), value.value())?);
            }
            Ok(out)
        })
    }

    async fn all_customers(&self) -> Result<Vec<CustomerState>, StateError> {
        blocking(|| {
            let txn = self.db.begin_read().map_err(io("read customers"))?;
            let table = txn.open_table(CUSTOMERS).map_err(io("read customers"))?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(io("read customers"))? {
                let (key, value) = entry.map_err(io("read customers"))?;
                let key = std::str::from_utf8(key.value()).map_err(|e| StateError::Corrupt {
                    key: String::from_utf8_lossy(key.value()).into_owned(),
                    message: format!("the key is not UTF-8: {e}"),
                })?;
                let mut customer = decode_customer(key, value.value())?;
                customer.complete_summary(&self.summary_template);
                out.push(customer);
            }
            Ok(out)
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timestamp::parse;
    use std::sync::Arc;

    fn version(rk: &str, etag: &str, ts: &str) -> RowVersion {
        RowVersion {
            id: RowId::new("p", rk),
            etag: etag.into(),
            timestamp: parse(ts).unwrap(),
        }
    }

    fn delivered(row: RowVersion) -> Settlement {
        Settlement {
            row,
            outcome: Settled::Delivered {
                sink: "jsonl".into(),
            },
            columns: None,
        }
    }

    /// Skipped by the test-lead policy: an outcome the store remembers as handled.
    fn skipped(row: RowVersion) -> Settlement {
        Settlement {
            row,
            outcome: Settled::Skipped {
                policy: "test_lead".into(),
            },
            columns: Some(Map::new()),
        }
    }

    #[tokio::test]
    async fn delivered_rows_are_left_to_their_customers_history_and_the_rest_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let rows: Vec<RowVersion> = ["d", "s", "r", "u"]
            .iter()
            .map(|rk| version(rk, "W/1", "2024-05-01T10:00:00Z"))
            .collect();
        let outcome = |row: &RowVersion, outcome: Settled| Settlement {
            row: row.clone(),
            outcome,
            columns: Some(Map::new()),
        };
        store
            .settle(&SettleBatch::rows(vec![
                delivered(rows[0].clone()),
                skipped(rows[1].clone()),
                outcome(
                    &rows[2],
                    Settled::Rejected {
                        reason: "no CustomerInfo".into(),
                    },
                ),
                outcome(
                    &rows[3],
                    Settled::Unidentifiable {
                        reason: "no email".into(),
                    },
                ),
            ]))
            .await
            .unwrap();
        assert_eq!(
            store.handled(&rows).await.unwrap(),
            vec![false, true, true, true]
        );
        assert_eq!(store.handled_len().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_new_file_is_in_redbs_v3_format_and_an_earlier_one_is_upgraded_keeping_its_state() {
        // Is the file in `dir` in redb's newest format already? (`upgrade` says, and
        // upgrades it if not.)
        let is_v3 = |dir: &Path| {
            let mut db = Database::create(dir.join(RedbStore::FILE_NAME)).unwrap();
            !db.upgrade().unwrap()
        };
        // A file as leadsync wrote it before: redb's default format, with a checkpoint.
        let checkpoint = parse("2024-05-01T10:00:00Z").unwrap();
        let earlier = || {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::create(dir.path().join(RedbStore::FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            let record = CheckpointRecord {
                version: CHECKPOINT_VERSION,
                timestamp: checkpoint,
            };
            txn.open_table(META)
                .unwrap()
                .insert(CHECKPOINT_KEY, encode(&record).as_slice())
                .unwrap();
            txn.commit().unwrap();
            dir
        };
        assert!(!is_v3(earlier().path()), "redb's default is still v2");
        let (new, earlier) = (tempfile::tempdir().unwrap(), earlier());

        drop(RedbStore::open(new.path()).unwrap());
        let store = RedbStore::open(earlier.path()).unwrap();
        let read = store.checkpoint().await.unwrap();
        drop(store);

        assert!(is_v3(new.path()));
        assert!(is_v3(earlier.path()));
        assert_eq!(read, Some(checkpoint));
    }

    #[tokio::test]
    async fn the_checkpoint_survives_reopening_at_full_precision() {
        let dir = tempfile::tempdir().unwrap();
        let t = parse("2024-05-01T10:00:00.1234567Z").unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            assert_eq!(store.checkpoint().await.unwrap(), None);
            store.set_checkpoint(t).await.unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(store.checkpoint().await.unwrap(), Some(t));
    }

    #[tokio::test]
    async fn a_row_is_handled_only_at_the_etag_it_was_settled_with() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let v1 = version("r", "W/1", "2024-05-01T10:00:00Z");
        store
            .settle(&SettleBatch::rows(vec![skipped(v1.clone())]))
            .await
            .unwrap();
        let v2 = version("r", "W/2", "2024-05-01T11:00:00Z");
        let other = version("s", "W/1", "2024-05-01T10:00:00Z");
        assert_eq!(
            store.handled(&[v1, v2, other]).await.unwrap(),
            vec![true, false, false]
        );
    }

    #[tokio::test]
    async fn pruning_forgets_only_rows_stamped_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let old = version("old", "e", "2024-05-01T09:00:00Z");
        let edge = version("edge", "e", "2024-05-01T10:00:00.0000001Z");
        store
            .settle(&SettleBatch::rows(vec![
                skipped(old.clone()),
                skipped(edge.clone()),
            ]))
            .await
            .unwrap();
        let pruned = store
            .prune_handled(parse("2024-05-01T10:00:00.0000001Z").unwrap())
            .await
            .unwrap();
        assert_eq!(pruned, 1);
        assert_eq!(
            store.handled(&[old, edge]).await.unwrap(),
            vec![false, true]
        );
        assert_eq!(store.handled_len().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_rejected_row_keeps_its_reason_until_a_later_version_is_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let v1 = version("r", "W/1", "2024-05-01T10:00:00Z");
        store
            .settle(&SettleBatch::rows(vec![Settlement {
                row: v1,
                outcome: Settled::Rejected {
                    reason: "CustomerInfo is not valid JSON".into(),
                },
                columns: Some(Map::new()),
            }]))
            .await
            .unwrap();
        let rejected = store.rejected().await.unwrap();
        assert_eq!(rejected.len(), 1);
        assert!(
            matches!(&rejected[0].outcome, Settled::Rejected { reason } if reason.contains("JSON"))
        );

        store
            .settle(&SettleBatch::rows(vec![delivered(version(
                "r",
                "W/2",
                "2024-05-01T11:00:00Z",
            ))]))
            .await
            .unwrap();
        assert!(store.rejected().await.unwrap().is_empty());
    }

    /// Each list is cleared of a batch's rows either way: read once when it is no
    /// longer than the batch, searched per row when it is longer.
    #[tokio::test]
    async fn a_row_is_listed_only_where_its_latest_version_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let rejected = |row: RowVersion| Settlement {
            row,
            outcome: Settled::Rejected {
                reason: "no CustomerInfo".into(),
            },
            columns: Some(Map::new()),
        };
        let at =
            |rk: &str, n: u32| version(rk, &format!("W/{n}"), &format!("2024-05-01T1{n}:00:00Z"));
        let listed = |rows: Vec<RecordedRow>| -> Vec<String> {
            rows.into_iter().map(|r| r.row.id.row_key).collect()
        };
        store
            .settle(&SettleBatch::rows(vec![
                rejected(at("a", 1)),
                rejected(at("b", 1)),
                rejected(at("c", 1)),
                skipped(at("d", 1)),
            ]))
            .await
            .unwrap();
        // One row: the rejected list (3) is longer than the batch, the skipped one (1) is not.
        store
            .settle(&SettleBatch::rows(vec![skipped(at("a", 2))]))
            .await
            .unwrap();
        assert_eq!(listed(store.rejected().await.unwrap()), ["b", "c"]);
        assert_eq!(listed(store.skipped().await.unwrap()), ["a", "d"]);
        // Two versions of "e" in one batch: the second decides.
        store
            .settle(&SettleBatch::rows(vec![
                delivered(at("b", 3)),
                rejected(at("d", 3)),
                skipped(at("e", 3)),
                rejected(at("e", 4)),
            ]))
            .await
            .unwrap();
        assert_eq!(listed(store.rejected().await.unwrap()), ["c", "d", "e"]);
        assert_eq!(listed(store.skipped().await.unwrap()), ["a"]);
        let e = store.rejected().await.unwrap().pop().unwrap();
        assert_eq!(e.row.etag, "W/4");
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        let second = RedbStore::open(dir.path()).unwrap_err();
        assert!(second.to_string().contains("another leadsync"), "{second}");
    }

    fn a_customer() -> CustomerState {
        customer_named("ana")
    }

    /// A customer `name`@fabrikam.com with one lead.
    fn customer_named(name: &str) -> CustomerState {
        use crate::identity::CustomerKey;
        use crate::identity::IdentitySettings;
        let email = format!("{name}@fabrikam.com");
        let info = serde_json::json!({ "FirstName": "Ana", "Email": email }).to_string();
        let row = crate::source::row::RawRow {
            id: RowId::new("p", "r1"),
            etag: "W/1".into(),
            timestamp: parse("2024-05-01T10:00:00.1234567Z").unwrap(),
            columns: serde_json::json!({
                "LeadSource": "AppSource-INS|contoso.analytics",
                "CustomerInfo": info,
            })
            .as_object()
            .unwrap()
            .clone(),
        };
        let event = crate::lead::normalise(&row).unwrap();
        let settings = IdentitySettings::default();
        let mut customer = CustomerState::new(&CustomerKey::Email(email), &settings);
        customer.apply([&event], &settings);
        customer
    }

    /// A page's batch of one customer and one skipped row, `continued` or not.
    fn page(name: &str, continued: bool) -> SettleBatch {
        let row = version(&format!("r-{name}"), "W/1", "2024-05-01T10:00:00Z");
        let mut batch = SettleBatch::rows(vec![skipped(row)]);
        batch.customers.push(customer_named(name));
        batch.continued = Continued::new(continued);
        batch
    }

    fn names(customers: Vec<CustomerState>) -> Vec<String> {
        let mut names: Vec<String> = customers.into_iter().map(|c| c.lead.key).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn continued_pages_are_committed_together_and_read_back_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let all: Vec<String> = (0..HOLD_PAGES + 2).map(|i| format!("c{i}")).collect();
        let key = |i: usize| page(&all[i], true).customers[0].lead.key.clone();
        for (i, name) in all.iter().enumerate().take(HOLD_PAGES - 1) {
            store.settle(&page(name, true)).await.unwrap();
            // Held: a merge reads it, the file does not have it yet.
            let read = store.customers_to_merge(&[key(i)]).await.unwrap();
            assert_eq!(read[0].as_ref().map(|c| c.lead.key.clone()), Some(key(i)));
            assert!(store.all_customers().await.unwrap().is_empty());
            assert!(store.skipped().await.unwrap().is_empty());
        }
        // The HOLD_PAGES-th commits them all, and its own.
        store
            .settle(&page(&all[HOLD_PAGES - 1], true))
            .await
            .unwrap();
        let committed = names(store.all_customers().await.unwrap());
        assert_eq!(
            committed,
            names((0..HOLD_PAGES).map(|i| customer_named(&all[i])).collect())
        );
        assert_eq!(store.skipped().await.unwrap().len(), HOLD_PAGES);
        let read = store.customers(&[key(0)]).await.unwrap();
        assert_eq!(
            read[0].as_ref().unwrap().lead.summary,
            customer_named(&all[0]).lead.summary
        );

        // Any other write commits what is held first, instead of waiting for it for ever.
        store.settle(&page(&all[HOLD_PAGES], true)).await.unwrap();
        let checkpoint = parse("2024-05-01T10:00:00Z").unwrap();
        tokio::time::timeout(Duration::from_secs(10), store.set_checkpoint(checkpoint))
            .await
            .expect("set_checkpoint does not wait for the held transaction")
            .unwrap();
        assert_eq!(store.all_customers().await.unwrap().len(), HOLD_PAGES + 1);

        // So does closing the store.
        store
            .settle(&page(&all[HOLD_PAGES + 1], true))
            .await
            .unwrap();
        drop(store);
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(store.all_customers().await.unwrap().len(), HOLD_PAGES + 2);
        assert_eq!(store.checkpoint().await.unwrap(), Some(checkpoint));
    }

    #[tokio::test]
    async fn held_pages_are_committed_once_their_customer_records_reach_the_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        let one = store.prepare(&page("a", true)).unwrap().bytes.len();
        // Room for two pages' records, not three.
        store.hold_limits = (HOLD_PAGES, 2 * one + one / 2);
        store.settle(&page("a", true)).await.unwrap();
        store.settle(&page("b", true)).await.unwrap();
        assert!(store.all_customers().await.unwrap().is_empty());
        store.settle(&page("c", true)).await.unwrap();
        assert_eq!(store.all_customers().await.unwrap().len(), 3);
        // A customer held again takes its room once: its newer record replaces the older.
        for _ in 0..4 {
            store.settle(&page("a", true)).await.unwrap();
        }
        assert_eq!(store.all_customers().await.unwrap().len(), 3);
        assert_eq!(locked(&store.held.customers).bytes, one);
    }

    #[tokio::test]
    async fn a_page_whose_poll_ends_before_its_commit_commits_instead_of_holding() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let batch = page("last-but-one", true);
        let (synced, when) = tokio::sync::oneshot::channel();
        let settling = tokio::spawn({
            let (store, batch) = (Arc::clone(&store), batch.clone());
            async move { store.settle_prepared_when(&batch, None, when).await }
        });
        tokio::task::yield_now().await;
        // The poll learns that the next page is its last while this one's sink syncs.
        batch.continued.end();
        synced.send(true).unwrap();
        settling.await.unwrap().unwrap();
        assert_eq!(store.all_customers().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_page_whose_sync_fails_rolls_the_held_pages_back_with_it_and_commit_held_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let held = page("held", true);
        let key = held.customers[0].lead.key.clone();
        store.settle(&held).await.unwrap();
        let (failed, when) = tokio::sync::oneshot::channel();
        failed.send(false).unwrap();
        store
            .settle_prepared_when(&page("unsynced", false), None, when)
            .await
            .unwrap();
        // Neither page is committed, and the held customer is no longer read back.
        assert_eq!(
            store.customers(std::slice::from_ref(&key)).await.unwrap(),
            vec![None]
        );
        assert!(store.all_customers().await.unwrap().is_empty());
        assert!(store.skipped().await.unwrap().is_empty());

        store.settle(&held).await.unwrap();
        assert!(store.all_customers().await.unwrap().is_empty());
        store.commit_held().await.unwrap();
        assert_eq!(
            names(store.all_customers().await.unwrap()),
            vec![key.clone()]
        );
        // Nothing is held any more: a second call commits nothing and fails nothing.
        store.commit_held().await.unwrap();
        drop(store);
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(names(store.all_customers().await.unwrap()), vec![key]);
    }

    #[tokio::test]
    async fn a_batch_is_committed_only_once_its_deliveries_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let ana = a_customer();
        let row = version("r9", "W/9", "2024-05-01T10:00:00Z");
        let mut batch = SettleBatch::rows(vec![skipped(row.clone())]);
        batch.customers = vec![ana.clone()];
        let keys = [ana.lead.key.clone()];

        // The sink could not sync, or went away without saying: nothing is committed.
        let (failed, when) = tokio::sync::oneshot::channel();
        failed.send(false).unwrap();
        let prepared = store.prepare(&batch);
        store
            .settle_prepared_when(&batch, prepared, when)
            .await
            .unwrap();
        let (gone, when) = tokio::sync::oneshot::channel::<bool>();
        drop(gone);
        store
            .settle_prepared_when(&batch, None, when)
            .await
            .unwrap();
        assert_eq!(store.customers(&keys).await.unwrap(), vec![None]);
        assert_eq!(
            store.handled(std::slice::from_ref(&row)).await.unwrap(),
            vec![false]
        );
        assert!(store.skipped().await.unwrap().is_empty());

        // Written while the sink syncs, committed when it has: not visible before.
        let (synced, when) = tokio::sync::oneshot::channel();
        let settling = tokio::spawn({
            let (store, batch) = (Arc::clone(&store), batch.clone());
            async move { store.settle_prepared_when(&batch, None, when).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(store.customers(&keys).await.unwrap(), vec![None]);
        assert_eq!(
            store.handled(std::slice::from_ref(&row)).await.unwrap(),
            vec![false]
        );
        synced.send(true).unwrap();
        settling.await.unwrap().unwrap();
        assert_eq!(store.customers(&keys).await.unwrap(), vec![Some(ana)]);
        assert_eq!(store.handled(&[row]).await.unwrap(), vec![true]);
        assert_eq!(store.skipped().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_batch_prepared_ahead_settles_as_the_batch_itself_and_a_stale_preparation_is_not_used(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let ana = a_customer();
        let mut bo = a_customer();
        bo.lead.key = "email:bo@fabrikam.com".into();
        bo.lead.customer.phone = Some("+1 555 0100".into());
        let mut batch = SettleBatch::rows(vec![]);
        batch.customers = vec![ana.clone(), bo.clone()];
        let prepared = store.prepare(&batch);
        assert_eq!(prepared.as_ref().map(|p| p.ends.len()), Some(2));
        store
            .settle_prepared_when(&batch, prepared, commit_now())
            .await
            .unwrap();
        let keys = [ana.lead.key.clone(), bo.lead.key.clone()];
        assert_eq!(
            store.customers(&keys).await.unwrap(),
            vec![Some(ana.clone()), Some(bo.clone())]
        );

        // Prepared for other batches (one customer; the two in another order): the
        // store encodes this one itself.
        let stale = store.prepare(&SettleBatch {
            customers: vec![ana.clone()],
            ..SettleBatch::default()
        });
        let reordered = store.prepare(&SettleBatch {
            customers: vec![bo.clone(), ana.clone()],
            ..SettleBatch::default()
        });
        assert!(!reordered.as_ref().unwrap().is_for(&batch));
        assert!(!stale.as_ref().unwrap().is_for(&batch));
        let mut changed = batch.clone();
        changed.customers[1].lead.customer.phone = Some("+1 555 0199".into());
        store
            .settle_prepared_when(&changed, stale, commit_now())
            .await
            .unwrap();
        assert_eq!(
            store.customers(&keys).await.unwrap()[1]
                .as_ref()
                .and_then(|c| c.lead.customer.phone.as_deref()),
            Some("+1 555 0199")
        );
    }

    #[tokio::test]
    async fn a_customer_read_back_has_its_summary_rebuilt_with_the_configured_template() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path())
            .unwrap()
            .with_summary_template("{name}, from the file");
        let customer = a_customer();
        let mut batch = SettleBatch::rows(vec![]);
        batch.customers.push(customer.clone());
        store.settle(&batch).await.unwrap();
        let keys = [customer.lead.key.clone()];
        let read = store.customers(&keys).await.unwrap().remove(0).unwrap();
        assert_eq!(read.lead.summary, "Ana, from the file");
        let all = store.all_customers().await.unwrap();
        assert_eq!(all[0].lead.summary, "Ana, from the file");
        // The merge's read leaves it to the merge.
        let to_merge = store.customers_to_merge(&keys).await.unwrap().remove(0);
        assert_eq!(to_merge.unwrap().lead.summary, "");
    }

    #[tokio::test]
    async fn customers_written_compactly_or_as_json_by_an_earlier_version_both_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let customer = a_customer();
        let mut batch = SettleBatch::rows(vec![]);
        batch.customers.push(customer.clone());
        store.settle(&batch).await.unwrap();
        // And the same record under other keys, as earlier versions wrote it: JSON, and
        // the first compact form, in the string-keyed table of those versions, which the
        // next open moves.
        let mut old = customer.clone();
        old.lead.key = "email:old@fabrikam.com".into();
        let mut compact = customer.clone();
        compact.lead.key = "email:compact@fabrikam.com".into();
        let mut with_text = customer.clone();
        with_text.lead.key = "email:text@fabrikam.com".into();
        {
            let txn = store.db.begin_write().unwrap();
            // The form before the summary's hash, with its text.
            txn.open_table(CUSTOMERS)
                .unwrap()
                .insert(
                    with_text.lead.key.as_bytes(),
                    with_text.write_stored_with_text(vec![STORED]).as_slice(),
                )
                .unwrap();
            let mut table = txn.open_table(CUSTOMERS_STR).unwrap();
            table
                .insert(old.lead.key.as_str(), encode(&old).as_slice())
                .unwrap();
            table
                .insert(
                    compact.lead.key.as_str(),
                    encode_compact(&compact).as_slice(),
                )
                .unwrap();
            drop(table);
            txn.commit().unwrap();
        }
        drop(store);
        let store = RedbStore::open(dir.path()).unwrap();
        let keys = [
            customer.lead.key.clone(),
            old.lead.key.clone(),
            compact.lead.key.clone(),
            with_text.lead.key.clone(),
            "email:none".into(),
        ];
        let read = store.customers(&keys).await.unwrap();
        assert_eq!(
            read,
            vec![
                Some(customer.clone()),
                Some(old),
                Some(compact),
                Some(with_text),
                None
            ]
        );
        // Only the merge's read leaves out the summary it rebuilds, in the newest form only.
        let to_merge = store.customers_to_merge(&keys).await.unwrap();
        let summaries: Vec<_> = to_merge
            .iter()
            .map(|c| c.as_ref().map(|c| c.lead.summary.is_empty()))
            .collect();
        assert_eq!(
            summaries,
            [Some(true), Some(false), Some(false), Some(false), None]
        );
        let mut all = store.all_customers().await.unwrap();
        all.sort_by(|a, b| a.lead.key.cmp(&b.lead.key));
        assert_eq!(all.len(), 4);
        assert!(all.contains(&customer));
        assert!(all.iter().all(|c| c.lead.history == customer.lead.history));
        assert!(all.iter().all(|c| c.lead.summary == customer.lead.summary));

        // Each form is a fraction of the one before.
        let hashed = customer.write_stored(vec![SUMMARY_HASHED]).len();
        let stored = customer.write_stored_with_text(vec![STORED]).len();
        let compact = encode_compact(&customer).len();
        let json = encode(&customer).len();
        assert!(compact * 3 < json * 2, "compact {compact} B, JSON {json} B");
        assert!(
            stored * 4 < compact * 3,
            "stored {stored} B, compact {compact} B"
        );
        assert!(
            hashed + customer.lead.summary.len() <= stored + 10,
            "hashed {hashed} B, with the text {stored} B"
        );
    }

    #[tokio::test]
    async fn handled_rows_in_every_form_are_recognised_with_their_etag() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let ts = "2024-05-01T10:00:00.1234567Z";
        let standard = crate::source::row::standard_etag(parse(ts).unwrap());
        let rows = [
            version("standard", &standard, ts),
            version("other", "W/\"opaque-1\"", ts),
        ];
        store
            .settle(&SettleBatch::rows(
                rows.iter().cloned().map(skipped).collect(),
            ))
            .await
            .unwrap();
        // As the first compact form and as JSON wrote them, in the string-keyed table of
        // those versions, which the next open moves.
        let earlier = [
            version("compact", &standard, ts),
            version("json", "W/\"j\"", ts),
        ];
        {
            let txn = store.db.begin_write().unwrap();
            let mut table = txn.open_table(HANDLED_STR).unwrap();
            let record = |r: &RowVersion| HandledRecord {
                etag: r.etag.clone(),
                timestamp: r.timestamp,
            };
            let compact = encode_compact(&record(&earlier[0]));
            let json = encode(&record(&earlier[1]));
            table.insert(("p", "compact"), compact.as_slice()).unwrap();
            table.insert(("p", "json"), json.as_slice()).unwrap();
            drop(table);
            txn.commit().unwrap();
        }
        drop(store);
        let store = RedbStore::open(dir.path()).unwrap();
        let all: Vec<RowVersion> = rows.iter().chain(&earlier).cloned().collect();
        assert_eq!(store.handled(&all).await.unwrap(), vec![true; 4]);
        // Another version of the same rows is not handled.
        let changed: Vec<RowVersion> = all
            .iter()
            .map(|r| RowVersion {
                etag: crate::source::row::standard_etag(
                    parse("2024-05-01T10:00:00.1234568Z").unwrap(),
                ),
                ..r.clone()
            })
            .collect();
        assert_eq!(store.handled(&changed).await.unwrap(), vec![false; 4]);
        // The standard ETag is left out of the record.
        assert!(encode_handled(&rows[0]).len() <= 12);
        // All four forms carry their Timestamp for pruning.
        let cutoff = parse("2024-05-01T10:00:01Z").unwrap();
        assert_eq!(store.prune_handled(cutoff).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_state_file_with_string_keys_is_moved_to_byte_keys_in_steps_and_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let customer = a_customer();
        let ts = "2024-05-01T10:00:00.1234567Z";
        let rows: Vec<RowVersion> = (0..25)
            .map(|i| version(&format!("r{i:02}"), &format!("W/\"e{i}\""), ts))
            .collect();
        let keys: Vec<String> = (0..25).map(|i| format!("email:c{i:02}@f.com")).collect();
        // As a version before byte keys left it, except that a crash stopped its upgrade
        // after the first step: the first 5 of each are already in the new tables.
        {
            let txn = store.db.begin_write().unwrap();
            {
                let mut old_customers = txn.open_table(CUSTOMERS_STR).unwrap();
                let mut old_handled = txn.open_table(HANDLED_STR).unwrap();
                let mut customers = txn.open_table(CUSTOMERS).unwrap();
                let mut handled = txn.open_table(HANDLED).unwrap();
                for (i, (key, row)) in keys.iter().zip(&rows).enumerate() {
                    let record = customer.write_stored(vec![SUMMARY_HASHED]);
                    let done = encode_handled(row);
                    if i < 5 {
                        customers.insert(key.as_bytes(), record.as_slice()).unwrap();
                        handled
                            .insert(("p".as_bytes(), row.id.row_key.as_bytes()), done.as_slice())
                            .unwrap();
                    } else {
                        old_customers
                            .insert(key.as_str(), record.as_slice())
                            .unwrap();
                        old_handled
                            .insert(("p", row.id.row_key.as_str()), done.as_slice())
                            .unwrap();
                    }
                }
            }
            txn.commit().unwrap();
        }
        // 20 + 20 records left, moved 4 of each per transaction.
        assert_eq!(store.move_string_keyed(4).unwrap(), 40);
        assert_eq!(store.move_string_keyed(4).unwrap(), 0);
        let tables: Vec<String> = store
            .db
            .begin_read()
            .unwrap()
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(
            !tables.iter().any(|t| t == "customers" || t == "handled"),
            "{tables:?}"
        );
        assert_eq!(store.handled_len().await.unwrap(), 25);
        assert_eq!(store.handled(&rows).await.unwrap(), vec![true; 25]);
        let read = store.customers(&keys).await.unwrap();
        assert!(read
            .iter()
            .all(|c| c.as_ref().map(|c| &c.lead.history) == Some(&customer.lead.history)));
        assert_eq!(store.all_customers().await.unwrap().len(), 25);
    }

    #[tokio::test]
    async fn a_record_in_an_unknown_format_is_an_error_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(CUSTOMERS)
                .unwrap()
                .insert("email:x@y.z".as_bytes(), [9u8, 1, 2].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = store.customers(&["email:x@y.z".into()]).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("email:x@y.z") && text.contains("unknown record format"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn pruning_in_small_steps_forgets_exactly_the_old_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let rows: Vec<Settlement> = (0..25)
            .map(|i| {
                let ts = if i % 3 == 0 {
                    "2024-05-01T09:00:00Z"
                } else {
                    "2024-05-01T11:00:00Z"
                };
                skipped(version(&format!("r{i:02}"), "e", ts))
            })
            .collect();
        store.settle(&SettleBatch::rows(rows)).await.unwrap();
        let cutoff = parse("2024-05-01T10:00:00Z").unwrap();
        // Steps of 4 records: 7 transactions, old rows on both sides of every boundary.
        let pruned = store.prune_handled_in_steps(cutoff, 4).unwrap();
        assert_eq!(pruned, 9);
        assert_eq!(store.handled_len().await.unwrap(), 16);
        let kept = store
            .handled(&[
                version("r00", "e", "2024-05-01T09:00:00Z"),
                version("r01", "e", "2024-05-01T11:00:00Z"),
                version("r24", "e", "2024-05-01T09:00:00Z"),
                version("r23", "e", "2024-05-01T11:00:00Z"),
            ])
            .await
            .unwrap();
        assert_eq!(kept, vec![false, true, false, true]);
        assert_eq!(store.prune_handled_in_steps(cutoff, 4).unwrap(), 0);
    }

    #[tokio::test]
    async fn pruning_that_finds_nothing_old_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let rows: Vec<Settlement> = (0..6)
            .map(|i| skipped(version(&format!("r{i}"), "e", "2024-05-01T11:00:00Z")))
            .collect();
        store.settle(&SettleBatch::rows(rows)).await.unwrap();
        let file = dir.path().join(RedbStore::FILE_NAME);
        let before = std::fs::read(&file).unwrap();
        // Every row is newer than the cutoff; steps of 4: three transactions look (4, 2 and
        // no rows), none commits.
        let cutoff = parse("2024-05-01T10:00:00Z").unwrap();
        assert_eq!(store.prune_handled_in_steps(cutoff, 4).unwrap(), 0);
        assert!(
            std::fs::read(&file).unwrap() == before,
            "a prune that removed nothing changed the state file"
        );
        assert_eq!(store.handled_len().await.unwrap(), 6);
        // One row old enough: its step commits, and the file changes.
        store
            .settle(&SettleBatch::rows(vec![skipped(version(
                "r9",
                "e",
                "2024-05-01T09:00:00Z",
            ))]))
            .await
            .unwrap();
        let before = std::fs::read(&file).unwrap();
        assert_eq!(store.prune_handled_in_steps(cutoff, 4).unwrap(), 1);
        assert!(std::fs::read(&file).unwrap() != before);
        assert_eq!(store.handled_len().await.unwrap(), 6);
    }
}
