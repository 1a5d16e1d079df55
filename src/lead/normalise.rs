//! `normalise`: one table row -> one [`LeadEvent`], or a [`Rejection`]. See the
//! module documentation of [`crate::lead`] for what is kept and what rejects a row.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use smallvec::SmallVec;

use super::{
    non_empty, Action, Customer, Email, LeadEvent, LeadSource, Rejection, TEST_LEAD_MARKER,
};
use crate::source::row::RawRow;
use crate::source::Key;

/// Interprets one row. Never panics.
///
/// # Errors
///
/// A [`Rejection`] when the `CustomerInfo` column is present and not empty but
/// is not a JSON object (not JSON at all, or an array, string, number...).
pub fn normalise(row: &RawRow) -> Result<LeadEvent, Rejection> {
    let mut notes = Vec::new();
    let mut extra = BTreeMap::new();
    // The candidates of each column, by its place in `Column` (a row has a handful).
    let mut found: [Candidates<'_>; Column::ALL.len()] = Default::default();
    for (index, (name, value)) in row.columns.iter().enumerate() {
        match Column::from_name(name) {
            Some(Column::System) => {}
            Some(column) => found[column as usize].push(Candidate {
                place: Place::Column(name),
                value,
                level: 0,
                preferred: name == column.name(),
                index,
            }),
            None => {
                extra.insert(name.clone(), value.clone());
            }
        }
    }
    let mut column = |column: Column| {
        let candidates = std::mem::take(&mut found[column as usize]);
        pick(candidates, &mut extra, &mut notes)
    };
    let customer_info = column(Column::CustomerInfo);
    let mut text = |c: Column| column(c).map(|picked| picked.text);
    let lead_source_text = text(Column::LeadSource);
    let action_code = text(Column::ActionCode);
    let display_name = text(Column::OfferDisplayName);
    let offer_title_column = text(Column::OfferTitle);
    let description = text(Column::Description);
    let created_time = text(Column::CreatedTime);

    let lead_source = LeadSource::parse(lead_source_text.as_deref().unwrap_or(""));
    let action = resolve_action(&lead_source, action_code.as_deref(), &mut notes);
    let offer_title = match (display_name, offer_title_column) {
        (Some(display), Some(title)) if display != title => {
            notes.push(format!(
                "OfferDisplayName {display:?} differs from OfferTitle {title:?}; \
                 using OfferDisplayName"
            ));
            Some(display)
        }
        (display, title) => display.or(title),
    };
    let customer = match customer_info {
        None => Customer::default(),
        Some(info) => {
            let parsed = parse_customer(&info.text, info.value, &mut extra, &mut notes);
            parsed.map_err(|reason| Rejection {
                row: row.id.clone(),
                reason,
            })?
        }
    };
    let description = description.filter(|d| !is_label_noise(d));
    let test_lead = customer
        .strings()
        .chain(offer_title.as_deref())
        .chain(description.as_deref())
        .any(|s| s.contains(TEST_LEAD_MARKER));

    Ok(LeadEvent {
        row: row.id.clone(),
        etag: row.etag.clone(),
        timestamp: row.timestamp,
        stage: action.stage(),
        action,
        offer: lead_source.offer.clone(),
        lead_source,
        offer_title,
        customer,
        description,
        created_time,
        test_lead,
        notes,
        extra,
    })
}

/// The `LeadSource` action wins; a disagreeing `ActionCode` is kept in a note.
fn resolve_action(
    lead_source: &LeadSource,
    action_code: Option<&str>,
    notes: &mut Vec<String>,
) -> Action {
    let from_column = action_code
        .map(Action::parse)
        .filter(|a| *a != Action::Unknown);
    match (&lead_source.action, from_column) {
        (Some(from_source), Some(from_column)) => {
            if *from_source != from_column {
                notes.push(format!(
                    "LeadSource action {:?} disagrees with ActionCode {:?}; \
                     using the LeadSource action",
                    from_source.code(),
                    action_code.unwrap_or_default(),
                ));
            }
            from_source.clone()
        }
        (Some(from_source), None) => from_source.clone(),
        (None, Some(from_column)) => from_column,
        (None, None) => Action::Unknown,
    }
}

/// Parses the `CustomerInfo` column. `Err` holds the rejection reason.
fn parse_customer(
    text: &str,
    value: &Value,
    extra: &mut BTreeMap<String, Value>,
    notes: &mut Vec<String>,
) -> Result<Customer, String> {
    // Declared before `found`, which borrows from them (a SmallVec, unlike a Vec, may
    // not outlive what it borrows).
    let info;
    let parsed;
    let mut found: [Candidates<'_>; Field::ALL.len()] = Default::default();
    let mut index = 0;
    match value {
        // Not what the marketplace sends, but unambiguous: the object itself.
        Value::Object(object) => collect_object(object, None, &mut index, &mut found, extra, notes),
        // The usual case: an object's text, read with its keys borrowed from the text.
        _ => match serde_json::from_str::<InfoObject<'_>>(text) {
            Ok(members) => {
                info = members;
                let mut members = info.0.iter().map(|(k, v)| (k.as_ref(), v));
                collect_fields(&mut members, None, &mut index, &mut found, extra, notes)
            }
            // Anything else, read again as any JSON to say what is wrong with it.
            Err(_) => {
                parsed = serde_json::from_str::<Value>(text).map_err(|error| {
                    format!(
                        "CustomerInfo is not valid JSON: {error} (value {})",
                        preview(text)
                    )
                })?;
                match &parsed {
                    Value::Object(object) => {
                        collect_object(object, None, &mut index, &mut found, extra, notes)
                    }
                    other => {
                        return Err(format!(
                            "CustomerInfo is JSON but not an object: it is {} (value {})",
                            json_kind(other),
                            preview(text)
                        ))
                    }
                }
            }
        },
    }

    let mut field = |field: Field| {
        let candidates = std::mem::take(&mut found[field as usize]);
        pick(candidates, extra, notes).map(|picked| picked.text)
    };
    Ok(Customer {
        first_name: field(Field::FirstName),
        last_name: field(Field::LastName),
        email: field(Field::Email).as_deref().and_then(Email::parse),
        phone: field(Field::Phone),
        country: field(Field::Country),
        company: field(Field::Company),
        title: field(Field::Title),
    })
}

/// [`collect_fields`] of an object already read as a `serde_json::Map`.
fn collect_object<'a>(
    object: &'a serde_json::Map<String, Value>,
    nested: Option<&'a str>,
    index: &mut usize,
    found: &mut [Candidates<'a>; Field::ALL.len()],
    extra: &mut BTreeMap<String, Value>,
    notes: &mut Vec<String>,
) {
    let mut members = object.iter().map(|(k, v)| (k.as_str(), v));
    collect_fields(&mut members, nested, index, found, extra, notes)
}

/// Sorts the keys of a `CustomerInfo` object (and of its `UserDetails` object, `nested`)
/// into known fields and `extra`.
fn collect_fields<'a>(
    object: &mut dyn Iterator<Item = (&'a str, &'a Value)>,
    nested: Option<&'a str>,
    index: &mut usize,
    found: &mut [Candidates<'a>; Field::ALL.len()],
    extra: &mut BTreeMap<String, Value>,
    notes: &mut Vec<String>,
) {
    for (key, value) in object {
        let place = Place::Info { nested, key };
        *index += 1;
        if let Some(field) = Field::from_key(key) {
            found[field as usize].push(Candidate {
                place,
                value,
                level: u8::from(nested.is_some()),
                preferred: key == field.name(),
                index: *index,
            });
        } else if nested.is_none() && key.eq_ignore_ascii_case("UserDetails") {
            match value {
                Value::Object(inner) => {
                    collect_object(inner, Some(key), index, found, extra, notes)
                }
                Value::Null => {}
                other => {
                    notes.push(format!(
                        "{place} is {}, not an object; kept in extra",
                        json_kind(other)
                    ));
                    extra.insert(place.to_string(), other.clone());
                }
            }
        } else {
            extra.insert(place.to_string(), value.clone());
        }
    }
}

/// A JSON object's members with their keys borrowed from its text where they need no
/// unescaping, in the order and with the values a `serde_json::Map` would hold: sorted
/// by key, the last of repeated keys kept. `CustomerInfo` is one per row, and its keys
/// need not be allocated and put into a tree to be looked at once.
struct InfoObject<'a>(Vec<(Cow<'a, str>, Value)>);

impl<'de> Deserialize<'de> for InfoObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = InfoObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<InfoObject<'de>, A::Error> {
                // The seven documented fields, and room for one more.
                let mut members: Vec<(Cow<'de, str>, Value)> = Vec::with_capacity(8);
                while let Some(Key(key)) = map.next_key()? {
                    members.push((key, map.next_value()?));
                }
                // Stable: of repeated keys, the last stays last, and is the one kept.
                members.sort_by(|a, b| a.0.cmp(&b.0));
                let mut kept: Vec<(Cow<'de, str>, Value)> = Vec::with_capacity(members.len());
                for member in members {
                    match kept.last_mut() {
                        Some(last) if last.0 == member.0 => *last = member,
                        _ => kept.push(member),
                    }
                }
                Ok(InfoObject(kept))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Where a candidate value was found. Spelled out (`CustomerInfo.UserDetails.Email`)
/// only when it goes to `extra` or into a note, which few rows need.
#[derive(Clone, Copy)]
enum Place<'a> {
    /// A table column.
    Column(&'a str),
    /// A key of `CustomerInfo`, or of its `nested` object.
    Info {
        nested: Option<&'a str>,
        key: &'a str,
    },
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Column(name) => f.write_str(name),
            Place::Info { nested: None, key } => write!(f, "CustomerInfo.{key}"),
            Place::Info {
                nested: Some(nested),
                key,
            } => write!(f, "CustomerInfo.{nested}.{key}"),
        }
    }
}

/// The values found for one column or field. A row almost always has one spelling of
/// each, so one is kept inline: 13 fewer allocations a row than a `Vec` each.
type Candidates<'a> = SmallVec<[Candidate<'a>; 1]>;

/// One value found for a known column or field, under one of its spellings.
struct Candidate<'a> {
    /// Where it was found: the name under which it goes to `extra` if another
    /// spelling wins.
    place: Place<'a>,
    value: &'a Value,
    /// 0 for a column or a flat `CustomerInfo` key, 1 under `UserDetails`.
    level: u8,
    /// Spelled exactly as documented (`FirstName`, not `firstname`).
    preferred: bool,
    index: usize,
}

/// A value chosen among candidates: its trimmed text, and the value itself.
struct PickedValue<'a> {
    text: String,
    value: &'a Value,
}

/// Chooses one value among the spellings of a column or field: the first
/// non-empty one, flat before nested, the documented spelling before others.
/// A different non-empty value under another spelling is not dropped: it goes
/// to `extra` and a note says so.
fn pick<'a>(
    mut candidates: Candidates<'a>,
    extra: &mut BTreeMap<String, Value>,
    notes: &mut Vec<String>,
) -> Option<PickedValue<'a>> {
    if candidates.len() > 1 {
        candidates.sort_by_key(|c| (c.level, !c.preferred, c.index));
    }
    let mut chosen: Option<(Place<'a>, PickedValue<'a>)> = None;
    for candidate in candidates {
        let Some(text) = text_of(candidate.value) else {
            continue;
        };
        match &chosen {
            None => {
                chosen = Some((
                    candidate.place,
                    PickedValue {
                        text,
                        value: candidate.value,
                    },
                ))
            }
            Some((chosen_place, chosen_value)) => {
                if chosen_value.text != text {
                    let (place, chosen_place) =
                        (candidate.place.to_string(), chosen_place.to_string());
                    notes.push(format!(
                        "{place:?} and {chosen_place:?} hold different values; \
                         using {chosen_place:?}, the other is kept in extra"
                    ));
                    extra.insert(place, candidate.value.clone());
                }
            }
        }
    }
    chosen.map(|(_, picked)| picked)
}

/// The trimmed text of a value; `None` for null and for empty or
/// whitespace-only text. Values that are not strings count by their JSON text,
/// so a phone number sent as a number is kept.
fn text_of(value: &Value) -> Option<String> {
    let text: Cow<'_, str> = match value {
        Value::Null => return None,
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    };
    non_empty(&text)
}

/// A label with nothing after it (`Campaigns:`), i.e. `^\s*[A-Za-z ]+:\s*$`;
/// the marketplace fills `Description` with such text.
fn is_label_noise(description: &str) -> bool {
    match description.trim().strip_suffix(':') {
        Some(label) => {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphabetic() || c == ' ')
        }
        None => false,
    }
}

/// What a rejection says of a rejected value: its length, none of its text. A reason
/// reaches the logs, and a `CustomerInfo` holds a person's details; the value itself
/// is kept with the rejected row (`leadsync rows rejected`).
fn preview(text: &str) -> String {
    format!(
        "of {} chars, shown by `leadsync rows rejected`",
        text.chars().count()
    )
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The columns this module interprets, and the system columns it ignores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Column {
    LeadSource,
    ActionCode,
    CustomerInfo,
    OfferDisplayName,
    OfferTitle,
    Description,
    CreatedTime,
    /// `PartitionKey`, `RowKey`, `Timestamp`: already in [`RawRow`]'s fields.
    System,
}

impl Column {
    const ALL: [Column; 7] = [
        Column::LeadSource,
        Column::ActionCode,
        Column::CustomerInfo,
        Column::OfferDisplayName,
        Column::OfferTitle,
        Column::Description,
        Column::CreatedTime,
    ];

    fn name(self) -> &'static str {
        match self {
            Column::LeadSource => "LeadSource",
            Column::ActionCode => "ActionCode",
            Column::CustomerInfo => "CustomerInfo",
            Column::OfferDisplayName => "OfferDisplayName",
            Column::OfferTitle => "OfferTitle",
            Column::Description => "Description",
            Column::CreatedTime => "CreatedTime",
            Column::System => "",
        }
    }

    fn from_name(name: &str) -> Option<Column> {
        if ["PartitionKey", "RowKey", "Timestamp"]
            .iter()
            .any(|system| system.eq_ignore_ascii_case(name))
        {
            return Some(Column::System);
        }
        Column::ALL
            .into_iter()
            .find(|column| column.name().eq_ignore_ascii_case(name))
    }
}

/// The `CustomerInfo` keys this module interprets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    FirstName,
    LastName,
    Email,
    Phone,
    Country,
    Company,
    Title,
}

impl Field {
    const ALL: [Field; 7] = [
        Field::FirstName,
        Field::LastName,
        Field::Email,
        Field::Phone,
        Field::Country,
        Field::Company,
        Field::Title,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::FirstName => "FirstName",
            Field::LastName => "LastName",
            Field::Email => "Email",
            Field::Phone => "Phone",
            Field::Country => "Country",
            Field::Company => "Company",
            Field::Title => "Title",
        }
    }

    fn from_key(key: &str) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|field| field.name().eq_ignore_ascii_case(key))
    }
}

#[cfg(test)]
mod tests;
