#!/usr/bin/env python3
"""A real gRPC client for checking a running Tidings: wait for health, then analyze.

Stubs are generated at run time from proto/tidings/v1/tidings.proto with grpcio-tools (into a
temporary folder), so the check does not depend on server reflection and tests the public
contract as a client in another language sees it.

    grpc_check.py wait    --addr 127.0.0.1:50051 [--timeout 120]   # until SERVING; prints seconds
    grpc_check.py analyze --addr 127.0.0.1:50051 [--text T | --text-file F] [--expect PER:Angela Merkel ...]
    grpc_check.py load    --addr 127.0.0.1:50051 [--text-file F] [--calls 256] [--concurrency 32]

`wait` prints `serving after S s` and exits 0, or exits 1 at the timeout. `analyze` sends one
article, prints the response as JSON, and exits 1 unless every --expect LABEL:TEXT entity is
found and at least one topic came back. `load` sends a bounded number of Analyze calls at a
fixed concurrency (to warm the server up before its memory is read) and fails on any error.
Needs grpcio, grpcio-tools, grpcio-health-checking
(deploy/requirements/grpc.txt).
"""

import argparse
import collections
import concurrent.futures
import importlib
import json
import pathlib
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO = "tidings/v1/tidings.proto"
DEFAULT_TEXT = "Angela Merkel met Emmanuel Macron in Paris."


def stubs():
    """Generates tidings_pb2 and tidings_pb2_grpc from the proto and imports them."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="tidings-stubs-")
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", PROTO])
    if rc != 0:
        sys.exit(f"grpc_check: protoc failed on {PROTO} ({rc})")
    sys.path.insert(0, out)
    return (importlib.import_module("tidings.v1.tidings_pb2"),
            importlib.import_module("tidings.v1.tidings_pb2_grpc"))


def wait(args):
    """Polls grpc.health.v1 Check until SERVING; each attempt has a 1 s deadline."""
    start = time.monotonic()
    last = "no answer yet"
    with grpc.insecure_channel(args.addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() - start < args.timeout:
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    print(f"serving after {time.monotonic() - start:.2f} s")
                    return 0
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(0.1)
    print(f"grpc_check: not SERVING after {args.timeout} s (last: {last})", file=sys.stderr)
    return 1


def analyze(args):
    """Sends one article through Analyze and checks the expected entities and topics."""
    from google.protobuf import json_format

    pb, pb_grpc = stubs()
    with grpc.insecure_channel(args.addr) as ch:
        req = pb.AnalyzeRequest(id="grpc-check", text=text_of(args), top_k=3)
        resp = pb_grpc.TidingsStub(ch).Analyze(req, timeout=30)
    print(json.dumps(json_format.MessageToDict(resp), indent=1))
    found = {(e.label, e.text) for e in resp.entities}
    ok = True
    for want in args.expect:
        label, _, text = want.partition(":")
        if (label, text) not in found:
            print(f"grpc_check: missing entity {label} {text!r}; found {sorted(found)}",
                  file=sys.stderr)
            ok = False
    if not resp.topics:
        print("grpc_check: no topics in the response", file=sys.stderr)
        ok = False
    if ok:
        print(f"grpc_check: analyze ok: {len(resp.entities)} entities "
              f"({', '.join(f'{l} {t}' for l, t in sorted(found))}), "
              f"top topic {resp.topics[0].label} {resp.topics[0].score:.2f}, "
              f"{resp.timing.total_us} us")
    return 0 if ok else 1


def text_of(args):
    return pathlib.Path(args.text_file).read_text() if args.text_file else args.text


def load(args):
    """`calls` unary Analyze calls, `concurrency` at a time; prints calls/s by status."""
    pb, pb_grpc = stubs()
    req = pb.AnalyzeRequest(text=text_of(args))
    codes = collections.Counter()
    with grpc.insecure_channel(args.addr) as ch:
        stub = pb_grpc.TidingsStub(ch)

        def call(_):
            try:
                stub.Analyze(req, timeout=60)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            codes.update(pool.map(call, range(args.calls)))
        secs = time.monotonic() - start
    print(f"grpc_check: load {args.calls} calls at concurrency {args.concurrency}: "
          f"{args.calls / secs:.1f} calls/s, {dict(codes)}")
    return 0 if codes["OK"] == args.calls else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait for grpc.health.v1 SERVING")
    w.add_argument("--addr", default="127.0.0.1:50051")
    w.add_argument("--service", default="", help="health service name ('' = the server)")
    w.add_argument("--timeout", type=float, default=120)
    a = sub.add_parser("analyze", help="send one article through Analyze")
    a.add_argument("--addr", default="127.0.0.1:50051")
    a.add_argument("--text", default=DEFAULT_TEXT)
    a.add_argument("--text-file", help="read the article from this file instead")
    a.add_argument("--expect", action="append", default=[], metavar="LABEL:TEXT",
                   help="an entity that must be found (repeatable)")
    ld = sub.add_parser("load", help="bounded concurrent Analyze calls")
    ld.add_argument("--addr", default="127.0.0.1:50051")
    ld.add_argument("--text", default=DEFAULT_TEXT)
    ld.add_argument("--text-file", help="read the article from this file instead")
    ld.add_argument("--calls", type=int, default=256)
    ld.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    return {"wait": wait, "analyze": analyze, "load": load}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
