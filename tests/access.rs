//! Access: TLS, mutual TLS and the bearer token, with real certificates made at test time.

mod common;

use common::{request, start};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tidings::api::{ServerConfig, TlsConfig};
use tidings::engine::EngineConfig;
use tidings::proto::tidings_client::TidingsClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

/// A CA, and a leaf certificate for `name` signed by it: (ca_pem, leaf_pem, leaf_key_pem).
fn pki(name: &str) -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

async fn tls_channel(
    port: u16,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn tls_serves_tls_clients_only() {
    let (ca, cert, key) = pki("localhost");
    let srv = start(
        EngineConfig::default(),
        ServerConfig {
            tls: Some(TlsConfig {
                cert: cert.into_bytes(),
                key: key.into_bytes(),
                client_ca: None,
            }),
            ..ServerConfig::default()
        },
    );
    let port = srv.addr.port();
    let ch = tls_channel(port, &ca, None).await.expect("TLS connect");
    let resp = TidingsClient::new(ch)
        .analyze(request("tls", "Paris is in France."))
        .await
        .expect("over TLS");
    assert_eq!(resp.into_inner().id, "tls");
    // A plaintext client gets no answer.
    let plain = async {
        let mut c = TidingsClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .ok()?;
        c.analyze(request("plain", "Paris.")).await.ok()
    };
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(10), plain)
            .await
            .ok()
            .flatten()
            .is_none()
    );
    // A client that does not trust the server's CA is refused.
    let (other_ca, _, _) = pki("localhost");
    let untrusted = match tls_channel(port, &other_ca, None).await {
        Ok(ch) => TidingsClient::new(ch)
            .analyze(request("x", "Paris."))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!untrusted);
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let (server_ca, server_cert, server_key) = pki("localhost");
    let (client_ca, client_cert, client_key) = pki("tidings-client");
    let srv = start(
        EngineConfig::default(),
        ServerConfig {
            tls: Some(TlsConfig {
                cert: server_cert.into_bytes(),
                key: server_key.into_bytes(),
                client_ca: Some(client_ca.into_bytes()),
            }),
            ..ServerConfig::default()
        },
    );
    let port = srv.addr.port();
    let with_cert = tls_channel(port, &server_ca, Some((&client_cert, &client_key)))
        .await
        .expect("mTLS connect");
    assert!(TidingsClient::new(with_cert)
        .analyze(request("m", "Rome."))
        .await
        .is_ok());
    let without = match tls_channel(port, &server_ca, None).await {
        Ok(ch) => TidingsClient::new(ch)
            .analyze(request("x", "Rome."))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!without, "a client without a certificate must be refused");
    let (_, stranger_cert, stranger_key) = pki("stranger");
    let stranger = match tls_channel(port, &server_ca, Some((&stranger_cert, &stranger_key))).await
    {
        Ok(ch) => TidingsClient::new(ch)
            .analyze(request("x", "Rome."))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(!stranger, "a certificate from another CA must be refused");
}

#[tokio::test]
async fn bearer_token_is_required_when_set() {
    let srv = start(
        EngineConfig::default(),
        ServerConfig {
            auth_token: Some("correct horse".into()),
            ..ServerConfig::default()
        },
    );
    let mut c = common::client(&srv).await;
    let s = c.analyze(request("none", "Oslo.")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(request("wrong", "Oslo."));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer correct hors".parse().unwrap());
    assert_eq!(
        c.analyze(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(request("right", "Oslo."));
    right
        .metadata_mut()
        .insert("authorization", "Bearer correct horse".parse().unwrap());
    assert_eq!(c.analyze(right).await.unwrap().into_inner().id, "right");
    // Health stays open for probes.
    let ch = common::channel(&srv).await;
    let h = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(h.is_ok());
}
