//! Marketplace-shaped rows, written through entity-group transactions.
//!
//! Shape: `rows` rows for `rows / 3` customers (each customer about three times: contact
//! me, test drive, install or Azure portal create, days apart), spread in time order over
//! `PARTITIONS` date partitions, three offers, one row in 1,000 a marketplace test lead,
//! one email in seven in mixed case.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use azure_data_tables::prelude::TableClient;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Map, Value};

/// Date partitions of the seeded table.
pub const PARTITIONS: usize = 8;
/// Operations per entity-group transaction (the service's maximum).
const BATCH: usize = 100;
/// Transactions in flight (Azurite's batch rate roughly doubles with 4 partitions at once).
const IN_FLIGHT: usize = 4;

const OFFERS: [(&str, &str); 3] = [
    ("contoso.contoso-analytics", "Contoso Analytics"),
    ("contoso.contoso-backup", "Contoso Backup"),
    ("contoso.contoso-monitor", "Contoso Monitor"),
];
/// (source, action) in the order a customer usually goes through them.
const ACTIONS: [(&str, &str); 4] = [
    ("AppSource (SPZA)", "PLT"),
    ("TestDrive", "StartTestDrive"),
    ("AzureMarketplace", "INS"),
    ("AzurePortal", "Create"),
];

/// How many distinct customers `rows` rows hold.
pub fn customers(rows: usize) -> usize {
    (rows / 3).max(1)
}

/// Row `i` of a table of `rows` rows.
pub fn row(i: usize, rows: usize) -> Map<String, Value> {
    let customers = customers(rows);
    let c = i % customers;
    let step = i / customers;
    let (source, action) = ACTIONS[(c + step) % ACTIONS.len()];
    let (offer, title) = OFFERS[c % OFFERS.len()];
    let day = i * PARTITIONS / rows.max(1);
    let email = if c % 7 == 0 {
        format!("Customer{c}@Fabrikam{}.com", c % 50)
    } else {
        format!("customer{c}@fabrikam{}.com", c % 50)
    };
    let country = ["US", "DE", "GB", "FR", "JP", "BR"][c % 6];
    let job = ["CTO", "Head of Data", "IT Manager", "Developer"][c % 4];
    let mut info = json!({
        "FirstName": format!("First{c}"),
        "LastName": format!("Last{c}"),
        "Email": email,
        "Phone": format!("+1 425 555 {:04}", c % 10_000),
        "Country": country,
        "Company": format!("Fabrikam {}", c % 5_000),
        "Title": job,
    });
    let mut offer_title = title.to_owned();
    let mut description = "Campaigns: ".to_owned();
    if i % 1000 == 999 {
        let marker = format!("MSFT_TEST_{:018}", 636_737_558_587_117_715u64 + i as u64);
        for v in info.as_object_mut().unwrap().values_mut() {
            *v = json!(marker);
        }
        info["Email"] = json!(format!("{marker}@test.com"));
        offer_title = marker.clone();
        description = marker;
    }
    let action_code = if i % 2 == 0 { action } else { "" };
    let created = format!(
        "2024-05-{:02}T{:02}:{:02}:{:02}Z",
        day + 1,
        (i / 3600) % 24,
        (i / 60) % 60,
        i % 60
    );
    let row = json!({
        "PartitionKey": partition_key(day),
        "RowKey": format!("{i:09}"),
        "LeadSource": format!("{source}-{action} | {offer}"),
        "ActionCode": action_code,
        "CustomerInfo": info.to_string(),
        "OfferDisplayName": offer_title,
        "Description": description,
        "CreatedTime": created,
    });
    match row {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

pub fn partition_key(day: usize) -> String {
    format!("2024-05-{:02}", day + 1)
}

/// A partition key and up to 100 of its rows.
type Batch = (String, Vec<Map<String, Value>>);

/// Writes `rows` through entity-group transactions of up to 100 insert-or-replace
/// operations on one partition, 4 in flight, and checks every operation's response (a failed transaction returns Ok
/// with a 4xx inside). Returns how long it took.
pub async fn insert(
    table: &TableClient,
    rows: Vec<Map<String, Value>>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut by_partition: BTreeMap<String, Vec<Map<String, Value>>> = BTreeMap::new();
    for row in rows {
        let pk = row["PartitionKey"]
            .as_str()
            .context("row without PartitionKey")?
            .to_owned();
        by_partition.entry(pk).or_default().push(row);
    }
    // Interleave partitions so the transactions in flight touch different partitions.
    let mut batches: Vec<Vec<Batch>> = Vec::new();
    for (pk, rows) in by_partition {
        let mut rows = rows.into_iter().peekable();
        let mut n = 0;
        while rows.peek().is_some() {
            let chunk: Vec<_> = rows.by_ref().take(BATCH).collect();
            if batches.len() <= n {
                batches.push(Vec::new());
            }
            batches[n].push((pk.clone(), chunk));
            n += 1;
        }
    }
    let batches: Vec<Batch> = batches.into_iter().flatten().collect();
    futures::stream::iter(batches)
        .map(|(pk, chunk)| async move {
            // Insert-or-replace operations, so that a transaction whose answer was lost
            // (Azurite closes idle keep-alive connections after blocking its event loop to
            // save a large table) can be sent again as it is.
            let mut attempt = 0;
            let response = loop {
                attempt += 1;
                let mut transaction = table.partition_key_client(pk.clone()).transaction();
                for entity in &chunk {
                    let rk = entity["RowKey"].as_str().context("row without RowKey")?;
                    transaction = transaction.insert_or_replace(rk, entity)?;
                }
                match transaction.await {
                    Ok(response) => break response,
                    Err(e) if attempt < 5 => {
                        eprintln!("leadsync-bench: transaction on {pk} failed ({e}); sending it again");
                        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let ok = response
                .operation_responses
                .iter()
                .filter(|r| u16::from(r.status_code) / 100 == 2)
                .count();
            if response.operation_responses.len() != chunk.len() || ok != chunk.len() {
                let statuses: Vec<u16> = response
                    .operation_responses
                    .iter()
                    .map(|r| u16::from(r.status_code))
                    .collect();
                bail!(
                    "transaction on partition {pk} failed: {} operations sent, statuses {statuses:?}",
                    chunk.len()
                );
            }
            Ok(())
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    Ok(started.elapsed())
}
