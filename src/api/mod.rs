//! The gRPC edge: the `tidings.v1.Tidings` service, its checks and status mapping. The
//! HTTP/JSON API ([`crate::http`]) serves the same service beside it; the process that runs
//! both (listeners, TLS, health, shutdown) is [`crate::server`].
//!
//! - [`auth`] — the optional bearer-token check.
//! - [`convert`] — protobuf <-> domain types, validation, status mapping.
//! - [`service`] — the `tidings.v1.Tidings` implementation.
//! - `size_status` — RESOURCE_EXHAUSTED for a request message over the size limit.

pub mod auth;
pub mod convert;
pub mod pending;
pub mod service;
pub mod size_status;

use std::time::Duration;

/// PEM contents for TLS.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Server certificate chain.
    pub cert: Vec<u8>,
    /// Server private key.
    pub key: Vec<u8>,
    /// CA that client certificates must chain to (mutual TLS); `None` = no client certs.
    pub client_ca: Option<Vec<u8>>,
}

/// How long a peer has to answer an HTTP/2 keepalive PING.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
