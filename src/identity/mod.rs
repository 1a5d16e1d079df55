//! One customer, one record: the customer key, the stable external key sinks upsert
//! on, and the merge of every event of a customer into one [`CustomerLead`].
//!
//! The merge is a pure function of the *set* of events: contact fields come from the
//! newest event (by table Timestamp, then row key) that has a non-empty value, the
//! stage is the highest ever reached, the history is sorted. So the same events in any
//! order, across any number of polls and restarts, give the same record.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::lead::{Customer, LeadEvent, Stage};
use crate::source::row::RowId;
use crate::timestamp::serde_ticks;

/// Who a lead is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CustomerKey {
    /// The normalised (trimmed, lower-cased) email.
    Email(String),
    /// Normalised name + company + phone digits, for leads without an email.
    Fallback(String),
}

impl CustomerKey {
    /// The key as stored: `email:<address>` or `fallback:<name>|<company>|<digits>`.
    pub fn as_string(&self) -> String {
        match self {
            Self::Email(e) => format!("email:{e}"),
            Self::Fallback(f) => format!("fallback:{f}"),
        }
    }
}

/// Why a lead has no customer key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unidentifiable(pub String);

/// The customer key of a lead, or why it has none.
pub fn customer_key(
    customer: &Customer,
    fallback: FallbackKey,
) -> Result<CustomerKey, Unidentifiable> {
    // Only a plausible address keys a customer: `n/a`, `-` or `none` in the Email field
    // would otherwise merge unrelated people into one CRM record. Anything else is
    // kept as data and the lead falls back to the fallback key.
    let email = customer
        .email
        .as_ref()
        .filter(|e| plausible_email(&e.normalized));
    if let Some(email) = email {
        return Ok(CustomerKey::Email(email.normalized.clone()));
    }
    let no_email = match &customer.email {
        Some(_) => "no plausible email (the Email field is not an address)",
        None => "no email",
    };
    if fallback == FallbackKey::None {
        return Err(Unidentifiable(format!(
            "{no_email}, and identity.fallback = \"none\""
        )));
    }
    let fold = |s: &Option<String>| {
        s.as_deref()
            .map(|s| {
                s.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_lowercase()
            })
            .unwrap_or_default()
    };
    let name = [fold(&customer.first_name), fold(&customer.last_name)]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let company = fold(&customer.company);
    let digits: String = customer
        .phone
        .as_deref()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let phone_usable = digits.len() >= 7;
    // A name alone is too common to merge on; with a company or a phone number it is a person.
    if !name.is_empty() && (!company.is_empty() || phone_usable) {
        let phone = if phone_usable { digits } else { String::new() };
        return Ok(CustomerKey::Fallback(format!("{name}|{company}|{phone}")));
    }
    Err(Unidentifiable(format!(
        "{no_email}, and not enough for a fallback key (needs a name plus a company or a phone number of 7+ digits; has name: {}, company: {}, phone digits: {})",
        !name.is_empty(),
        !company.is_empty(),
        digits.len()
    )))
}

/// An address that can key a customer: one `@` with text on both sides, no whitespace.
pub fn plausible_email(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !email.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// The key a sink upserts on, derived only from the customer key: the same customer
/// lands on the same CRM record across restarts, replays and machines.
pub fn external_key(key: &CustomerKey, form: ExternalKeyForm) -> String {
    match (form, key) {
        (ExternalKeyForm::Email, CustomerKey::Email(email)) => email.clone(),
        _ => hashed_key(&key.as_string()),
    }
}

/// `ls-` + 20 hex digits of SHA-256 of a customer key's text (`email:...`).
fn hashed_key(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(23);
    out.push_str("ls-");
    for b in digest.iter().take(10) {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

impl CustomerLead {
    /// How logs name this customer: the hashed external key (`ls-...`), which holds no
    /// personal data, whatever `identity.external_key` says (with `"email"` the key
    /// the CRM sees is the address itself). The same as the CRM's key by default.
    pub fn log_key(&self) -> String {
        if self.external_key.starts_with("ls-") {
            self.external_key.clone()
        } else {
            hashed_key(&self.key)
        }
    }
}

/// One event in a customer's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub row: RowId,
    pub etag: String,
    #[serde(with = "serde_ticks")]
    pub timestamp: OffsetDateTime,
    /// The action code (`INS`, `PLT`, `DNC`, `Create`, `StartTestDrive`, or verbatim).
    pub action: String,
    pub source: Option<String>,
    /// `publisherid.offerid`.
    pub offer: Option<String>,
    pub offer_title: Option<String>,
    pub stage: Stage,
    pub description: Option<String>,
}

impl HistoryEntry {
    /// Whether this entry (of the event's row) is the event's version or a later one.
    fn holds(&self, event: &LeadEvent) -> bool {
        (self.timestamp, self.etag.as_str()) >= (event.timestamp, event.etag.as_str())
    }
}

/// An offer the customer showed interest in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OfferInterest {
    pub offer: String,
    pub title: Option<String>,
}

/// The merged record of one customer: what sinks receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerLead {
    /// `email:<address>` or `fallback:<...>`.
    pub key: String,
    /// What the sink upserts on (see [`external_key`]).
    pub external_key: String,
    /// Best known contact fields.
    pub customer: Customer,
    /// The highest stage reached: active > trial > initial interest > unknown.
    pub stage: Stage,
    /// A do-not-contact event was seen for this customer.
    pub do_not_contact: bool,
    /// Every event was a marketplace test lead.
    pub test_lead: bool,
    #[serde(with = "serde_ticks")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "serde_ticks")]
    pub last_seen: OffsetDateTime,
    pub offers: Vec<OfferInterest>,
    /// Oldest first.
    pub history: Vec<HistoryEntry>,
    /// Personalised follow-up text built from the history (`identity.summary_template`).
    pub summary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKey {
    /// Normalised name plus company and/or phone digits, when present.
    NameCompanyPhone,
    /// Leads without an email are held as unidentifiable.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExternalKeyForm {
    /// `ls-` + 20 hex digits of SHA-256 of the customer key: no personal data in the key.
    Hash,
    /// The normalised email itself (fallback-keyed customers still get the hash).
    Email,
}

/// The default follow-up text; see `identity::summarise` for the placeholders.
pub const DEFAULT_SUMMARY_TEMPLATE: &str =
    "{name} ({company}), stage: {stage}, interested in {offers}.\n{history}\nNext step: {next_step}";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// The customer key of a lead without an email.
    #[serde(default = "default_fallback")]
    pub fallback: FallbackKey,
    /// The form of the key sinks upsert on.
    #[serde(default = "default_external_key")]
    pub external_key: ExternalKeyForm,
    /// The follow-up summary sent as the CRM description.
    #[serde(default = "default_summary_template")]
    pub summary_template: String,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            fallback: default_fallback(),
            external_key: default_external_key(),
            summary_template: default_summary_template(),
        }
    }
}

fn default_fallback() -> FallbackKey {
    FallbackKey::NameCompanyPhone
}
fn default_external_key() -> ExternalKeyForm {
    ExternalKeyForm::Hash
}
fn default_summary_template() -> String {
    DEFAULT_SUMMARY_TEMPLATE.into()
}

mod merge;
mod summary;

pub use merge::{CustomerState, EarlierCustomerState, MergeState, SummaryForm};
pub use summary::summarise;
pub(crate) use summary::{action_label, stage_label};
