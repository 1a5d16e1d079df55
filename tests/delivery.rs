//! Nothing lost, nothing doubled: outages, dead letters, replay, storage restarts.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{customer, lead_row, many_rows, MemorySink, World};
use leadsync::pipeline::{Pipeline, PollMode};
use leadsync::sink::{CustomerLead, LeadSink, Outcome, SinkError};
use leadsync::{build_pipeline, RunOptions};
use tokio_util::sync::CancellationToken;

/// A CRM that refuses one customer until told otherwise, and counts calls.
#[derive(Default)]
struct PickyCrm {
    refuse: Mutex<Option<String>>,
    down: AtomicBool,
    retry_after: Mutex<Option<Duration>>,
    calls: AtomicUsize,
    records: Mutex<BTreeMap<String, CustomerLead>>,
}

#[async_trait::async_trait]
impl LeadSink for PickyCrm {
    fn name(&self) -> &str {
        "picky"
    }
    async fn deliver(&self, batch: &[CustomerLead]) -> Vec<Outcome> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            let after = *self.retry_after.lock().unwrap();
            return vec![
                Outcome::RetryLater {
                    after,
                    reason: "503 Service Unavailable".into()
                };
                batch.len()
            ];
        }
        let refuse = self.refuse.lock().unwrap().clone();
        batch
            .iter()
            .map(|lead| {
                let email = lead.customer.email.as_ref().map(|e| e.normalized.clone());
                if email.is_some() && email == refuse {
                    Outcome::Rejected {
                        reason: "FIELD_CUSTOM_VALIDATION_EXCEPTION: Phone is required".into(),
                    }
                } else {
                    self.records
                        .lock()
                        .unwrap()
                        .insert(lead.external_key.clone(), lead.clone());
                    Outcome::Delivered
                }
            })
            .collect()
    }
    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

fn pipeline(world: &World, crm: Arc<PickyCrm>, follow_up_warning: Duration) -> Pipeline {
    let built = build_pipeline(&world.settings()).unwrap();
    Pipeline {
        follow_up_warning,
        ..built.with_sink(crm)
    }
}

#[tokio::test]
async fn a_permanent_rejection_becomes_a_dead_letter_and_dlq_retry_delivers_it_once_accepted() {
    let world = World::new().await;
    world.insert(&many_rows(3, 1)).await;
    let crm = Arc::new(PickyCrm::default());
    *crm.refuse.lock().unwrap() = Some("customer1@contoso.com".into());
    let p = pipeline(&world, crm.clone(), Duration::from_secs(3600));

    let first = p.poll(&CancellationToken::new()).await.unwrap();

    assert_eq!((first.delivered, first.rejected, first.pending), (2, 1, 0));
    assert!(first.checkpoint.is_some(), "a dead-lettered row is settled");
    let letters = p.state.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].reason.contains("Phone is required"));
    assert_eq!(
        letters[0]
            .payload
            .customer
            .email
            .as_ref()
            .unwrap()
            .normalized,
        "customer1@contoso.com"
    );
    assert_eq!(letters[0].rows.len(), 1);

    // Still refused: the dead letter stays, with one more attempt.
    let again = p.retry_dead_letters(None).await.unwrap();
    assert_eq!(again.rejected.len(), 1);
    assert_eq!(p.state.dead_letters().await.unwrap()[0].attempts, 2);

    *crm.refuse.lock().unwrap() = None;
    let fixed = p
        .retry_dead_letters(Some(&[letters[0].id.clone()]))
        .await
        .unwrap();

    assert_eq!(fixed.delivered, vec![letters[0].id.clone()]);
    assert!(p.state.dead_letters().await.unwrap().is_empty());
    // The customer's record as stored, whose summary the store keeps as a hash: the
    // retry sends it with its text rebuilt from the template (unchanged here), the text
    // the dead letter was refused with.
    let sent = crm.records.lock().unwrap()[&letters[0].id].clone();
    assert!(sent.summary.contains("Next step:"), "{}", sent.summary);
    assert_eq!(sent.summary, letters[0].payload.summary);
    assert_eq!(
        crm.records.lock().unwrap().len(),
        3,
        "every customer in the CRM once"
    );
}

#[tokio::test]
async fn while_the_crm_is_down_leads_wait_and_are_delivered_after_recovery_with_the_wait_visible() {
    let world = World::new().await;
    world.insert(&many_rows(4, 2)).await;
    let crm = Arc::new(PickyCrm::default());
    crm.down.store(true, Ordering::SeqCst);
    let p = pipeline(&world, crm.clone(), Duration::from_millis(1));
    let cancel = CancellationToken::new();

    let down = p.poll(&cancel).await.unwrap();
    let still_down = p.poll(&cancel).await.unwrap();

    assert_eq!(down.pending, 4);
    assert_eq!(down.checkpoint, None, "the checkpoint holds");
    assert_eq!(still_down.overdue, 4, "past the follow-up warning");
    assert!(still_down.oldest_pending_age.is_some());
    crm.down.store(false, Ordering::SeqCst);
    let back = p.poll(&cancel).await.unwrap();
    assert_eq!((back.delivered, back.pending), (4, 0));
    assert_eq!(crm.records.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_retry_after_pauses_delivery_instead_of_calling_the_crm_every_poll() {
    let world = World::new().await;
    world.insert(&many_rows(2, 1)).await;
    let crm = Arc::new(PickyCrm::default());
    crm.down.store(true, Ordering::SeqCst);
    *crm.retry_after.lock().unwrap() = Some(Duration::from_secs(3600));
    let p = pipeline(&world, crm.clone(), Duration::from_secs(3600));
    let cancel = CancellationToken::new();

    p.poll(&cancel).await.unwrap();
    let calls = crm.calls.load(Ordering::SeqCst);
    let paused = p.poll(&cancel).await.unwrap();

    assert_eq!(calls, 1);
    assert_eq!(
        crm.calls.load(Ordering::SeqCst),
        1,
        "no call while the CRM asked to wait"
    );
    assert_eq!(paused.pending, 2);
}

#[tokio::test]
async fn replay_changes_nothing_that_is_already_right_and_resend_never_duplicates() {
    let world = World::new().await;
    world.insert(&many_rows(5, 2)).await;
    let sink = Arc::new(MemorySink::default());
    world.poll_with(&world.settings(), sink.clone()).await;
    let built = build_pipeline(&world.settings()).unwrap();
    let p = built.with_sink(sink.clone());
    let since = time::OffsetDateTime::now_utc() - time::Duration::hours(1);

    let replay = p
        .poll_with(
            PollMode {
                since: Some(since),
                ignore_handled: true,
                resend: false,
                sink: None,
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(replay.rows_read, 5);
    assert_eq!(replay.records_sent, 0);
    assert_eq!(replay.unchanged, 5);

    let resend = p
        .poll_with(
            PollMode {
                since: Some(since),
                ignore_handled: true,
                resend: true,
                sink: None,
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(resend.records_sent, 5, "{resend:?}");
    assert_eq!(
        sink.records.lock().unwrap().len(),
        5,
        "one record per customer"
    );
}

#[tokio::test]
async fn the_daemon_survives_azurite_going_down_mid_run_and_loses_no_row() {
    let mut world = World::new().await;
    world.insert(&many_rows(20, 3)).await;
    let settings = world.settings();
    let cancel = CancellationToken::new();
    let daemon = {
        let (settings, cancel) = (settings.clone(), cancel.clone());
        tokio::spawn(
            async move { leadsync::run(&settings, RunOptions { once: false }, cancel).await },
        )
    };
    async fn wait_for(n: usize, world: &World) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while world.delivered_keys().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {n} leads"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_for(20, &world).await;

    world.azurite.stop();
    tokio::time::sleep(Duration::from_millis(800)).await; // polls fail meanwhile
    world.azurite.restart().expect("restart Azurite");
    let more: Vec<_> = (20..30)
        .map(|i| {
            lead_row(
                "p09",
                &format!("late{i}"),
                "AzureMarketplace-INS | a.b",
                customer(i),
            )
        })
        .collect();
    world.insert(&more).await;
    wait_for(30, &world).await;
    cancel.cancel();
    let report = daemon.await.unwrap().unwrap();

    assert!(report.failed_polls >= 1, "the outage was seen");
    let keys = world.delivered_keys();
    let unique: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!((keys.len(), unique.len()), (30, 30), "every row once");
}
