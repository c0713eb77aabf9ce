//! The producer's librdkafka properties: the relay's defaults, the operator's overrides, and
//! the overrides that are refused because they would void a guarantee (per-key order,
//! at-least-once, one delivery report per message).

use std::fmt;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};

use crate::secret::Secret;

/// Kafka producer settings, validated. `Debug` redacts every secret-looking property.
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Properties applied on top of the relay's defaults, in order.
    properties: Vec<(String, Secret)>,
}

/// Compression codec for produced batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Where an override came from, for an error that names it (`--kafka-config`, or the file and line).
pub type Origin = String;

impl KafkaConfig {
    /// Validate `overrides` (each with where it came from) and build the config. Refuses
    /// `bootstrap.servers` (use the brokers flag) and any property that would void a guarantee.
    pub fn new(
        brokers: &str,
        compression: Compression,
        overrides: Vec<(Origin, String, Secret)>,
    ) -> Result<KafkaConfig, String> {
        if brokers.trim().is_empty() {
            return Err("--kafka-brokers: must name at least one broker host:port".into());
        }
        let mut properties = vec![(
            "compression.type".to_string(),
            Secret::new(compression.as_str()),
        )];
        for (origin, key, value) in overrides {
            if key == "bootstrap.servers" {
                return Err(format!(
                    "{origin}: bootstrap.servers: use --kafka-brokers instead"
                ));
            }
            if let Some(why) = refused(&key, value.expose()) {
                return Err(format!("{origin}: {key}: {why}"));
            }
            properties.push((key, value));
        }
        Ok(KafkaConfig {
            brokers: brokers.trim().to_string(),
            properties,
        })
    }

    /// The overrides, in order (values are secrets: expose them only to librdkafka).
    pub fn properties(&self) -> &[(String, Secret)] {
        &self.properties
    }

    /// The last value set for `key` among the overrides, lowercased.
    pub fn property(&self, key: &str) -> Option<String> {
        self.properties
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.expose().to_ascii_lowercase())
    }
}

/// Why an override would void a guarantee, or `None` when it is safe. The value is never
/// echoed (it may be a secret).
fn refused(key: &str, value: &str) -> Option<&'static str> {
    let v = value.trim().to_ascii_lowercase();
    match key {
        "acks" | "request.required.acks" if !matches!(v.as_str(), "all" | "-1") => Some(
            "refused: only acks=all (the default) keeps an acknowledged event when a broker fails; \
             remove the override",
        ),
        "enable.idempotence" if v != "true" => Some(
            "refused: without idempotence a retried batch can land twice or out of order, \
             breaking per-key order; remove the override",
        ),
        "delivery.report.only.error" if v != "false" => Some(
            "refused: the relay marks a row only after its own delivery report; remove the override",
        ),
        "transactional.id" => Some(
            "refused: the relay manages its producer's transactions itself; remove the override",
        ),
        "max.in.flight.requests.per.connection" | "max.in.flight"
            if v.parse::<u32>().map_or(true, |n| n > 5) =>
        {
            Some("refused: idempotent ordering allows at most 5 in-flight requests; use 1 to 5")
        }
        _ => None,
    }
}

/// librdkafka property names whose values are secret.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "key.pem",
        "private",
        "token",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: Vec<String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                if is_secret_property(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={}", v.expose())
                }
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &props)
            .finish()
    }
}

/// The relay's producer defaults; `--kafka-config` may override any of them.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "outbox-relay")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        // Never time a message out: an outage stalls publishing (readiness fails) instead of
        // failing messages, which is what keeps a key's order across long broker outages.
        .set("message.timeout.ms", "0")
        // A batch is enqueued at once, so a longer linger buys little batching and costs
        // latency at low rates (p50 at 1k events/s: 3.1 ms with 1 ms, 5.6 ms with 2 ms; the
        // command is in BENCHMARKS.md's notes).
        .set("linger.ms", "1")
        .set("topic.metadata.propagation.max.ms", "10000")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in cfg.properties() {
        c.set(k, v.expose());
        if k == "debug" {
            // librdkafka's debug contexts log at debug level: let them through.
            c.set_log_level(RDKafkaLogLevel::Debug);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(props: &[(&str, &str)]) -> Result<KafkaConfig, String> {
        let overrides = props
            .iter()
            .map(|(k, v)| ("--kafka-config".to_string(), k.to_string(), Secret::new(*v)))
            .collect();
        KafkaConfig::new("b:9092", Compression::Lz4, overrides)
    }

    #[test]
    fn defaults_are_safe_and_overridable() {
        let c = client_config(&with(&[("linger.ms", "20")]).unwrap());
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        assert_eq!(c.get("linger.ms"), Some("20"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
    }

    #[test]
    fn overrides_that_void_a_guarantee_are_refused_by_name() {
        for (k, v) in [
            ("acks", "1"),
            ("acks", "0"),
            ("request.required.acks", "1"),
            ("enable.idempotence", "false"),
            ("delivery.report.only.error", "true"),
            ("transactional.id", "x"),
            ("max.in.flight.requests.per.connection", "6"),
            ("bootstrap.servers", "x:1"),
        ] {
            let err = with(&[(k, v)]).unwrap_err();
            assert!(err.starts_with(&format!("--kafka-config: {k}")), "{err}");
        }
        for (k, v) in [
            ("acks", "all"),
            ("acks", "-1"),
            ("enable.idempotence", "true"),
            ("max.in.flight.requests.per.connection", "5"),
        ] {
            assert!(with(&[(k, v)]).is_ok(), "{k}={v} keeps the guarantees");
        }
    }

    #[test]
    fn a_refusal_never_echoes_the_value() {
        let err = with(&[("transactional.id", "hunter2-sentinel")]).unwrap_err();
        assert!(!err.contains("hunter2-sentinel"), "{err}");
    }
}
