//! The last step of a flush: the window's customers go to every sink in batches, and
//! each outcome becomes what the settle records. Also each sink's pause after a
//! Retry-After or a failing endpoint, and `dlq retry`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::page::Merged;
use super::{settle_all, DeadLetterReport, Outlet, Pipeline, PollError, PollMode, PollSummary};
use crate::identity::{CustomerLead, CustomerState, MergeState};
use crate::sink::{LeadSink, Outcome};
use crate::state::{DeadLetter, RowVersion, SettleBatch, Settled};

/// The first pause after an endpoint-level failure; it doubles with each one in a row.
const ENDPOINT_BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// How long the alert sinks wait for the record sinks' answer to name the CRM record.
const LINK_WAIT: Duration = Duration::from_secs(5);
/// The longest pause after endpoint-level failures.
const ENDPOINT_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

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

impl Pipeline {
    /// Last step of a flush: hands the merged records to every sink in batches (the sinks
    /// at once, each its batches in turn) and returns what to commit, with the newest
    /// settled Timestamp and the oldest still-open one. A record goes to each sink that
    /// does not have this version yet ([`CustomerState::acked`]); its rows settle when
    /// every sink has delivered it, followed it up, or dead-lettered it. Until then they
    /// stay open, and the sinks that have it are kept in the record, so a sink never
    /// gets a record twice because another is retried.
    pub(super) async fn deliver_all(
        &self,
        merged: Merged,
        mode: PollMode,
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
            resolved: Vec::new(),
            dead_letters: Vec::new(),
        };
        // Room for what the deliveries add, so that neither the records nor the rows are
        // copied as these vectors grow.
        batch.customers.reserve(deliveries.len());
        batch
            .rows
            .reserve(deliveries.iter().map(|d| d.rows.len()).sum());
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
        // The record sinks (CRMs, files, webhooks) first; the alert sinks once they have
        // answered, so that an alert names the CRM record, or after LINK_WAIT at most,
        // so that a slow or failing CRM delays no alert longer than that.
        let (alerts, records): (Vec<usize>, Vec<usize>) =
            (0..self.sinks.len()).partition(|&s| self.sinks[s].sink.is_alert());
        let (answered, mut done) = tokio::sync::watch::channel(false);
        let record_phase = async {
            let answers = futures::future::join_all(records.iter().map(|&s| {
                let wanted = &wanted;
                self.deliver_to(s, &leads, move |i| wanted(s, i))
            }))
            .await;
            let _ = answered.send(true);
            answers
        };
        let alert_phase = async {
            if !records.is_empty() {
                let _ = tokio::time::timeout(LINK_WAIT, done.wait_for(|d| *d)).await;
            }
            futures::future::join_all(alerts.iter().map(|&s| {
                let wanted = &wanted;
                self.deliver_to(s, &leads, move |i| wanted(s, i))
            }))
            .await
        };
        let (record_answers, alert_answers) = tokio::join!(record_phase, alert_phase);
        let per_sink = records
            .iter()
            .zip(record_answers)
            .chain(alerts.iter().zip(alert_answers))
            .map(|(&s, answers)| (s, answers));
        for (s, answers) in per_sink {
            for (i, outcome) in answers {
                outcomes[i][s] = Some(outcome);
            }
        }
        for ((lead, (merge, rows)), outcomes) in leads.into_iter().zip(rest).zip(outcomes) {
            let record = (lead, merge, rows);
            self.settle_record(record, outcomes, &mut batch, &mut oldest_open, summary);
        }
        for s in &batch.rows {
            newest_settled = newest_settled.max(Some(s.row.timestamp));
        }
        (batch, newest_settled, oldest_open)
    }

    /// For an alert sink (`linked`), the link to each record a record sink of the
    /// deployment knows (a CRM's record page); nothing for the others.
    fn links(&self, linked: bool, leads: &[CustomerLead]) -> Vec<Option<String>> {
        if !linked {
            return Vec::new();
        }
        leads
            .iter()
            .map(|lead| {
                self.sinks
                    .iter()
                    .filter(|o| !o.sink.is_alert())
                    .find_map(|o| o.sink.record_link(&lead.external_key))
            })
            .collect()
    }

    /// Adds what the sinks answered for one record to the batch: its rows settled when
    /// every sink has settled it, its record stored (with the sinks that have it while
    /// another does not), its dead letters written or resolved; or, while a sink could
    /// not take it, only the oldest open Timestamp.
    fn settle_record(
        &self,
        (lead, mut merge, rows): (CustomerLead, MergeState, Vec<RowVersion>),
        outcomes: Vec<Option<Outcome>>,
        batch: &mut SettleBatch,
        oldest_open: &mut Option<OffsetDateTime>,
        summary: &mut PollSummary,
    ) {
        let mut fate = Fate::default();
        for (outlet, outcome) in self.sinks.iter().zip(outcomes) {
            let Some(outcome) = outcome else { continue };
            self.judge(
                outlet,
                &lead,
                &rows,
                outcome,
                &mut fate,
                &mut batch.dead_letters,
                summary,
            );
        }
        for name in &fate.acked {
            batch
                .resolved
                .push(self.dead_letter_id(name, &lead.external_key));
            if !merge.acked.contains(name) {
                merge.acked.push(name.clone());
            }
        }
        if let Some((sink, reason)) = fate.pending {
            // Open until every sink settled it; the sinks that have it (or dead-lettered
            // it) are kept, and not asked again for this version.
            for name in &fate.refused {
                if !merge.acked.contains(name) {
                    merge.acked.push(name.clone());
                }
            }
            summary.pending += rows.len() as u64;
            for row in &rows {
                *oldest_open = Some(oldest_open.map_or(row.timestamp, |t| t.min(row.timestamp)));
                self.follow_up_clock(row, sink, &reason, summary);
            }
            if !fate.acked.is_empty() || !fate.refused.is_empty() {
                batch.customers.push(CustomerState::from_parts(lead, merge));
            }
            return;
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
        batch.customers.push(CustomerState::from_parts(lead, merge));
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
        let linked = outlet.sink.is_alert();
        let todo: Vec<usize> = (0..leads.len()).filter(|&i| wanted(i)).collect();
        let mut answers = Vec::with_capacity(todo.len());
        for chunk in todo.chunks(outlet.batch_size) {
            let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
            let outcomes = if last - first + 1 == chunk.len() {
                let links = self.links(linked, &leads[first..=last]);
                self.deliver(outlet, &leads[first..=last], &links).await
            } else {
                let gathered: Vec<CustomerLead> = chunk.iter().map(|&i| leads[i].clone()).collect();
                let links = self.links(linked, &gathered);
                self.deliver(outlet, &gathered, &links).await
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

    /// The outcome of a row whose customer every sink has.
    pub(super) fn delivered(&self) -> Settled {
        Settled::Delivered {
            sink: self.sink_names(),
        }
    }

    /// Hands a batch to the sink, unless the sink asked for a pause (Retry-After), and
    /// checks the sink kept its contract of one outcome per lead.
    async fn deliver(
        &self,
        outlet: &Outlet,
        leads: &[CustomerLead],
        links: &[Option<String>],
    ) -> Vec<Outcome> {
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
        let outcomes = outlet.sink.deliver_linked(leads, links).await;
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
        let links = self.links(outlet.sink.is_alert(), &leads);
        let outcomes = self.deliver(outlet, &leads, &links).await;
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
pub(super) async fn sync_all(sinks: &[Arc<dyn LeadSink>]) -> Result<(), crate::sink::SinkError> {
    for sink in sinks {
        sink.sync().await?;
    }
    Ok(())
}
