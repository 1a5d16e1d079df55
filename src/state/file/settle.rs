//! [`StateStore::settle`](crate::state::StateStore::settle) in the file store: one
//! write transaction.

use std::collections::{HashMap, HashSet};

use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use time::OffsetDateTime;

use super::codec::{encode, encode_handled, SUMMARY_HASHED};
use super::{io, RedbStore, CUSTOMERS, DEAD_LETTERS, HANDLED, REJECTED, SKIPPED, UNIDENTIFIABLE};
use crate::identity::CustomerState;
use crate::state::{RecordedRow, SettleBatch, Settled, Settlement, StateError};

const OP: &str = "settle rows";

/// A list of recorded rows: rejected, skipped or unidentifiable.
type List<'t> = Table<'t, (&'static str, &'static str), &'static [u8]>;

impl RedbStore {
    /// [`StateStore::settle`](crate::state::StateStore::settle), in one transaction.
    ///
    /// Committed with `Durability::Eventual`: redb promises only that such a commit is
    /// persisted some time after it returns. A process crash keeps it, and a power loss
    /// may roll it back to the last checkpoint commit (`Immediate`, and with it
    /// everything before). What a roll-back forgets is read again, as the checkpoint did
    /// not move past it, and delivered again as an idempotent upsert. (redb implements
    /// `Eventual` with an `fdatasync` on Linux, a barrier on macOS: more than this
    /// relies on. The pipeline settles in a task of its own, off the page's path.)
    pub(super) fn settle_now(&self, batch: &SettleBatch) -> Result<(), StateError> {
        let mut txn = self.db.begin_write().map_err(io(OP))?;
        txn.set_durability(redb::Durability::Eventual);
        write_dead_letters(&txn, batch)?;
        write_customers(&txn, &batch.customers)?;
        write_rows(&txn, &batch.rows)?;
        txn.commit().map_err(io(OP))
    }
}

/// Removes the dead letters the batch resolved and writes its new ones.
fn write_dead_letters(txn: &WriteTransaction, batch: &SettleBatch) -> Result<(), StateError> {
    let mut letters = txn.open_table(DEAD_LETTERS).map_err(io(OP))?;
    // Every customer delivered resolves its dead letter, if it has one: an empty table
    // (the usual case) is not searched once per customer.
    if !letters.is_empty().map_err(io(OP))? {
        for id in &batch.resolved {
            letters.remove(id.as_str()).map_err(io(OP))?;
        }
    }
    for letter in &batch.dead_letters {
        letters
            .insert(letter.id.as_str(), encode(letter).as_slice())
            .map_err(io(OP))?;
    }
    Ok(())
}

/// Writes each customer in the stored form (a hash of the summary instead of its text).
fn write_customers(txn: &WriteTransaction, customers: &[CustomerState]) -> Result<(), StateError> {
    let mut stored = txn.open_table(CUSTOMERS).map_err(io(OP))?;
    let mut record = Vec::with_capacity(1024);
    for customer in customers {
        record.clear();
        record.push(SUMMARY_HASHED);
        record = customer.write_stored(record);
        stored
            .insert(customer.lead.key.as_bytes(), record.as_slice())
            .map_err(io(OP))?;
    }
    Ok(())
}

/// Remembers each row not delivered as handled, and lists each row where its latest
/// version settled (rejected, skipped, unidentifiable, or on no list).
fn write_rows(txn: &WriteTransaction, settlements: &[Settlement]) -> Result<(), StateError> {
    let now = OffsetDateTime::now_utc();
    let mut handled = txn.open_table(HANDLED).map_err(io(OP))?;
    let mut rejected = txn.open_table(REJECTED).map_err(io(OP))?;
    let mut skipped = txn.open_table(SKIPPED).map_err(io(OP))?;
    let mut held = txn.open_table(UNIDENTIFIABLE).map_err(io(OP))?;
    let mut lists = [&mut rejected, &mut skipped, &mut held];
    let search_per_row = leave_short_lists(&mut lists, settlements)?;
    // Rows listed by this batch, and where: a second version of one in the same batch
    // moves it.
    let mut listed_here: HashMap<(&str, &str), usize> = HashMap::new();
    for s in settlements {
        let key = (s.row.id.partition_key.as_str(), s.row.id.row_key.as_str());
        // A delivered row is not remembered here: its version is in its customer's
        // history, committed in this same transaction, and a re-read of it merges to no
        // change, so nothing is sent (`Pipeline::merge`). That is one B-tree insert per
        // delivered row saved, a tenth of a backfill's work; reading a customer from this
        // file is cheap. (The table store keeps its markers: there a customer read is a
        // request.)
        if !matches!(s.outcome, Settled::Delivered { .. }) {
            handled
                .insert(
                    (key.0.as_bytes(), key.1.as_bytes()),
                    encode_handled(&s.row).as_slice(),
                )
                .map_err(io(OP))?;
        }
        for (table, per_row) in lists.iter_mut().zip(search_per_row) {
            if per_row {
                table.remove(key).map_err(io(OP))?;
            }
        }
        if let Some(i) = listed_here.remove(&key) {
            lists[i].remove(key).map_err(io(OP))?;
        }
        let list = match &s.outcome {
            Settled::Delivered { .. } => None,
            Settled::Rejected { .. } => Some(0),
            Settled::Skipped { .. } => Some(1),
            Settled::Unidentifiable { .. } => Some(2),
        };
        if let Some(i) = list {
            let recorded = RecordedRow {
                row: s.row.clone(),
                outcome: s.outcome.clone(),
                columns: s.columns.clone(),
                recorded_at: now,
            };
            lists[i]
                .insert(key, encode(&recorded).as_slice())
                .map_err(io(OP))?;
            listed_here.insert(key, i);
        }
    }
    Ok(())
}

/// A row's latest version decides where it is listed, so each row settled leaves the
/// lists it was on. A list shorter than the batch (a backfill's usual case: a few test
/// leads) is read once here and only the batch's rows on it removed, instead of one
/// B-tree search per row and list; an empty list costs nothing, not even the key set.
/// Returns, per list, whether it is longer and is to be searched per row instead.
fn leave_short_lists(
    lists: &mut [&mut List<'_>; 3],
    settlements: &[Settlement],
) -> Result<[bool; 3], StateError> {
    let mut batch_keys: Option<HashSet<(&str, &str)>> = None;
    let mut search_per_row = [false; 3];
    for (table, per_row) in lists.iter_mut().zip(&mut search_per_row) {
        let len = table.len().map_err(io(OP))?;
        if len == 0 {
            continue;
        }
        if len > settlements.len() as u64 {
            *per_row = true;
            continue;
        }
        let keys = batch_keys.get_or_insert_with(|| {
            settlements
                .iter()
                .map(|s| (s.row.id.partition_key.as_str(), s.row.id.row_key.as_str()))
                .collect()
        });
        let mut on_list = Vec::new();
        for entry in table.iter().map_err(io(OP))? {
            let (key, _) = entry.map_err(io(OP))?;
            let (pk, rk) = key.value();
            if keys.contains(&(pk, rk)) {
                on_list.push((pk.to_owned(), rk.to_owned()));
            }
        }
        for (pk, rk) in &on_list {
            table.remove((pk.as_str(), rk.as_str())).map_err(io(OP))?;
        }
    }
    Ok(search_per_row)
}
