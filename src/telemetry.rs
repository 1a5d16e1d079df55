//! The tracing subscriber, built once. Logs go to stderr: stdout may be the JSONL sink.

use tracing_subscriber::filter::ParseError;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Crates whose debug and trace events carry credentials: azure_core logs every
/// request's URL (with a SAS token's `sig`) and its `Authorization` header (a SharedKey
/// signature, which replays the request for 15 minutes), and azure_storage its
/// credentials. They log at warn at most, whatever `log.level` or `RUST_LOG` says.
const CREDENTIALED: [&str; 4] = [
    "azure_core",
    "azure_storage",
    "azure_identity",
    "azure_data_tables",
];

/// The filter for a `log.level` (or `RUST_LOG`) text: its directives, except any about
/// the [`CREDENTIALED`] crates, which are capped at warn.
pub fn filter(spec: &str) -> Result<EnvFilter, ParseError> {
    let kept: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !CREDENTIALED.iter().any(|c| d.starts_with(c)))
        .collect();
    let kept = if kept.is_empty() {
        "info".to_owned()
    } else {
        kept.join(",")
    };
    let mut filter = EnvFilter::try_new(kept)?;
    for target in CREDENTIALED {
        filter = filter.add_directive(format!("{target}=warn").parse()?);
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
