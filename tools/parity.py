#!/usr/bin/env python3
"""Numerical parity check of Tidings' models against Hugging Face transformers (float32).

Prints, for a few fixed sentences (accents, an emoji, curly quotes, mixed case), the model
outputs as JSON:

  {"model": DIR, "task": "ner"|"embed",
   "sentences": [{"text": ..., "ids": [...], "casing": [...],   # casing: ner only
                  "logits": [[...], ...]}]}                     # ner: one row per token
                  "embedding": [...]}]}                         # embed: the pooled unit vector

`casing` is also written for embed when the model has a casing embedding ("tidings_casing":
true, e.g. a multi-task model whose NER encoder also serves the embeddings). For a model with
"tidings_topic_projection": true, `embedding` is after the projection and the second
normalisation (as Tidings serves it); `--no-projection` leaves the projection out (to see that
the check would catch a missing one). `--task ner` ignores the projection.

`ids`, `casing` and `logits` include the [CLS] and [SEP] rows. Each sentence is one window.
With `--compare FILE` (the same JSON written by Tidings), prints the max absolute difference
per sentence and overall instead, and exits 1 if ids differ or the difference exceeds --tol.

With `--min-cosine C` (for Tidings' int8 outputs), each sentence's embedding (or each token's
logits row) must instead have a cosine of at least C with the reference; the max difference is
still printed. `--text-file F` reads the sentences from F, one per line (each must fit one
window); for MPNet (or any model transformers' AutoModel knows) the same commands apply:

  python3 tools/parity.py --task ner --model models/ner > /tmp/ref.json
  python3 tools/parity.py --task embed --model models/minilm --compare /tmp/tidings.json
  python3 tools/parity.py --task embed --model models/mpnet --out /tmp/ref.json > /dev/null
  tidings eval parity --task embed --model models/mpnet --sentences /tmp/ref.json --precision int8 > /tmp/q.json
  python3 tools/parity.py --task embed --model models/mpnet --compare /tmp/q.json --min-cosine 0.99
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import tidings_ref as ref  # noqa: E402

SENTENCES = [
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    "José Mourinho's side beat Atlético Madrid 2-1 at the Estádio da Luz in Lisbon.",
    "NASA and SpaceX launched the Crew-9 mission from Cape Canaveral 🚀 on Saturday.",
    "Shares of APPLE Inc. fell 3% in New York, while iPhone sales in Zürich and São Paulo slowed.",
    "“We will act,” said Ursula von der Leyen… according to the EU’s spokesperson in Brussels.",
    "Dr. Łukasz Żuławski of the Universität Wien met McDonald's CEO in Kraków — 東京 next.",
]


def run(model_dir: str, task: str, texts: list[str], project: bool = True) -> dict:
    out = {"model": model_dir, "task": task, "sentences": []}
    m = ref.NerModel(model_dir) if task == "ner" else ref.EmbedModel(model_dir)
    for text, p in zip(texts, ref.tokenize(m.tok, texts)):
        if len(p.ids) > ref.WINDOW_PIECES:
            raise SystemExit(f"sentence longer than one window ({len(p.ids)} pieces): {text!r}")
        row = {"text": text, "ids": [m.cls_id, *p.ids, m.sep_id]}
        if task == "ner":
            logits, _ = m.logits([p.ids], [p.casing])
            row["casing"] = [ref.NONE, *p.casing, ref.NONE]
            row["logits"] = logits[0].tolist()
        else:
            row["embedding"] = m.embed([p.ids], [p.casing], project=project)[0].tolist()
            if m.casing is not None:
                row["casing"] = [ref.NONE, *p.casing, ref.NONE]
        out["sentences"].append(row)
    return out


def compare(mine: dict, theirs: dict, tol: float, min_cosine: float | None = None) -> int:
    """Prints the differences; returns the exit code (1 on any problem)."""
    problems, worst, worst_cos = 0, 0.0, 1.0
    a_rows, b_rows = mine["sentences"], theirs["sentences"]
    if len(a_rows) != len(b_rows):
        print(f"sentence count differs: reference {len(a_rows)}, other {len(b_rows)}")
        problems += 1
    for i, (a, b) in enumerate(zip(a_rows, b_rows)):
        errors, info, diff = [], [], float("nan")
        if a["text"] != b.get("text"):
            errors.append("text differs")
        b_ids = b.get("ids", [])
        if a["ids"] != b_ids:
            j = next((k for k, (x, y) in enumerate(zip(a["ids"], b_ids)) if x != y),
                     min(len(a["ids"]), len(b_ids)))
            errors.append(f"ids differ at {j} (lengths {len(a['ids'])} vs {len(b_ids)})")
        if "casing" in a and "casing" in b and a["casing"] != b["casing"]:
            j = next((k for k, (x, y) in enumerate(zip(a["casing"], b["casing"])) if x != y), 0)
            errors.append(f"casing differs at {j}: {a['casing'][j:j+3]} vs {b['casing'][j:j+3]}")
        key = "logits" if "logits" in a else "embedding"
        if key not in b:
            errors.append(f"no {key!r} in the other file")
        elif not errors:
            x, y = torch.tensor(a[key]), torch.tensor(b[key])
            if x.shape != y.shape:
                errors.append(f"shape differs {tuple(x.shape)} vs {tuple(y.shape)}")
            else:
                diff = (x - y).abs().max().item()
                worst = max(worst, diff)
                cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).min().item()
                worst_cos = min(worst_cos, cos)
                info.append(f"min cosine {cos:.5f}")
                if key == "logits":
                    info.append(f"argmax agreement {(x.argmax(-1) == y.argmax(-1)).float().mean().item():.3f}")
                if min_cosine is not None:
                    if cos < min_cosine:
                        errors.append(f"cosine under {min_cosine:g}")
                elif diff > tol:
                    errors.append(f"over tol {tol:g}")
        problems += bool(errors)
        notes = "; ".join([f"FAIL: {e}" for e in errors] + info)
        print(f"[{i}] max|diff| {diff:.3e}  {notes}  {a['text'][:50]!r}")
    rule = f"min cosine {min_cosine:g}" if min_cosine is not None else f"tol {tol:g}"
    print(f"overall max|diff| = {worst:.3e}, min cosine {worst_cos:.5f}: "
          f"{'OK' if not problems else f'{problems} problem(s)'} ({rule})")
    return 1 if problems else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model dir (config.json, tokenizer.json, model.safetensors)")
    ap.add_argument("--task", choices=["ner", "embed"], required=True)
    ap.add_argument("--compare", metavar="FILE", help="JSON written by Tidings in the same format")
    ap.add_argument("--tol", type=float, default=1e-3, help="max abs difference accepted (default 1e-3)")
    ap.add_argument("--text", action="append", help="use these sentences instead of the fixed ones")
    ap.add_argument("--text-file", help="read the sentences from this file, one per line")
    ap.add_argument("--min-cosine", type=float,
                    help="accept a sentence when its cosine to the reference is at least this (int8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", help="also write the reference JSON here")
    ap.add_argument("--no-projection", action="store_true",
                    help="embed: leave out the model's topic projection (a negative control)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.text_file:
        args.text = [t.strip() for t in Path(args.text_file).read_text().splitlines() if t.strip()]
    texts = args.text or SENTENCES
    if args.compare:
        theirs = json.loads(Path(args.compare).read_text())
        texts = args.text or [s["text"] for s in theirs["sentences"]]
    result = run(args.model, args.task, texts, project=not args.no_projection)
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    if args.compare:
        sys.exit(compare(result, theirs, args.tol, args.min_cosine))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
