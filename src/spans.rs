//! W3C trace context: spans for the time an event waited in the outbox and for its publish,
//! in the writer's trace, optionally exported over OTLP/HTTP by the OpenTelemetry SDK.
//!
//! A row whose `traceparent` header is valid (version 00, lowercase hex, non-zero ids) and
//! sampled gets two spans, both children of the writer's span: `outbox.wait` (created_at to
//! the hand-off to the producer) and `<topic> publish` (PRODUCER, hand-off to the delivery
//! report). Anything else gets no span and its headers are left alone. Without export the
//! spans are debug log events only and every header is carried exactly as it was.
//!
//! Export (cargo feature `otlp`, on by default) is the OpenTelemetry SDK: a batch span
//! processor (its own thread, a bounded queue) and the OTLP/HTTP protobuf exporter (retries
//! 429/502/503/504 and connection failures within the timeout; gzip with
//! `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`; headers from `OTEL_EXPORTER_OTLP_HEADERS`) over a
//! reqwest client with rustls. What stays here: the `traceparent` header (parsed and
//! rewritten by us, strictly), the spans' names, attributes and times, the configuration,
//! and counting what becomes of each span. Spans never block or fail delivery: a full queue
//! or an unreachable collector drops spans (counted), never messages.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::Message;
use crate::kafka::{Failure, Receipt};
use crate::telemetry::Metrics;

/// The W3C trace context header names (Kafka binding: lowercase).
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";

/// `service.name` when neither the flag, `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES`
/// names one.
pub const DEFAULT_SERVICE_NAME: &str = "outbox-relay";
/// Time allowed for one export (retries included) unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Spans per OTLP request, at most.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
const BATCH_MAX: usize = 512;
/// A partial batch is sent after this long.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
const BATCH_EVERY: Duration = Duration::from_secs(1);
/// Spans waiting for the exporter, at most; more are dropped (and counted). The SDK allocates
/// the queue up front (~350 B a slot): 2,048 (its default) keeps that under 1 MB.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
const QUEUE: usize = 2048;
/// At most one export-failure warning per this interval (with the count since the last).
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
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

/// Where spans go: the collector's OTLP/HTTP traces URL, http or https
/// (e.g. `https://collector:4318/v1/traces`). No credentials, query or fragment in it, so it
/// can be logged: credentials go in `OTEL_EXPORTER_OTLP_HEADERS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint(url::Url);

impl OtlpEndpoint {
    /// `--otlp-endpoint`: the collector's address; `/v1/traces` is appended to the path unless
    /// it already ends with it.
    pub fn parse(url: &str) -> Result<OtlpEndpoint, String> {
        let url = checked_url(url)?;
        if url.path().trim_end_matches('/').ends_with("/v1/traces") {
            let path = url.path().trim_end_matches('/').to_string();
            return Ok(OtlpEndpoint(with_path(url, &path)));
        }
        Ok(OtlpEndpoint::with_traces_path(url))
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: a base URL, to which `v1/traces` is always appended
    /// (OpenTelemetry's rule for this variable).
    fn base(url: &str) -> Result<OtlpEndpoint, String> {
        checked_url(url).map(OtlpEndpoint::with_traces_path)
    }

    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the traces URL, used as it is.
    fn exact(url: &str) -> Result<OtlpEndpoint, String> {
        checked_url(url).map(OtlpEndpoint)
    }

    fn with_traces_path(url: url::Url) -> OtlpEndpoint {
        let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
        OtlpEndpoint(with_path(url, &path))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn is_https(&self) -> bool {
        self.0.scheme() == "https"
    }
}

impl std::fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

fn with_path(mut url: url::Url, path: &str) -> url::Url {
    url.set_path(path);
    url
}

fn checked_url(s: &str) -> Result<url::Url, String> {
    const EXAMPLE: &str = "expected a URL such as http://127.0.0.1:4318 or https://collector:4318";
    let url = url::Url::parse(s.trim()).map_err(|e| format!("{e}; {EXAMPLE}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("scheme {other:?} is not supported; {EXAMPLE}")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("missing host; {EXAMPLE}"));
    }
    if url.port() == Some(0) {
        return Err("port 0 is not a port to connect to".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "credentials in the URL are not supported; send them as a header with \
             OTEL_EXPORTER_OTLP_HEADERS (e.g. authorization=Bearer%20<token>)"
                .into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is not supported; give scheme://host:port[/path]".into());
    }
    Ok(url)
}

/// Span export settings: export is on exactly when an endpoint is configured. Holds no
/// header values: the exporter reads `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` itself, and only
/// their names are kept here (for the startup log).
#[derive(Clone)]
pub struct OtlpConfig {
    pub endpoint: OtlpEndpoint,
    /// Which flag or variable named the endpoint.
    pub endpoint_from: &'static str,
    /// `--otlp-service-name`, else `OTEL_SERVICE_NAME`; `None`: `service.name` from
    /// `OTEL_RESOURCE_ATTRIBUTES`, else [`DEFAULT_SERVICE_NAME`].
    pub service_name: Option<String>,
    /// Time allowed for one export, retries included; also the bound on the shutdown flush.
    pub timeout: Duration,
    /// Names of the headers sent with every export request.
    pub header_names: Vec<String>,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE`: the CA bundle trusted for an https
    /// endpoint, instead of the system's.
    pub ca_file: Option<PathBuf>,
    #[cfg(feature = "otlp")]
    ca: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl std::fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpConfig")
            .field("endpoint", &self.endpoint.as_str())
            .field("endpoint_from", &self.endpoint_from)
            .field("service_name", &self.service_name)
            .field("timeout", &self.timeout)
            .field("header_names", &self.header_names)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl OtlpConfig {
    /// The flags (explicit overrides), else the standard OpenTelemetry variables read through
    /// `env` (empty values count as unset). `Ok(None)`: no endpoint anywhere, export is off.
    pub fn resolve(
        endpoint: Option<OtlpEndpoint>,
        service_name: Option<String>,
        timeout: Option<Duration>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpConfig>, String> {
        let var = |name: &'static str| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (name, v))
        };
        let in_var = |name: &str, e: String| format!("{name}: {e}");
        let (endpoint, endpoint_from) = match endpoint {
            Some(e) => (e, "--otlp-endpoint"),
            None => match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                Some((name, v)) => (OtlpEndpoint::exact(&v).map_err(|e| in_var(name, e))?, name),
                None => match var("OTEL_EXPORTER_OTLP_ENDPOINT") {
                    Some((name, v)) => (OtlpEndpoint::base(&v).map_err(|e| in_var(name, e))?, name),
                    None => return Ok(None),
                },
            },
        };
        if cfg!(not(feature = "otlp")) {
            return Err(format!(
                "{endpoint_from}: this build of outbox-relay cannot export spans (it was built \
                 without the `otlp` cargo feature); unset it, or use a build with the feature"
            ));
        }
        let service_name =
            service_name.or_else(|| var("OTEL_SERVICE_NAME").map(|(_, v)| v.trim().to_string()));
        let timeout = match timeout {
            Some(t) => t,
            None => match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
            {
                Some((name, v)) => match v.trim().parse::<u64>() {
                    Ok(ms) if ms > 0 => Duration::from_millis(ms),
                    _ => {
                        return Err(format!(
                            "{name}: expected a whole number of milliseconds greater than 0, \
                             got {v:?}"
                        ))
                    }
                },
                None => DEFAULT_TIMEOUT,
            },
        };
        // The exporter reads the signal's variable if set, else the general one (not both).
        let header_names = match var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|| var("OTEL_EXPORTER_OTLP_HEADERS"))
        {
            Some((name, v)) => header_names(&v).map_err(|e| in_var(name, e))?,
            None => Vec::new(),
        };
        let ca_file = var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .or_else(|| var("OTEL_EXPORTER_OTLP_CERTIFICATE"));
        #[cfg(feature = "otlp")]
        let ca = match &ca_file {
            Some((name, path)) => read_ca(path).map_err(|e| in_var(name, e))?,
            None => Vec::new(),
        };
        Ok(Some(OtlpConfig {
            endpoint,
            endpoint_from,
            service_name,
            timeout,
            header_names,
            ca_file: ca_file.map(|(_, path)| PathBuf::from(path)),
            #[cfg(feature = "otlp")]
            ca,
        }))
    }
}

/// The names in an `OTEL_EXPORTER_OTLP_HEADERS` value (`name=value,name=value`, values
/// percent-encoded). A malformed entry is refused by its position: values are never echoed.
fn header_names(value: &str) -> Result<Vec<String>, String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    value
        .split_terminator(',')
        .enumerate()
        .map(|(i, entry)| match entry.split_once('=') {
            Some((name, _)) if !name.trim().is_empty() && name.trim().chars().all(token) => {
                Ok(name.trim().to_ascii_lowercase())
            }
            _ => Err(format!(
                "entry {} is not name=value with a valid header name (values are \
                 percent-encoded, e.g. authorization=Bearer%20<token>)",
                i + 1
            )),
        })
        .collect()
}

/// The certificates of a PEM file (a CA or a bundle of them).
#[cfg(feature = "otlp")]
fn read_ca(path: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path} is not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|e| format!("{path}: a certificate cannot be used as a CA: {e}"))?;
    }
    Ok(certs)
}

/// OpenTelemetry span kinds used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal,
    Producer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span, as the relay measured it. Its trace, parent and trace state are the
/// writer's (from the [`Stamp`]); its own id, when exported, is the SDK's.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub name: String,
    pub kind: Kind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// Status error with this message; `None` leaves the status unset.
    pub error: Option<String>,
}

/// A message's trace context, taken before it is produced.
#[derive(Debug, Clone)]
pub struct Stamp {
    parent: TraceParent,
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    trace_state: Option<String>,
    /// When exporting: the publish span's id, which the rewritten `traceparent` names.
    publish_span: Option<[u8; 8]>,
}

/// Records spans for the relay loop: [`Tracer::stamp`] before producing a batch,
/// [`Tracer::record`] after its delivery reports.
pub struct Tracer {
    table: String,
    #[cfg(feature = "otlp")]
    export: Option<otlp::Export>,
}

impl Tracer {
    /// A tracer and, when `otlp` is set, the exporter's shutdown, to spawn: once the tracer is
    /// dropped it sends what is still queued, within one export timeout, and stops the
    /// exporter. Call within a Tokio runtime.
    pub fn new(
        otlp: Option<OtlpConfig>,
        table: String,
        metrics: Metrics,
    ) -> (
        Tracer,
        Option<impl std::future::Future<Output = ()> + Send + 'static>,
    ) {
        Tracer::with_queue(otlp, table, metrics, QUEUE)
    }

    #[cfg(feature = "otlp")]
    fn with_queue(
        otlp: Option<OtlpConfig>,
        table: String,
        metrics: Metrics,
        queue: usize,
    ) -> (
        Tracer,
        Option<impl std::future::Future<Output = ()> + Send + 'static>,
    ) {
        let (export, shutdown) = match otlp.map(|cfg| otlp::Export::start(cfg, metrics, queue)) {
            Some(Ok((export, shutdown))) => (Some(export), Some(shutdown)),
            Some(Err(error)) => {
                tracing::error!(%error, "cannot start the trace span exporter; spans are not exported (delivery is unaffected)");
                (None, None)
            }
            None => (None, None),
        };
        (Tracer { table, export }, shutdown)
    }

    #[cfg(not(feature = "otlp"))]
    fn with_queue(
        otlp: Option<OtlpConfig>,
        table: String,
        metrics: Metrics,
        queue: usize,
    ) -> (
        Tracer,
        Option<impl std::future::Future<Output = ()> + Send + 'static>,
    ) {
        // OtlpConfig::resolve refuses an endpoint in a build without the feature.
        let _ = (otlp, metrics, queue);
        (Tracer { table }, None::<std::future::Ready<()>>)
    }

    fn exporting(&self) -> bool {
        #[cfg(feature = "otlp")]
        return self.export.is_some();
        #[cfg(not(feature = "otlp"))]
        return false;
    }

    /// True when spans are wanted at all (exported, or logged at debug level).
    fn active(&self) -> bool {
        self.exporting() || tracing::enabled!(target: "outbox_relay::spans", tracing::Level::DEBUG)
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
                let publish_span = self.new_span_id();
                if let Some(span_id) = publish_span {
                    m.headers[at].1 = TraceParent { span_id, ..parent }.header();
                }
                Some(Stamp {
                    parent,
                    trace_state,
                    publish_span,
                })
            })
            .collect()
    }

    #[cfg(feature = "otlp")]
    fn new_span_id(&self) -> Option<[u8; 8]> {
        self.export.as_ref().map(otlp::Export::new_span_id)
    }

    #[cfg(not(feature = "otlp"))]
    fn new_span_id(&self) -> Option<[u8; 8]> {
        None
    }

    /// The two spans of every stamped message that has an outcome; logged at debug level and,
    /// when exporting, handed to the exporter (dropped and counted if its queue is full).
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
            let [wait, publish] = self.spans(m, outcome, receipt);
            for (span, span_id) in [(wait, None), (publish, stamp.publish_span)] {
                let exported_as = self.export(stamp, &span, span_id);
                tracing::debug!(target: "outbox_relay::spans", trace_id = %hex(&stamp.parent.trace_id),
                    span_id = exported_as.map(|id| hex(&id)).as_deref(),
                    parent_span_id = %hex(&stamp.parent.span_id),
                    name = %span.name, row_id = m.id,
                    duration_us = span.end_unix_nano.saturating_sub(span.start_unix_nano) / 1000,
                    error = span.error.as_deref(), "span");
            }
        }
    }

    /// Hand a span to the exporter; its id if it was taken.
    #[cfg(feature = "otlp")]
    fn export(&self, stamp: &Stamp, span: &Span, span_id: Option<[u8; 8]>) -> Option<[u8; 8]> {
        self.export.as_ref()?.record(stamp, span, span_id)
    }

    #[cfg(not(feature = "otlp"))]
    fn export(&self, _: &Stamp, _: &Span, _: Option<[u8; 8]>) -> Option<[u8; 8]> {
        None
    }

    /// `outbox.wait` and `<topic> publish` for a message, with their times and attributes.
    fn spans(&self, m: &Message, outcome: &Result<(), Failure>, receipt: &Receipt) -> [Span; 2] {
        let handed_off = unix_nanos(receipt.handed_off);
        let created = m
            .created_at
            .timestamp_nanos_opt()
            .map_or(0, |n| n.max(0) as u64)
            .min(handed_off); // clocks differ: never end before the start
        let common = || {
            vec![
                ("messaging.system", Value::Str("kafka".into())),
                ("messaging.destination.name", Value::Str(m.topic.clone())),
                ("messaging.message.id", Value::Str(m.id.to_string())),
                ("outbox.table", Value::Str(self.table.clone())),
            ]
        };
        let wait = Span {
            name: "outbox.wait".into(),
            kind: Kind::Internal,
            start_unix_nano: created,
            end_unix_nano: handed_off,
            attributes: common(),
            error: None,
        };
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
        let publish = Span {
            name: format!("{} publish", m.topic),
            kind: Kind::Producer,
            start_unix_nano: handed_off,
            end_unix_nano: unix_nanos(receipt.reported).max(handed_off),
            attributes,
            error: outcome
                .as_ref()
                .err()
                .map(|failure| failure.clone().into_reason()),
        };
        [wait, publish]
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

/// The OpenTelemetry SDK behind [`Tracer`]: provider, batch span processor, OTLP/HTTP exporter.
#[cfg(feature = "otlp")]
mod otlp {
    use std::cell::Cell;
    use std::fmt::Write as _;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, UNIX_EPOCH};

    use opentelemetry::trace::{
        Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _,
        TraceFlags, TraceId, TraceState, Tracer as _, TracerProvider as _,
    };
    use opentelemetry::{Context, InstrumentationScope, Key, KeyValue};
    use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
    use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{
        BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SdkTracer,
        SdkTracerProvider, SpanData, SpanExporter,
    };
    use opentelemetry_sdk::Resource;

    use super::{
        Kind, OtlpConfig, Span, Stamp, Value, BATCH_EVERY, BATCH_MAX, DEFAULT_SERVICE_NAME,
        WARN_EVERY,
    };
    use crate::telemetry::Metrics;

    const VERSION: &str = env!("CARGO_PKG_VERSION");

    pub(super) struct Export {
        tracer: SdkTracer,
        ids: RandomIdGenerator,
        /// Spans handed to the SDK and not yet taken by an export. At most `queue`, the batch
        /// processor's own queue size, so that queue never overflows unseen: a span that
        /// would exceed it is dropped here and counted as `queue_full`.
        queued: Arc<AtomicUsize>,
        queue: usize,
        metrics: Metrics,
        /// Dropped with the tracer: the shutdown future then flushes and stops the exporter.
        _alive: tokio::sync::oneshot::Sender<()>,
    }

    impl Export {
        pub(super) fn start(
            cfg: OtlpConfig,
            metrics: Metrics,
            queue: usize,
        ) -> Result<(Export, impl Future<Output = ()> + Send + 'static), String> {
            for reason in ["queue_full", "export_failed"] {
                metrics.spans_dropped.with_label_values(&[reason]); // shown as 0 from the start
            }
            warn_unsupported_variables();
            let last_error = Arc::new(Mutex::new(None));
            let client = OnRuntime {
                client: http_client(&cfg)?,
                runtime: tokio::runtime::Handle::current(),
                last_error: last_error.clone(),
            };
            // Headers (OTEL_EXPORTER_OTLP_[TRACES_]HEADERS) and compression
            // (OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION) come from the environment, read by the
            // SDK; everything set here overrides its variable.
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(cfg.endpoint.as_str())
                .with_timeout(cfg.timeout)
                .with_http_client(client)
                .build()
                .map_err(|e| e.to_string())?;
            let queued = Arc::new(AtomicUsize::new(0));
            let counted = Counted {
                inner: exporter,
                queued: queued.clone(),
                metrics: metrics.clone(),
                last_error,
                warn: Mutex::new(RateLimitedWarn::default()),
                endpoint: cfg.endpoint.to_string(),
            };
            let batch = BatchConfigBuilder::default()
                .with_max_queue_size(queue)
                .with_max_export_batch_size(BATCH_MAX.min(queue))
                .with_scheduled_delay(BATCH_EVERY)
                .build();
            let service_name = service_name(cfg.service_name.clone());
            let resource = Resource::builder()
                .with_service_name(service_name.clone())
                .with_attribute(KeyValue::new("service.version", VERSION))
                .build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(
                    BatchSpanProcessor::builder(counted)
                        .with_batch_config(batch)
                        .build(),
                )
                // Only sampled parents get spans, and every one of them is kept (this also
                // overrides OTEL_TRACES_SAMPLER: a rewritten traceparent must name a span
                // that is exported).
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
                .with_id_generator(PresetSpanIds::default())
                .with_resource(resource)
                .build();
            let tracer = provider.tracer_with_scope(
                InstrumentationScope::builder("outbox-relay")
                    .with_version(VERSION)
                    .build(),
            );
            tracing::info!(endpoint = %cfg.endpoint, from = cfg.endpoint_from, service_name,
                timeout = ?cfg.timeout, headers = %cfg.header_names.join(","),
                ca_file = cfg.ca_file.as_ref().map(|p| p.display().to_string()).as_deref(),
                "exporting trace spans over OTLP/HTTP");
            let (alive, dropped) = tokio::sync::oneshot::channel::<()>();
            let shutdown = {
                let (queued, metrics, timeout) = (queued.clone(), metrics.clone(), cfg.timeout);
                async move {
                    let _ = dropped.await; // the tracer is gone: no more spans
                    let stopped = tokio::task::spawn_blocking(move || {
                        provider.shutdown_with_timeout(timeout)
                    })
                    .await;
                    let left = queued.swap(0, Ordering::AcqRel) as u64;
                    if left > 0 {
                        metrics
                            .spans_dropped
                            .with_label_values(&["export_failed"])
                            .inc_by(left);
                        let error = match stopped {
                            Ok(Ok(())) => "none".to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(
                            dropped_spans = left,
                            ?timeout,
                            error,
                            "trace spans still queued at shutdown were not exported in time"
                        );
                    }
                }
            };
            let export = Export {
                tracer,
                ids: RandomIdGenerator::default(),
                queued,
                queue,
                metrics,
                _alive: alive,
            };
            Ok((export, shutdown))
        }

        pub(super) fn new_span_id(&self) -> [u8; 8] {
            self.ids.new_span_id().to_bytes()
        }

        /// Hand a finished span to the SDK, with `span_id` if given, unless the queue is full
        /// (then it is dropped and counted). Its id if it was handed over.
        pub(super) fn record(
            &self,
            stamp: &Stamp,
            span: &Span,
            span_id: Option<[u8; 8]>,
        ) -> Option<[u8; 8]> {
            if self.queued.fetch_add(1, Ordering::AcqRel) >= self.queue {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.metrics
                    .spans_dropped
                    .with_label_values(&["queue_full"])
                    .inc();
                return None;
            }
            let parent = SpanContext::new(
                TraceId::from_bytes(stamp.parent.trace_id),
                SpanId::from_bytes(stamp.parent.span_id),
                TraceFlags::new(stamp.parent.flags),
                true, // the writer's span: remote
                stamp
                    .trace_state
                    .as_deref()
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default(),
            );
            let parent = Context::new().with_remote_span_context(parent);
            let builder = SpanBuilder::from_name(span.name.clone())
                .with_kind(match span.kind {
                    Kind::Internal => SpanKind::Internal,
                    Kind::Producer => SpanKind::Producer,
                })
                .with_start_time(at(span.start_unix_nano))
                .with_attributes(span.attributes.iter().map(|(key, value)| match value {
                    Value::Str(s) => KeyValue::new(*key, s.clone()),
                    Value::Int(i) => KeyValue::new(*key, *i),
                }));
            let mut sdk_span = PresetSpanIds::with(span_id.map(SpanId::from_bytes), || {
                self.tracer.build_with_context(builder, &parent)
            });
            if let Some(message) = &span.error {
                sdk_span.set_status(Status::error(message.clone()));
            }
            let id = sdk_span.span_context().span_id().to_bytes();
            sdk_span.end_with_timestamp(at(span.end_unix_nano));
            Some(id)
        }
    }

    fn at(unix_nanos: u64) -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_nanos(unix_nanos)
    }

    /// `--otlp-service-name` or OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES's
    /// `service.name`, else outbox-relay.
    fn service_name(configured: Option<String>) -> String {
        configured
            .or_else(|| {
                Resource::builder()
                    .build()
                    .get(&Key::from_static_str("service.name"))
                    .map(|v| v.to_string())
                    .filter(|name| !name.starts_with("unknown_service"))
            })
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string())
    }

    fn warn_unsupported_variables() {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(protocol) = protocol.filter(|p| p.trim() != "http/protobuf") {
            tracing::warn!(%protocol, "OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is supported; exporting with it");
        }
        for name in [
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        ] {
            if var(name).is_some() {
                tracing::warn!(
                    variable = name,
                    "client certificates (mTLS) are not supported; ignored"
                );
            }
        }
    }

    /// reqwest over rustls (ring, as sqlx): only the configured CA bundle if there is one,
    /// else the system's CAs; no redirects (headers go to the configured endpoint only).
    fn http_client(cfg: &OtlpConfig) -> Result<reqwest::Client, String> {
        let mut roots = rustls::RootCertStore::empty();
        if !cfg.ca.is_empty() {
            roots.add_parsable_certificates(cfg.ca.iter().cloned());
        } else if cfg.endpoint.is_https() {
            let (added, _) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                tracing::warn!(endpoint = %cfg.endpoint, "no system CA certificates found: https export fails unless OTEL_EXPORTER_OTLP_CERTIFICATE names the collector's CA");
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client setup failed: {e}"))
    }

    /// The exporter's HTTP client. The batch span processor exports from its own thread,
    /// outside Tokio: each request runs as a task on the relay's runtime, where reqwest's
    /// I/O and timers live. Keeps the last transport error's text (the SDK reports only
    /// "network error"); it holds the URL, never a header.
    #[derive(Debug)]
    struct OnRuntime {
        client: reqwest::Client,
        runtime: tokio::runtime::Handle,
        last_error: Arc<Mutex<Option<String>>>,
    }

    #[async_trait::async_trait]
    impl HttpClient for OnRuntime {
        async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
            let client = self.client.clone();
            let sent = self
                .runtime
                .spawn(async move { HttpClient::send_bytes(&client, request).await })
                .await;
            let error: HttpError = match sent {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e)) => e,
                Err(e) => Box::new(e), // the runtime is shutting down
            };
            let mut text = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                let _ = write!(text, ": {cause}");
                source = cause.source();
            }
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(text);
            }
            Err(error)
        }
    }

    /// The SDK's random ids, except that the next span built on this thread may be given its
    /// id: the publish span's id is chosen (and written into the message's `traceparent`)
    /// before the message is produced, and the span is built after its delivery report.
    /// (The SDK's `SpanBuilder` has no span id.)
    #[derive(Debug, Default)]
    struct PresetSpanIds(RandomIdGenerator);

    thread_local! {
        static PRESET_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
    }

    impl PresetSpanIds {
        fn with<T>(id: Option<SpanId>, build: impl FnOnce() -> T) -> T {
            PRESET_SPAN_ID.with(|preset| preset.set(id));
            let built = build();
            PRESET_SPAN_ID.with(|preset| preset.set(None));
            built
        }
    }

    impl IdGenerator for PresetSpanIds {
        fn new_trace_id(&self) -> TraceId {
            self.0.new_trace_id()
        }

        fn new_span_id(&self) -> SpanId {
            PRESET_SPAN_ID
                .with(Cell::take)
                .unwrap_or_else(|| self.0.new_span_id())
        }
    }

    /// The OTLP exporter, counting what becomes of each batch: `spans_exported` when the
    /// collector accepted it, `spans_dropped{reason="export_failed"}` when it failed after the
    /// SDK's retries, with a rate-limited warning.
    struct Counted {
        inner: opentelemetry_otlp::SpanExporter,
        queued: Arc<AtomicUsize>,
        metrics: Metrics,
        last_error: Arc<Mutex<Option<String>>>,
        warn: Mutex<RateLimitedWarn>,
        endpoint: String,
    }

    impl std::fmt::Debug for Counted {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Counted")
                .field("endpoint", &self.endpoint)
                .finish_non_exhaustive()
        }
    }

    impl Counted {
        fn flush_warning(&self) {
            if let Ok(mut warn) = self.warn.lock() {
                warn.flush();
            }
        }
    }

    impl SpanExporter for Counted {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let n = batch.len();
            let _ = self
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                    Some(q.saturating_sub(n))
                });
            if let Ok(mut last) = self.last_error.lock() {
                *last = None;
            }
            let result = self.inner.export(batch).await;
            match &result {
                Ok(()) => self.metrics.spans_exported.inc_by(n as u64),
                Err(e) => {
                    self.metrics
                        .spans_dropped
                        .with_label_values(&["export_failed"])
                        .inc_by(n as u64);
                    let cause = self.last_error.lock().ok().and_then(|mut l| l.take());
                    let error = match cause {
                        Some(cause) => format!("{e} ({cause})"),
                        None => e.to_string(),
                    };
                    if let Ok(mut warn) = self.warn.lock() {
                        warn.failed(&self.endpoint, n as u64, &error);
                    }
                }
            }
            result
        }

        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.flush_warning();
            self.inner.shutdown_with_timeout(timeout)
        }

        fn shutdown(&self) -> OTelSdkResult {
            self.flush_warning();
            self.inner.shutdown()
        }

        fn force_flush(&self) -> OTelSdkResult {
            self.inner.force_flush()
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.inner.set_resource(resource);
        }
    }

    /// Export failures warn at most once a minute, with what was dropped meanwhile.
    #[derive(Default)]
    struct RateLimitedWarn {
        last: Option<Instant>,
        dropped_since: u64,
        last_error: Option<String>,
    }

    impl RateLimitedWarn {
        fn failed(&mut self, endpoint: &str, spans: u64, error: &str) {
            self.dropped_since += spans;
            if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
                self.last_error = Some(error.to_string());
                return;
            }
            tracing::warn!(endpoint, error, dropped_spans = self.dropped_since,
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
    fn endpoints_are_http_or_https_with_a_traces_path() {
        let parsed = |url: &str| OtlpEndpoint::parse(url).unwrap().to_string();
        assert_eq!(
            parsed("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            parsed("http://collector.observability/otlp/"),
            "http://collector.observability/otlp/v1/traces"
        );
        assert_eq!(
            parsed("http://[::1]:4318/v1/traces"),
            "http://[::1]:4318/v1/traces"
        );
        let https = OtlpEndpoint::parse("https://collector:4318/v1/traces/").unwrap();
        assert!(https.is_https());
        assert_eq!(https.as_str(), "https://collector:4318/v1/traces");
        // The standard variables: a base URL always gets v1/traces, the traces URL is kept.
        assert_eq!(
            OtlpEndpoint::base("https://collector/v1/traces")
                .unwrap()
                .as_str(),
            "https://collector/v1/traces/v1/traces"
        );
        assert_eq!(
            OtlpEndpoint::exact("https://collector/custom")
                .unwrap()
                .as_str(),
            "https://collector/custom"
        );
        for (url, why) in [
            ("grpc://collector:4317", "not supported"),
            ("collector:4318", "expected a URL"),
            ("http://:4318", "expected a URL"),
            ("http://collector:http", "expected a URL"),
            ("http://collector:0", "port 0"),
            ("http://::1:4318", "expected a URL"),
            (
                "http://user:pw@collector:4318",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            ("http://collector:4318/?token=x", "query"),
        ] {
            let err = OtlpEndpoint::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        for vars in [
            &[
                ("OTEL_SERVICE_NAME", "x"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1"),
            ][..],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")][..],
        ] {
            let resolved = OtlpConfig::resolve(None, None, None, &env(vars)).unwrap();
            assert!(resolved.is_none(), "{vars:?}");
        }
    }

    #[cfg(not(feature = "otlp"))]
    #[test]
    fn a_build_without_the_feature_refuses_an_endpoint() {
        let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        let err = OtlpConfig::resolve(None, None, None, &env(&vars)).unwrap_err();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && err.contains("`otlp`"),
            "{err}"
        );
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn flags_override_the_standard_variables_and_signal_variables_the_general_ones() {
        let general = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://base:4318/"),
            ("OTEL_SERVICE_NAME", " from-env "),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20hunter2-sentinel, x-tenant=a",
            ),
        ];
        let cfg = OtlpConfig::resolve(None, None, None, &env(&general))
            .unwrap()
            .unwrap();
        assert_eq!(cfg.endpoint.as_str(), "https://base:4318/v1/traces");
        assert_eq!(cfg.endpoint_from, "OTEL_EXPORTER_OTLP_ENDPOINT");
        assert_eq!(cfg.service_name.as_deref(), Some("from-env"));
        assert_eq!(cfg.timeout, Duration::from_millis(2500));
        assert_eq!(cfg.header_names, ["authorization", "x-tenant"]);
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2-sentinel"), "{shown}");

        let signal = [
            &general[..],
            &[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://traces:1234/custom",
                ),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
            ],
        ]
        .concat();
        let cfg = OtlpConfig::resolve(None, None, None, &env(&signal))
            .unwrap()
            .unwrap();
        assert_eq!(cfg.endpoint.as_str(), "http://traces:1234/custom");
        assert_eq!(cfg.endpoint_from, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        assert_eq!(cfg.timeout, Duration::from_millis(700));
        assert_eq!(cfg.header_names, ["b"]);

        let flag = OtlpEndpoint::parse("http://flag:4318").unwrap();
        let cfg = OtlpConfig::resolve(
            Some(flag.clone()),
            Some("flag-name".into()),
            Some(Duration::from_secs(3)),
            &env(&signal),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (cfg.endpoint.as_str(), cfg.endpoint_from),
            ("http://flag:4318/v1/traces", "--otlp-endpoint")
        );
        assert_eq!(cfg.service_name.as_deref(), Some("flag-name"));
        assert_eq!(cfg.timeout, Duration::from_secs(3));
        assert_eq!(cfg.header_names, ["b"], "headers have no flag");

        let cfg = OtlpConfig::resolve(Some(flag), None, None, &env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(cfg.service_name, None);
        assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        assert!(cfg.header_names.is_empty() && cfg.ca_file.is_none());
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn bad_standard_variables_are_refused_by_name_without_echoing_values() {
        let dir = std::env::temp_dir().join(format!("outbox-relay-spans-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not-a-ca.pem");
        std::fs::write(&not_pem, "hunter2-sentinel\n").unwrap();
        let not_pem = not_pem.to_str().unwrap();
        let ok = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        for (vars, want) in [
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")][..],
                "OTEL_EXPORTER_OTLP_ENDPOINT: scheme",
            ),
            (
                &[(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "https://u:hunter2-sentinel@c",
                )],
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: credentials",
            ),
            (
                &[ok, ("OTEL_EXPORTER_OTLP_TIMEOUT", "5s")],
                "OTEL_EXPORTER_OTLP_TIMEOUT: expected a whole number of milliseconds",
            ),
            (
                &[ok, ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0")],
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: expected",
            ),
            (
                &[
                    ok,
                    (
                        "OTEL_EXPORTER_OTLP_HEADERS",
                        "authorization:hunter2-sentinel",
                    ),
                ],
                "OTEL_EXPORTER_OTLP_HEADERS: entry 1 ",
            ),
            (
                &[
                    ok,
                    (
                        "OTEL_EXPORTER_OTLP_HEADERS",
                        "a=1,bad name=hunter2-sentinel",
                    ),
                ],
                "OTEL_EXPORTER_OTLP_HEADERS: entry 2 ",
            ),
            (
                &[
                    ok,
                    ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
                ],
                "OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read /nonexistent/ca.pem",
            ),
            (
                &[ok, ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", not_pem)],
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: ",
            ),
        ] {
            let err = OtlpConfig::resolve(None, None, None, &env(vars)).unwrap_err();
            assert!(err.contains(want), "{vars:?}: {err}");
            assert!(!err.contains("hunter2-sentinel"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
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

    /// Export to `url`, which may answer nothing.
    #[cfg(feature = "otlp")]
    fn otlp(url: &str) -> OtlpConfig {
        let endpoint = OtlpEndpoint::parse(url).unwrap();
        OtlpConfig::resolve(Some(endpoint), None, Some(Duration::from_secs(1)), &|_| {
            None
        })
        .unwrap()
        .unwrap()
    }

    #[cfg(feature = "otlp")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn exporting_rewrites_only_valid_sampled_traceparents() {
        let (tracer, _shutdown) = Tracer::new(
            Some(otlp("http://127.0.0.1:9")),
            "public.outbox".into(),
            Metrics::new(),
        );
        let unsampled = GOOD.replace("-01", "-00");
        let mut batch = [
            message(&[("traceparent", GOOD), ("tracestate", "a=b")]),
            message(&[]),
            message(&[("traceparent", "00-bogus")]),
            message(&[("traceparent", &unsampled)]),
        ];
        let stamps = tracer.stamp(&mut batch);
        let stamp = stamps[0].as_ref().unwrap();
        let publish_span = stamp
            .publish_span
            .expect("exporting: the publish span's id");
        assert_ne!(publish_span, [0; 8]);
        assert_eq!(
            batch[0].headers[0].1,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex(&publish_span)
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
        let again = tracer.stamp(&mut [message(&[("traceparent", GOOD)])]);
        assert_ne!(again[0].as_ref().unwrap().publish_span, Some(publish_span));
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
    fn spans_cover_wait_and_publish() {
        let (tracer, _) = Tracer::new(None, "public.outbox".into(), Metrics::new());
        let batch = [message(&[("traceparent", GOOD)])];
        let handed_off = UNIX_EPOCH + Duration::from_secs(1_700_000_005);
        let receipt = Receipt {
            handed_off,
            reported: handed_off + Duration::from_millis(3),
            position: Some((2, 40)),
        };
        let [wait, publish] = tracer.spans(&batch[0], &Ok(()), &receipt);
        assert_eq!(
            (wait.name.as_str(), wait.kind),
            ("outbox.wait", Kind::Internal)
        );
        assert_eq!(
            (publish.name.as_str(), publish.kind),
            ("orders publish", Kind::Producer)
        );
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
        assert_eq!((wait.error.as_ref(), publish.error.as_ref()), (None, None));

        let failed = Err(Failure::Transient("timed out".into()));
        let [_, publish] = tracer.spans(&batch[0], &failed, &receipt);
        assert_eq!(publish.error.as_deref(), Some("timed out"));
    }

    #[cfg(feature = "otlp")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_full_queue_drops_spans_counted_without_blocking() {
        // A collector that accepts connections and never answers: the first batch's export
        // hangs (until the 1s timeout), the queue fills up behind it.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let metrics = Metrics::new();
        let queue = 3;
        let (tracer, shutdown) = Tracer::with_queue(
            Some(otlp(&url)),
            "public.outbox".into(),
            metrics.clone(),
            queue,
        );
        let mut batch: Vec<Message> = (0..10).map(|_| message(&[("traceparent", GOOD)])).collect();
        let stamps = tracer.stamp(&mut batch);
        let handed_off = SystemTime::now();
        let receipt = Receipt {
            handed_off,
            reported: handed_off,
            position: Some((0, 1)),
        };
        let start = std::time::Instant::now();
        tracer.record(&batch, &stamps, &[const { Ok(()) }; 10], &[receipt; 10]);
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "recording never waits"
        );
        let dropped = |reason: &str| metrics.spans_dropped.with_label_values(&[reason]).get();
        // 20 spans: at most a queue's worth waiting and a batch (≤ queue) being exported.
        assert!(
            dropped("queue_full") >= 20 - 2 * queue as u64,
            "{}",
            dropped("queue_full")
        );
        drop(tracer);
        let start = std::time::Instant::now();
        shutdown.unwrap().await;
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "shutdown is bounded by the timeout"
        );
        // A batch still being exported when shutdown gave up is counted when it fails.
        let start = std::time::Instant::now();
        while dropped("queue_full") + dropped("export_failed") < 20 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "every span is accounted for"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(dropped("queue_full") + dropped("export_failed"), 20);
        assert_eq!(metrics.spans_exported.get(), 0);
    }
}
