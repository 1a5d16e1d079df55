//! The file store (`state.backend = "file"`): one redb file, `leadsync.redb`, in the
//! state directory. [`RedbStore`] implements [`StateStore`]; how it encodes its records
//! is in `codec`, a settle's transaction in `settle`, pruning, retention and `forget`
//! in `retention`, and the upgrade of files written by earlier versions in `upgrade`.

mod codec;
mod retention;
mod settle;
#[cfg(test)]
mod tests;
mod upgrade;

use std::path::Path;
use std::time::Duration;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use time::OffsetDateTime;

use crate::identity::CustomerState;
use crate::source::row::RowId;
use crate::state::personal::{Forgotten, Person, Pruned, Walk};
use crate::state::{
    DeadLetter, Lease, RecordedRow, RowVersion, SettleBatch, StateError, StateStore,
};
use codec::{decode, decode_compact, decode_customer, decode_handled, encode, CheckpointRecord};
use retention::PRUNE_STEP;
use upgrade::{upgrade, MOVE_STEP};

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
/// redb commits are atomic (settles with `Durability::Eventual`, the checkpoint and
/// pruning commits with `Immediate`, which makes everything before them durable whatever
/// the platform does with `Eventual`), and it holds an exclusive lock on the file, so a
/// second leadsync pointed at the same directory fails to start instead of processing the
/// same rows.
pub struct RedbStore {
    db: Database,
    /// `identity.summary_template`: the file keeps a hash of each customer's summary,
    /// and a read rebuilds the text with this.
    summary_template: String,
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

fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
            let txn = self.db.begin_write().map_err(io("write checkpoint"))?;
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
        blocking(|| self.settle_now(batch))
    }

    /// The file's exclusive lock, taken when it was opened, already keeps every other
    /// process out.
    async fn acquire_lease(&self, _owner: &str, _ttl: Duration) -> Result<Lease, StateError> {
        Ok(Lease::Held)
    }

    async fn release_lease(&self, _owner: &str) -> Result<(), StateError> {
        Ok(())
    }

    async fn prune_handled(&self, before: OffsetDateTime) -> Result<usize, StateError> {
        blocking(|| self.prune_handled_in_steps(before, PRUNE_STEP))
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

    /// Customers in the newest form are stored without their summary's text, which
    /// is rebuilt here with the configured template.
    async fn customers(&self, keys: &[String]) -> Result<Vec<Option<CustomerState>>, StateError> {
        blocking(|| {
            let txn = self.db.begin_read().map_err(io("read customers"))?;
            let table = txn.open_table(CUSTOMERS).map_err(io("read customers"))?;
            keys.iter()
                .map(|key| {
                    let Some(bytes) = table.get(key.as_bytes()).map_err(io("read customers"))?
                    else {
                        return Ok(None);
                    };
                    let mut customer = decode_customer(key, bytes.value())?;
                    customer.complete_summary(&self.summary_template);
                    Ok(Some(customer))
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
