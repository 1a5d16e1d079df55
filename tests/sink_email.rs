//! The email alert sink against a real SMTP server in this process
//! (`leadsync_testkit::smtp`: mailin's SMTP state machine over tokio and rustls, a
//! certificate made per test), with STARTTLS or implicit TLS, AUTH PLAIN/LOGIN, and
//! scripted replies (a 451 then acceptance, a 552, a 550 for a recipient).

mod common;

use common::merged_lead as lead;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{capture_logs, customer, lead_row, World};
use leadsync::config::Settings;
use leadsync::sink::email::{EmailSettings, EmailSink, DIGEST_FILE};
use leadsync::sink::{LeadSink, Outcome};
use leadsync_testkit::smtp::{At, Received, Security, SmtpServer};
use serde_json::json;

const USER: &str = "leads@contoso.com";
const PASSWORD: &str = "SMTPPASSWORDSECRET42";

/// A test's SMTP server and a folder for its CA file and state.
struct Setup {
    server: SmtpServer,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new(security: Security) -> Setup {
        let server = SmtpServer::start(security, Some((USER, PASSWORD))).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &server.cert_pem).unwrap();
        Setup { server, dir }
    }

    /// The `[sink.email]` keys that reach this server, then `extra`.
    fn toml(&self, tls: &str, password: &str, extra: &str) -> String {
        format!(
            "host = \"127.0.0.1\"\nport = {port}\ntls = \"{tls}\"\nca_file = \"{ca}\"\nusername = \"{USER}\"\npassword = {{ value = \"{password}\" }}\nfrom = \"Marketplace leads <{USER}>\"\nto = [\"sales@contoso.com\", \"Sales Lead <lead@contoso.com>\"]\nsubject_prefix = \"[leads] \"\ntimeout = \"5s\"\nretry = {{ max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"50ms\" }}\n{extra}",
            port = self.server.port,
            ca = self.dir.path().join("ca.pem").display(),
        )
    }

    fn settings(&self, tls: &str, password: &str, extra: &str) -> EmailSettings {
        let text = self.toml(tls, password, extra);
        common::section(&text)
    }

    fn sink(&self, extra: &str) -> EmailSink {
        EmailSink::new(
            &self.settings("starttls", PASSWORD, extra),
            &self.dir.path().join("state"),
        )
        .expect("the sink builds")
    }
}

const CONTACT: &str = "AppSource (SPZA)-PLT | contoso.analytics";
const TRIAL: &str = "AzureMarketplace-StartTestDrive | contoso.analytics";
const BUY: &str = "AzureMarketplace-INS | contoso.analytics";

/// A message's subject and its decoded text and HTML parts.
struct Mail {
    subject: String,
    text: String,
    html: String,
}

/// Undoes quoted-printable (RFC 2045 6.7): soft line breaks and `=XX`.
fn unquote(body: &str) -> String {
    let body = body.replace("=\n", "");
    let bytes = body.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 3 <= bytes.len() {
            if let Ok(b) = u8::from_str_radix(&body[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn parse(message: &Received) -> Mail {
    let data = &message.data.replace("\r\n", "\n");
    let (head, _) = data.split_once("\n\n").unwrap();
    let head = head.replace("\n ", " ");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {head}"))
            .to_owned()
    };
    let content_type = header("Content-Type");
    assert!(
        content_type.starts_with("multipart/alternative"),
        "{content_type}"
    );
    let boundary = content_type
        .split("boundary=\"")
        .nth(1)
        .and_then(|b| b.split('"').next())
        .unwrap();
    let mut parts = HashMap::new();
    for part in data.split(&format!("--{boundary}")).skip(1) {
        let Some((part_head, body)) = part.trim_start_matches('\n').split_once("\n\n") else {
            continue;
        };
        // The closing delimiter's `--` and what follows it is no part.
        let Some(kind) = part_head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: "))
        else {
            continue;
        };
        let kind = kind.split(';').next().unwrap().to_owned();
        let encoding = part_head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Transfer-Encoding: "))
            .unwrap_or("7bit");
        let body = match encoding {
            "quoted-printable" => unquote(body),
            "7bit" | "8bit" => body.to_owned(),
            other => panic!("unexpected encoding {other}"),
        };
        parts.insert(kind, body);
    }
    Mail {
        subject: header("Subject"),
        text: parts.remove("text/plain").expect("a text/plain part"),
        html: parts.remove("text/html").expect("a text/html part"),
    }
}

#[tokio::test]
async fn a_trial_sends_one_message_with_text_and_html_to_every_recipient() {
    let setup = Setup::new(Security::StartTls).await;
    let mut info = customer(1);
    info["Company"] = json!("Fabrikam & <Sons>");
    let trial = lead(info, &[CONTACT, TRIAL]);

    let outcomes = setup.sink("").deliver(std::slice::from_ref(&trial)).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let received = setup.server.received();
    assert_eq!(received.len(), 1);
    let message = &received[0];
    assert_eq!(message.to, ["sales@contoso.com", "lead@contoso.com"]);
    assert_eq!(message.from, USER);
    assert!(message.tls, "STARTTLS was used");
    assert_eq!(message.user.as_deref(), Some(USER));
    let mail = parse(message);
    assert_eq!(
        mail.subject,
        "[leads] New trial: First1 Last1 (Fabrikam & <Sons>)"
    );
    for expected in [
        "Customer:  First1 Last1",
        "Company:   Fabrikam & <Sons>",
        "Email:     customer1@contoso.com",
        "Offer:     Contoso Analytics (contoso.analytics)",
        "Action:    Test drive started via AzureMarketplace",
        "When:      2024-05-02 10:00 UTC",
        "Stage:     trial",
        "Follow up by: 2024-05-03 10:00 UTC",
        "check in on the trial within 24 hours",
    ] {
        assert!(
            mail.text.contains(expected),
            "{expected:?} in {}",
            mail.text
        );
    }
    for expected in [
        "<h2 style=\"font-size:18px\">New trial: First1 Last1 (Fabrikam &amp; &lt;Sons&gt;)</h2>",
        "<th align=\"left\" valign=\"top\">Company</th><td>Fabrikam &amp; &lt;Sons&gt;</td>",
        "<td>Test drive started via AzureMarketplace</td>",
        "<strong>Follow up by:</strong> 2024-05-03 10:00 UTC",
        "check in on the trial within 24 hours",
    ] {
        assert!(
            mail.html.contains(expected),
            "{expected:?} in {}",
            mail.html
        );
    }
    assert!(!mail.html.contains("<Sons>"), "{}", mail.html);
}

#[tokio::test]
async fn implicit_tls_with_a_login_delivers() {
    let setup = Setup::new(Security::ImplicitTls).await;
    let sink = EmailSink::new(
        &setup.settings("tls", PASSWORD, ""),
        &setup.dir.path().join("state"),
    )
    .unwrap();

    let outcomes = sink.deliver(&[lead(customer(1), &[BUY])]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let received = setup.server.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].tls);
    assert_eq!(received[0].user.as_deref(), Some(USER));
    assert!(parse(&received[0])
        .subject
        .contains("New customer: First1 Last1"));
}

#[tokio::test]
async fn a_451_is_retried_and_the_message_delivered_once() {
    let setup = Setup::new(Security::StartTls).await;
    setup
        .server
        .script([(At::Rcpt, 451, "4.3.0 Temporary lookup failure")]);

    let outcomes = setup.sink("").deliver(&[lead(customer(1), &[TRIAL])]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(setup.server.received().len(), 1);
    assert!(setup.server.replies().contains(&451));
    assert_eq!(setup.server.connections(), 2, "one attempt, one retry");
}

#[tokio::test]
async fn a_451_until_the_attempts_run_out_leaves_the_lead_for_later() {
    let setup = Setup::new(Security::StartTls).await;
    setup.server.script([(At::Mail, 451, "4.3.0 try later"); 3]);

    let outcomes = setup.sink("").deliver(&[lead(customer(1), &[TRIAL])]).await;

    assert!(
        matches!(&outcomes[0], Outcome::RetryLater { reason, .. } if reason.contains("451")),
        "{outcomes:?}"
    );
    assert!(setup.server.received().is_empty());
}

#[tokio::test]
async fn a_535_is_an_endpoint_failure_and_the_password_is_nowhere() {
    let setup = Setup::new(Security::StartTls).await;
    let wrong = "WRONGPASSWORDSECRET7";
    let settings = setup.settings("starttls", wrong, "");
    let sink = EmailSink::new(&settings, &setup.dir.path().join("state")).unwrap();
    let (logs, guard) = capture_logs(tracing_subscriber::EnvFilter::new("trace"));

    let outcomes = sink
        .deliver(&[lead(customer(1), &[TRIAL]), lead(customer(2), &[TRIAL])])
        .await;
    let health = sink.healthcheck().await;
    drop(guard);

    let [Outcome::EndpointFailed { reason }, Outcome::EndpointFailed { .. }] = &outcomes[..] else {
        panic!("{outcomes:?}")
    };
    assert!(reason.contains("535"), "{reason}");
    assert!(reason.contains("sink.email.password"), "{reason}");
    assert_eq!(
        setup.server.connections(),
        2,
        "the second lead waits without a login; the healthcheck tries once"
    );
    assert!(setup.server.received().is_empty());
    let health = health.expect_err("the login is refused").to_string();
    let toml = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"email\"\n[sink.email]\n{}",
        setup.toml("starttls", wrong, "")
    );
    let loaded = Settings::from_toml_with_env(&toml, Path::new("t.toml"), &HashMap::new()).unwrap();
    let texts = [
        format!("{settings:?}"),
        format!("{sink:?}"),
        format!("{outcomes:?}"),
        format!("{loaded:#?}"),
        health,
        logs.text(),
    ];
    for text in &texts {
        assert!(!text.contains(wrong), "{text}");
        assert!(!text.contains("customer2@contoso.com"), "{text}");
    }
}

#[tokio::test]
async fn a_552_rejects_the_lead_quoting_the_reply() {
    let setup = Setup::new(Security::StartTls).await;
    setup.server.script([(
        At::DataEnd,
        552,
        "5.3.4 Message size exceeds fixed maximum message size",
    )]);

    let outcomes = setup.sink("").deliver(&[lead(customer(1), &[TRIAL])]).await;

    let [Outcome::Rejected { reason }] = &outcomes[..] else {
        panic!("{outcomes:?}")
    };
    assert!(
        reason.contains("552") && reason.contains("size"),
        "{reason}"
    );
    assert_eq!(setup.server.connections(), 1, "not retried");
}

#[tokio::test]
async fn a_refused_recipient_is_an_endpoint_failure_naming_sink_email_to() {
    let setup = Setup::new(Security::StartTls).await;
    setup.server.script([(
        At::Rcpt,
        550,
        "5.1.1 <lead@contoso.com>: Recipient address rejected: User unknown",
    )]);

    let outcomes = setup.sink("").deliver(&[lead(customer(1), &[TRIAL])]).await;

    let [Outcome::EndpointFailed { reason }] = &outcomes[..] else {
        panic!("{outcomes:?}")
    };
    assert!(reason.contains("sink.email.to"), "{reason}");
    assert!(reason.contains("550"), "{reason}");
}

#[tokio::test]
async fn a_server_that_refuses_connections_or_fails_tls_is_an_endpoint_failure() {
    let setup = Setup::new(Security::StartTls).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused = setup.toml("starttls", PASSWORD, "").replace(
        &format!("port = {}", setup.server.port),
        &format!("port = {port}"),
    );
    let refused: EmailSettings = toml_settings(&refused);
    // Implicit TLS against a server that starts in plain text.
    let no_tls = setup.settings("tls", PASSWORD, "");

    for settings in [refused, no_tls] {
        let sink = EmailSink::new(&settings, &setup.dir.path().join("state")).unwrap();
        let outcomes = sink.deliver(&[lead(customer(1), &[TRIAL])]).await;
        assert!(
            matches!(&outcomes[0], Outcome::EndpointFailed { reason } if reason.contains("sink.email.host")),
            "{outcomes:?}"
        );
    }
    assert!(setup.server.received().is_empty());
}

fn toml_settings(text: &str) -> EmailSettings {
    common::section(text)
}

#[tokio::test]
async fn no_message_for_a_do_not_contact_customer_a_stage_reached_before_or_a_replay() {
    let setup = Setup::new(Security::StartTls).await;
    let sink = setup.sink("");
    let mut dnc = lead(customer(1), &[TRIAL]);
    dnc.do_not_contact = true;
    let batch = vec![
        dnc,
        lead(customer(2), &[BUY, BUY]),   // bought again: nothing new
        lead(customer(3), &[BUY, TRIAL]), // a trial after a purchase: no rise
        lead(customer(4), &[CONTACT]),    // not a watched stage
        lead(customer(5), &[TRIAL, BUY]), // reached active
    ];

    let first = sink.deliver(&batch).await;
    let replay = sink.deliver(&batch).await;

    assert_eq!(first, vec![Outcome::Delivered; 5]);
    assert_eq!(replay, vec![Outcome::Delivered; 5]);
    let subjects: Vec<String> = setup
        .server
        .received()
        .iter()
        .map(|m| parse(m).subject)
        .collect();
    assert_eq!(subjects, ["[leads] New customer: First5 Last5 (Company 5)"]);
}

#[tokio::test]
async fn a_digest_gathers_several_leads_into_one_message_once_due() {
    let setup = Setup::new(Security::StartTls).await;
    let sink = setup.sink("digest = \"2s\"");
    let batch = [
        lead(customer(1), &[TRIAL]),
        lead(customer(2), &[CONTACT]),
        lead(customer(3), &[TRIAL, BUY]),
    ];

    let outcomes = sink.deliver(&batch).await;
    sink.sync().await.unwrap();
    sink.tick().await;
    let before_due = setup.server.received().len();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    sink.tick().await;
    sink.tick().await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 3]);
    assert_eq!(before_due, 0, "nothing before the digest is due");
    let received = setup.server.received();
    assert_eq!(received.len(), 1, "one digest, sent once");
    let mail = parse(&received[0]);
    assert_eq!(mail.subject, "[leads] 2 marketplace leads to follow up");
    for expected in [
        "New trial: First1 Last1 (Company 1)",
        "New customer: First3 Last3 (Company 3)",
    ] {
        assert!(mail.text.contains(expected), "{}", mail.text);
        assert!(mail.html.contains(expected), "{}", mail.html);
    }
    assert!(!mail.text.contains("First2"), "{}", mail.text);
    let queue = setup.dir.path().join("state").join(DIGEST_FILE);
    assert_eq!(
        std::fs::read(&queue).unwrap().len(),
        0,
        "the queue is emptied"
    );
}

#[tokio::test]
async fn a_crash_before_the_digest_is_due_loses_no_lead() {
    let setup = Setup::new(Security::StartTls).await;
    let before_crash = setup.sink("digest = \"1s\"");
    let outcomes = before_crash
        .deliver(&[lead(customer(1), &[TRIAL]), lead(customer(2), &[TRIAL])])
        .await;
    before_crash.sync().await.unwrap();
    // The process dies here: no tick, nothing sent.
    drop(before_crash);

    let after_restart = setup.sink("digest = \"1s\"");
    let more = after_restart.deliver(&[lead(customer(3), &[BUY])]).await;
    after_restart.sync().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    after_restart.tick().await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 2]);
    assert_eq!(more, vec![Outcome::Delivered]);
    let received = setup.server.received();
    assert_eq!(received.len(), 1);
    let mail = parse(&received[0]);
    assert_eq!(mail.subject, "[leads] 3 marketplace leads to follow up");
    for n in 1..=3 {
        assert!(
            mail.text.contains(&format!("First{n} Last{n}")),
            "{}",
            mail.text
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let queue = setup.dir.path().join("state").join(DIGEST_FILE);
        let mode = std::fs::metadata(queue).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[tokio::test]
async fn a_digest_the_server_refuses_stays_queued_and_new_alerts_wait() {
    let setup = Setup::new(Security::StartTls).await;
    let sink = setup.sink("digest = \"1s\"");
    sink.deliver(&[lead(customer(1), &[TRIAL])]).await;
    sink.sync().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    setup
        .server
        .script([(At::Rcpt, 550, "5.1.1 <sales@contoso.com>: User unknown")]);

    sink.tick().await;
    let waiting = sink.deliver(&[lead(customer(2), &[TRIAL])]).await;
    sink.tick().await;

    assert!(
        matches!(&waiting[0], Outcome::EndpointFailed { reason } if reason.contains("sink.email.to")),
        "{waiting:?}"
    );
    let received = setup.server.received();
    assert_eq!(received.len(), 1, "sent on the next tick");
    assert!(parse(&received[0]).text.contains("First1 Last1"));
}

#[tokio::test]
async fn leads_flow_from_the_table_to_email_once_per_stage_and_never_for_a_test_lead() {
    let setup = Setup::new(Security::StartTls).await;
    let world = World::new().await;
    let sink_toml = format!(
        "[sink]\nkind = \"email\"\n[sink.email]\n{}",
        setup.toml("starttls", PASSWORD, "")
    );
    let settings = world.settings_with_sink(&sink_toml);
    let test_lead = leadsync::cli::check::test_lead_row("r000003", "MSFT_TEST_636926568324131180");
    world
        .insert(&[
            lead_row("p00", "r000001", CONTACT, customer(1)),
            lead_row("p00", "r000002", TRIAL, customer(2)),
            test_lead,
        ])
        .await;

    let first = common::run_once(&settings).await;
    world
        .insert(&[lead_row("p01", "r000004", BUY, customer(1))])
        .await;
    let second = common::run_once(&settings).await;
    let third = common::run_once(&settings).await;

    for report in [&first, &second, &third] {
        assert_eq!(report.exit_code(), 0, "{report:?}");
    }
    assert_eq!(first.totals.delivered, 2, "{:?}", first.totals);
    assert_eq!(first.totals.skipped, 1, "the test lead: {:?}", first.totals);
    let subjects: Vec<String> = setup
        .server
        .received()
        .iter()
        .map(|m| parse(m).subject)
        .collect();
    assert_eq!(
        subjects,
        [
            "[leads] New trial: First2 Last2 (Company 2)",
            "[leads] New customer: First1 Last1 (Company 1)"
        ]
    );
}

#[tokio::test]
async fn a_digest_in_the_daemon_is_sent_by_a_later_run_after_a_restart() {
    let setup = Setup::new(Security::StartTls).await;
    let world = World::new().await;
    let sink_toml = format!(
        "[sink]\nkind = \"email\"\n[sink.email]\n{}",
        setup.toml("starttls", PASSWORD, "digest = \"1s\"")
    );
    let settings = world.settings_with_sink(&sink_toml);
    world
        .insert(&[
            lead_row("p00", "r000001", TRIAL, customer(1)),
            lead_row("p00", "r000002", TRIAL, customer(2)),
        ])
        .await;

    let first = common::run_once(&settings).await;
    let after_first = setup.server.received().len();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = common::run_once(&settings).await;

    assert_eq!(first.exit_code(), 0);
    assert_eq!(second.exit_code(), 0);
    assert_eq!(first.totals.delivered, 2);
    assert_eq!(after_first, 0, "the digest was not due yet");
    let received = setup.server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        parse(&received[0]).subject,
        "[leads] 2 marketplace leads to follow up"
    );
}

#[test]
fn addresses_and_unsafe_combinations_are_refused_at_config_load_naming_the_key() {
    let base = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[sink]\nkind = \"email\"\n[sink.email]\nhost = \"smtp.contoso.com\"\n";
    for (extra, key) in [
        ("from = \"leads@contoso.com\"\nto = [\"sales@contoso.com\", \"not an address\"]\n", "sink.email.to"),
        ("from = \"leads@contoso.com\"\nto = []\n", "sink.email.to"),
        ("from = \"leads.contoso.com\"\nto = [\"sales@contoso.com\"]\n", "sink.email.from"),
        ("from = \"leads@contoso.com\"\nto = [\"sales@contoso.com\"]\ntls = \"none\"\nusername = \"u\"\npassword = { env = \"X\" }\n", "sink.email.tls"),
        ("from = \"leads@contoso.com\"\nto = [\"sales@contoso.com\"]\nusername = \"u\"\n", "sink.email.password"),
        ("from = \"leads@contoso.com\"\nto = [\"sales@contoso.com\"]\nstages = [\"do_not_contact\"]\n", "sink.email.stages"),
        ("from = \"leads@contoso.com\"\nto = [\"sales@contoso.com\"]\ndigest = \"1h\"\n[state]\nbackend = \"table\"\n", "sink.email.digest"),
    ] {
        let text = format!("{base}{extra}");
        let error = Settings::from_toml_with_env(&text, Path::new("t.toml"), &HashMap::new())
            .expect_err(extra)
            .to_string();
        assert!(error.contains(key), "{key}: {error}");
    }
}

#[test]
fn the_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/email.example.toml");

    let settings = Settings::load_with_env(&path, &HashMap::new())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    assert_eq!(settings.sink.kind, leadsync::config::SinkKind::Email);
    assert_eq!(settings.sink.batch_size(), 50);
    let email = settings.sink.email.expect("a [sink.email] section");
    assert_eq!(
        email.stages,
        [leadsync::lead::Stage::Trial, leadsync::lead::Stage::Active]
    );
    assert_eq!(email.to.len(), 2);
    assert!(email.digest.is_none());
    assert!(format!("{:?}", email.password).contains("Env("));
}

#[tokio::test]
async fn a_message_links_the_crm_record_when_another_sink_knows_it() {
    let setup = Setup::new(Security::StartTls).await;
    let trial = lead(customer(1), &[TRIAL]);
    let link = "https://contoso.crm.dynamics.com/main.aspx?etn=lead&id=7a1e&pagetype=entityrecord";

    let outcomes = setup
        .sink("")
        .deliver_linked(std::slice::from_ref(&trial), &[Some(link.into())])
        .await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let mail = parse(&setup.server.received()[0]);
    assert!(
        mail.text.contains(&format!("In the CRM: {link}")),
        "{}",
        mail.text
    );
    assert!(
        mail.html.contains("<a href=\"https://contoso.crm.dynamics.com/main.aspx?etn=lead&amp;id=7a1e&amp;pagetype=entityrecord\">Open in the CRM</a>"),
        "{}",
        mail.html
    );
}
