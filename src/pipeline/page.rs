//! The first two steps of a page: drop the rows already handled and apply the row
//! policies (`prepare`), then merge each customer's leads into its newest record
//! (`merge`).

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::window::Window;
use super::{as_map, settle_all, version, Delivery, Pipeline, PollError, PollMode, PollSummary};
use crate::identity::{customer_key, CustomerKey, CustomerState, Unidentifiable};
use crate::lead::{LeadEvent, Rejection};
use crate::pipeline::policy::{DoNotContactPolicy, TestLeadPolicy};
use crate::source::row::RawRow;
use crate::source::{MalformedEntity, SourceError};
use crate::state::{RowVersion, SettleBatch, Settled, Settlement};

/// A page after [`Pipeline::prepare`].
pub(super) struct Prepared {
    /// Rows already settled by policy (rejected, test lead, unidentifiable).
    settlements: Vec<Settlement>,
    by_customer: BTreeMap<CustomerKey, Vec<(RowVersion, LeadEvent)>>,
    /// The newest Timestamp of the rows skipped as already handled.
    newest_settled: Option<OffsetDateTime>,
}

/// A page after [`Pipeline::merge`].
pub(super) struct Merged {
    pub(super) settlements: Vec<Settlement>,
    /// Customers stored without a delivery (do-not-contact, skipped).
    pub(super) to_store: Vec<CustomerState>,
    pub(super) deliveries: Vec<Delivery>,
    pub(super) newest_settled: Option<OffsetDateTime>,
}

/// A row not handled before, sorted: a lead of a customer, or settled by a row policy.
// Short-lived: each value is moved into its list at once; boxing would allocate per row.
#[allow(clippy::large_enum_variant)]
enum Sorted {
    Lead(CustomerKey, RowVersion, LeadEvent),
    Settled(Settlement),
}

impl Pipeline {
    /// First half of a page: drops rows already handled, takes each row's normalised
    /// event (`events`, one per row, made by the fetch task), applies the row policies
    /// and groups the leads by customer. Reads no customer state, so it can run
    /// while the previous page is being committed.
    pub(super) async fn prepare(
        &self,
        rows: Vec<RawRow>,
        events: Vec<Result<LeadEvent, Rejection>>,
        malformed: Vec<MalformedEntity>,
        mode: PollMode,
        summary: &mut PollSummary,
    ) -> Result<Prepared, PollError> {
        let mut versions: Vec<RowVersion> = rows.iter().map(version).collect();
        let malformed = self.malformed_versions(malformed)?;
        versions.extend(malformed.iter().map(|(v, _)| v.clone()));
        let mut handled = if mode.ignore_handled {
            vec![false; versions.len()]
        } else {
            self.state.handled(&versions).await?
        };
        let malformed_handled = handled.split_off(rows.len());
        versions.truncate(rows.len());
        let mut newest_settled = None;
        let mut settlements = Vec::new();
        for ((version, entity), done) in malformed.into_iter().zip(malformed_handled) {
            match done {
                true => {
                    summary.already_handled += 1;
                    newest_settled = newest_settled.max(Some(version.timestamp));
                }
                false => settlements.push(reject_malformed(version, entity, summary)),
            }
        }
        let mut by_customer: BTreeMap<CustomerKey, Vec<(RowVersion, LeadEvent)>> = BTreeMap::new();

        for (((row, event), version), done) in
            rows.into_iter().zip(events).zip(versions).zip(handled)
        {
            if done {
                summary.already_handled += 1;
                newest_settled = newest_settled.max(Some(version.timestamp));
                continue;
            }
            match self.sort_row(row, event, version, summary) {
                Sorted::Lead(key, version, event) => {
                    by_customer.entry(key).or_default().push((version, event))
                }
                Sorted::Settled(settlement) => settlements.push(settlement),
            }
        }

        Ok(Prepared {
            settlements,
            by_customer,
            newest_settled,
        })
    }

    /// One row not handled before: its customer and event, or its settlement by a row
    /// policy (cannot become a lead, a marketplace test lead, no customer key).
    fn sort_row(
        &self,
        row: RawRow,
        event: Result<LeadEvent, Rejection>,
        version: RowVersion,
        summary: &mut PollSummary,
    ) -> Sorted {
        let event = match event {
            Ok(event) => event,
            Err(rejection) => {
                tracing::warn!(row = %row.id, reason = %rejection.reason, "Row rejected: it cannot become a lead.");
                summary.rejected += 1;
                return Sorted::Settled(Settlement {
                    row: version,
                    outcome: Settled::Rejected {
                        reason: rejection.to_string(),
                    },
                    columns: Some(row.columns),
                });
            }
        };
        if event.test_lead {
            self.memory.metrics.saw_test_lead(&event.row);
        }
        if event.test_lead && self.policy.test_leads == TestLeadPolicy::Skip {
            tracing::info!(
                row = %event.row,
                "Marketplace test lead received: the marketplace can write to this table. Not delivered (policy.test_leads = \"skip\")."
            );
            summary.skipped += 1;
            return Sorted::Settled(Settlement {
                row: version,
                outcome: Settled::Skipped {
                    policy: "test_lead".into(),
                },
                columns: Some(row.columns),
            });
        }
        match customer_key(&event.customer, self.identity.fallback) {
            Ok(key) => Sorted::Lead(key, version, event),
            Err(Unidentifiable(reason)) => {
                tracing::warn!(row = %event.row, %reason, "Lead held: it cannot be attributed to a customer.");
                summary.unidentifiable += 1;
                Sorted::Settled(Settlement {
                    row: version,
                    outcome: Settled::Unidentifiable { reason },
                    columns: as_map(&event),
                })
            }
        }
    }

    /// The version each malformed entity is settled at. An entity without its keys
    /// cannot be recorded or retried by anyone: the table service never returns one,
    /// so it fails the poll, as a storage fault would.
    fn malformed_versions(
        &self,
        malformed: Vec<MalformedEntity>,
    ) -> Result<Vec<(RowVersion, MalformedEntity)>, PollError> {
        malformed
            .into_iter()
            .map(
                |entity| match (&entity.id, &entity.etag, entity.timestamp) {
                    (Some(id), Some(etag), Some(timestamp)) => Ok((
                        RowVersion {
                            id: id.clone(),
                            etag: etag.clone(),
                            timestamp,
                        },
                        entity,
                    )),
                    _ => Err(PollError::Source(SourceError::Malformed {
                        table: self.source.table_name().to_owned(),
                        row: entity
                            .id
                            .as_ref()
                            .map_or_else(|| "(no keys)".to_owned(), ToString::to_string),
                        message: format!("{}; its system columns cannot be read", entity.message),
                    })),
                },
            )
            .collect()
    }

    /// Second step of a page: merges each customer's leads into its stored record.
    /// `committing` is the previous page's batch, whose commit may still be running:
    /// its customers are newer than what the store returns.
    pub(super) async fn merge(
        &self,
        prepared: Prepared,
        committing: Option<&SettleBatch>,
        window: &Window,
        mode: PollMode,
        summary: &mut PollSummary,
    ) -> Result<Merged, PollError> {
        let Prepared {
            mut settlements,
            by_customer,
            mut newest_settled,
        } = prepared;
        let keys: Vec<String> = by_customer.keys().map(CustomerKey::as_string).collect();
        let (stored, windowed) = self.newest_records(&keys, committing, window).await?;
        let mut to_store = Vec::new();
        // A page's customers are almost all delivered: their records (a kilobyte each)
        // are not copied again and again as the vector grows.
        let mut deliveries = Vec::with_capacity(by_customer.len());
        for (((key, mut items), stored), windowed) in
            by_customer.into_iter().zip(stored).zip(windowed)
        {
            let mut customer = stored.unwrap_or_else(|| CustomerState::new(&key, &self.identity));
            // A record some sinks have and others not yet (`acked`) is pending: its rows
            // read again are what the other sinks still need, not handled ones.
            if customer.delivered
                && customer.acked.is_empty()
                && !mode.ignore_handled
                && !keep_unseen(&customer, &mut items, &mut newest_settled, summary)
            {
                continue;
            }
            let changed = customer.apply(items.iter().map(|(_, e)| e), &self.identity);
            let rows = items.into_iter().map(|(v, _)| v);
            if customer.delivered
                && customer.acked.is_empty()
                && !changed
                && !mode.resend
                && !windowed
            {
                // A replay of events already merged and delivered: nothing to send.
                let before = settlements.len();
                settle_all(rows, self.delivered(), &mut settlements);
                summary.unchanged += (settlements.len() - before) as u64;
                continue;
            }
            // Never create a contactable record for a do-not-contact customer; one already in
            // the CRM is updated with the flag set rather than left contactable.
            if customer.lead.do_not_contact
                && !customer.delivered
                && self.policy.do_not_contact == DoNotContactPolicy::Skip
            {
                tracing::info!(customer = %customer.lead.log_key(), "Do-not-contact customer recorded, not delivered (policy.do_not_contact = \"skip\").");
                let before = settlements.len();
                settle_all(
                    rows,
                    Settled::Skipped {
                        policy: "do_not_contact".into(),
                    },
                    &mut settlements,
                );
                summary.skipped += (settlements.len() - before) as u64;
                to_store.push(customer);
                continue;
            }
            deliveries.push(Delivery {
                customer,
                rows: rows.collect(),
            });
        }
        Ok(Merged {
            settlements,
            to_store,
            deliveries,
            newest_settled,
        })
    }

    /// The newest record of each customer (`None`: new), in the order of `keys`, and
    /// whether it is the delivery window's: the window's records are newer than the
    /// committing batch's (`committing`, the last flush, whose commit may still be
    /// running), which are newer than the store's.
    async fn newest_records(
        &self,
        keys: &[String],
        committing: Option<&SettleBatch>,
        window: &Window,
    ) -> Result<(Vec<Option<CustomerState>>, Vec<bool>), PollError> {
        let mut stored = self.state.customers(keys).await?;
        if let Some(batch) = committing.filter(|b| !b.customers.is_empty()) {
            let newer: std::collections::HashMap<&str, &CustomerState> = batch
                .customers
                .iter()
                .map(|c| (c.lead.key.as_str(), c))
                .collect();
            for (key, stored) in keys.iter().zip(stored.iter_mut()) {
                if let Some(c) = newer.get(key.as_str()) {
                    *stored = Some((*c).clone());
                }
            }
        }
        let mut windowed = vec![false; keys.len()];
        for ((key, stored), windowed) in keys.iter().zip(stored.iter_mut()).zip(&mut windowed) {
            if let Some(c) = window.customer(key) {
                *stored = Some(c.clone());
                *windowed = true;
            }
        }
        Ok((stored, windowed))
    }
}

/// An entity that cannot be read as a row is a rejected row, by its keys: the poll goes
/// on, and `leadsync rows rejected` shows it with the entity's text.
fn reject_malformed(
    version: RowVersion,
    entity: MalformedEntity,
    summary: &mut PollSummary,
) -> Settlement {
    tracing::warn!(row = %version.id, reason = %entity.message, "Row rejected: the table returned an entity that cannot be read.");
    summary.rejected += 1;
    let mut columns = serde_json::Map::new();
    columns.insert("entity".into(), serde_json::Value::String(entity.text));
    Settlement {
        row: version,
        outcome: Settled::Rejected {
            reason: format!("malformed entity: {}", entity.message),
        },
        columns: Some(columns),
    }
}

/// Rows read again (the overlap window, or after a crash) whose version the store did
/// not remember as handled: the file store leaves delivered rows to their customers'
/// histories. They are already handled, as a remembered row would be: dropped from
/// `items`, not merged, not counted, not settled again. Whether any row is left.
fn keep_unseen(
    customer: &CustomerState,
    items: &mut Vec<(RowVersion, LeadEvent)>,
    newest_settled: &mut Option<OffsetDateTime>,
    summary: &mut PollSummary,
) -> bool {
    items.retain(|(version, event)| {
        let seen = customer.has_version(event);
        if seen {
            summary.already_handled += 1;
            *newest_settled = (*newest_settled).max(Some(version.timestamp));
        }
        !seen
    });
    !items.is_empty()
}
