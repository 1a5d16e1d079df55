//! State in an Azure table (`state.backend = "table"`), for jobs without a durable
//! disk, with a processing lease so two processes never process at once.
//!
//! One table (`state.table`) in the source's storage account holds everything, in
//! five partitions:
//!
//! | PartitionKey | RowKey | what |
//! | --- | --- | --- |
//! | `lease` | `processor` | the processing lease: `Owner`, `Until` |
//! | `meta` | `checkpoint` | the checkpoint: `Version`, `Checkpoint` (`Timestamp` is the service's own) |
//! | `customer` | key of the customer key | a merged customer (`Key`, JSON in `Data*`) |
//! | `deadletter` | key of the dead letter id | a dead letter (`Id`, JSON in `Data*`) |
//! | `row` | key of the row + `!h` | "handled": `RowEtag`, `At` (its Timestamp) |
//! | `row` | key of the row + `!l` | the row's place in a list: `List`, JSON in `Data*` |
//!
//! Keys derived from our input are lowercase hex of the UTF-8 text (a row's is
//! `hex(PartitionKey).hex(RowKey)`), so no character the service refuses (`/ \ # ?`,
//! control characters) or the SDK fails to escape (`'`) can reach a key, and the hex
//! keeps the order of the original keys; the original text is kept in a property.
//! A key that would be longer than [`MAX_KEY_CHARS`] is `x` + its SHA-256 instead.
//!
//! A JSON record is split over string properties `Data0`, `Data1`, ... of at most
//! [`CHUNK_UTF16_UNITS`] UTF-16 units (the service stores strings as UTF-16, at most
//! 64 KiB each) and [`CHUNKS_PER_ENTITY`] of them per entity (an entity is at most
//! 1 MiB). A longer record continues in part entities `<RowKey>~0001`, ... in the same
//! partition, which are written in the same entity group transaction as the record
//! itself, so a reader never sees half of a record. A record is limited by the 4 MiB
//! of one transaction ([`MAX_TRANSACTION_BYTES`]).
//!
//! Every write of an entity that exists is guarded by its ETag (`If-Match`), taken
//! from the read that preceded it in the same poll where there is one (so a change by
//! anyone else in between fails with 412); a new entity is inserted (409 if someone
//! else wrote it first). Parts are guarded by their record's ETag, in the same
//! transaction. A poll reads page k+1's customers while page k's settle writes them,
//! so a customer's ETag is the newest of what this store learnt, by read or by its own
//! write, and a read that began before one of its writes ended never replaces what
//! that write returned ([`Known`]).
//!
//! A settle writes in four steps, each in transactions of its own partition: dead
//! letters; the list entries of rows not delivered; customers; the rows' handled
//! markers (and a delivered row's old list entry goes). A crash between two steps
//! never hides a row's outcome: until its customer is written, a row is read again
//! and settled again (a re-delivery is an upsert); once its customer's history holds
//! it (the merge then drops it as already handled), its dead letter and its list
//! entry are written already. A marker is never written before the customer holding
//! its row, whose record the next delivery of that customer starts from.
//!
//! Here: the client, reads, and the [`StateStore`] implementation; a settle's writes
//! in `settle`, the lease in `lease`, pruning, retention and `forget` in `personal`,
//! and how keys and properties are built in `entity`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::prelude::Continuable;
use azure_core::{Etag, StatusCode};
use azure_data_tables::prelude::*;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::identity::CustomerState;
use crate::retry::RetrySettings;
use crate::retry::{with_backoff, GaveUp};
use crate::source::row::RowId;
use crate::source::SourceSettings;
use crate::source::{describe, error_code, is_transient, status_of};
use crate::state::personal::{Forgotten, Person, Pruned, Walk};
use crate::state::StateSettings;
use crate::state::{
    DeadLetter, Lease, RecordedRow, RowVersion, SettleBatch, Settled, StateError, StateStore,
};
use crate::timestamp;

mod entity;
mod lease;
mod personal;
mod settle;
#[cfg(test)]
mod tests;

use entity::*;
use personal::RetentionCursor;
use settle::*;

/// Longest key we derive; the service allows 1 KiB, and parts add a suffix.
pub const MAX_KEY_CHARS: usize = 400;
/// UTF-16 units per `Data*` property; the service's limit is 64 KiB (32,767 units).
pub const CHUNK_UTF16_UNITS: usize = 30_000;
/// `Data*` properties per entity: 14 x 60,000 bytes stays well inside the 1 MiB entity limit.
pub const CHUNKS_PER_ENTITY: usize = 14;
/// What we put into one entity group transaction; the service's limit is 4 MiB.
pub const MAX_TRANSACTION_BYTES: usize = 3_500_000;
/// The service's limit of operations per entity group transaction.
const MAX_TRANSACTION_OPS: usize = 100;
/// Point reads in flight at once.
const CONCURRENT_READS: usize = 8;
/// Entities per query page (the service maximum).
const PAGE_SIZE: u32 = 1000;

const LEASE: &str = "lease";
const LEASE_ROW: &str = "processor";
const META: &str = "meta";
const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_VERSION: u64 = 1;
const CUSTOMER: &str = "customer";
const DEAD_LETTER: &str = "deadletter";
const ROW: &str = "row";
const HANDLED_SUFFIX: &str = "!h";
const LISTED_SUFFIX: &str = "!l";
/// Sorts after both suffixes, and before any longer key ('!' sorts before '.' and hex).
const RANGE_END_SUFFIX: &str = "!~";

/// Opens the table-backed state store (no I/O: the table is created on first use).
pub fn open(
    source: &SourceSettings,
    settings: &StateSettings,
) -> Result<Arc<dyn StateStore>, StateError> {
    Ok(Arc::new(TableStore::new(source, settings)?))
}

/// What a read told us about an entity we may write next: absent, or its ETag and
/// how many part entities it has.
type Head = Option<(Etag, u32)>;

/// A row's entities in the `row` partition, as last read.
#[derive(Debug, Clone, Default)]
struct RowState {
    /// The handled marker's ETag and the row ETag it records.
    marker: Option<(Etag, String)>,
    /// The list entry's ETag and part count.
    listed: Head,
}

/// What the store knows of the customers and rows it will write next: the ETags that
/// guard those writes.
///
/// A poll merges page k+1 (reading its customers and rows) while page k's settle
/// writes, and the pipeline serialises settles: page k+1's settle starts after page
/// k's ended. So a read may have begun before a write of the same customer ended, and
/// then knows an ETag that write has made stale. Each customer entry is stamped with
/// `writes`, the number of customer transactions that had succeeded when it was
/// learnt: a read replaces an entry only if it began after the entry was learnt; a
/// successful write always replaces it with the ETag the service returned for it. A
/// settle takes (removes) the entries of what it writes; what it finds no entry for
/// it reads just before writing (after the settle before it ended, so never stale).
/// Rows need no more: one poll reads each row once.
///
/// Entries are also stamped with `settles`, the number of settles begun. When settle
/// k begins, whatever was learnt before settle k-2 began is forgotten: page k's reads
/// began after settle k-2 ended, page k+1's after settle k-1 ended, and settle k-1's
/// writes after it began. So the map holds about three pages of entries however long
/// a poll is, and whatever the rows it re-reads.
#[derive(Debug, Default)]
struct Known {
    /// Customer transactions that succeeded so far.
    writes: u64,
    /// Settles begun so far.
    settles: u64,
    /// Each customer's head (by customer key), and when it was learnt.
    customers: HashMap<String, (Head, Stamp)>,
    /// Each unhandled row's entities (by row key base), and when they were read.
    rows: HashMap<String, (RowState, Stamp)>,
}

/// When something was learnt: [`Known::writes`] and [`Known::settles`] then.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    writes: u64,
    settles: u64,
}

impl Known {
    fn now(&self) -> Stamp {
        Stamp {
            writes: self.writes,
            settles: self.settles,
        }
    }

    /// Notes a read that began at `began`, unless a write ended after that.
    fn read_customer(&mut self, key: &str, head: Head, began: Stamp) {
        match self.customers.get_mut(key) {
            Some((_, learnt)) if learnt.writes > began.writes => {}
            Some(known) => *known = (head, began),
            None => {
                self.customers.insert(key.to_owned(), (head, began));
            }
        }
    }

    /// Notes a successful write of a customer, which returned `head`.
    fn wrote_customer(&mut self, key: &str, head: Head) {
        let now = self.now();
        self.customers.insert(key.to_owned(), (head, now));
    }

    /// Starts a settle: forgets what no settle from this one on can need.
    fn settle_begins(&mut self) {
        self.settles += 1;
        let oldest = self.settles.saturating_sub(2);
        self.customers
            .retain(|_, (_, learnt)| learnt.settles >= oldest);
        self.rows.retain(|_, (_, learnt)| learnt.settles >= oldest);
    }
}

/// The state store in an Azure table.
pub struct TableStore {
    table: TableClient,
    name: String,
    retry: RetrySettings,
    /// The table is known to exist.
    ready: AtomicBool,
    /// The checkpoint entity as last read or written (`Some(None)`: known absent).
    checkpoint_seen: Mutex<Option<Head>>,
    /// The ETags the next settles write with.
    known: Mutex<Known>,
    /// Where the next step of retention resumes.
    retention: Mutex<RetentionCursor>,
}

impl fmt::Debug for TableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableStore")
            .field("table", &self.name)
            .finish_non_exhaustive()
    }
}

/// One write inside an entity group transaction.
#[derive(Debug, Clone)]
enum Op {
    Insert(Map<String, Value>),
    /// Replace, if the entity still has this ETag.
    Update {
        rk: String,
        entity: Map<String, Value>,
        etag: Etag,
    },
    /// Insert or replace: only for parts, guarded by their record's op in the same transaction.
    Upsert {
        rk: String,
        entity: Map<String, Value>,
    },
    /// Delete, if the entity has this ETag (any ETag for parts).
    Delete {
        rk: String,
        etag: Option<Etag>,
    },
}

impl Op {
    fn size(&self) -> usize {
        // Headers, URL and multipart boundaries of one operation.
        const OVERHEAD: usize = 1_000;
        OVERHEAD
            + match self {
                Op::Insert(e) | Op::Update { entity: e, .. } | Op::Upsert { entity: e, .. } => {
                    serde_json::to_string(e).map_or(0, |s| s.len())
                }
                Op::Delete { .. } => 0,
            }
    }
}

/// The writes for one thing (a customer, a dead letter, a row), which stay in one transaction.
struct Group {
    label: String,
    ops: Vec<Op>,
    /// For a customer's record: its key, and the part count written (see [`Known`]).
    customer: Option<(String, u32)>,
}

/// A record read back: its JSON and what a guarded write of it needs.
struct Record {
    json: String,
    etag: Etag,
    parts: u32,
}

/// A page of a query and where the next one starts.
type QueryPage = (Vec<Map<String, Value>>, Option<(String, Option<String>)>);

impl TableStore {
    /// Builds the client. Reads the configured secrets, makes no request.
    pub fn new(source: &SourceSettings, settings: &StateSettings) -> Result<Self, StateError> {
        let service = crate::source::service_client(source).map_err(|e| StateError::Io {
            operation: "set up the state table client",
            message: format!("table {}: {e}", settings.table),
        })?;
        Ok(Self {
            table: service.table_client(settings.table.clone()),
            name: settings.table.clone(),
            retry: source.retry.clone(),
            ready: AtomicBool::new(false),
            checkpoint_seen: Mutex::new(None),
            known: Mutex::new(Known::default()),
            retention: Mutex::new(Default::default()),
        })
    }

    fn io(
        &self,
        operation: &'static str,
        what: impl fmt::Display,
        e: &azure_core::Error,
    ) -> StateError {
        let hint = if error_code(e) == Some("TableNotFound") {
            " (the state table does not exist: create it, or let the credential create tables)"
        } else {
            ""
        };
        StateError::Io {
            operation,
            message: format!("table {}, {what}: {}{hint}", self.name, describe(e)),
        }
    }

    fn corrupt(&self, what: impl fmt::Display, message: impl Into<String>) -> StateError {
        StateError::Corrupt {
            key: format!("{}/{what}", self.name),
            message: message.into(),
        }
    }

    /// Runs one request, retrying timeouts, throttling and 5xx with jittered back-off.
    async fn request<T, F, Fut>(&self, what: &str, attempt_once: F) -> azure_core::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<T>>,
    {
        let result = with_backoff(
            &self.retry,
            None,
            attempt_once,
            |error| {
                if error_code(error) == Some("TableNotFound") {
                    self.ready.store(false, Ordering::Release);
                }
                is_transient(error)
            },
            |attempt, delay, error| {
                tracing::warn!(
                    table = %self.name,
                    entity = what,
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    error = %describe(error),
                    "State table request failed; retrying."
                )
            },
        )
        .await;
        result.map_err(|gave_up| match gave_up {
            GaveUp::Failed { error, .. } => error,
            GaveUp::Cancelled => unreachable!("no cancellation token was given"),
        })
    }

    /// Creates the table on first use (409: it exists already).
    async fn ready(&self) -> Result<(), StateError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        match self
            .request("the table", || async { self.table.create().await })
            .await
        {
            Ok(_) => {
                tracing::info!(table = %self.name, "Created the state table.");
            }
            Err(e) if status_of(&e) == Some(StatusCode::Conflict) => {}
            // A SAS scoped to the table (or without the permission to create tables) can
            // still use a table created beforehand; if there is none, the next request says so.
            Err(e) if status_of(&e) == Some(StatusCode::Forbidden) => {
                tracing::warn!(table = %self.name, error = %describe(&e), "Not allowed to create the state table; assuming it exists.");
            }
            Err(e) => return Err(self.io("create the state table", "the table", &e)),
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Reads one entity (`None` when it does not exist).
    async fn get(
        &self,
        pk: &str,
        rk: &str,
        select: Option<&'static str>,
    ) -> azure_core::Result<Option<(Map<String, Value>, Etag)>> {
        let client = self.table.partition_key_client(pk).entity_client(rk);
        let what = format!("({pk}, {rk})");
        let result = self
            .request(&what, || async {
                let mut get = client.get::<Map<String, Value>>();
                if let Some(select) = select {
                    get = get.select(Select::new(select));
                }
                get.await
            })
            .await;
        match result {
            Ok(response) => Ok(Some((response.entity, response.etag))),
            Err(e) if is_missing_entity(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One page of a query.
    async fn page(
        &self,
        filter: &str,
        select: Option<&'static str>,
        from: Option<&(String, Option<String>)>,
    ) -> azure_core::Result<QueryPage> {
        self.page_of(filter, select, from, PAGE_SIZE).await
    }

    /// One page of at most `top` entities of a query.
    async fn page_of(
        &self,
        filter: &str,
        select: Option<&'static str>,
        from: Option<&(String, Option<String>)>,
        top: u32,
    ) -> azure_core::Result<QueryPage> {
        self.request("a query", || async {
            let mut query = self
                .table
                .query()
                .filter(Filter::new(filter.to_owned()))
                .top(top);
            if let Some(select) = select {
                query = query.select(Select::new(select));
            }
            if let Some((pk, rk)) = from {
                query = query.initial_partition_key(pk.clone());
                if let Some(rk) = rk {
                    query = query.initial_row_key(rk.clone());
                }
            }
            let response = query
                .into_stream::<Map<String, Value>>()
                .next()
                .await
                .ok_or_else(|| {
                    azure_core::Error::message(ErrorKind::Other, "the query returned no page")
                })??;
            let next = response.continuation();
            Ok((response.entities, next))
        })
        .await
    }

    /// Every entity a query returns. Only for what the caller returns whole anyway.
    async fn query_all(
        &self,
        operation: &'static str,
        filter: &str,
    ) -> Result<Vec<Map<String, Value>>, StateError> {
        let mut out = Vec::new();
        let mut from = None;
        loop {
            let (entities, next) = self
                .page(filter, None, from.as_ref())
                .await
                .map_err(|e| self.io(operation, format!("query {filter:?}"), &e))?;
            out.extend(entities);
            match next {
                Some(next) => from = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Reads a record (its entity and its parts).
    async fn read_record(
        &self,
        operation: &'static str,
        pk: &str,
        rk: &str,
    ) -> Result<Option<Record>, StateError> {
        let what = || format!("entity ({pk}, {rk})");
        let Some((main, etag)) = self
            .get(pk, rk, None)
            .await
            .map_err(|e| self.io(operation, what(), &e))?
        else {
            return Ok(None);
        };
        let parts = parts_of(&main);
        let mut json = data_of(&main);
        for i in 1..=parts {
            let part_rk = part_key(rk, i);
            let (part, _) = self
                .get(pk, &part_rk, None)
                .await
                .map_err(|e| self.io(operation, format!("entity ({pk}, {part_rk})"), &e))?
                .ok_or_else(|| {
                    self.corrupt(
                        format!("{pk}/{rk}"),
                        format!("part {i} of {parts} is missing"),
                    )
                })?;
            json.push_str(&data_of(&part));
        }
        Ok(Some(Record { json, etag, parts }))
    }

    /// The ETag and part count of each of these entities, read concurrently.
    async fn heads(
        &self,
        operation: &'static str,
        pk: &'static str,
        rks: Vec<String>,
    ) -> Result<HashMap<String, Head>, StateError> {
        futures::stream::iter(rks)
            .map(|rk| async move {
                let head = self
                    .get(pk, &rk, Some("RowKey,Parts"))
                    .await
                    .map_err(|e| self.io(operation, format!("entity ({pk}, {rk})"), &e))?
                    .map(|(entity, etag)| (etag, parts_of(&entity)));
                Ok::<_, StateError>((rk, head))
            })
            .buffer_unordered(CONCURRENT_READS)
            .try_collect()
            .await
    }

    /// What the `row` partition holds for these rows (by their keys), in one range
    /// query: hex keys keep the order of the rows, and a page of the lead table comes
    /// in key order, so the range holds little besides the rows asked for.
    async fn row_states(
        &self,
        operation: &'static str,
        bases: &BTreeSet<String>,
    ) -> Result<HashMap<String, RowState>, StateError> {
        let mut states: HashMap<String, RowState> = bases
            .iter()
            .map(|b| (b.clone(), RowState::default()))
            .collect();
        let plain: Vec<&String> = bases.iter().filter(|b| !is_hashed(b)).collect();
        if let (Some(first), Some(last)) = (plain.first(), plain.last()) {
            let filter = format!(
                "PartitionKey eq '{ROW}' and RowKey ge '{first}' and RowKey lt '{last}{RANGE_END_SUFFIX}'"
            );
            let mut from = None;
            loop {
                let (entities, next) = self
                    .page(&filter, Some("RowKey,RowEtag,Parts"), from.as_ref())
                    .await
                    .map_err(|e| self.io(operation, "handled rows", &e))?;
                for entity in entities {
                    note_row_entity(&mut states, &entity)?;
                }
                match next {
                    Some(next) => from = Some(next),
                    None => break,
                }
            }
        }
        for base in bases.iter().filter(|b| is_hashed(b)) {
            for rk in [
                format!("{base}{HANDLED_SUFFIX}"),
                format!("{base}{LISTED_SUFFIX}"),
            ] {
                if let Some((mut entity, etag)) = self
                    .get(ROW, &rk, Some("RowKey,RowEtag,Parts"))
                    .await
                    .map_err(|e| self.io(operation, format!("entity ({ROW}, {rk})"), &e))?
                {
                    entity.insert("odata.etag".into(), Value::String(etag.as_ref().into()));
                    note_row_entity(&mut states, &entity)?;
                }
            }
        }
        Ok(states)
    }

    async fn record_rows(
        &self,
        operation: &'static str,
        list: &str,
    ) -> Result<Vec<RecordedRow>, StateError> {
        self.ready().await?;
        let filter = format!("PartitionKey eq '{ROW}' and List eq '{list}'");
        let entities = self.query_all(operation, &filter).await?;
        self.assemble(ROW, entities)?
            .into_iter()
            .map(|(rk, json)| decode(&json).map_err(|m| self.corrupt(format!("{ROW}/{rk}"), m)))
            .collect()
    }

    /// Joins records with their parts, in RowKey order.
    fn assemble(
        &self,
        pk: &str,
        entities: Vec<Map<String, Value>>,
    ) -> Result<Vec<(String, String)>, StateError> {
        let mut mains = BTreeMap::new();
        let mut parts = HashMap::new();
        for entity in entities {
            let Some(rk) = entity
                .get("RowKey")
                .and_then(Value::as_str)
                .map(str::to_owned)
            else {
                continue;
            };
            match rk.split_once('~') {
                Some((base, _)) => {
                    let index = entity.get("Part").and_then(as_u32).unwrap_or(0);
                    parts.insert((base.to_owned(), index), entity);
                }
                None => {
                    mains.insert(rk, entity);
                }
            }
        }
        mains
            .into_iter()
            .map(|(rk, main)| {
                let count = parts_of(&main);
                let mut json = data_of(&main);
                for i in 1..=count {
                    let part = parts.remove(&(rk.clone(), i)).ok_or_else(|| {
                        self.corrupt(
                            format!("{pk}/{rk}"),
                            format!("part {i} of {count} is missing"),
                        )
                    })?;
                    json.push_str(&data_of(&part));
                }
                Ok((rk, json))
            })
            .collect()
    }

    async fn write_checkpoint(&self, t: OffsetDateTime) -> Result<Etag, StateError> {
        let what = format!("entity ({META}, {CHECKPOINT})");
        let known = self.checkpoint_seen.lock().expect("not poisoned").take();
        let head = match known {
            Some(head) => head,
            None => self
                .get(META, CHECKPOINT, Some("RowKey"))
                .await
                .map_err(|e| self.io("write checkpoint", &what, &e))?
                .map(|(_, etag)| (etag, 0)),
        };
        let entity = json!({
            "PartitionKey": META,
            "RowKey": CHECKPOINT,
            "Version": CHECKPOINT_VERSION,
            "Checkpoint": timestamp::format(t),
        });
        let client = self
            .table
            .partition_key_client(META)
            .entity_client(CHECKPOINT);
        let result = match head {
            Some((etag, _)) => {
                self.request(&what, || async {
                    client
                        .update(&entity, IfMatchCondition::Etag(etag.clone()))?
                        .await
                        .map(|r| r.etag)
                })
                .await
            }
            None => {
                self.request(&what, || async {
                    self.table
                        .insert::<_, Map<String, Value>>(&entity)?
                        .await
                        .map(|r| r.etag)
                })
                .await
            }
        };
        result.map_err(|e| match status_of(&e) {
            Some(StatusCode::PreconditionFailed | StatusCode::Conflict) => StateError::Io {
                operation: "write checkpoint",
                message: format!(
                    "table {}, {what}: another leadsync process changed the checkpoint during this poll ({})",
                    self.name,
                    describe(&e)
                ),
            },
            _ => self.io("write checkpoint", &what, &e),
        })
    }
}

#[async_trait::async_trait]
impl StateStore for TableStore {
    async fn checkpoint(&self) -> Result<Option<OffsetDateTime>, StateError> {
        self.ready().await?;
        let what = format!("entity ({META}, {CHECKPOINT})");
        let found = self
            .get(META, CHECKPOINT, None)
            .await
            .map_err(|e| self.io("read checkpoint", &what, &e))?;
        let Some((entity, etag)) = found else {
            *self.checkpoint_seen.lock().expect("not poisoned") = Some(None);
            return Ok(None);
        };
        let version = entity.get("Version").and_then(as_u32).unwrap_or(0) as u64;
        if version > CHECKPOINT_VERSION {
            return Err(self.corrupt(
                format!("{META}/{CHECKPOINT}"),
                format!(
                    "written by a newer leadsync (format {version}, this one reads {CHECKPOINT_VERSION})"
                ),
            ));
        }
        let text = str_of(&entity, "Checkpoint").unwrap_or_default();
        let t = timestamp::parse(text).map_err(|e| {
            self.corrupt(
                format!("{META}/{CHECKPOINT}"),
                format!("Checkpoint {text:?} is not a time: {e}"),
            )
        })?;
        *self.checkpoint_seen.lock().expect("not poisoned") = Some(Some((etag, 0)));
        Ok(Some(t))
    }

    async fn set_checkpoint(&self, timestamp: OffsetDateTime) -> Result<(), StateError> {
        self.ready().await?;
        let etag = self.write_checkpoint(timestamp).await?;
        *self.checkpoint_seen.lock().expect("not poisoned") = Some(Some((etag, 0)));
        Ok(())
    }

    async fn handled(&self, rows: &[RowVersion]) -> Result<Vec<bool>, StateError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.ready().await?;
        let bases: Vec<String> = rows.iter().map(|r| row_key_base(&r.id)).collect();
        let wanted: BTreeSet<String> = bases.iter().cloned().collect();
        let began = self.known.lock().expect("not poisoned").now();
        let mut states = self.row_states("read handled rows", &wanted).await?;
        let answer: Vec<bool> = rows
            .iter()
            .zip(&bases)
            .map(|(row, base)| {
                states
                    .get(base)
                    .and_then(|s| s.marker.as_ref())
                    .is_some_and(|(_, etag)| *etag == row.etag)
            })
            .collect();
        // Only rows to settle are kept for the settle (not a re-read window's handled ones).
        let mut known = self.known.lock().expect("not poisoned");
        for (base, done) in bases.into_iter().zip(&answer) {
            if let (false, Some(state)) = (*done, states.remove(&base)) {
                known.rows.insert(base, (state, began));
            }
        }
        Ok(answer)
    }
    async fn settle(&self, batch: &SettleBatch) -> Result<(), StateError> {
        self.settle_now(batch).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError> {
        self.ready().await?;
        let filter = format!("PartitionKey eq '{DEAD_LETTER}'");
        let entities = self.query_all("read dead letters", &filter).await?;
        let mut letters: Vec<DeadLetter> = self
            .assemble(DEAD_LETTER, entities)?
            .into_iter()
            .map(|(rk, json)| {
                decode(&json).map_err(|m| self.corrupt(format!("{DEAD_LETTER}/{rk}"), m))
            })
            .collect::<Result<_, _>>()?;
        letters.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(letters)
    }
    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Lease, StateError> {
        self.acquire_lease_now(owner, ttl).await
    }
    async fn release_lease(&self, owner: &str) -> Result<(), StateError> {
        self.release_lease_now(owner).await
    }

    async fn customers(&self, keys: &[String]) -> Result<Vec<Option<CustomerState>>, StateError> {
        self.ready().await?;
        let began = self.known.lock().expect("not poisoned").now();
        let records: Vec<Option<Record>> = futures::stream::iter(keys.to_vec())
            .map(|key| async move {
                self.read_record("read customers", CUSTOMER, &text_key(&key))
                    .await
            })
            .buffered(CONCURRENT_READS)
            .try_collect()
            .await?;
        let mut seen = HashMap::new();
        let mut out = Vec::with_capacity(keys.len());
        for (key, record) in keys.iter().zip(records) {
            match record {
                None => {
                    seen.insert(key.clone(), None);
                    out.push(None);
                }
                Some(record) => {
                    let customer: CustomerState = decode(&record.json).map_err(|m| {
                        self.corrupt(
                            format!("{CUSTOMER}/{}", text_key(key)),
                            format!("customer {key}: {m}"),
                        )
                    })?;
                    seen.insert(key.clone(), Some((record.etag, record.parts)));
                    out.push(Some(customer));
                }
            }
        }
        let mut known = self.known.lock().expect("not poisoned");
        for (key, head) in seen {
            known.read_customer(&key, head, began);
        }
        Ok(out)
    }

    async fn all_customers(&self) -> Result<Vec<CustomerState>, StateError> {
        self.ready().await?;
        let filter = format!("PartitionKey eq '{CUSTOMER}'");
        let entities = self.query_all("read customers", &filter).await?;
        let mut customers: Vec<CustomerState> = self
            .assemble(CUSTOMER, entities)?
            .into_iter()
            .map(|(rk, json)| {
                decode(&json).map_err(|m| self.corrupt(format!("{CUSTOMER}/{rk}"), m))
            })
            .collect::<Result<_, _>>()?;
        customers.sort_by(|a, b| a.lead.key.cmp(&b.lead.key));
        Ok(customers)
    }

    async fn unidentifiable(&self) -> Result<Vec<RecordedRow>, StateError> {
        self.record_rows("read unidentifiable rows", "unidentifiable")
            .await
    }
    async fn prune_handled(&self, before: OffsetDateTime) -> Result<usize, StateError> {
        self.prune_handled_now(before).await
    }

    async fn handled_len(&self) -> Result<u64, StateError> {
        self.ready().await?;
        let filter = format!("PartitionKey eq '{ROW}' and Kind eq 'handled'");
        let mut count = 0;
        let mut from = None;
        loop {
            let (entities, next) = self
                .page(&filter, Some("RowKey"), from.as_ref())
                .await
                .map_err(|e| self.io("count handled rows", "handled rows", &e))?;
            count += entities.len() as u64;
            match next {
                Some(next) => from = Some(next),
                None => return Ok(count),
            }
        }
    }

    async fn rejected(&self) -> Result<Vec<RecordedRow>, StateError> {
        self.record_rows("read rejected rows", "rejected").await
    }

    async fn skipped(&self) -> Result<Vec<RecordedRow>, StateError> {
        self.record_rows("read skipped rows", "skipped").await
    }
    async fn forget(&self, person: &Person) -> Result<Forgotten, StateError> {
        self.forget_now(person).await
    }
    async fn prune_older_than(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<Pruned, StateError> {
        self.prune_older_now(before, step).await
    }
}
