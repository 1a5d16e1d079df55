//! One customer, one record: the customer key, the stable external key sinks upsert
//! on, and the merge of every event of a customer into one [`CustomerLead`].
//!
//! The merge is a pure function of the *set* of events: contact fields come from the
//! newest event (by table Timestamp, then row key) that has a non-empty value, the
//! stage is the highest ever reached, the history is sorted. So the same events in any
//! order, across any number of polls and restarts, give the same record.

use std::fmt::Write as _;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::lead::{Action, Customer, Email, LeadEvent, Stage};
use crate::source::row::RowId;
use crate::timestamp::{self, serde_ticks};

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

/// When a contact field was last set: the (Timestamp, PartitionKey, RowKey) of the event
/// its value came from, so the merge does not depend on arrival order. Stored as three
/// strings, the Timestamp with its 7 digits (which sort as the times do). The keys are
/// compact strings: up to 24 bytes (a marketplace row's keys are 10 to 20) live inline,
/// so the 7 stamps of each customer read from state are not 14 allocations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Stamp(
    #[serde(with = "serde_ticks")] OffsetDateTime,
    CompactString,
    CompactString,
);

impl Stamp {
    /// This stamp is not newer than an event at `at` from row `row`.
    fn not_newer_than(&self, at: OffsetDateTime, row: &RowId) -> bool {
        (self.0, self.1.as_str(), self.2.as_str())
            <= (at, row.partition_key.as_str(), row.row_key.as_str())
    }
}

/// The stamp of each contact field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Stamps {
    #[serde(default)]
    first_name: Option<Stamp>,
    #[serde(default)]
    last_name: Option<Stamp>,
    #[serde(default)]
    phone: Option<Stamp>,
    #[serde(default)]
    country: Option<Stamp>,
    #[serde(default)]
    company: Option<Stamp>,
    #[serde(default)]
    title: Option<Stamp>,
    #[serde(default)]
    email: Option<Stamp>,
}

/// A customer as kept in state: the record plus merge bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    pub lead: CustomerLead,
    /// Per contact field, the stamp of the event its value came from.
    stamps: Stamps,
    /// The record was delivered to the sink at least once.
    pub delivered: bool,
    /// `Some` when read from the stored form, which keeps only a hash of the summary
    /// ([`StoredCustomer`]): `lead.summary` is empty until [`CustomerState::apply`]
    /// rebuilds it (comparing the new text with this hash, so a replay still sends
    /// nothing) or [`CustomerState::complete_summary`] does. Only the merge sees a record
    /// in that state ([`crate::state::StateStore::customers_to_merge`]); every other read
    /// completes it.
    #[serde(skip)]
    summary_hash: Option<u64>,
}

/// The hash the stored form keeps of a summary (xxh3, stable across versions and
/// machines).
fn summary_hash(summary: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(summary.as_bytes())
}

/// A [`CustomerState`] without its record: what stays behind while the record is lent
/// to a sink (see [`CustomerState::into_parts`]).
#[derive(Debug)]
pub struct MergeState {
    stamps: Stamps,
    pub delivered: bool,
    summary_hash: Option<u64>,
}

/// Sets `slot` to `value` if the event (`at`, `row`) is not older than the value's stamp.
/// Returns whether the value changed.
fn set_field(
    value: Option<&str>,
    slot: &mut Option<String>,
    stamp: &mut Option<Stamp>,
    at: OffsetDateTime,
    row: &RowId,
) -> bool {
    let Some(value) = value else {
        return false;
    };
    if !stamp.as_ref().is_none_or(|old| old.not_newer_than(at, row)) {
        return false;
    }
    match stamp {
        Some(Stamp(t, pk, rk)) => {
            *t = at;
            if pk != &row.partition_key {
                *pk = CompactString::from(row.partition_key.as_str());
            }
            if rk != &row.row_key {
                *rk = CompactString::from(row.row_key.as_str());
            }
        }
        None => {
            *stamp = Some(Stamp(
                at,
                CompactString::from(row.partition_key.as_str()),
                CompactString::from(row.row_key.as_str()),
            ))
        }
    }
    if slot.as_deref() == Some(value) {
        return false;
    }
    *slot = Some(value.to_owned());
    true
}

impl CustomerState {
    /// An empty customer; `apply` events to fill it.
    pub fn new(key: &CustomerKey, settings: &IdentitySettings) -> Self {
        let epoch = OffsetDateTime::UNIX_EPOCH;
        Self {
            lead: CustomerLead {
                key: key.as_string(),
                external_key: external_key(key, settings.external_key),
                customer: Customer::default(),
                stage: Stage::Unknown,
                do_not_contact: false,
                test_lead: true,
                first_seen: epoch,
                last_seen: epoch,
                offers: Vec::new(),
                history: Vec::new(),
                summary: String::new(),
            },
            stamps: Stamps::default(),
            delivered: false,
            summary_hash: None,
        }
    }

    /// Splits the record from the merge bookkeeping, so the record can go to a sink
    /// without a copy.
    pub fn into_parts(self) -> (CustomerLead, MergeState) {
        let rest = MergeState {
            stamps: self.stamps,
            delivered: self.delivered,
            summary_hash: self.summary_hash,
        };
        (self.lead, rest)
    }

    /// The inverse of [`CustomerState::into_parts`].
    pub fn from_parts(lead: CustomerLead, rest: MergeState) -> Self {
        Self {
            lead,
            stamps: rest.stamps,
            delivered: rest.delivered,
            summary_hash: rest.summary_hash,
        }
    }

    /// Rebuilds the summary of a record read in the stored form (which keeps only its
    /// hash) with `template`, for a reader that uses the record without merging into it
    /// (the store does it for every read but the merge's). Does nothing to a record whose
    /// summary is in memory.
    pub(crate) fn complete_summary(&mut self, template: &str) {
        if self.summary_hash.take().is_some() {
            self.lead.summary = summarise(&self.lead, template);
        }
    }

    /// Whether the history holds this event's row at this version or a later one: the
    /// event was merged before, and merging it again changes nothing.
    pub fn has_version(&self, event: &LeadEvent) -> bool {
        self.lead
            .history
            .iter()
            .any(|h| h.row == event.row && h.holds(event))
    }

    /// Merges events into the record. Returns whether the record (`lead`) changed, so a
    /// replay of events already merged sends nothing.
    pub fn apply<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a LeadEvent>,
        settings: &IdentitySettings,
    ) -> bool {
        let mut changed = false;
        for event in events {
            changed |= self.merge_fields(event);
            changed |= self.add_history(event);
        }
        self.derive(settings) || changed
    }

    fn merge_fields(&mut self, event: &LeadEvent) -> bool {
        let (at, row) = (event.timestamp, &event.row);
        let c = &event.customer;
        let target = &mut self.lead.customer;
        let st = &mut self.stamps;
        let mut changed = false;
        for (value, slot, stamp) in [
            (&c.first_name, &mut target.first_name, &mut st.first_name),
            (&c.last_name, &mut target.last_name, &mut st.last_name),
            (&c.phone, &mut target.phone, &mut st.phone),
            (&c.country, &mut target.country, &mut st.country),
            (&c.company, &mut target.company, &mut st.company),
            (&c.title, &mut target.title, &mut st.title),
        ] {
            changed |= set_field(value.as_deref(), slot, stamp, at, row);
        }
        let email = c.email.as_ref().map(|e| e.original.as_str());
        let mut slot = target.email.as_ref().map(|e| e.original.clone());
        if set_field(email, &mut slot, &mut st.email, at, row) {
            target.email = slot.as_deref().and_then(Email::parse);
            changed = true;
        }
        changed
    }

    fn add_history(&mut self, event: &LeadEvent) -> bool {
        let mut changed = false;
        if !event.test_lead && self.lead.test_lead {
            self.lead.test_lead = false;
            changed = true;
        }
        // One entry per row: a row changed in the table replaces its older version.
        let existing = self.lead.history.iter_mut().find(|h| h.row == event.row);
        if let Some(existing) = &existing {
            if existing.holds(event) {
                return changed;
            }
        }
        let entry = HistoryEntry {
            row: event.row.clone(),
            etag: event.etag.clone(),
            timestamp: event.timestamp,
            action: event.action.code().to_owned(),
            source: event.lead_source.source.clone(),
            offer: event.offer.as_ref().map(|o| o.raw.clone()),
            offer_title: event.offer_title.clone(),
            stage: event.stage,
            description: event.description.clone(),
        };
        match existing {
            Some(existing) => *existing = entry,
            None => self.lead.history.push(entry),
        }
        true
    }

    /// Recomputes the fields that follow from the history; returns whether any changed.
    fn derive(&mut self, settings: &IdentitySettings) -> bool {
        let lead = &mut self.lead;
        let mut changed = false;
        lead.history
            .sort_by(|a, b| (a.timestamp, &a.row).cmp(&(b.timestamp, &b.row)));
        let stage = lead
            .history
            .iter()
            .map(|h| h.stage)
            .filter(|s| *s != Stage::DoNotContact)
            .max()
            .unwrap_or(Stage::Unknown);
        let do_not_contact = lead.history.iter().any(|h| h.stage == Stage::DoNotContact);
        changed |= lead.stage != stage || lead.do_not_contact != do_not_contact;
        lead.stage = stage;
        lead.do_not_contact = do_not_contact;
        if let (Some(first), Some(last)) = (lead.history.first(), lead.history.last()) {
            changed |= lead.first_seen != first.timestamp || lead.last_seen != last.timestamp;
            lead.first_seen = first.timestamp;
            lead.last_seen = last.timestamp;
        }
        let offers = offers_of(&lead.history);
        if lead.offers != offers {
            lead.offers = offers;
            changed = true;
        }
        let summary = summarise(lead, &settings.summary_template);
        let same = match self.summary_hash.take() {
            Some(stored) => stored == summary_hash(&summary),
            None => lead.summary == summary,
        };
        lead.summary = summary;
        changed |= !same;
        changed
    }
}

/// The offers of a history, by offer id, each with the newest title it was shown with.
fn offers_of(history: &[HistoryEntry]) -> Vec<OfferInterest> {
    let mut offers: Vec<OfferInterest> = Vec::with_capacity(history.len());
    for h in history {
        if let Some(offer) = &h.offer {
            match offers.binary_search_by(|o| o.offer.as_str().cmp(offer)) {
                Ok(i) => {
                    if h.offer_title.is_some() {
                        offers[i].title.clone_from(&h.offer_title);
                    }
                }
                Err(i) => offers.insert(
                    i,
                    OfferInterest {
                        offer: offer.clone(),
                        title: h.offer_title.clone(),
                    },
                ),
            }
        }
    }
    offers
}

/// How a stored customer record keeps its summary (see [`StoredCustomer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryForm {
    /// The text, as versions before the hash wrote it.
    Text,
    /// A hash of the text.
    Hash,
}

/// A [`CustomerState`] as the file store keeps it: what cannot be derived from the
/// rest. The customer key is the record's key, the offers follow from the history,
/// the email's normalised form from the email, a field's stamp names its row by its
/// place in the history (every stamped row is in it), and times are 100 ns ticks.
/// An ETag of the service's standard form for the entry's Timestamp is left out.
/// The summary, which follows from the rest and the template, is kept as a hash
/// (`M = u64`, [`SummaryForm::Hash`]), so that a replay after a template change is
/// still seen as a change; the form before kept its text (`M = S`,
/// [`SummaryForm::Text`]). A customer with three events of the bench's table takes 511
/// bytes, where the serde form took 1,595 and the form with the text 962 (its summary
/// is 455), and a settle rewrites that many fewer B-tree pages (bench/results/history.md).
///
/// `S` is `&str` to write and `String` to read: one definition, so the two cannot
/// drift apart. postcard writes fields in order: fields may be added at the end only.
#[derive(Serialize, Deserialize)]
struct StoredCustomer<S, M = S> {
    external_key: S,
    /// first name, last name, email as given, phone, country, company, title.
    contact: [Option<S>; 7],
    stage: Stage,
    do_not_contact: bool,
    test_lead: bool,
    first_seen: i64,
    last_seen: i64,
    history: Vec<StoredEntry<S>>,
    summary: M,
    /// (ticks, history index) of each contact field, in [`Stamps::all`] order.
    stamps: [Option<(i64, u32)>; 7],
    delivered: bool,
}

#[derive(Serialize, Deserialize)]
struct StoredEntry<S> {
    partition_key: S,
    row_key: S,
    /// `None`: the standard ETag of `timestamp` ([`crate::source::row::standard_etag`]).
    etag: Option<S>,
    timestamp: i64,
    action: S,
    source: Option<S>,
    offer: Option<S>,
    offer_title: Option<S>,
    stage: Stage,
    description: Option<S>,
}

impl Stamps {
    /// The stamps in a fixed order (the stored form's).
    fn all(&self) -> [&Option<Stamp>; 7] {
        [
            &self.first_name,
            &self.last_name,
            &self.email,
            &self.phone,
            &self.country,
            &self.company,
            &self.title,
        ]
    }
}

impl CustomerState {
    /// Appends the compact stored form of this customer to `out` (see [`StoredCustomer`]).
    pub fn write_stored(&self, out: Vec<u8>) -> Vec<u8> {
        let hash = self
            .summary_hash
            .unwrap_or_else(|| summary_hash(&self.lead.summary));
        postcard::to_extend(&self.stored(hash), out).expect("customers serialise to postcard")
    }

    /// The form the version before wrote ([`SummaryForm::Text`]), to test that it is
    /// still read.
    #[cfg(test)]
    pub(crate) fn write_stored_with_text(&self, out: Vec<u8>) -> Vec<u8> {
        let stored = self.stored(self.lead.summary.as_str());
        postcard::to_extend(&stored, out).expect("customers serialise to postcard")
    }

    fn stored<M>(&self, summary: M) -> StoredCustomer<&str, M> {
        let lead = &self.lead;
        let c = &lead.customer;
        fn s(v: &Option<String>) -> Option<&str> {
            v.as_deref()
        }
        // A stamp's row is always in the history: `apply` stamps a field from an event
        // and adds the event's row to the history in the same call, and rows never leave it.
        let stamps = self.stamps.all().map(|stamp| {
            stamp.as_ref().and_then(|Stamp(at, pk, rk)| {
                let place = lead
                    .history
                    .iter()
                    .position(|h| h.row.partition_key == *pk && h.row.row_key == *rk);
                debug_assert!(place.is_some(), "a stamp names a row outside the history");
                Some((timestamp::to_ticks(*at), place? as u32))
            })
        });
        StoredCustomer {
            external_key: lead.external_key.as_str(),
            contact: [
                s(&c.first_name),
                s(&c.last_name),
                c.email.as_ref().map(|e| e.original.as_str()),
                s(&c.phone),
                s(&c.country),
                s(&c.company),
                s(&c.title),
            ],
            stage: lead.stage,
            do_not_contact: lead.do_not_contact,
            test_lead: lead.test_lead,
            first_seen: timestamp::to_ticks(lead.first_seen),
            last_seen: timestamp::to_ticks(lead.last_seen),
            history: lead
                .history
                .iter()
                .map(|h| StoredEntry {
                    partition_key: h.row.partition_key.as_str(),
                    row_key: h.row.row_key.as_str(),
                    etag: (!crate::source::row::is_standard_etag(&h.etag, h.timestamp))
                        .then_some(h.etag.as_str()),
                    timestamp: timestamp::to_ticks(h.timestamp),
                    action: h.action.as_str(),
                    source: s(&h.source),
                    offer: s(&h.offer),
                    offer_title: s(&h.offer_title),
                    stage: h.stage,
                    description: s(&h.description),
                })
                .collect(),
            summary,
            stamps,
            delivered: self.delivered,
        }
    }

    /// Reads what [`CustomerState::write_stored`] wrote for the customer `key`
    /// ([`SummaryForm::Hash`]), or what the version before wrote ([`SummaryForm::Text`]).
    /// From the hash form, the summary is rebuilt by the next `apply`, or by
    /// `CustomerState::complete_summary`.
    pub fn read_stored(key: &str, bytes: &[u8], form: SummaryForm) -> Result<Self, String> {
        let read = |e: postcard::Error| e.to_string();
        match form {
            SummaryForm::Text => {
                let stored: StoredCustomer<String> = postcard::from_bytes(bytes).map_err(read)?;
                Self::from_stored(key, stored, |text| (text, None))
            }
            SummaryForm::Hash => {
                let stored: StoredCustomer<String, u64> =
                    postcard::from_bytes(bytes).map_err(read)?;
                Self::from_stored(key, stored, |hash| (String::new(), Some(hash)))
            }
        }
    }

    fn from_stored<M>(
        key: &str,
        stored: StoredCustomer<String, M>,
        summary: impl FnOnce(M) -> (String, Option<u64>),
    ) -> Result<Self, String> {
        let time = |ticks: i64| {
            timestamp::from_ticks(ticks).ok_or_else(|| format!("time {ticks} is out of range"))
        };
        let history = stored
            .history
            .into_iter()
            .map(|h| {
                let timestamp = time(h.timestamp)?;
                Ok(HistoryEntry {
                    row: RowId::new(h.partition_key, h.row_key),
                    etag: h
                        .etag
                        .unwrap_or_else(|| crate::source::row::standard_etag(timestamp)),
                    timestamp,
                    action: h.action,
                    source: h.source,
                    offer: h.offer,
                    offer_title: h.offer_title,
                    stage: h.stage,
                    description: h.description,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let stamp = |stamp: Option<(i64, u32)>| -> Result<Option<Stamp>, String> {
            let Some((ticks, place)) = stamp else {
                return Ok(None);
            };
            let entry = history.get(place as usize).ok_or_else(|| {
                format!("a stamp names history entry {place} of {}", history.len())
            })?;
            let row = &entry.row;
            Ok(Some(Stamp(
                time(ticks)?,
                CompactString::from(row.partition_key.as_str()),
                CompactString::from(row.row_key.as_str()),
            )))
        };
        let [first_name, last_name, email, phone, country, company, title] = stored.stamps;
        let stamps = Stamps {
            first_name: stamp(first_name)?,
            last_name: stamp(last_name)?,
            email: stamp(email)?,
            phone: stamp(phone)?,
            country: stamp(country)?,
            company: stamp(company)?,
            title: stamp(title)?,
        };
        let [first_name, last_name, email, phone, country, company, title] = stored.contact;
        let (text, summary_hash) = summary(stored.summary);
        Ok(Self {
            lead: CustomerLead {
                key: key.to_owned(),
                external_key: stored.external_key,
                customer: Customer {
                    first_name,
                    last_name,
                    email: email.as_deref().and_then(Email::parse),
                    phone,
                    country,
                    company,
                    title,
                },
                stage: stored.stage,
                do_not_contact: stored.do_not_contact,
                test_lead: stored.test_lead,
                first_seen: time(stored.first_seen)?,
                last_seen: time(stored.last_seen)?,
                offers: offers_of(&history),
                history,
                summary: text,
            },
            stamps,
            delivered: stored.delivered,
            summary_hash,
        })
    }
}

pub(crate) fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Unknown => "unknown",
        Stage::InitialInterest => "initial interest",
        Stage::Trial => "trial",
        Stage::Active => "active",
        Stage::DoNotContact => "do not contact",
    }
}

pub(crate) fn action_label(action: &str) -> &str {
    match Action::parse(action) {
        Action::Install => "Get it now (install)",
        Action::PartnerLedTrial => "Contact me",
        Action::DoNotContact => "Do not contact (asked a cross-listed partner)",
        Action::Create => "Azure portal purchase",
        Action::StartTestDrive => "Test drive started",
        Action::Unknown => "Unknown action",
        Action::Other(_) => action.trim(),
    }
}

/// The follow-up text. Placeholders: `{name}`, `{company}`, `{stage}`, `{offers}`,
/// `{history}`, `{next_step}`, `{first_seen}`, `{last_seen}`; any other text, braces
/// included, is copied as written. One pass over the template: a value is never
/// searched for placeholders (a customer named "{stage}" stays so).
pub fn summarise(lead: &CustomerLead, template: &str) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    // Braces are ASCII, so a byte search finds them on character boundaries; it is
    // cheaper than `str::find`'s searcher on the template's short pieces, 13 a summary.
    let find = |text: &str, brace: u8| text.bytes().position(|b| b == brace);
    while let Some(open) = find(rest, b'{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let placeholder = find(tail, b'}').map(|close| &tail[..=close]);
        if placeholder.is_some_and(|p| placeholder_value(lead, p, &mut out)) {
            rest = &tail[placeholder.map_or(0, str::len)..];
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Appends the value of `placeholder` (with its braces) to `out`; false if it is not one.
fn placeholder_value(lead: &CustomerLead, placeholder: &str, out: &mut String) -> bool {
    let c = &lead.customer;
    match placeholder {
        "{name}" => {
            let mut parts = [c.first_name.as_deref(), c.last_name.as_deref()]
                .into_iter()
                .flatten()
                .peekable();
            if parts.peek().is_none() {
                out.push_str("Unnamed customer");
            }
            for (i, part) in parts.enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(part);
            }
        }
        "{company}" => out.push_str(c.company.as_deref().unwrap_or("company unknown")),
        "{stage}" => out.push_str(stage_label(lead.stage)),
        "{offers}" => write_offers(lead, out),
        "{history}" => {
            for (i, h) in lead.history.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str("- ");
                let start = out.len();
                timestamp::write(h.timestamp, out);
                out.truncate(start + 10); // the date
                out.push(' ');
                out.push_str(action_label(&h.action));
                if let Some(offer) = &h.offer {
                    out.push_str(" on ");
                    out.push_str(offer);
                }
                if let Some(source) = &h.source {
                    out.push_str(" via ");
                    out.push_str(source);
                }
            }
        }
        "{next_step}" => {
            let (before, after) = match lead.stage {
                _ if lead.do_not_contact => {
                    out.push_str("Do not contact: the customer asked a cross-listed partner to contact them instead.");
                    return true;
                }
                Stage::Active => (
                    "They deployed or bought ",
                    ": call within 24 hours to help them onboard.",
                ),
                Stage::Trial => (
                    "They are trying ",
                    ": check in on the trial within 24 hours.",
                ),
                Stage::InitialInterest => (
                    "They asked to be contacted about ",
                    ": reply within 24 hours.",
                ),
                Stage::Unknown | Stage::DoNotContact => {
                    out.push_str("Review and qualify this lead.");
                    return true;
                }
            };
            out.push_str(before);
            write_offers(lead, out);
            out.push_str(after);
        }
        "{first_seen}" => timestamp::write(lead.first_seen, out),
        "{last_seen}" => timestamp::write(lead.last_seen, out),
        _ => return false,
    }
    true
}

fn write_offers(lead: &CustomerLead, out: &mut String) {
    if lead.offers.is_empty() {
        out.push_str("an unknown offer");
    }
    for (i, o) in lead.offers.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match &o.title {
            Some(t) => {
                let _ = write!(out, "{t} ({})", o.offer);
            }
            None => out.push_str(&o.offer),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lead::normalise;
    use crate::source::row::RawRow;
    use proptest::prelude::*;
    use serde_json::json;

    fn settings() -> IdentitySettings {
        IdentitySettings::default()
    }

    #[test]
    fn the_hashed_external_key_is_the_first_80_bits_of_sha256_of_the_key_in_hex() {
        // The CRM's upsert key: it must never change between versions. Expected value
        // from `python3 -c "import hashlib; print(hashlib.sha256(b'email:ana.silva@fabrikam.com').hexdigest()[:20])"`.
        let key = CustomerKey::Email("ana.silva@fabrikam.com".into());
        assert_eq!(
            external_key(&key, ExternalKeyForm::Hash),
            "ls-e1cc8599f3776e4be354"
        );
        assert_eq!(
            external_key(&key, ExternalKeyForm::Email),
            "ana.silva@fabrikam.com"
        );
    }

    fn event(rk: &str, ts: &str, lead_source: &str, customer: serde_json::Value) -> LeadEvent {
        let columns = json!({
            "LeadSource": lead_source,
            "CustomerInfo": customer.to_string(),
            "OfferDisplayName": "Contoso Analytics",
        });
        let serde_json::Value::Object(columns) = columns else {
            unreachable!()
        };
        normalise(&RawRow {
            id: RowId::new("p", rk),
            etag: format!("W/{rk}"),
            timestamp: timestamp::parse(ts).unwrap(),
            columns,
        })
        .unwrap()
    }

    fn merged(events: &[LeadEvent]) -> CustomerLead {
        let key = customer_key(&events[0].customer, FallbackKey::NameCompanyPhone).unwrap();
        let mut state = CustomerState::new(&key, &settings());
        state.apply(events, &settings());
        state.lead
    }

    #[test]
    fn the_same_email_in_another_case_with_spaces_is_the_same_customer() {
        let a = event(
            "1",
            "2024-05-01T10:00:00Z",
            "AzureMarketplace-INS | a.b",
            json!({"Email": "Ana@Fabrikam.COM"}),
        );
        let b = event(
            "2",
            "2024-05-01T11:00:00Z",
            "AzureMarketplace-INS | a.b",
            json!({"Email": "  ana@fabrikam.com "}),
        );
        let fb = FallbackKey::NameCompanyPhone;
        assert_eq!(customer_key(&a.customer, fb), customer_key(&b.customer, fb));
        let key = customer_key(&a.customer, fb).unwrap();
        assert_eq!(
            external_key(&key, ExternalKeyForm::Hash),
            external_key(
                &customer_key(&b.customer, fb).unwrap(),
                ExternalKeyForm::Hash
            )
        );
        assert_eq!(
            external_key(&key, ExternalKeyForm::Email),
            "ana@fabrikam.com"
        );
    }

    #[test]
    fn the_hashed_external_key_is_stable_and_short() {
        let key = CustomerKey::Email("ana@fabrikam.com".into());
        let k = external_key(&key, ExternalKeyForm::Hash);
        assert_eq!(k, external_key(&key, ExternalKeyForm::Hash));
        assert!(k.starts_with("ls-") && k.len() == 23, "{k}");
        assert_ne!(
            k,
            external_key(
                &CustomerKey::Email("bob@fabrikam.com".into()),
                ExternalKeyForm::Hash
            )
        );
    }

    #[test]
    fn a_lead_without_email_gets_a_fallback_key_when_name_and_company_are_known() {
        let c = event(
            "1",
            "2024-05-01T10:00:00Z",
            "x-INS|a.b",
            json!({"FirstName": " Ana ", "LastName": "SILVA", "Company": "Fabrikam"}),
        )
        .customer;
        assert_eq!(
            customer_key(&c, FallbackKey::NameCompanyPhone).unwrap(),
            CustomerKey::Fallback("ana silva|fabrikam|".into())
        );
        assert!(customer_key(&c, FallbackKey::None).is_err());
    }

    #[test]
    fn an_email_field_that_is_not_an_address_keys_no_one_and_the_lead_falls_back() {
        for not_an_address in [
            "n/a",
            "-",
            "none",
            "@contoso.com",
            "ana@",
            "ana silva@contoso.com",
            "a@b@c",
        ] {
            let c = event(
                "1",
                "2024-05-01T10:00:00Z",
                "x-INS|a.b",
                json!({"Email": not_an_address, "FirstName": "Ana", "LastName": "Silva", "Company": "Fabrikam"}),
            )
            .customer;
            assert_eq!(
                customer_key(&c, FallbackKey::NameCompanyPhone).unwrap(),
                CustomerKey::Fallback("ana silva|fabrikam|".into()),
                "{not_an_address}"
            );
            let reason = customer_key(&c, FallbackKey::None).unwrap_err().0;
            assert!(reason.contains("no plausible email"), "{reason}");
            assert!(c.email.is_some(), "kept as data: {not_an_address}");
        }
        for address in ["ana@fabrikam.com", "x@y", "o'brien+tag@sub.example.co.uk"] {
            let c = event(
                "1",
                "2024-05-01T10:00:00Z",
                "x-INS|a.b",
                json!({"Email": address}),
            )
            .customer;
            assert!(
                matches!(
                    customer_key(&c, FallbackKey::None),
                    Ok(CustomerKey::Email(_))
                ),
                "{address}"
            );
        }
    }

    #[test]
    fn a_lead_with_too_little_to_identify_is_unidentifiable_with_a_reason() {
        let only_name = event(
            "1",
            "2024-05-01T10:00:00Z",
            "x-INS|a.b",
            json!({"FirstName": "Ana"}),
        )
        .customer;
        let nothing = event(
            "2",
            "2024-05-01T10:00:00Z",
            "x-INS|a.b",
            json!({"Country": "US"}),
        )
        .customer;
        for c in [only_name, nothing] {
            let reason = customer_key(&c, FallbackKey::NameCompanyPhone)
                .unwrap_err()
                .0;
            assert!(reason.contains("no email"), "{reason}");
        }
    }

    #[test]
    fn four_events_merge_into_one_record_with_the_highest_stage() {
        let c = json!({"FirstName": "Ana", "Email": "ana@fabrikam.com"});
        let events = [
            event(
                "1",
                "2024-05-01T10:00:00Z",
                "AppSource (SPZA)-PLT | contoso.analytics",
                c.clone(),
            ),
            event(
                "2",
                "2024-05-01T11:00:00Z",
                "TestDrive-StartTestDrive | contoso.analytics",
                c.clone(),
            ),
            event(
                "3",
                "2024-05-02T10:00:00Z",
                "AzureMarketplace-INS | contoso.analytics",
                c.clone(),
            ),
            event(
                "4",
                "2024-05-03T10:00:00Z",
                "AppSource (SPZA)-PLT | contoso.backup",
                c,
            ),
        ];
        let lead = merged(&events);
        assert_eq!(lead.history.len(), 4);
        assert_eq!(
            lead.stage,
            Stage::Active,
            "a later Contact me does not move the stage back"
        );
        assert_eq!(lead.offers.len(), 2);
        assert_eq!(lead.first_seen, events[0].timestamp);
        assert_eq!(lead.last_seen, events[3].timestamp);
        assert!(
            lead.summary.contains("Contact me on contoso.analytics"),
            "{}",
            lead.summary
        );
        assert!(
            lead.summary.contains("help them onboard"),
            "{}",
            lead.summary
        );
    }

    #[test]
    fn a_later_event_with_empty_fields_does_not_blank_earlier_ones_but_a_later_value_replaces() {
        let first = event(
            "1",
            "2024-05-01T10:00:00Z",
            "x-PLT|a.b",
            json!({"Email": "a@b.c", "Phone": "111", "Title": "CTO", "Company": "Old"}),
        );
        let later = event(
            "2",
            "2024-05-02T10:00:00Z",
            "x-INS|a.b",
            json!({"Email": "a@b.c", "Phone": "", "Title": null, "Company": "New"}),
        );
        let lead = merged(&[first, later]);
        assert_eq!(lead.customer.phone.as_deref(), Some("111"));
        assert_eq!(lead.customer.title.as_deref(), Some("CTO"));
        assert_eq!(lead.customer.company.as_deref(), Some("New"));
    }

    #[test]
    fn a_do_not_contact_event_flags_the_customer_without_changing_the_stage() {
        let c = json!({"Email": "a@b.c"});
        let lead = merged(&[
            event("1", "2024-05-01T10:00:00Z", "x-PLT|a.b", c.clone()),
            event("2", "2024-05-02T10:00:00Z", "SPZA-DNC|a.b", c),
        ]);
        assert!(lead.do_not_contact);
        assert_eq!(lead.stage, Stage::InitialInterest);
        assert!(lead.summary.contains("Do not contact"), "{}", lead.summary);
    }

    #[test]
    fn replaying_an_event_already_merged_changes_nothing() {
        let e = event(
            "1",
            "2024-05-01T10:00:00Z",
            "x-INS|a.b",
            json!({"Email": "a@b.c"}),
        );
        let key = customer_key(&e.customer, FallbackKey::NameCompanyPhone).unwrap();
        let mut state = CustomerState::new(&key, &settings());
        state.apply([&e], &settings());
        let before = state.clone();
        state.apply([&e], &settings());
        assert_eq!(state, before);
    }

    /// One event of Ana's, and her customer merged from it.
    fn ana_merged() -> (LeadEvent, CustomerState) {
        let e = event(
            "1",
            "2024-05-01T10:00:00Z",
            "x-INS|a.b",
            json!({"Email": "a@b.c", "FirstName": "Ana"}),
        );
        let key = customer_key(&e.customer, FallbackKey::NameCompanyPhone).unwrap();
        let mut state = CustomerState::new(&key, &settings());
        state.apply([&e], &settings());
        (e, state)
    }

    #[test]
    fn a_stored_record_naming_a_history_entry_it_lacks_is_refused() {
        let (e, state) = ana_merged();
        let bytes = state.write_stored(Vec::new());
        let mut stored: StoredCustomer<String, u64> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            stored.stamps[0],
            Some((timestamp::to_ticks(e.timestamp), 0))
        );
        stored.stamps[0] = Some((0, 7));
        let bytes = postcard::to_stdvec(&stored).unwrap();
        let err =
            CustomerState::read_stored(&state.lead.key, &bytes, SummaryForm::Hash).unwrap_err();
        assert!(err.contains("history entry 7 of 1"), "{err}");
    }

    #[test]
    fn a_stored_record_replayed_is_unchanged_unless_the_template_changed_its_summary() {
        let (e, state) = ana_merged();
        let bytes = state.write_stored(Vec::new());
        let read = || CustomerState::read_stored(&state.lead.key, &bytes, SummaryForm::Hash);

        let mut same = read().unwrap();
        assert!(!same.apply([&e], &settings()), "a replay changes nothing");
        assert_eq!(same, state);

        let mut other = settings();
        other.summary_template = "{name}, once more".into();
        let mut retemplated = read().unwrap();
        assert!(
            retemplated.apply([&e], &other),
            "a new template changes the summary"
        );
        assert_eq!(retemplated.lead.summary, "Ana, once more");

        let mut exported = read().unwrap();
        exported.complete_summary(&other.summary_template);
        assert_eq!(exported.lead.summary, "Ana, once more");
        let mut again = exported.clone();
        assert!(
            !again.apply([&e], &other),
            "completed with the template it merges on"
        );
    }

    fn arb_event() -> impl Strategy<Value = LeadEvent> {
        let field = prop::option::of(prop::sample::select(vec!["", "Ana", "Bo", "X Y", " "]));
        (
            0u8..30,
            0u32..5,
            prop::sample::select(vec![
                "x-PLT|a.b",
                "x-INS|a.c",
                "x-DNC|a.b",
                "x-StartTestDrive|b.c",
                "x-Create|c.d",
                "x-Zap|e.f",
            ]),
            field.clone(),
            field.clone(),
            field,
        )
            .prop_map(|(rk, secs, ls, first, company, title)| {
                let mut c = serde_json::Map::new();
                c.insert("Email".into(), json!("A@B.C"));
                for (k, v) in [("FirstName", first), ("Company", company), ("Title", title)] {
                    if let Some(v) = v {
                        c.insert(k.into(), json!(v));
                    }
                }
                // The row key decides the timestamp, so one row is always one version.
                let ts = format!(
                    "2024-05-01T10:00:{:02}.{:07}Z",
                    rk,
                    secs + u32::from(rk) * 5
                );
                event(&format!("r{rk:02}"), &ts, ls, serde_json::Value::Object(c))
            })
    }

    proptest! {
        #[test]
        fn the_merged_record_does_not_depend_on_the_order_of_events(
            events in prop::collection::vec(arb_event(), 1..12),
            seed in any::<u64>(),
        ) {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            // One content per row version, as in the table.
            let mut events = events;
            let mut seen = std::collections::HashSet::new();
            events.retain(|e| seen.insert(e.row.clone()));
            let mut shuffled = events.clone();
            shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            let key = CustomerKey::Email("a@b.c".into());

            let mut one = CustomerState::new(&key, &settings());
            one.apply(&events, &settings());
            // The other in two polls, as a restart would split them.
            let (left, right) = shuffled.split_at(shuffled.len() / 2);
            let mut other = CustomerState::new(&key, &settings());
            other.apply(left, &settings());
            let mut other: CustomerState = serde_json::from_str(&serde_json::to_string(&other).unwrap()).unwrap();
            other.apply(right, &settings());

            prop_assert_eq!(one.lead, other.lead);
        }

        #[test]
        fn the_stored_form_reads_back_the_same_state_and_merges_on_the_same(
            events in prop::collection::vec((arb_event(), any::<bool>()), 1..12),
            split in 0usize..12,
        ) {
            // Some ETags in the service's standard form (left out of the record), some not.
            let mut events: Vec<LeadEvent> = events
                .into_iter()
                .map(|(mut e, standard)| {
                    if standard {
                        e.etag = crate::source::row::standard_etag(e.timestamp);
                    }
                    e
                })
                .collect();
            let mut seen = std::collections::HashSet::new();
            events.retain(|e| seen.insert(e.row.clone()));
            let (left, right) = events.split_at(split.min(events.len()));
            let key = CustomerKey::Email("a@b.c".into());
            let mut state = CustomerState::new(&key, &settings());
            state.apply(left, &settings());
            state.delivered = split % 2 == 0;

            let bytes = state.write_stored(Vec::new());
            let mut back =
                CustomerState::read_stored(&state.lead.key, &bytes, SummaryForm::Hash).unwrap();
            // Without the summary's text, which the template rebuilds.
            prop_assert_eq!(&back.lead.summary, "");
            let mut completed = back.clone();
            completed.complete_summary(&settings().summary_template);
            prop_assert_eq!(&completed, &state);
            // The form before, with the text, reads back as it was written.
            let old = state.write_stored_with_text(Vec::new());
            let old = CustomerState::read_stored(&state.lead.key, &old, SummaryForm::Text);
            prop_assert_eq!(old.as_ref(), Ok(&state));
            // The summary's hash came back: a replay of what was merged says unchanged.
            let mut replayed =
                CustomerState::read_stored(&state.lead.key, &bytes, SummaryForm::Hash).unwrap();
            prop_assert!(!replayed.apply(left, &settings()));
            // The stamps came back too: the rest merges the same way.
            let changed = state.apply(right, &settings());
            prop_assert_eq!(back.apply(right, &settings()), changed);
            prop_assert_eq!(back, state);
        }

        #[test]
        fn apply_says_changed_exactly_when_the_record_changed(
            events in prop::collection::vec(arb_event(), 1..12),
            chunks in prop::collection::vec((0usize..12, 0usize..4), 1..8),
        ) {
            let mut seen = std::collections::HashSet::new();
            let mut events = events;
            events.retain(|e| seen.insert(e.row.clone()));
            let key = CustomerKey::Email("a@b.c".into());
            let mut state = CustomerState::new(&key, &settings());
            // Overlapping slices of the events, so some applies are (partial) replays.
            for (start, len) in chunks {
                let start = start % events.len();
                let end = (start + len).min(events.len());
                let before = state.lead.clone();
                let changed = state.apply(&events[start..end], &settings());
                prop_assert_eq!(changed, state.lead != before, "events {}..{}", start, end);
            }
        }
    }
}

#[cfg(test)]
mod summary_tests {
    use super::*;
    use crate::lead::normalise;
    use crate::source::row::RawRow;
    use serde_json::json;
    fn ev(rk: &str, ts: &str, ls: &str, c: serde_json::Value) -> LeadEvent {
        let mut columns = serde_json::Map::new();
        columns.insert("LeadSource".into(), json!(ls));
        columns.insert("CustomerInfo".into(), json!(c.to_string()));
        columns.insert("OfferTitle".into(), json!("Contoso Analytics"));
        let row = RawRow {
            id: RowId::new("p", rk),
            etag: format!("W/\"{rk}\""),
            timestamp: crate::timestamp::parse(ts).unwrap(),
            columns,
        };
        normalise(&row).unwrap()
    }
    fn four_events(first_name: &str) -> [LeadEvent; 4] {
        let c = json!({"FirstName": first_name, "LastName": "Lo", "Company": "Fab", "Email": "ana@fabrikam.com"});
        [
            ev(
                "1",
                "2024-05-01T10:00:00.1234567Z",
                "AppSource (SPZA)-PLT | contoso.analytics",
                c.clone(),
            ),
            ev(
                "2",
                "2024-05-01T11:00:00Z",
                "TestDrive-StartTestDrive | contoso.analytics",
                c.clone(),
            ),
            ev(
                "3",
                "2024-05-02T10:00:00Z",
                "AzureMarketplace-Zap | contoso.x",
                c.clone(),
            ),
            ev("4", "2024-05-03T10:00:00Z", "-PLT | contoso.backup", c),
        ]
    }

    fn summary(events: &[LeadEvent], template: &str) -> String {
        let key = customer_key(
            &events[0].customer,
            crate::identity::FallbackKey::NameCompanyPhone,
        )
        .unwrap();
        let settings = IdentitySettings {
            summary_template: template.into(),
            ..IdentitySettings::default()
        };
        let mut state = CustomerState::new(&key, &settings);
        state.apply(events, &settings);
        state.lead.summary
    }

    #[test]
    fn every_placeholder_is_filled_and_other_braces_are_kept() {
        let template = "{name}|{company}|{stage}|{offers}|{history}|{next_step}|{first_seen}|{last_seen}|{unknown}|{|}{";
        let offers = "Contoso Analytics (contoso.analytics), Contoso Analytics (contoso.backup), Contoso Analytics (contoso.x)";
        let expected = format!(
            "Ana Lo|Fab|trial|{offers}|\
- 2024-05-01 Contact me on contoso.analytics via AppSource (SPZA)\n\
- 2024-05-01 Test drive started on contoso.analytics via TestDrive\n\
- 2024-05-02 Zap on contoso.x via AzureMarketplace\n\
- 2024-05-03 Contact me on contoso.backup|\
They are trying {offers}: check in on the trial within 24 hours.|\
2024-05-01T10:00:00.1234567Z|2024-05-03T10:00:00.0000000Z|{{unknown}}|{{|}}{{"
        );
        assert_eq!(summary(&four_events("Ana"), template), expected);
    }

    #[test]
    fn a_value_that_looks_like_a_placeholder_is_not_expanded() {
        let text = summary(&four_events("{stage}"), "{name} / {stage}");
        assert_eq!(text, "{stage} Lo / trial");
    }
}
