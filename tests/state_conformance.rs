//! What every state backend must do (`leadsync::state::StateStore`): one suite, run
//! over the file store and over the table store (against a real Azurite). A new
//! backend gets a `Backend` variant in `Fixture` and a module in `conformance!`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{customer, lead_row, Backend, World};
use leadsync::config::IdentitySettings;
use leadsync::identity::{CustomerKey, CustomerState};
use leadsync::lead::normalise;
use leadsync::source::row::{RawRow, RowId};
use leadsync::state::personal::Person;
use leadsync::state::{
    DeadLetter, Lease, RecordedRow, RedbStore, RowVersion, SettleBatch, Settled, Settlement,
    StateError, StateStore,
};
use leadsync::timestamp::parse;
use serde_json::{json, Map};
use time::OffsetDateTime;

/// Runs each test once per backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod file {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Fixture::new(super::Backend::File).await).await
            })*
        }
        mod table {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Fixture::new(super::Backend::Table).await).await
            })*
        }
    };
}

conformance!(
    the_checkpoint_is_absent_then_round_trips_at_full_precision_and_survives_reopening,
    a_row_is_handled_only_at_the_etag_it_was_settled_with,
    a_settle_records_every_outcome_customer_and_dead_letter_it_carries,
    a_rows_latest_settle_decides_the_list_it_is_on,
    a_delivery_resolves_a_dead_letter_and_a_newer_customer_record_replaces_the_stored_one,
    customers_and_dead_letters_are_listed_in_key_order,
    pruning_forgets_only_handled_rows_stamped_before_the_cutoff,
    forgetting_a_person_removes_their_data_and_keeps_their_rows_handled,
    retention_removes_only_what_is_older_than_the_cutoff,
    the_lease_is_held_by_its_owner_and_keeps_a_second_process_out,
);

/// Where a test's store lives, so that it can be opened again (as a restart would).
struct Fixture {
    backend: Backend,
    /// The file store's directory.
    dir: tempfile::TempDir,
    /// Azurite and the table store's settings.
    world: Option<World>,
}

impl Fixture {
    async fn new(backend: Backend) -> Fixture {
        let world = match backend {
            Backend::File => None,
            Backend::Table => Some(World::with_backend(Backend::Table).await),
        };
        Fixture {
            backend,
            dir: tempfile::tempdir().expect("temp dir"),
            world,
        }
    }

    /// Opens the store (the file store: drop the one before first, it holds the file).
    fn open(&self) -> Result<Arc<dyn StateStore>, StateError> {
        match &self.world {
            None => Ok(Arc::new(RedbStore::open(self.dir.path())?)),
            Some(world) => leadsync::open_state(&world.settings()),
        }
    }

    fn store(&self) -> Arc<dyn StateStore> {
        self.open().expect("open the state store")
    }
}

fn version(rk: &str, etag: &str, ts: &str) -> RowVersion {
    RowVersion {
        id: RowId::new("p", rk),
        etag: etag.into(),
        timestamp: parse(ts).unwrap(),
    }
}

fn settled(row: &RowVersion, outcome: Settled) -> Settlement {
    let columns = match outcome {
        Settled::Delivered { .. } => None,
        _ => Some(Map::from_iter([("Note".to_owned(), json!("kept"))])),
    };
    Settlement {
        row: row.clone(),
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

fn skipped() -> Settled {
    Settled::Skipped {
        policy: "test_lead".into(),
    }
}

fn unidentifiable() -> Settled {
    Settled::Unidentifiable {
        reason: "no email".into(),
    }
}

/// Customer `n` (customer{n}@contoso.com) merged from `events` rows `r{n}-*`, stamped
/// from `at` on.
fn merged_customer(n: usize, events: usize, at: OffsetDateTime) -> CustomerState {
    let identity = IdentitySettings::default();
    let events: Vec<_> = (0..events)
        .map(|i| {
            let rk = format!("r{n}-{i:03}");
            let mut columns = lead_row("p", &rk, "AzureMarketplace-INS | contoso.a", customer(n));
            columns.remove("PartitionKey");
            columns.remove("RowKey");
            let row = RawRow {
                id: RowId::new("p", rk),
                etag: format!("W/\"e{i}\""),
                timestamp: at + Duration::from_millis(i as u64),
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

fn may_2024() -> OffsetDateTime {
    parse("2024-05-01T10:00:00.1234567Z").unwrap()
}

fn dead_letter(customer: &CustomerState, reason: &str, at: OffsetDateTime) -> DeadLetter {
    DeadLetter {
        id: customer.lead.external_key.clone(),
        sink: "salesforce".into(),
        reason: reason.into(),
        payload: customer.lead.clone(),
        rows: vec![version("r-dl", "W/1", "2024-05-01T10:00:00Z")],
        at,
        attempts: 1,
    }
}

fn row_keys(rows: &[RecordedRow]) -> Vec<String> {
    rows.iter().map(|r| r.row.id.row_key.clone()).collect()
}

fn keys(customers: &[CustomerState]) -> Vec<String> {
    customers.iter().map(|c| c.lead.key.clone()).collect()
}

async fn the_checkpoint_is_absent_then_round_trips_at_full_precision_and_survives_reopening(
    fixture: Fixture,
) {
    let store = fixture.store();
    assert_eq!(store.checkpoint().await.unwrap(), None);
    let later = parse("2024-05-01T10:00:00.1234567Z").unwrap();
    let earlier = parse("2024-05-01T09:59:59.9999999Z").unwrap();

    store.set_checkpoint(later).await.unwrap();
    assert_eq!(store.checkpoint().await.unwrap(), Some(later));
    store.set_checkpoint(earlier).await.unwrap();
    assert_eq!(store.checkpoint().await.unwrap(), Some(earlier));
    drop(store);

    assert_eq!(fixture.store().checkpoint().await.unwrap(), Some(earlier));
}

async fn a_row_is_handled_only_at_the_etag_it_was_settled_with(fixture: Fixture) {
    let store = fixture.store();
    let row = version("r1", "W/1", "2024-05-01T10:00:00Z");
    let newer = version("r1", "W/2", "2024-05-01T11:00:00Z");
    let other = version("r2", "W/1", "2024-05-01T10:00:00Z");
    assert_eq!(
        store.handled(&[row.clone(), other.clone()]).await.unwrap(),
        [false, false]
    );

    store
        .settle(&SettleBatch::rows(vec![settled(&row, skipped())]))
        .await
        .unwrap();

    assert_eq!(
        store.handled(&[row, newer, other]).await.unwrap(),
        [true, false, false]
    );
    assert_eq!(store.handled(&[]).await.unwrap(), Vec::<bool>::new());
}

async fn a_settle_records_every_outcome_customer_and_dead_letter_it_carries(fixture: Fixture) {
    let store = fixture.store();
    let rows: Vec<RowVersion> = ["d", "r", "s", "u"]
        .iter()
        .map(|rk| version(rk, "W/1", "2024-05-01T10:00:00Z"))
        .collect();
    let (ana, bo) = (
        merged_customer(1, 3, may_2024()),
        merged_customer(2, 1, may_2024()),
    );
    let refused = dead_letter(&bo, "duplicate email", may_2024());
    let batch = SettleBatch {
        rows: vec![
            settled(&rows[0], delivered()),
            settled(&rows[1], rejected("no CustomerInfo")),
            settled(&rows[2], skipped()),
            settled(&rows[3], unidentifiable()),
        ],
        customers: vec![ana.clone(), bo.clone()],
        dead_letters: vec![refused.clone()],
        resolved: vec![],
    };

    store.settle(&batch).await.unwrap();

    let rejected_rows = store.rejected().await.unwrap();
    assert_eq!(row_keys(&rejected_rows), ["r"]);
    assert_eq!(rejected_rows[0].row, rows[1]);
    assert_eq!(rejected_rows[0].outcome, rejected("no CustomerInfo"));
    assert_eq!(
        rejected_rows[0]
            .columns
            .as_ref()
            .and_then(|c| c.get("Note")),
        Some(&json!("kept"))
    );
    let skipped_rows = store.skipped().await.unwrap();
    assert_eq!(row_keys(&skipped_rows), ["s"]);
    assert_eq!(skipped_rows[0].outcome, skipped());
    let held = store.unidentifiable().await.unwrap();
    assert_eq!(row_keys(&held), ["u"]);
    assert_eq!(held[0].outcome, unidentifiable());
    // Rows not delivered are remembered; a delivered one may be (its customer's history
    // holds it), and is counted exactly when it is.
    let handled = store.handled(&rows).await.unwrap();
    assert_eq!(&handled[1..], [true, true, true]);
    assert_eq!(
        store.handled_len().await.unwrap(),
        3 + u64::from(handled[0])
    );
    let wanted = [
        ana.lead.key.clone(),
        "email:nobody@contoso.com".into(),
        bo.lead.key.clone(),
    ];
    assert_eq!(
        store.customers(&wanted).await.unwrap(),
        [Some(ana), None, Some(bo)]
    );
    assert_eq!(store.dead_letters().await.unwrap(), [refused]);
}

async fn a_rows_latest_settle_decides_the_list_it_is_on(fixture: Fixture) {
    let store = fixture.store();
    let first = version("r1", "W/1", "2024-05-01T10:00:00Z");
    let second = version("r1", "W/2", "2024-05-01T11:00:00Z");
    let third = version("r1", "W/3", "2024-05-01T12:00:00Z");
    store
        .settle(&SettleBatch::rows(vec![settled(&first, rejected("bad"))]))
        .await
        .unwrap();
    assert_eq!(row_keys(&store.rejected().await.unwrap()), ["r1"]);

    store
        .settle(&SettleBatch::rows(vec![settled(&second, skipped())]))
        .await
        .unwrap();
    assert!(store.rejected().await.unwrap().is_empty());
    let on_skipped = store.skipped().await.unwrap();
    assert_eq!(on_skipped.len(), 1);
    assert_eq!(on_skipped[0].row, second);

    store
        .settle(&SettleBatch::rows(vec![settled(&third, delivered())]))
        .await
        .unwrap();
    assert!(store.rejected().await.unwrap().is_empty());
    assert!(store.skipped().await.unwrap().is_empty());
    assert!(store.unidentifiable().await.unwrap().is_empty());
    // A row remembers one version: the first is not handled any more.
    assert_eq!(store.handled(&[first]).await.unwrap(), [false]);
}

async fn a_delivery_resolves_a_dead_letter_and_a_newer_customer_record_replaces_the_stored_one(
    fixture: Fixture,
) {
    let store = fixture.store();
    let (ana, bo) = (
        merged_customer(1, 1, may_2024()),
        merged_customer(2, 1, may_2024()),
    );
    let ana_letter = dead_letter(&ana, "refused", may_2024());
    let bo_letter = dead_letter(&bo, "refused", may_2024());
    store
        .settle(&SettleBatch {
            customers: vec![ana.clone(), bo.clone()],
            dead_letters: vec![ana_letter.clone(), bo_letter.clone()],
            ..SettleBatch::default()
        })
        .await
        .unwrap();
    let ana_again = merged_customer(1, 4, may_2024());
    let mut bo_again = bo_letter.clone();
    bo_again.attempts = 2;
    bo_again.reason = "refused again".into();

    store
        .settle(&SettleBatch {
            customers: vec![ana_again.clone()],
            dead_letters: vec![bo_again.clone()],
            resolved: vec![ana_letter.id.clone()],
            ..SettleBatch::default()
        })
        .await
        .unwrap();

    assert_eq!(store.dead_letters().await.unwrap(), [bo_again]);
    let read = store
        .customers(&[ana.lead.key.clone(), bo.lead.key.clone()])
        .await
        .unwrap();
    assert_eq!(read, [Some(ana_again), Some(bo)]);
    assert_eq!(store.all_customers().await.unwrap().len(), 2);
}

async fn customers_and_dead_letters_are_listed_in_key_order(fixture: Fixture) {
    let store = fixture.store();
    let customers: Vec<CustomerState> = [3, 1, 2]
        .into_iter()
        .map(|n| merged_customer(n, 1, may_2024()))
        .collect();
    let letters: Vec<DeadLetter> = customers
        .iter()
        .map(|c| dead_letter(c, "refused", may_2024()))
        .collect();
    store
        .settle(&SettleBatch {
            customers: customers.clone(),
            dead_letters: letters.clone(),
            ..SettleBatch::default()
        })
        .await
        .unwrap();

    let mut sorted = keys(&customers);
    sorted.sort();
    let all = store.all_customers().await.unwrap();
    assert_eq!(keys(&all), sorted);
    // Each read back complete, the summary included.
    for read in &all {
        let written = customers.iter().find(|c| c.lead.key == read.lead.key);
        assert_eq!(Some(read), written);
    }
    let mut ids: Vec<String> = letters.iter().map(|l| l.id.clone()).collect();
    ids.sort();
    let read: Vec<String> = store
        .dead_letters()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(read, ids);
}

async fn pruning_forgets_only_handled_rows_stamped_before_the_cutoff(fixture: Fixture) {
    let store = fixture.store();
    let old = version("old", "W/1", "2024-05-01T10:00:00Z");
    let new = version("new", "W/1", "2024-05-01T12:00:00Z");
    store
        .settle(&SettleBatch::rows(vec![
            settled(&old, skipped()),
            settled(&new, skipped()),
        ]))
        .await
        .unwrap();
    assert_eq!(store.handled_len().await.unwrap(), 2);

    let pruned = store
        .prune_handled(parse("2024-05-01T11:00:00Z").unwrap())
        .await
        .unwrap();

    assert_eq!(pruned, 1);
    assert_eq!(
        store.handled(&[old.clone(), new.clone()]).await.unwrap(),
        [false, true]
    );
    assert_eq!(store.handled_len().await.unwrap(), 1);
    // The lists are not pruned with the markers.
    assert_eq!(row_keys(&store.skipped().await.unwrap()), ["new", "old"]);
    assert_eq!(
        store
            .prune_handled(parse("2024-05-01T11:00:00Z").unwrap())
            .await
            .unwrap(),
        0
    );
}

async fn forgetting_a_person_removes_their_data_and_keeps_their_rows_handled(fixture: Fixture) {
    let store = fixture.store();
    let (ana, bo) = (
        merged_customer(1, 2, may_2024()),
        merged_customer(2, 1, may_2024()),
    );
    let about_ana = version("about-ana", "W/1", "2024-05-01T10:00:00Z");
    let unrelated = version("unrelated", "W/1", "2024-05-01T10:00:00Z");
    let mut mentions_ana = settled(&about_ana, rejected("sink refused"));
    mentions_ana.columns = Some(Map::from_iter([(
        "CustomerInfo".to_owned(),
        json!("{\"Email\":\"customer1@contoso.com\"}"),
    )]));
    store
        .settle(&SettleBatch {
            rows: vec![mentions_ana, settled(&unrelated, rejected("bad"))],
            customers: vec![ana.clone(), bo.clone()],
            dead_letters: vec![
                dead_letter(&ana, "refused", may_2024()),
                dead_letter(&bo, "refused", may_2024()),
            ],
            resolved: vec![],
        })
        .await
        .unwrap();
    let history = leadsync::state::personal::history_versions(&ana.lead.history);
    assert_eq!(history.len(), 2);

    let forgotten = store
        .forget(&Person::by_email("Customer1@Contoso.com"))
        .await
        .unwrap();

    assert_eq!(forgotten.customers.len(), 1);
    assert_eq!(forgotten.dead_letters.len(), 1);
    assert_eq!(forgotten.rejected, [about_ana.id]);
    let read = store
        .customers(&[ana.lead.key.clone(), bo.lead.key.clone()])
        .await
        .unwrap();
    assert_eq!(read, [None, Some(bo.clone())]);
    let letters = store.dead_letters().await.unwrap();
    assert_eq!(
        letters.iter().map(|l| &l.id).collect::<Vec<_>>(),
        [&bo.lead.external_key]
    );
    assert_eq!(row_keys(&store.rejected().await.unwrap()), ["unrelated"]);
    assert_eq!(
        store.handled(&history).await.unwrap(),
        vec![true; history.len()]
    );
    // Again: nothing more to forget, and nothing fails.
    let again = store
        .forget(&Person::by_email("customer1@contoso.com"))
        .await
        .unwrap();
    assert!(again.customers.is_empty() && again.dead_letters.is_empty());
}

async fn retention_removes_only_what_is_older_than_the_cutoff(fixture: Fixture) {
    let store = fixture.store();
    // The cutoff is after every write (the table store also goes by when the service
    // wrote a record), and before what is stamped in the future.
    let now = OffsetDateTime::now_utc();
    let cutoff = now + Duration::from_secs(24 * 3600);
    let future = now + Duration::from_secs(48 * 3600);
    let (old, recent) = (
        merged_customer(1, 1, may_2024()),
        merged_customer(2, 1, future),
    );
    let old_row = version("old", "W/1", "2024-05-01T10:00:00Z");
    let recent_row = RowVersion {
        timestamp: future,
        ..version("recent", "W/1", "2024-05-01T10:00:00Z")
    };
    store
        .settle(&SettleBatch {
            rows: vec![
                settled(&old_row, rejected("bad")),
                settled(&recent_row, rejected("bad")),
            ],
            customers: vec![old.clone(), recent.clone()],
            dead_letters: vec![
                dead_letter(&old, "refused", may_2024()),
                dead_letter(&recent, "refused", future),
            ],
            resolved: vec![],
        })
        .await
        .unwrap();

    let mut removed = 0;
    for _ in 0..20 {
        let pruned = store.prune_older_than(cutoff, 1).await.unwrap();
        removed += pruned.removed();
        if pruned.complete {
            break;
        }
    }

    assert_eq!(removed, 3);
    assert_eq!(
        keys(&store.all_customers().await.unwrap()),
        std::slice::from_ref(&recent.lead.key)
    );
    let letters = store.dead_letters().await.unwrap();
    assert_eq!(
        letters.iter().map(|l| &l.id).collect::<Vec<_>>(),
        [&recent.lead.external_key]
    );
    assert_eq!(row_keys(&store.rejected().await.unwrap()), ["recent"]);
}

async fn the_lease_is_held_by_its_owner_and_keeps_a_second_process_out(fixture: Fixture) {
    let ttl = Duration::from_secs(30);
    let store = fixture.store();
    assert_eq!(store.acquire_lease("a", ttl).await.unwrap(), Lease::Held);
    // Renewing is taking it again.
    assert_eq!(store.acquire_lease("a", ttl).await.unwrap(), Lease::Held);

    match fixture.backend {
        // The file is locked: a second process cannot even open the store.
        Backend::File => {
            let second = fixture.open().err().expect("the file is locked");
            assert!(matches!(second, StateError::Locked { .. }), "{second}");
        }
        // The lease is exclusive until it is released.
        Backend::Table => {
            let second = fixture.store();
            match second.acquire_lease("b", ttl).await.unwrap() {
                Lease::HeldBy { owner, until } => {
                    assert_eq!(owner, "a");
                    assert!(until > OffsetDateTime::now_utc() + Duration::from_secs(20));
                }
                Lease::Held => panic!("two owners hold the lease"),
            }
            store.release_lease("a").await.unwrap();
            assert_eq!(second.acquire_lease("b", ttl).await.unwrap(), Lease::Held);
            assert!(matches!(
                store.acquire_lease("a", ttl).await.unwrap(),
                Lease::HeldBy { .. }
            ));
            // Releasing a lease one does not hold changes nothing.
            store.release_lease("a").await.unwrap();
            assert!(matches!(
                store.acquire_lease("a", ttl).await.unwrap(),
                Lease::HeldBy { .. }
            ));
        }
    }
    store.release_lease("a").await.unwrap();
}
