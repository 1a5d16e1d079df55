//! Writes marketplace-shaped rows from a JSON file into the lead table, creating the
//! table if needed. Used by `scripts/demo.sh`; handy to replay captured rows locally.
//!
//! `cargo run --example seed -- <connection-string> <rows.json> [table]`

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use leadsync::config::Settings;
use leadsync::source::TableSource;
use serde_json::{Map, Value};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [connection_string, file, rest @ ..] = args.as_slice() else {
        bail!("usage: seed <connection-string> <rows.json> [table]");
    };
    let table = rest
        .first()
        .map(String::as_str)
        .unwrap_or("MarketplaceLeads");
    let toml = format!(
        "[source]\ntable = {table:?}\nconnection_string = {{ value = {connection_string:?} }}\n"
    );
    let settings = Settings::from_toml_with_env(&toml, Path::new("seed"), &HashMap::new())?;
    let source = TableSource::connect(&settings.source)?;
    source.create_table_if_missing().await?;
    let rows: Vec<Map<String, Value>> = serde_json::from_str(
        &std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?,
    )
    .with_context(|| format!("{file} is not a JSON array of objects"))?;
    for row in &rows {
        source.upsert_entity(row).await?;
    }
    eprintln!("seed: wrote {} rows into table {table}", rows.len());
    Ok(())
}
