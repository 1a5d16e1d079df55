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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::http::{check_url, client, Finished};
use super::mapping::{LeadField, WriteMode};
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::retry::RetrySettings;
use auth::{Credentials, SessionSlot};

mod api;
mod auth;
mod query;
mod settings;
mod task;
#[cfg(test)]
mod tests;
mod upsert;

pub use settings::{
    default_audience, default_fields, default_max_lengths, default_placeholders, AuthFlow,
    DuplicatePolicy, SalesforceSettings,
};

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
    /// The Lead Id of each customer (external key) an answer of this process named, and
    /// the instance they live on: the links alert sinks put in their messages.
    ids: std::sync::Mutex<(Option<String>, HashMap<String, String>)>,
    /// Whether an alert sink shows links ([`LeadSink::want_links`]): else no id is kept.
    links_wanted: std::sync::atomic::AtomicBool,
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

/// Lead Ids remembered for links at most; past it they are forgotten and relearnt.
const IDS_KEPT: usize = 100_000;

impl SalesforceSink {
    /// Remembers the Lead Id of each customer (external key, Id) for its link.
    pub(super) fn remember_ids(&self, ids: impl Iterator<Item = (String, String)>) {
        if !self.links_wanted.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut known = self.ids.lock().expect("not poisoned");
        for (key, id) in ids {
            if known.1.len() >= IDS_KEPT {
                known.1.clear();
            }
            known.1.insert(key, id);
        }
    }

    /// Reads the secrets and builds the client; no network I/O.
    pub fn new(settings: &SalesforceSettings) -> Result<Self, SinkError> {
        settings
            .validate()
            .map_err(|e| SinkError::config(SINK, e))?;
        let login = check_url(
            "sink.salesforce.login_url",
            &settings.login_url,
            settings.allow_http,
        )
        .map_err(|e| SinkError::config(SINK, e))?;
        let credentials = Credentials::from_settings(settings, &login)?;
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
            http: client(settings.request_timeout).map_err(|e| SinkError::new(SINK, e))?,
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
            ids: Default::default(),
            links_wanted: Default::default(),
        })
    }

    /// Delivers one collection (at most 200 leads): one query, one upsert of the new
    /// and open Leads, and follow-up Tasks for the converted ones.
    async fn deliver_collection(&self, leads: &[CustomerLead]) -> Vec<Outcome> {
        let keys: Vec<String> = leads.iter().map(|l| l.external_key.clone()).collect();
        let existing = match self.existing(&keys).await {
            Ok(found) => found,
            Err(outcome) => return vec![outcome; leads.len()],
        };
        if self.links_wanted.load(std::sync::atomic::Ordering::Relaxed) {
            self.remember_ids(existing.iter().map(|(key, e)| (key.clone(), e.id.clone())));
            if let Ok(session) = self.session().await {
                self.ids.lock().expect("not poisoned").0 = Some(session.instance_url);
            }
        }
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

    fn want_links(&self) {
        self.links_wanted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn record_link(&self, external_key: &str) -> Option<String> {
        let ids = self.ids.lock().expect("not poisoned");
        let (instance, id) = (ids.0.as_ref()?, ids.1.get(external_key)?);
        Some(format!("{instance}/lightning/r/Lead/{id}/view"))
    }

    /// Authenticates and reads the Lead description: the external id field must exist
    /// and be an External ID, and every mapped field must exist. Writes nothing.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        let path = format!("/services/data/{}/sobjects/Lead/describe", self.api_version);
        let text = match self.call(Method::GET, &path, None, false).await {
            Finished::Done(text) => text,
            Finished::GaveUp { reason, .. } => {
                return Err(SinkError::new(
                    SINK,
                    format!("Salesforce is not reachable now: {reason}"),
                ))
            }
            Finished::Failed { reason } => return Err(SinkError::new(SINK, reason)),
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
            .map_err(|e| SinkError::new(SINK, format!("Lead describe answer unreadable: {e}")))?;
        let find = |name: &str| {
            describe
                .fields
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
        };
        match find(&self.external_id_field) {
            None => {
                return Err(SinkError::new(SINK, format!(
                    "the Lead object has no field {} visible to the integration user (sink.salesforce.external_id_field); create it as a unique External ID text field",
                    self.external_id_field
                )))
            }
            Some(f) if !f.external_id => {
                return Err(SinkError::new(SINK, format!(
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
            return Err(SinkError::new(SINK, format!(
                "the Lead object has no field(s) {} visible to the integration user (sink.salesforce.fields / placeholders)",
                missing.join(", ")
            )));
        }
        Ok(())
    }
}
