//! Several sinks in one deployment (`[[sinks]]`): a CRM (a webhook receiver that
//! upserts by `X-Leadsync-Key`) and a Microsoft Teams channel (a fake Workflows
//! trigger that answers 202), both in-process, the table in Azurite. Each sink gets
//! every lead once; one sink's outage neither delays the other nor makes it receive a
//! lead twice; the checkpoint waits for both.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::{customer, lead_row, serve, Backend, World};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const CONTACT: &str = "AzureMarketplace-PLT | contoso.analytics";
const TRIAL: &str = "AzureMarketplace-StartTestDrive | contoso.analytics";
const BUY: &str = "AzureMarketplace-INS | contoso.analytics";
const PATH: &str = "/workflows/0f1e2d3c/triggers/manual/paths/invoke";
const SIG: &str = "TEAMSSIGSECRET123";

/// A receiver that keeps every POST; answers `status` (200 when 0).
#[derive(Clone, Default)]
struct Receiver {
    /// Every accepted POST: the customer key (CRM) or the card's title (Teams).
    posts: Arc<Mutex<Vec<(String, Value)>>>,
    /// The event ids the CRM accepted, with how often.
    event_ids: Arc<Mutex<BTreeMap<String, u32>>>,
    status: Arc<AtomicU16>,
    down: Arc<AtomicBool>,
    /// When each accepted POST arrived.
    arrived: Arc<Mutex<Vec<std::time::Instant>>>,
}

impl Receiver {
    fn accepted(&self) -> Vec<String> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

async fn crm(State(r): State<Receiver>, headers: HeaderMap, body: String) -> Response {
    if r.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "maintenance").into_response();
    }
    let status = r.status.load(Ordering::SeqCst);
    if status != 0 {
        return (
            StatusCode::from_u16(status).unwrap(),
            "{\"error\":\"invalid field\"}",
        )
            .into_response();
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    *r.event_ids
        .lock()
        .unwrap()
        .entry(header("x-leadsync-event-id"))
        .or_default() += 1;
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    r.posts
        .lock()
        .unwrap()
        .push((header("x-leadsync-key"), body));
    StatusCode::OK.into_response()
}

async fn teams(State(r): State<Receiver>, RawQuery(query): RawQuery, body: String) -> Response {
    if !query.unwrap_or_default().contains(&format!("sig={SIG}")) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if r.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"error\":{\"code\":\"ServiceUnavailable\"}}",
        )
            .into_response();
    }
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let title = body["attachments"][0]["content"]["body"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    r.posts.lock().unwrap().push((title, body));
    r.arrived.lock().unwrap().push(std::time::Instant::now());
    StatusCode::ACCEPTED.into_response()
}

struct Deployment {
    world: World,
    crm: Receiver,
    teams: Receiver,
    sinks_toml: String,
}

impl Deployment {
    async fn start(backend: Backend) -> Deployment {
        let crm = Receiver::default();
        let teams = Receiver::default();
        let crm_url = serve(
            Router::new()
                .route("/leads", post(self::crm))
                .with_state(crm.clone()),
        )
        .await;
        let teams_url = serve(
            Router::new()
                .route(PATH, post(self::teams))
                .with_state(teams.clone()),
        )
        .await;
        let retry =
            "retry = { max_attempts = 2, initial_backoff = \"10ms\", max_backoff = \"20ms\" }";
        let sinks_toml = format!(
            "[[sinks]]\nname = \"crm\"\nkind = \"webhook\"\nbatch_size = 20\n[sinks.webhook]\nurl = \"{crm_url}/leads\"\nallow_http = true\n{retry}\n\n\
             [[sinks]]\nname = \"sales-channel\"\nkind = \"teams\"\n[sinks.teams]\nurl = {{ value = \"{teams_url}{PATH}?sp=x&sig={SIG}\" }}\nallow_http = true\n{retry}\n"
        );
        Deployment {
            world: World::with_backend(backend).await,
            crm,
            teams,
            sinks_toml,
        }
    }

    fn settings(&self) -> leadsync::config::Settings {
        self.world.settings_with_sink(&self.sinks_toml)
    }

    async fn run_once(&self) -> leadsync::RunReport {
        common::run_once(&self.settings()).await
    }
}

#[tokio::test]
async fn a_crm_and_teams_in_one_deployment_get_every_lead_once_and_one_alert_per_stage() {
    let d = Deployment::start(Backend::File).await;
    d.world
        .insert(&[
            lead_row("p00", "r000001", CONTACT, customer(1)),
            lead_row("p00", "r000002", TRIAL, customer(2)),
        ])
        .await;

    let first = d.run_once().await;
    d.world
        .insert(&[lead_row("p01", "r000003", BUY, customer(1))])
        .await;
    let second = d.run_once().await;
    let third = d.run_once().await;

    for report in [&first, &second, &third] {
        assert_eq!(report.exit_code(), 0, "{report:?}");
    }
    assert_eq!(first.totals.delivered, 2, "{:?}", first.totals);
    // Two CRM records; Teams took both records (posting for the trial only).
    assert_eq!(first.totals.records_sent, 4, "{:?}", first.totals);
    // The CRM has customer 1 twice (its contact, then its purchase) and customer 2 once.
    let crm = d.crm.accepted();
    assert_eq!(crm.len(), 3, "{crm:?}");
    assert_eq!(
        crm.iter().collect::<std::collections::BTreeSet<_>>().len(),
        2
    );
    assert!(d.crm.event_ids.lock().unwrap().values().all(|n| *n == 1));
    // Teams: the trial, then the purchase; nothing for a "Contact me", nothing twice.
    assert_eq!(
        d.teams.accepted(),
        vec![
            "New trial: First2 Last2 (Company 2)",
            "New customer: First1 Last1 (Company 1)"
        ]
    );
    assert_eq!(third.totals.records_sent, 0, "{:?}", third.totals);
    // `leadsync config` prints the settings: the Teams URL's `sig` is a secret there too.
    let shown = format!("{:#?}", d.settings());
    assert!(
        shown.contains("sales-channel") && !shown.contains(SIG),
        "{shown}"
    );
}

#[tokio::test]
async fn the_crm_down_delays_no_alert_and_repeats_none_and_the_checkpoint_waits_for_it() {
    let d = Deployment::start(Backend::File).await;
    d.crm.set_down(true);
    d.world
        .insert(&[lead_row("p00", "r000001", TRIAL, customer(1))])
        .await;

    let down = d.run_once().await;
    let still_down = d.run_once().await;

    assert_eq!(down.exit_code(), 2, "the CRM's lead is pending: {down:?}");
    assert_eq!(still_down.exit_code(), 2, "{still_down:?}");
    assert_eq!(down.pending, 1, "{down:?}");
    assert_eq!(
        d.teams.accepted().len(),
        1,
        "the alert went out at once, and once"
    );
    assert!(d.crm.accepted().is_empty());

    d.crm.set_down(false);
    let back = d.run_once().await;

    assert_eq!(back.exit_code(), 0, "{back:?}");
    assert_eq!(
        d.crm.accepted().len(),
        1,
        "the CRM got the lead once it was back"
    );
    assert_eq!(
        d.teams.accepted().len(),
        1,
        "and Teams did not get it again"
    );
    assert_eq!(back.totals.delivered, 1);
    let again = d.run_once().await;
    assert_eq!(
        again.totals.records_sent, 0,
        "settled for both: {:?}",
        again.totals
    );
}

#[tokio::test]
async fn teams_down_delays_nothing_in_the_crm_and_gets_its_alerts_once_back() {
    let d = Deployment::start(Backend::Table).await;
    d.teams.set_down(true);
    d.world
        .insert(&[
            lead_row("p00", "r000001", TRIAL, customer(1)),
            lead_row("p00", "r000002", TRIAL, customer(2)),
            lead_row("p01", "r000003", BUY, customer(3)),
        ])
        .await;

    let down = d.run_once().await;
    let still_down = d.run_once().await;

    assert_eq!(down.exit_code(), 2, "{down:?}");
    assert_eq!(
        d.crm.accepted().len(),
        3,
        "the CRM got every lead while Teams was down"
    );
    assert_eq!(still_down.exit_code(), 2, "{still_down:?}");
    assert_eq!(d.crm.accepted().len(), 3, "and none of them twice");
    assert!(d.teams.accepted().is_empty());

    d.teams.set_down(false);
    let back = d.run_once().await;

    assert_eq!(back.exit_code(), 0, "{back:?}");
    assert_eq!(d.teams.accepted().len(), 3, "{:?}", d.teams.accepted());
    assert_eq!(
        d.crm.accepted().len(),
        3,
        "the CRM is not sent anything again"
    );
}

#[tokio::test]
async fn a_lead_one_sink_refuses_is_that_sinks_dead_letter_and_dlq_retry_sends_it_there_only() {
    let d = Deployment::start(Backend::File).await;
    d.crm.status.store(400, Ordering::SeqCst);
    d.world
        .insert(&[lead_row("p00", "r000001", TRIAL, customer(1))])
        .await;

    let refused = d.run_once().await;

    assert_eq!(
        refused.exit_code(),
        0,
        "a dead letter is settled: {refused:?}"
    );
    assert_eq!(refused.totals.rejected, 1);
    assert_eq!(d.teams.accepted().len(), 1);
    let pipeline = leadsync::build_pipeline(&d.settings()).unwrap();
    let letters = pipeline.state.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].sink, "crm");
    assert!(letters[0].id.starts_with("crm:ls-"), "{}", letters[0].id);

    d.crm.status.store(0, Ordering::SeqCst);
    let report = pipeline.retry_dead_letters(None).await.unwrap();

    assert_eq!(report.delivered, vec![letters[0].id.clone()]);
    assert_eq!(d.crm.accepted().len(), 1);
    assert_eq!(d.teams.accepted().len(), 1, "the alert is not posted again");
    assert!(pipeline.state.dead_letters().await.unwrap().is_empty());
}

#[tokio::test]
async fn replay_to_one_sink_sends_it_the_leads_and_leaves_the_other_alone() {
    let d = Deployment::start(Backend::File).await;
    d.world
        .insert(&[
            lead_row("p00", "r000001", TRIAL, customer(1)),
            lead_row("p00", "r000002", BUY, customer(2)),
        ])
        .await;
    d.run_once().await;
    let pipeline = leadsync::build_pipeline(&d.settings()).unwrap();
    let teams = pipeline
        .sinks
        .iter()
        .position(|o| o.name == "sales-channel");

    let replay = pipeline
        .poll_with(
            leadsync::pipeline::PollMode {
                since: Some(time::OffsetDateTime::now_utc() - time::Duration::hours(1)),
                ignore_handled: true,
                resend: true,
                sink: teams,
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();

    assert_eq!(
        replay.sent_by_sink.get("sales-channel"),
        Some(&2),
        "{replay:?}"
    );
    assert_eq!(replay.sent_by_sink.get("crm"), None);
    assert_eq!(d.crm.accepted().len(), 2, "the CRM got nothing more");
}

#[test]
fn the_example_config_loads_with_its_two_named_sinks() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/several-sinks.example.toml");

    let settings = leadsync::config::Settings::load_with_env(&path, &Default::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    let names: Vec<String> = settings.sink_list().iter().map(|s| s.name()).collect();
    assert_eq!(names, ["crm", "sales-channel"]);
}

#[test]
fn a_config_with_both_sink_and_sinks_or_a_nameless_entry_says_which_key() {
    let base = "[source]\nconnection_string = { value = \"UseDevelopmentStorage=true\" }\n";
    let load = |text: &str| {
        leadsync::config::Settings::from_toml_with_env(
            text,
            std::path::Path::new("x.toml"),
            &Default::default(),
        )
        .unwrap_err()
        .to_string()
    };

    let both = load(&format!(
        "{base}[sink]\nkind = \"jsonl\"\n[[sinks]]\nname = \"a\"\nkind = \"jsonl\"\n"
    ));
    let nameless = load(&format!("{base}[[sinks]]\nkind = \"jsonl\"\n"));
    let twice = load(&format!(
        "{base}[[sinks]]\nname = \"a\"\nkind = \"jsonl\"\n[[sinks]]\nname = \"a\"\nkind = \"jsonl\"\n"
    ));
    let missing = load(&format!(
        "{base}[[sinks]]\nname = \"crm\"\nkind = \"salesforce\"\n"
    ));

    assert!(
        both.contains("`sinks`") && both.contains("not both"),
        "{both}"
    );
    assert!(nameless.contains("`sinks[0].name`"), "{nameless}");
    assert!(twice.contains("`sinks[1].name`"), "{twice}");
    assert!(missing.contains("`sinks[0].salesforce`"), "{missing}");
}

/// SIGKILL at random points while two sinks take a backfill: every customer reaches
/// both, and a record is posted to a sink again only when a kill fell between its
/// delivery and the commit of its outcome (at most once per kill).
#[tokio::test]
async fn sigkill_during_a_fan_out_loses_nothing_and_repeats_at_most_once_per_kill() {
    let crm = Receiver::default();
    let audit = Receiver::default();
    let crm_url = serve(
        Router::new()
            .route("/leads", post(self::crm))
            .with_state(crm.clone()),
    )
    .await;
    let audit_url = serve(
        Router::new()
            .route("/leads", post(self::crm))
            .with_state(audit.clone()),
    )
    .await;
    let world = World::with_backend(Backend::File).await;
    let customers = 300;
    let rows: Vec<_> = (0..customers)
        .map(|n| {
            let email = format!("buyer{n}@contoso.com");
            lead_row(
                &format!("p{}", n % 4),
                &format!("r{n:06}"),
                TRIAL,
                json!({"FirstName": format!("Buyer{n}"), "LastName": "Test", "Email": email}),
            )
        })
        .collect();
    world.insert(&rows).await;
    let sinks = format!(
        "[[sinks]]\nname = \"crm\"\nkind = \"webhook\"\nbatch_size = 10\n[sinks.webhook]\nurl = \"{crm_url}/leads\"\nallow_http = true\n\n\
         [[sinks]]\nname = \"audit\"\nkind = \"webhook\"\nbatch_size = 10\n[sinks.webhook]\nurl = \"{audit_url}/leads\"\nallow_http = true\n"
    );
    let config = world.config_file_with_sink("page_size = 25\n", &sinks);
    let mut rng = StdRng::seed_from_u64(27);
    let mut kills = 0;
    for _ in 0..8 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_leadsync"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..700))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let finish = Command::new(env!("CARGO_BIN_EXE_leadsync"))
        .arg("--config")
        .arg(&config)
        .args(["run", "--once"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();

    assert_eq!(
        finish.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&finish.stderr)
    );
    for (name, sink) in [("crm", &crm), ("audit", &audit)] {
        let ids = sink.event_ids.lock().unwrap().clone();
        assert_eq!(
            ids.len(),
            customers,
            "{name}: every customer's record, none missing"
        );
        let most = ids.values().copied().max().unwrap_or(0);
        assert!(
            most <= 1 + kills,
            "{name}: a record posted {most} times in {kills} kills"
        );
    }
}

/// A CRM that answers after `delay` and knows a page for every record it took.
struct LinkingCrm {
    delay: Duration,
    took: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl leadsync::sink::LeadSink for LinkingCrm {
    fn name(&self) -> &str {
        "crm"
    }
    async fn deliver(
        &self,
        batch: &[leadsync::sink::CustomerLead],
    ) -> Vec<leadsync::sink::Outcome> {
        tokio::time::sleep(self.delay).await;
        let mut took = self.took.lock().unwrap();
        took.extend(batch.iter().map(|l| l.external_key.clone()));
        vec![leadsync::sink::Outcome::Delivered; batch.len()]
    }
    async fn healthcheck(&self) -> Result<(), leadsync::sink::SinkError> {
        Ok(())
    }
    fn record_link(&self, external_key: &str) -> Option<String> {
        let took = self.took.lock().unwrap();
        took.iter()
            .any(|k| k == external_key)
            .then(|| format!("https://crm.example/lead/{external_key}"))
    }
}

/// The card Teams got, when it got it and when the poll ended, from the poll's start.
async fn alert_with_a_crm_answering_after(delay: Duration) -> (Value, Duration, Duration) {
    let d = Deployment::start(Backend::File).await;
    d.world
        .insert(&[lead_row("p00", "r000001", TRIAL, customer(1))])
        .await;
    let mut pipeline = leadsync::build_pipeline(&d.settings()).unwrap();
    let crm = Arc::new(LinkingCrm {
        delay,
        took: Mutex::default(),
    });
    pipeline.sinks[0] = leadsync::pipeline::Outlet::new("crm", crm, 20);
    let started = std::time::Instant::now();

    let summary = pipeline.poll(&CancellationToken::new()).await.unwrap();

    assert_eq!(summary.delivered, 1, "{summary:?}");
    let posts = d.teams.posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let posted = d.teams.arrived.lock().unwrap()[0] - started;
    (posts[0].1.clone(), posted, started.elapsed())
}

#[tokio::test]
async fn an_alert_names_the_crm_record_the_crm_sink_just_upserted() {
    let (card, _, _) = alert_with_a_crm_answering_after(Duration::from_millis(300)).await;

    let action = &card["attachments"][0]["content"]["actions"][0];
    assert_eq!(action["type"], "Action.OpenUrl", "{card}");
    let url = action["url"].as_str().unwrap();
    assert!(url.starts_with("https://crm.example/lead/ls-"), "{url}");
}

#[tokio::test]
async fn a_crm_slower_than_the_link_wait_delays_the_alert_no_longer_and_it_goes_without_a_link() {
    let (card, posted, took) = alert_with_a_crm_answering_after(Duration::from_secs(9)).await;

    assert!(
        card["attachments"][0]["content"]["actions"].is_null(),
        "no link: the CRM had not answered: {card}"
    );
    assert!(
        posted < Duration::from_secs(8),
        "posted after the 5 s wait, not the CRM's 9 s: {posted:?}"
    );
    assert!(
        took >= Duration::from_secs(9),
        "the poll waits for the CRM: {took:?}"
    );
}
