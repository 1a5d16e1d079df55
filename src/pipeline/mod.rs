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

pub mod metrics;
pub mod policy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use std::collections::BTreeMap;

use crate::identity::IdentitySettings;
use crate::identity::{customer_key, CustomerKey, CustomerLead, CustomerState, Unidentifiable};
use crate::lead::{normalise, LeadEvent, Rejection};
use crate::pipeline::policy::{DoNotContactPolicy, PolicySettings, TestLeadPolicy};
use crate::sink::{LeadSink, Outcome};
use crate::source::row::RawRow;
use crate::source::{Continuation, MalformedEntity, SourceError, TableSource};
use crate::state::{
    Continued, DeadLetter, RowVersion, SettleBatch, Settled, Settlement, StateError, StateStore,
};
use crate::task::AbortOnDrop;
use crate::timestamp;

/// The first pause after an endpoint-level failure; it doubles with each one in a row.
const ENDPOINT_BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// The longest pause after endpoint-level failures.
const ENDPOINT_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

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
    pub sent_by_sink: BTreeMap<String, u64>,
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

/// A page's batch and the task committing it.
type Settling = (
    Arc<SettleBatch>,
    tokio::task::JoinHandle<Result<(), PollError>>,
);

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
    /// Pages merged before their customers go to the sink (see [`Window`]): a customer
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

/// A page after [`Pipeline::prepare`].
struct Prepared {
    /// Rows already settled by policy (rejected, test lead, unidentifiable).
    settlements: Vec<Settlement>,
    by_customer: BTreeMap<CustomerKey, Vec<(RowVersion, LeadEvent)>>,
    /// The newest Timestamp of the rows skipped as already handled.
    newest_settled: Option<OffsetDateTime>,
}

/// A page after [`Pipeline::merge`].
struct Merged {
    settlements: Vec<Settlement>,
    /// Customers stored without a delivery (do-not-contact, skipped).
    to_store: Vec<CustomerState>,
    deliveries: Vec<Delivery>,
    newest_settled: Option<OffsetDateTime>,
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

/// Each row's normalised event, or why it cannot become one.
type Events = Vec<Result<LeadEvent, Rejection>>;

/// A page's rows, their events, and the entities that could not be read as rows.
type FetchedPage = (Vec<RawRow>, Events, Vec<MalformedEntity>);

/// A page being fetched: where the page after it starts and the service's clock when it
/// answered (said as soon as the service answered), and the task that builds and
/// normalises its rows.
struct Fetching {
    next: tokio::sync::oneshot::Receiver<(Option<Continuation>, OffsetDateTime)>,
    task: AbortOnDrop<Result<FetchedPage, PollError>>,
}

/// What the sinks of a pipeline made of one record.
#[derive(Default)]
struct Fate<'a> {
    /// The sinks that took it (delivered, or followed up).
    acked: Vec<String>,
    /// The sinks that refused it (dead-lettered).
    refused: Vec<String>,
    /// The first refusal, as its rows' reason.
    rejected: Option<String>,
    followed_up: Option<String>,
    /// A sink that could not take it now, and why: the rows stay open.
    pending: Option<(&'a str, String)>,
}

/// A customer whose merged record goes to the sink, with the rows it settles.
struct Delivery {
    customer: CustomerState,
    rows: Vec<RowVersion>,
}

/// Pages merged into the delivery window before a flush: at most this many (the
/// default of [`Pipeline::window_pages`]). A 10,000-row backfill (ten pages) is one
/// window.
pub const WINDOW_PAGES: u32 = 16;
/// ... and at most about this many bytes of customer records (estimated): a 16-page
/// window of marketplace rows (about 5,000 customers) is about 3 MiB.
const WINDOW_BYTES: usize = 8 << 20;

/// What a customer record in the window is estimated to take in memory: a 10,000-row
/// backfill's 3,333 records of three events each held 1.8 MB (BENCHMARKS), about 550
/// bytes a record.
fn record_bytes(customer: &CustomerState) -> usize {
    256 + 96 * customer.lead.history.len()
}

/// The delivery window of a poll: the merged pages whose customers have not gone to
/// the sink yet. A customer whose rows span its pages is merged once with all of them
/// and sent once, at the flush, instead of once per page. The window is flushed (its
/// customers delivered, then its outcomes committed) when it holds
/// [`WINDOW_PAGES`] pages or [`WINDOW_BYTES`] of customer records, and at the poll's
/// last page; at its edge a customer whose rows fall on both sides is sent once per
/// window. Nothing of it is committed before its flush, so a crash or a stop before
/// then costs re-reading these pages, never a lead.
#[derive(Default)]
struct Window {
    settlements: Vec<Settlement>,
    entries: Vec<Windowed>,
    /// Customer key -> its entry.
    index: std::collections::HashMap<String, usize>,
    newest_settled: Option<OffsetDateTime>,
    pages: u32,
    bytes: usize,
}

/// A customer of the window: to deliver, or to store without a delivery (do-not-contact).
enum Windowed {
    Deliver(Delivery),
    Store(CustomerState),
}

impl Windowed {
    fn customer(&self) -> &CustomerState {
        match self {
            Windowed::Deliver(d) => &d.customer,
            Windowed::Store(c) => c,
        }
    }
}

impl Window {
    /// The window's record of `key`, newer than the store's and the committing batch's.
    fn customer(&self, key: &str) -> Option<&CustomerState> {
        self.index.get(key).map(|&i| self.entries[i].customer())
    }

    fn full(&self, pages: u32) -> bool {
        self.pages >= pages.max(1) || self.bytes >= WINDOW_BYTES
    }

    /// Adds a merged page. A customer already in the window is replaced by its newer
    /// record (merged from the window's), keeping the rows both carry.
    fn absorb(&mut self, merged: Merged, summary: &mut PollSummary) {
        self.pages += 1;
        self.newest_settled = self.newest_settled.max(merged.newest_settled);
        self.settlements.extend(merged.settlements);
        for delivery in merged.deliveries {
            let key = delivery.customer.lead.key.clone();
            self.bytes += record_bytes(&delivery.customer);
            match self.index.get(&key) {
                Some(&i) => {
                    let old = std::mem::replace(&mut self.entries[i], Windowed::Deliver(delivery));
                    self.bytes = self.bytes.saturating_sub(record_bytes(old.customer()));
                    if let (Windowed::Deliver(old), Windowed::Deliver(new)) =
                        (old, &mut self.entries[i])
                    {
                        let mut rows = old.rows;
                        rows.append(&mut new.rows);
                        new.rows = rows;
                    }
                }
                None => {
                    self.index.insert(key, self.entries.len());
                    self.entries.push(Windowed::Deliver(delivery));
                }
            }
        }
        for customer in merged.to_store {
            let key = customer.lead.key.clone();
            self.bytes += record_bytes(&customer);
            match self.index.get(&key) {
                Some(&i) => {
                    let old = std::mem::replace(&mut self.entries[i], Windowed::Store(customer));
                    self.bytes = self.bytes.saturating_sub(record_bytes(old.customer()));
                    // Not delivered yet, and do-not-contact now: its earlier rows are
                    // skipped by the same policy.
                    if let Windowed::Deliver(old) = old {
                        summary.skipped += old.rows.len() as u64;
                        settle_all(
                            old.rows.into_iter(),
                            Settled::Skipped {
                                policy: "do_not_contact".into(),
                            },
                            &mut self.settlements,
                        );
                    }
                }
                None => {
                    self.index.insert(key, self.entries.len());
                    self.entries.push(Windowed::Store(customer));
                }
            }
        }
    }

    /// Empties the window into one merged batch.
    fn take(&mut self) -> Merged {
        let window = std::mem::take(self);
        let mut to_store = Vec::new();
        let mut deliveries = Vec::with_capacity(window.entries.len());
        for entry in window.entries {
            match entry {
                Windowed::Deliver(d) => deliveries.push(d),
                Windowed::Store(c) => to_store.push(c),
            }
        }
        Merged {
            settlements: window.settlements,
            to_store,
            deliveries,
            newest_settled: window.newest_settled,
        }
    }
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

    /// As [`Pipeline::poll_with`], counting into `summary` as it goes, so that a poll
    /// that fails still tells what it read and delivered before the failure.
    pub async fn poll_counting(
        &self,
        mode: PollMode,
        cancel: &CancellationToken,
        summary: &mut PollSummary,
    ) -> Result<(), PollError> {
        let started = Instant::now();
        // Milliseconds, for the debug timings.
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let checkpoint = self.state.checkpoint().await?;
        let since = mode.since.or(checkpoint.map(|c| c - self.overlap));
        let mut newest_settled: Option<OffsetDateTime> = None;
        let mut oldest_open: Option<OffsetDateTime> = None;
        // When the poll began, on the storage service's clock: the `Date` of the first
        // page's answer. See the checkpoint below.
        let mut began: Option<OffsetDateTime> = None;
        // Each page is fetched in its own task while the one before is processed, and
        // merged into the delivery window (`Window`): a customer whose rows span the
        // window's pages is sent once. A full window (or the last page) is flushed: its
        // customers are delivered, then its settle (the state commit) runs in its own
        // task while the next pages are normalised and merged (reading the customers
        // being committed from the batch itself): the table's latency and the commit
        // overlap the work, on another core when there is one. A window is delivered
        // only after the one before it is committed. In memory: two pages' rows
        // (fetching, working), the window's customer records (`WINDOW_BYTES` at most),
        // the committing batch, and the records of batches the store holds
        // (`StateStore::commit_held`).
        // A page's task says where the next page starts as soon as the service's answer
        // is in, before it builds the rows from the answer's JSON and normalises them, so
        // the next page's request is already out while that work is done: the table
        // never waits for leadsync to parse a page. Rows found already handled (the
        // overlap re-read, a replay after a crash) are normalised and then dropped: about
        // 10 µs each, less than fetching them, and it keeps the handled-row lookup, which
        // reads state, out of the fetch task.
        let fetch = |continuation: Option<Continuation>, pages: u64| {
            let source = self.source.clone();
            let cancel = cancel.clone();
            let (said_next, next) = tokio::sync::oneshot::channel();
            let task = async move {
                let raw = source
                    .fetch_raw_page(since, continuation.as_ref(), &cancel)
                    .await
                    .map_err(|e| match e {
                        SourceError::Cancelled => PollError::Interrupted { pages },
                        other => PollError::Source(other),
                    })?;
                // The receiver is gone only when the poll has ended.
                let _ = said_next.send((raw.next.clone(), raw.date));
                let (rows, malformed) = source.rows_and_malformed(&raw);
                let events: Vec<_> = rows.iter().map(normalise).collect();
                Ok::<_, PollError>((rows, events, malformed))
            };
            Fetching {
                next,
                task: AbortOnDrop(tokio::spawn(task)),
            }
        };
        // The last flush's batch and the task committing it.
        let mut settling: Option<Settling> = None;
        let mut window = Window::default();
        // Whether pages follow the ones being settled: ended as soon as the last page's
        // answer is in, so that the page before it commits instead of holding its
        // outcomes for the last page's commit.
        let continued = Continued::new(true);
        let passed: Result<(), PollError> = async {
            let mut fetching = fetch(None, 0);
            loop {
                let waiting = Instant::now();
                // A failed fetch says nothing here; its error comes from the task below.
                let answer = (&mut fetching.next).await.ok();
                let wait_response = waiting.elapsed();
                if began.is_none() {
                    began = answer.as_ref().map(|(_, date)| *date);
                }
                let next = answer.and_then(|(next, _)| next);
                let more = next.is_some();
                let mut prefetch = match next {
                    Some(c) if !cancel.is_cancelled() => Some(fetch(Some(c), summary.pages + 1)),
                    _ => None,
                };
                if prefetch.is_none() {
                    continued.end();
                }
                let (rows, events, malformed) = (&mut fetching.task.0).await.map_err(joined)??;
                let wait_table = waiting.elapsed();
                summary.pages += 1;
                summary.rows_read += (rows.len() + malformed.len()) as u64;
                self.memory.metrics.touch();
                let pages = summary.pages;
                let t0 = Instant::now();
                let prepared = self.prepare(rows, events, malformed, mode, summary).await?;
                let committing = settling.as_ref().map(|(batch, _)| batch.as_ref());
                let merged = self
                    .merge(prepared, committing, &window, mode, summary)
                    .await?;
                window.absorb(merged, summary);
                let t1 = Instant::now();
                // The window is flushed when full, and at the last page.
                if let Some(next) = prefetch.take_if(|_| !window.full(self.window_pages)) {
                    tracing::debug!(
                        page = pages,
                        wait_table_ms = ms(wait_table),
                        wait_response_ms = ms(wait_response),
                        prepare_merge_ms = ms(t1 - t0),
                        window_pages = window.pages,
                        window_customers = window.entries.len(),
                        "Page merged into the delivery window."
                    );
                    fetching = next;
                    if cancel.is_cancelled() {
                        return Err(PollError::Interrupted {
                            pages: summary.pages,
                        });
                    }
                    continue;
                }
                let merged = window.take();
                // Nothing of this window reaches the sink before the last one is committed.
                if let Some((_, previous)) = settling.take() {
                    previous.await.map_err(joined)??;
                }
                let t2 = Instant::now();
                // Told to stop while this page was read (shutdown, or a processing lease
                // that may expire before it is renewed): nothing more goes to the sink.
                if cancel.is_cancelled() {
                    return Err(PollError::Interrupted { pages: pages - 1 });
                }
                let (mut batch, settled, open) = self.deliver_all(merged, mode, summary).await;
                let t3 = Instant::now();
                // The store may commit this page with the next ones (`StateStore::commit_held`);
                // on the last page the flag has ended already.
                batch.continued = continued.clone();
                let batch = Arc::new(batch);
                let (state, sinks, committing) = (
                    Arc::clone(&self.state),
                    self.sinks
                        .iter()
                        .map(|o| Arc::clone(&o.sink))
                        .collect::<Vec<_>>(),
                    Arc::clone(&batch),
                );
                // What the sink took is made durable (a JSONL file synced) before its
                // outcomes are committed, here, off the path of the next page.
                settling = Some((
                    batch,
                    tokio::spawn(async move {
                        let started = Instant::now();
                        // The store encodes and writes what it will commit while the sink
                        // syncs, and commits once the sync has succeeded.
                        let (synced, when) = tokio::sync::oneshot::channel();
                        let syncing = tokio::spawn(async move {
                            let result = sync_all(&sinks).await;
                            let _ = synced.send(result.is_ok());
                            (result, started.elapsed())
                        });
                        let prepared = state.prepare(&committing);
                        let prepare_ms = ms(started.elapsed());
                        state
                            .settle_prepared_when(&committing, prepared, when)
                            .await?;
                        // A failed sync committed nothing: its error is the poll's.
                        let (result, sync) = syncing.await.map_err(joined)?;
                        result?;
                        tracing::debug!(
                            page = pages,
                            rows = committing.rows.len(),
                            customers = committing.customers.len(),
                            prepare_ms,
                            sync_ms = ms(sync),
                            // Encoding, inserts and commit, the sync overlapped.
                            commit_ms = ms(started.elapsed()),
                            "Page committed."
                        );
                        Ok(())
                    }),
                ));
                newest_settled = newest_settled.max(settled);
                oldest_open = match (oldest_open, open) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                // Where a page's time goes: says whether the table (waiting for the page),
                // the state or the work (merge and sink) limits a backfill.
                tracing::debug!(
                    flush = true,
                    page = pages,
                    wait_table_ms = ms(wait_table),
                    wait_response_ms = ms(wait_response),
                    prepare_merge_ms = ms(t1 - t0),
                    wait_commit_ms = ms(t2 - t1),
                    deliver_ms = ms(t3 - t2),
                    last = prefetch.is_none(),
                    "Page handled."
                );
                match prefetch {
                    Some(next) => fetching = next,
                    None if more => return Err(PollError::Interrupted { pages }),
                    None => return Ok(()),
                }
                if cancel.is_cancelled() {
                    return Err(PollError::Interrupted {
                        pages: summary.pages,
                    });
                }
            }
        }
        .await;
        // Whatever happened, the last commit finishes before the poll returns.
        let last_page = Instant::now();
        if let Some((_, last)) = settling.take() {
            last.await.map_err(joined)??;
        }
        // A poll that ended early may leave pages settled but held uncommitted: their
        // deliveries are durable, so they are committed (a no-op after the last page).
        if let Err(e) = self.state.commit_held().await {
            match &passed {
                Ok(()) => return Err(e.into()),
                Err(_) => {
                    tracing::warn!(error = %e, "Could not commit the pages settled before the poll failed; their rows will be delivered again.");
                }
            }
        }
        summary.duration = started.elapsed();
        passed?;
        let last_commit = Instant::now();

        // The scan runs in key order, not Timestamp order: while it runs, a row written
        // into a key range it has already passed is not read, while a later row written
        // ahead of it is. So the checkpoint never passes the poll's beginning on the
        // service's clock (the first answer's `Date`, at or before any Timestamp the
        // service gave a row this scan could miss): the next poll reads from there
        // less the overlap, whatever the poll's length and wherever new rows landed.
        let mut candidate = newest_settled;
        for bound in [oldest_open, began] {
            if let (Some(c), Some(b)) = (candidate, bound) {
                candidate = Some(c.min(b));
            }
        }
        let new_checkpoint = checkpoint.max(candidate);
        if new_checkpoint != checkpoint {
            if let Some(t) = new_checkpoint {
                self.state.set_checkpoint(t).await?;
            }
        }
        if let Some(t) = new_checkpoint {
            let pruned = self.state.prune_handled(t - self.overlap).await?;
            if pruned > 0 {
                tracing::debug!(pruned, "Forgot handled rows that left the overlap window.");
            }
        }
        tracing::debug!(
            wait_last_commit_ms = ms(last_commit - last_page),
            checkpoint_and_prune_ms = ms(last_commit.elapsed()),
            "Poll settled."
        );
        summary.checkpoint = new_checkpoint;
        summary.duration = started.elapsed();
        self.warn_if_long(summary);
        Ok(())
    }

    /// A poll longer than half the overlap is a warning sign: the overlap is what
    /// catches a row that became visible after a later-stamped one was read, and a
    /// poll near its length leaves that margin thin. Logged and counted
    /// (`leadsync_long_polls_total`).
    fn warn_if_long(&self, summary: &PollSummary) {
        if summary.duration > self.overlap / 2 {
            self.memory.metrics.saw_long_poll();
            tracing::warn!(
                duration_s = summary.duration.as_secs(),
                overlap_s = self.overlap.as_secs(),
                pages = summary.pages,
                "Poll took longer than half of source.overlap; nothing is skipped (the checkpoint stays at the poll's start), but consider a longer overlap or a faster sink."
            );
        }
    }

    /// First half of a page: drops rows already handled, takes each row's normalised
    /// event (`events`, one per row, made by the fetch task), applies the row policies
    /// and groups the leads by customer. Reads no customer state, so it can run
    /// while the previous page is being committed.
    async fn prepare(
        &self,
        rows: Vec<RawRow>,
        events: Vec<Result<LeadEvent, Rejection>>,
        malformed: Vec<MalformedEntity>,
        mode: PollMode,
        summary: &mut PollSummary,
    ) -> Result<Prepared, PollError> {
        let mut versions: Vec<RowVersion> = rows.iter().map(version).collect();
        let mut malformed = self.malformed_versions(malformed)?;
        versions.extend(malformed.iter().map(|(v, _)| v.clone()));
        let mut handled = if mode.ignore_handled {
            vec![false; versions.len()]
        } else {
            self.state.handled(&versions).await?
        };
        let mut newest_settled = None;
        let mut settlements = Vec::new();
        // Entities that cannot be read as rows are rejected rows, by their keys: the
        // poll goes on, and `leadsync rows rejected` shows them with the entity's text.
        let malformed_handled = handled.split_off(rows.len());
        versions.truncate(rows.len());
        for ((version, entity), done) in malformed.drain(..).zip(malformed_handled) {
            if done {
                summary.already_handled += 1;
                newest_settled = newest_settled.max(Some(version.timestamp));
                continue;
            }
            tracing::warn!(row = %version.id, reason = %entity.message, "Row rejected: the table returned an entity that cannot be read.");
            summary.rejected += 1;
            let mut columns = serde_json::Map::new();
            columns.insert("entity".into(), serde_json::Value::String(entity.text));
            settlements.push(Settlement {
                row: version,
                outcome: Settled::Rejected {
                    reason: format!("malformed entity: {}", entity.message),
                },
                columns: Some(columns),
            });
        }
        let mut by_customer: BTreeMap<CustomerKey, Vec<(RowVersion, LeadEvent)>> = BTreeMap::new();

        for (((row, event), version), done) in
            rows.into_iter().zip(events).zip(versions).zip(handled)
        {
            if done {
                summary.already_handled += 1;
                newest_settled = newest_settled.max(Some(version.timestamp));
                continue;
            }
            let event = match event {
                Ok(event) => event,
                Err(rejection) => {
                    tracing::warn!(row = %row.id, reason = %rejection.reason, "Row rejected: it cannot become a lead.");
                    summary.rejected += 1;
                    settlements.push(Settlement {
                        row: version,
                        outcome: Settled::Rejected {
                            reason: rejection.to_string(),
                        },
                        columns: Some(row.columns),
                    });
                    continue;
                }
            };
            if event.test_lead {
                self.memory.metrics.saw_test_lead(&event.row);
            }
            if event.test_lead && self.policy.test_leads == TestLeadPolicy::Skip {
                tracing::info!(
                    row = %event.row,
                    "Marketplace test lead received: the marketplace can write to this table. Not delivered (policy.test_leads = \"skip\")."
                );
                summary.skipped += 1;
                settlements.push(Settlement {
                    row: version,
                    outcome: Settled::Skipped {
                        policy: "test_lead".into(),
                    },
                    columns: Some(row.columns),
                });
                continue;
            }
            match customer_key(&event.customer, self.identity.fallback) {
                Ok(key) => by_customer.entry(key).or_default().push((version, event)),
                Err(Unidentifiable(reason)) => {
                    tracing::warn!(row = %event.row, %reason, "Lead held: it cannot be attributed to a customer.");
                    summary.unidentifiable += 1;
                    settlements.push(Settlement {
                        row: version,
                        outcome: Settled::Unidentifiable { reason },
                        columns: as_map(&event),
                    });
                }
            }
        }

        Ok(Prepared {
            settlements,
            by_customer,
            newest_settled,
        })
    }

    /// The version each malformed entity is settled at. An entity without its keys
    /// cannot be recorded or retried by anyone: the table service never returns one,
    /// so it fails the poll, as a storage fault would.
    fn malformed_versions(
        &self,
        malformed: Vec<MalformedEntity>,
    ) -> Result<Vec<(RowVersion, MalformedEntity)>, PollError> {
        malformed
            .into_iter()
            .map(
                |entity| match (&entity.id, &entity.etag, entity.timestamp) {
                    (Some(id), Some(etag), Some(timestamp)) => Ok((
                        RowVersion {
                            id: id.clone(),
                            etag: etag.clone(),
                            timestamp,
                        },
                        entity,
                    )),
                    _ => Err(PollError::Source(SourceError::Malformed {
                        table: self.source.table_name().to_owned(),
                        row: entity
                            .id
                            .as_ref()
                            .map_or_else(|| "(no keys)".to_owned(), ToString::to_string),
                        message: format!("{}; its system columns cannot be read", entity.message),
                    })),
                },
            )
            .collect()
    }

    /// Second step of a page: merges each customer's leads into its stored record.
    /// `committing` is the previous page's batch, whose commit may still be running:
    /// its customers are newer than what the store returns.
    async fn merge(
        &self,
        prepared: Prepared,
        committing: Option<&SettleBatch>,
        window: &Window,
        mode: PollMode,
        summary: &mut PollSummary,
    ) -> Result<Merged, PollError> {
        let Prepared {
            mut settlements,
            by_customer,
            mut newest_settled,
        } = prepared;
        let keys: Vec<String> = by_customer.keys().map(CustomerKey::as_string).collect();
        let mut stored = self.state.customers_to_merge(&keys).await?;
        if let Some(batch) = committing.filter(|b| !b.customers.is_empty()) {
            let newer: std::collections::HashMap<&str, &CustomerState> = batch
                .customers
                .iter()
                .map(|c| (c.lead.key.as_str(), c))
                .collect();
            for (key, stored) in keys.iter().zip(stored.iter_mut()) {
                if let Some(c) = newer.get(key.as_str()) {
                    *stored = Some((*c).clone());
                }
            }
        }
        // Customers of the delivery window are newer still: merged, not yet sent.
        let mut windowed = vec![false; keys.len()];
        for ((key, stored), windowed) in keys.iter().zip(stored.iter_mut()).zip(&mut windowed) {
            if let Some(c) = window.customer(key) {
                *stored = Some(c.clone());
                *windowed = true;
            }
        }
        let mut to_store = Vec::new();
        // A page's customers are almost all delivered: their records (a kilobyte each)
        // are not copied again and again as the vector grows.
        let mut deliveries = Vec::with_capacity(by_customer.len());
        for (((key, mut items), stored), windowed) in
            by_customer.into_iter().zip(stored).zip(windowed)
        {
            let mut customer = stored.unwrap_or_else(|| CustomerState::new(&key, &self.identity));
            // A record some sinks have and others not yet (`acked`) is pending: its rows
            // read again are what the other sinks still need, not handled ones.
            if customer.delivered && customer.acked.is_empty() && !mode.ignore_handled {
                // Rows read again (the overlap window, or after a crash) whose version the
                // store did not remember as handled: the file store leaves delivered rows to
                // their customers' histories. They are already handled, as a remembered
                // row would be: not merged, not counted, not settled again.
                items.retain(|(version, event)| {
                    let seen = customer.has_version(event);
                    if seen {
                        summary.already_handled += 1;
                        newest_settled = newest_settled.max(Some(version.timestamp));
                    }
                    !seen
                });
                if items.is_empty() {
                    continue;
                }
            }
            let changed = customer.apply(items.iter().map(|(_, e)| e), &self.identity);
            let rows = items.into_iter().map(|(v, _)| v);
            if customer.delivered
                && customer.acked.is_empty()
                && !changed
                && !mode.resend
                && !windowed
            {
                // A replay of events already merged and delivered: nothing to send.
                let before = settlements.len();
                settle_all(rows, self.delivered(), &mut settlements);
                summary.unchanged += (settlements.len() - before) as u64;
                continue;
            }
            // Never create a contactable record for a do-not-contact customer; one already in
            // the CRM is updated with the flag set rather than left contactable.
            if customer.lead.do_not_contact
                && !customer.delivered
                && self.policy.do_not_contact == DoNotContactPolicy::Skip
            {
                tracing::info!(customer = %customer.lead.log_key(), "Do-not-contact customer recorded, not delivered (policy.do_not_contact = \"skip\").");
                let before = settlements.len();
                settle_all(
                    rows,
                    Settled::Skipped {
                        policy: "do_not_contact".into(),
                    },
                    &mut settlements,
                );
                summary.skipped += (settlements.len() - before) as u64;
                to_store.push(customer);
                continue;
            }
            deliveries.push(Delivery {
                customer,
                rows: rows.collect(),
            });
        }
        Ok(Merged {
            settlements,
            to_store,
            deliveries,
            newest_settled,
        })
    }

    /// Last step of a page: hands the merged records to every sink in batches (the sinks
    /// at once, each its batches in turn) and returns what to commit, with the newest
    /// settled Timestamp and the oldest still-open one. A record goes to each sink that
    /// does not have this version yet ([`CustomerState::acked`]); its rows settle when
    /// every sink has delivered it, followed it up, or dead-lettered it. Until then they
    /// stay open, and the sinks that have it are kept in the record, so a sink never
    /// gets a record twice because another is retried.
    async fn deliver_all(
        &self,
        merged: Merged,
        mode: PollMode,
        summary: &mut PollSummary,
    ) -> (SettleBatch, Option<OffsetDateTime>, Option<OffsetDateTime>) {
        let Merged {
            mut settlements,
            mut to_store,
            deliveries,
            mut newest_settled,
        } = merged;
        let mut oldest_open: Option<OffsetDateTime> = None;
        let mut dead_letters = Vec::new();
        let mut resolved = Vec::new();
        to_store.reserve(deliveries.len());
        settlements.reserve(deliveries.iter().map(|d| d.rows.len()).sum());
        // The records are lent to the sinks, not copied: they go back to state after.
        let (leads, rest): (Vec<CustomerLead>, Vec<_>) = deliveries
            .into_iter()
            .map(|d| {
                let (lead, merge) = d.customer.into_parts();
                (lead, (merge, d.rows))
            })
            .unzip();
        let wanted = |s: usize, i: usize| match mode.sink {
            Some(only) => only == s,
            None => !rest[i].0.acked.contains(&self.sinks[s].name),
        };
        let mut outcomes: Vec<Vec<Option<Outcome>>> =
            vec![vec![None; self.sinks.len()]; leads.len()];
        let per_sink = futures::future::join_all((0..self.sinks.len()).map(|s| {
            let wanted = &wanted;
            self.deliver_to(s, &leads, move |i| wanted(s, i))
        }))
        .await;
        for (s, answers) in per_sink.into_iter().enumerate() {
            for (i, outcome) in answers {
                outcomes[i][s] = Some(outcome);
            }
        }
        for ((lead, (mut merge, rows)), outcomes) in leads.into_iter().zip(rest).zip(outcomes) {
            let mut fate = Fate::default();
            for (outlet, outcome) in self.sinks.iter().zip(outcomes) {
                let Some(outcome) = outcome else { continue };
                self.judge(
                    outlet,
                    &lead,
                    &rows,
                    outcome,
                    &mut fate,
                    &mut dead_letters,
                    summary,
                );
            }
            for name in &fate.acked {
                resolved.push(self.dead_letter_id(name, &lead.external_key));
                if !merge.acked.contains(name) {
                    merge.acked.push(name.clone());
                }
            }
            if let Some((sink, reason)) = fate.pending {
                // Open until every sink settled it; the sinks that have it (or
                // dead-lettered it) are kept, and not asked again for this version.
                for name in &fate.refused {
                    if !merge.acked.contains(name) {
                        merge.acked.push(name.clone());
                    }
                }
                summary.pending += rows.len() as u64;
                for row in &rows {
                    oldest_open = Some(oldest_open.map_or(row.timestamp, |t| t.min(row.timestamp)));
                    self.follow_up_clock(row, sink, &reason, summary);
                }
                if !fate.acked.is_empty() || !fate.refused.is_empty() {
                    to_store.push(CustomerState::from_parts(lead, merge));
                }
                continue;
            }
            let settled = match (fate.rejected, fate.followed_up) {
                (Some(reason), _) => {
                    summary.rejected += rows.len() as u64;
                    Settled::Rejected { reason }
                }
                (None, Some(note)) => {
                    summary.followed_up += rows.len() as u64;
                    Settled::Skipped {
                        policy: format!("followed_up: {note}"),
                    }
                }
                (None, None) => {
                    summary.delivered += rows.len() as u64;
                    self.delivered()
                }
            };
            if fate.refused.is_empty() {
                // Every sink has this version now.
                merge.delivered = true;
                merge.acked.clear();
            } else {
                // Kept for `dlq retry`: it completes the record when the last one takes it.
                merge.acked.retain(|name| !fate.refused.contains(name));
            }
            to_store.push(CustomerState::from_parts(lead, merge));
            {
                let mut warned = self.memory.warned_overdue.lock().expect("not poisoned");
                if !warned.is_empty() {
                    // Settled: forget the overdue warning, so the set stays as small as the backlog.
                    for row in &rows {
                        warned.remove(&row.id);
                    }
                }
            }
            settle_all(rows.into_iter(), settled, &mut settlements);
        }

        for s in &settlements {
            newest_settled = newest_settled.max(Some(s.row.timestamp));
        }
        let batch = SettleBatch {
            rows: settlements,
            customers: to_store,
            dead_letters,
            resolved,
            continued: Continued::default(),
        };
        (batch, newest_settled, oldest_open)
    }

    /// Sends the records `wanted` says to sink `s`, in its batches; each answer with the
    /// record's index. A run of wanted records is lent as it is; only a batch with gaps
    /// (records this sink has already) is copied.
    async fn deliver_to(
        &self,
        s: usize,
        leads: &[CustomerLead],
        wanted: impl Fn(usize) -> bool,
    ) -> Vec<(usize, Outcome)> {
        let outlet = &self.sinks[s];
        let todo: Vec<usize> = (0..leads.len()).filter(|&i| wanted(i)).collect();
        let mut answers = Vec::with_capacity(todo.len());
        for chunk in todo.chunks(outlet.batch_size) {
            let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
            let outcomes = if last - first + 1 == chunk.len() {
                self.deliver(outlet, &leads[first..=last]).await
            } else {
                let gathered: Vec<CustomerLead> = chunk.iter().map(|&i| leads[i].clone()).collect();
                self.deliver(outlet, &gathered).await
            };
            // Each batch is progress for the watchdog: a page of a thousand customers to
            // a slow CRM can take longer than its period.
            self.memory.metrics.touch();
            answers.extend(chunk.iter().copied().zip(outcomes));
        }
        answers
    }

    /// Adds what `outlet` answered for one record to its fate.
    #[allow(clippy::too_many_arguments)]
    fn judge<'a>(
        &self,
        outlet: &'a Outlet,
        lead: &CustomerLead,
        rows: &[RowVersion],
        outcome: Outcome,
        fate: &mut Fate<'a>,
        dead_letters: &mut Vec<DeadLetter>,
        summary: &mut PollSummary,
    ) {
        let customer = &lead.external_key;
        let sink = outlet.name.as_str();
        match outcome {
            Outcome::Delivered => {
                summary.records_sent += 1;
                *summary.sent_by_sink.entry(outlet.name.clone()).or_default() += 1;
                fate.acked.push(outlet.name.clone());
            }
            Outcome::FollowedUp { note } => {
                tracing::info!(customer = %lead.log_key(), sink, %note, "The CRM record is sales' now; not updated, the people working it were told.");
                summary.records_sent += 1;
                *summary.sent_by_sink.entry(outlet.name.clone()).or_default() += 1;
                fate.acked.push(outlet.name.clone());
                fate.followed_up.get_or_insert(note);
            }
            Outcome::Rejected { reason } => {
                tracing::warn!(customer = %lead.log_key(), sink, %reason, "Sink rejected the lead; kept as a dead letter (leadsync dlq list).");
                fate.rejected.get_or_insert_with(|| {
                    format!("{sink} rejected customer {customer}: {reason}")
                });
                fate.refused.push(outlet.name.clone());
                dead_letters.push(DeadLetter {
                    id: self.dead_letter_id(sink, customer),
                    sink: sink.into(),
                    reason,
                    payload: lead.clone(),
                    rows: rows.to_vec(),
                    at: OffsetDateTime::now_utc(),
                    attempts: 1,
                });
            }
            Outcome::RetryLater { reason, .. } | Outcome::EndpointFailed { reason } => {
                fate.pending.get_or_insert((sink, reason));
            }
        }
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

    /// The outcome of a row whose customer every sink has.
    fn delivered(&self) -> Settled {
        Settled::Delivered {
            sink: self.sink_names(),
        }
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

    /// Hands a batch to the sink, unless the sink asked for a pause (Retry-After), and
    /// checks the sink kept its contract of one outcome per lead.
    async fn deliver(&self, outlet: &Outlet, leads: &[CustomerLead]) -> Vec<Outcome> {
        let paused = *outlet.paused_until.lock().expect("not poisoned");
        if let Some(until) = paused.filter(|u| *u > Instant::now()) {
            let wait = until - Instant::now();
            return vec![
                Outcome::RetryLater {
                    after: Some(wait),
                    reason: format!("the sink asked to wait {}s", wait.as_secs()),
                };
                leads.len()
            ];
        }
        let started = Instant::now();
        let outcomes = outlet.sink.deliver(leads).await;
        self.memory
            .metrics
            .observe_sink_call(&outlet.name, started.elapsed());
        if outcomes.len() != leads.len() {
            // A sink bug must not settle rows it did not report on.
            tracing::error!(
                sink = outlet.name.as_str(),
                expected = leads.len(),
                got = outcomes.len(),
                "Sink returned the wrong number of outcomes; treating the batch as not delivered."
            );
            return vec![
                Outcome::RetryLater {
                    after: None,
                    reason: "sink returned the wrong number of outcomes".into()
                };
                leads.len()
            ];
        }
        self.endpoint_health(outlet, &outcomes);
        let longest = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::RetryLater { after, .. } => *after,
                _ => None,
            })
            .max();
        if let Some(after) = longest {
            tracing::warn!(
                sink = outlet.name.as_str(),
                wait_s = after.as_secs(),
                "Sink asked to wait; no delivery before then."
            );
            *outlet.paused_until.lock().expect("not poisoned") = Some(Instant::now() + after);
        }
        outcomes
    }

    /// Keeps the sink's endpoint health: an `EndpointFailed` outcome pauses the sink
    /// for a back-off that doubles with each failure in a row (30 s up to 15 min) and
    /// reports the reason (`/readyz`, `/status`, `leadsync_sink_endpoint_failing`); any
    /// answer that reached a record (delivered, followed up, rejected) clears it.
    fn endpoint_health(&self, outlet: &Outlet, outcomes: &[Outcome]) {
        let failed = outcomes.iter().find_map(|o| match o {
            Outcome::EndpointFailed { reason } => Some(reason),
            _ => None,
        });
        let reached = outcomes.iter().any(|o| {
            matches!(
                o,
                Outcome::Delivered | Outcome::FollowedUp { .. } | Outcome::Rejected { .. }
            )
        });
        let sink = outlet.name.as_str();
        let mut failures = outlet.endpoint_failures.lock().expect("not poisoned");
        match failed {
            Some(reason) => {
                *failures += 1;
                let pause = ENDPOINT_BACKOFF_FIRST
                    .saturating_mul(1 << (*failures - 1).min(10))
                    .min(ENDPOINT_BACKOFF_MAX);
                *outlet.paused_until.lock().expect("not poisoned") = Some(Instant::now() + pause);
                self.memory.metrics.endpoint_failed(sink, reason);
                tracing::error!(
                    sink,
                    %reason,
                    failures_in_a_row = *failures,
                    pause_s = pause.as_secs(),
                    "The sink's endpoint refused the call, not the leads: they stay pending and the sink pauses. Fix the configuration or the CRM side; delivery resumes by itself."
                );
            }
            None if reached => {
                if *failures > 0 {
                    tracing::info!(sink, "The sink's endpoint answers again.");
                }
                *failures = 0;
                self.memory.metrics.endpoint_recovered(sink);
            }
            None => {}
        }
    }

    /// Tracks how long a pending lead has waited since the marketplace wrote it.
    fn follow_up_clock(
        &self,
        row: &RowVersion,
        sink: &str,
        reason: &str,
        summary: &mut PollSummary,
    ) {
        let age = (OffsetDateTime::now_utc() - row.timestamp)
            .try_into()
            .unwrap_or(Duration::ZERO);
        summary.oldest_pending_age = summary.oldest_pending_age.max(Some(age));
        if age < self.follow_up_warning {
            tracing::info!(row = %row.id, sink, %reason, "Lead not delivered yet; it will be offered again next poll.");
            return;
        }
        summary.overdue += 1;
        let first_time = self
            .memory
            .warned_overdue
            .lock()
            .expect("not poisoned")
            .insert(row.id.clone());
        if first_time {
            tracing::warn!(
                row = %row.id,
                sink,
                waiting = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                %reason,
                "Lead still undelivered past the follow-up warning; the 24-hour follow-up window is running."
            );
        }
    }

    /// Sends dead letters again (all, or those with the given ids), each through the
    /// sink that refused it, with the customer's current merged record.
    pub async fn retry_dead_letters(
        &self,
        ids: Option<&[String]>,
    ) -> Result<DeadLetterReport, PollError> {
        let mut letters = self.state.dead_letters().await?;
        let mut report = DeadLetterReport::default();
        if let Some(ids) = ids {
            for id in ids {
                if !letters.iter().any(|l| &l.id == id) {
                    report.missing.push(id.clone());
                }
            }
            letters.retain(|l| ids.contains(&l.id));
        }
        for letter in letters.iter().filter(|l| self.outlet(&l.sink).is_none()) {
            report.pending.push((
                letter.id.clone(),
                format!("sink \"{}\" is not configured any more", letter.sink),
            ));
        }
        for outlet in &self.sinks {
            let mine: Vec<&DeadLetter> = letters
                .iter()
                .filter(|l| self.outlet(&l.sink).is_some_and(|o| o.name == outlet.name))
                .collect();
            for chunk in mine.chunks(outlet.batch_size) {
                self.retry_chunk(outlet, chunk, &mut report).await?;
            }
        }
        Ok(report)
    }

    /// The sink a dead letter names: by name; a lone sink also takes the letters of
    /// its kind (written before sinks had names of their own).
    fn outlet(&self, sink: &str) -> Option<&Outlet> {
        self.sinks
            .iter()
            .find(|o| o.name == sink)
            .or_else(|| match &self.sinks[..] {
                [only] if only.sink.name() == sink => Some(only),
                _ => None,
            })
    }

    async fn retry_chunk(
        &self,
        outlet: &Outlet,
        chunk: &[&DeadLetter],
        report: &mut DeadLetterReport,
    ) -> Result<(), PollError> {
        let keys: Vec<String> = chunk.iter().map(|l| l.payload.key.clone()).collect();
        let current = self.state.customers(&keys).await?;
        let leads: Vec<CustomerLead> = chunk
            .iter()
            .zip(&current)
            .map(|(l, c)| {
                c.as_ref()
                    .map_or_else(|| l.payload.clone(), |c| c.lead.clone())
            })
            .collect();
        let outcomes = self.deliver(outlet, &leads).await;
        let mut batch = SettleBatch::default();
        for ((letter, customer), outcome) in chunk.iter().zip(current).zip(outcomes) {
            match outcome {
                // A converted lead's follow-up settles its dead letter too.
                Outcome::Delivered | Outcome::FollowedUp { .. } => {
                    report.delivered.push(letter.id.clone());
                    batch.resolved.push(letter.id.clone());
                    if let Some(mut c) = customer {
                        if !c.acked.contains(&outlet.name) {
                            c.acked.push(outlet.name.clone());
                        }
                        if self.sinks.iter().all(|o| c.acked.contains(&o.name)) {
                            c.delivered = true;
                            c.acked.clear();
                        }
                        batch.customers.push(c);
                    }
                }
                Outcome::Rejected { reason } => {
                    report.rejected.push((letter.id.clone(), reason.clone()));
                    let mut again = (*letter).clone();
                    again.reason = reason;
                    again.attempts += 1;
                    again.at = OffsetDateTime::now_utc();
                    batch.dead_letters.push(again);
                }
                Outcome::RetryLater { reason, .. } | Outcome::EndpointFailed { reason } => {
                    report.pending.push((letter.id.clone(), reason))
                }
            }
        }
        outlet.sink.sync().await?;
        self.state.settle(&batch).await?;
        Ok(())
    }
}

/// Makes what every sink took durable (a JSONL file synced), each in turn.
async fn sync_all(sinks: &[Arc<dyn LeadSink>]) -> Result<(), crate::sink::SinkError> {
    for sink in sinks {
        sink.sync().await?;
    }
    Ok(())
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
