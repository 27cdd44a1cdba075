"""Scoring throughput through `TeacherPool` with 1 and 2 teacher replicas on 127.0.0.1.

    python bench/replicas.py [--requests 48] [--concurrency 8] [--threads-per-server 1]

Each replica is a `python -m teacher_server` process (hf engine, the toy teacher by default) with
`--threads-per-server` torch threads, so on this 2-core machine two one-thread replicas use both cores while one
replica uses one: the figure shows the pool spreading load, not a GPU's scaling.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.schema import ScoreBatch  # noqa: E402
from student_trainer.teacher_pool import TeacherPool  # noqa: E402
from teacher_server.process import serve_in_subprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "toy" / "assets" / "teacher"))
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads-per-server", type=int, default=1)
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads_per_server)
    rng = np.random.default_rng(0)
    batches = [ScoreBatch.from_sequences([(rng.integers(4, 400, a.length).tolist(), 1) for _ in range(a.sequences)], 32)
               for _ in range(a.requests)]
    rows = []
    for replicas in (1, 2):
        with contextlib.ExitStack() as stack:
            urls = [stack.enter_context(serve_in_subprocess(a.model, None, "--dtype", "float32", "--max-top-k", "32")).url
                    for _ in range(replicas)]
            pool = TeacherPool(urls)
            pool.connect()
            pool.score_batch(batches[0])  # warm-up
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(a.concurrency) as ex:
                list(ex.map(pool.score_batch, batches))
            dt = time.perf_counter() - t0
            pool.close()
        positions = a.requests * a.sequences * (a.length - 1)
        rows.append((replicas, dt, positions / dt))
    print(f"{a.requests} requests of {a.sequences} x {a.length} tokens, K=32, {a.concurrency} in flight, "
          f"model {Path(a.model).name}, {a.threads_per_server} torch thread(s) per replica")
    print(f"{'replicas':>9}{'seconds':>10}{'positions/s':>14}{'speed-up':>10}")
    for r, dt, pps in rows:
        print(f"{r:>9}{dt:>10.2f}{pps:>14,.0f}{pps / rows[0][2]:>10.2f}")


if __name__ == "__main__":
    main()
