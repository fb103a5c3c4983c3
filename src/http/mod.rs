//! The HTTP/JSON edge, next to gRPC and on the same [`TidingsService`]: the same validation,
//! limits, deadlines, queue classes, bearer token and TLS, with statuses mapped to HTTP.
//!
//! - `routes` — the route table: the router and the OpenAPI document are both made from it.
//! - `handlers` — JSON in, the gRPC method, JSON out; NDJSON streams.
//! - [`error`] — gRPC status -> HTTP status and JSON error body.
//! - [`openapi`] — the OpenAPI 3.1 document, generated from the route table and the proto.
//! - `tls` — rustls from the server's PEM settings.
//! - `page.html` — the page at `/` (embedded; no external assets).

pub mod error;
mod handlers;
pub mod openapi;
mod routes;
mod tls;

use crate::api::auth::BearerAuth;
use crate::api::service::TidingsService;
use crate::api::TlsConfig;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use routes::{Route, ROUTES};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    svc: TidingsService,
    auth: BearerAuth,
    max_body: usize,
    /// Cancelled once the server drains: `/readyz` answers 503.
    not_ready: CancellationToken,
    openapi: Arc<String>,
}

impl HttpState {
    /// State over `svc`: `auth` checks bearer tokens, bodies are at most `max_body` bytes
    /// (the gRPC message limit), `not_ready` is cancelled when the server starts draining.
    pub fn new(
        svc: TidingsService,
        auth: BearerAuth,
        max_body: usize,
        not_ready: CancellationToken,
    ) -> Self {
        let doc = openapi::document(crate::proto::FILE_DESCRIPTOR_SET);
        Self {
            svc,
            auth,
            max_body,
            not_ready,
            openapi: Arc::new(serde_json::to_string_pretty(&doc).unwrap_or_default()),
        }
    }
}

/// The router of every route in [`ROUTES`], with JSON 404/405 answers and request metrics.
pub fn router(state: HttpState) -> Router {
    routes::router(state)
}

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/1 client has to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-connection limits of the HTTP listener, from the server's gRPC settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most h2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// h2 keepalive PING interval.
    pub keepalive: Duration,
}

/// The rustls configuration of the HTTP listener, built before serving so that a bad
/// certificate fails start-up rather than the HTTP port alone.
pub fn tls_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    tls::server_config(tls)
}

/// Serves `router` on `listener` (HTTP/1.1 and h2, TLS when `tls` is set) until `stop` is
/// cancelled; then the listener closes and open connections get `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnLimits,
    stop: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let builder = Arc::new(conn_builder(limits));
    let graceful = GracefulShutdown::new();
    tracing::info!(addr = %listener.local_addr()?, tls = acceptor.is_some(), "serving HTTP/JSON, /openapi.json and the page");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            conn = listener.accept() => {
                let (tcp, peer) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let svc = TowerToHyperService::new(router.clone());
                let watcher = graceful.watcher();
                tokio::spawn(serve_connection(
                    tcp,
                    peer,
                    svc,
                    acceptor.clone(),
                    builder.clone(),
                    watcher,
                ));
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "grace period over: closing remaining HTTP connections"
        );
    }
    Ok(())
}

/// The connection settings: HTTP/1.1 and h2, each with a timer, so that hyper enforces its
/// header-read timeout (slow clients holding connections) and h2 keepalive PINGs find dead
/// peers as gRPC's do.
fn conn_builder(limits: ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive)
        .keep_alive_timeout(crate::api::KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(limits.max_concurrent_streams);
    builder
}

/// Serves one accepted connection from `peer` until it closes or the graceful shutdown
/// `watcher` belongs to ends it; with TLS, after a handshake of at most
/// [`TLS_HANDSHAKE_TIMEOUT`].
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    svc: TowerToHyperService<Router>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
) {
    let res = match acceptor {
        Some(a) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
            Ok(Ok(stream)) => {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                watcher.watch(conn.into_owned()).await
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        None => {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
            watcher.watch(conn.into_owned()).await
        }
    };
    if let Err(e) = res {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}
