//! The Microsoft Teams alert sink against an in-process fake of a Workflows "When a
//! Teams webhook request is received" trigger: it checks the `sig` of the URL (401
//! without it, like the Workflows endpoint), answers 202 with an empty body for a
//! message with an Adaptive Card attachment and 400 with a JSON error for anything
//! else, and records every request with the time it arrived.

mod common;

use common::merged_lead as lead;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{capture_logs, customer, lead_row, serve, World};
use leadsync::config::Settings;
use leadsync::sink::alert::{AlertSink, TeamsSettings};
use leadsync::sink::{LeadSink, Outcome};
use serde_json::{json, Value};

const PATH: &str = "/workflows/0f1e2d3c/triggers/manual/paths/invoke";
const SIG: &str = "TEAMSSIGSECRET123";

#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: String::new(),
        }
    }
    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
    fn body(mut self, body: &str) -> Reply {
        self.body = body.into();
        self
    }
}

#[derive(Default)]
struct FakeState {
    script: VecDeque<Reply>,
    /// Every POST: when it arrived and its body.
    received: Vec<(Instant, Value)>,
    /// The cards the fake accepted (answered 202).
    accepted: Vec<Value>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.0.lock().unwrap().script.extend(replies);
    }
    fn received(&self) -> Vec<(Instant, Value)> {
        self.0.lock().unwrap().received.clone()
    }
    fn accepted(&self) -> Vec<Value> {
        self.0.lock().unwrap().accepted.clone()
    }
    async fn start(&self) -> String {
        serve(
            Router::new()
                .route(PATH, post(trigger))
                .with_state(self.clone()),
        )
        .await
    }
}

/// What the Workflows trigger takes: a message with at least one Adaptive Card.
fn card_problem(body: &Value) -> Option<&'static str> {
    if body["type"] != "message" {
        return Some("the body is not a message (type must be \"message\")");
    }
    let Some(attachments) = body["attachments"].as_array() else {
        return Some("a message needs an attachments array");
    };
    let card = attachments
        .iter()
        .find(|a| a["contentType"] == "application/vnd.microsoft.card.adaptive")?;
    if card["content"]["type"] != "AdaptiveCard" || !card["content"]["version"].is_string() {
        return Some("the attachment is not an Adaptive Card");
    }
    if !card["content"]["body"].is_array() {
        return Some("the Adaptive Card has no body");
    }
    None
}

async fn trigger(State(fake): State<Fake>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut state = fake.0.lock().unwrap();
    state.received.push((Instant::now(), value.clone()));
    let signed = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == format!("sig={SIG}")));
    if !signed {
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"code":"DirectApiAuthorizationRequired","message":"The request must be authenticated."}}"#,
        )
            .into_response();
    }
    if let Some(reply) = state.script.pop_front() {
        let mut response =
            (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
        for (name, value) in reply.headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        return response;
    }
    let has_card = value["attachments"].as_array().is_some_and(|a| {
        a.iter()
            .any(|a| a["contentType"] == "application/vnd.microsoft.card.adaptive")
    });
    match card_problem(&value).or((!has_card).then_some("no Adaptive Card attachment")) {
        Some(problem) => (
            StatusCode::BAD_REQUEST,
            json!({"error": {"code": "InvalidRequestContent", "message": problem}}).to_string(),
        )
            .into_response(),
        None => {
            state.accepted.push(value);
            StatusCode::ACCEPTED.into_response()
        }
    }
}

fn settings(base: &str, sig: &str, extra: &str) -> TeamsSettings {
    let retry = if extra.contains("retry =") {
        ""
    } else {
        "retry = { max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"2s\" }\n"
    };
    let text = format!(
        "url = {{ value = \"{base}{PATH}?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={sig}\" }}\nallow_http = true\n{retry}{extra}"
    );
    common::section(&text)
}

fn sink(base: &str) -> AlertSink {
    AlertSink::teams(&settings(base, SIG, "")).expect("the sink builds")
}

const CONTACT: &str = "AppSource (SPZA)-PLT | contoso.analytics";
const TRIAL: &str = "AzureMarketplace-StartTestDrive | contoso.analytics";
const BUY: &str = "AzureMarketplace-INS | contoso.analytics";

fn card(message: &Value) -> &Value {
    &message["attachments"][0]["content"]
}

fn facts(message: &Value) -> HashMap<String, String> {
    card(message)["body"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "FactSet")
        .flat_map(|b| b["facts"].as_array().unwrap().clone())
        .map(|f| {
            (
                f["title"].as_str().unwrap().to_owned(),
                f["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn texts(message: &Value) -> Vec<String> {
    card(message)["body"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "TextBlock")
        .map(|b| b["text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_trial_posts_one_adaptive_card_naming_the_customer_the_offer_and_the_next_step() {
    let fake = Fake::default();
    let base = fake.start().await;
    let trial = lead(customer(1), &[CONTACT, TRIAL]);

    let outcomes = sink(&base).deliver(std::slice::from_ref(&trial)).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 1);
    let message = &accepted[0];
    assert_eq!(message["type"], "message");
    assert_eq!(message["attachments"].as_array().unwrap().len(), 1);
    assert_eq!(
        message["attachments"][0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert_eq!(card(message)["type"], "AdaptiveCard");
    assert_eq!(card(message)["version"], "1.4");
    let texts = texts(message);
    assert_eq!(texts[0], "New trial: First1 Last1 (Company 1)");
    assert!(
        texts
            .iter()
            .any(|t| t.contains("check in on the trial within 24 hours")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("**Follow up by:** 2024-05-03 10:00 UTC")),
        "the marketplace's 24 hours from the event: {texts:?}"
    );
    let facts = facts(message);
    assert_eq!(facts["Customer"], "First1 Last1");
    assert_eq!(facts["Company"], "Company 1");
    assert_eq!(facts["Email"], "customer1@contoso.com");
    assert_eq!(facts["Offer"], "Contoso Analytics (contoso.analytics)");
    assert_eq!(facts["Action"], "Test drive started via AzureMarketplace");
    assert_eq!(facts["When"], "2024-05-02 10:00 UTC");
    assert_eq!(facts["Stage"], "trial");
}

#[tokio::test]
async fn one_message_per_stage_reached_and_none_for_a_record_that_raised_nothing() {
    let fake = Fake::default();
    let base = fake.start().await;
    let sink = sink(&base);
    let batch = vec![
        lead(customer(1), &[CONTACT]),        // initial interest: not watched
        lead(customer(2), &[CONTACT, TRIAL]), // reached trial
        lead(customer(3), &[TRIAL, BUY]),     // reached active
        lead(customer(4), &[BUY, BUY]),       // bought again: nothing new
        lead(customer(5), &[BUY, CONTACT]),   // a later "Contact me": nothing new
    ];

    let first = sink.deliver(&batch).await;
    let replay = sink.deliver(&batch).await;

    assert_eq!(first, vec![Outcome::Delivered; 5]);
    assert_eq!(replay, vec![Outcome::Delivered; 5]);
    let titles: Vec<String> = fake
        .accepted()
        .iter()
        .map(|m| texts(m)[0].clone())
        .collect();
    assert_eq!(
        titles,
        vec![
            "New trial: First2 Last2 (Company 2)",
            "New customer: First3 Last3 (Company 3)"
        ],
        "a replay of the same records posts nothing more"
    );
}

#[tokio::test]
async fn configured_stages_decide_what_posts() {
    let fake = Fake::default();
    let base = fake.start().await;
    let sink = AlertSink::teams(&settings(&base, SIG, "stages = [\"initial_interest\"]")).unwrap();

    let outcomes = sink
        .deliver(&[lead(customer(1), &[CONTACT]), lead(customer(2), &[TRIAL])])
        .await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 2]);
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(
        texts(&accepted[0])[0],
        "New contact request: First1 Last1 (Company 1)"
    );
}

#[tokio::test]
async fn a_400_rejects_the_lead_with_the_workflow_error() {
    let fake = Fake::default();
    let base = fake.start().await;
    fake.script([Reply::status(400).body(
        r#"{"error":{"code":"InvalidRequestContent","message":"The input body for trigger 'manual' of type 'Request' did not match its schema definition."}}"#,
    )]);

    let outcomes = sink(&base).deliver(&[lead(customer(1), &[TRIAL])]).await;

    let [Outcome::Rejected { reason }] = &outcomes[..] else {
        panic!("{outcomes:?}")
    };
    assert!(reason.contains("HTTP 400"), "{reason}");
    assert!(reason.contains("InvalidRequestContent"), "{reason}");
}

#[tokio::test]
async fn a_wrong_sig_or_a_deleted_flow_holds_the_leads_as_an_endpoint_failure() {
    let fake = Fake::default();
    let base = fake.start().await;
    let wrong = AlertSink::teams(&settings(&base, "WRONGSIGNATURE99", "")).unwrap();
    let batch = [lead(customer(1), &[TRIAL]), lead(customer(2), &[TRIAL])];

    let refused = wrong.deliver(&batch).await;
    let posts_after_refusal = fake.received().len();
    fake.script([Reply::status(404).body(
        r#"{"error":{"code":"WorkflowNotFound","message":"The workflow could not be found."}}"#,
    )]);
    let gone = sink(&base).deliver(&batch[..1]).await;

    for outcome in refused.iter().chain(&gone) {
        let Outcome::EndpointFailed { reason } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(reason.contains("sink.teams.url"), "{reason}");
        assert!(
            !reason.contains("WRONGSIGNATURE99") && !reason.contains(SIG),
            "{reason}"
        );
    }
    assert_eq!(refused.len(), 2);
    assert_eq!(
        posts_after_refusal, 1,
        "the rest of the batch waits without a request"
    );
    assert!(
        matches!(&gone[0], Outcome::EndpointFailed { reason } if reason.contains("WorkflowNotFound"))
    );
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_then_delivered() {
    let fake = Fake::default();
    let base = fake.start().await;
    fake.script([Reply::status(429).header("retry-after", "1")]);

    let outcomes = sink(&base).deliver(&[lead(customer(1), &[TRIAL])]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let received = fake.received();
    assert_eq!(received.len(), 2);
    assert!(received[1].0 - received[0].0 >= Duration::from_millis(950));
    assert_eq!(fake.accepted().len(), 1);
}

#[tokio::test]
async fn a_503_until_the_attempts_run_out_leaves_the_lead_for_later() {
    let fake = Fake::default();
    let base = fake.start().await;
    fake.script(vec![Reply::status(503); 3]);

    let outcomes = sink(&base).deliver(&[lead(customer(1), &[TRIAL])]).await;

    assert!(
        matches!(&outcomes[0], Outcome::RetryLater { reason, .. } if reason.contains("503")),
        "{outcomes:?}"
    );
    assert!(fake.accepted().is_empty());
}

#[tokio::test]
async fn the_url_secret_is_in_no_debug_output_reason_or_log() {
    let fake = Fake::default();
    let base = fake.start().await;
    // A careless service echoing the URL it was called on.
    fake.script([Reply::status(400).body(&format!("bad request to {base}{PATH}?sig={SIG}"))]);
    let settings = settings(&base, SIG, "");
    let sink = AlertSink::teams(&settings).unwrap();
    let (logs, guard) = capture_logs(tracing_subscriber::EnvFilter::new("trace"));

    let outcomes = sink
        .deliver(&[lead(customer(1), &[TRIAL]), lead(customer(2), &[TRIAL])])
        .await;
    drop(guard);

    let toml = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"teams\"\n[sink.teams]\nurl = {{ value = \"https://prod-1.westus.logic.azure.com/workflows/x/triggers/manual/paths/invoke?sig={SIG}\" }}\n"
    );
    let loaded = Settings::from_toml_with_env(&toml, Path::new("t.toml"), &HashMap::new()).unwrap();
    let texts = [
        format!("{settings:?}"),
        format!("{sink:?}"),
        format!("{outcomes:?}"),
        format!("{loaded:#?}"),
        logs.text(),
    ];
    for text in &texts {
        assert!(!text.contains(SIG), "{text}");
        assert!(
            !text.contains("customer2@contoso.com"),
            "no message content: {text}"
        );
    }
    assert!(
        matches!(&outcomes[0], Outcome::Rejected { reason } if reason.contains("[redacted]")),
        "{outcomes:?}"
    );
    assert!(logs.text().contains("Alert posted"), "{}", logs.text());
    assert!(texts[1].contains(&format!("{PATH}?…")), "{}", texts[1]);
}

#[tokio::test]
async fn a_url_that_is_not_a_workflows_trigger_is_refused_naming_the_key() {
    for url in [
        "https://example.com/workflows/x/triggers/manual/paths/invoke?sig=SIGSECRETVALUE",
        "https://contoso.webhook.office.com/webhookb2/SIGSECRETVALUE",
    ] {
        let text = format!("[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"teams\"\n[sink.teams]\nurl = {{ value = \"{url}\" }}\n");
        let settings =
            Settings::from_toml_with_env(&text, Path::new("t.toml"), &HashMap::new()).unwrap();

        let error = leadsync::build_sink(&settings)
            .err()
            .expect(url)
            .to_string();

        assert!(error.contains("sink.teams.url"), "{error}");
        assert!(!error.contains("SIGSECRETVALUE"), "{error}");
    }
    let text = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[sink]\nkind = \"teams\"\n";
    let error = Settings::from_toml_with_env(text, Path::new("t.toml"), &HashMap::new())
        .expect_err("no section")
        .to_string();
    assert!(error.contains("sink.teams"), "{error}");
    let text = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[sink]\nkind = \"teams\"\n[sink.teams]\nurl = { env = \"X\" }\nstages = [\"do_not_contact\"]\n";
    let error = Settings::from_toml_with_env(text, Path::new("t.toml"), &HashMap::new())
        .expect_err("bad stage")
        .to_string();
    assert!(error.contains("sink.teams.stages"), "{error}");
}

#[tokio::test]
async fn leads_flow_from_the_table_to_a_teams_channel_once_per_stage_reached() {
    let fake = Fake::default();
    let base = fake.start().await;
    let world = World::new().await;
    let sink_toml = format!(
        "[sink]\nkind = \"teams\"\n[sink.teams]\nurl = {{ value = \"{base}{PATH}?sp=x&sig={SIG}\" }}\nallow_http = true\nretry = {{ max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"50ms\" }}\n"
    );
    let settings = world.settings_with_sink(&sink_toml);
    world
        .insert(&[
            lead_row("p00", "r000001", CONTACT, customer(1)),
            lead_row("p00", "r000002", TRIAL, customer(2)),
        ])
        .await;

    let first = common::run_once(&settings).await;
    let after_first = fake.accepted().len();
    world
        .insert(&[lead_row("p01", "r000003", BUY, customer(1))])
        .await;
    let second = common::run_once(&settings).await;
    let third = common::run_once(&settings).await;

    assert_eq!(first.exit_code(), 0);
    assert_eq!(second.exit_code(), 0);
    assert_eq!(third.exit_code(), 0);
    assert_eq!(first.totals.delivered, 2, "{:?}", first.totals);
    assert_eq!(after_first, 1, "customer 1's \"Contact me\" posts nothing");
    let titles: Vec<String> = fake
        .accepted()
        .iter()
        .map(|m| texts(m)[0].clone())
        .collect();
    assert_eq!(
        titles,
        vec![
            "New trial: First2 Last2 (Company 2)",
            "New customer: First1 Last1 (Company 1)"
        ]
    );
}

#[test]
fn the_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/teams.example.toml");

    let settings = Settings::load_with_env(&path, &HashMap::new())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    assert_eq!(settings.sink.kind, leadsync::config::SinkKind::Teams);
    assert_eq!(settings.sink.batch_size(), 50);
    let alert = settings.sink.teams.expect("a [sink.teams] section");
    assert_eq!(
        alert.stages,
        [leadsync::lead::Stage::Trial, leadsync::lead::Stage::Active]
    );
    assert_eq!(alert.min_interval, Some(Duration::ZERO));
    assert!(!alert.allow_http);
    assert!(format!("{:?}", alert.url).starts_with("Env("));
}

#[tokio::test]
async fn check_send_test_lead_posts_one_card_marked_as_a_test() {
    let fake = Fake::default();
    let base = fake.start().await;
    let world = World::new().await;
    let sink_toml = format!(
        "[sink]\nkind = \"teams\"\n[sink.teams]\nurl = {{ value = \"{base}{PATH}?sp=x&sig={SIG}\" }}\nallow_http = true\n"
    );
    let settings = world.settings_with_sink(&sink_toml);

    let report = leadsync::cli::check::check(&settings, true, Duration::from_millis(200)).await;

    let line = report
        .lines
        .iter()
        .find(|l| l.what == "test alert")
        .unwrap_or_else(|| panic!("no test alert line:\n{}", report.render()));
    assert!(line.ok, "{}", report.render());
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    let card_text = accepted[0].to_string();
    assert!(card_text.contains("marketplace test lead"), "{card_text}");
}

#[tokio::test]
async fn a_card_names_the_crm_record_when_another_sink_knows_it() {
    let fake = Fake::default();
    let base = fake.start().await;
    let sink = sink(&base);
    let link = "https://acme.my.salesforce.com/lightning/r/Lead/00Q000000000001/view";

    let outcomes = sink
        .deliver_linked(&[lead(customer(1), &[TRIAL])], &[Some(link.into())])
        .await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), 1);
    let action = &card(&accepted[0])["actions"][0];
    assert_eq!(action["type"], "Action.OpenUrl");
    assert_eq!(action["url"], link);
}
