//! Forgetting in the state table: handled markers that left the overlap window, data
//! older than `state.retention`, and one person (`leadsync forget`).

use super::*;

/// Where each list's retention step resumes: the customer, dead letter and row
/// partitions' query positions (`None`: from the start).
pub(super) type RetentionCursor = [Walk<(String, Option<String>)>; 3];

impl TableStore {
    /// The main entities a query returns (parts left out), with each one's record
    /// (its parts read too) and what deleting it needs.
    pub(super) async fn records_of(
        &self,
        operation: &'static str,
        pk: &'static str,
        entities: Vec<Map<String, Value>>,
    ) -> Result<Vec<(String, String, (Etag, u32))>, StateError> {
        let mut out = Vec::new();
        for entity in entities {
            let (Some(rk), Some(etag)) = (str_of(&entity, "RowKey"), str_of(&entity, "odata.etag"))
            else {
                continue;
            };
            if rk.contains('~') {
                continue;
            }
            let parts = parts_of(&entity);
            let json = match parts {
                0 => data_of(&entity),
                _ => match self.read_record(operation, pk, rk).await? {
                    Some(record) => record.json,
                    None => continue,
                },
            };
            out.push((rk.to_owned(), json, (Etag::from(etag), parts)));
        }
        Ok(out)
    }

    /// Every record of a partition (with `and`-ed `filter`), as [`TableStore::records_of`].
    pub(super) async fn all_records(
        &self,
        operation: &'static str,
        pk: &'static str,
        filter: &str,
    ) -> Result<Vec<(String, String, (Etag, u32))>, StateError> {
        let filter = format!("PartitionKey eq '{pk}'{filter}");
        let entities = self.query_all(operation, &filter).await?;
        let mains: Vec<Map<String, Value>> = entities
            .into_iter()
            .filter(|e| str_of(e, "RowKey").is_some_and(|rk| !rk.contains('~')))
            .collect();
        self.records_of(operation, pk, mains).await
    }

    /// Marks these rows handled where no marker of them (or a newer one) exists.
    pub(super) async fn mark_handled(
        &self,
        operation: &'static str,
        versions: &[RowVersion],
    ) -> Result<usize, StateError> {
        let bases: BTreeSet<String> = versions.iter().map(|v| row_key_base(&v.id)).collect();
        if bases.is_empty() {
            return Ok(0);
        }
        let states = self.row_states(operation, &bases).await?;
        let mut groups = Vec::new();
        let mut done = BTreeSet::new();
        for version in versions {
            let base = row_key_base(&version.id);
            if states.get(&base).is_some_and(|s| s.marker.is_some()) || !done.insert(base.clone()) {
                continue;
            }
            let at = timestamp::format(version.timestamp);
            let mut marker = props([
                ("PartitionKey", ROW),
                ("Kind", "handled"),
                ("RowEtag", version.etag.as_str()),
                ("At", at.as_str()),
                ("SourcePartitionKey", version.id.partition_key.as_str()),
                ("SourceRowKey", version.id.row_key.as_str()),
            ]);
            marker.insert(
                "RowKey".into(),
                Value::String(format!("{base}{HANDLED_SUFFIX}")),
            );
            groups.push(Group {
                label: format!("row {}", version.id),
                ops: vec![Op::Insert(marker)],
                customer: None,
            });
        }
        let marked = groups.len();
        self.commit(operation, ROW, groups).await?;
        Ok(marked)
    }

    /// One page (at most `step` entities) of `filter` from `from`, for retention.
    pub(super) async fn retention_page(
        &self,
        filter: &str,
        from: Option<&(String, Option<String>)>,
        step: usize,
    ) -> Result<QueryPage, StateError> {
        const OPERATION: &str = "remove data older than state.retention";
        let top = step.clamp(1, PAGE_SIZE as usize) as u32;
        self.page_of(filter, None, from, top)
            .await
            .map_err(|e| self.io(OPERATION, format!("query {filter:?}"), &e))
    }
}

pub(super) fn delete_group(label: String, rk: &str, head: (Etag, u32)) -> Group {
    Group {
        label,
        ops: delete_record(rk, head),
        customer: None,
    }
}

impl TableStore {
    /// Pages through the markers stamped before `before`, deleting each page's before
    /// reading the next, so memory stays at one page however many there are.
    pub(super) async fn prune_handled_now(
        &self,
        before: OffsetDateTime,
    ) -> Result<usize, StateError> {
        const OPERATION: &str = "prune handled rows";
        self.ready().await?;
        let filter = format!(
            "PartitionKey eq '{ROW}' and Kind eq 'handled' and At lt '{}'",
            timestamp::format(before)
        );
        let mut pruned = 0;
        let mut from = None;
        loop {
            let (entities, next) = self
                .page(&filter, Some("RowKey,At"), from.as_ref())
                .await
                .map_err(|e| self.io(OPERATION, "handled rows", &e))?;
            let mut groups = Vec::new();
            for entity in entities {
                // An unreadable record is kept: pruning must never cause a re-delivery.
                let old = str_of(&entity, "At")
                    .and_then(|t| timestamp::parse(t).ok())
                    .is_some_and(|t| t < before);
                let rk = str_of(&entity, "RowKey");
                let etag = str_of(&entity, "odata.etag");
                if let (true, Some(rk), Some(etag)) = (old, rk, etag) {
                    groups.push(Group {
                        label: format!("handled marker {rk}"),
                        ops: vec![Op::Delete {
                            rk: rk.to_owned(),
                            etag: Some(Etag::from(etag)),
                        }],
                        customer: None,
                    });
                }
            }
            pruned += groups.len();
            self.commit(OPERATION, ROW, groups).await?;
            match next {
                Some(next) => from = Some(next),
                None => return Ok(pruned),
            }
        }
    }

    /// Marks the customer's rows handled (where the settle that delivered them did not
    /// get to), then removes the customer, their dead letters, and the rows about them.
    pub(super) async fn forget_now(&self, person: &Person) -> Result<Forgotten, StateError> {
        const OP: &str = "forget a person";
        self.ready().await?;
        let mut forgotten = Forgotten::default();
        let candidates = match &person.key {
            Some(key) => {
                let rk = text_key(key);
                match self.read_record(OP, CUSTOMER, &rk).await? {
                    Some(r) => vec![(rk, r.json, (r.etag, r.parts))],
                    None => Vec::new(),
                }
            }
            None if person.external_key.is_some() => self.all_records(OP, CUSTOMER, "").await?,
            None => Vec::new(),
        };
        let (mut groups, mut removed) = (Vec::new(), Vec::new());
        for (rk, json, head) in candidates {
            let customer: CustomerState =
                decode(&json).map_err(|m| self.corrupt(format!("{CUSTOMER}/{rk}"), m))?;
            if !person.is(&customer.lead) {
                continue;
            }
            let history = crate::state::personal::history_versions(&customer.lead.history);
            forgotten.marked_handled += self.mark_handled(OP, &history).await?;
            forgotten.add_source_rows(customer.lead.history.iter().map(|h| &h.row));
            forgotten.customers.push(customer.lead.log_key());
            removed.push(customer.lead.key.clone());
            groups.push(delete_group(
                format!("customer {}", customer.lead.log_key()),
                &rk,
                head,
            ));
        }
        self.commit(OP, CUSTOMER, groups).await?;
        {
            let mut known = self.known.lock().expect("not poisoned");
            for key in &removed {
                known.customers.remove(key);
            }
        }
        let mut groups = Vec::new();
        for (rk, json, head) in self.all_records(OP, DEAD_LETTER, "").await? {
            let letter: DeadLetter =
                decode(&json).map_err(|m| self.corrupt(format!("{DEAD_LETTER}/{rk}"), m))?;
            if person.is_in_dead_letter(&letter) {
                forgotten.add_source_rows(letter.rows.iter().map(|r| &r.id));
                groups.push(delete_group(
                    format!("dead letter of {}", letter.payload.log_key()),
                    &rk,
                    head,
                ));
                forgotten.dead_letters.push(letter.payload.log_key());
            }
        }
        self.commit(OP, DEAD_LETTER, groups).await?;
        let rows: std::collections::HashSet<RowId> =
            forgotten.source_rows.iter().cloned().collect();
        let mut groups = Vec::new();
        let mut gone = Vec::new();
        for (rk, json, head) in self.all_records(OP, ROW, " and Kind eq 'listed'").await? {
            let row: RecordedRow =
                decode(&json).map_err(|m| self.corrupt(format!("{ROW}/{rk}"), m))?;
            if person.is_in_row(&row, &rows) {
                groups.push(delete_group(format!("row {}", row.row.id), &rk, head));
                match row.outcome {
                    Settled::Rejected { .. } => forgotten.rejected.push(row.row.id.clone()),
                    Settled::Skipped { .. } => forgotten.skipped.push(row.row.id.clone()),
                    _ => forgotten.unidentifiable.push(row.row.id.clone()),
                }
                gone.push(row.row.id);
            }
        }
        self.commit(OP, ROW, groups).await?;
        forgotten.add_source_rows(&gone);
        Ok(forgotten)
    }

    /// One query page per partition, of the records the service last wrote before
    /// `before` (its `Timestamp`; a record's own time is at or before it), resuming
    /// where the last step's page ended.
    pub(super) async fn prune_older_now(
        &self,
        before: OffsetDateTime,
        step: usize,
    ) -> Result<Pruned, StateError> {
        const OP: &str = "remove data older than state.retention";
        self.ready().await?;
        let cursor = self.retention.lock().expect("not poisoned").clone();
        let mut next = cursor.clone();
        let mut pruned = Pruned::default();
        let written_before = format!(" and Timestamp lt datetime'{}'", timestamp::format(before));
        for (i, pk, kind) in [
            (0, CUSTOMER, ""),
            (1, DEAD_LETTER, ""),
            (2, ROW, " and Kind eq 'listed'"),
        ] {
            let Walk::From(from) = &cursor[i] else {
                continue;
            };
            let filter = format!("PartitionKey eq '{pk}'{kind}{written_before}");
            let (entities, more) = self.retention_page(&filter, from.as_ref(), step).await?;
            let mut groups = Vec::new();
            let mut customers = Vec::new();
            // An unreadable record is kept, for a person to see.
            for (rk, json, head) in self.records_of(OP, pk, entities).await? {
                let label = match i {
                    0 => match decode::<CustomerState>(&json) {
                        Ok(c) if c.lead.last_seen < before => {
                            pruned.customers += 1;
                            customers.push(c.lead.key.clone());
                            format!("customer {}", c.lead.log_key())
                        }
                        _ => continue,
                    },
                    1 => match decode::<DeadLetter>(&json) {
                        Ok(l) if l.at < before => {
                            pruned.dead_letters += 1;
                            format!("dead letter of {}", l.payload.log_key())
                        }
                        _ => continue,
                    },
                    _ => match decode::<RecordedRow>(&json) {
                        Ok(r) if r.row.timestamp < before => {
                            match r.outcome {
                                Settled::Rejected { .. } => pruned.rejected += 1,
                                Settled::Skipped { .. } => pruned.skipped += 1,
                                _ => pruned.unidentifiable += 1,
                            }
                            format!("row {}", r.row.id)
                        }
                        _ => continue,
                    },
                };
                groups.push(delete_group(label, &rk, head));
            }
            self.commit(OP, pk, groups).await?;
            {
                let mut known = self.known.lock().expect("not poisoned");
                for key in &customers {
                    known.customers.remove(key);
                }
            }
            next[i] = match more {
                Some(more) => Walk::From(Some(more)),
                None => Walk::Done,
            };
        }
        pruned.complete = next.iter().all(Walk::is_done);
        *self.retention.lock().expect("not poisoned") = match pruned.complete {
            true => RetentionCursor::default(),
            false => next,
        };
        Ok(pruned)
    }
}
