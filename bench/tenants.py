"""Three tenants sharing one teacher: throughput shares and latency with fair scheduling and with FIFO.

    python bench/tenants.py [--seconds 20] [--loops 16,2,2] [--seqs 8] [--tokens 128]

Starts the teacher (`python -m teacher_server`, hf engine, a tiny Qwen3 built offline) on 127.0.0.1 with a keys
file of three tenants, and drives it from three closed-loop clients, one per tenant, each keeping
`--loops` requests outstanding (default 16:2:2, an offered load of 8:1:1) of `--seqs` sequences x `--tokens`
tokens (binary encoding, K = 8). The heavy tenant alone saturates the engine, and every tenant always has a
request waiting, so all three are backlogged. Phases, in one run: the light tenant alone (its baseline
latency); equal weights under `--scheduling fifo` (today's behaviour before tenants) and `fair`; then weights
2:1:1 (the fair server re-reads its keys file on SIGHUP). Per phase and tenant: the share of scored positions
per second as the clients saw it and as the server counted it (`/v1/usage`), p50/p99 request latency, the mean
wait in the server's fair gate (`/v1/usage`), and Jain's fairness index of the weight-normalised throughputs.

Latency, in the same run: closed-loop clients are backlogged by construction, so a light tenant's latency there
is its backlog over its share (Little's law), not what a light user sees. A light tenant in the 8:1:1 mix is
below its fair share, so the latency phases drive the two light tenants open-loop (`--light-rate` requests/s
each, Poisson arrivals, the same seeded schedule in every phase) beside the heavy closed-loop tenant that keeps
the engine saturated, and compare each light tenant's p99 with its p99 alone at the same rate, under FIFO and
fair scheduling (`--latency-seconds` per phase).
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


async def drive(url: str, loops: dict[str, int], seconds: float, warmup: float, body: bytes,
                open_loop: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Closed-loop clients (`loops`: requests kept outstanding per tenant) and open-loop ones (`open_loop`: send
    times per tenant, seconds from the start). Closed loop, throughput counts what completed inside the window
    (counting only requests also sent in it would drop a slow tenant's first latency's worth of completions and
    understate its share) and latency the requests sent and answered in it; open loop, every request sent after
    the warm-up, answered whenever."""
    import httpx

    open_loop = open_loop or {}
    stats = {n: {"positions": 0, "lat": [], "stages": []} for n in [*loops, *open_loop]}
    positions = None
    t_start = time.perf_counter()
    t_end = t_start + warmup + seconds

    async def post(client, name) -> tuple[float, float, dict[str, float]]:
        """One scoring request as `name`; returns its send and answer times and the server's Server-Timing stages
        (ms), and learns the positions per request."""
        nonlocal positions
        headers = {"authorization": f"Bearer {KEYS[name]}", "content-type": "application/msgpack",
                   "accept": "application/msgpack"}
        t0 = time.perf_counter()
        r = await client.post("/v1/score", content=body, headers=headers)
        t1 = time.perf_counter()
        if r.status_code != 200:
            raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")
        if positions is None:
            from protocol import codec

            positions = int(codec.decode_response_msgpack(r.content).token_logprobs_N.size)
        return t0, t1, parse_server_timing(r.headers.get("server-timing", ""))

    async def loop(client, name):
        while time.perf_counter() < t_end:
            t0, t1, _ = await post(client, name)
            if t_start + warmup <= t1 <= t_end:  # throughput: what completed in the window, whenever it was sent
                stats[name]["positions"] += positions
            if t0 >= t_start + warmup and t1 <= t_end:  # latency: requests sent and answered in the window
                stats[name]["lat"].append(t1 - t0)

    async def arrivals(client, name, times):
        """Open loop: one request at each of `times` (seconds from the start), whether or not earlier ones are back."""
        async def one(t_send):
            await asyncio.sleep(max(0.0, t_start + t_send - time.perf_counter()))
            await send(client, name, t_send >= warmup)

        await asyncio.gather(*(one(t) for t in times))

    async def send(client, name, counted):
        t0, t1, stages = await post(client, name)
        if counted:
            stats[name]["positions"] += positions
            stats[name]["lat"].append(t1 - t0)
            stats[name]["stages"].append(stages)

    async def usage(client) -> dict[str, dict]:
        out = {}
        for n in stats:
            r = await client.get("/v1/usage", headers={"authorization": f"Bearer {KEYS[n]}"})
            out[n] = r.json()
        return out

    async def server_counts(client):
        """Positions the server scored per tenant inside the window (its own /v1/usage counters, at completion of
        the forward: no HTTP or client time in them)."""
        await asyncio.sleep(max(0.0, t_start + warmup - time.perf_counter()))
        before = await usage(client)
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        after = await usage(client)
        for n in stats:
            stats[n]["server_rate"] = (after[n]["tokens_scored"] - before[n]["tokens_scored"]) / seconds
            wa, wb = after[n]["queue_wait_s"], before[n]["queue_wait_s"]
            stats[n]["gate_wait_ms"] = 1000 * (wa["total"] - wb["total"]) / max(wa["count"] - wb["count"], 1)

    limits = httpx.Limits(max_connections=sum(loops.values()) + 6 + 64 * len(open_loop))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(loop(client, n) for n, k in loops.items() for _ in range(k)),
                             *(arrivals(client, n, ts) for n, ts in open_loop.items()), server_counts(client))
    for s in stats.values():
        s["rate"] = s["positions"] / seconds
    return stats


def parse_server_timing(header: str) -> dict[str, float]:
    """`gate;dur=0.1, queue;dur=12.5, ...` -> {"gate": 0.1, "queue": 12.5, ...} (ms)."""
    out = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, dur = part.partition(";dur=")
        out[name] = float(dur)
    return out


STAGES = ("gate", "queue", "forward", "wake", "total")


def breakdown(title: str, stats: dict[str, dict]) -> None:
    """Where open-loop requests' time went: the server's stages (Server-Timing) and what lies outside its handler
    (client latency - total: the HTTP hops, the event loop before the handler starts, the client itself), at the
    median and averaged over each tenant's slowest 2% of requests (the p99's neighbourhood)."""
    rows = [(n, s) for n, s in stats.items() if s["stages"]]
    if not rows:
        return
    print(f"  {title}: where the time went, ms (median request | mean of the slowest 2%)")
    print(f"  {'tenant':<9}" + "".join(f"{c:>15}" for c in ("client", *STAGES, "outside")))
    for n, s in rows:
        lat = np.array(s["lat"]) * 1000
        table = np.array([[st.get(c, 0.0) for c in STAGES] for st in s["stages"]])
        table = np.column_stack([lat, table, lat - table[:, -1]])
        order = np.argsort(lat)
        tail = order[-max(1, len(order) // 50):]
        med = np.median(table, axis=0)
        worst = table[tail].mean(axis=0)
        print(f"  {n:<9}" + "".join(f"{m:>7.0f} |{w:>6.0f}" for m, w in zip(med, worst, strict=True)))


def poisson_times(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival times (s) of a Poisson process of `rate` per second over [0, seconds)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, int(rate * seconds * 2) + 16)
    t = np.cumsum(gaps)
    return t[t < seconds]


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


def report(title: str, stats: dict[str, dict], weights: dict[str, float]) -> dict[str, float]:
    total = sum(s["rate"] for s in stats.values())
    server_total = sum(s["server_rate"] for s in stats.values()) or 1.0
    wsum = sum(weights[n] for n in stats)
    print(f"\n{title}")
    print(f"{'tenant':<9}{'weight':>7}{'share':>8}{'server':>8}{'fair share':>11}{'positions/s':>13}{'p50 ms':>9}"
          f"{'p99 ms':>9}{'gate ms':>9}")
    p99 = {}
    for n, s in stats.items():
        lat = np.array(s["lat"]) * 1000
        p99[n] = float(np.percentile(lat, 99)) if lat.size else float("nan")
        print(f"{n:<9}{weights[n]:>7g}{s['rate'] / total:>8.3f}{s['server_rate'] / server_total:>8.3f}"
              f"{weights[n] / wsum:>11.3f}{s['rate']:>13.0f}"
              f"{(np.percentile(lat, 50) if lat.size else float('nan')):>9.0f}{p99[n]:>9.0f}{s['gate_wait_ms']:>9.0f}")
    if len(stats) > 1:
        print(f"Jain's index of throughput / weight: {jain([s['rate'] / weights[n] for n, s in stats.items()]):.3f} "
              f"(server's counts: {jain([s['server_rate'] / weights[n] for n, s in stats.items()]):.3f}); "
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
    p.add_argument("--light-rate", type=float, default=2.0, help="open-loop requests/s of each light tenant")
    p.add_argument("--latency-seconds", type=float, default=45.0)
    p.add_argument("--no-shares", action="store_true", help="only the latency phases")
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
    run = lambda url, which, **kw: asyncio.run(drive(url, which, kw.pop("seconds", a.seconds), a.warmup, body, **kw))  # noqa: E731
    lat_s = a.latency_seconds
    light = {n: poisson_times(a.light_rate, a.warmup + lat_s, seed) for seed, n in enumerate(("light-1", "light-2"))}
    print(f"latency phases: light tenants open-loop at {a.light_rate:g} requests/s each (Poisson), heavy closed-loop "
          f"with {loops['heavy']} outstanding; {lat_s:g} s per phase")
    ratios = {}
    with serve_in_subprocess(str(model), free_port(), *common, "--scheduling", "fifo") as t:
        if not a.no_shares:
            alone = run(t.url, {"light-1": loops["light-1"]})
            base = report("light-1 alone (closed loop)", alone, equal)
            fifo = run(t.url, loops)
            fifo_p99 = report("FIFO, equal weights (closed loop)", fifo, equal)
        solo = {}
        for n, ts in light.items():
            out = run(t.url, {}, open_loop={n: ts}, seconds=lat_s)
            solo[n] = report(f"{n} alone, open loop", out, equal)[n]
            breakdown("alone", out)
        out = run(t.url, {"heavy": loops["heavy"]}, open_loop=light, seconds=lat_s)
        lat = report("FIFO, heavy backlogged, light open loop", out, equal)
        breakdown("FIFO", out)
        ratios["FIFO"] = {n: lat[n] / solo[n] for n in light}
    with serve_in_subprocess(str(model), free_port(), *common, "--scheduling", "fair") as t:
        if not a.no_shares:
            fair = run(t.url, loops)
            fair_p99 = report("fair, equal weights (closed loop)", fair, equal)
            weighted = {"heavy": 2.0, "light-1": 1.0, "light-2": 1.0}
            write_keys(keys, weighted)
            os.kill(t.pid, signal.SIGHUP)
            time.sleep(0.5)
            report("fair, weights 2:1:1 (closed loop)", run(t.url, loops), weighted)
            write_keys(keys, equal)
            os.kill(t.pid, signal.SIGHUP)
            time.sleep(0.5)
        out = run(t.url, {"heavy": loops["heavy"]}, open_loop=light, seconds=lat_s)
        lat = report("fair, heavy backlogged, light open loop", out, equal)
        breakdown("fair", out)
        ratios["fair"] = {n: lat[n] / solo[n] for n in light}
    if not a.no_shares:
        print(f"\nclosed loop: light-1 p99 vs alone ({base['light-1']:.0f} ms): FIFO "
              f"{fifo_p99['light-1'] / base['light-1']:.2f}x, fair {fair_p99['light-1'] / base['light-1']:.2f}x; "
              f"median alone {statistics.median(alone['light-1']['lat']) * 1000:.0f} ms")
    print("open loop: light p99 vs its p99 alone (target <= 2x): " + "; ".join(
        f"{sched} " + ", ".join(f"{n} {r:.2f}x" for n, r in rs.items()) for sched, rs in ratios.items()))


if __name__ == "__main__":
    main()
