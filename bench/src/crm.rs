//! An in-process fake Salesforce, minimal but contract-shaped (REST API developer guide):
//!
//! - `POST /services/oauth2/token` (client credentials, form-encoded): `access_token` and
//!   `instance_url`, or `400 {"error", "error_description"}`.
//! - `PATCH /services/data/vXX.X/composite/sobjects/Lead/{ExternalIdField}`: sObject
//!   Collections upsert, `{"allOrNone": false, "records": [...]}` of at most 200, answered
//!   with one UpsertResult per record, in order (what leadsync's sink sends).
//! - `PATCH /services/data/vXX.X/sobjects/Lead/{ExternalIdField}/{key}`: single-record
//!   upsert, `201` with `created: true` or `200` with `created: false` (what the baseline sends).
//! - `GET /services/data/vXX.X/query?q=SELECT ... FROM Lead WHERE <ExternalIdField> IN (...)`:
//!   the Leads of those keys that exist (`Id`, the key, `IsConverted` false, `OwnerId`,
//!   `Company`), `{"totalSize", "done": true, "records"}` (what leadsync's sink asks
//!   before each upsert, for the fields a rep owns).
//! - A missing or wrong bearer token: `401 INVALID_SESSION_ID`; `Sforce-Limit-Info` on every
//!   API answer; `REQUIRED_FIELD_MISSING` when a Lead would be created without LastName
//!   or Company.
//!
//! It counts calls and records, and notes when a watched Email was first accepted
//! (the end of the latency measurement).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

pub const CLIENT_ID: &str = "3MVG9leadsync.bench.consumer.key";
pub const CLIENT_SECRET: &str = "bench-consumer-secret";
pub const EXTERNAL_ID: &str = "Leadsync_Key__c";
const ACCESS_TOKEN: &str = "00DBENCH!AQ.bench-access-token";
const MAX_RECORDS: usize = 200;

/// What the fake saw since the last reset.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub token_calls: u64,
    /// sObject Collections upserts (leadsync).
    pub composite_calls: u64,
    /// Single-record upserts (the baseline).
    pub single_calls: u64,
    /// SOQL queries (leadsync reads a batch's existing Leads before upserting it).
    pub query_calls: u64,
    pub records: u64,
    pub created: u64,
    pub updated: u64,
    pub refused: u64,
}

impl Counts {
    /// API calls that count against the org's daily limit (token requests do not).
    pub fn api_calls(&self) -> u64 {
        self.composite_calls + self.single_calls + self.query_calls
    }
}

#[derive(Default)]
struct Inner {
    counts: Counts,
    /// External id -> Lead record number and Company.
    leads: HashMap<String, (u64, String)>,
    /// Lower-cased Email -> when a Lead with it was first accepted.
    watch: HashMap<String, Option<Instant>>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Added to every API answer (a real org answers in tens to hundreds of ms).
    delay: Duration,
    url: String,
}

/// The running fake; it stops with the runtime.
#[derive(Clone)]
pub struct FakeSalesforce {
    shared: Arc<Shared>,
}

impl FakeSalesforce {
    pub async fn start(delay: Duration) -> anyhow::Result<FakeSalesforce> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            delay,
            url,
        });
        let router = Router::new()
            .route("/services/oauth2/token", post(token))
            .route(
                "/services/data/{version}/composite/sobjects/{sobject}/{field}",
                patch(upsert_collection),
            )
            .route(
                "/services/data/{version}/sobjects/{sobject}/{field}/{key}",
                patch(upsert_one),
            )
            .route("/services/data/{version}/query", get(query))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeSalesforce { shared })
    }

    /// The login URL, which is also the instance URL.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// Forgets every Lead and count.
    pub fn reset(&self) {
        *self.shared.inner.lock().unwrap() = Inner::default();
    }

    pub fn counts(&self) -> Counts {
        self.shared.inner.lock().unwrap().counts.clone()
    }

    pub fn leads(&self) -> usize {
        self.shared.inner.lock().unwrap().leads.len()
    }

    /// Starts noting when a Lead with this Email is first accepted.
    pub fn watch(&self, email: &str) {
        self.shared
            .inner
            .lock()
            .unwrap()
            .watch
            .insert(email.to_ascii_lowercase(), None);
    }

    /// When each watched Email was first accepted (`None`: not yet).
    pub fn accepted(&self, email: &str) -> Option<Instant> {
        self.shared
            .inner
            .lock()
            .unwrap()
            .watch
            .get(&email.to_ascii_lowercase())
            .copied()
            .flatten()
    }

    pub fn all_accepted(&self) -> bool {
        self.shared
            .inner
            .lock()
            .unwrap()
            .watch
            .values()
            .all(Option::is_some)
    }
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!([{"message": message, "errorCode": code}])),
    )
        .into_response()
}

fn with_limit_info(calls: u64, response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response.headers_mut().insert(
        "sforce-limit-info",
        format!("api-usage={calls}/5000000").parse().unwrap(),
    );
    response
}

async fn token(
    State(fake): State<Arc<Shared>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.inner.lock().unwrap().counts.token_calls += 1;
    let field = |name: &str| form.get(name).map(String::as_str);
    if field("grant_type") != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"})),
        )
            .into_response();
    }
    if field("client_id") != Some(CLIENT_ID) || field("client_secret") != Some(CLIENT_SECRET) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_client", "error_description": "invalid client credentials"})),
        )
            .into_response();
    }
    Json(json!({
        "access_token": ACCESS_TOKEN,
        "signature": "YmVuY2g=",
        "scope": "api",
        "instance_url": fake.url,
        "id": format!("{}/id/00DBENCH/005BENCH", fake.url),
        "token_type": "Bearer",
        "issued_at": "1700000000000",
    }))
    .into_response()
}

/// 401 unless the request carries the token the fake issued.
fn unauthorised(headers: &HeaderMap) -> Option<Response> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    (bearer != Some(ACCESS_TOKEN)).then(|| {
        api_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        )
    })
}

fn check_target(sobject: &str, field: &str) -> Option<Response> {
    if sobject != "Lead" {
        return Some(api_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ));
    }
    if field != EXTERNAL_ID {
        return Some(api_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("Provided external ID field does not exist or is not accessible: {field}"),
        ));
    }
    None
}

/// Upserts one record; the UpsertResult (and whether it was created).
fn upsert(inner: &mut Inner, key: &str, record: &Map<String, Value>) -> (Value, bool) {
    inner.counts.records += 1;
    let text = |f: &str| record.get(f).and_then(Value::as_str).unwrap_or_default();
    let exists = inner.leads.contains_key(key);
    let missing: Vec<&str> = ["LastName", "Company"]
        .into_iter()
        .filter(|f| !exists && text(f).trim().is_empty())
        .collect();
    if key.is_empty() || !missing.is_empty() {
        inner.counts.refused += 1;
        let error = json!({"statusCode": "REQUIRED_FIELD_MISSING", "message": format!("Required fields are missing: [{}]", missing.join(", ")), "fields": missing});
        return (json!({"success": false, "errors": [error]}), false);
    }
    let next = inner.leads.len() as u64 + 1;
    let mut created = false;
    let lead = inner.leads.entry(key.to_owned()).or_insert_with(|| {
        created = true;
        (next, String::new())
    });
    if !text("Company").is_empty() {
        lead.1 = text("Company").to_owned();
    }
    let number = lead.0;
    if created {
        inner.counts.created += 1;
    } else {
        inner.counts.updated += 1;
    }
    let email = text("Email").to_ascii_lowercase();
    if let Some(slot @ None) = inner.watch.get_mut(&email) {
        *slot = Some(Instant::now());
    }
    (
        json!({"id": format!("00Q{number:012}"), "success": true, "errors": [], "created": created}),
        created,
    )
}

/// A SOQL query of Leads by external id, as the sink sends it.
async fn query(
    State(fake): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Some(response) = unauthorised(&headers) {
        return response;
    }
    let soql = params.get("q").cloned().unwrap_or_default();
    let Some((_, list)) = soql.split_once(&format!("FROM Lead WHERE {EXTERNAL_ID} IN (")) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "only Lead queries by the external id",
        );
    };
    let keys = list.trim_end().trim_end_matches(')');
    if !fake.delay.is_zero() {
        tokio::time::sleep(fake.delay).await;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.counts.query_calls += 1;
    let records: Vec<Value> = keys
        .split(',')
        .map(|k| k.trim().trim_matches('\''))
        .filter_map(|k| inner.leads.get(k).map(|lead| (k, lead)))
        .map(|(k, (number, company))| {
            json!({
                "attributes": {"type": "Lead"},
                "Id": format!("00Q{number:012}"),
                EXTERNAL_ID: k,
                "IsConverted": false,
                "ConvertedContactId": null,
                "ConvertedAccountId": null,
                "ConvertedOpportunityId": null,
                "OwnerId": "005000000000001",
                "Company": company,
            })
        })
        .collect();
    let calls = inner.counts.api_calls();
    with_limit_info(
        calls,
        Json(json!({"totalSize": records.len(), "done": true, "records": records})),
    )
}

async fn upsert_collection(
    State(fake): State<Arc<Shared>>,
    Path((_version, sobject, field)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(response) = unauthorised(&headers) {
        return response;
    }
    if let Some(response) = check_target(&sobject, &field) {
        return response;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "Unexpected character",
        );
    };
    let records = body["records"].as_array().cloned().unwrap_or_default();
    if body["allOrNone"] != json!(false) || records.is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "records and allOrNone = false expected",
        );
    }
    if records.len() > MAX_RECORDS {
        return api_error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
    }
    if !fake.delay.is_zero() {
        tokio::time::sleep(fake.delay).await;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.counts.composite_calls += 1;
    let mut results = Vec::with_capacity(records.len());
    for record in records {
        let Value::Object(mut record) = record else {
            results.push(json!({"success": false, "errors": [{"statusCode": "INVALID_INPUT", "message": "not an object", "fields": []}]}));
            continue;
        };
        if record
            .remove("attributes")
            .is_none_or(|a| a["type"] != "Lead")
        {
            results.push(json!({"success": false, "errors": [{"statusCode": "INVALID_INPUT", "message": "attributes.type must be Lead", "fields": []}]}));
            continue;
        }
        let key = record
            .get(EXTERNAL_ID)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        results.push(upsert(&mut inner, &key, &record).0);
    }
    let calls = inner.counts.api_calls();
    with_limit_info(calls, Json(Value::Array(results)))
}

async fn upsert_one(
    State(fake): State<Arc<Shared>>,
    Path((_version, sobject, field, key)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(response) = unauthorised(&headers) {
        return response;
    }
    if let Some(response) = check_target(&sobject, &field) {
        return response;
    }
    let Ok(Value::Object(record)) = serde_json::from_slice::<Value>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "Unexpected character",
        );
    };
    if !fake.delay.is_zero() {
        tokio::time::sleep(fake.delay).await;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.counts.single_calls += 1;
    let (result, created) = upsert(&mut inner, &key, &record);
    let calls = inner.counts.api_calls();
    if result["success"] == json!(false) {
        // Single-record errors use the request-level shape: [{"message", "errorCode", "fields"}].
        let errors: Vec<Value> = result["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| json!({"message": e["message"], "errorCode": e["statusCode"], "fields": e["fields"]}))
            .collect();
        return with_limit_info(calls, (StatusCode::BAD_REQUEST, Json(Value::Array(errors))));
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    with_limit_info(calls, (status, Json(result)))
}
