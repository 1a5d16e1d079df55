//! The state store in an Azure table (`state.backend = "table"`), against a real Azurite:
//! the same semantics as the file store, the pipeline on it, and the processing lease
//! between stores and between whole daemons.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{customer, lead_row, Backend, World};
use futures::StreamExt;
use leadsync::config::{IdentitySettings, Settings};
use leadsync::identity::{CustomerKey, CustomerState};
use leadsync::lead::normalise;
use leadsync::sink::{CustomerLead, LeadSink, Outcome, SinkError};
use leadsync::source::row::{RawRow, RowId};
use leadsync::state::table as state_table;
use leadsync::state::{
    DeadLetter, Lease, RowVersion, SettleBatch, Settled, Settlement, StateStore,
};
use leadsync::timestamp::parse;
use leadsync::RunOptions;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

const STATE_TABLE: &str = "LeadsyncState";

fn table_toml(world: &World, sink: &str) -> String {
    world.toml_with_sink("", sink).replace(
        "[state]\n",
        "[state]\nbackend = \"table\"\nlease_ttl = \"5s\"\n",
    )
}

fn jsonl_sink(world: &World) -> String {
    format!(
        "[sink]\nkind = \"jsonl\"\njsonl = {{ path = \"{}\" }}\n",
        world.output().display()
    )
}

fn table_settings(world: &World) -> Settings {
    let text = table_toml(world, &jsonl_sink(world));
    Settings::from_toml_with_env(&text, Path::new("test.toml"), &HashMap::new())
        .unwrap_or_else(|e| panic!("test settings are invalid: {e}"))
}

fn store(settings: &Settings) -> Arc<dyn StateStore> {
    state_table::open(&settings.source, &settings.state).expect("open the table store")
}

fn version(pk: &str, rk: &str, etag: &str, ts: &str) -> RowVersion {
    RowVersion {
        id: RowId::new(pk, rk),
        etag: etag.into(),
        timestamp: parse(ts).unwrap(),
    }
}

fn settled(row: RowVersion, outcome: Settled) -> Settlement {
    let columns = match outcome {
        Settled::Delivered { .. } => None,
        _ => Some(Map::from_iter([("Note".to_owned(), json!("kept"))])),
    };
    Settlement {
        row,
        outcome,
        columns,
    }
}

fn delivered() -> Settled {
    Settled::Delivered {
        sink: "jsonl".into(),
    }
}

fn rejected(reason: &str) -> Settled {
    Settled::Rejected {
        reason: reason.into(),
    }
}

/// A merged customer of `events` rows, as the pipeline would store it.
fn merged_customer(n: usize, events: usize) -> CustomerState {
    let identity = IdentitySettings::default();
    let events: Vec<_> = (0..events)
        .map(|i| {
            let mut columns = lead_row(
                "p",
                &format!("r{n}-{i:05}"),
                if i % 2 == 0 {
                    "AzureMarketplace-INS | contoso.analytics"
                } else {
                    "AppSource-PLT | contoso.insights"
                },
                customer(n),
            );
            columns.remove("PartitionKey");
            columns.remove("RowKey");
            columns.insert(
                "Description".into(),
                json!(format!("Event {i} for customer {n}: interested in a demo")),
            );
            let row = RawRow {
                id: RowId::new("p", format!("r{n}-{i:05}")),
                etag: format!("W/\"datetime'{i}'\""),
                timestamp: parse("2024-05-01T10:00:00.1234567Z").unwrap()
                    + Duration::from_millis(i as u64),
                columns,
            };
            normalise(&row).expect("a valid lead row")
        })
        .collect();
    let key = CustomerKey::Email(format!("customer{n}@contoso.com"));
    let mut state = CustomerState::new(&key, &identity);
    state.apply(events.iter(), &identity);
    state
}

fn dead_letter(customer: &CustomerState, reason: &str) -> DeadLetter {
    DeadLetter {
        id: customer.lead.external_key.clone(),
        sink: "salesforce".into(),
        reason: reason.into(),
        payload: customer.lead.clone(),
        rows: vec![version("p", "r1", "W/1", "2024-05-01T10:00:00Z")],
        at: parse("2024-05-01T10:05:00.0000001Z").unwrap(),
        attempts: 1,
    }
}

/// Every entity of the state table in one partition, raw.
async fn raw_partition(settings: &Settings, pk: &str) -> Vec<Map<String, Value>> {
    let service = leadsync::source::service_client(&settings.source).unwrap();
    let mut stream = service
        .table_client(STATE_TABLE)
        .query()
        .filter(format!("PartitionKey eq '{pk}'"))
        .into_stream::<Map<String, Value>>();
    let mut out = Vec::new();
    while let Some(page) = stream.next().await {
        out.extend(page.expect("query the state table").entities);
    }
    out
}

#[tokio::test]
async fn the_checkpoint_round_trips_at_full_precision_through_the_table() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let first = store(&settings);
    let t1 = parse("2024-05-01T10:00:00.1234567Z").unwrap();
    let t2 = parse("2024-05-01T10:00:00.1234568Z").unwrap();

    // Act
    let before = first.checkpoint().await.unwrap();
    first.set_checkpoint(t1).await.unwrap();
    let read_back = store(&settings).checkpoint().await.unwrap();
    first.set_checkpoint(t2).await.unwrap();

    // Assert
    assert_eq!(before, None);
    assert_eq!(read_back, Some(t1));
    assert_eq!(store(&settings).checkpoint().await.unwrap(), Some(t2));
    let meta = raw_partition(&settings, "meta").await;
    assert_eq!(meta.len(), 1);
    assert_eq!(meta[0]["Checkpoint"], "2024-05-01T10:00:00.1234568Z");
}

#[tokio::test]
async fn a_row_is_handled_only_at_the_etag_it_was_settled_with() {
    // Arrange
    let world = World::new().await;
    let store = store(&table_settings(&world));
    let v1 = version("p", "r", "W/1", "2024-05-01T10:00:00Z");
    store.handled(std::slice::from_ref(&v1)).await.unwrap();
    store
        .settle(&SettleBatch::rows(vec![settled(v1.clone(), delivered())]))
        .await
        .unwrap();

    // Act
    let v2 = version("p", "r", "W/2", "2024-05-01T11:00:00Z");
    let other = version("p", "s", "W/1", "2024-05-01T10:00:00Z");
    let answer = store.handled(&[v1, v2, other]).await.unwrap();

    // Assert
    assert_eq!(answer, vec![true, false, false]);
    assert_eq!(store.handled_len().await.unwrap(), 1);
}

#[tokio::test]
async fn a_new_version_of_a_handled_row_replaces_its_marker_with_or_without_a_read_before() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let store = store(&settings);
    let versions: Vec<RowVersion> = (1..=3)
        .map(|n| version("p", "r", &format!("W/{n}"), "2024-05-01T10:00:00Z"))
        .collect();
    store
        .settle(&SettleBatch::rows(vec![settled(
            versions[0].clone(),
            delivered(),
        )]))
        .await
        .unwrap();

    // Act
    store.handled(&versions[1..2]).await.unwrap();
    store
        .settle(&SettleBatch::rows(vec![settled(
            versions[1].clone(),
            delivered(),
        )]))
        .await
        .unwrap();
    let after_read = store.handled(&versions).await.unwrap();
    let other_process = state_table::open(&settings.source, &settings.state).unwrap();
    other_process
        .settle(&SettleBatch::rows(vec![settled(
            versions[2].clone(),
            rejected("no longer valid"),
        )]))
        .await
        .unwrap();

    // Assert
    assert_eq!(after_read, vec![false, true, false]);
    assert_eq!(
        store.handled(&versions).await.unwrap(),
        vec![false, false, true]
    );
    assert_eq!(store.handled_len().await.unwrap(), 1);
    assert_eq!(store.rejected().await.unwrap()[0].row, versions[2]);
}

#[tokio::test]
async fn keys_with_quotes_slashes_and_other_forbidden_characters_are_stored_and_found() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let store = store(&settings);
    let odd = [
        version("o'brien/#?", "r\\'1", "W/1", "2024-05-01T10:00:00Z"),
        version("p\u{1}", "ünïcode ✓", "W/1", "2024-05-01T10:00:00Z"),
        version(
            &"long".repeat(80),
            &"key".repeat(80),
            "W/1",
            "2024-05-01T10:00:00Z",
        ),
    ];

    // Act
    store
        .settle(&SettleBatch::rows(
            odd.iter()
                .map(|v| settled(v.clone(), rejected("CustomerInfo is not valid JSON")))
                .collect(),
        ))
        .await
        .unwrap();

    // Assert
    let fresh = state_table::open(&settings.source, &settings.state).unwrap();
    assert_eq!(fresh.handled(&odd).await.unwrap(), vec![true; 3]);
    let listed: BTreeSet<RowId> = fresh
        .rejected()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.row.id)
        .collect();
    assert_eq!(listed, odd.iter().map(|v| v.id.clone()).collect());
}

#[tokio::test]
async fn pruning_forgets_only_rows_stamped_before_the_cutoff_and_keeps_unreadable_markers() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let store = store(&settings);
    let old = version("p", "old", "e", "2024-05-01T09:00:00Z");
    let edge = version("p", "edge", "e", "2024-05-01T10:00:00.0000001Z");
    let rows: Vec<RowVersion> = (0..250)
        .map(|i| version("q", &format!("r{i:03}"), "e", "2024-05-01T08:00:00Z"))
        .chain([old.clone(), edge.clone()])
        .collect();
    store
        .settle(&SettleBatch::rows(
            rows.iter()
                .map(|v| settled(v.clone(), delivered()))
                .collect(),
        ))
        .await
        .unwrap();
    let service = leadsync::source::service_client(&settings.source).unwrap();
    service
        .table_client(STATE_TABLE)
        .insert::<_, Map<String, Value>>(json!({
            "PartitionKey": "row", "RowKey": "ff.ff!h", "Kind": "handled",
            "RowEtag": "e", "At": "2024-01-01 (written by hand)",
        }))
        .unwrap()
        .await
        .unwrap();

    // Act
    let pruned = store
        .prune_handled(parse("2024-05-01T10:00:00.0000001Z").unwrap())
        .await
        .unwrap();

    // Assert
    assert_eq!(pruned, 251);
    assert_eq!(
        store.handled(&[old, edge]).await.unwrap(),
        vec![false, true]
    );
    assert_eq!(
        store.handled_len().await.unwrap(),
        2,
        "the edge row and the unreadable marker"
    );
}

#[tokio::test]
async fn a_rejected_row_keeps_its_reason_until_a_later_version_is_delivered_even_after_pruning() {
    // Arrange
    let world = World::new().await;
    let store = store(&table_settings(&world));
    let v1 = version("p", "r", "W/1", "2024-05-01T10:00:00Z");
    let skipped = version("p", "s", "W/1", "2024-05-01T10:00:00Z");
    let held = version("p", "u", "W/1", "2024-05-01T10:00:00Z");
    store
        .settle(&SettleBatch::rows(vec![
            settled(v1, rejected("CustomerInfo is not valid JSON")),
            settled(
                skipped,
                Settled::Skipped {
                    policy: "test_lead".into(),
                },
            ),
            settled(
                held,
                Settled::Unidentifiable {
                    reason: "no email".into(),
                },
            ),
        ]))
        .await
        .unwrap();
    let rejected_rows = store.rejected().await.unwrap();
    store
        .prune_handled(parse("2024-05-02T00:00:00Z").unwrap())
        .await
        .unwrap();
    let kept_after_pruning = store.rejected().await.unwrap().len();

    // Act
    let v2 = version("p", "r", "W/2", "2024-05-03T11:00:00Z");
    store
        .settle(&SettleBatch::rows(vec![settled(v2, delivered())]))
        .await
        .unwrap();

    // Assert
    assert_eq!(rejected_rows.len(), 1);
    assert!(
        matches!(&rejected_rows[0].outcome, Settled::Rejected { reason } if reason.contains("JSON"))
    );
    assert_eq!(rejected_rows[0].columns.as_ref().unwrap()["Note"], "kept");
    assert_eq!(kept_after_pruning, 1);
    assert!(store.rejected().await.unwrap().is_empty());
    assert_eq!(store.skipped().await.unwrap().len(), 1);
    assert_eq!(store.unidentifiable().await.unwrap().len(), 1);
}

#[tokio::test]
async fn customers_and_dead_letters_round_trip_and_a_delivery_resolves_the_letter() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let store = store(&settings);
    let (a, b) = (merged_customer(1, 2), merged_customer(2, 3));
    let keys = vec![b.lead.key.clone(), a.lead.key.clone()];
    assert_eq!(store.customers(&keys).await.unwrap(), vec![None, None]);
    let letter = dead_letter(&b, "DUPLICATES_DETECTED: use one of these records?");

    // Act
    store
        .settle(&SettleBatch {
            customers: vec![a.clone(), b.clone()],
            dead_letters: vec![letter.clone()],
            ..SettleBatch::default()
        })
        .await
        .unwrap();
    let fresh = state_table::open(&settings.source, &settings.state).unwrap();
    let read = fresh.customers(&keys).await.unwrap();
    let letters = fresh.dead_letters().await.unwrap();
    let mut b_delivered = b.clone();
    b_delivered.delivered = true;
    fresh
        .settle(&SettleBatch {
            customers: vec![b_delivered.clone()],
            resolved: vec![b.lead.external_key.clone(), "ls-never-rejected".into()],
            ..SettleBatch::default()
        })
        .await
        .unwrap();

    // Assert
    assert_eq!(read, vec![Some(b.clone()), Some(a.clone())]);
    assert_eq!(letters, vec![letter]);
    assert!(store.dead_letters().await.unwrap().is_empty());
    assert_eq!(store.all_customers().await.unwrap(), vec![a, b_delivered]);
}

#[tokio::test]
async fn a_customer_with_200_history_entries_round_trips() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let store = store(&settings);
    let big = merged_customer(7, 200);
    assert_eq!(big.lead.history.len(), 200);

    // Act
    store
        .settle(&SettleBatch {
            customers: vec![big.clone()],
            dead_letters: vec![dead_letter(&big, "FIELD_CUSTOM_VALIDATION_EXCEPTION")],
            ..SettleBatch::default()
        })
        .await
        .unwrap();

    // Assert
    let fresh = state_table::open(&settings.source, &settings.state).unwrap();
    let read = fresh
        .customers(std::slice::from_ref(&big.lead.key))
        .await
        .unwrap();
    assert_eq!(read, vec![Some(big.clone())]);
    assert_eq!(fresh.dead_letters().await.unwrap()[0].payload, big.lead);
    let entity = &raw_partition(&settings, "customer").await[0];
    assert!(
        entity.contains_key("Data1"),
        "split over several properties"
    );
}

#[tokio::test]
async fn a_customer_larger_than_one_entity_continues_in_parts_which_go_when_it_shrinks() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let store = store(&settings);
    let huge = merged_customer(3, 2_500);
    let size = serde_json::to_string(&huge).unwrap().len();
    let one_entity = state_table::CHUNKS_PER_ENTITY * state_table::CHUNK_UTF16_UNITS;
    assert!(size > 2 * one_entity, "{size} bytes");
    store
        .settle(&SettleBatch {
            customers: vec![huge.clone()],
            ..SettleBatch::default()
        })
        .await
        .unwrap();
    let read_huge = store
        .customers(std::slice::from_ref(&huge.lead.key))
        .await
        .unwrap();
    let entities_when_huge = raw_partition(&settings, "customer").await.len();

    // Act
    let small = merged_customer(3, 2);
    store
        .settle(&SettleBatch {
            customers: vec![small.clone()],
            ..SettleBatch::default()
        })
        .await
        .unwrap();

    // Assert
    assert_eq!(read_huge, vec![Some(huge)]);
    assert_eq!(entities_when_huge, 3);
    assert_eq!(raw_partition(&settings, "customer").await.len(), 1);
    assert_eq!(store.all_customers().await.unwrap(), vec![small]);
}

#[tokio::test]
async fn a_write_based_on_a_stale_read_is_refused_and_names_the_entity() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let (slow, fast) = (store(&settings), store(&settings));
    let c = merged_customer(1, 1);
    let keys = vec![c.lead.key.clone()];
    fast.settle(&SettleBatch {
        customers: vec![c.clone()],
        ..SettleBatch::default()
    })
    .await
    .unwrap();
    fast.set_checkpoint(parse("2024-05-01T10:00:00Z").unwrap())
        .await
        .unwrap();
    slow.customers(&keys).await.unwrap();
    slow.checkpoint().await.unwrap();
    fast.customers(&keys).await.unwrap();
    let mut changed = c.clone();
    changed.delivered = true;
    fast.settle(&SettleBatch {
        customers: vec![changed.clone()],
        ..SettleBatch::default()
    })
    .await
    .unwrap();
    fast.set_checkpoint(parse("2024-05-01T11:00:00Z").unwrap())
        .await
        .unwrap();

    // Act
    let customer_error = slow
        .settle(&SettleBatch {
            customers: vec![c.clone()],
            ..SettleBatch::default()
        })
        .await
        .unwrap_err()
        .to_string();
    let checkpoint_error = slow
        .set_checkpoint(parse("2024-05-01T10:30:00Z").unwrap())
        .await
        .unwrap_err()
        .to_string();

    // Assert
    assert!(customer_error.contains("412"), "{customer_error}");
    assert!(customer_error.contains(STATE_TABLE), "{customer_error}");
    assert!(customer_error.contains(&c.lead.key), "{customer_error}");
    assert!(
        checkpoint_error.contains("checkpoint"),
        "{checkpoint_error}"
    );
    assert!(
        checkpoint_error.contains("another leadsync"),
        "{checkpoint_error}"
    );
    assert_eq!(fast.customers(&keys).await.unwrap(), vec![Some(changed)]);
    assert_eq!(
        fast.checkpoint().await.unwrap(),
        Some(parse("2024-05-01T11:00:00Z").unwrap())
    );
}

#[tokio::test]
async fn errors_name_the_table_and_never_contain_the_sas_signature() {
    // Arrange
    let world = World::new().await;
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let text = table_toml(&world, &jsonl_sink(&world)).replace(
        &format!("connection_string = {{ value = \"{}\" }}", world.azurite.connection_string()),
        &format!(
            "account = \"devstoreaccount1\"\nsas_token = {{ value = \"sv=2020-08-04&ss=t&srt=sco&sp=rwdlacu&se=2099-01-01T00:00:00Z&sig=TOPSECRETSIGNATURE\" }}\nendpoint = \"http://127.0.0.1:{closed_port}/devstoreaccount1\""
        ),
    );
    let settings = Settings::from_toml_with_env(&text, Path::new("t.toml"), &HashMap::new())
        .expect("valid settings");
    let store = store(&settings);

    // Act
    let error = store.checkpoint().await.unwrap_err().to_string();

    // Assert
    assert!(error.contains(STATE_TABLE), "{error}");
    assert!(!error.contains("TOPSECRETSIGNATURE"), "{error}");
    let concrete = state_table::TableStore::new(&settings.source, &settings.state).unwrap();
    assert!(!format!("{concrete:?}").contains("TOPSECRETSIGNATURE"));
}

#[tokio::test]
async fn the_pipeline_on_the_table_delivers_each_customer_once_across_runs() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let first_rows: Vec<_> = (0..20)
        .map(|i| {
            lead_row(
                "p00",
                &format!("r{i:03}"),
                "AzureMarketplace-INS | contoso.analytics",
                customer(i % 10),
            )
        })
        .collect();
    world.insert(&first_rows).await;

    // Act
    let run = || {
        leadsync::run(
            &settings,
            RunOptions { once: true },
            CancellationToken::new(),
        )
    };
    let first = run().await.unwrap();
    let later_rows: Vec<_> = (20..25)
        .map(|i| {
            lead_row(
                "p01",
                &format!("r{i:03}"),
                "AppSource-PLT | contoso.insights",
                customer(i),
            )
        })
        .collect();
    world.insert(&later_rows).await;
    let second = run().await.unwrap();
    let third = run().await.unwrap();

    // Assert
    assert_eq!(first.totals.records_sent, 10);
    assert_eq!(second.totals.records_sent, 5);
    assert_eq!(
        second.totals.already_handled, 20,
        "re-read in the overlap, recognised"
    );
    assert_eq!(third.totals.records_sent, 0);
    assert_eq!(third.exit_code(), 0);
    let keys: Vec<String> = world
        .delivered()
        .iter()
        .map(|r| r["external_key"].as_str().unwrap().to_owned())
        .collect();
    let distinct: BTreeSet<&String> = keys.iter().collect();
    assert_eq!((keys.len(), distinct.len()), (15, 15), "each customer once");
    let checkpoint = store(&settings).checkpoint().await.unwrap();
    assert!(checkpoint.is_some());
    assert_eq!(checkpoint, third.totals.checkpoint);
    assert!(
        !world.state_dir().exists(),
        "nothing is written to the local disk"
    );
    assert_eq!(raw_partition(&settings, "customer").await.len(), 15);
}

/// Issue 24: a backfill of many pages whose customers recur on every page. Page k+1's
/// merge reads its customers while page k's settle writes them; the writes of page k+1
/// must be guarded by the ETags page k's writes left, not by those of a read that
/// preceded them (which failed the poll with 412 after every page was delivered). The
/// proxy holds each customers' transaction a while, so that the next page's reads
/// always fall before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_whose_customers_recur_on_every_page_settles_in_one_run() {
    // Arrange
    let world = World::with_backend(Backend::Table).await;
    let (_proxy, settings) =
        FaultProxy::start(&world, Duration::from_millis(150), "page_size = 10\n").await;
    let (customers, rows_per_customer) = (15, 8);
    // Half of each customer's rows in a wave, every customer on most pages of it.
    let wave = |w: usize| -> Vec<_> {
        (0..customers * rows_per_customer / 2)
            .map(|i| {
                lead_row(
                    &format!("p{}", i % 3),
                    &format!("w{w}-{i:05}"),
                    "AzureMarketplace-INS | contoso.analytics",
                    customer(i % customers),
                )
            })
            .collect()
    };
    world.insert(&wave(1)).await;
    let run = || {
        leadsync::run(
            &settings,
            RunOptions { once: true },
            CancellationToken::new(),
        )
    };

    // Act: a backfill of new customers (inserts raced the next page's reads, 409),
    // then one of customers stored already (updates raced them, 412), then nothing new.
    let first = run().await.unwrap();
    world.insert(&wave(2)).await;
    let more = run().await.unwrap();
    let second = run().await.unwrap();

    // Assert
    assert_eq!(first.last_error, None, "the backfill's poll failed");
    assert_eq!(more.last_error, None, "the second backfill's poll failed");
    assert_eq!((first.totals.pages, first.exit_code()), (6, 0));
    assert_eq!(
        first.totals.delivered + more.totals.delivered,
        (customers * rows_per_customer) as u64
    );
    let latest = world.latest_records();
    assert_eq!(latest.len(), customers);
    for record in latest.values() {
        assert_eq!(
            record["history"].as_array().unwrap().len(),
            rows_per_customer,
            "every event merged: {record}"
        );
    }
    assert_eq!(second.exit_code(), 0);
    assert_eq!(second.totals.records_sent, 0, "nothing delivered twice");
    assert_eq!(
        second.totals.already_handled,
        (customers * rows_per_customer) as u64
    );
    let stored = store(&settings).all_customers().await.unwrap();
    assert!(stored
        .iter()
        .all(|c| c.delivered && c.lead.history.len() == rows_per_customer));
}

#[tokio::test]
async fn the_lease_is_held_by_one_store_until_released_or_expired() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let (one, two) = (store(&settings), store(&settings));
    let ttl = Duration::from_secs(30);

    // Act
    let first = one.acquire_lease("one", ttl).await.unwrap();
    let second = two.acquire_lease("two", ttl).await.unwrap();
    let renewed = one.acquire_lease("one", ttl).await.unwrap();
    two.release_lease("two").await.unwrap();
    let still_held = two.acquire_lease("two", ttl).await.unwrap();
    one.release_lease("one").await.unwrap();
    let after_release = two
        .acquire_lease("two", Duration::from_millis(500))
        .await
        .unwrap();
    let while_short_lease_runs = one.acquire_lease("one", ttl).await.unwrap();
    // The service's Date tells its time to the second (`LEASE_CLOCK_RESOLUTION`).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let after_expiry = one.acquire_lease("one", ttl).await.unwrap();

    // Assert
    assert_eq!(first, Lease::Held);
    assert!(
        matches!(&second, Lease::HeldBy { owner, until } if owner == "one" && *until > time::OffsetDateTime::now_utc()),
        "{second:?}"
    );
    assert_eq!(renewed, Lease::Held);
    assert!(matches!(&still_held, Lease::HeldBy { owner, .. } if owner == "one"));
    assert_eq!(after_release, Lease::Held);
    assert!(matches!(&while_short_lease_runs, Lease::HeldBy { owner, .. } if owner == "two"));
    assert_eq!(after_expiry, Lease::Held);
}

#[tokio::test]
async fn of_many_stores_racing_for_the_lease_exactly_one_gets_it() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let stores: Vec<_> = (0..8).map(|_| store(&settings)).collect();

    // Act
    let results = futures::future::join_all(stores.iter().enumerate().map(|(i, s)| {
        let owner = format!("racer-{i}");
        async move {
            s.acquire_lease(&owner, Duration::from_secs(30))
                .await
                .unwrap()
        }
    }))
    .await;

    // Assert
    let holders = results.iter().filter(|r| **r == Lease::Held).count();
    assert_eq!(holders, 1, "{results:?}");
    let winner = results.iter().position(|r| *r == Lease::Held).unwrap();
    for result in &results {
        if let Lease::HeldBy { owner, .. } = result {
            assert_eq!(owner, &format!("racer-{winner}"));
        }
    }
}

/// Writes the lease entity as another process would have, with the given `Until`.
async fn write_lease_as(settings: &Settings, owner: &str, until: time::OffsetDateTime) {
    // Creates the state table.
    store(settings).checkpoint().await.unwrap();
    let service = leadsync::source::service_client(&settings.source).unwrap();
    let entity = json!({
        "PartitionKey": "lease",
        "RowKey": "processor",
        "Owner": owner,
        "Until": leadsync::timestamp::format(until),
    });
    service
        .table_client(STATE_TABLE)
        .insert::<_, Map<String, Value>>(&entity)
        .unwrap()
        .await
        .expect("write the lease entity");
}

const HOUR_MS: i64 = 3_600_000;

#[tokio::test]
async fn a_lease_ended_by_the_services_clock_is_taken_though_the_local_clock_says_it_runs() {
    // Arrange: the storage service's clock is an hour ahead of this host's; another
    // process's lease ends in ten minutes by this host's clock, 50 minutes ago by the
    // service's.
    let world = World::with_clock_offset(HOUR_MS).await;
    let settings = table_settings(&world);
    let local_now = time::OffsetDateTime::now_utc();
    write_lease_as(&settings, "other", local_now + Duration::from_secs(600)).await;
    let ttl = Duration::from_secs(30);

    // Act
    let mine = store(&settings).acquire_lease("mine", ttl).await.unwrap();
    let theirs = store(&settings).acquire_lease("other", ttl).await.unwrap();

    // Assert
    assert_eq!(mine, Lease::Held);
    // The new lease runs until the service's now + ttl, not the local one's.
    let Lease::HeldBy { owner, until } = theirs else {
        panic!("{theirs:?}")
    };
    assert_eq!(owner, "mine");
    let service_now = local_now + Duration::from_millis(HOUR_MS as u64);
    let late = (until - (service_now + ttl)).abs();
    assert!(
        late < Duration::from_secs(5),
        "until {until}, service now {service_now}"
    );
}

#[tokio::test]
async fn a_lease_running_by_the_services_clock_is_held_though_the_local_clock_says_it_ended() {
    // Arrange: the storage service's clock is an hour behind this host's; another
    // process's lease ended ten minutes ago by this host's clock, and runs 50 more
    // minutes by the service's.
    let world = World::with_clock_offset(-HOUR_MS).await;
    let settings = table_settings(&world);
    let until = (time::OffsetDateTime::now_utc() - Duration::from_secs(600))
        .replace_nanosecond(0)
        .unwrap();
    write_lease_as(&settings, "other", until).await;
    let (one, two) = (store(&settings), store(&settings));
    let ttl = Duration::from_secs(30);

    // Act
    let mine = one.acquire_lease("mine", ttl).await.unwrap();
    one.release_lease("mine").await.unwrap();
    let still = two.acquire_lease("two", ttl).await.unwrap();

    // Assert
    assert!(
        matches!(&mine, Lease::HeldBy { owner, until: u } if owner == "other" && *u == until),
        "{mine:?}"
    );
    assert!(
        matches!(&still, Lease::HeldBy { owner, .. } if owner == "other"),
        "{still:?}"
    );
}

/// A sink that freezes the storage service on its first delivery, and lets it answer
/// again `frozen_for` later (from a thread of its own: the test's runtime is the
/// daemon's).
struct FreezingSink {
    azurite_pid: u32,
    frozen_for: Duration,
    delivered: Mutex<usize>,
}

#[async_trait::async_trait]
impl LeadSink for FreezingSink {
    fn name(&self) -> &str {
        "freezing"
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let mut delivered = self.delivered.lock().unwrap();
        if *delivered == 0 {
            let pid = self.azurite_pid.to_string();
            std::process::Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap();
            let frozen_for = self.frozen_for;
            std::thread::spawn(move || {
                std::thread::sleep(frozen_for);
                std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .status()
                    .unwrap();
            });
        }
        *delivered += batch.len();
        vec![Outcome::Delivered; batch.len()]
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_holder_that_cannot_renew_its_lease_in_time_stops_before_it_may_expire() {
    // Arrange: 30 leads, 5 per page; the lease lasts 5s. The storage service hangs
    // (does not refuse) from the first delivery on, for longer than the lease lasts:
    // a renewal sent then gets no answer until the lease has expired by the service's
    // clock, when another process could have taken it over.
    let world = World::new().await;
    let rows: Vec<_> = (0..30)
        .map(|i| {
            lead_row(
                "p",
                &format!("r{i:03}"),
                "AzureMarketplace-INS | contoso.analytics",
                customer(i),
            )
        })
        .collect();
    world.insert(&rows).await;
    let text = table_toml(&world, &jsonl_sink(&world))
        .replace("overlap = \"10m\"", "overlap = \"10m\"\npage_size = 5");
    let settings =
        Settings::from_toml_with_env(&text, Path::new("test.toml"), &HashMap::new()).unwrap();
    let sink = Arc::new(FreezingSink {
        azurite_pid: world.azurite.pid(),
        frozen_for: Duration::from_secs(8),
        delivered: Mutex::new(0),
    });
    let built = leadsync::build_pipeline(&settings).unwrap();
    // A delivery window of one page: each page goes to the sink on its own.
    let pipeline = leadsync::pipeline::Pipeline {
        window_pages: 1,
        ..built.with_sink(sink.clone())
    };

    // Act
    let report = leadsync::run_pipeline(
        &pipeline,
        &settings,
        RunOptions { once: true },
        CancellationToken::new(),
    )
    .await
    .unwrap();

    // Assert: the poll was stopped (the renewal was given up before the lease could
    // expire), so it did not go on delivering pages once the service answered again.
    let delivered = *sink.delivered.lock().unwrap();
    assert_eq!(
        report.last_error.as_deref(),
        Some("processing lease lost"),
        "{report:?}"
    );
    assert_eq!(
        delivered, 5,
        "only the page delivered before the service hung"
    );
}

#[tokio::test]
async fn a_lease_hold_stops_before_its_lease_may_expire_when_the_service_hangs() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let ttl = settings.state.lease_ttl;
    let asked = Instant::now();
    let leadsync::Holding::Held(hold) = leadsync::LeaseHold::take(store(&settings), ttl)
        .await
        .unwrap()
    else {
        panic!("the lease is free")
    };

    // Act: the service stops answering (requests hang until request_timeout, 10s).
    world.azurite.pause();
    let stopped = tokio::time::timeout(ttl * 4, hold.lost.cancelled()).await;
    let after = asked.elapsed();
    world.azurite.resume();

    // Assert: stopped, and before the lease could end (ttl - 1s of the Date's resolution).
    assert!(stopped.is_ok(), "still holding after {after:?}");
    assert!(
        after < ttl - Duration::from_secs(1),
        "stopped {after:?} after taking a {ttl:?} lease"
    );
    hold.release().await;
}

/// What the daemons' sinks saw, shared like one CRM.
#[derive(Default)]
struct Crm {
    /// Deliveries per (external key, history length): one per change of a customer.
    deliveries: BTreeMap<(String, usize), usize>,
    /// Newest history length per external key.
    latest: BTreeMap<String, usize>,
    /// (daemon, start, end) of every deliver call.
    calls: Vec<(usize, Instant, Instant)>,
    by_daemon: [usize; 2],
    last_daemon: Option<usize>,
    /// Wall-clock time of each daemon's first deliver call.
    first_call_at: [Option<time::OffsetDateTime>; 2],
}

struct SharedSink {
    daemon: usize,
    crm: Arc<Mutex<Crm>>,
}

#[async_trait::async_trait]
impl LeadSink for SharedSink {
    fn name(&self) -> &str {
        "memory"
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let start = Instant::now();
        let wall = time::OffsetDateTime::now_utc();
        // Long enough that overlapping polls of two daemons would overlap here too.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut crm = self.crm.lock().unwrap();
        for lead in batch {
            let state = (lead.external_key.clone(), lead.history.len());
            *crm.deliveries.entry(state).or_default() += 1;
            crm.latest
                .insert(lead.external_key.clone(), lead.history.len());
        }
        crm.by_daemon[self.daemon] += batch.len();
        crm.last_daemon = Some(self.daemon);
        crm.first_call_at[self.daemon].get_or_insert(wall);
        crm.calls.push((self.daemon, start, Instant::now()));
        vec![Outcome::Delivered; batch.len()]
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

fn spawn_daemon(
    settings: &Settings,
    daemon: usize,
    crm: &Arc<Mutex<Crm>>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<leadsync::RunReport> {
    let settings = settings.clone();
    let sink: Arc<dyn LeadSink> = Arc::new(SharedSink {
        daemon,
        crm: crm.clone(),
    });
    tokio::spawn(async move {
        let built = leadsync::build_pipeline(&settings).expect("pipeline");
        let pipeline = built.with_sink(sink);
        leadsync::run_pipeline(&pipeline, &settings, RunOptions { once: false }, cancel)
            .await
            .expect("daemon runs")
    })
}

fn wave(wave: usize, customers: std::ops::Range<usize>) -> Vec<Map<String, Value>> {
    customers
        .map(|n| {
            lead_row(
                &format!("p{:02}", n % 4),
                &format!("w{wave}-c{n:03}"),
                "AzureMarketplace-INS | contoso.analytics",
                customer(n),
            )
        })
        .collect()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_on_one_table_never_process_at_once_and_deliver_each_change_once() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let crm = Arc::new(Mutex::new(Crm::default()));
    let all_at = |len: usize| {
        let crm = crm.clone();
        move || {
            let crm = crm.lock().unwrap();
            crm.latest.len() == 100 && crm.latest.values().all(|l| *l == len)
        }
    };
    world.insert(&wave(1, 0..100)).await;
    let cancels = [CancellationToken::new(), CancellationToken::new()];
    let mut daemons: Vec<_> = (0..2)
        .map(|d| Some(spawn_daemon(&settings, d, &crm, cancels[d].clone())))
        .collect();

    // Act
    wait_for("wave 1", Duration::from_secs(20), all_at(1)).await;
    world.insert(&wave(2, 0..100)).await;
    wait_for("wave 2", Duration::from_secs(20), all_at(2)).await;
    // The holder shuts down and releases the lease; the other takes over.
    let holder = crm.lock().unwrap().last_daemon.unwrap();
    cancels[holder].cancel();
    let holder_report = daemons[holder].take().unwrap().await.unwrap();
    world.insert(&wave(3, 0..100)).await;
    wait_for("wave 3", Duration::from_secs(20), all_at(3)).await;
    cancels[1 - holder].cancel();
    let other_report = daemons[1 - holder].take().unwrap().await.unwrap();

    // Assert
    let crm = crm.lock().unwrap();
    let twice: Vec<_> = crm.deliveries.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(crm.deliveries.len(), 300, "100 customers x 3 changes");
    assert_eq!(
        holder_report.totals.records_sent + other_report.totals.records_sent,
        300
    );
    assert!(crm.by_daemon[1 - holder] > 0, "the other daemon took over");
    for (a, a_start, a_end) in &crm.calls {
        for (b, b_start, b_end) in &crm.calls {
            if a != b {
                assert!(
                    a_end <= b_start || b_end <= a_start,
                    "daemons {a} and {b} delivered at the same time"
                );
            }
        }
    }
    assert_eq!((holder_report.pending, other_report.pending), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_that_dies_holding_the_lease_is_replaced_after_the_lease_expires() {
    // Arrange
    let world = World::new().await;
    let settings = table_settings(&world);
    let crm = Arc::new(Mutex::new(Crm::default()));
    let probe = store(&settings);
    world.insert(&wave(1, 0..20)).await;
    // Daemon A runs in its own runtime, so that killing it ends every task it has,
    // as the death of its process would, and releases nothing.
    let (kill, killed) = std::sync::mpsc::channel::<()>();
    let a = {
        let settings = settings.clone();
        let crm = crm.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let _daemon = runtime.spawn(async move {
                let sink: Arc<dyn LeadSink> = Arc::new(SharedSink { daemon: 0, crm });
                let built = leadsync::build_pipeline(&settings).expect("pipeline");
                let pipeline = built.with_sink(sink);
                leadsync::run_pipeline(
                    &pipeline,
                    &settings,
                    RunOptions { once: false },
                    CancellationToken::new(),
                )
                .await
            });
            let _ = killed.recv();
            runtime.shutdown_background();
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe.handled_len().await.unwrap() < 20 {
        assert!(Instant::now() < deadline, "daemon A did not settle wave 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel_b = CancellationToken::new();
    let b = spawn_daemon(&settings, 1, &crm, cancel_b.clone());

    // Act
    kill.send(()).unwrap();
    a.join().unwrap();
    let lease = raw_partition(&settings, "lease").await;
    let a_lease_until = parse(lease[0]["Until"].as_str().unwrap()).unwrap();
    world.insert(&wave(2, 20..40)).await;
    let crm_for_wait = crm.clone();
    wait_for(
        "daemon B to take over",
        Duration::from_secs(20),
        move || crm_for_wait.lock().unwrap().latest.len() == 40,
    )
    .await;
    cancel_b.cancel();
    let b_report = b.await.unwrap();

    // Assert
    let crm = crm.lock().unwrap();
    let b_started = crm.first_call_at[1].unwrap();
    assert!(
        b_started >= a_lease_until,
        "B delivered at {b_started} while A's lease ran until {a_lease_until}"
    );
    assert!(
        crm.deliveries.values().all(|n| *n == 1),
        "{:?}",
        crm.deliveries
    );
    assert_eq!(crm.by_daemon, [20, 20]);
    assert_eq!(b_report.totals.records_sent, 20);
    assert_eq!(b_report.pending, 0);
}

/// A proxy in front of Azurite: it forwards every request, holds each entity group
/// transaction that writes the `customer` partition for `hold` before forwarding it,
/// and fails every request (503) once `died`, as if the process had died: while
/// `armed`, right after such a transaction succeeded; while `batches` is above zero,
/// right after that many more transactions succeeded.
#[derive(Clone)]
struct FaultProxy {
    azurite: String,
    client: reqwest::Client,
    hold: Duration,
    armed: Arc<std::sync::atomic::AtomicBool>,
    batches: Arc<std::sync::atomic::AtomicUsize>,
    died: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy in front of `world`'s Azurite; returns it with settings that use
    /// it for everything (the lead table and the state table).
    async fn start(world: &World, hold: Duration, extra: &str) -> (FaultProxy, Settings) {
        let proxy = FaultProxy {
            azurite: format!("http://127.0.0.1:{}", world.azurite.port),
            client: reqwest::Client::new(),
            hold,
            armed: Default::default(),
            batches: Default::default(),
            died: Default::default(),
        };
        let url = common::serve(
            axum::Router::new()
                .fallback(forward)
                .with_state(proxy.clone()),
        )
        .await;
        let port = url.rsplit(':').next().unwrap();
        let text = world.toml_with_sink(extra, &jsonl_sink(world)).replace(
            &format!("127.0.0.1:{}/", world.azurite.port),
            &format!("127.0.0.1:{port}/"),
        );
        let settings = Settings::from_toml_with_env(&text, Path::new("t.toml"), &HashMap::new())
            .expect("valid settings");
        (proxy, settings)
    }
}

async fn forward(
    axum::extract::State(proxy): axum::extract::State<FaultProxy>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering::SeqCst;
    if proxy.died.load(SeqCst) {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the process died",
        )
            .into_response();
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    let customers = parts.uri.path().ends_with("$batch")
        && (text.contains("PartitionKey='customer'")
            || text.contains("\"PartitionKey\":\"customer\""));
    if customers {
        tokio::time::sleep(proxy.hold).await;
    }
    let url = format!(
        "{}{}",
        proxy.azurite,
        parts.uri.path_and_query().map_or("", |p| p.as_str())
    );
    let mut forwarded = proxy.client.request(parts.method, url).body(body);
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            forwarded = forwarded.header(name, value);
        }
    }
    let answer = forwarded.send().await.unwrap();
    let status = answer.status();
    let mut response = axum::response::Response::builder().status(status);
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "connection" | "transfer-encoding"
        ) {
            response = response.header(name, value);
        }
    }
    let bytes = answer.bytes().await.unwrap();
    // A transaction answers 202 with each operation's status inside: count it only if
    // none failed.
    let succeeded = status.is_success() && !String::from_utf8_lossy(&bytes).contains("HTTP/1.1 4");
    if customers && succeeded && proxy.armed.load(SeqCst) {
        proxy.died.store(true, SeqCst);
    }
    let batch = parts.uri.path().ends_with("$batch");
    if batch && succeeded && proxy.batches.load(SeqCst) > 0 {
        // Only this task counts down: one transaction at a time in a settle.
        if proxy.batches.fetch_sub(1, SeqCst) == 1 {
            proxy.died.store(true, SeqCst);
        }
    }
    response.body(axum::body::Body::from(bytes)).unwrap()
}

/// Refuses every customer while `refuse` is set (only those whose key contains `only`,
/// when given), and delivers the others (into the JSONL file).
struct Refusing {
    inner: Arc<dyn LeadSink>,
    refuse: std::sync::atomic::AtomicBool,
    only: Option<&'static str>,
}

#[async_trait::async_trait]
impl LeadSink for Refusing {
    fn name(&self) -> &str {
        "refusing"
    }
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let refused = |lead: &CustomerLead| {
            self.refuse.load(std::sync::atomic::Ordering::SeqCst)
                && self.only.is_none_or(|only| lead.key.contains(only))
        };
        let taken: Vec<CustomerLead> = batch.iter().filter(|l| !refused(l)).cloned().collect();
        let mut delivered = self.inner.deliver(&taken).await.into_iter();
        batch
            .iter()
            .map(|lead| match refused(lead) {
                true => Outcome::Rejected {
                    reason: "INVALID_FIELD: Company".into(),
                },
                false => delivered.next().expect("one outcome per lead"),
            })
            .collect()
    }
    async fn sync(&self) -> Result<(), SinkError> {
        self.inner.sync().await
    }
    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Issue 24: a settle is several transactions. A process that dies right after the one
/// writing the customers has put a refused row into its (delivered) customer's history,
/// where the next poll's merge finds it and drops it as already handled: its dead letter
/// and its place under `rows rejected` must already be written by then.
#[tokio::test]
async fn a_crash_right_after_the_customers_are_written_keeps_a_refused_rows_outcome() {
    // Arrange: customer 1 delivered once; a second lead of it, which the CRM refuses.
    use std::sync::atomic::Ordering::SeqCst;
    let world = World::with_backend(Backend::Table).await;
    let (proxy, settings) = FaultProxy::start(&world, Duration::ZERO, "").await;
    let built = leadsync::build_pipeline(&settings).unwrap();
    let sink = Arc::new(Refusing {
        inner: built.sinks[0].sink.clone(),
        refuse: false.into(),
        only: None,
    });
    let pipeline = built.with_sink(sink.clone());
    let cancel = CancellationToken::new();
    let poll = || pipeline.poll(&cancel);
    let product = "AzureMarketplace-INS | contoso.analytics";
    world
        .insert(&[lead_row("p", "r1", product, customer(1))])
        .await;
    poll().await.expect("the first lead is delivered");
    world
        .insert(&[lead_row(
            "p",
            "r2",
            "AppSource-PLT | contoso.insights",
            customer(1),
        )])
        .await;
    sink.refuse.store(true, SeqCst);
    proxy.armed.store(true, SeqCst);
    let crashed = poll().await;
    assert!(crashed.is_err(), "the settle died: {crashed:?}");
    assert!(
        proxy.died.load(SeqCst),
        "it died after the customers' transaction"
    );
    proxy.armed.store(false, SeqCst);
    proxy.died.store(false, SeqCst);
    let state = store(&settings);
    let stored = state.all_customers().await.unwrap();
    assert!(
        stored[0].lead.history.iter().any(|h| h.row.row_key == "r2"),
        "the crash fell after the refused row entered its customer's history"
    );

    // Act: the poll after the restart.
    let after = poll().await.unwrap();

    // Assert
    let letters = state.dead_letters().await.unwrap();
    assert_eq!(
        letters.len(),
        1,
        "the refusal is a dead letter: {letters:?}"
    );
    assert!(letters[0].rows.iter().any(|r| r.id.row_key == "r2"));
    let refused = state.rejected().await.unwrap();
    assert_eq!(
        refused
            .iter()
            .map(|r| r.row.id.row_key.as_str())
            .collect::<Vec<_>>(),
        ["r2"],
        "the refused row is listed under rows rejected"
    );
    assert!(after.checkpoint >= Some(parse("2000-01-01T00:00:00Z").unwrap()));
    assert_eq!(
        world.delivered().len(),
        1,
        "nothing delivered since the first lead"
    );
}

/// Issue 24, every crash point of a settle: a process that dies after any of a settle's
/// transactions (dead letters, list entries, customers, markers) leaves, after the next
/// poll, every row of the page with its outcome: the refused row a dead letter and a
/// `rows rejected` entry, the malformed row a `rows rejected` entry, the test lead a
/// `rows skipped` entry, the delivered customer in the CRM; and nothing is read as new
/// again after that.
#[tokio::test]
async fn a_crash_after_any_transaction_of_a_settle_leaves_every_rows_outcome_recorded() {
    use std::sync::atomic::Ordering::SeqCst;
    // Dead letters, list entries, customers; after the markers the settle is done.
    for survived in 1..=3 {
        // Arrange: customer 1 delivered once; then a page with its second lead (refused),
        // a new customer's lead, a malformed row and a test lead.
        let world = World::with_backend(Backend::Table).await;
        let (proxy, settings) = FaultProxy::start(&world, Duration::ZERO, "").await;
        let built = leadsync::build_pipeline(&settings).unwrap();
        let sink = Arc::new(Refusing {
            inner: built.sinks[0].sink.clone(),
            refuse: false.into(),
            only: Some("customer1@"),
        });
        let pipeline = built.with_sink(sink.clone());
        let cancel = CancellationToken::new();
        let poll = || pipeline.poll(&cancel);
        let product = "AzureMarketplace-INS | contoso.analytics";
        world
            .insert(&[lead_row("p", "r1", product, customer(1))])
            .await;
        poll().await.expect("the first lead is delivered");
        let mut malformed = lead_row("p", "bad", product, json!({}));
        malformed.insert("CustomerInfo".into(), json!("{not json"));
        let test_lead = json!({"FirstName": "MSFT_TEST_636737558587117715", "Email": "MSFT_TEST_636737558587117715@x.com"});
        world
            .insert(&[
                lead_row("p", "r2", "AppSource-PLT | contoso.insights", customer(1)),
                lead_row("p", "r3", product, customer(2)),
                malformed,
                lead_row("p", "test", product, test_lead),
            ])
            .await;
        sink.refuse.store(true, SeqCst);
        proxy.batches.store(survived, SeqCst);
        let crashed = poll().await;
        assert!(crashed.is_err(), "{survived}: the settle died: {crashed:?}");
        assert!(proxy.died.load(SeqCst), "{survived}: it died mid-settle");
        proxy.batches.store(0, SeqCst);
        proxy.died.store(false, SeqCst);

        // Act: the poll after the restart, and one more.
        let after = poll().await.unwrap();
        let again = poll().await.unwrap();

        // Assert
        let state = store(&settings);
        let letters = state.dead_letters().await.unwrap();
        assert_eq!(letters.len(), 1, "{survived}: {letters:?}");
        assert!(letters[0].rows.iter().any(|r| r.id.row_key == "r2"));
        let listed = |rows: Vec<leadsync::state::RecordedRow>| -> BTreeSet<String> {
            rows.into_iter().map(|r| r.row.id.row_key).collect()
        };
        assert_eq!(
            listed(state.rejected().await.unwrap()),
            BTreeSet::from(["bad".to_owned(), "r2".to_owned()]),
            "{survived}"
        );
        assert_eq!(
            listed(state.skipped().await.unwrap()),
            BTreeSet::from(["test".to_owned()]),
            "{survived}"
        );
        let customers: Vec<String> = world
            .delivered()
            .iter()
            .map(|r| r["external_key"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            customers.iter().collect::<BTreeSet<_>>().len(),
            2,
            "{survived}: customer 1 before, customer 2 now (maybe twice, an upsert): {customers:?}"
        );
        assert!(after.checkpoint.is_some());
        assert_eq!(
            (again.already_handled, again.records_sent, again.rejected),
            (5, 0, 0),
            "{survived}: every row settled"
        );
    }
}
