//! The Salesforce sink against an in-process fake of Salesforce that follows the
//! documented contract: an OAuth token endpoint on the login host (client credentials
//! and JWT bearer, the assertion verified with the public key), and the REST API on a
//! separate instance host (sObject Collections upsert by external id, Lead describe,
//! `INVALID_SESSION_ID`, `REQUEST_LIMIT_EXCEEDED`, per-record UpsertResults), SOQL
//! queries of Leads and Tasks, sObject Collections create (Tasks), and the CRM side
//! sales works in: a rep's edits, opt-outs, converted Leads (`CANNOT_UPDATE_CONVERTED_LEAD`).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Form, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use common::{customer, lead_row, serve, World};
use leadsync::config::Settings;
use leadsync::lead::{Customer, Email, Stage};
use leadsync::sink::salesforce::SalesforceSettings;
use leadsync::sink::{CustomerLead, LeadSink, Outcome, SalesforceSink};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

const CLIENT_ID: &str = "3MVG9leadsync.test.consumer.key";
const SECRET: &str = "sf-consumer-secret-7f3a9c";
const USERNAME: &str = "integration@acme.example";
const EXTERNAL_ID: &str = "Leadsync_Key__c";
const UPSERT_PATH: &str = "/services/data/v62.0/composite/sobjects/Lead/Leadsync_Key__c";
const SESSION_EXPIRED: &str =
    r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/salesforce/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------
// The fake

/// A scripted answer to the next authorised API request.
enum Fault {
    Respond(StatusCode, Value),
    /// Answer only after this long (longer than the client's timeout).
    Sleep(Duration),
}

#[derive(Clone, Debug)]
struct ApiRequest {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Value,
}

impl ApiRequest {
    fn records(&self) -> Vec<Value> {
        self.body["records"].as_array().cloned().unwrap_or_default()
    }

    fn keys(&self) -> Vec<String> {
        self.records()
            .iter()
            .map(|r| r[EXTERNAL_ID].as_str().unwrap().to_owned())
            .collect()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

struct FakeState {
    login_url: String,
    instance_url: String,
    public_key: Vec<u8>,
    issued: u64,
    valid_tokens: HashSet<String>,
    all_tokens: Vec<String>,
    token_requests: Vec<HashMap<String, String>>,
    assertions: Vec<Value>,
    api_requests: Vec<ApiRequest>,
    /// Leads by external id.
    leads: BTreeMap<String, Map<String, Value>>,
    creates: usize,
    /// Answers to the next writes (upserts, creates) and describes.
    faults: VecDeque<Fault>,
    /// Answers to the next SOQL queries.
    query_faults: VecDeque<Fault>,
    /// Tasks created through the API.
    tasks: Vec<Map<String, Value>>,
    /// A duplicate rule (action "Alert") flags new Leads with these emails.
    duplicate_emails: HashSet<String>,
    /// A validation rule refuses Leads with these last names.
    invalid_last_names: HashSet<String>,
    api_usage: (u64, u64),
    external_id_is_marked: bool,
}

type Shared = Arc<Mutex<FakeState>>;

/// The standard Lead field lengths the fake enforces (STRING_TOO_LONG beyond them).
fn lead_lengths() -> HashMap<&'static str, usize> {
    HashMap::from([
        ("FirstName", 40),
        ("LastName", 80),
        ("Company", 255),
        ("Title", 128),
        ("Email", 80),
        ("Phone", 40),
        ("Country", 80),
        ("LeadSource", 40),
        ("Description", 32_000),
        (EXTERNAL_ID, 255),
    ])
}

/// Every Lead field the fake org has (SOQL refuses others with INVALID_FIELD).
fn lead_columns() -> Vec<&'static str> {
    let mut columns: Vec<&'static str> = lead_lengths().into_keys().collect();
    columns.extend([
        "Id",
        "HasOptedOutOfEmail",
        "DoNotCall",
        "IsConverted",
        "ConvertedContactId",
        "ConvertedAccountId",
        "ConvertedOpportunityId",
        "OwnerId",
    ]);
    columns
}

const TASK_COLUMNS: [&str; 9] = [
    "Id",
    "Subject",
    "Description",
    "WhoId",
    "WhatId",
    "OwnerId",
    "Status",
    "Priority",
    "ActivityDate",
];
/// The user that owns the Leads the fake creates (a sales rep).
const REP_USER: &str = "005000000000042AAA";

fn token_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!([{"message": message, "errorCode": code}])),
    )
        .into_response()
}

fn verify_assertion(state: &FakeState, assertion: &str) -> Result<Value, String> {
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(&state.public_key).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[state.login_url.as_str()]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|e| format!("invalid assertion: {e}"))?;
    if data.claims["sub"] != USERNAME {
        return Err("user hasn't approved this consumer".into());
    }
    // Salesforce refuses an exp more than 3 minutes (plus clock skew) ahead.
    if data.claims["exp"].as_u64().unwrap_or(0) > unix_now() + 300 {
        return Err("invalid assertion: exp too far in the future".into());
    }
    Ok(data.claims)
}

async fn token(State(fake): State<Shared>, Form(form): Form<HashMap<String, String>>) -> Response {
    let mut state = fake.lock().unwrap();
    state.token_requests.push(form.clone());
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
                return token_error("invalid_client_id", "client identifier invalid");
            }
            if form.get("client_secret").map(String::as_str) != Some(SECRET) {
                return token_error("invalid_client", "invalid client credentials");
            }
        }
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let assertion = form.get("assertion").cloned().unwrap_or_default();
            match verify_assertion(&state, &assertion) {
                Ok(claims) => state.assertions.push(claims),
                Err(description) => return token_error("invalid_grant", &description),
            }
        }
        _ => return token_error("unsupported_grant_type", "grant type not supported"),
    }
    state.issued += 1;
    let access_token = format!("00DFAKE!AQ{:04}.token-value", state.issued);
    state.valid_tokens.insert(access_token.clone());
    state.all_tokens.push(access_token.clone());
    Json(json!({
        "access_token": access_token,
        "signature": "c2lnbmF0dXJl",
        "scope": "api",
        "instance_url": state.instance_url,
        "id": format!("{}/id/00DFAKE/005FAKE", state.login_url),
        "token_type": "Bearer",
        "issued_at": "1700000000000",
    }))
    .into_response()
}

/// Records the request, checks the session, applies a scripted fault (a query's from
/// `query_faults`, any other's from `faults`).
async fn admit(
    fake: &Shared,
    method: &str,
    path: String,
    headers: &HeaderMap,
    body: Value,
) -> Option<Response> {
    let is_query = path.contains("/query");
    let fault = {
        let mut state = fake.lock().unwrap();
        state.api_requests.push(ApiRequest {
            method: method.into(),
            path,
            headers: headers.clone(),
            body,
        });
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !state.valid_tokens.contains(bearer) {
            return Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [("content-type", "application/json")],
                    SESSION_EXPIRED,
                )
                    .into_response(),
            );
        }
        if is_query {
            state.query_faults.pop_front()
        } else {
            state.faults.pop_front()
        }
    };
    match fault {
        None => None,
        Some(Fault::Respond(status, body)) => Some((status, Json(body)).into_response()),
        Some(Fault::Sleep(d)) => {
            tokio::time::sleep(d).await;
            Some(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVER_UNAVAILABLE",
                "too late",
            ))
        }
    }
}

fn with_limit_info(state: &mut FakeState, response: impl IntoResponse) -> Response {
    state.api_usage.0 += 1;
    let (used, limit) = state.api_usage;
    let mut response = response.into_response();
    response.headers_mut().insert(
        "sforce-limit-info",
        format!("api-usage={used}/{limit}").parse().unwrap(),
    );
    response
}

fn record_errors(state: &FakeState, record: &Map<String, Value>, allow_save: bool) -> Vec<Value> {
    let text = |f: &str| record.get(f).and_then(Value::as_str).unwrap_or_default();
    let mut errors = Vec::new();
    // Required on insert; an update changes only the fields it carries (a field sent
    // empty would blank it, which Salesforce refuses for a required one).
    let exists = state.leads.contains_key(text(EXTERNAL_ID));
    let missing: Vec<&str> = ["LastName", "Company"]
        .into_iter()
        .filter(|f| {
            if exists {
                record
                    .get(*f)
                    .is_some_and(|v| v.as_str().is_none_or(|t| t.trim().is_empty()))
            } else {
                text(f).trim().is_empty()
            }
        })
        .collect();
    if !missing.is_empty() {
        errors.push(json!({"statusCode": "REQUIRED_FIELD_MISSING", "message": format!("Required fields are missing: [{}]", missing.join(", ")), "fields": missing}));
    }
    for (field, max) in lead_lengths() {
        if text(field).chars().count() > max {
            errors.push(json!({"statusCode": "STRING_TOO_LONG", "message": format!("{field}: data value too large (max length={max})"), "fields": [field]}));
        }
    }
    if !errors.is_empty() {
        return errors;
    }
    if state.invalid_last_names.contains(text("LastName")) {
        return vec![
            json!({"statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Marketplace leads need a real last name", "fields": ["LastName"]}),
        ];
    }
    if state
        .leads
        .get(text(EXTERNAL_ID))
        .is_some_and(|l| l.get("IsConverted") == Some(&json!(true)))
    {
        return vec![
            json!({"statusCode": "CANNOT_UPDATE_CONVERTED_LEAD", "message": "cannot reference converted lead", "fields": []}),
        ];
    }
    let is_new = !state.leads.contains_key(text(EXTERNAL_ID));
    if is_new && !allow_save && state.duplicate_emails.contains(text("Email")) {
        return vec![
            json!({"statusCode": "DUPLICATES_DETECTED", "message": "Use one of these records?", "fields": []}),
        ];
    }
    Vec::new()
}

async fn upsert(
    State(fake): State<Shared>,
    UrlPath((version, sobject, field)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/services/data/{version}/composite/sobjects/{sobject}/{field}");
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "Unexpected character",
        );
    };
    if let Some(response) = admit(&fake, "PATCH", path, &headers, body.clone()).await {
        return response;
    }
    let mut state = fake.lock().unwrap();
    if sobject != "Lead" {
        return api_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    }
    if field != EXTERNAL_ID || !state.external_id_is_marked {
        let message =
            format!("Provided external ID field does not exist or is not accessible: {field}");
        return with_limit_info(
            &mut state,
            api_error(StatusCode::NOT_FOUND, "NOT_FOUND", &message),
        );
    }
    let records = body["records"].as_array().cloned().unwrap_or_default();
    if body["allOrNone"] != json!(false) || records.is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "records and allOrNone = false expected",
        );
    }
    if records.len() > 200 {
        return api_error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
    }
    if records.iter().any(|r| {
        r["attributes"]["type"] != "Lead" || r[EXTERNAL_ID].as_str().is_none_or(str::is_empty)
    }) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            "each record needs attributes.type = Lead and the external id",
        );
    }
    let allow_save = headers
        .get("sforce-duplicate-rule-header")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').any(|p| p.trim() == "allowSave=true"));
    let mut results = Vec::new();
    for record in records {
        let mut record = record.as_object().unwrap().clone();
        record.remove("attributes");
        let errors = record_errors(&state, &record, allow_save);
        if !errors.is_empty() {
            results.push(json!({"success": false, "errors": errors}));
            continue;
        }
        let key = record[EXTERNAL_ID].as_str().unwrap().to_owned();
        let created = !state.leads.contains_key(&key);
        if created {
            state.creates += 1;
            let id = format!("00Q{:012}", state.creates);
            record.insert("Id".into(), json!(id));
            record.insert("OwnerId".into(), json!(REP_USER));
            record.insert("IsConverted".into(), json!(false));
            state.leads.insert(key.clone(), record);
        } else {
            state.leads.get_mut(&key).unwrap().extend(record);
        }
        let id = state.leads[&key]["Id"].clone();
        results.push(json!({"id": id, "success": true, "errors": [], "created": created}));
    }
    with_limit_info(&mut state, Json(Value::Array(results)))
}

async fn describe(
    State(fake): State<Shared>,
    UrlPath((version, sobject)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/services/data/{version}/sobjects/{sobject}/describe");
    if let Some(response) = admit(&fake, "GET", path, &headers, Value::Null).await {
        return response;
    }
    let mut state = fake.lock().unwrap();
    let mut fields: Vec<Value> = lead_lengths()
        .into_iter()
        .filter(|(name, _)| *name != EXTERNAL_ID)
        .map(|(name, length)| json!({"name": name, "type": "string", "length": length, "externalId": false}))
        .collect();
    for name in lead_columns()
        .into_iter()
        .filter(|n| !lead_lengths().contains_key(n))
    {
        fields.push(json!({"name": name, "externalId": false}));
    }
    fields.push(json!({"name": EXTERNAL_ID, "type": "string", "length": 255, "externalId": state.external_id_is_marked, "unique": true}));
    with_limit_info(&mut state, Json(json!({"name": "Lead", "fields": fields})))
}

/// The values of `Field IN ('a', 'b\'c')`, unescaped.
fn soql_in_values(list: &str) -> Option<Vec<String>> {
    let mut values = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == ',') {
            chars.next();
        }
        match chars.next() {
            None => return Some(values),
            Some('\'') => {}
            Some(_) => return None,
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => value.push(chars.next()?),
                '\'' => break,
                c => value.push(c),
            }
        }
        values.push(value);
    }
}

/// `SELECT a, b FROM Lead WHERE F IN (...)`, the only SOQL shape leadsync sends.
async fn query(
    State(fake): State<Shared>,
    UrlPath(version): UrlPath<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let soql = params.get("q").cloned().unwrap_or_default();
    let path = format!("/services/data/{version}/query");
    if let Some(response) = admit(&fake, "GET", path, &headers, json!({ "q": soql })).await {
        return response;
    }
    let malformed = || {
        api_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            &format!("unexpected token in: {soql}"),
        )
    };
    let Some(rest) = soql.strip_prefix("SELECT ") else {
        return malformed();
    };
    let Some((select, rest)) = rest.split_once(" FROM ") else {
        return malformed();
    };
    let Some((object, rest)) = rest.split_once(" WHERE ") else {
        return malformed();
    };
    let Some((field, list)) = rest.split_once(" IN (") else {
        return malformed();
    };
    let Some(values) = list.strip_suffix(')').and_then(soql_in_values) else {
        return malformed();
    };
    let mut state = fake.lock().unwrap();
    let columns: Vec<&str> = match object {
        "Lead" => lead_columns(),
        "Task" => TASK_COLUMNS.to_vec(),
        _ => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_TYPE",
                &format!("sObject type '{object}' is not supported."),
            )
        }
    };
    let selected: Vec<&str> = select.split(',').map(str::trim).collect();
    for name in selected.iter().chain([&field]) {
        if !columns.contains(name) {
            return with_limit_info(
                &mut state,
                api_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_FIELD",
                    &format!("\n{select} FROM {object} WHERE {field}\n^\nERROR at Row:1:Column:8\nNo such column '{name}' on entity '{object}'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field name."),
                ),
            );
        }
    }
    let rows: Vec<&Map<String, Value>> = match object {
        "Lead" => state.leads.values().collect(),
        _ => state.tasks.iter().collect(),
    };
    let records: Vec<Value> = rows
        .into_iter()
        .filter(|r| {
            r.get(field)
                .and_then(Value::as_str)
                .is_some_and(|v| values.iter().any(|x| x == v))
        })
        .map(|r| {
            let mut out = Map::new();
            out.insert("attributes".into(), json!({"type": object}));
            for name in &selected {
                out.insert((*name).into(), r.get(*name).cloned().unwrap_or(Value::Null));
            }
            Value::Object(out)
        })
        .collect();
    let body = json!({"totalSize": records.len(), "done": true, "records": records});
    with_limit_info(&mut state, Json(body))
}

/// sObject Collections create (the fake knows Tasks).
async fn create(
    State(fake): State<Shared>,
    UrlPath(version): UrlPath<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let path = format!("/services/data/{version}/composite/sobjects");
    if let Some(response) = admit(&fake, "POST", path, &headers, body.clone()).await {
        return response;
    }
    let mut state = fake.lock().unwrap();
    let records = body["records"].as_array().cloned().unwrap_or_default();
    let mut results = Vec::new();
    for record in records {
        let mut record = record.as_object().unwrap().clone();
        if record.remove("attributes").map(|a| a["type"].clone()) != Some(json!("Task")) {
            results.push(json!({"success": false, "errors": [{"statusCode": "INVALID_TYPE", "message": "the fake creates Tasks only"}]}));
            continue;
        }
        if let Some(bad) = record.keys().find(|k| !TASK_COLUMNS.contains(&k.as_str())) {
            results.push(json!({"success": false, "errors": [{"statusCode": "INVALID_FIELD", "message": format!("No such column '{bad}' on sobject of type Task"), "fields": [bad]}]}));
            continue;
        }
        let id = format!("00T{:012}", state.tasks.len() + 1);
        record.insert("Id".into(), json!(id));
        state.tasks.push(record);
        results.push(json!({"id": id, "success": true, "errors": []}));
    }
    with_limit_info(&mut state, Json(Value::Array(results)))
}

/// The fake org: a login host with the token endpoint and an instance host with the API.
struct Fake {
    state: Shared,
    login_url: String,
}

impl Fake {
    async fn start() -> Fake {
        let state: Shared = Arc::new(Mutex::new(FakeState {
            login_url: String::new(),
            instance_url: String::new(),
            public_key: std::fs::read(fixture("public_key.pem")).unwrap(),
            issued: 0,
            valid_tokens: HashSet::new(),
            all_tokens: Vec::new(),
            token_requests: Vec::new(),
            assertions: Vec::new(),
            api_requests: Vec::new(),
            leads: BTreeMap::new(),
            creates: 0,
            faults: VecDeque::new(),
            query_faults: VecDeque::new(),
            tasks: Vec::new(),
            duplicate_emails: HashSet::new(),
            invalid_last_names: HashSet::new(),
            api_usage: (100, 15_000),
            external_id_is_marked: true,
        }));
        let login = Router::new()
            .route("/services/oauth2/token", post(token))
            .with_state(state.clone());
        let instance = Router::new()
            .route(
                "/services/data/{version}/composite/sobjects/{sobject}/{field}",
                patch(upsert),
            )
            .route(
                "/services/data/{version}/sobjects/{sobject}/describe",
                get(describe),
            )
            .route("/services/data/{version}/query", get(query))
            .route("/services/data/{version}/composite/sobjects", post(create))
            .with_state(state.clone());
        let login_url = serve(login).await;
        let instance_url = serve(instance).await;
        {
            let mut s = state.lock().unwrap();
            s.login_url = login_url.clone();
            s.instance_url = instance_url;
        }
        Fake { state, login_url }
    }

    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    fn patches(&self) -> Vec<ApiRequest> {
        self.with(|s| {
            s.api_requests
                .iter()
                .filter(|r| r.method == "PATCH")
                .cloned()
                .collect()
        })
    }

    fn token_requests(&self) -> Vec<HashMap<String, String>> {
        self.with(|s| s.token_requests.clone())
    }

    fn fault(&self, fault: Fault) {
        self.with(|s| s.faults.push_back(fault));
    }

    /// Every issued token stops working, as when a session times out.
    fn expire_sessions(&self) {
        self.with(|s| s.valid_tokens.clear());
    }

    fn lead(&self, key: &str) -> Option<Map<String, Value>> {
        self.with(|s| s.leads.get(key).cloned())
    }

    /// A sales rep edits the Lead in Salesforce.
    fn rep_edits(&self, key: &str, field: &str, value: Value) {
        self.with(|s| {
            s.leads
                .get_mut(key)
                .expect("the Lead exists")
                .insert(field.into(), value)
        });
    }

    /// Sales converts the Lead into a Contact, an Account and an Opportunity.
    fn convert(&self, key: &str) {
        for (field, value) in [
            ("IsConverted", json!(true)),
            ("ConvertedContactId", json!("003000000000777AAA")),
            ("ConvertedAccountId", json!("001000000000777AAA")),
            ("ConvertedOpportunityId", json!("006000000000777AAA")),
        ] {
            self.rep_edits(key, field, value);
        }
    }

    fn queries(&self) -> Vec<String> {
        self.with(|s| {
            s.api_requests
                .iter()
                .filter(|r| r.path.ends_with("/query"))
                .map(|r| r.body["q"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
    }

    fn tasks(&self) -> Vec<Map<String, Value>> {
        self.with(|s| s.tasks.clone())
    }

    /// The `[sink.salesforce]` section for this fake, client credentials, quick retries.
    fn section(&self, extra: &str) -> String {
        format!(
            r#"login_url = "{login}"
client_id = "{CLIENT_ID}"
client_secret = {{ value = "{SECRET}" }}
allow_http = true
request_timeout = "2s"
retry = {{ max_attempts = 3, initial_backoff = "10ms", max_backoff = "50ms" }}
{extra}
"#,
            login = self.login_url
        )
    }

    fn jwt_section(&self, key_file: &str) -> String {
        format!(
            r#"auth = "jwt_bearer"
login_url = "{login}"
client_id = "{CLIENT_ID}"
username = "{USERNAME}"
private_key = {{ file = "{key}" }}
allow_http = true
retry = {{ max_attempts = 3, initial_backoff = "10ms", max_backoff = "50ms" }}
"#,
            login = self.login_url,
            key = fixture(key_file)
        )
    }
}

// ---------------------------------------------------------------------------
// Helpers

fn sink_toml(section: &str) -> String {
    format!("[sink]\nkind = \"salesforce\"\n[sink.salesforce]\n{section}")
}

/// Parses a `[sink.salesforce]` section through the real config loader (and its validation).
fn settings(section: &str) -> SalesforceSettings {
    let text = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n{}",
        sink_toml(section)
    );
    Settings::from_toml_with_env(&text, Path::new("test.toml"), &HashMap::new())
        .unwrap_or_else(|e| panic!("test settings are invalid: {e}"))
        .sink
        .salesforce
        .expect("a [sink.salesforce] section")
}

fn sink(section: &str) -> SalesforceSink {
    SalesforceSink::new(&settings(section)).expect("sink builds")
}

fn key(n: usize) -> String {
    format!("ls-{n:020x}")
}

fn lead(n: usize) -> CustomerLead {
    let email = format!("customer{n}@contoso.com");
    CustomerLead {
        key: format!("email:{email}"),
        external_key: key(n),
        customer: Customer {
            first_name: Some(format!("First{n}")),
            last_name: Some(format!("Last{n}")),
            email: Email::parse(&email),
            phone: Some("+1 425 555 0100".into()),
            country: Some("US".into()),
            company: Some(format!("Company {n}")),
            title: Some("CTO".into()),
        },
        stage: Stage::Active,
        do_not_contact: false,
        test_lead: false,
        first_seen: OffsetDateTime::UNIX_EPOCH,
        last_seen: OffsetDateTime::UNIX_EPOCH,
        offers: Vec::new(),
        history: Vec::new(),
        summary: format!("First{n} Last{n} (Company {n}), stage: active."),
    }
}

fn reason(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Delivered => "",
        Outcome::RetryLater { reason, .. }
        | Outcome::Rejected { reason }
        | Outcome::EndpointFailed { reason } => reason,
        Outcome::FollowedUp { note } => note,
    }
}

/// Captures this thread's logs at DEBUG.
fn capture_logs() -> (common::Logs, tracing::subscriber::DefaultGuard) {
    common::capture_logs(tracing_subscriber::EnvFilter::new("debug"))
}

// ---------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn client_credentials_are_exchanged_once_and_the_token_is_used_on_the_instance_url() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));

    let first = sink.deliver(&[lead(1)]).await;
    let second = sink.deliver(&[lead(2)]).await;

    assert_eq!(first, vec![Outcome::Delivered]);
    assert_eq!(second, vec![Outcome::Delivered]);
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1, "the token is cached");
    assert_eq!(tokens[0]["grant_type"], "client_credentials");
    assert_eq!(tokens[0]["client_id"], CLIENT_ID);
    assert_eq!(tokens[0]["client_secret"], SECRET);
    let patches = fake.patches();
    assert_eq!(patches.len(), 2);
    let issued = fake.with(|s| s.all_tokens[0].clone());
    for p in &patches {
        assert_eq!(p.path, UPSERT_PATH);
        assert_eq!(p.header("authorization"), Some(format!("Bearer {issued}")));
        assert!(p
            .header("content-type")
            .unwrap()
            .starts_with("application/json"));
        assert_eq!(p.header("sforce-duplicate-rule-header"), None);
        assert_eq!(p.body["allOrNone"], json!(false));
        assert_eq!(p.records()[0]["attributes"], json!({"type": "Lead"}));
    }
    assert_eq!(
        fake.lead(&key(2)).unwrap()["Email"],
        "customer2@contoso.com"
    );
}

#[tokio::test]
async fn a_wrong_client_secret_holds_the_batch_saying_invalid_client_without_the_secret() {
    let fake = Fake::start().await;
    let section = fake.section("").replace(SECRET, "wrong-secret-0b1c");
    let sink = sink(&section);

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    assert_eq!(outcomes.len(), 2);
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { .. }),
            "the leads wait for corrected credentials: {outcome:?}"
        );
        let reason = reason(outcome);
        assert!(
            reason.contains("invalid_client: invalid client credentials"),
            "{reason}"
        );
        assert!(reason.contains("client_credentials"), "{reason}");
        assert!(!reason.contains("wrong-secret-0b1c"), "{reason}");
    }
    assert_eq!(fake.token_requests().len(), 1, "a refusal is not retried");
    assert!(fake.patches().is_empty());
}

#[tokio::test]
async fn the_jwt_bearer_flow_sends_an_rs256_assertion_that_verifies_with_the_public_key() {
    let fake = Fake::start().await;
    let sink = sink(&fake.jwt_section("private_key.pem"));

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        tokens[0]["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    assert!(!tokens[0].contains_key("client_secret"));
    let claims = fake.with(|s| s.assertions[0].clone());
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], USERNAME);
    assert_eq!(
        claims["aud"],
        fake.login_url.as_str(),
        "aud defaults to login_url"
    );
    let exp = claims["exp"].as_u64().unwrap();
    let now = unix_now();
    assert!(
        exp > now && exp <= now + 180,
        "exp is at most 3 minutes ahead: {exp} vs {now}"
    );
    assert!(fake.lead(&key(1)).is_some());
}

#[tokio::test]
async fn an_assertion_signed_with_a_key_the_org_does_not_know_is_refused_as_invalid_grant_and_the_lead_waits(
) {
    let fake = Fake::start().await;
    let sink = sink(&fake.jwt_section("other_private_key.pem"));

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert!(
        matches!(&outcomes[..], [Outcome::EndpointFailed { reason }] if reason.contains("invalid_grant") && reason.contains("jwt_bearer")),
        "{outcomes:?}"
    );
    assert!(fake.patches().is_empty());
}

#[tokio::test]
async fn a_session_expiring_mid_run_is_renewed_once_and_the_batch_delivered() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    assert_eq!(sink.deliver(&[lead(1)]).await, vec![Outcome::Delivered]);
    fake.expire_sessions();

    let outcomes = sink.deliver(&[lead(2), lead(3)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered, Outcome::Delivered]);
    assert_eq!(
        fake.token_requests().len(),
        2,
        "exactly one re-authentication"
    );
    // The second batch starts with its query: that is the request refused.
    let requests = fake.with(|s| s.api_requests.clone());
    let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/services/data/v62.0/query",
            UPSERT_PATH,
            "/services/data/v62.0/query",
            "/services/data/v62.0/query",
            UPSERT_PATH
        ],
        "first batch, the refused query, the query again, the upsert"
    );
    let tokens = fake.with(|s| s.all_tokens.clone());
    assert_eq!(
        requests[2].header("authorization"),
        Some(format!("Bearer {}", tokens[0]))
    );
    assert_eq!(
        requests[3].header("authorization"),
        Some(format!("Bearer {}", tokens[1]))
    );
    let patches = fake.patches();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[1].keys(), vec![key(2), key(3)]);
    assert_eq!(fake.with(|s| s.leads.len()), 3);
}

// ---------------------------------------------------------------------------
// Upserts and per-record results

#[tokio::test]
async fn a_second_delivery_of_the_same_key_updates_the_lead_instead_of_creating_another() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    let mut later = lead(1);
    later.customer.title = Some("VP Engineering".into());
    later.summary = "First1 Last1 (Company 1), stage: trial.".into();

    let first = sink.deliver(&[lead(1)]).await;
    let second = sink.deliver(&[later]).await;

    assert_eq!(first, vec![Outcome::Delivered]);
    assert_eq!(second, vec![Outcome::Delivered]);
    assert_eq!(fake.with(|s| s.creates), 1, "never a second record");
    assert_eq!(fake.with(|s| s.leads.len()), 1);
    let record = fake.lead(&key(1)).unwrap();
    assert_eq!(record["Title"], "VP Engineering");
    assert_eq!(
        record["Description"], "First1 Last1 (Company 1), stage: active.",
        "the summary is written when the Lead is created, then it is sales'"
    );
    assert_eq!(record[EXTERNAL_ID], key(1).as_str());
}

#[tokio::test]
async fn a_record_the_org_refuses_is_rejected_with_its_status_code_and_the_others_are_delivered() {
    let fake = Fake::start().await;
    fake.with(|s| s.invalid_last_names.insert("Last2".into()));
    let sink = sink(&fake.section(""));

    let outcomes = sink.deliver(&[lead(1), lead(2), lead(3)]).await;

    assert_eq!(outcomes[0], Outcome::Delivered);
    assert_eq!(outcomes[2], Outcome::Delivered);
    let reason = reason(&outcomes[1]);
    assert!(matches!(outcomes[1], Outcome::Rejected { .. }));
    assert!(
        reason.contains("FIELD_CUSTOM_VALIDATION_EXCEPTION: Marketplace leads need a real last name (fields: LastName)"),
        "{reason}"
    );
    assert_eq!(fake.patches().len(), 1, "a record error is not retried");
    assert!(fake.lead(&key(1)).is_some() && fake.lead(&key(3)).is_some());
    assert!(fake.lead(&key(2)).is_none());
}

#[tokio::test]
async fn a_duplicate_is_rejected_under_the_reject_policy() {
    let fake = Fake::start().await;
    fake.with(|s| s.duplicate_emails.insert("customer2@contoso.com".into()));
    let sink = sink(&fake.section(""));

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    assert_eq!(outcomes[0], Outcome::Delivered);
    assert!(
        matches!(&outcomes[1], Outcome::Rejected { reason } if reason.contains("DUPLICATES_DETECTED: Use one of these records?")),
        "{outcomes:?}"
    );
    let patches = fake.patches();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].header("sforce-duplicate-rule-header"), None);
    assert!(fake.lead(&key(2)).is_none());
}

#[tokio::test]
async fn a_duplicate_is_sent_again_alone_with_allow_save_under_the_allow_save_policy() {
    let fake = Fake::start().await;
    fake.with(|s| s.duplicate_emails.insert("customer2@contoso.com".into()));
    let sink = sink(&fake.section("duplicates = \"allow_save\""));

    let outcomes = sink.deliver(&[lead(1), lead(2), lead(3)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 3]);
    let patches = fake.patches();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[0].header("sforce-duplicate-rule-header"), None);
    assert_eq!(patches[0].keys(), vec![key(1), key(2), key(3)]);
    assert_eq!(
        patches[1].header("sforce-duplicate-rule-header").as_deref(),
        Some("allowSave=true")
    );
    assert_eq!(
        patches[1].keys(),
        vec![key(2)],
        "only the flagged record is re-sent"
    );
    assert_eq!(fake.with(|s| s.creates), 3);
}

#[tokio::test]
async fn a_batch_of_450_leads_goes_in_collections_of_200_200_and_50_in_input_order() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    let leads: Vec<CustomerLead> = (0..450).map(lead).collect();

    let outcomes = sink.deliver(&leads).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 450]);
    let patches = fake.patches();
    let sizes: Vec<usize> = patches.iter().map(|p| p.records().len()).collect();
    assert_eq!(sizes, vec![200, 200, 50]);
    let sent: Vec<String> = patches.iter().flat_map(ApiRequest::keys).collect();
    let expected: Vec<String> = (0..450).map(key).collect();
    assert_eq!(sent, expected);
    assert_eq!(fake.with(|s| s.leads.len()), 450);
}

#[tokio::test]
async fn missing_required_fields_get_placeholders_and_long_values_are_truncated_in_the_sent_body() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    let mut thin = lead(1);
    thin.customer.last_name = None;
    thin.customer.company = None;
    thin.customer.title = Some("T".repeat(200));
    thin.summary = "é".repeat(40_000);
    let (logs, _guard) = capture_logs();

    let outcomes = sink.deliver(&[thin]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let record = fake.patches()[0].records()[0].clone();
    assert_eq!(record["LastName"], "[not provided]");
    assert_eq!(record["Company"], "[not provided]");
    let title = record["Title"].as_str().unwrap();
    assert_eq!(title.chars().count(), 128);
    assert!(title.ends_with('…'));
    assert_eq!(
        record["Description"].as_str().unwrap().chars().count(),
        32_000
    );
    assert_eq!(record["FirstName"], "First1");
    assert!(
        record.get("HasOptedOutOfEmail").is_none() && record.get("DoNotCall").is_none(),
        "a false opt-out is never sent: {record:?}"
    );
    let logs = logs.text();
    assert!(
        logs.contains("field=LastName") && logs.contains("placeholder"),
        "{logs}"
    );
    assert!(logs.contains(&format!("customer={}", key(1))), "{logs}");
    assert!(
        logs.contains("field=Title") && logs.contains("truncated"),
        "{logs}"
    );
}

#[tokio::test]
async fn placeholder_and_length_overrides_keep_the_other_defaults() {
    let fake = Fake::start().await;
    let sink =
        sink(&fake.section(
            "placeholders = { Company = \"Unknown company\" }\nmax_lengths = { Title = 20 }",
        ));
    let mut thin = lead(1);
    thin.customer.last_name = None;
    thin.customer.company = None;
    thin.customer.title = Some("Chief Executive Officer and Founder".into());
    thin.customer.first_name = Some("F".repeat(60));

    let outcomes = sink.deliver(&[thin]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let record = fake.lead(&key(1)).unwrap();
    assert_eq!(record["Company"], "Unknown company");
    assert_eq!(record["LastName"], "[not provided]");
    assert_eq!(record["Title"].as_str().unwrap().chars().count(), 20);
    assert_eq!(record["FirstName"].as_str().unwrap().chars().count(), 40);
}

// ---------------------------------------------------------------------------
// Throttling, outages, timeouts, refusals

#[tokio::test]
async fn request_limit_exceeded_pauses_the_sink_once_without_retrying_then_delivers() {
    let fake = Fake::start().await;
    fake.fault(Fault::Respond(
        StatusCode::FORBIDDEN,
        json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]),
    ));
    let sink = sink(&fake.section("api_limit_pause = \"400ms\""));
    let (logs, _guard) = capture_logs();
    let pauses_before = leadsync::sink::salesforce::api_limit_pauses_total();

    let limited = sink.deliver(&[lead(1), lead(2)]).await;
    let during_pause = sink.deliver(&[lead(1), lead(2)]).await;
    let requests_during_pause = fake.with(|s| s.api_requests.len());
    tokio::time::sleep(Duration::from_millis(450)).await;
    let after_pause = sink.deliver(&[lead(1), lead(2)]).await;

    for outcome in limited.iter().chain(&during_pause) {
        assert!(
            matches!(outcome, Outcome::RetryLater { after: Some(a), reason } if *a <= Duration::from_millis(400) && !a.is_zero() && reason.contains("REQUEST_LIMIT_EXCEEDED")),
            "{outcome:?}"
        );
    }
    assert_eq!(
        limited[0],
        Outcome::RetryLater {
            after: Some(Duration::from_millis(400)),
            reason: reason(&limited[0]).to_owned()
        },
        "the pause is sink.salesforce.api_limit_pause"
    );
    assert_eq!(
        requests_during_pause, 2,
        "one query, one upsert, no retry, nothing while paused"
    );
    assert_eq!(after_pause, vec![Outcome::Delivered; 2]);
    assert!(leadsync::sink::salesforce::api_limit_pauses_total() > pauses_before);
    let logs = logs.text();
    assert_eq!(
        logs.matches("out of API calls (REQUEST_LIMIT_EXCEEDED); the sink pauses")
            .count(),
        1,
        "one log line per pause, not per attempt: {logs}"
    );
}

#[tokio::test]
async fn request_limit_exceeded_on_the_query_pauses_for_the_default_30_minutes() {
    let fake = Fake::start().await;
    fake.with(|s| {
        s.query_faults.push_back(Fault::Respond(
            StatusCode::FORBIDDEN,
            json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]),
        ))
    });
    let sink = sink(&fake.section(""));

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::RetryLater { after: Some(a), reason } if *a == Duration::from_secs(30 * 60) && reason.contains("REQUEST_LIMIT_EXCEEDED")),
            "{outcome:?}"
        );
    }
    assert_eq!(fake.with(|s| s.api_requests.len()), 1, "not retried");
    assert_eq!(fake.with(|s| s.leads.len()), 0);
}

#[tokio::test]
async fn a_500_is_retried_and_then_delivered() {
    let fake = Fake::start().await;
    fake.fault(Fault::Respond(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!([{"message": "An unexpected error occurred.", "errorCode": "UNKNOWN_EXCEPTION"}]),
    ));
    let sink = sink(&fake.section(""));

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.patches().len(), 2);
    assert_eq!(fake.token_requests().len(), 1);
}

#[tokio::test]
async fn a_request_slower_than_the_timeout_is_retried_and_delivered() {
    let fake = Fake::start().await;
    fake.fault(Fault::Sleep(Duration::from_secs(2)));
    let sink = sink(&fake.section("").replace("\"2s\"", "\"300ms\""));

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.patches().len(), 2);
    assert!(fake.lead(&key(1)).is_some());
}

#[tokio::test]
async fn a_crm_that_never_answers_in_time_leaves_the_leads_for_later() {
    let fake = Fake::start().await;
    for _ in 0..3 {
        fake.fault(Fault::Sleep(Duration::from_secs(2)));
    }
    let sink = sink(&fake.section("").replace("\"2s\"", "\"300ms\""));

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert!(
        matches!(&outcomes[..], [Outcome::RetryLater { reason, .. }] if reason.contains("timed out")),
        "{outcomes:?}"
    );
    assert_eq!(fake.patches().len(), 3);
}

#[tokio::test]
async fn a_request_the_org_refuses_as_a_whole_holds_every_lead_of_it_without_retrying() {
    let fake = Fake::start().await;
    fake.fault(Fault::Respond(
        StatusCode::BAD_REQUEST,
        json!([{"message": "No such column 'Foo__c' on sobject of type Lead", "errorCode": "INVALID_FIELD"}]),
    ));
    let sink = sink(&fake.section(""));

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { reason } if reason.contains("HTTP 400") && reason.contains("INVALID_FIELD: No such column 'Foo__c'")),
            "{outcome:?}"
        );
    }
    assert_eq!(outcomes.len(), 2);
    assert_eq!(fake.patches().len(), 1);
}

#[tokio::test]
async fn api_usage_above_80_percent_is_logged_as_a_warning() {
    let fake = Fake::start().await;
    fake.with(|s| s.api_usage = (12_500, 15_000));
    let sink = sink(&fake.section(""));
    let (logs, _guard) = capture_logs();

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let logs = logs.text();
    assert!(
        logs.contains("WARN") && logs.contains("used=12501") && logs.contains("limit=15000"),
        "{logs}"
    );
}

#[tokio::test]
async fn the_client_secret_and_tokens_never_appear_in_outcomes_debug_output_or_logs() {
    let fake = Fake::start().await;
    fake.with(|s| s.invalid_last_names.insert("Last2".into()));
    let (logs, _guard) = capture_logs();
    let config = settings(&fake.section(""));
    let good = SalesforceSink::new(&config).unwrap();
    let bad = SalesforceSink::new(&settings(
        &fake.section("").replace(SECRET, "another-secret-99"),
    ))
    .unwrap();

    let mut outcomes = good.deliver(&[lead(1), lead(2)]).await;
    fake.expire_sessions();
    outcomes.extend(good.deliver(&[lead(3)]).await);
    outcomes.extend(bad.deliver(&[lead(4)]).await);
    let debug = format!("{good:?} {bad:?} {config:?}");

    let reasons: Vec<&str> = outcomes.iter().map(reason).collect();
    let everything = format!("{reasons:?} {debug} {}", logs.text());
    let tokens = fake.with(|s| s.all_tokens.clone());
    assert_eq!(tokens.len(), 2);
    for secret in [SECRET, "another-secret-99"]
        .iter()
        .copied()
        .chain(tokens.iter().map(String::as_str))
    {
        assert!(
            !everything.contains(secret),
            "{secret} leaked: {everything}"
        );
    }
    assert!(reasons.iter().any(|r| r.contains("invalid_client")));
    assert!(debug.contains(CLIENT_ID));
}

// ---------------------------------------------------------------------------
// Healthcheck

#[tokio::test]
async fn the_healthcheck_authenticates_and_reads_the_lead_description_without_writing() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));

    let result = sink.healthcheck().await;

    assert!(result.is_ok(), "{result:?}");
    let requests = fake.with(|s| s.api_requests.clone());
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(
        requests[0].path,
        "/services/data/v62.0/sobjects/Lead/describe"
    );
    assert_eq!(fake.token_requests().len(), 1);
    assert_eq!(fake.with(|s| s.leads.len()), 0);
}

#[tokio::test]
async fn the_healthcheck_reports_an_external_id_field_that_is_not_marked_external_id() {
    let fake = Fake::start().await;
    fake.with(|s| s.external_id_is_marked = false);
    let sink = sink(&fake.section(""));

    let err = sink.healthcheck().await.unwrap_err();

    assert!(
        err.message
            .contains("Lead.Leadsync_Key__c is not marked External ID"),
        "{err}"
    );
}

#[tokio::test]
async fn the_healthcheck_reports_a_mapped_field_the_org_does_not_have() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section("fields = { LastName = \"last_name\", Stage__c = \"stage\" }"));

    let err = sink.healthcheck().await.unwrap_err();

    assert!(err.message.contains("Stage__c"), "{err}");
}

#[tokio::test]
async fn the_healthcheck_says_why_authentication_failed() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section("").replace(SECRET, "nope"));

    let err = sink.healthcheck().await.unwrap_err();

    assert!(err.message.contains("invalid_client"), "{err}");
    assert!(fake.with(|s| s.api_requests.is_empty()));
}

// ---------------------------------------------------------------------------
// What the CRM owns stays the CRM's

/// A later marketplace event of customer `n`: a new stage and summary.
fn later_event(n: usize) -> CustomerLead {
    let mut later = lead(n);
    later.stage = Stage::Trial;
    later.summary = format!("First{n} Last{n} (Company {n}), stage: trial.");
    later.last_seen = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1);
    later
}

#[tokio::test]
async fn a_reps_company_and_opt_outs_survive_a_new_event_and_a_resend() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    assert_eq!(sink.deliver(&[lead(1)]).await, vec![Outcome::Delivered]);
    fake.rep_edits(&key(1), "Company", json!("Fabrikam Holdings Ltd"));
    fake.rep_edits(&key(1), "HasOptedOutOfEmail", json!(true));
    fake.rep_edits(&key(1), "DoNotCall", json!(true));
    fake.rep_edits(&key(1), "LeadSource", json!("Partner Referral"));
    fake.rep_edits(
        &key(1),
        "Description",
        json!("Met at Ignite; wants a demo."),
    );

    let new_event = sink.deliver(&[later_event(1)]).await;
    let after_event = fake.lead(&key(1)).unwrap();
    let resend = sink.deliver(&[later_event(1)]).await;
    let after_resend = fake.lead(&key(1)).unwrap();

    assert_eq!(new_event, vec![Outcome::Delivered]);
    assert_eq!(resend, vec![Outcome::Delivered]);
    for record in [&after_event, &after_resend] {
        assert_eq!(record["Company"], "Fabrikam Holdings Ltd");
        assert_eq!(record["HasOptedOutOfEmail"], true, "never opted back in");
        assert_eq!(record["DoNotCall"], true, "never opted back in");
        assert_eq!(record["LeadSource"], "Partner Referral");
        assert_eq!(record["Description"], "Met at Ignite; wants a demo.");
        assert_eq!(
            record["FirstName"], "First1",
            "the customer's own data follows them"
        );
    }
    let update = fake.patches()[1].records()[0].clone();
    for field in [
        "Company",
        "HasOptedOutOfEmail",
        "DoNotCall",
        "LeadSource",
        "Description",
    ] {
        assert!(
            update.get(field).is_none(),
            "{field} sent on update: {update:?}"
        );
    }
    assert_eq!(fake.with(|s| s.creates), 1);
}

#[tokio::test]
async fn a_placeholder_is_sent_on_create_only_and_never_over_a_reps_value() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    let mut thin = lead(1);
    thin.customer.last_name = None;
    thin.customer.company = None;
    assert_eq!(
        sink.deliver(std::slice::from_ref(&thin)).await,
        vec![Outcome::Delivered]
    );
    assert_eq!(fake.lead(&key(1)).unwrap()["LastName"], "[not provided]");
    fake.rep_edits(&key(1), "LastName", json!("Silva"));

    let again = sink.deliver(std::slice::from_ref(&thin)).await;

    assert_eq!(again, vec![Outcome::Delivered]);
    let record = fake.lead(&key(1)).unwrap();
    assert_eq!(record["LastName"], "Silva");
    assert_eq!(record["Company"], "[not provided]", "still empty in effect");
    let update = fake.patches()[1].records()[0].clone();
    assert!(update.get("LastName").is_none(), "{update:?}");
    assert!(update.get("Company").is_none(), "{update:?}");
}

#[tokio::test]
async fn a_company_left_as_the_placeholder_is_filled_once_the_customer_gives_one() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    let mut thin = lead(1);
    thin.customer.company = None;
    sink.deliver(&[thin]).await;

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.lead(&key(1)).unwrap()["Company"], "Company 1");
}

#[tokio::test]
async fn an_opt_out_is_written_as_true_and_a_new_lead_gets_every_field() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    let mut opted_out = lead(2);
    opted_out.do_not_contact = true;

    let outcomes = sink.deliver(&[lead(1), opted_out]).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 2]);
    let records = fake.patches()[0].records();
    assert_eq!(records[1]["HasOptedOutOfEmail"], true);
    assert_eq!(records[1]["DoNotCall"], true);
    assert!(records[0].get("HasOptedOutOfEmail").is_none());
    for field in ["Description", "Company", "LastName", "FirstName", "Email"] {
        assert!(records[0].get(field).is_some(), "{field} missing on create");
    }
}

#[tokio::test]
async fn the_ownership_of_a_field_can_be_changed_in_the_config() {
    let fake = Fake::start().await;
    let sink =
        sink(&fake.section("ownership = { Company = \"always\", Description = \"always\" }"));
    sink.deliver(&[lead(1)]).await;
    fake.rep_edits(&key(1), "Company", json!("Fabrikam Holdings Ltd"));

    sink.deliver(&[later_event(1)]).await;

    let record = fake.lead(&key(1)).unwrap();
    assert_eq!(record["Company"], "Company 1");
    assert_eq!(
        record["Description"],
        "First1 Last1 (Company 1), stage: trial."
    );
}

#[tokio::test]
async fn a_batch_costs_one_query_and_one_upsert_whatever_is_new_or_known() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    let known: Vec<CustomerLead> = (0..100).map(lead).collect();
    sink.deliver(&known).await;
    let before = fake.with(|s| s.api_requests.len());
    let batch: Vec<CustomerLead> = (0..200).map(later_event).collect();

    let outcomes = sink.deliver(&batch).await;

    assert_eq!(outcomes, vec![Outcome::Delivered; 200]);
    assert_eq!(
        fake.with(|s| s.api_requests.len()) - before,
        2,
        "a backfill of 3 rows per customer costs 2 calls per 600 rows"
    );
    let query = fake.queries().pop().unwrap();
    assert!(
        query.starts_with("SELECT Id, Leadsync_Key__c, IsConverted"),
        "{query}"
    );
    assert!(query.contains(&format!("'{}'", key(199))), "{query}");
    assert_eq!(fake.with(|s| s.creates), 200);
}

#[tokio::test]
async fn a_converted_customers_new_event_becomes_one_task_for_the_owner_and_no_dead_letter() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    sink.deliver(&[lead(1), lead(2)]).await;
    fake.convert(&key(1));
    let converted_before = fake.lead(&key(1)).unwrap();

    let outcomes = sink.deliver(&[later_event(1), later_event(2)]).await;
    let replayed = sink.deliver(&[later_event(1)]).await;

    assert!(
        matches!(&outcomes[0], Outcome::FollowedUp { note } if note.contains("Task 00T") && note.contains("Contact 003000000000777AAA") && note.contains("Opportunity 006000000000777AAA") && note.contains(REP_USER)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Delivered);
    assert!(
        matches!(&replayed[0], Outcome::FollowedUp { .. }),
        "{replayed:?}"
    );
    let tasks = fake.tasks();
    assert_eq!(
        tasks.len(),
        1,
        "a replay finds the Task instead of making another"
    );
    let task = &tasks[0];
    assert_eq!(task["WhoId"], "003000000000777AAA");
    assert_eq!(task["WhatId"], "006000000000777AAA");
    assert_eq!(task["OwnerId"], REP_USER);
    assert_eq!(task["Status"], "Not Started");
    let due = task["ActivityDate"].as_str().unwrap();
    assert!(
        due.len() == 10 && due.as_bytes()[4] == b'-' && due.as_bytes()[7] == b'-',
        "a Salesforce date, YYYY-MM-DD: {due}"
    );
    let description = task["Description"].as_str().unwrap();
    assert!(description.contains("Next step"), "{description}");
    assert!(description.contains("stage trial"), "{description}");
    assert_eq!(
        fake.lead(&key(1)).unwrap(),
        converted_before,
        "the converted Lead is not touched"
    );
    assert!(
        fake.patches()
            .iter()
            .skip(1)
            .all(|p| !p.keys().contains(&key(1))),
        "no upsert of a converted Lead"
    );
}

#[tokio::test]
async fn a_lead_converted_after_the_query_waits_for_its_task_instead_of_a_dead_letter() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    sink.deliver(&[lead(1)]).await;
    fake.convert(&key(1));
    // The query answers as it would have a moment before the conversion.
    fake.with(|s| {
        s.query_faults.push_back(Fault::Respond(
            StatusCode::OK,
            json!({"totalSize": 0, "done": true, "records": []}),
        ))
    });

    let raced = sink.deliver(&[later_event(1)]).await;
    let next = sink.deliver(&[later_event(1)]).await;

    assert!(
        matches!(&raced[0], Outcome::RetryLater { reason, .. } if reason.contains("CANNOT_UPDATE_CONVERTED_LEAD")),
        "{raced:?}"
    );
    assert!(matches!(&next[0], Outcome::FollowedUp { .. }), "{next:?}");
    assert_eq!(fake.tasks().len(), 1);
}

#[tokio::test]
async fn an_external_id_field_salesforce_answers_404_for_leaves_the_batch_pending() {
    let fake = Fake::start().await;
    fake.with(|s| s.external_id_is_marked = false);
    let sink = sink(&fake.section(""));

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    assert_eq!(outcomes.len(), 2);
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { reason } if reason.contains("HTTP 404") && reason.contains("Provided external ID field does not exist or is not accessible: Leadsync_Key__c")),
            "{outcome:?}"
        );
    }
    assert_eq!(fake.patches().len(), 1, "not retried");
    assert_eq!(fake.with(|s| s.leads.len()), 0);
    let health = sink.healthcheck().await.unwrap_err().message;
    assert!(health.contains("is not marked External ID"), "{health}");
    assert!(!health.contains('\n'), "one line: {health}");
}

#[tokio::test]
async fn a_wrong_external_id_field_name_leaves_the_batch_pending_and_the_check_names_it() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section("external_id_field = \"Leadsync_Id__c\""));

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;
    let health = sink.healthcheck().await.unwrap_err().message;

    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { reason } if reason.contains("Leadsync_Id__c")),
            "{outcome:?}"
        );
    }
    assert_eq!(fake.with(|s| s.leads.len()), 0);
    assert!(health.contains("no field Leadsync_Id__c"), "{health}");
}

#[tokio::test]
async fn a_401_with_a_fresh_token_and_a_result_count_that_does_not_match_hold_the_batch() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    for _ in 0..2 {
        fake.fault(Fault::Respond(
            StatusCode::UNAUTHORIZED,
            json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]),
        ));
    }

    let refused = sink.deliver(&[lead(1), lead(2)]).await;
    fake.fault(Fault::Respond(StatusCode::OK, json!([])));
    let short = sink.deliver(&[lead(1), lead(2)]).await;

    for outcome in &refused {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { reason } if reason.contains("fresh access token")),
            "{outcome:?}"
        );
    }
    for outcome in &short {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { reason } if reason.contains("0 results for 2 records")),
            "{outcome:?}"
        );
    }
}

#[tokio::test]
async fn a_403_other_than_the_api_limit_holds_the_batch() {
    let fake = Fake::start().await;
    fake.fault(Fault::Respond(
        StatusCode::FORBIDDEN,
        json!([{"message": "The REST API is not enabled for this Organization.", "errorCode": "API_DISABLED_FOR_ORG"}]),
    ));
    let sink = sink(&fake.section(""));

    let outcomes = sink.deliver(&[lead(1)]).await;

    assert!(
        matches!(&outcomes[0], Outcome::EndpointFailed { reason } if reason.contains("API_DISABLED_FOR_ORG")),
        "{outcomes:?}"
    );
}

// ---------------------------------------------------------------------------
// Config

#[test]
fn the_example_config_loads_and_states_the_real_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/salesforce.example.toml");

    let loaded = Settings::load_with_env(&path, &HashMap::new()).unwrap_or_else(|e| panic!("{e}"));
    let example = loaded.sink.salesforce.expect("a [sink.salesforce] section");
    let defaults = settings(
        "login_url = \"https://acme.my.salesforce.com\"\nclient_id = \"x\"\nclient_secret = { env = \"X\" }",
    );

    assert_eq!(loaded.sink.kind, leadsync::config::SinkKind::Salesforce);
    assert_eq!(example.auth, defaults.auth);
    assert_eq!(example.api_version, defaults.api_version);
    assert_eq!(example.external_id_field, defaults.external_id_field);
    assert_eq!(example.fields, defaults.fields);
    assert_eq!(example.placeholders, defaults.placeholders);
    assert_eq!(example.max_lengths, defaults.max_lengths);
    assert_eq!(example.duplicates, defaults.duplicates);
    assert_eq!(example.ownership, defaults.ownership);
    assert_eq!(example.api_limit_pause, defaults.api_limit_pause);
    assert_eq!(defaults.api_limit_pause, Duration::from_secs(30 * 60));
    assert_eq!(example.request_timeout, defaults.request_timeout);
    assert_eq!(example.allow_http, defaults.allow_http);
    assert_eq!(example.retry.max_attempts, defaults.retry.max_attempts);
    assert_eq!(
        example.retry.initial_backoff,
        defaults.retry.initial_backoff
    );
    assert_eq!(example.retry.max_backoff, defaults.retry.max_backoff);
    assert!(example.username.is_none() && example.private_key.is_none());
}

#[test]
fn an_invalid_salesforce_section_is_refused_naming_the_key() {
    let text = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n[sink]\nkind = \"salesforce\"\n[sink.salesforce]\nauth = \"jwt_bearer\"\nlogin_url = \"https://login.salesforce.com\"\nclient_id = \"x\"\nprivate_key = { file = \"/k.pem\" }\n";

    let err = Settings::from_toml_with_env(text, Path::new("test.toml"), &HashMap::new())
        .unwrap_err()
        .to_string();

    assert!(err.contains("sink.salesforce.username"), "{err}");
}

// ---------------------------------------------------------------------------
// End to end

#[tokio::test]
async fn leads_from_the_table_reach_salesforce_once_per_customer_across_a_restart() {
    let world = World::new().await;
    let fake = Fake::start().await;
    let settings = world.settings_with_sink(&sink_toml(&fake.section("")));
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
    world
        .insert(&[
            lead_row(
                "p2",
                "r003",
                "AzureMarketplace-INS | contoso.analytics",
                customer(1),
            ),
            lead_row(
                "p2",
                "r004",
                "AppSource-PLT | contoso.analytics",
                customer(3),
            ),
        ])
        .await;
    let second = common::run_once(&settings).await;

    assert_eq!(first.exit_code(), 0, "{first:?}");
    assert_eq!(second.exit_code(), 0, "{second:?}");
    let leads = fake.with(|s| s.leads.clone());
    assert_eq!(leads.len(), 3, "one record per customer: {leads:#?}");
    assert_eq!(
        fake.with(|s| s.creates),
        3,
        "the returning customer was updated, not created again"
    );
    let by_email = |email: &str| {
        leads
            .values()
            .find(|r| r["Email"] == email)
            .unwrap_or_else(|| panic!("no Lead for {email}"))
            .clone()
    };
    let returning = by_email("customer1@contoso.com");
    let description = returning["Description"].as_str().unwrap();
    assert!(
        description.contains("stage: initial interest"),
        "the first summary stays (Description is written on create): {description}"
    );
    assert_eq!(returning["Title"], "CTO");
    assert!(by_email("customer2@contoso.com")["Description"]
        .as_str()
        .unwrap()
        .contains("stage: initial interest"));
    assert_eq!(returning["LastName"], "Last1");
    assert_eq!(returning["Company"], "Company 1");
    let keys: HashSet<String> = fake.patches().iter().flat_map(ApiRequest::keys).collect();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k.starts_with("ls-")), "{keys:?}");
}

#[tokio::test]
async fn the_crms_edits_survive_the_daemon_and_a_replay_resend_and_a_converted_customer_gets_a_task(
) {
    let world = World::new().await;
    let fake = Fake::start().await;
    let settings = world.settings_with_sink(&sink_toml(&fake.section("")));
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
                "AppSource-PLT | contoso.analytics",
                customer(2),
            ),
        ])
        .await;
    let first = common::run_once(&settings).await;
    assert_eq!(first.exit_code(), 0, "{first:?}");
    let by_email = |email: &str| {
        fake.with(|s| {
            s.leads
                .iter()
                .find(|(_, r)| r["Email"] == email)
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| panic!("no Lead for {email}"))
        })
    };
    let (rep_worked, converted) = (
        by_email("customer1@contoso.com"),
        by_email("customer2@contoso.com"),
    );
    fake.rep_edits(&rep_worked, "Company", json!("Fabrikam Holdings Ltd"));
    fake.rep_edits(&rep_worked, "HasOptedOutOfEmail", json!(true));
    fake.rep_edits(&rep_worked, "DoNotCall", json!(true));
    fake.convert(&converted);
    world
        .insert(&[
            lead_row(
                "p2",
                "r003",
                "AzureMarketplace-INS | contoso.analytics",
                customer(1),
            ),
            lead_row(
                "p2",
                "r004",
                "AzureMarketplace-INS | contoso.analytics",
                customer(2),
            ),
        ])
        .await;

    let second = common::run_once(&settings).await;
    let pipeline = leadsync::build_pipeline(&settings).expect("pipeline");
    let resend = pipeline
        .poll_with(
            leadsync::pipeline::PollMode {
                since: Some(time::OffsetDateTime::now_utc() - time::Duration::hours(1)),
                ignore_handled: true,
                resend: true,
                sink: None,
            },
            &CancellationToken::new(),
        )
        .await
        .expect("replay --resend");

    assert_eq!(second.exit_code(), 0, "{second:?}");
    assert_eq!(second.totals.rejected, 0, "no dead letter: {second:?}");
    assert_eq!(second.totals.followed_up, 1, "{second:?}");
    assert_eq!(resend.rejected, 0, "{resend:?}");
    assert_eq!(resend.pending, 0, "{resend:?}");
    assert!(resend.records_sent >= 2, "{resend:?}");
    let record = fake.lead(&rep_worked).unwrap();
    assert_eq!(record["Company"], "Fabrikam Holdings Ltd");
    assert_eq!(record["HasOptedOutOfEmail"], true);
    assert_eq!(record["DoNotCall"], true);
    let tasks = fake.tasks();
    assert_eq!(
        tasks.len(),
        1,
        "one Task for the event, none more on replay: {tasks:?}"
    );
    assert_eq!(tasks[0]["WhoId"], "003000000000777AAA");
    assert!(
        tasks[0]["Subject"]
            .as_str()
            .unwrap()
            .contains("Contoso Analytics: Get it now"),
        "{tasks:?}"
    );
    assert_eq!(fake.with(|s| s.creates), 2);
}

#[tokio::test]
async fn a_delivered_lead_has_a_link_to_its_record_on_the_instance_for_the_alerts() {
    let fake = Fake::start().await;
    let sink = sink(&fake.section(""));
    sink.want_links();
    assert_eq!(sink.record_link(&key(1)), None, "no answer named it yet");

    let delivered = sink.deliver(&[lead(1)]).await;

    assert_eq!(delivered, vec![Outcome::Delivered]);
    let id = fake.lead(&key(1)).unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let link = sink
        .record_link(&key(1))
        .expect("a link once Salesforce named the Lead");
    assert!(
        link.starts_with("http://127.0.0.1:"),
        "on the instance: {link}"
    );
    assert!(
        link.ends_with(&format!("/lightning/r/Lead/{id}/view")),
        "{link}"
    );
    assert_eq!(sink.record_link(&key(2)), None);
    let plain = self::sink(&fake.section(""));
    plain.deliver(&[lead(2)]).await;
    assert_eq!(
        plain.record_link(&key(2)),
        None,
        "no id kept unless an alert sink shows links"
    );
}
