//! Breaking things on purpose: SIGKILL during a backfill, and a CRM that fails a
//! seeded share of requests. Every customer must end in the CRM, once, complete.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{lead_row, serve, Backend, World};
use leadsync::config::ExternalKeyForm;
use leadsync::identity::{external_key, CustomerKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// A receiver that upserts by `X-Leadsync-Key`, optionally failing a seeded share of requests.
#[derive(Clone)]
struct Crm {
    records: Arc<Mutex<BTreeMap<String, Value>>>,
    requests: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    chaos: Arc<Mutex<Option<(StdRng, f64)>>>,
}

impl Crm {
    fn new(chaos: Option<(u64, f64)>) -> Self {
        Crm {
            records: Default::default(),
            requests: Default::default(),
            failures: Default::default(),
            chaos: Arc::new(Mutex::new(
                chaos.map(|(seed, p)| (StdRng::seed_from_u64(seed), p)),
            )),
        }
    }
}

async fn receive(State(crm): State<Crm>, headers: HeaderMap, body: String) -> Response {
    crm.requests.fetch_add(1, Ordering::SeqCst);
    let fault = {
        let mut chaos = crm.chaos.lock().unwrap();
        chaos.as_mut().and_then(|(rng, p)| {
            let roll: f64 = rng.gen();
            (roll < *p).then(|| rng.gen_range(0..3u8))
        })
    };
    match fault {
        Some(0) => {
            crm.failures.fetch_add(1, Ordering::SeqCst);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0")],
                "slow down",
            )
                .into_response();
        }
        Some(1) => {
            crm.failures.fetch_add(1, Ordering::SeqCst);
            return (StatusCode::SERVICE_UNAVAILABLE, "maintenance").into_response();
        }
        Some(_) => {
            // Longer than the client's request timeout: the client gives up, we do not store.
            crm.failures.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(700)).await;
            return (StatusCode::GATEWAY_TIMEOUT, "late").into_response();
        }
        None => {}
    }
    let key = headers
        .get("x-leadsync-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    crm.records.lock().unwrap().insert(key, body);
    StatusCode::OK.into_response()
}

fn sink_toml(url: &str) -> String {
    format!(
        "[sink]\nkind = \"webhook\"\nbatch_size = 50\n[sink.webhook]\nurl = \"{url}/leads\"\nallow_http = true\nrequest_timeout = \"300ms\"\nparallelism = 4\nretry = {{ max_attempts = 4, initial_backoff = \"10ms\", max_backoff = \"100ms\" }}\n"
    )
}

/// `n` events for `customers` customers; returns the rows and the events per customer email.
fn backfill(
    n: usize,
    customers: usize,
    seed: u64,
) -> (Vec<serde_json::Map<String, Value>>, HashMap<String, usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let actions = ["PLT", "StartTestDrive", "INS", "Create"];
    let mut per_customer = HashMap::new();
    let rows = (0..n)
        .map(|i| {
            let c = rng.gen_range(0..customers);
            let email = format!("buyer{c}@contoso.com");
            *per_customer.entry(email.clone()).or_default() += 1;
            lead_row(
                &format!("p{}", i % 8),
                &format!("r{i:06}"),
                &format!("AzureMarketplace-{} | contoso.offer{}", actions[rng.gen_range(0..4)], c % 5),
                json!({"FirstName": format!("Buyer{c}"), "LastName": "Test", "Email": email, "Company": "Contoso"}),
            )
        })
        .collect();
    (rows, per_customer)
}

/// Each customer is in the CRM exactly once, under its stable key, with every event merged.
fn assert_complete(crm: &Crm, per_customer: &HashMap<String, usize>) {
    let records = crm.records.lock().unwrap();
    assert_eq!(
        records.len(),
        per_customer.len(),
        "one CRM record per customer, none missing"
    );
    for (email, events) in per_customer {
        let key = external_key(&CustomerKey::Email(email.clone()), ExternalKeyForm::Hash);
        let record = records
            .get(&key)
            .unwrap_or_else(|| panic!("{email} missing from the CRM"));
        let summary = record["Description"].as_str().unwrap_or_default();
        let history_lines = summary.lines().filter(|l| l.starts_with("- ")).count();
        assert_eq!(
            history_lines, *events,
            "{email}: every event merged into the record"
        );
    }
}

async fn nothing_pending(world: &World) {
    let state = world.state();
    assert!(
        state.dead_letters().await.unwrap().is_empty(),
        "no dead letters"
    );
    let newest = world
        .source()
        .fetch_page(None, None, &Default::default())
        .await
        .unwrap()
        .rows
        .iter()
        .map(|r| r.timestamp)
        .max();
    // The checkpoint never passes a poll's start on the service's clock, a `Date` in
    // whole seconds: a poll that began within a second of the newest row stops there.
    assert!(
        state.checkpoint().await.unwrap() >= newest.map(|t| t - std::time::Duration::from_secs(1)),
        "the checkpoint reached the newest row"
    );
}

/// Each test named runs twice: `file::<name>` on the file store, `table::<name>` on the
/// table store (`state.backend = "table"`).
macro_rules! over_both_backends {
    ($($name:ident),* $(,)?) => {
        mod file {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Backend::File).await
            })*
        }
        mod table {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Backend::Table).await
            })*
        }
    };
}

over_both_backends!(
    sigkill_at_random_points_of_a_backfill_loses_and_doubles_nothing,
    a_crm_failing_a_fifth_of_requests_still_gets_every_customer_once,
);

async fn sigkill_at_random_points_of_a_backfill_loses_and_doubles_nothing(backend: Backend) {
    let world = World::with_backend(backend).await;
    let crm = Crm::new(None);
    let url = serve(
        Router::new()
            .route("/leads", post(receive))
            .with_state(crm.clone()),
    )
    .await;
    let (rows, per_customer) = backfill(3_000, 700, 7);
    world.insert(&rows).await;
    let config = world.config_file_with_sink("page_size = 150\n", &sink_toml(&url));
    let mut rng = StdRng::seed_from_u64(2024);
    let mut killed_with = Vec::new();
    // The daemons' warnings and errors, for the message should no kill fall mid-backfill.
    let log_path = world.dir.path().join("daemons.log");

    let customers = per_customer.len();
    for round in 0..20 {
        let before = crm.records.lock().unwrap().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_leadsync"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        if round % 2 == 0 {
            // Anywhere: start-up, state repair after the last kill, a page, a delivery.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(40..500))).await;
        } else {
            // Mid-delivery: soon after this daemon's first new record, however long a busy
            // machine takes to get there (once, every kill fell before any delivery).
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let delivered = || crm.records.lock().unwrap().len();
            while before < customers
                && delivered() == before
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..50))).await;
        }
        child.kill().unwrap(); // SIGKILL: no chance to finish the batch or persist anything
        child.wait().unwrap();
        killed_with.push(crm.records.lock().unwrap().len());
    }
    eprintln!("CRM records after each kill: {killed_with:?}");
    assert!(
        killed_with.first() < killed_with.last(),
        "the kills fell during the backfill: {killed_with:?}; what the daemons said:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    if backend == Backend::Table {
        // The last daemon died holding the processing lease (5s): `run --once` would
        // find it held and not poll.
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let finish = Command::new(env!("CARGO_BIN_EXE_leadsync"))
        .arg("--config")
        .arg(&config)
        .args(["run", "--once"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();

    assert_eq!(
        finish.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&finish.stderr)
    );
    assert_complete(&crm, &per_customer);
    nothing_pending(&world).await;
}

async fn a_crm_failing_a_fifth_of_requests_still_gets_every_customer_once(backend: Backend) {
    let world = World::with_backend(backend).await;
    let crm = Crm::new(Some((99, 0.2)));
    let url = serve(
        Router::new()
            .route("/leads", post(receive))
            .with_state(crm.clone()),
    )
    .await;
    let (rows, per_customer) = backfill(600, 200, 11);
    world.insert(&rows).await;
    let settings = world.settings_with_sink(&sink_toml(&url));

    let mut report = None;
    for _ in 0..20 {
        let r = leadsync::run(
            &settings,
            leadsync::RunOptions { once: true },
            Default::default(),
        )
        .await
        .unwrap();
        let done = r.exit_code() == 0;
        report = Some(r);
        if done {
            break;
        }
    }

    assert_eq!(report.unwrap().exit_code(), 0, "every lead settled");
    assert!(
        crm.failures.load(Ordering::SeqCst) > 0,
        "the chaos was real"
    );
    assert_complete(&crm, &per_customer);
    nothing_pending(&world).await;
}
