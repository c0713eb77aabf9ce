//! The one place a Kafka error is sorted into what the relay does with the row: poison (set
//! it aside), transient (retry it, holding its key back) or fatal (recreate the producer).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Why a message was not delivered, and so what the relay does with its row.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The row can never be published as it is: park it with the reason.
    Poison { kind: &'static str, reason: String },
    /// Worth retrying: the row stays pending (and so do later rows of its key).
    Transient(String),
    /// The producer is unusable (e.g. a broken idempotence sequence): recreate it, retry.
    Fatal(String),
}

impl Failure {
    pub fn into_reason(self) -> String {
        match self {
            Failure::Poison { reason, .. }
            | Failure::Transient(reason)
            | Failure::Fatal(reason) => reason,
        }
    }
}

/// Sort a Kafka error into what the relay should do. The one place this decision is made.
pub fn classify(err: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let code = match err {
        KafkaError::MessageProduction(code) => *code,
        other => return Failure::Transient(other.to_string()),
    };
    let poison = |kind, hint: &str| Failure::Poison {
        kind,
        reason: format!("{err}: {hint}"),
    };
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => poison(
            "too_large",
            "the message exceeds the broker's or topic's max.message.bytes (or the producer's message.max.bytes); \
             shrink the payload or raise the limit, then retry the row",
        ),
        // The broker's UnknownTopicOrPartition may only mean its metadata lags a topic created
        // a moment ago: retry. librdkafka's local UnknownTopic comes after it waited
        // topic.metadata.propagation.max.ms and the cluster still says the topic is absent.
        C::UnknownTopic | C::UnknownPartition => poison(
            "unknown_topic",
            "the topic does not exist; create it (automatic topic creation should stay off), then retry the row",
        ),
        C::InvalidTopic => poison("invalid_topic", "the topic name is not legal in Kafka"),
        C::TopicAuthorizationFailed => poison(
            "unauthorized",
            "the relay's principal may not write to this topic; grant WRITE on it, then retry the row",
        ),
        C::InvalidMessage | C::InvalidRecord | C::PolicyViolation => poison(
            "rejected",
            "the broker rejected this record; inspect it and fix or skip the row",
        ),
        C::Fatal => Failure::Fatal(err.to_string()),
        _ => Failure::Transient(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        let e = |c| KafkaError::MessageProduction(c);
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::MessageSizeTooLarge)),
            Failure::Poison {
                kind: "too_large",
                ..
            }
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::UnknownTopic)),
            Failure::Poison {
                kind: "unknown_topic",
                ..
            }
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::TopicAuthorizationFailed)),
            Failure::Poison {
                kind: "unauthorized",
                ..
            }
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::MessageTimedOut)),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::NotEnoughReplicas)),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(&e(RDKafkaErrorCode::Fatal)),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            classify(&KafkaError::Canceled),
            Failure::Transient(_)
        ));
    }
}
