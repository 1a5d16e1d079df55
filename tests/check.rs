//! `leadsync check`: a readable report and an exit code, and a test lead through the daemon.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{many_rows, World};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn check_reports_a_reachable_table_with_leads_and_a_healthy_sink() {
    let world = World::new().await;
    world.insert(&many_rows(2, 1)).await;

    let report =
        leadsync::cli::check::check(&world.settings(), false, Duration::from_secs(1)).await;

    assert!(report.ok(), "{}", report.render());
    let text = report.render();
    assert!(text.contains("the marketplace has written to it"), "{text}");
    assert!(text.contains("jsonl: reachable"), "{text}");
}

#[tokio::test]
async fn check_fails_with_exit_one_and_explains_a_missing_table() {
    let world = World::new().await;
    let config = world.config_file("");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("MarketplaceLeads", "NotThereYet"),
    )
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_leadsync"))
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL table") && stdout.contains("NotThereYet does not exist yet"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_test_lead_sent_by_check_is_handled_by_the_running_daemon() {
    let world = World::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = world.settings();
    settings.metrics.listen = Some(format!("127.0.0.1:{port}"));
    let cancel = CancellationToken::new();
    let daemon = {
        let (settings, cancel) = (settings.clone(), cancel.clone());
        tokio::spawn(async move {
            leadsync::run(&settings, leadsync::RunOptions { once: false }, cancel).await
        })
    };

    let report = leadsync::cli::check::check(&settings, true, Duration::from_secs(20)).await;
    cancel.cancel();
    daemon.await.unwrap().unwrap();

    let text = report.render();
    assert!(report.ok(), "{text}");
    assert!(text.contains("handled by the daemon"), "{text}");
    assert!(
        world.delivered().is_empty(),
        "a test lead is not delivered by default"
    );
}

#[tokio::test]
async fn check_logs_in_to_the_smtp_server_without_sending_and_sends_one_test_message_when_asked() {
    use leadsync_testkit::smtp::{Security, SmtpServer};
    let server = SmtpServer::start(
        Security::StartTls,
        Some(("leads@contoso.com", "SMTPSECRET99")),
    )
    .await;
    let world = World::new().await;
    let ca = world.dir.path().join("ca.pem");
    std::fs::write(&ca, &server.cert_pem).unwrap();
    let sink = |password: &str| {
        format!(
            "[sink]\nkind = \"email\"\n[sink.email]\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\nusername = \"leads@contoso.com\"\npassword = {{ value = \"{password}\" }}\nfrom = \"leads@contoso.com\"\nto = [\"sales@contoso.com\"]\nretry = {{ max_attempts = 1 }}\n",
            server.port,
            ca.display()
        )
    };

    let healthy = leadsync::cli::check::check(
        &world.settings_with_sink(&sink("SMTPSECRET99")),
        false,
        Duration::from_secs(1),
    )
    .await;
    let sent_before_test = server.received().len();
    let refused = leadsync::cli::check::check(
        &world.settings_with_sink(&sink("WRONGSECRET77")),
        false,
        Duration::from_secs(1),
    )
    .await;
    let with_test = leadsync::cli::check::check(
        &world.settings_with_sink(&sink("SMTPSECRET99")),
        true,
        Duration::from_millis(100),
    )
    .await;

    let text = healthy.render();
    assert!(
        text.contains("ok   sink       email: reachable and authorised"),
        "{text}"
    );
    assert_eq!(sent_before_test, 0, "check sends nothing by default");
    let text = refused.render();
    assert!(!refused.ok(), "{text}");
    assert!(text.contains("FAIL sink") && text.contains("535"), "{text}");
    assert!(!text.contains("WRONGSECRET77"), "{text}");
    let text = with_test.render();
    assert!(text.contains("ok   test mail"), "{text}");
    let received = server.received();
    assert_eq!(received.len(), 1, "{text}");
    assert!(
        received[0].data.contains("Subject: [TEST] leadsync check"),
        "{}",
        received[0].data
    );
}
