//! SOQL queries: the batch's Leads by external id (open or converted, and what their
//! `if_empty` fields hold), split to fit the URL, with `nextRecordsUrl` followed.

use std::collections::HashMap;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::api::snippet;
use super::{SalesforceSink, MAX_QUERY_URL_BYTES};
use crate::sink::http::Finished;
use crate::sink::Outcome;

/// What the batch's query found for one external id.
#[derive(Debug, Clone, Default)]
pub(super) struct Existing {
    pub(super) id: String,
    pub(super) converted: bool,
    pub(super) contact: Option<String>,
    pub(super) account: Option<String>,
    pub(super) opportunity: Option<String>,
    pub(super) owner: Option<String>,
    /// The `if_empty` fields' current values.
    pub(super) values: Map<String, Value>,
}

impl Existing {
    pub(super) fn from_record(record: &Map<String, Value>) -> Self {
        let text = |f: &str| {
            record
                .get(f)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Self {
            id: text("Id").unwrap_or_default(),
            converted: record.get("IsConverted") == Some(&Value::Bool(true)),
            contact: text("ConvertedContactId"),
            account: text("ConvertedAccountId"),
            opportunity: text("ConvertedOpportunityId"),
            owner: text("OwnerId"),
            values: record.clone(),
        }
    }

    pub(super) fn value(&self, field: &str) -> Option<&Value> {
        self.values
            .iter()
            .find(|(f, _)| f.eq_ignore_ascii_case(field))
            .map(|(_, v)| v)
    }
}

/// A string literal in SOQL: backslash and quote escaped.
pub(super) fn soql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl SalesforceSink {
    /// Runs a SOQL query and follows `nextRecordsUrl`; the records, or why there are none.
    pub(super) async fn query(&self, soql: &str) -> Finished<Vec<Map<String, Value>>> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            records: Vec<Map<String, Value>>,
            #[serde(default = "page_done")]
            done: bool,
            #[serde(rename = "nextRecordsUrl", default)]
            next: Option<String>,
        }
        fn page_done() -> bool {
            true
        }
        let mut path = format!(
            "/services/data/{}/query?q={}",
            self.api_version,
            urlencoding::encode(soql)
        );
        let mut records = Vec::new();
        loop {
            let text = match self.call(Method::GET, &path, None, false).await {
                Finished::Done(text) => text,
                Finished::GaveUp { after, reason } => return Finished::GaveUp { after, reason },
                Finished::Failed { reason } => return Finished::Failed { reason },
            };
            match serde_json::from_str::<Page>(&text) {
                Ok(page) => {
                    records.extend(page.records);
                    match page.next {
                        Some(next) if !page.done && next.starts_with("/services/data/") => {
                            path = next
                        }
                        _ => return Finished::Done(records),
                    }
                }
                Err(e) => {
                    return Finished::GaveUp {
                        after: None,
                        reason: format!(
                            "Salesforce query answer is not a record list ({e}): {}",
                            snippet(&text)
                        ),
                    }
                }
            }
        }
    }

    /// `SELECT {select} FROM {object} WHERE {field} IN (...)` for every value, in as
    /// few queries as the URL length allows (one for a collection of 200 keys).
    pub(super) async fn query_in(
        &self,
        select: &str,
        object: &str,
        field: &str,
        values: &[String],
    ) -> Finished<Vec<Map<String, Value>>> {
        let head = format!("SELECT {select} FROM {object} WHERE {field} IN (");
        let budget = MAX_QUERY_URL_BYTES.saturating_sub(urlencoding::encode(&head).len() + 200);
        let mut lists: Vec<Vec<String>> = Vec::new();
        let mut used = 0;
        for value in values {
            let literal = soql_literal(value);
            let cost = urlencoding::encode(&literal).len() + 3;
            if lists.is_empty() || used + cost > budget {
                lists.push(Vec::new());
                used = 0;
            }
            used += cost;
            lists.last_mut().expect("just pushed").push(literal);
        }
        let mut records = Vec::new();
        for list in lists {
            match self.query(&format!("{head}{})", list.join(","))).await {
                Finished::Done(found) => records.extend(found),
                other => return other,
            }
        }
        Finished::Done(records)
    }

    /// The Leads of `keys` that exist: converted or not, and their `if_empty` fields.
    pub(super) async fn existing(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, Existing>, Outcome> {
        let mut select: Vec<&str> = vec![
            "Id",
            self.external_id_field.as_str(),
            "IsConverted",
            "ConvertedContactId",
            "ConvertedAccountId",
            "ConvertedOpportunityId",
            "OwnerId",
        ];
        for field in &self.if_empty {
            if !select.iter().any(|f| f.eq_ignore_ascii_case(field)) {
                select.push(field);
            }
        }
        match self
            .query_in(&select.join(", "), "Lead", &self.external_id_field, keys)
            .await
        {
            Finished::Done(records) => Ok(records
                .iter()
                .filter_map(|r| {
                    let key = r
                        .iter()
                        .find(|(f, _)| f.eq_ignore_ascii_case(&self.external_id_field))
                        .and_then(|(_, v)| v.as_str())?;
                    Some((key.to_owned(), Existing::from_record(r)))
                })
                .collect()),
            Finished::GaveUp { after, reason } => Err(Outcome::RetryLater { after, reason }),
            Finished::Failed { reason } => Err(Outcome::EndpointFailed {
                reason: format!("Salesforce refused the query of the batch's Leads by sink.salesforce.external_id_field = {}: {reason}", self.external_id_field),
            }),
        }
    }
}
