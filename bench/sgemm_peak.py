#!/usr/bin/env python3
"""The machine's best f32 SGEMM through numpy's BLAS (OpenBLAS in numpy's wheels).

Prints one line, `sgemm N^3 THREADS threads: G GFLOP/s (BLAS)`, and with --value only the
number, for `tidings bench --blas-gflops`. Threads: set before numpy loads its BLAS, so they
match the encoder's (default: all cores, as candle uses).

    python3 bench/sgemm_peak.py --threads 2
    tidings bench --blas-gflops "$(python3 bench/sgemm_peak.py --threads 2 --value)"
"""
import argparse
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="matrix size (n x n x n)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="BLAS threads")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs; the best counts")
    ap.add_argument("--value", action="store_true", help="print only the GFLOP/s")
    a = ap.parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import numpy as np  # after the thread variables: BLAS reads them once, at load

    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.n, a.n), dtype=np.float32)
    y = rng.standard_normal((a.n, a.n), dtype=np.float32)
    x @ y  # warm-up: thread pool, page faults
    best = min(timed(lambda: x @ y) for _ in range(a.repeat))
    gflops = 2 * a.n**3 / best / 1e9
    if a.value:
        print(f"{gflops:.1f}")
    else:
        blas = blas_name(np)
        print(f"sgemm {a.n}^3 {a.threads} threads: {gflops:.1f} GFLOP/s ({blas}, numpy {np.__version__})")
    return 0


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def blas_name(np) -> str:
    try:
        cfg = np.show_config(mode="dicts")
        return cfg["Build Dependencies"]["blas"]["name"]
    except Exception:  # older numpy: no dict mode
        return "BLAS"


if __name__ == "__main__":
    sys.exit(main())
