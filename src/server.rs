//! The process: both listeners (gRPC with health and reflection, HTTP/JSON with its page)
//! over one [`TidingsService`], TLS, limits, and the shutdown sequence. It sits above both
//! edges, [`crate::api`] and [`crate::http`], which import neither it nor each other's
//! composition (issue #29: `api` built the HTTP listener while `http` imported `api`).

use crate::api::service::{self, ServiceConfig, TidingsService};
use crate::api::size_status::SizeStatus;
use crate::api::{auth, convert::Limits, TlsConfig, KEEPALIVE_TIMEOUT};
use crate::engine::Engine;
use crate::proto::tidings_server::TidingsServer;
use crate::trace::Traced;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;

/// Server-level settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Request limits.
    pub limits: Limits,
    /// Largest message decoded or encoded, in bytes.
    pub max_message_bytes: usize,
    /// Bytes of stream requests (gRPC and NDJSON) the process holds read and not yet
    /// answered; as many again may wait parked, one per stream, before requests are refused
    /// with RESOURCE_EXHAUSTED ([`crate::api::pending::PendingBytes`]).
    pub max_pending_bytes: usize,
    /// Most requests served at once on one connection.
    pub max_concurrent_per_connection: usize,
    /// Most HTTP/2 streams (calls) a client may open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Longest a unary call may run, whatever deadline the client set (streams, which may
    /// carry a whole batch job, are bounded only by the client's own deadline).
    pub request_timeout: Duration,
    /// A stream that neither sends a request nor reads an answer for this long is ended
    /// with UNAVAILABLE.
    pub stream_idle: Duration,
    /// HTTP/2 PING interval on idle connections; a peer that does not answer within
    /// [`KEEPALIVE_TIMEOUT`] is disconnected and its calls cancelled.
    pub keepalive: Duration,
    /// How long in-flight calls may finish after a shutdown signal.
    pub grace: Duration,
    /// How long health reports NOT_SERVING before the listener closes, so that load
    /// balancers stop routing here before connections are refused.
    pub drain_delay: Duration,
    /// Serve TLS with this certificate and key (and require client certificates signed by
    /// `client_ca` when set: mutual TLS).
    pub tls: Option<TlsConfig>,
    /// Require `authorization: Bearer <token>` on Tidings calls.
    pub auth_token: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_message_bytes: 16 * 1024 * 1024,
            // With as many again parked: 128 MiB of decoded requests at most, a sixth of the
            // Deployment's 768Mi.
            max_pending_bytes: 64 * 1024 * 1024,
            max_concurrent_per_connection: 256,
            max_concurrent_streams: 256,
            request_timeout: Duration::from_secs(300),
            stream_idle: Duration::from_secs(300),
            keepalive: Duration::from_secs(30),
            grace: Duration::from_secs(30),
            drain_delay: Duration::from_millis(500),
            tls: None,
            auth_token: None,
        }
    }
}

/// Binds `addr`, failing clearly when the port is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Serves Tidings, health and reflection on `listener` until `shutdown` resolves; then health
/// turns NOT_SERVING, new calls are refused and in-flight ones get `cfg.grace` to finish.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_http(listener, None, engine, cfg, shutdown).await
}

/// [`serve`], and the HTTP/JSON API with its page on `http` when given: the same service,
/// token and TLS. On shutdown `/readyz` turns 503 when health turns NOT_SERVING, and both
/// listeners close together.
pub async fn serve_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    engine: Engine,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TidingsServer<TidingsService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let signals = Signals::default();
    let tidings = TidingsService::new(engine, service_config(&cfg), signals.stop.clone());
    let auth = auth::BearerAuth::new(cfg.auth_token.clone());
    let http_task = match http {
        Some(l) => Some(spawn_http(l, &tidings, &auth, &cfg, &signals)?),
        None => None,
    };
    let service = grpc_service(tidings, auth, cfg.max_message_bytes);
    tokio::spawn(shut_down(
        shutdown,
        health,
        signals.clone(),
        cfg.drain_delay,
    ));
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving tidings.v1.Tidings, grpc.health.v1, reflection");
    // Nagle's algorithm plus the peer's delayed ACK held small responses back by up to 40 ms
    // (measured: unary p50 at concurrency 1 alternated between 50 and 82 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let server = grpc_builder(&cfg)?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, signals.stop.clone().cancelled_owned());
    drain_within_grace(server, &signals.stop, cfg.grace).await?;
    // The HTTP listener drains on the same signal and bounds itself by the same grace.
    if let Some(t) = http_task {
        t.await
            .map_err(|e| anyhow::anyhow!("the HTTP server failed: {e}"))??;
    }
    Ok(())
}

/// The shutdown sequence's two one-way signals, in the order [`shut_down`] gives them.
#[derive(Clone, Default)]
struct Signals {
    /// Cancelled once shutdown is requested: gRPC health turns NOT_SERVING and HTTP's
    /// `/readyz` 503.
    not_ready: CancellationToken,
    /// Cancelled the drain delay later: both listeners close, streams wind down and
    /// in-flight calls get the grace period.
    stop: CancellationToken,
}

/// Once `requested` resolves: readiness and health turn not serving, and after
/// `drain_delay` (for load balancers to stop routing here) the listeners are stopped.
async fn shut_down(
    requested: impl Future<Output = ()>,
    health: tonic_health::server::HealthReporter,
    signals: Signals,
    drain_delay: Duration,
) {
    requested.await;
    tracing::info!("shutdown requested: health NOT_SERVING, draining in-flight calls");
    signals.not_ready.cancel();
    health
        .set_not_serving::<TidingsServer<TidingsService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tokio::time::sleep(drain_delay).await;
    signals.stop.cancel();
}

/// What the service enforces, from the server's settings.
fn service_config(cfg: &ServerConfig) -> ServiceConfig {
    ServiceConfig {
        limits: cfg.limits.clone(),
        request_timeout: cfg.request_timeout,
        stream_idle: cfg.stream_idle,
        max_message_bytes: cfg.max_message_bytes,
        max_pending_bytes: cfg.max_pending_bytes,
    }
}

/// Starts the HTTP/JSON listener on `listener` over `tidings`, with the same token, message
/// limit and TLS; it stops with the gRPC one and gets the same grace. Fails, before it
/// starts, when its TLS settings do.
fn spawn_http(
    listener: TcpListener,
    tidings: &TidingsService,
    auth: &auth::BearerAuth,
    cfg: &ServerConfig,
    signals: &Signals,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let router = crate::http::router(crate::http::HttpState::new(
        tidings.clone(),
        auth.clone(),
        cfg.max_message_bytes,
        signals.not_ready.clone(),
    ));
    let tls = cfg.tls.as_ref().map(crate::http::tls_config).transpose()?;
    let limits = crate::http::ConnLimits {
        max_concurrent_streams: cfg.max_concurrent_streams,
        keepalive: cfg.keepalive,
    };
    let (stop, grace) = (signals.stop.clone(), cfg.grace);
    Ok(tokio::spawn(async move {
        let res = crate::http::serve(listener, router, tls, limits, stop, grace).await;
        if let Err(e) = &res {
            tracing::error!(error = %e, "the HTTP listener failed");
        }
        res
    }))
}

/// The Tidings gRPC service: arrival stamped and bearer token checked before a call runs,
/// message sizes limited to `max_message_bytes` (an oversized one is RESOURCE_EXHAUSTED),
/// each call traced.
fn grpc_service(
    tidings: TidingsService,
    auth: auth::BearerAuth,
    max_message_bytes: usize,
) -> Traced<SizeStatus<InterceptedService<TidingsServer<TidingsService>, impl Interceptor + Clone>>>
{
    let service = InterceptedService::new(
        TidingsServer::new(tidings)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        {
            let mut auth = auth;
            move |mut req: tonic::Request<()>| {
                service::stamp_arrival(&mut req);
                Interceptor::call(&mut auth, req)
            }
        },
    );
    Traced::new(SizeStatus::new(service, max_message_bytes))
}

/// The gRPC server's settings: TLS (mutual when a client CA is set), HTTP/2 keepalive and
/// the per-connection limits.
fn grpc_builder(cfg: &ServerConfig) -> anyhow::Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &cfg.tls {
        let mut t = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key));
        if let Some(ca) = &tls.client_ca {
            t = t.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(t)
            .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
    }
    Ok(builder
        .http2_keepalive_interval(Some(cfg.keepalive))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .concurrency_limit_per_connection(cfg.max_concurrent_per_connection)
        .max_concurrent_streams(cfg.max_concurrent_streams))
}

/// Runs the gRPC `server` until it has drained, or until `grace` has passed since `stop`:
/// then the server future is dropped, closing the calls still running.
async fn drain_within_grace(
    server: impl Future<Output = Result<(), tonic::transport::Error>>,
    stop: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut server = Box::pin(server);
    tokio::select! {
        res = &mut server => res?,
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "grace period over: closing remaining calls");
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
