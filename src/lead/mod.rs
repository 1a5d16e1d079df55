//! Table rows -> normalised lead events.
//!
//! One [`RawRow`] of the marketplace lead table becomes one [`LeadEvent`]: the
//! `LeadSource` column parsed into source, action and offer, the `CustomerInfo`
//! JSON string parsed into a [`Customer`], noise removed, test leads flagged.
//! Nothing here does I/O, and nothing here panics on any input: the table is
//! written by the marketplace, not by us, and its values are messy (see
//! `docs/design.md`, "What happens to each row").
//!
//! Only a `CustomerInfo` that is present but not a JSON object rejects a row;
//! everything else that is odd is kept (verbatim, in `extra`, or in `notes`), so
//! that no lead is lost here.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use smallvec::SmallVec;
use time::OffsetDateTime;

use crate::source::row::{RawRow, RowId};
use crate::source::Key;

/// The marker the marketplace puts in every field of the lead it sends when an
/// offer is published or the publisher presses "validate".
pub const TEST_LEAD_MARKER: &str = "MSFT_TEST_";

/// A row that cannot become a lead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row {row} cannot become a lead: {reason}")]
pub struct Rejection {
    pub row: RowId,
    pub reason: String,
}

/// One table row, interpreted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeadEvent {
    pub row: RowId,
    pub etag: String,
    /// The row's server-set `Timestamp`, at its full 100 ns precision.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// The `LeadSource` column, parsed; its `raw` is the trimmed column value.
    pub lead_source: LeadSource,
    /// The `LeadSource` action, else the `ActionCode` column, else `Unknown`.
    pub action: Action,
    pub stage: Stage,
    /// The offer named by the `LeadSource` column.
    pub offer: Option<Offer>,
    /// `OfferDisplayName`, else `OfferTitle`.
    pub offer_title: Option<String>,
    pub customer: Customer,
    /// `Description`, without the noise the marketplace puts there (`"Campaigns: "`).
    pub description: Option<String>,
    /// `CreatedTime`, verbatim but trimmed: its format is not documented.
    pub created_time: Option<String>,
    /// The marketplace's test lead (a field carries [`TEST_LEAD_MARKER`]).
    pub test_lead: bool,
    /// Remarks for a person: disagreeing or duplicated values and what was kept.
    pub notes: Vec<String>,
    /// Columns this module does not interpret, under their original names with
    /// their values as returned; unknown `CustomerInfo` keys as
    /// `CustomerInfo.<Key>` (table property names cannot contain '.', so these
    /// never collide with a column).
    pub extra: BTreeMap<String, Value>,
}

/// The `LeadSource` column: `Source-Action | Offer`, e.g.
/// `AzureMarketplace-INS | checkpoint.check-point-r77-10sg-byol`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadSource {
    /// The text that was parsed, unchanged.
    pub raw: String,
    /// `AzureMarketplace`, `AzurePortal`, `TestDrive`, `AppSource (SPZA)`, `SPZA`,
    /// or any other text, verbatim (trimmed).
    pub source: Option<String>,
    pub action: Option<Action>,
    pub offer: Option<Offer>,
}

impl LeadSource {
    /// Parses `Source-Action | Offer`. Never fails: parts that are not
    /// recognised are kept verbatim, missing parts are `None`.
    ///
    /// The text splits at the first `|` into left and offer; the left part splits
    /// at its last `-` into source and action, because a source may contain
    /// spaces and parentheses but an action never contains `-`. A left part
    /// without `-` is the action when it is a known action code, else the source.
    pub fn parse(raw: &str) -> LeadSource {
        let (left, offer) = match raw.split_once('|') {
            Some((left, right)) => (left, Offer::parse(right)),
            None => (raw, None),
        };
        let left = left.trim();
        let (source, action) = match left.rsplit_once('-') {
            Some((source, action)) => (
                non_empty(source),
                non_empty(action).as_deref().map(Action::parse),
            ),
            None => match Action::parse(left) {
                Action::Unknown => (None, None),
                Action::Other(_) => (Some(left.to_owned()), None),
                known => (None, Some(known)),
            },
        };
        LeadSource {
            raw: raw.to_owned(),
            source,
            action,
            offer,
        }
    }
}

/// What the customer did, from `LeadSource` or `ActionCode`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// `INS`: "Get it now" / install.
    Install,
    /// `PLT`: partner-led trial, "Contact me".
    PartnerLedTrial,
    /// `DNC`: this customer must not be contacted.
    DoNotContact,
    /// `Create`: purchase in the Azure portal.
    Create,
    /// `StartTestDrive`: a test drive started.
    StartTestDrive,
    /// Any other code, verbatim (trimmed).
    Other(String),
    /// No code at all.
    Unknown,
}

impl Action {
    /// Case-insensitive for the known codes; surrounding whitespace ignored;
    /// empty text is `Unknown`.
    pub fn parse(code: &str) -> Action {
        const KNOWN: [(&str, Action); 5] = [
            ("INS", Action::Install),
            ("PLT", Action::PartnerLedTrial),
            ("DNC", Action::DoNotContact),
            ("Create", Action::Create),
            ("StartTestDrive", Action::StartTestDrive),
        ];
        let code = code.trim();
        if code.is_empty() {
            return Action::Unknown;
        }
        KNOWN
            .into_iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(code))
            .map_or_else(|| Action::Other(code.to_owned()), |(_, action)| action)
    }

    /// The marketplace's code: `INS`, `PLT`, `DNC`, `Create`, `StartTestDrive`;
    /// the verbatim text for `Other`; `""` for `Unknown`.
    pub fn code(&self) -> &str {
        match self {
            Action::Install => "INS",
            Action::PartnerLedTrial => "PLT",
            Action::DoNotContact => "DNC",
            Action::Create => "Create",
            Action::StartTestDrive => "StartTestDrive",
            Action::Other(code) => code,
            Action::Unknown => "",
        }
    }

    /// The funnel stage sales qualifies by.
    pub fn stage(&self) -> Stage {
        match self {
            Action::Install | Action::Create => Stage::Active,
            Action::StartTestDrive => Stage::Trial,
            Action::PartnerLedTrial => Stage::InitialInterest,
            Action::DoNotContact => Stage::DoNotContact,
            Action::Other(_) | Action::Unknown => Stage::Unknown,
        }
    }
}

/// The lead's stage in the funnel, ordered from least to most engaged, with
/// `DoNotContact` last so that it wins when stages are merged by maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Unknown,
    InitialInterest,
    Trial,
    Active,
    DoNotContact,
}

impl Stage {
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Unknown => "unknown",
            Stage::InitialInterest => "initial_interest",
            Stage::Trial => "trial",
            Stage::Active => "active",
            Stage::DoNotContact => "do_not_contact",
        }
    }
}

impl From<&Action> for Stage {
    fn from(action: &Action) -> Stage {
        action.stage()
    }
}

/// A marketplace offer, `publisherid.offerid`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Offer {
    /// The trimmed text the offer was parsed from.
    pub raw: String,
    pub publisher_id: Option<String>,
    /// Never empty.
    pub offer_id: String,
}

impl Offer {
    /// Splits at the first `.`, since offer ids may contain `.` and `-` but
    /// publisher ids do not. Without a `.`, or with nothing on one side of it,
    /// the whole (trimmed) text is the offer id. `None` for empty text.
    pub fn parse(s: &str) -> Option<Offer> {
        let raw = s.trim();
        if raw.is_empty() {
            return None;
        }
        let (publisher_id, offer_id) = match raw.split_once('.') {
            Some((publisher, offer))
                if !publisher.trim().is_empty() && !offer.trim().is_empty() =>
            {
                (Some(publisher.trim().to_owned()), offer.trim().to_owned())
            }
            _ => (None, raw.to_owned()),
        };
        Some(Offer {
            raw: raw.to_owned(),
            publisher_id,
            offer_id,
        })
    }
}

/// The person behind the lead, from `CustomerInfo`. Every field is trimmed and
/// `None` when missing, null, empty or whitespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<Email>,
    pub phone: Option<String>,
    pub country: Option<String>,
    pub company: Option<String>,
    pub title: Option<String>,
}

impl Customer {
    pub fn is_empty(&self) -> bool {
        self == &Customer::default()
    }

    fn strings(&self) -> impl Iterator<Item = &str> {
        [
            self.first_name.as_deref(),
            self.last_name.as_deref(),
            self.email.as_ref().map(|email| email.original.as_str()),
            self.phone.as_deref(),
            self.country.as_deref(),
            self.company.as_deref(),
            self.title.as_deref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// An email address as the marketplace sent it, and a form to compare by.
///
/// Not validated: the marketplace sends odd values (and withholds `.edu`
/// details), and a lead with an odd address is still a lead.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Email {
    /// Trimmed, otherwise unchanged.
    pub original: String,
    /// Trimmed and lowercased.
    pub normalized: String,
}

impl Email {
    /// `None` for empty or whitespace-only text.
    pub fn parse(s: &str) -> Option<Email> {
        let original = non_empty(s)?;
        Some(Email {
            normalized: original.to_lowercase(),
            original,
        })
    }
}

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

fn non_empty(s: &str) -> Option<String> {
    let trimmed = s.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Map};
    use time::macros::datetime;

    /// `normalise` keeps each column's and field's candidates at its place in `ALL`.
    #[test]
    fn every_known_column_and_field_is_at_its_own_place_in_all() {
        for (i, column) in Column::ALL.into_iter().enumerate() {
            assert_eq!(column as usize, i, "{}", column.name());
        }
        for (i, field) in Field::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, i, "{}", field.name());
        }
    }

    fn row_with(columns: Value) -> RawRow {
        let Value::Object(columns) = columns else {
            panic!("test columns must be a JSON object");
        };
        RawRow {
            id: RowId::new("pk-1", "rk-1"),
            etag: "W/\"datetime'2024-05-06T07%3A08%3A09.1234567Z'\"".to_owned(),
            timestamp: datetime!(2024-05-06 07:08:09.1234567 UTC),
            columns,
        }
    }

    fn event(columns: Value) -> LeadEvent {
        normalise(&row_with(columns)).expect("row should normalise")
    }

    fn rejection(columns: Value) -> Rejection {
        normalise(&row_with(columns)).expect_err("row should be rejected")
    }

    fn customer_info(info: Value) -> LeadEvent {
        event(json!({ "CustomerInfo": info.to_string() }))
    }

    fn offer(publisher: &str, id: &str) -> Offer {
        Offer {
            raw: format!("{publisher}.{id}"),
            publisher_id: Some(publisher.to_owned()),
            offer_id: id.to_owned(),
        }
    }

    // LeadSource

    #[test]
    fn leadsource_azure_marketplace_install_parses_into_source_action_and_offer() {
        let raw = "AzureMarketplace-INS | checkpoint.check-point-r77-10sg-byol";

        let parsed = LeadSource::parse(raw);

        assert_eq!(
            parsed,
            LeadSource {
                raw: raw.to_owned(),
                source: Some("AzureMarketplace".to_owned()),
                action: Some(Action::Install),
                offer: Some(offer("checkpoint", "check-point-r77-10sg-byol")),
            }
        );
    }

    #[test]
    fn leadsource_with_a_parenthesised_source_and_no_spaces_parses() {
        let parsed = LeadSource::parse("AppSource (SPZA)-PLT|bitnami.openedxcypress");

        assert_eq!(parsed.source.as_deref(), Some("AppSource (SPZA)"));
        assert_eq!(parsed.action, Some(Action::PartnerLedTrial));
        assert_eq!(parsed.offer, Some(offer("bitnami", "openedxcypress")));
    }

    #[test]
    fn leadsource_with_spaces_around_the_separators_parses() {
        let parsed = LeadSource::parse("SPZA - DNC | x.y");

        assert_eq!(parsed.source.as_deref(), Some("SPZA"));
        assert_eq!(parsed.action, Some(Action::DoNotContact));
        assert_eq!(parsed.offer, Some(offer("x", "y")));
    }

    #[test]
    fn leadsource_test_drive_parses_with_a_dash_in_the_offer() {
        let parsed = LeadSource::parse("TestDrive-StartTestDrive | a.b-c");

        assert_eq!(parsed.source.as_deref(), Some("TestDrive"));
        assert_eq!(parsed.action, Some(Action::StartTestDrive));
        assert_eq!(parsed.offer, Some(offer("a", "b-c")));
    }

    #[test]
    fn leadsource_azure_portal_create_parses() {
        let parsed = LeadSource::parse("AzurePortal-Create | pub.offer");

        assert_eq!(parsed.source.as_deref(), Some("AzurePortal"));
        assert_eq!(parsed.action, Some(Action::Create));
        assert_eq!(parsed.offer, Some(offer("pub", "offer")));
    }

    #[test]
    fn leadsource_spacing_variants_all_parse_alike() {
        let variants = [
            "AppSource (SPZA)-PLT|bitnami.openedxcypress",
            "AppSource (SPZA) - PLT | bitnami.openedxcypress",
            "  AppSource (SPZA)-  PLT|  bitnami.openedxcypress  ",
            "AppSource (SPZA) -PLT |bitnami.openedxcypress",
            "\tAppSource (SPZA)\t-\tPLT\t|\tbitnami.openedxcypress\n",
        ];

        for variant in variants {
            let parsed = LeadSource::parse(variant);

            assert_eq!(parsed.raw, variant);
            assert_eq!(
                parsed.source.as_deref(),
                Some("AppSource (SPZA)"),
                "{variant:?}"
            );
            assert_eq!(parsed.action, Some(Action::PartnerLedTrial), "{variant:?}");
            assert_eq!(
                parsed.offer,
                Some(offer("bitnami", "openedxcypress")),
                "{variant:?}"
            );
        }
    }

    #[test]
    fn leadsource_with_unknown_source_and_action_keeps_them_verbatim() {
        let parsed = LeadSource::parse("Foo Bar-Zap | a.b");

        assert_eq!(parsed.source.as_deref(), Some("Foo Bar"));
        assert_eq!(parsed.action, Some(Action::Other("Zap".to_owned())));
        assert_eq!(parsed.offer, Some(offer("a", "b")));
    }

    #[test]
    fn leadsource_action_codes_are_case_insensitive() {
        let parsed = LeadSource::parse("AzureMarketplace-ins | a.b");

        assert_eq!(parsed.action, Some(Action::Install));
    }

    #[test]
    fn leadsource_without_an_offer_part_has_no_offer() {
        for raw in [
            "AzureMarketplace-INS",
            "AzureMarketplace-INS |",
            "AzureMarketplace-INS |   ",
        ] {
            let parsed = LeadSource::parse(raw);

            assert_eq!(
                parsed.source.as_deref(),
                Some("AzureMarketplace"),
                "{raw:?}"
            );
            assert_eq!(parsed.action, Some(Action::Install), "{raw:?}");
            assert_eq!(parsed.offer, None, "{raw:?}");
        }
    }

    #[test]
    fn leadsource_without_a_dash_is_an_action_when_it_is_a_known_code() {
        let parsed = LeadSource::parse("dnc | a.b");

        assert_eq!(parsed.source, None);
        assert_eq!(parsed.action, Some(Action::DoNotContact));
    }

    #[test]
    fn leadsource_without_a_dash_is_a_source_otherwise() {
        let parsed = LeadSource::parse("AppSource (SPZA) | a.b");

        assert_eq!(parsed.source.as_deref(), Some("AppSource (SPZA)"));
        assert_eq!(parsed.action, None);
    }

    #[test]
    fn leadsource_with_empty_parts_around_the_dash_has_none_for_them() {
        let no_action = LeadSource::parse("AzureMarketplace- | a.b");
        let no_source = LeadSource::parse(" -INS | a.b");

        assert_eq!(no_action.source.as_deref(), Some("AzureMarketplace"));
        assert_eq!(no_action.action, None);
        assert_eq!(no_source.source, None);
        assert_eq!(no_source.action, Some(Action::Install));
    }

    #[test]
    fn leadsource_with_only_an_offer_part_has_only_an_offer() {
        let parsed = LeadSource::parse(" | a.b");

        assert_eq!(parsed.source, None);
        assert_eq!(parsed.action, None);
        assert_eq!(parsed.offer, Some(offer("a", "b")));
    }

    #[test]
    fn empty_leadsource_is_all_none() {
        let parsed = LeadSource::parse("");

        assert_eq!(
            parsed,
            LeadSource {
                raw: String::new(),
                source: None,
                action: None,
                offer: None
            }
        );
    }

    // Offer, Action, Stage, Email

    #[test]
    fn offer_splits_at_the_first_dot() {
        let parsed = Offer::parse("docusign.3701c77e-1cfa-4c56-91e6-3ed0b622145a");
        let dotted = Offer::parse("pub.offer.v2");

        assert_eq!(
            parsed,
            Some(offer("docusign", "3701c77e-1cfa-4c56-91e6-3ed0b622145a"))
        );
        assert_eq!(dotted, Some(offer("pub", "offer.v2")));
    }

    #[test]
    fn offer_without_a_usable_dot_is_all_offer_id() {
        for raw in ["standalone-offer", ".offer", "publisher."] {
            let parsed = Offer::parse(raw);

            assert_eq!(
                parsed,
                Some(Offer {
                    raw: raw.to_owned(),
                    publisher_id: None,
                    offer_id: raw.to_owned()
                })
            );
        }
    }

    #[test]
    fn offer_of_empty_text_is_none() {
        assert_eq!(Offer::parse("  "), None);
    }

    #[test]
    fn action_parse_is_case_insensitive_and_trims() {
        let cases = [
            ("INS", Action::Install),
            ("ins", Action::Install),
            (" Ins ", Action::Install),
            ("plt", Action::PartnerLedTrial),
            ("Dnc", Action::DoNotContact),
            ("CREATE", Action::Create),
            ("starttestdrive", Action::StartTestDrive),
            (" Zap ", Action::Other("Zap".to_owned())),
            ("", Action::Unknown),
            ("   ", Action::Unknown),
        ];

        for (code, expected) in cases {
            assert_eq!(Action::parse(code), expected, "{code:?}");
        }
    }

    #[test]
    fn action_code_gives_the_marketplace_code_back() {
        let actions = [
            Action::Install,
            Action::PartnerLedTrial,
            Action::DoNotContact,
            Action::Create,
            Action::StartTestDrive,
            Action::Other("Zap".to_owned()),
        ];

        for action in actions {
            assert_eq!(Action::parse(action.code()), action);
        }
        assert_eq!(Action::Unknown.code(), "");
    }

    #[test]
    fn stage_follows_the_action() {
        let cases = [
            (Action::Install, Stage::Active),
            (Action::Create, Stage::Active),
            (Action::StartTestDrive, Stage::Trial),
            (Action::PartnerLedTrial, Stage::InitialInterest),
            (Action::DoNotContact, Stage::DoNotContact),
            (Action::Other("Zap".to_owned()), Stage::Unknown),
            (Action::Unknown, Stage::Unknown),
        ];

        for (action, stage) in cases {
            assert_eq!(Stage::from(&action), stage, "{action:?}");
        }
    }

    #[test]
    fn stage_as_str_matches_its_serialised_form() {
        let stages = [
            Stage::Unknown,
            Stage::InitialInterest,
            Stage::Trial,
            Stage::Active,
            Stage::DoNotContact,
        ];

        for stage in stages {
            let serialised = serde_json::to_value(stage).expect("stage serialises");

            assert_eq!(serialised, json!(stage.as_str()));
        }
    }

    #[test]
    fn email_is_trimmed_and_lowercased_for_comparison() {
        let parsed = Email::parse("  JSmith@Contoso.COM ");

        assert_eq!(
            parsed,
            Some(Email {
                original: "JSmith@Contoso.COM".to_owned(),
                normalized: "jsmith@contoso.com".to_owned(),
            })
        );
    }

    #[test]
    fn email_without_an_at_sign_is_kept() {
        let parsed = Email::parse(" Not An Address ");

        assert_eq!(
            parsed.map(|email| email.normalized),
            Some("not an address".to_owned())
        );
    }

    #[test]
    fn email_of_whitespace_is_none() {
        assert_eq!(Email::parse(" \t\n"), None);
        assert_eq!(Email::parse(""), None);
    }

    // normalise

    #[test]
    fn typical_row_becomes_a_complete_lead_event() {
        let columns = json!({
            "LeadSource": "AzureMarketplace-INS | checkpoint.check-point-r77-10sg-byol",
            "ActionCode": "INS",
            "CustomerInfo": r#"{"FirstName":"John","LastName":"Smith","Email":"jsmith@contoso.com","Phone":"1234567890","Country":"US","Company":"Contoso","Title":"CTO"}"#,
            "OfferDisplayName": "Check Point CloudGuard",
            "Description": "Wants a demo",
            "CreatedTime": " 2024-05-06T07:08:00Z ",
        });

        let lead = event(columns);

        assert_eq!(lead.row, RowId::new("pk-1", "rk-1"));
        assert_eq!(lead.timestamp, datetime!(2024-05-06 07:08:09.1234567 UTC));
        assert_eq!(lead.lead_source.source.as_deref(), Some("AzureMarketplace"));
        assert_eq!(lead.action, Action::Install);
        assert_eq!(lead.stage, Stage::Active);
        assert_eq!(
            lead.offer,
            Some(offer("checkpoint", "check-point-r77-10sg-byol"))
        );
        assert_eq!(lead.offer_title.as_deref(), Some("Check Point CloudGuard"));
        assert_eq!(
            lead.customer,
            Customer {
                first_name: Some("John".to_owned()),
                last_name: Some("Smith".to_owned()),
                email: Email::parse("jsmith@contoso.com"),
                phone: Some("1234567890".to_owned()),
                country: Some("US".to_owned()),
                company: Some("Contoso".to_owned()),
                title: Some("CTO".to_owned()),
            }
        );
        assert_eq!(lead.description.as_deref(), Some("Wants a demo"));
        assert_eq!(lead.created_time.as_deref(), Some("2024-05-06T07:08:00Z"));
        assert!(!lead.test_lead);
        assert!(lead.notes.is_empty(), "{:?}", lead.notes);
        assert!(lead.extra.is_empty(), "{:?}", lead.extra);
    }

    #[test]
    fn column_names_are_case_insensitive() {
        let columns = json!({
            "leadsource": "AzurePortal-Create | pub.offer",
            "CUSTOMERINFO": r#"{"FirstName":"Ana"}"#,
            "offerdisplayname": "Offer",
            "DESCRIPTION": "Hi",
            "createdTime": "2024-01-01",
        });

        let lead = event(columns);

        assert_eq!(lead.action, Action::Create);
        assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"));
        assert_eq!(lead.offer_title.as_deref(), Some("Offer"));
        assert_eq!(lead.description.as_deref(), Some("Hi"));
        assert_eq!(lead.created_time.as_deref(), Some("2024-01-01"));
        assert!(lead.extra.is_empty(), "{:?}", lead.extra);
    }

    #[test]
    fn customer_info_keys_are_case_insensitive() {
        let info = json!({
            "firstName": "Ana", "LASTNAME": "Lima", "email": "a@b.c",
            "phone": "1", "COUNTRY": "BR", "company": "Acme", "tItLe": "CEO",
        });

        let lead = customer_info(info);

        assert_eq!(
            lead.customer,
            Customer {
                first_name: Some("Ana".to_owned()),
                last_name: Some("Lima".to_owned()),
                email: Email::parse("a@b.c"),
                phone: Some("1".to_owned()),
                country: Some("BR".to_owned()),
                company: Some("Acme".to_owned()),
                title: Some("CEO".to_owned()),
            }
        );
    }

    #[test]
    fn customer_info_nested_in_user_details_is_read_in_either_casing() {
        for key in ["UserDetails", "userDetails"] {
            let info = json!({ key: { "FirstName": "Ana", "email": "A@B.C" } });

            let lead = customer_info(info);

            assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"), "{key}");
            assert_eq!(
                lead.customer.email.map(|e| e.normalized).as_deref(),
                Some("a@b.c"),
                "{key}"
            );
            assert!(lead.extra.is_empty(), "{:?}", lead.extra);
        }
    }

    #[test]
    fn flat_customer_fields_win_over_user_details_and_the_other_value_is_kept() {
        let info = json!({ "FirstName": "Flat", "UserDetails": { "FirstName": "Nested", "LastName": "Only" } });

        let lead = customer_info(info);

        assert_eq!(lead.customer.first_name.as_deref(), Some("Flat"));
        assert_eq!(lead.customer.last_name.as_deref(), Some("Only"));
        assert_eq!(
            lead.extra.get("CustomerInfo.UserDetails.FirstName"),
            Some(&json!("Nested"))
        );
        assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
    }

    #[test]
    fn user_details_that_is_not_an_object_is_kept_in_extra() {
        let info = json!({ "FirstName": "Ana", "UserDetails": "see CRM" });

        let lead = customer_info(info);

        assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"));
        assert_eq!(
            lead.extra.get("CustomerInfo.UserDetails"),
            Some(&json!("see CRM"))
        );
        assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
    }

    #[test]
    fn missing_empty_null_or_whitespace_customer_fields_are_none_and_others_are_trimmed() {
        let info = json!({
            "FirstName": "", "LastName": null, "Email": "   ", "Phone": "\t",
            "Company": "  Contoso  ",
        });

        let lead = customer_info(info);

        assert_eq!(
            lead.customer,
            Customer {
                company: Some("Contoso".to_owned()),
                ..Customer::default()
            }
        );
    }

    #[test]
    fn offer_display_name_is_preferred_over_offer_title() {
        let lead = event(json!({ "OfferDisplayName": "Display", "OfferTitle": "Title" }));

        assert_eq!(lead.offer_title.as_deref(), Some("Display"));
        assert!(
            lead.notes.iter().any(|n| n.contains("\"Title\"")),
            "{:?}",
            lead.notes
        );
    }

    #[test]
    fn offer_title_is_used_when_display_name_is_missing_or_empty() {
        let missing = event(json!({ "OfferTitle": " Title " }));
        let empty = event(json!({ "OfferDisplayName": "  ", "offertitle": "Title" }));

        assert_eq!(missing.offer_title.as_deref(), Some("Title"));
        assert_eq!(empty.offer_title.as_deref(), Some("Title"));
        assert!(empty.notes.is_empty(), "{:?}", empty.notes);
    }

    #[test]
    fn customer_email_is_normalised_and_the_original_kept_trimmed() {
        let lead = customer_info(json!({ "Email": "  JSmith@Contoso.COM " }));

        let email = lead.customer.email.expect("email present");

        assert_eq!(email.original, "JSmith@Contoso.COM");
        assert_eq!(email.normalized, "jsmith@contoso.com");
    }

    #[test]
    fn action_code_column_is_the_action_when_leadsource_has_none() {
        let lead = event(json!({ "LeadSource": "AzureMarketplace | a.b", "ActionCode": "plt" }));

        assert_eq!(lead.action, Action::PartnerLedTrial);
        assert_eq!(lead.stage, Stage::InitialInterest);
        assert!(lead.notes.is_empty(), "{:?}", lead.notes);
    }

    #[test]
    fn action_code_that_disagrees_with_leadsource_is_noted_and_leadsource_wins() {
        let lead =
            event(json!({ "LeadSource": "AzureMarketplace-INS | a.b", "ActionCode": "PLT" }));

        assert_eq!(lead.action, Action::Install);
        assert_eq!(lead.stage, Stage::Active);
        assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
        assert!(
            lead.notes[0]
                .starts_with("LeadSource action \"INS\" disagrees with ActionCode \"PLT\""),
            "{:?}",
            lead.notes
        );
    }

    #[test]
    fn action_code_that_agrees_in_another_case_adds_no_note() {
        let lead =
            event(json!({ "LeadSource": "AzureMarketplace-INS | a.b", "ActionCode": " ins " }));

        assert_eq!(lead.action, Action::Install);
        assert!(lead.notes.is_empty(), "{:?}", lead.notes);
    }

    #[test]
    fn row_without_any_action_has_unknown_action_and_stage() {
        let lead = event(json!({ "CustomerInfo": "" }));

        assert_eq!(lead.action, Action::Unknown);
        assert_eq!(lead.stage, Stage::Unknown);
        assert_eq!(lead.lead_source, LeadSource::parse(""));
        assert_eq!(lead.offer, None);
        assert!(lead.customer.is_empty());
    }

    #[test]
    fn msft_test_lead_is_flagged_and_otherwise_unchanged() {
        let marker = "MSFT_TEST_636737558587117715";
        let info = json!({
            "FirstName": marker, "LastName": marker, "Email": marker, "Phone": marker,
            "Country": marker, "Company": marker, "Title": marker,
        });

        let lead = customer_info(info);

        assert!(lead.test_lead);
        assert_eq!(lead.customer.first_name.as_deref(), Some(marker));
        assert_eq!(
            lead.customer.email.map(|e| e.original).as_deref(),
            Some(marker)
        );
        assert!(lead.notes.is_empty(), "{:?}", lead.notes);
    }

    #[test]
    fn msft_test_marker_in_any_single_field_flags_a_test_lead() {
        let marker = "MSFT_TEST_636737558587117715";
        let rows = [
            json!({ "CustomerInfo": json!({ "Company": format!("x {marker}") }).to_string() }),
            json!({ "CustomerInfo": json!({ "Email": format!("{marker}@x.y") }).to_string() }),
            json!({ "OfferTitle": marker }),
            json!({ "Description": marker }),
        ];

        for columns in rows {
            let lead = event(columns.clone());

            assert!(lead.test_lead, "{columns}");
        }
    }

    #[test]
    fn lowercase_msft_test_text_is_not_a_test_lead() {
        let lead = customer_info(json!({ "FirstName": "msft_test_636737558587117715" }));

        assert!(!lead.test_lead);
    }

    #[test]
    fn customer_info_that_is_not_json_rejects_the_row_and_names_it() {
        let rejected = rejection(json!({ "CustomerInfo": "{FirstName: John" }));

        assert_eq!(rejected.row, RowId::new("pk-1", "rk-1"));
        assert!(
            rejected
                .reason
                .starts_with("CustomerInfo is not valid JSON: "),
            "{}",
            rejected.reason
        );
        let message = rejected.to_string();
        assert!(
            message.contains("PartitionKey=\"pk-1\" RowKey=\"rk-1\""),
            "{message}"
        );
    }

    #[test]
    fn customer_info_that_is_json_but_not_an_object_is_rejected() {
        let cases = [
            ("[1]", "an array"),
            ("\"x\"", "a string"),
            ("42", "a number"),
            ("null", "null"),
            ("true", "a boolean"),
        ];

        for (info, kind) in cases {
            let rejected = rejection(json!({ "CustomerInfo": info }));

            assert!(
                rejected.reason.starts_with(&format!(
                    "CustomerInfo is JSON but not an object: it is {kind}"
                )),
                "{info}: {}",
                rejected.reason
            );
        }
    }

    #[test]
    fn rejection_quotes_none_of_the_customer_info_only_its_length() {
        for info in [
            "{not json ana.silva@fabrikam.com".to_owned(),
            format!("{{not json {}ana@x.y", "é🙂".repeat(3_000)),
            "[\"ana.silva@fabrikam.com\"]".to_owned(),
        ] {
            let rejected = rejection(json!({ "CustomerInfo": info }));

            assert!(!rejected.reason.contains('@'), "{}", rejected.reason);
            assert!(!rejected.reason.contains("ana"), "{}", rejected.reason);
            assert!(
                rejected
                    .reason
                    .contains(&format!("of {} chars", info.chars().count())),
                "{}",
                rejected.reason
            );
        }
    }

    #[test]
    fn missing_empty_or_empty_object_customer_info_gives_an_empty_customer() {
        let rows = [
            json!({ "LeadSource": "SPZA-PLT | a.b" }),
            json!({ "CustomerInfo": "" }),
            json!({ "CustomerInfo": "   " }),
            json!({ "CustomerInfo": null }),
            json!({ "CustomerInfo": "{}" }),
            json!({ "CustomerInfo": "{\"UserDetails\":{}}" }),
        ];

        for columns in rows {
            let lead = event(columns.clone());

            assert!(lead.customer.is_empty(), "{columns}");
            assert!(lead.extra.is_empty(), "{columns}");
        }
    }

    #[test]
    fn customer_info_given_as_an_object_value_is_read() {
        let lead = event(json!({ "CustomerInfo": { "FirstName": "Ana" } }));

        assert_eq!(lead.customer.first_name.as_deref(), Some("Ana"));
    }

    #[test]
    fn hostile_strings_survive_unchanged_except_trimming() {
        let company = "C".repeat(5_000);
        let hostile = [
            "Robert'); DROP TABLE leads;--",
            "\"quoted\" \\ back\\slash",
            "<script>alert(1)</script>",
            "evil\u{202E}gnp.exe",
            "🦀 emoji 👩‍👩‍👧",
            "nul\0byte",
        ];
        let info = json!({
            "FirstName": format!("  {}  ", hostile[0]),
            "LastName": hostile[1],
            "Title": hostile[2],
            "Email": hostile[3],
            "Country": hostile[4],
            "Phone": hostile[5],
            "Company": company,
        });

        let lead = event(json!({
            "CustomerInfo": info.to_string(),
            "Description": hostile[2],
            "OfferDisplayName": hostile[3],
        }));

        let customer = lead.customer;
        assert_eq!(customer.first_name.as_deref(), Some(hostile[0]));
        assert_eq!(customer.last_name.as_deref(), Some(hostile[1]));
        assert_eq!(customer.title.as_deref(), Some(hostile[2]));
        assert_eq!(
            customer.email.map(|e| e.original).as_deref(),
            Some(hostile[3])
        );
        assert_eq!(customer.country.as_deref(), Some(hostile[4]));
        assert_eq!(customer.phone.as_deref(), Some(hostile[5]));
        assert_eq!(customer.company.map(|c| c.len()), Some(5_000));
        assert_eq!(lead.description.as_deref(), Some(hostile[2]));
        assert_eq!(lead.offer_title.as_deref(), Some(hostile[3]));
    }

    #[test]
    fn non_string_column_values_are_read_by_their_json_text() {
        let columns = json!({
            "LeadSource": 42,
            "ActionCode": true,
            "CustomerInfo": r#"{"Phone": 1234567890, "FirstName": false, "Company": 1.5, "Title": null}"#,
            "OfferTitle": 7,
            "Description": null,
            "CreatedTime": 1_714_979_289,
        });

        let lead = event(columns);

        assert_eq!(lead.lead_source.raw, "42");
        assert_eq!(lead.lead_source.source.as_deref(), Some("42"));
        assert_eq!(lead.action, Action::Other("true".to_owned()));
        assert_eq!(lead.customer.phone.as_deref(), Some("1234567890"));
        assert_eq!(lead.customer.first_name.as_deref(), Some("false"));
        assert_eq!(lead.customer.company.as_deref(), Some("1.5"));
        assert_eq!(lead.customer.title, None);
        assert_eq!(lead.offer_title.as_deref(), Some("7"));
        assert_eq!(lead.description, None);
        assert_eq!(lead.created_time.as_deref(), Some("1714979289"));
    }

    #[test]
    fn customer_info_that_is_a_number_column_is_rejected_not_panicked_on() {
        let rejected = rejection(json!({ "CustomerInfo": 42 }));

        assert!(rejected.reason.contains("a number"), "{}", rejected.reason);
    }

    #[test]
    fn description_noise_is_dropped() {
        for noise in [
            "",
            " ",
            "\t\n",
            "Campaigns:",
            "Campaigns: ",
            "  Campaign Name :  ",
        ] {
            let lead = event(json!({ "Description": noise }));

            assert_eq!(lead.description, None, "{noise:?}");
        }
    }

    #[test]
    fn real_descriptions_are_kept_trimmed() {
        let cases = [
            (" Campaigns: spring ", "Campaigns: spring"),
            ("Call me: 10am", "Call me: 10am"),
            ("Budget 2024:", "Budget 2024:"),
            (":", ":"),
        ];

        for (description, kept) in cases {
            let lead = event(json!({ "Description": description }));

            assert_eq!(lead.description.as_deref(), Some(kept), "{description:?}");
        }
    }

    #[test]
    fn unknown_columns_go_to_extra_under_their_original_names() {
        let lead = event(json!({
            "LeadSource": "SPZA-PLT | a.b",
            "LeadId": "abc",
            "Score": 3,
            "Empty": null,
            "PartitionKey": "pk-1",
            "rowkey": "rk-1",
            "Timestamp": "2024-05-06T07:08:09.1234567Z",
        }));

        let expected: BTreeMap<String, Value> = [
            ("Empty".to_owned(), Value::Null),
            ("LeadId".to_owned(), json!("abc")),
            ("Score".to_owned(), json!(3)),
        ]
        .into_iter()
        .collect();
        assert_eq!(lead.extra, expected);
    }

    #[test]
    fn unknown_customer_info_keys_go_to_extra_with_a_prefix() {
        let info =
            json!({ "FirstName": "Ana", "Industry": "Retail", "UserDetails": { "Size": 10 } });

        let lead = customer_info(info);

        assert_eq!(
            lead.extra.get("CustomerInfo.Industry"),
            Some(&json!("Retail"))
        );
        assert_eq!(
            lead.extra.get("CustomerInfo.UserDetails.Size"),
            Some(&json!(10))
        );
        assert_eq!(lead.extra.len(), 2, "{:?}", lead.extra);
    }

    #[test]
    fn a_column_under_two_spellings_keeps_the_documented_one_and_the_other_in_extra() {
        let lead = event(json!({
            "leadsource": "SPZA-DNC | x.y",
            "LeadSource": "AzureMarketplace-INS | a.b",
        }));

        assert_eq!(lead.action, Action::Install);
        assert_eq!(lead.extra.get("leadsource"), Some(&json!("SPZA-DNC | x.y")));
        assert_eq!(lead.notes.len(), 1, "{:?}", lead.notes);
    }

    #[test]
    fn a_column_under_two_spellings_with_the_same_value_is_read_once_silently() {
        let lead = event(json!({ "description": "Hi", "Description": " Hi " }));

        assert_eq!(lead.description.as_deref(), Some("Hi"));
        assert!(lead.extra.is_empty(), "{:?}", lead.extra);
        assert!(lead.notes.is_empty(), "{:?}", lead.notes);
    }

    #[test]
    fn lead_event_serialisation_keeps_the_timestamp_at_100ns() {
        let lead = event(json!({ "LeadSource": "SPZA-PLT | a.b" }));

        let serialised = serde_json::to_string(&lead).expect("event serialises");
        let back: LeadEvent = serde_json::from_str(&serialised).expect("event deserialises");

        assert!(
            serialised.contains("2024-05-06T07:08:09.1234567Z"),
            "{serialised}"
        );
        assert_eq!(back, lead);
    }

    // Properties

    const KNOWN_COLUMNS: [&str; 10] = [
        "LeadSource",
        "ActionCode",
        "CustomerInfo",
        "OfferDisplayName",
        "OfferTitle",
        "Description",
        "CreatedTime",
        "PartitionKey",
        "RowKey",
        "Timestamp",
    ];

    const CUSTOMER_KEYS: [&str; 8] = [
        "FirstName",
        "LastName",
        "Email",
        "Phone",
        "Country",
        "Company",
        "Title",
        "UserDetails",
    ];

    fn random_case(names: &'static [&'static str]) -> impl Strategy<Value = String> {
        (
            prop::sample::select(names),
            prop::collection::vec(any::<bool>(), 32),
        )
            .prop_map(|(name, upper)| {
                name.chars()
                    .zip(upper.into_iter().cycle())
                    .map(|(c, up)| {
                        if up {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect()
            })
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<String>().prop_map(Value::String),
            "[ a-zA-Z|.()_-]{0,40}".prop_map(Value::String),
            Just(json!("MSFT_TEST_1")),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((customer_key(), inner), 0..4)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn customer_key() -> impl Strategy<Value = String> {
        prop_oneof![random_case(&CUSTOMER_KEYS), any::<String>()]
    }

    fn customer_info_object() -> impl Strategy<Value = String> {
        prop::collection::vec((customer_key(), json_value()), 0..10)
            .prop_map(|entries| Value::Object(entries.into_iter().collect()).to_string())
    }

    fn customer_info_text() -> impl Strategy<Value = String> {
        let object = customer_info_object;
        prop_oneof![
            any::<String>(),
            object(),
            object(),
            // A valid object with its end cut off or garbage after it.
            (object(), any::<usize>()).prop_map(|(text, cut)| {
                text.chars()
                    .take(cut % (text.chars().count() + 1))
                    .collect()
            }),
            (object(), any::<String>()).prop_map(|(text, tail)| text + &tail),
            json_value().prop_map(|value| value.to_string()),
        ]
    }

    fn columns() -> impl Strategy<Value = Map<String, Value>> {
        let key = prop_oneof![random_case(&KNOWN_COLUMNS), any::<String>()];
        let customer_info = (random_case(&["CustomerInfo"]), customer_info_text());
        (
            prop::collection::vec((key, scalar()), 0..12),
            prop::option::of(customer_info),
        )
            .prop_map(|(entries, info)| {
                let mut columns: Map<String, Value> = entries.into_iter().collect();
                if let Some((name, text)) = info {
                    columns.insert(name, Value::String(text));
                }
                columns
            })
    }

    /// A `CustomerInfo` object's text as a client may write it: members in any order,
    /// keys repeated, some keys escaped.
    fn customer_info_members() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            4 => customer_key(),
            1 => Just("First\\u004eame".to_owned()),
        ];
        prop::collection::vec((key, json_value(), any::<bool>()), 0..10).prop_map(|members| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(key, value, raw)| {
                    // A key given as `\u0045mail` spelled out rather than as JSON text.
                    let key = if raw && key.contains('\\') {
                        format!("\"{key}\"")
                    } else {
                        Value::String(key).to_string()
                    };
                    format!("{key}:{value}")
                })
                .collect();
            format!("{{{}}}", members.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// `CustomerInfo` as text (read with borrowed keys) and as the object serde_json
        /// makes of the same text (a `Map`) normalise to the same lead or rejection.
        #[test]
        fn customer_info_text_reads_as_the_object_it_holds(text in customer_info_members()) {
            let Ok(object @ Value::Object(_)) = serde_json::from_str::<Value>(&text) else {
                return Ok(()); // not an object after all (a key spelled out badly)
            };
            let as_text = normalise(&row_with(json!({ "CustomerInfo": text })));
            let as_object = normalise(&row_with(json!({ "CustomerInfo": object })));
            prop_assert_eq!(as_text, as_object);
        }

        #[test]
        fn normalise_never_panics_on_arbitrary_columns(columns in columns()) {
            let row = row_with(Value::Object(columns.clone()));

            let outcome = normalise(&row);

            match outcome {
                Ok(lead) => {
                    prop_assert_eq!(&lead.row, &row.id);
                    prop_assert_eq!(lead.stage, lead.action.stage());
                    for key in lead.extra.keys() {
                        prop_assert!(
                            columns.contains_key(key) || key.starts_with("CustomerInfo."),
                            "extra key {:?} came from nowhere", key
                        );
                        prop_assert!(
                            !["PartitionKey", "RowKey", "Timestamp"].iter().any(|s| s.eq_ignore_ascii_case(key)),
                            "system column {:?} in extra", key
                        );
                    }
                    let json = serde_json::to_string(&lead);
                    prop_assert!(json.is_ok());
                }
                Err(rejection) => {
                    prop_assert_eq!(&rejection.row, &row.id);
                    prop_assert!(rejection.reason.starts_with("CustomerInfo is "), "{}", rejection.reason);
                    prop_assert!(rejection.reason.chars().count() < 2_000);
                }
            }
        }

        #[test]
        fn leadsource_parse_never_panics_and_keeps_raw(raw in any::<String>()) {
            let parsed = LeadSource::parse(&raw);

            prop_assert_eq!(&parsed.raw, &raw);
            if let Some(offer) = parsed.offer {
                prop_assert!(!offer.offer_id.is_empty());
            }
            if let Some(source) = parsed.source {
                prop_assert!(!source.is_empty());
                prop_assert_eq!(source.trim(), source.as_str());
            }
            prop_assert_ne!(parsed.action, Some(Action::Unknown));
        }

        #[test]
        fn leadsource_parse_finds_the_parts_of_well_formed_values(
            source in "[A-Za-z][A-Za-z ()]{0,20}[A-Za-z)]",
            action in "[A-Za-z]{1,15}",
            publisher in "[a-z0-9]{1,12}",
            offer_id in "[a-z0-9][a-z0-9.-]{0,30}",
            spaces in prop::collection::vec(" {0,3}", 4),
        ) {
            let raw = format!(
                "{}{source}{}-{}{action}{}|{}{publisher}.{offer_id}",
                spaces[0], spaces[1], spaces[2], spaces[3], spaces[0],
            );

            let parsed = LeadSource::parse(&raw);

            prop_assert_eq!(parsed.source.as_deref(), Some(source.trim()));
            prop_assert_eq!(parsed.action, Some(Action::parse(&action)));
            prop_assert_eq!(parsed.offer, Some(offer(&publisher, &offer_id)));
        }
    }
}
