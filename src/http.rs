//! The HTTP server for `/metrics`, `/healthz` and `/readyz`.
//!
//! hyper speaks HTTP/1.1 (keep-alive, HTTP/1.0 and `Connection: close` answered and closed,
//! a header-read timeout that also ends idle keep-alive connections); an axum router answers
//! GET and HEAD on the three paths, 405 with `Allow` for other methods and 404 elsewhere. The
//! accept loop here bounds concurrent connections and their age, and shuts down gracefully
//! within a bound.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{Encoder, TextEncoder};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::telemetry::{Health, Metrics};

/// Bounds on what clients can hold.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Connections served at once; further clients wait in the listen backlog.
    max_connections: usize,
    /// A request head must arrive within this; it also closes a keep-alive connection that
    /// stays idle this long (hyper starts the timer as soon as it waits for a head).
    header_read_timeout: Duration,
    /// Then the connection is closed gracefully (after its in-flight response): a client that
    /// never reads its responses cannot keep a slot.
    max_connection_age: Duration,
    /// How long in-flight responses may take once a connection is asked to close.
    grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(60),
            grace: Duration::from_secs(5),
        }
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves; then
/// stop accepting, let in-flight requests finish (at most a few seconds) and return.
///
/// Accept errors (say, out of file descriptors) are logged and retried, so this returns `Ok`
/// once shut down.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(
        listener,
        router(metrics, health),
        Limits::default(),
        shutdown,
    )
    .await
}

fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    async fn endpoint(
        State((metrics, health)): State<(Metrics, Arc<Health>)>,
        uri: Uri,
    ) -> Response {
        let (status, content_type, body) = route(uri.path(), &metrics, &health);
        (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
    }
    // `get` answers HEAD too (same head, no body); other methods get 405 with `Allow`.
    Router::new()
        .route("/metrics", get(endpoint))
        .route("/healthz", get(endpoint))
        .route("/readyz", get(endpoint))
        .fallback(endpoint)
        .with_state((metrics, health))
}

/// What each path answers: status, content type, body.
fn route(path: &str, metrics: &Metrics, health: &Health) -> (StatusCode, &'static str, Vec<u8>) {
    match path {
        "/metrics" => {
            let mut body = Vec::new();
            match TextEncoder::new().encode(&metrics.registry.gather(), &mut body) {
                Ok(()) => (StatusCode::OK, "text/plain; version=0.0.4", body),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string().into_bytes(),
                ),
            }
        }
        "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        "/readyz" => match health.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", b"ready\n".to_vec()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n").into_bytes(),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            b"try /metrics, /healthz or /readyz\n".to_vec(),
        ),
    }
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Requests are a line and a few headers: a small buffer keeps 64 connections at
        // about 1 MB instead of hyper's default ~400 KB each.
        .max_buf_size(16 * 1024)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, permit) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished connections so the set stays as small as the number open.
            Some(_) = connections.join_next() => continue,
            accepted = accept(&listener, &slots) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let closing = closing.clone();
        connections.spawn(async move {
            let _slot = permit;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "metrics connection ended with an error");
                    }
                    return;
                }
                () = closing.cancelled() => {}
                () = tokio::time::sleep(limits.max_connection_age) => {}
            }
            // Finish the request in flight, if any, then close; idle connections close now.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.grace, conn).await;
        });
    }
    // New connections are refused from here on.
    drop(listener);
    closing.cancel();
    let drained = tokio::time::timeout(limits.grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            open = connections.len(),
            "metrics connections still open after the grace period; dropping them"
        );
    }
    // Dropping the set aborts whatever is left.
    Ok(())
}

/// Wait for a free slot, then for a connection: at the cap, clients wait in the backlog.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, OwnedSemaphorePermit)> {
    let permit = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let (stream, _) = listener.accept().await?;
    Ok((stream, permit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Long enough for anything that should happen on a loaded machine; a test waits this long
    /// only when it is about to fail.
    const PATIENCE: Duration = Duration::from_secs(20);

    struct Server {
        addr: std::net::SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        health: Arc<Health>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        metrics.published.inc();
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(metrics, health.clone());
        let task = tokio::spawn(serve_with(listener, app, limits, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
            health,
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Send one request and read one response off a kept-alive connection.
    async fn exchange(s: &mut TcpStream, request: &str) -> Reply {
        s.write_all(request.as_bytes()).await.unwrap();
        read_reply(s, request.starts_with("HEAD ")).await
    }

    /// Read one response (its body by Content-Length) and nothing more.
    async fn read_reply(s: &mut TcpStream, head_request: bool) -> Reply {
        tokio::time::timeout(PATIENCE, async {
            let mut buf = Vec::new();
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-head: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .unwrap()
                .split(' ')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(": "))
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            let mut reply = Reply {
                status,
                headers,
                body: String::new(),
            };
            let len: usize = match reply.header("content-length") {
                Some(l) if !head_request => l.parse().unwrap(),
                _ => 0,
            };
            let mut body = buf[head_end..].to_vec();
            while body.len() < len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-body");
                body.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(
                body.len(),
                len,
                "bytes beyond the response (a body on HEAD?)"
            );
            reply.body = String::from_utf8(body).unwrap();
            reply
        })
        .await
        .expect("no response")
    }

    /// Read until the server closes the connection; what it sent.
    async fn until_closed(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
            .await
            .expect("the server kept the connection open")
            .unwrap_or_default();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn routes() {
        let m = Metrics::new();
        m.published.inc();
        let h = Health::new(Duration::from_secs(60));
        let (status, _, body) = route("/metrics", &m, &h);
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8(body)
            .unwrap()
            .contains("outbox_relay_published_total 1"));
        assert_eq!(route("/healthz", &m, &h).0, StatusCode::OK);
        assert_eq!(route("/readyz", &m, &h).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(route("/nope", &m, &h).0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn get_and_head_share_one_keep_alive_connection() {
        let server = start(Limits::default()).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();

        let r = exchange(&mut s, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
        assert!(r.body.contains("outbox_relay_published_total 1"), "{r:?}");
        let metrics_len = r.body.len().to_string();

        // HEAD: the same head, no body (else the next response would not parse).
        let r = exchange(&mut s, "HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
        assert_eq!(r.header("content-length"), Some(metrics_len.as_str()));

        let r = exchange(&mut s, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        assert_eq!(r.header("content-type"), Some("text/plain"));

        let r = exchange(&mut s, "GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 503);
        assert!(r.body.starts_with("not ready: "), "{r:?}");
        server.health.database_ok.store(true, Ordering::Relaxed);
        server.health.kafka_ok.store(true, Ordering::Relaxed);
        let r = exchange(&mut s, "HEAD /readyz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
        let r = exchange(&mut s, "GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    }

    #[tokio::test]
    async fn other_methods_get_405_with_allow_and_unknown_paths_404() {
        let server = start(Limits::default()).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        for path in ["/metrics", "/healthz", "/readyz"] {
            for method in ["POST", "PUT", "DELETE"] {
                let r = exchange(
                    &mut s,
                    &format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"),
                )
                .await;
                assert_eq!(r.status, 405, "{method} {path}: {r:?}");
                let allow = r.header("allow").unwrap_or_default();
                let mut allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
                allowed.sort();
                assert_eq!(allowed, ["GET", "HEAD"], "{method} {path}");
            }
        }
        let r = exchange(&mut s, "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 404);
        assert_eq!(r.body, "try /metrics, /healthz or /readyz\n");
        assert_eq!(r.header("content-type"), Some("text/plain"));
        // A query string does not change the resource.
        let r = exchange(&mut s, "GET /healthz?x=1 HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
    }

    #[tokio::test]
    async fn http_1_0_and_connection_close_end_the_connection() {
        // tests/common's helpers send HTTP/1.0 without Host and read until EOF.
        let server = start(Limits::default()).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
        let out = until_closed(&mut s).await;
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nok\n"), "{out}");

        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let out = until_closed(&mut s).await;
        assert!(
            out.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{out}"
        );
        assert!(out.contains("\r\n\r\nnot ready: "), "{out}");
    }

    #[tokio::test]
    async fn a_slow_header_is_cut_off_and_frees_its_slot() {
        let server = start(Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        // Slowloris: holds the only slot with a head that never ends.
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        let mut next = TcpStream::connect(server.addr).await.unwrap();
        let r = exchange(&mut next, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
        assert!(
            !until_closed(&mut slow).await.contains("200 OK"),
            "the incomplete request was answered"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_slot() {
        let server = start(Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        })
        .await;
        let mut first = TcpStream::connect(server.addr).await.unwrap();
        let r = exchange(&mut first, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
        // `first` is kept alive and holds the only slot: `second` is not served...
        let mut second = TcpStream::connect(server.addr).await.unwrap();
        second
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte)).await;
        assert!(early.is_err(), "served beyond the cap: {early:?}");
        // ...until `first` goes.
        drop(first);
        let r = read_reply(&mut second, false).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    }

    #[tokio::test]
    async fn a_connection_is_closed_at_its_maximum_age() {
        let server = start(Limits {
            header_read_timeout: Duration::from_secs(600),
            max_connection_age: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let r = exchange(&mut s, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
        assert_eq!(until_closed(&mut s).await, "");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_refuses_new_ones_and_returns() {
        let mut server = start(Limits {
            // Returning promptly must be neither a timeout nor the grace period running out.
            header_read_timeout: Duration::from_secs(600),
            grace: Duration::from_secs(600),
            ..Limits::default()
        })
        .await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        let r = exchange(&mut idle, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(r.status, 200);
        let _ = server.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, &mut server.task)
            .await
            .expect("serve did not return")
            .unwrap()
            .unwrap();
        assert_eq!(until_closed(&mut idle).await, "");
        assert!(TcpStream::connect(server.addr).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_is_bounded_by_the_grace_period() {
        let mut server = start(Limits {
            header_read_timeout: Duration::from_secs(600),
            grace: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        // Mid-request for as long as it likes.
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = server.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, &mut server.task)
            .await
            .expect("serve did not return")
            .unwrap()
            .unwrap();
        until_closed(&mut slow).await;
    }
}
