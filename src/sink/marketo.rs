//! Marketo sink: leads pushed through the REST API of a Marketo instance with a
//! LaunchPoint custom service's client credentials.
//!
//! Vendor contract (Adobe Marketo Engage developer docs):
//! - "Authentication": `GET|POST <base>/identity/oauth/token?grant_type=client_credentials`
//!   with `client_id`/`client_secret` -> `{"access_token", "token_type", "expires_in",
//!   "scope"}`; a token lives 3600 s. The token goes in `Authorization: Bearer`
//!   (the `access_token` query parameter is being removed). leadsync POSTs the
//!   credentials as a form, so the secret is in no URL.
//! - "Lead Database > Leads": `POST <base>/rest/v1/leads.json` with `{"action",
//!   "lookupField", "input": [...]}`, at most 300 leads per call; the answer is
//!   `{"requestId", "success", "result": [{"id"?, "status": "created"|"updated"|
//!   "skipped", "reasons"?: [{"code", "message"}]}]}`, one result per input, in order.
//! - "Error Codes": API errors come with HTTP 200, `"success": false` and `errors:
//!   [{"code", "message"}]`: 601/602 access token invalid/expired (authenticate
//!   again), 606 rate limit (100 calls per 20 s), 615 concurrent limit (10), 604/608/
//!   611/713 transient, 607 daily quota reached, 603 access denied. Record-level
//!   reasons 1003 (invalid value), 1004 (lead not found), 1005 (lead already
//!   exists), 1006 (field not found), 1007 (multiple leads match) refuse that record.
//!
//! Per batch of up to 300 customers: one `createOnly` call with every mapped field;
//! only if some leads already exist (1005), one `updateOnly` call for them with the
//! `always` fields. So the company (and any `on_create`/`if_empty` field) is written
//! only when Marketo creates the lead: a value someone set in Marketo is never
//! replaced, without a read.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::http::{check_url, client, is_transient_status, retry_after, retrying, Finished, Step};
use super::mapping::{owned_fields, truncate, LeadField, WriteMode};
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::retry::RetrySettings;
use crate::secret::SecretSource;

const SINK: &str = "marketo";
/// "up to 300 records per call" (leads.json).
pub const MAX_LEADS_PER_REQUEST: usize = 300;
const REDACTED: &str = "[redacted]";
/// Renew a token this long before Marketo says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// How long the sink waits when the instance's daily API quota is spent (607).
pub const DAILY_QUOTA_WAIT: Duration = Duration::from_secs(60 * 60);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketoSettings {
    /// The REST endpoint without `/rest`: `https://<munchkin-id>.mktorest.com`
    /// (Admin > Integration > Web Services).
    pub base_url: String,
    /// The identity endpoint; default `<base_url>/identity`.
    #[serde(default)]
    pub identity_url: Option<String>,
    /// The LaunchPoint custom service's client id.
    pub client_id: String,
    /// The LaunchPoint custom service's client secret: a secret.
    pub client_secret: SecretSource,
    /// The lead field leads are matched on: `email` (default), or a custom unique
    /// field's REST name that then holds leadsync's stable key.
    #[serde(default = "default_lookup_field")]
    pub lookup_field: String,
    /// Lead field REST name -> lead attribute; replaces the default mapping.
    #[serde(default = "default_fields")]
    pub fields: BTreeMap<String, LeadField>,
    /// Field -> `always` or `on_create`/`if_empty` (both: written on create only).
    #[serde(default)]
    pub ownership: BTreeMap<String, WriteMode>,
    /// Boolean lead field set to `true` on do-not-contact, never `false`
    /// (default `unsubscribed`; `""`: none).
    #[serde(default = "default_opt_out_field")]
    pub opt_out_field: String,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default)]
    pub retry: RetrySettings,
}

fn default_lookup_field() -> String {
    "email".into()
}
fn default_opt_out_field() -> String {
    "unsubscribed".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The default mapping (Marketo REST field names).
pub fn default_fields() -> BTreeMap<String, LeadField> {
    [
        ("firstName", LeadField::FirstName),
        ("lastName", LeadField::LastName),
        ("email", LeadField::Email),
        ("phone", LeadField::Phone),
        ("country", LeadField::Country),
        ("company", LeadField::Company),
        ("title", LeadField::Title),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn is_field_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 100
}

impl MarketoSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, why: &str| Err((format!("sink.marketo.{key}"), why.to_owned()));
        let base = check_url("sink.marketo.base_url", &self.base_url, self.allow_http)?;
        if base.query().is_some() || base.path().trim_end_matches('/').ends_with("/rest") {
            return bad(
                "base_url",
                "must be the instance URL without /rest, e.g. https://123-ABC-456.mktorest.com",
            );
        }
        if let Some(identity) = &self.identity_url {
            check_url("sink.marketo.identity_url", identity, self.allow_http)?;
        }
        if self.client_id.trim().is_empty() {
            return bad("client_id", "must not be empty");
        }
        if !is_field_name(&self.lookup_field) {
            return bad(
                "lookup_field",
                "must be a lead field's REST name, e.g. email",
            );
        }
        if self.fields.is_empty() {
            return bad("fields", "must map at least one lead field");
        }
        for (name, attribute) in &self.fields {
            if !is_field_name(name) {
                return Err((
                    format!("sink.marketo.fields.{name}"),
                    "is not a Marketo REST field name".into(),
                ));
            }
            if attribute.is_opt_out() {
                return Err((
                    format!("sink.marketo.fields.{name}"),
                    "opt-outs go through sink.marketo.opt_out_field".into(),
                ));
            }
        }
        if !self.opt_out_field.is_empty() && !is_field_name(&self.opt_out_field) {
            return bad(
                "opt_out_field",
                "must be a boolean lead field's REST name, or \"\"",
            );
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero");
        }
        self.retry.validate("sink.marketo.retry")?;
        Ok(())
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct Reason {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct LeadResult {
    #[serde(default)]
    status: String,
    #[serde(default)]
    reasons: Vec<Reason>,
}

#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<Reason>,
    #[serde(default)]
    result: Vec<LeadResult>,
}

fn describe(reasons: &[Reason]) -> String {
    reasons
        .iter()
        .map(|r| format!("{} {}", r.code, r.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Clone)]
struct Token {
    value: SecretString,
    until: Instant,
    serial: u64,
}

#[derive(Default)]
struct TokenSlot {
    current: Option<Token>,
    issued: u64,
}

/// Pushes merged customer leads into Marketo.
pub struct MarketoSink {
    http: reqwest::Client,
    leads_url: String,
    token_url: String,
    client_id: String,
    client_secret: SecretString,
    lookup_field: String,
    fields: BTreeMap<String, LeadField>,
    ownership: BTreeMap<String, WriteMode>,
    opt_out_field: String,
    retry: RetrySettings,
    token: Mutex<TokenSlot>,
}

impl fmt::Debug for MarketoSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MarketoSink")
            .field("leads_url", &self.leads_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .field("lookup_field", &self.lookup_field)
            .finish_non_exhaustive()
    }
}

/// Why a call failed, as the retry loop sees it.
enum Auth {
    Token(Token),
    Retry(String),
    Refused(String),
}

impl MarketoSink {
    /// Reads the secret and builds the client; no network I/O.
    pub fn new(settings: &MarketoSettings) -> Result<Self, SinkError> {
        settings
            .validate()
            .map_err(|e| SinkError::config(SINK, e))?;
        let client_secret = settings
            .client_secret
            .resolve("sink.marketo.client_secret")
            .map_err(|e| SinkError::new(SINK, e.to_string()))?;
        let base = settings.base_url.trim_end_matches('/').to_owned();
        let identity = settings
            .identity_url
            .clone()
            .unwrap_or_else(|| format!("{base}/identity"));
        Ok(Self {
            http: client(settings.request_timeout).map_err(|e| SinkError::new(SINK, e))?,
            leads_url: format!("{base}/rest/v1/leads.json"),
            token_url: format!("{}/oauth/token", identity.trim_end_matches('/')),
            client_id: settings.client_id.trim().to_owned(),
            client_secret,
            lookup_field: settings.lookup_field.clone(),
            fields: settings.fields.clone(),
            ownership: settings
                .ownership
                .iter()
                .map(|(f, m)| (f.to_ascii_lowercase(), *m))
                .collect(),
            opt_out_field: settings.opt_out_field.clone(),
            retry: settings.retry.clone(),
            token: Mutex::new(TokenSlot::default()),
        })
    }

    fn scrub(&self, text: String, token: Option<&Token>) -> String {
        let mut text = text;
        for secret in [Some(&self.client_secret), token.map(|t| &t.value)]
            .into_iter()
            .flatten()
        {
            let s = secret.expose_secret();
            if !s.is_empty() && text.contains(s) {
                text = text.replace(s, REDACTED);
            }
        }
        text
    }

    /// The lookup value of `lead`, or `None` when it has no email to match on.
    fn lookup_of(&self, lead: &CustomerLead) -> Option<String> {
        if self.lookup_field == "email" {
            lead.key.strip_prefix("email:").map(str::to_owned)
        } else {
            Some(lead.external_key.clone())
        }
    }

    /// The record for `lead`: every field on create, only `always` ones on update.
    fn record(&self, lead: &CustomerLead, lookup: &str, create: bool) -> Value {
        let mut owned = owned_fields(lead, &self.fields, &self.ownership);
        owned
            .fields
            .retain(|_, (v, _)| !matches!(v, Value::String(s) if s.trim().is_empty()));
        let mut record: Map<String, Value> = if create {
            owned.for_create()
        } else {
            owned.for_update(|_| false)
        };
        record.insert(self.lookup_field.clone(), Value::String(lookup.to_owned()));
        if lead.do_not_contact && !self.opt_out_field.is_empty() {
            // Only ever true: an unsubscribe set in Marketo is never cleared.
            record.insert(self.opt_out_field.clone(), Value::Bool(true));
        }
        Value::Object(record)
    }

    async fn fetch_token(&self) -> Auth {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
        ];
        let response = match self.http.post(&self.token_url).form(&form).send().await {
            Ok(r) => r,
            Err(e) => {
                return Auth::Retry(self.scrub(format!("Marketo token request failed: {e}"), None))
            }
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            if let Ok(t) = serde_json::from_str::<TokenResponse>(&text) {
                let lifetime = Duration::from_secs(t.expires_in.unwrap_or(3600));
                let mut slot = self.token.lock().await;
                slot.issued += 1;
                let token = Token {
                    value: SecretString::from(t.access_token),
                    until: Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
                    serial: slot.issued,
                };
                slot.current = Some(token.clone());
                return Auth::Token(token);
            }
        }
        let text = self.scrub(truncate(text.trim(), 300).0, None);
        let reason = format!(
            "Marketo identity endpoint refused the client credentials (HTTP {}): {text}",
            status.as_u16()
        );
        if is_transient_status(status) {
            Auth::Retry(reason)
        } else {
            Auth::Refused(reason)
        }
    }

    async fn token(&self) -> Auth {
        {
            let slot = self.token.lock().await;
            if let Some(t) = slot.current.as_ref().filter(|t| t.until > Instant::now()) {
                return Auth::Token(t.clone());
            }
        }
        self.fetch_token().await
    }

    async fn forget(&self, token: &Token) {
        let mut slot = self.token.lock().await;
        if slot
            .current
            .as_ref()
            .is_some_and(|t| t.serial == token.serial)
        {
            slot.current = None;
        }
    }

    /// One leads.json call with the retry loop; one result per record, in order.
    async fn push(&self, action: &str, records: &[Value]) -> Finished<Vec<LeadResult>> {
        let body = json!({"action": action, "lookupField": self.lookup_field, "input": records});
        let n = records.len();
        retrying(&self.retry, SINK, |_| {
            let body = &body;
            async move {
                let mut refreshed = false;
                loop {
                    let (token, answer) = match self.post_leads(body).await {
                        Ok(sent) => sent,
                        Err(step) => return step,
                    };
                    if answer.success {
                        if answer.result.len() != n {
                            return Step::Fail {
                                reason: format!(
                                    "Marketo returned {} results for {n} leads",
                                    answer.result.len()
                                ),
                            };
                        }
                        return Step::Done(answer.result);
                    }
                    match self.refused(&token, &answer.errors, refreshed).await {
                        Some(step) => return step,
                        None => refreshed = true,
                    }
                }
            }
        })
        .await
    }

    /// Sends `body` to leads.json once: the token it went with and Marketo's answer,
    /// or the step a failure before the answer (token, transport, HTTP status, an
    /// unreadable body) means.
    async fn post_leads(&self, body: &Value) -> Result<(Token, Answer), Step<Vec<LeadResult>>> {
        let token = match self.token().await {
            Auth::Token(t) => t,
            Auth::Retry(reason) => {
                return Err(Step::Retry {
                    after: None,
                    reason,
                })
            }
            Auth::Refused(reason) => return Err(Step::Fail { reason }),
        };
        let response = match self
            .http
            .post(&self.leads_url)
            .bearer_auth(token.value.expose_secret())
            .json(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Err(Step::Retry {
                    after: None,
                    reason: self.scrub(format!("Marketo request failed: {e}"), Some(&token)),
                })
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let text = self.scrub(response.text().await.unwrap_or_default(), Some(&token));
        if !status.is_success() {
            let reason = format!(
                "Marketo answered HTTP {}: {}",
                status.as_u16(),
                truncate(text.trim(), 300).0
            );
            return Err(if is_transient_status(status) {
                Step::Retry {
                    after: retry_after(&headers),
                    reason,
                }
            } else {
                Step::Fail { reason }
            });
        }
        match serde_json::from_str(&text) {
            Ok(answer) => Ok((token, answer)),
            Err(e) => Err(Step::Retry {
                after: None,
                reason: format!("Marketo answer unreadable ({e})"),
            }),
        }
    }

    /// What a refused call (`success: false`) means; `None`: send it once more, as
    /// the token was invalid or expired (601, 602) and has not been `refreshed` yet.
    async fn refused(
        &self,
        token: &Token,
        errors: &[Reason],
        refreshed: bool,
    ) -> Option<Step<Vec<LeadResult>>> {
        let codes: Vec<&str> = errors.iter().map(|e| e.code.as_str()).collect();
        let reason = format!("Marketo refused the call: {}", describe(errors));
        if codes.iter().any(|c| matches!(*c, "601" | "602")) {
            self.forget(token).await;
            if !refreshed {
                tracing::info!(
                    sink = SINK,
                    "Marketo access token invalid or expired; authenticating again."
                );
                return None;
            }
            return Some(Step::Fail {
                reason: format!("{reason} (with a fresh token)"),
            });
        }
        if codes.contains(&"607") {
            return Some(Step::Retry {
                after: Some(DAILY_QUOTA_WAIT),
                reason,
            });
        }
        if codes
            .iter()
            .any(|c| matches!(*c, "604" | "606" | "608" | "611" | "615" | "713"))
        {
            return Some(Step::Retry {
                after: None,
                reason,
            });
        }
        Some(Step::Fail { reason })
    }

    async fn deliver_chunk(&self, leads: &[CustomerLead]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; leads.len()];
        let mut lookups = Vec::new();
        for (i, lead) in leads.iter().enumerate() {
            match self.lookup_of(lead) {
                Some(l) => lookups.push((i, l)),
                None => {
                    outcomes[i] = Some(Outcome::Rejected {
                        reason: "the customer has no email, and sink.marketo.lookup_field = \"email\" (set it to a custom unique field to push such customers by leadsync's key)".into(),
                    })
                }
            }
        }
        let mut existing = Vec::new();
        if !lookups.is_empty() {
            let records: Vec<Value> = lookups
                .iter()
                .map(|(i, l)| self.record(&leads[*i], l, true))
                .collect();
            match self.push("createOnly", &records).await {
                Finished::Done(results) => {
                    for ((i, l), r) in lookups.iter().zip(results) {
                        if r.status == "created" || r.status == "updated" {
                            outcomes[*i] = Some(Outcome::Delivered);
                        } else if r.reasons.iter().any(|x| x.code == "1005") {
                            existing.push((*i, l.clone()));
                        } else {
                            outcomes[*i] = Some(record_outcome(&r));
                        }
                    }
                }
                finished => fill(&mut outcomes, lookups.iter().map(|(i, _)| *i), finished),
            }
        }
        if !existing.is_empty() {
            let records: Vec<Value> = existing
                .iter()
                .map(|(i, l)| self.record(&leads[*i], l, false))
                .collect();
            match self.push("updateOnly", &records).await {
                Finished::Done(results) => {
                    for ((i, _), r) in existing.iter().zip(results) {
                        outcomes[*i] = Some(if r.status == "updated" || r.status == "created" {
                            Outcome::Delivered
                        } else {
                            record_outcome(&r)
                        });
                    }
                }
                finished => fill(&mut outcomes, existing.iter().map(|(i, _)| *i), finished),
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::RetryLater {
                    after: None,
                    reason: "Marketo answered nothing for this lead".into(),
                })
            })
            .collect()
    }
}

/// A skipped record: refused for a reason of its own (1003, 1004, 1006, 1007, ...).
fn record_outcome(r: &LeadResult) -> Outcome {
    let text = if r.reasons.is_empty() {
        format!(
            "Marketo skipped the lead (status {:?}) without a reason",
            r.status
        )
    } else {
        describe(&r.reasons)
    };
    Outcome::Rejected {
        reason: format!("Marketo refused the lead: {text}"),
    }
}

fn fill(
    outcomes: &mut [Option<Outcome>],
    indexes: impl Iterator<Item = usize>,
    finished: Finished<Vec<LeadResult>>,
) {
    let outcome = match finished {
        Finished::Done(_) => return,
        Finished::GaveUp { after, reason } => Outcome::RetryLater { after, reason },
        Finished::Failed { reason } => Outcome::EndpointFailed { reason },
    };
    for i in indexes {
        outcomes[i] = Some(outcome.clone());
    }
}

#[async_trait::async_trait]
impl LeadSink for MarketoSink {
    fn name(&self) -> &str {
        SINK
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(MAX_LEADS_PER_REQUEST) {
            outcomes.extend(self.deliver_chunk(chunk).await);
        }
        outcomes
    }

    /// Obtains a token: proves the identity endpoint and the client credentials.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        match self.fetch_token().await {
            Auth::Token(_) => Ok(()),
            Auth::Retry(reason) | Auth::Refused(reason) => Err(SinkError::new(SINK, reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: Value) -> MarketoSettings {
        let mut base = json!({
            "base_url": "https://123-ABC-456.mktorest.com",
            "client_id": "cid-1",
            "client_secret": { "value": "mkto-s3cret" },
        });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn settings_are_checked_and_debug_holds_no_secret() {
        assert!(settings(json!({})).validate().is_ok());
        let err = settings(json!({"base_url": "https://123-ABC-456.mktorest.com/rest"}))
            .validate()
            .unwrap_err();
        assert_eq!(err.0, "sink.marketo.base_url");
        let s = settings(json!({}));
        let text = format!("{:?} {s:?}", MarketoSink::new(&s).unwrap());
        assert!(!text.contains("s3cret"), "{text}");
    }
}
