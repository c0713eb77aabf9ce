//! Trace spans end to end: the real relay binary, PostgreSQL and Kafka, and an in-test OTLP/HTTP
//! receiver standing in for the OpenTelemetry Collector (it decodes what the relay exports,
//! over http or https). Without the `otlp` feature only the no-export test runs.
#![cfg_attr(not(feature = "otlp"), allow(dead_code, unused_imports))]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_topics_with_config, free_port, read_back, unique, Consumed, Relay, TestDb};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message as _;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const WRITER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE}-{WRITER_SPAN}-01")
}

/// One OTLP/HTTP request as the collector received it.
struct Request {
    head: String,
    body: ExportTraceServiceRequest,
}

impl Request {
    /// A request header's value (names are case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// A resource attribute of the first resource, in OTLP/JSON form.
    fn resource_attr(&self, key: &str) -> Option<Value> {
        let resource = self.body.resource_spans[0].resource.as_ref()?;
        attr_json(&resource.attributes)
            .into_iter()
            .find_map(|a| (a["key"] == key).then(|| a["value"].clone()))
    }
}

/// A minimal OTLP/HTTP receiver: records each POST (protobuf) and answers 200, or 503 while
/// `throttle` is above zero (counting it down).
struct Collector {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    throttle: Arc<AtomicUsize>,
}

impl Collector {
    async fn start() -> Collector {
        Collector::serve(None).await
    }

    /// Over https, with the test CA's server certificate (SAN localhost and 127.0.0.1).
    async fn start_tls(certs: &Path) -> Collector {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(certs.join("server.pem"))
            .unwrap_or_else(|e| {
                panic!(
                    "no test certificates in {}: run scripts/certs.sh (or set OUTBOX_TEST_CERTS_DIR): {e}",
                    certs.display()
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Collector::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let throttle = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let busy = throttle.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, busy, tls) = (seen.clone(), busy.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        // A client that refuses our certificate ends here.
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => receive(stream, &seen, &busy).await,
                            Err(_) => None,
                        },
                        None => receive(stream, &seen, &busy).await,
                    }
                });
            }
        });
        Collector {
            url,
            requests,
            throttle,
        }
    }

    /// Every span received so far, in OTLP/JSON form.
    fn spans(&self) -> Vec<Value> {
        let requests = self.requests.lock().unwrap();
        let mut out = Vec::new();
        for r in requests.iter() {
            for rs in &r.body.resource_spans {
                for ss in &rs.scope_spans {
                    assert_eq!(
                        ss.scope.as_ref().map(|s| s.name.as_str()),
                        Some("outbox-relay")
                    );
                    out.extend(ss.spans.iter().map(span_json));
                }
            }
        }
        out
    }

    async fn wait_spans(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let spans = self.spans();
            if spans.len() >= n {
                return spans;
            }
            assert!(
                start.elapsed() < timeout,
                "the collector got {} spans, expected {n}",
                spans.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Read one request (head, then a Content-Length body); record it and answer 200, or answer
/// 503 (Retry-After: 1) while `throttle` lasts; close.
async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    seen: &Mutex<Vec<Request>>,
    throttle: &AtomicUsize,
) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head, body) = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None; // closed before a whole request
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("Content-Length");
        if buf.len() >= end + 4 + length {
            break (head, buf[end + 4..end + 4 + length].to_vec());
        }
    };
    let body = ExportTraceServiceRequest::decode(&body[..]).expect("the body is OTLP protobuf");
    let throttled = throttle
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok();
    if throttled {
        stream
            .write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\
                  Connection: close\r\n\r\n",
            )
            .await
            .ok()?;
        return stream.shutdown().await.ok();
    }
    seen.lock().unwrap().push(Request { head, body });
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\
              Connection: close\r\n\r\n",
        )
        .await
        .ok()?;
    stream.shutdown().await.ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Attributes in the OTLP/JSON encoding (64-bit integers as strings).
fn attr_json(attributes: &[KeyValue]) -> Vec<Value> {
    attributes
        .iter()
        .map(|a| {
            let value = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => json!({"stringValue": s}),
                Some(any_value::Value::IntValue(i)) => json!({"intValue": i.to_string()}),
                other => json!({"other": format!("{other:?}")}),
            };
            json!({"key": a.key, "value": value})
        })
        .collect()
}

/// A span in the OTLP/JSON encoding: hex ids, 64-bit integers as strings, enums as integers.
fn span_json(s: &opentelemetry_proto::tonic::trace::v1::Span) -> Value {
    let mut span = json!({
        "traceId": hex(&s.trace_id),
        "spanId": hex(&s.span_id),
        "parentSpanId": hex(&s.parent_span_id),
        "flags": s.flags,
        "name": s.name,
        "kind": s.kind,
        "startTimeUnixNano": s.start_time_unix_nano.to_string(),
        "endTimeUnixNano": s.end_time_unix_nano.to_string(),
        "attributes": attr_json(&s.attributes),
    });
    if !s.trace_state.is_empty() {
        span["traceState"] = json!(s.trace_state);
    }
    if let Some(status) = s.status.as_ref().filter(|st| st.code != 0) {
        span["status"] = json!({"code": status.code, "message": status.message});
    }
    span
}

/// A topic whose record timestamps are the broker's append time.
async fn topic() -> String {
    let t = unique("spans");
    create_topics_with_config(&[&t], 2, &[("message.timestamp.type", "LogAppendTime")]).await;
    t
}

/// Insert a row; returns its id and created_at in Unix microseconds.
async fn insert(db: &TestDb, topic: &str, key: &str, headers: Option<Value>) -> (i64, i64) {
    sqlx::query_as(
        "INSERT INTO outbox (topic, key, payload, headers) VALUES ($1, $2, 'p', $3)
         RETURNING id, (extract(epoch FROM created_at) * 1000000)::bigint",
    )
    .bind(topic)
    .bind(key)
    .bind(headers)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn consume_all(topic: &str, n: usize) -> Vec<Consumed> {
    read_back(
        &[topic.to_string()],
        2,
        n,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await
}

fn by_id(records: &[Consumed], id: i64) -> &Consumed {
    records.iter().find(|r| r.event_id() == id).unwrap()
}

fn attr(span: &Value, key: &str) -> Option<Value> {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| a["value"].clone())
}

fn nanos(span: &Value, field: &str) -> u64 {
    span[field]
        .as_str()
        .expect("64-bit ints are strings")
        .parse()
        .unwrap()
}

#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_row_gets_wait_and_publish_spans_in_the_writers_trace() {
    let collector = Collector::start().await;
    // The first export is answered 503: the exporter retries it (after Retry-After).
    collector.throttle.store(1, Ordering::Relaxed);
    let db = TestDb::new().await;
    let topic = topic().await;
    let (traced, created_us) = insert(
        &db,
        &topic,
        "order-1",
        Some(json!({"traceparent": traceparent(), "tracestate": "vendor=x"})),
    )
    .await;
    let (plain, _) = insert(&db, &topic, "order-2", None).await;
    let invalid_value = format!("00-{}-{WRITER_SPAN}-01", TRACE.to_uppercase());
    let (invalid, _) = insert(
        &db,
        &topic,
        "order-3",
        Some(json!({"traceparent": invalid_value})),
    )
    .await;

    // The flags override the standard variables.
    let relay = Relay::spawn(
        &db.name,
        &db.url,
        &common::kafka_brokers(),
        &[
            "--otlp-endpoint",
            &collector.url,
            "--otlp-service-name",
            "relay-under-test",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
            ("OTEL_SERVICE_NAME", "not-this-one"),
        ],
    );
    db.wait_count("published_at IS NOT NULL", 3, Duration::from_secs(30))
        .await;
    let spans = collector.wait_spans(2, Duration::from_secs(10)).await;
    // The relay exports at most every second: wait for anything else it might send.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let exported = relay.metric("outbox_relay_spans_exported_total");
    let failed = relay.metric(r#"outbox_relay_spans_dropped_total{reason="export_failed"}"#);
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    let spans_after = collector.spans();
    assert_eq!(
        spans_after.len(),
        2,
        "only the valid traceparent gets spans: {spans_after:#?}"
    );
    assert_eq!(spans, spans_after);
    assert_eq!((exported, failed), (Some(2.0), Some(0.0)));
    assert_eq!(
        collector.throttle.load(Ordering::Relaxed),
        0,
        "the 503 was answered, and the spans came on the retry"
    );

    {
        let requests = collector.requests.lock().unwrap();
        let r = &requests[0];
        assert!(r.head.starts_with("POST /v1/traces HTTP/1.1"), "{}", r.head);
        assert_eq!(
            r.header("content-type"),
            Some("application/x-protobuf"),
            "{}",
            r.head
        );
        assert_eq!(
            r.resource_attr("service.name"),
            Some(json!({"stringValue": "relay-under-test"}))
        );
        assert_eq!(
            r.resource_attr("service.version"),
            Some(json!({"stringValue": env!("CARGO_PKG_VERSION")}))
        );
    }
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:#?}"))
    };
    let wait = find("outbox.wait");
    let publish = find(&format!("{topic} publish"));
    for s in [wait, publish] {
        assert_eq!(s["traceId"], TRACE, "the writer's trace");
        assert_eq!(
            s["parentSpanId"], WRITER_SPAN,
            "a child of the writer's span"
        );
        assert_eq!(s["traceState"], "vendor=x");
        assert_eq!(s["flags"], 0x301, "sampled, and the parent is remote");
        assert_eq!(
            attr(s, "messaging.message.id"),
            Some(json!({"stringValue": traced.to_string()}))
        );
        assert_eq!(
            attr(s, "outbox.table"),
            Some(json!({"stringValue": "public.outbox"}))
        );
    }
    assert_eq!(wait["kind"], 1, "INTERNAL");
    assert_eq!(publish["kind"], 4, "PRODUCER");
    assert_ne!(wait["spanId"], publish["spanId"]);
    assert!(publish.get("status").is_none(), "delivered: status unset");

    let records = consume_all(&topic, 3).await;
    assert_eq!(records.len(), 3);
    let record = by_id(&records, traced);
    let appended_ns = record.timestamp.expect("LogAppendTime") as u64 * 1_000_000;
    assert_eq!(
        nanos(wait, "startTimeUnixNano"),
        created_us as u64 * 1000,
        "wait starts at created_at"
    );
    assert_eq!(
        nanos(wait, "endTimeUnixNano"),
        nanos(publish, "startTimeUnixNano"),
        "hand-off"
    );
    assert!(
        nanos(publish, "startTimeUnixNano") < appended_ns + 1_000_000,
        "handed off before the broker appended it"
    );
    assert!(
        nanos(publish, "endTimeUnixNano") >= appended_ns,
        "publish ends after the broker's ack"
    );
    assert_eq!(
        attr(publish, "messaging.system"),
        Some(json!({"stringValue": "kafka"}))
    );
    assert_eq!(
        attr(publish, "messaging.destination.name"),
        Some(json!({"stringValue": topic}))
    );
    assert_eq!(
        attr(publish, "messaging.kafka.message.key"),
        Some(json!({"stringValue": "order-1"}))
    );
    assert_eq!(
        attr(publish, "messaging.kafka.destination.partition"),
        Some(json!({"intValue": record.partition.to_string()}))
    );
    assert_eq!(
        attr(publish, "messaging.kafka.message.offset"),
        Some(json!({"intValue": record.offset.to_string()}))
    );

    let publish_span = publish["spanId"].as_str().unwrap();
    assert_eq!(
        record.header("traceparent"),
        Some(format!("00-{TRACE}-{publish_span}-01")),
        "consumers continue from the relay's publish span"
    );
    assert_eq!(record.header("tracestate").as_deref(), Some("vendor=x"));
    assert_eq!(by_id(&records, plain).header("traceparent"), None);
    assert_eq!(
        by_id(&records, invalid).header("traceparent"),
        Some(invalid_value),
        "an invalid traceparent is carried unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_headers_are_unchanged_and_spans_are_debug_events() {
    let db = TestDb::new().await;
    let topic = topic().await;
    let (traced, _) = insert(
        &db,
        &topic,
        "a",
        Some(json!({"traceparent": traceparent()})),
    )
    .await;
    let (invalid, _) = insert(
        &db,
        &topic,
        "b",
        Some(json!({"traceparent": "00-abc-def-01"})),
    )
    .await;
    let relay = Relay::spawn(
        "spans-off",
        &db.url,
        &common::kafka_brokers(),
        &[],
        &[("RUST_LOG", "info,outbox_relay::spans=debug")],
    );
    let records = consume_all(&topic, 2).await;
    assert_eq!(records.len(), 2);
    assert_eq!(
        by_id(&records, traced).header("traceparent"),
        Some(traceparent())
    );
    assert_eq!(
        by_id(&records, invalid).header("traceparent").as_deref(),
        Some("00-abc-def-01")
    );
    relay.wait_log("invalid traceparent header", Duration::from_secs(10));
    let logs = relay.logs();
    let span_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("outbox_relay::spans") && l.contains(&format!("trace_id={TRACE}")))
        .collect();
    assert_eq!(span_lines.len(), 2, "wait and publish: {logs}");
    assert!(
        span_lines
            .iter()
            .all(|l| l.contains(&format!("parent_span_id={WRITER_SPAN}"))),
        "{logs}"
    );
    assert!(
        span_lines.iter().any(|l| l.contains("name=outbox.wait")),
        "{logs}"
    );
    assert!(
        !logs.contains("exporting trace spans"),
        "export is off by default: {logs}"
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
}

#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_spans_never_messages() {
    let db = TestDb::new().await;
    let topic = topic().await;
    // A port nobody listens on.
    let down = format!("http://127.0.0.1:{}", free_port());
    let relay = Relay::start(&db, &["--otlp-endpoint", &down, "--otlp-timeout", "1s"]);
    for i in 0..20 {
        insert(
            &db,
            &topic,
            &format!("k{}", i % 3),
            Some(json!({"traceparent": traceparent()})),
        )
        .await;
    }
    db.wait_count("published_at IS NOT NULL", 20, Duration::from_secs(30))
        .await;
    let records = consume_all(&topic, 20).await;
    assert_eq!(records.len(), 20, "every message is published");
    for r in &records {
        let header = r.header("traceparent").unwrap();
        assert!(
            header.starts_with(&format!("00-{TRACE}-")) && !header.contains(WRITER_SPAN),
            "{header}"
        );
    }
    let start = Instant::now();
    let failed = r#"outbox_relay_spans_dropped_total{reason="export_failed"}"#;
    while relay.metric(failed) != Some(40.0) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{failed} = {:?}, expected 40",
            relay.metric(failed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relay.metric("outbox_relay_spans_exported_total"), Some(0.0));
    assert_eq!(
        relay.metric(r#"outbox_relay_spans_dropped_total{reason="queue_full"}"#),
        Some(0.0)
    );
    relay.wait_http("/readyz", 200, Duration::from_secs(10)); // a missing collector is not a readiness problem
    let warnings = relay.logs().matches("trace span export failed").count();
    assert_eq!(
        warnings,
        1,
        "rate-limited to one warning a minute: {}",
        relay.logs()
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
}

/// Export configured by the standard variables alone: https with the test CA, auth headers.
#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_variables_set_up_https_with_a_ca_and_auth_headers() {
    let certs = common::certs_dir();
    let collector = Collector::start_tls(&certs).await;
    let db = TestDb::new().await;
    let topic = topic().await;
    let (traced, _) = insert(
        &db,
        &topic,
        "k",
        Some(json!({"traceparent": traceparent()})),
    )
    .await;
    let ca = certs.join("ca.pem");
    let relay = Relay::spawn(
        &db.name,
        &db.url,
        &common::kafka_brokers(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.to_str().unwrap()),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20s3cret-sentinel,x-tenant=acme",
            ),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "3000"),
        ],
    );
    let spans = collector.wait_spans(2, Duration::from_secs(20)).await;
    assert!(spans.iter().all(|s| s["traceId"] == TRACE), "{spans:#?}");
    let records = consume_all(&topic, 1).await;
    let publish = spans
        .iter()
        .find(|s| s["kind"] == 4)
        .expect("a publish span");
    assert_eq!(
        by_id(&records, traced).header("traceparent"),
        Some(format!(
            "00-{TRACE}-{}-01",
            publish["spanId"].as_str().unwrap()
        ))
    );
    let log = relay.log.clone();
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    {
        let requests = collector.requests.lock().unwrap();
        let r = &requests[0];
        assert!(r.head.starts_with("POST /v1/traces HTTP/1.1"), "{}", r.head);
        assert_eq!(r.header("authorization"), Some("Bearer s3cret-sentinel"));
        assert_eq!(r.header("x-tenant"), Some("acme"));
        assert_eq!(
            r.resource_attr("service.name"),
            Some(json!({"stringValue": "from-env"}))
        );
    }
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let logs = read(&log) + &read(&log.with_extension("stdout"));
    assert!(
        logs.contains("exporting trace spans") && logs.contains("authorization,x-tenant"),
        "the header names are logged: {logs}"
    );
    assert!(
        !logs.contains("s3cret-sentinel"),
        "header values never are: {logs}"
    );
}

#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_whose_certificate_is_not_trusted_costs_spans_never_messages() {
    let certs = common::certs_dir();
    let collector = Collector::start_tls(&certs).await;
    let db = TestDb::new().await;
    let topic = topic().await;
    let other_ca = certs.join("other-ca.pem");
    let relay = Relay::spawn(
        &db.name,
        &db.url,
        &common::kafka_brokers(),
        &["--otlp-timeout", "1s"],
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                &format!("{}/v1/traces", collector.url),
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                other_ca.to_str().unwrap(),
            ),
        ],
    );
    insert(
        &db,
        &topic,
        "k",
        Some(json!({"traceparent": traceparent()})),
    )
    .await;
    let records = consume_all(&topic, 1).await;
    assert_eq!(records.len(), 1, "the message is published");
    let failed = r#"outbox_relay_spans_dropped_total{reason="export_failed"}"#;
    let start = Instant::now();
    while relay.metric(failed) != Some(2.0) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{failed} = {:?}, expected 2",
            relay.metric(failed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.wait_log("trace span export failed", Duration::from_secs(5));
    let logs = relay.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("trace span export failed") && l.contains("certificate")),
        "the warning says why: {logs}"
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)), Some(0));
    assert!(collector.spans().is_empty());
}
