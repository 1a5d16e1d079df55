//! The merge of a customer's events into one record, and the record as a store keeps it.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::lead::{Customer, Email, LeadEvent, Stage};
use crate::source::row::RowId;
use crate::timestamp::{self, serde_ticks};

use super::*;

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

/// What a heap buffer costs beyond its capacity in [`CustomerState::memory_bytes`]:
/// jemalloc rounds each request up to its size class (16 bytes apart up to 128, then a
/// quarter of the size apart), about 8 bytes on average for the short strings of a record.
const ALLOCATION_SLACK: usize = 8;

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
    /// The sinks that have this version of the record while another sink of the
    /// deployment does not have it yet (`[[sinks]]`): the ledger that keeps a sink from
    /// receiving a record twice while another one is retried. Empty when every sink
    /// has it, or none; cleared when the record changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acked: Vec<String>,
    /// `Some` when read from the stored form, which keeps only a hash of the summary
    /// ([`StoredCustomer`]): `lead.summary` is empty until [`CustomerState::apply`]
    /// rebuilds it (comparing the new text with this hash, so a replay still sends
    /// nothing) or [`CustomerState::complete_summary`] does; the file store completes it
    /// on every read ([`crate::state::StateStore::customers`]).
    #[serde(skip)]
    summary_hash: Option<u64>,
}

/// A customer as the file store wrote it before the stored form, as postcard or JSON of
/// the struct itself ([`CustomerState`] without `acked`): only read, never written.
#[derive(Deserialize)]
pub struct EarlierCustomerState {
    lead: CustomerLead,
    stamps: Stamps,
    delivered: bool,
}

impl From<EarlierCustomerState> for CustomerState {
    fn from(earlier: EarlierCustomerState) -> Self {
        Self {
            lead: earlier.lead,
            stamps: earlier.stamps,
            delivered: earlier.delivered,
            acked: Vec::new(),
            summary_hash: None,
        }
    }
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
    /// See [`CustomerState::acked`].
    pub acked: Vec<String>,
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
            acked: Vec::new(),
            summary_hash: None,
        }
    }

    /// Splits the record from the merge bookkeeping, so the record can go to a sink
    /// without a copy.
    pub fn into_parts(self) -> (CustomerLead, MergeState) {
        let rest = MergeState {
            stamps: self.stamps,
            delivered: self.delivered,
            acked: self.acked,
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
            acked: rest.acked,
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
        let changed = self.derive(settings) || changed;
        if changed {
            // A new version: no sink has it yet.
            self.acked.clear();
        }
        changed
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
    /// About how many bytes this record holds in memory: the struct, and each heap
    /// buffer by its capacity plus [`ALLOCATION_SLACK`]. A bench-shaped record (seven
    /// contact fields, one offer, its summary) of one event holds about 2.6 KB and one
    /// of three events about 3.4 KB (measured with `malloc_usable_size`, see the test
    /// `the_memory_estimate_is_near_what_the_allocator_holds`), five to seven times its
    /// stored form: the delivery window bounds its records by this.
    pub fn memory_bytes(&self) -> usize {
        let heap = |bytes: usize| match bytes {
            0 => 0,
            n => n + ALLOCATION_SLACK,
        };
        let s = |s: &String| heap(s.capacity());
        let opt = |o: &Option<String>| o.as_ref().map_or(0, s);
        let compact = |c: &CompactString| match c.is_heap_allocated() {
            true => heap(c.capacity()),
            false => 0,
        };
        let buffer = |capacity: usize, size: usize| heap(capacity * size);
        let lead = &self.lead;
        let c = &lead.customer;
        let mut bytes = std::mem::size_of::<Self>()
            + s(&lead.key)
            + s(&lead.external_key)
            + s(&lead.summary)
            + [
                &c.first_name,
                &c.last_name,
                &c.phone,
                &c.country,
                &c.company,
                &c.title,
            ]
            .into_iter()
            .map(opt)
            .sum::<usize>()
            + c.email
                .as_ref()
                .map_or(0, |e| s(&e.original) + s(&e.normalized))
            + buffer(lead.offers.capacity(), std::mem::size_of::<OfferInterest>())
            + buffer(lead.history.capacity(), std::mem::size_of::<HistoryEntry>());
        for o in &lead.offers {
            bytes += s(&o.offer) + opt(&o.title);
        }
        for h in &lead.history {
            bytes += s(&h.row.partition_key) + s(&h.row.row_key) + s(&h.etag) + s(&h.action);
            bytes += opt(&h.source) + opt(&h.offer) + opt(&h.offer_title) + opt(&h.description);
        }
        for stamp in self.stamps.all().into_iter().flatten() {
            bytes += compact(&stamp.1) + compact(&stamp.2);
        }
        bytes += buffer(self.acked.capacity(), std::mem::size_of::<String>());
        bytes += self.acked.iter().map(s).sum::<usize>();
        bytes
    }

    /// Appends the compact stored form of this customer to `out` (see [`StoredCustomer`]).
    pub fn write_stored(&self, out: Vec<u8>) -> Vec<u8> {
        let hash = self
            .summary_hash
            .unwrap_or_else(|| summary_hash(&self.lead.summary));
        let out =
            postcard::to_extend(&self.stored(hash), out).expect("customers serialise to postcard");
        if self.acked.is_empty() {
            return out;
        }
        // The sinks that have this version while another does not, after the record: a
        // record without them (almost all, and every one written before) reads as none.
        postcard::to_extend(&self.acked, out).expect("sink names serialise to postcard")
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
                let (stored, rest): (StoredCustomer<String, u64>, _) =
                    postcard::take_from_bytes(bytes).map_err(read)?;
                let mut customer =
                    Self::from_stored(key, stored, |hash| (String::new(), Some(hash)))?;
                if !rest.is_empty() {
                    customer.acked = postcard::from_bytes(rest).map_err(read)?;
                }
                Ok(customer)
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
            acked: Vec::new(),
            summary_hash,
        })
    }
}

#[cfg(test)]
mod tests;
