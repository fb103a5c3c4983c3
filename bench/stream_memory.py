#!/usr/bin/env python3
"""Stream memory benchmark (issue #30, defect 1): many AnalyzeStream callers sending requests
at every size limit must not take the server past its memory limit, every request must be
answered or refused with a clear status, and unary calls meanwhile keep their latency.

Against ONE running server (--pid to read its peak RSS):

  1. unary alone   --unary-concurrency (4) closed-loop workers calling Analyze on short
                   articles for --seconds;
  2. streams       --streams (64) AnalyzeStreamItems calls at once, each sending --per-stream (32)
                   requests at the limits: text of --text-chars (200,000) 4-byte characters,
                   64 labels each with a 2,000-character description and 16 examples of
                   2,000 characters (GetInfo's limits are read and used if smaller), each
                   request with fresh label texts; the same unary loop runs meanwhile;
                   the streams have --stream-timeout seconds;
  3. the report    statuses of every stream answer (and of the streams themselves), the
                   server's peak RSS (VmHWM), whether it is still serving, unary p99 with the
                   streams vs alone, against the goals: peak RSS <= 768 MiB, every request
                   answered or refused, p99 ratio <= 3.

    target/release/tidings serve --addr 127.0.0.1:50091 & PID=$!
    python3 bench/stream_memory.py --addr 127.0.0.1:50091 --pid $PID
"""

import argparse
import asyncio
import collections
import multiprocessing
import os
import signal
import sys
import time

import grpc

from benchlib import cpu_model, pct, peak_rss_mib, wait_ready
from protos import pb, pb_grpc

MAX_RSS_MIB = 768
MAX_P99_RATIO = 3.0
FOUR_BYTE = "\U0001F600"  # one character, four UTF-8 bytes


def big_request(i: int, text_chars: int, lim, labels: int = 64) -> "pb.AnalyzeRequest":
    chars = min(text_chars, lim.max_text_chars or text_chars)
    n_labels = min(labels, lim.max_labels or labels)
    # GetInfo reports these two only in newer servers: the defaults otherwise.
    n_examples = getattr(lim, "max_label_examples", 0) or 16
    label_chars = getattr(lim, "max_label_chars", 0) or 2000
    tag = f"r{i} "

    def filler(k):
        s = f"{tag}{k} "
        return (s + "x" * label_chars)[:label_chars]

    labels = [
        pb.TopicLabel(name=f"label {j}", description=filler(f"d{j}"),
                      examples=[filler(f"e{j}.{k}") for k in range(n_examples)])
        for j in range(n_labels)
    ]
    return pb.AnalyzeRequest(id=f"big{i}", text=(tag + FOUR_BYTE * chars)[:chars], labels=labels)


async def unary_loop(stub, conc, stop: asyncio.Event, seconds=None):
    lat, codes = [], collections.Counter()
    text = "Angela Merkel met Emmanuel Macron in Paris to discuss the budget of the union."

    async def worker(w):
        k = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await stub.Analyze(pb.AnalyzeRequest(id=f"u{w}.{k}", text=text), timeout=60)
                lat.append((time.perf_counter() - t0) * 1000)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                await asyncio.sleep(0.05)
            k += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(conc)]
    if seconds is not None:
        await asyncio.sleep(seconds)
        stop.set()
    await asyncio.gather(*tasks)
    lat.sort()
    return dict(ok=codes["OK"], codes=dict(codes), p50_ms=pct(lat, 50), p99_ms=pct(lat, 99))


def unary_process(addr, conc, seconds, out):
    """Runs `unary_loop` in this process until `seconds` pass or SIGUSR1 comes; puts its
    result on `out`."""
    async def run():
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
        async with grpc.aio.insecure_channel(addr) as ch:
            return await unary_loop(pb_grpc.TidingsStub(ch), conc, stop, seconds)
    out.put(asyncio.run(run()))


def unary_in_process(args, seconds):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=unary_process, args=(args.addr, args.unary_concurrency, seconds, out))
    p.start()
    res = out.get(timeout=seconds + 120)
    p.join()
    return res


async def one_stream(stub, s, per_stream, text_chars, lim, labels, timeout):
    codes = collections.Counter()

    def requests():
        for k in range(per_stream):
            yield big_request(s * per_stream + k, text_chars, lim, labels)

    call = stub.AnalyzeStreamItems(requests(), timeout=timeout)
    answered = 0
    try:
        async for item in call:
            answered += 1
            if item.WhichOneof("outcome") == "response":
                codes["OK"] += 1
            else:
                codes[grpc.StatusCode(next(c for c in grpc.StatusCode
                                           if c.value[0] == item.error.code)).name] += 1
        end = "OK"
    except grpc.aio.AioRpcError as e:
        end = e.code().name
        if end not in ("OK", "DEADLINE_EXCEEDED") and s < 2:
            print(f"stream_memory: stream {s} ended {end}: {e.details()}", file=sys.stderr)
    return answered, codes, end


async def amain(args):
    await wait_ready(args.addr, args.pid, args.wait)
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(args.addr, options=opts) as ch:
        stub = pb_grpc.TidingsStub(ch)
        info = await stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        lim = info.limits
        res = dict(cpu=cpu_model(), streams=args.streams, per_stream=args.per_stream,
                   size_bytes=big_request(0, args.text_chars, lim, args.labels).ByteSize())
        print(f"stream_memory: requests of {res['size_bytes'] / 2**20:.1f} MiB, "
              f"{args.streams} streams x {args.per_stream}", file=sys.stderr)
        res["rss_before_mib"] = peak_rss_mib(args.pid)
        res["unary_alone"] = unary_in_process(args, args.seconds)
        # The unary loop runs in a process of its own: the streams' request building would
        # stall this one's event loop and show up as unary latency.
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        unary = ctx.Process(target=unary_process, args=(args.addr, args.unary_concurrency, None, out))
        unary.start()
        t0 = time.perf_counter()
        # One channel per stream, as separate clients would be.
        chans = [grpc.aio.insecure_channel(args.addr, options=opts) for _ in range(args.streams)]
        outs = await asyncio.gather(*[
            one_stream(pb_grpc.TidingsStub(c), s, args.per_stream, args.text_chars, lim,
                       args.labels, args.stream_timeout)
            for s, c in enumerate(chans)])
        res["streams_s"] = time.perf_counter() - t0
        os.kill(unary.pid, signal.SIGUSR1)
        res["unary_with_streams"] = out.get(timeout=120)
        unary.join()
        for c in chans:
            await c.close()
        answered = sum(o[0] for o in outs)
        res["answered"] = answered
        res["item_codes"] = dict(sum((o[1] for o in outs), collections.Counter()))
        res["stream_ends"] = dict(collections.Counter(o[2] for o in outs))
        res["peak_rss_mib"] = peak_rss_mib(args.pid)
        try:
            await stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            res["alive"] = True
        except grpc.aio.AioRpcError:
            res["alive"] = False
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--pid", type=int, required=True, help="the server's pid (peak RSS)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--per-stream", type=int, default=32)
    ap.add_argument("--text-chars", type=int, default=200_000)
    ap.add_argument("--labels", type=int, default=64,
                    help="labels a request (64, the limit: ~280k tokens of label work, more "
                         "than the default queue, so each is refused INVALID_ARGUMENT; 48 fit)")
    ap.add_argument("--unary-concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10, help="unary-alone phase, s")
    ap.add_argument("--stream-timeout", type=float, default=600)
    ap.add_argument("--wait", type=float, default=120)
    args = ap.parse_args()
    res = asyncio.run(amain(args))
    ua, uw = res["unary_alone"], res["unary_with_streams"]
    ratio = (uw["p99_ms"] or 0) / max(ua["p99_ms"] or 1e-9, 1e-9)
    print(f"CPU: {res['cpu']}")
    print(f"streams: {args.streams} x {args.per_stream} requests of "
          f"{res['size_bytes'] / 2**20:.1f} MiB in {res['streams_s']:.1f} s: "
          f"{res['answered']} answered {res['item_codes']}, streams ended {res['stream_ends']}")
    print(f"unary alone: {ua}")
    print(f"unary with streams: {uw}")
    print(f"server peak RSS: {res['peak_rss_mib']:.0f} MiB (before: {res['rss_before_mib']:.0f})")
    goals = [
        ("peak RSS <= 768 MiB", res["peak_rss_mib"] <= MAX_RSS_MIB),
        ("server alive", res["alive"]),
        ("every request answered or refused, every stream ended OK",
         res["answered"] == args.streams * args.per_stream and set(res["stream_ends"]) == {"OK"}),
        (f"unary p99 with streams <= {MAX_P99_RATIO}x alone ({ratio:.2f}x)", ratio <= MAX_P99_RATIO),
        ("no unary RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED" not in uw["codes"]),
    ]
    for name, ok in goals:
        print(f"{'PASS' if ok else 'MISS'} {name}")


if __name__ == "__main__":
    main()
