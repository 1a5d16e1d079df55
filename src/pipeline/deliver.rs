//! The last step of a flush: the window's customers go to the sink in batches, and
//! each outcome becomes what the settle records. Also the sink's pause after a
//! Retry-After or a failing endpoint, and `dlq retry`.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::page::Merged;
use super::{settle_all, DeadLetterReport, Pipeline, PollError, PollSummary};
use crate::identity::{CustomerLead, CustomerState, MergeState};
use crate::sink::Outcome;
use crate::state::{DeadLetter, RowVersion, SettleBatch, Settled};

/// The first pause after an endpoint-level failure; it doubles with each one in a row.
const ENDPOINT_BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// The longest pause after endpoint-level failures.
const ENDPOINT_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

impl Pipeline {
    /// Last step of a flush: hands the merged records to the sink in batches and returns
    /// what to commit, with the newest settled Timestamp and the oldest still-open one.
    pub(super) async fn deliver_all(
        &self,
        merged: Merged,
        summary: &mut PollSummary,
    ) -> (SettleBatch, Option<OffsetDateTime>, Option<OffsetDateTime>) {
        let Merged {
            settlements,
            to_store,
            deliveries,
            mut newest_settled,
        } = merged;
        let mut oldest_open: Option<OffsetDateTime> = None;
        let mut batch = SettleBatch {
            rows: settlements,
            customers: to_store,
            // Room for what the deliveries add, so that neither the records nor the rows
            // are copied as these vectors grow.
            resolved: Vec::with_capacity(deliveries.len()),
            dead_letters: Vec::new(),
        };
        batch.customers.reserve(deliveries.len());
        batch
            .rows
            .reserve(deliveries.iter().map(|d| d.rows.len()).sum());
        let mut deliveries = deliveries.into_iter().peekable();
        while deliveries.peek().is_some() {
            // The records are lent to the sink, not copied: they go back to state after.
            let (leads, rest): (Vec<CustomerLead>, Vec<_>) = deliveries
                .by_ref()
                .take(self.batch_size.max(1))
                .map(|d| {
                    let (lead, merge) = d.customer.into_parts();
                    (lead, (merge, d.rows))
                })
                .unzip();
            let outcomes = self.deliver(&leads).await;
            // Each batch is progress for the watchdog: a page of a thousand customers to
            // a slow CRM can take longer than its period.
            self.memory.metrics.touch();
            for ((lead, (merge, rows)), outcome) in leads.into_iter().zip(rest).zip(outcomes) {
                let delivered = (lead, merge, rows);
                self.record_outcome(delivered, outcome, &mut batch, &mut oldest_open, summary);
            }
        }
        for s in &batch.rows {
            newest_settled = newest_settled.max(Some(s.row.timestamp));
        }
        (batch, newest_settled, oldest_open)
    }

    /// Adds one customer's outcome at the sink to the batch: its rows settled, its
    /// record stored, its dead letter written or resolved; or, for an outcome still open,
    /// nothing but the oldest open Timestamp.
    fn record_outcome(
        &self,
        (lead, mut merge, rows): (CustomerLead, MergeState, Vec<RowVersion>),
        outcome: Outcome,
        batch: &mut SettleBatch,
        oldest_open: &mut Option<OffsetDateTime>,
        summary: &mut PollSummary,
    ) {
        let customer = &lead.external_key;
        let settled = match outcome {
            Outcome::Delivered => {
                summary.delivered += rows.len() as u64;
                summary.records_sent += 1;
                batch.resolved.push(customer.clone());
                merge.delivered = true;
                batch.customers.push(CustomerState::from_parts(lead, merge));
                self.delivered()
            }
            Outcome::Rejected { reason } => {
                tracing::warn!(customer = %lead.log_key(), sink = self.sink.name(), %reason, "Sink rejected the lead; kept as a dead letter (leadsync dlq list).");
                summary.rejected += rows.len() as u64;
                let settled = Settled::Rejected {
                    reason: format!(
                        "{} rejected customer {customer}: {reason}",
                        self.sink.name()
                    ),
                };
                batch.dead_letters.push(DeadLetter {
                    id: customer.clone(),
                    sink: self.sink.name().into(),
                    reason,
                    payload: lead.clone(),
                    rows: rows.clone(),
                    at: OffsetDateTime::now_utc(),
                    attempts: 1,
                });
                batch.customers.push(CustomerState::from_parts(lead, merge));
                settled
            }
            Outcome::FollowedUp { note } => {
                tracing::info!(customer = %lead.log_key(), sink = self.sink.name(), %note, "The CRM record is sales' now; not updated, the people working it were told.");
                summary.followed_up += rows.len() as u64;
                summary.records_sent += 1;
                batch.resolved.push(customer.clone());
                merge.delivered = true;
                batch.customers.push(CustomerState::from_parts(lead, merge));
                Settled::Skipped {
                    policy: format!("followed_up: {note}"),
                }
            }
            Outcome::RetryLater { reason, .. } | Outcome::EndpointFailed { reason } => {
                summary.pending += rows.len() as u64;
                for row in &rows {
                    *oldest_open =
                        Some(oldest_open.map_or(row.timestamp, |t| t.min(row.timestamp)));
                    self.follow_up_clock(row, &reason, summary);
                }
                return;
            }
        };
        {
            let mut warned = self.memory.warned_overdue.lock().expect("not poisoned");
            if !warned.is_empty() {
                // Settled: forget the overdue warning, so the set stays as small as the backlog.
                for row in &rows {
                    warned.remove(&row.id);
                }
            }
        }
        settle_all(rows.into_iter(), settled, &mut batch.rows);
    }

    /// The outcome of a row whose customer this pipeline's sink has.
    pub(super) fn delivered(&self) -> Settled {
        Settled::Delivered {
            sink: self.sink.name().into(),
        }
    }

    /// Hands a batch to the sink, unless the sink asked for a pause (Retry-After), and
    /// checks the sink kept its contract of one outcome per lead.
    async fn deliver(&self, leads: &[CustomerLead]) -> Vec<Outcome> {
        let paused = *self.memory.sink_paused_until.lock().expect("not poisoned");
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
        let outcomes = self.sink.deliver(leads).await;
        self.memory
            .metrics
            .observe_sink_call(self.sink.name(), started.elapsed());
        if outcomes.len() != leads.len() {
            // A sink bug must not settle rows it did not report on.
            tracing::error!(
                sink = self.sink.name(),
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
        self.endpoint_health(&outcomes);
        let longest = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::RetryLater { after, .. } => *after,
                _ => None,
            })
            .max();
        if let Some(after) = longest {
            tracing::warn!(
                sink = self.sink.name(),
                wait_s = after.as_secs(),
                "Sink asked to wait; no delivery before then."
            );
            *self.memory.sink_paused_until.lock().expect("not poisoned") =
                Some(Instant::now() + after);
        }
        outcomes
    }

    /// Keeps the sink's endpoint health: an `EndpointFailed` outcome pauses the sink
    /// for a back-off that doubles with each failure in a row (30 s up to 15 min) and
    /// reports the reason (`/readyz`, `/status`, `leadsync_sink_endpoint_failing`); any
    /// answer that reached a record (delivered, followed up, rejected) clears it.
    fn endpoint_health(&self, outcomes: &[Outcome]) {
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
        let sink = self.sink.name();
        let mut failures = self.memory.endpoint_failures.lock().expect("not poisoned");
        match failed {
            Some(reason) => {
                *failures += 1;
                let pause = ENDPOINT_BACKOFF_FIRST
                    .saturating_mul(1 << (*failures - 1).min(10))
                    .min(ENDPOINT_BACKOFF_MAX);
                *self.memory.sink_paused_until.lock().expect("not poisoned") =
                    Some(Instant::now() + pause);
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
    fn follow_up_clock(&self, row: &RowVersion, reason: &str, summary: &mut PollSummary) {
        let age = (OffsetDateTime::now_utc() - row.timestamp)
            .try_into()
            .unwrap_or(Duration::ZERO);
        summary.oldest_pending_age = summary.oldest_pending_age.max(Some(age));
        if age < self.follow_up_warning {
            tracing::info!(row = %row.id, sink = self.sink.name(), %reason, "Lead not delivered yet; it will be offered again next poll.");
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
                sink = self.sink.name(),
                waiting = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                %reason,
                "Lead still undelivered past the follow-up warning; the 24-hour follow-up window is running."
            );
        }
    }

    /// Sends dead letters again (all, or those with the given ids) through the sink,
    /// with the customer's current merged record.
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
        for chunk in letters.chunks(self.batch_size.max(1)) {
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
            let outcomes = self.deliver(&leads).await;
            let mut batch = SettleBatch::default();
            for ((letter, customer), outcome) in chunk.iter().zip(current).zip(outcomes) {
                match outcome {
                    // A converted lead's follow-up settles its dead letter too.
                    Outcome::Delivered | Outcome::FollowedUp { .. } => {
                        report.delivered.push(letter.id.clone());
                        batch.resolved.push(letter.id.clone());
                        if let Some(mut c) = customer {
                            c.delivered = true;
                            batch.customers.push(c);
                        }
                    }
                    Outcome::Rejected { reason } => {
                        report.rejected.push((letter.id.clone(), reason.clone()));
                        let mut again = letter.clone();
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
            self.sink.sync().await?;
            self.state.settle(&batch).await?;
        }
        Ok(report)
    }
}
