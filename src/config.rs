//! Typed settings: one TOML file layered with `LEADSYNC__SECTION__KEY` variables,
//! validated before any I/O.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

// Each part of the settings lives with the code it configures; this module puts them
// together, loads and validates them. Re-exported so that `config::X` names every type.
pub use crate::identity::{
    ExternalKeyForm, FallbackKey, IdentitySettings, DEFAULT_SUMMARY_TEMPLATE,
};
pub use crate::pipeline::policy::{DoNotContactPolicy, PolicySettings, TestLeadPolicy};
pub use crate::retry::RetrySettings;
pub use crate::secret::{SecretError, SecretSource};
pub use crate::service::MetricsSettings;
pub use crate::sink::{JsonlSettings, SinkKind, SinkSettings};
pub use crate::source::{IdentityKind, SourceSettings};
pub use crate::state::{StateBackend, StateSettings};
pub use crate::telemetry::{LogFormat, LogSettings};

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
    #[error(transparent)]
    Secret(#[from] SecretError),
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
    /// Where leads are delivered: one sink (`[sink]`).
    #[serde(default)]
    pub sink: SinkSettings,
    /// Or several at once (`[[sinks]]`, each with a `name`): every lead goes to each,
    /// and a row is settled when every sink has settled it. Use `[sink]` or `[[sinks]]`.
    #[serde(default)]
    pub sinks: Vec<SinkSettings>,
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

fn default_poll_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_follow_up_warning() -> Duration {
    Duration::from_secs(4 * 60 * 60)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
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
        let sink_given = layered.get::<config::Value>("sink").is_ok();
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
        if sink_given && !settings.sinks.is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin("sinks"),
                key: "sinks".into(),
                message: "use either one [sink] or a list of [[sinks]], not both".into(),
            });
        }
        settings
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                origin: origin(&key),
                key,
                message,
            })?;
        Ok(settings)
    }

    /// The deployment's sinks: each `[[sinks]]` entry, or the one `[sink]`.
    pub fn sink_list(&self) -> Vec<&SinkSettings> {
        if self.sinks.is_empty() {
            vec![&self.sink]
        } else {
            self.sinks.iter().collect()
        }
    }

    /// Checks each `[[sinks]]` entry as `[sink]` is checked, naming it `sinks[i]`, and
    /// that every entry has a name of its own.
    fn validate_sinks(&self) -> Result<(), (String, String)> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let at = format!("sinks[{i}]");
            sink.validate().map_err(|(key, why)| {
                (
                    key.replacen("sink", &at, 1),
                    why.replace("[sink.", &format!("[{at}.")),
                )
            })?;
            let Some(name) = &sink.name else {
                return Err((
                    format!("{at}.name"),
                    "every [[sinks]] entry needs a name (e.g. \"crm\", \"sales-channel\")".into(),
                ));
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err((
                    format!("{at}.name"),
                    "a sink name is letters, digits, '-' and '_'".into(),
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err((
                    format!("{at}.name"),
                    format!("another [[sinks]] entry is named \"{name}\" already"),
                ));
            }
        }
        Ok(())
    }

    /// Checks what types cannot express. Returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        self.source.validate()?;
        self.state.validate(&self.source)?;
        if self.identity.summary_template.trim().is_empty() {
            return bad("identity.summary_template", "must not be empty");
        }
        if self.sinks.is_empty() {
            self.sink.validate()?;
        }
        self.validate_sinks()?;
        for sink in self.sink_list() {
            let digest = sink.email.as_ref().is_some_and(|e| e.digest.is_some());
            if sink.kind == SinkKind::Email && digest && self.state.backend == StateBackend::Table {
                // The digest queue is a file next to the state: a table backend has no disk to keep it on.
                return bad(
                    "sink.email.digest",
                    "needs state.backend = \"file\": the digest queue is a file in state.dir",
                );
            }
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
