#!/usr/bin/env python3
"""Soak test: a running Tidings server at saturation for a long time, from this process.

Keeps --concurrency callers busy for --minutes with a mix of traffic a real backend sends:
mostly unary Analyze of news articles (the seed article and AG News rows), plus AnalyzeBatch
calls, short AnalyzeStream calls, requests with their own labels, and a share of calls that
must fail: empty text (INVALID_ARGUMENT), a 1 ms deadline (DEADLINE_EXCEEDED) and calls the
client cancels mid-flight (CANCELLED). Every --sample seconds it prints the calls answered so
far, statuses, and the server's RSS (VmRSS of --pid); at the end, the totals by kind and
status, latency percentiles of the successful unary calls, and RSS at start, end and peak.

It exits non-zero if any call got a status its kind does not allow (e.g. INTERNAL, or
UNAVAILABLE while the server is up), or if RSS grew by more than --max-growth-mib between the
first sample after warm-up and the end.

    target/release/tidings serve --addr 127.0.0.1:50071 & PID=$!
    python3 bench/soak.py --addr 127.0.0.1:50071 --pid $PID --minutes 10 --concurrency 32
"""
import argparse
import asyncio
import collections
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402

from benchlib import load_articles, pct, status_mib, wait_ready  # noqa: E402
from protos import pb, pb_grpc  # noqa: E402

Code = grpc.StatusCode
# What each kind of call may end with. RESOURCE_EXHAUSTED is the documented answer of a full
# queue to unary calls, so it is allowed (and counted) for them.
ALLOWED = {
    "analyze": {Code.OK, Code.RESOURCE_EXHAUSTED},
    "labels": {Code.OK, Code.RESOURCE_EXHAUSTED},
    "batch": {Code.OK, Code.RESOURCE_EXHAUSTED},
    "stream": {Code.OK},
    "empty": {Code.INVALID_ARGUMENT},
    "deadline": {Code.DEADLINE_EXCEEDED, Code.OK},
    "cancel": {Code.CANCELLED, Code.OK},
}
MIX = [("analyze", 80), ("labels", 5), ("batch", 4), ("stream", 3), ("empty", 3),
       ("deadline", 3), ("cancel", 2)]
FIRST_MESSAGE = {}  # (kind, code) -> the first message of a status the kind does not allow
LABELS = [pb.TopicLabel(name=n) for n in ("economy", "war", "football", "elections", "space")]


def rss_mib(pid):
    return status_mib(pid, "VmRSS")


async def call(stub, kind, articles, rng, timeout):
    """Makes one call of `kind`; returns (status code, latency s)."""
    text = articles[rng.randrange(len(articles))]
    t0 = time.perf_counter()
    try:
        if kind == "analyze":
            await stub.Analyze(pb.AnalyzeRequest(text=text), timeout=timeout)
        elif kind == "labels":
            await stub.Analyze(pb.AnalyzeRequest(text=text, labels=LABELS), timeout=timeout)
        elif kind == "empty":
            await stub.Analyze(pb.AnalyzeRequest(text="   "), timeout=timeout)
        elif kind == "deadline":
            await stub.Analyze(pb.AnalyzeRequest(text=text), timeout=0.001)
        elif kind == "batch":
            items = [pb.AnalyzeRequest(id=str(i), text=articles[rng.randrange(len(articles))])
                     for i in range(8)]
            await stub.AnalyzeBatch(pb.AnalyzeBatchRequest(requests=items), timeout=timeout)
        elif kind == "stream":
            reqs = [pb.AnalyzeRequest(id=str(i), text=articles[rng.randrange(len(articles))])
                    for i in range(16)]
            got = 0
            async for _ in stub.AnalyzeStream(iter(reqs), timeout=timeout):
                got += 1
            if got != len(reqs):
                return Code.DATA_LOSS, time.perf_counter() - t0
        elif kind == "cancel":
            c = stub.Analyze(pb.AnalyzeRequest(text=text), timeout=timeout)
            await asyncio.sleep(rng.uniform(0.001, 0.05))
            c.cancel()
            try:
                await c
            except asyncio.CancelledError:
                return Code.CANCELLED, time.perf_counter() - t0
        return Code.OK, time.perf_counter() - t0
    except grpc.aio.AioRpcError as e:
        if e.code() not in ALLOWED[kind]:
            FIRST_MESSAGE.setdefault((kind, e.code().name), e.details())
        return e.code(), time.perf_counter() - t0
    except asyncio.CancelledError:
        return Code.CANCELLED, time.perf_counter() - t0


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1:50071")
    ap.add_argument("--pid", type=int, required=True, help="pid of the server (for RSS)")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sample", type=float, default=30, help="seconds between progress lines")
    ap.add_argument("--warmup", type=float, default=30, help="seconds before the start RSS sample")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--max-growth-mib", type=float, default=32)
    ap.add_argument("--articles", type=int, default=2000)
    ap.add_argument("--seed-article", type=Path, default=REPO.parent / "shared/examples/seed-article.txt")
    ap.add_argument("--dev-csv", type=Path, default=REPO.parent / "shared/data/ag_news/dev.csv")
    args = ap.parse_args()

    articles = load_articles(args.seed_article, args.dev_csv, args.articles)
    await wait_ready(args.addr, args.pid, 180)
    counts = collections.Counter()
    ok_lat = []
    kinds, weights = zip(*MIX)
    t_start = time.monotonic()
    t_end = t_start + args.minutes * 60

    async def worker(i):
        rng = random.Random(i)
        async with grpc.aio.insecure_channel(args.addr) as ch:
            stub = pb_grpc.TidingsStub(ch)
            while time.monotonic() < t_end:
                kind = rng.choices(kinds, weights)[0]
                code, lat = await call(stub, kind, articles, rng, args.timeout)
                counts[(kind, code.name)] += 1
                if kind == "analyze" and code == Code.OK:
                    ok_lat.append(lat)

    rss_start = None
    rss_first = rss_mib(args.pid)
    peak = rss_first or 0
    tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
    print(f"soak: {args.concurrency} callers for {args.minutes:g} min against {args.addr} "
          f"(pid {args.pid}); RSS before: {rss_first:.0f} MiB", flush=True)
    next_sample = t_start + args.sample
    warm_at = t_start + args.warmup
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1)
        now = time.monotonic()
        rss = rss_mib(args.pid)
        if rss is None:
            print("soak: the server is gone", flush=True)
            break
        peak = max(peak, rss)
        if rss_start is None and now >= warm_at:
            rss_start = rss
        if now >= next_sample:
            next_sample += args.sample
            done = sum(counts.values())
            bad = sum(v for (k, c), v in counts.items() if c != "OK")
            print(f"  {now - t_start:6.0f} s  calls {done:7d}  non-OK {bad:6d}  RSS {rss:6.0f} MiB", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.monotonic() - t_start
    rss_end = rss_mib(args.pid)

    print(f"\ncalls by kind and status ({wall:.0f} s):")
    unexpected = 0
    for (kind, code), n in sorted(counts.items()):
        allowed = Code[code] in ALLOWED[kind]
        unexpected += 0 if allowed else n
        note = "" if allowed else f"   <- unexpected: {FIRST_MESSAGE.get((kind, code), '')!r}"
        print(f"  {kind:9s} {code:20s} {n:8d}{note}")
    total = sum(counts.values())
    ok = sum(v for (_, c), v in counts.items() if c == "OK")
    ok_lat.sort()
    print(f"total {total} calls ({total / wall:.1f}/s), {ok} OK; unary Analyze OK latency "
          f"p50 {pct(ok_lat, 50) * 1e3:.0f} ms, p99 {pct(ok_lat, 99) * 1e3:.0f} ms")
    print(f"RSS: before {rss_first:.0f} MiB, after warm-up {rss_start or float('nan'):.0f} MiB, "
          f"end {rss_end or float('nan'):.0f} MiB, peak {peak:.0f} MiB")
    growth = (rss_end or 0) - (rss_start or rss_first or 0)
    if rss_end is None:
        print("FAIL: the server did not survive")
        sys.exit(1)
    if unexpected:
        print(f"FAIL: {unexpected} calls ended with a status their kind does not allow")
        sys.exit(1)
    if growth > args.max_growth_mib:
        print(f"FAIL: RSS grew by {growth:.0f} MiB (> {args.max_growth_mib:g})")
        sys.exit(1)
    print(f"OK: RSS growth after warm-up {growth:+.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
