//! The poll's loop: fetch pages ahead, merge them into the delivery window, flush the
//! window (deliver, then settle in a task of its own), and move the checkpoint once the
//! whole window of the table was read.
//!
//! Each page is fetched in its own task while the one before is processed, and merged
//! into the delivery window ([`Window`]): a customer whose rows span the window's pages
//! is sent once. A full window (or the last page) is flushed: its customers are
//! delivered, then its settle (the sink's sync, then the state commit) runs in its own
//! task while the next pages are normalised and merged (reading the customers being
//! committed from the batch itself): the table's latency and the commit overlap the
//! work, on another core when there is one. A window is delivered only after the one
//! before it is committed. In memory: two pages' rows (fetching, working), the window's
//! customer records (`WINDOW_BYTES` at most) and the committing batch.
//!
//! A page's task says where the next page starts as soon as the service's answer is in,
//! before it builds the rows from the answer's JSON and normalises them, so the next
//! page's request is already out while that work is done: the table never waits for
//! leadsync to parse a page. Rows found already handled (the overlap re-read, a replay
//! after a crash) are normalised and then dropped: about 10 µs each, less than fetching
//! them, and it keeps the handled-row lookup, which reads state, out of the fetch task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::window::Window;
use super::{joined, Pipeline, PollError, PollMode, PollSummary};
use crate::lead::{normalise, LeadEvent, Rejection};
use crate::source::row::RawRow;
use crate::source::{Continuation, MalformedEntity, SourceError};
use crate::state::SettleBatch;
use crate::task::AbortOnDrop;

/// A flushed window's batch and the task settling it.
type Settling = (
    Arc<SettleBatch>,
    tokio::task::JoinHandle<Result<(), PollError>>,
);

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

/// What a poll carries from page to page.
#[derive(Default)]
struct PollState {
    /// The newest Timestamp of a row settled (or found handled) so far.
    newest_settled: Option<OffsetDateTime>,
    /// The oldest Timestamp of a row whose outcome is still open (pending at the sink).
    oldest_open: Option<OffsetDateTime>,
    /// When the poll began, on the storage service's clock: the `Date` of the first
    /// page's answer. See [`Pipeline::move_checkpoint`].
    began: Option<OffsetDateTime>,
    /// The last flush's batch and the task settling it.
    settling: Option<Settling>,
    window: Window,
    /// How this poll reads and sends (replay, `--sink`).
    mode: PollMode,
}

/// Where one page's time went, for the debug timings.
struct PageTimes {
    wait_table: Duration,
    wait_response: Duration,
    prepare_merge: Duration,
}

/// Milliseconds, for the debug timings.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Pipeline {
    /// As [`Pipeline::poll_with`], counting into `summary` as it goes, so that a poll
    /// that fails still tells what it read and delivered before the failure.
    pub async fn poll_counting(
        &self,
        mode: PollMode,
        cancel: &CancellationToken,
        summary: &mut PollSummary,
    ) -> Result<(), PollError> {
        let started = Instant::now();
        let checkpoint = self.state.checkpoint().await?;
        let since = mode.since.or(checkpoint.map(|c| c - self.overlap));
        let mut poll = PollState {
            mode,
            ..PollState::default()
        };
        let passed = self
            .read_pages(since, mode, cancel, summary, &mut poll)
            .await;
        // Whatever happened, the last settle finishes before the poll returns.
        let last_page = Instant::now();
        if let Some((_, last)) = poll.settling.take() {
            last.await.map_err(joined)??;
        }
        summary.duration = started.elapsed();
        passed?;
        let last_commit = Instant::now();
        let new_checkpoint = self.move_checkpoint(checkpoint, &poll).await?;
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

    /// Starts fetching the page at `continuation` (the first page: `None`), page number
    /// `pages + 1`.
    fn fetch(
        &self,
        since: Option<OffsetDateTime>,
        continuation: Option<Continuation>,
        pages: u64,
        cancel: &CancellationToken,
    ) -> Fetching {
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
    }

    /// Reads every page from `since`, merging each into the window and flushing the
    /// window when it is full and at the last page.
    async fn read_pages(
        &self,
        since: Option<OffsetDateTime>,
        mode: PollMode,
        cancel: &CancellationToken,
        summary: &mut PollSummary,
        poll: &mut PollState,
    ) -> Result<(), PollError> {
        let mut fetching = self.fetch(since, None, 0, cancel);
        loop {
            let waiting = Instant::now();
            // A failed fetch says nothing here; its error comes from the task below.
            let answer = (&mut fetching.next).await.ok();
            let wait_response = waiting.elapsed();
            if poll.began.is_none() {
                poll.began = answer.as_ref().map(|(_, date)| *date);
            }
            let next = answer.and_then(|(next, _)| next);
            let more = next.is_some();
            let mut prefetch = match next {
                Some(c) if !cancel.is_cancelled() => {
                    Some(self.fetch(since, Some(c), summary.pages + 1, cancel))
                }
                _ => None,
            };
            let (rows, events, malformed) = (&mut fetching.task.0).await.map_err(joined)??;
            let wait_table = waiting.elapsed();
            summary.pages += 1;
            summary.rows_read += (rows.len() + malformed.len()) as u64;
            self.memory.metrics.touch();
            let pages = summary.pages;
            let t0 = Instant::now();
            let prepared = self.prepare(rows, events, malformed, mode, summary).await?;
            let committing = poll.settling.as_ref().map(|(batch, _)| batch.as_ref());
            let merged = self
                .merge(prepared, committing, &poll.window, mode, summary)
                .await?;
            poll.window.absorb(merged, summary);
            let times = PageTimes {
                wait_table,
                wait_response,
                prepare_merge: t0.elapsed(),
            };
            // The window is flushed when full, and at the last page.
            if let Some(next) = prefetch.take_if(|_| !poll.window.full(self.window_pages)) {
                tracing::debug!(
                    page = pages,
                    wait_table_ms = ms(times.wait_table),
                    wait_response_ms = ms(times.wait_response),
                    prepare_merge_ms = ms(times.prepare_merge),
                    window_pages = poll.window.pages,
                    window_customers = poll.window.customers(),
                    "Page merged into the delivery window."
                );
                fetching = next;
            } else {
                self.flush(poll, pages, &times, prefetch.is_none(), cancel, summary)
                    .await?;
                match prefetch {
                    Some(next) => fetching = next,
                    None if more => return Err(PollError::Interrupted { pages }),
                    None => return Ok(()),
                }
            }
            if cancel.is_cancelled() {
                return Err(PollError::Interrupted {
                    pages: summary.pages,
                });
            }
        }
    }

    /// Flushes the window after page `pages`: waits for the last flush's settle, delivers
    /// the window's customers and starts settling them.
    async fn flush(
        &self,
        poll: &mut PollState,
        pages: u64,
        times: &PageTimes,
        last: bool,
        cancel: &CancellationToken,
        summary: &mut PollSummary,
    ) -> Result<(), PollError> {
        let t1 = Instant::now();
        let merged = poll.window.take();
        // Nothing of this window reaches the sink before the last one is committed.
        if let Some((_, previous)) = poll.settling.take() {
            previous.await.map_err(joined)??;
        }
        let t2 = Instant::now();
        // Told to stop while this page was read (shutdown, or a processing lease that
        // may expire before it is renewed): nothing more goes to the sink.
        if cancel.is_cancelled() {
            return Err(PollError::Interrupted { pages: pages - 1 });
        }
        let (batch, settled, open) = self.deliver_all(merged, poll.mode, summary).await;
        let t3 = Instant::now();
        let batch = Arc::new(batch);
        poll.settling = Some((Arc::clone(&batch), self.spawn_settle(batch, pages)));
        poll.newest_settled = poll.newest_settled.max(settled);
        poll.oldest_open = match (poll.oldest_open, open) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Where a page's time goes: says whether the table (waiting for the page), the
        // state or the work (merge and sink) limits a backfill.
        tracing::debug!(
            flush = true,
            page = pages,
            wait_table_ms = ms(times.wait_table),
            wait_response_ms = ms(times.wait_response),
            prepare_merge_ms = ms(times.prepare_merge),
            wait_commit_ms = ms(t2 - t1),
            deliver_ms = ms(t3 - t2),
            last,
            "Page handled."
        );
        Ok(())
    }

    /// Settles a flushed window's batch in a task of its own, off the path of the next
    /// pages: what the sink took is made durable first (a JSONL file synced), and only
    /// then are its outcomes committed. A failed sync commits nothing: its error is the
    /// poll's, and those rows are read and delivered again.
    fn spawn_settle(
        &self,
        batch: Arc<SettleBatch>,
        page: u64,
    ) -> tokio::task::JoinHandle<Result<(), PollError>> {
        let state = Arc::clone(&self.state);
        let sinks: Vec<_> = self.sinks.iter().map(|o| Arc::clone(&o.sink)).collect();
        tokio::spawn(async move {
            let started = Instant::now();
            super::deliver::sync_all(&sinks).await?;
            let sync = started.elapsed();
            state.settle(&batch).await?;
            tracing::debug!(
                page,
                rows = batch.rows.len(),
                customers = batch.customers.len(),
                sync_ms = ms(sync),
                commit_ms = ms(started.elapsed() - sync),
                "Page committed."
            );
            Ok(())
        })
    }

    /// Moves the checkpoint after a complete pass, and forgets the handled rows that
    /// left the overlap window. Returns the checkpoint now.
    ///
    /// The scan runs in key order, not Timestamp order: while it runs, a row written into
    /// a key range it has already passed is not read, while a later row written ahead of
    /// it is. So the checkpoint never passes the poll's beginning on the service's clock
    /// (the first answer's `Date`, at or before any Timestamp the service gave a row this
    /// scan could miss): the next poll reads from there less the overlap, whatever the
    /// poll's length and wherever new rows landed. Nor does it pass the oldest row still
    /// open at the sink.
    async fn move_checkpoint(
        &self,
        checkpoint: Option<OffsetDateTime>,
        poll: &PollState,
    ) -> Result<Option<OffsetDateTime>, PollError> {
        let mut candidate = poll.newest_settled;
        for bound in [poll.oldest_open, poll.began] {
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
        Ok(new_checkpoint)
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
}
