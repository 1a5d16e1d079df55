//! The Azure table: pages of raw rows since a point in time, with continuation and retries.
//!
//! A `Timestamp` filter is a full scan on the service side, pages hold at most 1,000
//! entities, a page may be empty and still carry a continuation, and continuation
//! happens at partition boundaries. So every page is followed to the end, one page at
//! a time, and a failed page is retried from its own continuation, not from the start.

pub mod auth;
pub mod row;

use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::prelude::Continuable;
use azure_core::{RetryOptions, StatusCode, TransportOptions};
use azure_data_tables::clients::{TableServiceClient, TableServiceClientBuilder};
use azure_data_tables::operations::QueryEntityResponse;
use azure_data_tables::prelude::*;
use azure_storage::{CloudLocation, ConnectionString, StorageCredentials};
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::retry::RetrySettings;
use crate::retry::{with_backoff, GaveUp};
use crate::secret::SecretSource;
use crate::source::row::{RawRow, RowId};
use crate::timestamp;

/// Failures of the table source. Each says which request or row.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The settings cannot make a client (bad connection string, bad SAS, bad endpoint).
    #[error("cannot set up the table client ({key}): {message}")]
    Setup { key: &'static str, message: String },
    /// The table does not exist (yet): the marketplace creates it with the first lead.
    #[error("table {table} does not exist in the storage account yet")]
    TableNotFound { table: String },
    /// The service refused the request for good (authentication, permissions, bad request).
    #[error("table {table}: {operation} failed: {message}")]
    Permanent {
        table: String,
        operation: &'static str,
        message: String,
    },
    /// Timeouts, 5xx or throttling that outlasted every retry.
    #[error("table {table}: {operation} still failing after {attempts} attempts: {message}")]
    Exhausted {
        table: String,
        operation: &'static str,
        attempts: u32,
        message: String,
    },
    /// An entity came back without the system columns every entity has.
    #[error("table {table}: malformed entity ({row}): {message}")]
    Malformed {
        table: String,
        row: String,
        message: String,
    },
    /// Shutdown was requested while waiting to retry.
    #[error("shutdown requested")]
    Cancelled,
}

impl SourceError {
    /// True when the next poll may well succeed without anyone acting.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Exhausted { .. } | Self::TableNotFound { .. })
    }
}

/// Where to resume a query: the service's `NextPartitionKey` and `NextRowKey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub next_partition_key: String,
    pub next_row_key: Option<String>,
}

/// One page of a query.
#[derive(Debug)]
pub struct Page {
    pub rows: Vec<RawRow>,
    /// `None` only when the service said there is nothing more.
    pub next: Option<Continuation>,
}

/// One page of a query, each entity still its JSON text (see [`TableSource::fetch_raw_page`]).
pub struct RawPage {
    pub entities: Vec<Box<RawValue>>,
    /// `None` only when the service said there is nothing more.
    pub next: Option<Continuation>,
    /// The service's clock when it answered (the response's `Date`, whole seconds, so
    /// at or before the moment the answer was made). The same clock stamps every
    /// entity's `Timestamp`, so a poll can bound its checkpoint by when it started
    /// without trusting the local clock.
    pub date: OffsetDateTime,
}

impl std::fmt::Debug for RawPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawPage")
            .field("entities", &self.entities.len())
            .field("next", &self.next)
            .field("date", &self.date)
            .finish()
    }
}

/// A client of the lead table.
#[derive(Clone)]
pub struct TableSource {
    table: TableClient,
    name: String,
    page_size: u32,
    retry: RetrySettings,
}

impl std::fmt::Debug for TableSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableSource")
            .field("table", &self.name)
            .finish_non_exhaustive()
    }
}

impl TableSource {
    /// Builds the client. Reads the configured secrets, makes no request.
    pub fn connect(settings: &SourceSettings) -> Result<Self, SourceError> {
        let service = service_client(settings)?;
        Ok(Self {
            table: service.table_client(settings.table.clone()),
            name: settings.table.clone(),
            page_size: settings.page_size,
            retry: settings.retry.clone(),
        })
    }

    pub fn table_name(&self) -> &str {
        &self.name
    }

    /// Reads one page of rows whose Timestamp is at or after `since` (all rows when `None`).
    /// Transient failures are retried with jittered back-off, from this page's continuation.
    pub async fn fetch_page(
        &self,
        since: Option<OffsetDateTime>,
        continuation: Option<&Continuation>,
        cancel: &CancellationToken,
    ) -> Result<Page, SourceError> {
        let raw = self.fetch_raw_page(since, continuation, cancel).await?;
        Ok(Page {
            rows: self.rows(&raw)?,
            next: raw.next,
        })
    }

    /// One page with each entity left as its JSON text: the response is only split into
    /// entities, so the continuation is known, and the next page can be asked for,
    /// before the rows are built ([`TableSource::rows`]). [`TableSource::fetch_page`]
    /// is the two in one.
    pub async fn fetch_raw_page(
        &self,
        since: Option<OffsetDateTime>,
        continuation: Option<&Continuation>,
        cancel: &CancellationToken,
    ) -> Result<RawPage, SourceError> {
        let response = self.query(since, continuation, cancel).await?;
        Ok(RawPage {
            next: next_of(&response),
            date: response.common_storage_response_headers.date,
            entities: response.entities,
        })
    }

    /// The rows of a page from [`TableSource::fetch_raw_page`], the system columns split
    /// off and the OData annotations dropped. Fails on the first entity that cannot be
    /// read (tools and tests; the pipeline uses [`TableSource::rows_and_malformed`]).
    pub fn rows(&self, page: &RawPage) -> Result<Vec<RawRow>, SourceError> {
        page.entities
            .iter()
            .map(|entity| {
                raw_row_of_json(entity.get()).map_err(|(row, message)| self.malformed(row, message))
            })
            .collect()
    }

    /// The rows of a page, and apart from them the entities that cannot be read as rows
    /// (a column value that is not valid JSON text, such as a lone UTF-16 surrogate),
    /// each with the keys it could still be read at. One bad entity does not fail the
    /// page: the pipeline settles it as a rejected row, by its keys.
    pub fn rows_and_malformed(&self, page: &RawPage) -> (Vec<RawRow>, Vec<MalformedEntity>) {
        let mut rows = Vec::with_capacity(page.entities.len());
        let mut malformed = Vec::new();
        for entity in &page.entities {
            match raw_row_of_json(entity.get()) {
                Ok(row) => rows.push(row),
                Err((_, message)) => malformed.push(MalformedEntity::read(entity.get(), message)),
            }
        }
        (rows, malformed)
    }

    /// One query request for a page of entities, with retries.
    async fn query(
        &self,
        since: Option<OffsetDateTime>,
        continuation: Option<&Continuation>,
        cancel: &CancellationToken,
    ) -> Result<QueryEntityResponse<Box<RawValue>>, SourceError> {
        let filter = since.map(|t| format!("Timestamp ge datetime'{}'", timestamp::format(t)));
        self.with_retries("query", cancel, || async {
            let mut query = self.table.query().top(self.page_size);
            if let Some(filter) = &filter {
                query = query.filter(filter.clone());
            }
            if let Some(c) = continuation {
                query = query.initial_partition_key(c.next_partition_key.clone());
                if let Some(rk) = &c.next_row_key {
                    query = query.initial_row_key(rk.clone());
                }
            }
            query
                .into_stream::<Box<RawValue>>()
                .next()
                .await
                .ok_or_else(|| {
                    azure_core::Error::message(ErrorKind::Other, "the query returned no page")
                })?
        })
        .await
    }

    /// Creates the table when it does not exist (tests, the demo and `check` use it;
    /// in production the marketplace creates it).
    pub async fn create_table_if_missing(&self) -> Result<(), SourceError> {
        match self.table.create().await {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(StatusCode::Conflict) => Ok(()),
            Err(e) => Err(self.permanent("create table", &e)),
        }
    }

    /// Writes (inserts or replaces) one entity. `columns` must hold `PartitionKey` and `RowKey`.
    pub async fn upsert_entity(&self, columns: &Map<String, Value>) -> Result<(), SourceError> {
        let key = |name: &str| {
            columns
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| SourceError::Setup {
                    key: "entity",
                    message: format!("the entity has no string {name}"),
                })
        };
        let (pk, rk) = (key("PartitionKey")?, key("RowKey")?);
        let cancel = CancellationToken::new();
        self.with_retries("upsert entity", &cancel, || async {
            self.table
                .partition_key_client(escape_key(&pk))
                .entity_client(escape_key(&rk))
                .insert_or_replace(columns)?
                .await
        })
        .await
        .map(|_| ())
    }

    /// Deletes the row (`leadsync forget --table-rows`): `Ok(false)` when it was gone already.
    pub async fn delete_row(&self, row: &crate::source::row::RowId) -> Result<bool, SourceError> {
        let cancel = CancellationToken::new();
        let client = self
            .table
            .partition_key_client(escape_key(&row.partition_key))
            .entity_client(escape_key(&row.row_key));
        self.with_retries("delete row", &cancel, || async {
            match client.delete().await {
                Ok(_) => Ok(true),
                Err(e)
                    if status_of(&e) == Some(StatusCode::NotFound)
                        && error_code(&e) != Some("TableNotFound") =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn with_retries<T, F, Fut>(
        &self,
        operation: &'static str,
        cancel: &CancellationToken,
        attempt_once: F,
    ) -> Result<T, SourceError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = azure_core::Result<T>>,
    {
        let not_found = |e: &azure_core::Error| status_of(e) == Some(StatusCode::NotFound);
        let result = with_backoff(
            &self.retry,
            Some(cancel),
            attempt_once,
            |e| !not_found(e) && is_transient(e),
            |attempt, delay, error| {
                tracing::warn!(
                    table = %self.name,
                    operation,
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    error = %describe(error),
                    "Table request failed; retrying."
                )
            },
        )
        .await;
        result.map_err(|gave_up| match gave_up {
            GaveUp::Cancelled => SourceError::Cancelled,
            GaveUp::Failed { error, .. } if not_found(&error) => SourceError::TableNotFound {
                table: self.name.clone(),
            },
            GaveUp::Failed { error, .. } if !is_transient(&error) => {
                self.permanent(operation, &error)
            }
            GaveUp::Failed { error, attempts } => SourceError::Exhausted {
                table: self.name.clone(),
                operation,
                attempts,
                message: describe(&error),
            },
        })
    }

    fn permanent(&self, operation: &'static str, error: &azure_core::Error) -> SourceError {
        SourceError::Permanent {
            table: self.name.clone(),
            operation,
            message: describe(error),
        }
    }

    fn malformed(&self, row: String, message: String) -> SourceError {
        SourceError::Malformed {
            table: self.name.clone(),
            row,
            message,
        }
    }
}

/// A table service client for the configured account: our HTTP client with its
/// timeouts, and the SDK's own retries off. The state backend in a table uses it too.
pub fn service_client(settings: &SourceSettings) -> Result<TableServiceClient, SourceError> {
    let (location, credentials) = location_and_credentials(settings)?;
    let http = reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
        .build()
        .map_err(|e| SourceError::Setup {
            key: "source",
            message: format!("cannot build the HTTP client: {e}"),
        })?;
    // Retries are ours (see `fetch_page`): one jittered policy that also honours
    // shutdown. The SDK default (8 retries up to 30 s each) would hide an outage for minutes.
    Ok(
        TableServiceClientBuilder::with_location(location, credentials)
            .retry(RetryOptions::none())
            .transport(TransportOptions::new(Arc::new(http)))
            .build(),
    )
}

/// Where the page after `response` starts, if the service said there is one.
fn next_of(response: &QueryEntityResponse<Box<RawValue>>) -> Option<Continuation> {
    response.continuation().map(|(pk, rk)| Continuation {
        next_partition_key: pk,
        next_row_key: rk,
    })
}

/// The SDK does not escape `'` when it builds `(PartitionKey='..',RowKey='..')`.
fn escape_key(key: &str) -> String {
    key.replace('\'', "''")
}

pub(crate) fn status_of(error: &azure_core::Error) -> Option<StatusCode> {
    match error.kind() {
        ErrorKind::HttpResponse { status, .. } => Some(*status),
        _ => None,
    }
}

pub(crate) fn error_code(error: &azure_core::Error) -> Option<&str> {
    match error.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.as_deref(),
        _ => None,
    }
}

/// Timeouts, connection failures, 408, 429 and 5xx are worth retrying; the rest is not.
pub(crate) fn is_transient(error: &azure_core::Error) -> bool {
    match error.kind() {
        ErrorKind::HttpResponse { status, .. } => {
            let code = u16::from(*status);
            code == 408 || code == 429 || code >= 500
        }
        ErrorKind::Io => true,
        _ => false,
    }
}

/// Status and service error code for HTTP errors (their full text lists every
/// response header); otherwise the error and its causes, with any SAS signature removed.
pub(crate) fn describe(error: &azure_core::Error) -> String {
    if let ErrorKind::HttpResponse { status, error_code } = error.kind() {
        return format!(
            "HTTP {} {}",
            u16::from(*status),
            error_code.as_deref().unwrap_or("(no error code)")
        );
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    redact_sas(&text)
}

/// A reqwest error names the URL, which carries the SAS when one is configured.
pub(crate) fn redact_sas(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("sig=") {
        out.push_str(&rest[..i + 4]);
        out.push_str("[redacted]");
        rest = &rest[i + 4..];
        let end = rest
            .find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'' || c == ')')
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// An entity that could not be read as a row: its system columns as far as they could
/// be read (by a pass that skips every other column unchecked), the reason, and the
/// entity's text for a person to look at.
#[derive(Debug, Clone)]
pub struct MalformedEntity {
    pub id: Option<RowId>,
    pub etag: Option<String>,
    pub timestamp: Option<OffsetDateTime>,
    pub message: String,
    pub text: String,
}

impl MalformedEntity {
    fn read(text: &str, message: String) -> Self {
        #[derive(serde::Deserialize)]
        struct Keys {
            #[serde(rename = "PartitionKey")]
            partition_key: Option<String>,
            #[serde(rename = "RowKey")]
            row_key: Option<String>,
            #[serde(rename = "odata.etag")]
            etag: Option<String>,
            #[serde(rename = "Timestamp")]
            timestamp: Option<String>,
        }
        // Unknown fields are skipped without decoding their strings, so a column the
        // full read refused does not stop this one.
        let keys: Option<Keys> = serde_json::from_str(text).ok();
        let (id, etag, timestamp) = match keys {
            Some(k) => (
                k.partition_key
                    .zip(k.row_key)
                    .map(|(pk, rk)| RowId::new(pk, rk)),
                k.etag,
                k.timestamp.and_then(|t| timestamp::parse(&t).ok()),
            ),
            None => (None, None, None),
        };
        MalformedEntity {
            id,
            etag,
            timestamp,
            message,
            text: text.to_owned(),
        }
    }
}

/// An entity's system columns, split off the rest as it is read.
struct Entity {
    partition_key: Option<Value>,
    row_key: Option<Value>,
    etag: Option<Value>,
    timestamp: Option<Value>,
    /// Every other column, OData annotations left out.
    columns: Map<String, Value>,
}

/// The columns of an entity returned with `odata=fullmetadata` that are not leadsync's
/// to keep: the OData annotations (`odata.id`, `odata.editLink`, `Timestamp@odata.type`, ...).
fn is_annotation(name: &str) -> bool {
    // `str::contains` with a pattern costs a searcher's set-up per name (1% of a
    // backfill's instructions); a column name rarely holds an `@`.
    name.starts_with("odata.")
        || name
            .bytes()
            .enumerate()
            .any(|(i, b)| b == b'@' && name[i..].starts_with("@odata."))
}

impl Entity {
    /// An entity from its JSON, the annotations skipped rather than built and dropped
    /// (they are a third of a marketplace entity's text).
    fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    fn into_row(self) -> Result<RawRow, (String, String)> {
        let text = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let (pk, rk) = match (text(self.partition_key), text(self.row_key)) {
            (Some(pk), Some(rk)) => (pk, rk),
            (pk, rk) => {
                return Err((
                    format!("PartitionKey={pk:?} RowKey={rk:?}"),
                    "PartitionKey or RowKey missing".into(),
                ))
            }
        };
        let id = RowId::new(pk, rk);
        let etag = text(self.etag).ok_or_else(|| (id.to_string(), "no odata.etag".to_owned()))?;
        let timestamp = text(self.timestamp)
            .ok_or_else(|| (id.to_string(), "no Timestamp".to_owned()))
            .and_then(|t| {
                timestamp::parse(&t).map_err(|e| {
                    (
                        id.to_string(),
                        format!("Timestamp {t:?} is not RFC 3339: {e}"),
                    )
                })
            })?;
        Ok(RawRow {
            id,
            etag,
            timestamp,
            columns: self.columns,
        })
    }
}

impl<'de> serde::Deserialize<'de> for Entity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entity;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an entity (a JSON object)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entity, A::Error> {
                let mut entity = Entity {
                    partition_key: None,
                    row_key: None,
                    etag: None,
                    timestamp: None,
                    columns: Map::new(),
                };
                while let Some(Key(name)) = map.next_key()? {
                    let slot = match &*name {
                        "PartitionKey" => &mut entity.partition_key,
                        "RowKey" => &mut entity.row_key,
                        "odata.etag" => &mut entity.etag,
                        "Timestamp" => &mut entity.timestamp,
                        other if is_annotation(other) => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                        _ => {
                            entity.columns.insert(name.into_owned(), map.next_value()?);
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(entity)
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// A column name (or any object key), borrowed from the JSON text when it has no
/// escapes.
pub(crate) struct Key<'de>(pub(crate) std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(v.to_owned().into()))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// Splits the system columns off an entity returned with `odata=fullmetadata`, from
/// its JSON text.
fn raw_row_of_json(text: &str) -> Result<RawRow, (String, String)> {
    Entity::from_json(text)
        .map_err(|e| ("(not an entity)".to_owned(), e.to_string()))?
        .into_row()
}

/// Where the table is and how to sign in to it: from the connection string, or
/// else from the account and its key, identity or SAS.
fn location_and_credentials(
    s: &SourceSettings,
) -> Result<(CloudLocation, StorageCredentials), SourceError> {
    match &s.connection_string {
        Some(secret) => from_connection_string(s, secret),
        None => from_account(s),
    }
}

/// The connection string decides; `source.account` and `source.endpoint` fill in
/// what it leaves out.
fn from_connection_string(
    s: &SourceSettings,
    secret: &SecretSource,
) -> Result<(CloudLocation, StorageCredentials), SourceError> {
    let secret = secret
        .resolve("source.connection_string")
        .map_err(|e| setup("source.connection_string", e.to_string()))?;
    let cs = ConnectionString::new(secret.expose_secret()).map_err(|_| {
        setup(
            "source.connection_string",
            "not a valid storage connection string (expected Key=Value pairs separated by ';')"
                .into(),
        )
    })?;
    if cs.use_development_storage == Some(true) {
        return Ok((
            CloudLocation::Emulator {
                address: "127.0.0.1".into(),
                port: 10002,
            },
            StorageCredentials::emulator(),
        ));
    }
    let account = cs
        .account_name
        .map(str::to_owned)
        .or_else(|| s.account.clone())
        .ok_or_else(|| {
            setup(
                "source.connection_string",
                "the connection string has no AccountName".into(),
            )
        })?;
    let credentials = cs.storage_credentials().map_err(|_| {
        setup(
            "source.connection_string",
            "the connection string has neither AccountKey nor SharedAccessSignature".into(),
        )
    })?;
    let endpoint = s.endpoint.as_deref().or(cs.table_endpoint);
    let location = match endpoint {
        Some(endpoint) => CloudLocation::Custom {
            account,
            uri: endpoint.trim_end_matches('/').to_owned(),
        },
        None => match cs.endpoint_suffix {
            Some(suffix) => CloudLocation::Custom {
                uri: format!("https://{account}.table.{suffix}"),
                account,
            },
            None => CloudLocation::Public { account },
        },
    };
    Ok((location, credentials))
}

/// `source.account` with its key, managed or workload identity, or SAS (the first
/// set), at `source.endpoint` or the public cloud.
fn from_account(s: &SourceSettings) -> Result<(CloudLocation, StorageCredentials), SourceError> {
    let account = s.account.clone().unwrap_or_default();
    let credentials = if let Some(key) = &s.account_key {
        let key = key
            .resolve("source.account_key")
            .map_err(|e| setup("source.account_key", e.to_string()))?;
        StorageCredentials::access_key(account.clone(), key.expose_secret().to_owned())
    } else if let Some(kind) = s.identity {
        let credential = crate::source::auth::credential(
            kind,
            s.identity_client_id.clone(),
            s.identity_endpoint.clone(),
            s.request_timeout,
        )
        .map_err(|e| setup("source.identity", e.to_string()))?;
        StorageCredentials::token_credential(credential)
    } else if let Some(sas) = &s.sas_token {
        let sas = sas
            .resolve("source.sas_token")
            .map_err(|e| setup("source.sas_token", e.to_string()))?;
        StorageCredentials::sas_token(sas.expose_secret().trim_start_matches('?')).map_err(
            |_| {
                setup(
                    "source.sas_token",
                    "not a valid shared access signature".into(),
                )
            },
        )?
    } else {
        return Err(setup(
            "source.connection_string",
            "no credentials configured".into(),
        ));
    };
    let location = match &s.endpoint {
        Some(endpoint) => CloudLocation::Custom {
            account,
            uri: endpoint.trim_end_matches('/').to_owned(),
        },
        None => CloudLocation::Public { account },
    };
    Ok((location, credentials))
}

/// A setting that cannot be used to reach the table.
fn setup(key: &'static str, message: String) -> SourceError {
    SourceError::Setup { key, message }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// Table name. The marketplace has always used `MarketplaceLeads`, but never documented it.
    #[serde(default = "default_table")]
    pub table: String,
    /// A full storage connection string (`UseDevelopmentStorage=true` works too).
    pub connection_string: Option<SecretSource>,
    /// Storage account name, with `account_key` or `sas_token`.
    pub account: Option<String>,
    /// Storage account key.
    pub account_key: Option<SecretSource>,
    /// Shared access signature (query string, with or without the leading `?`).
    pub sas_token: Option<SecretSource>,
    /// Entra ID instead of a key: "managed_identity", "workload_identity" or "azure_cli"
    /// (needs `account` and the "Storage Table Data Contributor" role).
    pub identity: Option<IdentityKind>,
    /// Client id of a user-assigned managed identity (unset: the system-assigned one).
    pub identity_client_id: Option<String>,
    /// Managed-identity token endpoint override (default: `IDENTITY_ENDPOINT` when the
    /// platform sets it, else the VM metadata service).
    pub identity_endpoint: Option<String>,
    /// Table endpoint URL, for sovereign clouds or emulators (default: the public cloud URL of `account`).
    pub endpoint: Option<String>,
    /// Look-back window re-read on every poll, because Timestamps are not ordered across partitions.
    #[serde(default = "default_overlap", with = "humantime_serde")]
    pub overlap: Duration,
    /// Entities per page requested from the service (the service caps it at 1000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Timeout of one request to the table service.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of one page request on timeouts, 5xx and throttling.
    #[serde(default)]
    pub retry: RetrySettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    ManagedIdentity,
    WorkloadIdentity,
    AzureCli,
}

fn default_table() -> String {
    "MarketplaceLeads".into()
}
fn default_overlap() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_page_size() -> u32 {
    1000
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

impl SourceSettings {
    /// Checks the `source.*` keys: `Err((key, why))` for the first one that is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        if self.table.trim().is_empty() {
            return bad("source.table", "the table name must not be empty");
        }
        if !valid_table_name(&self.table) {
            return bad(
                "source.table",
                "a table name is 3 to 63 letters and digits, starting with a letter",
            );
        }
        let credentials = [
            self.connection_string.is_some(),
            self.account_key.is_some(),
            self.sas_token.is_some(),
            self.identity.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if credentials != 1 {
            return bad(
                "source.connection_string",
                "set exactly one of source.connection_string, source.account_key, source.sas_token or source.identity",
            );
        }
        if (self.account_key.is_some() || self.sas_token.is_some() || self.identity.is_some())
            && self.account.as_deref().is_none_or(|a| a.trim().is_empty())
        {
            return bad(
                "source.account",
                "the storage account name is required with account_key, sas_token or identity",
            );
        }
        if self.identity_client_id.is_some() && self.identity != Some(IdentityKind::ManagedIdentity)
        {
            return bad(
                "source.identity_client_id",
                "only applies with identity = \"managed_identity\"",
            );
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                return bad("source.endpoint", "must be an http(s) URL");
            }
        }
        if self.overlap.is_zero() {
            return bad(
                "source.overlap",
                "must be greater than zero: late-visible rows would be lost",
            );
        }
        if self.page_size == 0 || self.page_size > 1000 {
            return bad("source.page_size", "must be between 1 and 1000");
        }
        if self.request_timeout.is_zero() {
            return bad("source.request_timeout", "must be greater than zero");
        }
        self.retry.validate("source.retry")
    }
}

/// Azure table names: 3-63 alphanumerics, starting with a letter.
pub fn valid_table_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sas_signature_in_an_error_text_is_redacted() {
        let text = "GET https://a.table.core.windows.net/T()?sv=2020&sig=abc%2Fdef&se=x failed";
        let redacted = redact_sas(text);
        assert!(!redacted.contains("abc%2Fdef"), "{redacted}");
        assert!(redacted.contains("sig=[redacted]&se=x"), "{redacted}");
    }

    #[test]
    fn a_sas_signature_inside_a_url_in_parentheses_is_redacted() {
        let text =
            "error sending request for url (https://a.table.core.windows.net/T()?sv=1&sig=abc%2F)";
        let redacted = redact_sas(text);
        assert!(!redacted.contains("abc%2F"), "{redacted}");
        assert!(redacted.ends_with("sig=[redacted])"), "{redacted}");
    }

    #[test]
    fn odata_annotations_are_told_from_column_names() {
        for name in [
            "odata.etag",
            "Count@odata.type",
            "a@b@odata.type",
            "é@odata.type",
            "x@odata.",
        ] {
            assert!(is_annotation(name), "{name}");
        }
        for name in [
            "Email@contoso.com",
            "Odata.x",
            "odata",
            "x@odata",
            "@",
            "",
            "LeadSource",
        ] {
            assert!(!is_annotation(name), "{name}");
        }
    }

    #[test]
    fn an_entity_keeps_its_columns_and_drops_odata_annotations() {
        // As the service sends it with odata=fullmetadata, a key with an escape included.
        let text = r#"{"odata.type":"acct.Leads","odata.id":"http://127.0.0.1/acct/Leads(PartitionKey='p',RowKey='r')",
            "odata.etag":"W/\"1\"","odata.editLink":"Leads(PartitionKey='p',RowKey='r')",
            "PartitionKey":"p","RowKey":"r",
            "Timestamp":"2024-05-01T10:00:00.1234567Z","Timestamp@odata.type":"Edm.DateTime",
            "LeadSource":"AzureMarketplace-INS | a.b","Count":3,"Count@odata.type":"Edm.Int64",
            "Caf\u00e9":{"nested":[1,"two",null]},"Empty":null}"#;
        let row = raw_row_of_json(text).unwrap();
        assert_eq!(row.id, RowId::new("p", "r"));
        assert_eq!(row.etag, "W/\"1\"");
        assert_eq!(row.timestamp.nanosecond(), 123_456_700);
        let names: Vec<&str> = row.columns.keys().map(String::as_str).collect();
        assert_eq!(names, ["Café", "Count", "Empty", "LeadSource"]);
        assert_eq!(row.columns["Count"], serde_json::json!(3));
        assert_eq!(
            row.columns["Café"],
            serde_json::json!({"nested": [1, "two", null]})
        );
        assert_eq!(row.columns["Empty"], Value::Null);
    }

    #[test]
    fn an_entity_without_a_timestamp_is_malformed_and_named() {
        let (row, message) =
            raw_row_of_json(r#"{"odata.etag":"x","PartitionKey":"p","RowKey":"r"}"#).unwrap_err();
        assert!(row.contains("\"r\""), "{row}");
        assert!(message.contains("Timestamp"));
    }

    #[test]
    fn an_entity_with_a_system_column_of_the_wrong_type_is_malformed_and_says_which() {
        let id = RowId::new("p", "r").to_string();
        for (text, row, message) in [
            (
                r#"{"odata.etag":"x","PartitionKey":1,"RowKey":"r","Timestamp":"2024-05-01T10:00:00Z"}"#,
                "PartitionKey=None RowKey=Some(\"r\")",
                "PartitionKey or RowKey missing",
            ),
            (
                r#"{"odata.etag":"x","PartitionKey":"p","RowKey":"r","Timestamp":"yesterday"}"#,
                id.as_str(),
                "Timestamp \"yesterday\" is not RFC 3339",
            ),
            (
                r#"{"PartitionKey":"p","RowKey":"r","Timestamp":"2024-05-01T10:00:00Z"}"#,
                id.as_str(),
                "no odata.etag",
            ),
        ] {
            let (got_row, got_message) = raw_row_of_json(text).unwrap_err();
            assert_eq!(got_row, row, "{text}");
            assert!(got_message.starts_with(message), "{text}: {got_message}");
        }
        let (row, message) = raw_row_of_json("[1, 2]").unwrap_err();
        assert_eq!(row, "(not an entity)");
        assert!(message.contains("an entity"), "{message}");
    }
}
