//! The HTTPS endpoint (webhook) sink against an in-process receiver that behaves
//! like a marketplace HTTPS-endpoint flow: it checks the body against the
//! marketplace's published JSON schema (answering 400 `TriggerInputSchemaMismatch`
//! like Power Automate), verifies the HMAC signature when given a secret, and keeps
//! the latest body per `X-Leadsync-Key`.

mod common;

use common::merged_lead as lead;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use common::{customer, lead_row, serve, World};
use hmac::{Hmac, Mac};
use leadsync::config::Settings;
use leadsync::sink::webhook::{WebhookSettings, WebhookSink};
use leadsync::sink::{CustomerLead, LeadSink, Outcome};
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

const HOOK_PATH: &str = "/workflows/leads/triggers/manual/paths/invoke";

/// The marketplace's HTTPS-endpoint payload, as a receiver written for it reads it.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct MarketplaceLead {
    #[serde(rename = "UserDetails")]
    user_details: MarketplaceUser,
    #[serde(rename = "LeadSource")]
    lead_source: Option<String>,
    #[serde(rename = "ActionCode")]
    action_code: Option<String>,
    #[serde(rename = "OfferTitle")]
    offer_title: Option<String>,
    #[serde(rename = "Description")]
    description: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct MarketplaceUser {
    first_name: Option<String>,
    last_name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    country: Option<String>,
    company: Option<String>,
    title: Option<String>,
}

/// One scripted answer of the fake.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
    /// Put the received `Authorization` header into the body, as a careless receiver might.
    echo_authorization: bool,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
            echo_authorization: false,
        }
    }
    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }
    fn body(mut self, body: &str) -> Reply {
        self.body = body.to_owned();
        self
    }
    fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

#[derive(Clone, Debug)]
struct Received {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

struct FakeState {
    /// Answers for the next POSTs, in arrival order; then `default`.
    script: VecDeque<Reply>,
    /// Answers by `X-Leadsync-Key`, before the script.
    by_key: HashMap<String, Reply>,
    default: Reply,
    head: Reply,
    hmac: Option<(Vec<u8>, String)>,
    requests: Vec<Received>,
    /// The latest accepted body per `X-Leadsync-Key`.
    records: BTreeMap<String, Value>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            state: Arc::new(Mutex::new(FakeState {
                script: VecDeque::new(),
                by_key: HashMap::new(),
                default: Reply::status(202),
                // A POST-only receiver: reachable, but no HEAD.
                head: Reply::status(405),
                hmac: None,
                requests: Vec::new(),
                records: BTreeMap::new(),
            })),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }
    fn answer_always(&self, reply: Reply) {
        self.state.lock().unwrap().default = reply;
    }
    fn answer_key(&self, key: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .by_key
            .insert(key.to_owned(), reply);
    }
    fn answer_head(&self, reply: Reply) {
        self.state.lock().unwrap().head = reply;
    }
    fn verify_hmac(&self, secret: &str, header: &str) {
        self.state.lock().unwrap().hmac = Some((secret.as_bytes().to_vec(), header.to_owned()));
    }
    fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().requests.clone()
    }
    fn posts(&self) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::POST)
            .collect()
    }
    fn records(&self) -> BTreeMap<String, Value> {
        self.state.lock().unwrap().records.clone()
    }

    async fn start(&self) -> String {
        let router = Router::new()
            .route(HOOK_PATH, any(hook))
            .route("/elsewhere", any(elsewhere))
            .with_state(self.clone());
        serve(router).await
    }
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// The receiver side of the documented scheme: HMAC-SHA256 over `<timestamp>.<body>`.
fn signature_is_valid(secret: &[u8], header: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(timestamp) = headers
        .get("x-leadsync-timestamp")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(timestamp) > 300 {
        return false;
    }
    let Some(given) = headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(hex_decode)
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// The marketplace schema: every listed property, when present, is a string;
/// `UserDetails` is an object.
fn schema_error(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(lead)) = serde_json::from_slice::<Value>(body) else {
        return Some("Invalid type. Expected Object.".into());
    };
    let kind = |v: &Value| match v {
        Value::Null => "Null",
        Value::Bool(_) => "Boolean",
        Value::Number(_) => "Number",
        Value::Array(_) => "Array",
        Value::Object(_) => "Object",
        Value::String(_) => "String",
    };
    for key in ["ActionCode", "OfferTitle", "LeadSource"] {
        if let Some(v) = lead.get(key).filter(|v| !v.is_string()) {
            return Some(format!(
                "Invalid type. Expected String but got {}.",
                kind(v)
            ));
        }
    }
    match lead.get("UserDetails") {
        None => None,
        Some(Value::Object(user)) => [
            "Company",
            "Country",
            "Email",
            "FirstName",
            "LastName",
            "Phone",
            "Title",
        ]
        .iter()
        .filter_map(|k| user.get(*k))
        .find(|v| !v.is_string())
        .map(|v| format!("Invalid type. Expected String but got {}.", kind(v))),
        Some(other) => Some(format!(
            "Invalid type. Expected Object but got {}.",
            kind(other)
        )),
    }
}

fn reply(r: Reply, authorization: Option<String>) -> Response {
    let mut body = r.body;
    if r.echo_authorization {
        body.push_str(&format!(
            " (you sent Authorization: {})",
            authorization.unwrap_or_default()
        ));
    }
    let mut response = (StatusCode::from_u16(r.status).unwrap(), body).into_response();
    for (name, value) in r.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

async fn hook(
    State(fake): State<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let response = handle(&fake, method, uri, headers, body).await;
    fake.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

async fn handle(
    fake: &Fake,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = headers
        .get("x-leadsync-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (planned, hmac) = {
        let mut s = fake.state.lock().unwrap();
        s.requests.push(Received {
            method: method.clone(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers.clone(),
            body: body.clone(),
        });
        let planned = if method == Method::HEAD {
            s.head.clone()
        } else if let Some(r) = key.as_ref().and_then(|k| s.by_key.get(k)) {
            r.clone()
        } else {
            match s.script.pop_front() {
                Some(r) => r,
                None => s.default.clone(),
            }
        };
        (planned, s.hmac.clone())
    };
    if let Some((secret, header)) = hmac {
        if !signature_is_valid(&secret, &header, &headers, &body) {
            return reply(
                Reply::status(401).body(r#"{"error":"signature mismatch"}"#),
                authorization,
            );
        }
    }
    if method == Method::POST {
        if let Some(details) = schema_error(&body) {
            let body = json!({"error": {
                "code": "TriggerInputSchemaMismatch",
                "message": format!("The input body for trigger 'manual' of type 'Request' did not match its schema definition. Error details: '{details}'."),
            }});
            return reply(Reply::status(400).body(&body.to_string()), authorization);
        }
    }
    tokio::time::sleep(planned.delay).await;
    if method == Method::POST && (200..300).contains(&planned.status) {
        if let Some(key) = key {
            let value: Value = serde_json::from_slice(&body).unwrap();
            fake.state.lock().unwrap().records.insert(key, value);
        }
    }
    reply(planned, authorization)
}

async fn elsewhere(
    State(fake): State<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    fake.state.lock().unwrap().requests.push(Received {
        method,
        path: uri.path().to_owned(),
        query: None,
        headers,
        body: Bytes::new(),
    });
    StatusCode::OK.into_response()
}

/// Webhook settings from the lines of a `[sink.webhook]` section, with quick retries
/// unless `extra` sets its own.
fn settings(base: &str, extra: &str) -> WebhookSettings {
    let retry = if extra.contains("retry =") {
        ""
    } else {
        "retry = { max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"50ms\" }\n"
    };
    let text = format!(
        "url = \"{base}{HOOK_PATH}?api-version=2016-06-01&code=QUERYSIG\"\nallow_http = true\n{retry}{extra}"
    );
    common::section(&text)
}

fn sink(base: &str, extra: &str) -> WebhookSink {
    WebhookSink::new(&settings(base, extra)).expect("the sink builds")
}

fn ordinary(n: usize) -> CustomerLead {
    lead(customer(n), &["AzureMarketplace-INS | contoso.analytics"])
}

fn header<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn the_body_is_the_marketplace_https_endpoint_payload_of_the_newest_event() {
    let fake = Fake::new();
    let base = fake.start().await;
    let lead = lead(
        customer(1),
        &[
            "AppSource (SPZA)-PLT | contoso.analytics",
            "AzureMarketplace-INS | contoso.analytics",
        ],
    );

    let outcomes = sink(&base, "").deliver(std::slice::from_ref(&lead)).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let posts = fake.posts();
    assert_eq!(posts.len(), 1);
    let post = &posts[0];
    assert_eq!(post.path, HOOK_PATH);
    assert_eq!(
        post.query.as_deref(),
        Some("api-version=2016-06-01&code=QUERYSIG")
    );
    assert_eq!(header(post, "content-type"), Some("application/json"));
    let body: MarketplaceLead = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(
        body,
        MarketplaceLead {
            user_details: MarketplaceUser {
                first_name: Some("First1".into()),
                last_name: Some("Last1".into()),
                email: Some("customer1@contoso.com".into()),
                phone: Some("1234567890".into()),
                country: Some("US".into()),
                company: Some("Company 1".into()),
                title: Some("CTO".into()),
            },
            lead_source: Some("AzureMarketplace-INS|contoso.analytics".into()),
            action_code: Some("INS".into()),
            offer_title: Some("Contoso Analytics".into()),
            description: Some(lead.summary.clone()),
        }
    );
    let raw: Value = serde_json::from_slice(&post.body).unwrap();
    let keys: Vec<_> = raw.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys.len(),
        5,
        "only the marketplace's own properties: {keys:?}"
    );
    assert_eq!(
        header(post, "x-leadsync-key"),
        Some(lead.external_key.as_str())
    );
    assert_eq!(header(post, "x-leadsync-stage"), Some("active"));
    assert_eq!(header(post, "x-leadsync-do-not-contact"), Some("false"));
    assert_eq!(fake.records().len(), 1);
}

#[tokio::test]
async fn fields_the_lead_lacks_are_left_out_so_the_marketplace_schema_still_accepts_the_body() {
    let fake = Fake::new();
    let base = fake.start().await;
    let lead = lead(
        json!({"Email": "ana@fabrikam.com", "FirstName": "Ana", "Phone": null, "Title": ""}),
        &["AppSource (SPZA)-PLT | contoso.analytics"],
    );

    let outcomes = sink(&base, "").deliver(&[lead]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let raw: Value = serde_json::from_slice(&fake.posts()[0].body).unwrap();
    assert_eq!(
        raw["UserDetails"],
        json!({"FirstName": "Ana", "Email": "ana@fabrikam.com"})
    );
    assert_eq!(raw["ActionCode"], "PLT");
}

#[tokio::test]
async fn configured_headers_and_the_bearer_token_are_sent_with_every_lead() {
    let fake = Fake::new();
    let base = fake.start().await;
    let sink = sink(
        &base,
        "headers = { \"X-Api-Key\" = \"key-123\", \"X-Tenant\" = \"contoso\" }\nbearer_token = { value = \"tok-456\" }",
    );

    let outcomes = sink.deliver(&[ordinary(1), ordinary(2)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered, Outcome::Delivered]);
    let posts = fake.posts();
    assert_eq!(posts.len(), 2);
    for post in &posts {
        assert_eq!(header(post, "x-api-key"), Some("key-123"));
        assert_eq!(header(post, "x-tenant"), Some("contoso"));
        assert_eq!(header(post, "authorization"), Some("Bearer tok-456"));
    }
}

#[tokio::test]
async fn the_receiver_verifies_the_hmac_signature_of_the_exact_body() {
    let fake = Fake::new();
    fake.verify_hmac("whsec-789", "x-hub-signature-256");
    let base = fake.start().await;
    let sink = sink(
        &base,
        "hmac_secret = { value = \"whsec-789\" }\nsignature_header = \"X-Hub-Signature-256\"",
    );

    let outcomes = sink.deliver(&[ordinary(1), ordinary(2)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered, Outcome::Delivered]);
    let posts = fake.posts();
    assert_eq!(posts.len(), 2, "no request was refused and retried");
    for post in &posts {
        let sig = header(post, "x-hub-signature-256").unwrap();
        assert!(sig.starts_with("sha256=") && sig.len() == 71, "{sig}");
        assert!(header(post, "x-leadsync-timestamp").is_some());
    }
    assert_eq!(fake.records().len(), 2);
}

#[tokio::test]
async fn a_wrong_hmac_secret_holds_the_lead_instead_of_dead_lettering_it() {
    let fake = Fake::new();
    fake.verify_hmac("the-right-secret", "x-leadsync-signature");
    let base = fake.start().await;
    let sink = sink(&base, "hmac_secret = { value = \"a-wrong-secret\" }");

    let outcomes = sink.deliver(&[ordinary(1)]).await;

    let [Outcome::EndpointFailed { reason }] = outcomes.as_slice() else {
        panic!("{outcomes:?}")
    };
    assert!(reason.contains("HTTP 401"), "{reason}");
    assert!(reason.contains("credentials"), "{reason}");
    assert_eq!(
        fake.posts().len(),
        1,
        "a refused credential is not retried at once"
    );
    assert!(fake.records().is_empty());
}

#[tokio::test]
async fn a_201_answer_counts_as_delivered() {
    let fake = Fake::new();
    fake.answer_always(Reply::status(201).body(r#"{"id":"lead-1"}"#));
    let base = fake.start().await;

    let outcomes = sink(&base, "").deliver(&[ordinary(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.posts().len(), 1);
}

#[tokio::test]
async fn a_400_answer_rejects_the_lead_with_the_status_and_the_start_of_the_body() {
    let fake = Fake::new();
    let long = format!(
        r#"{{"error":{{"code":"InvalidLead","message":"Company is required. {}"}}}}"#,
        "x".repeat(2_000)
    );
    fake.answer_always(Reply::status(400).body(&long));
    let base = fake.start().await;

    let outcomes = sink(&base, "").deliver(&[ordinary(1)]).await;

    let [Outcome::Rejected { reason }] = outcomes.as_slice() else {
        panic!("{outcomes:?}")
    };
    assert!(reason.contains("HTTP 400 Bad Request"), "{reason}");
    assert!(reason.contains("Company is required"), "{reason}");
    assert!(
        reason.chars().count() < 650,
        "{} chars",
        reason.chars().count()
    );
    assert_eq!(fake.posts().len(), 1, "a rejection is not retried");
}

#[tokio::test]
async fn a_429_with_retry_after_is_tried_again_and_then_delivered() {
    let fake = Fake::new();
    fake.script([Reply::status(429).header("retry-after", "0")]);
    let base = fake.start().await;

    let outcomes = sink(&base, "").deliver(&[ordinary(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.posts().len(), 2);
    assert_eq!(fake.records().len(), 1);
}

#[tokio::test]
async fn a_retry_after_longer_than_the_back_off_cap_leaves_the_lead_for_later_with_that_wait() {
    let fake = Fake::new();
    fake.script([Reply::status(429).header("retry-after", "120")]);
    let base = fake.start().await;

    let outcomes = sink(&base, "").deliver(&[ordinary(1)]).await;

    let [Outcome::RetryLater { after, reason }] = outcomes.as_slice() else {
        panic!("{outcomes:?}")
    };
    assert_eq!(*after, Some(Duration::from_secs(120)));
    assert!(reason.contains("HTTP 429"), "{reason}");
    assert_eq!(fake.posts().len(), 1);
}

#[tokio::test]
async fn a_503_then_a_200_is_delivered_on_the_second_attempt() {
    let fake = Fake::new();
    fake.script([Reply::status(503), Reply::status(200)]);
    let base = fake.start().await;

    let outcomes = sink(&base, "").deliver(&[ordinary(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.posts().len(), 2);
    assert_eq!(fake.records().len(), 1);
}

#[tokio::test]
async fn a_500_until_the_attempts_run_out_leaves_the_lead_for_the_next_poll() {
    let fake = Fake::new();
    fake.answer_always(Reply::status(500).body("upstream CRM down"));
    let base = fake.start().await;

    let outcomes = sink(&base, "").deliver(&[ordinary(1)]).await;

    let [Outcome::RetryLater { reason, .. }] = outcomes.as_slice() else {
        panic!("{outcomes:?}")
    };
    assert!(reason.contains("HTTP 500"), "{reason}");
    assert!(reason.contains("upstream CRM down"), "{reason}");
    assert_eq!(fake.posts().len(), 3, "retry.max_attempts = 3");
    assert!(fake.records().is_empty());
}

#[tokio::test]
async fn a_receiver_slower_than_the_request_timeout_is_retried_then_left_for_later() {
    let fake = Fake::new();
    fake.answer_always(Reply::status(200).delay(Duration::from_secs(2)));
    let base = fake.start().await;
    let sink = sink(
        &base,
        "request_timeout = \"300ms\"\nretry = { max_attempts = 2, initial_backoff = \"10ms\", max_backoff = \"50ms\" }",
    );

    let outcomes = sink.deliver(&[ordinary(1)]).await;

    let [Outcome::RetryLater { reason, .. }] = outcomes.as_slice() else {
        panic!("{outcomes:?}")
    };
    assert!(reason.contains("no response within 300ms"), "{reason}");
    assert_eq!(fake.posts().len(), 2);
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_holds_the_lead_as_an_endpoint_failure() {
    for status in [301, 302, 307, 308] {
        let fake = Fake::new();
        fake.answer_always(Reply::status(status).header("location", "/elsewhere"));
        let base = fake.start().await;

        let outcomes = sink(
            &base,
            "hmac_secret = { value = \"s\" }\nheaders = { \"X-Api-Key\" = \"k\" }",
        )
        .deliver(&[ordinary(1)])
        .await;

        let [Outcome::EndpointFailed { reason }] = outcomes.as_slice() else {
            panic!("{status}: {outcomes:?}")
        };
        assert!(reason.contains(&format!("HTTP {status}")), "{reason}");
        assert!(reason.contains("sink.webhook.url"), "{reason}");
        assert!(
            fake.requests().iter().all(|r| r.path != "/elsewhere"),
            "{status}: the redirect was followed, with the signature and headers"
        );
    }
}

#[tokio::test]
async fn a_receiver_that_is_gone_holds_the_lead_as_an_endpoint_failure_not_a_rejection() {
    for status in [404, 410] {
        let fake = Fake::new();
        fake.answer_always(Reply::status(status).body("flow not found"));
        let base = fake.start().await;

        let outcomes = sink(&base, "").deliver(&[ordinary(1), ordinary(2)]).await;

        assert_eq!(outcomes.len(), 2);
        for outcome in &outcomes {
            let Outcome::EndpointFailed { reason } = outcome else {
                panic!("{status}: {outcomes:?}")
            };
            assert!(reason.contains("does not exist"), "{reason}");
        }
    }
}

#[tokio::test]
async fn every_post_carries_an_event_id_that_is_the_same_for_the_same_customer_version() {
    let fake = Fake::new();
    let base = fake.start().await;
    let sink = sink(&base, "");
    let one = lead(customer(1), &["AppSource (SPZA)-PLT | contoso.analytics"]);
    let one_later = lead(
        customer(1),
        &[
            "AppSource (SPZA)-PLT | contoso.analytics",
            "AzureMarketplace-INS | contoso.analytics",
        ],
    );

    sink.deliver(&[one.clone(), ordinary(2)]).await;
    sink.deliver(std::slice::from_ref(&one)).await;
    sink.deliver(&[one_later]).await;

    let ids: Vec<String> = fake
        .posts()
        .iter()
        .map(|p| {
            header(p, "x-leadsync-event-id")
                .expect("an event id")
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(
        ids.iter()
            .all(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())),
        "{ids:?}"
    );
    let first_of_one = ids
        .iter()
        .zip(fake.posts())
        .find(|(_, p)| header(p, "x-leadsync-key") == Some(one.external_key.as_str()))
        .map(|(id, _)| id.clone())
        .unwrap();
    assert_eq!(ids[2], first_of_one, "the same version again: the same id");
    assert_ne!(ids[3], first_of_one, "a new version: a new id");
    assert_ne!(ids[0], ids[1], "two customers: two ids");
}

#[tokio::test]
async fn outcomes_keep_the_input_order_while_requests_run_in_parallel() {
    let fake = Fake::new();
    let leads: Vec<_> = (0..12).map(ordinary).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (i, lead) in leads.iter().enumerate() {
        let status = if i % 4 == 1 { 422 } else { 200 };
        let delay = Duration::from_millis(rng.gen_range(0..40));
        fake.answer_key(&lead.external_key, Reply::status(status).delay(delay));
    }
    let base = fake.start().await;

    let outcomes = sink(&base, "parallelism = 3").deliver(&leads).await;

    assert_eq!(outcomes.len(), 12);
    for (i, outcome) in outcomes.iter().enumerate() {
        if i % 4 == 1 {
            assert!(
                matches!(outcome, Outcome::Rejected { reason } if reason.contains("422")),
                "lead {i}: {outcome:?}"
            );
        } else {
            assert_eq!(outcome, &Outcome::Delivered, "lead {i}");
        }
    }
    assert_eq!(fake.posts().len(), 12, "one request per lead");
    assert!(fake.max_in_flight.load(Ordering::SeqCst) <= 3);
    assert_eq!(fake.records().len(), 9);
}

#[tokio::test]
async fn a_slow_answer_holds_one_slot_not_the_requests_behind_it() {
    let fake = Fake::new();
    let leads: Vec<_> = (0..8).map(ordinary).collect();
    fake.answer_key(
        &leads[0].external_key,
        Reply::status(200).delay(Duration::from_millis(1_500)),
    );
    let base = fake.start().await;
    let sink = sink(&base, "parallelism = 2");

    let (outcomes, seen_while_slow) = tokio::join!(sink.deliver(&leads), async {
        // Half-way through the slow answer: the other slot has carried every other lead.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        fake.posts().len()
    });

    assert_eq!(outcomes, vec![Outcome::Delivered; 8], "in input order");
    assert_eq!(
        seen_while_slow, 8,
        "the seven quick leads went through the free slot while the first was slow"
    );
}

#[tokio::test]
async fn the_healthcheck_sends_a_signed_head_and_no_lead() {
    let fake = Fake::new();
    fake.verify_hmac("hc-secret", "x-leadsync-signature");
    let base = fake.start().await;
    let sink = sink(
        &base,
        "bearer_token = { value = \"tok\" }\nhmac_secret = { value = \"hc-secret\" }",
    );

    let result = sink.healthcheck().await;

    assert!(result.is_ok(), "{result:?}");
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, Method::HEAD);
    assert_eq!(header(&requests[0], "authorization"), Some("Bearer tok"));
    assert!(fake.records().is_empty());
}

#[tokio::test]
async fn the_healthcheck_reports_refused_credentials_a_failing_endpoint_and_an_unreachable_one() {
    let fake = Fake::new();
    let base = fake.start().await;
    let sink = sink(&base, "bearer_token = { value = \"tok-secret\" }");

    fake.answer_head(Reply::status(401));
    let refused = sink.healthcheck().await.unwrap_err().to_string();
    fake.answer_head(Reply::status(503));
    let failing = sink.healthcheck().await.unwrap_err().to_string();
    fake.answer_head(Reply::status(404));
    let not_found = sink.healthcheck().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        self::sink(&format!("http://127.0.0.1:{port}"), "")
            .healthcheck()
            .await
            .unwrap_err()
            .to_string()
    };

    assert!(refused.contains("credentials"), "{refused}");
    assert!(failing.contains("HTTP 503"), "{failing}");
    assert!(not_found.is_ok(), "any answer below 500 means reachable");
    assert!(closed.contains("cannot reach"), "{closed}");
    for message in [&refused, &failing, &closed] {
        assert!(!message.contains("QUERYSIG"), "{message}");
        assert!(!message.contains("tok-secret"), "{message}");
    }
    assert!(fake.posts().is_empty());
}

#[test]
fn plain_http_is_refused_unless_allowed_and_the_message_names_sink_webhook_url() {
    let toml = |allow: bool| {
        format!(
            "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"http://crm.example.com/leads\"\nallow_http = {allow}\n"
        )
    };

    let refused =
        Settings::from_toml_with_env(&toml(false), Path::new("leadsync.toml"), &HashMap::new())
            .unwrap_err()
            .to_string();
    let allowed =
        Settings::from_toml_with_env(&toml(true), Path::new("leadsync.toml"), &HashMap::new());

    assert!(refused.contains("`sink.webhook.url`"), "{refused}");
    assert!(refused.contains("http:// is refused"), "{refused}");
    assert!(allowed.is_ok(), "{:?}", allowed.err());
}

#[tokio::test]
async fn secrets_appear_neither_in_debug_output_nor_in_outcome_reasons() {
    let fake = Fake::new();
    fake.answer_always(
        Reply::status(403)
            .body("forbidden")
            .header("content-type", "text/plain"),
    );
    {
        let mut s = fake.state.lock().unwrap();
        s.default.echo_authorization = true;
    }
    let base = fake.start().await;
    let settings = settings(
        &base,
        "headers = { \"X-Api-Key\" = \"HEADER-SECRET\" }\nbearer_token = { value = \"BEARER-SECRET\" }\nhmac_secret = { value = \"HMAC-SECRET\" }",
    );
    let sink = WebhookSink::new(&settings).unwrap();

    let outcomes = sink.deliver(&[ordinary(1)]).await;
    let full = Settings::from_toml_with_env(
        "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"https://crm.example.com/x?code=QUERYSIG\"\nheaders = { \"X-Api-Key\" = \"HEADER-SECRET\" }\nbearer_token = { value = \"BEARER-SECRET\" }\nhmac_secret = { value = \"HMAC-SECRET\" }\n",
        Path::new("leadsync.toml"),
        &HashMap::new(),
    )
    .unwrap();

    let [Outcome::EndpointFailed { reason }] = outcomes.as_slice() else {
        panic!("{outcomes:?}")
    };
    assert!(
        reason.contains("[redacted]"),
        "the echoed token was scrubbed: {reason}"
    );
    for text in [
        format!("{settings:?}"),
        format!("{sink:?}"),
        format!("{full:#?}"),
        reason.clone(),
    ] {
        for secret in ["QUERYSIG", "HEADER-SECRET", "BEARER-SECRET", "HMAC-SECRET"] {
            assert!(!text.contains(secret), "{secret} leaked into: {text}");
        }
    }
}

#[test]
fn the_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/webhook.example.toml");

    let settings = Settings::load_with_env(&path, &HashMap::new())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    let webhook = settings.sink.webhook.expect("a [sink.webhook] section");
    assert_eq!(webhook.parallelism, 4);
    assert_eq!(webhook.request_timeout, Duration::from_secs(30));
    assert_eq!(webhook.signature_header, "X-Leadsync-Signature");
    assert!(!webhook.allow_http);
    assert_eq!(webhook.retry.max_attempts, 6);
}

#[tokio::test]
async fn leads_flow_from_the_table_to_the_receiver_and_a_restart_updates_each_customer_in_place() {
    // Arrange
    let fake = Fake::new();
    fake.verify_hmac("e2e-secret", "x-leadsync-signature");
    let base = fake.start().await;
    let world = World::new().await;
    let sink_toml = format!(
        "[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"{base}{HOOK_PATH}?sig=E2ESIG\"\nallow_http = true\nhmac_secret = {{ value = \"e2e-secret\" }}\nretry = {{ max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"50ms\" }}\n"
    );
    let settings = world.settings_with_sink(&sink_toml);
    world
        .insert(&[
            lead_row(
                "p00",
                "r000001",
                "AppSource (SPZA)-PLT | contoso.analytics",
                customer(1),
            ),
            lead_row(
                "p00",
                "r000002",
                "AzureMarketplace-INS | contoso.analytics",
                customer(2),
            ),
        ])
        .await;

    // Act: run, add a second event of customer 1 and a new customer, restart.
    let first = common::run_once(&settings).await;
    let after_first = fake.records();
    world
        .insert(&[
            lead_row(
                "p01",
                "r000003",
                "AzureMarketplace-INS | contoso.analytics",
                customer(1),
            ),
            lead_row(
                "p01",
                "r000004",
                "AppSource (SPZA)-PLT | contoso.backup",
                customer(3),
            ),
        ])
        .await;
    let second = common::run_once(&settings).await;

    // Assert
    assert_eq!(first.exit_code(), 0);
    assert_eq!(second.exit_code(), 0);
    assert_eq!(after_first.len(), 2);
    let records = fake.records();
    assert_eq!(records.len(), 3, "one entry per customer: {records:#?}");
    let keys_posted: std::collections::BTreeSet<_> = fake
        .posts()
        .iter()
        .filter_map(|p| header(p, "x-leadsync-key").map(str::to_owned))
        .collect();
    assert_eq!(keys_posted.len(), 3);
    assert!(
        keys_posted.iter().all(|k| k.starts_with("ls-")),
        "{keys_posted:?}"
    );
    let by_email = |email: &str| {
        records
            .iter()
            .find(|(_, v)| v["UserDetails"]["Email"] == email)
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap_or_else(|| panic!("no record for {email}: {records:#?}"))
    };
    let (key1, one) = by_email("customer1@contoso.com");
    assert_eq!(one["ActionCode"], "INS");
    assert_eq!(one["LeadSource"], "AzureMarketplace-INS|contoso.analytics");
    assert_eq!(
        after_first[&key1]["ActionCode"], "PLT",
        "the first run sent the older event"
    );
    assert!(
        one["Description"].as_str().unwrap().contains("Contact me"),
        "the summary holds both events: {}",
        one["Description"]
    );
    assert_eq!(
        by_email("customer3@contoso.com").1["OfferTitle"],
        "Contoso Analytics"
    );
    assert!(fake
        .posts()
        .iter()
        .all(|p| p.query.as_deref() == Some("sig=E2ESIG")));
}

#[tokio::test]
async fn a_receiver_gone_leaves_the_poll_pending_with_no_dead_letter_and_says_why_until_it_is_back()
{
    let fake = Fake::new();
    fake.answer_always(Reply::status(404).body("The workflow was not found."));
    let base = fake.start().await;
    let world = World::new().await;
    world
        .insert(
            &(1..=3)
                .map(|n| {
                    lead_row(
                        "p00",
                        &format!("r{n:06}"),
                        "AzureMarketplace-INS | contoso.analytics",
                        customer(n),
                    )
                })
                .collect::<Vec<_>>(),
        )
        .await;
    let sink_toml = format!(
        "[sink]\nkind = \"webhook\"\n[sink.webhook]\nurl = \"{base}{HOOK_PATH}\"\nallow_http = true\nretry = {{ max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"50ms\" }}\n"
    );
    let settings = world.settings_with_sink(&sink_toml);
    let cancel = CancellationToken::new();

    let pipeline = leadsync::build_pipeline(&settings).unwrap();
    let failed = pipeline.poll(&cancel).await.unwrap();
    let posts_after_first = fake.posts().len();
    let paused = pipeline.poll(&cancel).await.unwrap();
    let metrics = pipeline.memory.metrics.render();
    let failures = pipeline.memory.metrics.endpoint_failures();
    let dead = pipeline.state.dead_letters().await.unwrap();
    let checkpoint = pipeline.state.checkpoint().await.unwrap();
    drop(pipeline);

    assert_eq!(
        (failed.pending, failed.rejected, failed.delivered),
        (3, 0, 0)
    );
    assert!(dead.is_empty(), "not the leads' fault: {dead:?}");
    assert_eq!(checkpoint, None, "the checkpoint holds");
    assert_eq!(
        posts_after_first, 3,
        "one try each, no retries against a missing flow"
    );
    assert_eq!(paused.pending, 3);
    assert_eq!(
        fake.posts().len(),
        3,
        "the sink pauses instead of calling again"
    );
    assert!(
        metrics.contains(r#"leadsync_sink_endpoint_failing{sink="webhook"} 1"#),
        "{metrics}"
    );
    assert_eq!(failures.len(), 1);
    assert!(failures[0].1.contains("HTTP 404"), "{failures:?}");

    // The flow is back: the next start delivers everything and moves the checkpoint.
    fake.answer_always(Reply::status(202));
    let pipeline = leadsync::build_pipeline(&settings).unwrap();
    let recovered = pipeline.poll(&cancel).await.unwrap();
    assert_eq!((recovered.delivered, recovered.pending), (3, 0));
    assert!(pipeline.state.checkpoint().await.unwrap().is_some());
    assert!(pipeline.memory.metrics.endpoint_failures().is_empty());
}
