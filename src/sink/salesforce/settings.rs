//! `[sink.salesforce]`: the settings, their defaults and their checks.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::MIN_API_MAJOR;
use crate::retry::RetrySettings;
use crate::secret::SecretSource;
use crate::sink::http::check_url;
use crate::sink::mapping::{LeadField, WriteMode};

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
    pub(super) fn as_str(self) -> &'static str {
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

pub(super) fn default_api_limit_pause() -> Duration {
    Duration::from_secs(30 * 60)
}

pub(super) fn default_api_version() -> String {
    "v62.0".into()
}
pub(super) fn default_external_id_field() -> String {
    "Leadsync_Key__c".into()
}
pub(super) fn default_request_timeout() -> Duration {
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
pub(super) fn is_api_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 80
}

pub(super) fn api_major(version: &str) -> Option<u32> {
    let (major, minor) = version.strip_prefix('v')?.split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    (all_digits(major) && all_digits(minor))
        .then(|| major.parse().ok())
        .flatten()
}

impl SalesforceSettings {
    /// Checks what types cannot express; returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
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
        self.validate_auth()?;
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
        self.validate_field_names()?;
        if self.api_limit_pause.is_zero() {
            return bad("api_limit_pause", "must be greater than zero");
        }
        self.validate_field_values()?;
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be greater than zero");
        }
        self.retry.validate("sink.salesforce.retry")?;
        Ok(())
    }

    /// The keys each OAuth flow needs, and those it does not use.
    fn validate_auth(&self) -> Result<(), (String, String)> {
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
        Ok(())
    }

    /// Mapped and owned fields: API names, never the external id or the record id.
    fn validate_field_names(&self) -> Result<(), (String, String)> {
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
        Ok(())
    }

    /// Placeholders and maximum lengths: API names with a usable value.
    fn validate_field_values(&self) -> Result<(), (String, String)> {
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
        Ok(())
    }
}

/// `sink.salesforce.{key}` and why it is refused.
fn bad<T>(key: &str, why: &str) -> Result<T, (String, String)> {
    Err((format!("sink.salesforce.{key}"), why.to_owned()))
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
