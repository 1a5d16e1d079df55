//! The HubSpot sink against an in-process fake of the CRM v3 contacts batch API that
//! follows the documented contract: bearer private-app token (401
//! `INVALID_AUTHENTICATION`), `batch/read` and `batch/upsert` by `idProperty` (at most
//! 100 inputs, else 400), 200 with `results` (here deliberately not in input order),
//! 207 multi-status with `errors` naming `context.ids`, a whole-batch 400 for one bad
//! input, 429 with `Retry-After` / `X-HubSpot-RateLimit-*`, and a lifecycle stage that
//! refuses to move backward.

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::{customer, lead_row, serve, World};
use leadsync::lead::{Customer, Email, Stage};
use leadsync::sink::hubspot::HubspotSettings;
use leadsync::sink::{CustomerLead, HubspotSink, LeadSink, Outcome};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

const TOKEN: &str = "pat-na1-11111111-2222-3333-4444-555555555555";
const ORDER: [&str; 8] = [
    "subscriber",
    "lead",
    "marketingqualifiedlead",
    "salesqualifiedlead",
    "opportunity",
    "customer",
    "evangelist",
    "other",
];

// ---------------------------------------------------------------------------
// The fake

/// A scripted answer: status, extra headers, body.
type Scripted = (StatusCode, Vec<(&'static str, String)>, Value);

#[derive(Default)]
struct Crm {
    /// Contacts by lower-cased value of the id property used.
    contacts: BTreeMap<String, Map<String, Value>>,
    creates: usize,
    reads: Vec<Value>,
    upserts: Vec<Value>,
    /// Scripted answers to the next upsert requests.
    faults: VecDeque<Scripted>,
    /// Ids refused per record in a 207.
    refuse: HashSet<String>,
}

type Shared = Arc<Mutex<Crm>>;

fn error(status: StatusCode, category: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"status": "error", "category": category, "message": message, "correlationId": "c0ffee"})),
    )
        .into_response()
}

fn authorised(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {TOKEN}").as_str())
}

fn too_many(body: &Value) -> Option<Response> {
    let n = body["inputs"].as_array().map_or(0, Vec::len);
    (n > 100).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            &format!("Batch input size must be at most 100, got {n}"),
        )
    })
}

async fn read(State(crm): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if !authorised(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found.",
        );
    }
    if let Some(r) = too_many(&body) {
        return r;
    }
    let mut crm = crm.lock().unwrap();
    crm.reads.push(body.clone());
    let wanted: Vec<String> = body["properties"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let mut results = Vec::new();
    let mut missing = Vec::new();
    for input in body["inputs"].as_array().unwrap() {
        let id = input["id"].as_str().unwrap().to_ascii_lowercase();
        match crm.contacts.get(&id) {
            Some(c) => {
                let props: Map<String, Value> = wanted
                    .iter()
                    .map(|p| (p.clone(), c.get(p).cloned().unwrap_or(Value::Null)))
                    .collect();
                results
                    .push(json!({"id": c["hs_object_id"], "properties": props, "archived": false}));
            }
            None => missing.push(Value::String(id)),
        }
    }
    if missing.is_empty() {
        return Json(json!({"status": "COMPLETE", "results": results})).into_response();
    }
    (
        StatusCode::MULTI_STATUS,
        Json(json!({"status": "COMPLETE", "results": results, "numErrors": 1, "errors": [
            {"status": "error", "category": "OBJECT_NOT_FOUND", "message": "Could not get some CONTACT objects, they may be deleted or not exist.", "context": {"ids": missing}}
        ]})),
    )
        .into_response()
}

async fn upsert(
    State(crm): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorised(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found.",
        );
    }
    if let Some(r) = too_many(&body) {
        return r;
    }
    let mut crm = crm.lock().unwrap();
    crm.upserts.push(body.clone());
    if let Some((status, extra, answer)) = crm.faults.pop_front() {
        let mut response = (status, Json(answer)).into_response();
        for (name, value) in extra {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        return response;
    }
    let inputs = body["inputs"].as_array().unwrap().clone();
    // One invalid value refuses the whole batch, naming no input (as HubSpot does).
    if inputs
        .iter()
        .any(|i| i["properties"]["country"] == "Atlantis")
    {
        return error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "Property values were not valid: [{\"isValid\":false,\"message\":\"Atlantis was not one of the allowed options\",\"error\":\"INVALID_OPTION\",\"name\":\"country\"}]");
    }
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for input in &inputs {
        let id_property = input["idProperty"].as_str().unwrap().to_owned();
        let id = input["id"].as_str().unwrap().to_ascii_lowercase();
        let props = input["properties"].as_object().unwrap().clone();
        let current_stage = crm
            .contacts
            .get(&id)
            .and_then(|c| c.get("lifecyclestage"))
            .and_then(Value::as_str)
            .and_then(|s| ORDER.iter().position(|o| *o == s));
        let new_stage = props
            .get("lifecyclestage")
            .and_then(Value::as_str)
            .and_then(|s| ORDER.iter().position(|o| *o == s));
        let backward = matches!((current_stage, new_stage), (Some(c), Some(n)) if n < c);
        if crm.refuse.contains(&id) || backward {
            errors.push(json!({"status": "error", "category": "VALIDATION_ERROR",
                "message": if backward { "lifecyclestage cannot move backward" } else { "Property values were not valid: phone" },
                "context": {"ids": [id.clone()]}}));
            continue;
        }
        let created = !crm.contacts.contains_key(&id);
        if created {
            crm.creates += 1;
        }
        let n = crm.contacts.len() + 1000;
        let contact = crm.contacts.entry(id.clone()).or_insert_with(|| {
            let mut c = Map::new();
            c.insert("hs_object_id".into(), json!(n.to_string()));
            c
        });
        contact.insert(id_property.clone(), Value::String(id.clone()));
        for (k, v) in props {
            contact.insert(k, v);
        }
        let mut shown = contact.clone();
        shown.insert(id_property, Value::String(id));
        let mut result =
            json!({"id": contact["hs_object_id"], "properties": shown, "new": created});
        if let Some(trace) = input.get("objectWriteTraceId") {
            result["objectWriteTraceId"] = trace.clone();
        }
        results.push(result);
    }
    // Results are not promised in input order.
    results.reverse();
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    let mut answer = json!({"status": "COMPLETE", "results": results});
    if !errors.is_empty() {
        answer["errors"] = Value::Array(errors.clone());
        answer["numErrors"] = json!(errors.len());
    }
    (status, Json(answer)).into_response()
}

struct Fake {
    url: String,
    crm: Shared,
}

impl Fake {
    async fn start() -> Fake {
        let crm: Shared = Arc::default();
        let router = Router::new()
            .route("/crm/v3/objects/contacts/batch/read", post(read))
            .route("/crm/v3/objects/contacts/batch/upsert", post(upsert))
            .with_state(crm.clone());
        Fake {
            url: serve(router).await,
            crm,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Crm) -> T) -> T {
        f(&mut self.crm.lock().unwrap())
    }

    /// The `[sink.hubspot]` body with `extra` lines.
    fn section(&self, extra: &str) -> String {
        format!(
            "base_url = \"{}\"\nallow_http = true\naccess_token = {{ value = \"{TOKEN}\" }}\nretry = {{ max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"2s\" }}\n{extra}\n",
            self.url
        )
    }

    fn sink(&self, extra: &str) -> HubspotSink {
        HubspotSink::new(&settings(&self.section(extra))).expect("sink")
    }

    fn contact(&self, id: &str) -> Map<String, Value> {
        self.with(|c| c.contacts.get(id).cloned())
            .unwrap_or_else(|| panic!("no contact {id}"))
    }

    fn upsert_inputs(&self) -> Vec<Value> {
        self.with(|c| {
            c.upserts
                .iter()
                .flat_map(|u| u["inputs"].as_array().unwrap().clone())
                .collect()
        })
    }
}

fn settings(section: &str) -> HubspotSettings {
    let text = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"hubspot\"\n[sink.hubspot]\n{section}"
    );
    leadsync::config::Settings::from_toml_with_env(
        &text,
        std::path::Path::new("test.toml"),
        &std::collections::HashMap::new(),
    )
    .unwrap_or_else(|e| panic!("test settings are invalid: {e}"))
    .sink
    .hubspot
    .expect("a [sink.hubspot] section")
}

fn lead(n: usize) -> CustomerLead {
    let email = format!("customer{n}@contoso.com");
    CustomerLead {
        key: format!("email:{email}"),
        external_key: format!("ls-{n:020x}"),
        customer: Customer {
            first_name: Some(format!("First{n}")),
            last_name: Some(format!("Last{n}")),
            email: Email::parse(&email),
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
        summary: format!("First{n} Last{n} (Company {n})"),
    }
}

fn id(n: usize) -> String {
    format!("customer{n}@contoso.com")
}

// ---------------------------------------------------------------------------
// Batches and outcomes

#[tokio::test]
async fn a_batch_is_one_read_and_one_upsert_per_100_contacts_with_outcomes_in_input_order() {
    let fake = Fake::start().await;
    let sink = fake.sink("");
    let leads: Vec<CustomerLead> = (0..250).map(lead).collect();

    let outcomes = sink.deliver(&leads).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 250]);
    let (reads, upserts) = fake.with(|c| (c.reads.clone(), c.upserts.clone()));
    let sizes: Vec<usize> = upserts
        .iter()
        .map(|u| u["inputs"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![100, 100, 50]);
    assert_eq!(reads.len(), 3);
    assert_eq!(fake.with(|c| c.creates), 250);
    let first = &upserts[0]["inputs"][0];
    assert_eq!(first["idProperty"], "email");
    assert_eq!(first["id"], id(0));
    let props = &first["properties"];
    assert_eq!(props["firstname"], "First0");
    assert_eq!(props["jobtitle"], "CTO");
    assert_eq!(props["company"], "Company 0");
    assert_eq!(props["lifecyclestage"], "lead");
    assert_eq!(props["hs_lead_status"], "NEW");
}

#[tokio::test]
async fn the_same_customer_twice_is_one_contact_updated_not_a_second_one() {
    let fake = Fake::start().await;
    let sink = fake.sink("");
    let mut returning = lead(1);

    assert_eq!(
        sink.deliver(&[returning.clone()]).await,
        vec![Outcome::Delivered]
    );
    returning.customer.title = Some("CEO".into());
    returning.stage = Stage::Trial;
    assert_eq!(sink.deliver(&[returning]).await, vec![Outcome::Delivered]);

    assert_eq!(fake.with(|c| (c.contacts.len(), c.creates)), (1, 1));
    let contact = fake.contact(&id(1));
    assert_eq!(contact["jobtitle"], "CEO");
    assert_eq!(contact["lifecyclestage"], "marketingqualifiedlead");
}

#[tokio::test]
async fn a_reps_company_lead_status_and_later_stage_survive() {
    let fake = Fake::start().await;
    fake.with(|c| {
        let mut rep = Map::new();
        rep.insert("hs_object_id".into(), json!("501"));
        rep.insert("email".into(), json!(id(1)));
        rep.insert("company".into(), json!("Fabrikam (typed by a rep)"));
        rep.insert("lifecyclestage".into(), json!("salesqualifiedlead"));
        rep.insert("hs_lead_status".into(), json!("IN_PROGRESS"));
        c.contacts.insert(id(1), rep);
        let mut empty = Map::new();
        empty.insert("hs_object_id".into(), json!("502"));
        empty.insert("email".into(), json!(id(2)));
        empty.insert("company".into(), json!(""));
        c.contacts.insert(id(2), empty);
    });
    let sink = fake.sink("");
    let mut active = lead(1);
    active.stage = Stage::Active;

    let outcomes = sink.deliver(&[active, lead(2)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered, Outcome::Delivered]);
    let rep = fake.contact(&id(1));
    assert_eq!(rep["company"], "Fabrikam (typed by a rep)");
    assert_eq!(
        rep["lifecyclestage"], "salesqualifiedlead",
        "never moved back"
    );
    assert_eq!(rep["hs_lead_status"], "IN_PROGRESS");
    assert_eq!(
        rep["firstname"], "First1",
        "the customer's own data is current"
    );
    let sent = &fake.upsert_inputs()[0]["properties"];
    assert!(
        sent.get("company").is_none() && sent.get("lifecyclestage").is_none(),
        "{sent}"
    );
    assert_eq!(
        fake.contact(&id(2))["company"],
        "Company 2",
        "an empty company is filled"
    );
    assert_eq!(fake.with(|c| c.creates), 0);
}

#[tokio::test]
async fn an_opt_out_is_only_ever_sent_as_true() {
    let fake = Fake::start().await;
    fake.with(|c| {
        let mut opted = Map::new();
        opted.insert("hs_object_id".into(), json!("600"));
        opted.insert("email".into(), json!(id(2)));
        opted.insert("leadsync_do_not_contact".into(), json!("true"));
        c.contacts.insert(id(2), opted);
    });
    let sink = fake.sink("opt_out_property = \"leadsync_do_not_contact\"");
    let mut dnc = lead(1);
    dnc.do_not_contact = true;

    let outcomes = sink.deliver(&[dnc, lead(2), lead(3)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 3]);
    let inputs = fake.upsert_inputs();
    assert_eq!(inputs[0]["properties"]["leadsync_do_not_contact"], "true");
    for input in &inputs[1..] {
        assert!(
            input["properties"].get("leadsync_do_not_contact").is_none(),
            "{input}"
        );
    }
    assert_eq!(fake.contact(&id(2))["leadsync_do_not_contact"], "true");
}

#[tokio::test]
async fn a_207_rejects_only_the_refused_contact_in_its_place() {
    let fake = Fake::start().await;
    fake.with(|c| c.refuse.insert(id(2)));
    let sink = fake.sink("");

    let outcomes = sink.deliver(&[lead(1), lead(2), lead(3)]).await;

    assert_eq!(outcomes[0], Outcome::Delivered);
    assert!(
        matches!(&outcomes[1], Outcome::Rejected { reason } if reason.contains("Property values were not valid")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], Outcome::Delivered);
    assert_eq!(fake.with(|c| c.upserts.len()), 1);
}

#[tokio::test]
async fn a_400_for_one_bad_input_is_split_until_that_input_alone_is_rejected() {
    let fake = Fake::start().await;
    let sink = fake.sink("");
    let mut leads: Vec<CustomerLead> = (0..6).map(lead).collect();
    leads[4].customer.country = Some("Atlantis".into());

    let outcomes = sink.deliver(&leads).await;

    for (i, o) in outcomes.iter().enumerate() {
        if i == 4 {
            assert!(
                matches!(o, Outcome::Rejected { reason } if reason.contains("Atlantis")),
                "{o:?}"
            );
        } else {
            assert_eq!(o, &Outcome::Delivered, "lead {i}");
        }
    }
    assert_eq!(fake.with(|c| c.contacts.len()), 5);
}

#[tokio::test]
async fn a_customer_without_email_is_rejected_by_email_or_upserted_by_a_custom_key_property() {
    let fake = Fake::start().await;
    let mut no_email = lead(7);
    no_email.key = "fallback:first7 last7|company 7|14255550100".into();
    no_email.customer.email = None;

    let by_email = fake.sink("").deliver(&[no_email.clone(), lead(1)]).await;
    let by_key = fake
        .sink("id_property = \"leadsync_key\"")
        .deliver(&[no_email.clone()])
        .await;

    assert!(matches!(&by_email[0], Outcome::Rejected { reason } if reason.contains("id_property")));
    assert_eq!(by_email[1], Outcome::Delivered);
    assert_eq!(by_key, vec![Outcome::Delivered]);
    let last = fake.upsert_inputs().last().cloned().unwrap();
    assert_eq!(last["idProperty"], "leadsync_key");
    assert_eq!(last["id"], no_email.external_key);
    assert_eq!(last["properties"]["leadsync_key"], no_email.external_key);
}

// ---------------------------------------------------------------------------
// Limits and failures

#[tokio::test]
async fn a_429_is_honoured_with_hubspots_interval_and_then_succeeds() {
    let fake = Fake::start().await;
    fake.with(|c| {
        c.faults.push_back((
            StatusCode::TOO_MANY_REQUESTS,
            vec![
                ("x-hubspot-ratelimit-max", "190".into()),
                ("x-hubspot-ratelimit-remaining", "0".into()),
                ("x-hubspot-ratelimit-interval-milliseconds", "400".into()),
            ],
            json!({"status": "error", "message": "You have reached your ten_secondly_rolling limit.", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING"}),
        ))
    });
    let sink = fake.sink("");

    let started = Instant::now();
    let outcomes = sink.deliver(&[lead(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.with(|c| c.upserts.len()), 2);
}

#[tokio::test]
async fn a_429_asking_longer_than_the_back_off_cap_leaves_the_leads_for_later_with_its_wait() {
    let fake = Fake::start().await;
    fake.with(|c| {
        c.faults.push_back((
            StatusCode::TOO_MANY_REQUESTS,
            vec![("retry-after", "60".into())],
            json!({"status": "error", "message": "You have reached your daily limit.", "errorType": "RATE_LIMIT", "policyName": "DAILY"}),
        ))
    });
    let sink = fake.sink("");

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    for o in &outcomes {
        assert!(
            matches!(o, Outcome::RetryLater { after: Some(a), .. } if *a == Duration::from_secs(60)),
            "{o:?}"
        );
    }
    assert_eq!(fake.with(|c| c.upserts.len()), 1, "not retried at once");
}

#[tokio::test]
async fn a_refused_token_fails_the_endpoint_without_retries_and_the_token_is_never_shown() {
    let fake = Fake::start().await;
    let wrong = "pat-na1-99999999-wrong-token-0000";
    let section = fake.section("").replace(TOKEN, wrong);
    let settings = settings(&section);
    let sink = HubspotSink::new(&settings).unwrap();
    let (logs, guard) = common::capture_logs(tracing_subscriber::EnvFilter::new("trace"));

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;
    let health = sink.healthcheck().await.unwrap_err().to_string();
    drop(guard);

    for o in &outcomes {
        assert!(
            matches!(o, Outcome::EndpointFailed { reason } if reason.contains("401") && reason.contains("access_token")),
            "{o:?}"
        );
    }
    assert!(health.contains("401"), "{health}");
    assert_eq!(fake.with(|c| (c.reads.len(), c.upserts.len())), (0, 0));
    let text = format!(
        "{} {outcomes:?} {health} {sink:?} {settings:?}",
        logs.text()
    );
    assert!(!text.contains(wrong), "{text}");
    assert!(!text.contains("99999999"), "{text}");
}

#[tokio::test]
async fn the_healthcheck_reads_without_writing() {
    let fake = Fake::start().await;
    fake.sink("").healthcheck().await.expect("healthy");
    assert_eq!(fake.with(|c| (c.reads.len(), c.upserts.len())), (1, 0));
}

#[test]
fn the_example_config_parses_with_the_documented_defaults() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/hubspot.example.toml"
    ))
    .unwrap();
    let settings = leadsync::config::Settings::from_toml_with_env(
        &text,
        std::path::Path::new("hubspot.example.toml"),
        &std::collections::HashMap::new(),
    )
    .expect("the example is valid");
    assert_eq!(settings.sink.batch_size(), 100);
    let hubspot = settings.sink.hubspot.expect("a [sink.hubspot] section");
    assert_eq!(hubspot.id_property, "email");
}

// ---------------------------------------------------------------------------
// End to end

#[tokio::test]
async fn leads_from_the_table_reach_hubspot_once_per_customer_across_a_restart() {
    let world = World::new().await;
    let fake = Fake::start().await;
    let sink = format!(
        "[sink]\nkind = \"hubspot\"\n[sink.hubspot]\n{}",
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
        fake.with(|c| (c.contacts.len(), c.creates)),
        (2, 2),
        "updated, not created again"
    );
    let returning = fake.contact("customer1@contoso.com");
    assert_eq!(returning["jobtitle"], "VP Engineering");
    assert_eq!(returning["lifecyclestage"], "marketingqualifiedlead");
    assert_eq!(returning["company"], "Company 1");
    let upserts = fake.with(|c| c.upserts.len());
    assert_eq!(upserts, 2, "one upsert per run");
}
