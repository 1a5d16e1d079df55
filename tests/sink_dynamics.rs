//! The Dataverse sink against an in-process fake of Microsoft Entra ID (client
//! credentials token endpoint) and the Dataverse Web API (`leads` upserts by alternate
//! key, `WhoAmI`), plus one run of the daemon from Azurite to the fake. The fake also
//! knows the CRM side: `If-Match`/`If-None-Match` on upserts (404 / 412), queries of
//! leads by `Microsoft.Dynamics.CRM.In`, a rep's edits, opt-outs, qualified and
//! disqualified leads (which Dataverse still lets an API update, as it does), tasks
//! created under a client-chosen id, and the lead table's alternate keys. Writes come
//! in `POST $batch` (OData 4.0 multipart/mixed, as "Execute batch operations using the
//! Web API" specifies): the fake runs each inner request in order, records it as if it
//! had come alone (with the `$batch`'s token and OData headers), stops at the first
//! failure unless `Prefer: odata.continue-on-error`, and answers one `HTTP/1.1` part
//! per request; a whole `$batch` can be throttled (429) or refused (400, 413).

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Form, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use leadsync::config::{IdentitySettings, Settings, SinkKind};
use leadsync::identity::{customer_key, CustomerLead, CustomerState};
use leadsync::lead::normalise;
use leadsync::sink::dynamics::{default_fields, default_max_lengths, DynamicsSettings};
use leadsync::sink::{DynamicsSink, LeadSink, Outcome};
use leadsync::source::row::{RawRow, RowId};
use serde_json::{json, Map, Value};

use common::{customer, lead_row, many_rows, serve, World};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "0d3c6e5a-1b2c-4d5e-8f90-a1b2c3d4e5f6";
const SECRET: &str = "Zq8~leadsync-client-secret-value.42";
const API: &str = "/api/data/v9.2";

/// A canned answer the fake gives to the next upsert instead of processing it.
#[derive(Clone)]
enum Scripted {
    Answer {
        status: u16,
        retry_after: Option<&'static str>,
        body: Value,
    },
    /// Holds the request for this long (the client times out first).
    Hang(Duration),
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    /// The path exactly as sent (still percent-encoded).
    path: String,
    headers: HeaderMap,
    body: Option<Value>,
    at: Instant,
    status: u16,
    /// Came inside a `$batch`.
    in_batch: bool,
}

#[derive(Default)]
struct Inner {
    /// Issued access tokens and when each expires.
    tokens: HashMap<String, Instant>,
    token_forms: Vec<HashMap<String, String>>,
    requests: Vec<Seen>,
    /// Lead records by alternate key value (decoded).
    records: BTreeMap<String, Map<String, Value>>,
    ids: BTreeMap<String, String>,
    created: usize,
    updated: usize,
    script: VecDeque<Scripted>,
    /// Keys the fake refuses with a 400 and this error body.
    refuse: HashMap<String, Value>,
    /// Tasks by id.
    tasks: BTreeMap<String, Map<String, Value>>,
    /// The lead table has no alternate key on the key attribute.
    no_alternate_key: bool,
    /// Every `POST $batch`, as received.
    batches: Vec<BatchSeen>,
    /// Canned answers to the next `$batch` requests as a whole.
    batch_script: VecDeque<Scripted>,
    /// Keys whose request makes a whole `$batch` refused as malformed (400).
    poison: Vec<String>,
    /// Keys whose request Dataverse takes this long to run.
    slow: HashMap<String, Duration>,
    /// A `$batch` of more requests is refused as too large (413).
    max_batch_requests: Option<usize>,
}

/// One `POST $batch` as the fake received it.
#[derive(Clone, Debug)]
struct BatchSeen {
    headers: HeaderMap,
    /// The number of requests in it.
    requests: usize,
    at: Instant,
    done: Option<Instant>,
    status: u16,
}

/// The owner of the leads the fake creates (a sales rep).
const REP_USER: &str = "aaaaaaaa-0000-0000-0000-000000000042";
const OPPORTUNITY: &str = "bbbbbbbb-0000-0000-0000-000000000007";
const CONTACT: &str = "cccccccc-0000-0000-0000-000000000007";

/// Entra ID + Dataverse, keeping leads keyed by the alternate key.
struct Fake {
    base: OnceLock<String>,
    key_attribute: String,
    token_lifetime: u64,
    patch_delay: Duration,
    inner: Mutex<Inner>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The column sizes of the standard lead table, as Dataverse enforces them.
fn column_sizes() -> HashMap<&'static str, usize> {
    HashMap::from([
        ("firstname", 50),
        ("lastname", 50),
        ("companyname", 100),
        ("jobtitle", 100),
        ("emailaddress1", 100),
        ("telephone1", 50),
        ("address1_country", 80),
        ("subject", 300),
        ("description", 2000),
        ("leadsync_key", 100),
    ])
}

fn dataverse_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    response
        .headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    response
}

fn entra_error(status: StatusCode, error: &str, description: &str, code: u32) -> Response {
    let body = json!({
        "error": error,
        "error_description": format!("{description}\r\nTrace ID: 0b1c2d3e-0000-4000-8000-000000000001\r\nCorrelation ID: 0b1c2d3e-0000-4000-8000-000000000002\r\nTimestamp: 2024-05-01 10:00:00Z"),
        "error_codes": [code],
        "timestamp": "2024-05-01 10:00:00Z",
        "trace_id": "0b1c2d3e-0000-4000-8000-000000000001",
        "correlation_id": "0b1c2d3e-0000-4000-8000-000000000002",
    });
    (status, Json(body)).into_response()
}

/// Decrements the in-flight count however the handler ends (clients time out).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fake {
    fn new(key_attribute: &str) -> Fake {
        Fake {
            base: OnceLock::new(),
            key_attribute: key_attribute.into(),
            token_lifetime: 3599,
            patch_delay: Duration::ZERO,
            inner: Mutex::new(Inner::default()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    fn base(&self) -> &str {
        self.base.get().expect("served")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    fn script(&self, steps: impl IntoIterator<Item = Scripted>) {
        self.lock().script.extend(steps);
    }

    fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    fn patches(&self) -> Vec<Seen> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == Method::PATCH)
            .cloned()
            .collect()
    }

    fn batches(&self) -> Vec<BatchSeen> {
        self.lock().batches.clone()
    }

    /// Requests other than `$batch`es and queries (old-style single writes).
    fn single_writes(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method != Method::GET && !r.in_batch)
            .count()
    }

    fn queries(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == Method::GET)
            .count()
    }

    fn records(&self) -> BTreeMap<String, Map<String, Value>> {
        self.lock().records.clone()
    }

    fn token_requests(&self) -> usize {
        self.lock().token_forms.len()
    }

    async fn token(
        State(fake): State<Arc<Fake>>,
        UrlPath(tenant): UrlPath<String>,
        Form(form): Form<HashMap<String, String>>,
    ) -> Response {
        fake.lock().token_forms.push(form.clone());
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if tenant != TENANT {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("AADSTS90002: Tenant '{tenant}' not found."),
                90002,
            );
        }
        if field("grant_type") != "client_credentials" {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "AADSTS70003: The app requested an unsupported grant type.",
                70003,
            );
        }
        if field("client_id") != CLIENT_ID {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                &format!("AADSTS700016: Application with identifier '{}' was not found in the directory.", field("client_id")),
                700016,
            );
        }
        if field("client_secret") != SECRET {
            return entra_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                &format!("AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{CLIENT_ID}'."),
                7000215,
            );
        }
        if field("scope") != format!("{}/.default", fake.base()) {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                &format!(
                    "AADSTS1002012: The provided value for scope {} is not valid.",
                    field("scope")
                ),
                1002012,
            );
        }
        let mut inner = fake.lock();
        let token = format!("eyJ0eXAi.fake-access-token-{}", inner.token_forms.len());
        inner.tokens.insert(
            token.clone(),
            Instant::now() + Duration::from_secs(fake.token_lifetime),
        );
        Json(json!({
            "token_type": "Bearer",
            "expires_in": fake.token_lifetime,
            "ext_expires_in": fake.token_lifetime,
            "access_token": token,
        }))
        .into_response()
    }

    async fn web_api(
        State(fake): State<Arc<Fake>>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        if method == Method::POST && uri.path() == format!("{API}/$batch") {
            return fake.batch(&headers, &body).await;
        }
        let index = {
            let mut inner = fake.lock();
            inner.requests.push(Seen {
                method: method.clone(),
                path: uri.path().to_owned(),
                headers: headers.clone(),
                body: serde_json::from_slice(&body).ok(),
                at: Instant::now(),
                status: 0,
                in_batch: false,
            });
            inner.requests.len() - 1
        };
        let response = fake
            .answer(
                &method,
                uri.path(),
                uri.query().unwrap_or(""),
                &headers,
                &body,
            )
            .await;
        fake.lock().requests[index].status = response.status().as_u16();
        response
    }

    async fn answer(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        if let Some(refused) = self.unauthorized(headers) {
            return refused;
        }
        let Some(rest) = path.strip_prefix(API) else {
            return dataverse_error(StatusCode::NOT_FOUND, "0x80060888", "Resource not found.");
        };
        self.route(method, rest, query, headers, body).await
    }

    /// A 401 unless the request carries a valid token.
    fn unauthorized(&self, headers: &HeaderMap) -> Option<Response> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let valid = self
            .lock()
            .tokens
            .get(token)
            .is_some_and(|expires| Instant::now() < *expires);
        if !valid {
            let mut response = StatusCode::UNAUTHORIZED.into_response();
            response.headers_mut().insert(
                "WWW-Authenticate",
                HeaderValue::from_str(&format!(
                    "Bearer authorization_uri=https://login.microsoftonline.com/{TENANT}/oauth2/authorize, resource_id={}/",
                    self.base()
                ))
                .unwrap(),
            );
            return Some(response);
        }
        None
    }

    async fn route(
        &self,
        method: &Method,
        rest: &str,
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        match (method.clone(), rest) {
            (Method::GET, "/WhoAmI") => Json(json!({
                "@odata.context": format!("{}{API}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", self.base()),
                "BusinessUnitId": "11111111-0000-0000-0000-000000000001",
                "UserId": "11111111-0000-0000-0000-000000000002",
                "OrganizationId": "11111111-0000-0000-0000-000000000003",
            }))
            .into_response(),
            (Method::PATCH, rest) if rest.starts_with("/leads(") => {
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_in_flight.fetch_max(now, Ordering::SeqCst);
                let _guard = InFlight(&self.in_flight);
                tokio::time::sleep(self.patch_delay).await;
                self.upsert(rest, headers, body).await
            }
            (Method::GET, "/leads") => self.query_leads(query, headers),
            (Method::PATCH, rest) if rest.starts_with("/tasks(") => {
                self.create_task(rest, headers, body)
            }
            (Method::GET, "/EntityDefinitions(LogicalName='lead')/Keys") => {
                let keys = if self.lock().no_alternate_key {
                    json!([])
                } else {
                    json!([{"LogicalName": format!("{}_key", self.key_attribute), "KeyAttributes": [self.key_attribute], "EntityKeyIndexStatus": "Active"}])
                };
                Json(json!({"value": keys})).into_response()
            }
            _ => dataverse_error(
                StatusCode::NOT_FOUND,
                "0x80060888",
                &format!("Resource not found for the segment '{rest}'."),
            ),
        }
    }

    /// `POST $batch`: multipart/mixed, one `application/http` part per request, no
    /// change sets (leadsync sends none). Inner requests run in order; without
    /// `Prefer: odata.continue-on-error` the first failure ends the batch.
    async fn batch(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        let index = {
            let mut inner = self.lock();
            inner.batches.push(BatchSeen {
                headers: headers.clone(),
                requests: 0,
                at: Instant::now(),
                done: None,
                status: 0,
            });
            inner.batches.len() - 1
        };
        let response = self.run_batch(index, headers, body).await;
        let mut inner = self.lock();
        inner.batches[index].status = response.status().as_u16();
        inner.batches[index].done = Some(Instant::now());
        response
    }

    async fn run_batch(&self, index: usize, headers: &HeaderMap, body: &[u8]) -> Response {
        if let Some(refused) = self.unauthorized(headers) {
            return refused;
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _guard = InFlight(&self.in_flight);
        tokio::time::sleep(self.patch_delay).await;
        let scripted = self.lock().batch_script.pop_front();
        match scripted {
            Some(Scripted::Hang(duration)) => {
                tokio::time::sleep(duration).await;
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            Some(Scripted::Answer {
                status,
                retry_after,
                body,
            }) => {
                let mut response =
                    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
                if let Some(after) = retry_after {
                    response
                        .headers_mut()
                        .insert("Retry-After", HeaderValue::from_static(after));
                }
                return response;
            }
            None => {}
        }
        let malformed =
            |message: &str| dataverse_error(StatusCode::BAD_REQUEST, "0x80048d19", message);
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let Some(boundary) = content_type
            .strip_prefix("multipart/mixed")
            .and_then(|rest| {
                rest.split(';')
                    .find_map(|p| p.trim().strip_prefix("boundary="))
            })
            .map(|b| b.trim_matches('"').to_owned())
        else {
            return malformed("The batch request must be multipart/mixed with a boundary.");
        };
        let Ok(text) = std::str::from_utf8(body) else {
            return malformed("The batch request is not UTF-8.");
        };
        let delimiter = format!("--{boundary}");
        let mut pieces = text.split(delimiter.as_str());
        pieces.next();
        let mut requests = Vec::new();
        let mut closed = false;
        for piece in pieces {
            if piece.starts_with("--") {
                closed = true;
                break;
            }
            let piece = piece.strip_prefix("\r\n").unwrap_or(piece);
            let Some((mime, content)) = piece.split_once("\r\n\r\n") else {
                return malformed("A batch part has no header section.");
            };
            let mime = mime.to_ascii_lowercase();
            if !mime.contains("content-type: application/http")
                || !mime.contains("content-transfer-encoding: binary")
            {
                return malformed(
                    "A batch part must be application/http with Content-Transfer-Encoding: binary.",
                );
            }
            let Some((head, inner_body)) = content.split_once("\r\n\r\n") else {
                return malformed("A batch request has no header section.");
            };
            let mut lines = head.split("\r\n");
            let request_line: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
            if request_line.len() != 3 || request_line[2] != "HTTP/1.1" {
                return malformed("A batch request line must be `<method> <url> HTTP/1.1`.");
            }
            let (method, url) = (request_line[0], request_line[1]);
            let mut inner_headers = headers.clone();
            inner_headers.remove("content-type");
            for line in lines {
                let Some((name, value)) = line.split_once(':') else {
                    return malformed("A batch request header has no colon.");
                };
                inner_headers.insert(
                    axum::http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                    HeaderValue::from_str(value.trim()).unwrap(),
                );
            }
            let path = match url.strip_prefix(self.base()) {
                Some(path) => path.to_owned(),
                None => url.to_owned(),
            };
            requests.push((
                Method::from_bytes(method.as_bytes()).unwrap(),
                path,
                inner_headers,
                inner_body.trim_end_matches("\r\n").as_bytes().to_vec(),
            ));
        }
        if !closed {
            return malformed("The batch request has no closing boundary.");
        }
        if requests.is_empty() || requests.len() > 1000 {
            return malformed("A batch request holds 1 to 1000 requests.");
        }
        self.lock().batches[index].requests = requests.len();
        if self
            .lock()
            .max_batch_requests
            .is_some_and(|max| requests.len() > max)
        {
            return dataverse_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "0x80048d1a",
                "The request body is too large.",
            );
        }
        let poisoned = {
            let inner = self.lock();
            requests.iter().any(|(_, path, _, _)| {
                let decoded = urlencoding::decode(path).unwrap().replace("''", "'");
                inner
                    .poison
                    .iter()
                    .any(|k| decoded.contains(&format!("'{k}'")))
            })
        };
        if poisoned {
            return malformed(
                "Error parsing the batch request: a request's body could not be read.",
            );
        }
        let continue_on_error = headers
            .get("prefer")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("odata.continue-on-error"));
        let answer_boundary = format!("batchresponse_{index:08}");
        let mut out = String::new();
        for (method, path, inner_headers, inner_body) in requests {
            let seen = {
                let mut inner = self.lock();
                inner.requests.push(Seen {
                    method: method.clone(),
                    path: path.clone(),
                    headers: inner_headers.clone(),
                    body: serde_json::from_slice(&inner_body).ok(),
                    at: Instant::now(),
                    status: 0,
                    in_batch: true,
                });
                inner.requests.len() - 1
            };
            let delay = {
                let decoded = urlencoding::decode(&path).unwrap().replace("''", "'");
                self.lock()
                    .slow
                    .iter()
                    .find(|(k, _)| decoded.contains(&format!("'{k}'")))
                    .map(|(_, d)| *d)
            };
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            // The writes leadsync sends; patch_delay and the in-flight count are the
            // `$batch`'s.
            let response = match (method.clone(), path.strip_prefix(API)) {
                (Method::PATCH, Some(rest)) if rest.starts_with("/leads(") => {
                    self.upsert(rest, &inner_headers, &inner_body).await
                }
                (Method::PATCH, Some(rest)) if rest.starts_with("/tasks(") => {
                    self.create_task(rest, &inner_headers, &inner_body)
                }
                _ => dataverse_error(
                    StatusCode::NOT_FOUND,
                    "0x80060888",
                    &format!("Resource not found for the segment '{path}'."),
                ),
            };
            let status = response.status();
            self.lock().requests[seen].status = status.as_u16();
            let mut part = format!(
                "--{answer_boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 {} {}\r\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            for (name, value) in response.headers() {
                part.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
            }
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            part.push_str("\r\n");
            part.push_str(std::str::from_utf8(&bytes).unwrap());
            part.push_str("\r\n");
            out.push_str(&part);
            if status.as_u16() >= 400 && !continue_on_error {
                break;
            }
        }
        out.push_str(&format!("--{answer_boundary}--\r\n"));
        let mut response = (StatusCode::OK, out).into_response();
        let headers = response.headers_mut();
        headers.insert(
            "content-type",
            HeaderValue::from_str(&format!("multipart/mixed; boundary={answer_boundary}")).unwrap(),
        );
        headers.insert("OData-Version", HeaderValue::from_static("4.0"));
        response
    }

    /// `$filter=Microsoft.Dynamics.CRM.In(PropertyName='k',PropertyValues=['a','b'])`.
    fn query_leads(&self, query: &str, headers: &HeaderMap) -> Response {
        let params: HashMap<String, String> = reqwest::Url::parse(&format!("http://fake/?{query}"))
            .expect("a query string")
            .query_pairs()
            .into_owned()
            .collect();
        let filter = params.get("$filter").cloned().unwrap_or_default();
        let select: Vec<String> = params
            .get("$select")
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        let Some(rest) = filter.strip_prefix("Microsoft.Dynamics.CRM.In(PropertyName='") else {
            return dataverse_error(StatusCode::BAD_REQUEST, "0x80060888", "Unsupported filter.");
        };
        let Some((property, rest)) = rest.split_once("',PropertyValues=[") else {
            return dataverse_error(StatusCode::BAD_REQUEST, "0x80060888", "Syntax error.");
        };
        let Some(list) = rest.strip_suffix("])") else {
            return dataverse_error(StatusCode::BAD_REQUEST, "0x80060888", "Syntax error.");
        };
        let known = |c: &str| {
            column_sizes().contains_key(c)
                || c == self.key_attribute
                || [
                    "leadid",
                    "statecode",
                    "donotemail",
                    "donotphone",
                    "_ownerid_value",
                    "_parentcontactid_value",
                    "_parentaccountid_value",
                    "_qualifyingopportunityid_value",
                ]
                .contains(&c)
        };
        if let Some(bad) = select
            .iter()
            .map(String::as_str)
            .chain([property])
            .find(|c| !known(c))
        {
            return dataverse_error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!("Could not find a property named '{bad}' on type 'Microsoft.Dynamics.CRM.lead'."),
            );
        }
        // 'a','b''c' -> a, b'c
        let mut values = Vec::new();
        let mut current = String::new();
        let mut quoted = false;
        let mut chars = list.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('\'', false) => quoted = true,
                ('\'', true) if chars.peek() == Some(&'\'') => {
                    chars.next();
                    current.push('\'');
                }
                ('\'', true) => {
                    quoted = false;
                    values.push(std::mem::take(&mut current));
                }
                (c, true) => current.push(c),
                _ => {}
            }
        }
        let annotations = headers
            .get("prefer")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("Microsoft.Dynamics.CRM.lookuplogicalname"));
        let inner = self.lock();
        let rows: Vec<Value> = inner
            .records
            .iter()
            .filter(|(key, _)| values.iter().any(|v| v.eq_ignore_ascii_case(key)))
            .map(|(_, record)| {
                let mut row = Map::new();
                for column in &select {
                    row.insert(
                        column.clone(),
                        record.get(column).cloned().unwrap_or(Value::Null),
                    );
                    if annotations && column == "_ownerid_value" {
                        row.insert(
                            "_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname".into(),
                            json!("systemuser"),
                        );
                    }
                }
                Value::Object(row)
            })
            .collect();
        Json(json!({"@odata.context": "$metadata#leads", "value": rows})).into_response()
    }

    /// `PATCH tasks(<id>)`: an upsert by primary key; `If-None-Match: *` makes it create-only.
    fn create_task(&self, rest: &str, headers: &HeaderMap, body: &[u8]) -> Response {
        let id = rest
            .trim_start_matches("/tasks(")
            .trim_end_matches(')')
            .to_owned();
        let Ok(Value::Object(task)) = serde_json::from_slice::<Value>(body) else {
            return dataverse_error(
                StatusCode::BAD_REQUEST,
                "0x80040203",
                "The body is not a JSON object.",
            );
        };
        let create_only = headers.get("if-none-match").is_some_and(|v| v == "*");
        let mut inner = self.lock();
        match inner.tasks.entry(id) {
            std::collections::btree_map::Entry::Occupied(_) if create_only => {
                return dataverse_error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80060882",
                    "A record with matching key values already exists.",
                );
            }
            std::collections::btree_map::Entry::Occupied(mut existing) => {
                existing.get_mut().extend(task)
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(task);
            }
        }
        StatusCode::NO_CONTENT.into_response()
    }

    /// A sales rep edits a column of the lead.
    fn rep_edits(&self, key: &str, column: &str, value: Value) {
        self.lock()
            .records
            .get_mut(key)
            .expect("the lead exists")
            .insert(column.into(), value);
    }

    /// Sales qualifies the lead into a contact and an opportunity (statecode 1).
    fn qualify(&self, key: &str) {
        self.rep_edits(key, "statecode", json!(1));
        self.rep_edits(key, "_qualifyingopportunityid_value", json!(OPPORTUNITY));
        self.rep_edits(key, "_parentcontactid_value", json!(CONTACT));
    }

    async fn upsert(&self, rest: &str, headers: &HeaderMap, body: &[u8]) -> Response {
        let scripted = self.lock().script.pop_front();
        match scripted {
            Some(Scripted::Hang(duration)) => {
                tokio::time::sleep(duration).await;
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            Some(Scripted::Answer {
                status,
                retry_after,
                body,
            }) => {
                let mut response =
                    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
                if let Some(after) = retry_after {
                    response
                        .headers_mut()
                        .insert("Retry-After", HeaderValue::from_static(after));
                }
                return response;
            }
            None => {}
        }
        // leads(<attribute>='<value>'): percent-decode, then undo the doubled quotes.
        let decoded = urlencoding::decode(rest).expect("UTF-8 path").into_owned();
        let Some(inner) = decoded
            .strip_prefix("/leads(")
            .and_then(|r| r.strip_suffix(')'))
        else {
            return dataverse_error(StatusCode::BAD_REQUEST, "0x80060888", "Bad key segment.");
        };
        let Some((attribute, quoted)) = inner.split_once('=') else {
            return dataverse_error(StatusCode::BAD_REQUEST, "0x80040203", "Invalid key.");
        };
        let literal = quoted
            .strip_prefix('\'')
            .and_then(|q| q.strip_suffix('\''))
            .filter(|l| !l.replace("''", "").contains('\''));
        let Some(literal) = literal else {
            return dataverse_error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!("Syntax error in the key literal {quoted}."),
            );
        };
        let key = literal.replace("''", "'");
        if attribute != self.key_attribute {
            return dataverse_error(
                StatusCode::BAD_REQUEST,
                "0x80040203",
                &format!("The key attribute {attribute} is not an alternate key of entity lead."),
            );
        }
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return dataverse_error(
                StatusCode::BAD_REQUEST,
                "0x80040203",
                "The body is not a JSON object.",
            );
        };
        if fields.get(attribute).is_some_and(|v| v != &json!(key)) {
            return dataverse_error(
                StatusCode::BAD_REQUEST,
                "0x80040203",
                "The key value in the body differs from the one in the URL.",
            );
        }
        let sizes = column_sizes();
        for (column, value) in &fields {
            if let (Some(max), Some(text)) = (sizes.get(column.as_str()), value.as_str()) {
                if text.chars().count() > *max {
                    return dataverse_error(
                        StatusCode::BAD_REQUEST,
                        "0x80044331",
                        &format!("A validation error occurred. The length of the '{column}' attribute of the 'lead' entity exceeded the maximum allowed length of '{max}'."),
                    );
                }
            }
        }
        let mut inner = self.lock();
        if let Some(error) = inner.refuse.get(&key) {
            return (StatusCode::BAD_REQUEST, Json(error.clone())).into_response();
        }
        let created = !inner.records.contains_key(&key);
        if !created && headers.get("if-none-match").is_some_and(|v| v == "*") {
            return dataverse_error(
                StatusCode::PRECONDITION_FAILED,
                "0x80060882",
                "A record with matching key values already exists.",
            );
        }
        if created && headers.get("if-match").is_some_and(|v| v == "*") {
            return dataverse_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("lead With Ids = {key} Does Not Exist"),
            );
        }
        if created {
            let n = inner.ids.len() + 1;
            inner
                .ids
                .insert(key.clone(), format!("00000000-0000-0000-0000-{n:012}"));
            inner.created += 1;
        } else {
            inner.updated += 1;
        }
        let id = inner.ids[&key].clone();
        let record = inner.records.entry(key.clone()).or_default();
        if created {
            record.insert("leadid".into(), json!(id));
            record.insert("statecode".into(), json!(0));
            record.insert("_ownerid_value".into(), json!(REP_USER));
        }
        record.extend(fields);
        record.insert(attribute.to_owned(), json!(key));
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert("OData-Version", HeaderValue::from_static("4.0"));
        headers.insert(
            "OData-EntityId",
            HeaderValue::from_str(&format!("{}{API}/leads({id})", self.base())).unwrap(),
        );
        response
    }
}

async fn start(fake: Fake) -> Arc<Fake> {
    let fake = Arc::new(fake);
    let router = Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(Fake::token))
        .fallback(Fake::web_api)
        .with_state(fake.clone());
    let base = serve(router).await;
    fake.base.set(base).unwrap();
    fake
}

/// The `[sink.dynamics]` section for `fake`, with `extra` lines.
fn section(fake: &Fake, secret: &str, extra: &str) -> String {
    format!(
        r#"[sink]
kind = "dynamics"
[sink.dynamics]
environment_url = "{base}"
authority_host = "{base}"
tenant_id = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret = {{ value = "{secret}" }}
allow_http = true
{extra}
"#,
        base = fake.base(),
    )
}

/// Settings parsed through the real config loader.
fn settings(fake: &Fake, secret: &str, extra: &str) -> DynamicsSettings {
    let text = format!(
        "[source]\nconnection_string = {{ value = \"UseDevelopmentStorage=true\" }}\n{}",
        section(fake, secret, extra)
    );
    Settings::from_toml_with_env(&text, Path::new("test.toml"), &HashMap::new())
        .unwrap_or_else(|e| panic!("{e}"))
        .sink
        .dynamics
        .expect("a [sink.dynamics] section")
}

const QUICK_RETRY: &str =
    r#"retry = { max_attempts = 3, initial_backoff = "10ms", max_backoff = "50ms" }"#;

fn sink(fake: &Fake, extra: &str) -> DynamicsSink {
    let extra = if extra.contains("retry") {
        extra.to_owned()
    } else {
        format!("{QUICK_RETRY}\n{extra}")
    };
    DynamicsSink::new(&settings(fake, SECRET, &extra)).expect("sink")
}

/// The merged record of one marketplace event with this `CustomerInfo`.
fn lead_of(customer: Value) -> CustomerLead {
    let columns = json!({
        "LeadSource": "AzureMarketplace-INS | contoso.analytics",
        "CustomerInfo": customer.to_string(),
        "OfferDisplayName": "Contoso Analytics",
    });
    let Value::Object(columns) = columns else {
        unreachable!()
    };
    let event = normalise(&RawRow {
        id: RowId::new("p", "r1"),
        etag: "W/\"1\"".into(),
        timestamp: leadsync::timestamp::parse("2024-05-01T10:00:00Z").unwrap(),
        columns,
    })
    .expect("a lead");
    let identity = IdentitySettings::default();
    let key = customer_key(&event.customer, identity.fallback).expect("identifiable");
    let mut state = CustomerState::new(&key, &identity);
    state.apply([&event], &identity);
    state.lead
}

fn lead(n: usize) -> CustomerLead {
    lead_of(customer(n))
}

fn refused_message(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Rejected { reason } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn held_message(outcome: &Outcome) -> &str {
    match outcome {
        // An endpoint failure: the leads wait, the pipeline pauses the sink and says why.
        Outcome::EndpointFailed { reason } => reason,
        other => panic!("expected the leads to wait for corrected credentials, got {other:?}"),
    }
}

#[tokio::test]
async fn a_valid_secret_gets_a_token_and_the_healthcheck_reads_who_am_i_without_writing() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");

    // Act
    let result = sink.healthcheck().await;

    // Assert
    result.expect("healthy");
    let inner = fake.lock();
    assert_eq!(inner.token_forms.len(), 1);
    let form = &inner.token_forms[0];
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], CLIENT_ID);
    assert_eq!(form["scope"], format!("{}/.default", fake.base()));
    assert_eq!(
        inner.requests.len(),
        2,
        "WhoAmI, then the lead table's keys"
    );
    assert_eq!(
        inner.requests[1].path,
        "/api/data/v9.2/EntityDefinitions(LogicalName='lead')/Keys"
    );
    let who = &inner.requests[0];
    assert_eq!(
        (who.method.clone(), who.path.as_str()),
        (Method::GET, "/api/data/v9.2/WhoAmI")
    );
    assert_eq!(who.status, 200);
    assert_eq!(who.headers["odata-version"], "4.0");
    assert!(inner.records.is_empty(), "a healthcheck writes nothing");
}

#[tokio::test]
async fn a_wrong_secret_holds_the_batch_once_with_the_entra_reason_and_never_the_secret() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let wrong = "wrong-secret-value-123";
    let sink = DynamicsSink::new(&settings(&fake, wrong, QUICK_RETRY)).unwrap();

    // Act
    let outcomes = sink.deliver(&[lead(1), lead(2), lead(3)]).await;
    let health = sink.healthcheck().await;

    // Assert
    assert_eq!(outcomes.len(), 3);
    for outcome in &outcomes {
        let reason = held_message(outcome);
        assert!(
            reason.contains("invalid_client") && reason.contains("AADSTS7000215"),
            "{reason}"
        );
        assert!(reason.contains("until"), "{reason}");
        assert!(!reason.contains(wrong), "{reason}");
    }
    let message = health.expect_err("the healthcheck fails").to_string();
    assert!(
        message.contains("AADSTS7000215") && !message.contains(wrong),
        "{message}"
    );
    assert_eq!(
        fake.token_requests(),
        2,
        "one token request per batch and one per healthcheck, not one per lead"
    );
    assert!(
        fake.lock().requests.is_empty(),
        "nothing reached the Web API"
    );
}

#[tokio::test]
async fn an_unreachable_entra_id_leaves_the_batch_for_the_next_poll() {
    // Arrange: a loopback port nothing listens on
    let fake = start(Fake::new("leadsync_key")).await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut settings = settings(&fake, SECRET, QUICK_RETRY);
    settings.authority_host = format!("http://127.0.0.1:{closed}");
    let sink = DynamicsSink::new(&settings).unwrap();

    // Act
    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    // Assert
    assert_eq!(outcomes.len(), 2);
    for outcome in outcomes {
        match outcome {
            Outcome::RetryLater { reason, .. } => {
                assert!(
                    reason.contains("token request to Entra ID failed"),
                    "{reason}"
                );
                assert!(!reason.contains(SECRET), "{reason}");
            }
            other => panic!("expected RetryLater, got {other:?}"),
        }
    }
    assert!(fake.lock().requests.is_empty());
}

#[tokio::test]
async fn a_short_lived_token_is_renewed_before_it_expires() {
    // Arrange: tokens live 2 s; the sink renews at half-life at the latest.
    let mut fake = Fake::new("leadsync_key");
    fake.token_lifetime = 2;
    let fake = start(fake).await;
    let sink = sink(&fake, "");
    assert_eq!(sink.deliver(&[lead(1)]).await, vec![Outcome::Delivered]);

    // Act
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let outcomes = sink.deliver(&[lead(2)]).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.token_requests(), 2);
    let statuses: Vec<u16> = fake.patches().iter().map(|p| p.status).collect();
    assert_eq!(
        statuses,
        vec![204, 204],
        "no request went out with an expiring token"
    );
}

#[tokio::test]
async fn a_token_refused_with_401_is_replaced_once_and_the_upsert_sent_again() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    assert_eq!(sink.deliver(&[lead(1)]).await, vec![Outcome::Delivered]);
    fake.revoke_tokens();

    // Act
    let outcomes = sink.deliver(&[lead(2)]).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let statuses: Vec<(Method, u16)> = fake
        .lock()
        .requests
        .iter()
        .map(|r| (r.method.clone(), r.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (Method::GET, 200),
            (Method::PATCH, 204),
            (Method::GET, 401),
            (Method::GET, 200),
            (Method::PATCH, 204)
        ],
        "the second batch's query met the revoked token"
    );
    assert_eq!(fake.token_requests(), 2);
    assert_eq!(fake.records().len(), 2);
}

#[tokio::test]
async fn the_first_upsert_creates_the_record_and_the_next_updates_it_in_place() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    let first = lead(7);
    let mut changed = customer(7);
    changed["Company"] = json!("Fabrikam Renamed");
    changed["Title"] = json!("CEO");
    let second = lead_of(changed);
    assert_eq!(first.external_key, second.external_key);

    // Act
    let created = sink.deliver(std::slice::from_ref(&first)).await;
    let updated = sink.deliver(&[second]).await;

    // Assert
    assert_eq!(
        (created, updated),
        (vec![Outcome::Delivered], vec![Outcome::Delivered])
    );
    let (records, created, updated) = {
        let inner = fake.lock();
        (inner.records.clone(), inner.created, inner.updated)
    };
    assert_eq!((created, updated), (1, 1));
    assert_eq!(records.len(), 1);
    let record = &records[&first.external_key];
    assert_eq!(
        record["companyname"],
        json!("Company 7"),
        "the company is written while empty, then it is sales'"
    );
    assert_eq!(record["jobtitle"], json!("CEO"));
    assert_eq!(record["firstname"], json!("First7"));
    assert_eq!(record["emailaddress1"], json!("customer7@contoso.com"));
    assert_eq!(record["leadsync_key"], json!(first.external_key));
    assert_eq!(record["subject"], json!("Contoso Analytics: Get it now"));
    assert!(
        record.get("donotemail").is_none() && record.get("donotphone").is_none(),
        "a false opt-out is never sent: {record:?}"
    );
    assert!(
        record["description"].as_str().unwrap().contains("Contoso"),
        "{record:?}"
    );
    let patches = fake.patches();
    assert_eq!(
        patches[0].path,
        format!(
            "/api/data/v9.2/leads(leadsync_key='{}')",
            first.external_key
        )
    );
    assert_eq!(patches[0].path, patches[1].path);
    let sent = patches[0].body.as_ref().expect("a JSON body");
    assert_eq!(
        sent["leadsync_key"],
        json!(first.external_key),
        "the key is in the body too"
    );
    assert_eq!(sent["subject"], json!("Contoso Analytics: Get it now"));
}

#[tokio::test]
async fn every_upsert_carries_the_odata_headers_and_a_bearer_token() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");

    // Act
    sink.deliver(&[lead(1), lead(2)]).await;

    // Assert
    let patches = fake.patches();
    assert_eq!(patches.len(), 2);
    for patch in patches {
        let h = &patch.headers;
        assert_eq!(h["odata-version"], "4.0");
        assert_eq!(h["odata-maxversion"], "4.0");
        assert_eq!(h["accept"], "application/json");
        assert_eq!(h["content-type"], "application/json; charset=utf-8");
        assert!(h["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer eyJ0eXAi."));
        assert!(
            h.get("if-match").is_none() && h["if-none-match"] == "*",
            "a new lead is created, never upserted over one that appeared meanwhile"
        );
    }
}

#[tokio::test]
async fn a_quote_in_an_email_key_is_doubled_and_percent_encoded_in_the_path() {
    // Arrange
    let fake = start(Fake::new("emailaddress1")).await;
    let sink = sink(&fake, "key_attribute = \"emailaddress1\"");
    let obrien = lead_of(
        json!({"FirstName": "Siobhan", "LastName": "O'Brien", "Email": "O'Brien+leads@x.com"}),
    );

    // Act
    let outcomes = sink.deliver(&[obrien]).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let patches = fake.patches();
    assert_eq!(
        patches[0].path,
        "/api/data/v9.2/leads(emailaddress1='o%27%27brien%2Bleads%40x.com')"
    );
    let records = fake.records();
    let record = records
        .get("o'brien+leads@x.com")
        .expect("the fake decoded the key back");
    assert_eq!(record["emailaddress1"], json!("o'brien+leads@x.com"));
    assert_eq!(record["lastname"], json!("O'Brien"));
}

#[tokio::test]
async fn a_lead_without_email_is_rejected_when_upserting_on_emailaddress1() {
    // Arrange
    let fake = start(Fake::new("emailaddress1")).await;
    let sink = sink(&fake, "key_attribute = \"emailaddress1\"");
    let no_email = lead_of(json!({"FirstName": "Ana", "LastName": "Silva", "Company": "Fabrikam"}));

    // Act
    let outcomes = sink.deliver(&[no_email, lead(1)]).await;

    // Assert
    let reason = refused_message(&outcomes[0]);
    assert!(
        reason.contains("no email") && reason.contains("emailaddress1"),
        "{reason}"
    );
    assert_eq!(outcomes[1], Outcome::Delivered);
    assert_eq!(fake.patches().len(), 1, "no request with an empty key");
}

#[tokio::test]
async fn a_400_with_a_dataverse_error_rejects_the_lead_with_its_code_and_message() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    fake.script([Scripted::Answer {
        status: 400,
        retry_after: None,
        body: json!({"error": {"code": "0x80040237", "message": "A record with matching key values already exists."}}),
    }]);

    // Act
    let outcomes = sink.deliver(&[lead(1)]).await;

    // Assert
    let reason = refused_message(&outcomes[0]);
    assert!(
        reason.contains("0x80040237: A record with matching key values already exists."),
        "{reason}"
    );
    assert!(reason.contains("400"), "{reason}");
    assert_eq!(fake.patches().len(), 1, "a 400 is not retried");
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_then_delivered() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(
        &fake,
        r#"retry = { max_attempts = 3, initial_backoff = "10ms", max_backoff = "2s" }"#,
    );
    fake.script([Scripted::Answer {
        status: 429,
        retry_after: Some("1"),
        body: json!({"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}),
    }]);

    // Act
    let outcomes = sink.deliver(&[lead(1)]).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let patches = fake.patches();
    assert_eq!(
        patches.iter().map(|p| p.status).collect::<Vec<_>>(),
        vec![429, 204]
    );
    let waited = patches[1].at - patches[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "waited only {waited:?}"
    );
}

#[tokio::test]
async fn a_429_with_a_retry_after_beyond_max_backoff_leaves_the_lead_for_later_with_that_delay() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    fake.script([Scripted::Answer {
        status: 429,
        retry_after: Some("30"),
        body: json!({"error": {"code": "0x80072321", "message": "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time window of 300 seconds."}}),
    }]);

    // Act
    let outcomes = sink.deliver(&[lead(1)]).await;

    // Assert
    match &outcomes[0] {
        Outcome::RetryLater { after, reason } => {
            assert_eq!(*after, Some(Duration::from_secs(30)));
            assert!(
                reason.contains("0x80072321") && reason.contains("execution time"),
                "{reason}"
            );
        }
        other => panic!("expected RetryLater, got {other:?}"),
    }
    assert_eq!(fake.patches().len(), 1);
    assert!(fake.records().is_empty());
}

#[tokio::test]
async fn a_503_is_retried_and_then_delivered() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    fake.script([Scripted::Answer {
        status: 503,
        retry_after: None,
        body: json!({"error": {"code": "0x80040216", "message": "An unexpected error occurred."}}),
    }]);

    // Act
    let outcomes = sink.deliver(&[lead(1)]).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let statuses: Vec<u16> = fake.patches().iter().map(|p| p.status).collect();
    assert_eq!(statuses, vec![503, 204]);
    assert_eq!(fake.records().len(), 1);
}

#[tokio::test]
async fn an_upsert_that_times_out_is_sent_again() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "request_timeout = \"300ms\"");
    fake.script([Scripted::Hang(Duration::from_secs(3))]);

    // Act
    let outcomes = sink.deliver(&[lead(1)]).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    assert_eq!(fake.patches().len(), 2);
    assert_eq!(fake.records().len(), 1);
}

#[tokio::test]
async fn an_upsert_that_keeps_timing_out_is_left_for_the_next_poll() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(
        &fake,
        "request_timeout = \"200ms\"\nretry = { max_attempts = 2, initial_backoff = \"10ms\", max_backoff = \"50ms\" }",
    );
    fake.script([
        Scripted::Hang(Duration::from_secs(3)),
        Scripted::Hang(Duration::from_secs(3)),
    ]);

    // Act
    let outcomes = sink.deliver(&[lead(1)]).await;

    // Assert
    match &outcomes[0] {
        Outcome::RetryLater { after, reason } => {
            assert_eq!(*after, None);
            assert!(reason.contains("timed out"), "{reason}");
        }
        other => panic!("expected RetryLater, got {other:?}"),
    }
    assert_eq!(fake.patches().len(), 2);
}

#[tokio::test]
async fn no_more_than_parallelism_batches_are_in_flight_and_outcomes_keep_input_order() {
    // Arrange: 9 leads in $batches of 3, each $batch taking 100 ms
    let mut fake = Fake::new("leadsync_key");
    fake.patch_delay = Duration::from_millis(100);
    let fake = start(fake).await;
    let sink = sink(&fake, "parallelism = 3\nbatch_size = 3");
    let leads: Vec<CustomerLead> = (0..9).map(lead).collect();
    fake.lock().refuse.insert(
        leads[4].external_key.clone(),
        json!({"error": {"code": "0x80044331", "message": "A validation error occurred."}}),
    );

    // Act
    let outcomes = sink.deliver(&leads).await;

    // Assert
    let max = fake.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} $batches were in flight");
    assert!(max > 1, "$batches ran one at a time");
    assert_eq!(fake.batches().len(), 3);
    assert_eq!(outcomes.len(), 9);
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 4 {
            assert!(refused_message(outcome).contains("0x80044331"));
        } else {
            assert_eq!(outcome, &Outcome::Delivered, "lead {i}");
        }
    }
    assert_eq!(fake.records().len(), 8);
}

#[tokio::test]
async fn long_values_are_cut_to_the_column_sizes_dataverse_accepts() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "max_lengths = { jobtitle = 20 }");
    let mut long = customer(1);
    long["FirstName"] = json!("É".repeat(80));
    long["Company"] = json!("C".repeat(150));
    long["Title"] = json!("Chief Executive Officer of Everything");
    let lead = lead_of(long);

    // Act
    let outcomes = sink.deliver(std::slice::from_ref(&lead)).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let record = &fake.records()[&lead.external_key];
    let chars = |column: &str| record[column].as_str().unwrap().chars().count();
    assert_eq!(chars("firstname"), 50);
    assert_eq!(chars("companyname"), 100);
    assert_eq!(chars("jobtitle"), 20);
    assert!(record["companyname"].as_str().unwrap().ends_with('…'));
    assert_eq!(
        record["lastname"],
        json!("Last1"),
        "short values are untouched"
    );
}

#[tokio::test]
async fn the_secret_and_the_tokens_never_appear_in_outcomes_debug_or_logs() {
    // Arrange
    let (logs, _guard) = common::capture_logs(tracing_subscriber::EnvFilter::new("leadsync=trace"));
    let fake = start(Fake::new("leadsync_key")).await;
    let settings = settings(&fake, SECRET, QUICK_RETRY);
    let sink = DynamicsSink::new(&settings).unwrap();
    fake.script([
        Scripted::Answer {
            status: 503,
            retry_after: None,
            body: json!({}),
        },
        Scripted::Answer {
            status: 400,
            retry_after: None,
            body: json!({"error": {"code": "0x80040203", "message": "Invalid argument."}}),
        },
    ]);

    // Act
    let mut outcomes = sink.deliver(&[lead(1)]).await;
    fake.revoke_tokens();
    outcomes.extend(sink.deliver(&[lead(2)]).await);
    let wrong = DynamicsSink::new(&settings_with_secret(&fake, "another-wrong-secret")).unwrap();
    outcomes.extend(wrong.deliver(&[lead(3)]).await);
    let _ = wrong.healthcheck().await;

    // Assert
    let tokens: Vec<String> = fake.lock().tokens.keys().cloned().collect();
    assert!(!tokens.is_empty());
    let logged = logs.text();
    assert!(logged.contains("retrying"), "the capture works: {logged}");
    let texts = [
        format!("{outcomes:?}"),
        format!("{settings:?}"),
        format!("{sink:?}"),
        format!("{wrong:?}"),
        logged,
    ];
    for text in &texts {
        for secret in [SECRET, "another-wrong-secret"] {
            assert!(!text.contains(secret), "secret leaked into: {text}");
        }
        for token in &tokens {
            assert!(!text.contains(token.as_str()), "token leaked into: {text}");
        }
    }
}

// ---------------------------------------------------------------------------
// What the CRM owns stays the CRM's

/// A later event of customer `n`: a new title and a day later.
fn later_event(n: usize) -> CustomerLead {
    let mut changed = customer(n);
    changed["Title"] = json!("CEO");
    let mut later = lead_of(changed);
    later.last_seen += time::Duration::days(1);
    later.summary.push_str(" Asked again.");
    later
}

#[tokio::test]
async fn a_reps_company_topic_and_opt_outs_survive_a_new_event_and_a_resend() {
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    let key = lead(1).external_key;
    assert_eq!(sink.deliver(&[lead(1)]).await, vec![Outcome::Delivered]);
    fake.rep_edits(&key, "companyname", json!("Fabrikam Holdings Ltd"));
    fake.rep_edits(&key, "donotemail", json!(true));
    fake.rep_edits(&key, "donotphone", json!(true));
    fake.rep_edits(&key, "subject", json!("Renewal: Fabrikam analytics"));
    fake.rep_edits(&key, "description", json!("Met at Ignite; wants a demo."));

    let new_event = sink.deliver(&[later_event(1)]).await;
    let after_event = fake.records()[&key].clone();
    let resend = sink.deliver(&[later_event(1)]).await;
    let after_resend = fake.records()[&key].clone();

    assert_eq!(
        (new_event, resend),
        (vec![Outcome::Delivered], vec![Outcome::Delivered])
    );
    for record in [&after_event, &after_resend] {
        assert_eq!(record["companyname"], json!("Fabrikam Holdings Ltd"));
        assert_eq!(record["donotemail"], json!(true), "never opted back in");
        assert_eq!(record["donotphone"], json!(true), "never opted back in");
        assert_eq!(record["subject"], json!("Renewal: Fabrikam analytics"));
        assert_eq!(record["description"], json!("Met at Ignite; wants a demo."));
        assert_eq!(
            record["jobtitle"],
            json!("CEO"),
            "the customer's data follows them"
        );
    }
    let patches = fake.patches();
    assert_eq!(patches.len(), 3);
    let update = patches[1].body.clone().unwrap();
    assert_eq!(
        patches[1].headers["if-match"], "*",
        "an update never creates"
    );
    for column in [
        "companyname",
        "donotemail",
        "donotphone",
        "subject",
        "description",
    ] {
        assert!(
            update.get(column).is_none(),
            "{column} sent on update: {update}"
        );
    }
    assert_eq!(fake.lock().created, 1);
}

#[tokio::test]
async fn a_qualified_leads_new_event_becomes_one_task_on_its_opportunity_and_no_dead_letter() {
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    let key = lead(1).external_key;
    sink.deliver(&[lead(1), lead(2)]).await;
    fake.qualify(&key);
    let qualified = fake.records()[&key].clone();

    let outcomes = sink.deliver(&[later_event(1), later_event(2)]).await;
    let replayed = sink.deliver(&[later_event(1)]).await;

    assert!(
        matches!(&outcomes[0], Outcome::FollowedUp { note } if note.contains(&format!("regarding opportunity {OPPORTUNITY}")) && note.contains("qualified lead") && note.contains(REP_USER)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Delivered);
    assert_eq!(
        replayed,
        vec![outcomes[0].clone()],
        "a replay names the same task"
    );
    assert_eq!(
        fake.records()[&key],
        qualified,
        "the qualified lead is not touched"
    );
    let tasks = fake.lock().tasks.clone();
    assert_eq!(tasks.len(), 1, "one task per event, none more on replay");
    let task = tasks.values().next().unwrap();
    assert_eq!(
        task["regardingobjectid_opportunity_task@odata.bind"],
        json!(format!("/opportunities({OPPORTUNITY})"))
    );
    assert_eq!(
        task["ownerid@odata.bind"],
        json!(format!("/systemusers({REP_USER})"))
    );
    let description = task["description"].as_str().unwrap();
    assert!(description.contains("Next step"), "{description}");
    assert!(task["subject"]
        .as_str()
        .unwrap()
        .starts_with("Marketplace: Contoso Analytics"));
}

#[tokio::test]
async fn a_disqualified_leads_new_event_becomes_a_task_on_the_lead_for_its_owner() {
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    let key = lead(1).external_key;
    sink.deliver(&[lead(1)]).await;
    fake.rep_edits(&key, "statecode", json!(2));
    let lead_id = fake.records()[&key]["leadid"].as_str().unwrap().to_owned();

    let outcomes = sink.deliver(&[later_event(1)]).await;

    assert!(
        matches!(&outcomes[0], Outcome::FollowedUp { note } if note.contains(&format!("regarding lead {lead_id}")) && note.contains("disqualified")),
        "{outcomes:?}"
    );
    let tasks = fake.lock().tasks.clone();
    let task = tasks.values().next().expect("a task");
    assert_eq!(
        task["regardingobjectid_lead_task@odata.bind"],
        json!(format!("/leads({lead_id})"))
    );
}

#[tokio::test]
async fn a_key_column_the_lead_table_does_not_have_leaves_the_batch_pending() {
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "key_attribute = \"leadsync_id\"");

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;

    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { reason } if reason.contains("Could not find a property named 'leadsync_id'")),
            "{outcome:?}"
        );
    }
    assert!(fake.records().is_empty());
    assert!(fake.patches().is_empty());
}

#[tokio::test]
async fn a_key_column_that_is_no_alternate_key_leaves_the_batch_pending_and_the_check_says_so() {
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "key_attribute = \"emailaddress1\"");

    let outcomes = sink.deliver(&[lead(1), lead(2)]).await;
    let health = sink.healthcheck().await.unwrap_err().message;

    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::EndpointFailed { reason } if reason.contains("is not an alternate key")),
            "{outcome:?}"
        );
    }
    assert!(
        health.contains("no alternate key made of emailaddress1"),
        "{health}"
    );
    assert!(!health.contains('\n'), "one line: {health}");
}

#[tokio::test]
async fn a_403_and_a_401_with_a_fresh_token_hold_the_lead_instead_of_rejecting_it() {
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    fake.script([Scripted::Answer {
        status: 403,
        retry_after: None,
        body: json!({"error": {"code": "0x80040220", "message": "Principal user is missing prvCreateLead privilege."}}),
    }]);
    let forbidden = sink.deliver(&[lead(1)]).await;
    fake.script([
        Scripted::Answer {
            status: 401,
            retry_after: None,
            body: json!({}),
        },
        Scripted::Answer {
            status: 401,
            retry_after: None,
            body: json!({}),
        },
    ]);
    let unauthorized = sink.deliver(&[lead(1)]).await;

    assert!(
        matches!(&forbidden[0], Outcome::EndpointFailed { reason } if reason.contains("prvCreateLead")),
        "{forbidden:?}"
    );
    assert!(
        matches!(&unauthorized[0], Outcome::EndpointFailed { reason } if reason.contains("401")),
        "{unauthorized:?}"
    );
    assert!(fake.records().is_empty());
}

fn settings_with_secret(fake: &Fake, secret: &str) -> DynamicsSettings {
    settings(fake, secret, QUICK_RETRY)
}

#[test]
fn the_example_config_loads_and_states_the_defaults() {
    // Arrange
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dynamics.example.toml");

    // Act
    let settings =
        Settings::load_with_env(&path, &HashMap::new()).unwrap_or_else(|e| panic!("{e}"));

    // Assert
    assert_eq!(settings.sink.kind, SinkKind::Dynamics);
    let d = settings.sink.dynamics.expect("[sink.dynamics]");
    assert_eq!(d.authority_host, "https://login.microsoftonline.com");
    assert_eq!(d.api_version, "v9.2");
    assert_eq!(d.key_attribute, "leadsync_key");
    assert_eq!(d.parallelism, 4);
    assert_eq!(d.batch_size, 100);
    assert_eq!(d.fields, default_fields());
    assert!(
        d.ownership.is_empty(),
        "the defaults of the table in docs/sinks/dynamics.md"
    );
    assert_eq!(d.max_lengths, default_max_lengths());
    assert_eq!(d.token_refresh_margin, Duration::from_secs(300));
    assert_eq!(d.request_timeout, Duration::from_secs(30));
    assert!(!d.allow_http);
    assert_eq!(
        (
            d.retry.max_attempts,
            d.retry.initial_backoff,
            d.retry.max_backoff
        ),
        (6, Duration::from_millis(500), Duration::from_secs(30))
    );
    assert!(format!("{:?}", d.client_secret).contains("LEADSYNC_DYNAMICS_CLIENT_SECRET"));
}

#[tokio::test]
async fn leads_from_the_table_are_upserted_once_per_customer_across_a_restart() {
    // Arrange
    let world = World::new().await;
    let fake = start(Fake::new("leadsync_key")).await;
    let settings =
        world.settings_with_sink(&format!("{}{QUICK_RETRY}\n", section(&fake, SECRET, "")));
    world.insert(&many_rows(5, 2)).await;

    // Act: two runs, with new rows in between (a restart: state persists in state_dir)
    let first = common::run_once(&settings).await;
    let mut renamed = customer(2);
    renamed["Company"] = json!("Company 2 Renamed");
    renamed["Title"] = json!("CEO");
    world
        .insert(&[
            lead_row(
                "p09",
                "r900",
                "AppSource (SPZA)-PLT | contoso.backup",
                renamed,
            ),
            lead_row(
                "p09",
                "r901",
                "AzureMarketplace-INS | contoso.analytics",
                customer(5),
            ),
            lead_row(
                "p09",
                "r902",
                "AzureMarketplace-INS | contoso.analytics",
                customer(6),
            ),
        ])
        .await;
    let second = common::run_once(&settings).await;

    // Assert
    assert_eq!((first.exit_code(), second.exit_code()), (0, 0));
    assert_eq!(first.totals.delivered, 5);
    assert_eq!(second.totals.delivered, 3);
    let records = fake.records();
    assert_eq!(
        records.len(),
        7,
        "one record per customer: {:?}",
        records.keys()
    );
    let emails: std::collections::BTreeSet<&str> = records
        .values()
        .map(|r| r["emailaddress1"].as_str().unwrap())
        .collect();
    assert_eq!(emails.len(), 7);
    let ana = records
        .values()
        .find(|r| r["emailaddress1"] == json!("customer2@contoso.com"))
        .unwrap();
    assert_eq!(
        ana["companyname"],
        json!("Company 2"),
        "companyname is written while empty (if_empty), then it is sales'"
    );
    assert_eq!(ana["jobtitle"], json!("CEO"));
    let (created, updated) = {
        let inner = fake.lock();
        (inner.created, inner.updated)
    };
    assert_eq!((created, updated), (7, 1));
}

// ---------------------------------------------------------------------------
// In bulk: `$batch` with one request per lead (issue 26, points 2 and 3)

#[tokio::test]
async fn a_backfill_takes_one_batch_request_per_100_customers_and_one_outcome_per_lead() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    let leads: Vec<CustomerLead> = (0..250).map(lead).collect();

    // Act
    let created = sink.deliver(&leads).await;
    let queries_of_the_backfill = fake.queries();
    let later: Vec<CustomerLead> = (0..250).map(later_event).collect();
    let updated = sink.deliver(&later).await;

    // Assert
    assert_eq!(created, vec![Outcome::Delivered; 250]);
    assert_eq!(updated, vec![Outcome::Delivered; 250]);
    let batches = fake.batches();
    assert_eq!(
        batches.len(),
        6,
        "ceil(250 / 100) write requests per delivery"
    );
    let mut sizes: Vec<usize> = batches[..3].iter().map(|b| b.requests).collect();
    sizes.sort();
    assert_eq!(sizes, vec![50, 100, 100]);
    for batch in &batches {
        assert_eq!(batch.status, 200);
        let h = &batch.headers;
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("multipart/mixed; boundary="));
        assert_eq!(h["prefer"], "odata.continue-on-error");
        assert_eq!(h["odata-version"], "4.0");
        assert!(h["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer eyJ0eXAi."));
    }
    assert_eq!(fake.single_writes(), 0, "no write outside a $batch");
    assert!(
        (1..=5).contains(&queries_of_the_backfill),
        "the batch's In queries: {queries_of_the_backfill}"
    );
    let (records, created, updated) = {
        let inner = fake.lock();
        (inner.records.len(), inner.created, inner.updated)
    };
    assert_eq!((records, created, updated), (250, 250, 250));
    let patches = fake.patches();
    assert!(patches[..250]
        .iter()
        .all(|p| p.headers["if-none-match"] == "*" && p.status == 204));
    assert!(patches[250..]
        .iter()
        .all(|p| p.headers["if-match"] == "*" && p.status == 204));
}

#[tokio::test]
async fn one_bad_record_is_refused_alone_while_its_neighbours_in_the_batch_are_delivered() {
    // Arrange: lead 3 is refused inside the $batch (400 for its request); lead 6 makes
    // Dataverse refuse any $batch holding it as a whole (400 malformed)
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    let leads: Vec<CustomerLead> = (0..10).map(lead).collect();
    fake.lock().refuse.insert(
        leads[3].external_key.clone(),
        json!({"error": {"code": "0x80044331", "message": "A validation error occurred."}}),
    );
    fake.lock().poison.push(leads[6].external_key.clone());

    // Act
    let outcomes = sink.deliver(&leads).await;

    // Assert
    assert_eq!(outcomes.len(), 10);
    for (i, outcome) in outcomes.iter().enumerate() {
        match i {
            3 => assert!(
                refused_message(outcome).contains("0x80044331"),
                "{outcome:?}"
            ),
            6 => assert!(
                refused_message(outcome).contains("0x80048d19"),
                "{outcome:?}"
            ),
            _ => assert_eq!(outcome, &Outcome::Delivered, "lead {i}"),
        }
    }
    let records = fake.records();
    assert_eq!(records.len(), 8);
    assert!(!records.contains_key(&leads[6].external_key));
    let batches = fake.batches();
    assert_eq!((batches[0].requests, batches[0].status), (10, 400));
    assert!(
        batches.len() <= 9,
        "halves down to the bad record: {} $batches",
        batches.len()
    );
    assert_eq!(fake.single_writes(), 0);
}

#[tokio::test]
async fn a_429_on_the_whole_batch_is_waited_out_as_told_or_left_with_its_retry_after() {
    // Arrange
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(
        &fake,
        r#"retry = { max_attempts = 3, initial_backoff = "10ms", max_backoff = "2s" }"#,
    );
    fake.lock().batch_script.extend([
        Scripted::Answer {
            status: 429,
            retry_after: Some("1"),
            body: json!({"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}),
        },
    ]);

    // Act
    let waited_out = sink.deliver(&[lead(1), lead(2), lead(3)]).await;
    fake.lock().batch_script.push_back(Scripted::Answer {
        status: 429,
        retry_after: Some("30"),
        body: json!({"error": {"code": "0x80072321", "message": "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time window of 300 seconds."}}),
    });
    let left = sink.deliver(&[lead(4), lead(5)]).await;

    // Assert
    assert_eq!(waited_out, vec![Outcome::Delivered; 3]);
    let batches = fake.batches();
    assert_eq!(
        batches.iter().map(|b| b.status).collect::<Vec<_>>(),
        vec![429, 200, 429]
    );
    let waited = batches[1].at - batches[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "waited only {waited:?}"
    );
    assert_eq!(left.len(), 2);
    for outcome in &left {
        match outcome {
            Outcome::RetryLater { after, reason } => {
                assert_eq!(*after, Some(Duration::from_secs(30)));
                assert!(
                    reason.contains("0x80072321") && reason.contains("execution time"),
                    "{reason}"
                );
            }
            other => panic!("expected RetryLater, got {other:?}"),
        }
    }
    assert_eq!(fake.records().len(), 3);
}

#[tokio::test]
async fn a_slow_batch_holds_one_slot_not_the_window_and_outcomes_come_back_in_input_order() {
    // Arrange: one lead per $batch, two in flight; lead 0's takes 1.5 s, lead 4 is refused
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "parallelism = 2\nbatch_size = 1");
    let leads: Vec<CustomerLead> = (0..6).map(lead).collect();
    fake.lock()
        .slow
        .insert(leads[0].external_key.clone(), Duration::from_millis(1500));
    fake.lock().refuse.insert(
        leads[4].external_key.clone(),
        json!({"error": {"code": "0x80044331", "message": "A validation error occurred."}}),
    );

    // Act
    let outcomes = sink.deliver(&leads).await;

    // Assert
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 4 {
            assert!(refused_message(outcome).contains("0x80044331"));
        } else {
            assert_eq!(outcome, &Outcome::Delivered, "lead {i}");
        }
    }
    let batches = fake.batches();
    assert_eq!(batches.len(), 6);
    let slow = batches
        .iter()
        .max_by_key(|b| b.done.unwrap())
        .unwrap()
        .clone();
    assert!(slow.done.unwrap() - slow.at >= Duration::from_millis(1400));
    for batch in &batches {
        if batch.at != slow.at {
            assert!(
                batch.done.unwrap() < slow.at + Duration::from_millis(1000),
                "a fast $batch waited for the slow one: started {:?} after it",
                batch.at.saturating_duration_since(slow.at)
            );
        }
    }
}

#[tokio::test]
async fn a_batch_refused_as_too_large_is_sent_again_in_halves_and_no_lead_is_lost() {
    // Arrange: this environment takes at most 3 requests per $batch
    let fake = start(Fake::new("leadsync_key")).await;
    let sink = sink(&fake, "");
    fake.lock().max_batch_requests = Some(3);
    let leads: Vec<CustomerLead> = (0..10).map(lead).collect();

    // Act
    let outcomes = sink.deliver(&leads).await;

    // Assert
    assert_eq!(outcomes, vec![Outcome::Delivered; 10]);
    assert_eq!(fake.records().len(), 10);
    let batches = fake.batches();
    let refused: Vec<usize> = batches
        .iter()
        .filter(|b| b.status == 413)
        .map(|b| b.requests)
        .collect();
    assert_eq!(refused, vec![10, 5, 5], "10, then its halves of 5");
    assert!(batches
        .iter()
        .filter(|b| b.status == 200)
        .all(|b| b.requests <= 3));
    assert_eq!(
        fake.patches().iter().filter(|p| p.status == 204).count(),
        10
    );
}

#[tokio::test]
async fn a_delivered_lead_has_a_link_to_its_lead_in_the_environment_for_the_alerts() {
    let fake = start(Fake::new("leadsync_key")).await;
    let first_sink = sink(&fake, "");
    first_sink.want_links();
    let first = lead(7);
    let none = first_sink.record_link(&first.external_key);
    assert_eq!(none, None, "no answer named it yet");

    let delivered = first_sink.deliver(std::slice::from_ref(&first)).await;

    assert_eq!(delivered, vec![Outcome::Delivered]);
    let id = {
        let inner = fake.lock();
        let record = inner
            .records
            .values()
            .next()
            .expect("the created lead")
            .clone();
        record["leadid"].as_str().unwrap().to_owned()
    };
    let link = first_sink.record_link(&first.external_key);
    let expected = format!(
        "{}/main.aspx?etn=lead&id={id}&pagetype=entityrecord",
        fake.base()
    );
    assert_eq!(link.as_deref(), Some(expected.as_str()));
    // A sink started afresh learns it from the batch's query of an existing lead.
    let again = sink(&fake, "");
    again.want_links();
    again.deliver(std::slice::from_ref(&first)).await;
    assert_eq!(again.record_link(&first.external_key), link);
}
