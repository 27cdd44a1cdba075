"""Load test: N concurrent clients against a live teacher server on 127.0.0.1 for a fixed time.

    python bench/load.py [--clients 32] [--seconds 60] [--engine hf] [--overload]

Each client loops: score a request of 4 sequences x 128 tokens at K=32 (binary encoding), until the time is up.
Prints requests/s, scored positions/s, p50/p99 latency, errors by status, and the server's resident memory
before and after (VmRSS of the server process). `--overload` starts the server with max_queued_requests far
below the client count, so 429s are expected (and counted separately); any other error is a failure.
Traffic goes only to 127.0.0.1; the loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import codec  # noqa: E402
from protocol.schema import ScoreBatch  # noqa: E402
from teacher_server.process import serve_in_subprocess  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--model", default=None, help="model dir (default: the toy teacher)")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--overload", action="store_true")
    a = ap.parse_args()
    model = a.model or str(Path(__file__).resolve().parents[1] / "toy" / "assets" / "teacher")
    extra = ["--engine", a.engine, "--dtype", "float32", "--max-top-k", "32"]
    if a.overload:
        extra += ["--max-queued-requests", str(max(1, a.clients // 8))]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory():
        with serve_in_subprocess(model, None, *extra) as teacher:
            info = httpx.get(teacher.url + "/v1/info").json()
            a.length = min(a.length, info["max_seq_len"])  # the toy teacher accepts 128 tokens
            seqs = [(rng.integers(4, info["vocab_size"], a.length).tolist(), a.length // 2) for _ in range(a.sequences)]
            body = codec.encode_request_msgpack(ScoreBatch.from_sequences(seqs, 32))
            headers = {"content-type": "application/msgpack"}
            with httpx.Client() as c:  # warm-up
                c.post(teacher.url + "/v1/score", content=body, headers=headers, timeout=120)
            rss_before = rss_mib(teacher.pid)
            latencies: list[float] = []
            statuses: collections.Counter = collections.Counter()
            first_error: dict = {}
            lock = threading.Lock()
            stop_at = time.monotonic() + a.seconds

            def client() -> None:
                with httpx.Client(timeout=120) as c:
                    while time.monotonic() < stop_at:
                        t0 = time.perf_counter()
                        try:
                            r = c.post(teacher.url + "/v1/score", content=body, headers=headers)
                            status = r.status_code
                        except httpx.HTTPError as exc:
                            status, r = type(exc).__name__, None
                        dt = time.perf_counter() - t0
                        with lock:
                            statuses[status] += 1
                            if status not in (200, 429) and status not in first_error:
                                first_error[status] = r.text[:200] if r is not None else status
                            if status == 200:
                                latencies.append(dt)
                        if status == 429:
                            time.sleep(float(r.headers.get("retry-after", "1")) * 0.1)

            t_start = time.monotonic()
            threads = [threading.Thread(target=client) for _ in range(a.clients)]
            for t in threads:
                t.start()
            # after a ramp-up the allocator holds buffers for full-size batches; growth after that would be a leak
            time.sleep(min(10.0, a.seconds / 3))
            rss_ramped = rss_mib(teacher.pid)
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t_start
            rss_after = rss_mib(teacher.pid)
    ok = statuses.get(200, 0)
    errors = {k: v for k, v in statuses.items() if k not in (200, 429)}
    lat = sorted(latencies)
    positions = ok * a.sequences * (a.length - a.length // 2)
    print(f"{a.clients} clients x {a.seconds:.0f}s, {a.engine} engine, model {Path(model).name}, requests of "
          f"{a.sequences} x {a.length} tokens (K=32, binary){' , overload mode' if a.overload else ''}")
    print(f"requests/s {ok / elapsed:.1f} | positions/s {positions / elapsed:,.0f} | "
          f"latency p50 {1000 * statistics.median(lat):.0f} ms p99 {1000 * lat[int(0.99 * (len(lat) - 1))]:.0f} ms"
          if lat else "no successful request")
    print(f"responses: 200={ok} 429={statuses.get(429, 0)} other errors={sum(errors.values())} {dict(errors) or ''}")
    for status, text in first_error.items():
        print(f"  first {status}: {text}")
    print(f"server RSS before {rss_before:.0f} MiB, after ramp-up {rss_ramped:.0f} MiB, at the end {rss_after:.0f} MiB "
          f"(growth under steady load {rss_after - rss_ramped:+.0f} MiB)")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
