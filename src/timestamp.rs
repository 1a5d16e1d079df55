//! Table `Timestamp`s at their full 100 ns precision.
//!
//! The service stamps entities with 7 fractional digits. A watermark truncated to
//! micro- or milliseconds re-reads the newest row forever or skips rows, so every
//! value leadsync writes or compares keeps all 7 digits.

use time::{OffsetDateTime, UtcOffset};

/// `2024-05-01T10:00:00.1234567Z`: UTC, always 7 fractional digits (as the service writes them).
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 100
    )
}

/// Parses any RFC 3339 time (as written by [`format`] or by the service).
pub fn parse(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
}

/// Serde helpers writing [`format`] and reading [`parse`].
pub mod serde_ticks {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_keeps_all_seven_fractional_digits() {
        let t = parse("2024-05-01T10:00:00.1234567Z").unwrap();
        assert_eq!(format(t), "2024-05-01T10:00:00.1234567Z");
    }

    #[test]
    fn a_whole_second_still_has_seven_digits() {
        let t = parse("2024-05-01T10:00:00Z").unwrap();
        assert_eq!(format(t), "2024-05-01T10:00:00.0000000Z");
    }

    #[test]
    fn an_offset_time_is_written_in_utc() {
        let t = parse("2024-05-01T12:00:00.5+02:00").unwrap();
        assert_eq!(format(t), "2024-05-01T10:00:00.5000000Z");
    }

    #[test]
    fn two_stamps_100ns_apart_format_differently_and_round_trip() {
        let a = parse("2024-05-01T10:00:00.0000001Z").unwrap();
        let b = parse("2024-05-01T10:00:00.0000002Z").unwrap();
        assert_ne!(format(a), format(b));
        assert_eq!(parse(&format(b)).unwrap(), b);
    }
}
