//! The Slack alert sink against an in-process fake of a Slack incoming webhook that
//! follows Slack's documented contract (docs.slack.dev/messaging/
//! sending-messages-using-incoming-webhooks): `200 ok` for a valid message, `400
//! invalid_payload` for a body or blocks it cannot take, `403 invalid_token` for a
//! wrong token in the URL, scripted `404 channel_not_found` and `410
//! channel_is_archived`, and `429` with `Retry-After` when messages come faster than
//! one per second (docs.slack.dev/apis/web-api/rate-limits). It records the time of
//! every request.

mod common;

use common::merged_lead as lead;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{capture_logs, customer, lead_row, serve, World};
use leadsync::config::Settings;
use leadsync::sink::alert::{AlertSink, SlackSettings};
use leadsync::sink::{LeadSink, Outcome};
use serde_json::{json, Value};

const TOKEN: &str = "SLACKTOKENSECRET42";

#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Reply {
    fn new(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: body.into(),
        }
    }
    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

#[derive(Default)]
struct FakeState {
    script: VecDeque<Reply>,
    /// Every POST: when it arrived, its body and the status answered.
    received: Vec<(Instant, Value, u16)>,
    /// The messages posted to the channel.
    posted: Vec<Value>,
    /// When the last message was posted, for the one-per-second limit.
    last_posted: Option<Instant>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.0.lock().unwrap().script.extend(replies);
    }
    fn received(&self) -> Vec<(Instant, Value, u16)> {
        self.0.lock().unwrap().received.clone()
    }
    fn posted(&self) -> Vec<Value> {
        self.0.lock().unwrap().posted.clone()
    }
    async fn start(&self) -> String {
        serve(
            Router::new()
                .route("/services/{team}/{hook}/{token}", post(webhook))
                .with_state(self.clone()),
        )
        .await
    }
}

/// Block Kit as Slack checks it, for the blocks this sink uses.
fn blocks_problem(body: &Value) -> Option<&'static str> {
    let has_text = body["text"].as_str().is_some_and(|t| !t.is_empty());
    let Some(blocks) = body["blocks"].as_array() else {
        return (!has_text).then_some("no_text");
    };
    for block in blocks {
        match block["type"].as_str() {
            Some("header") => {
                let text = &block["text"];
                if text["type"] != "plain_text"
                    || text["text"]
                        .as_str()
                        .is_none_or(|t| t.is_empty() || t.chars().count() > 150)
                {
                    return Some("invalid_payload");
                }
            }
            Some("section") => {
                let fields = block["fields"].as_array();
                if fields.is_some_and(|f| {
                    f.len() > 10
                        || f.iter().any(|f| {
                            f["text"]
                                .as_str()
                                .is_none_or(|t| t.is_empty() || t.chars().count() > 2000)
                        })
                }) {
                    return Some("invalid_payload");
                }
                if fields.is_none()
                    && block["text"]["text"]
                        .as_str()
                        .is_none_or(|t| t.chars().count() > 3000)
                {
                    return Some("invalid_payload");
                }
            }
            Some("context") if block["elements"].as_array().is_some_and(|e| !e.is_empty()) => {}
            Some("divider") => {}
            _ => return Some("invalid_payload"),
        }
    }
    None
}

async fn webhook(
    State(fake): State<Fake>,
    UrlPath((_, _, token)): UrlPath<(String, String, String)>,
    body: Bytes,
) -> Response {
    let value: Option<Value> = serde_json::from_slice(&body).ok();
    let now = Instant::now();
    let mut state = fake.0.lock().unwrap();
    let reply = if token != TOKEN {
        Reply::new(403, "invalid_token")
    } else if let Some(reply) = state.script.pop_front() {
        reply
    } else if let Some(problem) = value
        .as_ref()
        .map_or(Some("invalid_payload"), blocks_problem)
    {
        Reply::new(400, problem)
    } else if state
        .last_posted
        .is_some_and(|at| now - at < Duration::from_millis(900))
    {
        Reply::new(429, "rate_limited").header("retry-after", "1")
    } else {
        state.last_posted = Some(now);
        state.posted.push(value.clone().unwrap());
        Reply::new(200, "ok")
    };
    state
        .received
        .push((now, value.unwrap_or(Value::Null), reply.status));
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

fn settings(base: &str, token: &str, extra: &str) -> SlackSettings {
    let retry = if extra.contains("retry =") {
        ""
    } else {
        "retry = { max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"2s\" }\n"
    };
    let text = format!(
        "url = {{ value = \"{base}/services/T0001/B0001/{token}\" }}\nallow_http = true\n{retry}{extra}"
    );
    common::section(&text)
}

fn sink(base: &str) -> AlertSink {
    AlertSink::slack(&settings(base, TOKEN, "")).expect("the sink builds")
}

const CONTACT: &str = "AppSource (SPZA)-PLT | contoso.analytics";
const TRIAL: &str = "AzureMarketplace-StartTestDrive | contoso.analytics";
const BUY: &str = "AzureMarketplace-INS | contoso.analytics";

fn header(message: &Value) -> String {
    message["blocks"][0]["text"]["text"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn fields(message: &Value) -> HashMap<String, String> {
    message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["fields"].as_array())
        .flatten()
        .map(|f| {
            let (label, value) = f["text"].as_str().unwrap().split_once('\n').unwrap();
            (label.trim_matches('*').to_owned(), value.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_purchase_posts_blocks_and_a_text_fallback_naming_the_customer_and_the_next_step() {
    let fake = Fake::default();
    let base = fake.start().await;
    let mut info = customer(1);
    info["Company"] = json!("Smith & <Sons>");
    let bought = lead(info, &[TRIAL, BUY]);

    let outcomes = sink(&base).deliver(std::slice::from_ref(&bought)).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let posted = fake.posted();
    assert_eq!(posted.len(), 1);
    let message = &posted[0];
    let types: Vec<&str> = message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["header", "section", "section", "context"]);
    assert_eq!(
        header(message),
        "New customer: First1 Last1 (Smith & <Sons>)"
    );
    assert_eq!(
        message["text"],
        "New customer: First1 Last1 (Smith &amp; &lt;Sons&gt;) on Contoso Analytics (contoso.analytics)"
    );
    let fields = fields(message);
    assert_eq!(fields["Customer"], "First1 Last1");
    assert_eq!(
        fields["Company"], "Smith &amp; &lt;Sons&gt;",
        "mrkdwn is escaped"
    );
    assert_eq!(fields["Email"], "customer1@contoso.com");
    assert_eq!(fields["Offer"], "Contoso Analytics (contoso.analytics)");
    assert_eq!(
        fields["Action"],
        "Get it now (install) via AzureMarketplace"
    );
    assert_eq!(fields["When"], "2024-05-02 10:00 UTC");
    assert_eq!(fields["Stage"], "active");
    let next = message["blocks"][2]["text"]["text"].as_str().unwrap();
    assert!(next.starts_with("*Next step*\n"), "{next}");
    assert!(next.contains("call within 24 hours"), "{next}");
    assert!(
        next.ends_with("*Follow up by* 2024-05-03 10:00 UTC"),
        "{next}"
    );
    assert!(message["blocks"][3]["elements"][0]["text"]
        .as_str()
        .unwrap()
        .contains(&bought.log_key()));
}

#[tokio::test]
async fn one_message_per_stage_reached_and_none_for_a_record_that_raised_nothing() {
    let fake = Fake::default();
    let base = fake.start().await;
    let sink = sink(&base);
    let batch = vec![
        lead(customer(1), &[CONTACT]),
        lead(customer(2), &[CONTACT, TRIAL]),
        lead(customer(3), &[TRIAL, TRIAL]),
        lead(customer(4), &[BUY, TRIAL]),
    ];

    let first = sink.deliver(&batch).await;
    let replay = sink.deliver(&batch).await;

    assert_eq!(first, vec![Outcome::Delivered; 4]);
    assert_eq!(replay, vec![Outcome::Delivered; 4]);
    let headers: Vec<String> = fake.posted().iter().map(header).collect();
    assert_eq!(headers, vec!["New trial: First2 Last2 (Company 2)"]);
    assert_eq!(fake.received().len(), 1, "no request for the others");
}

#[tokio::test]
async fn a_backfill_of_trials_is_paced_to_one_message_a_second_without_a_429() {
    let fake = Fake::default();
    let base = fake.start().await;
    let batch: Vec<_> = (1..=3).map(|n| lead(customer(n), &[TRIAL])).collect();
    let started = Instant::now();

    let outcomes = sink(&base).deliver(&batch).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 3]);
    let received = fake.received();
    assert_eq!(received.len(), 3, "no retries were needed");
    assert!(received.iter().all(|r| r.2 == 200));
    for pair in received.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= Duration::from_millis(950), "{gap:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_a_long_one_leaves_the_lead_for_later() {
    let fake = Fake::default();
    let base = fake.start().await;
    fake.script([Reply::new(429, "rate_limited").header("retry-after", "1")]);
    let short = sink(&base).deliver(&[lead(customer(1), &[TRIAL])]).await;
    let received = fake.received();
    fake.script([Reply::new(429, "rate_limited").header("retry-after", "60")]);
    let long = sink(&base).deliver(&[lead(customer(2), &[TRIAL])]).await;

    assert_eq!(short, vec![Outcome::Delivered]);
    assert_eq!(received.len(), 2);
    assert!(received[1].0 - received[0].0 >= Duration::from_millis(950));
    assert!(
        matches!(&long[0], Outcome::RetryLater { after: Some(after), reason } if *after == Duration::from_secs(60) && reason.contains("429")),
        "{long:?}"
    );
}

#[tokio::test]
async fn slack_errors_are_endpoint_failures_or_rejections_quoting_slacks_error_string() {
    let cases = [
        (
            Reply::new(400, "invalid_payload"),
            "rejected",
            "invalid_payload",
        ),
        (
            Reply::new(404, "channel_not_found"),
            "endpoint",
            "channel_not_found",
        ),
        (
            Reply::new(410, "channel_is_archived"),
            "endpoint",
            "channel_is_archived",
        ),
        (
            Reply::new(403, "action_prohibited"),
            "endpoint",
            "action_prohibited",
        ),
    ];
    for (reply, expected, error) in cases {
        let fake = Fake::default();
        let base = fake.start().await;
        fake.script([reply]);

        let outcomes = sink(&base).deliver(&[lead(customer(1), &[TRIAL])]).await;

        let (kind, reason) = match &outcomes[0] {
            Outcome::Rejected { reason } => ("rejected", reason),
            Outcome::EndpointFailed { reason } => ("endpoint", reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(kind, expected, "{error}");
        assert!(reason.contains(error), "{reason}");
        assert_eq!(fake.received().len(), 1, "{error}: not retried");
    }
}

#[tokio::test]
async fn a_wrong_token_holds_the_batch_and_the_token_is_in_no_debug_output_reason_or_log() {
    let fake = Fake::default();
    let base = fake.start().await;
    let wrong = "WRONGTOKENVALUE77";
    let settings = settings(&base, wrong, "");
    let sink = AlertSink::slack(&settings).unwrap();
    let (logs, guard) = capture_logs(tracing_subscriber::EnvFilter::new("trace"));

    let outcomes = sink
        .deliver(&[
            lead(customer(1), &[TRIAL]),
            lead(customer(2), &[CONTACT]),
            lead(customer(3), &[TRIAL]),
        ])
        .await;
    let health = sink.healthcheck().await;
    drop(guard);

    assert!(
        matches!(&outcomes[0], Outcome::EndpointFailed { reason } if reason.contains("invalid_token") && reason.contains("sink.slack.url")),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[1],
        Outcome::Delivered,
        "a lead that needs no message is not held"
    );
    assert!(matches!(&outcomes[2], Outcome::EndpointFailed { .. }));
    assert_eq!(
        fake.received().len(),
        2,
        "one POST for the batch, one for the healthcheck"
    );
    let health = health
        .expect_err("a wrong token fails the healthcheck")
        .to_string();
    let toml = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"slack\"\n[sink.slack]\nurl = {{ value = \"https://hooks.slack.com/services/T0/B0/{wrong}\" }}\n"
    );
    let loaded = Settings::from_toml_with_env(&toml, Path::new("t.toml"), &HashMap::new()).unwrap();
    for text in [
        format!("{settings:?}"),
        format!("{sink:?}"),
        format!("{outcomes:?}"),
        format!("{loaded:#?}"),
        health,
        logs.text(),
    ] {
        assert!(!text.contains(wrong), "{text}");
        assert!(!text.contains("customer1@contoso.com"), "{text}");
    }
}

#[tokio::test]
async fn the_healthcheck_posts_nothing_to_the_channel() {
    let fake = Fake::default();
    let base = fake.start().await;

    let health = sink(&base).healthcheck().await;

    assert!(health.is_ok(), "{health:?}");
    assert!(fake.posted().is_empty());
    assert_eq!(fake.received()[0].2, 400, "Slack refuses an empty message");
}

#[tokio::test]
async fn a_url_that_is_not_an_incoming_webhook_is_refused_naming_the_key() {
    let text = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[sink]\nkind = \"slack\"\n[sink.slack]\nurl = { value = \"https://hooks.example.com/services/T0/B0/SECRETTOKENVALUE\" }\n";
    let settings =
        Settings::from_toml_with_env(text, Path::new("t.toml"), &HashMap::new()).unwrap();

    let error = leadsync::build_sink(&settings)
        .err()
        .expect("not slack")
        .to_string();

    assert!(error.contains("sink.slack.url"), "{error}");
    assert!(!error.contains("SECRETTOKENVALUE"), "{error}");
    let plain = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[sink]\nkind = \"slack\"\n[sink.slack]\nurl = \"https://hooks.slack.com/services/T0/B0/X\"\n";
    let error = Settings::from_toml_with_env(plain, Path::new("t.toml"), &HashMap::new())
        .expect_err("a plain URL is refused: it is a secret")
        .to_string();
    assert!(error.contains("sink.slack.url"), "{error}");
}

#[tokio::test]
async fn leads_flow_from_the_table_to_a_slack_channel_once_per_stage_reached() {
    let fake = Fake::default();
    let base = fake.start().await;
    let world = World::new().await;
    let sink_toml = format!(
        "[sink]\nkind = \"slack\"\n[sink.slack]\nurl = {{ value = \"{base}/services/T0001/B0001/{TOKEN}\" }}\nallow_http = true\nretry = {{ max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"2s\" }}\n"
    );
    let settings = world.settings_with_sink(&sink_toml);
    world
        .insert(&[
            lead_row("p00", "r000001", TRIAL, customer(1)),
            lead_row("p00", "r000002", CONTACT, customer(2)),
            lead_row("p01", "r000003", BUY, customer(3)),
        ])
        .await;

    let first = common::run_once(&settings).await;
    let second = common::run_once(&settings).await;

    assert_eq!(first.exit_code(), 0);
    assert_eq!(second.exit_code(), 0);
    let mut headers: Vec<String> = fake.posted().iter().map(header).collect();
    headers.sort();
    assert_eq!(
        headers,
        vec![
            "New customer: First3 Last3 (Company 3)",
            "New trial: First1 Last1 (Company 1)"
        ]
    );
    assert!(
        fake.received().iter().all(|r| r.2 == 200),
        "paced: no 429 on the way"
    );
}

#[test]
fn the_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/slack.example.toml");

    let settings = Settings::load_with_env(&path, &HashMap::new())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    assert_eq!(settings.sink.kind, leadsync::config::SinkKind::Slack);
    assert_eq!(settings.sink.batch_size(), 50);
    let alert = settings.sink.slack.expect("a [sink.slack] section");
    assert_eq!(
        alert.stages,
        [leadsync::lead::Stage::Trial, leadsync::lead::Stage::Active]
    );
    assert_eq!(alert.min_interval, Some(Duration::from_secs(1)));
    assert!(!alert.allow_http);
    assert!(format!("{:?}", alert.url).starts_with("Env("));
}

#[tokio::test]
async fn a_message_links_the_crm_record_when_another_sink_knows_it() {
    let fake = Fake::default();
    let base = fake.start().await;
    let link = "https://contoso.crm.dynamics.com/main.aspx?etn=lead&id=7a1e&pagetype=entityrecord";

    let outcomes = sink(&base)
        .deliver_linked(&[lead(customer(1), &[TRIAL])], &[Some(link.into())])
        .await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let posted = fake.posted();
    let blocks = posted[0]["blocks"].as_array().unwrap();
    let types: Vec<&str> = blocks.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["header", "section", "section", "section", "context"]
    );
    assert_eq!(
        blocks[3]["text"]["text"],
        "<https://contoso.crm.dynamics.com/main.aspx?etn=lead&amp;id=7a1e&amp;pagetype=entityrecord|Open in the CRM>"
    );
}
