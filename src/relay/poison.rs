//! Rows that can never be published as they are: found before publishing (invalid rows) or
//! by Kafka (too large, unknown topic, not authorized). The poison policy sets them aside,
//! parked with the reason, or copied to the dead-letter topic through the same
//! lease-holding, stall-bounded publish path as every other message.

use std::collections::{HashMap, HashSet};

use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::event::{dead_letter, to_message, Message, MessageRules, OutboxRow, Poisoned};
use crate::kafka::{Failure, Sink};
use crate::lease::Leadership;
use crate::read::{Ledger, Reader};

/// What to do with a row that can never be published as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PoisonPolicy {
    /// Park it (failed_at, last_error) and keep publishing everything else, its key included.
    Park,
    /// Park it and hold back later rows of its topic and key until an operator retries or
    /// deletes the parked row.
    BlockKey,
    /// Publish a copy to --dead-letter-topic with the error in headers, then mark it published.
    DeadLetter,
}

/// A row that can never be published as it is.
pub struct Poison {
    pub id: i64,
    pub kind: &'static str,
    pub reason: String,
    pub original: Poisoned,
}

/// Rows to messages. Invalid rows become poison; with `block_key`, later rows of an invalid
/// row's topic and key are left out (pending: the next read skips them while it is parked).
pub fn prepare(
    rows: Vec<OutboxRow>,
    rules: &MessageRules,
    block_key: bool,
) -> (Vec<Message>, Vec<Poison>) {
    let mut blocked: HashSet<(String, String)> = HashSet::new();
    let mut messages = Vec::with_capacity(rows.len());
    let mut poison = Vec::new();
    for row in rows {
        let stream = row.key.clone().map(|k| (row.topic.clone(), k));
        if block_key && stream.as_ref().is_some_and(|s| blocked.contains(s)) {
            continue;
        }
        match to_message(row, rules) {
            Ok(m) => messages.push(m),
            Err(invalid) => {
                let (row, reason) = *invalid;
                if block_key {
                    blocked.extend(stream);
                }
                poison.push(Poison {
                    id: row.id,
                    kind: "invalid_row",
                    reason,
                    original: Poisoned::Row(row),
                });
            }
        }
    }
    (messages, poison)
}

/// Exactly-once: a row Kafka refused inside a transaction. The refusal dooms the transaction
/// (it is aborted), so the row is set aside before publishing when it is read again.
#[derive(Debug, Clone)]
pub struct Refused {
    pub kind: &'static str,
    pub reason: String,
    /// Its dead-letter copy was refused too: park it.
    pub park: bool,
}

/// Move the rows Kafka refused earlier (exactly-once) from `messages` to `poison`. With
/// `block_key`, later messages of their topic and key are left out (pending), as after an
/// invalid row.
pub fn refused_before(
    messages: &mut Vec<Message>,
    poison: &mut Vec<Poison>,
    refused: &HashMap<i64, Refused>,
    block_key: bool,
) {
    if refused.is_empty() {
        return;
    }
    let mut blocked: HashSet<(String, String)> = HashSet::new();
    messages.retain(|m| {
        let stream = m.key.clone().map(|k| (m.topic.clone(), k));
        if block_key && stream.as_ref().is_some_and(|s| blocked.contains(s)) {
            return false;
        }
        let Some(r) = refused.get(&m.id) else {
            return true;
        };
        if block_key {
            blocked.extend(stream);
        }
        poison.push(Poison {
            id: m.id,
            kind: r.kind,
            reason: r.reason.clone(),
            original: Poisoned::Message(m.clone()),
        });
        false
    });
}

/// The poison that Kafka rejected, with a copy of each message (for a dead-letter copy).
pub fn rejected(messages: &[Message], park: Vec<(i64, &'static str, String)>) -> Vec<Poison> {
    park.into_iter()
        .filter_map(|(id, kind, reason)| {
            let m = messages.iter().find(|m| m.id == id)?;
            Some(Poison {
                id,
                kind,
                reason,
                original: Poisoned::Message(m.clone()),
            })
        })
        .collect()
}

impl<R: Reader, S: Sink, L: Leadership> Relay<R, S, L> {
    /// Apply the poison policy: dead-letter (then record as handled) or park, with the reason
    /// in the row, a log line naming the row, and a metric. Writes are retried like a mark.
    /// Returns the rows set aside for good (a row whose dead-letter copy was not delivered
    /// stays pending), and, exactly-once, the dead-lettered rows to record once the
    /// transaction holding their copies has committed ([`Relay::record_dead_letters`]).
    pub(super) async fn set_aside(
        &mut self,
        poison: Vec<Poison>,
        cancel: &CancellationToken,
    ) -> (HashSet<i64>, Vec<(i64, String)>) {
        if poison.is_empty() {
            return Default::default();
        }
        let (mut park, mut done, mut deferred) = (Vec::new(), HashSet::new(), Vec::new());
        let transactional = self.sink.borrow().transactional();
        // Rows whose dead-letter copy Kafka refused in an aborted transaction are parked.
        let (poison, park_only): (Vec<Poison>, Vec<Poison>) = poison
            .into_iter()
            .partition(|p| !self.refused.get(&p.id).is_some_and(|r| r.park));
        park.extend(park_only.into_iter().map(|p| (p.id, p.kind, p.reason)));
        match self.settings.dead_letter_topic.clone() {
            None => park.extend(poison.into_iter().map(|p| (p.id, p.kind, p.reason))),
            Some(_) if poison.is_empty() => {}
            Some(dlq) => {
                let copies: Vec<Message> = poison
                    .iter()
                    .map(|p| {
                        dead_letter(
                            p.original.clone(),
                            p.kind,
                            &p.reason,
                            &dlq,
                            &self.settings.rules.source,
                        )
                    })
                    .collect();
                let sink = self.sink.borrow().clone();
                let outcomes = match self.publish_holding_lease(&sink, &copies, cancel).await {
                    Ok(published) => published.outcomes,
                    Err(why) => {
                        tracing::warn!(
                            reason = why,
                            rows = copies.len(),
                            "dead-letter copies abandoned; the rows stay pending"
                        );
                        return (done, Vec::new());
                    }
                };
                let mut sent = Vec::new();
                for (p, outcome) in poison.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(()) => {
                            tracing::error!(row_id = p.id, kind = p.kind, reason = %p.reason, topic = %dlq, "row sent to the dead-letter topic");
                            self.metrics
                                .dead_lettered
                                .with_label_values(&[p.kind])
                                .inc();
                            self.metrics
                                .publish_errors
                                .with_label_values(&["poison"])
                                .inc();
                            sent.push((p.id, format!("dead-lettered to {dlq}: {}", p.reason)));
                        }
                        Err(Failure::Poison { reason, .. }) => {
                            let reason =
                                format!("{}; the dead-letter copy failed too: {reason}", p.reason);
                            if transactional {
                                // The refusal dooms the transaction: parked when read again.
                                let park = true;
                                let (kind, reason) = (p.kind, reason.clone());
                                self.refused.insert(p.id, Refused { kind, reason, park });
                            }
                            park.push((p.id, p.kind, reason))
                        }
                        // Kafka trouble: leave the row pending; it is retried with the next read.
                        Err(other) => {
                            tracing::warn!(row_id = p.id, error = %other.into_reason(), "dead-letter publish failed; will retry")
                        }
                    }
                }
                if transactional {
                    done.extend(sent.iter().map(|(id, _)| *id));
                    deferred = sent;
                } else if self.record_dead_letters(&sent, cancel).await {
                    done.extend(sent.iter().map(|(id, _)| *id));
                }
            }
        }
        for (id, kind, reason) in &park {
            tracing::error!(row_id = id, kind, reason = %reason, "row parked as failed; fix it and retry it, or skip it");
            self.metrics.parked.with_label_values(&[kind]).inc();
            self.metrics
                .publish_errors
                .with_label_values(&["poison"])
                .inc();
        }
        let failures: Vec<(i64, String)> = park
            .into_iter()
            .map(|(id, _, reason)| (id, reason))
            .collect();
        let writer = self.writer();
        let write = writer.write_retrying("park", cancel, |ledger| {
            let failures = failures.clone();
            async move { ledger.park(&failures).await }
        });
        let parked = matches!(self.holding_lease(write, None).await, Ok(Some(())));
        if parked {
            done.extend(failures.iter().map(|(id, _)| *id));
        }
        (done, deferred)
    }

    /// Record rows as dead-lettered (their copies are delivered, and committed if in a
    /// transaction). Returns whether the write got through.
    pub(super) async fn record_dead_letters(
        &mut self,
        rows: &[(i64, String)],
        cancel: &CancellationToken,
    ) -> bool {
        if rows.is_empty() {
            return true;
        }
        let writer = self.writer();
        let write = writer.write_retrying("dead-letter mark", cancel, |ledger| {
            let rows = rows.to_vec();
            async move { ledger.dead_lettered(&rows).await }
        });
        matches!(self.holding_lease(write, None).await, Ok(Some(())))
    }
}
