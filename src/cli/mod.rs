//! The command line: what `main` parses and runs.

pub mod check;
pub mod export;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormat, Settings, DEFAULT_CONFIG_PATH};
use crate::pipeline::PollError;
use crate::state::personal::Person;
use crate::state::RecordedRow;

/// Exit code when leadsync cannot start (config, state file, credentials).
pub const EXIT_START_FAILED: u8 = 1;
/// Exit code when another leadsync holds the processing lease (table backend) or the
/// state file (file backend), so this one did no work: `run --once`, `replay`, `dlq`
/// and the other commands that open the state. Not a failure of the work: the holder
/// is doing it.
pub const EXIT_LEASE_HELD: u8 = 4;

#[derive(Debug, Parser)]
#[command(
    name = "leadsync",
    version,
    about = "Marketplace leads from an Azure table into your CRM, nothing lost, nothing doubled."
)]
pub struct Cli {
    /// Config file (TOML). `LEADSYNC__SECTION__KEY` variables override its keys.
    #[arg(long, short, global = true, env = "LEADSYNC_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format; overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Poll the table and deliver leads until SIGTERM/SIGINT.
    Run {
        /// Drain what is new once and exit: 0 all settled, 2 leads pending, 3 the poll failed,
        /// 4 another leadsync holds the processing lease (nothing done).
        #[arg(long)]
        once: bool,
    },
    /// Check the config file and print the effective settings (secrets redacted).
    Config,
    /// Check the set-up: config, table (and whether the marketplace wrote to it), state,
    /// sink authentication (nothing written). Exit 0 when all is well.
    Check {
        /// Also write a marketplace-style test lead and wait for the running daemon to handle it.
        #[arg(long)]
        send_test_lead: bool,
        /// How long to wait for the daemon to handle the test lead.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// List rows rejected (with reasons), skipped by policy, or held as unidentifiable, one JSON object per line.
    Rows {
        #[arg(value_enum, default_value = "rejected")]
        which: RowsArg,
    },
    /// Dead letters: customer records the CRM refused for good.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Re-read the table from a time and re-upsert; the stable keys make it safe.
    Replay {
        /// RFC 3339 time to re-read from (e.g. 2024-05-01T00:00:00Z).
        #[arg(long, value_parser = parse_time)]
        since: time::OffsetDateTime,
        /// Send every customer touched, even when its merged record did not change
        /// (e.g. after records were lost on the CRM side).
        #[arg(long)]
        resend: bool,
        /// Send to this sink only (a `[[sinks]]` name), whether or not it had the
        /// record: e.g. a sink added to a running deployment, given the leads since
        /// --since. Implies --resend for that sink; the other sinks are not touched.
        #[arg(long)]
        sink: Option<String>,
    },
    /// Write the merged customers as CSV or JSON lines (to stdout, or --output).
    Export {
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::cli::export::Format,
        /// Only customers seen at or after this RFC 3339 time (e.g. 2024-05-01T00:00:00Z).
        #[arg(long, value_parser = parse_time)]
        since: Option<time::OffsetDateTime>,
        /// Also the rows held as unidentifiable and the rejected rows, with their reasons.
        #[arg(long)]
        include_held: bool,
        /// File to write instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Access request: everything leadsync holds about the person with this
        /// address (merged customer, the rows it came from, dead letters, rejected,
        /// skipped and unidentifiable rows), as JSON lines (--format jsonl).
        #[arg(long, conflicts_with_all = ["since", "include_held", "key"])]
        email: Option<String>,
        /// As --email, for the person with this customer key (email:..., fallback:...)
        /// or external key (ls-...).
        #[arg(long, conflicts_with_all = ["since", "include_held"])]
        key: Option<String>,
    },
    /// Erasure request: remove one person from every part of leadsync's state, and
    /// print what was removed. The CRM's copy is not touched: erase it there.
    Forget {
        /// The person's email address.
        #[arg(long, required_unless_present = "key", conflicts_with = "key")]
        email: Option<String>,
        /// The person's customer key (email:..., fallback:...) or external key (ls-...).
        #[arg(long)]
        key: Option<String>,
        /// Also delete the person's rows from the lead table (source.table).
        #[arg(long)]
        table_rows: bool,
    },
}

fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    crate::timestamp::parse(text)
        .map_err(|e| format!("not an RFC 3339 time ({e}); e.g. 2024-05-01T00:00:00Z"))
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Show every dead letter: customer key, sink, reason, time, attempts.
    List {
        /// One JSON object per dead letter, with the payload sent.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters again (after fixing the CRM side or the mapping).
    Retry {
        /// Dead letter ids (the customer's external key), or --all.
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Remove a dead letter deliberately.
    Drop { id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RowsArg {
    Rejected,
    Skipped,
    Unidentifiable,
}

/// Runs the parsed command line and returns the process exit code.
pub async fn main(cli: Cli) -> ExitCode {
    let settings = match Settings::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("leadsync: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let format = match cli.log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => settings.log.format,
    };
    crate::telemetry::init(format, &settings.log.level, settings.log.personal_data);

    match cli.command {
        Command::Run { once } => run(&settings, once).await,
        Command::Config => {
            println!("{settings:#?}");
            ExitCode::SUCCESS
        }
        Command::Rows { which } => list_rows(&settings, which).await,
        Command::Dlq { action } => dlq(&settings, action).await,
        Command::Check {
            send_test_lead,
            wait,
        } => {
            let report = crate::cli::check::check(&settings, send_test_lead, wait).await;
            print!("{}", report.render());
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_START_FAILED)
            }
        }
        Command::Replay {
            since,
            resend,
            sink,
        } => replay(&settings, since, resend, sink.as_deref()).await,
        Command::Export {
            format,
            output,
            email: Some(email),
            ..
        } => access_export(&settings, format, Person::by_email(&email), output).await,
        Command::Export {
            format,
            output,
            key: Some(key),
            ..
        } => access_export(&settings, format, Person::by_key(&key), output).await,
        Command::Export {
            format,
            since,
            include_held,
            output,
            ..
        } => export(&settings, format, since, include_held, output).await,
        Command::Forget {
            email,
            key,
            table_rows,
        } => {
            let person = match (email, key) {
                (Some(email), _) => Person::by_email(&email),
                (None, Some(key)) => Person::by_key(&key),
                (None, None) => unreachable!("clap requires --email or --key"),
            };
            forget(&settings, person, table_rows).await
        }
    }
}

/// Creates `--output` (0600), or stdout.
fn output_or_stdout(output: &Option<PathBuf>) -> Result<Box<dyn std::io::Write>, ExitCode> {
    match output {
        None => Ok(Box::new(std::io::stdout().lock())),
        Some(path) => match crate::private_fs::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
        {
            Ok(f) => Ok(Box::new(std::io::BufWriter::new(f))),
            Err(e) => {
                eprintln!("leadsync: cannot create {}: {e}", path.display());
                Err(ExitCode::from(EXIT_START_FAILED))
            }
        },
    }
}

/// `leadsync export --email|--key`: the access export of one person.
async fn access_export(
    settings: &Settings,
    format: crate::cli::export::Format,
    mut person: Person,
    output: Option<PathBuf>,
) -> ExitCode {
    if format != crate::cli::export::Format::Jsonl {
        eprintln!("leadsync: export --email/--key writes JSON lines: add --format jsonl");
        return ExitCode::from(EXIT_START_FAILED);
    }
    let store = match crate::daemon::open_state(settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("leadsync: {e}");
            return ExitCode::from(state_failed(&e));
        }
    };
    let found = match crate::state::personal::resolve(store.as_ref(), &mut person).await {
        Ok(()) => crate::state::personal::find(store.as_ref(), &person).await,
        Err(e) => Err(e),
    };
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            eprintln!("leadsync: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let mut out = match output_or_stdout(&output) {
        Ok(out) => out,
        Err(code) => return code,
    };
    match crate::state::personal::write_access_export(&found, &mut out)
        .and_then(|n| out.flush().map(|()| n))
    {
        Ok(n) => {
            eprintln!("leadsync: exported {n} records about this person");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("leadsync: cannot write the export: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

/// `leadsync forget`: removes the person from the state (holding the state like the
/// daemon: the file lock, or the processing lease), then with `--table-rows` their
/// rows from the lead table. Prints what it removed.
async fn forget(settings: &Settings, mut person: Person, table_rows: bool) -> ExitCode {
    let source = match table_rows {
        true => match crate::source::TableSource::connect(&settings.source) {
            Ok(source) => Some(source),
            Err(e) => {
                eprintln!("leadsync: {e}");
                return ExitCode::from(EXIT_START_FAILED);
            }
        },
        false => None,
    };
    let forgotten = match settings.state.backend {
        crate::config::StateBackend::File => forget_in_file(settings, &mut person).await,
        crate::config::StateBackend::Table => forget_under_lease(settings, &mut person).await,
    };
    let forgotten = match forgotten {
        Ok(f) => f,
        Err(code) => return code,
    };
    print_forgotten(&forgotten);
    let code = match &source {
        Some(source) => delete_table_rows(source, &forgotten.source_rows).await,
        None if !forgotten.source_rows.is_empty() => {
            println!(
                "kept {} rows of this person in the lead table {} (--table-rows deletes them; a replay over them would bring the person back)",
                forgotten.source_rows.len(),
                settings.source.table
            );
            ExitCode::SUCCESS
        }
        None => ExitCode::SUCCESS,
    };
    println!("the CRM was not touched: erase the person there with the CRM's own erasure process");
    code
}

/// Forgets the person in the state file (locked for the time), then compacts it;
/// `Err`: the exit code, with the reason printed.
async fn forget_in_file(
    settings: &Settings,
    person: &mut Person,
) -> Result<crate::state::personal::Forgotten, ExitCode> {
    let store = match crate::state::RedbStore::open(&settings.state.dir) {
        Ok(store) => store.with_summary_template(&settings.identity.summary_template),
        Err(e) => {
            eprintln!("leadsync: {e}");
            return Err(ExitCode::from(state_failed(&e)));
        }
    };
    let forgotten = forget_in(&store, person).await;
    // The removed records' pages are given back, so the file keeps no copy of them.
    if forgotten.is_ok() {
        if let Err(e) = store.compact() {
            eprintln!(
                "leadsync: the person is forgotten, but the state file could not be compacted: {e}"
            );
        }
    }
    forget_finished(forgotten)
}

/// Forgets the person in the state table, holding the processing lease for the
/// time; `Err`: the exit code, with the reason printed.
async fn forget_under_lease(
    settings: &Settings,
    person: &mut Person,
) -> Result<crate::state::personal::Forgotten, ExitCode> {
    let store = match crate::daemon::open_state(settings) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("leadsync: {e}");
            return Err(ExitCode::from(state_failed(&e)));
        }
    };
    let hold = match crate::daemon::LeaseHold::take(store.clone(), settings.state.lease_ttl).await {
        Ok(crate::daemon::Holding::Held(hold)) => hold,
        Ok(crate::daemon::Holding::HeldBy { owner, until }) => {
            eprintln!("leadsync: {}", lease_held(&owner, until));
            return Err(ExitCode::from(EXIT_LEASE_HELD));
        }
        Err(e) => {
            eprintln!("leadsync: {e}");
            return Err(ExitCode::from(EXIT_START_FAILED));
        }
    };
    let forgotten = tokio::select! {
        f = forget_in(store.as_ref(), person) => f,
        () = hold.lost.cancelled() => {
            eprintln!("leadsync: the processing lease was lost or could not be renewed in time; stopped part way: run forget again");
            return Err(ExitCode::from(3));
        }
    };
    hold.release().await;
    forget_finished(forgotten)
}

/// What the state removed, or, where it failed part way, the exit code with the
/// reason printed.
fn forget_finished(
    forgotten: Result<crate::state::personal::Forgotten, crate::state::StateError>,
) -> Result<crate::state::personal::Forgotten, ExitCode> {
    forgotten.map_err(|e| {
        eprintln!("leadsync: forget failed part way ({e}); run it again to finish");
        ExitCode::from(EXIT_START_FAILED)
    })
}

/// Prints each record removed from the state, or that there was none.
fn print_forgotten(forgotten: &crate::state::personal::Forgotten) {
    for key in &forgotten.customers {
        println!("removed customer        {key}");
    }
    for id in &forgotten.dead_letters {
        println!("removed dead letter     {id}");
    }
    for (what, rows) in [
        ("rejected row", &forgotten.rejected),
        ("skipped row", &forgotten.skipped),
        ("unidentifiable row", &forgotten.unidentifiable),
    ] {
        for row in rows {
            println!("removed {what:<18}{row}");
        }
    }
    if forgotten.is_empty() {
        println!("nothing about this person in leadsync's state");
    }
}

/// Deletes the person's rows from the lead table, printing each; a row that
/// cannot be deleted makes the exit code [`EXIT_START_FAILED`].
async fn delete_table_rows(
    source: &crate::source::TableSource,
    rows: &[crate::source::row::RowId],
) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for row in rows {
        match source.delete_row(row).await {
            Ok(true) => println!("deleted table row       {row}"),
            Ok(false) => println!("table row already gone  {row}"),
            Err(e) => {
                eprintln!("leadsync: cannot delete table row {row}: {e}");
                code = ExitCode::from(EXIT_START_FAILED);
            }
        }
    }
    if rows.is_empty() {
        println!("no rows of this person known in the lead table");
    }
    code
}

async fn forget_in(
    store: &dyn crate::state::StateStore,
    person: &mut Person,
) -> Result<crate::state::personal::Forgotten, crate::state::StateError> {
    crate::state::personal::resolve(store, person).await?;
    store.forget(person).await
}

async fn run(settings: &Settings, once: bool) -> ExitCode {
    let cancel = CancellationToken::new();
    let grace = settings.run.shutdown_grace;
    tokio::spawn(watch_signals(cancel.clone(), grace));
    match crate::daemon::run(settings, crate::daemon::RunOptions { once }, cancel).await {
        Ok(report) => {
            if let (true, Some((holder, until))) = (once, &report.lease_holder) {
                eprintln!("leadsync: {}", lease_held(holder, *until));
                return ExitCode::from(EXIT_LEASE_HELD);
            }
            let code = report.exit_code();
            if once {
                eprintln!(
                    "leadsync: {} rows read, {} delivered ({} customer records sent), {} skipped, {} rejected, {} unidentifiable, {} pending{}",
                    report.totals.rows_read,
                    report.totals.delivered,
                    report.totals.records_sent,
                    report.totals.skipped,
                    report.totals.rejected,
                    report.totals.unidentifiable,
                    report.pending,
                    report
                        .last_error
                        .as_deref()
                        .map(|e| format!("; last poll failed: {e}"))
                        .unwrap_or_default()
                );
            }
            ExitCode::from(code)
        }
        Err(e) => {
            tracing::error!(error = %e, "leadsync cannot start.");
            eprintln!("leadsync: {e}");
            ExitCode::from(start_failed(&e))
        }
    }
}

/// The one-line reason a command did nothing because another leadsync holds the lease.
fn lease_held(holder: &str, until: time::OffsetDateTime) -> String {
    format!(
        "another leadsync holds the processing lease ({holder}, until {} by the storage service's clock); nothing done, exit {EXIT_LEASE_HELD}",
        crate::timestamp::format(until)
    )
}

/// [`EXIT_LEASE_HELD`] when the state file is locked by another leadsync, else [`EXIT_START_FAILED`].
fn start_failed(e: &crate::daemon::StartError) -> u8 {
    match e {
        crate::daemon::StartError::State(e) => state_failed(e),
        _ => EXIT_START_FAILED,
    }
}

fn state_failed(e: &crate::state::StateError) -> u8 {
    match e {
        crate::state::StateError::Locked { .. } => EXIT_LEASE_HELD,
        _ => EXIT_START_FAILED,
    }
}

/// Takes the processing lease for a command beside the daemon; `Err`: the exit code,
/// with the reason printed (held by another leadsync, or the store failed).
async fn take_lease(
    settings: &Settings,
    pipeline: &crate::pipeline::Pipeline,
) -> Result<crate::daemon::LeaseHold, ExitCode> {
    match crate::daemon::LeaseHold::take(pipeline.state.clone(), settings.state.lease_ttl).await {
        Ok(crate::daemon::Holding::Held(hold)) => Ok(hold),
        Ok(crate::daemon::Holding::HeldBy { owner, until }) => {
            tracing::info!(holder = %owner, until = %crate::timestamp::format(until), "Another leadsync holds the processing lease; not starting.");
            eprintln!("leadsync: {}", lease_held(&owner, until));
            Err(ExitCode::from(EXIT_LEASE_HELD))
        }
        Err(e) => {
            eprintln!("leadsync: {e}");
            Err(ExitCode::from(EXIT_START_FAILED))
        }
    }
}

/// Cancels on SIGTERM or SIGINT; if the batch in flight takes longer than `grace`, exits anyway
/// (nothing is lost: unsettled rows are read again on the next start).
async fn watch_signals(cancel: CancellationToken, grace: std::time::Duration) {
    shutdown_signal().await;
    tracing::info!("Shutdown requested; finishing the batch in flight.");
    cancel.cancel();
    tokio::time::sleep(grace).await;
    tracing::warn!(grace = %humantime::format_duration(grace), "Shutdown took longer than run.shutdown_grace; exiting now.");
    std::process::exit(i32::from(EXIT_START_FAILED));
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn list_rows(settings: &Settings, which: RowsArg) -> ExitCode {
    let store = match crate::daemon::open_state(settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("leadsync: {e}");
            return ExitCode::from(state_failed(&e));
        }
    };
    let rows: Result<Vec<RecordedRow>, _> = match which {
        RowsArg::Rejected => store.rejected().await,
        RowsArg::Skipped => store.skipped().await,
        RowsArg::Unidentifiable => store.unidentifiable().await,
    };
    match rows {
        Ok(rows) => {
            for row in rows {
                match serde_json::to_string(&row) {
                    Ok(line) => println!("{line}"),
                    Err(e) => eprintln!("leadsync: cannot print {}: {e}", row.row.id),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("leadsync: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

async fn export(
    settings: &Settings,
    format: crate::cli::export::Format,
    since: Option<time::OffsetDateTime>,
    include_held: bool,
    output: Option<PathBuf>,
) -> ExitCode {
    let store = match crate::daemon::open_state(settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("leadsync: {e}");
            return ExitCode::from(state_failed(&e));
        }
    };
    let mut out: Box<dyn std::io::Write> = match &output {
        None => Box::new(std::io::stdout().lock()),
        Some(path) => match crate::private_fs::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
        {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => {
                eprintln!("leadsync: cannot create {}: {e}", path.display());
                return ExitCode::from(EXIT_START_FAILED);
            }
        },
    };
    match crate::cli::export::export(store.as_ref(), format, since, include_held, &mut out).await {
        Ok(n) => {
            if let Err(e) = out.flush() {
                eprintln!("leadsync: cannot write the export: {e}");
                return ExitCode::from(EXIT_START_FAILED);
            }
            eprintln!("leadsync: exported {n} records");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("leadsync: {e}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

fn pipeline_or_exit(settings: &Settings) -> Result<crate::pipeline::Pipeline, ExitCode> {
    crate::daemon::build_pipeline(settings).map_err(|e| {
        eprintln!("leadsync: {e}");
        ExitCode::from(start_failed(&e))
    })
}

async fn dlq(settings: &Settings, action: DlqAction) -> ExitCode {
    let pipeline = match pipeline_or_exit(settings) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // Retry and drop write the state, so they hold the processing lease like the daemon.
    if matches!(action, DlqAction::List { .. }) {
        return dlq_action(&pipeline, action).await;
    }
    let hold = match take_lease(settings, &pipeline).await {
        Ok(hold) => hold,
        Err(code) => return code,
    };
    let code = tokio::select! {
        code = dlq_action(&pipeline, action) => code,
        // Stopped like a crash: what was not settled stays a dead letter, retried next time.
        () = hold.lost.cancelled() => {
            eprintln!("leadsync: the processing lease was lost or could not be renewed in time; stopped (unsettled dead letters stay for the next retry)");
            ExitCode::from(3)
        }
    };
    hold.release().await;
    code
}

async fn dlq_action(pipeline: &crate::pipeline::Pipeline, action: DlqAction) -> ExitCode {
    let result = match action {
        DlqAction::List { json } => list_dead_letters(pipeline, json).await,
        DlqAction::Retry { ids, all } => {
            let ids = (!all).then_some(ids);
            retry_dead_letters(pipeline, ids.as_deref()).await
        }
        DlqAction::Drop { id } => drop_dead_letter(pipeline, id).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("leadsync: {e}");
        ExitCode::from(EXIT_START_FAILED)
    })
}

/// `dlq list`: one line (or JSON line) per dead letter.
async fn list_dead_letters(
    pipeline: &crate::pipeline::Pipeline,
    json: bool,
) -> Result<ExitCode, PollError> {
    let letters = pipeline.state.dead_letters().await?;
    if letters.is_empty() {
        eprintln!("leadsync: no dead letters");
    }
    for l in letters {
        if json {
            match serde_json::to_string(&l) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("leadsync: cannot print {}: {e}", l.id),
            }
        } else {
            println!(
                "{}  {}  sink={} attempts={} rows={} email={}\n    reason: {}",
                l.id,
                crate::timestamp::format(l.at),
                l.sink,
                l.attempts,
                l.rows.len(),
                l.payload
                    .customer
                    .email
                    .as_ref()
                    .map_or("-", |e| e.original.as_str()),
                l.reason
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dlq retry`: delivers the dead letters again (`ids`, or all) and prints each
/// one's result; exit 2 unless every one was delivered.
async fn retry_dead_letters(
    pipeline: &crate::pipeline::Pipeline,
    ids: Option<&[String]>,
) -> Result<ExitCode, PollError> {
    let r = pipeline.retry_dead_letters(ids).await?;
    for id in &r.delivered {
        println!("delivered  {id}");
    }
    for (id, reason) in &r.rejected {
        println!("rejected   {id}: {reason}");
    }
    for (id, reason) in &r.pending {
        println!("pending    {id}: {reason}");
    }
    for id in &r.missing {
        println!("not found  {id}");
    }
    Ok(
        if r.rejected.is_empty() && r.pending.is_empty() && r.missing.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        },
    )
}

/// `dlq drop`: settles the dead letter `id` as resolved without delivering it;
/// exit 2 when there is none.
async fn drop_dead_letter(
    pipeline: &crate::pipeline::Pipeline,
    id: String,
) -> Result<ExitCode, PollError> {
    let letters = pipeline.state.dead_letters().await?;
    if !letters.iter().any(|l| l.id == id) {
        eprintln!("leadsync: no dead letter {id}");
        return Ok(ExitCode::from(2));
    }
    pipeline
        .state
        .settle(&crate::state::SettleBatch {
            resolved: vec![id.clone()],
            ..Default::default()
        })
        .await?;
    tracing::warn!(dead_letter = %id, "Dead letter dropped by an operator.");
    println!("dropped {id}");
    Ok(ExitCode::SUCCESS)
}

async fn replay(
    settings: &Settings,
    since: time::OffsetDateTime,
    resend: bool,
    sink: Option<&str>,
) -> ExitCode {
    let pipeline = match pipeline_or_exit(settings) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let only = match sink.map(|name| pipeline.sinks.iter().position(|o| o.name == name)) {
        None => None,
        Some(Some(index)) => Some(index),
        Some(None) => {
            eprintln!(
                "leadsync: no sink named {:?}; this deployment's sinks: {}",
                sink.unwrap_or_default(),
                pipeline.sink_names()
            );
            return ExitCode::from(2);
        }
    };
    let mode = crate::pipeline::PollMode {
        since: Some(since),
        ignore_handled: true,
        resend: resend || only.is_some(),
        sink: only,
    };
    let hold = match take_lease(settings, &pipeline).await {
        Ok(hold) => hold,
        Err(code) => return code,
    };
    let result = pipeline.poll_with(mode, &hold.lost).await;
    let lost = hold.lost.is_cancelled();
    hold.release().await;
    match result {
        Ok(summary) => {
            crate::pipeline::log_summary(&summary);
            eprintln!(
                "leadsync: replay read {} rows; {} customer records sent, {} rows unchanged, {} pending",
                summary.rows_read, summary.records_sent, summary.unchanged, summary.pending
            );
            ExitCode::from(if summary.pending > 0 { 2 } else { 0 })
        }
        Err(PollError::Interrupted { pages }) if lost => {
            eprintln!("leadsync: replay stopped after {pages} pages: the processing lease was lost or could not be renewed in time; run it again");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("leadsync: replay failed: {e}");
            ExitCode::from(3)
        }
    }
}
