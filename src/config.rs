//! Typed settings: one TOML file layered with `LEADSYNC__SECTION__KEY` variables,
//! validated before any I/O.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::sink::alert::{SlackSettings, TeamsSettings, Vendor};
use crate::sink::dynamics::DynamicsSettings;
use crate::sink::email::EmailSettings;
use crate::sink::hubspot::HubspotSettings;
use crate::sink::marketo::MarketoSettings;
use crate::sink::salesforce::SalesforceSettings;
use crate::sink::webhook::WebhookSettings;

/// Where the daemon looks for its file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/leadsync/leadsync.toml";
/// The environment prefix: `LEADSYNC__SOURCE__TABLE=...` sets `source.table`.
pub const ENV_PREFIX: &str = "LEADSYNC";

/// Everything that can go wrong while loading settings. Each names the key and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not valid TOML.
    #[error("cannot read config file {path}: {message}")]
    File { path: PathBuf, message: String },
    /// A key is unknown, missing or has the wrong type.
    #[error("config key `{key}` ({origin}): {message}")]
    Key {
        key: String,
        origin: String,
        message: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("config key `{key}` ({origin}): {message}")]
    Invalid {
        key: String,
        origin: String,
        message: String,
    },
    /// A secret named by the config could not be read.
    #[error("config key `{key}`: {message}")]
    Secret { key: String, message: String },
}

/// The whole settings tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The Azure table the marketplace writes leads into.
    pub source: SourceSettings,
    /// Where leadsync keeps its checkpoint and the rows it has handled.
    #[serde(default)]
    pub state: StateSettings,
    /// Where leads are delivered.
    #[serde(default)]
    pub sink: SinkSettings,
    /// What happens to test leads and do-not-contact leads.
    #[serde(default)]
    pub policy: PolicySettings,
    /// How events are attributed to customers and merged.
    #[serde(default)]
    pub identity: IdentitySettings,
    /// Log format and level.
    #[serde(default)]
    pub log: LogSettings,
    /// Poll loop behaviour.
    #[serde(default)]
    pub run: RunSettings,
    /// The optional HTTP listener: /metrics, /healthz, /readyz, /status.
    #[serde(default)]
    pub metrics: MetricsSettings,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address to listen on, e.g. "127.0.0.1:9464"; unset (the default) = no listener.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// Table name. The marketplace has always used `MarketplaceLeads`, but never documented it.
    #[serde(default = "default_table")]
    pub table: String,
    /// A full storage connection string (`UseDevelopmentStorage=true` works too).
    pub connection_string: Option<SecretSource>,
    /// Storage account name, with `account_key` or `sas_token`.
    pub account: Option<String>,
    /// Storage account key.
    pub account_key: Option<SecretSource>,
    /// Shared access signature (query string, with or without the leading `?`).
    pub sas_token: Option<SecretSource>,
    /// Entra ID instead of a key: "managed_identity", "workload_identity" or "azure_cli"
    /// (needs `account` and the "Storage Table Data Contributor" role).
    pub identity: Option<IdentityKind>,
    /// Client id of a user-assigned managed identity (unset: the system-assigned one).
    pub identity_client_id: Option<String>,
    /// Managed-identity token endpoint override (default: `IDENTITY_ENDPOINT` when the
    /// platform sets it, else the VM metadata service).
    pub identity_endpoint: Option<String>,
    /// Table endpoint URL, for sovereign clouds or emulators (default: the public cloud URL of `account`).
    pub endpoint: Option<String>,
    /// Look-back window re-read on every poll, because Timestamps are not ordered across partitions.
    #[serde(default = "default_overlap", with = "humantime_serde")]
    pub overlap: Duration,
    /// Entities per page requested from the service (the service caps it at 1000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Timeout of one request to the table service.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of one page request on timeouts, 5xx and throttling.
    #[serde(default)]
    pub retry: RetrySettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    ManagedIdentity,
    WorkloadIdentity,
    AzureCli,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts per request before the poll gives up (and the next poll tries again).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First back-off; doubles per attempt, with full jitter.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of one back-off.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl RetrySettings {
    /// Checks the retry settings found under `prefix` (e.g. `sink.webhook.retry`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        let bad = |key: &str, why: String| Err((format!("{prefix}.{key}"), why));
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1".into());
        }
        if self.initial_backoff.is_zero() {
            return bad("initial_backoff", "must be greater than zero".into());
        }
        if self.max_backoff < self.initial_backoff {
            return bad(
                "max_backoff",
                format!("must not be smaller than {prefix}.initial_backoff"),
            );
        }
        Ok(())
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackend {
    /// One local file under `state.dir` (a VM with a disk).
    File,
    /// A table in the same storage account (jobs without a durable disk).
    Table,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Where state lives.
    #[serde(default = "default_state_backend")]
    pub backend: StateBackend,
    /// Directory of the state file `leadsync.redb` (backend "file").
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// State table in the source's storage account (backend "table").
    #[serde(default = "default_state_table")]
    pub table: String,
    /// How long a processing lease lasts without renewal (backend "table"); a holder
    /// that dies loses it after this long.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long lead data is kept (`"forever"`: `None`): a customer not seen for this
    /// long, and rejected, skipped and unidentifiable rows and dead letters older than
    /// this, are removed by the daemon, a bounded amount per poll.
    #[serde(default = "default_retention", deserialize_with = "retention")]
    pub retention: Option<Duration>,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            backend: default_state_backend(),
            dir: default_state_dir(),
            table: default_state_table(),
            lease_ttl: default_lease_ttl(),
            retention: default_retention(),
        }
    }
}

/// 400 days: a year of a customer's silence plus a month, so that a customer who comes
/// back yearly (a renewal, a yearly trial) is still the same customer to leadsync.
fn default_retention() -> Option<Duration> {
    Some(Duration::from_secs(400 * 24 * 3600))
}

/// `"forever"`, or a duration such as `"400d"`.
fn retention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim() == "forever" {
        return Ok(None);
    }
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(|e| {
            serde::de::Error::custom(format!(
                "{e}: state.retention is a duration such as \"400d\", or \"forever\""
            ))
        })
}

fn default_state_backend() -> StateBackend {
    StateBackend::File
}
fn default_state_table() -> String {
    "LeadsyncState".into()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Jsonl,
    Salesforce,
    Dynamics,
    Webhook,
    /// An alert in a Microsoft Teams channel (Workflows webhook) per stage reached.
    Teams,
    /// An alert in a Slack channel (incoming webhook) per stage reached.
    Slack,
    Hubspot,
    Marketo,
    /// An alert by email (SMTP) per stage reached, or a digest of them.
    Email,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// Which sink receives leads.
    #[serde(default = "default_sink_kind")]
    pub kind: SinkKind,
    /// Leads per delivery call; unset: [`SinkSettings::batch_size`] picks by sink.
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub jsonl: JsonlSettings,
    /// Required when `kind = "salesforce"`.
    pub salesforce: Option<SalesforceSettings>,
    /// Required when `kind = "dynamics"`.
    pub dynamics: Option<DynamicsSettings>,
    /// Required when `kind = "webhook"`.
    pub webhook: Option<WebhookSettings>,
    /// Required when `kind = "teams"`.
    pub teams: Option<TeamsSettings>,
    /// Required when `kind = "slack"`.
    pub slack: Option<SlackSettings>,
    /// Required when `kind = "hubspot"`.
    pub hubspot: Option<HubspotSettings>,
    /// Required when `kind = "marketo"`.
    pub marketo: Option<MarketoSettings>,
    /// Required when `kind = "email"`.
    pub email: Option<EmailSettings>,
}

impl SinkSettings {
    /// Leads per delivery call: `batch_size` if set, else 200 for the CRM and webhook
    /// sinks (a Salesforce sObject Collections request holds at most 200), and 1,000 (a
    /// full table page) for JSONL, which has no per-call limit and syncs the file once
    /// per call.
    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(match self.kind {
            SinkKind::Jsonl => 1000,
            SinkKind::Salesforce | SinkKind::Dynamics | SinkKind::Webhook => 200,
            // A batch is posted one message at a time, paced: keep it short.
            SinkKind::Teams | SinkKind::Slack | SinkKind::Email => 50,
            // A HubSpot batch holds at most 100 inputs.
            SinkKind::Hubspot => 100,
            // A Marketo leads.json call holds at most 300 leads.
            SinkKind::Marketo => 300,
        })
    }
}

impl Default for SinkSettings {
    fn default() -> Self {
        Self {
            kind: default_sink_kind(),
            batch_size: None,
            jsonl: JsonlSettings::default(),
            salesforce: None,
            dynamics: None,
            webhook: None,
            teams: None,
            slack: None,
            hubspot: None,
            marketo: None,
            email: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlSettings {
    /// File to append one JSON object per lead to; `-` is standard output.
    #[serde(default = "default_jsonl_path")]
    pub path: PathBuf,
}

impl Default for JsonlSettings {
    fn default() -> Self {
        Self {
            path: default_jsonl_path(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestLeadPolicy {
    /// Record and log the test lead, do not deliver it.
    Skip,
    /// Deliver it like any other lead.
    Deliver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoNotContactPolicy {
    /// Record it, do not deliver it.
    Skip,
    /// Deliver it with the do-not-contact flag set.
    Flag,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    #[serde(default = "default_test_lead_policy")]
    pub test_leads: TestLeadPolicy,
    #[serde(default = "default_dnc_policy")]
    pub do_not_contact: DoNotContactPolicy,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            test_leads: default_test_lead_policy(),
            do_not_contact: default_dnc_policy(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKey {
    /// Normalised name plus company and/or phone digits, when present.
    NameCompanyPhone,
    /// Leads without an email are held as unidentifiable.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExternalKeyForm {
    /// `ls-` + 20 hex digits of SHA-256 of the customer key: no personal data in the key.
    Hash,
    /// The normalised email itself (fallback-keyed customers still get the hash).
    Email,
}

/// The default follow-up text; see `identity::summarise` for the placeholders.
pub const DEFAULT_SUMMARY_TEMPLATE: &str =
    "{name} ({company}), stage: {stage}, interested in {offers}.\n{history}\nNext step: {next_step}";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// The customer key of a lead without an email.
    #[serde(default = "default_fallback")]
    pub fallback: FallbackKey,
    /// The form of the key sinks upsert on.
    #[serde(default = "default_external_key")]
    pub external_key: ExternalKeyForm,
    /// The follow-up summary sent as the CRM description.
    #[serde(default = "default_summary_template")]
    pub summary_template: String,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            fallback: default_fallback(),
            external_key: default_external_key(),
            summary_template: default_summary_template(),
        }
    }
}

fn default_fallback() -> FallbackKey {
    FallbackKey::NameCompanyPhone
}
fn default_external_key() -> ExternalKeyForm {
    ExternalKeyForm::Hash
}
fn default_summary_template() -> String {
    DEFAULT_SUMMARY_TEMPLATE.into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `leadsync=debug,info`. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Let email addresses through to the logs (debugging a mapping, say); off by
    /// default: leadsync masks every address in a log line as `[email]`.
    #[serde(default)]
    pub personal_data: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
            personal_data: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    /// Time between two polls.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long SIGTERM waits for the batch in flight before exiting anyway.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A lead still undelivered this long after the marketplace wrote it is logged as
    /// overdue (once per lead), well before the 24-hour follow-up window closes.
    #[serde(default = "default_follow_up_warning", with = "humantime_serde")]
    pub follow_up_warning: Duration,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            poll_interval: default_poll_interval(),
            shutdown_grace: default_shutdown_grace(),
            follow_up_warning: default_follow_up_warning(),
        }
    }
}

fn default_table() -> String {
    "MarketplaceLeads".into()
}
fn default_overlap() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_page_size() -> u32 {
    1000
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_attempts() -> u32 {
    6
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/leadsync")
}
fn default_sink_kind() -> SinkKind {
    SinkKind::Jsonl
}
fn default_jsonl_path() -> PathBuf {
    PathBuf::from("-")
}
fn default_test_lead_policy() -> TestLeadPolicy {
    TestLeadPolicy::Skip
}
fn default_dnc_policy() -> DoNotContactPolicy {
    DoNotContactPolicy::Skip
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".into()
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_follow_up_warning() -> Duration {
    Duration::from_secs(4 * 60 * 60)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}

/// A secret named in the config: read from a variable, a file, a systemd credential, or given inline.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretSource {
    /// The name of an environment variable holding the secret.
    Env(String),
    /// A file whose content (trimmed) is the secret.
    File(PathBuf),
    /// A systemd credential name, read from `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
    /// The secret itself (prefer the others: config files get copied around).
    Value(SecretString),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => write!(f, "Env({name:?})"),
            Self::File(path) => write!(f, "File({path:?})"),
            Self::Credential(name) => write!(f, "Credential({name:?})"),
            Self::Value(_) => f.write_str("Value([redacted])"),
        }
    }
}

impl SecretSource {
    /// Reads the secret. `key` names the config key in errors; the secret never appears in them.
    pub fn resolve(&self, key: &str) -> Result<SecretString, ConfigError> {
        let err = |message: String| ConfigError::Secret {
            key: key.to_owned(),
            message,
        };
        let value = match self {
            Self::Value(secret) => secret.expose_secret().to_owned(),
            Self::Env(name) => std::env::var(name)
                .map_err(|_| err(format!("environment variable {name} is not set")))?,
            Self::File(path) => read_secret_file(path).map_err(err)?,
            Self::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    err(format!(
                        "credential {name:?} requested but CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)"
                    ))
                })?;
                read_secret_file(&Path::new(&dir).join(name)).map_err(err)?
            }
        };
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(err("the secret is empty".into()));
        }
        Ok(SecretString::from(value))
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))
}

impl Settings {
    /// Loads `path` layered with `LEADSYNC__SECTION__KEY` variables of the process, then validates.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    /// As [`Settings::load`], with the environment given explicitly (tests use this).
    pub fn load_with_env(
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_toml_with_env(&text, path, env)
    }

    /// Parses TOML text (named `path` in errors) layered with `env`, then validates.
    pub fn from_toml_with_env(
        text: &str,
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let ours: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let layered = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(ours.clone())),
            )
            .build()
            .map_err(|e| ConfigError::File {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let origin = |key: &str| origin_of(key, path, &ours);
        let settings: Settings = serde_path_to_error::deserialize(layered).map_err(|e| {
            let mut key = e.path().to_string();
            // A missing field is reported at its parent's path; name the field itself.
            let message = e.inner().to_string();
            if let Some(field) = message
                .strip_prefix("missing configuration field \"")
                .or_else(|| message.strip_prefix("missing field `"))
                .and_then(|rest| rest.split(['"', '`']).next())
            {
                key = if key == "." || key.is_empty() {
                    field.to_owned()
                } else {
                    format!("{key}.{field}")
                };
            }
            ConfigError::Key {
                origin: origin(&key),
                message: e.inner().to_string(),
                key,
            }
        })?;
        settings
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                origin: origin(&key),
                key,
                message,
            })?;
        Ok(settings)
    }

    /// Checks what types cannot express. Returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        let s = &self.source;
        if s.table.trim().is_empty() {
            return bad("source.table", "the table name must not be empty");
        }
        if !valid_table_name(&s.table) {
            return bad(
                "source.table",
                "a table name is 3 to 63 letters and digits, starting with a letter",
            );
        }
        if self.state.backend == StateBackend::Table {
            if !valid_table_name(&self.state.table) {
                return bad(
                    "state.table",
                    "a table name is 3 to 63 letters and digits, starting with a letter",
                );
            }
            if self.state.table.eq_ignore_ascii_case(&s.table) {
                return bad("state.table", "must differ from source.table");
            }
            if self.state.lease_ttl < Duration::from_secs(5) {
                return bad("state.lease_ttl", "must be at least 5s");
            }
        }
        let credentials = [
            s.connection_string.is_some(),
            s.account_key.is_some(),
            s.sas_token.is_some(),
            s.identity.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if credentials != 1 {
            return bad(
                "source.connection_string",
                "set exactly one of source.connection_string, source.account_key, source.sas_token or source.identity",
            );
        }
        if (s.account_key.is_some() || s.sas_token.is_some() || s.identity.is_some())
            && s.account.as_deref().is_none_or(|a| a.trim().is_empty())
        {
            return bad(
                "source.account",
                "the storage account name is required with account_key, sas_token or identity",
            );
        }
        if s.identity_client_id.is_some() && s.identity != Some(IdentityKind::ManagedIdentity) {
            return bad(
                "source.identity_client_id",
                "only applies with identity = \"managed_identity\"",
            );
        }
        if let Some(endpoint) = &s.endpoint {
            if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                return bad("source.endpoint", "must be an http(s) URL");
            }
        }
        if s.overlap.is_zero() {
            return bad(
                "source.overlap",
                "must be greater than zero: late-visible rows would be lost",
            );
        }
        if let Some(retention) = self.state.retention {
            if retention <= s.overlap {
                return bad(
                    "state.retention",
                    "must be longer than source.overlap (a row re-read inside the overlap window must still find its state), or \"forever\"",
                );
            }
        }
        if s.page_size == 0 || s.page_size > 1000 {
            return bad("source.page_size", "must be between 1 and 1000");
        }
        if s.request_timeout.is_zero() {
            return bad("source.request_timeout", "must be greater than zero");
        }
        s.retry.validate("source.retry")?;
        if self.state.dir.as_os_str().is_empty() {
            return bad("state.dir", "must not be empty");
        }
        if self.identity.summary_template.trim().is_empty() {
            return bad("identity.summary_template", "must not be empty");
        }
        if self.sink.batch_size == Some(0) {
            return bad("sink.batch_size", "must be at least 1");
        }
        let missing = |section: &str| {
            Err((
                format!("sink.{section}"),
                format!("sink.kind = \"{section}\" needs a [sink.{section}] section"),
            ))
        };
        match self.sink.kind {
            SinkKind::Jsonl => {}
            SinkKind::Salesforce => match &self.sink.salesforce {
                Some(s) => s.validate()?,
                None => return missing("salesforce"),
            },
            SinkKind::Dynamics => match &self.sink.dynamics {
                Some(s) => s.validate()?,
                None => return missing("dynamics"),
            },
            SinkKind::Webhook => match &self.sink.webhook {
                Some(s) => s.validate()?,
                None => return missing("webhook"),
            },
            SinkKind::Teams => match &self.sink.teams {
                Some(s) => s.validate(Vendor::Teams)?,
                None => return missing("teams"),
            },
            SinkKind::Slack => match &self.sink.slack {
                Some(s) => s.validate(Vendor::Slack)?,
                None => return missing("slack"),
            },
            SinkKind::Hubspot => match &self.sink.hubspot {
                Some(s) => s.validate()?,
                None => return missing("hubspot"),
            },
            SinkKind::Marketo => match &self.sink.marketo {
                Some(s) => s.validate()?,
                None => return missing("marketo"),
            },
            SinkKind::Email => match &self.sink.email {
                // The digest queue is a file next to the state: a table backend has no disk to keep it on.
                Some(s) if s.digest.is_some() && self.state.backend == StateBackend::Table => {
                    return bad(
                        "sink.email.digest",
                        "needs state.backend = \"file\": the digest queue is a file in state.dir",
                    )
                }
                Some(s) => s.validate()?,
                None => return missing("email"),
            },
        }
        if self.sink.jsonl.path.as_os_str().is_empty() {
            return bad(
                "sink.jsonl.path",
                "must not be empty (use \"-\" for stdout)",
            );
        }
        if self.run.poll_interval.is_zero() {
            return bad("run.poll_interval", "must be greater than zero");
        }
        if let Some(listen) = &self.metrics.listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return bad("metrics.listen", "must be an address like 127.0.0.1:9464");
            }
        }
        if self.run.follow_up_warning.is_zero() {
            return bad("run.follow_up_warning", "must be greater than zero");
        }
        if self.run.shutdown_grace.is_zero() {
            return bad("run.shutdown_grace", "must be greater than zero");
        }
        if crate::telemetry::filter(&self.log.level).is_err() {
            return bad(
                "log.level",
                "is not a valid filter (e.g. `info`, `leadsync=debug`)",
            );
        }
        Ok(())
    }
}

/// Azure table names: 3-63 alphanumerics, starting with a letter.
fn valid_table_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
}

/// Says whether a key's value came from an environment variable or the file.
fn origin_of(key: &str, path: &Path, env: &config::Map<String, String>) -> String {
    let var = format!(
        "{ENV_PREFIX}__{}",
        key.split('.')
            .take_while(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("__")
            .to_uppercase()
    );
    if env.contains_key(&var) {
        format!("from environment variable {var}")
    } else {
        format!("in {}", path.display())
    }
}
