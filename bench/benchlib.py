"""Helpers the load drivers in bench/ share (run.py, isolation.py, rolling_restart.py, soak.py).

Articles from AG News, latency percentiles, memory figures of a process from /proc, the CPU
model, waiting for a server to answer, stopping a child process, and the frame of a harness's
main(): its temp dir, its exit statuses and its clean-up on every exit path.

The scripts put bench/ on sys.path and then `from benchlib import ...`; importing this module
imports the generated gRPC stubs (bench/protos.py), as every one of those scripts does anyway.
"""
import asyncio
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from protos import pb, pb_grpc


class HarnessError(Exception):
    """The harness itself could not run as intended (not a missed goal)."""


# -------------------------------------------------------------------------------------- articles

def ag_news_texts(dev: Path):
    """Yields the rows of an AG News CSV (label,title,description) as the text the benchmarks
    send: title + ". " + description, both stripped. The file is opened at the first row asked
    for, so a missing file raises FileNotFoundError then."""
    with dev.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            yield f"{r['title'].strip()}. {r['description'].strip()}"


REPO = Path(__file__).resolve().parent.parent


def own_texts():
    """The project's own texts, for a clone without ../shared: the documents of
    models/ner/ood/*.txt (news and encyclopedic text written and annotated for Tidings, CoNLL
    columns), each joined back into one article."""
    for path in sorted((REPO / "models/ner/ood").glob("*.txt")):
        words: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines() + ["-DOCSTART-"]:
            if line.startswith("-DOCSTART-"):
                if words:
                    yield " ".join(words)
                words = []
            elif line.strip():
                words.append(line.split()[0])


def load_articles(seed: Path, dev: Path, n: int) -> list[str]:
    """The seed article (when `seed` exists, else the project's own fixture article) followed by
    AG News rows of `dev`, up to `n` articles in all (the seed article is kept even when n is
    0). Without `dev` (a fresh clone has no ../shared), the project's own texts (`own_texts`)
    stand in for the AG News rows, and stderr says so."""
    if not seed.exists():
        seed = REPO / "tests/fixtures/summit-article.txt"
    out = [seed.read_text().strip()] if seed.exists() else []
    rows = ag_news_texts(dev)
    if not dev.exists():
        print(f"bench: {dev} is not here (../shared is not part of a clone): sending the seed "
              "article and the documents of models/ner/ood/ instead; --dev-csv FILE (AG News "
              "CSV: label,title,description) gives the published mix", file=sys.stderr)
        rows = own_texts()
    for text in rows:
        if len(out) >= n:
            break
        out.append(text)
    return out


# ------------------------------------------------------------------------------------- figures

def pct(sorted_vals, q):
    """The q-th percentile (0..100) of an ascending list, nearest rank below; NaN when empty."""
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q / 100 * len(sorted_vals)))]


def status_mib(pid, key):
    """A memory figure of /proc/PID/status (e.g. VmHWM, VmRSS) in MiB, or None."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mib(pid):
    """The peak resident memory (VmHWM) of process `pid` since it started, in MiB, or None."""
    return status_mib(pid, "VmHWM")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# ------------------------------------------------------------------------------ servers, children

async def wait_ready(addr: str, pid, timeout: float) -> None:
    """Polls GetInfo until it answers; gives up at the deadline or when `pid` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                await pb_grpc.TidingsStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
                return
        except grpc.aio.AioRpcError:
            if pid and not Path(f"/proc/{pid}").exists():
                raise SystemExit(f"the server for {addr} (pid {pid}) exited; see its log")
            if time.monotonic() > deadline:
                raise SystemExit(f"{addr} not ready after {timeout:.0f}s")
            await asyncio.sleep(0.5)


def require_executable(path):
    """Raises HarnessError unless `path` (the --tidings-bin of a harness) is an executable file."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise HarnessError(f"{path} is not an executable (give --tidings-bin)")


def stop_process(proc, timeout):
    """SIGTERM to `proc` (a subprocess.Popen, or None) if it still runs, and a wait of at most
    `timeout` s for it to exit; then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(path: Path, n=15) -> str:
    """The last `n` lines of a child's log file, or "" when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------- harness

def harness_main(name, tmp_prefix, keep_temp, body, stop_all, kept="temp files"):
    """Runs body(tmp) in a fresh temp dir (prefix `tmp_prefix`) and exits as the harnesses
    document: 2 on a HarnessError (the temp dir is then kept), 130 on Ctrl-C, 143 on SIGTERM.
    Ctrl-C works even when a script started the harness in the background (which ignores SIGINT
    there), and SIGTERM unwinds the same way. On every exit path stop_all(tmp) stops what the
    harness started, then the temp dir is removed, or kept (with --keep-temp, `keep_temp`) and
    its path printed as "`name`: `kept` in DIR". Messages go to stderr prefixed "`name`: "."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix))
    keep = keep_temp
    try:
        body(tmp)
    except HarnessError as e:
        keep = True
        print(f"{name}: harness failure: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        stop_all(tmp)
        if keep:
            print(f"{name}: {kept} in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
