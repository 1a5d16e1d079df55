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
//!   a later-stamped row was read; the (PartitionKey, RowKey, ETag) of every settled
//!   row in that window is remembered so that re-reading delivers nothing twice, and a
//!   row changed since (new ETag) is handled again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::{DoNotContactPolicy, PolicySettings, TestLeadPolicy};
use crate::lead::{normalise, LeadEvent, Stage};
use crate::row::RawRow;
use crate::sink::{Lead, LeadSink, Outcome};
use crate::source::{Continuation, SourceError, TableSource};
use crate::state::{RowVersion, Settled, Settlement, StateError, StateStore};
use crate::timestamp;

/// Why a poll did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
    /// Shutdown was requested between two pages; the checkpoint was not moved.
    #[error("poll interrupted by shutdown after {pages} pages; the checkpoint was not moved")]
    Interrupted { pages: u64 },
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollSummary {
    /// Entities returned by the table (including ones already handled).
    pub rows_read: u64,
    /// Rows skipped because this version was handled by an earlier poll.
    pub already_handled: u64,
    /// Leads the sink acknowledged.
    pub delivered: u64,
    /// Rows deliberately not sent (test leads, do-not-contact).
    pub skipped: u64,
    /// Rows that cannot become a lead, or that the sink refused for good.
    pub rejected: u64,
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
    pub sink: Arc<dyn LeadSink>,
    pub policy: PolicySettings,
    pub overlap: Duration,
    pub batch_size: usize,
}

/// What to do with a normalised event.
enum Decision {
    Deliver(Box<Lead>),
    Skip(&'static str),
}

fn decide(event: LeadEvent, policy: &PolicySettings) -> Decision {
    if event.test_lead && policy.test_leads == TestLeadPolicy::Skip {
        tracing::info!(
            row = %event.row,
            "Marketplace test lead received: the marketplace can write to this table. Not delivered (policy.test_leads = \"skip\")."
        );
        return Decision::Skip("test_lead");
    }
    let do_not_contact = event.stage == Stage::DoNotContact;
    if do_not_contact && policy.do_not_contact == DoNotContactPolicy::Skip {
        tracing::info!(row = %event.row, "Do-not-contact lead recorded, not delivered (policy.do_not_contact = \"skip\").");
        return Decision::Skip("do_not_contact");
    }
    Decision::Deliver(Box::new(Lead {
        event,
        do_not_contact,
    }))
}

fn version(row: &RawRow) -> RowVersion {
    RowVersion {
        id: row.id.clone(),
        etag: row.etag.clone(),
        timestamp: row.timestamp,
    }
}

impl Pipeline {
    /// Reads the whole window once and settles what it can.
    pub async fn poll(&self, cancel: &CancellationToken) -> Result<PollSummary, PollError> {
        let started = Instant::now();
        let checkpoint = self.state.checkpoint().await?;
        let since = checkpoint.map(|c| c - self.overlap);
        let mut summary = PollSummary::default();
        let mut newest_settled: Option<OffsetDateTime> = None;
        let mut oldest_open: Option<OffsetDateTime> = None;
        let mut continuation: Option<Continuation> = None;
        loop {
            if cancel.is_cancelled() {
                return Err(PollError::Interrupted {
                    pages: summary.pages,
                });
            }
            let page = self
                .source
                .fetch_page(since, continuation.as_ref(), cancel)
                .await
                .map_err(|e| match e {
                    SourceError::Cancelled => PollError::Interrupted {
                        pages: summary.pages,
                    },
                    other => PollError::Source(other),
                })?;
            summary.pages += 1;
            summary.rows_read += page.rows.len() as u64;
            let (settled, open) = self.process(page.rows, &mut summary).await?;
            newest_settled = newest_settled.max(settled);
            oldest_open = match (oldest_open, open) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match page.next {
                Some(next) => continuation = Some(next),
                None => break,
            }
        }

        let mut candidate = newest_settled;
        if let (Some(c), Some(open)) = (candidate, oldest_open) {
            candidate = Some(c.min(open));
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
        summary.checkpoint = new_checkpoint;
        summary.duration = started.elapsed();
        Ok(summary)
    }

    /// Handles one page. Returns the newest settled Timestamp and the oldest still-open one.
    async fn process(
        &self,
        rows: Vec<RawRow>,
        summary: &mut PollSummary,
    ) -> Result<(Option<OffsetDateTime>, Option<OffsetDateTime>), PollError> {
        let versions: Vec<RowVersion> = rows.iter().map(version).collect();
        let handled = self.state.handled(&versions).await?;
        let mut newest_settled = None;
        let mut oldest_open: Option<OffsetDateTime> = None;
        let mut settlements = Vec::new();
        let mut to_deliver: Vec<(RowVersion, Lead)> = Vec::new();

        for ((row, version), done) in rows.into_iter().zip(versions).zip(handled) {
            if done {
                summary.already_handled += 1;
                newest_settled = newest_settled.max(Some(version.timestamp));
                continue;
            }
            match normalise(&row) {
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
                }
                Ok(event) => match decide(event, &self.policy) {
                    Decision::Skip(policy) => {
                        summary.skipped += 1;
                        settlements.push(Settlement {
                            row: version,
                            outcome: Settled::Skipped {
                                policy: policy.into(),
                            },
                            columns: Some(row.columns),
                        });
                    }
                    Decision::Deliver(lead) => to_deliver.push((version, *lead)),
                },
            }
        }

        for chunk in to_deliver.chunks(self.batch_size.max(1)) {
            let leads: Vec<Lead> = chunk.iter().map(|(_, lead)| lead.clone()).collect();
            let mut outcomes = self.sink.deliver(&leads).await;
            if outcomes.len() != leads.len() {
                // A sink bug must not settle rows it did not report on.
                tracing::error!(
                    sink = self.sink.name(),
                    expected = leads.len(),
                    got = outcomes.len(),
                    "Sink returned the wrong number of outcomes; treating the batch as not delivered."
                );
                outcomes = vec![
                    Outcome::RetryLater {
                        after: None,
                        reason: "sink returned the wrong number of outcomes".into()
                    };
                    leads.len()
                ];
            }
            for ((version, lead), outcome) in chunk.iter().zip(outcomes) {
                let settled = match outcome {
                    Outcome::Delivered => {
                        summary.delivered += 1;
                        Settled::Delivered {
                            sink: self.sink.name().into(),
                        }
                    }
                    Outcome::Rejected { reason } => {
                        tracing::warn!(row = %version.id, sink = self.sink.name(), %reason, "Sink rejected the lead.");
                        summary.rejected += 1;
                        Settled::Rejected {
                            reason: format!("{} rejected the lead: {reason}", self.sink.name()),
                        }
                    }
                    Outcome::RetryLater { reason, .. } => {
                        tracing::warn!(row = %version.id, sink = self.sink.name(), %reason, "Lead not delivered yet; it will be offered again next poll.");
                        summary.pending += 1;
                        oldest_open = Some(match oldest_open {
                            Some(t) => t.min(version.timestamp),
                            None => version.timestamp,
                        });
                        continue;
                    }
                };
                let columns = matches!(settled, Settled::Rejected { .. })
                    .then(|| serde_json::to_value(&lead.event).ok())
                    .flatten()
                    .and_then(|v| match v {
                        serde_json::Value::Object(map) => Some(map),
                        _ => None,
                    });
                settlements.push(Settlement {
                    row: version.clone(),
                    outcome: settled,
                    columns,
                });
            }
        }

        for s in &settlements {
            newest_settled = newest_settled.max(Some(s.row.timestamp));
        }
        self.state.settle(&settlements).await?;
        Ok((newest_settled, oldest_open))
    }
}

/// The summary line of a poll, fields first.
pub fn log_summary(summary: &PollSummary) {
    tracing::info!(
        rows_read = summary.rows_read,
        new_leads = summary.delivered,
        skipped = summary.skipped,
        rejected = summary.rejected,
        pending = summary.pending,
        already_handled = summary.already_handled,
        pages = summary.pages,
        duration_ms = summary.duration.as_millis() as u64,
        checkpoint = %summary.checkpoint.map(timestamp::format).unwrap_or_else(|| "none".into()),
        "Poll finished."
    );
}
