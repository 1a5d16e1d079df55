//! Dynamics 365 / Dataverse: upserts each customer into the `lead` table by an
//! alternate key, through the Web API, as an application user authenticated with
//! Microsoft Entra ID client credentials.
//!
//! Per batch: one query of the batch's keys (`$filter=Microsoft.Dynamics.CRM.In(...)`:
//! is the lead there, open or closed, what do its `if_empty` columns hold), then one
//! request per lead: a create-only upsert (`If-None-Match: *`) of a new lead with every
//! column, an update-only upsert (`If-Match: *`) of an open lead with only the columns
//! leadsync owns, or, for a qualified or disqualified lead, a follow-up task created
//! under an id derived from the event (`PATCH tasks(id)` with `If-None-Match: *`, so a
//! replay finds it there instead of making another).
//!
//! Those requests go in bulk: `batch_size` (default 100) per `POST $batch`, without
//! change sets and with `Prefer: odata.continue-on-error`, so a backfill takes one write
//! request per 100 customers and still one outcome per lead. Why `$batch` and not
//! `UpsertMultiple`:
//!
//! - "Execute batch operations using the Web API"
//!   (<https://learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api>):
//!   a batch holds up to 1,000 requests, run in order, "the order of the responses
//!   matches the order of the requests"; each request keeps its own headers
//!   (`If-Match`/`If-None-Match`) and body, and with `odata.continue-on-error` a failed
//!   request does not stop the ones after it, so each lead gets its own status.
//! - "Use UpsertMultiple" (<https://learn.microsoft.com/power-apps/developer/data-platform/bulk-operations>):
//!   one body of `Targets` for the whole call, no per-record condition (it cannot say
//!   create-only or update-only, which the field-ownership rules need), and an error in
//!   one record fails the whole call; it also cannot create the follow-up tasks.
//! - "Service protection API limits"
//!   (<https://learn.microsoft.com/power-apps/developer/data-platform/api-limits>): a
//!   `$batch` counts as one request towards the number of requests, its inner requests
//!   count towards the execution time, and a throttled `$batch` gets one 429 with
//!   `Retry-After` as a whole, which is waited out as for any request.
//!
//! A `$batch` refused as a whole (400 malformed, 413 too large) is sent again in halves
//! until the bad request is alone, so one bad record never takes the others down.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::Mutex;

use super::http::{self, Finished, Step};
use super::mapping::{LeadField, WriteMode};
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::retry::RetrySettings;
use api::{error_text, hint};
use auth::CachedToken;
use batch::{lock, Part};

mod api;
mod auth;
mod batch;
mod ownership;
mod query;
mod settings;
mod task;
#[cfg(test)]
mod tests;

pub use settings::{default_fields, default_max_lengths, DynamicsSettings};

const SINK: &str = "dynamics";
/// The entity set of the `lead` table in the Web API.
const ENTITY_SET: &str = "leads";
/// The one key attribute whose value comes from the lead's email instead of its external key.
const EMAIL_KEY: &str = "emailaddress1";
/// Dataverse refuses more than 52 concurrent requests per user (service protection, 0x80072326).
const MAX_PARALLELISM: usize = 52;
/// Requests per `$batch` by default: a backfill takes one write request per 100 customers.
const DEFAULT_BATCH_SIZE: usize = 100;
/// "Batch requests can contain up to 1,000 individual requests" (Execute batch operations
/// using the Web API).
const MAX_BATCH_SIZE: usize = 1000;
/// Used when a token response lacks `expires_in` (Entra ID always sends it).
const ASSUMED_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Enough of an error body to explain it, not a whole HTML error page.
const MAX_BODY_IN_REASON: usize = 300;
/// Keeps a query's URL well under the Web API's URL length limit.
const MAX_QUERY_URL_BYTES: usize = 8_000;
/// `lead.statecode`: 0 Open, 1 Qualified, 2 Disqualified.
const LEAD_OPEN: i64 = 0;
/// The `task.subject` column size.
const TASK_SUBJECT_MAX: usize = 200;

/// The Dataverse sink.
pub struct DynamicsSink {
    /// The leadid of each customer (external key) an answer of this process named: the
    /// links alert sinks put in their messages.
    ids: std::sync::Mutex<HashMap<String, String>>,
    /// Whether an alert sink shows links ([`LeadSink::want_links`]): else no id is kept.
    links_wanted: std::sync::atomic::AtomicBool,
    client: reqwest::Client,
    /// `{environment}/api/data/{version}`.
    api_base: String,
    /// `/api/data/{version}`: the path `$batch` request lines name resources by.
    api_path: String,
    token_url: String,
    scope: String,
    client_id: String,
    client_secret: SecretString,
    key_attribute: String,
    fields: BTreeMap<String, LeadField>,
    ownership: BTreeMap<String, WriteMode>,
    /// The mapped columns whose mode is `if_empty`: the batch's query reads them.
    if_empty: Vec<String>,
    max_lengths: BTreeMap<String, usize>,
    parallelism: usize,
    batch_size: usize,
    refresh_margin: Duration,
    request_timeout: Duration,
    retry: RetrySettings,
    token: Mutex<Option<CachedToken>>,
}

impl fmt::Debug for DynamicsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamicsSink")
            .field("api_base", &self.api_base)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("key_attribute", &self.key_attribute)
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

/// Lead ids remembered for links at most; past it they are forgotten and relearnt.
const IDS_KEPT: usize = 100_000;

impl DynamicsSink {
    /// Remembers the leadid of a customer (external key) for its link.
    pub(super) fn remember_id(&self, external_key: &str, id: &str) {
        if !self.links_wanted.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut ids = lock(&self.ids);
        if ids.len() >= IDS_KEPT {
            ids.clear();
        }
        ids.insert(external_key.to_owned(), id.to_owned());
    }

    /// Builds the sink and reads the client secret; no request is sent.
    pub fn new(settings: &DynamicsSettings) -> Result<Self, SinkError> {
        settings
            .validate()
            .map_err(|e| SinkError::config(SINK, e))?;
        let client_secret = settings
            .client_secret
            .resolve("sink.dynamics.client_secret")
            .map_err(|e| SinkError::new(SINK, e.to_string()))?;
        let environment = http::check_url(
            "sink.dynamics.environment_url",
            &settings.environment_url,
            settings.allow_http,
        )
        .map_err(|e| SinkError::config(SINK, e))?;
        let origin = environment.origin().ascii_serialization();
        let mut max_lengths = default_max_lengths();
        max_lengths.extend(settings.max_lengths.clone());
        Ok(Self {
            ids: Default::default(),
            links_wanted: Default::default(),
            client: http::client(settings.request_timeout).map_err(|e| SinkError::new(SINK, e))?,
            api_base: format!("{origin}/api/data/{}", settings.api_version),
            api_path: format!("/api/data/{}", settings.api_version),
            token_url: format!(
                "{}/{}/oauth2/v2.0/token",
                settings.authority_host.trim_end_matches('/'),
                settings.tenant_id.trim()
            ),
            // The resource of a Dataverse environment is its URL; `.default` asks for the
            // permissions granted to the app registration.
            scope: format!("{origin}/.default"),
            client_id: settings.client_id.trim().to_owned(),
            client_secret,
            key_attribute: settings.key_attribute.clone(),
            fields: settings.fields.clone(),
            ownership: settings.ownership.clone(),
            if_empty: settings
                .fields
                .iter()
                .filter(|(c, a)| {
                    !a.is_opt_out()
                        && settings
                            .ownership
                            .get(*c)
                            .copied()
                            .unwrap_or_else(|| a.default_write_mode())
                            == WriteMode::IfEmpty
                })
                .map(|(c, _)| c.clone())
                .collect(),
            max_lengths,
            parallelism: settings.parallelism,
            batch_size: settings.batch_size,
            refresh_margin: settings.token_refresh_margin,
            request_timeout: settings.request_timeout,
            retry: settings.retry.clone(),
            token: Mutex::new(None),
        })
    }

    /// A secret must never reach a reason or a log line, even if a server echoed it.
    fn redact(&self, text: String) -> String {
        let secret = self.client_secret.expose_secret();
        if text.contains(secret) {
            text.replace(secret, "[redacted]")
        } else {
            text
        }
    }

    fn transport_reason(&self, what: &str, error: reqwest::Error) -> String {
        let error = error.without_url();
        if error.is_timeout() {
            format!(
                "{what} timed out after {}",
                humantime::format_duration(self.request_timeout)
            )
        } else {
            // reqwest's own message is generic ("error sending request"); the cause is in
            // the source chain (connection refused, TLS, DNS).
            let mut text = format!("{what} failed: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            self.redact(text)
        }
    }
}

#[async_trait::async_trait]
impl LeadSink for DynamicsSink {
    fn name(&self) -> &str {
        SINK
    }

    fn want_links(&self) {
        self.links_wanted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn record_link(&self, external_key: &str) -> Option<String> {
        let id = lock(&self.ids).get(external_key)?.clone();
        let environment = self.api_base.split("/api/data/").next()?;
        Some(format!(
            "{environment}/main.aspx?etn=lead&id={id}&pagetype=entityrecord"
        ))
    }

    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        if batch.is_empty() {
            return Vec::new();
        }
        // One token for the batch first: refused credentials answer every lead at once
        // instead of once per lead.
        let token = http::retrying(&self.retry, SINK, |_| async {
            match self.bearer().await {
                Ok(_) => Step::Done(()),
                Err(error) => error.into_step(),
            }
        })
        .await;
        match token {
            Finished::Done(()) => {}
            Finished::GaveUp { after, reason } => {
                tracing::warn!(leads = batch.len(), %reason, "No Dataverse access token; the batch waits for the next poll.");
                return vec![Outcome::RetryLater { after, reason }; batch.len()];
            }
            Finished::Failed { reason } => {
                tracing::error!(leads = batch.len(), %reason, "Entra ID refused the Dataverse credentials; the leads wait until they are corrected.");
                return vec![Outcome::EndpointFailed { reason }; batch.len()];
            }
        }
        let mut keys = Vec::new();
        for lead in batch {
            if let Ok(key) = self.key_of(lead) {
                keys.push(key);
            }
        }
        let existing = match self.existing(&keys).await {
            Ok(found) => found,
            Err(outcome) => {
                tracing::warn!(leads = batch.len(), outcome = ?outcome, "The query of the batch's Dataverse leads failed; the batch waits.");
                return vec![outcome; batch.len()];
            }
        };
        let links_wanted = self.links_wanted.load(std::sync::atomic::Ordering::Relaxed);
        for lead in batch.iter().filter(|_| links_wanted) {
            let found = self
                .key_of(lead)
                .ok()
                .and_then(|key| existing.get(&key.to_lowercase()));
            if let Some(id) = found.and_then(|record| record["leadid"].as_str()) {
                self.remember_id(&lead.external_key, id);
            }
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut parts = Vec::new();
        for (index, lead) in batch.iter().enumerate() {
            match self.plan(index, lead, &existing) {
                Ok(part) => parts.push(part),
                Err(outcome) => outcomes[index] = Some(outcome),
            }
        }
        // `batch_size` requests per `$batch`, `parallelism` `$batch`es in flight; they
        // finish in any order (a slow one holds one slot, not the others), and each
        // outcome goes back to its lead's place.
        let chunks: Vec<Vec<Part>> = parts
            .chunks(self.batch_size)
            .map(<[Part]>::to_vec)
            .collect();
        let mut answered = stream::iter(chunks)
            .map(|chunk| self.send_parts(chunk))
            .buffer_unordered(self.parallelism);
        while let Some(results) = answered.next().await {
            for (index, outcome) in results {
                outcomes[index] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| Outcome::RetryLater {
                    after: None,
                    reason:
                        "the Dataverse $batch gave this lead no answer; it is sent again next time"
                            .into(),
                })
            })
            .collect()
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let url = format!("{}/WhoAmI", self.api_base);
        let mut refreshed = false;
        loop {
            let token = self
                .bearer()
                .await
                .map_err(|e| SinkError::new(SINK, e.reason().to_owned()))?;
            let response = self
                .odata(self.client.get(&url), &token)
                .send()
                .await
                .map_err(|e| SinkError::new(SINK, self.transport_reason("WhoAmI request", e)))?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                self.forget(&token).await;
                refreshed = true;
                continue;
            }
            let text = response.text().await.unwrap_or_default();
            if !status.is_success() {
                return Err(SinkError::new(
                    SINK,
                    self.redact(format!(
                        "WhoAmI answered {status}: {}{}",
                        error_text(&text),
                        hint(status)
                    )),
                ));
            }
            let user = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("UserId").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default();
            tracing::info!(api = %self.api_base, user_id = %user, "Dataverse is reachable and accepts leadsync's credentials.");
            return self.check_alternate_key().await;
        }
    }
}

impl DynamicsSink {
    /// One metadata read: the lead table must have an active alternate key made of
    /// `key_attribute` alone, or every upsert by it fails.
    async fn check_alternate_key(&self) -> Result<(), SinkError> {
        let url = format!(
            "{}/EntityDefinitions(LogicalName='lead')/Keys?$select=LogicalName,KeyAttributes,EntityKeyIndexStatus",
            self.api_base
        );
        let answer = match self.request(Method::GET, &url, None, &[], "").await {
            Finished::Done(answer) => answer,
            Finished::GaveUp { reason, .. } | Finished::Failed { reason } => {
                return Err(SinkError::new(
                    SINK,
                    format!("reading the lead table's alternate keys failed: {reason}"),
                ))
            }
        };
        if !answer.status.is_success() {
            return Err(SinkError::new(
                SINK,
                format!(
                    "reading the lead table's alternate keys answered {}: {}{}",
                    answer.status,
                    error_text(&answer.text),
                    hint(answer.status)
                ),
            ));
        }
        let keys: Vec<Value> = serde_json::from_str::<Value>(&answer.text)
            .ok()
            .and_then(|v| v.get("value").and_then(Value::as_array).cloned())
            .unwrap_or_default();
        let ours = keys.iter().find(|k| {
            k.get("KeyAttributes")
                .and_then(Value::as_array)
                .is_some_and(|a| a.len() == 1 && a[0].as_str() == Some(self.key_attribute.as_str()))
        });
        match ours.and_then(|k| k.get("EntityKeyIndexStatus")).and_then(Value::as_str) {
            Some("Active") => Ok(()),
            Some(status) => Err(SinkError::new(SINK, format!(
                "the lead table's alternate key on {} is {status}, not Active (sink.dynamics.key_attribute); upserts by it fail until it is",
                self.key_attribute
            ))),
            None => Err(SinkError::new(SINK, format!(
                "the lead table has no alternate key made of {} alone (sink.dynamics.key_attribute); create one, or upserts by it fail",
                self.key_attribute
            ))),
        }
    }
}

/// A string key value as it goes in `leads(key='...')`: OData doubles a `'` inside a
/// string literal, then the literal is percent-encoded for the URL path.
pub fn odata_key(value: &str) -> String {
    urlencoding::encode(&value.replace('\'', "''")).into_owned()
}
