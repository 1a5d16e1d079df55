//! The processing lease in the state table: one entity, written only if unchanged since
//! it was read, expiring by the storage service's clock.

use super::*;

/// The lease entity as read: holder, expiry (`None`: unreadable), ETag, and the
/// service's time when it answered.
pub(super) struct LeaseEntity {
    owner: String,
    until: Option<OffsetDateTime>,
    etag: Etag,
    service_now: OffsetDateTime,
}

impl TableStore {
    /// Expiry is judged by the service's clock alone: the lease is free when its `Until`
    /// is not after the `Date` of the read that found it, and a new `Until` is that
    /// `Date` plus `ttl`. The `Date` is the service's time truncated to the second, so
    /// the lease written lasts at least `ttl - 1s` from when this call began, by any
    /// clock that runs at the service's pace ([`crate::state::LEASE_CLOCK_RESOLUTION`]).
    pub(super) async fn acquire_lease_now(
        &self,
        owner: &str,
        ttl: Duration,
    ) -> Result<Lease, StateError> {
        const OPERATION: &str = "take the processing lease";
        self.ready().await?;
        // A lost race is read again: the winner is then reported, or its lease has already ended.
        for _ in 0..4 {
            let Some(lease) = self.read_lease(OPERATION).await? else {
                // No lease yet, so no service time to write one with: write an ended
                // one (a lost race is fine), and take it over on the next round.
                self.write_lease(OPERATION, "", OffsetDateTime::UNIX_EPOCH, None)
                    .await?;
                continue;
            };
            let now = lease.service_now;
            let expired = lease.until.is_none_or(|until| until <= now);
            if lease.owner != owner && !expired {
                return Ok(Lease::HeldBy {
                    owner: lease.owner,
                    until: lease.until.expect("not expired, so readable"),
                });
            }
            if self
                .write_lease(OPERATION, owner, now + ttl, Some(lease.etag))
                .await?
            {
                if lease.owner != owner && !lease.owner.is_empty() {
                    tracing::info!(previous = %lease.owner, "Took over an expired processing lease.");
                }
                return Ok(Lease::Held);
            }
        }
        match self.read_lease(OPERATION).await? {
            Some(LeaseEntity {
                owner: holder,
                until: Some(until),
                service_now,
                ..
            }) if holder != owner && until > service_now => {
                Ok(Lease::HeldBy { owner: holder, until })
            }
            _ => Err(StateError::Io {
                operation: OPERATION,
                message: format!(
                    "table {}, entity ({LEASE}, {LEASE_ROW}): changed by other processes on every attempt",
                    self.name
                ),
            }),
        }
    }

    pub(super) async fn release_lease_now(&self, owner: &str) -> Result<(), StateError> {
        const OPERATION: &str = "release the processing lease";
        self.ready().await?;
        if let Some(lease) = self.read_lease(OPERATION).await? {
            let now = lease.service_now;
            if lease.owner == owner && lease.until.is_some_and(|u| u > now) {
                // Ok(false): another process took it over meanwhile; nothing to give up.
                self.write_lease(OPERATION, owner, now, Some(lease.etag))
                    .await?;
            }
        }
        Ok(())
    }

    /// The lease entity as the service has it (`None`: no lease yet), with the
    /// service's own time of the read: the `Date` of its answer.
    pub(super) async fn read_lease(
        &self,
        operation: &'static str,
    ) -> Result<Option<LeaseEntity>, StateError> {
        let what = format!("entity ({LEASE}, {LEASE_ROW})");
        let client = self
            .table
            .partition_key_client(LEASE)
            .entity_client(LEASE_ROW);
        let result = self
            .request(&what, || async { client.get::<Map<String, Value>>().await })
            .await;
        match result {
            Ok(response) => {
                let entity = response.entity;
                Ok(Some(LeaseEntity {
                    owner: str_of(&entity, "Owner").unwrap_or_default().to_owned(),
                    until: str_of(&entity, "Until").and_then(|u| timestamp::parse(u).ok()),
                    etag: response.etag,
                    service_now: response.common_storage_response_headers.date,
                }))
            }
            Err(e) if is_missing_entity(&e) => Ok(None),
            Err(e) => Err(self.io(operation, &what, &e)),
        }
    }

    /// Writes the lease for `owner` until `until`: insert when `etag` is `None`,
    /// else replace if it is unchanged. `Ok(false)`: someone else wrote it first.
    pub(super) async fn write_lease(
        &self,
        operation: &'static str,
        owner: &str,
        until: OffsetDateTime,
        etag: Option<Etag>,
    ) -> Result<bool, StateError> {
        let what = format!("entity ({LEASE}, {LEASE_ROW})");
        let entity = json!({
            "PartitionKey": LEASE,
            "RowKey": LEASE_ROW,
            "Owner": owner,
            "Until": timestamp::format(until),
        });
        let client = self
            .table
            .partition_key_client(LEASE)
            .entity_client(LEASE_ROW);
        let result = match etag {
            Some(etag) => {
                self.request(&what, || async {
                    client
                        .update(&entity, IfMatchCondition::Etag(etag.clone()))?
                        .await
                        .map(|_| ())
                })
                .await
            }
            None => {
                self.request(&what, || async {
                    self.table
                        .insert::<_, Map<String, Value>>(&entity)?
                        .await
                        .map(|_| ())
                })
                .await
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    status_of(&e),
                    Some(
                        StatusCode::PreconditionFailed
                            | StatusCode::Conflict
                            | StatusCode::NotFound
                    )
                ) && error_code(&e) != Some("TableNotFound") =>
            {
                Ok(false)
            }
            Err(e) => Err(self.io(operation, &what, &e)),
        }
    }
}
