"""Three tenants sharing one teacher: throughput shares and latency with fair scheduling and with FIFO.

    python bench/tenants.py [--seconds 20] [--loops 16,2,2] [--seqs 8] [--tokens 128]

Starts the teacher (`python -m teacher_server`, hf engine, a tiny Qwen3 built offline) on 127.0.0.1 with a keys
file of three tenants, and drives it from three closed-loop clients, one per tenant, each keeping
`--loops` requests outstanding (default 16:2:2, an offered load of 8:1:1) of `--seqs` sequences x `--tokens`
tokens (binary encoding, K = 8). The heavy tenant alone saturates the engine, and every tenant always has a
request waiting, so all three are backlogged. Phases, in one run: the light tenant alone (its baseline
latency); equal weights under `--scheduling fifo` (today's behaviour before tenants) and `fair`; then weights
2:1:1 (the fair server re-reads its keys file on SIGHUP). Per phase and tenant: the share of scored positions
per second, p50/p99 request latency, and Jain's fairness index of the weight-normalised throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = {"heavy": "key-heavy", "light-1": "key-light-1", "light-2": "key-light-2"}


def write_keys(path: Path, weights: dict[str, float]) -> None:
    from teacher_server.tenants import hash_key

    rows = [{"name": n, "key_sha256": hash_key(KEYS[n]), "weight": weights[n]} for n in KEYS]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"tenants": rows}))
    os.replace(tmp, path)


async def drive(url: str, loops: dict[str, int], seconds: float, warmup: float, body: bytes) -> dict[str, dict]:
    import httpx

    stats = {n: {"positions": 0, "lat": []} for n in loops}
    positions = None
    t_start = time.perf_counter()
    t_end = t_start + warmup + seconds

    async def loop(client, name):
        nonlocal positions
        headers = {"authorization": f"Bearer {KEYS[name]}", "content-type": "application/msgpack",
                   "accept": "application/msgpack"}
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            r = await client.post("/v1/score", content=body, headers=headers)
            t1 = time.perf_counter()
            if r.status_code != 200:
                raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")
            if positions is None:
                from protocol import codec

                positions = int(codec.decode_response_msgpack(r.content).token_logprobs_N.size)
            if t0 >= t_start + warmup and t1 <= t_end:
                stats[name]["positions"] += positions
                stats[name]["lat"].append(t1 - t0)

    limits = httpx.Limits(max_connections=sum(loops.values()) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(loop(client, n) for n, k in loops.items() for _ in range(k)))
    for s in stats.values():
        s["rate"] = s["positions"] / seconds
    return stats


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


def report(title: str, stats: dict[str, dict], weights: dict[str, float]) -> dict[str, float]:
    total = sum(s["rate"] for s in stats.values())
    wsum = sum(weights[n] for n in stats)
    print(f"\n{title}")
    print(f"{'tenant':<9}{'weight':>7}{'share':>8}{'fair share':>11}{'positions/s':>13}{'p50 ms':>9}{'p99 ms':>9}")
    p99 = {}
    for n, s in stats.items():
        lat = np.array(s["lat"]) * 1000
        p99[n] = float(np.percentile(lat, 99)) if lat.size else float("nan")
        print(f"{n:<9}{weights[n]:>7g}{s['rate'] / total:>8.3f}{weights[n] / wsum:>11.3f}{s['rate']:>13.0f}"
              f"{(np.percentile(lat, 50) if lat.size else float('nan')):>9.0f}{p99[n]:>9.0f}")
    if len(stats) > 1:
        print(f"Jain's index of throughput / weight: {jain([s['rate'] / weights[n] for n, s in stats.items()]):.3f}; "
              f"total {total:.0f} positions/s")
    return p99


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--loops", default="16,2,2", help="outstanding requests of heavy, light-1, light-2")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--max-tokens-per-batch", type=int, default=2048)
    p.add_argument("--engine-tokens-in-flight", type=int, default=None, help="the server's gate (default 2x batch)")
    a = p.parse_args()

    from protocol import codec
    from protocol.schema import ScoreBatch
    from student_trainer.tiny_models import build_tiny_model
    from teacher_server.process import free_port, serve_in_subprocess

    tmp = Path(tempfile.mkdtemp(prefix="aopd-bench-tenants-"))
    model = build_tiny_model(tmp / "teacher", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=1,
                             intermediate_size=768)
    rng = np.random.default_rng(0)
    body = codec.encode_request_msgpack(ScoreBatch.from_sequences(
        [(rng.integers(5, 400, a.tokens).tolist(), 16) for _ in range(a.seqs)], 8))
    loops = dict(zip(KEYS, (int(x) for x in a.loops.split(",")), strict=True))
    keys = tmp / "keys.yaml"
    equal = dict.fromkeys(KEYS, 1.0)
    write_keys(keys, equal)
    common = ["--dtype", "float32", "--max-top-k", "8", "--api-keys-file", str(keys), "--batch-wait-ms", "2",
              "--max-tokens-per-batch", str(a.max_tokens_per_batch), "--api-keys-reload-s", "3600"]
    if a.engine_tokens_in_flight:
        common += ["--engine-tokens-in-flight", str(a.engine_tokens_in_flight)]
    print(f"teacher: tiny Qwen3 (4 layers x 256), hf engine, float32, max_tokens_per_batch {a.max_tokens_per_batch}, "
          f"engine tokens in flight {a.engine_tokens_in_flight or 2 * a.max_tokens_per_batch};\n"
          f"requests of {a.seqs} x {a.tokens} tokens; outstanding requests "
          f"{a.loops}; {a.seconds:g} s per phase after {a.warmup:g} s warm-up; this machine's 2 CPU cores")
    run = lambda url, which: asyncio.run(drive(url, which, a.seconds, a.warmup, body))  # noqa: E731
    with serve_in_subprocess(str(model), free_port(), *common, "--scheduling", "fifo") as t:
        alone = run(t.url, {"light-1": loops["light-1"]})
        base = report("light-1 alone", alone, equal)
        fifo = run(t.url, loops)
        fifo_p99 = report("FIFO, equal weights", fifo, equal)
    with serve_in_subprocess(str(model), free_port(), *common, "--scheduling", "fair") as t:
        fair = run(t.url, loops)
        fair_p99 = report("fair, equal weights", fair, equal)
        weighted = {"heavy": 2.0, "light-1": 1.0, "light-2": 1.0}
        write_keys(keys, weighted)
        os.kill(t.pid, signal.SIGHUP)
        time.sleep(0.5)
        report("fair, weights 2:1:1", run(t.url, loops), weighted)
    print(f"\nlight-1 p99 vs alone ({base['light-1']:.0f} ms): FIFO {fifo_p99['light-1'] / base['light-1']:.2f}x, "
          f"fair {fair_p99['light-1'] / base['light-1']:.2f}x; light-2 fair {fair_p99['light-2'] / base['light-1']:.2f}x")
    print(f"medians of light-1 latency: alone {statistics.median(alone['light-1']['lat']) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
