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

/// The lease entity as read: holder, expiry (`None`: unreadable), ETag, and the
/// service's time when it answered.
struct LeaseEntity {
    owner: String,
    until: Option<OffsetDateTime>,
    etag: Etag,
    service_now: OffsetDateTime,
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

    /// Writes groups in entity group transactions of one partition, in order, a group
    /// never split. Every operation's own status is checked: a failed transaction
    /// comes back as a success with the failure inside.
    async fn commit(
        &self,
        operation: &'static str,
        pk: &'static str,
        groups: Vec<Group>,
    ) -> Result<(), StateError> {
        let mut batch: Vec<Group> = Vec::new();
        let (mut ops, mut bytes) = (0, 0);
        for group in groups {
            let size: usize = group.ops.iter().map(Op::size).sum();
            if group.ops.len() > MAX_TRANSACTION_OPS || size > MAX_TRANSACTION_BYTES {
                return Err(StateError::Io {
                    operation,
                    message: format!(
                        "table {}, {}: the record is {size} bytes in {} entities; the table state backend stores at most {MAX_TRANSACTION_BYTES} bytes per record",
                        self.name,
                        group.label,
                        group.ops.len()
                    ),
                });
            }
            if !batch.is_empty()
                && (ops + group.ops.len() > MAX_TRANSACTION_OPS
                    || bytes + size > MAX_TRANSACTION_BYTES)
            {
                self.transaction(operation, pk, &std::mem::take(&mut batch))
                    .await?;
                (ops, bytes) = (0, 0);
            }
            ops += group.ops.len();
            bytes += size;
            batch.push(group);
        }
        if !batch.is_empty() {
            self.transaction(operation, pk, &batch).await?;
        }
        Ok(())
    }

    async fn transaction(
        &self,
        operation: &'static str,
        pk: &'static str,
        groups: &[Group],
    ) -> Result<(), StateError> {
        let ops: Vec<&Op> = groups.iter().flat_map(|g| &g.ops).collect();
        let labels = || {
            let mut text = groups
                .iter()
                .take(3)
                .map(|g| g.label.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            if groups.len() > 3 {
                text.push_str(&format!(" and {} more", groups.len() - 3));
            }
            text
        };
        let result = self.transaction_once(operation, pk, &ops, labels).await;
        // What this store knows of the customers written: the ETags the service returned,
        // or nothing (a failed or uncertain write leaves them for a read to say).
        if groups.iter().any(|g| g.customer.is_some()) {
            let mut known = self.known.lock().expect("not poisoned");
            match &result {
                Ok(responses) => {
                    known.writes += 1;
                    let mut first = 0;
                    for group in groups {
                        if let Some((key, parts)) = &group.customer {
                            match responses.get(first).cloned().flatten() {
                                Some(etag) => known.wrote_customer(key, Some((etag, *parts))),
                                None => {
                                    known.customers.remove(key);
                                }
                            }
                        }
                        first += group.ops.len();
                    }
                }
                Err(_) => {
                    for (key, _) in groups.iter().filter_map(|g| g.customer.as_ref()) {
                        known.customers.remove(key);
                    }
                }
            }
        }
        result.map(|_| ())
    }

    /// One transaction, its operations' responses in order.
    async fn transaction_once(
        &self,
        operation: &'static str,
        pk: &'static str,
        ops: &[&Op],
        labels: impl Fn() -> String,
    ) -> Result<Vec<Option<Etag>>, StateError> {
        let client = self.table.partition_key_client(pk);
        let response = self
            .request("a transaction", || async {
                let mut tx = client.transaction();
                for op in ops {
                    tx = match op {
                        Op::Insert(entity) => tx.insert(entity)?,
                        Op::Update { rk, entity, etag } => tx.update(
                            rk.as_str(),
                            entity,
                            Some(IfMatchCondition::Etag(etag.clone())),
                        )?,
                        Op::Upsert { rk, entity } => tx.insert_or_replace(rk.as_str(), entity)?,
                        Op::Delete { rk, etag } => tx.delete(
                            rk.as_str(),
                            Some(
                                etag.clone()
                                    .map_or(IfMatchCondition::Any, IfMatchCondition::Etag),
                            ),
                        )?,
                    };
                }
                tx.await
            })
            .await
            .map_err(|e| self.io(operation, format!("partition {pk} ({})", labels()), &e))?;
        let failed = response
            .operation_responses
            .iter()
            .find(|r| !r.status_code.is_success());
        if failed.is_none() && response.operation_responses.len() == ops.len() {
            return Ok(response
                .operation_responses
                .into_iter()
                .map(|r| r.etag)
                .collect());
        }
        let why = match failed.map(|r| r.status_code) {
            Some(StatusCode::PreconditionFailed) => {
                "412: another process changed one of these entities since it was read".to_owned()
            }
            Some(StatusCode::Conflict) => {
                "409: another process created one of these entities first".to_owned()
            }
            Some(StatusCode::NotFound) => {
                "404: one of these entities was removed by another process".to_owned()
            }
            Some(status) => format!("HTTP {}", u16::from(status)),
            None => format!(
                "{} operation responses for {} operations",
                response.operation_responses.len(),
                ops.len()
            ),
        };
        Err(StateError::Io {
            operation,
            message: format!(
                "table {}, partition {pk} ({}): the transaction of {} operations was refused, nothing of it was written: {why}",
                self.name,
                labels(),
                ops.len()
            ),
        })
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

    async fn settle_customers(&self, customers: &[CustomerState]) -> Result<(), StateError> {
        let mut latest: BTreeMap<&str, &CustomerState> = BTreeMap::new();
        for customer in customers {
            latest.insert(&customer.lead.key, customer);
        }
        if latest.is_empty() {
            return Ok(());
        }
        // What this store knows of them is taken: the writes below replace it.
        let mut seen: HashMap<&str, Head> = {
            let mut known = self.known.lock().expect("not poisoned");
            latest
                .keys()
                .filter_map(|k| known.customers.remove(*k).map(|(head, _)| (*k, head)))
                .collect()
        };
        let unknown: Vec<String> = latest
            .keys()
            .filter(|k| !seen.contains_key(**k))
            .map(|k| text_key(k))
            .collect();
        let mut by_rk = self.heads("settle rows", CUSTOMER, unknown).await?;
        let mut groups = Vec::new();
        for (key, customer) in latest {
            let rk = text_key(key);
            let head = match seen.remove(key) {
                Some(head) => head,
                None => by_rk.remove(&rk).flatten(),
            };
            let json = serde_json::to_string(customer).expect("customers serialise to JSON");
            let props = props([("Kind", CUSTOMER), ("Key", key)]);
            let ops = write_record(CUSTOMER, &rk, props, &json, head);
            let entities = ops
                .iter()
                .filter(|op| !matches!(op, Op::Delete { .. }))
                .count();
            groups.push(Group {
                label: format!("customer {key}"),
                ops,
                customer: Some((key.to_owned(), entities as u32 - 1)),
            });
        }
        self.commit("settle rows", CUSTOMER, groups).await
    }

    async fn settle_dead_letters(
        &self,
        letters: &[DeadLetter],
        resolved: &[String],
    ) -> Result<(), StateError> {
        // As in the file store: resolved first, then new letters (a new one wins).
        let mut wanted: BTreeMap<&str, Option<&DeadLetter>> = BTreeMap::new();
        for id in resolved {
            wanted.insert(id, None);
        }
        for letter in letters {
            wanted.insert(&letter.id, Some(letter));
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // Every delivered customer resolves its letter, if any; usually there is none at all.
        let only_resolved = wanted.values().all(Option::is_none);
        if only_resolved && !self.any_dead_letter().await? {
            return Ok(());
        }
        let rks = wanted.keys().map(|id| text_key(id)).collect();
        let mut heads = self.heads("settle rows", DEAD_LETTER, rks).await?;
        let mut groups = Vec::new();
        for (id, letter) in wanted {
            let rk = text_key(id);
            let head = heads.remove(&rk).flatten();
            let ops = match (letter, head) {
                (Some(letter), head) => {
                    let json =
                        serde_json::to_string(letter).expect("dead letters serialise to JSON");
                    write_record(
                        DEAD_LETTER,
                        &rk,
                        props([("Kind", DEAD_LETTER), ("Id", id)]),
                        &json,
                        head,
                    )
                }
                (None, Some(head)) => delete_record(&rk, head),
                (None, None) => continue,
            };
            groups.push(Group {
                label: format!("dead letter {id}"),
                ops,
                customer: None,
            });
        }
        self.commit("settle rows", DEAD_LETTER, groups).await
    }

    /// Whether the dead-letter partition holds anything (`true` when unsure).
    async fn any_dead_letter(&self) -> Result<bool, StateError> {
        let filter = format!("PartitionKey eq '{DEAD_LETTER}'");
        let (entities, next) = self
            .page(&filter, Some("RowKey"), None)
            .await
            .map_err(|e| self.io("settle rows", "dead letters", &e))?;
        Ok(!entities.is_empty() || next.is_some())
    }

    /// The writes settling the batch's rows: the list entries of the rows not
    /// delivered, then (each row in one group) the handled markers with the removal of
    /// a delivered row's old list entry.
    async fn row_groups(
        &self,
        batch: &SettleBatch,
    ) -> Result<(Vec<Group>, Vec<Group>), StateError> {
        let now = OffsetDateTime::now_utc();
        let mut latest: BTreeMap<String, &crate::state::Settlement> = BTreeMap::new();
        for s in &batch.rows {
            latest.insert(row_key_base(&s.row.id), s);
        }
        if latest.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // What the reads before knew of them is taken: the writes below replace it.
        let mut states: HashMap<String, RowState> = {
            let mut known = self.known.lock().expect("not poisoned");
            latest
                .keys()
                .filter_map(|b| known.rows.remove(b).map(|(state, _)| (b.clone(), state)))
                .collect()
        };
        let unknown: BTreeSet<String> = latest
            .keys()
            .filter(|b| !states.contains_key(*b))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            states.extend(self.row_states("settle rows", &unknown).await?);
        }
        let (mut lists, mut markers) = (Vec::new(), Vec::new());
        for (base, s) in latest {
            let state = states.remove(&base).unwrap_or_default();
            let listed_rk = format!("{base}{LISTED_SUFFIX}");
            let source = [
                ("SourcePartitionKey", s.row.id.partition_key.as_str()),
                ("SourceRowKey", s.row.id.row_key.as_str()),
            ];
            let label = format!("row {}", s.row.id);
            // A row's latest version decides which list it is in.
            let mut ops = match list_of(&s.outcome) {
                Some(list) => {
                    let recorded = RecordedRow {
                        row: s.row.clone(),
                        outcome: s.outcome.clone(),
                        columns: s.columns.clone(),
                        recorded_at: now,
                    };
                    let json = serde_json::to_string(&recorded).expect("rows serialise to JSON");
                    let mut p = props([("Kind", "listed"), ("List", list)]);
                    p.extend(props(source));
                    lists.push(Group {
                        label: label.clone(),
                        ops: write_record(ROW, &listed_rk, p, &json, state.listed),
                        customer: None,
                    });
                    Vec::new()
                }
                None => match state.listed {
                    Some(head) => delete_record(&listed_rk, head),
                    None => Vec::new(),
                },
            };
            let at = timestamp::format(s.row.timestamp);
            let mut marker = props([
                ("PartitionKey", ROW),
                ("Kind", "handled"),
                ("RowEtag", s.row.etag.as_str()),
                ("At", at.as_str()),
            ]);
            marker.extend(props(source));
            let marker_rk = format!("{base}{HANDLED_SUFFIX}");
            marker.insert("RowKey".into(), Value::String(marker_rk.clone()));
            ops.push(match state.marker {
                Some((etag, _)) => Op::Update {
                    rk: marker_rk,
                    entity: marker,
                    etag,
                },
                None => Op::Insert(marker),
            });
            markers.push(Group {
                label,
                ops,
                customer: None,
            });
        }
        Ok((lists, markers))
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

    /// The lease entity as the service has it (`None`: no lease yet), with the
    /// service's own time of the read: the `Date` of its answer.
    async fn read_lease(&self, operation: &'static str) -> Result<Option<LeaseEntity>, StateError> {
        let what = format!("entity ({LEASE}, {LEASE_ROW})");
        let client = self
            .table
            .partition_key_client(LEASE)
            .entity_client(LEASE_ROW);
        let result = self
            .request(&what, || async { client.get::<Map<String, Value>>().await })
            .await;
        match result {
            Ok(response) => {
                let entity = response.entity;
                Ok(Some(LeaseEntity {
                    owner: str_of(&entity, "Owner").unwrap_or_default().to_owned(),
                    until: str_of(&entity, "Until").and_then(|u| timestamp::parse(u).ok()),
                    etag: response.etag,
                    service_now: response.common_storage_response_headers.date,
                }))
            }
            Err(e) if is_missing_entity(&e) => Ok(None),
            Err(e) => Err(self.io(operation, &what, &e)),
        }
    }

    /// Writes the lease for `owner` until `until`: insert when `etag` is `None`,
    /// else replace if it is unchanged. `Ok(false)`: someone else wrote it first.
    async fn write_lease(
        &self,
        operation: &'static str,
        owner: &str,
        until: OffsetDateTime,
        etag: Option<Etag>,
    ) -> Result<bool, StateError> {
        let what = format!("entity ({LEASE}, {LEASE_ROW})");
        let entity = json!({
            "PartitionKey": LEASE,
            "RowKey": LEASE_ROW,
            "Owner": owner,
            "Until": timestamp::format(until),
        });
        let client = self
            .table
            .partition_key_client(LEASE)
            .entity_client(LEASE_ROW);
        let result = match etag {
            Some(etag) => {
                self.request(&what, || async {
                    client
                        .update(&entity, IfMatchCondition::Etag(etag.clone()))?
                        .await
                        .map(|_| ())
                })
                .await
            }
            None => {
                self.request(&what, || async {
                    self.table
                        .insert::<_, Map<String, Value>>(&entity)?
                        .await
                        .map(|_| ())
                })
                .await
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    status_of(&e),
                    Some(
                        StatusCode::PreconditionFailed
                            | StatusCode::Conflict
                            | StatusCode::NotFound
                    )
                ) && error_code(&e) != Some("TableNotFound") =>
            {
                Ok(false)
            }
            Err(e) => Err(self.io(operation, &what, &e)),
        }
    }
}

/// Where each list's retention step resumes: the customer, dead letter and row
/// partitions' query positions (`None`: from the start).
type RetentionCursor = [Walk<(String, Option<String>)>; 3];

impl TableStore {
    /// The main entities a query returns (parts left out), with each one's record
    /// (its parts read too) and what deleting it needs.
    async fn records_of(
        &self,
        operation: &'static str,
        pk: &'static str,
        entities: Vec<Map<String, Value>>,
    ) -> Result<Vec<(String, String, (Etag, u32))>, StateError> {
        let mut out = Vec::new();
        for entity in entities {
            let (Some(rk), Some(etag)) = (str_of(&entity, "RowKey"), str_of(&entity, "odata.etag"))
            else {
                continue;
            };
            if rk.contains('~') {
                continue;
            }
            let parts = parts_of(&entity);
            let json = match parts {
                0 => data_of(&entity),
                _ => match self.read_record(operation, pk, rk).await? {
                    Some(record) => record.json,
                    None => continue,
                },
            };
            out.push((rk.to_owned(), json, (Etag::from(etag), parts)));
        }
        Ok(out)
    }

    /// Every record of a partition (with `and`-ed `filter`), as [`TableStore::records_of`].
    async fn all_records(
        &self,
        operation: &'static str,
        pk: &'static str,
        filter: &str,
    ) -> Result<Vec<(String, String, (Etag, u32))>, StateError> {
        let filter = format!("PartitionKey eq '{pk}'{filter}");
        let entities = self.query_all(operation, &filter).await?;
        let mains: Vec<Map<String, Value>> = entities
            .into_iter()
            .filter(|e| str_of(e, "RowKey").is_some_and(|rk| !rk.contains('~')))
            .collect();
        self.records_of(operation, pk, mains).await
    }

    /// Marks these rows handled where no marker of them (or a newer one) exists.
    async fn mark_handled(
        &self,
        operation: &'static str,
        versions: &[RowVersion],
    ) -> Result<usize, StateError> {
        let bases: BTreeSet<String> = versions.iter().map(|v| row_key_base(&v.id)).collect();
        if bases.is_empty() {
            return Ok(0);
        }
        let states = self.row_states(operation, &bases).await?;
        let mut groups = Vec::new();
        let mut done = BTreeSet::new();
        for version in versions {
            let base = row_key_base(&version.id);
            if states.get(&base).is_some_and(|s| s.marker.is_some()) || !done.insert(base.clone()) {
                continue;
            }
            let at = timestamp::format(version.timestamp);
            let mut marker = props([
                ("PartitionKey", ROW),
                ("Kind", "handled"),
                ("RowEtag", version.etag.as_str()),
                ("At", at.as_str()),
                ("SourcePartitionKey", version.id.partition_key.as_str()),
                ("SourceRowKey", version.id.row_key.as_str()),
            ]);
            marker.insert(
                "RowKey".into(),
                Value::String(format!("{base}{HANDLED_SUFFIX}")),
            );
            groups.push(Group {
                label: format!("row {}", version.id),
                ops: vec![Op::Insert(marker)],
                customer: None,
            });
        }
        let marked = groups.len();
        self.commit(operation, ROW, groups).await?;
        Ok(marked)
    }

    /// One page (at most `step` entities) of `filter` from `from`, for retention.
    async fn retention_page(
        &self,
        filter: &str,
        from: Option<&(String, Option<String>)>,
        step: usize,
    ) -> Result<QueryPage, StateError> {
        const OPERATION: &str = "remove data older than state.retention";
        let top = step.clamp(1, PAGE_SIZE as usize) as u32;
        self.page_of(filter, None, from, top)
            .await
            .map_err(|e| self.io(OPERATION, format!("query {filter:?}"), &e))
    }
}

fn delete_group(label: String, rk: &str, head: (Etag, u32)) -> Group {
    Group {
        label,
        ops: delete_record(rk, head),
        customer: None,
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

    /// Writes dead letters, then the list entries of rows not delivered, then
    /// customers, then the rows' handled markers: not atomic, but a crash between two
    /// steps never hides a row's outcome (see the module's documentation).
    /// - Before the customers: a row is neither marked handled nor in its customer's
    ///   history, so the next poll reads it, merges and delivers it again (an upsert)
    ///   and settles it again, overwriting its dead letter and list entry.
    /// - After them: a row in its customer's history is dropped by the merge as already
    ///   handled, and its outcome is kept already: a refusal's dead letter and the row
    ///   under `rows rejected`. A row in no customer's history (cannot become a lead, a
    ///   test lead, unidentifiable) or in an undelivered one's (do-not-contact) is read
    ///   and settled again.
    async fn settle(&self, batch: &SettleBatch) -> Result<(), StateError> {
        self.known.lock().expect("not poisoned").settle_begins();
        self.ready().await?;
        // Read before anything is written: what is not known is read as it stands now.
        let (lists, markers) = self.row_groups(batch).await?;
        self.settle_dead_letters(&batch.dead_letters, &batch.resolved)
            .await?;
        self.commit("settle rows", ROW, lists).await?;
        self.settle_customers(&batch.customers).await?;
        self.commit("settle rows", ROW, markers).await
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

    /// Expiry is judged by the service's clock alone: the lease is free when its `Until`
    /// is not after the `Date` of the read that found it, and a new `Until` is that
    /// `Date` plus `ttl`. The `Date` is the service's time truncated to the second, so
    /// the lease written lasts at least `ttl - 1s` from when this call began, by any
    /// clock that runs at the service's pace ([`crate::state::LEASE_CLOCK_RESOLUTION`]).
    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Lease, StateError> {
        const OPERATION: &str = "take the processing lease";
        self.ready().await?;
        // A lost race is read again: the winner is then reported, or its lease has already ended.
        for _ in 0..4 {
            let Some(lease) = self.read_lease(OPERATION).await? else {
                // No lease yet, so no service time to write one with: write an ended
                // one (a lost race is fine), and take it over on the next round.
                self.write_lease(OPERATION, "", OffsetDateTime::UNIX_EPOCH, None)
                    .await?;
                continue;
            };
            let now = lease.service_now;
            let expired = lease.until.is_none_or(|until| until <= now);
            if lease.owner != owner && !expired {
                return Ok(Lease::HeldBy {
                    owner: lease.owner,
                    until: lease.until.expect("not expired, so readable"),
                });
            }
            if self
                .write_lease(OPERATION, owner, now + ttl, Some(lease.etag))
                .await?
            {
                if lease.owner != owner && !lease.owner.is_empty() {
                    tracing::info!(previous = %lease.owner, "Took over an expired processing lease.");
                }
                return Ok(Lease::Held);
            }
        }
        match self.read_lease(OPERATION).await? {
            Some(LeaseEntity {
                owner: holder,
                until: Some(until),
                service_now,
                ..
            }) if holder != owner && until > service_now => {
                Ok(Lease::HeldBy { owner: holder, until })
            }
            _ => Err(StateError::Io {
                operation: OPERATION,
                message: format!(
                    "table {}, entity ({LEASE}, {LEASE_ROW}): changed by other processes on every attempt",
                    self.name
                ),
            }),
        }
    }

    async fn release_lease(&self, owner: &str) -> Result<(), StateError> {
        const OPERATION: &str = "release the processing lease";
        self.ready().await?;
        if let Some(lease) = self.read_lease(OPERATION).await? {
            let now = lease.service_now;
            if lease.owner == owner && lease.until.is_some_and(|u| u > now) {
                // Ok(false): another process took it over meanwhile; nothing to give up.
                self.write_lease(OPERATION, owner, now, Some(lease.etag))
                    .await?;
            }
        }
        Ok(())
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

    /// Pages through the markers stamped before `before`, deleting each page's before
    /// reading the next, so memory stays at one page however many there are.
    async fn prune_handled(&self, before: OffsetDateTime) -> Result<usize, StateError> {
        const OPERATION: &str = "prune handled rows";
        self.ready().await?;
        let filter = format!(
            "PartitionKey eq '{ROW}' and Kind eq 'handled' and At lt '{}'",
            timestamp::format(before)
        );
        let mut pruned = 0;
        let mut from = None;
        loop {
            let (entities, next) = self
                .page(&filter, Some("RowKey,At"), from.as_ref())
                .await
                .map_err(|e| self.io(OPERATION, "handled rows", &e))?;
            let mut groups = Vec::new();
            for entity in entities {
                // An unreadable record is kept: pruning must never cause a re-delivery.
                let old = str_of(&entity, "At")
                    .and_then(|t| timestamp::parse(t).ok())
                    .is_some_and(|t| t < before);
                let rk = str_of(&entity, "RowKey");
                let etag = str_of(&entity, "odata.etag");
                if let (true, Some(rk), Some(etag)) = (old, rk, etag) {
                    groups.push(Group {
                        label: format!("handled marker {rk}"),
                        ops: vec![Op::Delete {
                            rk: rk.to_owned(),
                            etag: Some(Etag::from(etag)),
                        }],
                        customer: None,
                    });
                }
            }
            pruned += groups.len();
            self.commit(OPERATION, ROW, groups).await?;
            match next {
                Some(next) => from = Some(next),
                None => return Ok(pruned),
            }
        }
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

    /// Marks the customer's rows handled (where the settle that delivered them did not
    /// get to), then removes the customer, their dead letters, and the rows about them.
    async fn forget(&self, person: &Person) -> Result<Forgotten, StateError> {
        const OP: &str = "forget a person";
        self.ready().await?;
        let mut forgotten = Forgotten::default();
        let candidates = match &person.key {
            Some(key) => {
                let rk = text_key(key);
                match self.read_record(OP, CUSTOMER, &rk).await? {
                    Some(r) => vec![(rk, r.json, (r.etag, r.parts))],
                    None => Vec::new(),
                }
            }
            None if person.external_key.is_some() => self.all_records(OP, CUSTOMER, "").await?,
            None => Vec::new(),
        };
        let (mut groups, mut removed) = (Vec::new(), Vec::new());
        for (rk, json, head) in candidates {
            let customer: CustomerState =
                decode(&json).map_err(|m| self.corrupt(format!("{CUSTOMER}/{rk}"), m))?;
            if !person.is(&customer.lead) {
                continue;
            }
            let history = crate::state::personal::history_versions(&customer.lead.history);
            forgotten.marked_handled += self.mark_handled(OP, &history).await?;
            forgotten.add_source_rows(customer.lead.history.iter().map(|h| &h.row));
            forgotten.customers.push(customer.lead.log_key());
            removed.push(customer.lead.key.clone());
            groups.push(delete_group(
                format!("customer {}", customer.lead.log_key()),
                &rk,
                head,
            ));
        }
        self.commit(OP, CUSTOMER, groups).await?;
        {
            let mut known = self.known.lock().expect("not poisoned");
            for key in &removed {
                known.customers.remove(key);
            }
        }
        let mut groups = Vec::new();
        for (rk, json, head) in self.all_records(OP, DEAD_LETTER, "").await? {
            let letter: DeadLetter =
                decode(&json).map_err(|m| self.corrupt(format!("{DEAD_LETTER}/{rk}"), m))?;
            if person.is_in_dead_letter(&letter) {
                forgotten.add_source_rows(letter.rows.iter().map(|r| &r.id));
                groups.push(delete_group(
                    format!("dead letter of {}", letter.payload.log_key()),
                    &rk,
                    head,
                ));
                forgotten.dead_letters.push(letter.payload.log_key());
            }
        }
        self.commit(OP, DEAD_LETTER, groups).await?;
        let rows: std::collections::HashSet<RowId> =
            forgotten.source_rows.iter().cloned().collect();
        let mut groups = Vec::new();
        let mut gone = Vec::new();
        for (rk, json, head) in self.all_records(OP, ROW, " and Kind eq 'listed'").await? {
            let row: RecordedRow =
                decode(&json).map_err(|m| self.corrupt(format!("{ROW}/{rk}"), m))?;
            if person.is_in_row(&row, &rows) {
                groups.push(delete_group(format!("row {}", row.row.id), &rk, head));
                match row.outcome {
                    Settled::Rejected { .. } => forgotten.rejected.push(row.row.id.clone()),
                    Settled::Skipped { .. } => forgotten.skipped.push(row.row.id.clone()),
                    _ => forgotten.unidentifiable.push(row.row.id.clone()),
                }
                gone.push(row.row.id);
            }
        }
        self.commit(OP, ROW, groups).await?;
        forgotten.add_source_rows(&gone);
        Ok(forgotten)
    }

    /// One query page per partition, of the records the service last wrote before
    /// `before` (its `Timestamp`; a record's own time is at or before it), resuming
    /// where the last step's page ended.
    async fn prune_older_than(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<Pruned, StateError> {
        const OP: &str = "remove data older than state.retention";
        self.ready().await?;
        let cursor = self.retention.lock().expect("not poisoned").clone();
        let mut next = cursor.clone();
        let mut pruned = Pruned::default();
        let written_before = format!(" and Timestamp lt datetime'{}'", timestamp::format(before));
        for (i, pk, kind) in [
            (0, CUSTOMER, ""),
            (1, DEAD_LETTER, ""),
            (2, ROW, " and Kind eq 'listed'"),
        ] {
            let Walk::From(from) = &cursor[i] else {
                continue;
            };
            let filter = format!("PartitionKey eq '{pk}'{kind}{written_before}");
            let (entities, more) = self.retention_page(&filter, from.as_ref(), step).await?;
            let mut groups = Vec::new();
            let mut customers = Vec::new();
            // An unreadable record is kept, for a person to see.
            for (rk, json, head) in self.records_of(OP, pk, entities).await? {
                let label = match i {
                    0 => match decode::<CustomerState>(&json) {
                        Ok(c) if c.lead.last_seen < before => {
                            pruned.customers += 1;
                            customers.push(c.lead.key.clone());
                            format!("customer {}", c.lead.log_key())
                        }
                        _ => continue,
                    },
                    1 => match decode::<DeadLetter>(&json) {
                        Ok(l) if l.at < before => {
                            pruned.dead_letters += 1;
                            format!("dead letter of {}", l.payload.log_key())
                        }
                        _ => continue,
                    },
                    _ => match decode::<RecordedRow>(&json) {
                        Ok(r) if r.row.timestamp < before => {
                            match r.outcome {
                                Settled::Rejected { .. } => pruned.rejected += 1,
                                Settled::Skipped { .. } => pruned.skipped += 1,
                                _ => pruned.unidentifiable += 1,
                            }
                            format!("row {}", r.row.id)
                        }
                        _ => continue,
                    },
                };
                groups.push(delete_group(label, &rk, head));
            }
            self.commit(OP, pk, groups).await?;
            {
                let mut known = self.known.lock().expect("not poisoned");
                for key in &customers {
                    known.customers.remove(key);
                }
            }
            next[i] = match more {
                Some(more) => Walk::From(Some(more)),
                None => Walk::Done,
            };
        }
        pruned.complete = next.iter().all(Walk::is_done);
        *self.retention.lock().expect("not poisoned") = match pruned.complete {
            true => RetentionCursor::default(),
            false => next,
        };
        Ok(pruned)
    }
}

/// Which list a settled row is kept in (`None`: delivered, in none).
fn list_of(outcome: &Settled) -> Option<&'static str> {
    match outcome {
        Settled::Delivered { .. } => None,
        Settled::Rejected { .. } => Some("rejected"),
        Settled::Skipped { .. } => Some("skipped"),
        Settled::Unidentifiable { .. } => Some("unidentifiable"),
    }
}

/// Records what a range query found about a row entity.
fn note_row_entity(
    states: &mut HashMap<String, RowState>,
    entity: &Map<String, Value>,
) -> Result<(), StateError> {
    let (Some(rk), Some(etag)) = (str_of(entity, "RowKey"), str_of(entity, "odata.etag")) else {
        return Ok(());
    };
    if let Some(base) = rk.strip_suffix(HANDLED_SUFFIX) {
        if let Some(state) = states.get_mut(base) {
            let row_etag = str_of(entity, "RowEtag").ok_or_else(|| StateError::Corrupt {
                key: format!("{ROW}/{rk}"),
                message: "the handled marker has no RowEtag".into(),
            })?;
            state.marker = Some((Etag::from(etag), row_etag.to_owned()));
        }
    } else if let Some(base) = rk.strip_suffix(LISTED_SUFFIX) {
        if let Some(state) = states.get_mut(base) {
            state.listed = Some((Etag::from(etag), parts_of(entity)));
        }
    }
    Ok(())
}

/// The ops writing a record (its entity, then its parts), guarded by `head` when it exists.
fn write_record(pk: &str, rk: &str, props: Map<String, Value>, json: &str, head: Head) -> Vec<Op> {
    let pieces = split_utf16(json, CHUNK_UTF16_UNITS);
    let entities: Vec<&[&str]> = pieces.chunks(CHUNKS_PER_ENTITY).collect();
    let parts = (entities.len() - 1) as u32;
    let mut ops = Vec::with_capacity(entities.len());
    for (i, data) in entities.into_iter().enumerate() {
        let entity_rk = if i == 0 {
            rk.to_owned()
        } else {
            part_key(rk, i as u32)
        };
        let mut entity = props.clone();
        entity.insert("PartitionKey".into(), Value::String(pk.to_owned()));
        entity.insert("RowKey".into(), Value::String(entity_rk.clone()));
        if i == 0 {
            entity.insert("Parts".into(), Value::from(parts));
        } else {
            entity.insert("Part".into(), Value::from(i as u32));
        }
        for (j, piece) in data.iter().enumerate() {
            entity.insert(format!("Data{j}"), Value::String((*piece).to_owned()));
        }
        ops.push(match (i, &head) {
            (0, Some((etag, _))) => Op::Update {
                rk: entity_rk,
                entity,
                etag: etag.clone(),
            },
            (0, None) => Op::Insert(entity),
            _ => Op::Upsert {
                rk: entity_rk,
                entity,
            },
        });
    }
    if let Some((_, old_parts)) = head {
        for i in parts + 1..=old_parts {
            ops.push(Op::Delete {
                rk: part_key(rk, i),
                etag: None,
            });
        }
    }
    ops
}

/// The ops deleting a record and its parts, guarded by the record's ETag.
fn delete_record(rk: &str, (etag, parts): (Etag, u32)) -> Vec<Op> {
    std::iter::once(Op::Delete {
        rk: rk.to_owned(),
        etag: Some(etag),
    })
    .chain((1..=parts).map(|i| Op::Delete {
        rk: part_key(rk, i),
        etag: None,
    }))
    .collect()
}

fn props<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Map<String, Value> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect()
}

fn part_key(rk: &str, index: u32) -> String {
    format!("{rk}~{index:04}")
}

fn str_of<'a>(entity: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    entity.get(name).and_then(Value::as_str)
}

fn as_u32(value: &Value) -> Option<u32> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .and_then(|n| u32::try_from(n).ok())
}

fn parts_of(entity: &Map<String, Value>) -> u32 {
    entity.get("Parts").and_then(as_u32).unwrap_or(0)
}

fn data_of(entity: &Map<String, Value>) -> String {
    (0..)
        .map_while(|j| str_of(entity, &format!("Data{j}")))
        .collect()
}

fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// Splits at character boundaries into pieces of at most `units` UTF-16 code units.
fn split_utf16(text: &str, units: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, c) in text.char_indices() {
        if used + c.len_utf16() > units {
            pieces.push(&text[start..i]);
            (start, used) = (i, 0);
        }
        used += c.len_utf16();
    }
    if start < text.len() || pieces.is_empty() {
        pieces.push(&text[start..]);
    }
    pieces
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hashed(parts: &[&[u8]]) -> String {
    let mut digest = Sha256::new();
    for part in parts {
        // Length-prefixed, so ("a", "bc") and ("ab", "c") differ.
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    format!("x{}", hex(&digest.finalize()))
}

fn is_hashed(key: &str) -> bool {
    key.starts_with('x')
}

/// The table key of a customer key or dead letter id.
fn text_key(text: &str) -> String {
    let key = hex(text.as_bytes());
    if key.len() <= MAX_KEY_CHARS {
        key
    } else {
        hashed(&[text.as_bytes()])
    }
}

/// The key of a lead-table row in the `row` partition: `hex(PartitionKey).hex(RowKey)`,
/// which sorts as the (PartitionKey, RowKey) pairs do ('.' sorts before every hex digit).
fn row_key_base(id: &RowId) -> String {
    let key = format!(
        "{}.{}",
        hex(id.partition_key.as_bytes()),
        hex(id.row_key.as_bytes())
    );
    if key.len() <= MAX_KEY_CHARS {
        key
    } else {
        hashed(&[id.partition_key.as_bytes(), id.row_key.as_bytes()])
    }
}

/// 404 for the entity, not for the whole table.
fn is_missing_entity(error: &azure_core::Error) -> bool {
    status_of(error) == Some(StatusCode::NotFound) && error_code(error) != Some("TableNotFound")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_keys_sort_as_the_rows_do() {
        let ids = [
            RowId::new("a", "z"),
            RowId::new("ab", ""),
            RowId::new("ab", "a"),
            RowId::new("ab", "ab"),
            RowId::new("b", "a"),
        ];
        let keys: Vec<String> = ids.iter().map(row_key_base).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for key in &keys {
            let marker = format!("{key}{HANDLED_SUFFIX}");
            let listed = format!("{key}{LISTED_SUFFIX}~0001");
            let end = format!("{key}{RANGE_END_SUFFIX}");
            assert!(*key < marker && marker < end && listed < end, "{key}");
        }
        // Everything of a row sorts before the next row.
        for pair in keys.windows(2) {
            assert!(
                format!("{}{RANGE_END_SUFFIX}", pair[0]) < pair[1],
                "{pair:?}"
            );
        }
    }

    #[test]
    fn keys_hold_no_character_the_service_refuses_or_the_sdk_leaves_unescaped() {
        let id = RowId::new("p'/\\#?\u{1}", "r\u{7f}'é");
        for key in [row_key_base(&id), text_key("email:o'brien@contoso.com/#?")] {
            assert!(
                key.chars().all(|c| c.is_ascii_hexdigit() || c == '.'),
                "{key}"
            );
        }
    }

    #[test]
    fn a_key_too_long_for_the_service_is_hashed_and_stays_distinct() {
        let long = "k".repeat(300);
        let a = row_key_base(&RowId::new(&long, "a"));
        let b = row_key_base(&RowId::new(&long, "b"));
        assert!(is_hashed(&a) && a.len() <= MAX_KEY_CHARS);
        assert_ne!(a, b);
        assert_ne!(
            hashed(&[b"a", b"bc"]),
            hashed(&[b"ab", b"c"]),
            "the split between the two keys counts"
        );
        assert!(!is_hashed(&text_key("email:a@b.c")));
    }

    #[test]
    fn text_is_split_at_character_boundaries_within_the_utf16_limit() {
        let text = format!("{}😀{}", "a".repeat(9), "é".repeat(11));
        let pieces = split_utf16(&text, 10);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| p.encode_utf16().count() <= 10));
        assert_eq!(pieces[0], "a".repeat(9), "the emoji needs two units");
        assert_eq!(split_utf16("", 10), vec![""]);
    }

    #[test]
    fn a_large_record_continues_in_parts_and_stale_parts_are_deleted() {
        let json = "x".repeat(CHUNK_UTF16_UNITS * CHUNKS_PER_ENTITY + 1);
        let head = Some((Etag::from("W/\"1\""), 3));
        let ops = write_record(CUSTOMER, "ab", Map::new(), &json, head);
        assert!(
            matches!(&ops[0], Op::Update { rk, entity, .. } if rk == "ab" && entity["Parts"] == 1)
        );
        assert!(
            matches!(&ops[1], Op::Upsert { rk, entity } if rk == "ab~0001" && entity["Part"] == 1)
        );
        let deleted: Vec<&str> = ops[2..]
            .iter()
            .map(|op| match op {
                Op::Delete { rk, etag: None } => rk.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(deleted, ["ab~0002", "ab~0003"]);
        let mut main = Map::new();
        for op in &ops[..2] {
            if let Op::Update { entity, .. } | Op::Upsert { entity, .. } = op {
                main.insert(
                    str_of(entity, "RowKey").unwrap().to_owned(),
                    Value::String(data_of(entity)),
                );
            }
        }
        assert_eq!(
            format!(
                "{}{}",
                main["ab"].as_str().unwrap(),
                main["ab~0001"].as_str().unwrap()
            ),
            json
        );
    }

    #[test]
    fn a_read_that_began_before_a_write_ended_never_replaces_what_the_write_returned() {
        let head = |n: &str| Some((Etag::from(n), 0));
        let etag = |known: &Known| known.customers["k"].0.as_ref().map(|(e, _)| e.to_string());
        let mut known = Known::default();
        known.read_customer("k", head("read-1"), known.now());
        known.settle_begins();
        // The next page's read begins while the settle's write is under way...
        let began = known.now();
        known.writes += 1;
        known.wrote_customer("k", head("written"));
        // ...and ends after it: the write's ETag stays.
        known.read_customer("k", head("read-1"), began);
        assert_eq!(etag(&known).as_deref(), Some("written"));
        // A read begun after the write replaces it (it saw the write, or a later change).
        known.read_customer("k", head("read-2"), known.now());
        assert_eq!(etag(&known).as_deref(), Some("read-2"));
        // Two settles later, an entry no settle took is forgotten.
        known.settle_begins();
        known.settle_begins();
        assert!(
            known.customers.contains_key("k"),
            "learnt in settle 1's time"
        );
        known.settle_begins();
        assert!(known.customers.is_empty());
    }

    #[tokio::test]
    async fn a_record_larger_than_one_transaction_is_refused_by_name_before_any_request() {
        let text = "[source]\ntable = \"Leads\"\nconnection_string = { value = \"DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;TableEndpoint=http://127.0.0.1:9/a;\" }\n[state]\nbackend = \"table\"\n";
        let settings = crate::config::Settings::from_toml_with_env(
            text,
            std::path::Path::new("t.toml"),
            &HashMap::new(),
        )
        .unwrap();
        let store = TableStore::new(&settings.source, &settings.state).unwrap();
        let json = "x".repeat(MAX_TRANSACTION_BYTES);
        let group = Group {
            label: "customer email:big@contoso.com".into(),
            ops: write_record(CUSTOMER, "ab", Map::new(), &json, None),
            customer: None,
        };

        let error = store
            .commit("settle rows", CUSTOMER, vec![group])
            .await
            .unwrap_err()
            .to_string();

        assert!(error.contains("customer email:big@contoso.com"), "{error}");
        assert!(error.contains("at most"), "{error}");
    }
}
