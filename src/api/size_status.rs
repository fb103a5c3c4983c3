//! RESOURCE_EXHAUSTED for a request message over the size limit.
//!
//! tonic's codec refuses such a message with OUT_OF_RANGE before the service sees it, while
//! gRPC's status-code guide gives RESOURCE_EXHAUSTED for "a message larger than the server
//! accepts". This wrapper rewrites that one status of a unary call's (trailers-only) answer;
//! streams map it where they read their messages ([`super::service::message_size_status`]).

use super::service::message_size_status;
use std::task::{Context, Poll};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Wraps a gRPC service; see the module documentation.
#[derive(Debug, Clone)]
pub struct SizeStatus<S> {
    inner: S,
    limit: usize,
}

impl<S> SizeStatus<S> {
    /// Wraps `inner`, whose messages are limited to `limit` bytes.
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }
}

impl<S: NamedService> NamedService for SizeStatus<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for SizeStatus<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut resp = fut.await?;
            if let Some(status) = Status::from_header_map(resp.headers()) {
                let mapped = message_size_status(status.clone(), limit);
                if mapped.code() != status.code() {
                    let headers = resp.headers_mut();
                    for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                        headers.remove(h);
                    }
                    // Only fails for a status whose details cannot be encoded; ours has none.
                    let _ = mapped.add_header(headers);
                }
            }
            Ok(resp)
        })
    }
}
