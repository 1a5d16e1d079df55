//! Secrets named in the config: read from an environment variable, a file, a systemd
//! credential, or given inline; never shown in `Debug`, logs or errors.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A secret could not be read. Names the config key, never the secret.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct SecretError {
    pub key: String,
    pub message: String,
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
    pub fn resolve(&self, key: &str) -> Result<SecretString, SecretError> {
        let err = |message: String| SecretError {
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
