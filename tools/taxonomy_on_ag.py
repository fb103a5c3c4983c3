#!/usr/bin/env python3
"""How well a server's default taxonomy covers AG News: each AG class maps to the taxonomy
labels that count as right for it (World: politics, conflict, crime, disaster, ...), and an
article is right when its top topic is one of them. Compares taxonomies with different
labels on the same rows, through the HTTP API (`tidings serve --http-addr`).

    tools/taxonomy_on_ag.py --url http://127.0.0.1:8080 --taxonomy iptc [--csv ../shared/data/ag_news/dev.csv]
"""
import argparse, csv, json, time, urllib.request

# AG class -> labels (by id, else name) that are right for it, per taxonomy.
MAPS = {
    "news": {
        "1": {"world", "politics", "crime"},
        "2": {"sports"},
        "3": {"business"},
        "4": {"technology", "science"},
    },
    "iptc": {
        "1": {"medtop:11000000", "medtop:16000000", "medtop:02000000", "medtop:03000000",
              "medtop:14000000", "medtop:12000000"},
        "2": {"medtop:15000000"},
        "3": {"medtop:04000000", "medtop:09000000"},
        "4": {"medtop:13000000"},
    },
}


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--taxonomy", choices=sorted(MAPS), required=True)
    ap.add_argument("--csv", default="../shared/data/ag_news/dev.csv")
    a = ap.parse_args()
    rows = list(csv.DictReader(open(a.csv, newline="", encoding="utf-8")))
    right, per = 0, {}
    started = time.time()
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        reqs = [{"id": str(i + j), "title": r["title"], "text": r["description"], "tasks": ["TASK_TOPICS"], "topK": 1}
                for j, r in enumerate(chunk)]
        items = post(f"{a.url}/v1/analyze:batch", {"requests": reqs})["items"]
        for r, item in zip(chunk, items):
            top = item["response"]["topics"][0]
            ok = (top["id"] or top["label"]) in MAPS[a.taxonomy][r["label"]]
            right += ok
            n, k = per.get(r["label"], (0, 0))
            per[r["label"]] = (n + 1, k + ok)
    print(f"{a.taxonomy}: {right / len(rows):.4f} of {len(rows)} AG rows get a right top topic "
          f"({time.time() - started:.0f}s); per AG class: "
          + ", ".join(f"{c}: {k / n:.3f}" for c, (n, k) in sorted(per.items())))


if __name__ == "__main__":
    main()
