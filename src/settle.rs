//! Settling a published batch: each row's fate from its own delivery outcome, keeping
//! per-key order. [`Delivered`] is made only here, so progress can only ever be recorded for
//! rows that have their own delivery report.

use std::collections::HashSet;

use crate::event::Message;
use crate::kafka::Failure;

/// Rows that have their own successful delivery report, and no earlier unsettled row of
/// their key. Only [`settle`] makes one.
#[derive(Debug, Default, PartialEq)]
pub struct Delivered(Vec<i64>);

impl Delivered {
    pub fn ids(&self) -> &[i64] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Add a later batch's delivered rows (both came from [`settle`], so the union still
    /// holds only rows with their own delivery report), to record them in one write.
    pub fn extend(&mut self, later: Delivered) {
        self.0.extend(later.0);
    }
}

/// Streams (topic, key) with a row that failed or was held back in a batch still in flight:
/// later rows of those streams, in any later batch in flight, are not recorded either. Empty
/// again once no batch is in flight.
#[derive(Debug, Default)]
pub struct Blocked(HashSet<(String, String)>);

impl Blocked {
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// What to do with each row of a published batch.
#[derive(Debug, Default, PartialEq)]
pub struct Settlement {
    /// Delivered, and no earlier row of the same key is unsettled: may be recorded.
    pub delivered: Delivered,
    /// Can never be published as is: park with (reason kind, message).
    pub park: Vec<(i64, &'static str, String)>,
    /// Failed transiently: stays pending; its (topic, key) is blocked for the rest of the batch.
    pub retry: Vec<(i64, String)>,
    /// The producer reported a fatal error and must be recreated.
    pub fatal: bool,
}

/// Decide each row's fate from its delivery outcome, keeping per-key order: after a row of a
/// (topic, key) fails transiently (or is poison, with `poison_blocks`), later rows of that
/// topic and key stay pending even if Kafka acknowledged them (they are published again
/// after it: a duplicate, never a reordering of marks).
pub fn settle(
    messages: &[Message],
    outcomes: Vec<Result<(), Failure>>,
    poison_blocks: bool,
) -> Settlement {
    settle_after(messages, outcomes, poison_blocks, &mut Blocked::default())
}

/// [`settle`] for a batch published after others still in flight: streams `blocked` by an
/// earlier batch stay blocked here, and this batch's failures block them for later batches.
pub fn settle_after(
    messages: &[Message],
    outcomes: Vec<Result<(), Failure>>,
    poison_blocks: bool,
    blocked: &mut Blocked,
) -> Settlement {
    let mut s = Settlement::default();
    let block = |blocked: &mut Blocked, m: &Message| {
        if let Some(key) = &m.key {
            blocked.0.insert((m.topic.clone(), key.clone()));
        }
    };
    for (m, outcome) in messages.iter().zip(outcomes) {
        let key_blocked = m.key.as_ref().is_some_and(|k| {
            !blocked.0.is_empty() && blocked.0.contains(&(m.topic.clone(), k.clone()))
        });
        match outcome {
            _ if key_blocked => {}
            Ok(()) => s.delivered.0.push(m.id),
            Err(Failure::Poison { kind, reason }) => {
                s.park.push((m.id, kind, reason));
                if poison_blocks {
                    block(blocked, m);
                }
            }
            Err(failure) => {
                s.fatal |= matches!(failure, Failure::Fatal(_));
                s.retry.push((m.id, failure.into_reason()));
                block(blocked, m);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, key: Option<&str>) -> Message {
        Message {
            id,
            topic: "t".into(),
            key: key.map(Into::into),
            payload: None,
            headers: vec![],
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn all_delivered_are_marked() {
        let m = [msg(1, Some("a")), msg(2, Some("b")), msg(3, None)];
        let s = settle(&m, vec![Ok(()), Ok(()), Ok(())], false);
        assert_eq!(s.delivered.ids(), &vec![1, 2, 3]);
        assert!(s.park.is_empty() && s.retry.is_empty() && !s.fatal);
    }

    #[test]
    fn transient_failure_blocks_later_rows_of_its_key_only() {
        let m = [
            msg(1, Some("a")),
            msg(2, Some("a")),
            msg(3, Some("b")),
            msg(4, Some("a")),
            msg(5, None),
        ];
        let outcomes = vec![
            Err(Failure::Transient("timed out".into())),
            Ok(()),
            Ok(()),
            Err(Failure::Poison {
                kind: "too_large",
                reason: "big".into(),
            }),
            Ok(()),
        ];
        let s = settle(&m, outcomes, false);
        assert_eq!(
            s.delivered.ids(),
            &[3, 5],
            "2 was acked after 1 failed: it must not be marked ahead of 1"
        );
        assert_eq!(s.retry, vec![(1, "timed out".to_string())]);
        assert!(
            s.park.is_empty(),
            "4 waits behind 1; its poison is decided on its own turn"
        );
    }

    #[test]
    fn poison_is_parked_and_does_not_block() {
        let m = [msg(1, Some("a")), msg(2, Some("a"))];
        let s = settle(
            &m,
            vec![
                Err(Failure::Poison {
                    kind: "unknown_topic",
                    reason: "x".into(),
                }),
                Ok(()),
            ],
            false,
        );
        assert_eq!(s.park, vec![(1, "unknown_topic", "x".to_string())]);
        assert_eq!(s.delivered.ids(), &[2]);
    }

    #[test]
    fn the_same_key_on_another_topic_is_another_stream() {
        let mut other = msg(2, Some("a"));
        other.topic = "u".into();
        let m = [msg(1, Some("a")), other];
        let s = settle(&m, vec![Err(Failure::Transient("x".into())), Ok(())], false);
        assert_eq!(s.delivered.ids(), &[2]);
    }

    #[test]
    fn with_block_key_poison_holds_back_its_stream() {
        let m = [msg(1, Some("a")), msg(2, Some("a")), msg(3, Some("b"))];
        let poison = Failure::Poison {
            kind: "too_large",
            reason: "big".into(),
        };
        let s = settle(&m, vec![Err(poison), Ok(()), Ok(())], true);
        assert_eq!(s.park, vec![(1, "too_large", "big".to_string())]);
        assert_eq!(
            s.delivered.ids(),
            &vec![3],
            "2 waits until the operator handles 1"
        );
    }

    #[test]
    fn a_failure_blocks_its_stream_in_later_batches_in_flight() {
        let mut blocked = Blocked::default();
        let first = [msg(1, Some("a")), msg(2, Some("b"))];
        let ok_then_fail = vec![Err(Failure::Transient("x".into())), Ok(())];
        let s = settle_after(&first, ok_then_fail, false, &mut blocked);
        assert_eq!(s.delivered.ids(), &[2]);
        let later = [msg(3, Some("a")), msg(4, Some("b"))];
        let s = settle_after(&later, vec![Ok(()), Ok(())], false, &mut blocked);
        assert_eq!(
            s.delivered.ids(),
            &[4],
            "3 was acked in a later batch while 1 waits for its retry: not recorded ahead of it"
        );
        blocked.clear();
        let s = settle_after(&later, vec![Ok(()), Ok(())], false, &mut blocked);
        assert_eq!(s.delivered.ids(), &[3, 4]);
    }

    #[test]
    fn null_keys_never_block_each_other() {
        let m = [msg(1, None), msg(2, None)];
        let s = settle(&m, vec![Err(Failure::Transient("x".into())), Ok(())], false);
        assert_eq!(s.delivered.ids(), &[2]);
    }

    #[test]
    fn fatal_is_flagged() {
        let m = [msg(1, Some("a"))];
        let s = settle(
            &m,
            vec![Err(Failure::Fatal("Fatal: out of order sequence".into()))],
            false,
        );
        assert!(s.fatal);
    }
}
