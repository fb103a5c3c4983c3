#!/usr/bin/env python3
"""Generates the Python gRPC stubs of proto/tidings/v1/tidings.proto into bench/gen/ (gitignored)
when they are missing or older than the proto, and imports them.

    from protos import pb, pb_grpc      # tidings_pb2, tidings_pb2_grpc
    python3 bench/protos.py             # just (re)generate
"""
import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "tidings" / "v1" / "tidings.proto"
GEN = BENCH / "gen"


def generate(force: bool = False) -> None:
    out = GEN / "tidings" / "v1" / "tidings_pb2_grpc.py"
    if not force and out.exists() and out.stat().st_mtime >= PROTO.stat().st_mtime:
        return
    import grpc_tools
    from grpc_tools import protoc

    GEN.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={GEN}",
                      f"--grpc_python_out={GEN}", str(PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")


generate()
if str(GEN) not in sys.path:
    sys.path.insert(0, str(GEN))
pb = importlib.import_module("tidings.v1.tidings_pb2")
pb_grpc = importlib.import_module("tidings.v1.tidings_pb2_grpc")

if __name__ == "__main__":
    print(f"stubs in {GEN}")
