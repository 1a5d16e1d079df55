//! Personal data (issue 30): how long leadsync keeps lead data (`state.retention`),
//! and what it holds about one person, to export (`leadsync export --email`) or erase
//! (`leadsync forget`).
//!
//! A person is found by the customer key (`email:<normalised address>`, or a
//! `fallback:` key), or by the external key the CRM sees (`ls-...`). Their data in the
//! state: the merged customer (whose history names the table rows it came from), the
//! dead letters of that customer, and the rejected, skipped and unidentifiable rows
//! whose stored columns hold their address (those rows have no customer key: an
//! address is matched case-insensitively as a whole address, not as part of a longer
//! one), or which are rows of the customer's history.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::identity::{CustomerLead, CustomerState, HistoryEntry};
use crate::source::row::RowId;
use crate::state::{DeadLetter, RecordedRow, RowVersion, StateError, StateStore};

/// Who an access or erasure request is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Person {
    /// The customer key (`email:<address>` or `fallback:...`), when known.
    pub key: Option<String>,
    /// The external key the CRM sees (`ls-...`, or the address with
    /// `identity.external_key = "email"`), when given.
    pub external_key: Option<String>,
    /// The normalised (trimmed, lower-cased) address, matched inside recorded rows.
    pub email: Option<String>,
}

impl Person {
    /// The person with this address.
    pub fn by_email(address: &str) -> Person {
        let email = address.trim().to_lowercase();
        Person {
            key: Some(format!("email:{email}")),
            external_key: None,
            email: Some(email),
        }
    }

    /// The person with this customer key (`email:...`, `fallback:...`) or external key (`ls-...`).
    pub fn by_key(key: &str) -> Person {
        let key = key.trim();
        if let Some(address) = key.strip_prefix("email:") {
            return Person::by_email(address);
        }
        if key.starts_with("fallback:") {
            return Person {
                key: Some(key.to_owned()),
                ..Person::default()
            };
        }
        if key.contains('@') {
            // `identity.external_key = "email"`: the CRM's key is the address.
            return Person::by_email(key);
        }
        Person {
            external_key: Some(key.to_owned()),
            ..Person::default()
        }
    }

    /// Whether this is the person's merged record.
    pub fn is(&self, lead: &CustomerLead) -> bool {
        self.key.as_deref() == Some(lead.key.as_str())
            || self
                .external_key
                .as_deref()
                .is_some_and(|external| external == lead.external_key || external == lead.log_key())
    }

    /// Whether this dead letter is about the person.
    pub fn is_in_dead_letter(&self, letter: &DeadLetter) -> bool {
        self.is(&letter.payload) || self.external_key.as_deref() == Some(letter.id.as_str())
    }

    /// Learns the customer key and address from the person's merged record.
    pub fn learn(&mut self, lead: &CustomerLead) {
        if self.key.is_none() {
            self.key = Some(lead.key.clone());
        }
        if self.email.is_none() {
            self.email = lead
                .key
                .strip_prefix("email:")
                .map(str::to_owned)
                .or_else(|| lead.customer.email.as_ref().map(|e| e.normalized.clone()));
        }
    }

    /// Whether a recorded row is about the person: it is one of `rows` (of their
    /// history or dead letters), or its columns hold their address.
    pub fn is_in_row(&self, row: &RecordedRow, rows: &HashSet<RowId>) -> bool {
        rows.contains(&row.row.id)
            || match (&self.email, &row.columns) {
                (Some(email), Some(columns)) => mentions(columns, email),
                _ => false,
            }
    }
}

/// Whether `columns` hold `email` (normalised) as a whole address: in any text, a JSON
/// text inside a column included, compared case-insensitively, and neither preceded by
/// a character of an address's local part nor followed by one of a domain
/// (`bob@contoso.com` is not in `jimbob@contoso.com` nor in `bob@contoso.com.au`).
pub fn mentions(columns: &Map<String, Value>, email: &str) -> bool {
    if email.is_empty() {
        return false;
    }
    let text = Value::Object(columns.clone()).to_string().to_lowercase();
    let local = |c: char| c.is_alphanumeric() || "._%+-!#$&'*/=?^`{|}~".contains(c);
    let domain = |c: char| c.is_alphanumeric() || c == '-' || c == '.';
    text.match_indices(email).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + email.len()..].chars().next();
        !before.is_some_and(local) && !after.is_some_and(domain)
    })
}

/// What [`StateStore::forget`] removed from the state.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Forgotten {
    /// The merged records removed, by their hashed key (`ls-...`, as logs name them:
    /// what `forget` prints may end up in a job's log).
    pub customers: Vec<String>,
    /// The dead letters removed, by their customer's hashed key.
    pub dead_letters: Vec<String>,
    pub rejected: Vec<RowId>,
    pub skipped: Vec<RowId>,
    pub unidentifiable: Vec<RowId>,
    /// The person's rows in the lead table: the customer's history, the dead letters'
    /// rows and the recorded rows above (what `--table-rows` deletes).
    pub source_rows: Vec<RowId>,
    /// Rows of the history now marked handled, so that a re-read of the overlap window
    /// does not deliver them again (the markers hold the row's keys and version only).
    pub marked_handled: usize,
}

impl Forgotten {
    pub fn is_empty(&self) -> bool {
        self.customers.is_empty()
            && self.dead_letters.is_empty()
            && self.rejected.is_empty()
            && self.skipped.is_empty()
            && self.unidentifiable.is_empty()
    }

    /// Adds the rows of the customer's history and dead letters to `source_rows`.
    pub fn add_source_rows<'a>(&mut self, rows: impl IntoIterator<Item = &'a RowId>) {
        for row in rows {
            if !self.source_rows.contains(row) {
                self.source_rows.push(row.clone());
            }
        }
    }
}

/// What [`StateStore::prune_older_than`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub customers: usize,
    pub dead_letters: usize,
    pub rejected: usize,
    pub skipped: usize,
    pub unidentifiable: usize,
    /// This call reached the end of every list: a call with the same cutoff finds nothing more.
    pub complete: bool,
}

impl Pruned {
    pub fn removed(&self) -> usize {
        self.customers + self.dead_letters + self.rejected + self.skipped + self.unidentifiable
    }
}

/// Where one list's retention step resumes: from the start or after a key (`From`),
/// or not at all until every list went round (`Done`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk<K> {
    From(Option<K>),
    Done,
}

impl<K> Default for Walk<K> {
    fn default() -> Self {
        Walk::From(None)
    }
}

impl<K> Walk<K> {
    /// After a step that reached the end of its list (`ended`), or stopped at `last`.
    pub fn next(ended: bool, last: Option<K>) -> Self {
        match (ended, last) {
            (false, Some(last)) => Walk::From(Some(last)),
            _ => Walk::Done,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Walk::Done)
    }
}

/// The versions of the rows a customer's history holds: what a forgotten customer's
/// rows are marked handled with.
pub fn history_versions(history: &[HistoryEntry]) -> Vec<RowVersion> {
    history
        .iter()
        .map(|h| RowVersion {
            id: h.row.clone(),
            etag: h.etag.clone(),
            timestamp: h.timestamp,
        })
        .collect()
}

/// Records retention looks at per list and per poll: about a millisecond of work for
/// the file store, a query page and a transaction or two for the table store.
pub const RETENTION_STEP: usize = 500;

/// The cutoff of retention: `now - retention`, and never inside the overlap window
/// (`checkpoint - overlap`), which the next poll reads again.
pub fn retention_cutoff(
    retention: Option<Duration>,
    overlap: Duration,
    checkpoint: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Option<OffsetDateTime> {
    let (retention, checkpoint) = (retention?, checkpoint?);
    Some((now - retention).min(checkpoint - overlap))
}

/// One poll's share of retention, run by the daemon after a poll that succeeded: at
/// most [`RETENTION_STEP`] records of each list looked at, resuming where the last
/// poll stopped. A failure is logged; the next poll tries again. Returns whether a
/// round over every list has ended (nothing to resume at the next poll).
pub async fn retain(
    state: &dyn StateStore,
    retention: Option<Duration>,
    overlap: Duration,
    checkpoint: Option<OffsetDateTime>,
) -> bool {
    let Some(before) = retention_cutoff(retention, overlap, checkpoint, OffsetDateTime::now_utc())
    else {
        return true;
    };
    let result = state.prune_older_than(before, RETENTION_STEP).await;
    let complete = result.as_ref().map_or(true, |pruned| pruned.complete);
    match result {
        Ok(pruned) if pruned.removed() > 0 => tracing::info!(
            customers = pruned.customers,
            dead_letters = pruned.dead_letters,
            rejected = pruned.rejected,
            skipped = pruned.skipped,
            unidentifiable = pruned.unidentifiable,
            before = %crate::timestamp::format(before),
            "Removed lead data older than state.retention."
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "Cannot remove lead data older than state.retention; trying again after the next poll.")
        }
    }
    complete
}

/// Everything the state holds about a person.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub customer: Option<CustomerState>,
    pub dead_letters: Vec<DeadLetter>,
    pub rejected: Vec<RecordedRow>,
    pub skipped: Vec<RecordedRow>,
    pub unidentifiable: Vec<RecordedRow>,
}

/// Completes `person` from the state: the customer key and address of the customer an
/// external key names.
pub async fn resolve(state: &dyn StateStore, person: &mut Person) -> Result<(), StateError> {
    if person.key.is_some() {
        if let Some(Some(customer)) = state
            .customers(std::slice::from_ref(person.key.as_ref().expect("checked")))
            .await?
            .pop()
        {
            person.learn(&customer.lead);
        }
        return Ok(());
    }
    if let Some(customer) = state
        .all_customers()
        .await?
        .into_iter()
        .find(|c| person.is(&c.lead))
    {
        person.learn(&customer.lead);
        return Ok(());
    }
    if let Some(letter) = state
        .dead_letters()
        .await?
        .into_iter()
        .find(|l| person.is_in_dead_letter(l))
    {
        person.learn(&letter.payload);
    }
    Ok(())
}

/// Everything the state holds about `person` (resolved by [`resolve`]).
pub async fn find(state: &dyn StateStore, person: &Person) -> Result<Found, StateError> {
    let customer = match &person.key {
        Some(key) => state
            .customers(std::slice::from_ref(key))
            .await?
            .pop()
            .flatten(),
        None => None,
    };
    let dead_letters: Vec<DeadLetter> = state
        .dead_letters()
        .await?
        .into_iter()
        .filter(|l| person.is_in_dead_letter(l))
        .collect();
    let mut rows: HashSet<RowId> = HashSet::new();
    if let Some(c) = &customer {
        rows.extend(c.lead.history.iter().map(|h| h.row.clone()));
    }
    for l in &dead_letters {
        rows.extend(l.rows.iter().map(|r| r.id.clone()));
    }
    let pick = |list: Vec<RecordedRow>| -> Vec<RecordedRow> {
        list.into_iter()
            .filter(|r| person.is_in_row(r, &rows))
            .collect()
    };
    Ok(Found {
        customer,
        dead_letters,
        rejected: pick(state.rejected().await?),
        skipped: pick(state.skipped().await?),
        unidentifiable: pick(state.unidentifiable().await?),
    })
}

/// `leadsync export --email`: one JSON object per line, each with its `record_type`:
/// `customer` (the merged record with its bookkeeping), `history` (each row it came
/// from: the row's keys, version, time, action, offer), `dead_letter` (with the payload
/// sent and the sink's reason), and `rejected`, `skipped`, `unidentifiable` (the row as
/// kept, with its columns). Returns the number of lines.
pub fn write_access_export(
    found: &Found,
    out: &mut dyn std::io::Write,
) -> Result<usize, std::io::Error> {
    let mut lines: Vec<Value> = Vec::new();
    let tagged = |record_type: &str, value: Value| -> Value {
        let mut object = Map::new();
        object.insert("record_type".into(), Value::String(record_type.into()));
        match value {
            Value::Object(fields) => object.extend(fields),
            other => {
                object.insert("record".into(), other);
            }
        }
        Value::Object(object)
    };
    fn json<T: Serialize>(value: &T) -> Value {
        serde_json::to_value(value).expect("state records serialise to JSON")
    }
    if let Some(c) = &found.customer {
        lines.push(tagged("customer", json(c)));
        for h in &c.lead.history {
            lines.push(tagged("history", json(h)));
        }
    }
    for l in &found.dead_letters {
        lines.push(tagged("dead_letter", json(l)));
    }
    for (record_type, rows) in [
        ("rejected", &found.rejected),
        ("skipped", &found.skipped),
        ("unidentifiable", &found.unidentifiable),
    ] {
        for r in rows {
            lines.push(tagged(record_type, json(r)));
        }
    }
    for line in &lines {
        serde_json::to_writer(&mut *out, line)?;
        out.write_all(b"\n")?;
    }
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(text: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "CustomerInfo".into(),
            Value::String(format!("{{\"Email\":\"{text}\"}}")),
        );
        m
    }

    #[test]
    fn an_address_is_matched_whole_and_case_insensitively() {
        assert!(mentions(&columns("Bob@Contoso.com"), "bob@contoso.com"));
        assert!(mentions(&columns(" bob@contoso.com "), "bob@contoso.com"));
        assert!(!mentions(&columns("jimbob@contoso.com"), "bob@contoso.com"));
        assert!(!mentions(&columns("bob@contoso.com.au"), "bob@contoso.com"));
        assert!(!mentions(&columns("someone@else.com"), "bob@contoso.com"));
    }

    #[test]
    fn the_retention_cutoff_is_never_inside_the_overlap_window() {
        let day = Duration::from_secs(24 * 3600);
        let overlap = Duration::from_secs(15 * 60);
        let now = crate::timestamp::parse("2025-06-01T00:00:00Z").unwrap();
        let recent = Some(now - Duration::from_secs(60));
        let stale = now - 500 * day;
        assert_eq!(
            retention_cutoff(Some(400 * day), overlap, recent, now),
            Some(now - 400 * day)
        );
        // A checkpoint left behind (a daemon stopped for a long time): rows after it
        // are still to be read, and so are their customers' records.
        assert_eq!(
            retention_cutoff(Some(400 * day), overlap, Some(stale), now),
            Some(stale - overlap)
        );
        assert_eq!(retention_cutoff(None, overlap, recent, now), None);
        assert_eq!(retention_cutoff(Some(400 * day), overlap, None, now), None);
    }

    #[test]
    fn a_key_names_a_person_by_customer_key_external_key_or_address() {
        assert_eq!(
            Person::by_key("email:Bob@X.com"),
            Person::by_email("bob@x.com")
        );
        assert_eq!(
            Person::by_key("bob@x.com").key.as_deref(),
            Some("email:bob@x.com")
        );
        assert_eq!(
            Person::by_key("ls-0123456789abcdef0123")
                .external_key
                .as_deref(),
            Some("ls-0123456789abcdef0123")
        );
        assert_eq!(
            Person::by_key("fallback:a b|c|").key.as_deref(),
            Some("fallback:a b|c|")
        );
    }
}
