//! `[sink.dynamics]`: the settings, their defaults and their checks.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, MAX_PARALLELISM};
use crate::retry::RetrySettings;
use crate::secret::SecretSource;
use crate::sink::http;
use crate::sink::mapping::{LeadField, WriteMode};

/// The column sizes of the standard `lead` table, in characters.
pub(super) const DEFAULT_MAX_LENGTHS: [(&str, usize); 9] = [
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

pub(super) fn default_authority_host() -> String {
    "https://login.microsoftonline.com".into()
}
pub(super) fn default_api_version() -> String {
    "v9.2".into()
}
pub(super) fn default_key_attribute() -> String {
    "leadsync_key".into()
}
pub(super) fn default_parallelism() -> usize {
    4
}
pub(super) fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
pub(super) fn default_token_refresh_margin() -> Duration {
    Duration::from_secs(5 * 60)
}
pub(super) fn default_request_timeout() -> Duration {
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
pub(super) fn is_logical_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl DynamicsSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.validate_auth()?;
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
        self.validate_field_names()?;
        self.validate_max_lengths()?;
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero".into());
        }
        self.retry.validate("sink.dynamics.retry")?;
        Ok(())
    }

    /// Where to sign in and as whom: the environment and authority URLs, the
    /// tenant, the app registration.
    fn validate_auth(&self) -> Result<(), (String, String)> {
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
        Ok(())
    }

    /// The columns `fields` and `ownership` write are logical names.
    fn validate_field_names(&self) -> Result<(), (String, String)> {
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
        Ok(())
    }

    /// Each `max_lengths` entry, its column name then its size, in key order.
    fn validate_max_lengths(&self) -> Result<(), (String, String)> {
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
        Ok(())
    }
}

fn bad<T>(key: &str, message: String) -> Result<T, (String, String)> {
    Err((format!("sink.dynamics.{key}"), message))
}
