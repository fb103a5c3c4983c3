//! The HTTP/JSON API through a real HTTP client: the same answers as gRPC in the proto3 JSON
//! mapping, and an HTTP twin of every case of the gRPC bad-input matrix (tests/grpc.rs,
//! tests/bad_input.rs, tests/access.rs), each with its mapped HTTP status and JSON error.

mod common;

use common::{get_json, http_url, post_json, server, summit_article};
use serde_json::{json, Value};
use std::time::Duration;
use tidings::engine::EngineConfig;
use tidings::server::ServerConfig;

/// Checks an error answer: its HTTP status, gRPC code name, and that its message names
/// `needle`.
fn assert_error(got: &(u16, Value), http: u16, status: &str, needle: &str) {
    let (code, body) = got;
    assert_eq!(*code, http, "{body}");
    assert_eq!(body["status"], status, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert!(
        body["code"].is_number() && body["details"].is_array(),
        "{body}"
    );
}

/// Checks that entity offsets (in Unicode scalar values) slice back to each entity's text.
fn assert_offsets_slice(text: &str, resp: &Value) {
    let chars: Vec<char> = text.chars().collect();
    for e in resp["entities"].as_array().unwrap() {
        let (s, t) = (e["start"].as_u64().unwrap(), e["end"].as_u64().unwrap());
        let slice: String = chars[s as usize..t as usize].iter().collect();
        assert_eq!(slice, e["text"].as_str().unwrap(), "{e}");
    }
}

#[tokio::test]
async fn summit_article_over_http_is_the_grpc_answer_in_proto3_json() {
    let text = summit_article();
    let (code, v) = post_json(
        server(),
        "/v1/analyze",
        &json!({"id": "seed", "text": text, "topK": 3, "tasks": ["TASK_TOPICS", "TASK_ENTITIES"]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["id"], "seed");
    assert!(
        v["entities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["text"] == "Kim Jong Un" && e["label"] == "PER"),
        "{v}"
    );
    assert_eq!(v["topics"].as_array().unwrap().len(), 3);
    assert_eq!(v["topics"][0]["label"], "world", "{v}");
    // The proto3 JSON mapping: lowerCamelCase names, 64-bit integers as strings, every field.
    assert!(v["entityGroups"].as_array().is_some_and(|g| !g.is_empty()));
    assert!(v["entities"][0]["byteStart"].is_number());
    assert!(v["timing"]["totalUs"].is_string(), "{v}");
    assert_eq!(v["reading"]["truncated"], false);
    assert_offsets_slice(&text, &v);
    // The same article over gRPC: the same entities.
    let mut c = common::client(server()).await;
    let g = c
        .analyze(common::request("seed", &text))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = v["entities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    let grpc_names: Vec<&str> = g.entities.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(names, grpc_names);
}

#[tokio::test]
async fn info_health_readiness_openapi_and_page() {
    let base = http_url(server());
    let http = reqwest::Client::new();
    let info = get_json(server(), "/v1/info").await;
    assert!(
        info["limits"]["maxTextChars"].as_u64().unwrap() > 0,
        "{info}"
    );
    assert!(!info["defaultTopics"].as_array().unwrap().is_empty());
    for path in ["/healthz", "/readyz"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let doc = get_json(server(), "/openapi.json").await;
    assert_eq!(doc["openapi"], "3.1.0");
    // Every documented path is served (none answers 404).
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = http
                .request(m, format!("{base}{path}"))
                .send()
                .await
                .unwrap();
            assert_ne!(r.status(), 404, "{method} {path}");
        }
    }
    let page = http.get(&base).send().await.unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.headers().contains_key("content-security-policy"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains("id=\"analyze\"") && !html.contains("http://") && !html.contains("https://")
    );
}

#[tokio::test]
async fn bad_input_gets_400_naming_the_field() {
    let srv = server();
    let info = get_json(srv, "/v1/info").await;
    let limits = &info["limits"];
    let max_chars = limits["maxTextChars"].as_u64().unwrap() as usize;
    let max_labels = limits["maxLabels"].as_u64().unwrap() as usize;
    let labels =
        |n: usize| -> Vec<Value> { (0..n).map(|i| json!({"name": format!("l{i}")})).collect() };
    let cases: Vec<(&str, Value)> = vec![
        ("text", json!({"text": ""})),
        ("text", json!({"text": " \n\t "})),
        (
            "max_text_chars",
            json!({"text": "word ".repeat(max_chars / 5 + 1)}),
        ),
        (
            "tasks[0]",
            json!({"text": "ok", "tasks": ["TASK_UNSPECIFIED"]}),
        ),
        ("integer `99`", json!({"text": "ok", "tasks": [99]})),
        (
            "entity_types[0]",
            json!({"text": "ok", "entityTypes": ["DATE"]}),
        ),
        ("labels[0].name", json!({"text": "ok", "labels": [{}]})),
        (
            "duplicate",
            json!({"text": "ok", "labels": [{"name": "a"}, {"name": "A"}]}),
        ),
        (
            "max_labels",
            json!({"text": "ok", "labels": labels(max_labels + 1)}),
        ),
        (
            "max_labels",
            json!({"text": "Some text.", "labels": labels(1000)}),
        ),
        ("id", json!({"id": "x".repeat(300), "text": "ok"})),
        // JSON that is not an AnalyzeRequest.
        ("unknown field `bogus`", json!({"text": "ok", "bogus": 1})),
        ("invalid type", json!({"text": 5})),
        ("invalid type", json!(["text"])),
    ];
    for (needle, body) in cases {
        let got = post_json(srv, "/v1/analyze", &body).await;
        assert_error(&got, 400, "INVALID_ARGUMENT", needle);
    }
    // The field violation of google.rpc.BadRequest is kept.
    let (_, v) = post_json(srv, "/v1/analyze", &json!({"text": ""})).await;
    assert_eq!(
        v["details"][0]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    assert_eq!(v["details"][0]["fieldViolations"][0]["field"], "text");
    // Too many batch items.
    let items: Vec<Value> = (0..=limits["maxBatchItems"].as_u64().unwrap())
        .map(|i| json!({"id": i.to_string(), "text": "ok"}))
        .collect();
    let got = post_json(srv, "/v1/analyze:batch", &json!({"requests": items})).await;
    assert_error(&got, 400, "INVALID_ARGUMENT", "max_batch_items");
    // A batch answers every item in order; a bad one gets its error in its place.
    let (code, v) = post_json(
        srv,
        "/v1/analyze:batch",
        &json!({"requests": [{"id": "a", "text": "Oslo is in Norway."}, {"id": "b", "text": ""}]}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["items"][0]["response"]["id"], "a");
    assert_eq!(v["items"][1]["error"]["id"], "b");
    assert_eq!(v["items"][1]["error"]["code"], 3);
    common::assert_still_serving(srv).await;
}

#[tokio::test]
async fn bodies_that_are_not_json_requests_get_clear_4xx() {
    let base = http_url(server());
    let http = reqwest::Client::new();
    let send = |ct: Option<&'static str>, body: Vec<u8>| {
        let mut r = http.post(format!("{base}/v1/analyze")).body(body);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        async move {
            let r = r.send().await.unwrap();
            let code = r.status().as_u16();
            (code, r.json::<Value>().await.unwrap())
        }
    };
    let ok = br#"{"text":"Paris."}"#.to_vec();
    assert_error(
        &send(None, ok.clone()).await,
        415,
        "INVALID_ARGUMENT",
        "Content-Type",
    );
    assert_error(
        &send(Some("text/plain"), ok.clone()).await,
        415,
        "INVALID_ARGUMENT",
        "text/plain",
    );
    assert_error(
        &send(Some("application/json"), b"{\"text\":".to_vec()).await,
        400,
        "INVALID_ARGUMENT",
        "EOF",
    );
    // Invalid UTF-8 inside a JSON string.
    let bad_utf8 = [&b"{\"text\":\"P"[..], &[0xff, 0xfe], &b"x\"}"[..]].concat();
    assert_error(
        &send(Some("application/json"), bad_utf8).await,
        400,
        "INVALID_ARGUMENT",
        "body",
    );
    // 20 MB: over the body limit, refused by the limit's name.
    let huge = format!("{{\"text\":\"{}\"}}", "x".repeat(20 << 20)).into_bytes();
    assert_error(
        &send(Some("application/json"), huge).await,
        413,
        "RESOURCE_EXHAUSTED",
        "--max-message-bytes",
    );
    // Charset parameters are fine.
    let (code, _) = send(Some("application/json; charset=utf-8"), ok).await;
    assert_eq!(code, 200);
    // Unknown routes and methods.
    let r = http.get(format!("{base}/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "NOT_FOUND");
    let r = http.get(format!("{base}/v1/analyze")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    common::assert_still_serving(server()).await;
}

#[tokio::test]
async fn odd_but_valid_texts_get_sound_answers() {
    for text in [
        "Paris\0London and\0Berlin".to_string(),
        "😀".repeat(10_000),
        "قال الرئيس إن Cairo مدينة كبيرة. שלום Jerusalem".to_string(),
        "Ame\u{301}lie and Zoe\u{308} went to Mu\u{308}nchen with Bjo\u{308}rk.".to_string(),
        "a".repeat(100_000),
        "Line\u{7}one\u{1b}[31m red\r\nTokyo\u{200b}Osaka".to_string(),
        "🇯🇵 Tokyo and 👩‍👩‍👧 Osaka are in Japan.".to_string(),
    ] {
        let (code, v) = post_json(server(), "/v1/analyze", &json!({"text": text})).await;
        assert_eq!(code, 200, "{v}");
        assert_offsets_slice(&text, &v);
        assert!(!v["topics"].as_array().unwrap().is_empty());
    }
}

#[tokio::test]
async fn deadlines_give_504_and_bad_ones_400() {
    let text = summit_article().repeat(20);
    let (code, v) = post_json(server(), "/v1/analyze?timeout=5ms", &json!({"text": text})).await;
    assert_eq!(code, 504, "{v}");
    assert_eq!(v["status"], "DEADLINE_EXCEEDED");
    // gRPC's header form, as grpc-gateway takes it.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/analyze", http_url(server())))
        .header("grpc-timeout", "5m")
        .json(&json!({"text": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    for bad in ["abc", "-1s", "0s", "5"] {
        let got = post_json(
            server(),
            &format!("/v1/analyze?timeout={bad}"),
            &json!({"text": "ok"}),
        )
        .await;
        assert_error(&got, 400, "INVALID_ARGUMENT", "timeout");
    }
    // The server's own cap applies whatever the client asks.
    let srv = common::start(
        EngineConfig::default(),
        ServerConfig {
            request_timeout: Duration::from_millis(5),
            ..ServerConfig::default()
        },
    );
    let got = post_json(&srv, "/v1/analyze?timeout=60s", &json!({"text": text})).await;
    assert_error(&got, 504, "DEADLINE_EXCEEDED", "request timeout");
    common::assert_still_serving(server()).await;
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let text = summit_article().repeat(3);
    let srv = common::one_article_queue_server(&text);
    let url = format!("{}/v1/analyze", http_url(&srv));
    let calls = (0..12).map(|_| {
        let (url, text) = (url.clone(), text.clone());
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"text": text}))
                .send()
                .await
                .unwrap()
        }
    });
    let answers = futures::future::join_all(calls).await;
    let refused: Vec<_> = answers.iter().filter(|r| r.status() == 429).collect();
    let ok = answers.iter().filter(|r| r.status() == 200).count();
    assert!(
        !refused.is_empty() && ok > 0,
        "{:?}",
        answers.iter().map(|r| r.status()).collect::<Vec<_>>()
    );
    assert_eq!(ok + refused.len(), 12);
    assert!(refused
        .iter()
        .all(|r| r.headers().contains_key("retry-after")));
    // More than the whole queue holds: 400, not left waiting.
    let got = post_json(
        &srv,
        "/v1/analyze",
        &json!({"text": summit_article().repeat(12)}),
    )
    .await;
    assert_error(&got, 400, "INVALID_ARGUMENT", "queue");
}

/// The lines of an NDJSON answer.
async fn ndjson(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    resp.text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn stream_call(srv: &common::TestServer, query: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{}/v1/analyze:stream{query}", http_url(srv)))
        .header("content-type", "application/x-ndjson")
}

#[tokio::test]
async fn ndjson_stream_answers_every_line_and_ends_with_its_status() {
    let mut body = String::new();
    for i in 0..40 {
        body.push_str(
            &json!({"id": format!("a{i}"), "text": "Tokyo and Osaka are in Japan."}).to_string(),
        );
        body.push('\n');
    }
    body.push_str("this is not json\n\n");
    body.push_str(&json!({"id": "empty", "text": ""}).to_string());
    body.push('\n');
    body.push_str(&json!({"id": "last", "text": "Kim Jong Un went to Russia."}).to_string()); // no final newline
    let lines = ndjson(stream_call(server(), "").body(body).send().await.unwrap()).await;
    let (end, items) = lines.split_last().unwrap();
    assert_eq!(end["end"]["status"], "OK", "{end}");
    assert_eq!(items.len(), 43);
    let mut ids: Vec<&str> = items
        .iter()
        .filter_map(|l| l["response"]["id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 41);
    assert!(ids.contains(&"last") && ids.contains(&"a39"));
    let errors: Vec<&Value> = items.iter().filter_map(|l| l.get("error")).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors
        .iter()
        .any(|e| e["message"].as_str().unwrap().contains("line 41")));
    assert!(errors.iter().any(|e| e["id"] == "empty" && e["code"] == 3));
    // Wrong content type: 415 before anything is read.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/analyze:stream", http_url(server())))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
}

#[tokio::test]
async fn streams_that_misbehave_do_not_hurt_the_server() {
    let srv = server();
    // An empty stream: only the end line.
    let lines = ndjson(stream_call(srv, "").body("").send().await.unwrap()).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["end"]["code"], 0);
    // A stream that sends nothing and stays open: its deadline ends it.
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let lines = ndjson(
        stream_call(srv, "?timeout=500ms")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(lines.last().unwrap()["end"]["status"], "DEADLINE_EXCEEDED");
    // A client that goes away mid-stream.
    let body: String = (0..50)
        .map(|i| {
            format!(
                "{}\n",
                json!({"id": format!("c{i}"), "text": "Tokyo and Osaka are in Japan."})
            )
        })
        .collect();
    let mut r = stream_call(srv, "").body(body).send().await.unwrap();
    let _ = r.chunk().await;
    drop(r);
    // A client that never reads its answers: the server stops reading its requests
    // (back-pressure) instead of buffering without bound. A raw socket with small buffers,
    // so that the unread answers fill them after a few dozen articles.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.set_send_buffer_size(4096).unwrap();
    let mut conn = sock.connect(srv.http).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "POST /v1/analyze:stream HTTP/1.1\r\nhost: {}\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n",
        srv.http
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let article = summit_article();
    let mut sent = 0;
    for i in 0..10_000 {
        let line = format!("{}\n", json!({"id": format!("n{i}"), "text": article}));
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        match tokio::time::timeout(Duration::from_secs(3), conn.write_all(chunk.as_bytes())).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    assert!(
        sent < 10_000,
        "the server kept reading {sent} requests nobody read answers to"
    );
    drop(conn);
    common::assert_still_serving(srv).await;
}

/// `tidings serve --http-addr` as users run it: the flag, HTTP metrics by route and status,
/// and `/readyz` turning 503 while the server drains.
#[test]
fn serve_flag_metrics_and_readiness_during_drain() {
    use common::process;
    let (port, http, metrics) = (
        process::free_port(),
        process::free_port(),
        process::free_port(),
    );
    let child = process::serve(
        port,
        &[
            "--http-addr",
            &format!("127.0.0.1:{http}"),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--drain-delay-ms",
            "3000",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let base = format!("http://127.0.0.1:{http}");
        let c = reqwest::Client::new();
        for (text, status) in [("Angela Merkel visited Paris.", 200), ("", 400)] {
            let r = c
                .post(format!("{base}/v1/analyze"))
                .json(&json!({ "text": text }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), status);
        }
        let text = c
            .get(format!("http://127.0.0.1:{metrics}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for status in ["200", "400"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with("tidings_http_requests_total{")
                        && l.contains("route=\"/v1/analyze\"")
                        && l.contains(&format!("status=\"{status}\""))),
                "no HTTP metric for {status}:\n{text}"
            );
        }
        assert_eq!(
            c.get(format!("{base}/readyz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        process::sigterm(&child);
        // Within the drain delay: alive, but not ready.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            c.get(format!("{base}/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503);
    });
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// A line over the size limit, or not UTF-8, is answered by its own item error, and the lines
/// after it are still read and answered (the stream does not end at the first bad line).
#[tokio::test]
async fn ndjson_lines_over_the_limit_or_not_utf8_do_not_end_the_stream() {
    let srv = common::start(
        EngineConfig::default(),
        ServerConfig {
            max_message_bytes: 4096,
            ..ServerConfig::default()
        },
    );
    let line = |id: &str| format!("{}\n", json!({"id": id, "text": "Oslo is in Norway."}));
    let mut body = line("a").into_bytes();
    body.extend(format!("{}\n", json!({"id": "long", "text": "word ".repeat(2000)})).into_bytes());
    body.extend(line("b").into_bytes());
    body.extend(b"{\"id\":\"bad\",\"text\":\"P\xff\xfe\"}\n");
    body.extend(line("c").into_bytes());
    let lines = ndjson(stream_call(&srv, "").body(body).send().await.unwrap()).await;
    let (end, items) = lines.split_last().unwrap();
    assert_eq!(end["end"]["code"], 0, "{end}");
    let mut ids: Vec<&str> = items
        .iter()
        .filter_map(|l| l["response"]["id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"], "{lines:?}");
    let errors: Vec<String> = items
        .iter()
        .filter_map(|l| l["error"]["message"].as_str().map(str::to_string))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors
        .iter()
        .any(|e| e.contains("line 2") && e.contains("--max-message-bytes")));
    assert!(errors
        .iter()
        .any(|e| e.contains("line 4") && e.contains("UTF-8")));
}
