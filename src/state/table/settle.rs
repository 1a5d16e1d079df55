//! A settle in the state table: dead letters, list entries, customers, then handled
//! markers, each in entity group transactions of their own partition (see the module
//! documentation of `table` for why that order loses no outcome).

use super::*;

impl TableStore {
    /// Writes dead letters, then the list entries of rows not delivered, then
    /// customers, then the rows' handled markers: not atomic, but a crash between two
    /// steps never hides a row's outcome (see the module's documentation).
    /// - Before the customers: a row is neither marked handled nor in its customer's
    ///   history, so the next poll reads it, merges and delivers it again (an upsert)
    ///   and settles it again, overwriting its dead letter and list entry.
    /// - After them: a row in its customer's history is dropped by the merge as already
    ///   handled, and its outcome is kept already: a refusal's dead letter and the row
    ///   under `rows rejected`. A row in no customer's history (cannot become a lead, a
    ///   test lead, unidentifiable) or in an undelivered one's (do-not-contact) is read
    ///   and settled again.
    pub(super) async fn settle_now(&self, batch: &SettleBatch) -> Result<(), StateError> {
        self.known.lock().expect("not poisoned").settle_begins();
        self.ready().await?;
        // Read before anything is written: what is not known is read as it stands now.
        let (lists, markers) = self.row_groups(batch).await?;
        self.settle_dead_letters(&batch.dead_letters, &batch.resolved)
            .await?;
        self.commit("settle rows", ROW, lists).await?;
        self.settle_customers(&batch.customers).await?;
        self.commit("settle rows", ROW, markers).await
    }

    /// Writes groups in entity group transactions of one partition, in order, a group
    /// never split. Every operation's own status is checked: a failed transaction
    /// comes back as a success with the failure inside.
    pub(super) async fn commit(
        &self,
        operation: &'static str,
        pk: &'static str,
        groups: Vec<Group>,
    ) -> Result<(), StateError> {
        let mut batch: Vec<Group> = Vec::new();
        let (mut ops, mut bytes) = (0, 0);
        for group in groups {
            let size: usize = group.ops.iter().map(Op::size).sum();
            if group.ops.len() > MAX_TRANSACTION_OPS || size > MAX_TRANSACTION_BYTES {
                return Err(StateError::Io {
                    operation,
                    message: format!(
                        "table {}, {}: the record is {size} bytes in {} entities; the table state backend stores at most {MAX_TRANSACTION_BYTES} bytes per record",
                        self.name,
                        group.label,
                        group.ops.len()
                    ),
                });
            }
            if !batch.is_empty()
                && (ops + group.ops.len() > MAX_TRANSACTION_OPS
                    || bytes + size > MAX_TRANSACTION_BYTES)
            {
                self.transaction(operation, pk, &std::mem::take(&mut batch))
                    .await?;
                (ops, bytes) = (0, 0);
            }
            ops += group.ops.len();
            bytes += size;
            batch.push(group);
        }
        if !batch.is_empty() {
            self.transaction(operation, pk, &batch).await?;
        }
        Ok(())
    }

    pub(super) async fn transaction(
        &self,
        operation: &'static str,
        pk: &'static str,
        groups: &[Group],
    ) -> Result<(), StateError> {
        let ops: Vec<&Op> = groups.iter().flat_map(|g| &g.ops).collect();
        let labels = || {
            let mut text = groups
                .iter()
                .take(3)
                .map(|g| g.label.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            if groups.len() > 3 {
                text.push_str(&format!(" and {} more", groups.len() - 3));
            }
            text
        };
        let result = self.transaction_once(operation, pk, &ops, labels).await;
        // What this store knows of the customers written: the ETags the service returned,
        // or nothing (a failed or uncertain write leaves them for a read to say).
        if groups.iter().any(|g| g.customer.is_some()) {
            let mut known = self.known.lock().expect("not poisoned");
            match &result {
                Ok(responses) => {
                    known.writes += 1;
                    let mut first = 0;
                    for group in groups {
                        if let Some((key, parts)) = &group.customer {
                            match responses.get(first).cloned().flatten() {
                                Some(etag) => known.wrote_customer(key, Some((etag, *parts))),
                                None => {
                                    known.customers.remove(key);
                                }
                            }
                        }
                        first += group.ops.len();
                    }
                }
                Err(_) => {
                    for (key, _) in groups.iter().filter_map(|g| g.customer.as_ref()) {
                        known.customers.remove(key);
                    }
                }
            }
        }
        result.map(|_| ())
    }

    /// One transaction, its operations' responses in order.
    pub(super) async fn transaction_once(
        &self,
        operation: &'static str,
        pk: &'static str,
        ops: &[&Op],
        labels: impl Fn() -> String,
    ) -> Result<Vec<Option<Etag>>, StateError> {
        let client = self.table.partition_key_client(pk);
        let response = self
            .request("a transaction", || async {
                let mut tx = client.transaction();
                for op in ops {
                    tx = match op {
                        Op::Insert(entity) => tx.insert(entity)?,
                        Op::Update { rk, entity, etag } => tx.update(
                            rk.as_str(),
                            entity,
                            Some(IfMatchCondition::Etag(etag.clone())),
                        )?,
                        Op::Upsert { rk, entity } => tx.insert_or_replace(rk.as_str(), entity)?,
                        Op::Delete { rk, etag } => tx.delete(
                            rk.as_str(),
                            Some(
                                etag.clone()
                                    .map_or(IfMatchCondition::Any, IfMatchCondition::Etag),
                            ),
                        )?,
                    };
                }
                tx.await
            })
            .await
            .map_err(|e| self.io(operation, format!("partition {pk} ({})", labels()), &e))?;
        let failed = response
            .operation_responses
            .iter()
            .find(|r| !r.status_code.is_success());
        if failed.is_none() && response.operation_responses.len() == ops.len() {
            return Ok(response
                .operation_responses
                .into_iter()
                .map(|r| r.etag)
                .collect());
        }
        let why = match failed.map(|r| r.status_code) {
            Some(StatusCode::PreconditionFailed) => {
                "412: another process changed one of these entities since it was read".to_owned()
            }
            Some(StatusCode::Conflict) => {
                "409: another process created one of these entities first".to_owned()
            }
            Some(StatusCode::NotFound) => {
                "404: one of these entities was removed by another process".to_owned()
            }
            Some(status) => format!("HTTP {}", u16::from(status)),
            None => format!(
                "{} operation responses for {} operations",
                response.operation_responses.len(),
                ops.len()
            ),
        };
        Err(StateError::Io {
            operation,
            message: format!(
                "table {}, partition {pk} ({}): the transaction of {} operations was refused, nothing of it was written: {why}",
                self.name,
                labels(),
                ops.len()
            ),
        })
    }

    pub(super) async fn settle_customers(
        &self,
        customers: &[CustomerState],
    ) -> Result<(), StateError> {
        let mut latest: BTreeMap<&str, &CustomerState> = BTreeMap::new();
        for customer in customers {
            latest.insert(&customer.lead.key, customer);
        }
        if latest.is_empty() {
            return Ok(());
        }
        // What this store knows of them is taken: the writes below replace it.
        let mut seen: HashMap<&str, Head> = {
            let mut known = self.known.lock().expect("not poisoned");
            latest
                .keys()
                .filter_map(|k| known.customers.remove(*k).map(|(head, _)| (*k, head)))
                .collect()
        };
        let unknown: Vec<String> = latest
            .keys()
            .filter(|k| !seen.contains_key(**k))
            .map(|k| text_key(k))
            .collect();
        let mut by_rk = self.heads("settle rows", CUSTOMER, unknown).await?;
        let mut groups = Vec::new();
        for (key, customer) in latest {
            let rk = text_key(key);
            let head = match seen.remove(key) {
                Some(head) => head,
                None => by_rk.remove(&rk).flatten(),
            };
            let json = serde_json::to_string(customer).expect("customers serialise to JSON");
            let props = props([("Kind", CUSTOMER), ("Key", key)]);
            let ops = write_record(CUSTOMER, &rk, props, &json, head);
            let entities = ops
                .iter()
                .filter(|op| !matches!(op, Op::Delete { .. }))
                .count();
            groups.push(Group {
                label: format!("customer {key}"),
                ops,
                customer: Some((key.to_owned(), entities as u32 - 1)),
            });
        }
        self.commit("settle rows", CUSTOMER, groups).await
    }

    pub(super) async fn settle_dead_letters(
        &self,
        letters: &[DeadLetter],
        resolved: &[String],
    ) -> Result<(), StateError> {
        // As in the file store: resolved first, then new letters (a new one wins).
        let mut wanted: BTreeMap<&str, Option<&DeadLetter>> = BTreeMap::new();
        for id in resolved {
            wanted.insert(id, None);
        }
        for letter in letters {
            wanted.insert(&letter.id, Some(letter));
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // Every delivered customer resolves its letter, if any; usually there is none at all.
        let only_resolved = wanted.values().all(Option::is_none);
        if only_resolved && !self.any_dead_letter().await? {
            return Ok(());
        }
        let rks = wanted.keys().map(|id| text_key(id)).collect();
        let mut heads = self.heads("settle rows", DEAD_LETTER, rks).await?;
        let mut groups = Vec::new();
        for (id, letter) in wanted {
            let rk = text_key(id);
            let head = heads.remove(&rk).flatten();
            let ops = match (letter, head) {
                (Some(letter), head) => {
                    let json =
                        serde_json::to_string(letter).expect("dead letters serialise to JSON");
                    write_record(
                        DEAD_LETTER,
                        &rk,
                        props([("Kind", DEAD_LETTER), ("Id", id)]),
                        &json,
                        head,
                    )
                }
                (None, Some(head)) => delete_record(&rk, head),
                (None, None) => continue,
            };
            groups.push(Group {
                label: format!("dead letter {id}"),
                ops,
                customer: None,
            });
        }
        self.commit("settle rows", DEAD_LETTER, groups).await
    }

    /// Whether the dead-letter partition holds anything (`true` when unsure).
    pub(super) async fn any_dead_letter(&self) -> Result<bool, StateError> {
        let filter = format!("PartitionKey eq '{DEAD_LETTER}'");
        let (entities, next) = self
            .page(&filter, Some("RowKey"), None)
            .await
            .map_err(|e| self.io("settle rows", "dead letters", &e))?;
        Ok(!entities.is_empty() || next.is_some())
    }

    /// The writes settling the batch's rows: the list entries of the rows not
    /// delivered, then (each row in one group) the handled markers with the removal of
    /// a delivered row's old list entry.
    pub(super) async fn row_groups(
        &self,
        batch: &SettleBatch,
    ) -> Result<(Vec<Group>, Vec<Group>), StateError> {
        let now = OffsetDateTime::now_utc();
        let mut latest: BTreeMap<String, &crate::state::Settlement> = BTreeMap::new();
        for s in &batch.rows {
            latest.insert(row_key_base(&s.row.id), s);
        }
        if latest.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // What the reads before knew of them is taken: the writes below replace it.
        let mut states: HashMap<String, RowState> = {
            let mut known = self.known.lock().expect("not poisoned");
            latest
                .keys()
                .filter_map(|b| known.rows.remove(b).map(|(state, _)| (b.clone(), state)))
                .collect()
        };
        let unknown: BTreeSet<String> = latest
            .keys()
            .filter(|b| !states.contains_key(*b))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            states.extend(self.row_states("settle rows", &unknown).await?);
        }
        let (mut lists, mut markers) = (Vec::new(), Vec::new());
        for (base, s) in latest {
            let state = states.remove(&base).unwrap_or_default();
            let listed_rk = format!("{base}{LISTED_SUFFIX}");
            let source = [
                ("SourcePartitionKey", s.row.id.partition_key.as_str()),
                ("SourceRowKey", s.row.id.row_key.as_str()),
            ];
            let label = format!("row {}", s.row.id);
            // A row's latest version decides which list it is in.
            let mut ops = match list_of(&s.outcome) {
                Some(list) => {
                    let recorded = RecordedRow {
                        row: s.row.clone(),
                        outcome: s.outcome.clone(),
                        columns: s.columns.clone(),
                        recorded_at: now,
                    };
                    let json = serde_json::to_string(&recorded).expect("rows serialise to JSON");
                    let mut p = props([("Kind", "listed"), ("List", list)]);
                    p.extend(props(source));
                    lists.push(Group {
                        label: label.clone(),
                        ops: write_record(ROW, &listed_rk, p, &json, state.listed),
                        customer: None,
                    });
                    Vec::new()
                }
                None => match state.listed {
                    Some(head) => delete_record(&listed_rk, head),
                    None => Vec::new(),
                },
            };
            let at = timestamp::format(s.row.timestamp);
            let mut marker = props([
                ("PartitionKey", ROW),
                ("Kind", "handled"),
                ("RowEtag", s.row.etag.as_str()),
                ("At", at.as_str()),
            ]);
            marker.extend(props(source));
            let marker_rk = format!("{base}{HANDLED_SUFFIX}");
            marker.insert("RowKey".into(), Value::String(marker_rk.clone()));
            ops.push(match state.marker {
                Some((etag, _)) => Op::Update {
                    rk: marker_rk,
                    entity: marker,
                    etag,
                },
                None => Op::Insert(marker),
            });
            markers.push(Group {
                label,
                ops,
                customer: None,
            });
        }
        Ok((lists, markers))
    }
}

/// Which list a settled row is kept in (`None`: delivered, in none).
pub(super) fn list_of(outcome: &Settled) -> Option<&'static str> {
    match outcome {
        Settled::Delivered { .. } => None,
        Settled::Rejected { .. } => Some("rejected"),
        Settled::Skipped { .. } => Some("skipped"),
        Settled::Unidentifiable { .. } => Some("unidentifiable"),
    }
}

/// Records what a range query found about a row entity.
pub(super) fn note_row_entity(
    states: &mut HashMap<String, RowState>,
    entity: &Map<String, Value>,
) -> Result<(), StateError> {
    let (Some(rk), Some(etag)) = (str_of(entity, "RowKey"), str_of(entity, "odata.etag")) else {
        return Ok(());
    };
    if let Some(base) = rk.strip_suffix(HANDLED_SUFFIX) {
        if let Some(state) = states.get_mut(base) {
            let row_etag = str_of(entity, "RowEtag").ok_or_else(|| StateError::Corrupt {
                key: format!("{ROW}/{rk}"),
                message: "the handled marker has no RowEtag".into(),
            })?;
            state.marker = Some((Etag::from(etag), row_etag.to_owned()));
        }
    } else if let Some(base) = rk.strip_suffix(LISTED_SUFFIX) {
        if let Some(state) = states.get_mut(base) {
            state.listed = Some((Etag::from(etag), parts_of(entity)));
        }
    }
    Ok(())
}

/// The ops writing a record (its entity, then its parts), guarded by `head` when it exists.
pub(super) fn write_record(
    pk: &str,
    rk: &str,
    props: Map<String, Value>,
    json: &str,
    head: Head,
) -> Vec<Op> {
    let pieces = split_utf16(json, CHUNK_UTF16_UNITS);
    let entities: Vec<&[&str]> = pieces.chunks(CHUNKS_PER_ENTITY).collect();
    let parts = (entities.len() - 1) as u32;
    let mut ops = Vec::with_capacity(entities.len());
    for (i, data) in entities.into_iter().enumerate() {
        let entity_rk = if i == 0 {
            rk.to_owned()
        } else {
            part_key(rk, i as u32)
        };
        let mut entity = props.clone();
        entity.insert("PartitionKey".into(), Value::String(pk.to_owned()));
        entity.insert("RowKey".into(), Value::String(entity_rk.clone()));
        if i == 0 {
            entity.insert("Parts".into(), Value::from(parts));
        } else {
            entity.insert("Part".into(), Value::from(i as u32));
        }
        for (j, piece) in data.iter().enumerate() {
            entity.insert(format!("Data{j}"), Value::String((*piece).to_owned()));
        }
        ops.push(match (i, &head) {
            (0, Some((etag, _))) => Op::Update {
                rk: entity_rk,
                entity,
                etag: etag.clone(),
            },
            (0, None) => Op::Insert(entity),
            _ => Op::Upsert {
                rk: entity_rk,
                entity,
            },
        });
    }
    if let Some((_, old_parts)) = head {
        for i in parts + 1..=old_parts {
            ops.push(Op::Delete {
                rk: part_key(rk, i),
                etag: None,
            });
        }
    }
    ops
}

/// The ops deleting a record and its parts, guarded by the record's ETag.
pub(super) fn delete_record(rk: &str, (etag, parts): (Etag, u32)) -> Vec<Op> {
    std::iter::once(Op::Delete {
        rk: rk.to_owned(),
        etag: Some(etag),
    })
    .chain((1..=parts).map(|i| Op::Delete {
        rk: part_key(rk, i),
        etag: None,
    }))
    .collect()
}
