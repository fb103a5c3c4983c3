#!/usr/bin/env python3
"""Rolling restart under load (issue #10): with client-side load balancing, does restarting
Tidings replicas one at a time, while unary calls keep coming, cost any failed call?

It starts --replicas (3) `tidings serve` processes on free loopback ports (each with
--drain-delay-ms, default 2000, and a Prometheus --metrics-addr of its own), waits until each
answers grpc.health.v1 SERVING, then drives unary Analyze calls at --concurrency (8) for the
whole run from ONE grpc.aio channel over all replicas (a closed loop: each worker sends its
next call when the previous one returns). After --warmup (10) s it restarts the replicas one
at a time: SIGTERM replica k, wait for it to exit, start it again on the SAME port, wait for
health SERVING, wait --settle (5) s, next replica. The load goes on --tail (5) s after the
last settle, then stops; calls in flight are waited for and counted.

The client configuration under test is what a client of Tidings should configure:

  target   ipv4:127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3   (every replica, one channel)
  options  grpc.lb_policy_name = round_robin
           grpc.enable_retries = 1
           grpc.default_authority = tidings
           grpc.service_config = {
             "loadBalancingConfig": [{"round_robin": {}}],
             "healthCheckConfig": {"serviceName": "tidings.v1.Tidings"},
             "methodConfig": [{
               "name": [{"service": "tidings.v1.Tidings"}],
               "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s",
                               "maxBackoff": "1s", "backoffMultiplier": 2,
                               "retryableStatusCodes": ["UNAVAILABLE"]}}]}

- round_robin keeps one connection (subchannel) per replica and spreads calls over the
  READY ones; pick_first (gRPC's default) would pin every call to one replica.
- healthCheckConfig turns on gRPC client-side health checking: the channel keeps a
  grpc.health.v1.Health/Watch stream open on each connection and round_robin picks only
  backends whose "tidings.v1.Tidings" status is SERVING. On SIGTERM Tidings turns NOT_SERVING
  at once and keeps serving for --drain-delay-ms before it closes its listener, so the
  channel stops sending new calls there before the replica stops accepting them. It is built
  into gRPC core (grpcio needs no grpcio-health-checking for it); pick_first does not use it.
- the retryPolicy retries a call that fails with UNAVAILABLE (a connection reset under a
  call in flight, a GOAWAY racing a new call, a replica that refuses while draining) up to 3
  more times, after random waits of at most 0.1, 0.2, 0.4 s (capped at 1 s), on whichever
  replica round_robin picks then. Analyze has no side effects, so a retry is always safe.
  Retries need grpc.enable_retries = 1 (the default in recent grpcio; set anyway); the
  per-call deadline bounds all attempts together.
- grpc.default_authority: for a multi-address ipv4: target gRPC's default :authority is the
  address list ("127.0.0.1:P1,127.0.0.1:P2,..."), which Tidings' HTTP/2 stack refuses
  (RST_STREAM PROTOCOL_ERROR): every call, health checks included, fails INTERNAL and the
  channel reports "connections to all backends failing; ... health check call failed". Any
  valid host name works (--authority, default "tidings"). A dns: target does not need it.
- the replicas' drain delay (2 s here) must exceed the time the client needs to see
  NOT_SERVING (one Watch message: milliseconds on an idle network).

Controls (not recommended settings; they show what each part contributes and that the
harness does see failures): --no-health-check, --max-attempts 1 (no retryPolicy),
--drain-delay-ms 0, --signal KILL (no drain at all: the calls in flight there are lost
unless retried).

What it measures and prints: total calls, OK, failed calls by gRPC status (with the first
message of each and when they failed relative to the latest SIGTERM), calls/s, latency
p50/p95/p99/max (successful calls, client side) overall, before the restarts, during them
(in flight at any time from the first SIGTERM to the last replica's SERVING + settle) and
after; per replica: SIGTERM to exit, spawn to SERVING, and, from the replicas' own
tidings_requests_total counters (scraped every --metrics-interval s), how many calls the
stopping process answered after SIGTERM and when its last one was seen (calls in flight at
SIGTERM only, if round_robin stopped picking it at once) and how soon after SERVING the
restarted process answered its first call (it is back in rotation); the CPU model; and PASS
or MISS for the goal of issue #10, zero failed calls.

Articles: AG News dev rows (--dev, default ../shared/data/ag_news/dev.csv) as
title + ". " + description, as bench/run.py sends them; a built-in list of news sentences
when the file is missing.

The binary (--tidings-bin) is copied into a temp dir first, so that a build that replaces
target/release/tidings mid-run cannot change what a restarted replica runs; the replicas run
in the repository root (they load models/ relative to it). Server logs go to the temp dir,
kept with --keep-temp or when the harness fails.

Exit status: 0 when the run completed (goal met or missed), 2 on a harness failure (a
replica never became SERVING, would not exit, no call succeeded before the restarts), 130 on
Ctrl-C. Every replica it started is stopped on every exit path.

    python3 bench/rolling_restart.py                       # 3 replicas, c=8, defaults
    python3 bench/rolling_restart.py --json /tmp/rr.json --keep-temp
"""
import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402

from benchlib import (HarnessError, ag_news_texts, cpu_model, harness_main,  # noqa: E402
                      log_tail, pct, require_executable, stop_process)
from protos import pb, pb_grpc  # noqa: E402

SERVICE = "tidings.v1.Tidings"
REPLICAS = []  # every Replica started, stopped on every exit path
SENTENCES = [
    "Oil prices rose on Monday after OPEC signalled further output cuts, traders in London said.",
    "The European Central Bank kept interest rates unchanged and said inflation was easing.",
    "Apple unveiled a new iPhone in Cupertino, California, with a faster chip and a better camera.",
    "Manchester United beat Liverpool 2-1 at Old Trafford on Sunday with a late goal by Rashford.",
    "NASA said its Artemis mission will carry astronauts around the Moon next year.",
    "Protesters gathered in Paris as French lawmakers debated the pension reform bill.",
    "Microsoft agreed to buy the game maker Activision Blizzard for $69 billion in cash.",
    "The World Health Organization warned of a rise in measles cases across Europe.",
    "Japan's Prime Minister met President Biden in Washington to discuss trade and security.",
    "Shares of Tesla fell 5 percent after the carmaker cut prices in China again.",
    "Roger Federer won his eighth Wimbledon title, beating Marin Cilic in straight sets.",
    "Scientists at CERN in Geneva reported a new measurement of the W boson mass.",
]


def log(msg):
    print(f"rolling_restart: {msg}", file=sys.stderr, flush=True)


def load_texts(dev: Path):
    if dev.exists():
        texts = list(ag_news_texts(dev))
        if texts:
            return texts, f"{dev} ({len(texts)} rows)"
    return list(SENTENCES), f"{len(SENTENCES)} built-in sentences ({dev} not found)"


def free_ports(n):
    """n distinct free loopback ports (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------ client configuration

def service_config(args) -> dict:
    cfg = {"loadBalancingConfig": [{"round_robin": {}}]}
    if not args.no_health_check:
        cfg["healthCheckConfig"] = {"serviceName": SERVICE}
    if args.max_attempts < 2:  # gRPC rejects a retryPolicy with maxAttempts < 2
        return cfg
    return {
        **cfg,
        "methodConfig": [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": args.max_attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
    }


def channel_options(args):
    return [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(args))),
        # gRPC's default :authority for a multi-address ipv4: target is the whole address
        # list ("127.0.0.1:P1,127.0.0.1:P2"), which the server's HTTP/2 stack rejects
        # (RST_STREAM PROTOCOL_ERROR: every call, health checks included, fails INTERNAL).
        ("grpc.default_authority", args.authority),
        ("grpc.max_receive_message_length", 64 << 20),
    ]


# ------------------------------------------------------------------------------ health, metrics

def _health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service}, encoded by hand (no extra package)."""
    raw = service.encode()
    n, varint = len(raw), bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        varint.append(b | (0x80 if n else 0))
        if not n:
            break
    return b"\x0a" + bytes(varint) + raw


def _health_status(resp: bytes) -> int:
    """HealthCheckResponse.status (0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN)."""
    if len(resp) >= 2 and resp[0] == 0x08:
        return resp[1]
    return 0


async def health_check(addr, service, timeout):
    """The replica's health status of `service`, or None when it does not answer."""
    async with grpc.aio.insecure_channel(addr) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        try:
            return _health_status(await check(_health_request(service), timeout=timeout))
        except grpc.aio.AioRpcError:
            return None


async def scrape(port, timeout=1.0):
    """{code: count} of the Analyze calls a replica has answered (tidings_requests_total),
    or None when its metrics endpoint does not answer."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        w.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        data = (await asyncio.wait_for(r.read(), timeout)).decode(errors="replace")
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        w.close()
    out = collections.Counter()
    for m in re.finditer(r"^tidings_requests_total\{([^}]*)\}\s+(\S+)", data, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("rpc") == "Analyze":
            out[labels.get("code", "?")] += int(float(m.group(2)))
    return out


# ------------------------------------------------------------------------------------ replicas

class Replica:
    """One `tidings serve` process slot: a fixed port, restarted as new generations."""

    def __init__(self, k, port, metrics_port, args, tmp):
        self.k, self.port, self.metrics_port = k, port, metrics_port
        self.addr = f"127.0.0.1:{port}"
        self.args, self.tmp = args, tmp
        self.proc, self.gen, self.log = None, 0, None
        self.samples = {}  # gen -> [(t, Counter)] of scraped Analyze counts

    def start(self):
        self.gen += 1
        self.log = self.tmp / f"replica{self.k}.gen{self.gen}.log"
        cmd = [self.args.bin_copy, "serve", "--addr", self.addr,
               "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
               "--drain-delay-ms", str(self.args.drain_delay_ms),
               "--grace-s", str(self.args.grace_s), *self.args.server_arg]
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT)
        self.samples[self.gen] = []
        if self not in REPLICAS:
            REPLICAS.append(self)
        return time.perf_counter()

    def log_tail(self, n=15):
        return log_tail(self.log, n)

    async def wait_serving(self, timeout):
        """Polls health Check (service "tidings.v1.Tidings") until SERVING."""
        deadline = time.perf_counter() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"replica {self.k} ({self.addr}) exited with status "
                                   f"{self.proc.returncode} while starting; log {self.log}:\n"
                                   f"{self.log_tail()}")
            left = deadline - time.perf_counter()
            if left <= 0:
                raise HarnessError(f"replica {self.k} ({self.addr}) not SERVING after "
                                   f"{timeout:.0f} s; log {self.log}:\n{self.log_tail()}")
            if await health_check(self.addr, SERVICE, min(5.0, left)) == 1:
                return time.perf_counter()
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout):
        deadline = time.perf_counter() + timeout
        while self.proc.poll() is None:
            if time.perf_counter() > deadline:
                raise HarnessError(f"replica {self.k} ({self.addr}) still running "
                                   f"{timeout:.0f} s after SIGTERM; log {self.log}:\n"
                                   f"{self.log_tail()}")
            await asyncio.sleep(0.01)
        return time.perf_counter(), self.proc.returncode

    async def sample(self):
        """Scrapes the current process's counters; an answer belongs to the generation that
        ran when the scrape began (a new one is started only after the old one exited)."""
        gen = self.gen
        got = await scrape(self.metrics_port)
        if got is not None and gen == self.gen:
            self.samples[gen].append((time.perf_counter(), got))
        return got

    def stop(self):
        stop_process(self.proc, 3)


async def metrics_poller(replicas, interval, stop):
    while not stop.is_set():
        await asyncio.gather(*(r.sample() for r in replicas))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------------------------------- load

async def load(stub, texts, conc, timeout, error_pause, stop, calls):
    """Closed loop of `conc` workers until `stop` is set; appends (t0, t1, code, details)."""
    next_i = 0

    async def worker():
        nonlocal next_i
        while not stop.is_set():
            i = next_i
            next_i += 1
            req = pb.AnalyzeRequest(id=f"r{i}", text=texts[i % len(texts)])
            t0 = time.perf_counter()
            try:
                await stub.Analyze(req, timeout=timeout)
                calls.append((t0, time.perf_counter(), "OK", ""))
            except grpc.aio.AioRpcError as e:
                calls.append((t0, time.perf_counter(), e.code().name, e.details() or ""))
                await asyncio.sleep(error_pause)

    await asyncio.gather(*(worker() for _ in range(conc)))


# ------------------------------------------------------------------------------------ the run

async def amain(args, tmp: Path):
    texts, source = load_texts(Path(args.dev))
    ports = free_ports(2 * args.replicas)
    replicas = [Replica(k + 1, ports[2 * k], ports[2 * k + 1], args, tmp)
                for k in range(args.replicas)]
    res = dict(cpu=cpu_model(), cpus=os.cpu_count(), loadavg_start=os.getloadavg(),
               replicas=args.replicas, concurrency=args.concurrency, warmup=args.warmup,
               settle=args.settle, tail=args.tail, drain_delay_ms=args.drain_delay_ms,
               grace_s=args.grace_s, texts=source, addrs=[r.addr for r in replicas],
               service_config=service_config(args))

    log(f"starting {args.replicas} replicas on {', '.join(r.addr for r in replicas)} "
        f"(--drain-delay-ms {args.drain_delay_ms}); logs in {tmp}")
    t_spawn = [r.start() for r in replicas]
    t_ready = await asyncio.gather(*(r.wait_serving(args.start_timeout) for r in replicas))
    res["initial_start_s"] = [b - a for a, b in zip(t_spawn, t_ready)]

    target = "ipv4:" + ",".join(r.addr for r in replicas)
    res["target"] = target
    calls, restarts = [], []
    stop_load, stop_poll = asyncio.Event(), asyncio.Event()
    async with grpc.aio.insecure_channel(target, options=channel_options(args)) as ch:
        stub = pb_grpc.TidingsStub(ch)
        try:
            info = await stub.GetInfo(pb.GetInfoRequest(), timeout=30)
        except grpc.aio.AioRpcError as e:
            raise HarnessError(f"GetInfo through the balanced channel failed: "
                               f"{e.code().name}: {e.details()}") from None
        res["version"] = info.version
        poller = asyncio.create_task(metrics_poller(replicas, args.metrics_interval, stop_poll))
        t_start = time.perf_counter()
        load_task = asyncio.create_task(load(stub, texts, args.concurrency, args.timeout,
                                             args.error_pause, stop_load, calls))
        try:
            log(f"load: c={args.concurrency} over {target}; warm-up {args.warmup:g} s")
            await asyncio.sleep(args.warmup)
            if not any(c[2] == "OK" for c in calls):
                firsts = {c[2]: c[3] for c in calls}
                raise HarnessError(f"no call succeeded during the warm-up: {firsts}")
            for r in replicas:
                await r.sample()  # its count just before SIGTERM
                base = r.samples[r.gen][-1][1] if r.samples[r.gen] else None
                t_term = time.perf_counter()
                r.proc.send_signal(args.stop_signal)
                gen = r.gen
                log(f"replica {r.k}: {args.stop_signal.name}")
                t_exit, rc = await r.wait_exit(args.drain_delay_ms / 1e3 + args.grace_s + 15)
                log(f"replica {r.k}: exited (status {rc}) after {t_exit - t_term:.2f} s")
                t_spawn = r.start()
                t_serving = await r.wait_serving(args.start_timeout)
                log(f"replica {r.k}: SERVING {t_serving - t_spawn:.2f} s after its start; "
                    f"settling {args.settle:g} s")
                await asyncio.sleep(args.settle)
                restarts.append(dict(k=r.k, addr=r.addr, old_gen=gen, new_gen=r.gen,
                                     base=base or collections.Counter(), t_term=t_term,
                                     t_exit=t_exit, rc=rc, t_spawn=t_spawn,
                                     t_serving=t_serving, t_settled=time.perf_counter()))
            log(f"all replicas restarted; load goes on for {args.tail:g} s")
            await asyncio.sleep(args.tail)
        finally:
            stop_load.set()
            try:
                await asyncio.wait_for(load_task, args.timeout + 5)
            finally:
                stop_poll.set()
                await poller
        t_end = time.perf_counter()

    res.update(analyse(calls, restarts, replicas, t_start, t_end, args.stop_signal.name))
    return res


def lat_stats(rows):
    lat = sorted(t1 - t0 for t0, t1, code, _ in rows if code == "OK")
    return dict(ok=len(lat), failed=sum(1 for r in rows if r[2] != "OK"),
                p50_ms=pct(lat, 50) * 1e3, p95_ms=pct(lat, 95) * 1e3,
                p99_ms=pct(lat, 99) * 1e3, max_ms=(lat[-1] if lat else float("nan")) * 1e3)


def analyse(calls, restarts, replicas, t_start, t_end, sig):
    wall = t_end - t_start
    codes = collections.Counter(c[2] for c in calls)
    failed = {k: v for k, v in sorted(codes.items()) if k != "OK"}
    first_msg = {}
    for c in calls:
        if c[2] != "OK":
            first_msg.setdefault(c[2], c[3])
    t_first = restarts[0]["t_term"] if restarts else t_end
    t_last = restarts[-1]["t_settled"] if restarts else t_end
    # A call is "during" a window when it was in flight at any moment of it.
    phases = {
        "overall": calls,
        "before restarts": [c for c in calls if c[1] < t_first],
        "during restarts": [c for c in calls if c[1] >= t_first and c[0] < t_last],
        "after restarts": [c for c in calls if c[0] >= t_last],
    }
    # When each failure happened: relative to the latest SIGTERM before it.
    failures = []
    for t0, t1, code, msg in sorted(c for c in calls if c[2] != "OK"):
        prior = [r for r in restarts if r["t_term"] <= t1]
        ref = f"{sig} of replica {prior[-1]['k']} +{t1 - prior[-1]['t_term']:.2f} s" \
            if prior else f"run +{t1 - t_start:.2f} s"
        failures.append(dict(code=code, start_s=t0 - t_start, end_s=t1 - t_start,
                             after=ref, details=msg))

    per = []
    for r in restarts:
        rep = next(x for x in replicas if x.k == r["k"])
        old = rep.samples.get(r["old_gen"], [])
        base_n = sum(r["base"].values())
        after = [(t, sum(c.values()), c) for t, c in old if t >= r["t_term"]]
        final_n = after[-1][1] if after else base_n
        # first sample at which the old process had reached its final count
        t_last_seen = next((t for t, n, _ in after if n == final_n), None) \
            if final_n > base_n else None
        old_codes = after[-1][2] if after else r["base"]
        new = rep.samples.get(r["new_gen"], [])
        t_first_new = next((t for t, c in new if sum(c.values()) > 0), None)
        during = [c for c in calls if c[1] >= r["t_term"] and c[0] < r["t_settled"]]
        per.append(dict(
            k=r["k"], addr=r["addr"], exit_status=r["rc"],
            stop_s=r["t_exit"] - r["t_term"], start_s=r["t_serving"] - r["t_spawn"],
            down_s=r["t_serving"] - r["t_term"],
            old_calls_after_term=final_n - base_n,
            old_last_call_after_term_s=(t_last_seen - r["t_term"]) if t_last_seen else None,
            old_non_ok={k: v for k, v in old_codes.items() if k != "Ok"},
            new_first_call_after_serving_s=(t_first_new - r["t_serving"])
            if t_first_new else None,
            calls=len(during), failed=sum(1 for c in during if c[2] != "OK"),
            old_timeline=[(round(t - r["t_term"], 3), sum(c.values()))
                          for t, c in old if t >= r["t_term"] - 1],
            new_timeline=[(round(t - r["t_serving"], 3), sum(c.values()))
                          for t, c in new][:40]))

    served = {}
    for rep in replicas:
        served[rep.k] = {g: sum(s[-1][1].values()) if s else 0 for g, s in rep.samples.items()}
    return dict(wall_s=wall, calls=len(calls), ok=codes["OK"], failed=failed,
                first_failure_message=first_msg, calls_per_s=len(calls) / wall,
                ok_per_s=codes["OK"] / wall,
                latency={k: lat_stats(v) for k, v in phases.items()},
                restarts=per, failures=failures, served_by_replica_gen=served,
                metrics_samples=sum(len(s) for rep in replicas for s in rep.samples.values()))


def report(res, args):
    print(f"Tidings {res['version']}: {res['replicas']} replicas ({', '.join(res['addrs'])}), "
          f"--drain-delay-ms {res['drain_delay_ms']} --grace-s {res['grace_s']}")
    health = "NO health checking" if args.no_health_check else \
        f"health checking of \"{SERVICE}\""
    retry = "NO retryPolicy" if args.max_attempts < 2 else \
        f"retry on UNAVAILABLE (maxAttempts {args.max_attempts}, 0.1 s x2 up to 1 s)"
    print(f"client: one grpc.aio channel to {res['target']}, round_robin, {health}, {retry}, "
          f"deadline {args.timeout:g} s, :authority {args.authority}")
    print(f"  grpc.service_config = {json.dumps(res['service_config'])}")
    print(f"load: unary Analyze, c={res['concurrency']} closed loop; warm-up "
          f"{res['warmup']:g} s, settle {res['settle']:g} s per replica, tail {res['tail']:g} s;"
          f" articles: {res['texts']}")
    la = ", ".join(f"{x:.2f}" for x in res["loadavg_start"])
    print(f"CPU: {res['cpu']} ({res['cpus']} logical CPUs); load average at start: {la}")
    print(f"note: the machine may be shared with other work (builds, test suites): this is a "
          f"correctness measurement; latencies are indicative only")
    print()
    errs = sum(res["failed"].values())
    print(f"calls: {res['calls']} total, {res['ok']} OK, {errs} failed in {res['wall_s']:.1f} s "
          f"({res['calls_per_s']:.1f} calls/s, {res['ok_per_s']:.1f} OK/s)")
    print("failed by status: " + (", ".join(f"{k} {v}" for k, v in res["failed"].items())
                                  or "none"))
    for k, msg in res["first_failure_message"].items():
        print(f"  first {k}: {msg}")
    for f in res["failures"][:10]:
        print(f"  {f['code']} ended at run +{f['end_s']:.2f} s ({f['after']}), started "
              f"+{f['start_s']:.2f} s")
    if len(res["failures"]) > 10:
        print(f"  ... and {len(res['failures']) - 10} more")
    print()
    head = (f"{'latency (OK calls)':<18} {'OK':>6} {'failed':>6} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'p99 ms':>8} {'max ms':>8}")
    print(head)
    print("-" * len(head))
    for name, s in res["latency"].items():
        print(f"{name:<18} {s['ok']:>6} {s['failed']:>6} {s['p50_ms']:>8.1f} {s['p95_ms']:>8.1f} "
              f"{s['p99_ms']:>8.1f} {s['max_ms']:>8.1f}")
    print()
    head = (f"{'replica':<17} {'stop s':>6} {'start s':>7} {'down s':>6} {'old: calls':>10} "
            f"{'last call':>9} {'new: 1st call':>13} {'calls':>6} {'failed':>6}")
    print(head)
    print("-" * len(head))
    for r in res["restarts"]:
        last = f"+{r['old_last_call_after_term_s']:.2f}" \
            if r["old_last_call_after_term_s"] is not None else "-"
        first = f"+{r['new_first_call_after_serving_s']:.2f}" \
            if r["new_first_call_after_serving_s"] is not None else "never"
        name = f"{r['k']} {r['addr']}"
        print(f"{name:<17} {r['stop_s']:>6.2f} {r['start_s']:>7.2f} {r['down_s']:>6.2f} "
              f"{r['old_calls_after_term']:>10} {last:>9} {first:>13} {r['calls']:>6} "
              f"{r['failed']:>6}")
    if args.signal != "TERM":
        print(f"  CONTROL RUN: replicas stopped with SIG{args.signal}; read SIGTERM below as "
              f"SIG{args.signal}")
    print(f"  stop: SIGTERM to exit; start: spawn to health SERVING; down: SIGTERM to SERVING;")
    print(f"  old: Analyze calls the stopping process answered after SIGTERM, and when its last "
          f"one was seen (s after SIGTERM);")
    print(f"  new: first call the restarted process answered (s after SERVING); calls/failed: "
          f"client calls in flight at any time from SIGTERM to the end of the settle time")
    print(f"  (replica counters scraped every {args.metrics_interval:g} s; "
          f"{res['metrics_samples']} scrapes)")
    for r in res["restarts"]:
        if r["exit_status"] != 0:
            print(f"  WARNING: replica {r['k']} exited with status {r['exit_status']} on "
                  f"{args.stop_signal.name}")
        if r["old_non_ok"]:
            print(f"  replica {r['k']} (stopping process) answered Analyze with: "
                  + ", ".join(f"{k} {v}" for k, v in r["old_non_ok"].items()))
    print()
    ok = errs == 0
    print("goal (issue #10):")
    print(f"  {'PASS' if ok else 'MISS'}  zero failed calls through a rolling restart of "
          f"{res['replicas']} replicas: {errs} failed of {res['calls']}")
    res["passed"] = ok


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3, help="replicas (3)")
    ap.add_argument("--concurrency", type=int, default=8, help="unary workers (8)")
    ap.add_argument("--warmup", type=float, default=10,
                    help="seconds of load before the first restart (10)")
    ap.add_argument("--settle", type=float, default=5,
                    help="seconds after a replica is SERVING again before the next (5)")
    ap.add_argument("--tail", type=float, default=5,
                    help="seconds of load after the last replica settled (5)")
    ap.add_argument("--drain-delay-ms", type=int, default=2000,
                    help="`tidings serve --drain-delay-ms` of the replicas (2000)")
    ap.add_argument("--grace-s", type=int, default=30,
                    help="`tidings serve --grace-s` of the replicas (30)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument of `tidings serve` (repeatable)")
    ap.add_argument("--authority", default="tidings",
                    help="the channel's :authority (grpc.default_authority; tidings)")
    ap.add_argument("--max-attempts", type=int, default=4,
                    help="retryPolicy maxAttempts of the client (4); 1: no retryPolicy (a control)")
    ap.add_argument("--no-health-check", action="store_true",
                    help="leave healthCheckConfig out (a control: not a recommended setting)")
    ap.add_argument("--signal", choices=["TERM", "KILL"], default="TERM",
                    help="how a replica is stopped (TERM); KILL is a control: no drain, "
                         "calls in flight there fail unless retried")
    ap.add_argument("--timeout", type=float, default=30, help="deadline of each call, s (30)")
    ap.add_argument("--error-pause", type=float, default=0.05,
                    help="a worker's pause after a failed call, s (0.05)")
    ap.add_argument("--metrics-interval", type=float, default=0.1,
                    help="seconds between scrapes of the replicas' metrics (0.1)")
    ap.add_argument("--start-timeout", type=float, default=180,
                    help="most seconds a replica may take to become SERVING (180)")
    ap.add_argument("--tidings-bin", default=str(REPO / "target/release/tidings"),
                    help="the tidings binary (target/release/tidings); copied to a temp dir")
    ap.add_argument("--dev", default=str(REPO.parent / "shared/data/ag_news/dev.csv"),
                    help="AG News CSV (label,title,description); default "
                         "../shared/data/ag_news/dev.csv")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (server logs)")
    args = ap.parse_args()
    args.stop_signal = signal.Signals[f"SIG{args.signal}"]
    if args.replicas < 2 or args.concurrency < 1 or args.warmup < 0 or args.settle < 0 \
            or args.tail < 0 or args.max_attempts < 1:
        ap.error("--replicas >= 2, --concurrency >= 1, --max-attempts >= 1, times >= 0")

    def body(tmp):
        require_executable(args.tidings_bin)
        args.bin_copy = str(tmp / "tidings")
        shutil.copy2(args.tidings_bin, args.bin_copy)
        res = asyncio.run(amain(args, tmp))
        report(res, args)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    def stop_replicas(tmp):
        for r in REPLICAS:
            r.stop()
        Path(tmp / "tidings").unlink(missing_ok=True)

    # Exit 2 on a harness failure, 130 on Ctrl-C, 143 on SIGTERM; every replica is stopped on
    # every exit path.
    harness_main("rolling_restart", "tidings-rolling.", args.keep_temp, body, stop_replicas,
                 kept="temp files (server logs)")


if __name__ == "__main__":
    main()
