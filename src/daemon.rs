//! The daemon: builds the pipeline from the settings (source, state, sink), holds the
//! processing lease, and polls until told to stop, serving metrics and health meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Settings, SinkKind, SinkSettings, StateBackend};
use crate::pipeline::metrics::Metrics;
use crate::pipeline::Outlet;
use crate::pipeline::{log_summary, Pipeline, PollError, PollMode, PollSummary};
use crate::sink::AlertSink;
use crate::sink::{DynamicsSink, JsonlSink, LeadSink, SalesforceSink, SinkError, WebhookSink};
use crate::source::{SourceError, TableSource};
use crate::state::{Lease, RedbStore, StateError, StateStore, LEASE_CLOCK_RESOLUTION};
use crate::{service, state, timestamp};

/// How `run` behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Drain what is new once and return, instead of polling until shutdown.
    pub once: bool,
}

/// Failures that stop leadsync from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// What a run did, for the exit code and the final summary.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub polls: u64,
    pub failed_polls: u64,
    pub totals: PollSummary,
    /// Leads still not delivered after the last poll.
    pub pending: u64,
    pub last_error: Option<String>,
    /// The last attempt found another process holding the processing lease.
    pub lease_busy: bool,
    /// Who held it then, and until when by the storage service's clock.
    pub lease_holder: Option<(String, time::OffsetDateTime)>,
}

impl RunReport {
    /// 0: every row settled. 2: some leads are still pending. 3: the last poll failed.
    pub fn exit_code(&self) -> u8 {
        if self.last_error.is_some() {
            3
        } else if self.pending > 0 {
            2
        } else {
            0
        }
    }

    fn add(&mut self, s: &PollSummary) {
        let t = &mut self.totals;
        t.rows_read += s.rows_read;
        t.already_handled += s.already_handled;
        t.delivered += s.delivered;
        t.skipped += s.skipped;
        t.rejected += s.rejected;
        t.unidentifiable += s.unidentifiable;
        t.unchanged += s.unchanged;
        t.followed_up += s.followed_up;
        t.records_sent += s.records_sent;
        for (sink, sent) in &s.sent_by_sink {
            *t.sent_by_sink.entry(sink.clone()).or_default() += sent;
        }
        t.overdue = s.overdue;
        t.oldest_pending_age = s.oldest_pending_age;
        t.pages += s.pages;
        t.duration += s.duration;
        t.checkpoint = s.checkpoint.or(t.checkpoint);
        self.pending = s.pending;
    }
}

/// Builds the sink `[sink]` names (the first of `[[sinks]]`), for `check` and tests.
pub fn build_sink(settings: &Settings) -> Result<Arc<dyn LeadSink>, SinkError> {
    build_sink_of(settings.sink_list()[0], &settings.state.dir)
}

/// Builds every sink of the deployment, each with its name and batch size.
pub fn build_outlets(settings: &Settings) -> Result<Vec<Outlet>, SinkError> {
    let outlets = settings
        .sink_list()
        .into_iter()
        .map(|s| {
            let sink = build_sink_of(s, &settings.state.dir)?;
            Ok(Outlet::new(s.name(), sink, s.batch_size()))
        })
        .collect::<Result<Vec<_>, SinkError>>()?;
    // Links to CRM records are kept only for an alert sink to show.
    if outlets.iter().any(|o| o.sink.is_alert()) {
        for outlet in outlets.iter().filter(|o| !o.sink.is_alert()) {
            outlet.sink.want_links();
        }
    }
    Ok(outlets)
}

/// Builds the sink one `[sink]` (or `[[sinks]]` entry) names; `state_dir` is where
/// a sink keeps its own files (the email digest queue).
pub fn build_sink_of(
    s: &SinkSettings,
    state_dir: &std::path::Path,
) -> Result<Arc<dyn LeadSink>, SinkError> {
    let missing = |sink: &str| SinkError {
        sink: sink.into(),
        message: format!("no [sink.{sink}] section"),
    };
    Ok(match s.kind {
        SinkKind::Jsonl => Arc::new(JsonlSink::new(&s.jsonl.path)),
        SinkKind::Salesforce => Arc::new(SalesforceSink::new(
            s.salesforce.as_ref().ok_or_else(|| missing("salesforce"))?,
        )?),
        SinkKind::Dynamics => Arc::new(DynamicsSink::new(
            s.dynamics.as_ref().ok_or_else(|| missing("dynamics"))?,
        )?),
        SinkKind::Webhook => Arc::new(WebhookSink::new(
            s.webhook.as_ref().ok_or_else(|| missing("webhook"))?,
        )?),
        SinkKind::Teams => Arc::new(AlertSink::teams(
            s.teams.as_ref().ok_or_else(|| missing("teams"))?,
        )?),
        SinkKind::Slack => Arc::new(AlertSink::slack(
            s.slack.as_ref().ok_or_else(|| missing("slack"))?,
        )?),
        SinkKind::Hubspot => Arc::new(crate::sink::HubspotSink::new(
            s.hubspot.as_ref().ok_or_else(|| missing("hubspot"))?,
        )?),
        SinkKind::Marketo => Arc::new(crate::sink::MarketoSink::new(
            s.marketo.as_ref().ok_or_else(|| missing("marketo"))?,
        )?),
        SinkKind::Email => Arc::new(crate::sink::EmailSink::new(
            s.email.as_ref().ok_or_else(|| missing("email"))?,
            state_dir,
        )?),
    })
}

/// Opens the configured state store (a local file, or a table in the storage account).
pub fn open_state(settings: &Settings) -> Result<Arc<dyn StateStore>, StateError> {
    Ok(match settings.state.backend {
        StateBackend::File => Arc::new(
            RedbStore::open(&settings.state.dir)?
                .with_summary_template(&settings.identity.summary_template),
        ),
        StateBackend::Table => state::table::open(&settings.source, &settings.state)?,
    })
}

/// Opens the state and the table client, and builds the pipeline.
pub fn build_pipeline(settings: &Settings) -> Result<Pipeline, StartError> {
    let source = TableSource::connect(&settings.source)?;
    let state = open_state(settings)?;
    Ok(Pipeline {
        source,
        state,
        sinks: build_outlets(settings)?,
        policy: settings.policy.clone(),
        identity: settings.identity.clone(),
        overlap: settings.source.overlap,
        window_pages: crate::pipeline::WINDOW_PAGES,
        follow_up_warning: settings.run.follow_up_warning,
        memory: Default::default(),
    })
}

/// The longest pause between two rounds of retention.
const RETENTION_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// `host:pid:random`, unique per process.
fn lease_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// How long before the lease may expire its holder stops processing: time for a poll
/// to stop between pages once it is told to.
fn stop_margin(ttl: Duration) -> Duration {
    ttl / 6
}

/// Keeps the lease renewed, every third of `ttl`. `expires` is when the lease may end
/// at the earliest, as last confirmed: `ttl - LEASE_CLOCK_RESOLUTION` after the start
/// of the call that took or renewed it, measured on the monotonic clock (the store
/// judges expiry by the storage service's clock, never by the local wall clock).
/// Cancels `poll` when the lease was taken over, or when it was not renewed by
/// `expires - stop_margin`: a renewal still under way then (a storage service that
/// hangs, retries) is abandoned, so the holder stops before another process can take
/// the lease over, never after.
async fn renew_lease(
    state: Arc<dyn StateStore>,
    owner: String,
    ttl: Duration,
    mut expires: Instant,
    poll: CancellationToken,
) {
    let stop_at = |expires: Instant| {
        expires
            .checked_sub(stop_margin(ttl))
            .unwrap_or_else(Instant::now)
    };
    let mut next = Instant::now() + ttl / 3;
    loop {
        tokio::time::sleep_until(next.min(stop_at(expires)).into()).await;
        let asked = Instant::now();
        let deadline = stop_at(expires);
        let outcome = if asked >= deadline {
            None
        } else {
            tokio::time::timeout_at(deadline.into(), state.acquire_lease(&owner, ttl))
                .await
                .ok()
        };
        match outcome {
            Some(Ok(Lease::Held)) => {
                expires = asked + ttl.saturating_sub(LEASE_CLOCK_RESOLUTION);
                next = asked + ttl / 3;
            }
            Some(Ok(Lease::HeldBy { owner: holder, .. })) => {
                tracing::warn!(%holder, "Processing lease taken over by another leadsync; stopping this poll.");
                poll.cancel();
                return;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Cannot renew the processing lease; trying again.");
                next = Instant::now() + ttl / 10;
            }
            None => {
                tracing::warn!(
                    ttl = %humantime::format_duration(ttl),
                    "Cannot renew the processing lease before it may expire; stopping this poll."
                );
                poll.cancel();
                return;
            }
        }
    }
}

/// The processing lease, held by this process for a command beside the daemon
/// (`replay`, `dlq retry`, `dlq drop`) and kept renewed while the command runs.
pub struct LeaseHold {
    state: Arc<dyn StateStore>,
    owner: String,
    /// Cancelled when the lease was lost, or may expire before it can be renewed: the
    /// command stops working then.
    pub lost: CancellationToken,
    renewer: crate::task::AbortOnDrop<()>,
}

/// What [`LeaseHold::take`] found.
pub enum Holding {
    Held(LeaseHold),
    /// Another process holds the lease until `until` (storage service time).
    HeldBy {
        owner: String,
        until: time::OffsetDateTime,
    },
}

impl LeaseHold {
    /// Takes the processing lease for this process, as the daemon does before a poll,
    /// and keeps it renewed until [`LeaseHold::release`]. The file store's lock is held
    /// by opening the store, so there this always holds.
    pub async fn take(state: Arc<dyn StateStore>, ttl: Duration) -> Result<Holding, StateError> {
        let owner = lease_owner();
        let asked = Instant::now();
        match state.acquire_lease(&owner, ttl).await? {
            Lease::HeldBy { owner, until } => Ok(Holding::HeldBy { owner, until }),
            Lease::Held => {
                let lost = CancellationToken::new();
                let renewer = crate::task::AbortOnDrop(tokio::spawn(renew_lease(
                    state.clone(),
                    owner.clone(),
                    ttl,
                    asked + ttl.saturating_sub(LEASE_CLOCK_RESOLUTION),
                    lost.clone(),
                )));
                Ok(Holding::Held(LeaseHold {
                    state,
                    owner,
                    lost,
                    renewer,
                }))
            }
        }
    }

    /// Stops renewing and gives the lease up (if that fails, it expires by itself).
    pub async fn release(self) {
        self.renewer.0.abort();
        if let Err(e) = self.state.release_lease(&self.owner).await {
            tracing::warn!(error = %e, "Cannot release the processing lease; it expires by itself.");
        }
    }
}

/// Polls until `cancel` fires (or once, with `options.once`). A failed poll is logged and
/// retried at the next interval; only a failure to start is returned as an error.
pub async fn run(
    settings: &Settings,
    options: RunOptions,
    cancel: CancellationToken,
) -> Result<RunReport, StartError> {
    let pipeline = build_pipeline(settings)?;
    run_pipeline(&pipeline, settings, options, cancel).await
}

/// As [`run`], with a pipeline already built (tests swap parts of it).
pub async fn run_pipeline(
    pipeline: &Pipeline,
    settings: &Settings,
    options: RunOptions,
    cancel: CancellationToken,
) -> Result<RunReport, StartError> {
    tracing::info!(
        table = pipeline.source.table_name(),
        sinks = pipeline.sink_names(),
        once = options.once,
        poll_interval = %humantime::format_duration(settings.run.poll_interval),
        overlap = %humantime::format_duration(settings.source.overlap),
        "leadsync started."
    );
    let mut report = RunReport::default();
    let metrics = pipeline.memory.metrics.clone();
    serve(settings, &metrics, &cancel).await;
    let mut notified_ready = false;
    let owner = lease_owner();
    let mut retention = RetentionClock::new(settings.state.retention);
    let mut interval = tokio::time::interval(settings.run.poll_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = cancel.cancelled() => break,
        }
        let Some(asked) = take_lease(pipeline, settings, &owner, &mut report).await else {
            if options.once {
                break;
            }
            continue;
        };
        report.polls += 1;
        let result = poll_holding_lease(
            pipeline,
            settings,
            &owner,
            asked,
            &cancel,
            &mut retention,
            &mut report,
        )
        .await;
        let status = match &result {
            Ok(s) => format!(
                "last poll: {} rows read, {} delivered, {} pending",
                s.rows_read, s.delivered, s.pending
            ),
            Err(e) => format!("last poll failed: {e}"),
        };
        if notified_ready {
            service::systemd::status(&status);
        } else {
            service::systemd::ready(&status);
            notified_ready = true;
        }
        let stopping = record_result(result, &cancel, &mut report);
        if stopping || options.once || cancel.is_cancelled() {
            break;
        }
    }
    service::systemd::stopping();
    if let Err(e) = pipeline.state.release_lease(&owner).await {
        tracing::warn!(error = %e, "Cannot release the processing lease; it expires by itself.");
    }
    tracing::info!(
        polls = report.polls,
        failed_polls = report.failed_polls,
        delivered = report.totals.delivered,
        skipped = report.totals.skipped,
        rejected = report.totals.rejected,
        pending = report.pending,
        "leadsync stopped."
    );
    Ok(report)
}

/// Starts the HTTP listener when `metrics.listen` is set, and the systemd watchdog.
async fn serve(settings: &Settings, metrics: &Arc<Metrics>, cancel: &CancellationToken) {
    let ready_window = (settings.run.poll_interval * 3).max(Duration::from_secs(120));
    if let Some(listen) = &settings.metrics.listen {
        let addr = listen
            .parse()
            .expect("validated: metrics.listen is an address");
        if let Err(e) = service::serve(addr, metrics.clone(), ready_window, cancel.clone()).await {
            tracing::error!(address = %listen, error = %e, "Cannot serve metrics; continuing without them.");
        }
    }
    service::systemd::spawn_watchdog(metrics.clone(), cancel.clone());
}

/// Takes or renews the processing lease; `Some(when it was asked for)` when held. Says
/// in `report` who holds it otherwise, or why it could not be asked for.
async fn take_lease(
    pipeline: &Pipeline,
    settings: &Settings,
    owner: &str,
    report: &mut RunReport,
) -> Option<Instant> {
    let asked = Instant::now();
    match pipeline
        .state
        .acquire_lease(owner, settings.state.lease_ttl)
        .await
    {
        Ok(Lease::Held) => {
            report.lease_busy = false;
            report.lease_holder = None;
            Some(asked)
        }
        Ok(Lease::HeldBy {
            owner: holder,
            until,
        }) => {
            tracing::info!(%holder, until = %timestamp::format(until), "Another leadsync holds the processing lease; not polling.");
            report.lease_busy = true;
            report.lease_holder = Some((holder, until));
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot take the processing lease; trying again at the next interval.");
            report.last_error = Some(e.to_string());
            None
        }
    }
}

/// When the next step of `state.retention` is due. A step resumes at every poll while
/// a round is under way; a finished round waits a tenth of the retention (at most 10
/// minutes): the data it removes is days old, and each step reads state (a query per
/// partition on the table backend).
struct RetentionClock {
    pause: Duration,
    due: Instant,
}

impl RetentionClock {
    fn new(retention: Option<Duration>) -> Self {
        Self {
            pause: retention.map_or(RETENTION_PAUSE_MAX, |r| (r / 10).min(RETENTION_PAUSE_MAX)),
            due: Instant::now(),
        }
    }

    /// One bounded step of retention when it is due.
    async fn step(
        &mut self,
        pipeline: &Pipeline,
        settings: &Settings,
        checkpoint: Option<time::OffsetDateTime>,
    ) {
        if Instant::now() < self.due {
            return;
        }
        let (retention, overlap) = (settings.state.retention, settings.source.overlap);
        let complete =
            state::personal::retain(&*pipeline.state, retention, overlap, checkpoint).await;
        self.due = match complete {
            true => Instant::now() + self.pause,
            false => Instant::now(),
        };
    }
}

/// One poll while the lease is held (renewed meanwhile; losing it stops the poll
/// between pages), then a step of retention, then the metrics.
async fn poll_holding_lease(
    pipeline: &Pipeline,
    settings: &Settings,
    owner: &str,
    asked: Instant,
    cancel: &CancellationToken,
    retention: &mut RetentionClock,
    report: &mut RunReport,
) -> Result<PollSummary, PollError> {
    let ttl = settings.state.lease_ttl;
    let metrics = &pipeline.memory.metrics;
    let poll_cancel = cancel.child_token();
    let mut renewer = crate::task::AbortOnDrop(tokio::spawn(renew_lease(
        pipeline.state.clone(),
        owner.to_owned(),
        ttl,
        asked + ttl.saturating_sub(LEASE_CLOCK_RESOLUTION),
        poll_cancel.clone(),
    )));
    metrics.set_polling(true);
    // Counted as it goes: a poll that fails still reports what it delivered first.
    let mut summary = PollSummary::default();
    let result = pipeline
        .poll_counting(PollMode::default(), &poll_cancel, &mut summary)
        .await
        .map(|()| summary.clone());
    if result.is_err() {
        report.add(&summary);
    }
    // state.retention: a bounded step per poll, while the lease is held.
    if let (Ok(summary), false) = (&result, poll_cancel.is_cancelled()) {
        retention.step(pipeline, settings, summary.checkpoint).await;
    }
    // Work on the sink's own schedule (the email digest), while the lease is held.
    if !poll_cancel.is_cancelled() {
        for outlet in &pipeline.sinks {
            outlet.sink.tick().await;
        }
    }
    metrics.set_polling(false);
    renewer.0.abort();
    // Wait for it to go, so it drops its handle on the state before we return.
    let _ = (&mut renewer.0).await;
    let sinks: Vec<&str> = pipeline.sinks.iter().map(|o| o.name.as_str()).collect();
    metrics.observe_poll(&sinks, result.as_ref().map_err(|_| ()));
    result
}

/// Logs a poll's result and adds it to `report`; `true` when the daemon is stopping.
fn record_result(
    result: Result<PollSummary, PollError>,
    cancel: &CancellationToken,
    report: &mut RunReport,
) -> bool {
    match result {
        Ok(summary) => {
            log_summary(&summary);
            report.add(&summary);
            report.last_error = None;
        }
        Err(PollError::Interrupted { pages }) if !cancel.is_cancelled() => {
            tracing::warn!(
                pages,
                "Processing lease lost during a poll; the checkpoint stays where it was."
            );
            report.last_error = Some("processing lease lost".into());
        }
        Err(PollError::Interrupted { pages }) => {
            tracing::info!(
                pages,
                "Shutdown requested during a poll; the checkpoint stays where it was."
            );
            return true;
        }
        Err(e) => {
            report.failed_polls += 1;
            match &e {
                PollError::Source(s) if s.is_transient() => {
                    tracing::warn!(error = %e, "Poll failed; trying again at the next interval.")
                }
                _ => {
                    tracing::error!(error = %e, "Poll failed; trying again at the next interval.")
                }
            }
            report.last_error = Some(e.to_string());
        }
    }
    false
}
