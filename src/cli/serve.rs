//! `tidings serve`: load the models, start the engine, the gRPC server and (with
//! `--http-addr`) the HTTP/JSON API.

use super::{LimitArgs, ModelArgs};
use anyhow::{Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidings::api::TlsConfig;
use tidings::server::{self, ServerConfig};

fn read(p: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
}

/// Flags of `tidings serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TIDINGS_ADDR", default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Also serve the HTTP/JSON API, /openapi.json and the page on this address (e.g.
    /// 127.0.0.1:8080), with the same limits, token and TLS as gRPC; off when unset.
    #[arg(long, env = "TIDINGS_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9090); off when unset.
    #[arg(long, env = "TIDINGS_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Largest gRPC message decoded or encoded, in bytes.
    #[arg(long, env = "TIDINGS_MAX_MESSAGE_BYTES", default_value_t = ServerConfig::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Bytes of stream requests (gRPC and NDJSON) held read and not yet answered, across
    /// every stream; as many again may wait, one per stream, and past that a request is
    /// answered RESOURCE_EXHAUSTED. Bounds the memory of streams waiting for queue room.
    #[arg(long, env = "TIDINGS_MAX_PENDING_BYTES", default_value_t = ServerConfig::default().max_pending_bytes)]
    max_pending_bytes: usize,
    /// Most calls served at once per connection.
    #[arg(long, env = "TIDINGS_MAX_CONCURRENT", default_value_t = ServerConfig::default().max_concurrent_per_connection)]
    max_concurrent: usize,
    /// Longest a unary call may run (seconds), whatever deadline the client set. Streams are
    /// bounded by the client's deadline only.
    #[arg(long, env = "TIDINGS_REQUEST_TIMEOUT_S", default_value_t = ServerConfig::default().request_timeout.as_secs())]
    request_timeout_s: u64,
    /// A stream that neither sends a request nor reads an answer for this many seconds is
    /// ended with UNAVAILABLE.
    #[arg(long, env = "TIDINGS_STREAM_IDLE_TIMEOUT_S", default_value_t = ServerConfig::default().stream_idle.as_secs())]
    stream_idle_timeout_s: u64,
    /// Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "TIDINGS_GRACE_S", default_value_t = ServerConfig::default().grace.as_secs())]
    grace_s: u64,
    /// Milliseconds health reports NOT_SERVING before the listener closes on shutdown.
    #[arg(long, env = "TIDINGS_DRAIN_DELAY_MS", default_value_t = ServerConfig::default().drain_delay.as_millis() as u64)]
    drain_delay_ms: u64,
    /// TLS certificate chain (PEM); with --tls-key, serves TLS.
    #[arg(long, env = "TIDINGS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "TIDINGS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: mutual TLS.
    #[arg(long, env = "TIDINGS_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File holding a bearer token that every Tidings call must send
    /// (`authorization: Bearer <token>`). TIDINGS_AUTH_TOKEN sets the token itself.
    #[arg(long, env = "TIDINGS_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// The TLS settings and bearer token the flags ask for, read and checked.
fn access(a: &ServeArgs) -> Result<(Option<TlsConfig>, Option<String>)> {
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(TlsConfig {
            cert: read(c, "TLS certificate")?,
            key: read(k, "TLS key")?,
            client_ca: a
                .tls_client_ca
                .as_deref()
                .map(|p| read(p, "client CA"))
                .transpose()?,
        }),
        _ => None,
    };
    let auth_token = match (&a.auth_token_file, std::env::var("TIDINGS_AUTH_TOKEN").ok()) {
        (Some(p), _) => Some(
            String::from_utf8(read(p, "auth token file")?).context("auth token is not UTF-8")?,
        ),
        (None, t) => t,
    };
    if auth_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        anyhow::bail!("the auth token is empty");
    }
    if auth_token.is_some() && tls.is_none() {
        tracing::warn!(
            "a bearer token is required but TLS is off: the token crosses the network in \
             clear text. Serve with --tls-cert/--tls-key, or only behind a TLS-terminating \
             proxy on a trusted network"
        );
    }
    Ok((tls, auth_token))
}

/// Runs the server until SIGINT/SIGTERM.
pub fn run(a: ServeArgs) -> Result<()> {
    disable_transparent_huge_pages();
    // Access settings are read before anything starts: a bad file fails fast.
    let (tls, auth_token) = access(&a)?;
    let rt = super::runtime()?;
    rt.block_on(async move {
        // Bind first: a port in use fails before minutes of model loading.
        let listener = server::bind(a.addr).await?;
        let http = match a.http_addr {
            Some(h) => Some(server::bind(h).await?),
            None => None,
        };
        if let Some(m) = a.metrics_addr {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(m)
                .install()
                .with_context(|| format!("starting the metrics exporter on {m}"))?;
            tracing::info!(addr = %m, "metrics on /metrics");
        }
        if a.models.topic_memory.is_some() && a.limits.refine_topics > 0 {
            anyhow::bail!(
                "--topic-memory and --refine-topics: choose one (a fixed memory, the same on \
                 every replica, or one learnt online from this replica's traffic)"
            );
        }
        let (models, memory) = tokio::task::spawn_blocking({
            let m = a.models.clone();
            move || -> Result<_> {
                let models = m.load()?;
                let memory = m.topic_memory(&models)?;
                Ok((models, memory))
            }
        })
        .await??;
        let engine = a.limits.engine(models);
        let engine = match memory {
            Some(m) => engine.with_topic_memory(m),
            None => engine,
        };
        // Compute the default taxonomy's prototypes (and its memory) before the first
        // request.
        if engine.models().topics.is_some() {
            engine
                .warm_default_topics()
                .await
                .map_err(|e| anyhow::anyhow!("embedding the default taxonomy: {e}"))?;
        }
        let cfg = ServerConfig {
            limits: a.limits.limits(),
            max_message_bytes: a.max_message_bytes,
            max_pending_bytes: a.max_pending_bytes,
            max_concurrent_per_connection: a.max_concurrent,
            request_timeout: Duration::from_secs(a.request_timeout_s),
            stream_idle: Duration::from_secs(a.stream_idle_timeout_s),
            grace: Duration::from_secs(a.grace_s),
            drain_delay: Duration::from_millis(a.drain_delay_ms),
            tls,
            auth_token,
            ..ServerConfig::default()
        };
        server::serve_with_http(listener, http, engine, cfg, server::shutdown_signal()).await?;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// Turns transparent huge pages off for this process. mimalloc marks its arenas
/// `MADV_HUGEPAGE`, and khugepaged then fills partly used 2 MiB regions: in a 10-minute soak
/// (bench/soak.py) the server's RSS crept from 337 to 365 MiB, and kept growing while idle
/// afterwards (423 MiB, 313 MiB of it huge pages). `tidings bench` showed no speed difference
/// without them.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag of this process.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!("PR_SET_THP_DISABLE failed: {e}");
        }
    }
}
