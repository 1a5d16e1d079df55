//! HTTPS endpoint sink: POSTs each merged lead to a URL as the JSON the marketplace's
//! own "HTTPS endpoint" lead destination sends, so a receiver written for the
//! marketplace (typically a Power Automate "When a HTTP request is received" flow)
//! works unchanged. Our extras travel in `X-Leadsync-*` headers, which such
//! receivers ignore.
//!
//! The payload follows the schema and example of Microsoft's "Use an HTTPS endpoint
//! to manage commercial marketplace leads" (partner-center-portal/
//! commercial-marketplace-lead-management-instructions-https): every property a
//! string, none required.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::http::{self, status_text, Finished, Step, Verdict};
use super::mapping::LeadField;
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::identity::HistoryEntry;
use crate::retry::RetrySettings;
use crate::secret::SecretSource;

const SINK: &str = "webhook";
/// The stable customer key, so a receiver can upsert.
pub const KEY_HEADER: &str = "x-leadsync-key";
/// `initial_interest`, `trial`, `active` or `unknown`.
pub const STAGE_HEADER: &str = "x-leadsync-stage";
/// `true` or `false`.
pub const DO_NOT_CONTACT_HEADER: &str = "x-leadsync-do-not-contact";
/// The same for every POST of the same customer version (a retry, a replay, the
/// re-delivery after a crash), different for each new version: a receiver that keeps
/// the ids it has processed never acts on one version twice. 32 lowercase hex digits
/// of SHA-256 over the customer key and the body.
pub const EVENT_ID_HEADER: &str = "x-leadsync-event-id";
/// Unix seconds of a signed request; part of the signed material.
pub const TIMESTAMP_HEADER: &str = "x-leadsync-timestamp";
/// The default name of the signature header.
pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Leadsync-Signature";
/// How much of an error response body a rejection reason quotes.
const BODY_SNIPPET_CHARS: usize = 500;

/// Headers the sink sets itself; `headers` may not override them.
const RESERVED: [&str; 5] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// The receiver's URL (e.g. the HTTP POST URL of a Power Automate flow); every lead is POSTed here.
    pub url: String,
    /// Extra headers sent with every request, name -> value (plain text; use `bearer_token` for a secret).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer_token: Option<SecretSource>,
    /// When set, every request is signed with HMAC-SHA256 (see docs/sinks/webhook.md).
    pub hmac_secret: Option<SecretSource>,
    /// The header that carries the signature `sha256=<lowercase hex>`.
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// Requests in flight at once; each lead is one request.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// Timeout of one request, response body included.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Accept an `http://` URL (local tests only: leads carry personal data).
    #[serde(default)]
    pub allow_http: bool,
    /// Retries of one lead on timeouts, connection errors, 408, 429 and 5xx.
    #[serde(default)]
    pub retry: RetrySettings,
}

fn default_signature_header() -> String {
    DEFAULT_SIGNATURE_HEADER.into()
}
fn default_parallelism() -> usize {
    4
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `scheme://host[:port]/path`, with `?…` when there is a query: a Power Automate
/// URL carries its credential (`sig=`) in the query.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let mut shown = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
            if let Some(port) = u.port() {
                shown.push_str(&format!(":{port}"));
            }
            shown.push_str(u.path());
            if u.query().is_some() {
                shown.push_str("?…");
            }
            shown
        }
        Err(_) => "<not a URL>".into(),
    }
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &shown_url(&self.url))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("bearer_token", &self.bearer_token)
            .field("hmac_secret", &self.hmac_secret)
            .field("signature_header", &self.signature_header)
            .field("parallelism", &self.parallelism)
            .field("request_timeout", &self.request_timeout)
            .field("allow_http", &self.allow_http)
            .field("retry", &self.retry)
            .finish()
    }
}

fn bad<T>(key: &str, message: String) -> Result<T, (String, String)> {
    Err((format!("sink.webhook.{key}"), message))
}

fn is_ours(name: &str) -> bool {
    name.starts_with("x-leadsync-")
}

impl WebhookSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let url = http::check_url("sink.webhook.url", &self.url, self.allow_http)?;
        let has_authorization = self.bearer_token.is_some()
            || self
                .headers
                .keys()
                .any(|name| name.trim().eq_ignore_ascii_case("authorization"));
        if has_authorization && url.query_pairs().any(|(name, _)| name == "sig") {
            // Power Automate and Logic Apps answer 400 DirectApiRequestHasMoreThanOneAuthorization
            // to a request carrying both their shared access signature and an Authorization header.
            return bad(
                "bearer_token",
                "the URL already carries a shared access signature (sig=), as Power Automate and Logic Apps URLs do; \
                 such endpoints refuse a request that also has an Authorization header: remove bearer_token"
                    .into(),
            );
        }
        let signature = self.validate_signature_header()?;
        self.validate_headers(&signature)?;
        if self.parallelism == 0 {
            return bad("parallelism", "must be at least 1".into());
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero".into());
        }
        self.retry.validate("sink.webhook.retry")?;
        Ok(())
    }

    /// `signature_header`: a header name leadsync does not set already.
    fn validate_signature_header(&self) -> Result<HeaderName, (String, String)> {
        let signature = match HeaderName::from_bytes(self.signature_header.trim().as_bytes()) {
            Ok(name) => name,
            Err(_) => {
                return bad(
                    "signature_header",
                    format!(
                        "{:?} is not a valid HTTP header name",
                        self.signature_header
                    ),
                )
            }
        };
        if RESERVED.contains(&signature.as_str())
            || signature == AUTHORIZATION
            || [
                KEY_HEADER,
                STAGE_HEADER,
                DO_NOT_CONTACT_HEADER,
                TIMESTAMP_HEADER,
            ]
            .contains(&signature.as_str())
        {
            return bad(
                "signature_header",
                format!("{signature} is a header leadsync sets itself; choose another name"),
            );
        }
        Ok(signature)
    }

    /// `headers`: valid, none leadsync sets itself, none twice.
    fn validate_headers(&self, signature: &HeaderName) -> Result<(), (String, String)> {
        let mut seen = std::collections::HashSet::new();
        for (name, value) in &self.headers {
            let Ok(parsed) = HeaderName::from_bytes(name.trim().as_bytes()) else {
                return bad(
                    "headers",
                    format!("{name:?} is not a valid HTTP header name"),
                );
            };
            if HeaderValue::from_str(value).is_err() {
                return bad(
                    "headers",
                    format!("the value of {name:?} is not a valid HTTP header value (visible ASCII only)"),
                );
            }
            let reserved = RESERVED.contains(&parsed.as_str())
                || is_ours(parsed.as_str())
                || parsed.as_str() == signature.as_str()
                || (parsed == AUTHORIZATION && self.bearer_token.is_some());
            if reserved {
                return bad(
                    "headers",
                    format!("{name:?} is a header leadsync sets itself"),
                );
            }
            if !seen.insert(parsed.clone()) {
                return bad(
                    "headers",
                    format!("{name:?} is given twice (header names ignore case)"),
                );
            }
        }
        Ok(())
    }
}

/// The marketplace's HTTPS-endpoint payload. Keys the lead has no value for are
/// left out: the marketplace schema requires none and types every one as string,
/// so an absent key passes a receiver's schema check where `null` would fail it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct MarketplacePayload {
    user_details: UserDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    lead_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offer_title: Option<String>,
    description: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct UserDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    company: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
}

fn text(field: LeadField, lead: &CustomerLead) -> Option<String> {
    match field.value(lead)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        serde_json::Value::String(_) => None,
        other => Some(other.to_string()),
    }
}

/// `<Source>-<Action>|<publisher.offer>` of one event, the marketplace's grammar;
/// missing parts are left out.
fn lead_source(event: &HistoryEntry) -> Option<String> {
    let left = match (event.source.as_deref(), event.action.as_str()) {
        (Some(source), "") => source.to_owned(),
        (Some(source), action) => format!("{source}-{action}"),
        (None, action) => action.to_owned(),
    };
    match &event.offer {
        Some(offer) => Some(format!("{left}|{offer}")),
        None => (!left.is_empty()).then_some(left),
    }
}

fn payload(lead: &CustomerLead) -> MarketplacePayload {
    MarketplacePayload {
        user_details: UserDetails {
            first_name: text(LeadField::FirstName, lead),
            last_name: text(LeadField::LastName, lead),
            email: text(LeadField::Email, lead),
            phone: text(LeadField::Phone, lead),
            country: text(LeadField::Country, lead),
            company: text(LeadField::Company, lead),
            title: text(LeadField::Title, lead),
        },
        lead_source: lead.history.last().and_then(lead_source),
        action_code: text(LeadField::Action, lead),
        offer_title: text(LeadField::OfferTitle, lead),
        description: lead.summary.clone(),
    }
}

/// The body bytes POSTed for `lead`.
fn body(lead: &CustomerLead) -> Vec<u8> {
    // Strings only, nothing that can fail to serialise.
    serde_json::to_vec(&payload(lead)).expect("the payload serialises to JSON")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The idempotency key of one customer version (see [`EVENT_ID_HEADER`]).
fn event_id(key: &str, body: &[u8]) -> String {
    let mut hash = <Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut hash, key.as_bytes());
    sha2::Digest::update(&mut hash, b"\n");
    sha2::Digest::update(&mut hash, body);
    hex(&sha2::Digest::finalize(hash)[..16])
}

/// `sha256=` + lowercase hex of HMAC-SHA256(secret, `<timestamp>.<body>`).
fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// The one place that says what a status means.
fn classify(status: StatusCode, after: Option<Duration>, body: &str) -> Verdict {
    let quoted = http::quoted(body, BODY_SNIPPET_CHARS);
    if status.is_success() {
        Verdict::Delivered
    } else if http::is_transient_status(status) {
        Verdict::Retry {
            after,
            reason: format!("the endpoint answered {}{quoted}", status_text(status)),
        }
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        Verdict::Endpoint {
            reason: format!(
                "the endpoint refused our credentials ({}{quoted}); check sink.webhook.bearer_token, headers and hmac_secret",
                status_text(status)
            ),
        }
    } else if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
        Verdict::Endpoint {
            reason: format!(
                "the endpoint does not exist ({}{quoted}): was the flow deleted or its URL changed? check sink.webhook.url",
                status_text(status)
            ),
        }
    } else if status.is_redirection() {
        Verdict::Endpoint {
            reason: format!(
                "the endpoint answered {} (a redirect, not followed: it would send the lead, its signature and headers elsewhere); set sink.webhook.url to the final URL",
                status_text(status)
            ),
        }
    } else {
        Verdict::Reject {
            reason: format!(
                "the endpoint refused the lead: {}{quoted}",
                status_text(status)
            ),
        }
    }
}

/// The HTTPS endpoint sink.
pub struct WebhookSink {
    client: reqwest::Client,
    url: reqwest::Url,
    shown_url: String,
    /// User headers and `Authorization`, the same for every request.
    headers: HeaderMap,
    hmac_secret: Option<SecretString>,
    signature_header: HeaderName,
    /// Every secret, to scrub from anything a receiver echoes back.
    secrets: Vec<SecretString>,
    parallelism: usize,
    request_timeout: Duration,
    retry: RetrySettings,
}

impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSink")
            .field("url", &self.shown_url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("signed", &self.hmac_secret.is_some())
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// Validates the settings and reads the secrets; no I/O beyond that.
    pub fn new(settings: &WebhookSettings) -> Result<Self, SinkError> {
        settings
            .validate()
            .map_err(|e| SinkError::config(SINK, e))?;
        let url = http::check_url("sink.webhook.url", &settings.url, settings.allow_http)
            .map_err(|e| SinkError::config(SINK, e))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &settings.headers {
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
                SinkError::new(SINK, format!("{name:?} is not a valid header name"))
            })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| {
                SinkError::new(
                    SINK,
                    format!("the value of {name} is not a valid header value"),
                )
            })?;
            // Plain values may still be keys; keep them out of Debug output.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut secrets = Vec::new();
        if let Some(source) = &settings.bearer_token {
            let token = source
                .resolve("sink.webhook.bearer_token")
                .map_err(|e| SinkError::new(SINK, e.to_string()))?;
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .map_err(|_| {
                    SinkError::new(SINK, "config key `sink.webhook.bearer_token`: the token is not valid in an HTTP header")
                })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
            secrets.push(token);
        }
        let hmac_secret = match &settings.hmac_secret {
            Some(source) => {
                let secret = source
                    .resolve("sink.webhook.hmac_secret")
                    .map_err(|e| SinkError::new(SINK, e.to_string()))?;
                secrets.push(secret.clone());
                Some(secret)
            }
            None => None,
        };
        let signature_header = HeaderName::from_bytes(settings.signature_header.trim().as_bytes())
            .map_err(|_| {
                SinkError::new(
                    SINK,
                    "config key `sink.webhook.signature_header`: not a header name",
                )
            })?;
        let client = http::client_without_redirects(settings.request_timeout)
            .map_err(|e| SinkError::new(SINK, e))?;
        Ok(Self {
            client,
            shown_url: shown_url(url.as_str()),
            url,
            headers,
            hmac_secret,
            signature_header,
            secrets,
            parallelism: settings.parallelism,
            request_timeout: settings.request_timeout,
            retry: settings.retry.clone(),
        })
    }

    /// Replaces any secret a receiver echoed back.
    fn scrub(&self, mut text: String) -> String {
        for secret in &self.secrets {
            let secret = secret.expose_secret();
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, "[redacted]");
            }
        }
        text
    }

    /// The timestamp and signature headers for `body`, when signing is on.
    fn sign(&self, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(secret) = &self.hmac_secret {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let sig = signature(secret.expose_secret().as_bytes(), now, body);
            headers.insert(TIMESTAMP_HEADER, HeaderValue::from(now));
            headers.insert(
                self.signature_header.clone(),
                HeaderValue::from_str(&sig).expect("hex is a valid header value"),
            );
        }
        headers
    }

    fn lead_headers(lead: &CustomerLead) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        // from_bytes, not from_str: an email key may hold UTF-8.
        let key = HeaderValue::from_bytes(lead.external_key.as_bytes()).map_err(|_| {
            "the customer key cannot be sent in the X-Leadsync-Key header (control characters)"
                .to_owned()
        })?;
        headers.insert(KEY_HEADER, key);
        headers.insert(STAGE_HEADER, HeaderValue::from_static(lead.stage.as_str()));
        headers.insert(
            DO_NOT_CONTACT_HEADER,
            HeaderValue::from_static(if lead.do_not_contact { "true" } else { "false" }),
        );
        Ok(headers)
    }

    async fn attempt(&self, body: &[u8], lead_headers: &HeaderMap) -> Step<Result<(), String>> {
        let sent = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .headers(lead_headers.clone())
            .headers(self.sign(body))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return Step::Retry {
                    after: None,
                    reason: self.scrub(http::transport_reason(
                        e,
                        self.request_timeout,
                        "sink.webhook.request_timeout",
                    )),
                }
            }
        };
        let status = response.status();
        let after = http::retry_after(response.headers());
        let text = if status.is_success() {
            String::new()
        } else {
            response
                .text()
                .await
                .unwrap_or_else(|e| format!("(body unreadable: {})", e.without_url()))
        };
        classify(status, after, &self.scrub(text)).step()
    }

    async fn deliver_one(&self, lead: &CustomerLead) -> Outcome {
        let lead_headers = match Self::lead_headers(lead) {
            Ok(headers) => headers,
            Err(reason) => return Outcome::Rejected { reason },
        };
        let body = body(lead);
        let mut lead_headers = lead_headers;
        lead_headers.insert(
            EVENT_ID_HEADER,
            HeaderValue::from_str(&event_id(&lead.external_key, &body))
                .expect("hex is a valid header value"),
        );
        let finished =
            http::retrying(&self.retry, SINK, |_| self.attempt(&body, &lead_headers)).await;
        match finished {
            Finished::Done(Ok(())) => {
                tracing::debug!(customer = %lead.external_key, "Lead posted to the HTTPS endpoint.");
                Outcome::Delivered
            }
            Finished::Done(Err(reason)) => Outcome::EndpointFailed { reason },
            Finished::GaveUp { after, reason } => Outcome::RetryLater { after, reason },
            Finished::Failed { reason } => Outcome::Rejected { reason },
        }
    }
}

#[async_trait::async_trait]
impl LeadSink for WebhookSink {
    fn name(&self) -> &str {
        SINK
    }

    /// Up to `parallelism` requests in flight, finishing in any order: a slow answer
    /// holds one slot, not the window behind it. The outcomes are put back in the
    /// order of the leads.
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        // Collected first: a lazy `map` closure trips the Send check of async_trait.
        let requests: Vec<_> = batch
            .iter()
            .enumerate()
            .map(|(i, lead)| async move { (i, self.deliver_one(lead).await) })
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut answered = futures::stream::iter(requests).buffer_unordered(self.parallelism);
        while let Some((i, outcome)) = answered.next().await {
            outcomes[i] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("every request of the batch answered"))
            .collect()
    }

    /// A `HEAD` to the URL with the configured headers (signed over an empty body):
    /// any answer below 500 but 401/403 means reachable.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        let response = self
            .client
            .head(self.url.clone())
            .headers(self.headers.clone())
            .headers(self.sign(b""))
            .send()
            .await
            .map_err(|e| {
                SinkError::new(
                    SINK,
                    format!(
                        "cannot reach {}: {}",
                        self.shown_url,
                        self.scrub(http::transport_reason(
                            e,
                            self.request_timeout,
                            "sink.webhook.request_timeout"
                        ))
                    ),
                )
            })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(SinkError::new(SINK, format!(
                "{} refused our credentials ({}): check sink.webhook.bearer_token, headers and hmac_secret",
                self.shown_url,
                status_text(status)
            )));
        }
        if status.is_server_error() {
            return Err(SinkError::new(
                SINK,
                format!("{} answered {}", self.shown_url, status_text(status)),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentitySettings;
    use crate::identity::{CustomerKey, CustomerState};
    use crate::lead::normalise;
    use crate::source::row::{RawRow, RowId};
    use serde_json::json;

    fn lead(customer: serde_json::Value, lead_sources: &[&str]) -> CustomerLead {
        let settings = IdentitySettings::default();
        let events: Vec<_> = lead_sources
            .iter()
            .enumerate()
            .map(|(i, ls)| {
                let columns = json!({
                    "LeadSource": ls,
                    "CustomerInfo": customer.to_string(),
                    "OfferDisplayName": "Contoso Analytics",
                });
                let serde_json::Value::Object(columns) = columns else {
                    unreachable!()
                };
                normalise(&RawRow {
                    id: RowId::new("p", format!("r{i}")),
                    etag: format!("W/{i}"),
                    timestamp: crate::timestamp::parse(&format!("2024-05-0{}T10:00:00Z", i + 1))
                        .unwrap(),
                    columns,
                })
                .unwrap()
            })
            .collect();
        let mut state =
            CustomerState::new(&CustomerKey::Email("ana@fabrikam.com".into()), &settings);
        state.apply(&events, &settings);
        state.lead
    }

    fn settings(extra: &str) -> WebhookSettings {
        toml_like(&format!(
            "url = \"https://hooks.example.com/leads?code=SECRETSIG\"\n{extra}"
        ))
    }

    fn toml_like(text: &str) -> WebhookSettings {
        let source = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .unwrap();
        source.try_deserialize().unwrap()
    }

    #[test]
    fn the_payload_has_the_marketplace_shape_and_leaves_out_what_the_lead_lacks() {
        let lead = lead(
            json!({"FirstName": "Ana", "LastName": "Silva", "Email": "Ana@Fabrikam.com", "Country": "PT"}),
            &[
                "AppSource (SPZA)-PLT | contoso.analytics",
                "AzureMarketplace-INS | contoso.analytics",
            ],
        );

        let value: serde_json::Value = serde_json::from_slice(&body(&lead)).unwrap();

        assert_eq!(
            value["UserDetails"],
            json!({"FirstName": "Ana", "LastName": "Silva", "Email": "Ana@Fabrikam.com", "Country": "PT"})
        );
        assert_eq!(
            value["LeadSource"],
            "AzureMarketplace-INS|contoso.analytics"
        );
        assert_eq!(value["ActionCode"], "INS");
        assert_eq!(value["OfferTitle"], "Contoso Analytics");
        assert_eq!(value["Description"], lead.summary.as_str());
        assert_eq!(value.as_object().unwrap().len(), 5);
    }

    #[test]
    fn an_empty_customer_still_sends_an_empty_user_details_object() {
        let lead = lead(json!({}), &["AzurePortal-Create"]);

        let value: serde_json::Value = serde_json::from_slice(&body(&lead)).unwrap();

        assert_eq!(value["UserDetails"], json!({}));
        assert_eq!(value["LeadSource"], "AzurePortal-Create");
    }

    #[test]
    fn the_lead_source_follows_the_marketplace_grammar_with_missing_parts_left_out() {
        let mut event = lead(json!({}), &["AzureMarketplace-INS|a.b"]).history[0].clone();
        assert_eq!(
            lead_source(&event).as_deref(),
            Some("AzureMarketplace-INS|a.b")
        );
        event.offer = None;
        assert_eq!(lead_source(&event).as_deref(), Some("AzureMarketplace-INS"));
        event.source = None;
        assert_eq!(lead_source(&event).as_deref(), Some("INS"));
        event.action = String::new();
        assert_eq!(lead_source(&event), None);
    }

    #[test]
    fn statuses_are_classified_in_one_place() {
        let cases = [
            (200, "delivered"),
            (201, "delivered"),
            (202, "delivered"),
            (204, "delivered"),
            (408, "retry"),
            (429, "retry"),
            (500, "retry"),
            (502, "retry"),
            (503, "retry"),
            (401, "endpoint"),
            (403, "endpoint"),
            (404, "endpoint"),
            (410, "endpoint"),
            (301, "endpoint"),
            (307, "endpoint"),
            (400, "reject"),
            (409, "reject"),
            (413, "reject"),
            (422, "reject"),
        ];
        for (code, expected) in cases {
            let verdict = classify(StatusCode::from_u16(code).unwrap(), None, "oops");
            let got = match verdict {
                Verdict::Delivered => "delivered",
                Verdict::Retry { .. } => "retry",
                Verdict::Endpoint { .. } => "endpoint",
                Verdict::Reject { .. } => "reject",
            };
            assert_eq!(got, expected, "HTTP {code}");
        }
    }

    #[test]
    fn a_rejection_quotes_the_status_and_at_most_500_characters_of_the_body() {
        let body = "x".repeat(2000);

        let Verdict::Reject { reason } = classify(StatusCode::BAD_REQUEST, None, &body) else {
            panic!("400 is a rejection")
        };

        assert!(reason.contains("HTTP 400 Bad Request"), "{reason}");
        assert!(
            reason.chars().filter(|c| *c == 'x').count() < 500,
            "{reason}"
        );
    }

    #[test]
    fn the_signature_is_the_hmac_of_timestamp_dot_body_in_lowercase_hex() {
        let sig = signature(b"key", 1_700_000_000, b"{}");

        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"1700000000.{}");
        let expected = mac.finalize().into_bytes();
        assert_eq!(sig, format!("sha256={}", hex(&expected)));
        assert_eq!(sig.len(), "sha256=".len() + 64);
        assert!(sig[7..]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    }

    #[test]
    fn validation_names_the_key_of_each_mistake() {
        let cases = [
            ("url = \"http://hooks.example.com/\"", "sink.webhook.url"),
            ("url = \"not a url\"", "sink.webhook.url"),
            (
                "url = \"https://h.example.com/\"\nheaders = { \"Bad Name\" = \"x\" }",
                "sink.webhook.headers",
            ),
            (
                "url = \"https://h.example.com/\"\nheaders = { \"X-Leadsync-Key\" = \"x\" }",
                "sink.webhook.headers",
            ),
            (
                "url = \"https://h.example.com/\"\nheaders = { \"Content-Type\" = \"text/plain\" }",
                "sink.webhook.headers",
            ),
            (
                "url = \"https://h.example.com/\"\nheaders = { \"X-A\" = \"line\\nbreak\" }",
                "sink.webhook.headers",
            ),
            (
                "url = \"https://h.example.com/\"\nheaders = { \"Authorization\" = \"x\" }\nbearer_token = { value = \"t\" }",
                "sink.webhook.headers",
            ),
            (
                "url = \"https://h.example.com/\"\nsignature_header = \"X-Leadsync-Timestamp\"",
                "sink.webhook.signature_header",
            ),
            (
                "url = \"https://h.example.com/\"\nsignature_header = \"no good\"",
                "sink.webhook.signature_header",
            ),
            (
                "url = \"https://prod.westus.logic.azure.com/workflows/1/triggers/manual/paths/invoke?sp=x&sig=y\"\nbearer_token = { value = \"t\" }",
                "sink.webhook.bearer_token",
            ),
            ("url = \"https://h.example.com/\"\nparallelism = 0", "sink.webhook.parallelism"),
            (
                "url = \"https://h.example.com/\"\nrequest_timeout = \"0s\"",
                "sink.webhook.request_timeout",
            ),
            (
                "url = \"https://h.example.com/\"\nretry = { max_attempts = 0 }",
                "sink.webhook.retry.max_attempts",
            ),
        ];
        for (text, key) in cases {
            let err = toml_like(text).validate().expect_err(text);
            assert_eq!(err.0, key, "{text}: {}", err.1);
        }
        assert!(
            toml_like("url = \"http://127.0.0.1:1/\"\nallow_http = true")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn debug_output_shows_neither_secrets_nor_the_url_query_nor_header_values() {
        let s = settings(
            "headers = { \"X-Api-Key\" = \"HEADERVALUE\" }\nbearer_token = { value = \"BEARERTOKEN\" }\nhmac_secret = { value = \"HMACSECRET\" }",
        );
        let sink = WebhookSink::new(&s).unwrap();

        for text in [
            format!("{s:?}"),
            format!("{sink:?}"),
            format!("{:?}", sink.headers),
        ] {
            for secret in ["SECRETSIG", "HEADERVALUE", "BEARERTOKEN", "HMACSECRET"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
        assert!(format!("{s:?}").contains("https://hooks.example.com/leads?…"));
    }
}
