#!/usr/bin/env python3
"""Reference Tidings server: the tidings.v1 proto served by grpcio + PyTorch or ONNX Runtime.

A fair baseline for bench/run.py, independent of the Rust binary. Per request it:
- tokenizes the text once (padding/truncation off, no specials), cuts it into windows of 254
  pieces overlapping by 64, wraps each as [CLS] .. [SEP] (tools/tidings_ref.py);
- entities: BertForTokenClassification + Tidings' casing embedding, softmax; each
  piece is read from the window where it has most context; a word takes the argmax tag of its
  first piece; simple BIO decoding over words (an I- tag that does not continue an entity of
  its type opens one); score = mean tag probability of the mention's words;
- topics: MiniLM mean-pooled unit embeddings; article = window vectors weighted by length
  (+ the title, if any, weighted like the whole body); label prototype = mean of the unit
  embeddings of "This news article is about NAME.", its description and its examples
  (cached); scores = softmax(20 * cosine).
Validation, errors and this decoding (numpy) are the same whatever runs the models:

--backend torch (default): tools/tidings_ref.py's PyTorch models, float32. All windows of a
  request (or of an AnalyzeBatch call) are batched together, sorted by length and cut by a
  padded-token budget (--max-batch-tokens); forward passes run under torch.inference_mode, one
  at a time (a lock) with --threads intra-op threads, so concurrent calls queue instead of
  oversubscribing the cores. No batching across calls.
--backend ort-fp32 | ort-int8: ONNX Runtime, without torch. bench/ort_encoder.py builds the
  graphs from model.safetensors (in a child process, cached under --ort-workdir), fused by
  ORT's BERT optimizer (fp32), then dynamically quantized (int8, per-channel weight scales).
  One runner thread per model owns its session (--threads intra-op threads) and batches across
  calls: handlers queue their windows and wait; the runner waits up to --max-wait-ms for more
  while calls that will submit rows are still being tokenized and the queue holds fewer than
  --max-batch-tokens padded tokens, then takes the whole queue, sorts it by length, cuts it by
  that budget and runs each batch, handing every call its rows. One session.run at a time
  across the two models (a lock, like torch's). --log-batches prints each batch.
AnalyzeStream answers items one by one, in order.

    python3 bench/reference_server.py --addr 127.0.0.1:50072 --threads 2
    python3 bench/reference_server.py --backend ort-int8 --threads 2 --log-batches
    (ort-*: pip install -r bench/ort-requirements.txt; the first start exports the graphs)
"""
import argparse
import contextlib
import itertools
import json
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import tidings_ref as ref  # noqa: E402
from protos import pb, pb_grpc  # noqa: E402

VERSION = "reference-0.1.0"  # GetInfo says VERSION+BACKEND for the ONNX Runtime backends
BACKENDS = ("torch", "ort-fp32", "ort-int8")
SCALE = 20.0  # softmax temperature on cosines, as Tidings
DEFAULT_TOPICS = [  # (name, description)
    ("world", "International news: foreign affairs, diplomacy, wars, conflicts and events abroad."),
    ("politics", "Politics and government: elections, parties, parliaments, ministers, laws and policy."),
    ("business", "Business and the economy: companies, markets, stocks, earnings, trade and jobs."),
    ("technology", "Technology: software, the internet, computers, phones, AI and tech companies."),
    ("science", "Science: research, space, physics, biology, climate and the environment."),
    ("health", "Health and medicine: diseases, hospitals, drugs, vaccines and public health."),
    ("sports", "Sports: football, basketball, tennis, the Olympics, teams, players and matches."),
    ("entertainment", "Entertainment: films, music, television, celebrities, books and awards."),
]
Code = grpc.StatusCode
ORT_ENCODER = REPO / "bench" / "ort_encoder.py"


class Invalid(Exception):
    """A request the server refuses; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32."""
    e = np.exp(x - x.max(-1, keepdims=True), dtype=np.float32)
    return e / e.sum(-1, keepdims=True)


def unit_mean(vecs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    acc = sum(w * v for v, w in zip(vecs, weights))
    return acc / max(float(np.linalg.norm(acc)), 1e-12)


def plan_batches(lengths: list[int], budget: int):
    """Index lists, longest rows first, each within `budget` padded tokens ([CLS]/[SEP] counted)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch, width = [], 0
    for i in order:
        w = max(width, lengths[i] + 2)
        if batch and w * (len(batch) + 1) > budget:
            yield batch
            batch, w = [], lengths[i] + 2
        batch.append(i)
        width = w
    if batch:
        yield batch


# ---- backends: forward passes ----------------------------------------------------------------
# forward(ticket, ner_rows, ner_casing, topic_rows) -> (ner_out, topic_out, t_start, t_end):
# rows are piece ids without specials; ner_out[i] = tag probabilities [len(row i), labels] of
# the row's pieces, topic_out[i] = unit embedding [hidden] (numpy, float32); t_start/t_end
# (perf_counter) bound the forward work done for the call. `expect(ner, topics)` is entered
# before a call tokenizes and yields the ticket: it tells cross-call batchers that rows are on
# their way.

class TorchBackend:
    """tools/tidings_ref.py's PyTorch models; one call's windows at a time (a lock)."""

    def __init__(self, args):
        import torch
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        self.torch = torch
        self.ner = ref.NerModel(args.ner_model) if args.ner_model else None
        self.emb = ref.EmbedModel(args.topic_model) if args.topic_model else None
        self.budget = args.max_batch_tokens
        self.lock = threading.Lock()

    def expect(self, ner: bool, topics: bool):
        return contextlib.nullcontext()

    def forward(self, ticket, ner_rows, ner_casing, top_rows):
        with self.lock:
            t_run = time.perf_counter()
            ner_out = self._ner_forward(ner_rows, ner_casing) if ner_rows else []
            top_out = self._embed_forward(top_rows) if top_rows else []
            return ner_out, top_out, t_run, time.perf_counter()

    def _ner_forward(self, rows, casing) -> list[np.ndarray]:
        out = [None] * len(rows)
        for b in plan_batches([len(r) for r in rows], self.budget):
            logits, _ = self.ner.logits([rows[i] for i in b], [casing[i] for i in b])
            probs = self.torch.softmax(logits.float(), dim=-1).numpy()
            for j, i in enumerate(b):
                out[i] = probs[j, 1 : len(rows[i]) + 1]
        return out

    def _embed_forward(self, rows) -> list[np.ndarray]:
        out = [None] * len(rows)
        for b in plan_batches([len(r) for r in rows], self.budget):
            v = self.emb.embed([rows[i] for i in b]).numpy()
            for j, i in enumerate(b):
                out[i] = v[j]
        return out


def ort_cached(name: str, model_dir: str, workdir: str) -> dict | None:
    """The graph paths an earlier export_onnx left for this model, if its inputs are unchanged."""
    try:
        old = json.loads((Path(workdir) / f"{name}.json").read_text())
        if old["stamp"] == _ort_stamp(model_dir) and all(Path(p).exists() for p in old["paths"].values()):
            return old["paths"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _ort_stamp(model_dir: str) -> dict:
    files = [Path(model_dir) / "model.safetensors", Path(model_dir) / "config.json", ORT_ENCODER]
    return {"model_dir": str(Path(model_dir).resolve()),
            "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def export_onnx(name: str, model_dir: str, workdir: str) -> dict:
    """bench/ort_encoder.py's graphs of one model ("ner" or "topics"): backend -> path (plain,
    fused fp32, int8 per channel), recorded in WORKDIR/NAME.json for ort_cached. Run in a child
    process, so that the export's memory peak is not the server's."""
    import logging

    import onnxruntime
    import ort_encoder
    logging.getLogger().setLevel(logging.ERROR)  # as ort_encoder's CLI: optimizer/quantizer chatter
    onnxruntime.set_default_logger_severity(3)
    stamp = _ort_stamp(model_dir)
    paths = ort_encoder.export(ort_encoder.load_bert(name, Path(model_dir)), Path(workdir), per_channel=True)
    paths = {k: str(v) for k, v in paths.items()}
    (Path(workdir) / f"{name}.json").write_text(json.dumps({"stamp": stamp, "paths": paths}))
    sys.stdout.flush()
    return paths


class _Job:
    """The rows one call submitted to one runner, and what the runner hands back."""
    __slots__ = ("rows", "casing", "out", "left", "t_start", "t_end", "future")

    def __init__(self, rows, casing):
        self.rows, self.casing = rows, casing
        self.out = [None] * len(rows)
        self.left = len(rows)
        self.t_start = self.t_end = None
        self.future = futures.Future()


class Runner:
    """Owns one ONNX Runtime session; runs the rows of all concurrent calls in shared batches."""

    def __init__(self, name, sess, tok, budget: int, max_wait_s: float, run_lock, log: bool):
        self.name, self.sess, self.budget, self.max_wait, self.run_lock, self.log = (
            name, sess, budget, max_wait_s, run_lock, log)
        self.cls_id, self.sep_id, self.pad_id = ref.special_ids(tok)
        self.inputs = {i.name for i in sess.get_inputs()}
        self.logits = sess.get_outputs()[0].name == "logits"  # NER: softmax over the labels
        self.cond = threading.Condition()
        self.pending: list[tuple[_Job, int]] = []  # (job, row index), in arrival order
        self.pending_tokens = 0  # sum of len(row) + 2 over pending
        self.expected = 0  # calls tokenizing now that will submit rows here
        self.batches = 0
        threading.Thread(target=self._loop, name=f"runner-{name}", daemon=True).start()

    def expect(self, n: int) -> None:
        with self.cond:
            self.expected += n
            self.cond.notify()

    def submit(self, rows, casing=None, expected: bool = False) -> futures.Future:
        """Queues a call's rows; the future gives their outputs in order (see the backends' forward)."""
        job = _Job(rows, casing)
        with self.cond:
            self.pending += [(job, i) for i in range(len(rows))]
            self.pending_tokens += sum(len(r) + 2 for r in rows)
            self.expected -= expected
            self.cond.notify()
        return job.future

    def _loop(self):
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                # More rows are on their way while calls still tokenize: wait a little for them.
                deadline = time.perf_counter() + self.max_wait
                while self.expected > 0 and self.pending_tokens < self.budget:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            with self.run_lock:  # one session.run at a time over both models
                with self.cond:  # whatever came while the other model ran joins too
                    work, self.pending, self.pending_tokens = self.pending, [], 0
                for b in plan_batches([len(job.rows[i]) for job, i in work], self.budget):
                    self._run([work[k] for k in b])

    def _feeds(self, batch, width: int) -> dict[str, np.ndarray]:
        """[CLS] row [SEP], padded to `width`; casing ids 0 on the specials and the padding."""
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for k, (job, i) in enumerate(batch):
            row = job.rows[i]
            ids[k, : len(row) + 2] = [self.cls_id, *row, self.sep_id]
            mask[k, : len(row) + 2] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "casing_ids" in self.inputs:
            cas = np.zeros((len(batch), width), dtype=np.int64)
            for k, (job, i) in enumerate(batch):
                cas[k, 1 : len(job.rows[i]) + 1] = job.casing[i]
            feeds["casing_ids"] = cas
        return feeds

    def _run(self, batch):
        batch = [(job, i) for job, i in batch if not job.future.done()]  # skip calls that failed
        if not batch:
            return
        width = max(len(job.rows[i]) for job, i in batch) + 2
        t0 = time.perf_counter()
        try:
            out = self.sess.run(None, self._feeds(batch, width))[0]
            if self.logits:
                out = softmax(out)
        except Exception as e:  # noqa: BLE001 -- the calls in this batch fail, the runner goes on
            for job, _ in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        t1 = time.perf_counter()
        self.batches += 1
        if self.log:
            print(f"[{self.name}] batch {self.batches}: {len(batch)} rows from "
                  f"{len({id(job) for job, _ in batch})} calls, width {width}, "
                  f"{(t1 - t0) * 1e3:.1f} ms", file=sys.stderr, flush=True)
        for k, (job, i) in enumerate(batch):
            job.out[i] = out[k, 1 : len(job.rows[i]) + 1] if self.logits else out[k]
            job.t_start = t0 if job.t_start is None else job.t_start
            job.t_end = t1
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job)


class OrtBackend:
    """ONNX Runtime sessions of bench/ort_encoder.py's graphs; one Runner per model."""

    def __init__(self, args, precision: str):
        import onnxruntime
        import ort_encoder
        onnxruntime.set_default_logger_severity(3)
        models = [(n, d) for n, d in (("ner", args.ner_model), ("topics", args.topic_model)) if d]
        todo = [(n, d) for n, d in models if ort_cached(n, d, args.ort_workdir) is None]
        if todo:  # export in a child process (spawn: no fork of a process holding gRPC/ORT threads)
            import multiprocessing
            print(f"exporting ONNX graphs of {[n for n, _ in todo]} to {args.ort_workdir}",
                  file=sys.stderr, flush=True)
            with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                for n, d in todo:
                    pool.submit(export_onnx, n, d, args.ort_workdir).result()
        run_lock = threading.Lock()
        self.runners = {}
        for n, d in models:
            path = ort_cached(n, d, args.ort_workdir)[precision]
            sess = ort_encoder.session(Path(path), args.threads)
            self.runners[n] = Runner(n, sess, ref.load_tokenizer(d), args.max_batch_tokens,
                                     args.max_wait_ms / 1e3, run_lock, args.log_batches)
            print(f"[{n}] {path}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def expect(self, ner: bool, topics: bool):
        ticket = {n for n, want in (("ner", ner), ("topics", topics)) if want and n in self.runners}
        for n in ticket:
            self.runners[n].expect(1)
        try:
            yield ticket
        finally:
            for n in ticket:  # announced but never submitted (an error, or no rows after all)
                self.runners[n].expect(-1)

    def forward(self, ticket, ner_rows, ner_casing, top_rows):
        jobs = []
        for n, rows, cas in (("ner", ner_rows, ner_casing), ("topics", top_rows, None)):
            if rows:
                jobs.append(self.runners[n].submit(rows, cas, expected=n in ticket))
                ticket.discard(n)
        done = [f.result() for f in jobs]
        outs = iter(j.out for j in done)
        ner_out = next(outs) if ner_rows else []
        top_out = next(outs) if top_rows else []
        t_now = time.perf_counter()
        return (ner_out, top_out, min((j.t_start for j in done), default=t_now),
                max((j.t_end for j in done), default=t_now))


@dataclass
class Rows:
    """What a call (or an AnalyzeBatch) gives the models, and where to find each item's outputs."""
    ner_p: list  # per item: ref.Pieces for the NER tokenizer, or None
    ner_rows: list  # piece ids of every NER window
    ner_cas: list  # their casing ids
    ner_win: list  # per item: (windows, index of its first row)
    top_p: list  # per item: ref.Pieces for the embedder's tokenizer, or None
    top_rows: list  # piece ids of every body window, title and new prototype text
    top_win: list  # per item: (windows, index of its first row, title row or None)
    label_sets: list  # per item: its topic labels, or None
    new_texts: list  # prototype texts not yet cached, from row label_first on
    label_first: int


class Engine:
    """A backend plus the per-call pipeline (tokenize, window, forward, decode)."""

    def __init__(self, args):
        self.limits = dict(max_text_chars=args.max_text_chars, max_labels=args.max_labels,
                           max_batch_items=args.max_batch_items, max_batch_tokens=args.max_batch_tokens)
        args.ner_model = None if args.ner_model in ("", "none") else args.ner_model
        args.topic_model = None if args.topic_model in ("", "none") else args.topic_model
        self.backend_name = args.backend
        self.backend = (TorchBackend(args) if args.backend == "torch"
                        else OrtBackend(args, args.backend.removeprefix("ort-")))
        self.ner_dir, self.emb_dir = args.ner_model, args.topic_model
        self.ner_tok = ref.load_tokenizer(args.ner_model) if args.ner_model else None
        self.emb_tok = ref.load_tokenizer(args.topic_model) if args.topic_model else None
        self.labels = []
        if args.ner_model:
            id2label = json.loads((Path(args.ner_model) / "config.json").read_text())["id2label"]
            self.labels = [id2label[str(i)] for i in range(len(id2label))]
        self.shared_tok = bool(self.ner_tok and self.emb_tok) and (
            (Path(args.ner_model) / "tokenizer.json").read_bytes()
            == (Path(args.topic_model) / "tokenizer.json").read_bytes())
        self.tags, types = [], []
        for name in self.labels:
            kind, _, ty = name.partition("-")
            self.tags.append(("O", None) if name == "O" else (kind if ty else "I", ty or name))
            if name != "O" and (ty or name) not in types:
                types.append(ty or name)
        self.entity_types = types
        self.default_labels = [pb.TopicLabel(name=n, description=d) for n, d in DEFAULT_TOPICS]
        if args.taxonomy:
            tax = json.loads(Path(args.taxonomy).read_text())["labels"]
            self.default_labels = [pb.TopicLabel(name=l["name"], description=l.get("description", ""),
                                                 examples=l.get("examples", [])) for l in tax]
        self.proto_cache: dict[str, np.ndarray] = {}  # prototype text -> unit vector
        self.run([(pb.AnalyzeRequest(text="Warm-up: Reuters reported from Paris."), None, time.perf_counter())])

    # ---- validation -------------------------------------------------------------------
    def validate(self, r) -> dict:
        if not r.text.strip():
            raise Invalid(Code.INVALID_ARGUMENT, "text: must not be empty or whitespace only")
        if len(r.text) > self.limits["max_text_chars"]:
            raise Invalid(Code.INVALID_ARGUMENT,
                          f"text: {len(r.text)} chars exceeds max_text_chars {self.limits['max_text_chars']}")
        tasks = set(r.tasks) or {pb.TASK_TOPICS, pb.TASK_ENTITIES}
        if not tasks <= {pb.TASK_TOPICS, pb.TASK_ENTITIES}:
            raise Invalid(Code.INVALID_ARGUMENT, f"tasks: {sorted(tasks)} holds TASK_UNSPECIFIED or an unknown task")
        if len(r.labels) > self.limits["max_labels"]:
            raise Invalid(Code.INVALID_ARGUMENT, f"labels: {len(r.labels)} exceeds max_labels {self.limits['max_labels']}")
        seen = set()
        for l in r.labels:
            key = l.name.strip().casefold()
            if not key or key in seen:
                raise Invalid(Code.INVALID_ARGUMENT, f"labels: name {l.name!r} is empty or repeated")
            seen.add(key)
        if not 0.0 <= r.min_entity_score <= 1.0:
            raise Invalid(Code.INVALID_ARGUMENT, "min_entity_score: must be in [0, 1]")
        bad = [t for t in r.entity_types if t not in self.entity_types]
        if bad:
            raise Invalid(Code.INVALID_ARGUMENT, f"entity_types: {bad} not among {self.entity_types}")
        return {"topics": pb.TASK_TOPICS in tasks and self.emb_tok is not None,
                "entities": pb.TASK_ENTITIES in tasks and self.ner_tok is not None}

    # ---- the pipeline ---------------------------------------------------------------------
    def run(self, items):
        """items: [(request, options or None for all, receipt time)] -> [AnalyzeResponse]."""
        items = [(r, o or self.validate(r), t) for r, o, t in items]
        texts = [r.text for r, _, _ in items]
        need_ner = [o["entities"] for _, o, _ in items]
        need_top = [o["topics"] for _, o, _ in items]
        with self.backend.expect(any(need_ner), any(need_top)) as ticket:  # rows on their way
            rows = self._rows(items, texts, need_ner, need_top)
            ner_out, top_out, t_run, t_end = self.backend.forward(ticket, rows.ner_rows, rows.ner_cas,
                                                                  rows.top_rows)
        ner_p, ner_win, top_p, top_win, label_sets = (rows.ner_p, rows.ner_win, rows.top_p, rows.top_win,
                                                      rows.label_sets)
        inference_us = int((t_end - t_run) * 1e6)
        for j, t in enumerate(rows.new_texts):
            self.proto_cache[t] = top_out[rows.label_first + j]
        if len(self.proto_cache) > 20000:
            self.proto_cache.clear()

        out = []
        for k, (r, o, t_recv) in enumerate(items):
            resp = pb.AnalyzeResponse(id=r.id)
            p = ner_p[k] if need_ner[k] else top_p[k]
            wins = ner_win[k][0] if need_ner[k] else top_win[k][0]
            resp.reading.tokens = len(p.ids) if p else 0
            resp.reading.windows = len(wins)
            if need_ner[k]:
                wins, first = ner_win[k]
                self._entities(r, p, wins, ner_out[first : first + len(wins)], resp)
            if need_top[k]:
                wins, first, title_row = top_win[k]
                self._topics(r, wins, top_out, first, title_row, label_sets[k], resp)
            now = time.perf_counter()
            resp.timing.total_us = int((now - t_recv) * 1e6)
            resp.timing.queue_us = int(max(0.0, t_run - t_recv) * 1e6)
            resp.timing.inference_us = inference_us
            out.append(resp)
        return out

    def _rows(self, items, texts, need_ner, need_top) -> "Rows":
        """Tokenizes and windows the items: the NER rows (+ casing) and topic rows to run."""
        ner_p = ref.tokenize(self.ner_tok, texts) if any(need_ner) else [None] * len(items)
        if any(need_top):
            top_p = ner_p if self.shared_tok and any(need_ner) else ref.tokenize(self.emb_tok, texts)
        else:
            top_p = [None] * len(items)
        # NER rows: every window of every item that wants entities.
        ner_rows, ner_cas, ner_win = [], [], []
        for k, p in enumerate(ner_p):
            wins = ref.plan_windows(len(p.ids)) if need_ner[k] else []
            ner_win.append((wins, len(ner_rows)))
            for s, e in wins:
                ner_rows.append(p.ids[s:e])
                ner_cas.append(p.casing[s:e])
        # Topic rows: body windows, title, and label prototype texts not yet cached.
        top_rows, top_win, label_sets, new_texts = [], [], [], []
        for k, (r, _, _) in enumerate(items):
            if not need_top[k]:
                top_win.append(([], 0, None))
                label_sets.append(None)
                continue
            wins = ref.plan_windows(len(top_p[k].ids))
            first = len(top_rows)
            top_rows += [top_p[k].ids[s:e] for s, e in wins]
            title_row = None
            if r.title.strip():
                title_row = len(top_rows)
                top_rows.append(ref.tokenize(self.emb_tok, [r.title])[0].ids[: ref.WINDOW_PIECES])
            top_win.append((wins, first, title_row))
            labels = list(r.labels) or self.default_labels
            label_sets.append(labels)
            for l in labels:
                for t in self._proto_texts(l):
                    if t not in self.proto_cache and t not in new_texts:
                        new_texts.append(t)
        label_first = len(top_rows)
        if new_texts:
            top_rows += [p.ids[: ref.WINDOW_PIECES] for p in ref.tokenize(self.emb_tok, new_texts)]
        return Rows(ner_p, ner_rows, ner_cas, ner_win, top_p, top_rows, top_win, label_sets, new_texts,
                    label_first)

    @staticmethod
    def _proto_texts(l) -> list[str]:
        texts = [f"This news article is about {l.name}."]
        if l.description.strip():
            texts.append(l.description)
        return texts + [e for e in l.examples if e.strip()]

    def _topics(self, r, wins, vecs, first, title_row, labels, resp):
        body = max(1, sum(e - s for s, e in wins))
        vs = [vecs[first + i] for i in range(len(wins))]
        ws = [(e - s) / body for s, e in wins]
        if title_row is not None:
            vs.append(vecs[title_row])
            ws.append(1.0)
        if not vs:
            return
        article = unit_mean(vs, ws)
        protos = np.stack([unit_mean([self.proto_cache[t] for t in self._proto_texts(l)],
                                     [1.0] * len(self._proto_texts(l))) for l in labels])
        scores = softmax(SCALE * (protos @ article)).tolist()
        ranked = sorted(zip(labels, scores), key=lambda x: -x[1])
        for l, s in ranked[: r.top_k or len(ranked)]:
            resp.topics.add(label=l.name, score=s)

    def _entities(self, r, p, wins, win_probs, resp):
        n = len(p.ids)
        if n == 0:
            return
        own = ref.owners(n, wins)
        parts, t = [], 0  # owners come in contiguous runs, one per window
        for w, run in itertools.groupby(own):
            k = len(list(run))
            parts.append(win_probs[w][t - wins[w][0] : t - wins[w][0] + k])
            t += k
        probs = np.concatenate(parts)
        best_p, best_i = probs.max(-1).tolist(), probs.argmax(-1).tolist()
        # Words: first piece's tag, span from the first piece's start to the last piece's end.
        words = []
        for t in range(n):
            if t > 0 and p.words[t] is not None and p.words[t] == p.words[t - 1]:
                words[-1][3] = p.offsets[t][1]
            else:
                words.append([best_i[t], best_p[t], p.offsets[t][0], p.offsets[t][1]])
        mentions, cur = [], None
        for tag, prob, s, e in words:
            kind, ty = self.tags[tag]
            if kind != "O" and (kind == "B" or cur is None or cur[0] != ty):
                if cur:
                    mentions.append(cur)
                cur = [ty, s, e, [prob]]
            elif kind != "O":
                cur[2] = e
                cur[3].append(prob)
            elif cur:
                mentions.append(cur)
                cur = None
        if cur:
            mentions.append(cur)
        text, cum = r.text, None
        groups = {}
        wanted = set(r.entity_types)
        for ty, s, e, ps in mentions:
            score = sum(ps) / len(ps)
            if score < r.min_entity_score or (wanted and ty not in wanted):
                continue
            if cum is None:
                cum = None if text.isascii() else [0, *itertools.accumulate(len(c.encode()) for c in text)]
            bs, be = (s, e) if cum is None else (cum[s], cum[e])
            resp.entities.add(text=text[s:e], label=ty, score=score, start=s, end=e, byte_start=bs, byte_end=be)
            key = (" ".join(text[s:e].split()).casefold(), ty)
            if key not in groups:
                groups[key] = resp.entity_groups.add(text=text[s:e], label=ty, mentions=0, score=0.0)
            g = groups[key]
            g.mentions += 1
            g.score = max(g.score, score)

    def info(self):
        version = VERSION if self.backend_name == "torch" else f"{VERSION}+{self.backend_name}"
        dtype = "int8" if self.backend_name == "ort-int8" else "f32"
        resp = pb.GetInfoResponse(version=version, default_topics=[l.name for l in self.default_labels])
        if self.emb_dir:
            resp.models.add(task="topics", path=self.emb_dir, architecture="bert", max_tokens=256, dtype=dtype)
        if self.ner_dir:
            resp.models.add(task="entities", path=self.ner_dir, architecture="bert", labels=self.labels,
                            max_tokens=256, dtype=dtype)
        for k, v in self.limits.items():
            setattr(resp.limits, k, v)
        return resp


class Servicer(pb_grpc.TidingsServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    def Analyze(self, request, context):
        t0 = time.perf_counter()
        try:
            opts = self.engine.validate(request)
        except Invalid as e:
            context.abort(e.code, e.message)
        return self.engine.run([(request, opts, t0)])[0]

    def AnalyzeBatch(self, request, context):
        t0 = time.perf_counter()
        n = len(request.requests)
        if n > self.engine.limits["max_batch_items"]:
            context.abort(Code.INVALID_ARGUMENT,
                          f"requests: {n} items exceeds max_batch_items {self.engine.limits['max_batch_items']}")
        items, valid = [None] * n, []
        for i, r in enumerate(request.requests):
            try:
                valid.append((i, (r, self.engine.validate(r), t0)))
            except Invalid as e:
                items[i] = pb.AnalyzeBatchItem(error=pb.ItemError(code=e.code.value[0], message=e.message, id=r.id))
        if valid:
            for (i, _), resp in zip(valid, self.engine.run([v for _, v in valid])):
                items[i] = pb.AnalyzeBatchItem(response=resp)
        return pb.AnalyzeBatchResponse(items=items)

    def AnalyzeStream(self, request_iterator, context):
        for r in request_iterator:
            t0 = time.perf_counter()
            try:
                opts = self.engine.validate(r)
            except Invalid as e:
                context.abort(e.code, f"item {r.id!r}: {e.message}")
            yield self.engine.run([(r, opts, t0)])[0]

    def GetInfo(self, request, context):
        return self.engine.info()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1:50072", help="host:port to listen on")
    ap.add_argument("--backend", choices=BACKENDS, default="torch",
                    help="what runs the models: PyTorch (default) or ONNX Runtime fp32 / int8 (no torch needed)")
    ap.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--workers", type=int, default=64, help="gRPC handler threads (default 64)")
    ap.add_argument("--ner-model", default=str(REPO / "models/ner"), help="NER model dir ('none' to disable)")
    ap.add_argument("--topic-model", default=str(REPO / "models/minilm"), help="embedding model dir ('none' to disable)")
    ap.add_argument("--taxonomy", help="default topics from a JSON {labels:[{name,description,examples}]} "
                                       "(e.g. models/topics/news.json) instead of the built-in 8")
    ap.add_argument("--max-text-chars", type=int, default=200_000)
    ap.add_argument("--max-labels", type=int, default=64)
    ap.add_argument("--max-batch-items", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    ap.add_argument("--max-wait-ms", type=float, default=2.0,
                    help="ort-*: how long a runner waits for more calls' rows to join a batch (default 2)")
    ap.add_argument("--ort-workdir", default=str(REPO / "target/ort-reference"),
                    help="ort-*: where the ONNX graphs are exported to and reused from")
    ap.add_argument("--log-batches", action="store_true", help="ort-*: print every batch a runner runs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = Engine(args)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20),
                                  ("grpc.so_reuseport", 0)])
    pb_grpc.add_TidingsServicer_to_server(Servicer(engine), server)
    if server.add_insecure_port(args.addr) == 0:
        sys.exit(f"cannot listen on {args.addr}")
    server.start()
    print(f"reference server listening on {args.addr} (backend {args.backend}, threads {args.threads}, "
          f"loaded in {time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
