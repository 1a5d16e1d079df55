//! How the file store encodes its records: JSON for the rare ones, postcard in a
//! compact stored form for those written per row and per customer. Every earlier form
//! is still read.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::identity::{CustomerState, EarlierCustomerState, SummaryForm};
use crate::source::row::RowId;
use crate::state::{RowVersion, StateError};
use crate::timestamp::serde_ticks;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CheckpointRecord {
    pub(super) version: u32,
    #[serde(with = "serde_ticks")]
    pub(super) timestamp: OffsetDateTime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct HandledRecord {
    pub(super) etag: String,
    #[serde(with = "serde_ticks")]
    pub(super) timestamp: OffsetDateTime,
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state records serialise to JSON")
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

/// First byte of a record in the first compact format (postcard of the serde types,
/// times as text), as versions before the [`STORED`] form wrote handled rows and
/// customers. JSON records, as written before that, start with `{`. Both are still read.
pub(super) const COMPACT: u8 = 1;

/// The records written once per row or per customer (handled rows, customers) are
/// written compactly: postcard is about 3x faster than JSON for them and half the size
/// (bench/results/history.md, "Bottlenecks"). postcard encodes enum variants by position: variants
/// of stored enums (e.g. `Stage`) may be added at the end only. Now only the tests
/// write this form, to check that it is still read.
#[cfg(test)]
pub(super) fn encode_compact<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![COMPACT]).expect("state records serialise to postcard")
}

/// First byte of a customer or handled-row record in the stored form (times as ticks,
/// derived fields and the service's standard ETags left out: [`CustomerState::write_stored`],
/// [`encode_handled`]). Records in the two earlier forms are still read.
pub(super) const STORED: u8 = 2;

/// First byte of a customer record in the form that keeps a hash of the summary
/// instead of its text ([`CustomerState::write_stored`]), about half the size. Customers
/// in the [`STORED`] form and the two before are still read.
pub(super) const SUMMARY_HASHED: u8 = 3;

/// A handled row's record: `(ETag, Timestamp ticks)`, the ETag `None` when it is the
/// service's standard one for the Timestamp: at most 12 bytes instead of about 80.
pub(super) fn encode_handled(row: &RowVersion) -> Vec<u8> {
    let etag = (!crate::source::row::is_standard_etag(&row.etag, row.timestamp))
        .then_some(row.etag.as_str());
    let record: (Option<&str>, i64) = (etag, crate::timestamp::to_ticks(row.timestamp));
    postcard::to_extend(&record, vec![STORED]).expect("handled rows serialise to postcard")
}

/// A handled row's record as read, in any form.
pub(super) struct Handled {
    /// `None`: the service's standard ETag for `timestamp`, which is not built unless
    /// asked for (the prune scan reads every record, the overlap re-read many).
    pub(super) etag: Option<String>,
    pub(super) timestamp: OffsetDateTime,
}

impl Handled {
    /// The record is of the row at this ETag.
    pub(super) fn has_etag(&self, etag: &str) -> bool {
        match &self.etag {
            Some(stored) => stored == etag,
            None => crate::source::row::is_standard_etag(etag, self.timestamp),
        }
    }
}

/// Reads the record of the handled row (`partition_key`, `row_key`) in any of the three forms.
pub(super) fn decode_handled(
    (partition_key, row_key): (&[u8], &[u8]),
    bytes: &[u8],
) -> Result<Handled, StateError> {
    let key = || {
        RowId::new(
            String::from_utf8_lossy(partition_key),
            String::from_utf8_lossy(row_key),
        )
        .to_string()
    };
    if bytes.first() != Some(&STORED) {
        let record: HandledRecord = decode_compact(&key(), bytes)?;
        return Ok(Handled {
            etag: Some(record.etag),
            timestamp: record.timestamp,
        });
    }
    let corrupt = |message: String| StateError::Corrupt {
        key: key(),
        message,
    };
    let (etag, ticks): (Option<String>, i64) =
        postcard::from_bytes(&bytes[1..]).map_err(|e| corrupt(e.to_string()))?;
    let timestamp = crate::timestamp::from_ticks(ticks)
        .ok_or_else(|| corrupt(format!("time {ticks} is out of range")))?;
    Ok(Handled { etag, timestamp })
}

/// Reads a customer record in any of the four forms. One in the newest form has no
/// summary text until [`CustomerState::complete_summary`].
pub(super) fn decode_customer(key: &str, bytes: &[u8]) -> Result<CustomerState, StateError> {
    let form = match bytes.first() {
        Some(&SUMMARY_HASHED) => SummaryForm::Hash,
        Some(&STORED) => SummaryForm::Text,
        _ => return decode_compact::<EarlierCustomerState>(key, bytes).map(Into::into),
    };
    CustomerState::read_stored(key, &bytes[1..], form).map_err(|message| StateError::Corrupt {
        key: key.to_owned(),
        message,
    })
}

/// Reads a record written by [`encode_compact`] or, by an earlier version, as JSON.
pub(super) fn decode_compact<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, StateError> {
    match bytes.first() {
        Some(&COMPACT) => postcard::from_bytes(&bytes[1..]).map_err(|e| StateError::Corrupt {
            key: key.to_owned(),
            message: e.to_string(),
        }),
        Some(b'{') => decode(key, bytes),
        other => Err(StateError::Corrupt {
            key: key.to_owned(),
            message: format!("unknown record format {other:?} (written by a newer leadsync?)"),
        }),
    }
}
