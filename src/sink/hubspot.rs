//! HubSpot sink: Contacts upserted in batches by a unique property (`email` by
//! default, or a custom unique property holding leadsync's stable key), with a
//! private-app access token.
//!
//! Vendor contract (HubSpot developer docs, CRM API "Contacts", batch endpoints,
//! https://developers.hubspot.com/docs/api-reference/legacy/crm/objects/contacts/batch/upsert-contacts):
//! - upsert: `POST /crm/v3/objects/contacts/batch/upsert` with
//!   `{"inputs": [{"idProperty", "id", "properties": {...}, "objectWriteTraceId"}]}`;
//!   the answer is `200`/`201` with `results` (not promised in input order: each
//!   result carries its `objectWriteTraceId` and `properties`), or `207` multi-status
//!   with `results` and `errors` (`{"status", "category", "message", "context":
//!   {"ids": [...]}, "errors": [{"code", "message"}]}`), or a request-level error
//!   `{"status": "error", "category", "message", "errors"?, "context"?}`.
//! - read: `POST /crm/v3/objects/contacts/batch/read` with `{"idProperty", "inputs":
//!   [{"id"}], "properties": [...]}`; ids not found come back as `207` errors
//!   (`OBJECT_NOT_FOUND`), the others as `results`.
//! - batch inputs: at most 100 per call (a larger batch is a `400`).
//! - 401 `INVALID_AUTHENTICATION`: a private-app token does not expire; it was
//!   rotated or revoked, which a person fixes (no refresh is possible).
//! - 403 `MISSING_SCOPES`: the app lacks `crm.objects.contacts.write`/`read`.
//! - limits ("API usage guidelines", https://developers.hubspot.com/docs/api/usage-details):
//!   per private app about 190 requests per 10 s on Professional/Enterprise tiers,
//!   100 per 10 s on Free/Starter (the older "APIs by tier" page said 150 for paid
//!   tiers); a daily cap per account by tier (250,000 on Free/Starter, more on paid
//!   tiers, 1,000,000 with the API add-on; it resets at midnight in the account's
//!   time zone). A `429` carries `X-HubSpot-RateLimit-Max`, `-Remaining`,
//!   `-Interval-Milliseconds` (and `-Daily`, `-Daily-Remaining` for private apps)
//!   and a body whose `policyName` is `TEN_SECONDLY_ROLLING` or `DAILY`.
//!
//! Per batch of up to 100 customers: one batch read (which contacts exist, their
//! `company`, `lifecyclestage`, `hs_lead_status` and other `if_empty` properties:
//! needed so a rep's company survives and the lifecycle stage only moves forward),
//! then one batch upsert. A `400` that refuses the whole batch for one bad input is
//! split (the inputs it names, else halves) until the bad input is alone and
//! rejected; the others are sent again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{check_url, client, is_transient_status, retry_after, retrying, Finished, Step};
use super::mapping::{crm_value_is_empty, owned_fields, truncate, LeadField, WriteMode};
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::lead::Stage;
use crate::retry::RetrySettings;
use crate::secret::SecretSource;

const SINK: &str = "hubspot";
/// CRM batch endpoints take at most 100 inputs per request (HubSpot CRM API docs,
/// batch operations); a larger batch is refused with a 400.
pub const MAX_INPUTS_PER_REQUEST: usize = 100;
const UPSERT_PATH: &str = "/crm/v3/objects/contacts/batch/upsert";
const READ_PATH: &str = "/crm/v3/objects/contacts/batch/read";
const REDACTED: &str = "[redacted]";
/// How long the sink waits when the account's daily API cap is spent (`policyName`
/// `DAILY`): the cap resets at midnight in the account's time zone, which the API
/// does not tell; the leads wait in state meanwhile.
pub const DAILY_LIMIT_WAIT: Duration = Duration::from_secs(60 * 60);
/// HubSpot's default lifecycle stages, in their only allowed direction.
const LIFECYCLE_ORDER: [&str; 8] = [
    "subscriber",
    "lead",
    "marketingqualifiedlead",
    "salesqualifiedlead",
    "opportunity",
    "customer",
    "evangelist",
    "other",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubspotSettings {
    /// The private app's access token (`pat-...`): a secret.
    pub access_token: SecretSource,
    /// The unique contact property upserts go by: `email` (default), or the internal
    /// name of a custom unique text property that then holds leadsync's stable key.
    #[serde(default = "default_id_property")]
    pub id_property: String,
    /// API root (tests point it at a fake).
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Contact property internal name -> lead attribute. Replaces the default mapping.
    #[serde(default = "default_fields")]
    pub fields: BTreeMap<String, LeadField>,
    /// Property -> `always`, `on_create` or `if_empty`, over the attribute's default.
    #[serde(default)]
    pub ownership: BTreeMap<String, WriteMode>,
    /// leadsync stage (`initial_interest`, `trial`, `active`) -> `lifecyclestage`
    /// value. Sent only while it moves the contact forward (see the README).
    #[serde(default = "default_lifecycle_stages")]
    pub lifecycle_stages: BTreeMap<String, String>,
    /// `hs_lead_status` written while the contact has none (`""`: never written).
    #[serde(default = "default_lead_status")]
    pub lead_status: String,
    /// A custom boolean contact property set to `true` for a customer who asked not to
    /// be contacted; never sent as `false`. None by default (HubSpot's subscription
    /// status is not a contact property).
    #[serde(default)]
    pub opt_out_property: Option<String>,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default)]
    pub retry: RetrySettings,
}

fn default_id_property() -> String {
    "email".into()
}
fn default_base_url() -> String {
    "https://api.hubapi.com".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lead_status() -> String {
    "NEW".into()
}

/// The default mapping: the customer's identity and contact data, and the company.
pub fn default_fields() -> BTreeMap<String, LeadField> {
    [
        ("firstname", LeadField::FirstName),
        ("lastname", LeadField::LastName),
        ("email", LeadField::Email),
        ("phone", LeadField::Phone),
        ("country", LeadField::Country),
        ("jobtitle", LeadField::Title),
        ("company", LeadField::Company),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `initial_interest` (Contact me) -> `lead`; `trial` (test drive) and `active`
/// (Get it now, a portal purchase) -> `marketingqualifiedlead`. Never
/// `salesqualifiedlead` or later: those are sales' calls, and HubSpot does not let a
/// stage move back without clearing it.
pub fn default_lifecycle_stages() -> BTreeMap<String, String> {
    [
        ("initial_interest", "lead"),
        ("trial", "marketingqualifiedlead"),
        ("active", "marketingqualifiedlead"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// HubSpot internal names: lower-case letters, digits and underscores, a letter first.
fn is_property_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 100
}

impl HubspotSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, why: &str| Err((format!("sink.hubspot.{key}"), why.to_owned()));
        let base = check_url("sink.hubspot.base_url", &self.base_url, self.allow_http)?;
        if base.query().is_some() {
            return bad("base_url", "must not have a query");
        }
        if !is_property_name(&self.id_property) {
            return bad(
                "id_property",
                "must be a contact property's internal name (lower case), e.g. email",
            );
        }
        if self.fields.is_empty() {
            return bad("fields", "must map at least one contact property");
        }
        for name in self
            .fields
            .keys()
            .chain(self.ownership.keys())
            .chain(self.opt_out_property.iter())
        {
            if !is_property_name(name) {
                return Err((
                    format!("sink.hubspot.fields.{name}"),
                    "is not a HubSpot property internal name (lower-case letters, digits, _)"
                        .into(),
                ));
            }
        }
        for (property, attribute) in &self.fields {
            if matches!(property.as_str(), "lifecyclestage" | "hs_lead_status") {
                return Err((
                    format!("sink.hubspot.fields.{property}"),
                    "is written by the sink's own rules (lifecycle_stages, lead_status)".into(),
                ));
            }
            if attribute.is_opt_out() {
                return Err((
                    format!("sink.hubspot.fields.{property}"),
                    "opt-outs go through sink.hubspot.opt_out_property".into(),
                ));
            }
        }
        for (stage, value) in &self.lifecycle_stages {
            if !matches!(stage.as_str(), "initial_interest" | "trial" | "active") {
                return Err((
                    format!("sink.hubspot.lifecycle_stages.{stage}"),
                    "is not a leadsync stage (initial_interest, trial, active)".into(),
                ));
            }
            if value.trim().is_empty() {
                return Err((
                    format!("sink.hubspot.lifecycle_stages.{stage}"),
                    "must not be empty (leave the stage out instead)".into(),
                ));
            }
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero");
        }
        self.retry.validate("sink.hubspot.retry")?;
        Ok(())
    }
}

/// One request-level or per-record error of HubSpot.
#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(default)]
    category: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    context: Map<String, Value>,
    #[serde(default)]
    errors: Vec<SubError>,
    #[serde(rename = "objectWriteTraceId", default)]
    trace: Option<String>,
    #[serde(rename = "policyName", default)]
    policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct SubError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl ApiError {
    fn text(&self) -> String {
        let mut text = if self.category.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.category, self.message)
        };
        for e in &self.errors {
            text.push_str(&format!("; {} {}", e.code, e.message));
        }
        truncate(text.trim(), 500).0
    }

    /// The ids of the inputs it names (`context.ids`), lower-cased.
    fn ids(&self) -> Vec<String> {
        self.context
            .get("ids")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_ascii_lowercase)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A fault of the configuration, not of a record: a property or the id property
    /// that does not exist or is not unique, scopes missing.
    fn is_endpoint_fault(&self) -> bool {
        let codes = [
            "PROPERTY_DOESNT_EXIST",
            "INVALID_ID_PROPERTY",
            "MISSING_SCOPES",
        ];
        codes.contains(&self.category.as_str())
            || self.errors.iter().any(|e| codes.contains(&e.code.as_str()))
            || self.message.contains("does not exist")
            || self.message.contains("is not a unique")
    }
}

#[derive(Debug, Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    results: Vec<BatchResult>,
    #[serde(default)]
    errors: Vec<ApiError>,
}

#[derive(Debug, Deserialize)]
struct BatchResult {
    #[serde(default)]
    properties: Map<String, Value>,
    #[serde(rename = "objectWriteTraceId", default)]
    trace: Option<String>,
}

fn parse_error(body: &str) -> ApiError {
    serde_json::from_str(body).unwrap_or_else(|_| ApiError {
        message: snippet(body),
        ..ApiError::default()
    })
}

fn snippet(body: &str) -> String {
    let (cut, _) = truncate(body.trim(), 300);
    if cut.is_empty() {
        "empty body".into()
    } else {
        cut
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// How long a `429` asks to wait: `Retry-After`; the daily cap (`DAILY` policy or
/// `X-HubSpot-RateLimit-Daily-Remaining: 0`) waits [`DAILY_LIMIT_WAIT`]; otherwise
/// the rolling window, `X-HubSpot-RateLimit-Interval-Milliseconds`.
pub fn rate_limit_wait(headers: &HeaderMap, body: &str) -> Option<Duration> {
    if let Some(after) = retry_after(headers) {
        return Some(after);
    }
    let daily = parse_error(body).policy.as_deref() == Some("DAILY")
        || header_u64(headers, "x-hubspot-ratelimit-daily-remaining") == Some(0);
    if daily {
        return Some(DAILY_LIMIT_WAIT);
    }
    header_u64(headers, "x-hubspot-ratelimit-interval-milliseconds").map(Duration::from_millis)
}

/// What one call answered: a 2xx body, or a 400 (which the caller splits on).
enum Answer {
    Ok(String),
    BadRequest(ApiError),
}

/// Upserts merged customer leads into HubSpot contacts.
pub struct HubspotSink {
    http: reqwest::Client,
    base_url: String,
    token: SecretString,
    id_property: String,
    fields: BTreeMap<String, LeadField>,
    ownership: BTreeMap<String, WriteMode>,
    /// Properties the batch read fetches.
    read_properties: Vec<String>,
    lifecycle_stages: BTreeMap<String, String>,
    lead_status: String,
    opt_out_property: Option<String>,
    retry: RetrySettings,
}

impl fmt::Debug for HubspotSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubspotSink")
            .field("base_url", &self.base_url)
            .field("access_token", &REDACTED)
            .field("id_property", &self.id_property)
            .finish_non_exhaustive()
    }
}

fn stage_key(stage: Stage) -> Option<&'static str> {
    match stage {
        Stage::InitialInterest => Some("initial_interest"),
        Stage::Trial => Some("trial"),
        Stage::Active => Some("active"),
        Stage::Unknown | Stage::DoNotContact => None,
    }
}

fn lifecycle_rank(value: &str) -> Option<usize> {
    LIFECYCLE_ORDER.iter().position(|s| *s == value)
}

/// Whether sending `target` moves a contact whose stage is `current` forward.
/// A stage HubSpot does not list by default (a custom one) is the admin's: only
/// an empty stage is filled then.
pub fn lifecycle_moves_forward(current: Option<&str>, target: &str) -> bool {
    match current.map(str::trim).filter(|c| !c.is_empty()) {
        None => true,
        Some(current) => match (lifecycle_rank(current), lifecycle_rank(target)) {
            (Some(c), Some(t)) => t > c,
            _ => false,
        },
    }
}

impl HubspotSink {
    /// Reads the token and builds the client; no network I/O.
    pub fn new(settings: &HubspotSettings) -> Result<Self, SinkError> {
        settings
            .validate()
            .map_err(|e| SinkError::config(SINK, e))?;
        let token = settings
            .access_token
            .resolve("sink.hubspot.access_token")
            .map_err(|e| SinkError::new(SINK, e.to_string()))?;
        let ownership: BTreeMap<String, WriteMode> = settings
            .ownership
            .iter()
            .map(|(f, m)| (f.to_ascii_lowercase(), *m))
            .collect();
        let mut read_properties = vec![
            settings.id_property.clone(),
            "lifecyclestage".to_owned(),
            "hs_lead_status".to_owned(),
        ];
        for (property, attribute) in &settings.fields {
            let mode = ownership
                .get(property)
                .copied()
                .unwrap_or_else(|| attribute.default_write_mode());
            if mode == WriteMode::IfEmpty && !read_properties.contains(property) {
                read_properties.push(property.clone());
            }
        }
        Ok(Self {
            http: client(settings.request_timeout).map_err(|e| SinkError::new(SINK, e))?,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            token,
            id_property: settings.id_property.clone(),
            fields: settings.fields.clone(),
            ownership,
            read_properties,
            lifecycle_stages: settings.lifecycle_stages.clone(),
            lead_status: settings.lead_status.trim().to_owned(),
            opt_out_property: settings.opt_out_property.clone(),
            retry: settings.retry.clone(),
        })
    }

    /// The value of the id property for `lead`: its normalised email (upserting by
    /// email), else its stable external key. `None`: the lead has no email to key on.
    fn id_of(&self, lead: &CustomerLead) -> Option<String> {
        if self.id_property == "email" {
            lead.key.strip_prefix("email:").map(str::to_owned)
        } else {
            Some(lead.external_key.clone())
        }
    }

    /// The properties sent for `lead`, given what the batch read found (`None`: the
    /// contact does not exist yet).
    fn properties(
        &self,
        lead: &CustomerLead,
        id: &str,
        existing: Option<&Map<String, Value>>,
    ) -> Map<String, Value> {
        let mut owned = owned_fields(lead, &self.fields, &self.ownership);
        owned
            .fields
            .retain(|_, (v, _)| !matches!(v, Value::String(s) if s.trim().is_empty()));
        let current = |p: &str| existing.and_then(|e| e.get(p));
        let mut props = match existing {
            None => owned.for_create(),
            Some(_) => owned.for_update(|p| crm_value_is_empty(current(p), &[])),
        };
        props.insert(self.id_property.clone(), Value::String(id.to_owned()));
        if let Some(target) = stage_key(lead.stage).and_then(|s| self.lifecycle_stages.get(s)) {
            if lifecycle_moves_forward(current("lifecyclestage").and_then(Value::as_str), target) {
                props.insert("lifecyclestage".into(), Value::String(target.clone()));
            }
        }
        if !self.lead_status.is_empty() && crm_value_is_empty(current("hs_lead_status"), &[]) {
            props.insert(
                "hs_lead_status".into(),
                Value::String(self.lead_status.clone()),
            );
        }
        if let Some(opt_out) = &self.opt_out_property {
            // Only ever `true`: an opt-out set in HubSpot is never cleared by leadsync.
            if lead.do_not_contact {
                props.insert(opt_out.clone(), Value::String("true".into()));
            }
        }
        // HubSpot property values are strings.
        for value in props.values_mut() {
            if !value.is_string() {
                let text = match &*value {
                    Value::Bool(b) => b.to_string(),
                    other => other.to_string(),
                };
                *value = Value::String(text);
            }
        }
        props
    }

    fn scrub(&self, text: String) -> String {
        let token = self.token.expose_secret();
        if !token.is_empty() && text.contains(token) {
            text.replace(token, REDACTED)
        } else {
            text
        }
    }

    /// One POST with the retry loop: 2xx and 400 are answers; 401/403/404 and other
    /// 4xx fail the request (the endpoint's fault); 408/429/5xx and transport errors
    /// are retried, 429 after the wait HubSpot asks for.
    async fn post(&self, path: &str, body: &Value) -> Finished<Answer> {
        let url = format!("{}{path}", self.base_url);
        retrying(&self.retry, SINK, |_| {
            let url = url.clone();
            async move {
                let response = match self
                    .http
                    .post(&url)
                    .bearer_auth(self.token.expose_secret())
                    .header(reqwest::header::ACCEPT, "application/json")
                    .json(body)
                    .send()
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        return Step::Retry {
                            after: None,
                            reason: self.scrub(format!("HubSpot request failed: {e}")),
                        }
                    }
                };
                let status = response.status();
                let headers = response.headers().clone();
                let text = match response.text().await {
                    Ok(t) => t,
                    Err(e) => {
                        return Step::Retry {
                            after: None,
                            reason: self.scrub(format!("HubSpot answer unreadable: {e}")),
                        }
                    }
                };
                if let Some(remaining) = header_u64(&headers, "x-hubspot-ratelimit-remaining") {
                    tracing::debug!(sink = SINK, remaining, "HubSpot rate limit window.");
                }
                let code = status.as_u16();
                if status.is_success() {
                    return Step::Done(Answer::Ok(text));
                }
                if status == StatusCode::BAD_REQUEST {
                    return Step::Done(Answer::BadRequest(parse_error(&self.scrub(text))));
                }
                let after = rate_limit_wait(&headers, &text);
                let error = parse_error(&self.scrub(text));
                if status == StatusCode::TOO_MANY_REQUESTS {
                    return Step::Retry {
                        after,
                        reason: format!("HubSpot rate limit (HTTP 429): {}", error.text()),
                    };
                }
                if is_transient_status(status) {
                    return Step::Retry {
                        after: retry_after(&headers),
                        reason: format!("HubSpot answered HTTP {code}: {}", error.text()),
                    };
                }
                let hint = match status {
                    StatusCode::UNAUTHORIZED => " (the private app's access token was refused: rotated or revoked? check sink.hubspot.access_token)",
                    StatusCode::FORBIDDEN => " (the private app lacks the scopes crm.objects.contacts.read / crm.objects.contacts.write)",
                    StatusCode::NOT_FOUND => " (wrong sink.hubspot.base_url?)",
                    _ => "",
                };
                Step::Fail {
                    reason: format!(
                        "HubSpot refused the request (HTTP {code}): {}{hint}",
                        error.text()
                    ),
                }
            }
        })
        .await
    }

    /// The contacts of `ids` that exist, by lower-cased id, with the properties read.
    async fn read(&self, ids: &[String]) -> Result<HashMap<String, Map<String, Value>>, Outcome> {
        let body = json!({
            "idProperty": self.id_property,
            "inputs": ids.iter().map(|id| json!({ "id": id })).collect::<Vec<_>>(),
            "properties": self.read_properties,
        });
        match self.post(READ_PATH, &body).await {
            Finished::Done(Answer::Ok(text)) => match serde_json::from_str::<BatchAnswer>(&text) {
                Ok(answer) => Ok(answer
                    .results
                    .into_iter()
                    .filter_map(|r| {
                        let id = r.properties.get(&self.id_property)?.as_str()?;
                        Some((id.to_ascii_lowercase(), r.properties.clone()))
                    })
                    .collect()),
                Err(e) => Err(Outcome::RetryLater {
                    after: None,
                    reason: format!("HubSpot batch read answer unreadable ({e})"),
                }),
            },
            Finished::Done(Answer::BadRequest(error)) => Err(Outcome::EndpointFailed {
                reason: format!(
                    "HubSpot refused the batch read by sink.hubspot.id_property = {} (HTTP 400): {}",
                    self.id_property,
                    error.text()
                ),
            }),
            Finished::GaveUp { after, reason } => Err(Outcome::RetryLater { after, reason }),
            Finished::Failed { reason } => Err(Outcome::EndpointFailed { reason }),
        }
    }

    /// Delivers at most 100 leads: one read, one upsert (more only to isolate an
    /// input a 400 refuses).
    async fn deliver_chunk(&self, leads: &[CustomerLead]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; leads.len()];
        let mut ids: Vec<Option<String>> = Vec::with_capacity(leads.len());
        for (i, lead) in leads.iter().enumerate() {
            let id = self.id_of(lead);
            if id.is_none() {
                outcomes[i] = Some(Outcome::Rejected {
                    reason: "the customer has no email, and sink.hubspot.id_property = \"email\" (set it to a custom unique property to upsert such customers by leadsync's key)".into(),
                });
            }
            ids.push(id);
        }
        let sendable: Vec<usize> = (0..leads.len()).filter(|&i| ids[i].is_some()).collect();
        if !sendable.is_empty() {
            let read_ids: Vec<String> = sendable
                .iter()
                .map(|&i| ids[i].clone().unwrap_or_default())
                .collect();
            match self.read(&read_ids).await {
                Err(outcome) => {
                    for &i in &sendable {
                        outcomes[i] = Some(outcome.clone());
                    }
                }
                Ok(existing) => {
                    let inputs: Vec<Value> = sendable
                        .iter()
                        .map(|&i| {
                            let id = ids[i].as_deref().unwrap_or_default();
                            let props = self.properties(
                                &leads[i],
                                id,
                                existing.get(&id.to_ascii_lowercase()),
                            );
                            json!({
                                "idProperty": self.id_property,
                                "id": id,
                                "objectWriteTraceId": i.to_string(),
                                "properties": props,
                            })
                        })
                        .collect();
                    self.upsert(&sendable, &inputs, &ids, &mut outcomes).await;
                }
            }
        }
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::RetryLater {
                    after: None,
                    reason: "HubSpot answered nothing for this contact".into(),
                })
            })
            .collect();
        let delivered = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Delivered))
            .count();
        let rejected = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Rejected { .. }))
            .count();
        tracing::info!(
            sink = SINK,
            records = leads.len(),
            delivered,
            rejected,
            pending = leads.len() - delivered - rejected,
            "HubSpot batch upsert finished."
        );
        outcomes
    }

    /// Upserts `inputs` (of the leads at `indexes`), splitting on a 400.
    async fn upsert(
        &self,
        indexes: &[usize],
        inputs: &[Value],
        ids: &[Option<String>],
        outcomes: &mut [Option<Outcome>],
    ) {
        let mut queue: Vec<Vec<usize>> = vec![(0..indexes.len()).collect()];
        while let Some(group) = queue.pop() {
            let body =
                json!({ "inputs": group.iter().map(|&k| inputs[k].clone()).collect::<Vec<_>>() });
            let sent = Sent {
                indexes,
                ids,
                group: &group,
            };
            match self.post(UPSERT_PATH, &body).await {
                Finished::Done(Answer::Ok(text)) => {
                    match serde_json::from_str::<BatchAnswer>(&text) {
                        Ok(answer) => self.settle_answer(&answer, &sent, outcomes),
                        // Idempotent upsert: safe to send again later.
                        Err(e) => sent.fail_rest(
                            outcomes,
                            &mut queue,
                            Outcome::RetryLater {
                                after: None,
                                reason: format!("HubSpot upsert answer unreadable ({e})"),
                            },
                        ),
                    }
                }
                Finished::Done(Answer::BadRequest(error)) => {
                    sent.split_bad_request(&error, outcomes, &mut queue);
                }
                Finished::GaveUp { after, reason } => {
                    sent.fail_rest(outcomes, &mut queue, Outcome::RetryLater { after, reason });
                }
                Finished::Failed { reason } => {
                    sent.fail_rest(outcomes, &mut queue, Outcome::EndpointFailed { reason });
                }
            }
        }
    }

    /// Gives each lead a result or an error of `answer` names its outcome.
    fn settle_answer(
        &self,
        answer: &BatchAnswer,
        sent: &Sent<'_>,
        outcomes: &mut [Option<Outcome>],
    ) {
        for result in &answer.results {
            let id = result
                .properties
                .get(&self.id_property)
                .and_then(Value::as_str);
            if let Some(i) = sent.lead_named(result.trace.as_deref(), id) {
                outcomes[i] = Some(Outcome::Delivered);
            }
        }
        for error in &answer.errors {
            let outcome = record_error_outcome(error);
            let named: Vec<usize> = match sent.lead_named(error.trace.as_deref(), None) {
                Some(i) => vec![i],
                None => error
                    .ids()
                    .iter()
                    .filter_map(|id| sent.lead_named(None, Some(id.as_str())))
                    .collect(),
            };
            for i in named {
                outcomes[i] = Some(outcome.clone());
            }
        }
    }
}

/// What a per-record error of a batch upsert means for its contact.
fn record_error_outcome(error: &ApiError) -> Outcome {
    if error.category == "RATE_LIMITS" {
        Outcome::RetryLater {
            after: None,
            reason: format!("HubSpot: {}", error.text()),
        }
    } else if error.is_endpoint_fault() {
        Outcome::EndpointFailed {
            reason: format!(
                "HubSpot refused a property of the mapping: {}",
                error.text()
            ),
        }
    } else {
        Outcome::Rejected {
            reason: format!("HubSpot refused the contact: {}", error.text()),
        }
    }
}

/// One upsert request: `group` holds positions in the inputs, `indexes` maps a
/// position to its lead, `ids` holds each lead's id.
struct Sent<'a> {
    indexes: &'a [usize],
    ids: &'a [Option<String>],
    group: &'a [usize],
}

impl Sent<'_> {
    /// The lead of this request a result or error names: by its trace id (the
    /// lead's index), else by its id, compared without case.
    fn lead_named(&self, trace: Option<&str>, id: Option<&str>) -> Option<usize> {
        if let Some(i) = trace.and_then(|t| t.parse::<usize>().ok()) {
            if self.group.iter().any(|&k| self.indexes[k] == i) {
                return Some(i);
            }
        }
        let id = id?.to_ascii_lowercase();
        self.group
            .iter()
            .map(|&k| self.indexes[k])
            .find(|&i| self.ids[i].as_deref().map(str::to_ascii_lowercase) == Some(id.clone()))
    }

    /// After a 400: the whole rest fails on a fault of the mapping; a lone contact
    /// is refused; otherwise the contacts the error names are refused and the
    /// others sent again, or, where it names none (or all), the group is halved.
    fn split_bad_request(
        &self,
        error: &ApiError,
        outcomes: &mut [Option<Outcome>],
        queue: &mut Vec<Vec<usize>>,
    ) {
        if error.is_endpoint_fault() {
            self.fail_rest(
                outcomes,
                queue,
                Outcome::EndpointFailed {
                    reason: format!("HubSpot refused the batch upsert (HTTP 400): {} (check sink.hubspot.id_property and fields)", error.text()),
                },
            );
            return;
        }
        let refused = || Outcome::Rejected {
            reason: format!("HubSpot refused the contact (HTTP 400): {}", error.text()),
        };
        if self.group.len() == 1 {
            outcomes[self.indexes[self.group[0]]] = Some(refused());
            return;
        }
        let named: Vec<String> = error.ids();
        let (bad, good): (Vec<usize>, Vec<usize>) = self.group.iter().copied().partition(|&k| {
            self.ids[self.indexes[k]]
                .as_deref()
                .is_some_and(|id| named.contains(&id.to_ascii_lowercase()))
        });
        if !bad.is_empty() && !good.is_empty() {
            for k in bad {
                outcomes[self.indexes[k]] = Some(refused());
            }
            queue.push(good);
        } else {
            let (a, b) = self.group.split_at(self.group.len() / 2);
            queue.push(b.to_vec());
            queue.push(a.to_vec());
        }
    }

    /// Gives `outcome` to the leads of this group and of every group still queued.
    fn fail_rest(
        &self,
        outcomes: &mut [Option<Outcome>],
        queue: &mut Vec<Vec<usize>>,
        outcome: Outcome,
    ) {
        for k in self.group.iter().chain(queue.iter().flatten()) {
            outcomes[self.indexes[*k]] = Some(outcome.clone());
        }
        queue.clear();
    }
}

#[async_trait::async_trait]
impl LeadSink for HubspotSink {
    fn name(&self) -> &str {
        SINK
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(MAX_INPUTS_PER_REQUEST) {
            outcomes.extend(self.deliver_chunk(chunk).await);
        }
        outcomes
    }

    /// A batch read of one id that cannot exist: proves the token, the read scope and
    /// that `id_property` is a unique property. Writes nothing.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        match self
            .read(&["healthcheck@leadsync.invalid".to_owned()])
            .await
        {
            Ok(_) => Ok(()),
            Err(Outcome::RetryLater { reason, .. }) => Err(SinkError::new(
                SINK,
                format!("HubSpot is not reachable now: {reason}"),
            )),
            Err(Outcome::EndpointFailed { reason } | Outcome::Rejected { reason }) => {
                Err(SinkError::new(SINK, reason))
            }
            Err(other) => Err(SinkError::new(SINK, format!("{other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: Value) -> HubspotSettings {
        let mut base = json!({ "access_token": { "value": "pat-na1-s3cret-token" } });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn defaults_are_valid_and_bad_names_are_refused() {
        assert!(settings(json!({})).validate().is_ok());
        let err = settings(json!({"id_property": "Leadsync Key"}))
            .validate()
            .unwrap_err();
        assert_eq!(err.0, "sink.hubspot.id_property");
        let err = settings(json!({"base_url": "http://x.test"}))
            .validate()
            .unwrap_err();
        assert_eq!(err.0, "sink.hubspot.base_url");
        let err = settings(json!({"lifecycle_stages": {"won": "customer"}}))
            .validate()
            .unwrap_err();
        assert_eq!(err.0, "sink.hubspot.lifecycle_stages.won");
    }

    #[test]
    fn the_lifecycle_stage_only_moves_forward() {
        assert!(lifecycle_moves_forward(None, "lead"));
        assert!(lifecycle_moves_forward(Some(""), "lead"));
        assert!(lifecycle_moves_forward(
            Some("lead"),
            "marketingqualifiedlead"
        ));
        assert!(!lifecycle_moves_forward(
            Some("marketingqualifiedlead"),
            "lead"
        ));
        assert!(!lifecycle_moves_forward(
            Some("customer"),
            "marketingqualifiedlead"
        ));
        assert!(!lifecycle_moves_forward(Some("lead"), "lead"));
        assert!(
            !lifecycle_moves_forward(Some("1234567"), "lead"),
            "custom stages are the admin's"
        );
    }

    #[test]
    fn a_429_waits_as_hubspot_says() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-hubspot-ratelimit-interval-milliseconds",
            "10000".parse().unwrap(),
        );
        assert_eq!(rate_limit_wait(&h, ""), Some(Duration::from_secs(10)));
        assert_eq!(
            rate_limit_wait(&h, r#"{"policyName":"DAILY"}"#),
            Some(DAILY_LIMIT_WAIT)
        );
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(rate_limit_wait(&h, ""), Some(Duration::from_secs(3)));
    }

    #[test]
    fn the_sink_debug_output_holds_no_token() {
        let s = settings(json!({}));
        let sink = HubspotSink::new(&s).unwrap();
        let text = format!("{sink:?} {s:?}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
