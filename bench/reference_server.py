#!/usr/bin/env python3
"""Reference Tidings server: the tidings.v1 proto served by grpcio + PyTorch/transformers.

A fair baseline for bench/run.py, independent of the Rust binary. Per request it:
- tokenizes the text once (padding/truncation off, no specials), cuts it into windows of 254
  pieces overlapping by 64, wraps each as [CLS] .. [SEP] (tools/tidings_ref.py);
- entities: BertForTokenClassification + Tidings' casing embedding, float32, softmax; each
  piece is read from the window where it has most context; a word takes the argmax tag of its
  first piece; simple BIO decoding over words (an I- tag that does not continue an entity of
  its type opens one); score = mean tag probability of the mention's words;
- topics: MiniLM mean-pooled unit embeddings; article = window vectors weighted by length
  (+ the title, if any, weighted like the whole body); label prototype = mean of the unit
  embeddings of "This news article is about NAME.", its description and its examples
  (cached); scores = softmax(20 * cosine).
All windows of a request (or of an AnalyzeBatch call) are batched together, sorted by length
and cut by a padded-token budget; forward passes run under torch.inference_mode, one at a time
(a lock) with --threads intra-op threads, so concurrent calls queue instead of oversubscribing
the cores. No batching across calls. AnalyzeStream answers items one by one, in order.

    python3 bench/reference_server.py --addr 127.0.0.1:50072 --threads 2
"""
import argparse
import itertools
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
import torch  # noqa: E402

import tidings_ref as ref  # noqa: E402
from protos import pb, pb_grpc  # noqa: E402

VERSION = "reference-0.1.0"
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


class Invalid(Exception):
    """A request the server refuses; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def softmax_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.float(), dim=-1)


def unit_mean(vecs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = sum(w * v for v, w in zip(vecs, weights))
    return acc / acc.norm().clamp(min=1e-12)


class Engine:
    """The models plus the per-call pipeline (tokenize, window, batch, forward, decode)."""

    def __init__(self, args):
        self.limits = dict(max_text_chars=args.max_text_chars, max_labels=args.max_labels,
                           max_batch_items=args.max_batch_items, max_batch_tokens=args.max_batch_tokens)
        args.ner_model = None if args.ner_model in ("", "none") else args.ner_model
        args.topic_model = None if args.topic_model in ("", "none") else args.topic_model
        self.ner = ref.NerModel(args.ner_model) if args.ner_model else None
        self.emb = ref.EmbedModel(args.topic_model) if args.topic_model else None
        self.shared_tok = bool(self.ner and self.emb) and (
            (Path(args.ner_model) / "tokenizer.json").read_bytes()
            == (Path(args.topic_model) / "tokenizer.json").read_bytes())
        self.tags, types = [], []
        for name in (self.ner.labels if self.ner else []):
            kind, _, ty = name.partition("-")
            self.tags.append(("O", None) if name == "O" else (kind if ty else "I", ty or name))
            if name != "O" and (ty or name) not in types:
                types.append(ty or name)
        self.entity_types = types
        self.default_labels = [pb.TopicLabel(name=n, description=d) for n, d in DEFAULT_TOPICS]
        if args.taxonomy:
            import json
            tax = json.loads(Path(args.taxonomy).read_text())["labels"]
            self.default_labels = [pb.TopicLabel(name=l["name"], description=l.get("description", ""),
                                                 examples=l.get("examples", [])) for l in tax]
        self.proto_cache: dict[str, torch.Tensor] = {}  # prototype text -> unit vector
        self.lock = threading.Lock()
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
        return {"topics": pb.TASK_TOPICS in tasks and self.emb is not None,
                "entities": pb.TASK_ENTITIES in tasks and self.ner is not None}

    # ---- batching -----------------------------------------------------------------------
    def _batches(self, lengths: list[int]):
        """Index lists, longest rows first, each within the padded-token budget."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batch, width = [], 0
        for i in order:
            w = max(width, lengths[i] + 2)
            if batch and w * (len(batch) + 1) > self.limits["max_batch_tokens"]:
                yield batch
                batch, w = [], lengths[i] + 2
            batch.append(i)
            width = w
        if batch:
            yield batch

    def _ner_forward(self, rows, casing) -> list[torch.Tensor]:
        out = [None] * len(rows)
        for b in self._batches([len(r) for r in rows]):
            logits, _ = self.ner.logits([rows[i] for i in b], [casing[i] for i in b])
            probs = softmax_rows(logits)
            for j, i in enumerate(b):
                out[i] = probs[j, 1 : len(rows[i]) + 1]
        return out

    def _embed_forward(self, rows) -> list[torch.Tensor]:
        out = [None] * len(rows)
        for b in self._batches([len(r) for r in rows]):
            v = self.emb.embed([rows[i] for i in b])
            for j, i in enumerate(b):
                out[i] = v[j]
        return out

    # ---- the pipeline ---------------------------------------------------------------------
    def run(self, items):
        """items: [(request, options or None for all, receipt time)] -> [AnalyzeResponse]."""
        items = [(r, o or self.validate(r), t) for r, o, t in items]
        texts = [r.text for r, _, _ in items]
        need_ner = [o["entities"] for _, o, _ in items]
        need_top = [o["topics"] for _, o, _ in items]
        ner_p = ref.tokenize(self.ner.tok, texts) if any(need_ner) else [None] * len(items)
        if any(need_top):
            top_p = ner_p if self.shared_tok and any(need_ner) else ref.tokenize(self.emb.tok, texts)
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
                top_rows.append(ref.tokenize(self.emb.tok, [r.title])[0].ids[: ref.WINDOW_PIECES])
            top_win.append((wins, first, title_row))
            labels = list(r.labels) or self.default_labels
            label_sets.append(labels)
            for l in labels:
                for t in self._proto_texts(l):
                    if t not in self.proto_cache and t not in new_texts:
                        new_texts.append(t)
        label_first = len(top_rows)
        if new_texts:
            top_rows += [p.ids[: ref.WINDOW_PIECES] for p in ref.tokenize(self.emb.tok, new_texts)]

        with self.lock:
            t_run = time.perf_counter()
            ner_out = self._ner_forward(ner_rows, ner_cas) if ner_rows else []
            top_out = self._embed_forward(top_rows) if top_rows else []
            inference_us = int((time.perf_counter() - t_run) * 1e6)
        for j, t in enumerate(new_texts):
            self.proto_cache[t] = top_out[label_first + j]
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
        protos = torch.stack([unit_mean([self.proto_cache[t] for t in self._proto_texts(l)],
                                        [1.0] * len(self._proto_texts(l))) for l in labels])
        scores = torch.softmax(SCALE * (protos @ article), dim=0).tolist()
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
        probs = torch.cat(parts)
        best_p, best_i = probs.max(-1)
        best_p, best_i = best_p.tolist(), best_i.tolist()
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
        resp = pb.GetInfoResponse(version=VERSION, default_topics=[l.name for l in self.default_labels])
        if self.emb:
            resp.models.add(task="topics", path=self.emb.dir, architecture="bert", max_tokens=256, dtype="f32")
        if self.ner:
            resp.models.add(task="entities", path=self.ner.dir, architecture="bert", labels=self.ner.labels,
                            max_tokens=256, dtype="f32")
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
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--workers", type=int, default=64, help="gRPC handler threads (default 64)")
    ap.add_argument("--ner-model", default=str(REPO / "models/ner"), help="NER model dir ('none' to disable)")
    ap.add_argument("--topic-model", default=str(REPO / "models/minilm"), help="embedding model dir ('none' to disable)")
    ap.add_argument("--taxonomy", help="default topics from a JSON {labels:[{name,description,examples}]} "
                                       "(e.g. models/topics/news.json) instead of the built-in 8")
    ap.add_argument("--max-text-chars", type=int, default=200_000)
    ap.add_argument("--max-labels", type=int, default=64)
    ap.add_argument("--max-batch-items", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
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
    print(f"reference server listening on {args.addr} (threads {args.threads}, "
          f"loaded in {time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
