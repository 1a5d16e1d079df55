//! Personal data (issue 30): files leadsync creates are private whatever the umask,
//! and the logs name no one.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{customer, lead_row, many_rows, serve, World};
use serde_json::json;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `leadsync --config <config> <args>` under `umask 000`, with `env` set.
fn leadsync(config: &Path, args: &str, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!("umask 000; exec \"$0\" --config \"$1\" {args}"))
        .arg(env!("CARGO_BIN_EXE_leadsync"))
        .arg(config);
    command.env_remove("RUST_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

#[tokio::test]
async fn files_leadsync_creates_are_private_whatever_the_umask_and_a_shared_state_file_is_named() {
    let world = World::new().await;
    world.insert(&many_rows(3, 1)).await;
    let out_dir = world.dir.path().join("out/leads");
    let text = world.toml("").replace(
        &world.output().display().to_string(),
        &out_dir.join("leads.jsonl").display().to_string(),
    );
    let config = world.dir.path().join("leadsync.toml");
    std::fs::write(&config, text).unwrap();

    let run = leadsync(&config, "run --once", &[]);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let export_path = world.dir.path().join("export.jsonl");
    let export = leadsync(
        &config,
        &format!("export --format jsonl --output {}", export_path.display()),
        &[],
    );
    assert!(export.status.success(), "{export:?}");

    let state = world.state_dir();
    assert_eq!(mode(&state), 0o700, "state directory");
    assert_eq!(mode(&state.join("leadsync.redb")), 0o600, "state file");
    assert_eq!(mode(&out_dir), 0o700, "JSONL directory");
    assert_eq!(
        mode(out_dir.parent().unwrap()),
        0o700,
        "its parent, created too"
    );
    assert_eq!(mode(&out_dir.join("leads.jsonl")), 0o600, "JSONL file");
    assert_eq!(mode(&export_path), 0o600, "export");

    // A state file made readable by others (an older leadsync, a copy) is named.
    std::fs::set_permissions(
        state.join("leadsync.redb"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let again = leadsync(&config, "run --once", &[]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(stderr.contains("leadsync.redb"), "{stderr}");
}

/// A receiver that refuses customer 2 with a 400 quoting the address, and answers
/// customer 3 with 503s that quote it too: what CRMs do.
async fn echoing(body: String) -> Response {
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let email = body
        .pointer("/UserDetails/Email")
        .and_then(|e| e.as_str())
        .unwrap_or_default()
        .to_owned();
    if email.starts_with("customer2@") {
        return (
            StatusCode::BAD_REQUEST,
            format!("{{\"error\":\"duplicate contact {email}\"}}"),
        )
            .into_response();
    }
    if email.starts_with("customer3@") {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot store {email} now"),
        )
            .into_response();
    }
    StatusCode::ACCEPTED.into_response()
}

/// A whole run, with a malformed `CustomerInfo` that holds an address, an email
/// field that is not one, a do-not-contact customer, a rejection and retries whose
/// bodies quote the address: at the default level, and at debug, no address of the
/// input reaches the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_run_logs_no_email_address_of_the_input() {
    let world = World::new().await;
    let mut rows = many_rows(4, 1);
    rows.push(lead_row(
        "p00",
        "bad-json",
        "AzureMarketplace-INS | contoso.analytics",
        json!("{\"Email\":\"hidden.person@contoso.com\", broken"),
    ));
    rows.push(lead_row(
        "p00",
        "dnc",
        "AzureMarketplace-DNC | contoso.analytics",
        customer(9),
    ));
    let mut no_address = customer(8);
    no_address["Email"] = json!("n/a");
    rows.push(lead_row(
        "p00",
        "na",
        "AzureMarketplace-INS | contoso.analytics",
        no_address,
    ));
    // `lead_row` takes `customer.to_string()`: the malformed one must go in as is.
    rows[4].insert(
        "CustomerInfo".into(),
        json!("{\"Email\":\"hidden.person@contoso.com\", broken"),
    );
    world.insert(&rows).await;
    let base = serve(Router::new().route("/leads", post(echoing))).await;
    let sink = format!(
        "[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"{base}/leads\"\nallow_http = true\nretry = {{ max_attempts = 2, initial_backoff = \"10ms\", max_backoff = \"20ms\" }}\n"
    );
    for level in ["info", "debug"] {
        let config = world.dir.path().join(format!("leadsync-{level}.toml"));
        std::fs::write(
            &config,
            format!(
                "{}\n[log]\nlevel = \"{level}\"\n",
                world.toml_with_sink("", &sink)
            ),
        )
        .unwrap();
        let run = leadsync(&config, "run --once", &[]);
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert_eq!(run.status.code(), Some(2), "customer 3 pending: {stderr}");
        assert!(
            stderr.contains("rejected") && stderr.contains("[email]"),
            "the failures were logged, their addresses masked: {stderr}"
        );
        for n in 0..10 {
            let address = format!("customer{n}@contoso.com");
            assert!(
                !stderr.contains(&address),
                "{level}: {address} in\n{stderr}"
            );
        }
        assert!(!stderr.contains("hidden.person"), "{level}:\n{stderr}");
        assert!(!stderr.contains("@contoso"), "{level}:\n{stderr}");
    }
}

// Issue 30, points 2 to 4: retention, erasure (`leadsync forget`) and access
// (`leadsync export --email`), on both state backends.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::HeaderMap;
use common::Backend;
use futures::StreamExt;
use serde_json::{Map, Value};

/// A CRM-like receiver: refuses (400) the customers whose address starts with one of
/// `refused`, accepts the others, and notes every request as (external key, address).
#[derive(Default)]
struct Receiver {
    refused: Vec<String>,
    seen: Mutex<Vec<(String, String)>>,
}

impl Receiver {
    fn seen_for(&self, address: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, email)| email.eq_ignore_ascii_case(address))
            .map(|(key, _)| key.clone())
            .collect()
    }
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    let email = body
        .pointer("/UserDetails/Email")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let key = headers
        .get(leadsync::sink::webhook::KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    receiver.seen.lock().unwrap().push((key, email.clone()));
    if receiver
        .refused
        .iter()
        .any(|p| email.starts_with(p.as_str()))
    {
        return (StatusCode::BAD_REQUEST, "{\"error\":\"refused\"}").into_response();
    }
    StatusCode::ACCEPTED.into_response()
}

/// A world on `backend` whose sink is a [`Receiver`]; `state_extra` and the overlap go
/// into the config. Returns the world, the config file and the receiver.
async fn crm_world(
    backend: Backend,
    refused: &[&str],
    overlap: &str,
    state_extra: &str,
) -> (World, std::path::PathBuf, Arc<Receiver>) {
    let world = World::with_backend(backend).await;
    let receiver = Arc::new(Receiver {
        refused: refused.iter().map(|s| s.to_string()).collect(),
        ..Receiver::default()
    });
    let base = serve(
        Router::new()
            .route("/leads", post(receive))
            .with_state(receiver.clone()),
    )
    .await;
    let sink = format!(
        "[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"{base}/leads\"\nallow_http = true\nretry = {{ max_attempts = 1, initial_backoff = \"10ms\", max_backoff = \"20ms\" }}\n"
    );
    let text = world
        .toml_with_sink("", &sink)
        .replace("overlap = \"10m\"", &format!("overlap = \"{overlap}\""))
        .replace("[state]\n", &format!("[state]\n{state_extra}"));
    let config = world.dir.path().join("leadsync.toml");
    std::fs::write(&config, text).unwrap();
    (world, config, receiver)
}

const INS: &str = "AzureMarketplace-INS | contoso.analytics";

/// A row the pipeline rejects (its CustomerInfo is not JSON), quoting `address`.
fn rejected_row(rk: &str, address: &str) -> Map<String, Value> {
    let mut row = lead_row("p00", rk, INS, json!({}));
    row.insert(
        "CustomerInfo".into(),
        json!(format!("{{\"Email\":\"{address}\", broken")),
    );
    row
}

/// A marketplace test lead of `address`: skipped (policy.test_leads = "skip").
fn test_lead_row(rk: &str, address: &str) -> Map<String, Value> {
    lead_row(
        "p00",
        rk,
        INS,
        json!({"FirstName": "MSFT_TEST_", "Email": address}),
    )
}

/// A lead that cannot be attributed (no address, no company or phone), whose
/// description names `address`.
fn unidentifiable_row(rk: &str, address: &str) -> Map<String, Value> {
    let mut row = lead_row("p00", rk, INS, json!({"FirstName": "Ann", "Email": "n/a"}));
    row.insert(
        "Description".into(),
        json!(format!("Please write to {address}")),
    );
    row
}

/// Runs `leadsync --config <config> <args>`; returns (exit code, stdout, stderr).
fn run_leadsync(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_leadsync"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Everything the state holds, as text: the file store's whole file (every table, and
/// any page still holding an old record), or every entity of every partition of the
/// state table (with its keys, which are hex of customer keys and row keys).
async fn whole_state(world: &World) -> String {
    match world.backend {
        Backend::File => {
            let bytes = std::fs::read(world.state_dir().join("leadsync.redb")).unwrap();
            String::from_utf8_lossy(&bytes).to_lowercase()
        }
        Backend::Table => {
            let settings = world.settings();
            let service = leadsync::source::service_client(&settings.source).unwrap();
            let mut stream = service
                .table_client(settings.state.table.clone())
                .query()
                .into_stream::<Map<String, Value>>();
            let mut text = String::new();
            while let Some(page) = stream.next().await {
                for entity in page.expect("query the state table").entities {
                    text.push_str(&Value::Object(entity).to_string().to_lowercase());
                    text.push('\n');
                }
            }
            assert!(text.contains("\"checkpoint\""), "read the state: {text}");
            text
        }
    }
}

/// The RowKeys of the lead table.
async fn source_row_keys(world: &World) -> Vec<String> {
    let settings = world.settings();
    let service = leadsync::source::service_client(&settings.source).unwrap();
    let mut stream = service
        .table_client(world.table.clone())
        .query()
        .into_stream::<Map<String, Value>>();
    let mut keys = Vec::new();
    while let Some(page) = stream.next().await {
        for entity in page.expect("query the lead table").entities {
            keys.push(entity["RowKey"].as_str().unwrap().to_owned());
        }
    }
    keys.sort();
    keys
}

/// Asserts that nothing in `state` names the person with `address`.
fn assert_no_trace(state: &str, address: &str, external_key: &str, backend: Backend) {
    for needle in [
        address.to_owned(),
        format!("email:{address}"),
        external_key.to_owned(),
        hex(address),
        hex(external_key),
    ] {
        assert!(
            !state.contains(&needle),
            "{backend:?}: {needle} is still in the state"
        );
    }
}

/// The access export holds every record about the person and nothing about anyone
/// else; `forget --table-rows` then leaves no trace of them in any table of the state,
/// deletes their rows from the lead table, says the CRM is the CRM's job; a person
/// forgotten without `--table-rows` is not delivered again when the overlap window is
/// read again; and another customer is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_leaves_no_trace_and_export_holds_every_record_on_both_backends() {
    for backend in [Backend::File, Backend::Table] {
        forget_and_export(backend).await;
    }
}

async fn forget_and_export(backend: Backend) {
    let (world, config, receiver) = crm_world(backend, &["customer1@"], "10m", "").await;
    let person = "customer1@contoso.com";
    let rows = vec![
        lead_row("p00", "a1", INS, customer(1)),
        lead_row("p00", "a2", "AppSource-PLT | contoso.insights", customer(1)),
        rejected_row("r1", "Customer1@Contoso.com"),
        test_lead_row("s1", person),
        unidentifiable_row("u1", person),
        lead_row("p00", "b1", INS, customer(2)),
        lead_row("p00", "c1", INS, customer(3)),
        // Others: an address that only ends like the person's, a rejected row of someone else.
        test_lead_row("s2", "jimcustomer1@contoso.com"),
        rejected_row("r2", "customer2@contoso.com"),
    ];
    world.insert(&rows).await;
    let (code, _, stderr) = run_leadsync(&config, &["run", "--once"]);
    assert!(code.is_some(), "{stderr}");
    let external_key = receiver.seen_for(person)[0].clone();
    assert!(external_key.starts_with("ls-"), "{external_key}");
    assert_eq!(receiver.seen_for("customer3@contoso.com").len(), 1);

    // Access: by address, any case.
    let (code, stdout, stderr) = run_leadsync(
        &config,
        &[
            "export",
            "--email",
            " Customer1@Contoso.COM",
            "--format",
            "jsonl",
        ],
    );
    assert_eq!(code, Some(0), "{backend:?}: {stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |t: &str| -> Vec<&Value> { lines.iter().filter(|l| l["record_type"] == t).collect() };
    assert_eq!(of("customer").len(), 1, "{backend:?}: {stdout}");
    assert_eq!(
        of("customer")[0]["lead"]["key"],
        json!(format!("email:{person}"))
    );
    let history: Vec<&str> = of("history")
        .iter()
        .map(|h| h["row"]["row_key"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["a1", "a2"], "{backend:?}");
    assert_eq!(of("dead_letter").len(), 1, "{backend:?}: {stdout}");
    assert_eq!(of("dead_letter")[0]["id"], json!(external_key));
    let row_of = |t: &str| -> Vec<String> {
        of(t)
            .iter()
            .map(|r| {
                r["row"]["id"]["row_key"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{r}"))
                    .to_owned()
            })
            .collect()
    };
    // The rows the CRM refused are rejected rows too (without columns: they are the
    // history's), besides the row that could not become a lead.
    assert_eq!(
        row_of("rejected"),
        ["a1", "a2", "r1"],
        "{backend:?}: {stdout}"
    );
    assert_eq!(row_of("skipped"), ["s1"], "{backend:?}: {stdout}");
    assert_eq!(row_of("unidentifiable"), ["u1"], "{backend:?}: {stdout}");
    assert_eq!(lines.len(), 9, "{backend:?}: {stdout}");
    assert!(
        !stdout.contains("customer2@") && !stdout.contains("jimcustomer1"),
        "{stdout}"
    );
    // The same by external key.
    let (code, by_key, _) = run_leadsync(
        &config,
        &["export", "--key", &external_key, "--format", "jsonl"],
    );
    assert_eq!(code, Some(0));
    assert_eq!(by_key.lines().count(), 9, "{backend:?}: {by_key}");

    let before = whole_state(&world).await;
    assert!(before.contains(person) && before.contains("customer2@contoso.com"));

    // Erasure, with the person's rows in the lead table.
    let (code, stdout, stderr) = run_leadsync(
        &config,
        &["forget", "--email", "CUSTOMER1@contoso.com", "--table-rows"],
    );
    assert_eq!(code, Some(0), "{backend:?}: {stdout} {stderr}");
    for text in [
        format!("removed customer        {external_key}"),
        format!("removed dead letter     {external_key}"),
        "deleted table row       PartitionKey=\"p00\" RowKey=\"a1\"".to_owned(),
        "CRM was not touched".to_owned(),
    ] {
        assert!(
            stdout.contains(&text),
            "{backend:?}: {text} not in {stdout}"
        );
    }
    // What it prints may end up in a job's log: the person by hashed key only.
    assert!(!stdout.to_lowercase().contains(person), "{stdout}");
    let state = whole_state(&world).await;
    assert!(
        state.contains("customer2@contoso.com"),
        "{backend:?}: another customer stays"
    );
    assert!(
        state.contains("jimcustomer1@contoso.com"),
        "{backend:?}: another's row stays"
    );
    // Someone else's address that ends like the person's is not the person's.
    let state = state.replace("jimcustomer1@contoso.com", "someone else");
    assert_no_trace(&state, person, &external_key, backend);
    assert_eq!(
        source_row_keys(&world).await,
        ["b1", "c1", "r2", "s2"],
        "{backend:?}: the person's rows are gone from the lead table, no one else's"
    );

    // Without --table-rows, by external key: the rows stay in the lead table, inside
    // the overlap window, and are not delivered again.
    let customer3 = "customer3@contoso.com";
    let key3 = receiver.seen_for(customer3)[0].clone();
    let (code, stdout, _) = run_leadsync(&config, &["forget", "--key", &key3]);
    assert_eq!(code, Some(0), "{backend:?}: {stdout}");
    assert!(stdout.contains("kept 1 rows of this person"), "{stdout}");
    let (_, _, stderr) = run_leadsync(&config, &["run", "--once"]);
    assert_eq!(
        receiver.seen_for(customer3).len(),
        1,
        "{backend:?}: not delivered again: {stderr}"
    );
    assert!(source_row_keys(&world).await.contains(&"c1".to_owned()));
    let state = whole_state(&world)
        .await
        .replace("jimcustomer1@contoso.com", "someone else");
    assert_no_trace(&state, customer3, &key3, backend);

    // Forgetting someone unknown says so.
    let (code, stdout, _) = run_leadsync(&config, &["forget", "--email", "nobody@contoso.com"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("nothing about this person"), "{stdout}");
}

/// `forget` refuses while a daemon holds the state: exit 4, nothing removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_refuses_while_a_daemon_holds_the_state_on_both_backends() {
    for backend in [Backend::File, Backend::Table] {
        let (world, config, _receiver) = crm_world(backend, &[], "10m", "").await;
        world
            .insert(&[lead_row("p00", "a1", INS, customer(1))])
            .await;
        let (code, _, stderr) = run_leadsync(&config, &["run", "--once"]);
        assert_eq!(code, Some(0), "{stderr}");
        let state = world.state();
        if backend == Backend::Table {
            let taken = state
                .acquire_lease("another-daemon", std::time::Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(taken, leadsync::state::Lease::Held);
        }
        let (code, stdout, stderr) =
            run_leadsync(&config, &["forget", "--email", "customer1@contoso.com"]);
        assert_eq!(code, Some(4), "{backend:?}: {stdout} {stderr}");
        assert_eq!(state.all_customers().await.unwrap().len(), 1, "{backend:?}");
    }
}

/// Retention through the daemon (`state.retention = "3s"`, `source.overlap = "1s"`):
/// what was settled before the cutoff goes (a customer not seen since, a dead letter,
/// a rejected, a skipped and an unidentifiable row), what came after stays, the
/// checkpoint does not move back, and a pruned customer's new event is delivered
/// again as an upsert on the same external key, as a new customer to leadsync,
/// without its old rows being sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_exactly_what_is_older_on_both_backends() {
    for backend in [Backend::File, Backend::Table] {
        retention(backend).await;
    }
}

async fn retention(backend: Backend) {
    let (world, config, receiver) = crm_world(
        backend,
        &["customer5@", "customer6@"],
        "1s",
        "retention = \"3s\"\n",
    )
    .await;
    world
        .insert(&[
            lead_row("p00", "a1", INS, customer(1)),
            lead_row("p00", "d1", INS, customer(5)),
            rejected_row("r1", "x@contoso.com"),
            test_lead_row("s1", "y@contoso.com"),
            unidentifiable_row("u1", "z@contoso.com"),
        ])
        .await;
    let (_, _, stderr) = run_leadsync(&config, &["run", "--once"]);
    let key1 = receiver.seen_for("customer1@contoso.com")[0].clone();
    {
        let state = world.state();
        assert_eq!(state.all_customers().await.unwrap().len(), 2, "{stderr}");
        assert_eq!(state.dead_letters().await.unwrap().len(), 1, "{stderr}");
    }
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    world
        .insert(&[
            lead_row("p00", "a2", INS, customer(2)),
            lead_row("p00", "d2", INS, customer(6)),
            rejected_row("r2", "x@contoso.com"),
            test_lead_row("s2", "y@contoso.com"),
            unidentifiable_row("u2", "z@contoso.com"),
        ])
        .await;
    let (_, _, stderr) = run_leadsync(&config, &["run", "--once"]);
    {
        let state = world.state();
        let customers: Vec<String> = state
            .all_customers()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.lead.key)
            .collect();
        assert_eq!(
            customers,
            ["email:customer2@contoso.com", "email:customer6@contoso.com"],
            "{backend:?}: {stderr}"
        );
        let letters: Vec<String> = state
            .dead_letters()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.payload.key)
            .collect();
        assert_eq!(letters, ["email:customer6@contoso.com"], "{backend:?}");
        let keys = |rows: Vec<leadsync::state::RecordedRow>| -> Vec<String> {
            rows.into_iter().map(|r| r.row.id.row_key).collect()
        };
        // d2: refused by the CRM, a rejected row besides its dead letter.
        assert_eq!(
            keys(state.rejected().await.unwrap()),
            ["d2", "r2"],
            "{backend:?}"
        );
        assert_eq!(keys(state.skipped().await.unwrap()), ["s2"], "{backend:?}");
        assert_eq!(
            keys(state.unidentifiable().await.unwrap()),
            ["u2"],
            "{backend:?}"
        );
        assert!(state.checkpoint().await.unwrap().is_some());
    }
    assert!(
        stderr.contains("older than state.retention"),
        "{backend:?}: {stderr}"
    );

    // Customer 1 comes back: a new customer to leadsync, the same record in the CRM.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    world
        .insert(&[lead_row("p00", "a3", INS, customer(1))])
        .await;
    let (_, _, stderr) = run_leadsync(&config, &["run", "--once"]);
    assert_eq!(
        receiver.seen_for("customer1@contoso.com"),
        [key1.clone(), key1],
        "{backend:?}: delivered once more, on the same key: {stderr}"
    );
    let state = world.state();
    let back = state
        .customers(&["email:customer1@contoso.com".to_owned()])
        .await
        .unwrap()
        .pop()
        .flatten()
        .expect("customer 1 is back");
    let history: Vec<&str> = back
        .lead
        .history
        .iter()
        .map(|h| h.row.row_key.as_str())
        .collect();
    assert_eq!(
        history,
        ["a3"],
        "{backend:?}: its old row was not read again"
    );
    assert_eq!(
        receiver.seen_for("customer2@contoso.com").len(),
        1,
        "{backend:?}"
    );
}

/// `state.retention`: 400 days unless set, `"forever"` keeps everything, and a
/// retention not longer than the overlap is refused, naming the key.
#[test]
fn retention_defaults_to_400_days_and_must_be_longer_than_the_overlap() {
    let parse = |state: &str| {
        let text = format!(
            "[source]\ntable = \"Leads\"\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\noverlap = \"15m\"\n[state]\n{state}"
        );
        leadsync::config::Settings::from_toml_with_env(
            &text,
            Path::new("test.toml"),
            &std::collections::HashMap::new(),
        )
    };
    let day = std::time::Duration::from_secs(24 * 3600);
    assert_eq!(parse("").unwrap().state.retention, Some(400 * day));
    assert_eq!(
        parse("retention = \"forever\"").unwrap().state.retention,
        None
    );
    assert_eq!(
        parse("retention = \"30d\"").unwrap().state.retention,
        Some(30 * day)
    );
    for bad in [
        "retention = \"15m\"",
        "retention = \"10s\"",
        "retention = \"soon\"",
    ] {
        let error = parse(bad).unwrap_err().to_string();
        assert!(error.contains("state.retention"), "{bad}: {error}");
    }
}

/// A customer merged from one row stamped `at`, as the pipeline stores it.
fn customer_at(n: usize, at: time::OffsetDateTime) -> leadsync::identity::CustomerState {
    let identity = leadsync::config::IdentitySettings::default();
    let mut columns = lead_row("p", &format!("c{n}"), INS, customer(n));
    columns.remove("PartitionKey");
    columns.remove("RowKey");
    let row = leadsync::source::row::RawRow {
        id: leadsync::source::row::RowId::new("p", format!("c{n}")),
        etag: format!("W/\"{n}\""),
        timestamp: at,
        columns,
    };
    let event = leadsync::lead::normalise(&row).expect("a valid lead row");
    let key = leadsync::identity::CustomerKey::Email(format!("customer{n}@contoso.com"));
    let mut state = leadsync::identity::CustomerState::new(&key, &identity);
    state.apply([&event], &identity);
    state
}

/// The store's step of retention, called with a step of one record per list until it
/// says it went round: it removes exactly the records older than the cutoff (a
/// customer last seen before it, a dead letter refused before it, a rejected row
/// stamped before it), never more than the step per call and list, and leaves the
/// handled markers and the checkpoint alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stores_retention_step_is_bounded_resumes_and_removes_exactly_the_older_records() {
    use leadsync::state::{DeadLetter, RowVersion, SettleBatch, Settled, Settlement};
    // Whole seconds: the checkpoint is stored to 100 ns.
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let (old, new) = (
        now - std::time::Duration::from_secs(30 * 24 * 3600),
        now + std::time::Duration::from_secs(3600),
    );
    let before = now + std::time::Duration::from_secs(60);
    for backend in [Backend::File, Backend::Table] {
        let world = World::with_backend(backend).await;
        let state = world.state();
        let customers = vec![
            customer_at(1, old),
            customer_at(2, new),
            customer_at(3, old),
        ];
        let letter = |c: &leadsync::identity::CustomerState, at| DeadLetter {
            id: c.lead.external_key.clone(),
            sink: "webhook".into(),
            reason: "refused".into(),
            payload: c.lead.clone(),
            rows: Vec::new(),
            at,
            attempts: 1,
        };
        let rejected = |rk: &str, at| Settlement {
            row: RowVersion {
                id: leadsync::source::row::RowId::new("p", rk),
                etag: format!("W/\"{rk}\""),
                timestamp: at,
            },
            outcome: Settled::Rejected {
                reason: "not a lead".into(),
            },
            columns: Some(Map::new()),
        };
        state
            .settle(&SettleBatch {
                rows: vec![
                    rejected("r1", old),
                    rejected("r2", new),
                    rejected("r3", old),
                    rejected("r4", old),
                ],
                dead_letters: vec![letter(&customers[0], old), letter(&customers[1], new)],
                customers: customers.clone(),
                ..SettleBatch::default()
            })
            .await
            .unwrap();
        state.set_checkpoint(now).await.unwrap();
        let handled = state.handled_len().await.unwrap();

        let mut total = leadsync::state::personal::Pruned::default();
        let mut calls = 0;
        loop {
            let step = state.prune_older_than(before, 1).await.unwrap();
            calls += 1;
            assert!(
                step.customers <= 1 && step.dead_letters <= 1 && step.rejected <= 1,
                "{backend:?}: {step:?}"
            );
            total.customers += step.customers;
            total.dead_letters += step.dead_letters;
            total.rejected += step.rejected;
            if step.complete {
                break;
            }
            assert!(calls < 20, "{backend:?}: never went round");
        }
        assert!(
            calls >= 3,
            "{backend:?}: bounded to one record per list, {calls} calls"
        );
        assert_eq!(
            (total.customers, total.dead_letters, total.rejected),
            (2, 1, 3),
            "{backend:?}"
        );
        let keys: Vec<String> = state
            .all_customers()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.lead.key)
            .collect();
        assert_eq!(keys, ["email:customer2@contoso.com"], "{backend:?}");
        let letters = state.dead_letters().await.unwrap();
        assert_eq!(letters.len(), 1, "{backend:?}");
        assert_eq!(letters[0].payload.key, "email:customer2@contoso.com");
        let rows: Vec<String> = state
            .rejected()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.row.id.row_key)
            .collect();
        assert_eq!(rows, ["r2"], "{backend:?}");
        assert_eq!(state.handled_len().await.unwrap(), handled, "{backend:?}");
        assert_eq!(state.checkpoint().await.unwrap(), Some(now), "{backend:?}");
        // Gone round: the next step finds nothing more.
        assert_eq!(
            state.prune_older_than(before, 1).await.unwrap().removed(),
            0
        );
    }
}
