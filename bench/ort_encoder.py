#!/usr/bin/env python3
"""ONNX Runtime baseline for the encoder microbenchmark (issue #11), without torch.

Builds ONNX graphs of the two encoders Tidings serves straight from their safetensors weights
(onnx.helper; f16 weights are widened to f32):

- `models/ner`: BertForTokenClassification + Tidings' casing embedding (a row per casing id,
  added to the word embedding); inputs input_ids, attention_mask, casing_ids; output logits
  [B, S, labels];
- `models/minilm`: BertModel, mean pooling over the mask, L2 normalisation; output [B, H];
- `models/mpnet` (`--minilm models/mpnet`, or any `model_type: mpnet` dir): MPNetModel the
  same way. Its weights are renamed to BERT's names at load; positions start at pad + 1 (2);
  no token types; its relative position bias (32 buckets, transformers'
  `relative_position_bucket`, computed here in numpy once) is a constant [1, heads, 512, 512]
  sliced to [1, heads, S, S] and added to every layer's scores before the mask.

token_type_ids are implicitly 0; positions are 0..S-1; the attention mask is additive,
(1 - mask) * -10000. Standard op patterns (MatMul+Add, Reshape/Transpose heads, Softmax,
LayerNormalization, Erf GELU; opset 17) so that ORT's BERT optimizer can fuse them.

Backends: `fp32` (onnxruntime.transformers optimize_model(model_type="bert") when it accepts
the graph, else the plain graph; ORT graph optimizations on), `int8` (quantize_dynamic of that
graph: QInt8 weights of MatMul/Attention with per-channel scales, activations quantized per
call; --no-per-channel: per tensor, which drifts clearly further for no measured speed gain),
and `fp32-plain` (the unfused graph, only when asked for with --backends).

`--check` (on by default; --no-check skips it) asserts that ORT fp32 matches a float64 numpy
forward pass of the same weights on a 2x16 input (the second row padded), and reports how far
int8 drifts. Timing: full rows as `tidings bench` makes them ([CLS], ids 1000 + (k*7919) %
20000, [SEP]; casing 1, 0 on the specials; no padding), p50/p99 over --iters runs after
--warmup runs, tokens/s = B*S / p50. Then the article mix (--mix-articles, 64; 0 skips it): the
articles bench/run.py sends (the seed article, then AG News dev rows), cut into Tidings' windows
with each model's tokenizer, sorted longest first and cut into passes of at most --mix-budget
(1024) padded tokens; one timed run is every pass, ORT's padded to its longest window, and
tokens/s counts the windows' own tokens. With --tidings BIN, also runs `BIN bench` per shape
(`--mix` with the same window lengths for the mix; RAYON_NUM_THREADS = --threads) and prints
Tidings / ORT ratios.

    pip install -r bench/ort-requirements.txt
    python3 bench/ort_encoder.py --tidings target/release/tidings
    python3 bench/ort_encoder.py --shapes 1x16 --iters 2     # quick end-to-end try
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
OPSET = 17
MASK_VALUE = -10000.0


@dataclass
class Bert:
    """One encoder: config, f32 weights without the `bert.` prefix, and what it outputs."""
    name: str  # "ner" or "topics", as `tidings bench` names them
    dir: Path
    cfg: dict
    w: dict[str, np.ndarray]
    casing: bool
    labels: int  # 0 for the pooled embedder
    cls_id: int
    sep_id: int

    @property
    def heads(self) -> int:
        return int(self.cfg["num_attention_heads"])

    @property
    def mpnet(self) -> bool:
        return self.cfg.get("model_type") == "mpnet"

    @property
    def position_offset(self) -> int:
        """Position ids start here (RoBERTa-style: pad + 1)."""
        return int(self.cfg.get("pad_token_id", 1)) + 1 if self.mpnet else 0


# MPNet's tensor names -> BERT's (after the encoder prefix is stripped).
MPNET_NAMES = [("attention.attn.q.", "attention.self.query."), ("attention.attn.k.", "attention.self.key."),
               ("attention.attn.v.", "attention.self.value."), ("attention.attn.o.", "attention.output.dense."),
               ("attention.LayerNorm.", "attention.output.LayerNorm.")]


def relative_buckets(rel: np.ndarray, buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """transformers' MPNet relative_position_bucket, in float32 as there."""
    half = buckets // 2
    n = -rel
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    with np.errstate(divide="ignore"):  # n < exact takes the exact branch below
        large = exact + (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
                         * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ret + np.where(n < exact, n, large)


def position_bias(m: "Bert", s: int) -> np.ndarray:
    """MPNet's relative position bias [1, heads, s, s]."""
    pos = np.arange(s)
    b = relative_buckets(pos[None, :] - pos[:, None], int(m.cfg.get("relative_attention_num_buckets", 32)))
    return m.w["encoder.relative_attention_bias.weight"][b].transpose(2, 0, 1)[None]


def load_bert(name: str, model_dir: Path) -> Bert:
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{model_dir}: hidden_act {cfg['hidden_act']!r}, only exact gelu is built")
    raw = load_file(str(model_dir / "model.safetensors"))
    prefix = "mpnet." if cfg.get("model_type") == "mpnet" else "bert."
    w = {(k[len(prefix):] if k.startswith(prefix) else k): v.astype(np.float32)
         for k, v in raw.items() if np.issubdtype(v.dtype, np.floating)}
    if cfg.get("model_type") == "mpnet":
        for old, new in MPNET_NAMES:
            w = {k.replace(old, new): v for k, v in w.items()}
    casing = bool(cfg.get("tidings_casing"))
    if casing and "embeddings.casing_embeddings.weight" not in w:
        raise ValueError(f"{model_dir}: tidings_casing is set but the casing table is missing")
    labels = w["classifier.weight"].shape[0] if name == "ner" else 0
    sys.path.insert(0, str(ROOT / "tools"))
    from tidings_ref import load_tokenizer, special_ids  # tokenizers only, no torch
    cls_id, sep_id, _ = special_ids(load_tokenizer(model_dir))
    return Bert(name, model_dir, cfg, w, casing, labels, cls_id, sep_id)


class GraphBuilder:
    """Collects nodes and initializers; every helper returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.names: set[str] = set()
        self.n = 0

    def const(self, name: str, value) -> str:
        if name in self.names:
            return name
        self.names.add(name)
        arr = np.asarray(value)
        arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.n += 1
        out = f"{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self.n}", **attrs))
        return out

    def linear(self, x: str, m: Bert, prefix: str) -> str:
        wt = self.const(prefix + ".weight", m.w[prefix + ".weight"].T.copy())  # [in, out]
        return self.op("Add", self.op("MatMul", x, wt), self.const(prefix + ".bias", m.w[prefix + ".bias"]))

    def gelu(self, x: str) -> str:
        """Exact GELU as 0.5 * x * (1 + erf(x / sqrt 2)): the pattern FusionGelu matches."""
        sqrt2, one, half = (self.const(n, np.float32(v)) for n, v in
                            (("f_sqrt2", math.sqrt(2.0)), ("f_1", 1.0), ("f_half", 0.5)))
        return self.op("Mul", self.op("Mul", x, self.op("Add", self.op("Erf", self.op("Div", x, sqrt2)), one)), half)

    def layer_norm(self, x: str, m: Bert, prefix: str) -> str:
        return self.op("LayerNormalization", x, self.const(prefix + ".weight", m.w[prefix + ".weight"]),
                       self.const(prefix + ".bias", m.w[prefix + ".bias"]), axis=-1,
                       epsilon=float(m.cfg.get("layer_norm_eps", 1e-12)))


def build_graph(m: Bert) -> onnx.ModelProto:
    g = GraphBuilder()
    hidden, heads = int(m.cfg["hidden_size"]), m.heads
    head = hidden // heads
    dyn = ["batch", "seq"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dyn),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dyn)]
    # Embeddings: word + token type 0 (+ casing) + position, then LayerNorm.
    x = g.op("Gather", g.const("embeddings.word_embeddings.weight", m.w["embeddings.word_embeddings.weight"]),
             "input_ids")
    if "embeddings.token_type_embeddings.weight" in m.w:
        x = g.op("Add", x, g.const("token_type_0", m.w["embeddings.token_type_embeddings.weight"][0]))
    if m.casing:
        inputs.append(helper.make_tensor_value_info("casing_ids", TensorProto.INT64, dyn))
        cas = g.const("embeddings.casing_embeddings.weight", m.w["embeddings.casing_embeddings.weight"])
        x = g.op("Add", x, g.op("Gather", cas, "casing_ids"))
    seq = g.op("Shape", "input_ids", start=1, end=2)
    zero, one = g.const("i64_0", [0]), g.const("i64_1", [1])
    pos_table = m.w["embeddings.position_embeddings.weight"][m.position_offset:]
    pos = g.op("Slice", g.const("embeddings.position_embeddings.weight", pos_table), zero, seq, zero)
    x = g.layer_norm(g.op("Add", x, pos), m, "embeddings.LayerNorm")
    # Additive mask [B, 1, 1, S], the pattern the BERT optimizer's attention fusion expects.
    mask = g.op("Cast", g.op("Unsqueeze", g.op("Unsqueeze", "attention_mask", one), g.const("i64_2", [2])),
                to=TensorProto.FLOAT)
    mask = g.op("Mul", g.op("Sub", g.const("f_1", np.float32(1.0)), mask), g.const("f_mask", np.float32(MASK_VALUE)))
    split = g.const("heads_shape", [0, 0, heads, head])
    merge = g.const("merge_shape", [0, 0, hidden])
    scale = g.const("f_sqrt_head", np.float32(math.sqrt(head)))
    if m.mpnet:  # [1, heads, S, S] of a constant [1, heads, 512, 512]
        full = g.const("relative_bias", position_bias(m, int(m.cfg["max_position_embeddings"]) - m.position_offset))
        two, three = g.const("i64_2", [2]), g.const("i64_3", [3])
        rel = g.op("Slice", g.op("Slice", full, zero, seq, two), zero, seq, three)
        mask = g.op("Add", rel, mask)
    for i in range(int(m.cfg["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        q = g.op("Transpose", g.op("Reshape", g.linear(x, m, p + "attention.self.query"), split), perm=[0, 2, 1, 3])
        k = g.op("Transpose", g.op("Reshape", g.linear(x, m, p + "attention.self.key"), split), perm=[0, 2, 3, 1])
        v = g.op("Transpose", g.op("Reshape", g.linear(x, m, p + "attention.self.value"), split), perm=[0, 2, 1, 3])
        probs = g.op("Softmax", g.op("Add", g.op("Div", g.op("MatMul", q, k), scale), mask), axis=-1)
        ctx = g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3]), merge)
        att = g.linear(ctx, m, p + "attention.output.dense")
        x = g.layer_norm(g.op("Add", att, x), m, p + "attention.output.LayerNorm")
        out = g.linear(g.gelu(g.linear(x, m, p + "intermediate.dense")), m, p + "output.dense")
        x = g.layer_norm(g.op("Add", out, x), m, p + "output.LayerNorm")
    if m.labels:
        g.linear(x, m, "classifier")
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dyn + [m.labels])]
    else:  # mean pooling over the mask, then L2 normalisation
        mf = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.FLOAT), g.const("i64_m1", [-1]))
        total = g.op("ReduceSum", g.op("Mul", x, mf), one, keepdims=0)
        count = g.op("Max", g.op("ReduceSum", mf, one, keepdims=0), g.const("f_1", np.float32(1.0)))
        mean = g.op("Div", total, count)
        norm = g.op("Max", g.op("ReduceL2", mean, axes=[-1], keepdims=1), g.const("f_eps", np.float32(1e-12)))
        g.op("Div", mean, norm)
        outputs = [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", hidden])]
    g.nodes[-1].output[0] = outputs[0].name  # the last node made is the output
    graph = helper.make_graph(g.nodes, f"tidings_{m.name}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tidings-bench")
    # The oldest IR version that holds this opset (8 for opset 17), not the newest this onnx
    # writes: an older onnxruntime refuses a file whose IR version is newer than it knows
    # (onnx 1.23 writes 14, onnxruntime 1.30 reads up to 13).
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model


def numpy_forward(m: Bert, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The same encoder in float64 numpy: the reference the ORT graphs are checked against."""
    w = {k: v.astype(np.float64) for k, v in m.w.items()}
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    b, s = ids.shape
    hidden, heads = int(m.cfg["hidden_size"]), m.heads
    eps = float(m.cfg.get("layer_norm_eps", 1e-12))
    erf = np.vectorize(math.erf)

    def ln(x: np.ndarray, p: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    def split(x: np.ndarray) -> np.ndarray:
        return x.reshape(b, s, heads, hidden // heads).transpose(0, 2, 1, 3)

    x = w["embeddings.word_embeddings.weight"][ids]
    if "embeddings.token_type_embeddings.weight" in w:
        x = x + w["embeddings.token_type_embeddings.weight"][0]
    if m.casing:
        x = x + w["embeddings.casing_embeddings.weight"][feeds["casing_ids"]]
    off = m.position_offset
    x = ln(x + w["embeddings.position_embeddings.weight"][off:off + s], "embeddings.LayerNorm")
    add_mask = (1.0 - mask[:, None, None, :]) * MASK_VALUE
    if m.mpnet:
        add_mask = add_mask + position_bias(m, s).astype(np.float64)
    for i in range(int(m.cfg["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        q, k, v = (split(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        sc = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hidden // heads) + add_mask
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(0, 2, 1, 3).reshape(b, s, hidden)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        x = ln(lin(0.5 * h * (1.0 + erf(h / math.sqrt(2.0))), p + "output.dense") + x, p + "output.LayerNorm")
    if m.labels:
        return lin(x, "classifier")
    mf = mask[:, :, None].astype(np.float64)
    mean = (x * mf).sum(1) / np.maximum(mf.sum(1), 1.0)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def export(m: Bert, workdir: Path, per_channel: bool) -> dict[str, Path]:
    """Writes the plain, optimized and int8 graphs; returns backend -> path."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"fp32-plain": workdir / f"{m.name}.fp32.onnx"}
    onnx.save(build_graph(m), str(paths["fp32-plain"]))
    paths["fp32"] = paths["fp32-plain"]
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        # opt_level=0: only the Python fusions. Levels >= 1 first run an ORT pre-pass whose
        # code imports torch (onnxruntime 1.32); this graph has nothing for it to fold anyway.
        opt = optimize_model(str(paths["fp32-plain"]), model_type="bert", num_heads=m.heads,
                             hidden_size=int(m.cfg["hidden_size"]), opt_level=0)
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        paths["fp32"] = workdir / f"{m.name}.fp32-opt.onnx"
        opt.save_model_to_file(str(paths["fp32"]))
        print(f"[{m.name}] bert optimizer fused: {fused}")
    except Exception as e:  # noqa: BLE001 -- any failure: time the plain graph instead
        print(f"[{m.name}] bert optimizer failed ({type(e).__name__}: {e}); fp32 = plain graph")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    paths["int8"] = workdir / f"{m.name}.int8.onnx"
    quantize_dynamic(str(paths["fp32"]), str(paths["int8"]), weight_type=QuantType.QInt8,
                     per_channel=per_channel, op_types_to_quantize=["MatMul", "Attention"],
                     # DefaultTensorType: shape inference stops at the fused com.microsoft ops
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
    for b in ("fp32", "int8"):
        print(f"[{m.name}] {b} graph ops: {op_counts(paths[b])}")
    return paths


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def pass_feeds(m: Bert, lengths: list[int]) -> dict[str, np.ndarray]:
    """One forward pass of rows as `tidings bench` builds them: [CLS] ids [SEP] (ids 1000 +
    (k*7919) % 20000), casing 1 (0 on the specials), `lengths` tokens each (specials included),
    padded with id 0 and mask 0 to the longest."""
    width = max(max(lengths), 3)  # [CLS], at least one piece, [SEP]
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    cas = np.zeros((len(lengths), width), np.int64)
    for r, n in enumerate(lengths):
        body = [1000 + (k * 7919) % 20000 for k in range(max(n - 2, 1))]
        row = [m.cls_id, *body, m.sep_id]
        ids[r, :len(row)], mask[r, :len(row)], cas[r, 1:len(row) - 1] = row, 1, 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if m.casing:
        feeds["casing_ids"] = cas
    return feeds


def load_mix_articles(seed: Path, dev: Path, n: int) -> list[str]:
    """The article set bench/run.py sends (benchlib.load_articles, without its gRPC imports): the
    seed article, then AG News rows as title + ". " + description, `n` in all."""
    out = [seed.read_text().strip()] if seed.exists() else []
    with dev.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if len(out) >= n:
                break
            out.append(f"{r['title'].strip()}. {r['description'].strip()}")
    return out


def mix_passes(m: Bert, articles: list[str], budget: int) -> list[list[int]]:
    """The article mix for `m`: every article tokenized with the model's tokenizer and cut into
    Tidings' windows (254 pieces, 64 shared: tools/tidings_ref.py, the parity reference), each
    window's length with [CLS]/[SEP]; sorted longest first (so that ORT pads little) and cut
    greedily into forward passes of at most `budget` padded tokens (the batcher's slice)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from tidings_ref import load_tokenizer, plan_windows  # tokenizers only, no torch

    tok = load_tokenizer(m.dir)
    lengths = []
    for text in articles:
        n = len(tok.encode(text, add_special_tokens=False).ids)
        lengths += [e - s + 2 for s, e in plan_windows(n)]
    lengths.sort(reverse=True)
    passes: list[list[int]] = []
    for n in lengths:
        if passes and (len(passes[-1]) + 1) * passes[-1][0] <= budget:
            passes[-1].append(n)
        else:
            passes.append([n])
    return passes


def check_feeds(m: Bert, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """2x16 random rows; the second has 11 real tokens, then padding."""
    ids = rng.integers(1000, 21000, size=(2, 16), dtype=np.int64)
    mask = np.ones((2, 16), np.int64)
    ids[:, 0], ids[0, 15], ids[1, 10] = m.cls_id, m.sep_id, m.sep_id
    ids[1, 11:], mask[1, 11:] = 0, 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if m.casing:
        feeds["casing_ids"] = rng.integers(0, 6, size=(2, 16), dtype=np.int64) * mask
    return feeds


def check(m: Bert, paths: dict[str, Path], threads: int) -> None:
    feeds = check_feeds(m, np.random.default_rng(11))
    ref = numpy_forward(m, feeds)
    tol = 1e-3 if m.labels else 1e-4
    outs = {}
    for b in ("fp32-plain", "fp32", "int8"):
        outs[b] = session(paths[b], threads).run(None, feeds)[0].astype(np.float64)
    for b in ("fp32-plain", "fp32"):
        diff = float(np.abs(outs[b] - ref).max())
        print(f"[{m.name}] check {b:<10} vs numpy f64: max |diff| {diff:.2e} (tolerance {tol:g})")
        if not diff < tol:
            raise SystemExit(f"check FAILED: {m.name}: ORT {b} differs from numpy by {diff:.3e}")
    drift = float(np.abs(outs["int8"] - outs["fp32"]).max())
    if m.labels:
        real = feeds["attention_mask"].astype(bool)
        agree = float((outs["int8"].argmax(-1) == outs["fp32"].argmax(-1))[real].mean())
        print(f"[{m.name}] int8 drift vs fp32: max |diff| {drift:.3f}, argmax agreement {agree:.1%} "
              f"of {int(real.sum())} tokens (random ids: indicative only)")
    else:
        cos = (outs["int8"] * outs["fp32"]).sum(-1)  # both unit length
        print(f"[{m.name}] int8 drift vs fp32: max |diff| {drift:.4f}, min cosine {cos.min():.5f}")


def percentile(times: list[float], q: float) -> float:
    """Same rule as `tidings bench`: sorted[ceil(n*q) - 1] (p50 is sorted[n // 2] there)."""
    s = sorted(times)
    return s[len(s) // 2] if q == 0.5 else s[max(math.ceil(len(s) * q) - 1, 0)]


def time_passes(sess: ort.InferenceSession, passes: list[dict[str, np.ndarray]], iters: int,
                warmup: int) -> tuple[float, float]:
    """p50 and p99 seconds of one run of all `passes`, back to back."""
    def once():
        for feeds in passes:
            sess.run(None, feeds)
    for _ in range(warmup):
        once()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return percentile(times, 0.5), percentile(times, 0.99)


def run_tidings(binary: str, shape: list[str], cols: list[str], iters: int, threads: int,
                ner: Path | str, topics: Path | str, precision: str) -> dict[str, float]:
    """tokens/s per model from `BIN bench SHAPE...`: lines `ner|topics batch seq p50 p99
    tokens/s ...` whose batch and seq read `cols`."""
    cmd = [binary, "bench", *shape, "--iters", str(iters),
           "--ner-model", str(ner), "--topic-model", str(topics), "--precision", precision]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()[-2000:]}")
    out = {}
    for line in res.stdout.splitlines():
        f = line.split()
        if len(f) >= 6 and f[0] in ("ner", "topics") and f[1:3] == cols:
            out[f[0]] = float(f[5])
    if not out:
        raise RuntimeError(f"no ner/topics rows in the output of {' '.join(cmd)}:\n{res.stdout}")
    return out


def proc_field(path: str, name: str, default: str) -> str:
    """The value of the first `name: value` line of a /proc file."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def cpu_int8_flags() -> str:
    flags = proc_field("/proc/cpuinfo", "flags", "").split()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none"


def peak_rss_mb() -> float:
    return int(proc_field("/proc/self/status", "VmHWM", "0 kB").split()[0]) / 1024


def cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def ratio(x: float | None, y: float | None) -> str:
    return "-" if x is None or y is None else f"{x / y:.2f}x"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(s)) for b, s in (part.lower().split("x") for part in text.split(","))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x64,16x64,8x256", help="BATCHxSEQ list (SEQ counts [CLS] and [SEP])")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (and RAYON_NUM_THREADS for Tidings)")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per model/backend/shape")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before them")
    ap.add_argument("--backends", default="fp32,int8", help="of fp32, int8, fp32-plain")
    ap.add_argument("--ner", type=Path, default=ROOT / "models/ner", help="NER model dir ('none' to skip)")
    ap.add_argument("--minilm", type=Path, default=ROOT / "models/minilm", help="topic encoder dir ('none' to skip)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "target/ort", help="where the .onnx files go")
    ap.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                    help="int8 weight scales per output column (default) or per tensor (--no-per-channel)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True, help="parity check first")
    ap.add_argument("--check-only", action="store_true", help="export and check, no timing")
    ap.add_argument("--tidings", metavar="BIN", help="also run `BIN bench` per shape and compare")
    ap.add_argument("--tidings-precisions", default="f32,int8",
                    help="`BIN bench --precision` values to run (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every contender at every shape; medians are reported")
    ap.add_argument("--mix-articles", type=int, default=64,
                    help="articles in the article mix, timed after --shapes (0: no mix); see mix_passes")
    ap.add_argument("--mix-budget", type=int, default=1024,
                    help="padded tokens per forward pass of the article mix")
    ap.add_argument("--seed-article", type=Path, default=ROOT.parent / "shared/examples/seed-article.txt",
                    help="the mix's first article (as bench/run.py)")
    ap.add_argument("--dev-csv", type=Path, default=ROOT.parent / "shared/data/ag_news/dev.csv",
                    help="AG News CSV whose rows follow it (as bench/run.py)")
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # optimizer/quantizer chatter (producer name, pre-processing)
    ort.set_default_logger_severity(3)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if bad := set(backends) - {"fp32", "int8", "fp32-plain"}:
        ap.error(f"unknown backends {sorted(bad)}")
    # A shape: its name, and per model the window lengths of each forward pass.
    shapes: list[tuple[str, dict[str, list[list[int]]]]] = [
        (f"{b}x{s_}", {"ner": [[s_] * b], "topics": [[s_] * b]}) for b, s_ in parse_shapes(a.shapes)]
    print(f"CPU: {proc_field('/proc/cpuinfo', 'model name', 'unknown')} ({os.cpu_count()} cpus; int8-relevant flags: {cpu_int8_flags()})")
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}; "
          f"{a.threads} intra-op threads")
    models = [load_bert(n, d) for n, d in (("ner", a.ner), ("topics", a.minilm)) if str(d) != "none"]
    sessions: dict[str, dict[str, ort.InferenceSession]] = {}
    for m in models:
        print(f"[{m.name}] {m.dir}: {m.cfg['num_hidden_layers']} layers, hidden {m.cfg['hidden_size']}, "
              f"{m.heads} heads, casing {m.casing}, labels {m.labels or '-'}")
        paths = export(m, a.workdir, a.per_channel)
        if a.check or a.check_only:
            check(m, paths, a.threads)
        if a.check_only:
            continue
        sessions[m.name] = {b: session(paths[b], a.threads) for b in backends}
    if a.mix_articles > 0 and not a.check_only:
        if a.dev_csv.exists():
            articles = load_mix_articles(a.seed_article, a.dev_csv, a.mix_articles)
            mix = {m.name: mix_passes(m, articles, a.mix_budget) for m in models}
            if all(mix.values()):
                shapes.append(("mix", mix))
            else:
                print("no article mix: the articles make no windows", file=sys.stderr)
            for name, passes in mix.items():
                if not passes:
                    continue
                lens = [n for p in passes for n in p]
                print(f"[{name}] article mix: {len(articles)} articles, {len(lens)} windows of "
                      f"{min(lens)}-{max(lens)} tokens ({sum(lens)} in all), {len(passes)} passes of "
                      f"<= {a.mix_budget} padded tokens")
        else:
            print(f"no article mix: {a.dev_csv} is missing (--dev-csv)", file=sys.stderr)
    # Rounds: every contender at every shape once per round, back to back, so that a slow
    # minute (shared or throttled CPUs) hits all of them; the tables give per-round medians.
    samples: dict[tuple[str, str, str], list[float]] = {}  # (model, contender, shape) -> tokens/s
    precisions = [p.strip() for p in a.tidings_precisions.split(",") if p.strip()] if a.tidings else []
    if not a.check_only:
        for rnd in range(a.rounds):
            for shape, passes in shapes:
                for m in models:
                    tokens = sum(n for p in passes[m.name] for n in p)
                    feeds = [pass_feeds(m, p) for p in passes[m.name]]
                    for backend, sess in sessions[m.name].items():
                        p50, _ = time_passes(sess, feeds, a.iters, a.warmup)
                        samples.setdefault((m.name, f"ort {backend}", shape), []).append(tokens / p50)
                for prec in precisions:
                    if shape != "mix":
                        b, s_ = shape.split("x")
                        got = run_tidings(a.tidings, ["--batch", b, "--seq", s_], [b, s_], a.iters,
                                          a.threads, a.ner, a.minilm, prec)
                    else:  # one model at a time: each has its own windows
                        got = {}
                        for m in models:
                            p = passes[m.name]
                            arg = ";".join(",".join(map(str, lens)) for lens in p)
                            ner, topics = (a.ner, "none") if m.name == "ner" else ("none", a.minilm)
                            got |= run_tidings(a.tidings, ["--mix", arg], [str(sum(map(len, p))), "mix"],
                                               a.iters, a.threads, ner, topics, prec)
                    for name, tps in got.items():
                        samples.setdefault((name, f"tidings {prec}", shape), []).append(tps)
            print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
        contenders = [f"ort {b}" for b in backends] + [f"tidings {p}" for p in precisions]

        def cols(m: Bert, shape: str, passes) -> str:
            """The batch and seq columns: B and S, or the mix's window count and `mix`."""
            if shape == "mix":
                return f"{sum(map(len, passes[m.name])):>6} {'mix':>6}"
            b, s_ = shape.split("x")
            return f"{b:>6} {s_:>6}"

        print(f"\ntokens/s, median of {a.rounds} rounds ({a.threads} threads; {a.iters} timed runs each, p50)")
        print(f"{'model':<8} {'batch':>6} {'seq':>6} " + " ".join(f"{c:>14}" for c in contenders))
        for m in models:
            for shape, passes in shapes:
                med = [statistics.median(samples[(m.name, c, shape)]) for c in contenders]
                print(f"{m.name:<8} {cols(m, shape, passes)} " + " ".join(f"{v:>14.0f}" for v in med))
        if precisions:
            refs = [c for c in contenders if c.startswith("ort ")]
            print("\nTidings / ORT (median of the per-round ratios)")
            print(f"{'model':<8} {'batch':>6} {'seq':>6} " +
                  " ".join(f"{p + '/' + r[4:]:>14}" for p in precisions for r in refs))
            for m in models:
                for shape, passes in shapes:
                    cells = []
                    for p in precisions:
                        t = samples[(m.name, f"tidings {p}", shape)]
                        for r in refs:
                            o = samples[(m.name, r, shape)]
                            cells.append(f"{statistics.median(x / y for x, y in zip(t, o)):>13.2f}x")
                    print(f"{m.name:<8} {cols(m, shape, passes)} " + " ".join(cells))
    print(f"peak RSS (python process) {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
