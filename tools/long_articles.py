#!/usr/bin/env python3
"""Are topics of full-length articles as good as those of short ones? The CoNLL-2003 dev
file holds whole Reuters articles (1996). This cuts it into articles (a headline, then a
dateline such as "LONDON 1996-08-30"), keeps those of 300 words or more, and scores each
with the four AG News labels (models/topics/ag_news.json) through the HTTP API three ways:
the whole article (several model windows), its first 60 words (about an AG News row), and
its first sentence after the dateline. The topic labels below are Tidings' own annotation of
those articles, by index in that cut (World 1, Sports 2, Business 3; 0 = left out as not
clearly one of them); no Sci/Tech article is among them.

    tools/long_articles.py --url http://127.0.0.1:8080 [--no-title] [--conll ../shared/data/conll2003/valid.txt]
"""
import argparse, json, re, urllib.request

LABELS = [2, 2, 2, 2, 2, 2, 3, 3, 2, 1, 1, 1, 3, 3, 1, 3, 3, 3, 0, 3, 1, 3, 0, 3, 3, 3, 1,
          0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 1, 1, 3, 1, 1, 1, 0, 1, 1, 0]
NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def articles(path):
    sents, cur = [], []
    for line in open(path, encoding="utf-8"):
        t = line.split()
        if t:
            cur.append(t[0])
        elif cur:
            sents.append(" ".join(cur))
            cur = []
    if cur:
        sents.append(" ".join(cur))
    starts = [k - 1 for k, s in enumerate(sents)
              if k > 0 and re.match(r"^[A-Z][A-Za-z .,'-]* \d{4}-\d{2}-\d{2}$", s)]
    docs = [sents[a:b] for a, b in zip(starts, starts[1:] + [len(sents)])]
    return [d for d in docs if sum(len(s.split()) for s in d) >= 300]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--conll", default="../shared/data/conll2003/valid.txt")
    ap.add_argument("--labels", default="models/topics/ag_news.json")
    ap.add_argument("--no-title", action="store_true", help="send the body only")
    a = ap.parse_args()
    docs = articles(a.conll)
    assert len(docs) == len(LABELS), f"{len(docs)} articles, {len(LABELS)} labels: the cut changed"
    labels = json.load(open(a.labels))["labels"]
    views = {
        "whole article": lambda d: " ".join(d[2:]),
        "first 60 words": lambda d: " ".join(" ".join(d[2:]).split()[:60]),
        "first sentence": lambda d: d[2],
    }
    kept = [(d, g) for d, g in zip(docs, LABELS) if g]
    for name, view in views.items():
        reqs = [{"id": str(i), "title": "" if a.no_title else d[0], "text": view(d), "labels": labels, "tasks": ["TASK_TOPICS"]}
                for i, (d, _) in enumerate(kept)]
        right, windows = 0, []
        for i in range(0, len(reqs), 32):
            body = json.dumps({"requests": reqs[i:i + 32]}).encode()
            req = urllib.request.Request(f"{a.url}/v1/analyze:batch", body, {"content-type": "application/json"})
            items = json.load(urllib.request.urlopen(req, timeout=600))["items"]
            for (d, g), item in zip(kept[i:i + 32], items):
                r = item["response"]
                right += r["topics"][0]["label"] == NAMES[g - 1]
                windows.append(r["reading"]["windows"])
        print(f"{name:>15}: accuracy {right / len(kept):.3f} ({right}/{len(kept)}), "
              f"windows per article {sum(windows) / len(windows):.1f} (max {max(windows)})")


if __name__ == "__main__":
    main()
