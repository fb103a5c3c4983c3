//! Optional bearer-token check on the Tidings service (health stays open for probes).

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// A tonic interceptor requiring `authorization: Bearer <token>` when a token is set.
#[derive(Clone, Default)]
pub struct BearerAuth {
    token: Option<std::sync::Arc<[u8]>>,
}

impl BearerAuth {
    /// Checks against `token`; `None` lets every call through.
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.map(|t| t.trim().as_bytes().into()),
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match got {
            // Constant-time comparison: the time taken says nothing about how much matched.
            Some(g) if bool::from(g.as_bytes().ct_eq(want)) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer <token>`",
            )),
        }
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
