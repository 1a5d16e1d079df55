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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tracing::Instrument;

use super::http::{self, Finished, Step};
use super::mapping::{self, LeadField, OwnedFields, WriteMode};
use super::{CustomerLead, LeadSink, Outcome, SinkError};
use crate::retry::RetrySettings;
use crate::secret::SecretSource;

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

/// The column sizes of the standard `lead` table, in characters.
const DEFAULT_MAX_LENGTHS: [(&str, usize); 9] = [
    ("firstname", 50),
    ("lastname", 50),
    ("companyname", 100),
    ("jobtitle", 100),
    ("emailaddress1", 100),
    ("telephone1", 50),
    ("address1_country", 80),
    ("subject", 200),
    ("description", 2000),
];

/// `[sink.dynamics]`: where the Dataverse environment is, how to authenticate, and
/// which lead columns receive what.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicsSettings {
    /// The environment URL, e.g. `https://contoso.crm.dynamics.com` (Power Platform admin center, Environment URL).
    pub environment_url: String,
    /// The Microsoft Entra tenant (directory) id of the app registration, or its domain name.
    pub tenant_id: String,
    /// The application (client) id of the app registration; the environment must have it as an application user.
    pub client_id: String,
    /// The client secret of the app registration.
    pub client_secret: SecretSource,
    /// The Entra ID authority host; change it for sovereign clouds (e.g. `https://login.microsoftonline.us`).
    #[serde(default = "default_authority_host")]
    pub authority_host: String,
    /// The Web API version in `/api/data/<version>/`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// The column of the lead table's alternate key that leads are upserted on: a custom column
    /// holding the external key, or `emailaddress1` to upsert on the email.
    #[serde(default = "default_key_attribute")]
    pub key_attribute: String,
    /// `$batch` requests in flight at once (Dataverse throttles per user; at most 52).
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// Requests (one per lead) per `$batch`; Dataverse takes at most 1,000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Lead column (logical name) -> lead attribute. Replaces the default mapping as a whole.
    #[serde(default = "default_fields")]
    pub fields: BTreeMap<String, LeadField>,
    /// Lead column -> when leadsync writes it once the lead exists: `always`,
    /// `on_create` or `if_empty`. Entries override the defaults of the mapped attribute
    /// (see the table in docs/sinks/dynamics.md); opt-outs are only ever written as `true`.
    #[serde(default)]
    pub ownership: BTreeMap<String, WriteMode>,
    /// Column (logical name) -> maximum characters; longer values are cut and the cut is logged.
    /// Merged over the built-in sizes of the standard lead columns.
    #[serde(default)]
    pub max_lengths: BTreeMap<String, usize>,
    /// A token is renewed this long before it expires (at most half its lifetime before).
    #[serde(default = "default_token_refresh_margin", with = "humantime_serde")]
    pub token_refresh_margin: Duration,
    /// Timeout of one request (token or Web API).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Accept `http://` URLs (local fakes and tests only: leads carry personal data).
    #[serde(default)]
    pub allow_http: bool,
    /// Retries of one `$batch` (or of its requests answered 408, 429 or 5xx) on timeouts, 5xx and 429.
    #[serde(default)]
    pub retry: RetrySettings,
}

fn default_authority_host() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_api_version() -> String {
    "v9.2".into()
}
fn default_key_attribute() -> String {
    "leadsync_key".into()
}
fn default_parallelism() -> usize {
    4
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_token_refresh_margin() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The default lead column -> lead attribute mapping.
pub fn default_fields() -> BTreeMap<String, LeadField> {
    [
        ("firstname", LeadField::FirstName),
        ("lastname", LeadField::LastName),
        ("emailaddress1", LeadField::Email),
        ("telephone1", LeadField::Phone),
        ("companyname", LeadField::Company),
        ("jobtitle", LeadField::Title),
        ("address1_country", LeadField::Country),
        ("subject", LeadField::Subject),
        ("description", LeadField::Summary),
        ("donotemail", LeadField::DoNotContact),
        ("donotphone", LeadField::DoNotContact),
    ]
    .into_iter()
    .map(|(column, field)| (column.to_owned(), field))
    .collect()
}

/// The built-in column sizes (`max_lengths` entries are merged over them).
pub fn default_max_lengths() -> BTreeMap<String, usize> {
    DEFAULT_MAX_LENGTHS
        .iter()
        .map(|(column, max)| ((*column).to_owned(), *max))
        .collect()
}

/// Column logical names are lower-case letters, digits and underscores, starting with a letter.
fn is_logical_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl DynamicsSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((format!("sink.dynamics.{key}"), message));
        let environment = http::check_url(
            "sink.dynamics.environment_url",
            &self.environment_url,
            self.allow_http,
        )?;
        if !matches!(environment.path(), "" | "/")
            || environment.query().is_some()
            || environment.host_str().is_none()
        {
            return bad(
                "environment_url",
                "must be the environment URL alone, e.g. https://contoso.crm.dynamics.com (no path)"
                    .into(),
            );
        }
        http::check_url(
            "sink.dynamics.authority_host",
            &self.authority_host,
            self.allow_http,
        )?;
        let tenant = self.tenant_id.trim();
        if tenant.is_empty()
            || !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return bad(
                "tenant_id",
                "must be the directory (tenant) id, e.g. 00000000-0000-0000-0000-000000000000, or the tenant's domain name".into(),
            );
        }
        if self.client_id.trim().is_empty() {
            return bad(
                "client_id",
                "must be the application (client) id of the app registration".into(),
            );
        }
        let version = self.api_version.strip_prefix('v').unwrap_or_default();
        if version.is_empty()
            || !version
                .split('.')
                .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_digit()))
        {
            return bad(
                "api_version",
                format!("must look like v9.2, not {:?}", self.api_version),
            );
        }
        if !is_logical_name(&self.key_attribute) {
            return bad(
                "key_attribute",
                format!(
                    "must be the logical name of a lead column (lower-case letters, digits, _), not {:?}",
                    self.key_attribute
                ),
            );
        }
        if self.parallelism == 0 || self.parallelism > MAX_PARALLELISM {
            return bad(
                "parallelism",
                format!("must be between 1 and {MAX_PARALLELISM} (Dataverse's limit of concurrent requests per user)"),
            );
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return bad(
                "batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE} (requests per Dataverse $batch)"),
            );
        }
        if let Some(column) = self.fields.keys().find(|c| !is_logical_name(c)) {
            return bad(
                &format!("fields.{column}"),
                "is not a column logical name (lower-case letters, digits, _)".into(),
            );
        }
        if let Some(column) = self.ownership.keys().find(|c| !is_logical_name(c)) {
            return bad(
                &format!("ownership.{column}"),
                "is not a column logical name (lower-case letters, digits, _)".into(),
            );
        }
        for (column, max) in &self.max_lengths {
            if !is_logical_name(column) {
                return bad(
                    &format!("max_lengths.{column}"),
                    "is not a column logical name (lower-case letters, digits, _)".into(),
                );
            }
            if *max == 0 {
                return bad(
                    &format!("max_lengths.{column}"),
                    "must be at least 1".into(),
                );
            }
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero".into());
        }
        self.retry.validate("sink.dynamics.retry")?;
        Ok(())
    }
}

/// An access token and when to stop using it.
struct CachedToken {
    value: SecretString,
    renew_at: Instant,
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenError {
    /// Entra ID is unreachable, slow or throttling: try again later.
    Transient {
        after: Option<Duration>,
        reason: String,
    },
    /// Entra ID refused the credentials; nothing changes until the config does.
    Permanent { reason: String },
}

impl TokenError {
    fn into_step<T>(self) -> Step<T> {
        match self {
            Self::Transient { after, reason } => Step::Retry { after, reason },
            Self::Permanent { reason } => Step::Fail { reason },
        }
    }

    fn reason(&self) -> &str {
        match self {
            Self::Transient { reason, .. } | Self::Permanent { reason } => reason,
        }
    }
}

/// The Dataverse sink.
pub struct DynamicsSink {
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

fn sink_error(message: impl Into<String>) -> SinkError {
    SinkError {
        sink: SINK.into(),
        message: message.into(),
    }
}

impl DynamicsSink {
    /// Builds the sink and reads the client secret; no request is sent.
    pub fn new(settings: &DynamicsSettings) -> Result<Self, SinkError> {
        settings
            .validate()
            .map_err(|(key, message)| sink_error(format!("config key `{key}`: {message}")))?;
        let client_secret = settings
            .client_secret
            .resolve("sink.dynamics.client_secret")
            .map_err(|e| sink_error(e.to_string()))?;
        let environment = http::check_url(
            "sink.dynamics.environment_url",
            &settings.environment_url,
            settings.allow_http,
        )
        .map_err(|(key, message)| sink_error(format!("config key `{key}`: {message}")))?;
        let origin = environment.origin().ascii_serialization();
        let mut max_lengths = default_max_lengths();
        max_lengths.extend(settings.max_lengths.clone());
        Ok(Self {
            client: http::client(settings.request_timeout).map_err(sink_error)?,
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

    /// The cached token, or a new one when it is missing or close to expiry. The lock is
    /// held while fetching, so concurrent upserts wait for one token request.
    async fn bearer(&self) -> Result<SecretString, TokenError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        let fresh = self.request_token().await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Drops `used` from the cache (after a 401), unless another request already replaced it.
    async fn forget(&self, used: &SecretString) {
        let mut cached = self.token.lock().await;
        if cached
            .as_ref()
            .is_some_and(|t| t.value.expose_secret() == used.expose_secret())
        {
            *cached = None;
        }
    }

    async fn request_token(&self) -> Result<CachedToken, TokenError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
            ("scope", self.scope.as_str()),
        ];
        let requested = Instant::now();
        let response = self
            .client
            .post(&self.token_url)
            .header(ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| TokenError::Transient {
                after: None,
                reason: self.transport_reason("token request to Entra ID", e),
            })?;
        let status = response.status();
        let after = http::retry_after(response.headers());
        let body = response.text().await.map_err(|e| TokenError::Transient {
            after: None,
            reason: self.transport_reason("reading the Entra ID token response", e),
        })?;
        let token =
            classify_token_response(status, after, &body, &self.client_id).map_err(|error| {
                match error {
                    TokenError::Transient { after, reason } => TokenError::Transient {
                        after,
                        reason: self.redact(reason),
                    },
                    TokenError::Permanent { reason } => TokenError::Permanent {
                        reason: self.redact(reason),
                    },
                }
            })?;
        let renew_in = renew_after(token.lifetime, self.refresh_margin);
        tracing::debug!(
            expires_in_s = token.lifetime.as_secs(),
            renew_in_s = renew_in.as_secs(),
            "Got a Dataverse access token from Entra ID."
        );
        Ok(CachedToken {
            value: token.access_token,
            renew_at: requested + renew_in,
        })
    }

    fn odata(
        &self,
        request: reqwest::RequestBuilder,
        token: &SecretString,
    ) -> reqwest::RequestBuilder {
        let mut headers = HeaderMap::new();
        headers.insert("OData-Version", HeaderValue::from_static("4.0"));
        headers.insert("OData-MaxVersion", HeaderValue::from_static("4.0"));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        request.headers(headers).bearer_auth(token.expose_secret())
    }

    /// The key value of one lead, or why it cannot be sent.
    fn key_of(&self, lead: &CustomerLead) -> Result<String, String> {
        let key = if self.key_attribute == EMAIL_KEY {
            match &lead.customer.email {
                Some(email) if !email.normalized.is_empty() => email.normalized.clone(),
                _ => {
                    return Err(format!(
                        "the lead has no email, and sink.dynamics.key_attribute = \"{EMAIL_KEY}\" needs one to upsert on (a custom key column holding the external key works for every lead)"
                    ))
                }
            }
        } else {
            lead.external_key.clone()
        };
        if key.is_empty() {
            return Err(format!(
                "the lead has an empty external key; refusing to upsert on an empty {}",
                self.key_attribute
            ));
        }
        if let Some(max) = self.max_lengths.get(&self.key_attribute) {
            if key.chars().count() > *max {
                return Err(format!(
                    "the key value is {} characters, longer than {}'s {max}; a cut key could match another customer's record",
                    key.chars().count(),
                    self.key_attribute
                ));
            }
        }
        Ok(key)
    }

    /// The key value and the lead's columns with their ownership, or why it cannot be sent.
    fn prepare_owned(&self, lead: &CustomerLead) -> Result<(String, OwnedFields), String> {
        let key = self.key_of(lead)?;
        let mut owned = mapping::owned_fields(lead, &self.fields, &self.ownership);
        // `subject` (Topic) is required on create.
        owned.fields.entry("subject".into()).or_insert_with(|| {
            (
                Value::String(mapping::subject(lead)),
                LeadField::Subject.default_write_mode(),
            )
        });
        for (column, (value, _)) in owned.fields.iter_mut() {
            let (Some(max), Value::String(text)) = (self.max_lengths.get(column), &*value) else {
                continue;
            };
            let (cut, was_cut) = mapping::truncate(text, *max);
            if was_cut {
                tracing::info!(
                    customer = %lead.external_key,
                    column = %column,
                    max_chars = *max,
                    chars = text.chars().count(),
                    "Value cut to fit the Dataverse column."
                );
                *value = Value::String(cut);
            }
        }
        // Dataverse takes the key from the URL; the body carries it too so that a create
        // stores it, and it must be the same value.
        owned.fields.insert(
            self.key_attribute.clone(),
            (Value::String(key.clone()), WriteMode::Always),
        );
        Ok((key, owned))
    }

    /// The body a new lead is created with, and its key value.
    #[cfg(test)]
    fn prepare(&self, lead: &CustomerLead) -> Result<(String, Map<String, Value>), String> {
        let (key, owned) = self.prepare_owned(lead)?;
        Ok((key, owned.for_create()))
    }

    /// `leads(<key attribute>='<value>')` from the host, as a `$batch` request line names it.
    fn lead_path(&self, key: &str) -> String {
        format!(
            "{}/{ENTITY_SET}({}='{}')",
            self.api_path,
            self.key_attribute,
            odata_key(key)
        )
    }

    /// One Web API request with the retry loop: transport errors, 408, 429 and 5xx are
    /// retried; a 401 gets a fresh token once; any other answer is returned.
    async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<&[u8]>,
        extra: &[(&'static str, &'static str)],
        customer: &str,
    ) -> Finished<Answer> {
        let span = tracing::info_span!("dynamics_request", customer = %customer);
        http::retrying(&self.retry, SINK, |attempt| {
            let method = method.clone();
            async move {
                let mut refreshed = false;
                loop {
                    let token = match self.bearer().await {
                        Ok(token) => token,
                        Err(error) => return error.into_step(),
                    };
                    let mut request = self.odata(self.client.request(method.clone(), url), &token);
                    for (name, value) in extra {
                        request = request.header(*name, *value);
                    }
                    if let Some(body) = body {
                        request = request
                            .header(CONTENT_TYPE, "application/json; charset=utf-8")
                            .body(body.to_vec());
                    }
                    let response = match request.send().await {
                        Ok(response) => response,
                        Err(e) => {
                            return Step::Retry {
                                after: None,
                                reason: self.transport_reason("Web API request", e),
                            }
                        }
                    };
                    let status = response.status();
                    if status == StatusCode::UNAUTHORIZED && !refreshed {
                        tracing::info!(
                            customer,
                            attempt,
                            "Dataverse refused the access token; getting a new one."
                        );
                        self.forget(&token).await;
                        refreshed = true;
                        continue;
                    }
                    let after = http::retry_after(response.headers());
                    let entity = response
                        .headers()
                        .get("OData-EntityId")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let text = match response.text().await {
                        Ok(text) => text,
                        Err(e) => {
                            return Step::Retry {
                                after,
                                reason: self.transport_reason("reading the Dataverse response", e),
                            }
                        }
                    };
                    if let Some((code, limit)) = service_protection(&text) {
                        tracing::warn!(
                            customer,
                            attempt,
                            code = %code,
                            limit,
                            retry_after_ms = after.map(|a| a.as_millis() as u64),
                            "Dataverse service protection limit reached; waiting as told."
                        );
                    }
                    return match classify(status, after, &text) {
                        Step::Retry { after, reason } => Step::Retry {
                            after,
                            reason: self.redact(reason),
                        },
                        _ => Step::Done(Answer {
                            status,
                            text: self.redact(text),
                            entity,
                        }),
                    };
                }
            }
        })
        .instrument(span)
        .await
    }

    /// Why a final answer that is not a success refused `what`: the endpoint's fault
    /// (the leads wait) or this record's (it is rejected).
    fn refusal(&self, answer: &Answer, what: &str) -> Outcome {
        let detail = error_text(&answer.text);
        let status = answer.status;
        if is_endpoint_refusal(status, &answer.text) {
            Outcome::EndpointFailed {
                reason: format!(
                    "Dataverse refused {what} ({status}): {detail}{}",
                    hint(status)
                ),
            }
        } else {
            Outcome::Rejected {
                reason: format!(
                    "Dataverse refused the lead ({status}): {detail}{}",
                    hint(status)
                ),
            }
        }
    }

    /// The leads of the batch that exist, by lower-cased key value.
    async fn existing(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, Map<String, Value>>, Outcome> {
        let mut select = vec![
            "leadid".to_owned(),
            "statecode".to_owned(),
            self.key_attribute.clone(),
            "_ownerid_value".to_owned(),
            "_parentcontactid_value".to_owned(),
            "_parentaccountid_value".to_owned(),
            "_qualifyingopportunityid_value".to_owned(),
        ];
        for column in &self.if_empty {
            if !select.contains(column) {
                select.push(column.clone());
            }
        }
        let url_of = |literals: &[String]| {
            let filter = format!(
                "Microsoft.Dynamics.CRM.In(PropertyName='{}',PropertyValues=[{}])",
                self.key_attribute,
                literals.join(",")
            );
            format!(
                "{}/{ENTITY_SET}?$select={}&$filter={}",
                self.api_base,
                select.join(","),
                urlencoding::encode(&filter)
            )
        };
        let mut chunks: Vec<Vec<String>> = Vec::new();
        for key in keys {
            let literal = format!("'{}'", key.replace('\'', "''"));
            let fits = chunks.last().is_some_and(|c| {
                let mut with = c.clone();
                with.push(literal.clone());
                url_of(&with).len() <= MAX_QUERY_URL_BYTES
            });
            if fits {
                chunks.last_mut().expect("checked").push(literal);
            } else {
                chunks.push(vec![literal]);
            }
        }
        let mut found = HashMap::new();
        for chunk in chunks {
            let mut url = url_of(&chunk);
            loop {
                let answer = match self
                    .request(
                        Method::GET,
                        &url,
                        None,
                        &[("Prefer", "odata.include-annotations=\"Microsoft.Dynamics.CRM.lookuplogicalname\"")],
                        "",
                    )
                    .await
                {
                    Finished::Done(answer) => answer,
                    Finished::GaveUp { after, reason } => {
                        return Err(Outcome::RetryLater { after, reason })
                    }
                    Finished::Failed { reason } => return Err(Outcome::EndpointFailed { reason }),
                };
                if !answer.status.is_success() {
                    return Err(Outcome::EndpointFailed {
                        reason: format!(
                            "Dataverse refused the query of the batch's leads by sink.dynamics.key_attribute = {} ({}): {}{}",
                            self.key_attribute,
                            answer.status,
                            error_text(&answer.text),
                            hint(answer.status)
                        ),
                    });
                }
                #[derive(Deserialize)]
                struct Page {
                    #[serde(default)]
                    value: Vec<Map<String, Value>>,
                    #[serde(rename = "@odata.nextLink", default)]
                    next: Option<String>,
                }
                let page: Page = match serde_json::from_str(&answer.text) {
                    Ok(page) => page,
                    Err(e) => {
                        return Err(Outcome::RetryLater {
                            after: None,
                            reason: format!(
                                "Dataverse query answer unreadable ({e}): {}",
                                error_text(&answer.text)
                            ),
                        })
                    }
                };
                for record in page.value {
                    if let Some(key) = record.get(&self.key_attribute).and_then(Value::as_str) {
                        found.insert(key.to_lowercase(), record.clone());
                    }
                }
                match page.next {
                    Some(next) if next.starts_with(&self.api_base) => url = next,
                    _ => break,
                }
            }
        }
        Ok(found)
    }

    /// The follow-up task for a qualified or disqualified lead: regarding the
    /// opportunity it was qualified into, else its contact, account, or the lead
    /// itself; owned by the lead's owner; its id derived from the customer's newest
    /// event, so a replay finds it instead of making another.
    fn follow_up_task(
        &self,
        lead: &CustomerLead,
        record: &Map<String, Value>,
    ) -> (String, Map<String, Value>, String) {
        let text = |c: &str| {
            record
                .get(c)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let state = record
            .get("statecode")
            .and_then(Value::as_i64)
            .unwrap_or(LEAD_OPEN);
        let state_name = if state == 1 {
            "qualified"
        } else {
            "disqualified"
        };
        let lead_id = text("leadid").unwrap_or_default();
        let (regarding_set, regarding_nav, regarding_id, regarding_what) =
            if let Some(id) = text("_qualifyingopportunityid_value") {
                (
                    "opportunities",
                    "regardingobjectid_opportunity_task",
                    id,
                    "opportunity",
                )
            } else if let Some(id) = text("_parentcontactid_value") {
                ("contacts", "regardingobjectid_contact_task", id, "contact")
            } else if let Some(id) = text("_parentaccountid_value") {
                ("accounts", "regardingobjectid_account_task", id, "account")
            } else {
                (
                    "leads",
                    "regardingobjectid_lead_task",
                    lead_id.clone(),
                    "lead",
                )
            };
        let event = format!(
            "{}|{}",
            lead.external_key,
            crate::timestamp::format(lead.last_seen)
        );
        let id = task_id(&event);
        let subject = mapping::follow_up_subject(lead, TASK_SUBJECT_MAX);
        let who = mapping::who(lead);
        let next = if lead.do_not_contact {
            "Next step: the customer asked not to be contacted. Do not call or email them; set Do not allow Emails/Phone Calls on the contact."
        } else if state == 1 {
            "Next step: contact the customer about this request within one business day, on the opportunity."
        } else {
            "Next step: the lead was disqualified; decide whether this new interest reopens it."
        };
        let description = format!(
            "{who} came back through the marketplace: {}; stage {}.\nTheir lead {lead_id} is {state_name}, so leadsync did not change it.\n{next}\n\n{}",
            mapping::subject(lead),
            lead.stage.as_str(),
            lead.summary
        );
        let (description, _) = mapping::truncate(&description, 2000);
        let mut task = Map::new();
        task.insert("subject".into(), Value::String(subject));
        task.insert("description".into(), Value::String(description));
        task.insert(
            "scheduledend".into(),
            Value::String(crate::timestamp::format(
                time::OffsetDateTime::now_utc() + time::Duration::days(1),
            )),
        );
        task.insert(
            format!("{regarding_nav}@odata.bind"),
            Value::String(format!("/{regarding_set}({regarding_id})")),
        );
        let mut owner_note = String::new();
        if let Some(owner) = text("_ownerid_value") {
            let kind = text("_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname")
                .unwrap_or_else(|| "systemuser".into());
            let set = if kind == "team" {
                "teams"
            } else {
                "systemusers"
            };
            task.insert(
                "ownerid@odata.bind".into(),
                Value::String(format!("/{set}({owner})")),
            );
            owner_note = format!(", owned by {kind} {owner}");
        }
        let note = format!(
            "task {id} regarding {regarding_what} {regarding_id} for {state_name} lead {lead_id}{owner_note}"
        );
        (id, task, note)
    }

    /// The request that writes one lead of the batch (a create, an update or a
    /// follow-up task), or the lead's outcome when no request is needed.
    fn plan(
        &self,
        index: usize,
        lead: &CustomerLead,
        existing: &HashMap<String, Map<String, Value>>,
    ) -> Result<Part, Outcome> {
        let (key, owned) = self
            .prepare_owned(lead)
            .map_err(|reason| Outcome::Rejected { reason })?;
        let customer = lead.log_key();
        let record = existing.get(&key.to_lowercase());
        let closed = record.filter(|r| {
            r.get("statecode")
                .and_then(Value::as_i64)
                .unwrap_or(LEAD_OPEN)
                != LEAD_OPEN
        });
        if let Some(record) = closed {
            let (id, task, note) = self.follow_up_task(lead, record);
            let body = serde_json::to_vec(&task).map_err(|e| Outcome::RetryLater {
                after: None,
                reason: format!("cannot encode the follow-up task as JSON: {e}"),
            })?;
            return Ok(Part {
                index,
                customer,
                kind: PartKind::Task { note },
                url: format!("{}/tasks({id})", self.api_path),
                condition: ("If-None-Match", "*"),
                body,
            });
        }
        let (body, condition, kind) = match record {
            None => (owned.for_create(), ("If-None-Match", "*"), PartKind::Create),
            Some(record) => {
                let body = owned.for_update(|c| mapping::crm_value_is_empty(record.get(c), &[]));
                if body.keys().all(|c| *c == self.key_attribute) {
                    tracing::debug!(customer = %customer, "Nothing leadsync owns changed on the Dataverse lead; no request.");
                    return Err(Outcome::Delivered);
                }
                (body, ("If-Match", "*"), PartKind::Update)
            }
        };
        let body = serde_json::to_vec(&body).map_err(|e| Outcome::Rejected {
            reason: format!("cannot encode the lead as JSON: {e}"),
        })?;
        Ok(Part {
            index,
            customer,
            kind,
            url: self.lead_path(&key),
            condition,
            body,
        })
    }

    /// What a final answer to one request means for its lead, or why it is worth
    /// another try (408, 429, 5xx), with the server's `Retry-After`.
    fn judge(
        &self,
        part: &Part,
        answer: &Answer,
        after: Option<Duration>,
    ) -> Result<Outcome, (Option<Duration>, String)> {
        if let Step::Retry { after, reason } = classify(answer.status, after, &answer.text) {
            return Err((after, self.redact(reason)));
        }
        let status = answer.status;
        Ok(match &part.kind {
            PartKind::Task { note } => {
                if status.is_success() {
                    tracing::info!(customer = %part.customer, %note, "The Dataverse lead is closed; created a follow-up task instead of updating it.");
                    Outcome::FollowedUp { note: note.clone() }
                } else if status == StatusCode::PRECONDITION_FAILED {
                    // The task of this event is there already (a replay).
                    Outcome::FollowedUp { note: note.clone() }
                } else {
                    match self.refusal(answer, "the follow-up task") {
                        Outcome::Rejected { reason } => Outcome::RetryLater {
                            after: None,
                            reason: format!(
                                "the lead is closed and Dataverse refused its follow-up task: {reason}"
                            ),
                        },
                        other => other,
                    }
                }
            }
            kind => {
                let created = matches!(kind, PartKind::Create);
                match status {
                    s if s.is_success() => {
                        tracing::debug!(customer = %part.customer, status = s.as_u16(), entity = %answer.entity, created, "Lead upserted in Dataverse.");
                        Outcome::Delivered
                    }
                    // Created by someone else since the batch's query: next time it is updated.
                    StatusCode::PRECONDITION_FAILED if created => Outcome::RetryLater {
                        after: None,
                        reason: "the Dataverse lead was created by someone else meanwhile; it is updated next time".into(),
                    },
                    // Deleted since the batch's query: next time it is created again.
                    StatusCode::NOT_FOUND
                        if !created
                            && !is_endpoint_refusal(StatusCode::BAD_REQUEST, &answer.text) =>
                    {
                        Outcome::RetryLater {
                            after: None,
                            reason: "the Dataverse lead was deleted meanwhile; it is created again next time".into(),
                        }
                    }
                    _ => self.refusal(answer, "the lead upsert"),
                }
            }
        })
    }

    /// Sends `parts` as one `$batch` until every part has a final answer or the retries
    /// run out. Parts answered 408/429/5xx go again in the next attempt (after the
    /// longest `Retry-After` among them); a `$batch` refused as a whole for a reason that
    /// is not the endpoint's (400 malformed, 413 too large) is split in halves and each
    /// half sent on its own, down to one request, whose refusal is then its own: one bad
    /// record never takes the others down. Returns (input index, outcome) pairs.
    async fn send_parts(&self, parts: Vec<Part>) -> Vec<(usize, Outcome)> {
        let mut outcomes = Vec::with_capacity(parts.len());
        let mut groups = VecDeque::from([parts]);
        while let Some(group) = groups.pop_front() {
            let pending = StdMutex::new(group);
            let finished = StdMutex::new(Vec::new());
            let result = http::retrying(&self.retry, SINK, |_| {
                self.attempt_batch(&pending, &finished)
            })
            .await;
            outcomes.extend(unpoisoned(finished.into_inner()));
            let mut pending = unpoisoned(pending.into_inner());
            match result {
                Finished::Done(BatchEnd::Answered) => {}
                Finished::Done(BatchEnd::Split) => {
                    let second = pending.split_off(pending.len() / 2);
                    groups.push_front(second);
                    groups.push_front(pending);
                }
                Finished::GaveUp { after, reason } => {
                    outcomes.extend(pending.iter().map(|p| {
                        (
                            p.index,
                            Outcome::RetryLater {
                                after,
                                reason: reason.clone(),
                            },
                        )
                    }));
                }
                Finished::Failed { reason } => {
                    outcomes.extend(pending.iter().map(|p| {
                        (
                            p.index,
                            Outcome::EndpointFailed {
                                reason: reason.clone(),
                            },
                        )
                    }));
                }
            }
        }
        outcomes
    }

    /// One attempt of a `$batch` of the parts still pending: a 401 gets a fresh token
    /// once; final answers move to `finished`, the rest stay pending.
    async fn attempt_batch(
        &self,
        pending: &StdMutex<Vec<Part>>,
        finished: &StdMutex<Vec<(usize, Outcome)>>,
    ) -> Step<BatchEnd> {
        let mut refreshed = false;
        loop {
            let parts = lock(pending).clone();
            if parts.is_empty() {
                return Step::Done(BatchEnd::Answered);
            }
            let token = match self.bearer().await {
                Ok(token) => token,
                Err(error) => return error.into_step(),
            };
            let boundary = format!("batch_leadsync_{:016x}", rand::random::<u64>());
            let request = self
                .odata(
                    self.client.post(format!("{}/$batch", self.api_base)),
                    &token,
                )
                .header(
                    CONTENT_TYPE,
                    format!("multipart/mixed; boundary={boundary}"),
                )
                .header("Prefer", "odata.continue-on-error")
                .body(batch_body(&boundary, &parts));
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) => {
                    return Step::Retry {
                        after: None,
                        reason: self.transport_reason("$batch request", e),
                    }
                }
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                tracing::info!(
                    requests = parts.len(),
                    "Dataverse refused the access token; getting a new one."
                );
                self.forget(&token).await;
                refreshed = true;
                continue;
            }
            let after = http::retry_after(response.headers());
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let text = match response.text().await {
                Ok(text) => text,
                Err(e) => {
                    return Step::Retry {
                        after,
                        reason: self.transport_reason("reading the Dataverse $batch response", e),
                    }
                }
            };
            if !status.is_success() {
                self.log_service_protection(&text, after, parts.len());
                // Throttling counts the `$batch` as one request and answers it as a whole.
                if let Step::Retry { after, reason } = classify(status, after, &text) {
                    return Step::Retry {
                        after,
                        reason: self.redact(reason),
                    };
                }
                let answer = Answer {
                    status,
                    text: self.redact(text),
                    entity: String::new(),
                };
                if is_endpoint_refusal(status, &answer.text) {
                    let mut done = lock(finished);
                    for part in &parts {
                        done.push((part.index, self.refusal(&answer, "the $batch")));
                    }
                    lock(pending).clear();
                    return Step::Done(BatchEnd::Answered);
                }
                if parts.len() > 1 {
                    tracing::warn!(
                        requests = parts.len(),
                        status = status.as_u16(),
                        reason = %error_text(&answer.text),
                        "Dataverse refused the $batch as a whole; sending it again in halves so that one bad record does not hold back the others."
                    );
                    return Step::Done(BatchEnd::Split);
                }
                // One request left: the refusal is its own.
                let part = &parts[0];
                let outcome = match self.judge(part, &answer, None) {
                    Ok(outcome) => outcome,
                    Err((after, reason)) => return Step::Retry { after, reason },
                };
                lock(finished).push((part.index, outcome));
                lock(pending).clear();
                return Step::Done(BatchEnd::Answered);
            }
            let answers = match parse_batch_response(&content_type, &text) {
                Ok(answers) => answers,
                Err(reason) => {
                    return Step::Retry {
                        after: None,
                        reason: self.redact(reason),
                    }
                }
            };
            // The responses come in the order of the requests; without
            // continue-on-error Dataverse would stop at the first failure, so a request
            // without a response is sent again.
            let sent = parts.len();
            let mut again = Vec::new();
            let mut done = Vec::new();
            let mut retry: Option<(Option<Duration>, String)> = None;
            let mut reauth = false;
            for (i, part) in parts.into_iter().enumerate() {
                let Some(inner) = answers.get(i) else {
                    retry.get_or_insert((
                        None,
                        format!(
                            "Dataverse answered {} of the $batch's {sent} requests",
                            answers.len()
                        ),
                    ));
                    again.push(part);
                    continue;
                };
                if inner.status == StatusCode::UNAUTHORIZED && !refreshed {
                    reauth = true;
                    again.push(part);
                    continue;
                }
                let answer = Answer {
                    status: inner.status,
                    text: self.redact(inner.text.clone()),
                    entity: inner.entity.clone(),
                };
                self.log_service_protection(&answer.text, inner.after, 1);
                match self.judge(&part, &answer, inner.after) {
                    Ok(outcome) => done.push((part.index, outcome)),
                    Err((after, reason)) => {
                        retry = Some(match retry {
                            None => (after, reason),
                            Some((was, first)) => (was.max(after), first),
                        });
                        again.push(part);
                    }
                }
            }
            lock(finished).extend(done);
            *lock(pending) = again;
            if reauth {
                self.forget(&token).await;
                refreshed = true;
                continue;
            }
            return match retry {
                None => Step::Done(BatchEnd::Answered),
                Some((after, reason)) => Step::Retry { after, reason },
            };
        }
    }

    fn log_service_protection(&self, body: &str, after: Option<Duration>, requests: usize) {
        if let Some((code, limit)) = service_protection(body) {
            tracing::warn!(
                requests,
                code = %code,
                limit,
                retry_after_ms = after.map(|a| a.as_millis() as u64),
                "Dataverse service protection limit reached; waiting as told."
            );
        }
    }
}

/// What a `$batch` attempt ended with.
enum BatchEnd {
    /// Every part has its outcome.
    Answered,
    /// Refused as a whole: send the pending parts again in halves.
    Split,
}

/// What one request of a `$batch` writes.
#[derive(Clone)]
enum PartKind {
    Create,
    Update,
    Task { note: String },
}

/// One request of a `$batch`: a `PATCH` (an upsert by key) of one lead or its task.
#[derive(Clone)]
struct Part {
    /// The lead's position in the delivered batch.
    index: usize,
    /// The customer as log lines name them.
    customer: String,
    kind: PartKind,
    /// The path from the host, e.g. `/api/data/v9.2/leads(leadsync_key='ls-1')`.
    url: String,
    condition: (&'static str, &'static str),
    body: Vec<u8>,
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unpoisoned<T>(result: std::sync::LockResult<T>) -> T {
    result.unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A `$batch` body (OData 4.0 multipart/mixed): one part per request, no change set,
/// each `Content-Type: application/http` with `Content-Transfer-Encoding: binary`.
fn batch_body(boundary: &str, parts: &[Part]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nPATCH {} HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nAccept: application/json\r\n{}: {}\r\n\r\n",
                part.url, part.condition.0, part.condition.1
            )
            .as_bytes(),
        );
        out.extend_from_slice(&part.body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// One response of a `$batch` response.
#[derive(Debug)]
struct InnerAnswer {
    status: StatusCode,
    after: Option<Duration>,
    entity: String,
    text: String,
}

/// The `boundary` parameter of a `multipart/mixed` content type.
fn multipart_boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Header lines and the rest, split at the first empty line.
fn split_head(text: &str) -> (&str, &str) {
    let crlf = text.find("\r\n\r\n").map(|i| (i, 4));
    let lf = text.find("\n\n").map(|i| (i, 2));
    match [crlf, lf].into_iter().flatten().min_by_key(|(i, _)| *i) {
        Some((i, n)) => (&text[..i], &text[i + n..]),
        None => (text, ""),
    }
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The responses of a `$batch` response body, in order (a change set's responses in
/// its place).
fn parse_batch_response(content_type: &str, body: &str) -> Result<Vec<InnerAnswer>, String> {
    let boundary = multipart_boundary(content_type).ok_or_else(|| {
        format!(
            "Dataverse answered the $batch with {content_type:?}, not multipart/mixed: {}",
            error_text(body)
        )
    })?;
    let delimiter = format!("--{boundary}");
    let mut answers = Vec::new();
    let mut pieces = body.split(delimiter.as_str());
    pieces.next(); // the preamble
    let mut closed = false;
    for piece in pieces {
        if piece.starts_with("--") {
            closed = true;
            break;
        }
        let piece = piece
            .strip_prefix("\r\n")
            .or_else(|| piece.strip_prefix('\n'))
            .unwrap_or(piece);
        let (mime, content) = split_head(piece);
        let part_type = header_value(mime, "content-type").unwrap_or_default();
        if multipart_boundary(part_type).is_some() {
            answers.extend(parse_batch_response(part_type, content)?);
            continue;
        }
        let (head, text) = split_head(content);
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| format!("unreadable $batch response line {status_line:?}"))?;
        let after = header_value(head, "retry-after").and_then(|v| {
            let mut headers = HeaderMap::new();
            headers.insert("retry-after", HeaderValue::from_str(v).ok()?);
            http::retry_after(&headers)
        });
        answers.push(InnerAnswer {
            status,
            after,
            entity: header_value(head, "odata-entityid")
                .unwrap_or_default()
                .to_owned(),
            text: text.trim_end_matches(['\r', '\n']).to_owned(),
        });
    }
    if !closed {
        return Err(format!(
            "the $batch response ended before its closing boundary ({} responses read)",
            answers.len()
        ));
    }
    Ok(answers)
}

/// One final Web API answer.
struct Answer {
    status: StatusCode,
    text: String,
    entity: String,
}

/// A task id derived from the event: the same event always names the same task.
fn task_id(event: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("leadsync-follow-up:{event}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    // RFC 4122 layout: version 5 (name-based, SHA), variant 10.
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A refusal that is the endpoint's, not the record's: credentials or privileges
/// (401 after a fresh token, 403), a wrong table, key or column (404, 405, a 400 that
/// names a property, key or segment the environment does not have).
fn is_endpoint_refusal(status: StatusCode, body: &str) -> bool {
    if matches!(status.as_u16(), 401 | 403 | 404 | 405) {
        return true;
    }
    if status != StatusCode::BAD_REQUEST {
        return false;
    }
    let text = error_text(body).to_ascii_lowercase();
    [
        "could not find a property named",
        "resource not found for the segment",
        "is not an alternate key",
        "is not a valid key",
        "entity key",
        "does not exist on entity",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

#[async_trait::async_trait]
impl LeadSink for DynamicsSink {
    fn name(&self) -> &str {
        SINK
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
                .map_err(|e| sink_error(e.reason().to_owned()))?;
            let response = self
                .odata(self.client.get(&url), &token)
                .send()
                .await
                .map_err(|e| sink_error(self.transport_reason("WhoAmI request", e)))?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                self.forget(&token).await;
                refreshed = true;
                continue;
            }
            let text = response.text().await.unwrap_or_default();
            if !status.is_success() {
                return Err(sink_error(self.redact(format!(
                    "WhoAmI answered {status}: {}{}",
                    error_text(&text),
                    hint(status)
                ))));
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
                return Err(sink_error(format!(
                    "reading the lead table's alternate keys failed: {reason}"
                )))
            }
        };
        if !answer.status.is_success() {
            return Err(sink_error(format!(
                "reading the lead table's alternate keys answered {}: {}{}",
                answer.status,
                error_text(&answer.text),
                hint(answer.status)
            )));
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
            Some(status) => Err(sink_error(format!(
                "the lead table's alternate key on {} is {status}, not Active (sink.dynamics.key_attribute); upserts by it fail until it is",
                self.key_attribute
            ))),
            None => Err(sink_error(format!(
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

/// A successful token response.
struct IssuedToken {
    access_token: SecretString,
    lifetime: Duration,
}

/// When to renew a token of `lifetime`: `margin` before expiry, but never sooner than
/// half-way, so that even a short-lived token is used before it is renewed.
fn renew_after(lifetime: Duration, margin: Duration) -> Duration {
    lifetime.saturating_sub(margin.min(lifetime / 2))
}

/// Reads an Entra ID token endpoint response.
fn classify_token_response(
    status: StatusCode,
    after: Option<Duration>,
    body: &str,
    client_id: &str,
) -> Result<IssuedToken, TokenError> {
    let json: Option<Value> = serde_json::from_str(body).ok();
    if status.is_success() {
        let token = json
            .as_ref()
            .and_then(|v| v.get("access_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(TokenError::Transient {
                after: None,
                reason: "Entra ID answered the token request without an access_token".into(),
            });
        };
        // `expires_in` is a number on the v2.0 endpoint; some proxies send it as a string.
        let lifetime = json
            .as_ref()
            .and_then(|v| v.get("expires_in"))
            .and_then(|v| v.as_u64().or_else(|| v.as_str()?.trim().parse().ok()))
            .map_or(ASSUMED_TOKEN_LIFETIME, Duration::from_secs);
        return Ok(IssuedToken {
            access_token: SecretString::from(token.to_owned()),
            lifetime,
        });
    }
    let field = |name: &str| {
        json.as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let description = field("error_description")
        .map(|d| d.lines().next().unwrap_or_default().trim().to_owned())
        .unwrap_or_else(|| error_text(body));
    let error = field("error").unwrap_or_else(|| "no error code".into());
    if http::is_transient_status(status) || error == "temporarily_unavailable" {
        return Err(TokenError::Transient {
            after,
            reason: format!("Entra ID token request answered {status} ({error}: {description})"),
        });
    }
    Err(TokenError::Permanent {
        reason: format!(
            "Entra ID refused the client credentials of application {client_id} ({status}, {error}: {description}); nothing is delivered until sink.dynamics.tenant_id, client_id or client_secret is corrected"
        ),
    })
}

/// `code: message` of a Web API error body `{"error":{"code":..,"message":..}}`, else the
/// start of the body.
fn error_text(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_str);
    let message = error.and_then(|e| e.get("message")).and_then(Value::as_str);
    match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (None, Some(message)) => message.to_owned(),
        _ if body.trim().is_empty() => "empty body".into(),
        _ => {
            let mut start: String = body.trim().chars().take(MAX_BODY_IN_REASON).collect();
            if body.trim().chars().count() > MAX_BODY_IN_REASON {
                start.push_str(mapping::TRUNCATION_MARKER);
            }
            start
        }
    }
}

/// What a person can do about a status, when it is not obvious.
fn hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => " (a freshly issued token was refused: is the app registration an application user of this environment?)",
        StatusCode::FORBIDDEN => " (the application user lacks a security role that can create and update leads)",
        StatusCode::NOT_FOUND => " (check sink.dynamics.environment_url, api_version, and that key_attribute is an active alternate key of the lead table)",
        _ => "",
    }
}

/// The Dataverse service protection limits, by error code (hex as the Web API sends it,
/// or the signed decimal form of the SDK).
fn service_protection_limit(code: &str) -> Option<&'static str> {
    match code.to_ascii_lowercase().as_str() {
        "0x80072322" | "-2147015902" => Some("number of requests per user in the 5-minute window"),
        "0x80072321" | "-2147015903" => {
            Some("combined execution time of requests per user in the 5-minute window")
        }
        "0x80072326" | "-2147015898" => {
            Some("concurrent requests per user (lower sink.dynamics.parallelism if this recurs)")
        }
        _ => None,
    }
}

/// The service protection limit a response body reports, if any.
fn service_protection(body: &str) -> Option<(String, &'static str)> {
    let parsed: Value = serde_json::from_str(body).ok()?;
    let code = parsed.get("error")?.get("code")?.as_str()?;
    Some((code.to_owned(), service_protection_limit(code)?))
}

/// What a Web API answer to an upsert means: done, worth another try, or final.
fn classify(status: StatusCode, after: Option<Duration>, body: &str) -> Step<()> {
    if status.is_success() {
        return Step::Done(());
    }
    let detail = error_text(body);
    if status == StatusCode::TOO_MANY_REQUESTS {
        let reason = match service_protection(body) {
            Some((code, limit)) => {
                format!("Dataverse throttled the upsert (429, service protection {code}: {limit})")
            }
            None => format!("Dataverse throttled the upsert (429: {detail})"),
        };
        return Step::Retry { after, reason };
    }
    if http::is_transient_status(status) {
        return Step::Retry {
            after,
            reason: format!("Dataverse answered {status}: {detail}"),
        };
    }
    Step::Fail {
        reason: format!(
            "Dataverse refused the lead ({status}): {detail}{}",
            hint(status)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentitySettings;
    use crate::identity::{customer_key, CustomerState};
    use crate::lead::normalise;
    use crate::source::row::{RawRow, RowId};
    use serde_json::json;

    const SECRET: &str = "s3cr3t-client-value";

    fn settings() -> DynamicsSettings {
        settings_with(json!({}))
    }

    /// The minimal settings with the keys of `over` added or replaced.
    fn settings_with(over: Value) -> DynamicsSettings {
        let mut value = json!({
            "environment_url": "https://contoso.crm.dynamics.com",
            "tenant_id": "11111111-2222-3333-4444-555555555555",
            "client_id": "66666666-7777-8888-9999-000000000000",
            "client_secret": { "value": SECRET },
        });
        for (k, v) in over.as_object().unwrap() {
            value[k] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn lead(customer: Value) -> CustomerLead {
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
            etag: "W/1".into(),
            timestamp: crate::timestamp::parse("2024-05-01T10:00:00Z").unwrap(),
            columns,
        })
        .unwrap();
        let identity = IdentitySettings::default();
        let key = customer_key(&event.customer, identity.fallback).unwrap();
        let mut state = CustomerState::new(&key, &identity);
        state.apply([&event], &identity);
        state.lead
    }

    #[test]
    fn a_quote_is_doubled_then_the_key_is_percent_encoded() {
        assert_eq!(odata_key("O'Brien@x.com"), "O%27%27Brien%40x.com");
        assert_eq!(odata_key("ls-0123abcd"), "ls-0123abcd");
        assert_eq!(odata_key("a+b/c d"), "a%2Bb%2Fc%20d");
    }

    fn part(url: &str, condition: (&'static str, &'static str), body: &str) -> Part {
        Part {
            index: 0,
            customer: "ls-1".into(),
            kind: PartKind::Create,
            url: url.into(),
            condition,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_batch_body_has_one_application_http_part_per_request_and_a_closing_boundary() {
        let body = batch_body(
            "batch_x",
            &[
                part(
                    "/api/data/v9.2/leads(k='a')",
                    ("If-None-Match", "*"),
                    r#"{"k":"a"}"#,
                ),
                part("/api/data/v9.2/tasks(1)", ("If-None-Match", "*"), "{}"),
            ],
        );
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            "--batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
             PATCH /api/data/v9.2/leads(k='a') HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nAccept: application/json\r\nIf-None-Match: *\r\n\r\n{\"k\":\"a\"}\r\n\
             --batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
             PATCH /api/data/v9.2/tasks(1) HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nAccept: application/json\r\nIf-None-Match: *\r\n\r\n{}\r\n\
             --batch_x--\r\n"
        );
    }

    #[test]
    fn a_batch_response_is_read_in_order_with_statuses_entity_ids_retry_after_and_errors() {
        // The shape of the documentation's example (one change set-free part per request).
        let body = "--batchresponse_c1bd45c1\r\n\
            Content-Type: application/http\r\n\
            Content-Transfer-Encoding: binary\r\n\r\n\
            HTTP/1.1 204 No Content\r\n\
            OData-Version: 4.0\r\n\
            OData-EntityId: https://org.crm.dynamics.com/api/data/v9.2/leads(0001)\r\n\r\n\r\n\
            --batchresponse_c1bd45c1\r\n\
            Content-Type: application/http\r\n\
            Content-Transfer-Encoding: binary\r\n\r\n\
            HTTP/1.1 400 Bad Request\r\n\
            Content-Type: application/json; odata.metadata=minimal\r\n\
            OData-Version: 4.0\r\n\r\n\
            {\"error\":{\"code\":\"0x80044331\",\"message\":\"A validation error occurred.\"}}\r\n\
            --batchresponse_c1bd45c1\r\n\
            Content-Type: application/http\r\n\
            Content-Transfer-Encoding: binary\r\n\r\n\
            HTTP/1.1 429 Too Many Requests\r\n\
            Retry-After: 7\r\n\r\n\
            {}\r\n\
            --batchresponse_c1bd45c1--\r\n";
        let answers =
            parse_batch_response("multipart/mixed; boundary=\"batchresponse_c1bd45c1\"", body)
                .unwrap();
        assert_eq!(answers.len(), 3);
        assert_eq!(answers[0].status, StatusCode::NO_CONTENT);
        assert!(answers[0].entity.ends_with("/leads(0001)"));
        assert_eq!(answers[1].status, StatusCode::BAD_REQUEST);
        assert_eq!(
            error_text(&answers[1].text),
            "0x80044331: A validation error occurred."
        );
        assert_eq!(answers[2].after, Some(Duration::from_secs(7)));
        assert!(parse_batch_response("application/json", "{}").is_err());
        assert!(
            parse_batch_response(
                "multipart/mixed; boundary=b",
                "--b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
            )
            .is_err(),
            "a cut response is not taken for a complete one"
        );
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let s = settings();
        assert!(s.validate().is_ok());
        assert_eq!(s.authority_host, "https://login.microsoftonline.com");
        assert_eq!(s.api_version, "v9.2");
        assert_eq!(s.key_attribute, "leadsync_key");
        assert_eq!(s.parallelism, 4);
        assert_eq!(s.batch_size, 100);
        assert_eq!(s.request_timeout, Duration::from_secs(30));
        assert!(!s.allow_http);
        assert_eq!(s.fields, default_fields());
        assert_eq!(s.fields["donotphone"], LeadField::DoNotContact);
    }

    #[test]
    fn invalid_settings_name_their_key() {
        let cases = [
            (
                json!({"environment_url": "http://contoso.crm.dynamics.com"}),
                "sink.dynamics.environment_url",
            ),
            (
                json!({"environment_url": "https://contoso.crm.dynamics.com/api/data"}),
                "sink.dynamics.environment_url",
            ),
            (
                json!({"authority_host": "login.microsoftonline.com"}),
                "sink.dynamics.authority_host",
            ),
            (json!({"tenant_id": "a/b"}), "sink.dynamics.tenant_id"),
            (json!({"client_id": " "}), "sink.dynamics.client_id"),
            (json!({"api_version": "9.2"}), "sink.dynamics.api_version"),
            (
                json!({"key_attribute": "Leadsync Key"}),
                "sink.dynamics.key_attribute",
            ),
            (json!({"parallelism": 0}), "sink.dynamics.parallelism"),
            (json!({"parallelism": 53}), "sink.dynamics.parallelism"),
            (json!({"batch_size": 0}), "sink.dynamics.batch_size"),
            (json!({"batch_size": 1001}), "sink.dynamics.batch_size"),
            (
                json!({"fields": {"FirstName": "first_name"}}),
                "sink.dynamics.fields.FirstName",
            ),
            (
                json!({"max_lengths": {"description": 0}}),
                "sink.dynamics.max_lengths.description",
            ),
            (
                json!({"request_timeout": "0s"}),
                "sink.dynamics.request_timeout",
            ),
            (
                json!({"retry": {"max_attempts": 0}}),
                "sink.dynamics.retry.max_attempts",
            ),
        ];
        for (over, key) in cases {
            let (got, message) = settings_with(over.clone())
                .validate()
                .expect_err(&over.to_string());
            assert_eq!(got, key, "{over}: {message}");
        }
    }

    #[test]
    fn web_api_answers_are_classified_by_status_and_body() {
        let error = r#"{"error":{"code":"0x80040237","message":"Operation failed due to a SQL integrity violation."}}"#;
        let throttled = r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#;
        let secs = |s| Some(Duration::from_secs(s));
        let cases: [(u16, Option<Duration>, &str, &str); 8] = [
            (204, None, "", "done"),
            (201, None, "", "done"),
            (429, secs(3), throttled, "retry"),
            (503, None, "", "retry"),
            (500, None, error, "retry"),
            (408, None, "", "retry"),
            (400, None, error, "fail"),
            (404, None, "", "fail"),
        ];
        for (status, after, body, expected) in cases {
            let step = classify(StatusCode::from_u16(status).unwrap(), after, body);
            let kind = match &step {
                Step::Done(()) => "done",
                Step::Retry { after: got, .. } => {
                    assert_eq!(*got, after, "{status}: Retry-After is kept");
                    "retry"
                }
                Step::Fail { .. } => "fail",
            };
            assert_eq!(kind, expected, "{status}: {step:?}");
        }
        let Step::Fail { reason } = classify(StatusCode::BAD_REQUEST, None, error) else {
            panic!()
        };
        assert!(
            reason.contains("0x80040237: Operation failed due to a SQL integrity violation."),
            "{reason}"
        );
        let Step::Retry { reason, .. } = classify(StatusCode::TOO_MANY_REQUESTS, None, throttled)
        else {
            panic!()
        };
        assert!(
            reason.contains("0x80072322") && reason.contains("number of requests"),
            "{reason}"
        );
    }

    #[test]
    fn the_three_service_protection_codes_are_recognised() {
        for code in ["0x80072322", "0x80072321", "0x80072326", "-2147015898"] {
            assert!(service_protection_limit(code).is_some(), "{code}");
        }
        assert!(service_protection_limit("0x80040237").is_none());
        assert!(
            service_protection(r#"{"error":{"code":"0x80072326","message":"x"}}"#)
                .unwrap()
                .1
                .contains("concurrent")
        );
    }

    #[test]
    fn token_errors_are_permanent_except_outages_and_throttling() {
        let refused = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value.\r\nTrace ID: abc\r\nCorrelation ID: def","error_codes":[7000215]}"#;
        let Err(TokenError::Permanent { reason }) =
            classify_token_response(StatusCode::UNAUTHORIZED, None, refused, "app-1")
        else {
            panic!("a refused secret is permanent")
        };
        assert!(
            reason.contains("invalid_client") && reason.contains("AADSTS7000215"),
            "{reason}"
        );
        assert!(
            reason.contains("until") && reason.contains("app-1"),
            "{reason}"
        );
        assert!(!reason.contains("Trace ID"), "{reason}");
        assert!(matches!(
            classify_token_response(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(2)),
                "",
                "a"
            ),
            Err(TokenError::Transient { after: Some(_), .. })
        ));
        let ok = classify_token_response(
            StatusCode::OK,
            None,
            r#"{"token_type":"Bearer","expires_in":"3599","access_token":"eyJ0"}"#,
            "a",
        )
        .unwrap_or_else(|_| panic!("a token"));
        assert_eq!(ok.lifetime, Duration::from_secs(3599));
        assert_eq!(ok.access_token.expose_secret(), "eyJ0");
    }

    #[test]
    fn a_token_is_renewed_before_it_expires_even_when_short_lived() {
        let margin = Duration::from_secs(300);
        assert_eq!(
            renew_after(Duration::from_secs(3599), margin),
            Duration::from_secs(3299)
        );
        assert_eq!(
            renew_after(Duration::from_secs(2), margin),
            Duration::from_secs(1)
        );
        assert_eq!(renew_after(Duration::ZERO, margin), Duration::ZERO);
    }

    #[test]
    fn the_body_always_has_a_subject_and_the_key_and_cuts_long_values() {
        let sink = DynamicsSink::new(&settings_with(
            json!({"fields": {"firstname": "first_name", "companyname": "company"}}),
        ))
        .unwrap();
        let long_company = "C".repeat(150);
        let lead =
            lead(json!({"FirstName": "Ana", "Email": "ana@fabrikam.com", "Company": long_company}));

        let (key, body) = sink.prepare(&lead).unwrap();

        assert_eq!(key, lead.external_key);
        assert_eq!(body["leadsync_key"], json!(lead.external_key));
        assert_eq!(body["subject"], json!("Contoso Analytics: Get it now"));
        assert_eq!(body["firstname"], json!("Ana"));
        let company = body["companyname"].as_str().unwrap();
        assert_eq!(company.chars().count(), 100);
        assert!(company.ends_with(mapping::TRUNCATION_MARKER));
    }

    #[test]
    fn a_false_opt_out_is_never_sent_and_an_update_carries_only_what_leadsync_owns() {
        let sink = DynamicsSink::new(&settings()).unwrap();
        let mut opted_out =
            lead(json!({"FirstName": "Ana", "Email": "ana@fabrikam.com", "Company": "Fabrikam"}));
        let (_, contactable) = sink.prepare_owned(&opted_out).unwrap();
        opted_out.do_not_contact = true;
        let (_, owned) = sink.prepare_owned(&opted_out).unwrap();

        let create = contactable.for_create();
        let update_filled = owned.for_update(|_| false);
        let update_empty = owned.for_update(|_| true);

        assert!(create.get("donotemail").is_none() && create.get("donotphone").is_none());
        assert_eq!(create["companyname"], json!("Fabrikam"));
        assert_eq!(update_filled["donotemail"], json!(true));
        assert_eq!(update_filled["donotphone"], json!(true));
        assert!(update_filled.get("companyname").is_none(), "if_empty");
        assert_eq!(update_empty["companyname"], json!("Fabrikam"));
        for on_create in ["subject", "description"] {
            assert!(update_empty.get(on_create).is_none(), "{on_create}");
        }
        assert_eq!(update_filled["firstname"], json!("Ana"));
        assert_eq!(update_filled["leadsync_key"], json!(opted_out.external_key));
    }

    #[test]
    fn task_ids_are_stable_per_event_and_shaped_like_guids() {
        let a = task_id("ls-1|2024-05-01T10:00:00Z");
        assert_eq!(a, task_id("ls-1|2024-05-01T10:00:00Z"));
        assert_ne!(a, task_id("ls-1|2024-05-02T10:00:00Z"));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
        assert_eq!(&a[14..15], "5");
    }

    #[test]
    fn endpoint_refusals_are_told_from_record_refusals() {
        let body = |m: &str| json!({"error": {"code": "0x80060888", "message": m}}).to_string();
        assert!(is_endpoint_refusal(StatusCode::FORBIDDEN, ""));
        assert!(is_endpoint_refusal(
            StatusCode::BAD_REQUEST,
            &body("Could not find a property named 'x' on type 'Microsoft.Dynamics.CRM.lead'.")
        ));
        assert!(!is_endpoint_refusal(
            StatusCode::BAD_REQUEST,
            &body("A validation error occurred. The length of the 'companyname' attribute exceeded the maximum.")
        ));
    }

    #[test]
    fn an_email_key_without_an_email_is_rejected_with_a_reason() {
        let sink =
            DynamicsSink::new(&settings_with(json!({"key_attribute": "emailaddress1"}))).unwrap();
        let without = lead(json!({"FirstName": "Ana", "LastName": "Silva", "Company": "Fabrikam"}));
        let reason = sink.prepare(&without).unwrap_err();
        assert!(
            reason.contains("no email") && reason.contains("emailaddress1"),
            "{reason}"
        );

        let with = lead(json!({"Email": " Ana@Fabrikam.com "}));
        let (key, body) = sink.prepare(&with).unwrap();
        assert_eq!(key, "ana@fabrikam.com");
        assert_eq!(body["emailaddress1"], json!("ana@fabrikam.com"));
    }

    #[test]
    fn neither_the_settings_nor_the_sink_show_the_secret_in_debug() {
        let s = settings();
        let sink = DynamicsSink::new(&s).unwrap();
        for text in [format!("{s:?}"), format!("{sink:?}")] {
            assert!(!text.contains(SECRET), "{text}");
        }
        assert_eq!(sink.redact(format!("echo {SECRET}!")), "echo [redacted]!");
    }

    #[test]
    fn the_scope_and_urls_come_from_the_environment_url() {
        let mut s = settings();
        s.environment_url = "https://contoso.crm4.dynamics.com/".into();
        s.authority_host = "https://login.microsoftonline.us/".into();
        let sink = DynamicsSink::new(&s).unwrap();
        assert_eq!(sink.scope, "https://contoso.crm4.dynamics.com/.default");
        assert_eq!(
            sink.api_base,
            "https://contoso.crm4.dynamics.com/api/data/v9.2"
        );
        assert_eq!(
            sink.token_url,
            "https://login.microsoftonline.us/11111111-2222-3333-4444-555555555555/oauth2/v2.0/token"
        );
    }
}
