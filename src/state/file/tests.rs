use super::codec::*;
use super::*;
use crate::state::{Settled, Settlement};
use crate::timestamp::parse;
use serde_json::Map;

fn version(rk: &str, etag: &str, ts: &str) -> RowVersion {
    RowVersion {
        id: RowId::new("p", rk),
        etag: etag.into(),
        timestamp: parse(ts).unwrap(),
    }
}

fn delivered(row: RowVersion) -> Settlement {
    Settlement {
        row,
        outcome: Settled::Delivered {
            sink: "jsonl".into(),
        },
        columns: None,
    }
}

/// Skipped by the test-lead policy: an outcome the store remembers as handled.
fn skipped(row: RowVersion) -> Settlement {
    Settlement {
        row,
        outcome: Settled::Skipped {
            policy: "test_lead".into(),
        },
        columns: Some(Map::new()),
    }
}

#[tokio::test]
async fn delivered_rows_are_left_to_their_customers_history_and_the_rest_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let rows: Vec<RowVersion> = ["d", "s", "r", "u"]
        .iter()
        .map(|rk| version(rk, "W/1", "2024-05-01T10:00:00Z"))
        .collect();
    let outcome = |row: &RowVersion, outcome: Settled| Settlement {
        row: row.clone(),
        outcome,
        columns: Some(Map::new()),
    };
    store
        .settle(&SettleBatch::rows(vec![
            delivered(rows[0].clone()),
            skipped(rows[1].clone()),
            outcome(
                &rows[2],
                Settled::Rejected {
                    reason: "no CustomerInfo".into(),
                },
            ),
            outcome(
                &rows[3],
                Settled::Unidentifiable {
                    reason: "no email".into(),
                },
            ),
        ]))
        .await
        .unwrap();
    assert_eq!(
        store.handled(&rows).await.unwrap(),
        vec![false, true, true, true]
    );
    assert_eq!(store.handled_len().await.unwrap(), 3);
}

#[tokio::test]
async fn a_new_file_is_in_redbs_v3_format_and_an_earlier_one_is_upgraded_keeping_its_state() {
    // Is the file in `dir` in redb's newest format already? (`upgrade` says, and
    // upgrades it if not.)
    let is_v3 = |dir: &Path| {
        let mut db = Database::create(dir.join(RedbStore::FILE_NAME)).unwrap();
        !db.upgrade().unwrap()
    };
    // A file as leadsync wrote it before: redb's default format, with a checkpoint.
    let checkpoint = parse("2024-05-01T10:00:00Z").unwrap();
    let earlier = || {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join(RedbStore::FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        let record = CheckpointRecord {
            version: CHECKPOINT_VERSION,
            timestamp: checkpoint,
        };
        txn.open_table(META)
            .unwrap()
            .insert(CHECKPOINT_KEY, encode(&record).as_slice())
            .unwrap();
        txn.commit().unwrap();
        dir
    };
    assert!(!is_v3(earlier().path()), "redb's default is still v2");
    let (new, earlier) = (tempfile::tempdir().unwrap(), earlier());

    drop(RedbStore::open(new.path()).unwrap());
    let store = RedbStore::open(earlier.path()).unwrap();
    let read = store.checkpoint().await.unwrap();
    drop(store);

    assert!(is_v3(new.path()));
    assert!(is_v3(earlier.path()));
    assert_eq!(read, Some(checkpoint));
}

#[tokio::test]
async fn the_checkpoint_survives_reopening_at_full_precision() {
    let dir = tempfile::tempdir().unwrap();
    let t = parse("2024-05-01T10:00:00.1234567Z").unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(store.checkpoint().await.unwrap(), None);
        store.set_checkpoint(t).await.unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(store.checkpoint().await.unwrap(), Some(t));
}

#[tokio::test]
async fn a_row_is_handled_only_at_the_etag_it_was_settled_with() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let v1 = version("r", "W/1", "2024-05-01T10:00:00Z");
    store
        .settle(&SettleBatch::rows(vec![skipped(v1.clone())]))
        .await
        .unwrap();
    let v2 = version("r", "W/2", "2024-05-01T11:00:00Z");
    let other = version("s", "W/1", "2024-05-01T10:00:00Z");
    assert_eq!(
        store.handled(&[v1, v2, other]).await.unwrap(),
        vec![true, false, false]
    );
}

#[tokio::test]
async fn pruning_forgets_only_rows_stamped_before_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let old = version("old", "e", "2024-05-01T09:00:00Z");
    let edge = version("edge", "e", "2024-05-01T10:00:00.0000001Z");
    store
        .settle(&SettleBatch::rows(vec![
            skipped(old.clone()),
            skipped(edge.clone()),
        ]))
        .await
        .unwrap();
    let pruned = store
        .prune_handled(parse("2024-05-01T10:00:00.0000001Z").unwrap())
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    assert_eq!(
        store.handled(&[old, edge]).await.unwrap(),
        vec![false, true]
    );
    assert_eq!(store.handled_len().await.unwrap(), 1);
}

#[tokio::test]
async fn a_rejected_row_keeps_its_reason_until_a_later_version_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let v1 = version("r", "W/1", "2024-05-01T10:00:00Z");
    store
        .settle(&SettleBatch::rows(vec![Settlement {
            row: v1,
            outcome: Settled::Rejected {
                reason: "CustomerInfo is not valid JSON".into(),
            },
            columns: Some(Map::new()),
        }]))
        .await
        .unwrap();
    let rejected = store.rejected().await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert!(
        matches!(&rejected[0].outcome, Settled::Rejected { reason } if reason.contains("JSON"))
    );

    store
        .settle(&SettleBatch::rows(vec![delivered(version(
            "r",
            "W/2",
            "2024-05-01T11:00:00Z",
        ))]))
        .await
        .unwrap();
    assert!(store.rejected().await.unwrap().is_empty());
}

/// Each list is cleared of a batch's rows either way: read once when it is no
/// longer than the batch, searched per row when it is longer.
#[tokio::test]
async fn a_row_is_listed_only_where_its_latest_version_settled() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let rejected = |row: RowVersion| Settlement {
        row,
        outcome: Settled::Rejected {
            reason: "no CustomerInfo".into(),
        },
        columns: Some(Map::new()),
    };
    let at = |rk: &str, n: u32| version(rk, &format!("W/{n}"), &format!("2024-05-01T1{n}:00:00Z"));
    let listed = |rows: Vec<RecordedRow>| -> Vec<String> {
        rows.into_iter().map(|r| r.row.id.row_key).collect()
    };
    store
        .settle(&SettleBatch::rows(vec![
            rejected(at("a", 1)),
            rejected(at("b", 1)),
            rejected(at("c", 1)),
            skipped(at("d", 1)),
        ]))
        .await
        .unwrap();
    // One row: the rejected list (3) is longer than the batch, the skipped one (1) is not.
    store
        .settle(&SettleBatch::rows(vec![skipped(at("a", 2))]))
        .await
        .unwrap();
    assert_eq!(listed(store.rejected().await.unwrap()), ["b", "c"]);
    assert_eq!(listed(store.skipped().await.unwrap()), ["a", "d"]);
    // Two versions of "e" in one batch: the second decides.
    store
        .settle(&SettleBatch::rows(vec![
            delivered(at("b", 3)),
            rejected(at("d", 3)),
            skipped(at("e", 3)),
            rejected(at("e", 4)),
        ]))
        .await
        .unwrap();
    assert_eq!(listed(store.rejected().await.unwrap()), ["c", "d", "e"]);
    assert_eq!(listed(store.skipped().await.unwrap()), ["a"]);
    let e = store.rejected().await.unwrap().pop().unwrap();
    assert_eq!(e.row.etag, "W/4");
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let _first = RedbStore::open(dir.path()).unwrap();
    let second = RedbStore::open(dir.path()).unwrap_err();
    assert!(second.to_string().contains("another leadsync"), "{second}");
}

fn a_customer() -> CustomerState {
    customer_named("ana")
}

/// A customer `name`@fabrikam.com with one lead.
fn customer_named(name: &str) -> CustomerState {
    use crate::identity::CustomerKey;
    use crate::identity::IdentitySettings;
    let email = format!("{name}@fabrikam.com");
    let info = serde_json::json!({ "FirstName": "Ana", "Email": email }).to_string();
    let row = crate::source::row::RawRow {
        id: RowId::new("p", "r1"),
        etag: "W/1".into(),
        timestamp: parse("2024-05-01T10:00:00.1234567Z").unwrap(),
        columns: serde_json::json!({
            "LeadSource": "AppSource-INS|contoso.analytics",
            "CustomerInfo": info,
        })
        .as_object()
        .unwrap()
        .clone(),
    };
    let event = crate::lead::normalise(&row).unwrap();
    let settings = IdentitySettings::default();
    let mut customer = CustomerState::new(&CustomerKey::Email(email), &settings);
    customer.apply([&event], &settings);
    customer
}

#[tokio::test]
async fn a_customer_read_back_has_its_summary_rebuilt_with_the_configured_template() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path())
        .unwrap()
        .with_summary_template("{name}, from the file");
    let customer = a_customer();
    let mut batch = SettleBatch::rows(vec![]);
    batch.customers.push(customer.clone());
    store.settle(&batch).await.unwrap();
    let keys = [customer.lead.key.clone()];
    let read = store.customers(&keys).await.unwrap().remove(0).unwrap();
    assert_eq!(read.lead.summary, "Ana, from the file");
    let all = store.all_customers().await.unwrap();
    assert_eq!(all[0].lead.summary, "Ana, from the file");
}

#[tokio::test]
async fn customers_written_compactly_or_as_json_by_an_earlier_version_both_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let customer = a_customer();
    let mut batch = SettleBatch::rows(vec![]);
    batch.customers.push(customer.clone());
    store.settle(&batch).await.unwrap();
    // And the same record under other keys, as earlier versions wrote it: JSON, and
    // the first compact form, in the string-keyed table of those versions, which the
    // next open moves.
    let mut old = customer.clone();
    old.lead.key = "email:old@fabrikam.com".into();
    let mut compact = customer.clone();
    compact.lead.key = "email:compact@fabrikam.com".into();
    let mut with_text = customer.clone();
    with_text.lead.key = "email:text@fabrikam.com".into();
    {
        let txn = store.db.begin_write().unwrap();
        // The form before the summary's hash, with its text.
        txn.open_table(CUSTOMERS)
            .unwrap()
            .insert(
                with_text.lead.key.as_bytes(),
                with_text.write_stored_with_text(vec![STORED]).as_slice(),
            )
            .unwrap();
        let mut table = txn.open_table(CUSTOMERS_STR).unwrap();
        table
            .insert(old.lead.key.as_str(), encode(&old).as_slice())
            .unwrap();
        table
            .insert(
                compact.lead.key.as_str(),
                encode_compact(&compact).as_slice(),
            )
            .unwrap();
        drop(table);
        txn.commit().unwrap();
    }
    drop(store);
    let store = RedbStore::open(dir.path()).unwrap();
    let keys = [
        customer.lead.key.clone(),
        old.lead.key.clone(),
        compact.lead.key.clone(),
        with_text.lead.key.clone(),
        "email:none".into(),
    ];
    let read = store.customers(&keys).await.unwrap();
    assert_eq!(
        read,
        vec![
            Some(customer.clone()),
            Some(old),
            Some(compact),
            Some(with_text),
            None
        ]
    );
    let mut all = store.all_customers().await.unwrap();
    all.sort_by(|a, b| a.lead.key.cmp(&b.lead.key));
    assert_eq!(all.len(), 4);
    assert!(all.contains(&customer));
    assert!(all.iter().all(|c| c.lead.history == customer.lead.history));
    assert!(all.iter().all(|c| c.lead.summary == customer.lead.summary));

    // Each form is a fraction of the one before.
    let hashed = customer.write_stored(vec![SUMMARY_HASHED]).len();
    let stored = customer.write_stored_with_text(vec![STORED]).len();
    let compact = encode_compact(&customer).len();
    let json = encode(&customer).len();
    assert!(compact * 3 < json * 2, "compact {compact} B, JSON {json} B");
    assert!(
        stored * 4 < compact * 3,
        "stored {stored} B, compact {compact} B"
    );
    assert!(
        hashed + customer.lead.summary.len() <= stored + 10,
        "hashed {hashed} B, with the text {stored} B"
    );
}

#[tokio::test]
async fn handled_rows_in_every_form_are_recognised_with_their_etag() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let ts = "2024-05-01T10:00:00.1234567Z";
    let standard = crate::source::row::standard_etag(parse(ts).unwrap());
    let rows = [
        version("standard", &standard, ts),
        version("other", "W/\"opaque-1\"", ts),
    ];
    store
        .settle(&SettleBatch::rows(
            rows.iter().cloned().map(skipped).collect(),
        ))
        .await
        .unwrap();
    // As the first compact form and as JSON wrote them, in the string-keyed table of
    // those versions, which the next open moves.
    let earlier = [
        version("compact", &standard, ts),
        version("json", "W/\"j\"", ts),
    ];
    {
        let txn = store.db.begin_write().unwrap();
        let mut table = txn.open_table(HANDLED_STR).unwrap();
        let record = |r: &RowVersion| HandledRecord {
            etag: r.etag.clone(),
            timestamp: r.timestamp,
        };
        let compact = encode_compact(&record(&earlier[0]));
        let json = encode(&record(&earlier[1]));
        table.insert(("p", "compact"), compact.as_slice()).unwrap();
        table.insert(("p", "json"), json.as_slice()).unwrap();
        drop(table);
        txn.commit().unwrap();
    }
    drop(store);
    let store = RedbStore::open(dir.path()).unwrap();
    let all: Vec<RowVersion> = rows.iter().chain(&earlier).cloned().collect();
    assert_eq!(store.handled(&all).await.unwrap(), vec![true; 4]);
    // Another version of the same rows is not handled.
    let changed: Vec<RowVersion> = all
        .iter()
        .map(|r| RowVersion {
            etag: crate::source::row::standard_etag(parse("2024-05-01T10:00:00.1234568Z").unwrap()),
            ..r.clone()
        })
        .collect();
    assert_eq!(store.handled(&changed).await.unwrap(), vec![false; 4]);
    // The standard ETag is left out of the record.
    assert!(encode_handled(&rows[0]).len() <= 12);
    // All four forms carry their Timestamp for pruning.
    let cutoff = parse("2024-05-01T10:00:01Z").unwrap();
    assert_eq!(store.prune_handled(cutoff).await.unwrap(), 4);
}

#[tokio::test]
async fn a_state_file_with_string_keys_is_moved_to_byte_keys_in_steps_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let customer = a_customer();
    let ts = "2024-05-01T10:00:00.1234567Z";
    let rows: Vec<RowVersion> = (0..25)
        .map(|i| version(&format!("r{i:02}"), &format!("W/\"e{i}\""), ts))
        .collect();
    let keys: Vec<String> = (0..25).map(|i| format!("email:c{i:02}@f.com")).collect();
    // As a version before byte keys left it, except that a crash stopped its upgrade
    // after the first step: the first 5 of each are already in the new tables.
    {
        let txn = store.db.begin_write().unwrap();
        {
            let mut old_customers = txn.open_table(CUSTOMERS_STR).unwrap();
            let mut old_handled = txn.open_table(HANDLED_STR).unwrap();
            let mut customers = txn.open_table(CUSTOMERS).unwrap();
            let mut handled = txn.open_table(HANDLED).unwrap();
            for (i, (key, row)) in keys.iter().zip(&rows).enumerate() {
                let record = customer.write_stored(vec![SUMMARY_HASHED]);
                let done = encode_handled(row);
                if i < 5 {
                    customers.insert(key.as_bytes(), record.as_slice()).unwrap();
                    handled
                        .insert(("p".as_bytes(), row.id.row_key.as_bytes()), done.as_slice())
                        .unwrap();
                } else {
                    old_customers
                        .insert(key.as_str(), record.as_slice())
                        .unwrap();
                    old_handled
                        .insert(("p", row.id.row_key.as_str()), done.as_slice())
                        .unwrap();
                }
            }
        }
        txn.commit().unwrap();
    }
    // 20 + 20 records left, moved 4 of each per transaction.
    assert_eq!(store.move_string_keyed(4).unwrap(), 40);
    assert_eq!(store.move_string_keyed(4).unwrap(), 0);
    let tables: Vec<String> = store
        .db
        .begin_read()
        .unwrap()
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    assert!(
        !tables.iter().any(|t| t == "customers" || t == "handled"),
        "{tables:?}"
    );
    assert_eq!(store.handled_len().await.unwrap(), 25);
    assert_eq!(store.handled(&rows).await.unwrap(), vec![true; 25]);
    let read = store.customers(&keys).await.unwrap();
    assert!(read
        .iter()
        .all(|c| c.as_ref().map(|c| &c.lead.history) == Some(&customer.lead.history)));
    assert_eq!(store.all_customers().await.unwrap().len(), 25);
}

#[tokio::test]
async fn a_record_in_an_unknown_format_is_an_error_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    {
        let txn = store.db.begin_write().unwrap();
        txn.open_table(CUSTOMERS)
            .unwrap()
            .insert("email:x@y.z".as_bytes(), [9u8, 1, 2].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = store.customers(&["email:x@y.z".into()]).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("email:x@y.z") && text.contains("unknown record format"),
        "{text}"
    );
}

#[tokio::test]
async fn pruning_in_small_steps_forgets_exactly_the_old_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let rows: Vec<Settlement> = (0..25)
        .map(|i| {
            let ts = if i % 3 == 0 {
                "2024-05-01T09:00:00Z"
            } else {
                "2024-05-01T11:00:00Z"
            };
            skipped(version(&format!("r{i:02}"), "e", ts))
        })
        .collect();
    store.settle(&SettleBatch::rows(rows)).await.unwrap();
    let cutoff = parse("2024-05-01T10:00:00Z").unwrap();
    // Steps of 4 records: 7 transactions, old rows on both sides of every boundary.
    let pruned = store.prune_handled_in_steps(cutoff, 4).unwrap();
    assert_eq!(pruned, 9);
    assert_eq!(store.handled_len().await.unwrap(), 16);
    let kept = store
        .handled(&[
            version("r00", "e", "2024-05-01T09:00:00Z"),
            version("r01", "e", "2024-05-01T11:00:00Z"),
            version("r24", "e", "2024-05-01T09:00:00Z"),
            version("r23", "e", "2024-05-01T11:00:00Z"),
        ])
        .await
        .unwrap();
    assert_eq!(kept, vec![false, true, false, true]);
    assert_eq!(store.prune_handled_in_steps(cutoff, 4).unwrap(), 0);
}

#[tokio::test]
async fn pruning_that_finds_nothing_old_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let rows: Vec<Settlement> = (0..6)
        .map(|i| skipped(version(&format!("r{i}"), "e", "2024-05-01T11:00:00Z")))
        .collect();
    store.settle(&SettleBatch::rows(rows)).await.unwrap();
    let file = dir.path().join(RedbStore::FILE_NAME);
    let before = std::fs::read(&file).unwrap();
    // Every row is newer than the cutoff; steps of 4: three transactions look (4, 2 and
    // no rows), none commits.
    let cutoff = parse("2024-05-01T10:00:00Z").unwrap();
    assert_eq!(store.prune_handled_in_steps(cutoff, 4).unwrap(), 0);
    assert!(
        std::fs::read(&file).unwrap() == before,
        "a prune that removed nothing changed the state file"
    );
    assert_eq!(store.handled_len().await.unwrap(), 6);
    // One row old enough: its step commits, and the file changes.
    store
        .settle(&SettleBatch::rows(vec![skipped(version(
            "r9",
            "e",
            "2024-05-01T09:00:00Z",
        ))]))
        .await
        .unwrap();
    let before = std::fs::read(&file).unwrap();
    assert_eq!(store.prune_handled_in_steps(cutoff, 4).unwrap(), 1);
    assert!(std::fs::read(&file).unwrap() != before);
    assert_eq!(store.handled_len().await.unwrap(), 6);
}
