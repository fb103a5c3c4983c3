//! `tidings batch`: a client for large JSONL jobs against one or many running servers.
//!
//! Streams `{"id","text","title"?}` lines through `AnalyzeStreamItems`, with a bounded number
//! in flight per server, and writes one JSON line per result as it comes. With several
//! servers (`--server` repeated, or a `dns:///name:port` that resolves to many addresses and
//! is resolved again periodically) each gets its own stream and takes work from one shared
//! queue, so faster replicas take more. When a server fails or drains, what it had not
//! answered goes back to the queue for the others. A run resumes from what the output already
//! holds: no id is lost and none is written twice.
//!
//! Item identity never rides on what a server echoes: requests carry their index in the job
//! as their wire id, and the user's id (any string, empty or not ASCII) is put back when the
//! answer is written. Only an item the server refuses as invalid (INVALID_ARGUMENT) is written
//! as an error line; an error about the server (a missing model, a refused token) stops the
//! job without writing anything for the item, and anything else is retried.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tidings::proto::{
    analyze_batch_item::Outcome, tidings_client::TidingsClient, AnalyzeRequest, GetInfoRequest,
    Task,
};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Flags of `tidings batch`.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// Input JSONL: one `{"id", "text", "title"?}` object per line.
    #[arg(long)]
    input: PathBuf,
    /// Output JSONL: one AnalyzeResponse (or `{"id","error"}`) per line; appended to on resume.
    #[arg(long)]
    output: PathBuf,
    /// Server URL; repeat for several replicas. `dns:///NAME:PORT` stands for every address
    /// NAME resolves to (e.g. a Kubernetes headless service), resolved again every
    /// `--resolve-every-s`.
    #[arg(
        long,
        env = "TIDINGS_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_delimiter = ','
    )]
    server: Vec<String>,
    /// Requests in flight at once on each server.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Consecutive failed attempts (no progress) on a server before it is given up; the job
    /// fails when every server is given up.
    #[arg(long, default_value_t = 8)]
    retries: u32,
    /// Topics to keep per article (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Tasks to run (default: topics and entities; the job stops before sending anything if
    /// a server lacks a model for them).
    #[arg(long, value_enum, value_delimiter = ',')]
    tasks: Vec<TaskArg>,
    /// Seconds between resolutions of `dns:///` servers.
    #[arg(long, default_value_t = 30)]
    resolve_every_s: u64,
    /// File holding the bearer token the servers ask for (`serve --auth-token-file`); sent as
    /// `authorization: Bearer <token>`. TIDINGS_AUTH_TOKEN sets the token itself.
    #[arg(long, env = "TIDINGS_AUTH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the servers' certificates: talk TLS (`https://`) to
    /// every server, bare `host:port` and `dns:///` ones included.
    #[arg(long, env = "TIDINGS_TLS_CA")]
    ca_cert: Option<PathBuf>,
    /// Client certificate chain (PEM), for servers that require one (`serve --tls-client-ca`).
    #[arg(long, env = "TIDINGS_TLS_CLIENT_CERT", requires_all = ["client_key", "ca_cert"])]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "TIDINGS_TLS_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Name the servers' certificates are checked against; default: the host of each
    /// `--server` (the name of a `dns:///` one, not its addresses).
    #[arg(long, env = "TIDINGS_TLS_DOMAIN", requires = "ca_cert")]
    tls_domain: Option<String>,
}

/// How the job reaches secured servers: TLS settings and the bearer token.
#[derive(Clone, Default)]
struct Access {
    tls: Option<tonic::transport::ClientTlsConfig>,
    domain: Option<String>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Access {
    /// From the command line (files read, and checked, once).
    fn from_args(a: &BatchArgs) -> Result<Self> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        let tls = match &a.ca_cert {
            Some(ca) => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
                if let (Some(c), Some(k)) = (&a.client_cert, &a.client_key) {
                    tls = tls.identity(Identity::from_pem(
                        read(c, "client certificate")?,
                        read(k, "client key")?,
                    ));
                }
                Some(tls)
            }
            None => None,
        };
        let token = match (&a.token_file, std::env::var("TIDINGS_AUTH_TOKEN").ok()) {
            (Some(p), _) => {
                Some(String::from_utf8(read(p, "token file")?).context("the token is not UTF-8")?)
            }
            (None, t) => t,
        };
        // TLS applies to `https://` URLs only: an explicit `http://` one would carry the
        // articles (and a token) in the clear while the flags promise otherwise.
        if let Some(plain) = a.server.iter().find(|s| s.starts_with("http://")) {
            if tls.is_some() {
                bail!("--server {plain} is plaintext while --ca-cert asks for TLS: use https:// or host:port");
            }
        }
        if (a.token_file.is_some() || token.is_some()) && tls.is_none() {
            bail!(
                "a bearer token is only sent over TLS (as serve only takes one with TLS): give \
                 --ca-cert"
            );
        }
        let token = match token.map(|t| t.trim().to_string()) {
            Some(t) if t.is_empty() => bail!("the bearer token is empty"),
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("the bearer token is not a valid header value")?,
            ),
            None => None,
        };
        Ok(Self {
            tls,
            domain: a.tls_domain.clone(),
            token,
        })
    }

    /// `msg` as a request carrying the token, if any.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        req
    }
}

/// A task on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TaskArg {
    Topics,
    Entities,
}

#[derive(serde::Deserialize)]
struct InputLine {
    id: String,
    text: String,
    #[serde(default)]
    title: String,
}

/// An error line of the output: the id first, like every line (resume relies on it).
#[derive(serde::Serialize)]
struct ErrorLine<'a> {
    id: &'a str,
    error: ErrorBody<'a>,
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    code: i32,
    message: &'a str,
}

/// The start every output line is written with; a torn last line is ours only if it has it.
const LINE_START: &str = "{\"id\":";

/// Whether an unfinished last line can be what a crash mid-write left of one of our lines:
/// its start (however little of it), or zero bytes a lost write left behind.
fn torn_tail(line: &[u8]) -> bool {
    let start = LINE_START.as_bytes();
    line.starts_with(start) || start.starts_with(line) || line.iter().all(|&b| b == 0)
}

/// Ids already in `output`, after checking it is ours: every complete line a JSON object with
/// a string `id`. A torn last line (a crash mid-write) is cut off; anything else that does
/// not parse is an error naming the line, and nothing is changed.
fn done_ids(output: &Path) -> Result<HashSet<String>> {
    let mut done = HashSet::new();
    if !output.exists() {
        return Ok(done);
    }
    let mut bytes = Vec::new();
    std::fs::File::open(output)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", output.display()))?;
    let mut good_len = 0usize;
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        let complete = line.ends_with(b"\n");
        let value = std::str::from_utf8(line)
            .ok()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        // A line with a top-level "text" is an input line: results never carry it.
        if value.as_ref().is_some_and(|v| v.get("text").is_some()) {
            bail!(
                "{}: line {} has a \"text\": it is an input line, not a result of tidings \
                 batch; not touching the file. Use another --output",
                output.display(),
                i + 1
            );
        }
        let id = value.and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string));
        match (id, complete) {
            (Some(id), true) => {
                done.insert(id);
                good_len += line.len();
            }
            (_, false) if torn_tail(line) => {
                eprintln!(
                    "batch: cutting a torn line (line {}) off the end of {}",
                    i + 1,
                    output.display()
                );
            }
            _ => bail!(
                "{}: line {} is not a result line of tidings batch (a JSON object with an \
                 \"id\"); not touching the file. Use another --output, or remove the line",
                output.display(),
                i + 1
            ),
        }
    }
    if good_len < bytes.len() {
        let file = std::fs::OpenOptions::new().write(true).open(output)?;
        file.set_len(good_len as u64)?;
    }
    Ok(done)
}

/// Whether two paths name one file (the same file system object, links followed); false when
/// either does not exist.
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    matches!(
        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
        (Ok(x), Ok(y)) if x == y
    )
}

/// One input item: its index in the job is its wire id.
#[derive(Clone)]
struct Item {
    id: String,
    request: AnalyzeRequest,
}

/// What a server said of an item, for the writer.
enum Answered {
    Done(Box<tidings::proto::AnalyzeResponse>),
    Invalid { code: i32, message: String },
}

/// The work shared by the servers' streams.
struct Queue {
    pending: Mutex<VecDeque<usize>>,
    /// Wakes streams when items come back to `pending`.
    returned: Notify,
    /// Failed attempts of items a server answered with an error that is not theirs.
    failures: Mutex<HashMap<usize, u32>>,
}

impl Queue {
    fn pop(&self) -> Option<usize> {
        self.pending.lock().pop_front()
    }

    fn give_back(&self, items: impl IntoIterator<Item = usize>) {
        let mut p = self.pending.lock();
        for i in items {
            p.push_front(i);
        }
        drop(p);
        self.returned.notify_waiters();
    }
}

/// Runs the job.
pub fn run(a: BatchArgs) -> Result<()> {
    check_args(&a)?;
    let access = Access::from_args(&a)?;
    let done = done_ids(&a.output)?;
    let (items, total) = read_items(&a, &done)?;
    eprintln!(
        "batch: {total} items, {} already in {}, {} to do",
        total - items.len(),
        a.output.display(),
        items.len()
    );
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.output)?;
    let mut out = std::io::BufWriter::new(out);
    out.seek(std::io::SeekFrom::End(0))?;
    let bar = progress_bar(total, total - items.len());
    let rt = super::runtime()?;
    let result = rt.block_on(drive(&a, &access, items, &mut out, &bar));
    out.flush()?;
    let failed = result?;
    bar.finish();
    eprintln!(
        "batch: finished, {failed} items with errors (written as {{\"id\",\"error\"}} lines)"
    );
    Ok(())
}

/// Refuses flags that cannot make a job: no concurrency, no server, the input as output.
fn check_args(a: &BatchArgs) -> Result<()> {
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.server.is_empty() {
        bail!("--server: name at least one server");
    }
    if same_file(&a.input, &a.output) {
        bail!(
            "--output {} is the --input file: results would overwrite the articles. Write them \
             to another file",
            a.output.display()
        );
    }
    Ok(())
}

/// The input's items not in `done`, each with its index among them as its wire id, and how
/// many items the input holds. Blank lines are skipped; a line that is not an item, or an id
/// given twice, is an error naming the line.
fn read_items(a: &BatchArgs, done: &HashSet<String>) -> Result<(Vec<Item>, usize)> {
    let reader = BufReader::new(
        std::fs::File::open(&a.input).with_context(|| format!("opening {}", a.input.display()))?,
    );
    let tasks: Vec<i32> = a
        .tasks
        .iter()
        .map(|t| match t {
            TaskArg::Topics => Task::Topics as i32,
            TaskArg::Entities => Task::Entities as i32,
        })
        .collect();
    let mut items: Vec<Item> = Vec::new();
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let item: InputLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: not a {{\"id\",\"text\"}} object",
                a.input.display(),
                i + 1
            )
        })?;
        if !seen.insert(item.id.clone()) {
            bail!(
                "{}:{}: duplicate id {:?}",
                a.input.display(),
                i + 1,
                item.id
            );
        }
        total += 1;
        if !done.contains(&item.id) {
            items.push(Item {
                request: AnalyzeRequest {
                    id: items.len().to_string(),
                    text: item.text,
                    title: item.title,
                    top_k: a.top_k,
                    tasks: tasks.clone(),
                    ..Default::default()
                },
                id: item.id,
            });
        }
    }
    Ok((items, total))
}

/// The job's progress bar over `total` items, `done` of them already.
fn progress_bar(total: usize, done: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
}

/// Everything a server's stream needs.
#[derive(Clone)]
struct Lane {
    url: String,
    /// The name its certificate is checked against, when not the URL's host.
    name: Option<String>,
    access: Access,
    concurrency: usize,
    retries: u32,
    items: Arc<Vec<Item>>,
    queue: Arc<Queue>,
    results: mpsc::Sender<LaneEvent>,
    /// Tasks asked for (empty: all).
    tasks: Vec<TaskArg>,
}

/// What a lane reports to the writer.
enum LaneEvent {
    /// Item `index` is answered.
    Answer(usize, Answered),
    /// A status message for the progress bar.
    Note(String),
    /// The job cannot go on: an error about the servers, not the items.
    Fatal(anyhow::Error),
    /// The lane gave up on its server (`url`) after `retries` attempts without progress.
    GaveUp { url: String, why: String },
}

/// Streams everything in `items` through the servers; returns how many items were written
/// as errors.
async fn drive(
    a: &BatchArgs,
    access: &Access,
    items: Vec<Item>,
    out: &mut impl Write,
    bar: &indicatif::ProgressBar,
) -> Result<usize> {
    let mut outstanding = items.len();
    if outstanding == 0 {
        return Ok(0);
    }
    let queue = Arc::new(Queue {
        pending: Mutex::new((0..items.len()).collect()),
        returned: Notify::new(),
        failures: Mutex::new(HashMap::new()),
    });
    let items = Arc::new(items);
    let (events_tx, mut events) = mpsc::channel::<LaneEvent>(1024);
    // Every lane is this one with its server's URL and name.
    let template = Lane {
        url: String::new(),
        name: None,
        access: access.clone(),
        concurrency: a.concurrency,
        retries: a.retries,
        items: items.clone(),
        queue,
        results: events_tx,
        tasks: a.tasks.clone(),
    };
    let mut lanes: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut given_up: HashSet<String> = HashSet::new();
    let mut written: HashSet<usize> = HashSet::new();
    let mut failed = 0usize;
    let mut resolve = tokio::time::interval(Duration::from_secs(a.resolve_every_s.max(1)));
    let result = loop {
        tokio::select! {
            _ = resolve.tick() => {
                start_lanes(&a.server, &template, &mut lanes, &given_up).await;
                if lanes.is_empty() {
                    break Err(anyhow::anyhow!("no server address: {:?} resolved to nothing", a.server));
                }
            }
            Some(ev) = events.recv() => match ev {
                LaneEvent::Answer(i, outcome) => {
                    if !written.insert(i) {
                        continue; // answered twice (a retry raced a late answer): once is kept
                    }
                    if write_answer(out, &items[i], outcome)? {
                        failed += 1;
                    }
                    bar.inc(1);
                    outstanding -= 1;
                    if outstanding == 0 {
                        break Ok(failed);
                    }
                }
                LaneEvent::Note(m) => bar.set_message(m),
                LaneEvent::Fatal(e) => break Err(e),
                LaneEvent::GaveUp { url, why } => {
                    eprintln!("batch: giving up {url} after {} failed attempts: {why}", a.retries + 1);
                    given_up.insert(url);
                    if lanes.keys().all(|u| given_up.contains(u)) {
                        break Err(anyhow::anyhow!(
                            "every server failed {} times in a row (last: {why}): {}",
                            a.retries + 1,
                            given_up.iter().cloned().collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
            },
        }
    };
    for h in lanes.values() {
        h.abort();
    }
    result
}

/// Starts a lane, like `template` but for its server, on each endpoint `servers` stand for
/// now that has no lane running and was not given up.
async fn start_lanes(
    servers: &[String],
    template: &Lane,
    lanes: &mut HashMap<String, tokio::task::JoinHandle<()>>,
    given_up: &HashSet<String>,
) {
    for (url, name) in endpoints(servers, template.access.tls.is_some()).await {
        if lanes.get(&url).is_some_and(|h| !h.is_finished()) || given_up.contains(&url) {
            continue;
        }
        let lane = Lane {
            url: url.clone(),
            name,
            ..template.clone()
        };
        lanes.insert(url, tokio::spawn(lane.run()));
    }
}

/// Writes the line of `item`'s answer (the user's id put back) and flushes it; returns
/// whether it is an error line.
fn write_answer(out: &mut impl Write, item: &Item, outcome: Answered) -> Result<bool> {
    let error = match outcome {
        Answered::Done(mut resp) => {
            resp.id = item.id.clone();
            serde_json::to_writer(&mut *out, &resp)?;
            false
        }
        Answered::Invalid { code, message } => {
            let line = ErrorLine {
                id: &item.id,
                error: ErrorBody {
                    code,
                    message: &message,
                },
            };
            serde_json::to_writer(&mut *out, &line)?;
            true
        }
    };
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(error)
}

/// The endpoints `specs` stand for now, each with the name its certificate is checked
/// against when that is not the URL's host: `dns:///name:port` (or `dns://name:port`)
/// resolved to one `http://ip:port` per address (checked against `name`), a bare `host:port`
/// (as `serve --addr` and grpcurl take it) as `http://host:port`, anything else as it is.
/// With `tls`, the schemes they are given are `https`.
async fn endpoints(specs: &[String], tls: bool) -> Vec<(String, Option<String>)> {
    let scheme = if tls { "https" } else { "http" };
    let mut out = Vec::new();
    for spec in specs {
        let Some(rest) = spec.strip_prefix("dns:") else {
            if spec.contains("://") {
                out.push((spec.clone(), None));
            } else {
                out.push((format!("{scheme}://{spec}"), None));
            }
            continue;
        };
        let host = rest.trim_start_matches('/');
        let name = host.rsplit_once(':').map_or(host, |(n, _)| n).to_string();
        match tokio::net::lookup_host(host).await {
            Ok(addrs) => {
                let mut addrs: Vec<_> = addrs.collect();
                addrs.sort();
                addrs.dedup();
                out.extend(
                    addrs
                        .into_iter()
                        .map(|a| (format!("{scheme}://{a}"), Some(name.clone()))),
                );
            }
            Err(e) => eprintln!("batch: cannot resolve {host}: {e}"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Whether a status is about the server or the job (it will not pass by retrying) rather
/// than one item or a passing fault.
fn fatal(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::InvalidArgument
    )
}

impl Lane {
    /// Streams work from the queue to this lane's server until nothing is left, reconnecting
    /// with back-off; gives its unanswered items back whenever a stream fails.
    async fn run(self) {
        let mut attempts = 0u32;
        loop {
            if self.queue.pending.lock().is_empty() {
                // Nothing to do now; items may come back from another server's failure.
                let wake = self.queue.returned.notified();
                tokio::select! {
                    _ = wake => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            match self.stream().await {
                Ok(true) => attempts = 0,
                // A stream that ended with nothing answered: back off as after a failure.
                Ok(false) => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempts.min(6))))
                        .await;
                }
                Err(StreamError::Fatal(e)) => {
                    let _ = self.results.send(LaneEvent::Fatal(e)).await;
                    return;
                }
                Err(StreamError::Retry { why, progress }) => {
                    if progress {
                        attempts = 0;
                    }
                    attempts += 1;
                    if attempts > self.retries {
                        let _ = self
                            .results
                            .send(LaneEvent::GaveUp {
                                url: self.url.clone(),
                                why,
                            })
                            .await;
                        return;
                    }
                    let wait = Duration::from_millis(200 * 2u64.pow(attempts.min(6)));
                    let _ = self
                        .results
                        .send(LaneEvent::Note(format!(
                            "{}: retry {attempts} in {wait:?}: {why}",
                            self.url
                        )))
                        .await;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Connects, and checks the server has the models the job needs; returns the client and
    /// the server's `max_text_chars`.
    async fn connect(&self) -> Result<(TidingsClient<Channel>, usize), StreamError> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| StreamError::Fatal(anyhow::anyhow!("server URL {}: {e}", self.url)))?;
        if let Some(tls) = &self.access.tls {
            let mut tls = tls.clone();
            if let Some(name) = self.access.domain.as_ref().or(self.name.as_ref()) {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                StreamError::Fatal(anyhow::anyhow!("TLS settings for {}: {e}", self.url))
            })?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let channel = endpoint.connect().await.map_err(|e| {
            // The transport error alone says "transport error"; its sources say why.
            let mut why = format!("cannot connect to {}: {e}", self.url);
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                why.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            StreamError::Retry {
                why,
                progress: false,
            }
        })?;
        let mut client = TidingsClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        // A server that lacks a model the job needs is an error about the server: say so
        // before sending anything.
        let info = client
            .get_info(self.access.request(GetInfoRequest {}))
            .await
            .map_err(|s| classify(s, false))?
            .into_inner();
        for (task, name) in [(TaskArg::Topics, "topics"), (TaskArg::Entities, "entities")] {
            let wanted = self.tasks.is_empty() || self.tasks.contains(&task);
            if wanted && !info.models.iter().any(|m| m.task == name) {
                return Err(StreamError::Fatal(anyhow::anyhow!(
                    "{} has no {name} model loaded; ask only for what it has (--tasks {})",
                    self.url,
                    if name == "topics" {
                        "entities"
                    } else {
                        "topics"
                    }
                )));
            }
        }
        let max_chars = info
            .limits
            .map_or(usize::MAX, |l| l.max_text_chars as usize);
        Ok((client, max_chars))
    }

    /// One stream: sends queued items (at most `concurrency` unanswered), half-closes when
    /// the queue is empty, and reports answers. Returns whether any item was answered.
    async fn stream(&self) -> Result<bool, StreamError> {
        let (mut client, max_chars) = self.connect().await?;
        let (tx, rx) = mpsc::channel::<AnalyzeRequest>(self.concurrency);
        let mut tx = Some(tx);
        let mut in_flight: HashMap<usize, ()> = HashMap::new();
        let mut progress = false;
        // Items over the server's text limit are answered here: sent, one could end the
        // whole stream (a message over the size limit) instead of failing alone.
        let mut refused: Vec<usize> = Vec::new();
        self.fill(&mut tx, &mut in_flight, &mut refused, max_chars);
        progress |= self.refuse(&mut refused, max_chars).await;
        let requests = self.access.request(ReceiverStream::new(rx));
        let mut responses = match client.analyze_stream_items(requests).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                self.queue.give_back(in_flight.into_keys());
                return Err(classify(s, false));
            }
        };
        let outcome = loop {
            match responses.message().await {
                Ok(Some(item)) => {
                    let Some((i, outcome)) = self.answer_of(item, &mut in_flight) else {
                        continue;
                    };
                    match outcome {
                        Ok(o) => {
                            progress = true;
                            if self.results.send(LaneEvent::Answer(i, o)).await.is_err() {
                                return Ok(progress);
                            }
                        }
                        Err(message) => self.retry(i, &message, &mut in_flight).await?,
                    }
                    self.fill(&mut tx, &mut in_flight, &mut refused, max_chars);
                    progress |= self.refuse(&mut refused, max_chars).await;
                    if tx.is_none() && in_flight.is_empty() {
                        break Ok(());
                    }
                }
                Ok(None) if in_flight.is_empty() => break Ok(()),
                Ok(None) => {
                    break Err(Status::unavailable(
                        "the stream ended before every item was answered",
                    ))
                }
                Err(s) => break Err(s),
            }
        };
        // Whatever was not answered goes back for any server to take.
        self.queue.give_back(in_flight.into_keys());
        outcome
            .map(|()| progress)
            .map_err(|s| classify(s, progress))
    }

    /// Sends queued items on `tx` while fewer than `concurrency` are in flight; drops `tx`
    /// (half-closes) once the queue is empty. Items over `max_chars` go to `refused` instead.
    fn fill(
        &self,
        tx: &mut Option<mpsc::Sender<AnalyzeRequest>>,
        in_flight: &mut HashMap<usize, ()>,
        refused: &mut Vec<usize>,
        max_chars: usize,
    ) {
        while let Some(sender) = tx.as_ref() {
            if in_flight.len() >= self.concurrency {
                break;
            }
            let Some(i) = self.queue.pop() else {
                // Nothing left to send: half-close, so the server knows the stream is
                // complete once it has answered.
                *tx = None;
                break;
            };
            if self.items[i].request.text.chars().count() > max_chars {
                refused.push(i);
                continue;
            }
            if sender.try_send(self.items[i].request.clone()).is_err() {
                self.queue.give_back([i]);
                break;
            }
            in_flight.insert(i, ());
        }
    }

    /// The item a streamed answer is for, taken out of `in_flight`, and what was said of it:
    /// an answer for the writer, or the message of an error that is not the item's. `None`
    /// for an answer with no outcome, or for no item of this stream's in flight.
    fn answer_of(
        &self,
        item: tidings::proto::AnalyzeBatchItem,
        in_flight: &mut HashMap<usize, ()>,
    ) -> Option<(usize, Result<Answered, String>)> {
        let (wire, outcome) = match item.outcome? {
            Outcome::Response(r) => (r.id.clone(), Ok(Answered::Done(Box::new(r)))),
            Outcome::Error(e) if e.code == Code::InvalidArgument as i32 => (
                e.id,
                Ok(Answered::Invalid {
                    code: e.code,
                    message: e.message,
                }),
            ),
            Outcome::Error(e) => (e.id, Err(e.message)),
        };
        let i = wire
            .parse::<usize>()
            .ok()
            .filter(|&i| i < self.items.len())?;
        in_flight.remove(&i)?;
        Some((i, outcome))
    }

    /// Puts item `i`, which failed with `message` for a reason not its own, back in the
    /// queue, a bounded number of times; past `retries` the job stops (everything in
    /// `in_flight` given back).
    async fn retry(
        &self,
        i: usize,
        message: &str,
        in_flight: &mut HashMap<usize, ()>,
    ) -> Result<(), StreamError> {
        let tries = {
            let mut f = self.queue.failures.lock();
            let n = f.entry(i).or_default();
            *n += 1;
            *n
        };
        if tries > self.retries {
            self.queue
                .give_back(std::mem::take(in_flight).into_keys().chain([i]));
            return Err(StreamError::Fatal(anyhow::anyhow!(
                "item {:?} failed {tries} times ({message}); stopping. \
                 Nothing was written for it: a later run retries it",
                self.items[i].id
            )));
        }
        self.queue.give_back([i]);
        let _ = self
            .results
            .send(LaneEvent::Note(format!(
                "{}: item retried: {message}",
                self.url
            )))
            .await;
        tokio::time::sleep(Duration::from_millis(100 * u64::from(tries))).await;
        Ok(())
    }
}

impl Lane {
    /// Answers `refused` items (over the server's text limit) as invalid, like the server.
    /// Returns whether there were any.
    async fn refuse(&self, refused: &mut Vec<usize>, max_chars: usize) -> bool {
        let any = !refused.is_empty();
        for i in refused.drain(..) {
            let chars = self.items[i].request.text.chars().count();
            let message = format!(
                "text: has {chars} characters, more than the limit of {max_chars} (max_text_chars)"
            );
            let outcome = Answered::Invalid {
                code: Code::InvalidArgument as i32,
                message,
            };
            let _ = self.results.send(LaneEvent::Answer(i, outcome)).await;
        }
        any
    }
}

/// Why a stream stopped.
enum StreamError {
    /// The job cannot go on.
    Fatal(anyhow::Error),
    /// Worth another attempt (after some items were answered on it, if `progress`).
    Retry { why: String, progress: bool },
}

fn classify(s: Status, progress: bool) -> StreamError {
    if fatal(s.code()) {
        StreamError::Fatal(anyhow::anyhow!(
            "the server refused the job: {:?}: {}",
            s.code(),
            s.message()
        ))
    } else {
        StreamError::Retry {
            why: format!("{:?}: {}", s.code(), s.message()),
            progress,
        }
    }
}
