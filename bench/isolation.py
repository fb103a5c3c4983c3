#!/usr/bin/env python3
"""Isolation benchmark (issue #9): do interactive unary calls keep their latency while a batch
job saturates the same Tidings server, and does the batch job keep most of its throughput?

Against ONE running server, three phases of --seconds each, one after the other:

  1. unary alone     closed loop of --unary-concurrency (4) workers calling Analyze, each
                     sending its next call when the previous one returns (after --warmup
                     seconds of the same, unmeasured);
  2. batch alone     the real `tidings batch --concurrency 64` (--tidings-bin) over a JSONL of
                     AG News dev rows; articles/s = lines it wrote to its output within the
                     window (counted at the window's start and end, after --warmup seconds
                     past its first line);
  3. unary + batch   a fresh batch job, started first and warmed up the same way, while the
                     unary loop of phase 1 runs; the batch job's articles/s over the same
                     window as the unary calls.

Articles are AG News dev rows sent as text = title + ". " + description (no title field), as
bench/run.py sends them; each phase's unary calls go through the same rows in the same order.
The batch input repeats the rows with fresh ids, enough of them (--batch-rows) that the job
never runs out during a window; if it does, or it exits, that is a harness failure.

Then it prints the goals of issue #9 with PASS/MISS: unary p99 under batch <= 3x unary p99
alone, batch articles/s under unary load >= 0.70x alone, no unary RESOURCE_EXHAUSTED under
batch load; plus the server's peak RSS (VmHWM of --pid) and the CPU model. Latency
percentiles are of successful calls (client side); every failed call is counted by status.

Exit status: 0 when all three phases ran (goals met or not), 2 on a harness failure (server
not ready, batch job failed or ran dry, no successful call to compare), 130 on Ctrl-C. The
batch job is stopped on every exit path.

    target/release/tidings serve --addr 127.0.0.1:50081 & PID=$!
    python3 bench/isolation.py --addr 127.0.0.1:50081 --pid $PID --seconds 30
"""
import argparse
import asyncio
import collections
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402

from benchlib import (HarnessError, ag_news_texts, cpu_model, harness_main, own_texts,  # noqa: E402
                      log_tail, pct, peak_rss_mib, require_executable, stop_process,
                      wait_ready)
from protos import pb, pb_grpc  # noqa: E402

# Goals of issue #9, "Isolation, as a capability".
MAX_P99_RATIO = 3.0
MIN_BATCH_RATIO = 0.70
JOBS = []  # batch jobs started, stopped on every exit path


def load_texts(dev: Path, join: int = 1) -> list[str]:
    """AG News rows (without `dev`, as in a clone without ../shared, the project's own texts:
    benchlib.own_texts, and stderr says so), or with `join` > 1 long articles of `join`
    consecutive rows each (24 rows are ~1,300 tokens: several windows per article, the case
    issue #30 measured)."""
    if dev.exists():
        texts = list(ag_news_texts(dev))
    else:
        print(f"isolation: {dev} is not here (../shared is not part of a clone): sending the "
              "documents of models/ner/ood/ instead; --dev FILE (AG News CSV) gives the "
              "published mix", file=sys.stderr)
        texts = list(own_texts())
    if not texts:
        raise HarnessError(f"{dev} has no rows")
    if join > 1:
        texts = ["\n\n".join(texts[i:i + join]) for i in range(0, len(texts) - join + 1, join)]
    return texts


# ---------------------------------------------------------------------------------- unary load

async def unary_load(stub, texts, conc, seconds, timeout, error_pause):
    """Closed loop: `conc` workers, each sending its next Analyze when the previous one
    returned, until `seconds` have passed (calls in flight then are waited for and counted).
    After a failed call a worker pauses `error_pause` s, so that fast refusals do not spin."""
    lat, codes, first = [], collections.Counter(), {}
    next_i = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def worker():
        nonlocal next_i
        while time.perf_counter() < stop_at:
            i = next_i
            next_i += 1
            req = pb.AnalyzeRequest(id=f"u{i}", text=texts[i % len(texts)])
            t0 = time.perf_counter()
            try:
                await stub.Analyze(req, timeout=timeout)
                lat.append(time.perf_counter() - t0)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                name = e.code().name
                codes[name] += 1
                first.setdefault(name, e.details())
                await asyncio.sleep(error_pause)

    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - start
    lat.sort()
    errors = {k: v for k, v in sorted(codes.items()) if k != "OK"}
    return dict(calls=sum(codes.values()), ok=codes["OK"], errors=errors, first_errors=first,
                wall_s=wall, ok_per_s=codes["OK"] / wall,
                p50_ms=pct(lat, 50) * 1e3, p95_ms=pct(lat, 95) * 1e3, p99_ms=pct(lat, 99) * 1e3,
                resource_exhausted=codes["RESOURCE_EXHAUSTED"])


# ----------------------------------------------------------------------------------- batch job

class BatchJob:
    """One `tidings batch` process and an incremental count of the lines of its output."""

    def __init__(self, args, name, input_path, tmp):
        self.name = name
        self.output = tmp / f"{name}.out.jsonl"
        self.log = tmp / f"{name}.log"
        self.cmd = [args.tidings_bin, "batch", "--input", str(input_path), "--output",
                    str(self.output), "--server", f"http://{args.addr}",
                    "--concurrency", str(args.batch_concurrency)]
        self.proc = None
        self.offset, self.partial, self.lines, self.error_lines = 0, b"", 0, 0

    def start(self):
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        JOBS.append(self)

    def count(self):
        """Complete lines written so far (the batch client flushes each result line)."""
        try:
            with self.output.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.lines
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        self.lines += len(complete)
        for line in complete:
            if b'"error"' in line and "error" in json.loads(line):
                self.error_lines += 1
        return self.lines

    def check_alive(self, during):
        rc = self.proc.poll()
        if rc is not None:
            self.count()
            why = ("ran out of input; raise --batch-rows" if rc == 0
                   else f"exited with status {rc}")
            raise HarnessError(f"batch job {self.name} {why} ({during}, after {self.lines} "
                               f"lines); log {self.log}:\n{self.log_tail()}")

    def log_tail(self, n=15):
        return log_tail(self.log, n)

    async def warm_up(self, warmup, startup_timeout):
        """Waits for the first result line, then `warmup` more seconds."""
        t0 = time.monotonic()
        while self.count() == 0:
            self.check_alive("before its first result")
            if time.monotonic() - t0 > startup_timeout:
                raise HarnessError(f"batch job {self.name} wrote nothing in {startup_timeout:.0f}"
                                   f" s; log {self.log}:\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(warmup)
        self.check_alive("during warm-up")

    def stop(self):
        stop_process(self.proc, 5)


def write_batch_input(path: Path, texts, rows):
    with path.open("w", encoding="utf-8") as f:
        for k in range(rows):
            f.write(json.dumps({"id": f"b{k}", "text": texts[k % len(texts)]}) + "\n")


async def batch_window(job, seconds):
    """Lines `job` writes over `seconds`; checks every half second that it is still running."""
    n0, t0 = job.count(), time.perf_counter()
    e0 = job.error_lines
    while (left := t0 + seconds - time.perf_counter()) > 0:
        await asyncio.sleep(min(0.5, left))
        job.check_alive("during the measured window")
    n1, t1 = job.count(), time.perf_counter()
    return dict(lines=n1 - n0, error_lines=job.error_lines - e0, wall_s=t1 - t0,
                articles_per_s=(n1 - n0) / (t1 - t0))


# --------------------------------------------------------------------------------------- phases

async def amain(args, tmp: Path):
    texts = load_texts(Path(args.dev), args.join)
    require_executable(args.tidings_bin)
    if args.pid and not Path(f"/proc/{args.pid}").exists():
        raise HarnessError(f"no process {args.pid} (--pid)")
    rows = args.batch_rows or max(4000, math.ceil(500 * (args.warmup + args.seconds + 60)))
    if args.join > 1 and not args.batch_rows:
        rows = max(400, rows // args.join)
    batch_input = tmp / "batch-input.jsonl"
    write_batch_input(batch_input, texts, rows)
    try:
        await wait_ready(args.addr, args.pid, args.wait)
    except SystemExit as e:
        raise HarnessError(str(e)) from None
    log = lambda msg: print(f"isolation: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    opts = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(args.addr, options=opts) as ch:
        stub = pb_grpc.TidingsStub(ch)
        info = await stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        res = dict(addr=args.addr, version=info.version, cpu=cpu_model(), cpus=os.cpu_count(),
                   seconds=args.seconds, warmup=args.warmup, dev_rows=len(texts),
                   join=args.join,
                   batch_rows=rows, unary_concurrency=args.unary_concurrency,
                   batch_concurrency=args.batch_concurrency,
                   limits={f.name: v for f, v in info.limits.ListFields()})
        uc, secs = args.unary_concurrency, args.seconds

        log(f"1/3 unary alone: c={uc}, warm-up {args.warmup:g} s, then {secs:g} s")
        await unary_load(stub, texts, uc, args.warmup, args.timeout, args.error_pause)
        res["unary_alone"] = await unary_load(stub, texts, uc, secs, args.timeout,
                                              args.error_pause)
        if res["unary_alone"]["ok"] == 0:
            raise HarnessError(f"no unary call succeeded on the idle server: "
                               f"{res['unary_alone']['first_errors']}")
        log(f"  {res['unary_alone']['ok']} ok, p99 {res['unary_alone']['p99_ms']:.1f} ms")

        log(f"2/3 batch alone: --concurrency {args.batch_concurrency}, {rows} rows")
        job = BatchJob(args, "batch-alone", batch_input, tmp)
        job.start()
        try:
            await job.warm_up(args.warmup, args.startup_timeout)
            res["batch_alone"] = await batch_window(job, secs)
        finally:
            job.stop()
        if res["batch_alone"]["lines"] == 0:
            raise HarnessError(f"the batch job alone wrote nothing in {secs:g} s; "
                               f"log {job.log}:\n{job.log_tail()}")
        log(f"  {res['batch_alone']['articles_per_s']:.1f} articles/s")
        await asyncio.sleep(args.settle)

        log("3/3 unary + batch")
        job = BatchJob(args, "batch-with-unary", batch_input, tmp)
        job.start()
        try:
            await job.warm_up(args.warmup, args.startup_timeout)
            n0, e0, t0 = job.count(), job.error_lines, time.perf_counter()
            unary = await unary_load(stub, texts, uc, secs, args.timeout, args.error_pause)
            job.check_alive("during the measured window")
            n1, t1 = job.count(), time.perf_counter()
        finally:
            job.stop()
        res["unary_with_batch"] = unary
        res["batch_with_unary"] = dict(lines=n1 - n0, error_lines=job.error_lines - e0,
                                       wall_s=t1 - t0, articles_per_s=(n1 - n0) / (t1 - t0))
        log(f"  unary p99 {unary['p99_ms']:.1f} ms, batch "
            f"{res['batch_with_unary']['articles_per_s']:.1f} articles/s")
    res["peak_rss_mib"] = peak_rss_mib(args.pid)
    return res


def report(res):
    ua, ub = res["unary_alone"], res["unary_with_batch"]
    ba, bb = res["batch_alone"], res["batch_with_unary"]
    lim = ", ".join(f"{k}={v}" for k, v in res["limits"].items())
    print(f"Tidings {res['version']} at {res['addr']}; {res['seconds']:g} s per phase, "
          f"warm-up {res['warmup']:g} s; unary c={res['unary_concurrency']}, "
          f"batch --concurrency {res['batch_concurrency']} ({res['batch_rows']} rows)")
    print(f"CPU: {res['cpu']} ({res['cpus']} logical CPUs); server limits: {lim}")
    head = (f"{'phase':<14} {'unary ok':>8} {'errors':>6} {'ok/s':>7} {'p50 ms':>8} "
            f"{'p95 ms':>8} {'p99 ms':>8} {'batch lines':>11} {'articles/s':>10}")
    print(head)
    print("-" * len(head))

    def row(name, u, b):
        us = (f"{u['ok']:>8} {sum(u['errors'].values()):>6} {u['ok_per_s']:>7.2f} "
              f"{u['p50_ms']:>8.1f} {u['p95_ms']:>8.1f} {u['p99_ms']:>8.1f}") if u else \
             f"{'-':>8} {'-':>6} {'-':>7} {'-':>8} {'-':>8} {'-':>8}"
        bs = f"{b['lines']:>11} {b['articles_per_s']:>10.2f}" if b else f"{'-':>11} {'-':>10}"
        print(f"{name:<14} {us} {bs}")

    row("unary alone", ua, None)
    row("batch alone", None, ba)
    row("unary + batch", ub, bb)
    for name, u in (("alone", ua), ("under batch", ub)):
        errs = ", ".join(f"{k} {v}" for k, v in u["errors"].items()) or "none"
        print(f"unary errors {name}: {errs}")
        for k, msg in u["first_errors"].items():
            print(f"  first {k}: {msg}")
    for name, b in (("alone", ba), ("under unary load", bb)):
        if b["error_lines"]:
            print(f"WARNING: batch {name} wrote {b['error_lines']} error lines (counted in its "
                  f"articles/s)")

    p99 = ub["p99_ms"] / ua["p99_ms"] if ub["ok"] else math.inf
    share = bb["articles_per_s"] / ba["articles_per_s"]
    re = ub["resource_exhausted"]
    goals = [
        (p99 <= MAX_P99_RATIO, f"unary p99 under batch / alone: {ub['p99_ms']:.1f} / "
                               f"{ua['p99_ms']:.1f} ms = {p99:.2f}x (goal <= {MAX_P99_RATIO:g}x)"),
        (share >= MIN_BATCH_RATIO, f"batch articles/s under unary load / alone: "
                                   f"{bb['articles_per_s']:.2f} / {ba['articles_per_s']:.2f} = "
                                   f"{share:.2f} (goal >= {MIN_BATCH_RATIO:.2f})"),
        (re == 0, f"unary RESOURCE_EXHAUSTED under batch: {re} (goal 0)"),
    ]
    print("goals (issue #9):")
    for ok, text in goals:
        print(f"  {'PASS' if ok else 'MISS'}  {text}")
    rss = res["peak_rss_mib"]
    print(f"server peak RSS (VmHWM): {f'{rss:.0f} MiB' if rss is not None else '- (give --pid)'}")
    res["goals"] = dict(p99_ratio=p99, batch_share=share, unary_resource_exhausted=re,
                        passed=[ok for ok, _ in goals])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the Tidings server")
    ap.add_argument("--pid", type=int, help="pid of the server (peak RSS, and to notice it exit)")
    ap.add_argument("--seconds", type=float, default=30, help="measured seconds per phase (30)")
    ap.add_argument("--warmup", type=float, default=5,
                    help="unmeasured seconds before phase 1 and after each batch job's first "
                         "result (5)")
    ap.add_argument("--unary-concurrency", type=int, default=4, help="unary workers (4)")
    ap.add_argument("--batch-concurrency", type=int, default=64,
                    help="`tidings batch --concurrency` (64)")
    ap.add_argument("--tidings-bin", default=str(REPO / "target/release/tidings"),
                    help="the tidings binary whose `batch` runs the job (target/release/tidings)")
    ap.add_argument("--dev", default=str(REPO.parent / "shared/data/ag_news/dev.csv"),
                    help="AG News CSV (label,title,description); default ../shared/data/ag_news/dev.csv")
    ap.add_argument("--join", type=int, default=1,
                    help="long-article mode: each article joins this many AG rows (24 is "
                         "~1,300 tokens, several windows); 1 = AG rows as they are")
    ap.add_argument("--batch-rows", type=int, default=0,
                    help="rows of the batch input (0: 500/s over warm-up + seconds + 60 s)")
    ap.add_argument("--timeout", type=float, default=60, help="deadline of each unary call, s")
    ap.add_argument("--error-pause", type=float, default=0.05,
                    help="a unary worker's pause after a failed call, s (0.05)")
    ap.add_argument("--settle", type=float, default=2,
                    help="pause after stopping the batch-alone job, s (2)")
    ap.add_argument("--startup-timeout", type=float, default=60,
                    help="most seconds a batch job may take to write its first line (60)")
    ap.add_argument("--wait", type=float, default=30, help="wait up to this long for the server")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temp dir (batch input, outputs, logs)")
    args = ap.parse_args()
    if args.seconds <= 0 or args.warmup < 0 or args.unary_concurrency < 1 \
            or args.batch_concurrency < 1:
        ap.error("--seconds > 0, --warmup >= 0, concurrencies >= 1")

    def body(tmp):
        res = asyncio.run(amain(args, tmp))
        report(res)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    def stop_jobs(_tmp):
        for job in JOBS:
            job.stop()

    # Exit 2 on a harness failure, 130 on Ctrl-C, 143 on SIGTERM; the batch job is stopped on
    # every exit path.
    harness_main("isolation", "tidings-isolation.", args.keep_temp, body, stop_jobs)


if __name__ == "__main__":
    main()
