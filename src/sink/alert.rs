//! Alert sinks: a message in the publisher's sales channel the moment a customer
//! starts a trial or buys (Microsoft Teams through a Workflows webhook, Slack through
//! an incoming webhook). The marketplace asks publishers to follow up within 24 hours
//! and to email a test-drive lead "while they are still warm"; an alert is how sales
//! hears of it.
//!
//! # What triggers a message
//!
//! An alert sink is handed every merged customer record like any sink, and posts at
//! most one message per record, when the record's **newest event** (the last of its
//! history) both
//! - has a stage listed in `stages` (default `trial` and `active`: a test drive
//!   started, a "Get it now" install or an Azure portal purchase), and
//! - is the first event of this customer to reach that stage (or a higher one) on that
//!   offer: the event raised the customer's stage, or it is a trial/purchase of an
//!   offer the customer had not reached that stage on before.
//!
//! So a customer gets one message per stage reached per offer; a record that changed
//! for any other reason (a new phone number, a second "Contact me", a repeated
//! install of the same offer) and a do-not-contact customer get none. Every lead
//! that needs no message is answered [`Outcome::Delivered`] without a request: nothing
//! is lost, and nothing is re-sent, because the pipeline offers a record again only
//! when it changed (or under `leadsync replay --resend`, which posts again
//! what qualifies).
//!
//! The decision reads the record alone, so the same record version always decides
//! the same. Two narrow cases remain: an event that becomes visible late, with an
//! older Timestamp than one already merged, is not the newest and posts nothing; and
//! the record it changed still ends in the event that was alerted already, which
//! the sink remembers (in memory, per process) so as not to post it twice. After a
//! restart, or after a crash between the post and the checkpoint, a message may be
//! posted again (at least once, never silently dropped).

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use super::http::Verdict;
use super::http::{self, status_text, Finished, Step};
use super::mapping;
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::identity::{action_label, stage_label, HistoryEntry};
use crate::lead::Stage;
use crate::retry::RetrySettings;
use crate::secret::SecretSource;

/// How much of an error response a reason quotes.
const BODY_SNIPPET_CHARS: usize = 300;
/// How many alerted events a sink remembers before it starts over.
const REMEMBERED: usize = 100_000;
/// The marketplace asks publishers to follow up on a lead within 24 hours.
pub const FOLLOW_UP_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// `[sink.teams]` and `[sink.slack]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSettings {
    /// The webhook URL. It carries its credential (Teams: `sig=` in the query; Slack:
    /// the path), so it is only accepted as a secret: `{ env = "..." }`, `{ file = "..." }`,
    /// `{ credential = "..." }` (or `{ value = "..." }`).
    pub url: SecretSource,
    /// The stages that post a message (see the module documentation).
    #[serde(default = "default_stages")]
    pub stages: Vec<Stage>,
    /// Timeout of one request, response body included.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Least time between two messages (Slack's default 1s: Slack allows about one
    /// message per second per incoming webhook; Teams' default 0s).
    #[serde(default, with = "humantime_serde")]
    pub min_interval: Option<Duration>,
    /// Accept an `http://` URL and any host (local tests only).
    #[serde(default)]
    pub allow_http: bool,
    /// Retries of one message on timeouts, connection errors, 408, 429 and 5xx.
    #[serde(default)]
    pub retry: RetrySettings,
}

/// `[sink.teams]`.
pub type TeamsSettings = AlertSettings;
/// `[sink.slack]`.
pub type SlackSettings = AlertSettings;

/// The stages that alert unless `stages` says otherwise: a trial and a purchase.
pub fn default_stages() -> Vec<Stage> {
    vec![Stage::Trial, Stage::Active]
}

/// Checks an alert sink's `stages` (`key` names it in the error).
pub fn validate_stages(key: &str, stages: &[Stage]) -> Result<(), (String, String)> {
    if stages.is_empty() {
        return Err((
            key.to_owned(),
            "must name at least one stage (\"initial_interest\", \"trial\", \"active\")".into(),
        ));
    }
    if let Some(bad) = stages
        .iter()
        .find(|s| matches!(s, Stage::Unknown | Stage::DoNotContact))
    {
        return Err((
            key.to_owned(),
            format!(
                "{:?} is not a stage worth an alert (use \"initial_interest\", \"trial\", \"active\")",
                bad.as_str()
            ),
        ));
    }
    Ok(())
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The chat service an alert sink posts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Teams,
    Slack,
}

impl Vendor {
    /// The sink's name, also its `sink.kind` and config section.
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Teams => "teams",
            Vendor::Slack => "slack",
        }
    }

    fn default_interval(self) -> Duration {
        match self {
            Vendor::Teams => Duration::ZERO,
            Vendor::Slack => Duration::from_secs(1),
        }
    }
}

impl AlertSettings {
    /// Checks what types cannot express; `vendor` names the section in the key.
    /// The URL itself is a secret, checked when the sink is built (see [`check_alert_url`]).
    pub fn validate(&self, vendor: Vendor) -> Result<(), (String, String)> {
        let key = |k: &str| format!("sink.{}.{k}", vendor.name());
        validate_stages(&key("stages"), &self.stages)?;
        if self.request_timeout.is_zero() {
            return Err((key("request_timeout"), "must be greater than zero".into()));
        }
        if let (Some(interval), Vendor::Slack) = (self.min_interval, vendor) {
            if interval < Duration::from_millis(100) && !self.allow_http {
                return Err((
                    key("min_interval"),
                    "Slack allows about one message per second per incoming webhook; use at least 100ms (1s recommended)".into(),
                ));
            }
        }
        self.retry.validate(&key("retry"))?;
        Ok(())
    }
}

/// Checks a webhook URL (the resolved secret) for `vendor`; the error never quotes it.
pub fn check_alert_url(
    vendor: Vendor,
    url: &str,
    allow_http: bool,
) -> Result<reqwest::Url, (String, String)> {
    let key = format!("sink.{}.url", vendor.name());
    let parsed = http::check_url(&key, url, allow_http)
        // The parser's message never holds the URL; the URL stays out of it.
        .map_err(|(k, m)| (k, m.replace(url, "<url>")))?;
    if allow_http {
        return Ok(parsed);
    }
    let host = parsed.host_str().unwrap_or("").to_ascii_lowercase();
    let path = parsed.path();
    let ok = match vendor {
        // The two forms of a Workflows "When a Teams webhook request is received" URL:
        // https://<region>.logic.azure.com:443/workflows/<id>/triggers/manual/paths/invoke?...&sig=...
        // https://<env>.environment.api.powerplatform.com:443/powerautomate/automations/direct/workflows/<id>/triggers/manual/paths/invoke?...&sig=...
        Vendor::Teams => {
            if host.ends_with(".webhook.office.com") || host == "outlook.office.com" {
                return Err((
                    key,
                    "this is an Office 365 connector (incoming webhook) URL; Microsoft retired those connectors: \
                     create a Workflows webhook (template \"Send webhook alerts to a channel\") and use its URL"
                        .into(),
                ));
            }
            let logic = host.ends_with(".logic.azure.com") && path.starts_with("/workflows/");
            let power = host.ends_with(".environment.api.powerplatform.com")
                && path.contains("/workflows/");
            let signed = parsed.query_pairs().any(|(k, _)| k == "sig");
            if (logic || power) && !signed {
                return Err((
                    key,
                    "the Workflows URL has no sig= parameter: copy the whole HTTP POST URL of the trigger".into(),
                ));
            }
            logic || power
        }
        // https://hooks.slack.com/services/T.../B.../<token> (GovSlack: hooks.slack-gov.com).
        Vendor::Slack => {
            (host == "hooks.slack.com" || host == "hooks.slack-gov.com")
                && path.starts_with("/services/")
                && path.trim_end_matches('/').split('/').count() >= 5
        }
    };
    if ok {
        Ok(parsed)
    } else {
        let expected = match vendor {
            Vendor::Teams => "https://<region>.logic.azure.com/workflows/... or https://<env>.environment.api.powerplatform.com/.../workflows/... (the URL of a Workflows \"When a Teams webhook request is received\" trigger)",
            Vendor::Slack => "https://hooks.slack.com/services/T.../B.../... (a Slack app's incoming webhook)",
        };
        Err((
            key,
            format!("not a {} webhook URL: expected {expected}", vendor.name()),
        ))
    }
}

/// What a shown URL keeps: scheme, host, port, and for Teams the path (a workflow id,
/// no credential); the query (`sig=`) and Slack's path (its token) become `…`.
pub fn shown_url(vendor: Vendor, url: &reqwest::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    match vendor {
        Vendor::Teams => {
            shown.push_str(url.path());
            if url.query().is_some() {
                shown.push_str("?…");
            }
        }
        Vendor::Slack => shown.push_str("/…"),
    }
    shown
}

/// One message to post: a customer reached `stage` with `event`.
#[derive(Debug)]
pub struct Alert<'a> {
    pub lead: &'a CustomerLead,
    pub event: &'a HistoryEntry,
    pub stage: Stage,
}

/// The alert `lead` calls for, if any (see the module documentation).
pub fn trigger<'a>(lead: &'a CustomerLead, stages: &[Stage]) -> Option<Alert<'a>> {
    if lead.do_not_contact {
        return None;
    }
    let (newest, earlier) = lead.history.split_last()?;
    let stage = newest.stage;
    if !stages.contains(&stage) {
        return None;
    }
    let reached_before = earlier
        .iter()
        .any(|h| h.offer == newest.offer && h.stage != Stage::DoNotContact && h.stage >= stage);
    (!reached_before).then_some(Alert {
        lead,
        event: newest,
        stage,
    })
}

/// The vendor-neutral content of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `New trial: Ana Silva (Fabrikam)`.
    pub title: String,
    /// Label and value, in order; empty values left out.
    pub facts: Vec<(&'static str, String)>,
    /// The next step of the record's summary.
    pub next_step: String,
    /// When the marketplace's 24 hours to follow up end (`2024-05-03 10:00 UTC`):
    /// the event's Timestamp plus [`FOLLOW_UP_WITHIN`].
    pub deadline: String,
    /// A line naming the record (its hashed key) for the reader who looks it up.
    pub footer: String,
    /// The customer's record in the CRM, when another sink of the deployment knows it.
    pub link: Option<String>,
}

fn headline(stage: Stage) -> &'static str {
    match stage {
        Stage::Active => "New customer",
        Stage::Trial => "New trial",
        Stage::InitialInterest => "New contact request",
        Stage::Unknown | Stage::DoNotContact => "New lead",
    }
}

/// The text after `Next step:` in the summary (the default template ends with it),
/// else the whole summary; at most 1,000 characters.
fn next_step(summary: &str) -> String {
    let text = match summary.rfind("Next step:") {
        Some(i) => summary[i + "Next step:".len()..].trim(),
        None => summary.trim(),
    };
    mapping::truncate(text, 1000).0
}

impl Alert<'_> {
    /// What the message says.
    pub fn message(&self) -> Message {
        let c = &self.lead.customer;
        let name = [c.first_name.as_deref(), c.last_name.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let name = if name.trim().is_empty() {
            "Unnamed customer".to_owned()
        } else {
            name
        };
        let title = match &c.company {
            Some(company) => format!("{}: {name} ({company})", headline(self.stage)),
            None => format!("{}: {name}", headline(self.stage)),
        };
        let offer = match (&self.event.offer_title, &self.event.offer) {
            (Some(title), Some(id)) => format!("{title} ({id})"),
            (Some(title), None) => title.clone(),
            (None, Some(id)) => id.clone(),
            (None, None) => String::new(),
        };
        let action = match &self.event.source {
            Some(source) => format!("{} via {source}", action_label(&self.event.action)),
            None => action_label(&self.event.action).to_owned(),
        };
        let when = minutes(self.event.timestamp);
        let mut stage = stage_label(self.stage).to_owned();
        if self.lead.test_lead {
            stage.push_str(" (marketplace test lead)");
        }
        let facts = [
            ("Customer", name),
            ("Company", c.company.clone().unwrap_or_default()),
            (
                "Email",
                c.email
                    .as_ref()
                    .map(|e| e.original.clone())
                    .unwrap_or_default(),
            ),
            ("Phone", c.phone.clone().unwrap_or_default()),
            ("Job title", c.title.clone().unwrap_or_default()),
            ("Country", c.country.clone().unwrap_or_default()),
            ("Offer", offer),
            ("Action", action),
            ("When", when),
            ("Stage", stage),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect();
        Message {
            title,
            facts,
            next_step: next_step(&self.lead.summary),
            deadline: minutes(self.event.timestamp + FOLLOW_UP_WITHIN),
            footer: format!("leadsync · {}", self.lead.log_key()),
            link: None,
        }
    }

    /// Identifies the alerted event (customer, row version, stage) for [`Alerted`].
    pub fn id(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.lead.key.hash(&mut h);
        self.event.row.partition_key.hash(&mut h);
        self.event.row.row_key.hash(&mut h);
        self.event.etag.hash(&mut h);
        self.stage.hash(&mut h);
        h.finish()
    }
}

/// `2024-05-02 10:00 UTC`, from a Timestamp's RFC 3339 form.
fn minutes(at: time::OffsetDateTime) -> String {
    let mut stamp = String::new();
    crate::timestamp::write(at, &mut stamp);
    match (stamp.get(..10), stamp.get(11..16)) {
        (Some(date), Some(time)) => format!("{date} {time} UTC"),
        _ => stamp,
    }
}

/// The events an alert sink of this process has alerted (see the module
/// documentation): a record that changed but still ends in one of them alerts nothing.
#[derive(Debug, Default)]
pub struct Alerted(Mutex<HashSet<u64>>);

impl Alerted {
    /// Whether `alert`'s event was alerted already.
    pub fn contains(&self, alert: &Alert<'_>) -> bool {
        self.0.lock().expect("not poisoned").contains(&alert.id())
    }

    /// Remembers `alert`'s event as alerted.
    pub fn remember(&self, alert: &Alert<'_>) {
        let mut alerted = self.0.lock().expect("not poisoned");
        if alerted.len() >= REMEMBERED {
            alerted.clear();
        }
        alerted.insert(alert.id());
    }

    /// Forgets an event remembered by [`Alerted::remember`] (its alert was not kept).
    pub fn forget(&self, id: u64) {
        self.0.lock().expect("not poisoned").remove(&id);
    }
}

/// The alert `lead` calls for that this process has not alerted yet, logging why not
/// when there is none; every alert sink decides with it.
pub fn due<'a>(
    sink: &str,
    lead: &'a CustomerLead,
    stages: &[Stage],
    alerted: &Alerted,
) -> Option<Alert<'a>> {
    let Some(alert) = trigger(lead, stages) else {
        tracing::trace!(sink, customer = %lead.log_key(), "No alert: the record reached no new stage.");
        return None;
    };
    if alerted.contains(&alert) {
        tracing::debug!(sink, customer = %lead.log_key(), "No alert: this event was alerted already.");
        return None;
    }
    Some(alert)
}

/// What a status means. Slack's incoming webhooks answer `200 ok`, or an error string
/// as the body with a status (docs.slack.dev/messaging/sending-messages-using-incoming-webhooks,
/// "Handling errors": 400 `invalid_payload`/`user_not_found`/`no_text`, 403
/// `action_prohibited`/`invalid_token`/`posting_to_general_channel_denied`, 404
/// `channel_not_found`/`no_service`/`no_team`/`team_disabled`, 410 `channel_is_archived`)
/// and 429 with `Retry-After` past their rate limit (docs.slack.dev/apis/web-api/rate-limits:
/// one message per second per webhook, short bursts allowed). A Workflows trigger
/// answers 202 with an empty body once it accepted the request (the flow then posts the
/// card), 400 with a JSON error for a body it cannot take, 401/403 for a bad or missing
/// `sig`, 404 for a deleted flow or trigger, 429 when the flow is throttled.
pub fn classify(
    vendor: Vendor,
    status: StatusCode,
    after: Option<Duration>,
    body: &str,
) -> Verdict {
    let body = body.trim();
    let quoted = http::quoted(body, BODY_SNIPPET_CHARS);
    let section = vendor.name();
    if status.is_success() {
        Verdict::Delivered
    } else if http::is_transient_status(status) {
        Verdict::Retry {
            after,
            reason: format!("{section} answered {}{quoted}", status_text(status)),
        }
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        Verdict::Endpoint {
            reason: format!(
                "{section} refused the webhook ({}{quoted}); check sink.{section}.url",
                status_text(status)
            ),
        }
    } else if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
        let what = match vendor {
            Vendor::Teams => "was the workflow deleted or turned off?",
            Vendor::Slack => "was the channel archived or deleted, or the app removed?",
        };
        Verdict::Endpoint {
            reason: format!(
                "the {section} webhook is gone ({}{quoted}): {what} check sink.{section}.url",
                status_text(status)
            ),
        }
    } else if status.is_redirection() {
        Verdict::Endpoint {
            reason: format!(
                "{section} answered {} (a redirect, not followed); set sink.{section}.url to the webhook's own URL",
                status_text(status)
            ),
        }
    } else {
        Verdict::Reject {
            reason: format!(
                "{section} refused the message: {}{quoted}",
                status_text(status)
            ),
        }
    }
}

/// A Teams or Slack alert sink.
pub struct AlertSink {
    vendor: Vendor,
    client: reqwest::Client,
    url: reqwest::Url,
    shown_url: String,
    /// The URL and its secret parts, scrubbed from anything the service echoes back.
    secrets: Vec<SecretString>,
    stages: Vec<Stage>,
    min_interval: Duration,
    /// When the last message was sent; held while waiting for the next slot, so
    /// messages leave at most one per `min_interval`.
    last_sent: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    alerted: Alerted,
    request_timeout: Duration,
    retry: RetrySettings,
}

impl fmt::Debug for AlertSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertSink")
            .field("vendor", &self.vendor)
            .field("url", &self.shown_url)
            .field("stages", &self.stages)
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}

impl AlertSink {
    /// The Microsoft Teams (Workflows webhook) sink.
    pub fn teams(settings: &TeamsSettings) -> Result<Self, SinkError> {
        Self::new(Vendor::Teams, settings)
    }

    /// The Slack (incoming webhook) sink.
    pub fn slack(settings: &SlackSettings) -> Result<Self, SinkError> {
        Self::new(Vendor::Slack, settings)
    }

    /// Validates the settings and reads the URL; no I/O beyond that.
    pub fn new(vendor: Vendor, settings: &AlertSettings) -> Result<Self, SinkError> {
        let error = |message: String| SinkError {
            sink: vendor.name().into(),
            message,
        };
        let keyed =
            |(key, message): (String, String)| error(format!("config key `{key}`: {message}"));
        settings.validate(vendor).map_err(keyed)?;
        let key = format!("sink.{}.url", vendor.name());
        let secret = settings
            .url
            .resolve(&key)
            .map_err(|e| error(e.to_string()))?;
        let url =
            check_alert_url(vendor, secret.expose_secret(), settings.allow_http).map_err(keyed)?;
        let mut secrets = vec![secret];
        let path = url.path().trim_matches('/');
        if vendor == Vendor::Slack && path.len() >= 8 {
            secrets.push(SecretString::from(path.to_owned()));
        }
        for (_, value) in url.query_pairs() {
            if value.len() >= 8 {
                secrets.push(SecretString::from(value.into_owned()));
            }
        }
        let client = http::client_without_redirects(settings.request_timeout).map_err(error)?;
        Ok(Self {
            vendor,
            client,
            shown_url: shown_url(vendor, &url),
            url,
            secrets,
            stages: settings.stages.clone(),
            min_interval: settings
                .min_interval
                .unwrap_or_else(|| vendor.default_interval()),
            last_sent: tokio::sync::Mutex::new(None),
            alerted: Alerted::default(),
            request_timeout: settings.request_timeout,
            retry: settings.retry.clone(),
        })
    }

    /// Replaces the URL or any secret part of it that a response echoed back.
    fn scrub(&self, mut text: String) -> String {
        for secret in &self.secrets {
            let secret = secret.expose_secret();
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, "[redacted]");
            }
        }
        text
    }

    /// The JSON body of `message` for this sink's service.
    pub fn body(&self, message: &Message) -> serde_json::Value {
        match self.vendor {
            Vendor::Teams => super::teams::payload(message),
            Vendor::Slack => super::slack::payload(message),
        }
    }

    /// Waits for the next free slot of the pace.
    async fn pace(&self) {
        let mut last = self.last_sent.lock().await;
        if let Some(at) = *last {
            let next = at + self.min_interval;
            if next > tokio::time::Instant::now() {
                crate::progress::beat();
                tokio::time::sleep_until(next).await;
            }
        }
        *last = Some(tokio::time::Instant::now());
    }

    async fn attempt(&self, body: &[u8]) -> Step<Result<(), String>> {
        self.pace().await;
        let sent = self
            .client
            .post(self.url.clone())
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
                        &format!("sink.{}.request_timeout", self.vendor.name()),
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
        classify(self.vendor, status, after, &self.scrub(text)).step()
    }

    async fn deliver_one(&self, lead: &CustomerLead, link: Option<&String>) -> Outcome {
        let Some(alert) = due(self.vendor.name(), lead, &self.stages, &self.alerted) else {
            return Outcome::Delivered;
        };
        let mut message = alert.message();
        message.link = link.cloned();
        // Strings and arrays only: serialising cannot fail.
        let body = serde_json::to_vec(&self.body(&message)).expect("JSON");
        let finished =
            http::retrying(&self.retry, self.vendor.name(), |_| self.attempt(&body)).await;
        match finished {
            Finished::Done(Ok(())) => {
                self.alerted.remember(&alert);
                tracing::info!(sink = self.vendor.name(), customer = %lead.log_key(), stage = alert.stage.as_str(), "Alert posted.");
                Outcome::Delivered
            }
            Finished::Done(Err(reason)) => Outcome::EndpointFailed { reason },
            Finished::GaveUp { after, reason } => Outcome::RetryLater { after, reason },
            Finished::Failed { reason } => Outcome::Rejected { reason },
        }
    }
}

#[async_trait::async_trait]
impl LeadSink for AlertSink {
    fn name(&self) -> &str {
        self.vendor.name()
    }

    /// One lead after the other (the messages are paced anyway). Once the webhook
    /// failed as an endpoint, the rest of the batch gets the same answer without a
    /// request: they wait with it.
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        self.deliver_linked(batch, &[]).await
    }

    fn is_alert(&self) -> bool {
        true
    }

    /// As `deliver`; a message names the customer's CRM record when `links` has it.
    async fn deliver_linked(
        &self,
        batch: &[CustomerLead],
        links: &[Option<String>],
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut endpoint_failed: Option<String> = None;
        for (i, lead) in batch.iter().enumerate() {
            if let Some(reason) = &endpoint_failed {
                if trigger(lead, &self.stages).is_some() {
                    outcomes.push(Outcome::EndpointFailed {
                        reason: reason.clone(),
                    });
                    continue;
                }
            }
            let link = links.get(i).and_then(Option::as_ref);
            let outcome = self.deliver_one(lead, link).await;
            if let Outcome::EndpointFailed { reason } = &outcome {
                endpoint_failed = Some(reason.clone());
            }
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Teams: nothing is sent (any request to a Workflows trigger runs the flow), the
    /// URL's form was checked when the sink was built. Slack: an empty message (`{}`),
    /// which Slack refuses without posting: 400 (`no_text`, `invalid_payload`) means
    /// the webhook exists; 403, 404 and 410 say why it does not.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        let error = |message: String| SinkError {
            sink: self.vendor.name().into(),
            message,
        };
        if self.vendor == Vendor::Teams {
            return Ok(());
        }
        let response = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body("{}")
            .send()
            .await
            .map_err(|e| {
                error(format!(
                    "cannot reach {}: {}",
                    self.shown_url,
                    self.scrub(http::transport_reason(
                        e,
                        self.request_timeout,
                        &format!("sink.{}.request_timeout", self.vendor.name()),
                    ))
                ))
            })?;
        let status = response.status();
        let text = self.scrub(response.text().await.unwrap_or_default());
        match classify(self.vendor, status, None, &text) {
            Verdict::Endpoint { reason } | Verdict::Retry { reason, .. } => Err(error(reason)),
            Verdict::Delivered | Verdict::Reject { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::row::RowId;
    use time::macros::datetime;

    fn entry(rk: &str, action: &str, stage: Stage, offer: &str) -> HistoryEntry {
        HistoryEntry {
            row: RowId::new("p", rk),
            etag: format!("W/{rk}"),
            timestamp: datetime!(2024-05-01 10:00 UTC),
            action: action.into(),
            source: Some("AzureMarketplace".into()),
            offer: Some(offer.into()),
            offer_title: Some("Contoso Analytics".into()),
            stage,
            description: None,
        }
    }

    fn lead(history: Vec<HistoryEntry>) -> CustomerLead {
        CustomerLead {
            key: "email:ana@fabrikam.com".into(),
            external_key: "ls-0123456789abcdef0123".into(),
            customer: Default::default(),
            stage: history
                .iter()
                .map(|h| h.stage)
                .max()
                .unwrap_or(Stage::Unknown),
            do_not_contact: false,
            test_lead: false,
            first_seen: datetime!(2024-05-01 10:00 UTC),
            last_seen: datetime!(2024-05-01 10:00 UTC),
            offers: vec![],
            history,
            summary: "Ana\nNext step: They are trying Contoso: check in.".into(),
        }
    }

    const DEFAULT: [Stage; 2] = [Stage::Trial, Stage::Active];

    #[test]
    fn a_message_is_due_only_when_the_newest_event_reaches_a_watched_stage_first() {
        use Stage::*;
        let plt = |rk| entry(rk, "PLT", InitialInterest, "c.a");
        let trial = |rk| entry(rk, "StartTestDrive", Trial, "c.a");
        let ins = |rk, offer| entry(rk, "INS", Active, offer);
        let cases: Vec<(Vec<HistoryEntry>, Option<Stage>)> = vec![
            (vec![plt("1")], None),
            (vec![trial("1")], Some(Trial)),
            (vec![plt("1"), trial("2")], Some(Trial)),
            (vec![trial("1"), trial("2")], None),
            (vec![trial("1"), ins("2", "c.a")], Some(Active)),
            (vec![ins("1", "c.a"), trial("2")], None),
            (vec![ins("1", "c.a"), ins("2", "c.a")], None),
            (vec![ins("1", "c.a"), ins("2", "c.b")], Some(Active)),
            (vec![trial("1"), plt("2")], None),
            (vec![], None),
        ];
        for (history, expected) in cases {
            let what: Vec<_> = history.iter().map(|h| h.action.clone()).collect();
            let l = lead(history);
            assert_eq!(trigger(&l, &DEFAULT).map(|a| a.stage), expected, "{what:?}");
        }
        let mut dnc = lead(vec![trial("1")]);
        dnc.do_not_contact = true;
        assert!(trigger(&dnc, &DEFAULT).is_none());
        let only_active = lead(vec![trial("1")]);
        assert!(trigger(&only_active, &[Active]).is_none());
    }

    #[test]
    fn the_next_step_is_taken_from_the_summary() {
        assert_eq!(next_step("a\nNext step: call them."), "call them.");
        assert_eq!(next_step("just this"), "just this");
    }

    #[test]
    fn statuses_are_classified_in_one_place() {
        for vendor in [Vendor::Teams, Vendor::Slack] {
            for (code, expected) in [
                (200, "delivered"),
                (202, "delivered"),
                (408, "retry"),
                (429, "retry"),
                (500, "retry"),
                (503, "retry"),
                (401, "endpoint"),
                (403, "endpoint"),
                (404, "endpoint"),
                (410, "endpoint"),
                (302, "endpoint"),
                (400, "reject"),
                (413, "reject"),
            ] {
                let got = match classify(vendor, StatusCode::from_u16(code).unwrap(), None, "x") {
                    Verdict::Delivered => "delivered",
                    Verdict::Retry { .. } => "retry",
                    Verdict::Endpoint { .. } => "endpoint",
                    Verdict::Reject { .. } => "reject",
                };
                assert_eq!(got, expected, "{vendor:?} HTTP {code}");
            }
        }
    }

    #[test]
    fn urls_are_checked_per_vendor_without_quoting_them() {
        let ok = [
            (Vendor::Teams, "https://prod-12.westeurope.logic.azure.com:443/workflows/abc/triggers/manual/paths/invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=SIGSECRET"),
            (Vendor::Teams, "https://default0a1b.2c.environment.api.powerplatform.com:443/powerautomate/automations/direct/workflows/abc/triggers/manual/paths/invoke?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=SIGSECRET"),
            (Vendor::Slack, "https://hooks.slack.com/services/T000/B000/TOKENSECRET"),
        ];
        for (vendor, url) in ok {
            assert!(check_alert_url(vendor, url, false).is_ok(), "{url}");
        }
        let bad = [
            (
                Vendor::Teams,
                "https://example.com/workflows/x?sig=SIGSECRET",
            ),
            (
                Vendor::Teams,
                "https://prod-1.westus.logic.azure.com/workflows/x/triggers/manual/paths/invoke",
            ),
            (
                Vendor::Teams,
                "https://contoso.webhook.office.com/webhookb2/TOKENSECRET",
            ),
            (
                Vendor::Teams,
                "http://prod-1.westus.logic.azure.com/workflows/x?sig=SIGSECRET",
            ),
            (
                Vendor::Slack,
                "https://hooks.slack.com/workflows/TOKENSECRET",
            ),
            (
                Vendor::Slack,
                "https://example.com/services/T/B/TOKENSECRET",
            ),
            (Vendor::Slack, "not a url TOKENSECRET"),
        ];
        for (vendor, url) in bad {
            let (key, message) = check_alert_url(vendor, url, false).expect_err(url);
            assert_eq!(key, format!("sink.{}.url", vendor.name()));
            assert!(!message.contains("SECRET"), "{message}");
        }
        assert!(check_alert_url(Vendor::Teams, "http://127.0.0.1:1/x", true).is_ok());
    }

    #[test]
    fn shown_urls_hide_the_credential() {
        let teams = reqwest::Url::parse(
            "https://p.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?sig=SIGSECRET",
        )
        .unwrap();
        let slack =
            reqwest::Url::parse("https://hooks.slack.com/services/T0/B0/TOKENSECRET").unwrap();
        assert_eq!(
            shown_url(Vendor::Teams, &teams),
            "https://p.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?…"
        );
        assert_eq!(
            shown_url(Vendor::Slack, &slack),
            "https://hooks.slack.com/…"
        );
    }
}
