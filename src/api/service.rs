//! The `tidings.v1.Tidings` service: validates at the door, hands work to the engine, and
//! maps every outcome to a gRPC status.

use super::convert::{
    analysis_to_proto, article_from_proto, invalid, status_of, EntityModel, Limits,
};
use super::pending::{Hold, PendingBytes};
use crate::engine::{Caller, Class, Engine};
use crate::proto::{self, tidings_server::Tidings};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, AcquireError, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

/// Requests of one stream being analyzed or waiting to be sent at once; more wait in the
/// client's send window (back-pressure).
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

/// What the service enforces, from the server's settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Request limits.
    pub limits: Limits,
    /// Longest a unary call may run, whatever deadline the client set.
    pub request_timeout: Duration,
    /// A stream that neither sends a request nor takes an answer for this long is ended.
    pub stream_idle: Duration,
    /// Largest request message, in bytes (named in the status of a larger one).
    pub max_message_bytes: usize,
    /// Bytes of stream requests held across the process, read and not yet answered
    /// ([`PendingBytes`]); as many again may be parked, one per stream, waiting for room.
    pub max_pending_bytes: usize,
}

/// The service implementation; cheap to clone.
#[derive(Clone)]
pub struct TidingsService {
    engine: Engine,
    cfg: ServiceConfig,
    /// The entity models requests may choose (`ner_model`), the default first.
    ner_models: Vec<EntityModel>,
    /// Cancelled when the server drains (after its drain delay): streams stop reading,
    /// answer what they hold and end with UNAVAILABLE.
    draining: CancellationToken,
    /// Bytes held by stream requests, shared by every stream.
    pending: PendingBytes,
}

impl TidingsService {
    /// A service over `engine` with `cfg`; `draining` is cancelled on shutdown.
    pub fn new(engine: Engine, cfg: ServiceConfig, draining: CancellationToken) -> Self {
        let ner_models = EntityModel::all_of(engine.models());
        let pending = PendingBytes::new(cfg.max_pending_bytes);
        Self {
            engine,
            cfg,
            ner_models,
            draining,
            pending,
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
            Some(d) if d < self.cfg.request_timeout => (d, "the call's deadline"),
            _ => (self.cfg.request_timeout, "the server's request timeout"),
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
        caller: Caller,
    ) -> Result<proto::AnalyzeResponse, Status> {
        let started = Instant::now();
        let id = req.id.clone();
        // Ids are checked below; the span keeps no more of one than the limit allows.
        let shown: String = id
            .chars()
            .take(self.cfg.limits.max_id_bytes.min(256))
            .collect();
        let span = crate::trace::item_span(&shown, caller.class.name());
        async move {
            let (article, labels) = article_from_proto(req, &self.cfg.limits, &self.ner_models)?;
            if article.options.entities {
                let default = self.ner_models.first().map(|m| m.name.as_str());
                if let Some(name) = article.options.ner_model.as_deref().or(default) {
                    tracing::Span::current().record("ner_model", name);
                }
            }
            let result = self
                .engine
                .analyze(article, labels.as_deref(), caller)
                .await;
            let (analysis, timing) = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "refused or failed");
                    return Err(status_of(e));
                }
            };
            let span = tracing::Span::current();
            span.record("tokens", analysis.reading.tokens);
            span.record("windows", analysis.reading.windows);
            span.record("queue_ms", timing.queue.as_secs_f64() * 1e3);
            span.record("inference_ms", timing.inference.as_secs_f64() * 1e3);
            tracing::debug!("analyzed");
            let mut resp = analysis_to_proto(analysis, timing, started.elapsed());
            resp.id = id;
            Ok(resp)
        }
        .instrument(span)
        .await
    }
}

impl TidingsService {
    /// AnalyzeBatch's work: every item analyzed, each answered or failed on its own.
    async fn batch(
        &self,
        requests: Vec<proto::AnalyzeRequest>,
    ) -> Result<proto::AnalyzeBatchResponse, Status> {
        if requests.len() > self.cfg.limits.max_batch_items {
            return Err(invalid(
                "requests",
                format!(
                    "has {} items, more than the limit of {} (max_batch_items)",
                    requests.len(),
                    self.cfg.limits.max_batch_items
                ),
            ));
        }
        // One caller for the whole call: its items take turns with other callers' work.
        let caller = self.engine.caller(Class::Interactive);
        let items = futures::future::join_all(requests.into_iter().map(|r| async move {
            let id = r.id.clone();
            batch_item(self.analyze_one(r, caller).await, id)
        }))
        .await;
        Ok(proto::AnalyzeBatchResponse { items })
    }
}

/// A batch or stream item: the analysis, or the error of this item alone.
fn batch_item(res: Result<proto::AnalyzeResponse, Status>, id: String) -> proto::AnalyzeBatchItem {
    let outcome = match res {
        Ok(resp) => proto::analyze_batch_item::Outcome::Response(resp),
        Err(s) => proto::analyze_batch_item::Outcome::Error(proto::ItemError {
            code: s.code() as i32,
            message: s.message().to_string(),
            id,
        }),
    };
    proto::AnalyzeBatchItem {
        outcome: Some(outcome),
    }
}

/// Whether a failed stream item's status concerns the whole stream (the server lacks a
/// model, or is stopping) rather than that item alone.
fn ends_the_stream(code: Code) -> bool {
    matches!(code, Code::FailedPrecondition | Code::Unavailable)
}

/// RESOURCE_EXHAUSTED, naming the limit, for tonic's OUT_OF_RANGE status of a message over
/// the size limit (gRPC's status-code guide gives RESOURCE_EXHAUSTED for it); any other
/// status unchanged.
pub fn message_size_status(status: Status, limit: usize) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        Status::resource_exhausted(format!(
            "request message too large: the server accepts messages of at most {limit} bytes \
             (--max-message-bytes); {}",
            status.message()
        ))
    } else {
        status
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
/// An id over `max_id_bytes` (itself the item's error) is named by its first bytes and size
/// in the message only: echoing it whole would put a multi-megabyte value in the trailers,
/// which clients reject as a protocol error instead of reading the status.
fn with_id(status: Status, id: &str, max_id_bytes: usize) -> Status {
    if id.is_empty() {
        return status;
    }
    let mut metadata = tonic::metadata::MetadataMap::new();
    let named = if id.len() <= max_id_bytes {
        if let Ok(v) = id.parse() {
            metadata.insert("tidings-item-id", v);
        }
        format!("{id:?}")
    } else {
        let mut cut = 32.min(id.len());
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{:?}... ({} bytes)", &id[..cut], id.len())
    };
    Status::with_details_and_metadata(
        status.code(),
        format!("item {named}: {}", status.message()),
        status.details().to_vec().into(),
        metadata,
    )
}

/// The client's deadline from the `grpc-timeout` header (`<at most 8 digits><H|M|S|m|u|n>`,
/// as gRPC's HTTP/2 protocol defines it). A malformed value is ignored, as tonic does.
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(md.get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` value (`<at most 8 digits><H|M|S|m|u|n>`) as a duration; `None` when
/// malformed.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 {
        return None;
    }
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
/// The answers of [`TidingsService::stream_items`].
pub type AnalyzeStreamItemsOut =
    Pin<Box<dyn Stream<Item = Result<proto::AnalyzeBatchItem, Status>> + Send + 'static>>;

/// How a stream RPC answers one request: `Ok` to send, or `Err` with the status that ends
/// the stream (once everything read before it has been answered).
type Answer<T> =
    Arc<dyn Fn(Result<proto::AnalyzeResponse, Status>, String) -> Result<T, Status> + Send + Sync>;

impl TidingsService {
    /// Runs a stream of requests as one batch caller and returns its answers.
    ///
    /// The task that reads requests and sends answers never blocks on either: results wait
    /// in a bounded buffer while the client is slow to read, and the stream takes no new
    /// request while [`STREAM_IN_FLIGHT`] are being analyzed or waiting to be sent. So a
    /// client that stops reading holds no queue room (every queued item is still polled, and
    /// answered work gives its room back), its deadline is still enforced, and after
    /// `stream_idle` without progress the stream ends. On drain it stops reading, answers
    /// what it holds and ends with UNAVAILABLE. A final status always gets through: it
    /// follows the answers instead of waiting for room among them.
    fn run_stream<T: Send + 'static>(
        &self,
        rpc: &'static str,
        timeout: Option<Duration>,
        input: impl Stream<Item = Result<Incoming, Status>> + Send + Unpin + 'static,
        answer: Answer<T>,
    ) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>> {
        let deadline = timeout.and_then(|d| tokio::time::Instant::now().checked_add(d));
        let (tx, rx) = mpsc::channel::<Result<T, Status>>(STREAM_IN_FLIGHT);
        let (end_tx, end_rx) = oneshot::channel::<Status>();
        let svc = self.clone();
        let started = Instant::now();
        let span = tracing::Span::current();
        let body = tokio::spawn(
            async move { StreamTask::new(svc, answer).run(input, tx, deadline).await }
                .instrument(span.clone()),
        );
        tokio::spawn(finish_stream(body, rpc, started, end_tx).instrument(span));
        let end = futures::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
        Box::pin(ReceiverStream::new(rx).chain(end))
    }
}

/// Waits for a stream's task, records the call as `rpc` and sends its final status on
/// `end`, also when the task failed: a stream must never end with OK while answers are
/// missing.
async fn finish_stream(
    body: tokio::task::JoinHandle<Option<Status>>,
    rpc: &'static str,
    started: Instant,
    end: oneshot::Sender<Status>,
) {
    let ending = body.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a stream task failed");
        Some(Status::internal(
            "the server failed while running this stream",
        ))
    });
    let code = ending.as_ref().map_or(Code::Ok, |s| s.code());
    record(rpc, code, started);
    tracing::debug!(status = ?code, ms = started.elapsed().as_secs_f64() * 1e3, "stream ended");
    if let Some(status) = ending {
        let _ = end.send(status);
    }
}

/// The task of one stream ([`TidingsService::run_stream`]): what it has read and not yet
/// answered, and the status it is to end with. Each event of its loop is a method that says
/// whether the stream ends now.
struct StreamTask<T> {
    svc: TidingsService,
    /// The stream's one batch caller.
    caller: Caller,
    answer: Answer<T>,
    /// Requests being analyzed (or refused), each ending with the id its answer carries.
    in_flight: FuturesUnordered<BoxFuture<'static, Outcome>>,
    intake: Intake,
    /// Answers waiting, in order, for room among those sent.
    ready: VecDeque<T>,
    /// Whether it still reads requests.
    reading: bool,
    /// Whether the client has sent its last request.
    input_done: bool,
    /// The status it ends with once everything read before it is answered (`None`: OK).
    ending: Option<Status>,
    /// When a request was last read or an answer last sent.
    progress: tokio::time::Instant,
}

impl<T: Send + 'static> StreamTask<T> {
    /// A stream of `svc` that answers with `answer`, as a new batch caller.
    fn new(svc: TidingsService, answer: Answer<T>) -> Self {
        Self {
            caller: svc.engine.caller(Class::Batch),
            svc,
            answer,
            in_flight: FuturesUnordered::new(),
            intake: Intake::default(),
            ready: VecDeque::new(),
            reading: true,
            input_done: false,
            ending: None,
            progress: tokio::time::Instant::now(),
        }
    }

    /// Reads `input` and sends answers on `tx` until the stream ends; returns its final
    /// status.
    async fn run(
        mut self,
        mut input: impl Stream<Item = Result<Incoming, Status>> + Send + Unpin + 'static,
        tx: mpsc::Sender<Result<T, Status>>,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<Status> {
        let draining = self.svc.draining.clone();
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        loop {
            if !self.reading && self.in_flight.is_empty() && self.ready.is_empty() {
                break;
            }
            let idle_at = self.progress + self.svc.cfg.stream_idle;
            let flow = tokio::select! {
                // The client's deadline covers the whole stream, not just its start.
                _ = &mut expired => {
                    self.end(Status::deadline_exceeded("the stream's deadline passed"))
                }
                _ = tx.closed() => self.end(Status::cancelled("the client went away")),
                _ = draining.cancelled(), if self.reading => self.drain(),
                _ = tokio::time::sleep_until(idle_at) => self.idle(),
                msg = input.next(), if self.may_read() => self.read(msg),
                unblocked = self.intake.unblocked(), if self.intake.blocked() => {
                    self.unblocked(unblocked)
                }
                Some((res, id)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.answered(res, id)
                }
                permit = tx.reserve(), if !self.ready.is_empty() => self.send(permit),
            };
            if flow.is_break() {
                break;
            }
        }
        self.ending
    }

    /// Ends the stream now with `status`.
    fn end(&mut self, status: Status) -> ControlFlow<()> {
        self.ending = Some(status);
        ControlFlow::Break(())
    }

    /// The server drains: read no more, and unless the client had sent everything, end
    /// with UNAVAILABLE once what was read is answered.
    fn drain(&mut self) -> ControlFlow<()> {
        self.reading = false;
        if !self.input_done {
            self.ending.get_or_insert_with(|| {
                Status::unavailable(
                    "the server is shutting down: requests not answered on this stream were \
                     not read; send them again",
                )
            });
        }
        ControlFlow::Continue(())
    }

    /// `stream_idle` passed without progress: the stream ends, unless the wait is the
    /// server's own (its work in flight, no answer waiting for the client).
    fn idle(&mut self) -> ControlFlow<()> {
        if (self.in_flight.is_empty() && !self.intake.blocked()) || !self.ready.is_empty() {
            return self.end(Status::unavailable(format!(
                "the stream made no progress for {:?} (no request sent, no answer read): \
                 closed; send unanswered requests again",
                self.svc.cfg.stream_idle
            )));
        }
        // The server itself is busy with this stream's work.
        self.progress = tokio::time::Instant::now();
        ControlFlow::Continue(())
    }

    /// Whether it reads the next request now: it is reading, not blocked, and has room.
    fn may_read(&self) -> bool {
        self.reading
            && !self.intake.blocked()
            && self.in_flight.len() + self.ready.len() < STREAM_IN_FLIGHT
    }

    /// A request read (`Some(Ok)`), the end of the requests (`None`), or a stream error,
    /// which ends the stream once what was read is answered.
    fn read(&mut self, msg: Option<Result<Incoming, Status>>) -> ControlFlow<()> {
        self.progress = tokio::time::Instant::now();
        match msg {
            Some(Ok(incoming)) => {
                if let Some(work) = self.intake.take(&self.svc, incoming, self.caller) {
                    self.in_flight.push(work);
                }
            }
            None => {
                self.input_done = true;
                self.reading = false;
            }
            Some(Err(status)) => {
                self.reading = false;
                self.ending
                    .get_or_insert(message_size_status(status, self.svc.cfg.max_message_bytes));
            }
        }
        ControlFlow::Continue(())
    }

    /// The intake may read again, with the parked request and its room when one was
    /// parked; the stream ends when the server stops.
    fn unblocked(
        &mut self,
        unblocked: Result<Option<(Incoming, OwnedSemaphorePermit)>, AcquireError>,
    ) -> ControlFlow<()> {
        match unblocked {
            Ok(Some((incoming, room))) => {
                let work = self.svc.clone().answer_one(incoming, self.caller, room);
                self.in_flight.push(work);
            }
            Ok(None) => {}
            Err(_) => {
                self.ending
                    .get_or_insert_with(|| Status::unavailable("the server is shutting down"));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// A request's outcome: its answer waits to be sent, or its status ends the stream
    /// once what was read before it is answered.
    fn answered(
        &mut self,
        res: Result<proto::AnalyzeResponse, Status>,
        id: String,
    ) -> ControlFlow<()> {
        match (self.answer)(res, id) {
            Ok(out) => self.ready.push_back(out),
            Err(status) => {
                self.reading = false;
                self.ending.get_or_insert(status);
            }
        }
        ControlFlow::Continue(())
    }

    /// Room for the next answer (sent, in order), or a client that went away.
    fn send(
        &mut self,
        permit: Result<mpsc::Permit<'_, Result<T, Status>>, mpsc::error::SendError<()>>,
    ) -> ControlFlow<()> {
        let Ok(permit) = permit else {
            return self.end(Status::cancelled("the client went away"));
        };
        if let Some(out) = self.ready.pop_front() {
            permit.send(Ok(out));
        }
        self.progress = tokio::time::Instant::now();
        ControlFlow::Continue(())
    }
}

/// One request read from a stream: a request to analyze, or one that could not be read and
/// is answered with its error in its place (a malformed line of an NDJSON stream).
pub enum Incoming {
    /// A request to analyze.
    Request(proto::AnalyzeRequest),
    /// A request that could not be read: `status` is its answer, under `id` (may be empty).
    Invalid {
        /// The id the answer carries.
        id: String,
        /// Why it could not be read.
        status: Status,
    },
}

/// What a stream does with the requests it reads, within the process's budget of request
/// bytes ([`PendingBytes`]): each goes on to the engine holding its bytes, or is parked (the
/// stream reads nothing more until it has room), or is refused (and the stream reads its
/// next only once a request of that size could be parked).
#[derive(Default)]
struct Intake {
    /// The parked request and the parked bytes it holds.
    parked: Option<(Incoming, OwnedSemaphorePermit)>,
    /// Room for it, once there is some.
    room_for_parked: Option<BoxFuture<'static, Result<OwnedSemaphorePermit, AcquireError>>>,
    /// After a refusal: resolves when a request of its size could be parked.
    parking_room: Option<BoxFuture<'static, ()>>,
}

impl Intake {
    /// Whether the stream must not read now.
    fn blocked(&self) -> bool {
        self.parked.is_some() || self.parking_room.is_some()
    }

    /// A request just read: its work (answered with its bytes held, or refused), or `None`
    /// when it is parked.
    fn take(
        &mut self,
        svc: &TidingsService,
        incoming: Incoming,
        caller: Caller,
    ) -> Option<BoxFuture<'static, Outcome>> {
        let bytes = incoming.bytes();
        match svc.pending.try_hold(bytes) {
            Hold::Room(room) => Some(svc.clone().answer_one(incoming, caller, room)),
            Hold::Parked(waiting) => {
                self.room_for_parked = Some(Box::pin(svc.pending.clone().hold(bytes)));
                self.parked = Some((incoming, waiting));
                None
            }
            Hold::Refused => {
                let status = Status::resource_exhausted(format!(
                    "server busy: it holds its limit of {} bytes of stream requests, read and \
                     not yet answered; send this one again later",
                    svc.pending.limit()
                ));
                let id = incoming.id().to_string();
                self.parking_room = Some(Box::pin(svc.pending.clone().parking_room(bytes)));
                Some(Box::pin(async move { (Err(status), id) }))
            }
        }
    }

    /// Waits until the stream may read again: with the parked request and its room when one
    /// was parked; `Err` when the server stops.
    async fn unblocked(
        &mut self,
    ) -> Result<Option<(Incoming, OwnedSemaphorePermit)>, AcquireError> {
        if let Some(wait) = self.parking_room.as_mut() {
            wait.await;
            self.parking_room = None;
            return Ok(None);
        }
        let Some(wait) = self.room_for_parked.as_mut() else {
            return Ok(None);
        };
        let room = wait.await;
        self.room_for_parked = None;
        // Set together with `room_for_parked`; the parked bytes go back here.
        let parked = self.parked.take().map(|(incoming, _parked)| incoming);
        room.map(|r| parked.map(|incoming| (incoming, r)))
    }
}

impl Incoming {
    /// The id its answer carries.
    fn id(&self) -> &str {
        match self {
            Incoming::Request(r) => &r.id,
            Incoming::Invalid { id, .. } => id,
        }
    }

    /// Bytes it holds while it waits and runs: its size as sent.
    fn bytes(&self) -> usize {
        match self {
            Incoming::Request(r) => prost::Message::encoded_len(r),
            Incoming::Invalid { id, .. } => id.len(),
        }
    }
}

/// One stream request's outcome and the id its answer carries.
type Outcome = (Result<proto::AnalyzeResponse, Status>, String);

impl TidingsService {
    /// Analyzes one stream request (waiting for queue room rather than failing), holding
    /// `room`, its bytes of [`PendingBytes`], until it is answered.
    fn answer_one(
        self,
        incoming: Incoming,
        caller: Caller,
        room: OwnedSemaphorePermit,
    ) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            let outcome = match incoming {
                Incoming::Request(req) => {
                    let id = req.id.clone();
                    (self.analyze_one(req, caller).await, id)
                }
                Incoming::Invalid { id, status } => (Err(status), id),
            };
            drop(room);
            outcome
        })
    }

    /// AnalyzeStreamItems over any stream of requests (gRPC, or HTTP's NDJSON lines): each
    /// request is answered by an item, a stream-level `Err` ends the stream after the answers.
    /// `timeout` bounds the whole stream.
    pub fn stream_items(
        &self,
        timeout: Option<Duration>,
        input: impl Stream<Item = Result<Incoming, Status>> + Send + Unpin + 'static,
    ) -> AnalyzeStreamItemsOut {
        let answer: Answer<_> = Arc::new(|res, id| match res {
            Err(s) if ends_the_stream(s.code()) => Err(s),
            res => Ok(batch_item(res, id)),
        });
        self.run_stream("AnalyzeStreamItems", timeout, input, answer)
    }
}

#[tonic::async_trait]
impl Tidings for TidingsService {
    async fn analyze(
        &self,
        request: Request<proto::AnalyzeRequest>,
    ) -> Result<Response<proto::AnalyzeResponse>, Status> {
        self.unary("Analyze", request, |r| {
            self.analyze_one(r, self.engine.caller(Class::Interactive))
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
        let timeout = grpc_timeout(request.metadata());
        let input = request.into_inner().map(|r| r.map(Incoming::Request));
        let max_id_bytes = self.cfg.limits.max_id_bytes;
        Ok(Response::new(self.run_stream(
            "AnalyzeStream",
            timeout,
            input,
            Arc::new(move |res, id| res.map_err(|s| with_id(s, &id, max_id_bytes))),
        )))
    }

    type AnalyzeStreamItemsStream = AnalyzeStreamItemsOut;

    async fn analyze_stream_items(
        &self,
        request: Request<Streaming<proto::AnalyzeRequest>>,
    ) -> Result<Response<Self::AnalyzeStreamItemsStream>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let input = request.into_inner().map(|r| r.map(Incoming::Request));
        Ok(Response::new(self.stream_items(timeout, input)))
    }

    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        let models = self.engine.models();
        let infos = model_infos(models);
        let cfg = self.engine.config();
        Ok(Response::new(proto::GetInfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            models: infos,
            default_ner_model: models
                .ner
                .as_ref()
                .map_or(String::new(), |n| n.name.clone()),
            default_topics: models
                .topics
                .as_ref()
                .map(|t| t.default_names())
                .unwrap_or_default(),
            topic_heads: models
                .topics
                .iter()
                .flat_map(|t| &t.heads)
                .map(|(name, h)| proto::TopicHead {
                    name: name.clone(),
                    labels: h.names.clone(),
                })
                .collect(),
            topic_memory: self.engine.topic_memory().map(|m| proto::TopicMemory {
                name: m.name.clone(),
                articles: m.vectors.len() as u32,
                sha256: m.sha256.clone(),
            }),
            limits: Some(proto::Limits {
                max_text_chars: self.cfg.limits.max_text_chars as u32,
                max_labels: self.cfg.limits.max_labels as u32,
                max_batch_items: self.cfg.limits.max_batch_items as u32,
                max_queue_tokens: cfg.max_queue_tokens as u32,
                max_batch_tokens: cfg.max_batch_tokens as u32,
            }),
        }))
    }
}

/// GetInfo's models: one entry per NER model (the default first), then the topic model.
fn model_infos(models: &crate::pipeline::analysis::Models) -> Vec<proto::ModelInfo> {
    let mut infos: Vec<proto::ModelInfo> = models
        .ner_models()
        .enumerate()
        .map(|(i, n)| proto::ModelInfo {
            task: "entities".into(),
            name: n.name.clone(),
            path: n.dir.dir.display().to_string(),
            architecture: n.dir.config.model_type.clone(),
            labels: n.model.labels().to_vec(),
            max_tokens: (n.window.size + 2) as u32,
            dtype: n.model.precision().to_string(),
            // Only the default NER model's encoder serves topics.
            shared_encoder: models.shared_encoder && i == 0,
            kernel: n.model.kernel().into(),
            engine: n.model.engine().into(),
        })
        .collect();
    if let Some(t) = &models.topics {
        infos.push(proto::ModelInfo {
            task: "topics".into(),
            // The topic encoder's directory name: requests do not choose it.
            name: crate::pipeline::analysis::model_name(&t.dir.dir),
            path: t.dir.dir.display().to_string(),
            architecture: t.dir.config.model_type.clone(),
            labels: Vec::new(),
            max_tokens: (t.window.size + 2) as u32,
            dtype: t.model.precision().to_string(),
            shared_encoder: models.shared_encoder,
            kernel: t.model.kernel().into(),
            engine: t.model.engine().into(),
        });
    }
    infos
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
