//! `leadsync check`: is everything set up? Config, table, state, sink, and optionally a
//! test lead through the running daemon, the way the marketplace's "validate" does.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::config::{Settings, SinkKind, StateBackend};
use crate::identity::{CustomerKey, CustomerState, IdentitySettings};
use crate::sink::{CustomerLead, Outcome};
use crate::source::row::{RawRow, RowId};
use crate::source::{SourceError, TableSource};
use crate::state::{RedbStore, StateStore};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub ok: bool,
    pub what: &'static str,
    pub detail: String,
}

/// The report; `ok()` decides the exit code.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    fn push(&mut self, ok: bool, what: &'static str, detail: impl Into<String>) {
        self.lines.push(Line {
            ok,
            what,
            detail: detail.into(),
        });
    }

    pub fn ok(&self) -> bool {
        self.lines.iter().all(|l| l.ok)
    }

    pub fn render(&self) -> String {
        self.lines
            .iter()
            .map(|l| {
                format!(
                    "{} {:<10} {}\n",
                    if l.ok { "ok  " } else { "FAIL" },
                    l.what,
                    l.detail
                )
            })
            .collect()
    }
}

/// The columns of a marketplace-style test lead; every field carries `MSFT_TEST_<digits>`.
pub fn test_lead_row(row_key: &str, marker: &str) -> Map<String, Value> {
    let customer = json!({
        "FirstName": marker, "LastName": marker, "Email": format!("{marker}@test.com"),
        "Phone": marker, "Country": marker, "Company": marker, "Title": marker,
    });
    let row = json!({
        "PartitionKey": "leadsync-check",
        "RowKey": row_key,
        "LeadSource": format!("AzureMarketplace-INS | {marker}.{marker}"),
        "ActionCode": "INS",
        "CustomerInfo": customer.to_string(),
        "OfferDisplayName": marker,
        "Description": marker,
        "CreatedTime": crate::timestamp::format(time::OffsetDateTime::now_utc()),
    });
    match row {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Runs every check. With `send_test_lead`, writes a test lead and waits up to `wait`
/// for the running daemon to handle it.
pub async fn check(settings: &Settings, send_test_lead: bool, wait: Duration) -> Report {
    let mut report = Report::default();
    report.push(true, "config", "valid");

    let source = match TableSource::connect(&settings.source) {
        Ok(s) => Some(s),
        Err(e) => {
            report.push(false, "table", e.to_string());
            None
        }
    };
    if let Some(source) = &source {
        check_table(source, &mut report).await;
    }
    let (ok, detail) = check_state(settings).await;
    report.push(ok, "state", detail);
    check_sink(settings, &mut report).await;

    if send_test_lead {
        send_test_alerts(settings, &mut report).await;
    }
    if let (true, Some(email)) = (send_test_lead, email_sink(settings)) {
        match email.send_test_message().await {
            Ok(detail) => report.push(true, "test mail", detail),
            Err(e) => report.push(false, "test mail", e.to_string()),
        }
    }

    if send_test_lead {
        match &source {
            Some(source) => send_and_wait(settings, source, wait, &mut report).await,
            None => report.push(false, "test lead", "not sent: the table is not reachable"),
        }
    }
    report
}

/// Reads the first page of the lead table: reachable, and whether the marketplace
/// has written to it.
async fn check_table(source: &TableSource, report: &mut Report) {
    let cancel = Default::default();
    match source.fetch_page(None, None, &cancel).await {
        Ok(page) if page.rows.is_empty() && page.next.is_none() => report.push(
            true,
            "table",
            format!("{} is reachable but empty: the marketplace has not written a lead yet", source.table_name()),
        ),
        Ok(page) => {
            let newest = page.rows.iter().map(|r| r.timestamp).max();
            report.push(
                true,
                "table",
                format!(
                    "{} is reachable and the marketplace has written to it (newest row on the first page: {})",
                    source.table_name(),
                    newest.map(crate::timestamp::format).unwrap_or_else(|| "-".into())
                ),
            )
        }
        Err(SourceError::TableNotFound { table }) => report.push(
            false,
            "table",
            format!("{table} does not exist yet: the marketplace creates it with its first lead (publish the offer or press \"validate\" in Partner Center), or source.table is wrong"),
        ),
        Err(e) => report.push(false, "table", e.to_string()),
    }
}

/// Opens the state file and reads its checkpoint (a file in use by the daemon
/// passes); a state table is not opened here.
async fn check_state(settings: &Settings) -> (bool, String) {
    match settings.state.backend {
        StateBackend::File => match RedbStore::open(&settings.state.dir) {
            Ok(store) => match store.checkpoint().await {
                Ok(Some(t)) => (
                    true,
                    format!(
                        "{} (checkpoint {})",
                        settings.state.dir.display(),
                        crate::timestamp::format(t)
                    ),
                ),
                Ok(None) => (
                    true,
                    format!("{} (no checkpoint yet)", settings.state.dir.display()),
                ),
                Err(e) => (false, e.to_string()),
            },
            Err(e) if e.to_string().contains("another leadsync") => (
                true,
                format!(
                    "{} is in use by a running leadsync",
                    settings.state.dir.display()
                ),
            ),
            Err(e) => (false, e.to_string()),
        },
        StateBackend::Table => (
            true,
            format!("table {} (backend \"table\")", settings.state.table),
        ),
    }
}

/// Builds each sink and runs its healthcheck, which writes nothing; with several
/// sinks, each line names its sink.
async fn check_sink(settings: &Settings, report: &mut Report) {
    let several = settings.sink_list().len() > 1;
    for sink_settings in settings.sink_list() {
        let named = |detail: String| match several {
            true => format!("{}: {detail}", sink_settings.name()),
            false => detail,
        };
        match crate::daemon::build_sink_of(sink_settings, &settings.state.dir) {
            Ok(sink) => match sink.healthcheck().await {
                Ok(()) => report.push(
                    true,
                    "sink",
                    named(format!(
                        "{}: reachable and authorised (nothing written)",
                        sink.name()
                    )),
                ),
                Err(e) => report.push(false, "sink", named(e.to_string())),
            },
            Err(e) => report.push(false, "sink", named(e.to_string())),
        }
    }
}

/// With `--send-test-lead`: one message, marked as a marketplace test lead, through each
/// Teams or Slack sink of the deployment, so the channel shows what sales will see (the
/// test lead written to the table is skipped by `policy.test_leads`, as every test lead).
async fn send_test_alerts(settings: &Settings, report: &mut Report) {
    let alerts = settings
        .sink_list()
        .into_iter()
        .filter(|s| matches!(s.kind, SinkKind::Teams | SinkKind::Slack));
    for sink_settings in alerts {
        let name = sink_settings.name();
        let sink = match crate::daemon::build_sink_of(sink_settings, &settings.state.dir) {
            Ok(sink) => sink,
            Err(e) => {
                report.push(false, "test alert", format!("{name}: {e}"));
                continue;
            }
        };
        let lead = test_lead(&settings.identity);
        match sink.deliver(std::slice::from_ref(&lead)).await.pop() {
            Some(Outcome::Delivered) => report.push(
                true,
                "test alert",
                format!("{name}: a message marked as a test posted"),
            ),
            Some(Outcome::RetryLater { reason, .. })
            | Some(Outcome::Rejected { reason })
            | Some(Outcome::EndpointFailed { reason }) => {
                report.push(false, "test alert", format!("{name}: {reason}"))
            }
            Some(Outcome::FollowedUp { note }) => {
                report.push(true, "test alert", format!("{name}: {note}"))
            }
            None => report.push(false, "test alert", format!("{name}: no answer")),
        }
    }
}

/// A merged customer from one test row (every field the marketplace's test marker).
fn test_lead(identity: &IdentitySettings) -> CustomerLead {
    let stamp = time::OffsetDateTime::now_utc();
    let marker = format!("MSFT_TEST_{}", stamp.unix_timestamp());
    let row = RawRow {
        id: RowId::new(
            "leadsync-check",
            format!("check-alert-{}", stamp.unix_timestamp()),
        ),
        etag: crate::source::row::standard_etag(stamp),
        timestamp: stamp,
        columns: test_lead_row("check-alert", &marker),
    };
    let event = crate::lead::normalise(&row).expect("the test row is a lead");
    let key = CustomerKey::Email(format!("{}@test.com", marker.to_lowercase()));
    let mut state = CustomerState::new(&key, identity);
    state.apply([&event], identity);
    state.lead
}

/// The email sink, when it is one of the deployment's (it can send a test message itself).
fn email_sink(settings: &Settings) -> Option<crate::sink::EmailSink> {
    let s = settings
        .sink_list()
        .into_iter()
        .find(|s| s.kind == crate::config::SinkKind::Email)?;
    crate::sink::EmailSink::new(s.email.as_ref()?, &settings.state.dir).ok()
}

async fn send_and_wait(
    settings: &Settings,
    source: &TableSource,
    wait: Duration,
    report: &mut Report,
) {
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let marker = format!("MSFT_TEST_{stamp}");
    let row_key = format!("check-{stamp}");
    if let Err(e) = source.create_table_if_missing().await {
        report.push(false, "test lead", format!("cannot create the table: {e}"));
        return;
    }
    if let Err(e) = source
        .upsert_entity(&test_lead_row(&row_key, &marker))
        .await
    {
        report.push(
            false,
            "test lead",
            format!("cannot write the test lead: {e}"),
        );
        return;
    }
    let deadline = Instant::now() + wait;
    let http = reqwest::Client::new();
    loop {
        if handled(settings, &http, &row_key).await {
            report.push(
                true,
                "test lead",
                format!("written as RowKey {row_key} and handled by the daemon"),
            );
            return;
        }
        if Instant::now() >= deadline {
            report.push(
                false,
                "test lead",
                format!(
                    "written as RowKey {row_key}, not handled within {}: is `leadsync run` running{}?",
                    humantime::format_duration(wait),
                    if settings.metrics.listen.is_none() { " (set metrics.listen so check can ask it)" } else { "" }
                ),
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Asks the daemon (its /status, when it listens) or the state whether the row was handled.
async fn handled(settings: &Settings, http: &reqwest::Client, row_key: &str) -> bool {
    if let Some(listen) = &settings.metrics.listen {
        let url = format!("http://{listen}/status");
        if let Ok(response) = http.get(url).timeout(Duration::from_secs(5)).send().await {
            if let Ok(status) = response.json::<Value>().await {
                return status["last_test_lead"] == row_key;
            }
        }
        return false;
    }
    let store: Option<std::sync::Arc<dyn StateStore>> = match settings.state.backend {
        StateBackend::File => RedbStore::open(&settings.state.dir)
            .ok()
            .map(|s| std::sync::Arc::new(s) as std::sync::Arc<dyn StateStore>),
        StateBackend::Table => crate::state::table::open(&settings.source, &settings.state).ok(),
    };
    let Some(store) = store else { return false };
    let mut rows = store.skipped().await.unwrap_or_default();
    rows.extend(store.rejected().await.unwrap_or_default());
    let found = rows.iter().any(|r| r.row.id.row_key == row_key);
    found
        || store
            .all_customers()
            .await
            .unwrap_or_default()
            .iter()
            .any(|c| c.lead.history.iter().any(|h| h.row.row_key == row_key))
}
