//! Forgetting in the file store: handled rows that left the overlap window, data older
//! than `state.retention`, and one person (`leadsync forget`).

use std::collections::HashSet;

use redb::{ReadableTable, TableDefinition};
use time::OffsetDateTime;

use super::codec::{decode, decode_compact, decode_customer, decode_handled, encode_handled};
use super::{
    io, locked, RedbStore, RetentionCursor, CUSTOMERS, DEAD_LETTERS, HANDLED, REJECTED, SKIPPED,
    UNIDENTIFIABLE,
};
use crate::identity::CustomerState;
use crate::source::row::RowId;
use crate::state::personal::{Forgotten, Person, Pruned, Walk};
use crate::state::{DeadLetter, RecordedRow, StateError};

/// Handled rows looked at per pruning transaction: the dirty pages of one transaction
/// stay in memory until it commits, so pruning a million rows at once would hold them all.
pub(super) const PRUNE_STEP: usize = 10_000;

impl RedbStore {
    /// Forgets handled rows stamped before `before`, looking at `step` records per
    /// write transaction and resuming after the last key of the one before.
    pub(super) fn prune_handled_in_steps(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<usize, StateError> {
        let mut pruned = 0;
        let mut after: Option<(Vec<u8>, Vec<u8>)> = None;
        loop {
            let txn = self.db.begin_write().map_err(io("prune handled rows"))?;
            let mut stale: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut last = None;
            {
                let mut handled = txn.open_table(HANDLED).map_err(io("prune handled rows"))?;
                {
                    let entries = match &after {
                        Some((pk, rk)) => handled.range::<(&[u8], &[u8])>((
                            std::ops::Bound::Excluded((pk.as_slice(), rk.as_slice())),
                            std::ops::Bound::Unbounded,
                        )),
                        None => handled.range::<(&[u8], &[u8])>(..),
                    }
                    .map_err(io("prune handled rows"))?;
                    for entry in entries.take(step) {
                        let (key, value) = entry.map_err(io("prune handled rows"))?;
                        let (pk, rk) = key.value();
                        // An unreadable record is kept: pruning must never cause a re-delivery.
                        let old = decode_handled((pk, rk), value.value())
                            .is_ok_and(|r| r.timestamp < before);
                        if old {
                            stale.push((pk.to_vec(), rk.to_vec()));
                        }
                        last = Some((pk.to_vec(), rk.to_vec()));
                    }
                }
                for (pk, rk) in &stale {
                    handled
                        .remove((pk.as_slice(), rk.as_slice()))
                        .map_err(io("prune handled rows"))?;
                }
            }
            // A step that found nothing to forget (the usual poll) writes nothing: no
            // commit, and none of its fsyncs.
            match stale.is_empty() {
                true => txn.abort().map_err(io("prune handled rows"))?,
                false => txn.commit().map_err(io("prune handled rows"))?,
            }
            pruned += stale.len();
            match last {
                Some(key) => after = Some(key),
                None => return Ok(pruned),
            }
        }
    }
}

/// The three lists of recorded rows, in the order of [`RetentionCursor::lists`].
const LISTS: [TableDefinition<(&str, &str), &[u8]>; 3] = [REJECTED, SKIPPED, UNIDENTIFIABLE];

impl RedbStore {
    /// [`StateStore::forget`], in one transaction.
    pub(super) fn forget_now(&self, person: &Person) -> Result<Forgotten, StateError> {
        const OP: &str = "forget a person";
        let txn = self.db.begin_write().map_err(io(OP))?;
        let mut forgotten = Forgotten::default();
        {
            let mut customers = txn.open_table(CUSTOMERS).map_err(io(OP))?;
            let mut found: Vec<(Vec<u8>, CustomerState)> = Vec::new();
            match &person.key {
                Some(key) => {
                    if let Some(bytes) = customers.get(key.as_bytes()).map_err(io(OP))? {
                        found.push((
                            key.as_bytes().to_vec(),
                            decode_customer(key, bytes.value())?,
                        ));
                    }
                }
                // Only an external key: every customer is looked at.
                None if person.external_key.is_some() => {
                    for entry in customers.iter().map_err(io(OP))? {
                        let (key, value) = entry.map_err(io(OP))?;
                        let text = String::from_utf8_lossy(key.value()).into_owned();
                        let customer = decode_customer(&text, value.value())?;
                        if person.is(&customer.lead) {
                            found.push((key.value().to_vec(), customer));
                        }
                    }
                }
                None => {}
            }
            // The customer's rows are marked handled before it goes (in the same
            // transaction): the file store keeps no marker of a delivered row, its
            // customer's history is the marker.
            let mut handled = txn.open_table(HANDLED).map_err(io(OP))?;
            for (key, customer) in &found {
                for version in crate::state::personal::history_versions(&customer.lead.history) {
                    let row = (
                        version.id.partition_key.as_bytes(),
                        version.id.row_key.as_bytes(),
                    );
                    let newer = match handled.get(row).map_err(io(OP))? {
                        Some(bytes) => decode_handled(row, bytes.value())
                            .is_ok_and(|h| h.timestamp >= version.timestamp),
                        None => false,
                    };
                    if !newer {
                        handled
                            .insert(row, encode_handled(&version).as_slice())
                            .map_err(io(OP))?;
                        forgotten.marked_handled += 1;
                    }
                }
                customers.remove(key.as_slice()).map_err(io(OP))?;
                forgotten.customers.push(customer.lead.log_key());
                forgotten.add_source_rows(customer.lead.history.iter().map(|h| &h.row));
            }
            let mut letters = txn.open_table(DEAD_LETTERS).map_err(io(OP))?;
            let mut gone = Vec::new();
            for entry in letters.iter().map_err(io(OP))? {
                let (key, value) = entry.map_err(io(OP))?;
                let letter: DeadLetter = decode_compact(key.value(), value.value())?;
                if person.is_in_dead_letter(&letter) {
                    forgotten.add_source_rows(letter.rows.iter().map(|r| &r.id));
                    forgotten.dead_letters.push(letter.payload.log_key());
                    gone.push(letter.id);
                }
            }
            for id in &gone {
                letters.remove(id.as_str()).map_err(io(OP))?;
            }
            let rows: HashSet<RowId> = forgotten.source_rows.iter().cloned().collect();
            for (i, list) in LISTS.into_iter().enumerate() {
                let mut table = txn.open_table(list).map_err(io(OP))?;
                let mut gone = Vec::new();
                for entry in table.iter().map_err(io(OP))? {
                    let (key, value) = entry.map_err(io(OP))?;
                    let (pk, rk) = key.value();
                    let row: RecordedRow = decode(&RowId::new(pk, rk).to_string(), value.value())?;
                    if person.is_in_row(&row, &rows) {
                        gone.push(row.row.id);
                    }
                }
                for id in &gone {
                    table
                        .remove((id.partition_key.as_str(), id.row_key.as_str()))
                        .map_err(io(OP))?;
                }
                forgotten.add_source_rows(&gone);
                match i {
                    0 => forgotten.rejected = gone,
                    1 => forgotten.skipped = gone,
                    _ => forgotten.unidentifiable = gone,
                }
            }
        }
        txn.commit().map_err(io(OP))?;
        Ok(forgotten)
    }

    /// [`StateStore::prune_older_than`], in one transaction.
    pub(super) fn prune_older_now(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<Pruned, StateError> {
        const OP: &str = "remove data older than state.retention";
        use std::ops::Bound::{Excluded, Unbounded};
        let mut cursor = locked(&self.retention);
        let txn = self.db.begin_write().map_err(io(OP))?;
        let mut pruned = Pruned::default();
        let mut next = RetentionCursor::default();
        if let Walk::From(after) = &cursor.customers {
            let mut table = txn.open_table(CUSTOMERS).map_err(io(OP))?;
            let mut stale: Vec<Vec<u8>> = Vec::new();
            let mut last = None;
            let mut seen = 0;
            {
                let entries = match after {
                    Some(after) => table.range::<&[u8]>((Excluded(after.as_slice()), Unbounded)),
                    None => table.range::<&[u8]>(..),
                }
                .map_err(io(OP))?;
                for entry in entries.take(step) {
                    let (key, value) = entry.map_err(io(OP))?;
                    seen += 1;
                    let text = String::from_utf8_lossy(key.value()).into_owned();
                    // An unreadable record is kept, for a person to see.
                    if decode_customer(&text, value.value())
                        .is_ok_and(|c| c.lead.last_seen < before)
                    {
                        stale.push(key.value().to_vec());
                    }
                    last = Some(key.value().to_vec());
                }
            }
            for key in &stale {
                table.remove(key.as_slice()).map_err(io(OP))?;
            }
            pruned.customers = stale.len();
            next.customers = Walk::next(seen < step, last);
        } else {
            next.customers = Walk::Done;
        }
        if let Walk::From(after) = &cursor.dead_letters {
            let mut table = txn.open_table(DEAD_LETTERS).map_err(io(OP))?;
            let mut stale: Vec<String> = Vec::new();
            let mut last = None;
            let mut seen = 0;
            {
                let entries = match after {
                    Some(after) => table.range::<&str>((Excluded(after.as_str()), Unbounded)),
                    None => table.range::<&str>(..),
                }
                .map_err(io(OP))?;
                for entry in entries.take(step) {
                    let (key, value) = entry.map_err(io(OP))?;
                    seen += 1;
                    if decode_compact::<DeadLetter>(key.value(), value.value())
                        .is_ok_and(|l| l.at < before)
                    {
                        stale.push(key.value().to_owned());
                    }
                    last = Some(key.value().to_owned());
                }
            }
            for key in &stale {
                table.remove(key.as_str()).map_err(io(OP))?;
            }
            pruned.dead_letters = stale.len();
            next.dead_letters = Walk::next(seen < step, last);
        } else {
            next.dead_letters = Walk::Done;
        }
        for (i, list) in LISTS.into_iter().enumerate() {
            let Walk::From(after) = &cursor.lists[i] else {
                next.lists[i] = Walk::Done;
                continue;
            };
            let mut table = txn.open_table(list).map_err(io(OP))?;
            let mut stale: Vec<(String, String)> = Vec::new();
            let mut last = None;
            let mut seen = 0;
            {
                let entries = match after {
                    Some((pk, rk)) => table
                        .range::<(&str, &str)>((Excluded((pk.as_str(), rk.as_str())), Unbounded)),
                    None => table.range::<(&str, &str)>(..),
                }
                .map_err(io(OP))?;
                for entry in entries.take(step) {
                    let (key, value) = entry.map_err(io(OP))?;
                    seen += 1;
                    let (pk, rk) = key.value();
                    let old = decode::<RecordedRow>(&RowId::new(pk, rk).to_string(), value.value())
                        .is_ok_and(|r| r.row.timestamp < before);
                    if old {
                        stale.push((pk.to_owned(), rk.to_owned()));
                    }
                    last = Some((pk.to_owned(), rk.to_owned()));
                }
            }
            for (pk, rk) in &stale {
                table.remove((pk.as_str(), rk.as_str())).map_err(io(OP))?;
            }
            match i {
                0 => pruned.rejected = stale.len(),
                1 => pruned.skipped = stale.len(),
                _ => pruned.unidentifiable = stale.len(),
            }
            next.lists[i] = Walk::next(seen < step, last);
        }
        // A step that found nothing to remove (the usual poll) writes nothing.
        match pruned.removed() {
            0 => txn.abort().map_err(io(OP))?,
            _ => txn.commit().map_err(io(OP))?,
        }
        pruned.complete = next.round_done();
        *cursor = match pruned.complete {
            true => RetentionCursor::default(),
            false => next,
        };
        Ok(pruned)
    }

    /// Compacts the file (after [`StateStore::forget`]): the pages the removed records
    /// were on are given back, and the file shrinks.
    pub fn compact(mut self) -> Result<bool, StateError> {
        self.db.compact().map_err(io("compact the state file"))
    }
}
