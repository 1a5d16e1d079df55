//! Forgetting in the file store: handled rows that left the overlap window, data older
//! than `state.retention`, and one person (`leadsync forget`).

use std::collections::HashSet;

use std::ops::Bound::{Excluded, Unbounded};

use redb::{ReadableTable, TableDefinition, WriteTransaction};
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
    /// [`StateStore::forget`](crate::state::StateStore::forget), in one transaction.
    pub(super) fn forget_now(&self, person: &Person) -> Result<Forgotten, StateError> {
        let txn = self.db.begin_write().map_err(io(FORGET))?;
        let mut forgotten = Forgotten::default();
        forget_customers(&txn, person, &mut forgotten)?;
        forget_dead_letters(&txn, person, &mut forgotten)?;
        forget_rows(&txn, person, &mut forgotten)?;
        txn.commit().map_err(io(FORGET))?;
        Ok(forgotten)
    }

    /// [`StateStore::prune_older_than`](crate::state::StateStore::prune_older_than), in
    /// one transaction.
    pub(super) fn prune_older_now(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<Pruned, StateError> {
        let mut cursor = locked(&self.retention);
        let txn = self.db.begin_write().map_err(io(OP))?;
        let mut pruned = Pruned::default();
        let mut next = RetentionCursor::default();
        (pruned.customers, next.customers) =
            prune_customers(&txn, &cursor.customers, before, step)?;
        (pruned.dead_letters, next.dead_letters) =
            prune_dead_letters(&txn, &cursor.dead_letters, before, step)?;
        for (i, list) in LISTS.into_iter().enumerate() {
            let removed;
            (removed, next.lists[i]) = prune_list(&txn, list, &cursor.lists[i], before, step)?;
            match i {
                0 => pruned.rejected = removed,
                1 => pruned.skipped = removed,
                _ => pruned.unidentifiable = removed,
            }
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

    /// Compacts the file (after [`StateStore::forget`](crate::state::StateStore::forget)): the pages the removed records
    /// were on are given back, and the file shrinks.
    pub fn compact(mut self) -> Result<bool, StateError> {
        self.db.compact().map_err(io("compact the state file"))
    }
}

/// The operation retention's errors name.
const OP: &str = "remove data older than state.retention";

/// One retention step over the customers, from `walk`: removes those last seen before
/// `before`. Returns how many, and where the next step resumes.
fn prune_customers(
    txn: &WriteTransaction,
    walk: &Walk<Vec<u8>>,
    before: OffsetDateTime,
    step: usize,
) -> Result<(usize, Walk<Vec<u8>>), StateError> {
    let Walk::From(after) = walk else {
        return Ok((0, Walk::Done));
    };
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
            if decode_customer(&text, value.value()).is_ok_and(|c| c.lead.last_seen < before) {
                stale.push(key.value().to_vec());
            }
            last = Some(key.value().to_vec());
        }
    }
    for key in &stale {
        table.remove(key.as_slice()).map_err(io(OP))?;
    }
    Ok((stale.len(), Walk::next(seen < step, last)))
}

/// One retention step over the dead letters, from `walk`: removes those refused before
/// `before`. Returns how many, and where the next step resumes.
fn prune_dead_letters(
    txn: &WriteTransaction,
    walk: &Walk<String>,
    before: OffsetDateTime,
    step: usize,
) -> Result<(usize, Walk<String>), StateError> {
    let Walk::From(after) = walk else {
        return Ok((0, Walk::Done));
    };
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
            if decode_compact::<DeadLetter>(key.value(), value.value()).is_ok_and(|l| l.at < before)
            {
                stale.push(key.value().to_owned());
            }
            last = Some(key.value().to_owned());
        }
    }
    for key in &stale {
        table.remove(key.as_str()).map_err(io(OP))?;
    }
    Ok((stale.len(), Walk::next(seen < step, last)))
}

/// One retention step over a list of recorded rows, from `walk`: removes the rows
/// stamped before `before`. Returns how many, and where the next step resumes.
fn prune_list(
    txn: &WriteTransaction,
    list: TableDefinition<(&str, &str), &[u8]>,
    walk: &Walk<(String, String)>,
    before: OffsetDateTime,
    step: usize,
) -> Result<(usize, Walk<(String, String)>), StateError> {
    let Walk::From(after) = walk else {
        return Ok((0, Walk::Done));
    };
    let mut table = txn.open_table(list).map_err(io(OP))?;
    let mut stale: Vec<(String, String)> = Vec::new();
    let mut last = None;
    let mut seen = 0;
    {
        let entries = match after {
            Some((pk, rk)) => {
                table.range::<(&str, &str)>((Excluded((pk.as_str(), rk.as_str())), Unbounded))
            }
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
    Ok((stale.len(), Walk::next(seen < step, last)))
}

/// The operation `forget`'s errors name.
const FORGET: &str = "forget a person";

/// Removes the person's customer, marking the rows of its history handled first.
fn forget_customers(
    txn: &WriteTransaction,
    person: &Person,
    forgotten: &mut Forgotten,
) -> Result<(), StateError> {
    let mut customers = txn.open_table(CUSTOMERS).map_err(io(FORGET))?;
    let mut found: Vec<(Vec<u8>, CustomerState)> = Vec::new();
    match &person.key {
        Some(key) => {
            if let Some(bytes) = customers.get(key.as_bytes()).map_err(io(FORGET))? {
                found.push((
                    key.as_bytes().to_vec(),
                    decode_customer(key, bytes.value())?,
                ));
            }
        }
        // Only an external key: every customer is looked at.
        None if person.external_key.is_some() => {
            for entry in customers.iter().map_err(io(FORGET))? {
                let (key, value) = entry.map_err(io(FORGET))?;
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
    let mut handled = txn.open_table(HANDLED).map_err(io(FORGET))?;
    for (key, customer) in &found {
        for version in crate::state::personal::history_versions(&customer.lead.history) {
            let row = (
                version.id.partition_key.as_bytes(),
                version.id.row_key.as_bytes(),
            );
            let newer = match handled.get(row).map_err(io(FORGET))? {
                Some(bytes) => decode_handled(row, bytes.value())
                    .is_ok_and(|h| h.timestamp >= version.timestamp),
                None => false,
            };
            if !newer {
                handled
                    .insert(row, encode_handled(&version).as_slice())
                    .map_err(io(FORGET))?;
                forgotten.marked_handled += 1;
            }
        }
        customers.remove(key.as_slice()).map_err(io(FORGET))?;
        forgotten.customers.push(customer.lead.log_key());
        forgotten.add_source_rows(customer.lead.history.iter().map(|h| &h.row));
    }
    Ok(())
}

/// Removes the person's dead letters.
fn forget_dead_letters(
    txn: &WriteTransaction,
    person: &Person,
    forgotten: &mut Forgotten,
) -> Result<(), StateError> {
    let mut letters = txn.open_table(DEAD_LETTERS).map_err(io(FORGET))?;
    let mut gone = Vec::new();
    for entry in letters.iter().map_err(io(FORGET))? {
        let (key, value) = entry.map_err(io(FORGET))?;
        let letter: DeadLetter = decode_compact(key.value(), value.value())?;
        if person.is_in_dead_letter(&letter) {
            forgotten.add_source_rows(letter.rows.iter().map(|r| &r.id));
            forgotten.dead_letters.push(letter.payload.log_key());
            gone.push(letter.id);
        }
    }
    for id in &gone {
        letters.remove(id.as_str()).map_err(io(FORGET))?;
    }
    Ok(())
}

/// Removes the rejected, skipped and unidentifiable rows about the person: the rows of
/// their customer's history and dead letters, and those whose columns hold their address.
fn forget_rows(
    txn: &WriteTransaction,
    person: &Person,
    forgotten: &mut Forgotten,
) -> Result<(), StateError> {
    let rows: HashSet<RowId> = forgotten.source_rows.iter().cloned().collect();
    for (i, list) in LISTS.into_iter().enumerate() {
        let mut table = txn.open_table(list).map_err(io(FORGET))?;
        let mut gone = Vec::new();
        for entry in table.iter().map_err(io(FORGET))? {
            let (key, value) = entry.map_err(io(FORGET))?;
            let (pk, rk) = key.value();
            let row: RecordedRow = decode(&RowId::new(pk, rk).to_string(), value.value())?;
            if person.is_in_row(&row, &rows) {
                gone.push(row.row.id);
            }
        }
        for id in &gone {
            table
                .remove((id.partition_key.as_str(), id.row_key.as_str()))
                .map_err(io(FORGET))?;
        }
        forgotten.add_source_rows(&gone);
        match i {
            0 => forgotten.rejected = gone,
            1 => forgotten.skipped = gone,
            _ => forgotten.unidentifiable = gone,
        }
    }
    Ok(())
}
