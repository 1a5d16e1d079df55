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

/// The subject of a follow-up activity for a record that is sales' now (a converted
/// Salesforce Lead, a closed Dataverse lead): `Marketplace: <subject> (<last seen>)`,
/// cut to `max` characters.
pub fn follow_up_subject(lead: &CustomerLead, max: usize) -> String {
    truncate(
        &format!(
            "Marketplace: {} ({})",
            subject(lead),
            crate::timestamp::format(lead.last_seen)
        ),
        max,
    )
    .0
}

/// `First Last (address)` of a follow-up activity: who came back.
pub fn who(lead: &CustomerLead) -> String {
    let c = &lead.customer;
    let name = [c.first_name.as_deref(), c.last_name.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let email = c
        .email
        .as_ref()
        .map(|e| e.original.as_str())
        .unwrap_or("no email");
    format!("{name} ({email})")
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

/// When leadsync writes a CRM field: who owns the value once the record exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Every upsert: the customer's latest value wins (their name, email, phone).
    Always,
    /// Only when leadsync creates the record; afterwards it is the CRM's (original
    /// source, the first summary, placeholders).
    OnCreate,
    /// Only while the CRM's value is empty (or still a placeholder); a value a person
    /// typed is never replaced.
    IfEmpty,
}

impl WriteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::OnCreate => "on_create",
            Self::IfEmpty => "if_empty",
        }
    }
}

impl LeadField {
    /// The default ownership of a CRM field fed by this attribute. The customer's
    /// identity and contact data follow the customer (`always`); what sales curates or
    /// attributes on (the company, the original source, the lead's topic and first
    /// summary, the first-seen date) is written once (`on_create`) or only into an
    /// empty field (`if_empty`); leadsync's own tracking data (stage, offers, the
    /// newest event) is always current.
    pub fn default_write_mode(self) -> WriteMode {
        match self {
            Self::FirstName
            | Self::LastName
            | Self::Email
            | Self::Phone
            | Self::Country
            | Self::Title => WriteMode::Always,
            Self::Company => WriteMode::IfEmpty,
            Self::Source | Self::Summary | Self::Subject | Self::FirstSeen => WriteMode::OnCreate,
            Self::Stage
            | Self::Offers
            | Self::OfferTitle
            | Self::Action
            | Self::ExternalKey
            | Self::LastSeen
            | Self::DoNotContact => WriteMode::Always,
        }
    }

    /// Opt-out attributes are only ever written as `true`: nothing leadsync sends can
    /// turn an opt-out set in the CRM back off.
    pub fn is_opt_out(self) -> bool {
        matches!(self, Self::DoNotContact)
    }
}

/// A CRM record's fields split by ownership, for one lead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnedFields {
    /// Field -> value and mode. Opt-outs that are `false` are not here at all.
    pub fields: BTreeMap<String, (Value, WriteMode)>,
}

impl OwnedFields {
    /// Everything, for a record leadsync creates.
    pub fn for_create(&self) -> serde_json::Map<String, Value> {
        self.fields
            .iter()
            .map(|(f, (v, _))| (f.clone(), v.clone()))
            .collect()
    }

    /// For a record that exists: `always` fields, and `if_empty` fields whose CRM value
    /// `is_empty` says is empty; never `on_create` ones.
    pub fn for_update(&self, is_empty: impl Fn(&str) -> bool) -> serde_json::Map<String, Value> {
        self.fields
            .iter()
            .filter(|(f, (_, mode))| match mode {
                WriteMode::Always => true,
                WriteMode::OnCreate => false,
                WriteMode::IfEmpty => is_empty(f),
            })
            .map(|(f, (v, _))| (f.clone(), v.clone()))
            .collect()
    }

    /// The `if_empty` fields, whose current CRM value must be read.
    pub fn if_empty_fields(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .filter(|(_, (_, m))| *m == WriteMode::IfEmpty)
            .map(|(f, _)| f.as_str())
    }
}

/// Maps `lead` like [`map_fields`], with each field's ownership: `modes` (keyed by
/// lower-cased CRM field name) overrides the attribute's default. A `false` opt-out is
/// left out, never sent.
pub fn owned_fields(
    lead: &CustomerLead,
    mapping: &BTreeMap<String, LeadField>,
    modes: &BTreeMap<String, WriteMode>,
) -> OwnedFields {
    let fields = mapping
        .iter()
        .filter_map(|(crm_field, attribute)| {
            let value = attribute.value(lead)?;
            if attribute.is_opt_out() && value != Value::Bool(true) {
                return None;
            }
            let mode = if attribute.is_opt_out() {
                WriteMode::Always
            } else {
                modes
                    .get(&crm_field.to_ascii_lowercase())
                    .copied()
                    .unwrap_or_else(|| attribute.default_write_mode())
            };
            Some((crm_field.clone(), (value, mode)))
        })
        .collect();
    OwnedFields { fields }
}

/// A CRM value counts as empty when it is absent, null, blank, or still one of the
/// placeholders leadsync sent on create.
pub fn crm_value_is_empty(value: Option<&Value>, placeholders: &[&str]) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty() || placeholders.contains(&s.as_str()),
        Some(_) => false,
    }
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
    fn write_modes_parse_and_opt_outs_are_never_false() {
        let modes: BTreeMap<String, WriteMode> =
            serde_json::from_str(r#"{"company":"if_empty","leadsource":"on_create"}"#).unwrap();
        assert_eq!(modes["company"], WriteMode::IfEmpty);
        assert_eq!(LeadField::Company.default_write_mode(), WriteMode::IfEmpty);
        assert_eq!(LeadField::Source.default_write_mode(), WriteMode::OnCreate);
        assert_eq!(LeadField::Email.default_write_mode(), WriteMode::Always);
        assert!(crm_value_is_empty(Some(&Value::String(" ".into())), &[]));
        assert!(crm_value_is_empty(
            Some(&Value::String("[not provided]".into())),
            &["[not provided]"]
        ));
        assert!(!crm_value_is_empty(
            Some(&Value::String("Fabrikam".into())),
            &[]
        ));
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
