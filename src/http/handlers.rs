//! The handlers: a JSON body read and checked, the gRPC method called on the shared
//! service (which validates, enforces limits and deadlines, and queues the work), its answer
//! written back as proto3 JSON or its status as an HTTP error.

use super::error::{code_name, ApiError};
use super::HttpState;
use crate::api::service::{parse_grpc_timeout, Arrived, Incoming};
use crate::proto::{self, tidings_server::Tidings};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, FramedRead, LinesCodec, LinesCodecError};
use tokio_util::io::StreamReader;
use tonic::{Code, Status};

/// Media types a JSON body may be sent as.
fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// Media types an NDJSON stream may be sent as.
fn is_ndjson(media: &str) -> bool {
    matches!(
        media,
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/json"
    )
}

/// The request's media type, lower case, without parameters.
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// 415 for a body of another media type than `want` accepts.
fn check_media(headers: &HeaderMap, ok: fn(&str) -> bool, want: &str) -> Result<(), ApiError> {
    let got = media_type(headers);
    if ok(&got) {
        return Ok(());
    }
    let got = if got.is_empty() { "none".into() } else { got };
    Err(ApiError::with_http(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Status::invalid_argument(format!(
            "Content-Type {got} is not accepted here: send {want}"
        )),
    ))
}

/// The call's deadline, in whole milliseconds from 1 ms to gRPC's 8-digit maximum (over a
/// day; the service's own request timeout is shorter anyway). The service caps it with its
/// request timeout, as for gRPC.
fn deadline(parts: &Parts) -> Result<Option<Duration>, ApiError> {
    Ok(requested_deadline(parts)?
        .map(|d| Duration::from_millis(d.as_millis().clamp(1, 99_999_999) as u64)))
}

/// The deadline the client asked for: the `timeout` query parameter (`2s`, `1.5s`, `250ms`,
/// `1m`) or a `Grpc-Timeout` header (gRPC's format, as grpc-gateway takes it).
fn requested_deadline(parts: &Parts) -> Result<Option<Duration>, ApiError> {
    let query = parts.uri.query().unwrap_or("");
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("timeout=") {
            return parse_timeout(v).map(Some).ok_or_else(|| {
                crate::api::convert::invalid(
                    "timeout",
                    format!("{v:?} is not a duration such as 2s, 1.5s, 250ms or 1m"),
                )
                .into()
            });
        }
    }
    match parts.headers.get("grpc-timeout") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(parse_grpc_timeout)
            .map(Some)
            .ok_or_else(|| {
                crate::api::convert::invalid(
                    "grpc-timeout",
                    "is not a gRPC timeout such as 2S or 250m",
                )
                .into()
            }),
        None => Ok(None),
    }
}

/// `2s`, `1.5s`, `250ms`, `1m`, `1h` as a duration (positive, finite).
fn parse_timeout(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = n * match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0)
        .then(|| Duration::try_from_secs_f64(secs).ok())
        .flatten()
}

/// Checks the bearer token as the gRPC interceptor checks it.
fn authorize(state: &HttpState, parts: &Parts) -> Result<(), ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(state.auth.check(value)?)
}

/// The gRPC request an HTTP call stands for: the bearer token checked, the deadline as
/// `grpc-timeout`, and when the call arrived.
fn grpc_request<T>(
    state: &HttpState,
    parts: &Parts,
    arrived: Instant,
    message: T,
) -> Result<tonic::Request<T>, ApiError> {
    authorize(state, parts)?;
    let mut req = tonic::Request::new(message);
    if let Some(d) = deadline(parts)? {
        if let Ok(v) = format!("{}m", d.as_millis()).parse() {
            req.metadata_mut().insert("grpc-timeout", v);
        }
    }
    req.extensions_mut().insert(Arrived(arrived));
    Ok(req)
}

/// Reads a JSON body of at most `state.max_body` bytes as a proto message, into the gRPC
/// request the call stands for. The content type, the token and the deadline are checked
/// before a byte of the body is read.
async fn read_json<T: DeserializeOwned>(
    state: &HttpState,
    req: Request,
    message: &str,
) -> Result<tonic::Request<T>, ApiError> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    check_media(&parts.headers, is_json, "application/json")?;
    let (md, ext, ()) = grpc_request(state, &parts, arrived, ())?.into_parts();
    let bytes = read_body(body, state.max_body).await?;
    let value = serde_json::from_slice::<T>(&bytes).map_err(|e| {
        crate::api::convert::invalid(
            "body",
            format!("not a valid {message} in the proto3 JSON mapping: {e}"),
        )
    })?;
    Ok(tonic::Request::from_parts(md, ext, value))
}

/// 413 for a body over the limit, named as the gRPC message limit is.
fn too_large(limit: usize) -> ApiError {
    ApiError::with_http(
        StatusCode::PAYLOAD_TOO_LARGE,
        Status::resource_exhausted(format!(
            "request body too large: the server accepts bodies of at most {limit} bytes \
             (--max-message-bytes)"
        )),
    )
}

/// A body over the limit is still read (and dropped) up to this many times the limit, so
/// that the client, still sending, gets the 413 rather than a broken connection.
const DRAIN_FACTOR: u64 = 4;

/// How long draining an oversized body may take.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The whole body, or 413 when it is over `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut data = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = data.next().await {
        let chunk = chunk
            .map_err(|e| Status::invalid_argument(format!("reading the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            let mut seen = (buf.len() + chunk.len()) as u64;
            let drain = async {
                while let Some(Ok(c)) = data.next().await {
                    seen += c.len() as u64;
                    if seen > DRAIN_FACTOR * limit as u64 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// A proto message as a JSON response.
fn json<T: serde::Serialize>(message: &T) -> Response {
    axum::Json(message).into_response()
}

/// `POST /v1/analyze`.
pub async fn analyze(State(state): State<HttpState>, req: Request) -> Result<Response, ApiError> {
    let req = read_json::<proto::AnalyzeRequest>(&state, req, "AnalyzeRequest").await?;
    Ok(json(&state.svc.analyze(req).await?.into_inner()))
}

/// `POST /v1/analyze:batch`.
pub async fn analyze_batch(
    State(state): State<HttpState>,
    req: Request,
) -> Result<Response, ApiError> {
    let req = read_json::<proto::AnalyzeBatchRequest>(&state, req, "AnalyzeBatchRequest").await?;
    Ok(json(&state.svc.analyze_batch(req).await?.into_inner()))
}

/// `GET /v1/info`.
pub async fn info(State(state): State<HttpState>, req: Request) -> Result<Response, ApiError> {
    let (parts, _) = req.into_parts();
    let req = grpc_request(&state, &parts, Instant::now(), proto::GetInfoRequest {})?;
    Ok(json(&state.svc.get_info(req).await?.into_inner()))
}

/// What went wrong with one line alone: answered by an item error, and the stream goes on.
enum BadLine {
    /// Over the size limit (skipped up to its newline).
    TooLong,
    /// Not UTF-8.
    NotUtf8,
}

/// NDJSON lines whose faults are per line: a line over the limit or not UTF-8 is an item
/// (`Err(BadLine)`) and decoding goes on, where `LinesCodec` alone would end the stream
/// (tokio-util's `FramedRead` stops at a decoder's first error). Only I/O errors of the body
/// end it.
struct NdjsonLines(LinesCodec);

impl NdjsonLines {
    fn lenient(
        res: Result<Option<String>, LinesCodecError>,
    ) -> Result<Option<Result<String, BadLine>>, std::io::Error> {
        match res {
            Ok(line) => Ok(line.map(Ok)),
            Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Err(BadLine::TooLong))),
            Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Ok(Some(Err(BadLine::NotUtf8)))
            }
            Err(LinesCodecError::Io(e)) => Err(e),
        }
    }
}

impl Decoder for NdjsonLines {
    type Item = Result<String, BadLine>;
    type Error = std::io::Error;

    fn decode(
        &mut self,
        buf: &mut tokio_util::bytes::BytesMut,
    ) -> Result<Option<Self::Item>, Self::Error> {
        Self::lenient(self.0.decode(buf))
    }

    fn decode_eof(
        &mut self,
        buf: &mut tokio_util::bytes::BytesMut,
    ) -> Result<Option<Self::Item>, Self::Error> {
        Self::lenient(self.0.decode_eof(buf))
    }
}

/// One line of an NDJSON stream read as a request; a line that is not one is answered by
/// an item error naming its line number (and its `id`, when that much could be read).
fn incoming(
    n: usize,
    line: Result<Result<String, BadLine>, std::io::Error>,
    limit: usize,
) -> Option<Result<Incoming, Status>> {
    let bad = |status: Status| {
        Some(Ok(Incoming::Invalid {
            id: String::new(),
            status,
        }))
    };
    let line = match line {
        Ok(Ok(l)) => l,
        Ok(Err(BadLine::TooLong)) => {
            return bad(Status::resource_exhausted(format!(
                "line {n}: longer than {limit} bytes (--max-message-bytes); skipped"
            )))
        }
        Ok(Err(BadLine::NotUtf8)) => {
            return bad(crate::api::convert::invalid(
                "body",
                format!("line {n}: not valid UTF-8; skipped"),
            ))
        }
        Err(e) => {
            return Some(Err(Status::invalid_argument(format!(
                "reading the request body at line {n}: {e}"
            ))))
        }
    };
    if line.trim().is_empty() {
        return None;
    }
    Some(Ok(
        match serde_json::from_str::<proto::AnalyzeRequest>(&line) {
            Ok(r) => Incoming::Request(r),
            Err(e) => Incoming::Invalid {
                id: serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
                    .unwrap_or_default(),
                status: crate::api::convert::invalid(
                    "body",
                    format!("line {n}: not a valid AnalyzeRequest in the proto3 JSON mapping: {e}"),
                ),
            },
        },
    ))
}

/// The last line of an NDJSON answer: how the stream ended.
fn end_line(status: Option<&Status>) -> Bytes {
    let (code, message) = status.map_or((Code::Ok, ""), |s| (s.code(), s.message()));
    let v = serde_json::json!({"end": {
        "code": code as i32,
        "status": code_name(code),
        "message": message,
    }});
    Bytes::from(format!("{v}\n"))
}

/// `POST /v1/analyze:stream`: NDJSON in, NDJSON out, read only as fast as it is analyzed.
pub async fn analyze_stream(
    State(state): State<HttpState>,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    check_media(
        &parts.headers,
        is_ndjson,
        "application/x-ndjson (one JSON request per line)",
    )?;
    authorize(&state, &parts)?;
    let timeout = deadline(&parts)?;
    let limit = state.max_body;
    let reader = StreamReader::new(
        body.into_data_stream()
            .map(|r| r.map_err(std::io::Error::other)),
    );
    let lines = FramedRead::new(reader, NdjsonLines(LinesCodec::new_with_max_length(limit)))
        .enumerate()
        .filter_map(move |(i, line)| futures::future::ready(incoming(i + 1, line, limit)));
    let answers = state.svc.stream_items(timeout, Box::pin(lines));
    let failed = Arc::new(AtomicBool::new(false));
    let seen = failed.clone();
    let body = answers
        .map(move |r| match r {
            Ok(item) => {
                let mut line = serde_json::to_vec(&item).unwrap_or_default();
                line.push(b'\n');
                Ok::<_, std::convert::Infallible>(Bytes::from(line))
            }
            Err(status) => {
                seen.store(true, Ordering::Relaxed);
                Ok(end_line(Some(&status)))
            }
        })
        .chain(futures::stream::once(async move {
            Ok(if failed.load(Ordering::Relaxed) {
                Bytes::new()
            } else {
                end_line(None)
            })
        }));
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(body),
    )
        .into_response())
}

/// `GET /healthz`.
pub async fn healthz() -> Response {
    json(&serde_json::json!({"status": "SERVING"}))
}

/// `GET /readyz`: 503 once the server drains.
pub async fn readyz(State(state): State<HttpState>) -> Response {
    if !state.not_ready.is_cancelled() {
        json(&serde_json::json!({"status": "SERVING"}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            axum::Json(serde_json::json!({"status": "NOT_SERVING"})),
        )
            .into_response()
    }
}

/// `GET /openapi.json`.
pub async fn openapi(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.openapi.as_str().to_owned(),
    )
        .into_response()
}

/// The page, embedded in the binary.
const PAGE: &str = include_str!("page.html");

/// `GET /`: the page. It loads nothing from elsewhere, and the policy says so.
pub async fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                     form-action 'none'; frame-ancestors 'none'",
                ),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        PAGE,
    )
        .into_response()
}

/// Any path not in the route table.
pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    Status::not_found(format!(
        "no route for {method} {}; the routes are listed in /openapi.json",
        uri.path()
    ))
    .into()
}

/// A known path with another method.
pub async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::with_http(
        StatusCode::METHOD_NOT_ALLOWED,
        Status::unimplemented(format!(
            "{} does not take {method}; see /openapi.json",
            uri.path()
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timeouts() {
        assert_eq!(parse_timeout("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("1m"), Some(Duration::from_secs(60)));
        for bad in ["", "2", "s", "-1s", "0s", "2x", "1e9999s", "..s"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(is_ndjson("application/x-ndjson"));
        assert!(!is_ndjson("application/x-www-form-urlencoded"));
    }
}
