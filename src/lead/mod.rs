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

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::source::row::RowId;

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

/// The trimmed text, `None` when it is empty or whitespace.
fn non_empty(s: &str) -> Option<String> {
    let trimmed = s.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

mod normalise;

pub use normalise::normalise;
