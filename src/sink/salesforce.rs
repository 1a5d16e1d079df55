//! Salesforce sink: OAuth 2.0 (client credentials or JWT bearer) against the org's
//! login URL, then upserts of Leads by an External ID field in sObject Collections
//! requests of at most 200 records.
//!
//! Vendor contract (REST API developer guide):
//! - token: `POST {login_url}/services/oauth2/token`, form-encoded; errors are
//!   `{"error": "...", "error_description": "..."}`. No `expires_in` is returned, so
//!   the token is kept until an API call answers 401 `INVALID_SESSION_ID`.
//! - upsert: `PATCH {instance_url}/services/data/vXX.X/composite/sobjects/Lead/{ExternalIdField}`
//!   with `{"allOrNone": false, "records": [...]}`; 200 with one UpsertResult per record,
//!   in input order; request-level errors are `[{"errorCode", "message", "fields"}]`.
//! - `Sforce-Limit-Info: api-usage=used/limit` on every API response.
//! - query: `GET {instance_url}/services/data/vXX.X/query?q=<SOQL>`, 200 with
//!   `{"totalSize", "done", "records", "nextRecordsUrl"?}`; an unknown column is a
//!   request-level 400 `INVALID_FIELD`.
//! - create: `POST /services/data/vXX.X/composite/sobjects` with `{"allOrNone": false,
//!   "records": [...]}`; one SaveResult per record, in input order.
//! - a converted Lead cannot be updated: its UpsertResult carries
//!   `CANNOT_UPDATE_CONVERTED_LEAD` ("cannot reference converted lead").
//! - `REQUEST_LIMIT_EXCEEDED` (403) is the org's rolling 24-hour API limit; it comes
//!   without `Retry-After` and lifts only as the day's calls age out.
//!
//! Per collection of up to 200 customers: one SOQL query of their external ids (is
//! the Lead there, converted, what do its `if_empty` fields hold), one upsert of the
//! new and open Leads (new ones get every field, open ones only what leadsync owns),
//! and, only when some are converted, one query and one create of follow-up Tasks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::http::{check_url, client, is_transient_status, retry_after, retrying, Finished, Step};
use super::mapping::{crm_value_is_empty, owned_fields, truncate, LeadField, WriteMode};
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::retry::RetrySettings;
use crate::secret::SecretSource;

const SINK: &str = "salesforce";
/// "The list can contain up to 200 objects" (sObject Collections upsert).
pub const MAX_RECORDS_PER_REQUEST: usize = 200;
const JWT_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Salesforce accepts an assertion whose `exp` is at most 3 minutes ahead.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(180);
/// The Sforce-Duplicate-Rule-Header exists from API v52.0 on.
const MIN_API_MAJOR: u32 = 52;
const API_USAGE_WARN_PERCENT: u64 = 80;
const DUPLICATES_DETECTED: &str = "DUPLICATES_DETECTED";
/// Another transaction held the record (workflow, trigger, a user editing it): transient.
const UNABLE_TO_LOCK_ROW: &str = "UNABLE_TO_LOCK_ROW";
const REDACTED: &str = "[redacted]";
const CANNOT_UPDATE_CONVERTED_LEAD: &str = "CANNOT_UPDATE_CONVERTED_LEAD";
const REQUEST_LIMIT_EXCEEDED: &str = "REQUEST_LIMIT_EXCEEDED";
/// Keeps a SOQL query's URL well under the REST API's 16,384-byte URI limit.
const MAX_QUERY_URL_BYTES: usize = 12_000;

static API_LIMIT_PAUSES: AtomicU64 = AtomicU64::new(0);

/// Pauses of the Salesforce sink for `REQUEST_LIMIT_EXCEEDED` since the process
/// started (one per pause, not per attempt; for metrics).
pub fn api_limit_pauses_total() -> u64 {
    API_LIMIT_PAUSES.load(Ordering::Relaxed)
}

/// Which OAuth 2.0 flow obtains the access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFlow {
    /// Consumer key + consumer secret; the app's run-as user owns the writes.
    #[default]
    ClientCredentials,
    /// Consumer key + a username + an RSA key whose certificate is uploaded to the app.
    JwtBearer,
}

impl AuthFlow {
    fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::JwtBearer => "jwt_bearer",
        }
    }
}

/// What to do when a duplicate rule flags a Lead (`DUPLICATES_DETECTED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicatePolicy {
    /// The lead is rejected with Salesforce's message (a person merges or decides).
    #[default]
    Reject,
    /// The flagged records are sent again with `Sforce-Duplicate-Rule-Header: allowSave=true`
    /// (saves past rules whose action is "Alert"; "Block" rules still refuse).
    AllowSave,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceSettings {
    /// OAuth 2.0 flow: `client_credentials` or `jwt_bearer`.
    #[serde(default)]
    pub auth: AuthFlow,
    /// Where tokens come from: the org's My Domain (`https://acme.my.salesforce.com`);
    /// required for client_credentials. `https://login.salesforce.com` (or
    /// `https://test.salesforce.com` for sandboxes) works for jwt_bearer.
    pub login_url: String,
    /// Consumer key of the connected app or external client app.
    pub client_id: String,
    /// Consumer secret (client_credentials only).
    pub client_secret: Option<SecretSource>,
    /// The Salesforce username the JWT is issued for, its `sub` (jwt_bearer only).
    pub username: Option<String>,
    /// RSA private key in PEM form (PKCS#8 or PKCS#1) whose certificate is uploaded to
    /// the app (jwt_bearer only).
    pub private_key: Option<SecretSource>,
    /// The JWT `aud` (jwt_bearer only). Default: `https://login.salesforce.com` for a
    /// production My Domain, `https://test.salesforce.com` for a sandbox or scratch My
    /// Domain, otherwise `login_url` itself.
    pub audience: Option<String>,
    /// REST API version, `vNN.N` (52.0 or later).
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// API name of the Lead's External ID field leads are upserted by.
    #[serde(default = "default_external_id_field")]
    pub external_id_field: String,
    /// Lead field API name -> lead attribute. Replaces the default mapping as a whole.
    #[serde(default = "default_fields")]
    pub fields: BTreeMap<String, LeadField>,
    /// Lead field API name -> when leadsync writes it once the Lead exists: `always`,
    /// `on_create` or `if_empty`. Entries override the defaults of the mapped
    /// attribute (see the table in docs/sinks/salesforce.md); opt-outs are only ever written as `true`,
    /// and placeholders only on create, whatever this says.
    #[serde(default)]
    pub ownership: BTreeMap<String, WriteMode>,
    /// Value sent for a field when the lead has none. Entries override the defaults
    /// (LastName and Company, which Salesforce requires on every Lead). Sent only when
    /// the Lead is created: a placeholder never replaces a value.
    #[serde(default = "default_placeholders")]
    pub placeholders: BTreeMap<String, String>,
    /// Maximum characters per Lead field; longer values are truncated. Entries override
    /// the defaults of the standard Lead fields; other defaults stay.
    #[serde(default = "default_max_lengths")]
    pub max_lengths: BTreeMap<String, usize>,
    /// `reject` or `allow_save` (re-send flagged records with allowSave=true).
    #[serde(default)]
    pub duplicates: DuplicatePolicy,
    /// Timeout of one HTTP request (token or API).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Allow `http://` URLs (local fakes and tests only; leads carry personal data).
    #[serde(default)]
    pub allow_http: bool,
    /// Retries of one request on timeouts, 5xx and 429.
    #[serde(default)]
    pub retry: RetrySettings,
    /// How long the sink pauses after `REQUEST_LIMIT_EXCEEDED` (the org's daily API
    /// limit, which comes without Retry-After): no call is made until it has passed.
    #[serde(default = "default_api_limit_pause", with = "humantime_serde")]
    pub api_limit_pause: Duration,
}

fn default_api_limit_pause() -> Duration {
    Duration::from_secs(30 * 60)
}

fn default_api_version() -> String {
    "v62.0".into()
}
fn default_external_id_field() -> String {
    "Leadsync_Key__c".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The default field mapping.
pub fn default_fields() -> BTreeMap<String, LeadField> {
    [
        ("FirstName", LeadField::FirstName),
        ("LastName", LeadField::LastName),
        ("Email", LeadField::Email),
        ("Phone", LeadField::Phone),
        ("Country", LeadField::Country),
        ("Company", LeadField::Company),
        ("Title", LeadField::Title),
        ("LeadSource", LeadField::Source),
        ("Description", LeadField::Summary),
        ("HasOptedOutOfEmail", LeadField::DoNotContact),
        ("DoNotCall", LeadField::DoNotContact),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The default placeholders of the fields Salesforce requires on a Lead.
pub fn default_placeholders() -> BTreeMap<String, String> {
    [
        ("LastName", "[not provided]"),
        ("Company", "[not provided]"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Lengths of the standard Lead fields (Lead object reference).
pub fn default_max_lengths() -> BTreeMap<String, usize> {
    [
        ("FirstName", 40),
        ("LastName", 80),
        ("Company", 255),
        ("Title", 128),
        ("Email", 80),
        ("Phone", 40),
        ("Country", 80),
        ("LeadSource", 40),
        ("Description", 32_000),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Salesforce API names: a letter, then letters, digits and underscores.
fn is_api_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 80
}

fn api_major(version: &str) -> Option<u32> {
    let (major, minor) = version.strip_prefix('v')?.split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    (all_digits(major) && all_digits(minor))
        .then(|| major.parse().ok())
        .flatten()
}

impl SalesforceSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, why: &str| Err((format!("sink.salesforce.{key}"), why.to_owned()));
        let login = check_url(
            "sink.salesforce.login_url",
            &self.login_url,
            self.allow_http,
        )?;
        if login.query().is_some() || !matches!(login.path(), "" | "/") {
            return bad(
                "login_url",
                "must be the bare org URL, e.g. https://acme.my.salesforce.com (no path or query)",
            );
        }
        if self.client_id.trim().is_empty() {
            return bad("client_id", "must not be empty (the app's consumer key)");
        }
        match self.auth {
            AuthFlow::ClientCredentials => {
                if self.client_secret.is_none() {
                    return bad(
                        "client_secret",
                        "is required with auth = \"client_credentials\"",
                    );
                }
                for (key, set) in [
                    ("username", self.username.is_some()),
                    ("private_key", self.private_key.is_some()),
                    ("audience", self.audience.is_some()),
                ] {
                    if set {
                        return bad(key, "is only used with auth = \"jwt_bearer\"");
                    }
                }
            }
            AuthFlow::JwtBearer => {
                if self.username.as_deref().is_none_or(|u| u.trim().is_empty()) {
                    return bad("username", "is required with auth = \"jwt_bearer\"");
                }
                if self.private_key.is_none() {
                    return bad("private_key", "is required with auth = \"jwt_bearer\"");
                }
                if self.client_secret.is_some() {
                    return bad(
                        "client_secret",
                        "is only used with auth = \"client_credentials\"",
                    );
                }
                if self
                    .audience
                    .as_deref()
                    .is_some_and(|a| a.trim().is_empty())
                {
                    return bad("audience", "must not be empty (or leave it out)");
                }
            }
        }
        match api_major(&self.api_version) {
            Some(major) if major >= MIN_API_MAJOR => {}
            Some(_) => {
                return bad(
                    "api_version",
                    "must be v52.0 or later (the duplicate rule header needs it)",
                )
            }
            None => return bad("api_version", "must look like \"v62.0\""),
        }
        if !is_api_name(&self.external_id_field) {
            return bad(
                "external_id_field",
                "must be a Salesforce field API name such as Leadsync_Key__c",
            );
        }
        if self.fields.is_empty() {
            return bad("fields", "must map at least one Lead field");
        }
        for name in self.fields.keys() {
            if !is_api_name(name) {
                return Err((
                    format!("sink.salesforce.fields.{name}"),
                    "is not a Salesforce field API name".into(),
                ));
            }
            if name.eq_ignore_ascii_case(&self.external_id_field) {
                return Err((
                    format!("sink.salesforce.fields.{name}"),
                    "is the external_id_field, which leadsync always fills with the customer's key"
                        .into(),
                ));
            }
            if name.eq_ignore_ascii_case("Id") {
                return Err((
                    format!("sink.salesforce.fields.{name}"),
                    "record ids cannot be set in an upsert by external id".into(),
                ));
            }
        }
        for name in self.ownership.keys() {
            if !is_api_name(name) {
                return Err((
                    format!("sink.salesforce.ownership.{name}"),
                    "is not a Salesforce field API name".into(),
                ));
            }
        }
        if self.api_limit_pause.is_zero() {
            return bad("api_limit_pause", "must be greater than zero");
        }
        for (name, value) in &self.placeholders {
            if !is_api_name(name) {
                return Err((
                    format!("sink.salesforce.placeholders.{name}"),
                    "is not a Salesforce field API name".into(),
                ));
            }
            if value.trim().is_empty() {
                return Err((
                    format!("sink.salesforce.placeholders.{name}"),
                    "must not be empty: Salesforce rejects a Lead with an empty required field"
                        .into(),
                ));
            }
        }
        for (name, max) in &self.max_lengths {
            if !is_api_name(name) {
                return Err((
                    format!("sink.salesforce.max_lengths.{name}"),
                    "is not a Salesforce field API name".into(),
                ));
            }
            if *max == 0 {
                return Err((
                    format!("sink.salesforce.max_lengths.{name}"),
                    "must be at least 1".into(),
                ));
            }
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero");
        }
        self.retry.validate("sink.salesforce.retry")?;
        Ok(())
    }
}

/// The JWT `aud` when none is configured: Salesforce accepts only its login hosts
/// (or an Experience Cloud site URL) there, never a My Domain.
pub fn default_audience(login_url: &reqwest::Url) -> String {
    let host = login_url
        .host_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if let Some(prefix) = host.strip_suffix(".my.salesforce.com") {
        let sandbox = prefix.ends_with(".sandbox")
            || prefix.ends_with(".scratch")
            || prefix.split('.').next().is_some_and(|l| l.contains("--"));
        return if sandbox {
            "https://test.salesforce.com".into()
        } else {
            "https://login.salesforce.com".into()
        };
    }
    login_url.as_str().trim_end_matches('/').to_owned()
}

enum Credentials {
    ClientSecret(SecretString),
    Jwt {
        username: String,
        audience: String,
        key: EncodingKey,
    },
}

#[derive(Clone)]
struct Session {
    token: SecretString,
    instance_url: String,
    serial: u64,
}

#[derive(Default)]
struct SessionSlot {
    current: Option<Session>,
    issued: u64,
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthError {
    /// Worth another try (timeout, 5xx).
    Transient(String),
    /// The token endpoint refused; a person has to fix the app or the config.
    Refused(String),
}

#[derive(Serialize)]
struct JwtClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
}

#[derive(Deserialize)]
struct TokenError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// One element of a request-level error body.
#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(rename = "errorCode", default)]
    error_code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    fields: Vec<String>,
}

/// One UpsertResult.
#[derive(Debug, Deserialize)]
struct UpsertResult {
    #[serde(default)]
    id: Option<String>,
    success: bool,
    #[serde(default)]
    created: Option<bool>,
    #[serde(default)]
    errors: Vec<RecordError>,
}

#[derive(Debug, Deserialize)]
struct RecordError {
    #[serde(rename = "statusCode", default)]
    status_code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    fields: Vec<String>,
}

fn describe_errors<'a>(errors: impl Iterator<Item = (&'a str, &'a str, &'a [String])>) -> String {
    errors
        .map(|(code, message, fields)| {
            let mut text = format!("{code}: {message}");
            if !fields.is_empty() {
                text.push_str(&format!(" (fields: {})", fields.join(", ")));
            }
            text
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn snippet(body: &str) -> String {
    let (cut, _) = truncate(body.trim(), 300);
    if cut.is_empty() {
        "empty body".into()
    } else {
        cut
    }
}

/// The `[{"errorCode", "message"}]` of a response as text, or the start of the body.
fn describe_body(body: &str) -> (Vec<ApiError>, String) {
    match serde_json::from_str::<Vec<ApiError>>(body) {
        Ok(errors) if !errors.is_empty() => {
            let text = describe_errors(errors.iter().map(|e| {
                (
                    e.error_code.as_str(),
                    e.message.as_str(),
                    e.fields.as_slice(),
                )
            }));
            (errors, text)
        }
        _ => (Vec::new(), snippet(body)),
    }
}

/// What one API response means.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// 401: the token expired or was revoked; authenticate again.
    SessionInvalid,
    /// `REQUEST_LIMIT_EXCEEDED`: the org's daily limit; the sink pauses, no retries.
    ApiLimit {
        reason: String,
    },
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    Fail {
        reason: String,
    },
}

fn classify(status: StatusCode, after: Option<Duration>, body: &str) -> Verdict {
    if status.is_success() {
        return Verdict::Ok;
    }
    if status == StatusCode::UNAUTHORIZED {
        return Verdict::SessionInvalid;
    }
    let (errors, text) = describe_body(body);
    let code = status.as_u16();
    if status == StatusCode::FORBIDDEN
        && errors
            .iter()
            .any(|e| e.error_code == REQUEST_LIMIT_EXCEEDED)
    {
        return Verdict::ApiLimit {
            reason: format!("Salesforce API limit reached (HTTP {code}): {text}"),
        };
    }
    if is_transient_status(status) {
        return Verdict::Retry {
            after,
            reason: format!("Salesforce answered HTTP {code}: {text}"),
        };
    }
    Verdict::Fail {
        reason: format!("Salesforce refused the request (HTTP {code}): {text}"),
    }
}

/// What a token endpoint answer means.
fn classify_token(
    status: StatusCode,
    body: &str,
    flow: AuthFlow,
) -> Result<TokenResponse, AuthError> {
    if status.is_success() {
        return serde_json::from_str::<TokenResponse>(body).map_err(|e| {
            AuthError::Transient(format!(
                "Salesforce token endpoint answered HTTP {} without a usable token ({e})",
                status.as_u16()
            ))
        });
    }
    let described = match serde_json::from_str::<TokenError>(body) {
        Ok(e) if e.error_description.is_empty() => e.error,
        Ok(e) => format!("{}: {}", e.error, e.error_description),
        Err(_) => snippet(body),
    };
    let text = format!(
        "Salesforce token endpoint refused {} authentication (HTTP {}): {described}",
        flow.as_str(),
        status.as_u16()
    );
    if is_transient_status(status) {
        Err(AuthError::Transient(text))
    } else {
        Err(AuthError::Refused(text))
    }
}

/// `(used, limit)` from `Sforce-Limit-Info: api-usage=18/15000; per-app-api-usage=...`.
fn api_usage(header: &str) -> Option<(u64, u64)> {
    header
        .split([';', ','])
        .map(str::trim)
        .find_map(|part| part.strip_prefix("api-usage="))
        .and_then(|usage| {
            let (used, limit) = usage.split_once('/')?;
            Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
        })
}

fn log_api_usage(headers: &HeaderMap) {
    let Some((used, limit)) = headers
        .get("sforce-limit-info")
        .and_then(|v| v.to_str().ok())
        .and_then(api_usage)
    else {
        return;
    };
    tracing::debug!(sink = SINK, used, limit, "Salesforce API usage.");
    if limit > 0 && used * 100 > limit * API_USAGE_WARN_PERCENT {
        tracing::warn!(
            sink = SINK,
            used,
            limit,
            percent = used * 100 / limit,
            "Salesforce API usage is above 80% of the org's daily limit."
        );
    }
}

/// What became of one record of a collection.
#[derive(Debug, PartialEq, Eq)]
enum RecordVerdict {
    Upserted {
        created: bool,
    },
    /// Only duplicate rules objected: allowSave may get it through.
    Duplicate(String),
    /// Only a row lock stood in the way.
    Locked(String),
    /// The Lead was converted (after the batch's query saw it open).
    Converted(String),
    Rejected(String),
}

fn record_verdict(result: &UpsertResult) -> RecordVerdict {
    if result.success {
        return RecordVerdict::Upserted {
            created: result.created.unwrap_or(false),
        };
    }
    if result.errors.is_empty() {
        return RecordVerdict::Rejected(
            "Salesforce did not save the Lead and gave no reason".into(),
        );
    }
    let text = describe_errors(result.errors.iter().map(|e| {
        (
            e.status_code.as_str(),
            e.message.as_str(),
            e.fields.as_slice(),
        )
    }));
    let all = |code: &str| result.errors.iter().all(|e| e.status_code == code);
    if all(DUPLICATES_DETECTED) {
        RecordVerdict::Duplicate(text)
    } else if all(UNABLE_TO_LOCK_ROW) {
        RecordVerdict::Locked(text)
    } else if result
        .errors
        .iter()
        .any(|e| e.status_code == CANNOT_UPDATE_CONVERTED_LEAD)
    {
        RecordVerdict::Converted(text)
    } else {
        RecordVerdict::Rejected(text)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Upserts merged customer leads into Salesforce Leads.
pub struct SalesforceSink {
    http: reqwest::Client,
    flow: AuthFlow,
    token_url: String,
    client_id: String,
    credentials: Credentials,
    api_version: String,
    external_id_field: String,
    fields: BTreeMap<String, LeadField>,
    /// Ownership overrides, keyed by lower-cased field name.
    ownership: BTreeMap<String, WriteMode>,
    /// The mapped fields whose mode is `if_empty`: the batch's query reads them.
    if_empty: Vec<String>,
    /// Keyed by lower-cased field name: Salesforce field names are case-insensitive.
    placeholders: BTreeMap<String, (String, String)>,
    max_lengths: BTreeMap<String, usize>,
    duplicates: DuplicatePolicy,
    allow_http: bool,
    retry: RetrySettings,
    api_limit_pause: Duration,
    /// Until when `REQUEST_LIMIT_EXCEEDED` pauses the sink.
    limited_until: std::sync::Mutex<Option<Instant>>,
    session: Mutex<SessionSlot>,
}

/// What the batch's query found for one external id.
#[derive(Debug, Clone, Default)]
struct Existing {
    id: String,
    converted: bool,
    contact: Option<String>,
    account: Option<String>,
    opportunity: Option<String>,
    owner: Option<String>,
    /// The `if_empty` fields' current values.
    values: Map<String, Value>,
}

impl Existing {
    fn from_record(record: &Map<String, Value>) -> Self {
        let text = |f: &str| {
            record
                .get(f)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Self {
            id: text("Id").unwrap_or_default(),
            converted: record.get("IsConverted") == Some(&Value::Bool(true)),
            contact: text("ConvertedContactId"),
            account: text("ConvertedAccountId"),
            opportunity: text("ConvertedOpportunityId"),
            owner: text("OwnerId"),
            values: record.clone(),
        }
    }

    fn value(&self, field: &str) -> Option<&Value> {
        self.values
            .iter()
            .find(|(f, _)| f.eq_ignore_ascii_case(field))
            .map(|(_, v)| v)
    }
}

/// A string literal in SOQL: backslash and quote escaped.
fn soql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl fmt::Debug for SalesforceSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SalesforceSink")
            .field("auth", &self.flow)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("credentials", &REDACTED)
            .field("api_version", &self.api_version)
            .field("external_id_field", &self.external_id_field)
            .field("duplicates", &self.duplicates)
            .finish_non_exhaustive()
    }
}

fn sink_error(message: impl Into<String>) -> SinkError {
    SinkError {
        sink: SINK.into(),
        message: message.into(),
    }
}

impl SalesforceSink {
    /// Reads the secrets and builds the client; no network I/O.
    pub fn new(settings: &SalesforceSettings) -> Result<Self, SinkError> {
        settings
            .validate()
            .map_err(|(key, why)| sink_error(format!("config key `{key}`: {why}")))?;
        let login = check_url(
            "sink.salesforce.login_url",
            &settings.login_url,
            settings.allow_http,
        )
        .map_err(|(key, why)| sink_error(format!("config key `{key}`: {why}")))?;
        let credentials = match settings.auth {
            AuthFlow::ClientCredentials => {
                let source = settings.client_secret.as_ref().ok_or_else(|| {
                    sink_error("config key `sink.salesforce.client_secret` is missing")
                })?;
                Credentials::ClientSecret(
                    source
                        .resolve("sink.salesforce.client_secret")
                        .map_err(|e| sink_error(e.to_string()))?,
                )
            }
            AuthFlow::JwtBearer => {
                let source = settings.private_key.as_ref().ok_or_else(|| {
                    sink_error("config key `sink.salesforce.private_key` is missing")
                })?;
                let pem = source
                    .resolve("sink.salesforce.private_key")
                    .map_err(|e| sink_error(e.to_string()))?;
                let key = EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes()).map_err(|_| {
                    sink_error(
                        "config key `sink.salesforce.private_key`: not an RSA private key in PEM form (PKCS#8 or PKCS#1)",
                    )
                })?;
                Credentials::Jwt {
                    username: settings
                        .username
                        .clone()
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                    audience: settings
                        .audience
                        .clone()
                        .unwrap_or_else(|| default_audience(&login)),
                    key,
                }
            }
        };
        let mut placeholders = BTreeMap::new();
        for (field, value) in default_placeholders()
            .into_iter()
            .chain(settings.placeholders.clone())
        {
            placeholders.insert(field.to_ascii_lowercase(), (field, value));
        }
        let ownership: BTreeMap<String, WriteMode> = settings
            .ownership
            .iter()
            .map(|(f, m)| (f.to_ascii_lowercase(), *m))
            .collect();
        let if_empty: Vec<String> = settings
            .fields
            .iter()
            .filter(|(f, a)| {
                !a.is_opt_out()
                    && ownership
                        .get(&f.to_ascii_lowercase())
                        .copied()
                        .unwrap_or_else(|| a.default_write_mode())
                        == WriteMode::IfEmpty
            })
            .map(|(f, _)| f.clone())
            .collect();
        let mut max_lengths = BTreeMap::new();
        for (field, max) in default_max_lengths()
            .into_iter()
            .chain(settings.max_lengths.clone())
        {
            max_lengths.insert(field.to_ascii_lowercase(), max);
        }
        Ok(Self {
            http: client(settings.request_timeout).map_err(sink_error)?,
            flow: settings.auth,
            token_url: format!(
                "{}/services/oauth2/token",
                login.as_str().trim_end_matches('/')
            ),
            client_id: settings.client_id.trim().to_owned(),
            credentials,
            api_version: settings.api_version.clone(),
            external_id_field: settings.external_id_field.clone(),
            fields: settings.fields.clone(),
            ownership,
            if_empty,
            placeholders,
            max_lengths,
            duplicates: settings.duplicates,
            allow_http: settings.allow_http,
            retry: settings.retry.clone(),
            api_limit_pause: settings.api_limit_pause,
            limited_until: std::sync::Mutex::new(None),
            session: Mutex::new(SessionSlot::default()),
        })
    }

    /// The record sent for `lead`: a new Lead gets every mapped field and the
    /// placeholders of required fields it lacks; an existing one only its `always`
    /// fields and the `if_empty` ones still empty in Salesforce. Opt-outs are sent only
    /// as `true`; lengths are respected; the external id is always there.
    fn record(&self, lead: &CustomerLead, existing: Option<&Existing>) -> Value {
        let key = &lead.external_key;
        let mut owned = owned_fields(lead, &self.fields, &self.ownership);
        owned
            .fields
            .retain(|_, (v, _)| !matches!(v, Value::String(s) if s.trim().is_empty()));
        for (field, placeholder) in self.placeholders.values() {
            if !owned.fields.keys().any(|f| f.eq_ignore_ascii_case(field)) {
                if existing.is_none() {
                    tracing::info!(customer = %lead.log_key(), field = %field, placeholder = %placeholder, "Lead has no value for a field Salesforce requires; sending the placeholder on create.");
                }
                owned.fields.insert(
                    field.clone(),
                    (Value::String(placeholder.clone()), WriteMode::OnCreate),
                );
            }
        }
        let placeholders: Vec<&str> = self
            .placeholders
            .values()
            .map(|(_, p)| p.as_str())
            .collect();
        let mut fields = match existing {
            None => owned.for_create(),
            Some(e) => owned.for_update(|f| crm_value_is_empty(e.value(f), &placeholders)),
        };
        for (field, value) in fields.iter_mut() {
            let Value::String(text) = value else { continue };
            let Some(&max) = self.max_lengths.get(&field.to_ascii_lowercase()) else {
                continue;
            };
            let (cut, was_cut) = truncate(text, max);
            if was_cut {
                tracing::info!(customer = %lead.log_key(), field = %field, max_chars = max, chars = text.chars().count(), "Value longer than the Salesforce field; truncated.");
                *text = cut;
            }
        }
        let mut record = Map::new();
        record.insert("attributes".into(), json!({ "type": "Lead" }));
        record.insert(self.external_id_field.clone(), Value::String(key.clone()));
        record.extend(fields);
        Value::Object(record)
    }

    /// Replaces known secrets in text that came from the network.
    fn scrub(&self, text: String, session: Option<&Session>) -> String {
        let mut text = text;
        if let Credentials::ClientSecret(secret) = &self.credentials {
            let secret = secret.expose_secret();
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, REDACTED);
            }
        }
        if let Some(session) = session {
            let token = session.token.expose_secret();
            if !token.is_empty() && text.contains(token) {
                text = text.replace(token, REDACTED);
            }
        }
        text
    }

    fn token_form(&self) -> Result<Vec<(&'static str, String)>, AuthError> {
        Ok(match &self.credentials {
            Credentials::ClientSecret(secret) => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", self.client_id.clone()),
                ("client_secret", secret.expose_secret().to_owned()),
            ],
            Credentials::Jwt {
                username,
                audience,
                key,
            } => {
                let claims = JwtClaims {
                    iss: &self.client_id,
                    sub: username,
                    aud: audience,
                    exp: unix_now() + ASSERTION_LIFETIME.as_secs(),
                };
                let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
                    .map_err(|e| {
                        AuthError::Refused(format!("cannot sign the JWT assertion: {e}"))
                    })?;
                vec![("grant_type", JWT_GRANT.into()), ("assertion", assertion)]
            }
        })
    }

    async fn fetch_token(&self) -> Result<TokenResponse, AuthError> {
        let form = self.token_form()?;
        let response = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                AuthError::Transient(format!(
                    "token request to {} failed: {}",
                    self.token_url,
                    transport_reason(&e)
                ))
            })?;
        let status = response.status();
        let body = response.text().await.map_err(|e| {
            AuthError::Transient(format!(
                "token response unreadable: {}",
                transport_reason(&e)
            ))
        })?;
        let token = classify_token(status, &body, self.flow).map_err(|e| match e {
            AuthError::Transient(r) => AuthError::Transient(self.scrub(r, None)),
            AuthError::Refused(r) => AuthError::Refused(self.scrub(r, None)),
        })?;
        check_url("instance_url", &token.instance_url, self.allow_http).map_err(|(_, why)| {
            AuthError::Refused(format!(
                "Salesforce token response has an unusable instance_url: {why}"
            ))
        })?;
        Ok(token)
    }

    /// The cached session, or a new one. One token request at a time.
    async fn session(&self) -> Result<Session, AuthError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = &slot.current {
            return Ok(session.clone());
        }
        let token = self.fetch_token().await?;
        slot.issued += 1;
        let session = Session {
            token: SecretString::from(token.access_token),
            instance_url: token.instance_url.trim_end_matches('/').to_owned(),
            serial: slot.issued,
        };
        tracing::info!(sink = SINK, auth = self.flow.as_str(), instance_url = %session.instance_url, "Authenticated to Salesforce.");
        slot.current = Some(session.clone());
        Ok(session)
    }

    /// Forgets `session` unless a newer one already replaced it.
    async fn invalidate(&self, session: &Session) {
        let mut slot = self.session.lock().await;
        if slot
            .current
            .as_ref()
            .is_some_and(|s| s.serial == session.serial)
        {
            slot.current = None;
        }
    }

    async fn send_once(
        &self,
        session: &Session,
        method: &Method,
        path: &str,
        body: Option<&Value>,
        allow_save: bool,
    ) -> Result<(StatusCode, HeaderMap, String), String> {
        let url = format!("{}{path}", session.instance_url);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(session.token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        if allow_save {
            request = request.header("Sforce-Duplicate-Rule-Header", "allowSave=true");
        }
        let response = request.send().await.map_err(|e| transport_reason(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|e| transport_reason(&e))?;
        log_api_usage(&headers);
        Ok((status, headers, text))
    }

    /// The rest of a `REQUEST_LIMIT_EXCEEDED` pause, if one is running.
    fn api_limit_remaining(&self) -> Option<Duration> {
        let until = (*self.limited_until.lock().expect("not poisoned"))?;
        until.checked_duration_since(Instant::now())
    }

    /// Starts a pause for `REQUEST_LIMIT_EXCEEDED`: counted and logged once per pause.
    fn pause_for_api_limit(&self, reason: &str) -> Duration {
        let mut until = self.limited_until.lock().expect("not poisoned");
        let now = Instant::now();
        if let Some(running) = until.filter(|u| *u > now) {
            return running - now;
        }
        *until = Some(now + self.api_limit_pause);
        API_LIMIT_PAUSES.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            sink = SINK,
            pause_s = self.api_limit_pause.as_secs(),
            %reason,
            "Salesforce org is out of API calls (REQUEST_LIMIT_EXCEEDED); the sink pauses for sink.salesforce.api_limit_pause, the leads wait."
        );
        self.api_limit_pause
    }

    /// One API call with the retry loop; a 401 re-authenticates once per attempt.
    /// `REQUEST_LIMIT_EXCEEDED` is not retried: it pauses the sink (`GaveUp` with the
    /// pause), and no call is made while the pause runs.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        allow_save: bool,
    ) -> Finished<String> {
        if let Some(left) = self.api_limit_remaining() {
            return Finished::GaveUp {
                after: Some(left),
                reason: "Salesforce org is out of API calls (REQUEST_LIMIT_EXCEEDED); the sink is paused".into(),
            };
        }
        let finished = self.call_retrying(method, path, body, allow_save).await;
        match finished {
            Finished::Done(Ok(text)) => Finished::Done(text),
            Finished::Done(Err(reason)) => Finished::GaveUp {
                after: Some(self.pause_for_api_limit(&reason)),
                reason,
            },
            Finished::GaveUp { after, reason } => Finished::GaveUp { after, reason },
            Finished::Failed { reason } => Finished::Failed { reason },
        }
    }

    /// `Done(Err(reason))` is `REQUEST_LIMIT_EXCEEDED`, which ends the loop at once.
    async fn call_retrying(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        allow_save: bool,
    ) -> Finished<Result<String, String>> {
        retrying(&self.retry, SINK, |_attempt| {
            let method = method.clone();
            async move {
                let mut reauthenticated = false;
                loop {
                    let session = match self.session().await {
                        Ok(s) => s,
                        Err(AuthError::Transient(reason)) => {
                            return Step::Retry {
                                after: None,
                                reason,
                            }
                        }
                        Err(AuthError::Refused(reason)) => {
                            // A config problem, not a lead problem: the leads wait in state
                            // (no dead letters) until the credentials are corrected.
                            tracing::error!(sink = SINK, %reason, "Salesforce refused the credentials; the leads wait until they are corrected.");
                            // An endpoint failure: the pipeline pauses the sink and says
                            // why in /readyz and the metrics until the login works.
                            return Step::Fail { reason };
                        }
                    };
                    let (status, headers, text) =
                        match self.send_once(&session, &method, path, body, allow_save).await {
                            Ok(parts) => parts,
                            Err(reason) => {
                                return Step::Retry {
                                    after: None,
                                    reason: self.scrub(reason, Some(&session)),
                                }
                            }
                        };
                    match classify(status, retry_after(&headers), &text) {
                        Verdict::Ok => return Step::Done(Ok(text)),
                        Verdict::ApiLimit { reason } => {
                            return Step::Done(Err(self.scrub(reason, Some(&session))))
                        }
                        Verdict::SessionInvalid if !reauthenticated => {
                            tracing::info!(sink = SINK, "Salesforce session expired or was revoked; authenticating again.");
                            self.invalidate(&session).await;
                            reauthenticated = true;
                        }
                        Verdict::SessionInvalid => {
                            let (_, described) = describe_body(&text);
                            return Step::Fail {
                                reason: self.scrub(
                                    format!("Salesforce refused a fresh access token (HTTP 401): {described}"),
                                    Some(&session),
                                ),
                            };
                        }
                        Verdict::Retry { after, reason } => {
                            return Step::Retry {
                                after,
                                reason: self.scrub(reason, Some(&session)),
                            }
                        }
                        Verdict::Fail { reason } => {
                            return Step::Fail {
                                reason: self.scrub(reason, Some(&session)),
                            }
                        }
                    }
                }
            }
        })
        .await
    }

    fn upsert_path(&self) -> String {
        format!(
            "/services/data/{}/composite/sobjects/Lead/{}",
            self.api_version, self.external_id_field
        )
    }

    /// Upserts up to 200 records; one result per record, or why there are none.
    async fn upsert(&self, records: &[Value], allow_save: bool) -> Finished<Vec<UpsertResult>> {
        let body = json!({ "allOrNone": false, "records": records });
        let path = self.upsert_path();
        match self
            .call(Method::PATCH, &path, Some(&body), allow_save)
            .await
        {
            Finished::Done(text) => match serde_json::from_str::<Vec<UpsertResult>>(&text) {
                Ok(results) if results.len() == records.len() => Finished::Done(results),
                Ok(results) => Finished::Failed {
                    reason: format!(
                        "Salesforce returned {} results for {} records",
                        results.len(),
                        records.len()
                    ),
                },
                // The upsert is idempotent, so an unreadable answer is safe to repeat later.
                Err(e) => Finished::GaveUp {
                    after: None,
                    reason: format!(
                        "Salesforce upsert answer is not a list of results ({e}): {}",
                        snippet(&text)
                    ),
                },
            },
            Finished::GaveUp { after, reason } => Finished::GaveUp { after, reason },
            Finished::Failed { reason } => Finished::Failed { reason },
        }
    }

    /// Runs a SOQL query and follows `nextRecordsUrl`; the records, or why there are none.
    async fn query(&self, soql: &str) -> Finished<Vec<Map<String, Value>>> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            records: Vec<Map<String, Value>>,
            #[serde(default = "page_done")]
            done: bool,
            #[serde(rename = "nextRecordsUrl", default)]
            next: Option<String>,
        }
        fn page_done() -> bool {
            true
        }
        let mut path = format!(
            "/services/data/{}/query?q={}",
            self.api_version,
            urlencoding::encode(soql)
        );
        let mut records = Vec::new();
        loop {
            let text = match self.call(Method::GET, &path, None, false).await {
                Finished::Done(text) => text,
                Finished::GaveUp { after, reason } => return Finished::GaveUp { after, reason },
                Finished::Failed { reason } => return Finished::Failed { reason },
            };
            match serde_json::from_str::<Page>(&text) {
                Ok(page) => {
                    records.extend(page.records);
                    match page.next {
                        Some(next) if !page.done && next.starts_with("/services/data/") => {
                            path = next
                        }
                        _ => return Finished::Done(records),
                    }
                }
                Err(e) => {
                    return Finished::GaveUp {
                        after: None,
                        reason: format!(
                            "Salesforce query answer is not a record list ({e}): {}",
                            snippet(&text)
                        ),
                    }
                }
            }
        }
    }

    /// `SELECT {select} FROM {object} WHERE {field} IN (...)` for every value, in as
    /// few queries as the URL length allows (one for a collection of 200 keys).
    async fn query_in(
        &self,
        select: &str,
        object: &str,
        field: &str,
        values: &[String],
    ) -> Finished<Vec<Map<String, Value>>> {
        let head = format!("SELECT {select} FROM {object} WHERE {field} IN (");
        let budget = MAX_QUERY_URL_BYTES.saturating_sub(urlencoding::encode(&head).len() + 200);
        let mut lists: Vec<Vec<String>> = Vec::new();
        let mut used = 0;
        for value in values {
            let literal = soql_literal(value);
            let cost = urlencoding::encode(&literal).len() + 3;
            if lists.is_empty() || used + cost > budget {
                lists.push(Vec::new());
                used = 0;
            }
            used += cost;
            lists.last_mut().expect("just pushed").push(literal);
        }
        let mut records = Vec::new();
        for list in lists {
            match self.query(&format!("{head}{})", list.join(","))).await {
                Finished::Done(found) => records.extend(found),
                other => return other,
            }
        }
        Finished::Done(records)
    }

    /// The Leads of `keys` that exist: converted or not, and their `if_empty` fields.
    async fn existing(&self, keys: &[String]) -> Result<HashMap<String, Existing>, Outcome> {
        let mut select: Vec<&str> = vec![
            "Id",
            self.external_id_field.as_str(),
            "IsConverted",
            "ConvertedContactId",
            "ConvertedAccountId",
            "ConvertedOpportunityId",
            "OwnerId",
        ];
        for field in &self.if_empty {
            if !select.iter().any(|f| f.eq_ignore_ascii_case(field)) {
                select.push(field);
            }
        }
        match self
            .query_in(&select.join(", "), "Lead", &self.external_id_field, keys)
            .await
        {
            Finished::Done(records) => Ok(records
                .iter()
                .filter_map(|r| {
                    let key = r
                        .iter()
                        .find(|(f, _)| f.eq_ignore_ascii_case(&self.external_id_field))
                        .and_then(|(_, v)| v.as_str())?;
                    Some((key.to_owned(), Existing::from_record(r)))
                })
                .collect()),
            Finished::GaveUp { after, reason } => Err(Outcome::RetryLater { after, reason }),
            Finished::Failed { reason } => Err(Outcome::EndpointFailed {
                reason: format!("Salesforce refused the query of the batch's Leads by sink.salesforce.external_id_field = {}: {reason}", self.external_id_field),
            }),
        }
    }

    /// Delivers one collection (at most 200 leads): one query, one upsert of the new
    /// and open Leads, and follow-up Tasks for the converted ones.
    async fn deliver_collection(&self, leads: &[CustomerLead]) -> Vec<Outcome> {
        let keys: Vec<String> = leads.iter().map(|l| l.external_key.clone()).collect();
        let existing = match self.existing(&keys).await {
            Ok(found) => found,
            Err(outcome) => return vec![outcome; leads.len()],
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; leads.len()];
        let (converted, open): (Vec<usize>, Vec<usize>) = (0..leads.len()).partition(|&i| {
            existing
                .get(&leads[i].external_key)
                .is_some_and(|e| e.converted)
        });
        let mut created = 0;
        if !open.is_empty() {
            created = self
                .upsert_open(leads, &open, &existing, &mut outcomes)
                .await;
        }
        if !converted.is_empty() {
            self.follow_up(leads, &converted, &existing, &mut outcomes)
                .await;
        }
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::RetryLater {
                    after: None,
                    reason: "Salesforce answered nothing for this lead".into(),
                })
            })
            .collect();
        let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
        let delivered = count(|o| matches!(o, Outcome::Delivered));
        let rejected = count(|o| matches!(o, Outcome::Rejected { .. }));
        let followed_up = count(|o| matches!(o, Outcome::FollowedUp { .. }));
        tracing::info!(
            sink = SINK,
            records = leads.len(),
            delivered,
            created,
            followed_up,
            rejected,
            pending = leads.len() - delivered - rejected - followed_up,
            "Salesforce upsert finished."
        );
        outcomes
    }

    /// Upserts the leads at `indexes` (new or open Leads); returns how many were created.
    async fn upsert_open(
        &self,
        leads: &[CustomerLead],
        indexes: &[usize],
        existing: &HashMap<String, Existing>,
        outcomes: &mut [Option<Outcome>],
    ) -> usize {
        let records: Vec<Value> = indexes
            .iter()
            .map(|&i| self.record(&leads[i], existing.get(&leads[i].external_key)))
            .collect();
        let results = match self.upsert(&records, false).await {
            Finished::Done(results) => results,
            Finished::GaveUp { after, reason } => {
                for &i in indexes {
                    outcomes[i] = Some(Outcome::RetryLater {
                        after,
                        reason: reason.clone(),
                    });
                }
                return 0;
            }
            Finished::Failed { reason } => {
                for &i in indexes {
                    outcomes[i] = Some(Outcome::EndpointFailed {
                        reason: reason.clone(),
                    });
                }
                return 0;
            }
        };
        let mut duplicates = Vec::new();
        for (n, (&i, result)) in indexes.iter().zip(&results).enumerate() {
            let lead = &leads[i];
            let outcome = match record_verdict(result) {
                RecordVerdict::Upserted { created } => {
                    tracing::debug!(customer = %lead.external_key, id = result.id.as_deref().unwrap_or(""), created, "Lead upserted into Salesforce.");
                    Outcome::Delivered
                }
                RecordVerdict::Duplicate(text) if self.duplicates == DuplicatePolicy::AllowSave => {
                    tracing::info!(customer = %lead.log_key(), errors = %text, "Salesforce duplicate rule flagged the Lead; sending it again with allowSave=true.");
                    duplicates.push(n);
                    Outcome::Rejected { reason: text }
                }
                RecordVerdict::Duplicate(text) => Outcome::Rejected {
                    reason: format!(
                        "Salesforce duplicate rule refused the Lead (sink.salesforce.duplicates = \"reject\"): {text}"
                    ),
                },
                RecordVerdict::Locked(text) => Outcome::RetryLater {
                    after: None,
                    reason: format!("Salesforce record was locked: {text}"),
                },
                RecordVerdict::Converted(text) => Outcome::RetryLater {
                    after: None,
                    reason: format!("the Lead was converted while leadsync sent it; its follow-up Task comes next time: {text}"),
                },
                RecordVerdict::Rejected(text) => Outcome::Rejected {
                    reason: format!("Salesforce refused the Lead: {text}"),
                },
            };
            outcomes[i] = Some(outcome);
        }
        if !duplicates.is_empty() {
            let again: Vec<Value> = duplicates.iter().map(|&n| records[n].clone()).collect();
            match self.upsert(&again, true).await {
                Finished::Done(results) => {
                    for (&n, result) in duplicates.iter().zip(&results) {
                        outcomes[indexes[n]] = Some(match record_verdict(result) {
                            RecordVerdict::Upserted { .. } => Outcome::Delivered,
                            RecordVerdict::Locked(text) | RecordVerdict::Converted(text) => {
                                Outcome::RetryLater {
                                    after: None,
                                    reason: format!("Salesforce could not update the Lead now: {text}"),
                                }
                            }
                            RecordVerdict::Duplicate(text) => Outcome::Rejected {
                                reason: format!(
                                    "Salesforce duplicate rule blocks the Lead even with allowSave=true: {text}"
                                ),
                            },
                            RecordVerdict::Rejected(text) => Outcome::Rejected {
                                reason: format!("Salesforce refused the Lead: {text}"),
                            },
                        });
                    }
                }
                Finished::GaveUp { after, reason } => {
                    for &n in &duplicates {
                        outcomes[indexes[n]] = Some(Outcome::RetryLater {
                            after,
                            reason: reason.clone(),
                        });
                    }
                }
                Finished::Failed { reason } => {
                    for &n in &duplicates {
                        outcomes[indexes[n]] = Some(Outcome::EndpointFailed {
                            reason: reason.clone(),
                        });
                    }
                }
            }
        }
        results
            .iter()
            .filter(|r| r.success && r.created == Some(true))
            .count()
    }

    /// The follow-up Task for a converted Lead's new event: on the converted Contact
    /// (who) and Opportunity, else Account (what), assigned to the Lead's owner.
    fn follow_up_task(&self, lead: &CustomerLead, e: &Existing) -> Value {
        let subject = super::mapping::follow_up_subject(lead, 255);
        let who = super::mapping::who(lead);
        let offers = lead
            .offers
            .iter()
            .map(|o| o.offer.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let next = if lead.do_not_contact {
            "Next step: the customer asked not to be contacted. Do not call or email them; set the opt-outs on the Contact."
        } else {
            "Next step: contact the customer about this request within one business day, on the Opportunity if there is one."
        };
        let description = format!(
            "{who} came back through the marketplace: {subject}; stage {stage}; offers: {offers}.\n\
             Their Lead {lead_id} was converted, so leadsync did not change it.\n{next}\n\n{summary}",
            stage = lead.stage.as_str(),
            offers = if offers.is_empty() { "none" } else { &offers },
            lead_id = e.id,
            summary = lead.summary,
        );
        let (description, _) = truncate(&description, 32_000);
        let mut task = Map::new();
        task.insert("attributes".into(), json!({ "type": "Task" }));
        task.insert("Subject".into(), Value::String(subject));
        task.insert("Description".into(), Value::String(description));
        task.insert("Status".into(), json!("Not Started"));
        task.insert("Priority".into(), json!("Normal"));
        task.insert(
            "ActivityDate".into(),
            Value::String(
                time::OffsetDateTime::now_utc()
                    .date()
                    .format(time::macros::format_description!("[year]-[month]-[day]"))
                    .unwrap_or_default(),
            ),
        );
        if let Some(contact) = &e.contact {
            task.insert("WhoId".into(), Value::String(contact.clone()));
        }
        if let Some(what) = e.opportunity.as_ref().or(e.account.as_ref()) {
            task.insert("WhatId".into(), Value::String(what.clone()));
        }
        // A Task's owner must be a user (005...), not a queue.
        if let Some(owner) = e.owner.as_ref().filter(|o| o.starts_with("005")) {
            task.insert("OwnerId".into(), Value::String(owner.clone()));
        }
        Value::Object(task)
    }

    /// Creates a follow-up Task for each converted Lead at `indexes`, once per event:
    /// a Task with the same subject on the same records (a replay) is not made again.
    async fn follow_up(
        &self,
        leads: &[CustomerLead],
        indexes: &[usize],
        existing: &HashMap<String, Existing>,
        outcomes: &mut [Option<Outcome>],
    ) {
        let text = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_owned();
        let tasks: Vec<(usize, &Existing, Value)> = indexes
            .iter()
            .map(|&i| {
                let e = &existing[&leads[i].external_key];
                (i, e, self.follow_up_task(&leads[i], e))
            })
            .collect();
        let identity = |v: &Value| (text(v, "Subject"), text(v, "WhoId"), text(v, "WhatId"));
        let subjects: Vec<String> = tasks
            .iter()
            .map(|(_, _, t)| text(t, "Subject"))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let fail = |outcomes: &mut [Option<Outcome>], outcome: Outcome| {
            for &i in indexes {
                outcomes[i] = Some(outcome.clone());
            }
        };
        let already: HashMap<(String, String, String), String> = match self
            .query_in("Id, Subject, WhoId, WhatId", "Task", "Subject", &subjects)
            .await
        {
            Finished::Done(records) => records
                .into_iter()
                .map(|r| {
                    let r = Value::Object(r);
                    (identity(&r), text(&r, "Id"))
                })
                .collect(),
            Finished::GaveUp { after, reason } => {
                return fail(outcomes, Outcome::RetryLater { after, reason })
            }
            Finished::Failed { reason } => {
                return fail(
                    outcomes,
                    Outcome::EndpointFailed {
                        reason: format!(
                            "Salesforce refused the query of follow-up Tasks: {reason}"
                        ),
                    },
                )
            }
        };
        let note = |task_id: &str, e: &Existing, task: &Value| {
            let mut on = Vec::new();
            if let Some(c) = &e.contact {
                on.push(format!("Contact {c}"));
            }
            if let Some(o) = &e.opportunity {
                on.push(format!("Opportunity {o}"));
            } else if let Some(a) = &e.account {
                on.push(format!("Account {a}"));
            }
            let owner = text(task, "OwnerId");
            format!(
                "Task {task_id} on {} for converted Lead {}{}",
                if on.is_empty() {
                    "no record".to_owned()
                } else {
                    on.join(" and ")
                },
                e.id,
                if owner.is_empty() {
                    String::new()
                } else {
                    format!(", assigned to {owner}")
                }
            )
        };
        let mut to_create = Vec::new();
        for (i, e, task) in &tasks {
            match already.get(&identity(task)) {
                Some(id) => {
                    outcomes[*i] = Some(Outcome::FollowedUp {
                        note: note(id, e, task),
                    })
                }
                None => to_create.push((*i, *e, task.clone())),
            }
        }
        if to_create.is_empty() {
            return;
        }
        let body = json!({
            "allOrNone": false,
            "records": to_create.iter().map(|(_, _, t)| t.clone()).collect::<Vec<_>>(),
        });
        let path = format!("/services/data/{}/composite/sobjects", self.api_version);
        let results = match self.call(Method::POST, &path, Some(&body), false).await {
            Finished::Done(text) => match serde_json::from_str::<Vec<UpsertResult>>(&text) {
                Ok(results) if results.len() == to_create.len() => results,
                Ok(results) => {
                    let reason = format!(
                        "Salesforce returned {} results for {} Tasks",
                        results.len(),
                        to_create.len()
                    );
                    for (i, _, _) in &to_create {
                        outcomes[*i] = Some(Outcome::EndpointFailed {
                            reason: reason.clone(),
                        });
                    }
                    return;
                }
                Err(e) => {
                    let reason = format!(
                        "Salesforce Task answer is not a list of results ({e}): {}",
                        snippet(&text)
                    );
                    for (i, _, _) in &to_create {
                        outcomes[*i] = Some(Outcome::RetryLater {
                            after: None,
                            reason: reason.clone(),
                        });
                    }
                    return;
                }
            },
            Finished::GaveUp { after, reason } => {
                for (i, _, _) in &to_create {
                    outcomes[*i] = Some(Outcome::RetryLater {
                        after,
                        reason: reason.clone(),
                    });
                }
                return;
            }
            Finished::Failed { reason } => {
                for (i, _, _) in &to_create {
                    outcomes[*i] = Some(Outcome::EndpointFailed {
                        reason: reason.clone(),
                    });
                }
                return;
            }
        };
        for ((i, e, task), result) in to_create.iter().zip(&results) {
            let customer = leads[*i].log_key();
            outcomes[*i] = Some(if result.success {
                let id = result.id.clone().unwrap_or_default();
                tracing::info!(customer = %customer, task = %id, lead = %e.id, "The Lead was converted; created a follow-up Task instead of updating it.");
                Outcome::FollowedUp {
                    note: note(&id, e, task),
                }
            } else {
                // Never a dead letter: the event waits, and the reason says what to fix
                // (a Task validation rule, an inactive owner).
                let errors = describe_errors(result.errors.iter().map(|e| {
                    (
                        e.status_code.as_str(),
                        e.message.as_str(),
                        e.fields.as_slice(),
                    )
                }));
                Outcome::RetryLater {
                    after: None,
                    reason: format!(
                        "the Lead is converted and Salesforce refused its follow-up Task: {errors}"
                    ),
                }
            });
        }
    }
}

fn transport_reason(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    format!("{what} ({e})")
}

#[async_trait::async_trait]
impl LeadSink for SalesforceSink {
    fn name(&self) -> &str {
        SINK
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for collection in batch.chunks(MAX_RECORDS_PER_REQUEST) {
            outcomes.extend(self.deliver_collection(collection).await);
        }
        outcomes
    }

    /// Authenticates and reads the Lead description: the external id field must exist
    /// and be an External ID, and every mapped field must exist. Writes nothing.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        let path = format!("/services/data/{}/sobjects/Lead/describe", self.api_version);
        let text = match self.call(Method::GET, &path, None, false).await {
            Finished::Done(text) => text,
            Finished::GaveUp { reason, .. } => {
                return Err(sink_error(format!(
                    "Salesforce is not reachable now: {reason}"
                )))
            }
            Finished::Failed { reason } => return Err(sink_error(reason)),
        };
        #[derive(Deserialize)]
        struct Describe {
            fields: Vec<DescribedField>,
        }
        #[derive(Deserialize)]
        struct DescribedField {
            name: String,
            #[serde(rename = "externalId", default)]
            external_id: bool,
        }
        let describe: Describe = serde_json::from_str(&text)
            .map_err(|e| sink_error(format!("Lead describe answer unreadable: {e}")))?;
        let find = |name: &str| {
            describe
                .fields
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
        };
        match find(&self.external_id_field) {
            None => {
                return Err(sink_error(format!(
                    "the Lead object has no field {} visible to the integration user (sink.salesforce.external_id_field); create it as a unique External ID text field",
                    self.external_id_field
                )))
            }
            Some(f) if !f.external_id => {
                return Err(sink_error(format!(
                    "Lead.{} is not marked External ID (sink.salesforce.external_id_field)",
                    f.name
                )))
            }
            Some(_) => {}
        }
        let missing: Vec<&str> = self
            .fields
            .keys()
            .chain(self.placeholders.values().map(|(f, _)| f))
            .filter(|f| find(f).is_none())
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(sink_error(format!(
                "the Lead object has no field(s) {} visible to the integration user (sink.salesforce.fields / placeholders)",
                missing.join(", ")
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: Value) -> SalesforceSettings {
        let mut base = json!({
            "login_url": "https://acme.my.salesforce.com",
            "client_id": "3MVG9consumerkey",
            "client_secret": { "value": "s3cret-value" },
        });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).expect("settings parse")
    }

    fn key_of(result: Result<(), (String, String)>) -> String {
        result.expect_err("should be invalid").0
    }

    #[test]
    fn the_minimal_client_credentials_settings_are_valid_with_the_documented_defaults() {
        let s = settings(json!({}));

        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.auth, AuthFlow::ClientCredentials);
        assert_eq!(s.api_version, "v62.0");
        assert_eq!(s.external_id_field, "Leadsync_Key__c");
        assert_eq!(s.fields, default_fields());
        assert_eq!(s.fields["Description"], LeadField::Summary);
        assert_eq!(s.duplicates, DuplicatePolicy::Reject);
        assert_eq!(s.request_timeout, Duration::from_secs(30));
        assert!(!s.allow_http);
    }

    #[test]
    fn invalid_settings_name_the_offending_key() {
        let cases = [
            (
                json!({"login_url": "http://acme.my.salesforce.com"}),
                "sink.salesforce.login_url",
            ),
            (
                json!({"login_url": "https://acme.my.salesforce.com/services"}),
                "sink.salesforce.login_url",
            ),
            (json!({"client_id": " "}), "sink.salesforce.client_id"),
            (json!({"username": "a@b.c"}), "sink.salesforce.username"),
            (json!({"api_version": "62"}), "sink.salesforce.api_version"),
            (
                json!({"api_version": "v45.0"}),
                "sink.salesforce.api_version",
            ),
            (
                json!({"external_id_field": "Key__c/../x"}),
                "sink.salesforce.external_id_field",
            ),
            (json!({"fields": {}}), "sink.salesforce.fields"),
            (
                json!({"fields": {"Leadsync_Key__c": "email"}}),
                "sink.salesforce.fields.Leadsync_Key__c",
            ),
            (
                json!({"fields": {"Bad Name": "email"}}),
                "sink.salesforce.fields.Bad Name",
            ),
            (
                json!({"placeholders": {"Company": " "}}),
                "sink.salesforce.placeholders.Company",
            ),
            (
                json!({"max_lengths": {"Title": 0}}),
                "sink.salesforce.max_lengths.Title",
            ),
            (
                json!({"request_timeout": "0s"}),
                "sink.salesforce.request_timeout",
            ),
            (
                json!({"retry": {"max_attempts": 0}}),
                "sink.salesforce.retry.max_attempts",
            ),
        ];
        for (extra, key) in cases {
            assert_eq!(key_of(settings(extra.clone()).validate()), key, "{extra}");
        }
    }

    #[test]
    fn the_jwt_flow_needs_a_username_and_a_key_and_no_secret() {
        let jwt = |extra: Value| {
            let mut s = settings(extra);
            s.client_secret = None;
            s
        };
        let ok = jwt(
            json!({"auth": "jwt_bearer", "username": "int@acme.com", "private_key": {"file": "/k.pem"}}),
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            key_of(
                jwt(json!({"auth": "jwt_bearer", "private_key": {"file": "/k.pem"}})).validate()
            ),
            "sink.salesforce.username"
        );
        assert_eq!(
            key_of(jwt(json!({"auth": "jwt_bearer", "username": "int@acme.com"})).validate()),
            "sink.salesforce.private_key"
        );
        let mut with_secret = ok.clone();
        with_secret.client_secret = settings(json!({})).client_secret;
        assert_eq!(
            key_of(with_secret.validate()),
            "sink.salesforce.client_secret"
        );
    }

    #[test]
    fn the_default_audience_is_a_salesforce_login_host_for_my_domains() {
        let aud = |u: &str| default_audience(&reqwest::Url::parse(u).unwrap());

        assert_eq!(
            aud("https://acme.my.salesforce.com"),
            "https://login.salesforce.com"
        );
        assert_eq!(
            aud("https://acme--uat.sandbox.my.salesforce.com/"),
            "https://test.salesforce.com"
        );
        assert_eq!(
            aud("https://acme--uat.my.salesforce.com"),
            "https://test.salesforce.com"
        );
        assert_eq!(
            aud("https://test.salesforce.com"),
            "https://test.salesforce.com"
        );
        assert_eq!(aud("http://127.0.0.1:8080/"), "http://127.0.0.1:8080");
    }

    #[test]
    fn responses_are_classified_by_status_and_error_code() {
        let limit =
            r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        let no_access = r#"[{"message":"The REST API is not enabled for this Organization.","errorCode":"API_DISABLED_FOR_ORG"}]"#;
        let session =
            r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;
        let field = r#"[{"message":"No such column 'Foo__c' on sobject of type Lead","errorCode":"INVALID_FIELD","fields":["Foo__c"]}]"#;

        assert_eq!(classify(StatusCode::OK, None, "[]"), Verdict::Ok);
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED, None, session),
            Verdict::SessionInvalid
        );
        assert!(
            matches!(classify(StatusCode::FORBIDDEN, None, limit), Verdict::ApiLimit { reason } if reason.contains("REQUEST_LIMIT_EXCEEDED"))
        );
        assert!(
            matches!(classify(StatusCode::FORBIDDEN, None, no_access), Verdict::Fail { reason } if reason.contains("API_DISABLED_FOR_ORG"))
        );
        assert!(
            matches!(classify(StatusCode::SERVICE_UNAVAILABLE, Some(Duration::from_secs(2)), "<html>down</html>"), Verdict::Retry { after: Some(_), reason } if reason.contains("503"))
        );
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, None, ""),
            Verdict::Retry { .. }
        ));
        assert!(
            matches!(classify(StatusCode::BAD_REQUEST, None, field), Verdict::Fail { reason } if reason.contains("INVALID_FIELD: No such column 'Foo__c' on sobject of type Lead (fields: Foo__c)"))
        );
    }

    #[test]
    fn token_errors_say_which_and_only_5xx_is_transient() {
        let invalid =
            r#"{"error":"invalid_client","error_description":"invalid client credentials"}"#;

        let refused = classify_token(
            StatusCode::BAD_REQUEST,
            invalid,
            AuthFlow::ClientCredentials,
        )
        .err();
        let down = classify_token(StatusCode::BAD_GATEWAY, "", AuthFlow::JwtBearer).err();

        assert!(
            matches!(refused, Some(AuthError::Refused(r)) if r.contains("invalid_client: invalid client credentials") && r.contains("client_credentials"))
        );
        assert!(matches!(down, Some(AuthError::Transient(r)) if r.contains("502")));
    }

    #[test]
    fn per_record_results_become_verdicts() {
        let parse = |v: Value| serde_json::from_value::<UpsertResult>(v).unwrap();

        let created = parse(json!({"id": "00Q1", "success": true, "created": true, "errors": []}));
        let invalid = parse(
            json!({"success": false, "errors": [{"statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "message": "Phone is required", "fields": ["Phone"]}]}),
        );
        let duplicate = parse(
            json!({"success": false, "errors": [{"statusCode": "DUPLICATES_DETECTED", "message": "Use one of these records?", "fields": []}]}),
        );
        let locked = parse(
            json!({"success": false, "errors": [{"statusCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access to this record"}]}),
        );
        let mixed = parse(
            json!({"success": false, "errors": [{"statusCode": "DUPLICATES_DETECTED", "message": "dup"}, {"statusCode": "INVALID_EMAIL_ADDRESS", "message": "bad", "fields": ["Email"]}]}),
        );

        assert_eq!(
            record_verdict(&created),
            RecordVerdict::Upserted { created: true }
        );
        assert_eq!(
            record_verdict(&invalid),
            RecordVerdict::Rejected(
                "FIELD_CUSTOM_VALIDATION_EXCEPTION: Phone is required (fields: Phone)".into()
            )
        );
        assert!(matches!(
            record_verdict(&duplicate),
            RecordVerdict::Duplicate(_)
        ));
        assert!(matches!(record_verdict(&locked), RecordVerdict::Locked(_)));
        assert!(
            matches!(record_verdict(&mixed), RecordVerdict::Rejected(r) if r.contains("INVALID_EMAIL_ADDRESS"))
        );
    }

    #[test]
    fn api_usage_is_read_from_the_limit_info_header() {
        assert_eq!(api_usage("api-usage=18/15000"), Some((18, 15000)));
        assert_eq!(
            api_usage("api-usage=25/5000; per-app-api-usage=17/250(appName=sample-connected-app)"),
            Some((25, 5000))
        );
        assert_eq!(api_usage("per-app-api-usage=17/250"), None);
        assert_eq!(api_usage("api-usage=x/5000"), None);
    }

    #[test]
    fn the_sink_debug_output_holds_no_secret() {
        let sink = SalesforceSink::new(&settings(json!({}))).unwrap();

        let text = format!("{sink:?} {:?}", settings(json!({})));

        assert!(!text.contains("s3cret-value"), "{text}");
        assert!(text.contains("3MVG9consumerkey"));
    }

    #[test]
    fn a_missing_secret_stops_construction_naming_the_key() {
        let s = settings(json!({"client_secret": {"env": "LEADSYNC_TEST_UNSET_SF_SECRET"}}));

        let err = SalesforceSink::new(&s).unwrap_err();

        assert!(
            err.message.contains("sink.salesforce.client_secret"),
            "{err}"
        );
    }
}
