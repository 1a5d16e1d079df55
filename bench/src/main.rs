//! `leadsync-bench`: leadsync's throughput, latency and idle cost against Azurite, a fake
//! Salesforce and the usual Python script, on one machine. `bench/run.sh` is the entry.
//!
//! `suite` orchestrates everything; `backfill` and `daemon` are the children it measures
//! (their peak RSS and CPU come from `wait4` and `/proc`, so each measured leadsync runs in
//! a process of its own).

mod crm;
mod procinfo;
mod proxy;
mod seed;
mod suite;
mod webhook;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use leadsync::config::Settings;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "leadsync-bench",
    about = "leadsync benchmarks (see bench/run.sh)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every measurement: seed, raw read, backfills, baseline, latency, idle; writes the report.
    Suite(suite::Args),
    /// Child: one `leadsync::run(once)` with this config; prints a JSON summary on stdout.
    Backfill {
        #[arg(long)]
        config: PathBuf,
    },
    /// Child: the raw read of the table in `config` from a fresh process, timed as
    /// `backfill` times leadsync (connect, then every page); prints a JSON summary.
    RawRead {
        #[arg(long)]
        config: PathBuf,
    },
    /// The webhook sink against a receiver answering in 100 ms, 5% in 3 s: requests
    /// per second against `parallelism / 0.245 s`; prints a JSON summary.
    WebhookThroughput {
        #[arg(long, default_value_t = 400)]
        leads: usize,
        #[arg(long, default_value_t = 4)]
        parallelism: usize,
    },
    /// Child: leadsync's own CLI, `leadsync --config FILE run` (stops on SIGTERM).
    Daemon {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the async runtime")
        .block_on(run())
}

async fn run() -> ExitCode {
    match Cli::parse().command {
        Command::Suite(args) => match suite::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("leadsync-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Backfill { config } => match backfill(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("leadsync-bench backfill: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::RawRead { config } => match raw_read(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("leadsync-bench raw-read: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::WebhookThroughput { leads, parallelism } => {
            match webhook::run(leads, parallelism).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("leadsync-bench webhook-throughput: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Daemon { config } => {
            let cli = leadsync::cli::Cli::parse_from([
                "leadsync".into(),
                "--config".into(),
                config.into_os_string(),
                "run".into(),
            ]);
            leadsync::cli::main(cli).await
        }
    }
}

/// What `leadsync run --once` does, timed from inside, with a machine-readable summary.
async fn backfill(config: PathBuf) -> anyhow::Result<()> {
    let settings = Settings::load(&config)?;
    leadsync::telemetry::init(
        settings.log.format,
        &settings.log.level,
        settings.log.personal_data,
    );
    let started = Instant::now();
    let report = leadsync::run(
        &settings,
        leadsync::RunOptions { once: true },
        CancellationToken::new(),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let t = &report.totals;
    println!(
        "{}",
        serde_json::json!({
            "seconds": seconds,
            "poll_seconds": t.duration.as_secs_f64(),
            "rows_read": t.rows_read,
            "delivered": t.delivered,
            "records_sent": t.records_sent,
            "skipped": t.skipped,
            "rejected": t.rejected,
            "unidentifiable": t.unidentifiable,
            "pending": report.pending,
            "pages": t.pages,
            "exit_code": report.exit_code(),
            "last_error": report.last_error,
            // The peak of this process, after exec (see procinfo::Finished).
            "vm_hwm_kib": procinfo::status_kib(std::process::id(), "VmHWM").ok(),
        })
    );
    Ok(())
}

/// The ceiling as a fresh process sees it: what `backfill` times, minus leadsync's work.
async fn raw_read(config: PathBuf) -> anyhow::Result<()> {
    let settings = Settings::load(&config)?;
    let started = Instant::now();
    let source = leadsync::source::TableSource::connect(&settings.source)?;
    let (rows, pages) = suite::read_table(&source).await?;
    println!(
        "{}",
        serde_json::json!({
            "seconds": started.elapsed().as_secs_f64(),
            "rows": rows,
            "pages": pages,
            "vm_hwm_kib": procinfo::status_kib(std::process::id(), "VmHWM").ok(),
        })
    );
    Ok(())
}
