//! The delivery window: the merged pages of a poll whose customers have not gone to the
//! sink yet.

use std::collections::HashMap;

use time::OffsetDateTime;

use super::page::Merged;
use super::{settle_all, Delivery, PollSummary};
use crate::identity::CustomerState;
use crate::state::{Settled, Settlement};

/// Pages merged into the delivery window before a flush: at most this many (the
/// default of [`Pipeline::window_pages`](super::Pipeline::window_pages)). A 10,000-row backfill (ten pages) is one
/// window.
pub const WINDOW_PAGES: u32 = 16;
/// ... and at most about this many bytes of customer records
/// ([`CustomerState::memory_bytes`]; the page that crosses it is in): the bench's
/// 10,000-row backfill (3,333 customers of three events, about 3.4 KB each, 10.5 MiB) is
/// still one window, and the bench's 100k rows go five pages (about 5,000 customers) to
/// a window instead of sixteen. The process holds about four times a window's records
/// at its peak: the window's rows and index beside them, and the last window's batch
/// and its write transaction while they are committed (bench/results/history.md,
/// *Delivery window memory*).
pub(super) const WINDOW_BYTES: usize = 12 << 20;

/// What a customer record in the window takes in memory.
fn record_bytes(customer: &CustomerState) -> usize {
    customer.memory_bytes()
}

/// The delivery window of a poll: the merged pages whose customers have not gone to
/// the sink yet. A customer whose rows span its pages is merged once with all of them
/// and sent once, at the flush, instead of once per page. The window is flushed (its
/// customers delivered, then its outcomes committed) when it holds
/// [`WINDOW_PAGES`] pages or [`WINDOW_BYTES`] of customer records, and at the poll's
/// last page; at its edge a customer whose rows fall on both sides is sent once per
/// window. Nothing of it is committed before its flush, so a crash or a stop before
/// then costs re-reading these pages, never a lead.
#[derive(Default)]
pub(super) struct Window {
    settlements: Vec<Settlement>,
    entries: Vec<Windowed>,
    /// Customer key -> its entry.
    index: HashMap<String, usize>,
    newest_settled: Option<OffsetDateTime>,
    pub(super) pages: u32,
    bytes: usize,
}

/// A customer of the window: to deliver, or to store without a delivery (do-not-contact).
enum Windowed {
    Deliver(Delivery),
    Store(CustomerState),
}

impl Windowed {
    fn customer(&self) -> &CustomerState {
        match self {
            Windowed::Deliver(d) => &d.customer,
            Windowed::Store(c) => c,
        }
    }
}

impl Window {
    /// The customers in the window.
    pub(super) fn customers(&self) -> usize {
        self.entries.len()
    }

    /// The window's record of `key`, newer than the store's and the committing batch's.
    pub(super) fn customer(&self, key: &str) -> Option<&CustomerState> {
        self.index.get(key).map(|&i| self.entries[i].customer())
    }

    pub(super) fn full(&self, pages: u32) -> bool {
        self.pages >= pages.max(1) || self.bytes >= WINDOW_BYTES
    }

    /// Adds a merged page. A customer already in the window is replaced by its newer
    /// record (merged from the window's), keeping the rows both carry.
    pub(super) fn absorb(&mut self, merged: Merged, summary: &mut PollSummary) {
        self.pages += 1;
        self.newest_settled = self.newest_settled.max(merged.newest_settled);
        self.settlements.extend(merged.settlements);
        for delivery in merged.deliveries {
            let key = delivery.customer.lead.key.clone();
            self.bytes += record_bytes(&delivery.customer);
            match self.index.get(&key) {
                Some(&i) => {
                    let old = std::mem::replace(&mut self.entries[i], Windowed::Deliver(delivery));
                    self.bytes = self.bytes.saturating_sub(record_bytes(old.customer()));
                    if let (Windowed::Deliver(old), Windowed::Deliver(new)) =
                        (old, &mut self.entries[i])
                    {
                        let mut rows = old.rows;
                        rows.append(&mut new.rows);
                        new.rows = rows;
                    }
                }
                None => {
                    self.index.insert(key, self.entries.len());
                    self.entries.push(Windowed::Deliver(delivery));
                }
            }
        }
        for customer in merged.to_store {
            let key = customer.lead.key.clone();
            self.bytes += record_bytes(&customer);
            match self.index.get(&key) {
                Some(&i) => {
                    let old = std::mem::replace(&mut self.entries[i], Windowed::Store(customer));
                    self.bytes = self.bytes.saturating_sub(record_bytes(old.customer()));
                    // Not delivered yet, and do-not-contact now: its earlier rows are
                    // skipped by the same policy.
                    if let Windowed::Deliver(old) = old {
                        summary.skipped += old.rows.len() as u64;
                        settle_all(
                            old.rows.into_iter(),
                            Settled::Skipped {
                                policy: "do_not_contact".into(),
                            },
                            &mut self.settlements,
                        );
                    }
                }
                None => {
                    self.index.insert(key, self.entries.len());
                    self.entries.push(Windowed::Store(customer));
                }
            }
        }
    }

    /// Empties the window into one merged batch.
    pub(super) fn take(&mut self) -> Merged {
        let window = std::mem::take(self);
        let mut to_store = Vec::new();
        let mut deliveries = Vec::with_capacity(window.entries.len());
        for entry in window.entries {
            match entry {
                Windowed::Deliver(d) => deliveries.push(d),
                Windowed::Store(c) => to_store.push(c),
            }
        }
        Merged {
            settlements: window.settlements,
            to_store,
            deliveries,
            newest_settled: window.newest_settled,
        }
    }
}
