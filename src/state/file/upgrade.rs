//! Files written by earlier versions: tables keyed by strings are moved to byte keys.

use redb::{ReadableTable, TableDefinition, TableHandle};

use super::{io, RedbStore, CUSTOMERS, CUSTOMERS_STR, HANDLED, HANDLED_STR};
use crate::state::StateError;

pub(super) fn upgrade(e: impl std::fmt::Display) -> StateError {
    io("upgrade the state file")(e)
}

/// A string key of an earlier version's table and its byte-keyed successor's key.
trait StringKey: redb::Key + 'static {
    type Bytes: redb::Key + 'static;
    type Owned;
    fn to_owned_key(key: Self::SelfType<'_>) -> Self::Owned;
    fn as_str_key(key: &Self::Owned) -> Self::SelfType<'_>;
    fn as_byte_key(key: &Self::Owned) -> <Self::Bytes as redb::Value>::SelfType<'_>;
}

impl StringKey for &'static str {
    type Bytes = &'static [u8];
    type Owned = String;
    fn to_owned_key(key: &str) -> String {
        key.to_owned()
    }
    fn as_str_key(key: &String) -> &str {
        key
    }
    fn as_byte_key(key: &String) -> &[u8] {
        key.as_bytes()
    }
}

impl StringKey for (&'static str, &'static str) {
    type Bytes = (&'static [u8], &'static [u8]);
    type Owned = (String, String);
    fn to_owned_key((a, b): (&str, &str)) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }
    fn as_str_key((a, b): &(String, String)) -> (&str, &str) {
        (a, b)
    }
    fn as_byte_key((a, b): &(String, String)) -> (&[u8], &[u8]) {
        (a.as_bytes(), b.as_bytes())
    }
}

/// One transaction's share of moving `from` into `to`: up to `step` records, and the old
/// table dropped once it is empty. Returns the number moved.
fn move_step<K: StringKey>(
    txn: &redb::WriteTransaction,
    from: TableDefinition<K, &[u8]>,
    to: TableDefinition<K::Bytes, &[u8]>,
    step: usize,
) -> Result<usize, StateError> {
    let moved = {
        let mut old = txn.open_table(from).map_err(upgrade)?;
        let mut new = txn.open_table(to).map_err(upgrade)?;
        let batch = old
            .iter()
            .map_err(upgrade)?
            .take(step)
            .map(|entry| {
                let (key, value) = entry.map_err(upgrade)?;
                Ok((K::to_owned_key(key.value()), value.value().to_vec()))
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        for (key, value) in &batch {
            new.insert(K::as_byte_key(key), value.as_slice())
                .map_err(upgrade)?;
            old.remove(K::as_str_key(key)).map_err(upgrade)?;
        }
        batch.len()
    };
    if moved < step {
        txn.delete_table(from).map_err(upgrade)?;
    }
    Ok(moved)
}

/// Records moved per transaction when a state file of an earlier version is upgraded.
pub(super) const MOVE_STEP: usize = 10_000;

impl RedbStore {
    /// Moves the records of the string-keyed tables of earlier versions into the
    /// byte-keyed ones, `step` records per transaction (a transaction's dirty pages stay
    /// in memory until it commits), removing each from the old table in the transaction
    /// that copies it: a crash part way leaves every record in exactly one of the two,
    /// and the next open goes on. Returns the number of records moved.
    pub(super) fn move_string_keyed(&self, step: usize) -> Result<usize, StateError> {
        let mut moved = 0;
        loop {
            let txn = self.db.begin_write().map_err(upgrade)?;
            let old: Vec<String> = txn
                .list_tables()
                .map_err(upgrade)?
                .map(|t| t.name().to_owned())
                .filter(|name| name == CUSTOMERS_STR.name() || name == HANDLED_STR.name())
                .collect();
            if old.is_empty() {
                return Ok(moved);
            }
            if old.iter().any(|name| name == CUSTOMERS_STR.name()) {
                moved += move_step(&txn, CUSTOMERS_STR, CUSTOMERS, step)?;
            }
            if old.iter().any(|name| name == HANDLED_STR.name()) {
                moved += move_step(&txn, HANDLED_STR, HANDLED, step)?;
            }
            txn.commit().map_err(upgrade)?;
        }
    }
}
