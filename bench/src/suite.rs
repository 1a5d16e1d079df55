//! The whole benchmark, in one run on one machine: Azurite, a seeded table, the raw-read
//! ceiling, leadsync backfills (JSONL, fake Salesforce), the Python baseline, end-to-end
//! latency under a steady insert rate, and the idle cost. Prints a report and writes it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use leadsync::config::Settings;
use leadsync::source::row::RawRow;
use leadsync::source::{Continuation, TableSource};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use crate::crm::{self, Counts, FakeSalesforce};
use crate::procinfo::{self, Finished};
use crate::proxy::CountingProxy;
use crate::seed;
use leadsync_testkit::{connection_string, Azurite};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Rows in the seeded table (10000, 100000 or 1000000).
    #[arg(long, default_value_t = 10_000)]
    rows: usize,
    /// Runs of each throughput measurement (the median is reported; the baseline runs
    /// once). Default: 15 below 100,000 rows, else 3. At 10k a round takes about two
    /// seconds and one round's JSONL share moves between about 55% and 115% with the
    /// machine: the median of 7 such rounds moved by 15 points between runs of one
    /// build, that of 15 by about half that (bench/results/history.md, *Twelfth round*).
    #[arg(long)]
    repeat: Option<usize>,
    /// Length of the idle measurement window.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Length of the steady-insert window of each latency run.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Rows inserted per second during the latency runs.
    #[arg(long, default_value_t = 20)]
    latency_rate: u64,
    /// Poll intervals of the latency runs, in seconds (30 is leadsync's default).
    #[arg(long, value_delimiter = ',', default_value = "30,1")]
    latency_intervals: Vec<u64>,
    /// Run Azurite with `--inMemoryPersistence` (its on-disk store slows down as it grows:
    /// seeding a million rows on disk takes over 30 minutes).
    #[arg(long)]
    azurite_in_memory: bool,
    /// Delay added to every storage request of the throughput runs (raw read, backfills,
    /// baseline) by a proxy in front of Azurite: the network a real storage account is
    /// behind (0: Azurite directly, on the same machine).
    #[arg(long, default_value_t = 0)]
    table_delay_ms: u64,
    /// Delay the fake Salesforce adds to every API answer (0: a free, instant CRM).
    #[arg(long, default_value_t = 0)]
    crm_delay_ms: u64,
    #[arg(long)]
    skip_baseline: bool,
    #[arg(long)]
    skip_latency: bool,
    #[arg(long)]
    skip_idle: bool,
    /// The Python of the baseline's virtualenv.
    #[arg(long, default_value = "bench/.venv/bin/python")]
    python: PathBuf,
    /// Where the report goes (a report named latest.md is also copied to `rows-N.md` beside it).
    #[arg(long, default_value = "bench/results/latest.md")]
    out: PathBuf,
    /// Prefix for the backfill children, e.g. `perf record -g -o /tmp/p.data --` to profile
    /// them (their RSS and CPU are then the wrapper's: for profiling only).
    #[arg(long, allow_hyphen_values = true)]
    wrap: Option<String>,
    /// The command line to print in the report.
    #[arg(long, default_value = "bench/run.sh")]
    command_line: String,
}

impl Args {
    /// The throughput rounds to run (`--repeat`, or its default for the table's size).
    fn rounds(&self) -> usize {
        self.repeat
            .unwrap_or(if self.rows < 100_000 { 15 } else { 3 })
            .max(1)
    }
}

/// Everything the measurements share.
struct Ctx {
    args: Args,
    root: PathBuf,
    exe: PathBuf,
    work: tempfile::TempDir,
    azurite: Azurite,
    proxy: CountingProxy,
    /// In front of Azurite with `--table-delay-ms`, for the throughput runs.
    slow: Option<CountingProxy>,
    crm: FakeSalesforce,
}

const TABLE: &str = "BenchLeads";
const IDLE_TABLE: &str = "IdleLeads";
const IDLE_ROWS: usize = 100;

enum Sink {
    Jsonl,
    Salesforce,
}

impl Ctx {
    fn direct(&self) -> String {
        connection_string(self.azurite.port)
    }

    /// The storage endpoint of the throughput runs: Azurite, or the delaying proxy.
    fn throughput(&self) -> String {
        match &self.slow {
            Some(proxy) => connection_string(proxy.port),
            None => self.direct(),
        }
    }

    fn settings(&self, connection: &str, table: &str) -> anyhow::Result<Settings> {
        let text = format!(
            "[source]\ntable = \"{table}\"\nconnection_string = {{ value = \"{connection}\" }}\n[state]\ndir = \"{}\"\n",
            self.work.path().join("unused-state").display()
        );
        Ok(Settings::from_toml_with_env(
            &text,
            Path::new("bench.toml"),
            &Default::default(),
        )?)
    }

    /// Azurite's CPU seconds so far (all its threads).
    fn azurite_cpu(&self) -> anyhow::Result<f64> {
        procinfo::cpu_seconds_fine(self.azurite.pid())
    }

    fn source(&self, connection: &str, table: &str) -> anyhow::Result<TableSource> {
        Ok(TableSource::connect(
            &self.settings(connection, table)?.source,
        )?)
    }

    /// A leadsync config with every default except the table, the state dir, the sink
    /// and (when given) the poll interval. Returns the config path.
    fn config(
        &self,
        dir: &Path,
        connection: &str,
        table: &str,
        sink: &Sink,
        poll_interval: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let sink = match sink {
            Sink::Jsonl => format!(
                "[sink]\nkind = \"jsonl\"\njsonl = {{ path = \"{}\" }}\n",
                dir.join("leads.jsonl").display()
            ),
            Sink::Salesforce => format!(
                "[sink]\nkind = \"salesforce\"\n[sink.salesforce]\nlogin_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = {{ value = \"{}\" }}\nallow_http = true\n",
                self.crm.url(),
                crm::CLIENT_ID,
                crm::CLIENT_SECRET
            ),
        };
        let run = poll_interval
            .map(|p| format!("[run]\npoll_interval = \"{p}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "[source]\ntable = \"{table}\"\nconnection_string = {{ value = \"{connection}\" }}\n\n[state]\ndir = \"{}\"\n\n{run}\n[log]\nlevel = \"info\"\n\n{sink}",
            dir.join("state").display()
        );
        let path = dir.join("leadsync.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

// ---------------------------------------------------------------------------
// Measurements

struct RawRead {
    /// In this process, on its warm connection.
    seconds: Vec<f64>,
    /// In a fresh child process, timed from connecting (see `raw_read_child`).
    fresh: Vec<f64>,
    /// Azurite's CPU seconds during each warm read (`seconds`).
    azurite_cpu: Vec<f64>,
    /// This process's CPU seconds during each warm read (the crate's parse of the pages).
    reader_cpu: Vec<f64>,
    pages: u64,
}

/// The ceiling: `TableSource::fetch_page` from the first page to the last, counting rows.
async fn raw_read_once(source: &TableSource, check: bool) -> anyhow::Result<(usize, u64, f64)> {
    let started = Instant::now();
    let mut seen = HashSet::new();
    let (rows, pages) = read_pages(source, |rows| {
        if check {
            for row in rows {
                ensure!(seen.insert(row.id.clone()), "row {} came twice", row.id);
            }
        }
        Ok(())
    })
    .await?;
    Ok((rows, pages, started.elapsed().as_secs_f64()))
}

/// Reads the whole table, page by page, doing nothing with the rows; returns (rows, pages).
pub(crate) async fn read_table(source: &TableSource) -> anyhow::Result<(usize, u64)> {
    read_pages(source, |_| Ok(())).await
}

/// Reads the whole table, handing each page's rows to `each`; returns (rows, pages).
async fn read_pages(
    source: &TableSource,
    mut each: impl FnMut(&[RawRow]) -> anyhow::Result<()>,
) -> anyhow::Result<(usize, u64)> {
    let cancel = CancellationToken::new();
    let mut continuation: Option<Continuation> = None;
    let (mut rows, mut pages) = (0usize, 0u64);
    loop {
        let page = source
            .fetch_page(None, continuation.as_ref(), &cancel)
            .await?;
        pages += 1;
        rows += page.rows.len();
        each(&page.rows)?;
        match page.next {
            Some(next) => continuation = Some(next),
            None => return Ok((rows, pages)),
        }
    }
}

/// The raw read `k` in a fresh child process (`leadsync-bench raw-read`): the ceiling for
/// a backfill, which is timed the same way in a fresh process. Returns its seconds.
async fn raw_read_child(ctx: &Ctx, k: usize) -> anyhow::Result<f64> {
    let dir = ctx.work.path().join(format!("raw-read-{k}"));
    let config = ctx.config(&dir, &ctx.throughput(), TABLE, &Sink::Jsonl, None)?;
    let mut command = Command::new(&ctx.exe);
    command.arg("raw-read").arg("--config").arg(&config);
    let (_, summary) = run_child(command, &dir, "raw read").await?;
    ensure!(
        summary["rows"] == json!(ctx.args.rows),
        "raw read in a child read {} rows",
        summary["rows"]
    );
    let _ = std::fs::remove_dir_all(&dir);
    summary["seconds"].as_f64().context("no seconds")
}

/// Runs a child that prints a JSON summary on stdout (into `dir/stdout.json`, its
/// stderr into `dir/stderr.log`); fails with the end of its stderr unless it exits 0.
async fn run_child(
    mut command: Command,
    dir: &Path,
    what: &str,
) -> anyhow::Result<(Finished, Value)> {
    command
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log"))?);
    let finished = procinfo::run(command, &dir.join("stdout.json")).await?;
    if finished.code != 0 {
        bail!(
            "{what} exited with {}: {}",
            finished.code,
            tail(&dir.join("stderr.log"))
        );
    }
    let text = std::fs::read_to_string(dir.join("stdout.json"))?;
    let summary: Value =
        serde_json::from_str(text.trim()).with_context(|| format!("{what} summary {text:?}"))?;
    Ok((finished, summary))
}

/// The warm-up pass of the raw read, which also checks that every row comes exactly once.
/// The timed passes run in [`rounds`], one before each pair of backfills.
async fn raw_read_check(ctx: &Ctx, source: &TableSource) -> anyhow::Result<RawRead> {
    let (rows, pages, _) = raw_read_once(source, true).await?;
    ensure!(
        rows == ctx.args.rows,
        "raw read returned {rows} rows, expected {}",
        ctx.args.rows
    );
    Ok(RawRead {
        seconds: Vec::new(),
        fresh: Vec::new(),
        azurite_cpu: Vec::new(),
        reader_cpu: Vec::new(),
        pages,
    })
}

/// `--repeat` rounds of: a timed raw read, a backfill to JSONL, a backfill to the fake
/// Salesforce. Interleaved, so that a machine whose speed drifts (other work, CPU
/// frequency) moves the ceiling and the runs measured against it together.
async fn rounds(ctx: &Ctx) -> anyhow::Result<(RawRead, Backfill, Backfill)> {
    let source = ctx.source(&ctx.throughput(), TABLE)?;
    let mut raw = raw_read_check(ctx, &source).await?;
    let (mut jsonl, mut sf) = (Backfill::default(), Backfill::default());
    for k in 0..ctx.args.rounds() {
        eprintln!(
            "leadsync-bench: round {}: raw read, JSONL, fake Salesforce",
            k + 1
        );
        let (azurite, reader) = (ctx.azurite_cpu()?, procinfo::own_cpu_seconds());
        let (rows, _, s) = raw_read_once(&source, false).await?;
        raw.azurite_cpu.push(ctx.azurite_cpu()? - azurite);
        raw.reader_cpu.push(procinfo::own_cpu_seconds() - reader);
        ensure!(rows == ctx.args.rows, "raw read returned {rows} rows");
        raw.seconds.push(s);
        raw.fresh.push(raw_read_child(ctx, k).await?);
        backfill_once(ctx, &Sink::Jsonl, "jsonl", k, &mut jsonl).await?;
        backfill_once(ctx, &Sink::Salesforce, "salesforce", k, &mut sf).await?;
    }
    Ok((raw, jsonl, sf))
}

#[derive(Default)]
struct Backfill {
    /// Seconds of `leadsync::run(once)` per run, measured inside the child.
    seconds: Vec<f64>,
    /// Wall seconds of the whole child process per run (start-up included).
    wall: Vec<f64>,
    max_rss_kib: u64,
    /// `ru_maxrss` from wait4, for comparison (it includes the parent's RSS).
    wait4_kib: u64,
    cpu_s: Vec<f64>,
    /// Azurite's CPU seconds while each child ran.
    azurite_cpu: Vec<f64>,
    summary: Value,
    crm: Option<Counts>,
    crm_leads: usize,
}

/// One backfill run `k` into a fresh child process and state directory; adds its numbers to `out`.
async fn backfill_once(
    ctx: &Ctx,
    sink: &Sink,
    label: &str,
    k: usize,
    out: &mut Backfill,
) -> anyhow::Result<()> {
    let dir = ctx.work.path().join(format!("backfill-{label}-{k}"));
    let config = ctx.config(&dir, &ctx.throughput(), TABLE, sink, None)?;
    ctx.crm.reset();
    let mut command = match &ctx.args.wrap {
        Some(wrap) => {
            let wrap = wrap.replace("{label}", &format!("{label}-{k}"));
            let mut words = wrap.split_whitespace();
            let mut command = Command::new(words.next().context("empty --wrap")?);
            command.args(words).arg(&ctx.exe);
            command
        }
        None => Command::new(&ctx.exe),
    };
    command.arg("backfill").arg("--config").arg(&config);
    let azurite = ctx.azurite_cpu()?;
    let (finished, summary) = run_child(command, &dir, &format!("backfill {label}")).await?;
    out.azurite_cpu.push(ctx.azurite_cpu()? - azurite);
    ensure!(
        summary["rows_read"] == json!(ctx.args.rows) && summary["exit_code"] == json!(0),
        "backfill {label} did not read and settle every row: {summary}"
    );
    out.seconds
        .push(summary["seconds"].as_f64().unwrap_or(f64::NAN));
    out.wall.push(finished.wall.as_secs_f64());
    let hwm = summary["vm_hwm_kib"].as_u64().context("no vm_hwm_kib")?;
    out.max_rss_kib = out.max_rss_kib.max(hwm);
    out.wait4_kib = out.wait4_kib.max(finished.wait4_max_rss_kib);
    out.cpu_s.push(finished.cpu_s());
    out.summary = summary;
    if matches!(sink, Sink::Salesforce) {
        out.crm = Some(ctx.crm.counts());
        out.crm_leads = ctx.crm.leads();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Baseline {
    seconds: f64,
    rows: u64,
    /// The script's own VmHWM.
    hwm_kib: u64,
    finished: Finished,
    crm: Counts,
}

async fn baseline(ctx: &Ctx) -> anyhow::Result<Baseline> {
    let dir = ctx.work.path().join("baseline");
    std::fs::create_dir_all(&dir)?;
    ctx.crm.reset();
    let mut command = Command::new(ctx.root.join(&ctx.args.python));
    command
        .arg(ctx.root.join("bench/baseline.py"))
        .args(["--connection-string", &ctx.throughput()])
        .args(["--table", TABLE])
        .args(["--login-url", ctx.crm.url()])
        .args(["--client-id", crm::CLIENT_ID])
        .args(["--client-secret", crm::CLIENT_SECRET]);
    let (finished, summary) = run_child(command, &dir, "baseline").await?;
    Ok(Baseline {
        seconds: summary["seconds"].as_f64().unwrap_or(f64::NAN),
        rows: summary["rows"].as_u64().unwrap_or(0),
        hwm_kib: summary["vm_hwm_kib"].as_u64().unwrap_or(0),
        finished,
        crm: ctx.crm.counts(),
    })
}

struct Latency {
    interval_s: u64,
    inserted: usize,
    /// Milliseconds from "insert acknowledged" to "Lead accepted by the fake CRM", sorted.
    ms: Vec<f64>,
    missing: usize,
    daemon: Finished,
    /// The daemon's VmHWM just before it was stopped.
    hwm_kib: u64,
}

impl Latency {
    fn percentile(&self, q: f64) -> f64 {
        percentile(&self.ms, q)
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency_row(table_tag: &str, i: usize, email: &str) -> Map<String, Value> {
    let now = time::OffsetDateTime::now_utc();
    let info = json!({
        "FirstName": format!("Lat{i}"), "LastName": "Latency", "Email": email,
        "Company": "Northwind Traders", "Country": "US", "Title": "CTO", "Phone": "+1 425 555 0100",
    });
    let row = json!({
        "PartitionKey": now.date().to_string(),
        "RowKey": format!("{table_tag}-{i:06}"),
        "LeadSource": "AzureMarketplace-INS | contoso.contoso-analytics",
        "ActionCode": "INS",
        "CustomerInfo": info.to_string(),
        "OfferDisplayName": "Contoso Analytics",
        "Description": "Campaigns: ",
        "CreatedTime": now.to_string(),
    });
    match row {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

/// Waits until the daemon's log shows `polls` finished polls.
async fn wait_for_polls(log: &Path, polls: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while procinfo::count_in_file(log, "Poll finished") < polls {
        if Instant::now() > deadline {
            bail!("the daemon did not finish a poll in time: {}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn spawn_daemon(ctx: &Ctx, config: &Path, log: &Path) -> anyhow::Result<(u32, Instant)> {
    let child = Command::new(&ctx.exe)
        .arg("daemon")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("start the daemon")?;
    Ok((child.id(), Instant::now()))
}

async fn stop_daemon(pid: u32, started: Instant) -> anyhow::Result<Finished> {
    procinfo::terminate(pid);
    tokio::task::spawn_blocking(move || procinfo::wait(pid, started)).await?
}

async fn latency(ctx: &Ctx, interval_s: u64) -> anyhow::Result<Latency> {
    let table = format!("Latency{interval_s}s");
    let source = Arc::new(ctx.source(&ctx.direct(), &table)?);
    source.create_table_if_missing().await?;
    ctx.crm.reset();
    let dir = ctx.work.path().join(format!("latency-{interval_s}s"));
    let poll = format!("{interval_s}s");
    let config = ctx.config(&dir, &ctx.direct(), &table, &Sink::Salesforce, Some(&poll))?;
    let log = dir.join("stderr.log");
    let (pid, started) = spawn_daemon(ctx, &config, &log)?;
    let result = async {
        wait_for_polls(&log, 1, Duration::from_secs(30)).await?;
        let n = (ctx.args.latency_rate * ctx.args.latency_seconds) as usize;
        let emails: Vec<String> = (0..n)
            .map(|i| format!("lat{interval_s}s-{i}@northwind.example"))
            .collect();
        for email in &emails {
            ctx.crm.watch(email);
        }
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(
            1.0 / ctx.args.latency_rate.max(1) as f64,
        ));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut inserts = tokio::task::JoinSet::new();
        for (i, email) in emails.iter().enumerate() {
            ticker.tick().await;
            let row = latency_row(&table, i, email);
            let source = source.clone();
            inserts.spawn(async move {
                source.upsert_entity(&row).await?;
                anyhow::Ok((i, Instant::now()))
            });
        }
        let mut inserted = vec![None; n];
        while let Some(done) = inserts.join_next().await {
            let (i, at) = done??;
            inserted[i] = Some(at);
        }
        let deadline = Instant::now() + Duration::from_secs(interval_s + 15);
        while !ctx.crm.all_accepted() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut ms = Vec::new();
        let mut missing = 0;
        for (email, at) in emails.iter().zip(inserted) {
            match (ctx.crm.accepted(email), at) {
                (Some(accepted), Some(at)) => ms.push(
                    accepted
                        .checked_duration_since(at)
                        .unwrap_or_default()
                        .as_secs_f64()
                        * 1000.0,
                ),
                _ => missing += 1,
            }
        }
        ms.sort_by(f64::total_cmp);
        anyhow::Ok((n, ms, missing))
    }
    .await;
    let hwm_kib = procinfo::status_kib(pid, "VmHWM").unwrap_or(0);
    let daemon = stop_daemon(pid, started).await?;
    let (inserted, ms, missing) = result?;
    Ok(Latency {
        interval_s,
        inserted,
        ms,
        missing,
        daemon,
        hwm_kib,
    })
}

struct Idle {
    window_s: f64,
    polls: usize,
    requests: u64,
    rss_end_kib: u64,
    rss_max_kib: u64,
    hwm_kib: u64,
    cpu_s: f64,
}

async fn idle(ctx: &Ctx) -> anyhow::Result<Idle> {
    let direct = ctx.source(&ctx.direct(), IDLE_TABLE)?;
    direct.create_table_if_missing().await?;
    let table = leadsync::source::service_client(&ctx.settings(&ctx.direct(), IDLE_TABLE)?.source)?
        .table_client(IDLE_TABLE);
    seed::insert(
        &table,
        (0..IDLE_ROWS).map(|i| seed::row(i, IDLE_ROWS)).collect(),
    )
    .await?;
    let dir = ctx.work.path().join("idle");
    // Through the counting proxy, at the default poll interval (30 s).
    let config = ctx.config(
        &dir,
        &connection_string(ctx.proxy.port),
        IDLE_TABLE,
        &Sink::Salesforce,
        None,
    )?;
    let log = dir.join("stderr.log");
    let (pid, started) = spawn_daemon(ctx, &config, &log)?;
    let result = async {
        wait_for_polls(&log, 1, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let requests0 = ctx.proxy.requests();
        let cpu0 = procinfo::cpu_seconds(pid)?;
        let polls0 = procinfo::count_in_file(&log, "Poll finished");
        let t0 = Instant::now();
        let mut rss_max = 0;
        let window = Duration::from_secs(ctx.args.idle_seconds);
        while t0.elapsed() < window {
            rss_max = rss_max.max(procinfo::status_kib(pid, "VmRSS")?);
            tokio::time::sleep(Duration::from_millis(500).min(window.saturating_sub(t0.elapsed())))
                .await;
        }
        let window_s = t0.elapsed().as_secs_f64();
        let rss_end = procinfo::status_kib(pid, "VmRSS")?;
        anyhow::Ok(Idle {
            window_s,
            polls: procinfo::count_in_file(&log, "Poll finished") - polls0,
            requests: ctx.proxy.requests() - requests0,
            rss_end_kib: rss_end,
            rss_max_kib: rss_max.max(rss_end),
            hwm_kib: procinfo::status_kib(pid, "VmHWM")?,
            cpu_s: procinfo::cpu_seconds(pid)? - cpu0,
        })
    }
    .await;
    stop_daemon(pid, started).await?;
    result
}

// ---------------------------------------------------------------------------
// The run and the report

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Where the machine's CPU goes in the warm raw read and the JSONL backfill: whether the
/// backfill waits (for the table, for a commit) or the two processes keep every core busy,
/// and so how close to the raw read this machine lets a backfill that does this much work
/// come. Medians over the rounds.
fn cpu_bound(raw: &RawRead, jsonl: &Backfill) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    let (read_s, read_azurite, reader) = (
        median(&raw.seconds),
        median(&raw.azurite_cpu),
        median(&raw.reader_cpu),
    );
    let (wall, leadsync, azurite) = (
        median(&jsonl.wall),
        median(&jsonl.cpu_s),
        median(&jsonl.azurite_cpu),
    );
    // With every core busy all the time, the backfill's process could take no less.
    let floor = (leadsync + azurite) / cores;
    format!(
        "CPU, medians over the rounds, on {cores:.0} cores: the warm raw read took {read_s:.3} s, with Azurite {read_azurite:.3} CPU s and the reader {reader:.3} ({:.0}% of the cores busy). The JSONL backfill's process took {wall:.3} s with {leadsync:.3} CPU s, Azurite {azurite:.3} ({:.0}% of the cores busy). Both using every core all the time, the backfill's process could take no less than {floor:.3} s: {:.0}% of the raw read's rate is the most this much CPU allows here (its start-up included). Past that, only less CPU per row makes a backfill faster on this machine.\n",
        100.0 * (read_azurite + reader) / (cores * read_s),
        100.0 * (leadsync + azurite) / (cores * wall),
        100.0 * read_s / floor,
    )
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine(ctx: &Ctx) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let azurite: Value = std::fs::read_to_string(
        ctx.root
            .join("tools/azurite/node_modules/azurite/package.json"),
    )
    .ok()
    .and_then(|t| serde_json::from_str(&t).ok())
    .unwrap_or(Value::Null);
    let python = ctx.root.join(&ctx.args.python);
    let python_versions = output(
        &python.to_string_lossy(),
        &["-c", "import sys, importlib.metadata as m; print(sys.version.split()[0], m.version('azure-data-tables'), m.version('requests'))"],
    );
    let mut py = python_versions.split_whitespace();
    let head = output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !output("git", &["status", "--porcelain", "--", "src", "Cargo.lock"]).is_empty();
    vec![
        ("CPU".into(), format!("{model}, {cores} cores (nproc)")),
        (
            "memory".into(),
            format!("{:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0),
        ),
        ("kernel".into(), kernel),
        (
            "leadsync".into(),
            format!(
                "{head}{}",
                if dirty {
                    " + uncommitted changes in src/ or Cargo.lock"
                } else {
                    ""
                }
            ),
        ),
        ("rustc".into(), output("rustc", &["--version"])),
        ("node".into(), output("node", &["--version"])),
        (
            "azurite".into(),
            azurite["version"].as_str().unwrap_or("unknown").to_owned(),
        ),
        ("python".into(), py.next().unwrap_or("unknown").to_owned()),
        (
            "azure-data-tables".into(),
            py.next().unwrap_or("unknown").to_owned(),
        ),
        ("requests".into(), py.next().unwrap_or("unknown").to_owned()),
    ]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn met(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**not met**"
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let root = std::env::current_dir()?;
    let exe = std::env::current_exe()?;
    let work = tempfile::Builder::new()
        .prefix("leadsync-bench-")
        .tempdir()?;
    eprintln!("leadsync-bench: starting Azurite");
    let azurite = Azurite::start_with(
        &root,
        leadsync_testkit::Options {
            in_memory: args.azurite_in_memory,
            max_heap_mib: Some(8192),
            log: Some(work.path().join("azurite.log")),
        },
    )?;
    let proxy = CountingProxy::start(azurite.port).await?;
    let crm = FakeSalesforce::start(Duration::from_millis(args.crm_delay_ms)).await?;
    let slow = match args.table_delay_ms {
        0 => None,
        ms => Some(CountingProxy::start_with_delay(azurite.port, Duration::from_millis(ms)).await?),
    };
    let ctx = Ctx {
        args: args.clone(),
        root,
        exe,
        work,
        azurite,
        proxy,
        slow,
        crm,
    };
    let n = args.rows;
    let load_start = loadavg();
    // Before the measurements: the tree as built (others may commit while this runs).
    let machine = machine(&ctx);

    eprintln!("leadsync-bench: seeding {n} rows through entity-group transactions");
    let source = ctx.source(&ctx.direct(), TABLE)?;
    source.create_table_if_missing().await?;
    let table = leadsync::source::service_client(&ctx.settings(&ctx.direct(), TABLE)?.source)?
        .table_client(TABLE);
    let seeding = seed::insert(&table, (0..n).map(|i| seed::row(i, n)).collect()).await?;

    let (raw, jsonl, sf) = rounds(&ctx).await?;
    let base = if args.skip_baseline {
        None
    } else {
        eprintln!("leadsync-bench: baseline (Python, azure-data-tables, one PATCH per row)");
        Some(baseline(&ctx).await?)
    };
    let mut latencies = Vec::new();
    if !args.skip_latency {
        for &interval in &args.latency_intervals {
            eprintln!(
                "leadsync-bench: latency at poll interval {interval}s ({} rows/s for {} s)",
                args.latency_rate, args.latency_seconds
            );
            latencies.push(latency(&ctx, interval).await?);
        }
    }
    let idle = if args.skip_idle {
        None
    } else {
        eprintln!(
            "leadsync-bench: idle cost over {} s (default poll interval)",
            args.idle_seconds
        );
        Some(idle(&ctx).await?)
    };

    // ---- report
    let raw_rate = n as f64 / median(&raw.seconds);
    let jsonl_rate = n as f64 / median(&jsonl.seconds);
    let sf_rate = n as f64 / median(&sf.seconds);
    // JSONL against the raw read of its own round (see `rounds`), the median over rounds.
    let shares = |raw: &[f64]| -> Vec<f64> {
        raw.iter()
            .zip(&jsonl.seconds)
            .map(|(raw, jsonl)| raw / jsonl)
            .collect()
    };
    let jsonl_shares = shares(&raw.seconds);
    let jsonl_share = median(&jsonl_shares);
    let fresh_rate = n as f64 / median(&raw.fresh);
    let fresh_share = median(&shares(&raw.fresh));
    let sf_counts = sf.crm.clone().unwrap_or_default();
    let rows_per_call = n as f64 / sf_counts.api_calls().max(1) as f64;
    let base_rate = base.as_ref().map(|b| b.rows as f64 / b.seconds);
    let runs = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{:.0}", n as f64 / s))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let mut md = String::new();
    let date = time::OffsetDateTime::now_utc();
    writeln!(md, "# leadsync benchmark: {n} rows\n")?;
    writeln!(md, "Command: `{}`  ", args.command_line)?;
    writeln!(
        md,
        "Run: {} UTC, one machine: Azurite, leadsync, the fake Salesforce and the baseline share it.\n",
        date.date()
    )?;
    writeln!(md, "| machine / version | |\n| --- | --- |")?;
    for (k, v) in machine {
        writeln!(md, "| {k} | {v} |")?;
    }
    writeln!(
        md,
        "| load average (1/5/15 min) | at start {load_start}, at end {} (other work on the machine skews every number) |",
        loadavg()
    )?;
    writeln!(
        md,
        "\nTable `{TABLE}`: {n} rows, {} customers (each about 3 times: PLT / StartTestDrive / INS / Create, days apart), {} date partitions, 1 row in 1,000 a marketplace test lead. Seeded in {:.1} s ({:.0} rows/s) through entity-group transactions of 100, every operation response checked.\n",
        seed::customers(n),
        seed::PARTITIONS,
        seeding.as_secs_f64(),
        n as f64 / seeding.as_secs_f64()
    )?;

    writeln!(md, "## Throughput (backfill of the whole table)\n")?;
    writeln!(
        md,
        "{} rounds, each a raw read, a backfill to JSONL and one to the fake Salesforce, one after the other (so the ceiling and the runs measured against it share the machine's state); rates are medians over the rounds, and \"of raw\" is the median of each round's JSONL rate over that round's raw read (baseline: 1 run). Each leadsync run is a fresh child process with an empty state directory. Fake Salesforce delay per API call: {} ms. {}\n",
        args.rounds(),
        args.crm_delay_ms,
        match args.table_delay_ms {
            0 => format!("Storage: Azurite directly, on the same machine (no network){}.", if args.azurite_in_memory { ", data in memory (`--inMemoryPersistence`)" } else { ", data on disk" }),
            ms => format!("Storage: Azurite behind a proxy that holds every request {ms} ms (raw read, backfills and baseline alike), as a storage account in the same region is behind a network."),
        }
    )?;
    writeln!(
        md,
        "| measurement | rows/s | relative | CRM API calls | rows per call | peak RSS | CPU s | runs (rows/s) |"
    )?;
    writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )?;
    writeln!(
        md,
        "| raw paged read (`TableSource::fetch_page` loop, {} pages, no processing) | {raw_rate:.0} | 100% of raw | – | – | – | – | {} |",
        raw.pages,
        runs(&raw.seconds)
    )?;
    writeln!(
        md,
        "| raw paged read in a fresh process (`leadsync-bench raw-read`: connect, then the same loop; timed as the backfills are) | {fresh_rate:.0} | {:.0}% of raw | – | – | – | – | {} |",
        100.0 * fresh_rate / raw_rate,
        runs(&raw.fresh)
    )?;
    writeln!(
        md,
        "| leadsync backfill -> JSONL (temp file) | {jsonl_rate:.0} | {:.0}% of raw ({:.0}% of the fresh-process read) | – | – | {:.1} MiB | {:.2} | {} |",
        100.0 * jsonl_share,
        100.0 * fresh_share,
        mib(jsonl.max_rss_kib),
        median(&jsonl.cpu_s),
        runs(&jsonl.seconds)
    )?;
    let relative = base_rate
        .map(|b| format!("{:.1}x baseline", sf_rate / b))
        .unwrap_or_else(|| "–".into());
    writeln!(
        md,
        "| leadsync backfill -> fake Salesforce (sObject Collections) | {sf_rate:.0} | {relative} | {} (+{} token) | {rows_per_call:.0} | {:.1} MiB | {:.2} | {} |",
        sf_counts.api_calls(),
        sf_counts.token_calls,
        mib(sf.max_rss_kib),
        median(&sf.cpu_s),
        runs(&sf.seconds)
    )?;
    if let (Some(b), Some(rate)) = (&base, base_rate) {
        writeln!(
            md,
            "| baseline: Python `azure-data-tables` pages + one `PATCH` upsert per row | {rate:.0} | 1x | {} (+{} token) | {:.1} | {:.1} MiB | {:.2} | {rate:.0} |",
            b.crm.api_calls(),
            b.crm.token_calls,
            b.rows as f64 / b.crm.api_calls().max(1) as f64,
            mib(b.hwm_kib),
            b.finished.cpu_s(),
        )?;
    }
    writeln!(
        md,
        "\nleadsync's rows/s is timed inside the child around `leadsync::run(once)` (state open, every page, every delivery, checkpoint); whole-process wall times: JSONL {}, Salesforce {} s. Peak RSS is the child's own VmHWM (`/proc/self/status` at its end; `ru_maxrss` from `wait4`, {:.1} / {:.1} MiB here, also counts this process's RSS, inherited through the vfork before exec); CPU is its user + system time from `wait4`. JSONL run summary: `{}`. Fake Salesforce after the last run: {} Leads, {} records received ({} created, {} updated, {} refused).\n",
        jsonl.wall.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>().join("/"),
        sf.wall.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>().join("/"),
        mib(jsonl.wait4_kib),
        mib(sf.wait4_kib),
        jsonl.summary,
        sf.crm_leads,
        sf_counts.records,
        sf_counts.created,
        sf_counts.updated,
        sf_counts.refused,
    )?;

    writeln!(md, "{}", cpu_bound(&raw, &jsonl))?;

    if !latencies.is_empty() {
        writeln!(
            md,
            "## End-to-end latency (row inserted -> Lead accepted by the fake Salesforce)\n"
        )?;
        writeln!(
            md,
            "A `leadsync run` daemon (leadsync's own CLI, in a child process) on an empty table of its own; rows inserted one by one (as the marketplace does) at {} rows/s for {} s, each a new customer; latency from the insert's acknowledgement to the fake's answer to the upsert that carried it. An insert window at least one poll interval long covers every phase of the poll cycle (the trade-off at 30 s: one cycle, sampled once per row, instead of many cycles).\n",
            args.latency_rate, args.latency_seconds
        )?;
        writeln!(md, "| poll interval | rows | p50 | p99 | max | not delivered | daemon CPU s | daemon peak RSS |")?;
        writeln!(
            md,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for l in &latencies {
            writeln!(
                md,
                "| {} s | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {:.2} | {:.1} MiB |",
                l.interval_s,
                l.inserted,
                l.percentile(0.5),
                l.percentile(0.99),
                l.ms.last().copied().unwrap_or(f64::NAN),
                l.missing,
                l.daemon.cpu_s(),
                mib(l.hwm_kib)
            )?;
        }
        writeln!(md)?;
    }

    if let Some(i) = &idle {
        writeln!(md, "## Idle cost (nothing new)\n")?;
        writeln!(
            md,
            "A `leadsync run` daemon at the default poll interval (30 s) on a table of {IDLE_ROWS} rows it has already delivered (they are still inside the 15-minute overlap window, so each poll re-reads them: one page); storage requests counted by a proxy in front of Azurite; after the first poll, over {:.0} s.\n",
            i.window_s
        )?;
        writeln!(
            md,
            "| polls | storage requests/min | RSS at end | max RSS in window | VmHWM | CPU s/min |"
        )?;
        writeln!(md, "| ---: | ---: | ---: | ---: | ---: | ---: |")?;
        // /proc/<pid>/stat counts in clock ticks (10 ms).
        let cpu = match i.cpu_s * 60.0 / i.window_s {
            c if c < 0.01 => "< 0.01".to_owned(),
            c => format!("{c:.2}"),
        };
        writeln!(
            md,
            "| {} | {:.1} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {cpu} |\n",
            i.polls,
            i.requests as f64 * 60.0 / i.window_s,
            mib(i.rss_end_kib),
            mib(i.rss_max_kib),
            mib(i.hwm_kib),
        )?;
    }

    writeln!(md, "## Targets\n")?;
    writeln!(md, "| target | measured | |\n| --- | --- | --- |")?;
    if let Some(b) = base_rate {
        writeln!(
            md,
            "| backfill to fake Salesforce >= 10x baseline rows/s | {:.1}x ({sf_rate:.0} vs {b:.0}) | {} |",
            sf_rate / b,
            met(sf_rate >= 10.0 * b)
        )?;
    }
    writeln!(
        md,
        "| <= 1 CRM call per 150 rows in backfill | 1 per {rows_per_call:.0} rows ({} calls: {} upserts, {} queries) | {} |",
        sf_counts.api_calls(),
        sf_counts.composite_calls,
        sf_counts.query_calls,
        met(rows_per_call >= 150.0)
    )?;
    let per_customer = sf_counts.records as f64 / seed::customers(n).max(1) as f64;
    writeln!(
        md,
        "| <= 1.05 records sent per customer in backfill | {per_customer:.2} ({} records, {} customers) | {} |",
        sf_counts.records,
        seed::customers(n),
        met(per_customer <= 1.05)
    )?;
    writeln!(
        md,
        "| backfill to JSONL >= 80% of raw read | {:.0}% (median over rounds of JSONL vs the raw read of the same round: {}) | {} |",
        100.0 * jsonl_share,
        jsonl_shares
            .iter()
            .map(|r| format!("{:.0}%", 100.0 * r))
            .collect::<Vec<_>>()
            .join(", "),
        met(jsonl_share >= 0.8)
    )?;
    for l in &latencies {
        let limit = l.interval_s as f64 * 1000.0 + 250.0;
        let p99 = l.percentile(0.99);
        writeln!(
            md,
            "| p99 latency <= poll interval + 250 ms ({} s) | {p99:.0} ms (limit {limit:.0} ms){} | {} |",
            l.interval_s,
            if l.missing > 0 { format!(", {} not delivered", l.missing) } else { String::new() },
            met(p99 <= limit && l.missing == 0)
        )?;
    }
    if let Some(i) = &idle {
        writeln!(
            md,
            "| idle RSS < 20 MB | {:.1} MiB max in window ({:.1} MB) | {} |",
            mib(i.rss_max_kib),
            i.rss_max_kib as f64 * 1024.0 / 1e6,
            met((i.rss_max_kib as f64 * 1024.0) < 20e6)
        )?;
    }
    writeln!(
        md,
        "| RSS flat from 10k to 1M rows | peak RSS {:.1} MiB (JSONL) / {:.1} MiB (Salesforce) at {n} rows: compare the runs in BENCHMARKS.md | – |",
        mib(jsonl.max_rss_kib),
        mib(sf.max_rss_kib)
    )?;

    println!("{md}");
    let out = ctx.root.join(&args.out);
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &md)?;
    eprintln!("leadsync-bench: report written to {}", out.display());
    if out.file_name() == Some(std::ffi::OsStr::new("latest.md")) {
        let copy = out.with_file_name(format!("rows-{n}.md"));
        std::fs::write(&copy, &md)?;
        eprintln!("leadsync-bench: and to {}", copy.display());
    }
    Ok(())
}
