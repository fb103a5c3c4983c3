//! gRPC statuses as HTTP errors: the status code mapped as Google's API design guide and
//! grpc-gateway map it, and a JSON body `{code, status, message, details}` (google.rpc.Status
//! in the proto3 JSON mapping, plus the code's name) that keeps BadRequest field violations.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The HTTP status for a gRPC code (google/rpc/code.proto's HTTP mapping).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The canonical name of a gRPC code (`INVALID_ARGUMENT`), as google.rpc.Code spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A status as the JSON error body: `{code, status, message, details}`. BadRequest field
/// violations are kept as `type.googleapis.com/google.rpc.BadRequest` details.
pub fn status_json(status: &Status) -> Value {
    let mut details = Vec::new();
    if let Some(bad) = status.get_details_bad_request() {
        let violations: Vec<Value> = bad
            .field_violations
            .iter()
            .map(|v| json!({"field": v.field, "description": v.description}))
            .collect();
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": violations,
        }));
    }
    json!({
        "code": status.code() as i32,
        "status": code_name(status.code()),
        "message": status.message(),
        "details": details,
    })
}

/// An HTTP error answer: a gRPC status, and optionally an HTTP status more precise than the
/// code's mapping (413 for a body over the size limit, 415 for a wrong content type).
#[derive(Debug)]
pub struct ApiError {
    /// What went wrong, as gRPC would say it.
    pub status: Status,
    /// The HTTP status, when not the code's mapping.
    pub http: Option<StatusCode>,
}

impl ApiError {
    /// An error with an HTTP status other than the code's mapping.
    pub fn with_http(http: StatusCode, status: Status) -> Self {
        Self {
            status,
            http: Some(http),
        }
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self { status, http: None }
    }
}

/// Seconds a client is asked to wait before retrying a RESOURCE_EXHAUSTED or UNAVAILABLE
/// answer: the queue drains in about that time at full load.
const RETRY_AFTER_S: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.status.code();
        let http = self.http.unwrap_or_else(|| http_status(code));
        let mut resp = (http, axum::Json(status_json(&self.status))).into_response();
        let headers = resp.headers_mut();
        // Not on 413: a body over the limit never fits, however long the client waits.
        if matches!(
            http,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        }
        if code == Code::Unauthenticated {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tidings\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_field_violations() {
        let s = crate::api::convert::invalid("text", "must not be empty");
        let v = status_json(&s);
        assert_eq!(v["code"], 3);
        assert_eq!(v["status"], "INVALID_ARGUMENT");
        assert_eq!(v["details"][0]["fieldViolations"][0]["field"], "text");
        assert_eq!(http_status(s.code()), StatusCode::BAD_REQUEST);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
