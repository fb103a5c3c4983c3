//! Optional bearer-token check on the Tidings service. Health and reflection stay open, so
//! that probes and `grpcurl` work without the token; they reveal no article data.
//!
//! Tokens are compared as SHA-256 digests in constant time: the comparison takes the same
//! time whatever the sent token's length or how much of it matches. The scheme name is
//! case-insensitive (RFC 6750 and RFC 9110 section 11.1).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// A tonic interceptor requiring `authorization: Bearer <token>` when a token is set.
#[derive(Clone, Default)]
pub struct BearerAuth {
    /// SHA-256 of the token.
    digest: Option<[u8; 32]>,
}

impl BearerAuth {
    /// Checks against `token` (trimmed); `None` lets every call through.
    pub fn new(token: Option<String>) -> Self {
        Self {
            digest: token.map(|t| digest(t.trim())),
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The credentials of an `authorization` value whose scheme is `Bearer` (any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

impl BearerAuth {
    /// Checks an `authorization` value (gRPC metadata or HTTP header; `None` when absent).
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Status> {
        let Some(want) = &self.digest else {
            return Ok(());
        };
        match authorization.and_then(bearer) {
            // Fixed-size digests compared in constant time: the time taken says nothing about
            // the token's length or how much of it matched.
            Some(g) if bool::from(digest(g).ct_eq(want)) => Ok(()),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer <token>`",
            )),
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.check(got)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn checks_the_token_only_when_set() {
        let mut open = BearerAuth::new(None);
        assert!(open.call(req(None)).is_ok());
        let mut auth = BearerAuth::new(Some("s3cret\n".into()));
        assert!(auth.call(req(Some("Bearer s3cret"))).is_ok());
        // The scheme is case-insensitive.
        assert!(auth.call(req(Some("bearer s3cret"))).is_ok());
        assert!(auth.call(req(Some("BEARER s3cret"))).is_ok());
        assert_eq!(
            auth.call(req(Some("Basic s3cret"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(req(Some("Bearer s3cret-and-more")))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(req(Some("Bearer s3cre"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(req(None)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(req(Some("s3cret"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
