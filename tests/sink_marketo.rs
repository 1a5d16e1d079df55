//! The Marketo sink against an in-process fake of a Marketo instance that follows the
//! documented contract: the identity endpoint (client credentials -> `access_token`,
//! `expires_in`; 401 for bad credentials) and `POST /rest/v1/leads.json`
//! (`createOnly`/`updateOnly`/`createOrUpdate` by `lookupField`, at most 300 leads,
//! HTTP 200 with `success` and per-record `status` `created`/`updated`/`skipped` and
//! `reasons` 1003/1004/1005; API errors as HTTP 200 `"success": false` with 601/602
//! token invalid/expired and 606 rate limit).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::{customer, lead_row, serve, World};
use leadsync::lead::{Customer, Email, Stage};
use leadsync::sink::marketo::MarketoSettings;
use leadsync::sink::{CustomerLead, LeadSink, MarketoSink, Outcome};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

const CLIENT_ID: &str = "9f3c-leadsync-client";
const SECRET: &str = "mkto-client-secret-51d7e2";

#[derive(Default)]
struct Instance {
    leads: BTreeMap<String, Map<String, Value>>,
    creates: usize,
    token_requests: usize,
    /// The token leads.json accepts now.
    valid: Option<String>,
    calls: Vec<Value>,
    /// Error codes answered (HTTP 200, success false) to the next calls.
    faults: VecDeque<&'static str>,
    /// Lookup values refused per record (1003).
    refuse: HashSet<String>,
}

type Shared = Arc<Mutex<Instance>>;

async fn token(State(m): State<Shared>, Form(form): Form<HashMap<String, String>>) -> Response {
    let mut m = m.lock().unwrap();
    m.token_requests += 1;
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        || form.get("client_secret").map(String::as_str) != Some(SECRET)
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "unauthorized", "error_description": "Bad client credentials"})),
        )
            .into_response();
    }
    let value = format!("cdf01657-{:04}:int", m.token_requests);
    m.valid = Some(value.clone());
    Json(json!({"access_token": value, "token_type": "bearer", "expires_in": 3599, "scope": "apis@acme.example"}))
        .into_response()
}

fn failure(code: &str, message: &str) -> Response {
    Json(json!({"requestId": "e42b#14272d07d78", "success": false, "errors": [{"code": code, "message": message}]}))
        .into_response()
}

async fn leads(State(m): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let mut m = m.lock().unwrap();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    if bearer.is_none() {
        return failure("601", "Access token invalid");
    }
    if bearer != m.valid {
        return failure("602", "Access token expired");
    }
    m.calls.push(body.clone());
    if let Some(code) = m.faults.pop_front() {
        return failure(code, "Max rate limit '100' exceeded with in '20' secs");
    }
    let input = body["input"].as_array().unwrap().clone();
    if input.len() > 300 {
        return failure("1003", "Batch size exceeds 300");
    }
    let action = body["action"].as_str().unwrap().to_owned();
    let lookup = body["lookupField"].as_str().unwrap().to_owned();
    let mut result = Vec::new();
    for record in input {
        let key = record[&lookup].as_str().unwrap().to_ascii_lowercase();
        let exists = m.leads.contains_key(&key);
        let skip = |code: &str, message: &str| json!({"status": "skipped", "reasons": [{"code": code, "message": message}]});
        if m.refuse.contains(&key) {
            result.push(skip("1003", "Value for field 'phone' invalid"));
            continue;
        }
        match (action.as_str(), exists) {
            ("createOnly", true) => result.push(skip("1005", "Lead already exists")),
            ("updateOnly", false) => result.push(skip("1004", "Lead not found")),
            _ => {
                if !exists {
                    m.creates += 1;
                }
                let id = m.leads.len() + 50;
                let lead = m.leads.entry(key).or_insert_with(|| {
                    let mut l = Map::new();
                    l.insert("id".into(), json!(id));
                    l
                });
                for (k, v) in record.as_object().unwrap() {
                    lead.insert(k.clone(), v.clone());
                }
                result.push(
                    json!({"id": lead["id"], "status": if exists { "updated" } else { "created" }}),
                );
            }
        }
    }
    Json(json!({"requestId": "e42b#14272d07d78", "success": true, "result": result}))
        .into_response()
}

struct Fake {
    url: String,
    m: Shared,
}

impl Fake {
    async fn start() -> Fake {
        let m: Shared = Arc::default();
        let router = Router::new()
            .route("/identity/oauth/token", post(token))
            .route("/rest/v1/leads.json", post(leads))
            .with_state(m.clone());
        Fake {
            url: serve(router).await,
            m,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Instance) -> T) -> T {
        f(&mut self.m.lock().unwrap())
    }

    fn section(&self, extra: &str) -> String {
        format!(
            "base_url = \"{}\"\nallow_http = true\nclient_id = \"{CLIENT_ID}\"\nclient_secret = {{ value = \"{SECRET}\" }}\nretry = {{ max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"1s\" }}\n{extra}\n",
            self.url
        )
    }

    fn sink(&self, extra: &str) -> MarketoSink {
        MarketoSink::new(&settings(&self.section(extra))).expect("sink")
    }

    fn lead(&self, email: &str) -> Map<String, Value> {
        self.with(|m| m.leads.get(email).cloned())
            .unwrap_or_else(|| panic!("no lead {email}"))
    }

    fn records(&self) -> Vec<Value> {
        self.with(|m| {
            m.calls
                .iter()
                .flat_map(|c| c["input"].as_array().unwrap().clone())
                .collect()
        })
    }
}

fn settings(section: &str) -> MarketoSettings {
    let text = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"marketo\"\n[sink.marketo]\n{section}"
    );
    leadsync::config::Settings::from_toml_with_env(
        &text,
        std::path::Path::new("test.toml"),
        &HashMap::new(),
    )
    .unwrap_or_else(|e| panic!("test settings are invalid: {e}"))
    .sink
    .marketo
    .expect("a [sink.marketo] section")
}

fn email(n: usize) -> String {
    format!("customer{n}@contoso.com")
}

fn lead(n: usize) -> CustomerLead {
    CustomerLead {
        key: format!("email:{}", email(n)),
        external_key: format!("ls-{n:020x}"),
        customer: Customer {
            first_name: Some(format!("First{n}")),
            last_name: Some(format!("Last{n}")),
            email: Email::parse(&email(n)),
            phone: Some("+1 425 555 0100".into()),
            country: Some("US".into()),
            company: Some(format!("Company {n}")),
            title: Some("CTO".into()),
        },
        stage: Stage::InitialInterest,
        do_not_contact: false,
        test_lead: false,
        first_seen: OffsetDateTime::UNIX_EPOCH,
        last_seen: OffsetDateTime::UNIX_EPOCH,
        offers: Vec::new(),
        history: Vec::new(),
        summary: String::new(),
    }
}

fn existing(fake: &Fake, n: usize, fields: Value) {
    fake.with(|m| {
        let mut l = fields.as_object().unwrap().clone();
        l.insert("id".into(), json!(n));
        l.insert("email".into(), json!(email(n)));
        m.leads.insert(email(n), l);
    });
}

#[tokio::test]
async fn a_batch_is_one_call_per_300_leads_with_one_token_and_outcomes_in_order() {
    let fake = Fake::start().await;
    let sink = fake.sink("");
    let batch: Vec<CustomerLead> = (0..650).map(lead).collect();

    let outcomes = sink.deliver(&batch).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 650]);
    let sizes: Vec<usize> = fake.with(|m| {
        m.calls
            .iter()
            .map(|c| c["input"].as_array().unwrap().len())
            .collect()
    });
    assert_eq!(
        sizes,
        vec![300, 300, 50],
        "new leads: one createOnly call per 300"
    );
    assert_eq!(fake.with(|m| (m.token_requests, m.creates)), (1, 650));
    let first = &fake.records()[0];
    assert_eq!(first["email"], email(0));
    assert_eq!(first["firstName"], "First0");
    assert_eq!(first["company"], "Company 0");
}

#[tokio::test]
async fn an_existing_lead_is_updated_once_without_touching_its_company_and_refusals_stay_in_place()
{
    let fake = Fake::start().await;
    existing(
        &fake,
        2,
        json!({"company": "Fabrikam (set in Marketo)", "firstName": "Old"}),
    );
    fake.with(|m| m.refuse.insert(email(3)));
    let sink = fake.sink("");

    let outcomes = sink.deliver(&[lead(1), lead(2), lead(3)]).await;

    assert_eq!(outcomes[0], Outcome::Delivered);
    assert_eq!(outcomes[1], Outcome::Delivered);
    assert!(
        matches!(&outcomes[2], Outcome::Rejected { reason } if reason.contains("1003")),
        "{outcomes:?}"
    );
    let calls = fake.with(|m| m.calls.clone());
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["action"], "createOnly");
    assert_eq!(calls[1]["action"], "updateOnly");
    assert_eq!(calls[1]["input"].as_array().unwrap().len(), 1);
    assert!(calls[1]["input"][0].get("company").is_none());
    let rep = fake.lead(&email(2));
    assert_eq!(rep["company"], "Fabrikam (set in Marketo)");
    assert_eq!(rep["firstName"], "First2");
    assert_eq!(
        fake.with(|m| (m.leads.len(), m.creates)),
        (2, 1),
        "no duplicate"
    );
}

#[tokio::test]
async fn an_opt_out_is_only_ever_sent_as_true() {
    let fake = Fake::start().await;
    existing(&fake, 2, json!({"unsubscribed": true}));
    let sink = fake.sink("");
    let mut dnc = lead(1);
    dnc.do_not_contact = true;

    assert_eq!(
        sink.deliver(&[dnc, lead(2)]).await,
        vec![Outcome::Delivered; 2]
    );

    for record in fake.records() {
        let sent = record.get("unsubscribed");
        if record["email"] == email(1) {
            assert_eq!(sent, Some(&json!(true)));
        } else {
            assert!(sent.is_none(), "{record}");
        }
    }
    assert_eq!(fake.lead(&email(2))["unsubscribed"], true);
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_the_call_repeated() {
    let fake = Fake::start().await;
    let sink = fake.sink("");
    assert_eq!(sink.deliver(&[lead(1)]).await, vec![Outcome::Delivered]);
    fake.with(|m| m.valid = Some("rotated-elsewhere".into()));

    let outcomes = sink.deliver(&[lead(2)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.with(|m| m.token_requests), 2);
    assert!(fake.with(|m| m.leads.contains_key(&email(2))));
}

#[tokio::test]
async fn a_rate_limit_606_is_retried_with_back_off() {
    let fake = Fake::start().await;
    fake.with(|m| m.faults.extend(["606", "615"]));
    let sink = fake.sink("");

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.with(|m| m.calls.len()), 3);
}

#[tokio::test]
async fn a_rate_limit_that_persists_leaves_the_leads_for_later() {
    let fake = Fake::start().await;
    fake.with(|m| m.faults.extend(["606", "606", "606"]));
    let sink = fake.sink("");

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    for o in &outcomes {
        assert!(
            matches!(o, Outcome::RetryLater { reason, .. } if reason.contains("606")),
            "{o:?}"
        );
    }
}

#[tokio::test]
async fn refused_credentials_fail_the_endpoint_and_the_secret_is_never_shown() {
    let fake = Fake::start().await;
    let wrong = "mkto-wrong-secret-77aa";
    let settings = settings(&fake.section("").replace(SECRET, wrong));
    let sink = MarketoSink::new(&settings).unwrap();
    let (logs, guard) = common::capture_logs(tracing_subscriber::EnvFilter::new("trace"));

    let outcomes = sink.deliver(&[lead(1)]).await;
    let health = sink.healthcheck().await.unwrap_err().to_string();
    drop(guard);

    assert!(
        matches!(&outcomes[0], Outcome::EndpointFailed { reason } if reason.contains("401")),
        "{outcomes:?}"
    );
    assert!(health.contains("Bad client credentials"), "{health}");
    let text = format!(
        "{} {outcomes:?} {health} {sink:?} {settings:?}",
        logs.text()
    );
    assert!(!text.contains(wrong), "{text}");
    assert_eq!(fake.with(|m| m.calls.len()), 0);
}

#[tokio::test]
async fn a_customer_without_email_is_rejected_when_matching_on_email() {
    let fake = Fake::start().await;
    let mut no_email = lead(9);
    no_email.key = "fallback:first9 last9|company 9|14255550100".into();
    no_email.customer.email = None;

    let outcomes = fake.sink("").deliver(&[no_email, lead(1)]).await;

    assert!(
        matches!(&outcomes[0], Outcome::Rejected { reason } if reason.contains("lookup_field"))
    );
    assert_eq!(outcomes[1], Outcome::Delivered);
}

#[tokio::test]
async fn leads_from_the_table_reach_marketo_once_per_customer_across_a_restart() {
    let world = World::new().await;
    let fake = Fake::start().await;
    let sink = format!(
        "[sink]\nkind = \"marketo\"\n[sink.marketo]\n{}",
        fake.section("")
    );
    let settings = world.settings_with_sink(&sink);
    world
        .insert(&[
            lead_row(
                "p1",
                "r001",
                "AppSource-PLT | contoso.analytics",
                customer(1),
            ),
            lead_row(
                "p1",
                "r002",
                "AzureMarketplace-PLT | contoso.analytics",
                customer(2),
            ),
        ])
        .await;

    let first = common::run_once(&settings).await;
    let mut moved = customer(1);
    moved["Title"] = json!("VP Engineering");
    world
        .insert(&[lead_row(
            "p2",
            "r003",
            "AzureMarketplace-INS | contoso.analytics",
            moved,
        )])
        .await;
    let second = common::run_once(&settings).await;

    assert_eq!(first.exit_code(), 0, "{first:?}");
    assert_eq!(second.exit_code(), 0, "{second:?}");
    assert_eq!(
        fake.with(|m| (m.leads.len(), m.creates)),
        (2, 2),
        "updated, not created again"
    );
    assert_eq!(fake.lead(&email(1))["title"], "VP Engineering");
}

#[test]
fn the_example_config_parses() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/marketo.example.toml"
    ))
    .unwrap();
    let settings = leadsync::config::Settings::from_toml_with_env(
        &text,
        std::path::Path::new("marketo.example.toml"),
        &HashMap::new(),
    )
    .expect("the example is valid");
    assert_eq!(settings.sink.batch_size(), 300);
    assert_eq!(
        settings.sink.marketo.expect("[sink.marketo]").lookup_field,
        "email"
    );
}
