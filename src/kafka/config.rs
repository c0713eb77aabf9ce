//! The producer's librdkafka properties: the relay's defaults, the operator's overrides, and
//! the overrides that are refused because they would void a guarantee (per-key order,
//! at-least-once, one delivery report per message).

use std::fmt;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaConfRes;

use crate::secret::Secret;

/// Kafka producer settings, validated. `Debug` redacts every secret-looking property.
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Properties applied on top of the relay's defaults, in order.
    properties: Vec<(String, Secret)>,
    /// Where each property came from (same order), for errors that name it.
    origins: Vec<Origin>,
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
    /// `bootstrap.servers` (use the brokers flag), any property that would void a guarantee,
    /// and any property librdkafka does not accept (an unknown key, a bad value), each error
    /// naming the origin and the key, never the value.
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
        let mut origins = vec!["--compression".to_string()];
        for (origin, key, value) in overrides {
            if key == "bootstrap.servers" {
                return Err(format!(
                    "{origin}: bootstrap.servers: use --kafka-brokers instead"
                ));
            }
            if let Some(why) = refused(&key, value.expose()) {
                return Err(format!("{origin}: {key}: {why}"));
            }
            if let Err(why) = check_property(&key, value.expose()) {
                return Err(format!("{origin}: {key}: {why}"));
            }
            properties.push((key, value));
            origins.push(origin);
        }
        Ok(KafkaConfig {
            brokers: brokers.trim().to_string(),
            properties,
            origins,
        })
    }

    /// Where `key` was last set (a flag, or a file and line), if it was overridden.
    pub fn origin(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .zip(&self.origins)
            .rev()
            .find(|((k, _), _)| k == key)
            .map(|(_, o)| o.as_str())
    }

    /// A librdkafka error about this configuration, fit to print: never a property's value.
    /// A per-property error names where the key was set; librdkafka's client-creation message
    /// (properties checked together) has every overridden value cut out, and is left out when
    /// a secret is too short to cut out safely.
    pub fn describe_error(&self, e: &KafkaError) -> String {
        match e {
            KafkaError::ClientConfig(res, desc, key, _) => {
                let origin = self.origin(key).unwrap_or("the producer's defaults");
                format!("{origin}: {key}: {}", explain(*res, desc))
            }
            KafkaError::ClientCreation(message) => self.redact(message),
            KafkaError::Nul(_) => "a property contains a NUL byte".into(),
            other => self.redact(&other.to_string()),
        }
    }

    /// `message` with every overridden value cut out and the origins of the keys it names.
    fn redact(&self, message: &str) -> String {
        // Every (piece of a) value to cut, longest first, replaced in one pass over `message`
        // so that a placeholder is never matched again. A secret is cut wherever it appears;
        // another value only as a whole word (`ssl` is a value, and part of `ssl.ca.location`).
        let mut cuts: Vec<(&str, &str, bool)> = Vec::new();
        for (k, v) in &self.properties {
            let v = v.expose().trim();
            let secret = is_secret_property(k);
            if secret && !v.is_empty() && v.chars().count() < 4 {
                return "librdkafka refused the configuration; its message is not shown because it \
                        could contain a secret value (check the TLS and SASL properties)"
                    .into();
            }
            if v.chars().count() >= 3 || (secret && !v.is_empty()) {
                cuts.push((v, k, secret));
            }
            if secret {
                // A secret may be echoed in pieces (a JAAS line, a PEM block): cut each word too.
                cuts.extend(
                    v.split(|c: char| c.is_whitespace() || "\"';=,".contains(c))
                        .filter(|w| w.chars().count() >= 4)
                        .map(|w| (w, k.as_str(), true)),
                );
            }
        }
        cuts.sort_by_key(|(v, _, _)| std::cmp::Reverse(v.len()));
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || "._-".contains(c));
        let message = message.trim();
        let mut out = String::with_capacity(message.len());
        let mut rest = message;
        while let Some(c) = rest.chars().next() {
            let before = message[..message.len() - rest.len()].chars().next_back();
            let cut = cuts.iter().find(|(v, _, secret)| {
                rest.starts_with(v)
                    && (*secret || !word(before) && !word(rest[v.len()..].chars().next()))
            });
            match cut {
                Some((v, k, _)) => {
                    out.push_str(&format!("<{k}>"));
                    rest = &rest[v.len()..];
                }
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        let mut named: Vec<String> = Vec::new();
        for (k, _) in &self.properties {
            let line = format!("{k} is set by {}", self.origin(k).unwrap_or("?"));
            if out.contains(k.as_str()) && !named.contains(&line) {
                named.push(line);
            }
        }
        if !named.is_empty() {
            out.push_str(&format!(" ({})", named.join("; ")));
        }
        out
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
        // librdkafka skips a message that timed out in its queue and sends the key's later
        // messages (Kafka gets 1, 4, 5, then the relay's retry of 2, 3).
        "message.timeout.ms" | "delivery.timeout.ms" if v != "0" => Some(
            "refused: a message that times out is skipped and later events of its key reach Kafka \
             before it, breaking per-key order; --stall-timeout bounds a stuck producer instead \
             (it is recreated and nothing is reordered); remove the override",
        ),
        _ => None,
    }
}

/// Ask librdkafka whether it accepts `key=value` on its own (the name, the value's type and
/// range). The reason never contains the value: librdkafka's own message can.
fn check_property(key: &str, value: &str) -> Result<(), String> {
    let mut c = ClientConfig::new();
    c.set(key, value);
    match c.create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(res, desc, _, _)) => Err(explain(res, &desc)),
        Err(KafkaError::Nul(_)) => Err("contains a NUL byte".into()),
        Err(_) => Err(NOT_SHOWN.into()),
    }
}

const NOT_SHOWN: &str = "librdkafka refused the value (not shown: it may be a secret); \
    librdkafka's CONFIGURATION.md lists the allowed values";

/// librdkafka's reason for refusing one property, rebuilt from what is safe to show: its
/// messages quote the value ("Invalid value \"...\"", "value N is outside ..."), ours never do.
fn explain(res: RDKafkaConfRes, desc: &str) -> String {
    if res == RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN {
        return "no such librdkafka property: check the spelling (librdkafka's CONFIGURATION.md \
                lists them); the value is not shown"
            .into();
    }
    if desc.contains("JAAS") {
        return "librdkafka does not support Java JAAS configuration: set sasl.mechanisms and \
                sasl.username, and the password with --kafka-sasl-password-file; the value is not shown"
            .into();
    }
    if let Some(range) = allowed_range(desc) {
        return format!("the value is outside the allowed range {range} (the value is not shown)");
    }
    if desc.contains("Expected bool") {
        return "expects true or false (the value is not shown)".into();
    }
    if desc.contains("empty value") {
        return "must not be empty".into();
    }
    if desc.contains("dedicated") {
        return "cannot be set as a property".into();
    }
    NOT_SHOWN.into()
}

/// `A..B` from librdkafka's "... is outside allowed range A..B": numbers only.
fn allowed_range(desc: &str) -> Option<&str> {
    let (_, rest) = desc.split_once("allowed range ")?;
    let range = rest.split_whitespace().next()?;
    let numeric = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
    };
    let (lo, hi) = range.split_once("..")?;
    (numeric(lo) && numeric(hi)).then_some(range)
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
            ("message.timeout.ms", "5000"),
            ("delivery.timeout.ms", "300000"),
        ] {
            let err = with(&[(k, v)]).unwrap_err();
            assert!(err.starts_with(&format!("--kafka-config: {k}")), "{err}");
        }
        for (k, v) in [
            ("acks", "all"),
            ("acks", "-1"),
            ("enable.idempotence", "true"),
            ("max.in.flight.requests.per.connection", "5"),
            ("message.timeout.ms", "0"),
        ] {
            assert!(with(&[(k, v)]).is_ok(), "{k}={v} keeps the guarantees");
        }
    }

    #[test]
    fn librdkafka_refusals_name_the_key_never_the_value() {
        let s = "hunter2-sentinel";
        for (k, v, why) in [
            (
                "ssl.key.pasword",
                s.to_string(),
                "no such librdkafka property",
            ),
            (
                "sasl.jaas.config",
                format!("x required password=\"{s}\";"),
                "JAAS",
            ),
            ("linger.ms", s.to_string(), "refused the value"),
            (
                "linger.ms",
                "90000000".to_string(),
                "allowed range 0..900000",
            ),
            (
                "enable.ssl.certificate.verification",
                s.to_string(),
                "true or false",
            ),
            ("security.protocol", s.to_string(), "refused the value"),
            ("debug", format!("broker,{s}"), "refused the value"),
        ] {
            let err = with(&[(k, &v)]).unwrap_err();
            assert!(err.starts_with(&format!("--kafka-config: {k}: ")), "{err}");
            assert!(err.contains(why), "{k}: {err}");
            assert!(!err.contains(s) && !err.contains("90000000"), "{err}");
        }
        assert!(with(&[("ssl.key.password", s), ("linger.ms", "5")]).is_ok());
    }

    #[test]
    fn creation_errors_lose_every_value_and_name_the_origin() {
        let cfg = KafkaConfig::new(
            "b:9092",
            Compression::Lz4,
            vec![
                (
                    "--kafka-config".into(),
                    "security.protocol".into(),
                    Secret::new("ssl"),
                ),
                (
                    "f line 2".into(),
                    "ssl.key.password".into(),
                    Secret::new("hunter2 sentinel"),
                ),
            ],
        )
        .unwrap();
        let e = KafkaError::ClientCreation(
            "ssl.key.location failed: bad decrypt for hunter2 sentinel (ssl.ca.location)".into(),
        );
        let shown = cfg.describe_error(&e);
        assert!(
            !shown.contains("hunter2") && !shown.contains("sentinel"),
            "{shown}"
        );
        assert!(shown.contains("<ssl.key.password>"), "{shown}");
        let e = KafkaError::ClientCreation("security.protocol ssl needs ssl.ca.location".into());
        assert_eq!(
            cfg.describe_error(&e),
            "security.protocol <security.protocol> needs ssl.ca.location \
             (security.protocol is set by --kafka-config)"
        );
        let short = KafkaConfig::new(
            "b:9092",
            Compression::Lz4,
            vec![("f".into(), "sasl.password".into(), Secret::new("x1"))],
        )
        .unwrap();
        let shown = short.describe_error(&KafkaError::ClientCreation("bad x1".into()));
        assert!(
            !shown.contains("x1") && shown.contains("not shown"),
            "{shown}"
        );
    }

    #[test]
    fn a_refusal_never_echoes_the_value() {
        let err = with(&[("transactional.id", "hunter2-sentinel")]).unwrap_err();
        assert!(!err.contains("hunter2-sentinel"), "{err}");
    }
}
