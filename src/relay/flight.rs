//! What is in flight: batches published and not yet settled (in publish order), and settled
//! batches whose progress is being written. Bounded together by rows and bytes, so memory and
//! the crash window stay bounded at any backlog.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::marking::Marks;
use super::poison::Poison;
use crate::event::Message;
use crate::kafka::Published;
use crate::read::BatchLimit;
use crate::settle::Blocked;
use crate::spans::Stamp;

/// A batch handed to the sink, waiting for its delivery reports.
pub struct Sent {
    pub messages: Arc<[Message]>,
    pub stamps: Vec<Option<Stamp>>,
    /// Rows found unpublishable before publishing; set aside when the batch settles.
    pub poison: Vec<Poison>,
    pub bytes: u64,
    pub reports: JoinHandle<Published>,
}

impl Sent {
    fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        let messages = self.messages.iter().map(|m| m.id);
        messages.chain(self.poison.iter().map(|p| p.id))
    }
}

pub struct Flight<P> {
    pub sent: VecDeque<Sent>,
    /// Streams held back by a failure in a batch still in flight.
    pub blocked: Blocked,
    pub marks: Marks<P>,
}

impl<P: Copy + Send + Sync + std::fmt::Debug + 'static> Flight<P> {
    pub fn new(marks: Marks<P>) -> Self {
        Flight {
            sent: VecDeque::new(),
            blocked: Blocked::default(),
            marks,
        }
    }

    /// Rows in flight (published or being recorded): the next read leaves them out.
    pub fn ids(&self) -> Vec<i64> {
        let sent = self.sent.iter().flat_map(Sent::ids);
        sent.chain(self.marks.ids()).collect()
    }

    /// The room for one more batch within `batches` batches' worth of rows (`limit.rows` each)
    /// and `limit.bytes` in all, or `None`. None behind a batch holding poison (its rows must
    /// be set aside before later rows of their keys are read).
    pub fn room(&self, limit: BatchLimit, batches: u32) -> Option<BatchLimit> {
        if self.sent.is_empty() && self.marks.is_empty() {
            return Some(limit);
        }
        if self.sent.iter().any(|s| !s.poison.is_empty()) {
            return None;
        }
        let rows = self
            .sent
            .iter()
            .map(|s| s.messages.len() + s.poison.len())
            .sum::<usize>()
            + self.marks.rows();
        let bytes: u64 = self.sent.iter().map(|s| s.bytes).sum();
        let max_rows = limit.rows as usize * batches as usize;
        if rows >= max_rows || bytes >= limit.bytes {
            return None;
        }
        Some(BatchLimit {
            rows: (max_rows - rows).min(limit.rows as usize) as u32,
            bytes: limit.bytes - bytes,
        })
    }

    /// Drop every unsettled batch: its rows stay pending and are published again.
    pub fn abandon(&mut self) -> usize {
        let rows = self.sent.iter().map(|s| s.messages.len()).sum();
        for s in self.sent.drain(..) {
            s.reports.abort();
        }
        self.blocked.clear();
        rows
    }
}

/// A message's size as the batch bound counts it (key, payload, headers).
pub fn message_bytes(m: &Message) -> u64 {
    let headers: usize = m.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (m.topic.len()
        + m.key.as_ref().map_or(0, String::len)
        + m.payload.as_ref().map_or(0, Vec::len)
        + headers) as u64
}
