//! Table `Timestamp`s at their full 100 ns precision.
//!
//! The service stamps entities with 7 fractional digits. A watermark truncated to
//! micro- or milliseconds re-reads the newest row forever or skips rows, so every
//! value leadsync writes or compares keeps all 7 digits.

use time::{OffsetDateTime, UtcOffset};

/// `2024-05-01T10:00:00.1234567Z`: UTC, always 7 fractional digits (as the service writes them).
pub fn format(t: OffsetDateTime) -> String {
    let mut out = String::with_capacity(28);
    write(t, &mut out);
    out
}

/// As [`format`], appending to `out`. Written by hand: it runs for every row and every
/// history entry, and `format!` with padding was 6% of a backfill's CPU.
pub fn write(t: OffsetDateTime, out: &mut String) {
    match ascii(t) {
        Some(buf) => out.push_str(std::str::from_utf8(&buf).expect("ASCII digits")),
        None => {
            let t = t.to_offset(UtcOffset::UTC);
            out.push_str(&std::format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.nanosecond() / 100
            ))
        }
    }
}

/// The 28 bytes of [`format`], for years 0 to 9999 (all the service writes).
pub(crate) fn ascii(t: OffsetDateTime) -> Option<[u8; 28]> {
    let t = t.to_offset(UtcOffset::UTC);
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let mut buf = *b"0000-00-00T00:00:00.0000000Z";
    let mut put = |value: u32, end: usize, width: usize| {
        let mut v = value;
        for i in 0..width {
            buf[end - 1 - i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(year, 4, 4);
    put(u32::from(u8::from(t.month())), 7, 2);
    put(u32::from(t.day()), 10, 2);
    put(u32::from(t.hour()), 13, 2);
    put(u32::from(t.minute()), 16, 2);
    put(u32::from(t.second()), 19, 2);
    put(t.nanosecond() / 100, 27, 7);
    Some(buf)
}

/// Parses any RFC 3339 time (as written by [`format`] or by the service).
pub fn parse(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    if let Some(t) = parse_service_form(text) {
        return Ok(t);
    }
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
}

/// The form the service and [`format`] write (`YYYY-MM-DDTHH:MM:SS.fffffffZ`, 1 to 9
/// fractional digits), without the general RFC 3339 parser; `None` sends anything else
/// (offsets, no fraction, out-of-range fields) to that parser.
fn parse_service_form(text: &str) -> Option<OffsetDateTime> {
    let b = text.as_bytes();
    if b.len() < 22 || b.len() > 30 || b[b.len() - 1] != b'Z' {
        return None;
    }
    let fixed = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ];
    if fixed.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let fraction = &b[20..b.len() - 1];
    let mut nanos = num(20..b.len() - 1)?;
    for _ in fraction.len()..9 {
        nanos *= 10;
    }
    let month = time::Month::try_from(num(5..7)? as u8).ok()?;
    let date = time::Date::from_calendar_date(num(0..4)? as i32, month, num(8..10)? as u8).ok()?;
    let clock = time::Time::from_hms_nano(
        num(11..13)? as u8,
        num(14..16)? as u8,
        num(17..19)? as u8,
        nanos,
    )
    .ok()?;
    Some(date.with_time(clock).assume_utc())
}

/// The time as a count of 100 ns ticks since the Unix epoch: the service's precision
/// in 8 bytes or fewer, for the compact state records.
pub fn to_ticks(t: OffsetDateTime) -> i64 {
    // In range for every year `time` represents (about ±29,000 years in ticks).
    (t.unix_timestamp_nanos() / 100) as i64
}

/// The inverse of [`to_ticks`]; `None` outside the years `time` represents.
pub fn from_ticks(ticks: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ticks) * 100).ok()
}

/// Serde helpers writing [`format`] and reading [`parse`].
pub mod serde_ticks {
    use serde::{Deserializer, Serializer};
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        match super::ascii(*t) {
            Some(buf) => s.serialize_str(std::str::from_utf8(&buf).expect("ASCII digits")),
            None => s.serialize_str(&super::format(*t)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = OffsetDateTime;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an RFC 3339 time")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<OffsetDateTime, E> {
                super::parse(text).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
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
    fn the_fast_paths_agree_with_the_general_ones() {
        use time::format_description::well_known::Rfc3339;
        for text in [
            "2024-05-01T10:00:00.1234567Z",
            "1999-12-31T23:59:59.9999999Z",
            "2024-02-29T00:00:00.5Z",
            "2024-05-01T10:00:00.123456789Z",
            "2024-05-01T10:00:00.000000001Z",
        ] {
            let general = OffsetDateTime::parse(text, &Rfc3339).unwrap();
            assert_eq!(parse_service_form(text), Some(general), "{text}");
            let written = format(general);
            let expected = std::format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
                general.year(),
                u8::from(general.month()),
                general.day(),
                general.hour(),
                general.minute(),
                general.second(),
                general.nanosecond() / 100
            );
            assert_eq!(written, expected);
        }
        // Not the service's form, or invalid: left to the general parser.
        for text in [
            "2024-05-01T10:00:00Z",
            "2024-05-01T10:00:00.5+02:00",
            "2023-02-29T00:00:00.0Z",
            "2024-13-01T00:00:00.0Z",
            "2024-05-01T24:00:00.0Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00.12a4567Z",
        ] {
            assert_eq!(parse_service_form(text), None, "{text}");
        }
        assert!(parse("2023-02-29T00:00:00.0Z").is_err());
    }

    #[test]
    fn two_stamps_100ns_apart_format_differently_and_round_trip() {
        let a = parse("2024-05-01T10:00:00.0000001Z").unwrap();
        let b = parse("2024-05-01T10:00:00.0000002Z").unwrap();
        assert_ne!(format(a), format(b));
        assert_eq!(parse(&format(b)).unwrap(), b);
    }
}
