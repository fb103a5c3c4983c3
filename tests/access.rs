//! Access: TLS, mutual TLS and the bearer token, with real certificates made at test time.

mod common;

use common::{request, start};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tidings::api::TlsConfig;
use tidings::engine::EngineConfig;
use tidings::proto::tidings_client::TidingsClient;
use tidings::server::ServerConfig;
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

/// POSTs a small article to the HTTP API at `https://localhost:port` trusting `ca`, with an
/// optional client identity (cert + key PEM): the HTTP status, or `None` when no answer came.
async fn https_analyze(port: u16, ca: &str, identity: Option<(&str, &str)>) -> Option<u16> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .timeout(std::time::Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    let r = b
        .build()
        .unwrap()
        .post(format!("https://localhost:{port}/v1/analyze"))
        .json(&serde_json::json!({"text": "Paris is in France."}))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
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
    // The HTTP API serves TLS with the same certificate, and nothing in plain text.
    let http_port = srv.http.port();
    assert_eq!(https_analyze(http_port, &ca, None).await, Some(200));
    assert_eq!(https_analyze(http_port, &other_ca, None).await, None);
    let plain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http_port}/v1/analyze"))
        .json(&serde_json::json!({"text": "Paris."}))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP answered on a TLS port: {plain:?}"
    );
}

/// A server for `localhost` that requires a client certificate (and `token`, if given):
/// the server, its CA (PEM), and a client certificate and key its client CA signed.
fn mutual_tls_server(token: Option<&str>) -> (common::TestServer, String, String, String) {
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
            auth_token: token.map(str::to_string),
            ..ServerConfig::default()
        },
    );
    (srv, server_ca, client_cert, client_key)
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let (srv, server_ca, client_cert, client_key) = mutual_tls_server(None);
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
    // The HTTP API requires the client certificate too.
    let http_port = srv.http.port();
    assert_eq!(
        https_analyze(http_port, &server_ca, Some((&client_cert, &client_key))).await,
        Some(200)
    );
    assert_eq!(https_analyze(http_port, &server_ca, None).await, None);
    assert_eq!(
        https_analyze(http_port, &server_ca, Some((&stranger_cert, &stranger_key))).await,
        None
    );
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
    // The same token on HTTP: 401 with WWW-Authenticate without it or with a wrong one;
    // liveness, readiness, the page and the OpenAPI document stay open.
    let url = format!("{}/v1/analyze", common::http_url(&srv));
    let http = reqwest::Client::new();
    let body = serde_json::json!({"text": "Oslo."});
    for auth in [
        None,
        Some("Bearer correct hors"),
        Some("Basic correct horse"),
    ] {
        let mut r = http.post(&url).json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["status"], "UNAUTHENTICATED");
    }
    let r = http
        .post(&url)
        .header("authorization", "bearer correct horse")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let info = format!("{}/v1/info", common::http_url(&srv));
    assert_eq!(http.get(&info).send().await.unwrap().status(), 401);
    for open in ["/healthz", "/readyz", "/openapi.json", "/"] {
        let r = http
            .get(format!("{}{open}", common::http_url(&srv)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }
    // Streams too.
    let r = http
        .post(format!("{}/v1/analyze:stream", common::http_url(&srv)))
        .header("content-type", "application/x-ndjson")
        .body("{\"id\":\"s\",\"text\":\"Oslo.\"}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Issue #30: `tidings batch` reaches a server that asks for TLS, a client certificate and a
/// bearer token (`--ca-cert`, `--client-cert`/`--client-key`, `--token-file`; it had no such
/// options, and `dns:///` forced plaintext), and says why when one of them is missing.
#[test]
fn batch_reaches_a_secured_server() {
    let (srv, server_ca, client_cert, client_key) = mutual_tls_server(Some("correct horse"));
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let ca = file("ca.pem", &server_ca);
    let cert = file("client.pem", &client_cert);
    let key = file("client.key", &client_key);
    let token = file("token", "correct horse\n");
    let input = file(
        "in.jsonl",
        "{\"id\":\"a\",\"text\":\"Oslo is in Norway.\"}\n{\"id\":\"b\",\"text\":\"Rome.\"}\n",
    );
    let output = dir.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(common::process::BIN)
            .args(["batch", "--input", &input, "--output"])
            .arg(&output)
            .args(["--server", &format!("127.0.0.1:{}", srv.addr.port())])
            .args(["--tls-domain", "localhost", "--retries", "0"])
            .args(extra)
            .env_remove("TIDINGS_AUTH_TOKEN")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mutual = [
        "--ca-cert",
        ca.as_str(),
        "--client-cert",
        cert.as_str(),
        "--client-key",
        key.as_str(),
    ];
    // Without the token: refused, and the job says so.
    let (ok, err) = run(&mutual);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    // Never in the clear: an http:// server with TLS asked for, or a token without TLS.
    let (ok, err) = run(&["--ca-cert", &ca, "--server", "http://127.0.0.1:9"]);
    assert!(!ok && err.contains("plaintext"), "{err}");
    let (ok, err) = run(&["--token-file", &token]);
    assert!(!ok && err.contains("--ca-cert"), "{err}");
    // Without the client certificate: no connection.
    let (ok, err) = run(&["--ca-cert", &ca, "--token-file", &token]);
    assert!(!ok, "{err}");
    // With all three: every article answered.
    let (ok, err) = run(&[&mutual[..], &["--token-file", token.as_str()]].concat());
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&output).unwrap();
    let mut ids: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["\"a\"", "\"b\""], "{text}");
}
