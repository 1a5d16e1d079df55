//! The batch's query: which leads exist (`Microsoft.Dynamics.CRM.In` on the key),
//! open or closed, and what their `if_empty` columns hold; split to fit the URL.

use std::collections::HashMap;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::api::{error_text, hint};
use super::{DynamicsSink, ENTITY_SET, MAX_QUERY_URL_BYTES};
use crate::sink::http::Finished;
use crate::sink::Outcome;

impl DynamicsSink {
    /// The leads of the batch that exist, by lower-cased key value.
    pub(super) async fn existing(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, Map<String, Value>>, Outcome> {
        let mut select = vec![
            "leadid".to_owned(),
            "statecode".to_owned(),
            self.key_attribute.clone(),
            "_ownerid_value".to_owned(),
            "_parentcontactid_value".to_owned(),
            "_parentaccountid_value".to_owned(),
            "_qualifyingopportunityid_value".to_owned(),
        ];
        for column in &self.if_empty {
            if !select.contains(column) {
                select.push(column.clone());
            }
        }
        let url_of = |literals: &[String]| {
            let filter = format!(
                "Microsoft.Dynamics.CRM.In(PropertyName='{}',PropertyValues=[{}])",
                self.key_attribute,
                literals.join(",")
            );
            format!(
                "{}/{ENTITY_SET}?$select={}&$filter={}",
                self.api_base,
                select.join(","),
                urlencoding::encode(&filter)
            )
        };
        let mut chunks: Vec<Vec<String>> = Vec::new();
        for key in keys {
            let literal = format!("'{}'", key.replace('\'', "''"));
            let fits = chunks.last().is_some_and(|c| {
                let mut with = c.clone();
                with.push(literal.clone());
                url_of(&with).len() <= MAX_QUERY_URL_BYTES
            });
            if fits {
                chunks.last_mut().expect("checked").push(literal);
            } else {
                chunks.push(vec![literal]);
            }
        }
        let mut found = HashMap::new();
        for chunk in chunks {
            self.read_pages(url_of(&chunk), &mut found).await?;
        }
        Ok(found)
    }

    /// Reads the query at `url` and every page it links to (`@odata.nextLink` on
    /// the same API base) into `found`, by lower-cased key value.
    async fn read_pages(
        &self,
        mut url: String,
        found: &mut HashMap<String, Map<String, Value>>,
    ) -> Result<(), Outcome> {
        loop {
            let answer = match self
                .request(
                    Method::GET,
                    &url,
                    None,
                    &[(
                        "Prefer",
                        "odata.include-annotations=\"Microsoft.Dynamics.CRM.lookuplogicalname\"",
                    )],
                    "",
                )
                .await
            {
                Finished::Done(answer) => answer,
                Finished::GaveUp { after, reason } => {
                    return Err(Outcome::RetryLater { after, reason })
                }
                Finished::Failed { reason } => return Err(Outcome::EndpointFailed { reason }),
            };
            if !answer.status.is_success() {
                return Err(Outcome::EndpointFailed {
                    reason: format!(
                        "Dataverse refused the query of the batch's leads by sink.dynamics.key_attribute = {} ({}): {}{}",
                        self.key_attribute,
                        answer.status,
                        error_text(&answer.text),
                        hint(answer.status)
                    ),
                });
            }
            let page: Page = match serde_json::from_str(&answer.text) {
                Ok(page) => page,
                Err(e) => {
                    return Err(Outcome::RetryLater {
                        after: None,
                        reason: format!(
                            "Dataverse query answer unreadable ({e}): {}",
                            error_text(&answer.text)
                        ),
                    })
                }
            };
            for record in page.value {
                if let Some(key) = record.get(&self.key_attribute).and_then(Value::as_str) {
                    found.insert(key.to_lowercase(), record.clone());
                }
            }
            match page.next {
                Some(next) if next.starts_with(&self.api_base) => url = next,
                _ => return Ok(()),
            }
        }
    }
}

/// One page of a query's answer.
#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    value: Vec<Map<String, Value>>,
    #[serde(rename = "@odata.nextLink", default)]
    next: Option<String>,
}
