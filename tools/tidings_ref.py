"""Reference (PyTorch + Hugging Face transformers) implementation of Tidings' model semantics.

Shared by tools/parity.py and bench/reference_server.py. Everything here mirrors what the
Rust service does, so that its outputs can be checked against an independent implementation:

- tokenization: the model dir's tokenizer.json with padding and truncation OFF and no special
  tokens; [CLS] ... [SEP] are added per window;
- windows: at most WINDOW_PIECES pieces, consecutive windows sharing WINDOW_OVERLAP pieces;
  each piece is read from the window where it has the most context (ties: earlier window);
- casing: a word-shape id per piece (see `shape`), computed on the ORIGINAL text under the
  piece's offsets; its embedding row is added to the word embedding (NER models whose
  config.json has "tidings_casing": true);
- NER: BertForTokenClassification in float32 (weights may be stored in f16); any other
  architecture transformers knows through its AutoModelForTokenClassification (MPNet);
- embeddings: BertModel (or the AutoModel of the config's model_type, e.g. MPNetModel), mean
  pooling over the attention mask, L2 normalisation; the encoder
  of a BertForTokenClassification checkpoint (`bert.` prefix, e.g. a multi-task model with
  "tidings_shared_encoder": true) is read the same way, with its casing embedding when
  config.json has "tidings_casing": true (as Rust's SentenceEmbedder does); with
  "tidings_topic_projection": true, the unit mean is then mapped by the top-level linear layer
  `tidings_topic_projection.{weight,bias}` (weight [hidden, hidden], PyTorch's [out, in]) and
  L2-normalised again (src/model/heads.rs `Pooler`). The NER model ignores that layer.

torch, safetensors.torch and transformers are imported where the models and tensors need them:
the tokenization, window and casing helpers (load_tokenizer, tokenize, plan_windows, owners,
shape, special_ids) work without torch (bench/reference_server.py --backend ort-*).
"""
from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is not reachable; never try it
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tokenizers import Tokenizer  # noqa: E402

if TYPE_CHECKING:
    import torch

WINDOW_PIECES = 254  # pieces per window, without [CLS]/[SEP]
WINDOW_OVERLAP = 64  # pieces shared by consecutive windows
CASING_NAME = "bert.embeddings.casing_embeddings.weight"
PROJECTION = "tidings_topic_projection"  # top-level Linear of the pooled states (heads.rs)

# Word shapes (src/pipeline/casing.rs).
NONE, LOWER, TITLE, UPPER, MIXED, NO_LETTERS = range(6)


def _is_alpha(c: str) -> bool:
    # Rust's char::is_alphabetic is the Unicode "Alphabetic" property: letters (L*), letter
    # numbers (Nl) and Other_Alphabetic (some combining marks, circled letters). Python has no
    # Other_Alphabetic table; L* + Nl agrees on all ordinary text, including accented letters.
    return c.isalpha() or unicodedata.category(c) == "Nl"


def shape(piece: str) -> int:
    """Word shape of `piece`, the original text under one token (same rules as the Rust)."""
    letters = uppers = 0
    first_upper = False
    for c in piece:
        if _is_alpha(c):
            if c.isupper():
                uppers += 1
                if letters == 0:
                    first_upper = True
            letters += 1
    if letters == 0:
        return NO_LETTERS if piece else NONE
    if uppers == 0:
        return LOWER
    if letters == 1 and uppers == 1:
        return TITLE
    if letters == uppers:
        return UPPER
    if uppers == 1 and first_upper:
        return TITLE
    return MIXED


def plan_windows(n: int, size: int = WINDOW_PIECES, overlap: int = WINDOW_OVERLAP):
    """[(start, end)] windows over n pieces (src/pipeline/windows.rs `plan`)."""
    size = max(size, 1)
    step = size - min(overlap, size - 1)
    out, start = [], 0
    while start < n:
        end = min(start + size, n)
        out.append((start, end))
        if end == n:
            break
        start += step
    return out


def owners(n: int, windows) -> list[int]:
    """For each piece, the window reading it with the largest margin; ties go to the earlier."""
    best = [(-1, -1)] * n
    for w, (s, e) in enumerate(windows):
        for t in range(s, min(e, n)):
            margin = min(t - s, e - 1 - t)
            if margin > best[t][1]:
                best[t] = (w, margin)
    return [w for w, _ in best]


@dataclass
class Pieces:
    """A text's word pieces, without special tokens."""
    ids: list[int]
    offsets: list[tuple[int, int]]  # char offsets into the original text
    words: list[int | None]
    casing: list[int]


def load_tokenizer(model_dir) -> Tokenizer:
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> list[Pieces]:
    out = []
    for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False)):
        offs = [tuple(o) for o in enc.offsets]
        out.append(Pieces(list(enc.ids), offs, list(enc.word_ids),
                          [shape(text[s:e]) for s, e in offs]))
    return out


def pad_rows(rows: list[list[int]], cls_id: int, sep_id: int, pad_id: int = 0):
    """Wraps each row of piece ids as [CLS] row [SEP], pads to the longest; (ids, mask)."""
    import torch
    width = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r) + 2] = torch.tensor([cls_id, *r, sep_id], dtype=torch.long)
        mask[i, : len(r) + 2] = 1
    return ids, mask


def pad_casing(rows: list[list[int]], width: int):
    """Casing ids laid out like `pad_rows` (0 for [CLS], [SEP] and padding)."""
    import torch
    cas = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cas[i, 1 : len(r) + 1] = torch.tensor(r, dtype=torch.long)
    return cas


def _read_weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    adapter = json.loads((Path(model_dir) / "config.json").read_text()).get("tidings_adapter")
    return _merge_adapter(sd, model_dir, adapter) if adapter else sd


def _merge_adapter(own: dict[str, torch.Tensor], model_dir, adapter: dict) -> dict[str, torch.Tensor]:
    """A model saved as low-rank adapters over a base (config.json's "tidings_adapter", as
    `tidings train ner --adapter-rank` writes it): the base's tensors renamed under the model's
    prefix, the model's own in their place where it has them, and W + (alpha / rank) B @ A for
    each adapted weight. Written from the definition, apart from Rust's model::adapter."""
    from safetensors.torch import load_file
    base_dir = Path(adapter["base"])
    if not base_dir.is_absolute():
        base_dir = Path(model_dir) / base_dir
    base_file = base_dir / "model.safetensors"
    if base_file.stat().st_size != adapter["base_bytes"]:
        raise ValueError(f"{model_dir}: an adapter over {adapter['base']} of {adapter['base_bytes']} bytes; "
                         f"{base_file} is another size")
    base = load_file(str(base_file))
    table = "embeddings.word_embeddings.weight"
    prefix = next(k[: -len(table)] for k in base if k.endswith(table))  # "" or e.g. "mpnet."
    scale = adapter["alpha"] / adapter["rank"]
    out = {}
    for name, w in base.items():
        if not name.startswith(prefix) or name[len(prefix):].startswith("pooler."):
            continue
        target = f"{adapter['prefix']}.{name[len(prefix):]}"
        if target in own:
            out[target] = own.pop(target)
            continue
        w = w.float() if w.is_floating_point() else w
        stem = target.removesuffix(".weight")
        if f"{stem}.lora_A" in own:
            w = w + scale * (own.pop(f"{stem}.lora_B") @ own.pop(f"{stem}.lora_A"))
        out[target] = w
    left = [k for k in own if k.endswith((".lora_A", ".lora_B"))]
    if left:
        raise ValueError(f"{model_dir}: adapters without a base weight: {left}")
    out.update(own)
    return out


def _pop_projection(sd: dict[str, torch.Tensor], raw: dict, model_dir, hidden: int):
    """Removes `tidings_topic_projection.{weight,bias}` from `sd`; returns (weight, bias) when
    config.json has "tidings_topic_projection": true (an error if they are missing or of the
    wrong shape), else None (stray tensors are ignored, as Rust does)."""
    w, b = sd.pop(f"{PROJECTION}.weight", None), sd.pop(f"{PROJECTION}.bias", None)
    if not raw.get("tidings_topic_projection"):
        return None
    if w is None or b is None:
        missing = [n for n, t in (("weight", w), ("bias", b)) if t is None]
        raise ValueError(f"{model_dir}: tidings_topic_projection is set but "
                         f"{', '.join(f'{PROJECTION}.{n}' for n in missing)} missing from model.safetensors")
    if tuple(w.shape) != (hidden, hidden) or tuple(b.shape) != (hidden,):
        raise ValueError(f"{model_dir}: {PROJECTION} has shapes {tuple(w.shape)}, {tuple(b.shape)}; "
                         f"expected ({hidden}, {hidden}), ({hidden},)")
    return w, b


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], ignore=()):
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Buffers (position_ids, token_type_ids) may or may not be stored; weights must all be.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    unexpected = [k for k in unexpected
                  if not k.endswith(("position_ids", "token_type_ids")) and not k.startswith(ignore)]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")


def special_ids(tok: Tokenizer, pad_id: int | None = None) -> tuple[int, int, int]:
    """(open, close, pad): what the tokenizer's post-processor wraps a sequence in (as Rust's
    ModelDir::special_ids: MPNet's vocabulary also holds [CLS]/[SEP] but uses <s> ... </s>),
    else [CLS]/[SEP]; pad from the config when given, else [PAD] or 0."""
    wrapped = tok.encode("", add_special_tokens=True).ids
    if len(wrapped) == 2:
        cls_id, sep_id = wrapped
    else:
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if pad_id is None:
        pad_id = tok.token_to_id("[PAD]") or 0
    if cls_id is None or sep_id is None:
        raise ValueError("tokenizer has no [CLS]/[SEP]")
    return cls_id, sep_id, pad_id


def _segment_args(config, ids):
    """token_type_ids for the models that take them (BERT-family; MPNet has none)."""
    import torch
    return {"token_type_ids": torch.zeros_like(ids)} if getattr(config, "type_vocab_size", 0) else {}


class NerModel:
    """BertForTokenClassification (+ Tidings' casing embedding) in float32."""

    def __init__(self, model_dir):
        from transformers import AutoConfig, AutoModelForTokenClassification
        self.dir = str(model_dir)
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        self.config = AutoConfig.from_pretrained(self.dir)
        self.labels = [self.config.id2label[i] for i in range(len(self.config.id2label))]
        self.model = AutoModelForTokenClassification.from_config(self.config).float().eval()  # f32 whatever torch_dtype says
        self.base = getattr(self.model, self.model.base_model_prefix)
        sd = _read_weights(model_dir)
        casing = sd.pop(f"{self.model.base_model_prefix}.embeddings.casing_embeddings.weight", None)
        if raw.get("tidings_casing") and casing is None:
            raise ValueError(f"{self.dir}: tidings_casing is set but {CASING_NAME} is missing")
        self.casing = casing if raw.get("tidings_casing") else None
        # The topic projection (if any) acts on pooled states only: it does not touch logits.
        sd.pop(f"{PROJECTION}.weight", None)
        sd.pop(f"{PROJECTION}.bias", None)
        _load_into(self.model, sd)
        self.tok = load_tokenizer(model_dir)
        self.cls_id, self.sep_id, self.pad_id = special_ids(self.tok, self.config.pad_token_id)

    def logits(self, rows: list[list[int]], casing: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [batch, width, labels] of windows given as piece ids (no specials); and mask."""
        import torch
        with torch.inference_mode():
            ids, mask = pad_rows(rows, self.cls_id, self.sep_id, self.pad_id)
            emb = self.base.embeddings.word_embeddings(ids)
            if self.casing is not None:
                emb = emb + self.casing[pad_casing(casing, ids.shape[1])]
            out = self.model(inputs_embeds=emb, attention_mask=mask,
                             **_segment_args(self.config, ids))
            return out.logits, mask


class EmbedModel:
    """BertModel (+ Tidings' casing embedding) with mean pooling over the attention mask and
    L2 normalisation, then Tidings' topic projection and L2 normalisation again when config.json
    has "tidings_topic_projection": true. A head's weights (`classifier.*`, `pooler.*`) are
    ignored. `projection` is None or (weight [hidden, hidden], bias [hidden])."""

    def __init__(self, model_dir):
        from transformers import AutoConfig, AutoModel
        self.dir = str(model_dir)
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        self.config = AutoConfig.from_pretrained(self.dir)
        self.model = AutoModel.from_config(self.config, add_pooling_layer=False).float().eval()
        sd = _read_weights(model_dir)
        # Top level of the checkpoint, beside the `bert.` (`mpnet.`) encoder if there is one.
        self.projection = _pop_projection(sd, raw, self.dir, self.config.hidden_size)
        prefix = self.model.base_model_prefix + "."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        casing = sd.pop(CASING_NAME[5:], None)  # "embeddings.casing_embeddings.weight"
        if raw.get("tidings_casing") and casing is None:
            raise ValueError(f"{self.dir}: tidings_casing is set but {CASING_NAME} is missing")
        self.casing = casing if raw.get("tidings_casing") else None
        _load_into(self.model, sd, ignore=("pooler.", "classifier."))
        self.tok = load_tokenizer(model_dir)
        self.cls_id, self.sep_id, self.pad_id = special_ids(self.tok, self.config.pad_token_id)

    def sums(self, rows: list[list[int]], casing: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the sum of hidden states over the mask [batch, hidden] and the mask count
        (before any projection; `pool` turns them into embeddings).
        `casing` (per piece, like `rows`) is required when the model has a casing embedding."""
        import torch
        with torch.inference_mode():
            ids, mask = pad_rows(rows, self.cls_id, self.sep_id, self.pad_id)
            if self.casing is None:
                h = self.model(input_ids=ids, attention_mask=mask,
                               **_segment_args(self.config, ids)).last_hidden_state
            else:
                if casing is None:
                    raise ValueError(f"{self.dir}: model has a casing embedding; pass the casing rows")
                emb = self.model.embeddings.word_embeddings(ids) + self.casing[pad_casing(casing, ids.shape[1])]
                h = self.model(inputs_embeds=emb, attention_mask=mask,
                               **_segment_args(self.config, ids)).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1), m.sum(1)

    def pool(self, s: torch.Tensor, n: torch.Tensor, project: bool = True) -> torch.Tensor:
        """Unit embeddings [batch, hidden] from `sums`: the unit mean, then (if the model has
        one and `project`) the topic projection and unit length again."""
        import torch
        with torch.inference_mode():
            x = torch.nn.functional.normalize(s / n.clamp(min=1), dim=-1)
            if project and self.projection is not None:
                w, b = self.projection
                x = torch.nn.functional.normalize(torch.nn.functional.linear(x, w, b), dim=-1)
            return x

    def embed(self, rows: list[list[int]], casing: list[list[int]] | None = None,
              project: bool = True) -> torch.Tensor:
        """Unit sentence embeddings [batch, hidden] (see `pool`)."""
        s, n = self.sums(rows, casing)
        return self.pool(s, n, project)
