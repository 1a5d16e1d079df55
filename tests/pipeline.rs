//! The pipeline end to end against a real Azurite: incremental reads, restarts,
//! paging, the overlap window, changed rows, hostile rows.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{customer, lead_row, many_rows, Backend, World};
use leadsync::pipeline::{Pipeline, PollError};
use leadsync::sink::{CustomerLead, JsonlSink, LeadSink, Outcome, SinkError};
use leadsync::source::row::RowId;
use leadsync::state::{RowVersion, SettleBatch, Settled, Settlement, StateStore};
use leadsync::{build_pipeline, RunOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Each test named runs twice: `file::<name>` on the file store, `table::<name>` on the
/// table store (`state.backend = "table"`), against the same Azurite-backed world.
macro_rules! over_both_backends {
    ($($name:ident),* $(,)?) => {
        mod file {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::File).await
            })*
        }
        mod table {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Table).await
            })*
        }
    };
}

over_both_backends!(
    rows_inserted_between_two_runs_are_delivered_exactly_once_each,
    more_than_a_thousand_rows_across_partitions_arrive_exactly_once,
    small_pages_follow_every_continuation_to_the_end,
    a_row_that_becomes_visible_after_a_later_row_was_read_is_still_delivered,
    a_row_updated_after_delivery_is_handled_again,
    hostile_and_odd_rows_each_get_their_stated_outcome,
    the_checkpoint_holds_while_the_sink_is_down_and_leads_arrive_once_it_is_back,
    leads_the_sink_cannot_make_durable_are_not_committed_and_are_delivered_again,
    a_customer_on_consecutive_pages_of_one_poll_keeps_every_event,
    a_customer_seen_again_pages_later_keeps_every_event_and_an_interrupted_poll_keeps_its_pages,
    a_customer_whose_rows_span_the_pages_of_a_window_is_sent_once_with_all_of_them,
);

async fn run_once(world: &World) -> leadsync::RunReport {
    let settings = world.settings();
    common::run_once(&settings).await
}

fn assert_each_once(keys: &[(String, String)]) {
    let unique: HashSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "some lead was delivered twice");
}

async fn rows_inserted_between_two_runs_are_delivered_exactly_once_each(backend: Backend) {
    let world = World::with_backend(backend).await;
    world.insert(&many_rows(5, 2)).await;

    let first = run_once(&world).await;
    let more: Vec<_> = (5..9)
        .map(|i| {
            lead_row(
                "p00",
                &format!("r{i:06}"),
                "AzureMarketplace-INS | contoso.analytics",
                customer(i),
            )
        })
        .collect();
    world.insert(&more).await;
    let second = run_once(&world).await;
    let third = run_once(&world).await;

    assert_eq!(first.totals.delivered, 5);
    assert_eq!(second.totals.delivered, 4);
    assert_eq!(
        third.totals.delivered, 0,
        "a restart with nothing new delivers nothing"
    );
    assert!(
        third.totals.already_handled >= 9,
        "the overlap window was re-read"
    );
    let keys = world.delivered_keys();
    assert_eq!(keys.len(), 9);
    assert_each_once(&keys);
    assert_eq!(third.exit_code(), 0);
}

async fn more_than_a_thousand_rows_across_partitions_arrive_exactly_once(backend: Backend) {
    let world = World::with_backend(backend).await;
    world.insert(&many_rows(1_234, 7)).await;

    let report = run_once(&world).await;

    assert_eq!(report.totals.rows_read, 1_234);
    assert!(report.totals.pages >= 2, "the read followed continuations");
    let keys = world.delivered_keys();
    assert_eq!(keys.len(), 1_234);
    assert_each_once(&keys);
}

async fn small_pages_follow_every_continuation_to_the_end(backend: Backend) {
    let world = World::with_backend(backend).await;
    world.insert(&many_rows(250, 5)).await;
    let settings = world.settings_with("page_size = 7");

    let report = leadsync::run(
        &settings,
        RunOptions { once: true },
        CancellationToken::new(),
    )
    .await
    .unwrap();

    assert!(report.totals.pages >= 36, "pages: {}", report.totals.pages);
    let keys = world.delivered_keys();
    assert_eq!(keys.len(), 250);
    assert_each_once(&keys);
}

async fn a_row_that_becomes_visible_after_a_later_row_was_read_is_still_delivered(
    backend: Backend,
) {
    // Arrange: `late` is stamped before `seen`, but a previous poll only saw `seen` and
    // moved the checkpoint to its Timestamp, past `late` (the cross-partition race).
    let world = World::with_backend(backend).await;
    world
        .insert(&[lead_row(
            "pa",
            "late",
            "AzureMarketplace-INS | a.b",
            customer(1),
        )])
        .await;
    world
        .insert(&[lead_row(
            "pb",
            "seen",
            "AzureMarketplace-INS | a.b",
            customer(2),
        )])
        .await;
    let source = world.source();
    let page = source
        .fetch_page(None, None, &CancellationToken::new())
        .await
        .unwrap();
    let seen = page.rows.iter().find(|r| r.id.row_key == "seen").unwrap();
    let late = page.rows.iter().find(|r| r.id.row_key == "late").unwrap();
    assert!(late.timestamp < seen.timestamp);
    {
        // As a poll that delivered `seen` leaves it: its outcome, and its customer with
        // the row in the history.
        let identity = world.settings().identity;
        let event = leadsync::lead::normalise(seen).unwrap();
        let key = leadsync::identity::customer_key(&event.customer, identity.fallback).unwrap();
        let mut customer = leadsync::identity::CustomerState::new(&key, &identity);
        customer.apply([&event], &identity);
        customer.delivered = true;
        let mut batch = SettleBatch::rows(vec![Settlement {
            row: RowVersion {
                id: seen.id.clone(),
                etag: seen.etag.clone(),
                timestamp: seen.timestamp,
            },
            outcome: Settled::Delivered {
                sink: "jsonl".into(),
            },
            columns: None,
        }]);
        batch.customers.push(customer);
        let state = world.state();
        state.settle(&batch).await.unwrap();
        state.set_checkpoint(seen.timestamp).await.unwrap();
    }

    // Act
    let report = run_once(&world).await;

    // Assert: the overlap window brought `late` back; `seen` was not sent again.
    assert_eq!(report.totals.delivered, 1);
    assert_eq!(
        world.delivered_keys(),
        vec![("pa".to_owned(), "late".to_owned())]
    );
}

async fn a_row_updated_after_delivery_is_handled_again(backend: Backend) {
    let world = World::with_backend(backend).await;
    world
        .insert(&[lead_row(
            "p",
            "r1",
            "AzureMarketplace-PLT | a.b",
            customer(1),
        )])
        .await;
    run_once(&world).await;

    world
        .insert(&[lead_row(
            "p",
            "r1",
            "AzureMarketplace-INS | a.b",
            customer(1),
        )])
        .await;
    let second = run_once(&world).await;

    assert_eq!(second.totals.delivered, 1);
    let leads = world.delivered();
    assert_eq!(leads.len(), 2);
    assert_eq!(leads[0]["stage"], "initial_interest");
    assert_eq!(leads[1]["stage"], "active");
}

async fn hostile_and_odd_rows_each_get_their_stated_outcome(backend: Backend) {
    let world = World::with_backend(backend).await;
    let long_company = "C".repeat(5_000);
    let hostile = json!({
        "FirstName": "O'Brien \"Bobby\"",
        "LastName": "<script>alert(1)</script>",
        "Email": "  Bobby@Example.COM ",
        "Company": long_company,
        "Title": "\u{202E}evil\u{202C} CTO",
    });
    let mut malformed = lead_row("p", "malformed", "AzureMarketplace-INS | a.b", json!({}));
    malformed.insert("CustomerInfo".into(), json!("{not json"));
    let rows = vec![
        malformed,
        lead_row("p", "empty", "AzureMarketplace-INS | a.b", json!({})),
        lead_row(
            "p",
            "test",
            "AzureMarketplace-INS | a.b",
            json!({"FirstName": "MSFT_TEST_636737558587117715", "Email": "MSFT_TEST_636737558587117715@x.com"}),
        ),
        lead_row("p", "dnc", "AppSource (SPZA)-DNC | a.b", customer(3)),
        lead_row(
            "p",
            "unknown",
            "SomeNewSource-Teleport | pub.offer-1",
            customer(4),
        ),
        lead_row("p", "hostile", "AzureMarketplace-INS | a.b", hostile),
    ];
    world.insert(&rows).await;

    let report = run_once(&world).await;

    assert_eq!(report.totals.rejected, 1);
    assert_eq!(report.totals.skipped, 2, "test lead and do-not-contact");
    assert_eq!(report.totals.unidentifiable, 1, "the empty customer");
    assert_eq!(report.totals.delivered, 2);
    assert_eq!(report.exit_code(), 0, "every row is settled");

    let state = world.state();
    let rejected = state.rejected().await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].row.id, RowId::new("p", "malformed"));
    let Settled::Rejected { reason } = &rejected[0].outcome else {
        panic!("not a rejection")
    };
    assert!(
        reason.contains("malformed") && reason.contains("CustomerInfo"),
        "{reason}"
    );
    let skipped: HashSet<_> = state
        .skipped()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.row.id.row_key, r.outcome))
        .collect();
    assert!(skipped.contains(&(
        "test".into(),
        Settled::Skipped {
            policy: "test_lead".into()
        }
    )));
    assert!(skipped.contains(&(
        "dnc".into(),
        Settled::Skipped {
            policy: "do_not_contact".into()
        }
    )));

    let leads = world.delivered();
    let by_key = |rk: &str| {
        leads
            .iter()
            .find(|l| l["history"][0]["row"]["row_key"] == rk)
            .unwrap_or_else(|| panic!("{rk} delivered"))
    };
    let unknown = by_key("unknown");
    assert_eq!(unknown["history"][0]["source"], "SomeNewSource");
    assert_eq!(unknown["history"][0]["action"], "Teleport");
    assert_eq!(unknown["stage"], "unknown");
    let hostile = by_key("hostile");
    assert_eq!(
        hostile["customer"]["company"].as_str().unwrap().len(),
        5_000
    );
    assert_eq!(hostile["customer"]["first_name"], "O'Brien \"Bobby\"");
    assert_eq!(
        hostile["customer"]["last_name"],
        "<script>alert(1)</script>"
    );
    assert_eq!(hostile["customer"]["title"], "\u{202E}evil\u{202C} CTO");
    assert_eq!(
        hostile["customer"]["email"]["normalized"],
        "bobby@example.com"
    );
    let held = state.unidentifiable().await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].row.id, RowId::new("p", "empty"));
}

/// A sink that is down until told otherwise, then delegates to the JSONL sink; its
/// `sync` fails while `syncs` is false (a full disk).
struct FlakySink {
    up: AtomicBool,
    syncs: AtomicBool,
    inner: JsonlSink,
}

#[async_trait::async_trait]
impl LeadSink for FlakySink {
    fn name(&self) -> &str {
        "flaky"
    }
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        if self.up.load(Ordering::SeqCst) {
            self.inner.deliver(batch).await
        } else {
            vec![
                Outcome::RetryLater {
                    after: None,
                    reason: "503 Service Unavailable".into()
                };
                batch.len()
            ]
        }
    }
    async fn sync(&self) -> Result<(), SinkError> {
        if !self.syncs.load(Ordering::SeqCst) {
            return Err(SinkError {
                sink: "flaky".into(),
                message: "cannot sync leads.jsonl: No space left on device".into(),
            });
        }
        self.inner.sync().await
    }
    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A table of 3 new rows, and a pipeline on `backend` delivering them through a [`FlakySink`].
async fn flaky_world(backend: Backend, up: bool, syncs: bool) -> (World, Arc<FlakySink>, Pipeline) {
    let world = World::with_backend(backend).await;
    world.insert(&many_rows(3, 1)).await;
    let sink = Arc::new(FlakySink {
        up: AtomicBool::new(up),
        syncs: AtomicBool::new(syncs),
        inner: JsonlSink::new(&world.output()),
    });
    let built = build_pipeline(&world.settings()).unwrap();
    let pipeline = built.with_sink(sink.clone());
    (world, sink, pipeline)
}

async fn the_checkpoint_holds_while_the_sink_is_down_and_leads_arrive_once_it_is_back(
    backend: Backend,
) {
    let (world, sink, pipeline) = flaky_world(backend, false, true).await;
    let cancel = CancellationToken::new();

    let down = pipeline.poll(&cancel).await.unwrap();
    assert_eq!((down.delivered, down.pending), (0, 3));
    assert_eq!(down.checkpoint, None, "no settled row, no checkpoint");
    assert!(world.delivered().is_empty());

    world
        .insert(&[lead_row(
            "p00",
            "later",
            "AzureMarketplace-INS | a.b",
            customer(9),
        )])
        .await;
    let still_down = pipeline.poll(&cancel).await.unwrap();
    assert_eq!(still_down.pending, 4);

    sink.up.store(true, Ordering::SeqCst);
    let back = pipeline.poll(&cancel).await.unwrap();
    assert_eq!((back.delivered, back.pending), (4, 0));
    assert!(back.checkpoint.is_some());
    let keys = world.delivered_keys();
    assert_eq!(keys.len(), 4);
    assert_each_once(&keys);
}

async fn leads_the_sink_cannot_make_durable_are_not_committed_and_are_delivered_again(
    backend: Backend,
) {
    let (world, sink, pipeline) = flaky_world(backend, true, false).await;
    let cancel = CancellationToken::new();

    let failed = pipeline.poll(&cancel).await.unwrap_err();
    assert!(matches!(failed, PollError::Sink(_)), "{failed:?}");
    let message = failed.to_string();
    assert!(
        message.contains("No space left on device") && message.contains("delivered again"),
        "{message}"
    );
    assert_eq!(pipeline.state.checkpoint().await.unwrap(), None);
    assert_eq!(pipeline.state.handled_len().await.unwrap(), 0);

    sink.syncs.store(true, Ordering::SeqCst);
    let again = pipeline.poll(&cancel).await.unwrap();
    assert_eq!(again.delivered, 3);
    assert!(again.checkpoint.is_some());
    // The file has the three records twice (the first, unsynced attempt stayed in it):
    // upserts of the same customers, never a lead lost.
    let keys = world.delivered_keys();
    assert_eq!(keys.len(), 6);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 3);
    let settled = pipeline.poll(&cancel).await.unwrap();
    assert_eq!((settled.delivered, settled.already_handled), (0, 3));
}

#[tokio::test]
async fn a_missing_table_fails_the_poll_with_a_clear_error_and_a_nonzero_exit() {
    let world = World::new().await;
    let text = world
        .toml("")
        .replace("table = \"MarketplaceLeads\"", "table = \"NoSuchTable\"");
    let settings = leadsync::config::Settings::from_toml_with_env(
        &text,
        std::path::Path::new("t.toml"),
        &Default::default(),
    )
    .unwrap();

    let report = leadsync::run(
        &settings,
        RunOptions { once: true },
        CancellationToken::new(),
    )
    .await
    .unwrap();

    assert_eq!(report.exit_code(), 3);
    assert!(report.last_error.unwrap().contains("NoSuchTable"));
}

/// A state store whose commits take a while, so that the next page is merged while the
/// previous one is still being committed.
struct SlowCommits(Arc<dyn StateStore>);

#[async_trait::async_trait]
impl StateStore for SlowCommits {
    async fn checkpoint(
        &self,
    ) -> Result<Option<time::OffsetDateTime>, leadsync::state::StateError> {
        self.0.checkpoint().await
    }
    async fn set_checkpoint(
        &self,
        t: time::OffsetDateTime,
    ) -> Result<(), leadsync::state::StateError> {
        self.0.set_checkpoint(t).await
    }
    async fn handled(&self, rows: &[RowVersion]) -> Result<Vec<bool>, leadsync::state::StateError> {
        self.0.handled(rows).await
    }
    async fn settle(&self, batch: &SettleBatch) -> Result<(), leadsync::state::StateError> {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        self.0.settle(batch).await
    }
    async fn acquire_lease(
        &self,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<leadsync::state::Lease, leadsync::state::StateError> {
        self.0.acquire_lease(owner, ttl).await
    }
    async fn release_lease(&self, owner: &str) -> Result<(), leadsync::state::StateError> {
        self.0.release_lease(owner).await
    }
    async fn dead_letters(
        &self,
    ) -> Result<Vec<leadsync::state::DeadLetter>, leadsync::state::StateError> {
        self.0.dead_letters().await
    }
    async fn customers(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<leadsync::identity::CustomerState>>, leadsync::state::StateError> {
        self.0.customers(keys).await
    }
    async fn all_customers(
        &self,
    ) -> Result<Vec<leadsync::identity::CustomerState>, leadsync::state::StateError> {
        self.0.all_customers().await
    }
    async fn unidentifiable(
        &self,
    ) -> Result<Vec<leadsync::state::RecordedRow>, leadsync::state::StateError> {
        self.0.unidentifiable().await
    }
    async fn prune_handled(
        &self,
        before: time::OffsetDateTime,
    ) -> Result<usize, leadsync::state::StateError> {
        self.0.prune_handled(before).await
    }
    async fn handled_len(&self) -> Result<u64, leadsync::state::StateError> {
        self.0.handled_len().await
    }
    async fn rejected(
        &self,
    ) -> Result<Vec<leadsync::state::RecordedRow>, leadsync::state::StateError> {
        self.0.rejected().await
    }
    async fn skipped(
        &self,
    ) -> Result<Vec<leadsync::state::RecordedRow>, leadsync::state::StateError> {
        self.0.skipped().await
    }
    async fn forget(
        &self,
        person: &leadsync::state::personal::Person,
    ) -> Result<leadsync::state::personal::Forgotten, leadsync::state::StateError> {
        self.0.forget(person).await
    }
    async fn prune_older_than(
        &self,
        before: time::OffsetDateTime,
        step: usize,
    ) -> Result<leadsync::state::personal::Pruned, leadsync::state::StateError> {
        self.0.prune_older_than(before, step).await
    }
}

async fn a_customer_on_consecutive_pages_of_one_poll_keeps_every_event(backend: Backend) {
    // Page k+1 is merged while page k is still being committed: the merge must start
    // from page k's record, not from what the store held before it.
    let world = World::with_backend(backend).await;
    let actions = [
        "AppSource-PLT | a.b",
        "TestDrive-StartTestDrive | a.b",
        "AzureMarketplace-INS | a.b",
        "AzureMarketplace-Create | a.c",
    ];
    let mut rows = Vec::new();
    for round in 0..4 {
        for (n, action) in actions.iter().enumerate() {
            // Customer n's events sit on pages 2 apart at page_size 2 (two customers a page).
            let rk = format!("r{round}-{n}");
            rows.push(lead_row("p", &rk, action, customer(n % 2)));
        }
    }
    world.insert(&rows).await;
    let settings = world.settings_with("page_size = 2");
    let built = build_pipeline(&settings).unwrap();
    let pipeline = Pipeline {
        state: Arc::new(SlowCommits(built.state.clone())),
        ..built
    };

    let summary = pipeline.poll(&CancellationToken::new()).await.unwrap();

    assert_eq!(summary.pages, 8);
    assert_eq!(summary.delivered, 16);
    let latest = world.latest_records();
    assert_eq!(latest.len(), 2, "{latest:?}");
    for record in latest.values() {
        assert_eq!(
            record["history"].as_array().unwrap().len(),
            8,
            "every event of the customer is in its last record: {record}"
        );
        assert_eq!(record["stage"], "active");
    }
    // Each delivery carries one more event than the one before: no page started from
    // a record older than the previous page's.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for record in world.delivered() {
        let n = record["history"].as_array().unwrap().len();
        let last = seen.insert(record["external_key"].as_str().unwrap().into(), n);
        assert!(last.is_none_or(|l| n > l), "{last:?} then {n}");
    }
}

async fn a_customer_seen_again_pages_later_keeps_every_event_and_an_interrupted_poll_keeps_its_pages(
    backend: Backend,
) {
    // Customers 0 and 1 on pages 1 and 3, 2 and 3 on page 2 (page_size 2): page 3 is
    // merged while page 1 may still be held uncommitted by the store, with page 2's
    // batch (not page 1's) the one the merge lays over the store's records.
    let world = World::with_backend(backend).await;
    let plan = [
        (0, "AppSource-PLT | a.b"),
        (1, "AppSource-PLT | a.b"),
        (2, "AppSource-PLT | a.b"),
        (3, "AppSource-PLT | a.b"),
        (0, "AzureMarketplace-INS | a.b"),
        (1, "AzureMarketplace-INS | a.b"),
    ];
    let rows: Vec<_> = plan
        .iter()
        .enumerate()
        .map(|(i, (n, action))| lead_row("p", &format!("r{i}"), action, customer(*n)))
        .collect();
    world.insert(&rows).await;
    let pipeline = build_pipeline(&world.settings_with("page_size = 2")).unwrap();

    let summary = pipeline.poll(&CancellationToken::new()).await.unwrap();

    assert_eq!((summary.pages, summary.delivered), (3, 6));
    let latest = world.latest_records();
    assert_eq!(latest.len(), 4, "{latest:?}");
    for n in [0, 1] {
        let record = latest
            .values()
            .find(|r| r.to_string().contains(&format!("customer{n}@contoso.com")))
            .unwrap();
        assert_eq!(
            record["history"].as_array().unwrap().len(),
            2,
            "page 3 merged into page 1's record: {record}"
        );
    }
    // Every customer is in the file, committed, not only held.
    assert_eq!(pipeline.state.all_customers().await.unwrap().len(), 4);

    // A poll stopped after its first page of three: that page's outcomes are committed
    // (the store may have held them), so they are not delivered again.
    let more: Vec<_> = (0..6)
        .map(|i| {
            lead_row(
                "q",
                &format!("s{i}"),
                "AppSource-PLT | a.b",
                customer(10 + i),
            )
        })
        .collect();
    world.insert(&more).await;
    let cancel = CancellationToken::new();
    let stopping = StopAfterFirstPage {
        sink: pipeline.sinks[0].sink.clone(),
        cancel: cancel.clone(),
    };
    // One page per delivery window, so that the stop falls between two flushes.
    let stopped = Pipeline {
        window_pages: 1,
        ..pipeline.with_sink(Arc::new(stopping))
    };
    let failed = stopped.poll(&cancel).await.unwrap_err();
    assert!(
        matches!(failed, PollError::Interrupted { .. }),
        "{failed:?}"
    );
    // The first page of the new rows was delivered: its two customers are committed.
    let committed = stopped.state.all_customers().await.unwrap().len();
    assert_eq!(committed, 6, "the page before the stop was committed");
    assert_eq!(
        stopped.state.checkpoint().await.unwrap(),
        summary.checkpoint
    );
}

/// A sink that requests shutdown once it has taken a batch of leads.
struct StopAfterFirstPage {
    sink: Arc<dyn LeadSink>,
    cancel: CancellationToken,
}

#[async_trait::async_trait]
impl LeadSink for StopAfterFirstPage {
    fn name(&self) -> &str {
        self.sink.name()
    }
    async fn deliver(&self, leads: &[CustomerLead]) -> Vec<Outcome> {
        let outcomes = self.sink.deliver(leads).await;
        if !leads.is_empty() {
            self.cancel.cancel();
        }
        outcomes
    }
    async fn sync(&self) -> Result<(), SinkError> {
        self.sink.sync().await
    }
    async fn healthcheck(&self) -> Result<(), SinkError> {
        self.sink.healthcheck().await
    }
}

/// Twelve customers, each with a row on four of the poll's 12 pages (page_size 4),
/// twelve rows apart: in one window of all the pages each is sent once, with its four
/// events; with windows of six pages, every customer has rows on both sides of the
/// edge and is sent once per window, its last record still holding all four.
async fn a_customer_whose_rows_span_the_pages_of_a_window_is_sent_once_with_all_of_them(
    backend: Backend,
) {
    let world = World::with_backend(backend).await;
    let actions = [
        "AppSource-PLT | a.b",
        "AzureMarketplace-INS | a.b",
        "AzureMarketplace-StartTestDrive | a.b",
        "AzureMarketplace-INS | c.d",
        "AzureMarketplace-Create | a.b",
    ];
    // Row i belongs to customer i % 12: customer n's rows are on pages n/4, n/4 + 3, ...
    let rows: Vec<_> = (0..48)
        .map(|i| lead_row("p", &format!("r{i:03}"), actions[i / 12], customer(i % 12)))
        .collect();
    world.insert(&rows).await;
    let settings = world.settings_with("page_size = 4");
    let sent = Arc::new(common::MemorySink::default());
    let built = build_pipeline(&settings).unwrap();
    let pipeline = built.with_sink(sent.clone());

    let summary = pipeline.poll(&CancellationToken::new()).await.unwrap();

    assert_eq!((summary.pages, summary.delivered), (12, 48));
    assert_eq!(summary.records_sent, 12, "one record per customer");
    let deliveries = sent.deliveries.lock().unwrap().clone();
    assert_eq!(deliveries.len(), 12);
    assert!(deliveries.values().all(|n| *n == 1), "{deliveries:?}");
    for record in sent.records.lock().unwrap().values() {
        assert_eq!(record.history.len(), 4, "{:?}", record.key);
    }

    // The same table from scratch, with windows of six pages: two flushes.
    let edge = World::with_backend(backend).await;
    edge.insert(&rows).await;
    let sent = Arc::new(common::MemorySink::default());
    let built = build_pipeline(&edge.settings_with("page_size = 4")).unwrap();
    let pipeline = Pipeline {
        window_pages: 6,
        ..built.with_sink(sent.clone())
    };
    let summary = pipeline.poll(&CancellationToken::new()).await.unwrap();
    assert_eq!(summary.delivered, 48);
    assert_eq!(summary.records_sent, 24, "each customer once per window");
    for record in sent.records.lock().unwrap().values() {
        assert_eq!(
            record.history.len(),
            4,
            "the second window's record has them all"
        );
    }
}
