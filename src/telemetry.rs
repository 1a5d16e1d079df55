//! The tracing subscriber, built once. Logs go to stderr: stdout may be the JSONL sink.

use serde::Deserialize;
use tracing_subscriber::filter::ParseError;
use tracing_subscriber::EnvFilter;

/// Crates whose debug and trace events carry credentials: azure_core logs every
/// request's URL (with a SAS token's `sig`) and its `Authorization` header (a SharedKey
/// signature, with which anyone can replay the request for 15 minutes, or an Entra
/// token), and azure_storage its credentials. They log at warn at most, whatever
/// `log.level` or `RUST_LOG` says.
const CREDENTIALED: [&str; 4] = [
    "azure_core",
    "azure_storage",
    "azure_identity",
    "azure_data_tables",
];

/// The filter for a `log.level` (or `RUST_LOG`) text: its directives, except any about
/// the [`CREDENTIALED`] crates, which log at warn (or at `error` or not at all, when
/// that is the text's default level).
pub fn filter(spec: &str) -> Result<EnvFilter, ParseError> {
    let about_credentialed = |directive: &str| {
        let target = directive.split('=').next().unwrap_or_default();
        CREDENTIALED
            .iter()
            .any(|c| target == *c || target.starts_with(&format!("{c}::")))
    };
    let kept: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !about_credentialed(d))
        .collect();
    let cap = match kept.iter().find(|d| !d.contains('=')) {
        Some(level) if level.eq_ignore_ascii_case("off") => "off",
        Some(level) if level.eq_ignore_ascii_case("error") => "error",
        _ => "warn",
    };
    let mut filter = match kept.is_empty() {
        true => EnvFilter::try_new("info")?,
        false => EnvFilter::try_new(kept.join(","))?,
    };
    for target in CREDENTIALED {
        filter = filter.add_directive(format!("{target}={cap}").parse()?);
    }
    Ok(filter)
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`. Unless
/// `personal_data` (`log.personal_data`), every email address in a log line is
/// replaced by `[email]` on its way out ([`mask_emails`]): leadsync names customers
/// by their stable key and rows by their keys, and this catches what a CRM or a
/// receiver echoes back in an error text.
/// Returns false when one was already installed (tests call this repeatedly).
pub fn init(format: LogFormat, level: &str, personal_data: bool) -> bool {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| filter(&spec).ok())
        .or_else(|| filter(level).ok())
        .unwrap_or_else(|| filter("info").expect("a valid filter"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || Stderr { personal_data });
    match format {
        LogFormat::Text => builder.try_init().is_ok(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
            .is_ok(),
    }
}

/// Standard error, each formatted event written in one call with its email
/// addresses masked (unless `personal_data`).
struct Stderr {
    personal_data: bool,
}

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.personal_data || !buf.contains(&b'@') {
            return std::io::stderr().write(buf);
        }
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(mask_emails(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `text` with every email address (text of address characters on both sides of an
/// `@`) replaced by `[email]`.
pub fn mask_emails(text: &str) -> String {
    let local = |c: char| c.is_alphanumeric() || "._%+-'".contains(c);
    let domain = |c: char| c.is_alphanumeric() || c == '.' || c == '-';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        let before = &rest[..at];
        let start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| local(*c))
            .last()
            .map_or(at, |(i, _)| i);
        let after = &rest[at + 1..];
        let end = after
            .char_indices()
            .find(|(_, c)| !domain(*c))
            .map_or(after.len(), |(i, _)| i);
        if start < at && end > 0 {
            out.push_str(&rest[..start]);
            out.push_str("[email]");
            rest = &after[end..];
        } else {
            out.push_str(&rest[..=at]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
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

fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_addresses_are_masked_and_nothing_else() {
        assert_eq!(
            mask_emails(
                r#"customer="email:ana.silva+x@fabrikam.com" reason=Email: bob@ex-ample.co.uk, ok"#
            ),
            r#"customer="email:[email]" reason=Email: [email], ok"#
        );
        assert_eq!(
            mask_emails("a @ b, x@, @y, ls-12ab"),
            "a @ b, x@, @y, ls-12ab"
        );
        assert_eq!(mask_emails("customer=ana@x.com"), "customer=[email]");
        assert_eq!(mask_emails("é@ü.de and a@b"), "[email] and [email]");
    }

    #[test]
    fn the_sdk_crates_are_capped_at_warn_or_at_a_quieter_default() {
        let shown = |spec: &str| filter(spec).unwrap().to_string();

        let debug = shown("debug,azure_core::policies::transport=trace");
        let quiet = shown("error");
        let bad = filter("leadsync=loud");
        let other = shown("info,azure_core_like=debug");

        assert!(
            debug.contains("azure_core=warn") && !debug.contains("trace"),
            "{debug}"
        );
        assert!(debug.contains("azure_storage=warn"), "{debug}");
        assert!(quiet.contains("azure_core=error"), "{quiet}");
        assert!(bad.is_err(), "an invalid level is still refused");
        assert!(
            other.contains("azure_core_like=debug"),
            "only the crates themselves: {other}"
        );
    }
}
