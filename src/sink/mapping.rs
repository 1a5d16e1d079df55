//! Lead attributes a CRM field can be mapped to, shared by the sinks whose field
//! mapping is configurable (`fields = { FirstName = "first_name", ... }`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::identity::{CustomerLead, HistoryEntry};
use crate::lead::Action;
use crate::timestamp;

/// One attribute of a merged customer lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeadField {
    FirstName,
    LastName,
    /// The email as the customer typed it (trimmed).
    Email,
    Phone,
    Country,
    Company,
    Title,
    /// `initial_interest`, `trial`, `active` or `unknown`.
    Stage,
    /// The personalised follow-up text (`identity.summary_template`).
    Summary,
    /// `publisher.offer` ids, comma-separated.
    Offers,
    /// Title (else id) of the offer of the newest event.
    OfferTitle,
    /// The marketplace source of the newest event (`AzureMarketplace`, `AppSource (SPZA)`, ...).
    Source,
    /// The action code of the newest event (`INS`, `PLT`, ...).
    Action,
    /// `<offer>: <action>` of the newest event, e.g. `Contoso Analytics: Contact me`.
    Subject,
    /// The key the sink upserts on.
    ExternalKey,
    /// `true` when the customer must not be contacted.
    DoNotContact,
    FirstSeen,
    LastSeen,
}

fn latest(lead: &CustomerLead) -> Option<&HistoryEntry> {
    lead.history.last()
}

fn action_words(code: &str) -> String {
    match Action::parse(code) {
        Action::Install => "Get it now".into(),
        Action::PartnerLedTrial => "Contact me".into(),
        Action::DoNotContact => "Do not contact".into(),
        Action::Create => "Azure portal purchase".into(),
        Action::StartTestDrive => "Test drive".into(),
        Action::Other(other) => other,
        Action::Unknown => "Lead".into(),
    }
}

impl LeadField {
    /// The attribute's value for `lead`; `None` when the lead does not have it.
    pub fn value(self, lead: &CustomerLead) -> Option<Value> {
        let c = &lead.customer;
        let text = |s: &Option<String>| s.clone().map(Value::String);
        match self {
            Self::FirstName => text(&c.first_name),
            Self::LastName => text(&c.last_name),
            Self::Email => c.email.as_ref().map(|e| Value::String(e.original.clone())),
            Self::Phone => text(&c.phone),
            Self::Country => text(&c.country),
            Self::Company => text(&c.company),
            Self::Title => text(&c.title),
            Self::Stage => Some(Value::String(lead.stage.as_str().into())),
            Self::Summary => Some(Value::String(lead.summary.clone())),
            Self::Offers => (!lead.offers.is_empty()).then(|| {
                Value::String(
                    lead.offers
                        .iter()
                        .map(|o| o.offer.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            }),
            Self::OfferTitle => latest(lead)
                .and_then(|h| h.offer_title.clone().or_else(|| h.offer.clone()))
                .map(Value::String),
            Self::Source => latest(lead)
                .and_then(|h| h.source.clone())
                .map(Value::String),
            Self::Action => latest(lead)
                .map(|h| h.action.clone())
                .filter(|a| !a.is_empty())
                .map(Value::String),
            Self::Subject => Some(Value::String(subject(lead))),
            Self::ExternalKey => Some(Value::String(lead.external_key.clone())),
            Self::DoNotContact => Some(Value::Bool(lead.do_not_contact)),
            Self::FirstSeen => Some(Value::String(timestamp::format(lead.first_seen))),
            Self::LastSeen => Some(Value::String(timestamp::format(lead.last_seen))),
        }
    }
}

/// `<offer title or id>: <action>` of the newest event; never empty.
pub fn subject(lead: &CustomerLead) -> String {
    match latest(lead) {
        Some(h) => {
            let offer = h
                .offer_title
                .clone()
                .or_else(|| h.offer.clone())
                .unwrap_or_else(|| "Marketplace lead".into());
            format!("{offer}: {}", action_words(&h.action))
        }
        None => "Marketplace lead".into(),
    }
}

/// Builds a CRM record body from a mapping `CRM field -> lead attribute`; fields the
/// lead does not have are left out (never sent as empty strings).
pub fn map_fields(
    lead: &CustomerLead,
    mapping: &BTreeMap<String, LeadField>,
) -> serde_json::Map<String, Value> {
    mapping
        .iter()
        .filter_map(|(crm_field, attribute)| Some((crm_field.clone(), attribute.value(lead)?)))
        .collect()
}

/// The marker appended to a value cut to fit a CRM field.
pub const TRUNCATION_MARKER: &str = "…";

/// Cuts `text` to at most `max_chars` characters (the marker included), on a
/// character boundary. Returns whether it was cut.
pub fn truncate(text: &str, max_chars: usize) -> (String, bool) {
    if text.chars().count() <= max_chars {
        return (text.to_owned(), false);
    }
    let keep = max_chars.saturating_sub(TRUNCATION_MARKER.chars().count());
    let mut out: String = text.chars().take(keep).collect();
    out.push_str(TRUNCATION_MARKER);
    (out, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_cuts_on_characters_and_marks_the_cut() {
        assert_eq!(truncate("abc", 3), ("abc".to_owned(), false));
        let (cut, was_cut) = truncate("ééééé", 4);
        assert!(was_cut);
        assert_eq!(cut.chars().count(), 4);
        assert!(cut.ends_with(TRUNCATION_MARKER));
    }

    #[test]
    fn lead_fields_parse_from_snake_case_names() {
        let mapping: BTreeMap<String, LeadField> = serde_json::from_str(
            r#"{"FirstName":"first_name","Description":"summary","DoNotCall":"do_not_contact"}"#,
        )
        .unwrap();
        assert_eq!(mapping["Description"], LeadField::Summary);
        assert_eq!(mapping["DoNotCall"], LeadField::DoNotContact);
    }
}
