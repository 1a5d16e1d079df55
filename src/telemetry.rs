//! The tracing subscriber, built once. Logs go to stderr: stdout may be the JSONL sink.

use tracing_subscriber::filter::ParseError;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

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

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
/// Returns false when one was already installed (tests call this repeatedly).
pub fn init(format: LogFormat, level: &str) -> bool {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| filter(&spec).ok())
        .or_else(|| filter(level).ok())
        .unwrap_or_else(|| filter("info").expect("a valid filter"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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

#[cfg(test)]
mod tests {
    use super::*;

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
