#!/usr/bin/env python3
"""Load driver: Tidings vs the reference server, unary Analyze calls at several concurrencies.

Articles: the seed article (shared/examples/seed-article.txt) followed by AG News dev rows
(title + ". " + description). Every server and concurrency level gets the same articles in
the same order (cycled). Each level runs --requests calls, or for --seconds if given, after
--warmup unmeasured calls; servers are driven one after the other, never at once.

Prints one row per (server, concurrency): completed calls, errors, articles/s, tokens/s (sum
of response.reading.tokens / wall time), p50/p95/p99 latency in ms, and the server's peak RSS
(VmHWM of --*-pid, since the process started); then Tidings/reference throughput ratios. The
reference is labelled with its backend, from its GetInfo version (`reference-0.1.0+ort-int8`:
ort-int8; no `+`: torch), e.g. `reference+ort-int8`; JSON rows carry it as "backend".

    python3 bench/run.py --reference-addr 127.0.0.1:50072 --reference-pid PID \
        --tidings-addr 127.0.0.1:50071 --tidings-pid PID --seconds 20
"""
import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402

from benchlib import load_articles, pct, peak_rss_mib, wait_ready  # noqa: E402
from protos import pb, pb_grpc  # noqa: E402


async def drive(stub, articles, conc, n_requests, seconds, timeout):
    """Runs one level; returns latencies (s), tokens, errors, wall time and first error."""
    lat, tokens, errors, first_err = [], 0, 0, None
    next_i = 0
    start = time.perf_counter()
    stop_at = start + seconds if seconds else None

    async def worker():
        nonlocal next_i, tokens, errors, first_err
        while True:
            if stop_at is not None:
                if time.perf_counter() >= stop_at:
                    return
            elif next_i >= n_requests:
                return
            i = next_i
            next_i += 1
            req = pb.AnalyzeRequest(id=str(i), text=articles[i % len(articles)])
            t0 = time.perf_counter()
            try:
                resp = await stub.Analyze(req, timeout=timeout)
                lat.append(time.perf_counter() - t0)
                tokens += resp.reading.tokens
            except grpc.aio.AioRpcError as e:
                errors += 1
                first_err = first_err or f"{e.code().name}: {e.details()}"

    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat, tokens, errors, time.perf_counter() - start, first_err


async def bench_server(name, addr, pid, articles, args):
    rows = []
    async with grpc.aio.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.TidingsStub(ch)
        for i in range(args.warmup):
            await stub.Analyze(pb.AnalyzeRequest(id=f"w{i}", text=articles[i % len(articles)]), timeout=args.timeout)
        for conc in args.concurrency:
            lat, tokens, errors, wall, first_err = await drive(
                stub, articles, conc, args.requests, args.seconds, args.timeout)
            lat.sort()
            row = dict(server=name, concurrency=conc, done=len(lat), errors=errors, wall_s=wall,
                       articles_per_s=len(lat) / wall, tokens_per_s=tokens / wall,
                       p50_ms=pct(lat, 50) * 1e3, p95_ms=pct(lat, 95) * 1e3, p99_ms=pct(lat, 99) * 1e3,
                       peak_rss_mib=peak_rss_mib(pid), first_error=first_err)
            rows.append(row)
            print(f"  {name} c={conc}: {row['articles_per_s']:.1f} articles/s, {errors} errors",
                  file=sys.stderr, flush=True)
    return rows


def label(row):
    """The server column: `tidings`, `reference+BACKEND`, or the label given for it."""
    if row.get("label"):
        return row["label"]
    return f"{row['server']}+{row['backend']}" if row.get("backend") else row["server"]


async def reference_backend(addr):
    """The reference server's backend, from its GetInfo version (VERSION or VERSION+BACKEND)."""
    async with grpc.aio.insecure_channel(addr) as ch:
        info = await pb_grpc.TidingsStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)
    return info.version.partition("+")[2] or "torch"


def print_table(rows):
    width = max([10] + [len(label(r)) for r in rows])
    head = f"{'server':<{width}} {'conc':>4} {'done':>6} {'errors':>6} {'articles/s':>10} {'tokens/s':>9} " \
           f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'peak RSS MiB':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else "-"
        print(f"{label(r):<{width}} {r['concurrency']:>4} {r['done']:>6} {r['errors']:>6} "
              f"{r['articles_per_s']:>10.2f} {r['tokens_per_s']:>9.0f} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {rss:>12}")
    for r in rows:
        if r["first_error"]:
            print(f"first error of {label(r)} c={r['concurrency']}: {r['first_error']}")
    by = {(r["server"], r["concurrency"]): r for r in rows}
    ratios = [f"c={c}: {by['tidings', c]['articles_per_s'] / by['reference', c]['articles_per_s']:.2f}x"
              for (s, c) in by if s == "tidings" and ("reference", c) in by
              and by["reference", c]["articles_per_s"] > 0]
    if ratios:
        ref = next(label(r) for r in rows if r["server"] == "reference")
        print(f"throughput Tidings/{ref}: " + ", ".join(ratios))


async def amain(args):
    articles = load_articles(Path(args.seed_article), Path(args.dev_csv), args.articles)
    servers = [(n, a, p) for n, a, p in (("tidings", args.tidings_addr, args.tidings_pid),
                                         ("reference", args.reference_addr, args.reference_pid)) if a]
    if not servers:
        raise SystemExit("give --tidings-addr and/or --reference-addr")
    for _, addr, pid in servers:
        await wait_ready(addr, pid, args.wait)
    print(f"{len(articles)} articles; per level: "
          f"{f'{args.seconds:g} s' if args.seconds else f'{args.requests} requests'}", file=sys.stderr)
    rows = []
    for name, addr, pid in servers:
        level_rows = await bench_server(name, addr, pid, articles, args)
        if name == "reference":
            backend = await reference_backend(addr)
            for r in level_rows:
                r["backend"] = backend
        for r in level_rows:
            r["label"] = getattr(args, f"{name}_label")
        rows += level_rows
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tidings-addr", help="host:port of Tidings")
    ap.add_argument("--reference-addr", help="host:port of bench/reference_server.py")
    ap.add_argument("--tidings-pid", type=int, help="pid of the Tidings server (for peak RSS)")
    ap.add_argument("--reference-pid", type=int, help="pid of the reference server (for peak RSS)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=200, help="calls per level (default 200)")
    ap.add_argument("--seconds", type=float, help="run each level this long instead of --requests")
    ap.add_argument("--warmup", type=int, default=4, help="unmeasured calls per server first")
    ap.add_argument("--articles", type=int, default=500, help="articles: seed + dev rows (default 500)")
    ap.add_argument("--seed-article", default=str(REPO.parent / "shared/examples/seed-article.txt"))
    ap.add_argument("--dev-csv", default=str(REPO.parent / "shared/data/ag_news/dev.csv"))
    ap.add_argument("--timeout", type=float, default=120, help="per-call deadline in seconds")
    ap.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for servers")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--tidings-label", help="name of the --tidings-addr server in the table")
    ap.add_argument("--reference-label",
                    help="name of the --reference-addr server in the table (e.g. when it is a "
                         "second Tidings configuration)")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
