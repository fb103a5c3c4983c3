#!/usr/bin/env python3
"""Writes the tiny, randomly initialised models of tests/fixtures/ with transformers, and the
outputs transformers itself computes for them, so that CI checks Tidings' implementation of
each architecture against the reference without downloading real weights.

  bench/.venv/bin/python tools/tiny_models.py        # (re)writes tests/fixtures/tiny-*/

Each folder holds config.json, tokenizer.json (a word-level vocabulary of the model's size:
"<s>" "<pad>" "</s>" "<unk>" then w4 w5 ...), model.safetensors, and expected.safetensors:
`input_ids` and `attention_mask` of a right-padded batch, `hidden` (the encoder's last hidden
states) and `logits` (the token-classification head's), all from transformers in float32.
The batch's longest row is longer than MPNet's 128-position bucket range, so every kind of
relative position bucket is exercised.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
LENGTHS = [150, 41, 7]  # tokens per row, specials included


def tokenizer(vocab_size: int) -> Tokenizer:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok


def batch(vocab_size: int, pad: int):
    g = torch.Generator().manual_seed(7)
    width = max(LENGTHS)
    ids = torch.full((len(LENGTHS), width), pad, dtype=torch.long)
    mask = torch.zeros((len(LENGTHS), width), dtype=torch.long)
    for r, n in enumerate(LENGTHS):
        ids[r, 0], ids[r, n - 1] = 0, 2
        ids[r, 1:n - 1] = torch.randint(4, vocab_size, (n - 2,), generator=g)
        mask[r, :n] = 1
    return ids, mask


def save(name: str, cfg, model_cls, tweak=None):
    """Builds `model_cls(cfg)` with seeded random weights (`tweak(model)` may change some),
    runs the fixed batch through it and writes tests/fixtures/<name>/."""
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    # Buffers transformers rebuilds itself are left out, as in a real checkpoint.
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.endswith(("position_ids", "token_type_ids"))}
    save_file(sd, out / "model.safetensors")
    tokenizer(cfg.vocab_size).save(str(out / "tokenizer.json"))
    ids, mask = batch(cfg.vocab_size, cfg.pad_token_id)
    with torch.inference_mode():
        res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    save_file({"input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64),
               "hidden": res.hidden_states[-1].contiguous(), "logits": res.logits.contiguous()},
              out / "expected.safetensors")
    print(f"wrote {out}", file=sys.stderr)


LABELS = dict(id2label={0: "O", 1: "B-PER", 2: "I-PER"}, label2id={"O": 0, "B-PER": 1, "I-PER": 2})
SMALL = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64)


def mpnet():
    from transformers import MPNetConfig, MPNetForTokenClassification
    cfg = MPNetConfig(**SMALL, num_hidden_layers=2, max_position_embeddings=514, pad_token_id=1,
                      relative_attention_num_buckets=32, layer_norm_eps=1e-5, **LABELS)

    def tweak(model):  # random init leaves the relative bias small; make it matter
        model.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
    save("tiny-mpnet", cfg, MPNetForTokenClassification, tweak)


def xlm_roberta():
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification
    cfg = XLMRobertaConfig(**SMALL, num_hidden_layers=2, max_position_embeddings=514, pad_token_id=1,
                           type_vocab_size=1, layer_norm_eps=1e-5, **LABELS)
    save("tiny-xlm-roberta", cfg, XLMRobertaForTokenClassification)


def deberta_v2():
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification
    # DeBERTa-v3's settings: relative attention with log buckets, shared keys, no absolute
    # positions in the input.
    cfg = DebertaV2Config(**SMALL, num_hidden_layers=2, max_position_embeddings=512, pad_token_id=0,
                          relative_attention=True, position_buckets=64, max_relative_positions=-1,
                          pos_att_type=["p2c", "c2p"], position_biased_input=False,
                          norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0,
                          layer_norm_eps=1e-7, hidden_act="gelu", **LABELS)
    save("tiny-deberta-v2", cfg, DebertaV2ForTokenClassification)


def modernbert():
    from transformers import ModernBertConfig, ModernBertForTokenClassification
    # Local attention (window 16) in two of three layers, as ModernBERT interleaves them.
    cfg = ModernBertConfig(**SMALL, num_hidden_layers=3, max_position_embeddings=512, pad_token_id=1,
                           global_attn_every_n_layers=3, local_attention=16, bos_token_id=0,
                           eos_token_id=2, cls_token_id=0, sep_token_id=2,
                           attn_implementation="eager", **LABELS)
    save("tiny-modernbert", cfg, ModernBertForTokenClassification)


if __name__ == "__main__":
    for build in (mpnet, xlm_roberta, deberta_v2, modernbert):
        build()
