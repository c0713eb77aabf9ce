//! W3C trace context: spans for the time an event waited in the outbox and for its publish,
//! in the writer's trace, optionally exported over OTLP/HTTP (JSON) to a collector.
//!
//! A row whose `traceparent` header is valid (version 00, lowercase hex, non-zero ids) and
//! sampled gets two spans, both children of the writer's span: `outbox.wait` (created_at to
//! the hand-off to the producer) and `<topic> publish` (PRODUCER, hand-off to the delivery
//! report). Anything else gets no span and its headers are left alone. Spans never block or
//! fail delivery: the exporter is a background task behind a bounded channel, and a full
//! channel or an unreachable collector drops spans (counted), never messages.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::event::Message;
use crate::kafka::{Failure, Receipt};
use crate::telemetry::Metrics;

/// The W3C trace context header names (Kafka binding: lowercase).
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";

/// Spans per OTLP request, at most.
const BATCH_MAX: usize = 512;
/// A partial batch is sent after this long.
const BATCH_EVERY: Duration = Duration::from_secs(1);
/// Spans waiting for the exporter, at most; more are dropped (and counted).
const QUEUE: usize = 8192;
/// At most one export-failure warning per this interval (with the count since the last).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A parsed `traceparent` (version 00): the writer's trace, its span, and the trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Strict W3C Trace Context parsing: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not
    /// all zero. Returns why a value is refused.
    pub fn parse(value: &str) -> Result<TraceParent, &'static str> {
        let parts: Vec<&str> = value.split('-').collect();
        let [version, trace, span, flags] = parts[..] else {
            return Err("expected 4 fields: version-traceid-parentid-flags");
        };
        if version != "00" {
            return Err("only version 00 is supported");
        }
        let trace_id: [u8; 16] =
            hex_field(trace).ok_or("trace id is not 32 lowercase hex digits")?;
        let span_id: [u8; 8] = hex_field(span).ok_or("parent id is not 16 lowercase hex digits")?;
        let [flags]: [u8; 1] = hex_field(flags).ok_or("flags are not 2 lowercase hex digits")?;
        if trace_id == [0; 16] {
            return Err("trace id is all zeros");
        }
        if span_id == [0; 8] {
            return Err("parent id is all zeros");
        }
        Ok(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The header value, version 00.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

/// Exactly `2 * N` lowercase hex digits.
fn hex_field<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Span ids: SplitMix64 over a counter seeded once from the OS (/dev/urandom, else the
/// randomly keyed std hasher). Unique per process without a lock; never zero.
pub struct SpanIds(AtomicU64);

impl SpanIds {
    pub fn new() -> SpanIds {
        SpanIds(AtomicU64::new(os_seed()))
    }

    pub fn next(&self) -> [u8; 8] {
        loop {
            let mut z = self
                .0
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
                .wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            if z != 0 {
                return z.to_be_bytes();
            }
        }
    }
}

impl Default for SpanIds {
    fn default() -> Self {
        Self::new()
    }
}

fn os_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok()
    {
        return u64::from_ne_bytes(buf);
    }
    // std seeds RandomState's keys from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// OpenTelemetry span kinds used here (OTLP enum values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Producer = 4,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: [u8; 8],
    pub trace_state: Option<String>,
    pub flags: u8,
    pub name: String,
    pub kind: Kind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// Status error with this message; `None` leaves the status unset.
    pub error: Option<String>,
}

/// OTLP span flags: the W3C trace flags plus "the parent is remote" (it is the writer's).
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;
/// OTLP `STATUS_CODE_ERROR`.
const STATUS_ERROR: u8 = 2;

/// An OTLP/HTTP JSON `ExportTraceServiceRequest` body: ids as lowercase hex, 64-bit integers
/// as decimal strings, enums as integers, lowerCamelCase field names.
pub fn otlp_json(spans: &[Span], service_name: &str) -> serde_json::Value {
    use serde_json::json;
    let attr = |key: &str, value: &Value| match value {
        Value::Str(s) => json!({"key": key, "value": {"stringValue": s}}),
        Value::Int(i) => json!({"key": key, "value": {"intValue": i.to_string()}}),
    };
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": hex(&s.trace_id),
                "spanId": hex(&s.span_id),
                "parentSpanId": hex(&s.parent_span_id),
                "flags": u32::from(s.flags) | FLAGS_HAS_IS_REMOTE | FLAGS_IS_REMOTE,
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": s.start_unix_nano.to_string(),
                "endTimeUnixNano": s.end_unix_nano.to_string(),
                "attributes": s.attributes.iter().map(|(k, v)| attr(k, v)).collect::<Vec<_>>(),
            });
            if let Some(state) = &s.trace_state {
                span["traceState"] = json!(state);
            }
            if let Some(message) = &s.error {
                span["status"] = json!({"code": STATUS_ERROR, "message": message});
            }
            span
        })
        .collect();
    json!({"resourceSpans": [{
        "resource": {"attributes": [
            attr("service.name", &Value::Str(service_name.to_string())),
            attr("service.version", &Value::Str(env!("CARGO_PKG_VERSION").to_string())),
        ]},
        "scopeSpans": [{
            "scope": {"name": "outbox-relay", "version": env!("CARGO_PKG_VERSION")},
            "spans": spans,
        }],
    }]})
}

/// Where spans go: an OTLP/HTTP endpoint (`http://host:port[/path]`). Plain HTTP only: run an
/// OpenTelemetry Collector agent next to the relay (sidecar or node agent) for TLS and auth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    /// Host to connect to (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
    /// `Host` header value.
    pub authority: String,
    /// Request path: the URL's path if it ends in `/v1/traces`, else that path + `/v1/traces`.
    pub path: String,
}

impl OtlpEndpoint {
    pub fn parse(url: &str) -> Result<OtlpEndpoint, String> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err("expected a URL such as http://127.0.0.1:4318".into());
        };
        match scheme.to_ascii_lowercase().as_str() {
            "http" => {}
            "https" => {
                return Err("https is not supported: point the relay at a local OpenTelemetry Collector \
                     agent over http (e.g. http://127.0.0.1:4318, a sidecar or node agent) and let it \
                     export with TLS"
                    .into())
            }
            other => return Err(format!("scheme {other:?} is not supported; use http://host:port")),
        }
        if rest.contains(['?', '#']) {
            return Err(
                "a query or fragment is not supported; give http://host:port[/path]".into(),
            );
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.contains('@') {
            return Err(
                "credentials in the URL are not supported; use a local collector agent".into(),
            );
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.starts_with('[')) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?;
                (h, port)
            }
            _ => (authority, 80),
        };
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if host.is_empty() || (host.contains(':') && bare.is_none()) {
            return Err(
                "missing or malformed host; expected http://host:port (IPv6: http://[::1]:4318)"
                    .into(),
            );
        }
        let path = path.trim_end_matches('/');
        let path = if path.ends_with("/v1/traces") {
            path.to_string()
        } else {
            format!("{path}/v1/traces")
        };
        Ok(OtlpEndpoint {
            host: bare.unwrap_or(host).to_string(),
            port,
            authority: authority.to_string(),
            path,
        })
    }
}

impl std::fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// `--otlp-*`: export is on exactly when this is configured.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub endpoint: OtlpEndpoint,
    pub service_name: String,
    pub timeout: Duration,
}

/// A message's trace context, taken before it is produced.
#[derive(Debug, Clone)]
pub struct Stamp {
    parent: TraceParent,
    trace_state: Option<String>,
    /// The publish span's id (the `traceparent` header's parent id when exporting).
    publish_span: [u8; 8],
}

/// Records spans for the relay loop: [`Tracer::stamp`] before producing a batch,
/// [`Tracer::record`] after its delivery reports.
pub struct Tracer {
    export: Option<mpsc::Sender<Span>>,
    ids: SpanIds,
    table: String,
    metrics: Metrics,
}

impl Tracer {
    /// A tracer and, when `otlp` is set, the exporter task to spawn. The exporter drains and
    /// ends once the tracer is dropped.
    pub fn new(
        otlp: Option<OtlpConfig>,
        table: String,
        metrics: Metrics,
    ) -> (Tracer, Option<impl std::future::Future<Output = ()>>) {
        Tracer::with_queue(otlp, table, metrics, QUEUE)
    }

    fn with_queue(
        otlp: Option<OtlpConfig>,
        table: String,
        metrics: Metrics,
        queue: usize,
    ) -> (Tracer, Option<impl std::future::Future<Output = ()>>) {
        let (export, exporter) = match otlp {
            Some(cfg) => {
                for reason in ["queue_full", "export_failed"] {
                    metrics.spans_dropped.with_label_values(&[reason]); // shown as 0 from the start
                }
                let (tx, rx) = mpsc::channel(queue);
                (Some(tx), Some(export(rx, cfg, metrics.clone())))
            }
            None => (None, None),
        };
        let tracer = Tracer {
            export,
            ids: SpanIds::new(),
            table,
            metrics,
        };
        (tracer, exporter)
    }

    /// True when spans are wanted at all (exported, or logged at debug level).
    fn active(&self) -> bool {
        self.export.is_some()
            || tracing::enabled!(target: "outbox_relay::spans", tracing::Level::DEBUG)
    }

    /// Read each message's trace context. When exporting, a traced message's `traceparent`
    /// header is rewritten to name the relay's publish span (same trace, same flags), so
    /// consumers continue from it; otherwise headers are untouched.
    pub fn stamp(&self, messages: &mut [Message]) -> Vec<Option<Stamp>> {
        if !self.active() {
            return vec![None; messages.len()];
        }
        messages
            .iter_mut()
            .map(|m| {
                let find = |name: &str| m.headers.iter().position(|(k, _)| k.eq_ignore_ascii_case(name));
                let at = find(HEADER_TRACEPARENT)?;
                let parent = match TraceParent::parse(&m.headers[at].1) {
                    Ok(p) if p.sampled() => p,
                    Ok(_) => return None, // the writer did not sample this trace: neither do we
                    Err(why) => {
                        tracing::debug!(target: "outbox_relay::spans", row_id = m.id, reason = why,
                            "invalid traceparent header; no span recorded, headers carried unchanged");
                        return None;
                    }
                };
                let trace_state = find(HEADER_TRACESTATE).map(|i| m.headers[i].1.clone());
                let publish_span = self.ids.next();
                if self.export.is_some() {
                    m.headers[at].1 = TraceParent {
                        span_id: publish_span,
                        ..parent
                    }
                    .header();
                }
                Some(Stamp {
                    parent,
                    trace_state,
                    publish_span,
                })
            })
            .collect()
    }

    /// The two spans of every stamped message that has an outcome; logged at debug level and,
    /// when exporting, queued for the exporter (dropped and counted if the queue is full).
    pub fn record(
        &self,
        messages: &[Message],
        stamps: &[Option<Stamp>],
        outcomes: &[Result<(), Failure>],
        receipts: &[Receipt],
    ) {
        for (((m, stamp), outcome), receipt) in
            messages.iter().zip(stamps).zip(outcomes).zip(receipts)
        {
            let Some(stamp) = stamp else { continue };
            for span in self.spans(m, stamp, outcome, receipt) {
                tracing::debug!(target: "outbox_relay::spans", trace_id = %hex(&span.trace_id),
                    span_id = %hex(&span.span_id), parent_span_id = %hex(&span.parent_span_id),
                    name = %span.name, row_id = m.id,
                    duration_us = span.end_unix_nano.saturating_sub(span.start_unix_nano) / 1000,
                    error = span.error.as_deref(), "span");
                let Some(tx) = &self.export else { continue };
                if tx.try_send(span).is_err() {
                    self.metrics
                        .spans_dropped
                        .with_label_values(&["queue_full"])
                        .inc();
                }
            }
        }
    }

    fn spans(
        &self,
        m: &Message,
        stamp: &Stamp,
        outcome: &Result<(), Failure>,
        receipt: &Receipt,
    ) -> [Span; 2] {
        let handed_off = unix_nanos(receipt.handed_off);
        let created = m
            .created_at
            .timestamp_nanos_opt()
            .map_or(0, |n| n.max(0) as u64)
            .min(handed_off); // clocks differ: never end before the start
        let span = |span_id, name: String, kind, start, end, attributes| Span {
            trace_id: stamp.parent.trace_id,
            span_id,
            parent_span_id: stamp.parent.span_id,
            trace_state: stamp.trace_state.clone(),
            flags: stamp.parent.flags,
            name,
            kind,
            start_unix_nano: start,
            end_unix_nano: end,
            attributes,
            error: None,
        };
        let common = || {
            vec![
                ("messaging.system", Value::Str("kafka".into())),
                ("messaging.destination.name", Value::Str(m.topic.clone())),
                ("messaging.message.id", Value::Str(m.id.to_string())),
                ("outbox.table", Value::Str(self.table.clone())),
            ]
        };
        let wait = span(
            self.ids.next(),
            "outbox.wait".into(),
            Kind::Internal,
            created,
            handed_off,
            common(),
        );
        let mut attributes = common();
        attributes.push(("messaging.operation", Value::Str("publish".into())));
        if let Some(key) = &m.key {
            attributes.push(("messaging.kafka.message.key", Value::Str(key.clone())));
        }
        if let Some((partition, offset)) = receipt.position {
            attributes.push((
                "messaging.kafka.destination.partition",
                Value::Int(partition.into()),
            ));
            attributes.push(("messaging.kafka.message.offset", Value::Int(offset)));
        }
        let reported = unix_nanos(receipt.reported).max(handed_off);
        let mut publish = span(
            stamp.publish_span,
            format!("{} publish", m.topic),
            Kind::Producer,
            handed_off,
            reported,
            attributes,
        );
        if let Err(failure) = outcome {
            publish.error = Some(failure.clone().into_reason());
        }
        [wait, publish]
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

/// The exporter task: batches of up to 512 spans (or whatever arrived within 1 s) posted to
/// the collector. When the tracer is dropped it sends what is left within one --otlp-timeout.
async fn export(mut rx: mpsc::Receiver<Span>, cfg: OtlpConfig, metrics: Metrics) {
    tracing::info!(endpoint = %cfg.endpoint, service_name = %cfg.service_name, "exporting trace spans over OTLP/HTTP");
    let mut warn = RateLimitedWarn::default();
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH_MAX);
    let mut open = true;
    while open {
        match rx.recv().await {
            Some(span) => batch.push(span),
            None => break,
        }
        let deadline = tokio::time::Instant::now() + BATCH_EVERY;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        send(&mut batch, &cfg, cfg.timeout, &metrics, &mut warn).await;
    }
    // Shutdown: the loop has stopped; send what is queued within one timeout.
    let deadline = Instant::now() + cfg.timeout;
    loop {
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        send(&mut batch, &cfg, left, &metrics, &mut warn).await;
    }
    warn.flush();
}

async fn send(
    batch: &mut Vec<Span>,
    cfg: &OtlpConfig,
    timeout: Duration,
    metrics: &Metrics,
    warn: &mut RateLimitedWarn,
) {
    let n = batch.len() as u64;
    let body = otlp_json(batch, &cfg.service_name).to_string();
    batch.clear();
    let result = if timeout.is_zero() {
        Err("shutdown: no time left to export".to_string())
    } else {
        post(&cfg.endpoint, body.as_bytes(), timeout).await
    };
    match result {
        Ok(()) => metrics.spans_exported.inc_by(n),
        Err(e) => {
            metrics
                .spans_dropped
                .with_label_values(&["export_failed"])
                .inc_by(n);
            warn.failed(&cfg.endpoint, n, &e);
        }
    }
}

/// POST one request and read the status line. `Connection: close`: a request per batch, at
/// most a few per second, to a collector on the same host or network.
async fn post(endpoint: &OtlpEndpoint, body: &[u8], timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             User-Agent: outbox-relay/{}\r\nConnection: close\r\n\r\n",
            endpoint.path,
            endpoint.authority,
            body.len(),
            env!("CARGO_PKG_VERSION")
        );
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        stream
            .write_all(body)
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        let mut response = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !response.contains(&b'\n') && response.len() < 4096 {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("reading the response failed: {e}")),
            }
        }
        let line = String::from_utf8_lossy(&response);
        let line = line.lines().next().unwrap_or("").trim();
        match line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
        {
            Some(code) if (200..300).contains(&code) => Ok(()),
            Some(404) => Err(format!(
                "the collector answered {line:?}: is {} its OTLP/HTTP traces path?",
                endpoint.path
            )),
            Some(_) => Err(format!("the collector answered {line:?}")),
            None => Err(
                "no HTTP response (is this the collector's OTLP/HTTP port, usually 4318?)".into(),
            ),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within --otlp-timeout ({timeout:?})")))
}

/// Export failures warn at most once a minute, with what was dropped meanwhile.
#[derive(Default)]
struct RateLimitedWarn {
    last: Option<Instant>,
    dropped_since: u64,
    last_error: Option<String>,
}

impl RateLimitedWarn {
    fn failed(&mut self, endpoint: &OtlpEndpoint, spans: u64, error: &str) {
        self.dropped_since += spans;
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            self.last_error = Some(error.to_string());
            return;
        }
        tracing::warn!(endpoint = %endpoint, error, dropped_spans = self.dropped_since,
            "trace span export failed; spans dropped (delivery is unaffected). Next warning in 60s at the earliest");
        self.last = Some(Instant::now());
        self.dropped_since = 0;
        self.last_error = None;
    }

    fn flush(&mut self) {
        if let Some(error) = self.last_error.take() {
            tracing::warn!(
                error,
                dropped_spans = self.dropped_since,
                "trace span export failed; spans dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_valid_traceparent_and_formats_it_back() {
        let p = TraceParent::parse(GOOD).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        assert_eq!(p.header(), GOOD);
        let unsampled = TraceParent::parse(&GOOD.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn refuses_every_malformed_traceparent() {
        for (value, why) in [
            ("", "4 fields"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "4 fields",
            ),
            (&format!("{GOOD}-00"), "4 fields"),
            (&GOOD.replacen("00", "01", 1), "version 00"),
            (&GOOD.replacen("00", "ff", 1), "version 00"),
            (&GOOD.to_uppercase(), "trace id"),
            (&GOOD.replace("4bf92f", "4BF92F"), "trace id"),
            (&GOOD.replace("4bf92f", "4bf92"), "trace id"),
            (&GOOD.replace("4bf92f", "4bf92g"), "trace id"),
            (&GOOD.replace("00f067", "00F067"), "parent id"),
            (&GOOD.replace("00f067", "+0f067"), "parent id"),
            (&GOOD.replace("-01", "-1"), "flags"),
            (&GOOD.replace("-01", "-0x"), "flags"),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "all zeros",
            ),
            (&format!(" {GOOD}"), "version 00"),
            (&format!("{GOOD} "), "flags"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
                "trace id",
            ),
        ] {
            let err = TraceParent::parse(value).unwrap_err();
            assert!(err.contains(why), "{value:?}: {err}");
        }
    }

    #[test]
    fn span_ids_are_nonzero_and_distinct() {
        let ids = SpanIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next();
            assert_ne!(id, [0; 8]);
            assert!(seen.insert(id), "repeated span id");
        }
        assert_ne!(SpanIds::new().next(), SpanIds::new().next(), "seeds differ");
    }

    fn span(error: Option<&str>) -> Span {
        let p = TraceParent::parse(GOOD).unwrap();
        Span {
            trace_id: p.trace_id,
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: p.span_id,
            trace_state: Some("congo=t61rcWkgMzE".into()),
            flags: 1,
            name: "orders publish".into(),
            kind: Kind::Producer,
            start_unix_nano: 1_700_000_000_123_456_789,
            end_unix_nano: 1_700_000_000_223_456_789,
            attributes: vec![
                ("messaging.system", Value::Str("kafka".into())),
                ("messaging.kafka.message.offset", Value::Int(42)),
            ],
            error: error.map(Into::into),
        }
    }

    #[test]
    fn otlp_json_follows_the_spec() {
        let body = otlp_json(&[span(None), span(Some("broker said no"))], "relay-a");
        let rs = &body["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0],
            serde_json::json!({"key": "service.name", "value": {"stringValue": "relay-a"}})
        );
        let scope = &rs["scopeSpans"][0];
        assert_eq!(scope["scope"]["name"], "outbox-relay");
        let s = &scope["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["spanId"], "0102030405060708");
        assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(s["traceState"], "congo=t61rcWkgMzE");
        assert_eq!(s["flags"], 0x301, "sampled, parent is remote");
        assert_eq!(s["name"], "orders publish");
        assert_eq!(s["kind"], 4, "SPAN_KIND_PRODUCER");
        assert_eq!(
            s["startTimeUnixNano"], "1700000000123456789",
            "64-bit ints are strings"
        );
        assert_eq!(s["endTimeUnixNano"], "1700000000223456789");
        assert_eq!(
            s["attributes"],
            serde_json::json!([
                {"key": "messaging.system", "value": {"stringValue": "kafka"}},
                {"key": "messaging.kafka.message.offset", "value": {"intValue": "42"}},
            ])
        );
        assert!(s.get("status").is_none(), "success leaves the status unset");
        let failed = &scope["spans"][1];
        assert_eq!(
            failed["status"],
            serde_json::json!({"code": 2, "message": "broker said no"})
        );
    }

    #[test]
    fn endpoints_are_http_only_with_a_traces_path() {
        let e = OtlpEndpoint::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("127.0.0.1", 4318, "/v1/traces")
        );
        assert_eq!(e.to_string(), "http://127.0.0.1:4318/v1/traces");
        let e = OtlpEndpoint::parse("http://collector.observability/otlp/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("collector.observability", 80, "/otlp/v1/traces")
        );
        let e = OtlpEndpoint::parse("http://[::1]:4318/v1/traces").unwrap();
        assert_eq!(
            (e.host.as_str(), e.authority.as_str(), e.path.as_str()),
            ("::1", "[::1]:4318", "/v1/traces")
        );
        for (url, why) in [
            ("https://collector:4318", "local OpenTelemetry Collector"),
            ("grpc://collector:4317", "not supported"),
            ("collector:4318", "expected a URL"),
            ("http://:4318", "host"),
            ("http://collector:http", "port"),
            ("http://collector:0", "port"),
            ("http://::1:4318", "host"),
            ("http://user:pw@collector:4318", "credentials"),
            ("http://collector:4318/?token=x", "query"),
        ] {
            let err = OtlpEndpoint::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    fn message(headers: &[(&str, &str)]) -> Message {
        Message {
            id: 7,
            topic: "orders".into(),
            key: Some("k".into()),
            payload: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    fn otlp() -> OtlpConfig {
        OtlpConfig {
            endpoint: OtlpEndpoint::parse("http://127.0.0.1:9").unwrap(),
            service_name: "outbox-relay".into(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn exporting_rewrites_only_valid_sampled_traceparents() {
        let (tracer, _exporter) = Tracer::new(Some(otlp()), "public.outbox".into(), Metrics::new());
        let unsampled = GOOD.replace("-01", "-00");
        let mut batch = [
            message(&[("traceparent", GOOD), ("tracestate", "a=b")]),
            message(&[]),
            message(&[("traceparent", "00-bogus")]),
            message(&[("traceparent", &unsampled)]),
        ];
        let stamps = tracer.stamp(&mut batch);
        let stamp = stamps[0].as_ref().unwrap();
        assert_eq!(
            batch[0].headers[0].1,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex(&stamp.publish_span)
            )
        );
        assert_eq!(batch[0].headers[1].1, "a=b", "tracestate is kept");
        assert!(stamps[1..].iter().all(Option::is_none));
        assert_eq!(
            batch[2].headers[0].1, "00-bogus",
            "invalid: carried unchanged"
        );
        assert_eq!(
            batch[3].headers[0].1, unsampled,
            "unsampled: carried unchanged"
        );
    }

    #[test]
    fn without_export_headers_stay_exactly_as_they_were() {
        let (tracer, exporter) = Tracer::new(None, "public.outbox".into(), Metrics::new());
        assert!(exporter.is_none());
        let mut batch = [message(&[("traceparent", GOOD)])];
        let before = batch.clone();
        tracer.stamp(&mut batch);
        assert_eq!(batch, before);
    }

    #[test]
    fn spans_cover_wait_and_publish_and_drop_when_the_queue_is_full() {
        let metrics = Metrics::new();
        let (tracer, _exporter) =
            Tracer::with_queue(Some(otlp()), "public.outbox".into(), metrics.clone(), 3);
        let mut batch = [
            message(&[("traceparent", GOOD)]),
            message(&[("traceparent", GOOD)]),
        ];
        let stamps = tracer.stamp(&mut batch);
        let handed_off = UNIX_EPOCH + Duration::from_secs(1_700_000_005);
        let receipt = Receipt {
            handed_off,
            reported: handed_off + Duration::from_millis(3),
            position: Some((2, 40)),
        };
        let [wait, publish] =
            tracer.spans(&batch[0], stamps[0].as_ref().unwrap(), &Ok(()), &receipt);
        let parent = TraceParent::parse(GOOD).unwrap();
        assert_eq!(
            (wait.name.as_str(), wait.kind),
            ("outbox.wait", Kind::Internal)
        );
        assert_eq!(
            (publish.name.as_str(), publish.kind),
            ("orders publish", Kind::Producer)
        );
        for s in [&wait, &publish] {
            assert_eq!(
                (s.trace_id, s.parent_span_id),
                (parent.trace_id, parent.span_id)
            );
        }
        assert_ne!(wait.span_id, publish.span_id);
        assert_eq!(
            wait.start_unix_nano, 1_700_000_000_000_000_000,
            "created_at"
        );
        assert_eq!(wait.end_unix_nano, publish.start_unix_nano);
        assert_eq!(publish.end_unix_nano - publish.start_unix_nano, 3_000_000);
        let attr = |k: &str| {
            publish
                .attributes
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            attr("messaging.kafka.destination.partition"),
            Some(Value::Int(2))
        );
        assert_eq!(attr("messaging.kafka.message.offset"), Some(Value::Int(40)));
        assert_eq!(attr("messaging.message.id"), Some(Value::Str("7".into())));
        assert_eq!(
            attr("messaging.kafka.message.key"),
            Some(Value::Str("k".into()))
        );
        assert_eq!(
            attr("outbox.table"),
            Some(Value::Str("public.outbox".into()))
        );

        let failed = Err(Failure::Transient("timed out".into()));
        let [_, publish] = tracer.spans(&batch[1], stamps[1].as_ref().unwrap(), &failed, &receipt);
        assert_eq!(publish.error.as_deref(), Some("timed out"));

        // Two messages, four spans, a queue of three: one dropped, counted, nothing blocks.
        tracer.record(&batch, &stamps, &[Ok(()), failed], &[receipt, receipt]);
        assert_eq!(
            metrics
                .spans_dropped
                .with_label_values(&["queue_full"])
                .get(),
            1
        );
    }
}
