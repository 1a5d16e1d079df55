//! The daemon's metrics: what the pipeline counts (rows by outcome, polls, pending
//! leads, sink latency and endpoint failures) and the liveness facts the watchdog
//! reads. The service serves them (`/metrics`, `/readyz`, `/status`, systemd).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::pipeline::PollSummary;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    sink: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// The daemon's metrics and liveness facts, shared by the poll loop and the listener.
pub struct Metrics {
    registry: Registry,
    rows_read: Counter,
    rows: Family<OutcomeLabels, Counter>,
    records_sent: Family<SinkLabels, Counter>,
    polls: Family<ResultLabels, Counter>,
    pending: Gauge,
    oldest_pending_age: Gauge,
    overdue: Gauge,
    poll_duration: Histogram,
    sink_latency: Family<SinkLabels, Histogram>,
    sink_retries: Counter,
    /// Pauses of the Salesforce sink for its org's daily API limit.
    api_limit_pauses: Counter,
    api_limit_pauses_seen: AtomicU64,
    long_polls: Counter,
    endpoint_failing: Family<SinkLabels, Gauge>,
    /// The last endpoint-level failure of each sink still failing, for `/readyz` and `/status`.
    endpoint_failures: Mutex<std::collections::BTreeMap<String, String>>,
    /// Unix seconds of the last poll that completed without error.
    last_ok_poll: AtomicI64,
    /// `last_ok_poll` for Prometheus: alerts on a daemon that stopped polling
    /// successfully whether its polls fail or hang.
    last_ok_poll_gauge: Gauge,
    checkpoint: Gauge,
    last_summary: Mutex<Option<PollSummary>>,
    retries_seen: AtomicU64,
    /// The row key of the last marketplace test lead seen (for `leadsync check`).
    last_test_lead: Mutex<Option<String>>,
    /// A poll is running (between polls the loop waits on a timer, which cannot hang).
    polling: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Registers `metric` under `name` and gives it back.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("leadsync");
        let r = &mut registry;
        let polls = registered(
            r,
            "polls",
            "Polls, by result (ok, failed)",
            Family::default(),
        );
        // Both series exist from the start, so that `increase()` sees the first failure
        // (a series appearing at 1 has no increase) and a rule can tell "no poll
        // failed" from "no data".
        for result in ["ok", "failed"] {
            let _ = polls.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        Self {
            rows_read: registered(r, "rows_read", "Table entities read (including re-reads of the overlap window)", Counter::default()),
            rows: registered(r, "rows", "Rows settled, by sink and outcome (delivered, skipped, rejected, unidentifiable, unchanged)", Family::default()),
            records_sent: registered(r, "records_sent", "Merged customer records the sink acknowledged", Family::default()),
            polls,
            last_ok_poll_gauge: registered(r, "last_successful_poll_timestamp_seconds", "Unix time of the last poll that completed without error (0: none yet)", Gauge::default()),
            checkpoint: registered(r, "checkpoint_timestamp_seconds", "The checkpoint after the last successful poll, as Unix time (0: none yet); it holds at the oldest waiting lead, and stands still while the table gets no new rows", Gauge::default()),
            pending: registered(r, "pending_rows", "Rows whose lead is waiting for the sink after the last poll", Gauge::default()),
            oldest_pending_age: registered(r, "oldest_undelivered_lead_age_seconds", "Age of the oldest undelivered lead, from its table Timestamp", Gauge::default()),
            overdue: registered(r, "overdue_leads", "Undelivered leads older than run.follow_up_warning", Gauge::default()),
            poll_duration: registered(r, "poll_duration_seconds", "Duration of one poll", Histogram::new(exponential_buckets(0.01, 2.0, 14))),
            sink_latency: registered(r, "sink_request_duration_seconds", "Duration of one delivery call to the sink (retries included)", Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)))),
            sink_retries: registered(r, "sink_retries", "CRM requests retried after a transient failure", Counter::default()),
            api_limit_pauses: registered(r, "sink_api_limit_pauses", "Pauses of the Salesforce sink for REQUEST_LIMIT_EXCEEDED (one per pause, sink.salesforce.api_limit_pause long)", Counter::default()),
            long_polls: registered(r, "long_polls", "Polls that took longer than half of source.overlap", Counter::default()),
            endpoint_failing: registered(r, "sink_endpoint_failing", "1 while the sink's endpoint refuses calls for a reason that is not the leads' (credentials, permissions, a wrong object or field); its leads wait", Family::default()),
            endpoint_failures: Mutex::new(Default::default()),
            api_limit_pauses_seen: AtomicU64::new(0),
            last_ok_poll: AtomicI64::new(0),
            last_summary: Mutex::new(None),
            retries_seen: AtomicU64::new(0),
            polling: std::sync::atomic::AtomicBool::new(false),
            last_test_lead: Mutex::new(None),
            registry,
        }
    }
}

impl Metrics {
    /// Records that the daemon is making progress (fed to the systemd watchdog through
    /// the process-wide heartbeat, `progress`, which the sinks and retry loops beat too).
    pub fn touch(&self) {
        crate::progress::beat();
    }

    /// Records that `sink`'s endpoint refused a call for `reason` (not the leads' fault).
    pub fn endpoint_failed(&self, sink: &str, reason: &str) {
        self.endpoint_failing
            .get_or_create(&SinkLabels { sink: sink.into() })
            .set(1);
        self.endpoint_failures
            .lock()
            .expect("not poisoned")
            .insert(sink.into(), reason.into());
    }

    /// Records that `sink`'s endpoint answered for a record again.
    pub fn endpoint_recovered(&self, sink: &str) {
        if self
            .endpoint_failures
            .lock()
            .expect("not poisoned")
            .remove(sink)
            .is_some()
        {
            self.endpoint_failing
                .get_or_create(&SinkLabels { sink: sink.into() })
                .set(0);
        }
    }

    /// The sinks whose endpoint is failing, each with its last reason.
    pub fn endpoint_failures(&self) -> Vec<(String, String)> {
        self.endpoint_failures
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(s, r)| (s.clone(), r.clone()))
            .collect()
    }

    /// Counts a poll longer than half the overlap.
    pub fn saw_long_poll(&self) {
        self.long_polls.inc();
    }

    /// Remembers the last marketplace test lead seen.
    pub fn saw_test_lead(&self, row: &crate::source::row::RowId) {
        *self.last_test_lead.lock().expect("not poisoned") = Some(row.row_key.clone());
    }

    /// Marks the start and end of a poll, for the watchdog.
    pub fn set_polling(&self, polling: bool) {
        self.touch();
        self.polling.store(polling, Ordering::Relaxed);
    }

    /// The summary of the last poll that completed without error.
    pub fn last_summary(&self) -> Option<PollSummary> {
        self.last_summary.lock().expect("not poisoned").clone()
    }

    /// The row key of the last marketplace test lead seen.
    pub fn last_test_lead(&self) -> Option<String> {
        self.last_test_lead.lock().expect("not poisoned").clone()
    }

    /// Alive: idle between polls, or a poll that made progress within `period` (a page,
    /// a batch, a CRM answer, a second of a back-off or throttle wait: `progress`).
    pub fn alive(&self, period: Duration) -> bool {
        !self.polling.load(Ordering::Relaxed)
            || crate::progress::since_last().is_some_and(|since| since <= period)
    }

    pub fn observe_sink_call(&self, sink: &str, took: Duration) {
        self.sink_latency
            .get_or_create(&SinkLabels { sink: sink.into() })
            .observe(took.as_secs_f64());
    }

    /// Counts a poll's outcome. With one sink, rows are counted under its name; with
    /// several, under `sink="all"` (a row settles once, for every sink), and each
    /// sink's acknowledged records under its own name.
    pub fn observe_poll(&self, sinks: &[&str], result: Result<&PollSummary, ()>) {
        let sink = match sinks {
            [one] => *one,
            _ => "all",
        };
        self.touch();
        let label = |r: &str| ResultLabels { result: r.into() };
        let Ok(s) = result else {
            self.polls.get_or_create(&label("failed")).inc();
            return;
        };
        self.polls.get_or_create(&label("ok")).inc();
        let now = now();
        self.last_ok_poll.store(now, Ordering::Relaxed);
        self.last_ok_poll_gauge.set(now);
        if let Some(checkpoint) = s.checkpoint {
            self.checkpoint.set(checkpoint.unix_timestamp());
        }
        self.rows_read.inc_by(s.rows_read);
        for (outcome, n) in [
            ("delivered", s.delivered),
            ("skipped", s.skipped),
            ("rejected", s.rejected),
            ("unidentifiable", s.unidentifiable),
            ("unchanged", s.unchanged),
            ("followed_up", s.followed_up),
        ] {
            self.rows
                .get_or_create(&OutcomeLabels {
                    sink: sink.into(),
                    outcome: outcome.into(),
                })
                .inc_by(n);
        }
        for name in sinks {
            let sent = s.sent_by_sink.get(*name).copied().unwrap_or(0);
            self.records_sent
                .get_or_create(&SinkLabels {
                    sink: (*name).into(),
                })
                .inc_by(sent);
        }
        self.pending.set(s.pending as i64);
        self.overdue.set(s.overdue as i64);
        self.oldest_pending_age
            .set(s.oldest_pending_age.map_or(0, |a| a.as_secs() as i64));
        self.poll_duration.observe(s.duration.as_secs_f64());
        let retries = crate::sink::http::retries_total();
        let before = self.retries_seen.swap(retries, Ordering::Relaxed);
        self.sink_retries.inc_by(retries.saturating_sub(before));
        let pauses = crate::sink::salesforce::api_limit_pauses_total();
        let before = self.api_limit_pauses_seen.swap(pauses, Ordering::Relaxed);
        self.api_limit_pauses.inc_by(pauses.saturating_sub(before));
        *self.last_summary.lock().expect("not poisoned") = Some(s.clone());
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Ready: a poll succeeded within `window`.
    pub fn ready(&self, window: Duration) -> bool {
        let last = self.last_ok_poll.load(Ordering::Relaxed);
        last > 0 && now() - last <= window.as_secs() as i64
    }
}
