//! The `tidings.v1.Tidings` service: validates at the door, hands work to the engine, and
//! maps every outcome to a gRPC status.

use super::convert::{analysis_to_proto, article_from_proto, invalid, status_of, Limits};
use crate::engine::{Admission, Engine};
use crate::proto::{self, tidings_server::Tidings};
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

/// Requests of one stream analyzed at once; more wait in the client's send window.
const STREAM_IN_FLIGHT: usize = 32;

/// How much earlier than tonic's own `grpc-timeout` timer a unary call gives up, so that the
/// client gets DEADLINE_EXCEEDED from us rather than CANCELLED from tonic: two tokio timers
/// with the same deadline fire in the same 1 ms tick, in no set order.
const TIMER_MARGIN: Duration = Duration::from_millis(2);

/// When a call reached the service, before its body was read: a request extension set by
/// [`stamp_arrival`].
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// Records [`Arrived`] on a request; runs in the service's interceptor.
pub fn stamp_arrival(req: &mut Request<()>) {
    req.extensions_mut().insert(Arrived(Instant::now()));
}

/// The service implementation; cheap to clone.
#[derive(Clone)]
pub struct TidingsService {
    engine: Engine,
    limits: Limits,
    entity_types: Vec<String>,
    request_timeout: Duration,
}

impl TidingsService {
    /// A service over `engine` enforcing `limits`; unary calls run for at most
    /// `request_timeout`, or the client's deadline if that is sooner.
    pub fn new(engine: Engine, limits: Limits, request_timeout: Duration) -> Self {
        let entity_types = engine.models().entity_types();
        Self {
            engine,
            limits,
            entity_types,
            request_timeout,
        }
    }

    /// Runs a unary call's work within its deadline: the client's `grpc-timeout`, capped by
    /// the server's request timeout. Past it the work is dropped (its queued rows are skipped
    /// by the batcher) and the call ends with DEADLINE_EXCEEDED, the code gRPC defines for it.
    ///
    /// tonic's transport also enforces `grpc-timeout`, from when the call arrived, and answers
    /// CANCELLED "Timeout expired", which clients cannot tell from a cancellation. So the
    /// deadline here counts from the same moment ([`Arrived`], stamped before the body is
    /// read) and ends [`TIMER_MARGIN`] early, to answer first.
    async fn within_deadline<T>(
        &self,
        md: &tonic::metadata::MetadataMap,
        ext: &tonic::Extensions,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let (limit, whose) = match grpc_timeout(md) {
            Some(d) if d < self.request_timeout => (d, "the call's deadline"),
            _ => (self.request_timeout, "the server's request timeout"),
        };
        let arrived = ext.get::<Arrived>().map_or_else(Instant::now, |a| a.0);
        let until = (arrived + limit)
            .checked_sub(TIMER_MARGIN)
            .unwrap_or(arrived);
        tokio::time::timeout_at(until.into(), work)
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "{whose} of {limit:?} passed before the answer was ready"
                )))
            })
    }

    /// A unary call: its work run within its deadline, its outcome recorded as `rpc`.
    async fn unary<Req, Resp, Fut>(
        &self,
        rpc: &'static str,
        request: Request<Req>,
        work: impl FnOnce(Req) -> Fut,
    ) -> Result<Response<Resp>, Status>
    where
        Fut: std::future::Future<Output = Result<Resp, Status>>,
    {
        let started = Instant::now();
        let (md, ext, req) = request.into_parts();
        let res = self.within_deadline(&md, &ext, work(req)).await;
        record(
            rpc,
            res.as_ref().map_or_else(|s| s.code(), |_| Code::Ok),
            started,
        );
        res.map(Response::new)
    }

    /// Validates and analyzes one request.
    async fn analyze_one(
        &self,
        req: proto::AnalyzeRequest,
        admission: Admission,
    ) -> Result<proto::AnalyzeResponse, Status> {
        let started = Instant::now();
        let id = req.id.clone();
        let (article, labels) = article_from_proto(req, &self.limits, &self.entity_types)?;
        let (analysis, timing) = self
            .engine
            .analyze(article, labels.as_deref(), admission)
            .await
            .map_err(status_of)?;
        let mut resp = analysis_to_proto(analysis, timing, started.elapsed());
        resp.id = id;
        Ok(resp)
    }
}

impl TidingsService {
    /// AnalyzeBatch's work: every item analyzed, each answered or failed on its own.
    async fn batch(
        &self,
        requests: Vec<proto::AnalyzeRequest>,
    ) -> Result<proto::AnalyzeBatchResponse, Status> {
        if requests.len() > self.limits.max_batch_items {
            return Err(invalid(
                "requests",
                format!(
                    "has {} items, more than the limit of {} (max_batch_items)",
                    requests.len(),
                    self.limits.max_batch_items
                ),
            ));
        }
        let items = futures::future::join_all(requests.into_iter().map(|r| async move {
            let id = r.id.clone();
            match self.analyze_one(r, Admission::FailFast).await {
                Ok(resp) => proto::AnalyzeBatchItem {
                    outcome: Some(proto::analyze_batch_item::Outcome::Response(resp)),
                },
                Err(s) => proto::AnalyzeBatchItem {
                    outcome: Some(proto::analyze_batch_item::Outcome::Error(
                        proto::ItemError {
                            code: s.code() as i32,
                            message: s.message().to_string(),
                            id,
                        },
                    )),
                },
            }
        }))
        .await;
        Ok(proto::AnalyzeBatchResponse { items })
    }
}

/// Records the count and latency of one RPC by status code.
fn record(rpc: &'static str, code: Code, started: Instant) {
    let code = format!("{code:?}");
    metrics::counter!("tidings_requests_total", "rpc" => rpc, "code" => code.clone()).increment(1);
    metrics::histogram!("tidings_request_seconds", "rpc" => rpc, "code" => code)
        .record(started.elapsed().as_secs_f64());
}

/// Names the item a stream status belongs to: in the message, and in the `tidings-item-id`
/// metadata for clients (such as `tidings batch`) that act on it. Code and details are kept.
fn with_id(status: Status, id: &str) -> Status {
    if id.is_empty() {
        return status;
    }
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Ok(v) = id.parse() {
        metadata.insert("tidings-item-id", v);
    }
    Status::with_details_and_metadata(
        status.code(),
        format!("item {id:?}: {}", status.message()),
        status.details().to_vec().into(),
        metadata,
    )
}

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

type AnalyzeStreamOut =
    Pin<Box<dyn Stream<Item = Result<proto::AnalyzeResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Tidings for TidingsService {
    async fn analyze(
        &self,
        request: Request<proto::AnalyzeRequest>,
    ) -> Result<Response<proto::AnalyzeResponse>, Status> {
        self.unary("Analyze", request, |r| {
            self.analyze_one(r, Admission::FailFast)
        })
        .await
    }

    async fn analyze_batch(
        &self,
        request: Request<proto::AnalyzeBatchRequest>,
    ) -> Result<Response<proto::AnalyzeBatchResponse>, Status> {
        self.unary("AnalyzeBatch", request, |r| self.batch(r.requests))
            .await
    }

    type AnalyzeStreamStream = AnalyzeStreamOut;

    async fn analyze_stream(
        &self,
        request: Request<Streaming<proto::AnalyzeRequest>>,
    ) -> Result<Response<Self::AnalyzeStreamStream>, Status> {
        let deadline = grpc_timeout(request.metadata()).map(|d| tokio::time::Instant::now() + d);
        let mut input = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<proto::AnalyzeResponse, Status>>(STREAM_IN_FLIGHT);
        let svc = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut in_flight = FuturesUnordered::new();
            let mut input_done = false;
            let mut outcome = Code::Ok;
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                if input_done && in_flight.is_empty() {
                    break;
                }
                tokio::select! {
                    // The client's deadline covers the whole stream, not just its start.
                    _ = &mut expired => {
                        outcome = Code::DeadlineExceeded;
                        let _ = tx.send(Err(Status::deadline_exceeded("the stream's deadline passed"))).await;
                        break;
                    }
                    msg = input.message(), if !input_done && in_flight.len() < STREAM_IN_FLIGHT => match msg {
                        Ok(Some(req)) => {
                            let svc = svc.clone();
                            in_flight.push(async move {
                                let id = req.id.clone();
                                // Streams wait for queue room instead of failing: back-pressure.
                                svc.analyze_one(req, Admission::Wait).await.map_err(|s| with_id(s, &id))
                            });
                        }
                        Ok(None) => input_done = true,
                        Err(status) => {
                            outcome = status.code();
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    },
                    Some(res) = in_flight.next(), if !in_flight.is_empty() => {
                        let failed = res.as_ref().err().map(|s| s.code());
                        if tx.send(res).await.is_err() {
                            outcome = Code::Cancelled;
                            break;
                        }
                        if let Some(code) = failed {
                            outcome = code;
                            break;
                        }
                    }
                }
            }
            record("AnalyzeStream", outcome, started);
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as Self::AnalyzeStreamStream
        ))
    }

    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        let models = self.engine.models();
        let mut infos = Vec::new();
        if let Some(n) = &models.ner {
            infos.push(proto::ModelInfo {
                task: "entities".into(),
                path: n.dir.dir.display().to_string(),
                architecture: n.dir.config.model_type.clone(),
                labels: n.model.labels().to_vec(),
                max_tokens: (n.window.size + 2) as u32,
                dtype: "f32".into(),
            });
        }
        if let Some(t) = &models.topics {
            infos.push(proto::ModelInfo {
                task: "topics".into(),
                path: t.dir.dir.display().to_string(),
                architecture: t.dir.config.model_type.clone(),
                labels: Vec::new(),
                max_tokens: (t.window.size + 2) as u32,
                dtype: "f32".into(),
            });
        }
        let cfg = self.engine.config();
        Ok(Response::new(proto::GetInfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            models: infos,
            default_topics: models
                .topics
                .as_ref()
                .map(|t| t.default_names())
                .unwrap_or_default(),
            limits: Some(proto::Limits {
                max_text_chars: self.limits.max_text_chars as u32,
                max_labels: self.limits.max_labels as u32,
                max_batch_items: self.limits.max_batch_items as u32,
                max_queue_tokens: cfg.max_queue_tokens as u32,
                max_batch_tokens: cfg.max_batch_tokens as u32,
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&md), None);
        md.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(
            grpc_timeout(&md),
            Some(std::time::Duration::from_millis(250))
        );
        md.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(grpc_timeout(&md), Some(std::time::Duration::from_secs(2)));
        md.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
    }
}
