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
