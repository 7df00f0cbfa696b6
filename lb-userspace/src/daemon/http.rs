//! The daemon's HTTP endpoints, with kube-proxy's conventions so existing probes fit:
//! `/healthz` and `/livez` (200 while syncs keep succeeding: no change has waited
//! longer than the health timeout), `/readyz` (200 once the first complete sync is
//! done) on the health address, and Prometheus `/metrics` on the metrics address.
//!
//! They run on the tokio runtime, never behind the sync (which has a thread of its
//! own), so they answer during a long sync too.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::{
    metrics::{self, Metrics},
    slots::Slots,
};

/// What the health endpoints report, shared with the controller.
#[derive(Debug)]
pub struct Health {
    /// The first complete sync is done.
    ready: AtomicBool,
    inner: Mutex<HealthInner>,
    /// How long a change may wait for a successful sync before `/healthz` fails.
    pub timeout: Duration,
}

#[derive(Debug, Default)]
struct HealthInner {
    last_updated: Option<SystemTime>,
    /// The oldest change not yet applied by a successful sync.
    queued_since: Option<Instant>,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            ready: AtomicBool::new(false),
            inner: Mutex::default(),
            timeout,
        }
    }

    /// A change arrived that the next sync must apply.
    pub fn queued(&self) {
        let mut inner = self.inner.lock().expect("lock");
        inner.queued_since.get_or_insert_with(Instant::now);
    }

    /// A sync succeeded: everything queued before `started` is applied.
    pub fn synced(&self, started: Instant) {
        let mut inner = self.inner.lock().expect("lock");
        inner.last_updated = Some(SystemTime::now());
        if inner.queued_since.is_some_and(|q| q <= started) {
            inner.queued_since = None;
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Healthy unless a change has waited longer than the timeout.
    pub fn is_healthy(&self) -> bool {
        let inner = self.inner.lock().expect("lock");
        inner
            .queued_since
            .is_none_or(|since| since.elapsed() <= self.timeout)
    }

    fn body(&self) -> String {
        let inner = self.inner.lock().expect("lock");
        let time = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .and_then(|d| jiff::Timestamp::from_second(d.as_secs() as i64).ok())
                .map_or_else(String::new, |t| t.to_string())
        };
        serde_json::json!({
            "lastUpdated": time(inner.last_updated),
            "currentTime": time(Some(SystemTime::now())),
            "nodeEligible": true,
        })
        .to_string()
    }
}

fn response(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("X-Content-Type-Options", "nosniff")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn health_response(health: &Health, path: &str) -> Response<Full<Bytes>> {
    let ok = match path {
        "/healthz" | "/livez" => health.is_healthy(),
        "/readyz" => health.is_ready() && health.is_healthy(),
        _ => return response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    response(status, "application/json", health.body())
}

/// Binds `addr` before anything touches the kernel, so a busy port is a start-up error
/// (not a silent gap, nor a datapath loaded by a daemon that then exits).
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    listen(addr).with_context(|| {
        format!("{what} server: binding {addr} (in use by another kube-proxy or lb? choose another address)")
    })
}

/// Connections the kernel queues for a server before it accepts them. The default
/// (128) overflows in a burst, and a connection whose SYN is dropped waits a second to
/// retry: longer than a probe's default timeout.
const BACKLOG: u32 = 1024;

/// A listener on `addr` with [`BACKLOG`] (in the calling thread's network namespace;
/// needs a Tokio runtime context).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Connections one server holds at once (see [`super::slots`]: past it, the oldest
/// idle one is closed). Probes and scrapes need a handful; a flood of idle connections
/// must not exhaust the daemon's file descriptors.
pub const MAX_CONNECTIONS: usize = 256;
/// A client has this long to send a request's headers (also between the requests of
/// a kept-alive connection), or its connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, whatever it does.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `handler` on `listener` until the process ends. Returns the bound address
/// (port 0 picks one).
pub fn serve<F>(what: &'static str, listener: TcpListener, handler: F) -> Result<SocketAddr>
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let bound = listener.local_addr()?;
    info!(%bound, "{what} server listening");
    let handler = Arc::new(handler);
    let slots = Slots::new(MAX_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: retry without spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let Some(mut slot) = slots.admit() else {
                debug!("{what} server: {MAX_CONNECTIONS} connections answering; closing a new one");
                continue;
            };
            slot.room().await;
            let slot_id = slot.id();
            let handler = handler.clone();
            let task = tokio::spawn(async move {
                let slot = Arc::new(slot);
                let in_service = slot.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let _busy = in_service.busy();
                    let response = handler(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                    Ok(Err(err)) => debug!("{what} connection: {err}"),
                    Err(_) => debug!("{what} connection closed after {CONNECTION_LIFETIME:?}"),
                    Ok(Ok(())) => {}
                }
                drop(slot);
            });
            slots.attach(slot_id, task.abort_handle());
        }
    });
    Ok(bound)
}

pub fn serve_health(listener: TcpListener, health: Arc<Health>) -> Result<SocketAddr> {
    serve("health", listener, move |req| {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", String::new());
        }
        health_response(&health, req.uri().path())
    })
}

pub fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<SocketAddr> {
    serve("metrics", listener, move |req| match req.uri().path() {
        "/metrics" => response(StatusCode::OK, metrics::CONTENT_TYPE, metrics.encode()),
        // kube-proxy serves its health endpoints on the metrics port too.
        path => health_response(&health, path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_queued_changes_and_successful_syncs() {
        let health = Health::new(Duration::from_millis(50));
        assert!(health.is_healthy() && !health.is_ready());
        health.queued();
        assert!(health.is_healthy(), "a fresh change is within the timeout");
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            !health.is_healthy(),
            "a change waited longer than the timeout"
        );
        health.synced(Instant::now());
        assert!(health.is_healthy());
        // A sync that started before a change does not cover it.
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        health.queued();
        health.synced(started);
        std::thread::sleep(Duration::from_millis(80));
        assert!(!health.is_healthy());
        health.set_ready();
        assert_eq!(
            health_response(&health, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.synced(Instant::now());
        assert_eq!(health_response(&health, "/readyz").status(), StatusCode::OK);
        assert_eq!(
            health_response(&health, "/nope").status(),
            StatusCode::NOT_FOUND
        );
    }
}
