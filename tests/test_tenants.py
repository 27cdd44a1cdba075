"""Tenants of one shared teacher (teacher_server/tenants.py): keys from a hashed keys file, per-tenant limits with
429 + Retry-After that do not touch other tenants, a usage view that shows only the caller's figures, reloads
(interval and SIGHUP) that take effect without dropping in-flight requests, and the fair gate's shares."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import yaml

from protocol import codec
from protocol.schema import ScoreBatch
from teacher_server.app import create_app
from teacher_server.process import free_port, serve_in_subprocess
from teacher_server.settings import Settings
from teacher_server.tenants import FairGate, Tenant, Tenants, hash_key, parse_keys_file
from tests.helpers import LiveServer, teacher_settings


def write_keys(path, tenants: list[dict]) -> None:
    rows = [{k: v for k, v in t.items() if k != "key"} | {"key_sha256": hash_key(t["key"])} for t in tenants]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"tenants": rows}))
    os.replace(tmp, path)  # atomic, as an operator's editor or config management writes it


def score_body(n_tokens: int = 24) -> bytes:
    ids = (np.arange(n_tokens) % 50 + 5).tolist()
    return codec.encode_request_json(ScoreBatch.from_sequences([(ids, 1)], 4))


def post_score(client: httpx.Client, key: str, n_tokens: int = 24) -> httpx.Response:
    return client.post("/v1/score", content=score_body(n_tokens),
                       headers={"authorization": f"Bearer {key}", "content-type": "application/json"})


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    write_keys(path, [
        {"name": "team-a", "key": "key-a", "weight": 2},
        {"name": "team-b", "key": "key-b", "tokens_per_minute": 40},
        {"name": "team-c", "key": "key-c", "max_tokens_in_flight": 30},
    ])
    return path


@pytest.fixture
def served(tiny_model_dir, keys_file):
    app = create_app(teacher_settings(tiny_model_dir, "hf", api_keys_file=str(keys_file), api_keys_reload_s=0.2,
                                      batch_wait_ms=0))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield app, client


def test_keys_file_is_parsed_strictly_and_stores_no_key_in_the_clear(tmp_path, keys_file):
    table = parse_keys_file(keys_file)
    assert {t.name for t in table.values()} == {"team-a", "team-b", "team-c"}
    assert "key-a" not in keys_file.read_text() and hash_key("key-a") in table
    bad = tmp_path / "bad.yaml"
    for content, message in [
        ({"tenants": [{"name": "x", "key_sha256": "abc"}]}, "64 hex digits"),
        ({"tenants": [{"name": "x", "key_sha256": "0" * 64, "weight": 0}]}, "weight must be > 0"),
        ({"tenants": [{"name": "x", "key_sha256": "0" * 64, "rate": 3}]}, "unknown fields"),
        ({"tenants": [{"name": "x", "key_sha256": "0" * 64}, {"name": "y", "key_sha256": "0" * 64}]}, "the same key"),
        ({"tenants": []}, "non-empty 'tenants'"),
    ]:
        bad.write_text(yaml.safe_dump(content))
        with pytest.raises(ValueError, match=message):
            Tenants(str(bad))
    with pytest.raises(ValueError, match="both set"):
        Settings(model="m", api_key="k", api_keys_file=str(keys_file))


def test_each_tenant_sees_only_its_own_usage_and_metrics_are_per_tenant(served):
    _, client = served
    r = post_score(client, "key-a")
    assert r.status_code == 200
    # where the request's time went, as the standard Server-Timing header (ms)
    timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert set(timing) == {"gate", "queue", "forward", "wake", "total"}, timing
    assert 0 < float(timing["forward"]) <= float(timing["total"]) and float(timing["gate"]) >= 0
    assert post_score(client, "key-a").status_code == 200
    assert post_score(client, "key-b").status_code == 200
    a = client.get("/v1/usage", headers={"authorization": "Bearer key-a"}).json()
    b = client.get("/v1/usage", headers={"authorization": "Bearer key-b"}).json()
    assert a["tenant"] == "team-a" and a["requests"] == 2 and a["tokens_scored"] == 2 * 23 and a["weight"] == 2
    assert b["tenant"] == "team-b" and b["requests"] == 1 and b["limits"]["tokens_per_minute"] == 40
    assert "team-b" not in str(a) and "team-a" not in str(b)
    r = client.get("/v1/usage", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert post_score(client, "key-b-wrong").status_code == 401
    text = client.get("/metrics").text
    assert 'aopd_teacher_tenant_tokens_scored_total{tenant="team-a"} 46.0' in text
    assert 'aopd_teacher_tenant_requests_total{status="200",tenant="team-b"} 1.0' in text
    assert 'aopd_teacher_tenant_queue_wait_seconds_count{tenant="team-a"} 2.0' in text


def test_a_tenant_over_its_limit_gets_429_while_the_others_get_200(served):
    _, client = served
    assert post_score(client, "key-b", 30).status_code == 200  # 30 of its 40 tokens per minute
    over = post_score(client, "key-b", 30)
    assert over.status_code == 429 and over.json()["error"]["type"] == "tenant_limit"
    assert "tokens_per_minute=40" in over.json()["error"]["message"]
    assert int(over.headers["retry-after"]) >= 20  # 20 tokens short at 40 per minute: ~30 s
    assert post_score(client, "key-a", 30).status_code == 200  # other tenants unaffected
    big = post_score(client, "key-c", 31)  # over its max_tokens_in_flight of 30 on its own
    assert big.status_code == 429 and "max_tokens_in_flight=30" in big.json()["error"]["message"]
    assert post_score(client, "key-c", 30).status_code == 200
    usage = client.get("/v1/usage", headers={"authorization": "Bearer key-b"}).json()
    assert usage["rejected"] == 1 and usage["tokens_in_flight"] == 0 and usage["requests_in_flight"] == 0
    assert 'aopd_teacher_tenant_requests_total{status="429",tenant="team-b"} 1.0' in client.get("/metrics").text


def test_a_reloaded_keys_file_takes_effect_without_dropping_in_flight_requests(served, keys_file):
    app, client = served

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            async def one():
                r = await ac.post("/v1/score", content=score_body(400), headers={
                    "authorization": "Bearer key-a", "content-type": "application/json"})
                return r.status_code

            # Hold the engine's forward thread, so every admitted request stays in flight until the reload is done
            # (on a loaded machine the client may otherwise send its last requests after the reload).
            hold = threading.Event()
            app.state.engine._executor.submit(hold.wait, 60)
            tasks = [asyncio.create_task(one()) for _ in range(12)]
            try:
                deadline = time.monotonic() + 30
                while app.state.tenants.states["team-a"].requests_in_flight < 12:  # admitted, queued or running
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.002)
                write_keys(keys_file, [{"name": "team-a", "key": "key-a2"}, {"name": "team-d", "key": "key-d"}])
                app.state.tenants.reload()  # what the interval check (or SIGHUP) does
            finally:
                hold.set()
            return await asyncio.gather(*tasks)

    codes = asyncio.run(burst(str(client.base_url)))
    assert codes == [200] * 12  # admitted under the old key: all finished
    assert post_score(client, "key-a").status_code == 401  # revoked at once
    assert post_score(client, "key-b").status_code == 401  # removed tenant
    assert post_score(client, "key-a2").status_code == 200  # team-a's new key: same tenant, same counters
    usage = client.get("/v1/usage", headers={"authorization": "Bearer key-a2"}).json()
    assert usage["tenant"] == "team-a" and usage["requests"] == 13 and usage["requests_in_flight"] == 0
    # the interval check alone (no explicit reload): within a few periods of 0.2 s
    write_keys(keys_file, [{"name": "team-e", "key": "key-e"}])
    deadline = time.monotonic() + 10
    while post_score(client, "key-e").status_code != 200:
        assert time.monotonic() < deadline, "the keys file change was not picked up"
        time.sleep(0.1)
    assert post_score(client, "key-d").status_code == 401
    # a broken file keeps the previous keys (and says so in the log) instead of locking everyone out
    keys_file.write_text("tenants: [{name: x}]")
    time.sleep(0.6)
    assert post_score(client, "key-e").status_code == 200


@pytest.mark.slow
def test_sighup_reloads_the_keys_file_of_a_running_server(tiny_model_dir, keys_file):
    args = ["--dtype", "float32", "--max-top-k", "8", "--api-keys-file", str(keys_file), "--api-keys-reload-s", "3600"]
    with serve_in_subprocess(str(tiny_model_dir), free_port(), *args) as teacher, \
            httpx.Client(base_url=teacher.url, timeout=60) as client:
        assert post_score(client, "key-b").status_code == 200
        write_keys(keys_file, [{"name": "team-a", "key": "key-a"}])
        os.kill(teacher.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while post_score(client, "key-b").status_code != 401:
            assert time.monotonic() < deadline, "SIGHUP did not reload the keys"
            time.sleep(0.05)
        assert post_score(client, "key-a").status_code == 200


def test_single_api_key_is_one_tenant_and_no_key_is_open(tiny_model_dir):
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf", api_key="secret"))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        assert post_score(client, "secret").status_code == 200
        assert post_score(client, "other").status_code == 401
        assert client.get("/v1/usage", headers={"authorization": "Bearer secret"}).json()["tenant"] == "default"
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf"))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        assert post_score(client, "anything").status_code == 200
        assert client.get("/v1/usage").json()["tenant"] == "anonymous"


# ---------------------------------------------------------------------------------------------------------
# the fair gate itself: a saturated engine simulated by admitting one request at a time


def admitted_shares(fair: bool, weights: dict[str, float], offered: dict[str, int], served_n: int,
                    tokens: int = 100, rounds: int = 40) -> dict[str, float]:
    """Requests arrive in `rounds` rounds of `offered[name]` per tenant (offered load in that ratio) while the
    engine is busy, so every tenant has a backlog; the engine then takes one at a time. The share of the first
    `served_n` admissions each tenant got."""

    async def run() -> dict[str, int]:
        gate = FairGate(capacity=tokens, fair=fair)
        tenants = {n: Tenant(n, w) for n, w in weights.items()}
        got = dict.fromkeys(weights, 0)
        order: list[str] = []
        await gate.acquire(Tenant("warm"), tokens)  # the engine is busy: everything below queues

        async def one(name):
            await gate.acquire(tenants[name], tokens)
            order.append(name)

        tasks = [asyncio.create_task(one(n)) for _ in range(rounds) for n in offered for _ in range(offered[n])]
        await asyncio.sleep(0)
        for _ in range(served_n):
            gate.release(tokens)  # one request finishes: the next is admitted
            await asyncio.sleep(0)
        for n in order[:served_n]:
            got[n] += 1
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return got

    got = asyncio.run(run())
    return {n: v / served_n for n, v in got.items()}


def test_fair_gate_shares_follow_weights_and_fifo_follows_offered_load():
    equal = admitted_shares(True, {"a": 1, "b": 1, "c": 1}, {"a": 8, "b": 1, "c": 1}, 60)
    assert all(abs(v - 1 / 3) <= 0.1 / 3 for v in equal.values()), equal
    weighted = admitted_shares(True, {"a": 2, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 1}, 40)
    assert weighted["a"] == pytest.approx(0.5, abs=0.05) and weighted["b"] == pytest.approx(0.25, abs=0.05)
    fifo = admitted_shares(False, {"a": 1, "b": 1, "c": 1}, {"a": 8, "b": 1, "c": 1}, 60)
    assert fifo["a"] == pytest.approx(0.8, abs=0.02)  # arrival order: shares follow the offered load


def test_an_idle_tenant_banks_no_credit():
    async def run():
        gate = FairGate(capacity=10, fair=True)
        a, b = Tenant("a"), Tenant("b")
        for _ in range(50):  # a alone for a while: admitted and done at once
            await gate.acquire(a, 10)
            gate.release(10)
        await gate.acquire(a, 10)  # busy
        order = []

        async def one(t):
            await gate.acquire(t, 10)
            order.append(t.name)

        tasks = [asyncio.create_task(one(t)) for t in [a, b] * 4]
        await asyncio.sleep(0)
        for _ in range(8):
            gate.release(10)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(run())
    assert order.count("a") == order.count("b") == 4 and set(order[:2]) == {"a", "b"}  # b is not starved, a not owed


def test_a_light_tenant_ahead_of_the_backlog_takes_the_latency_lane():
    """A heavy tenant keeps the gate full (8 x 10 tokens) with a backlog. A light tenant's requests whose start
    tags are at most the lane's burst (here 40 tokens; by default the capacity) behind the backlog's head are admitted at
    once beyond the capacity, in the latency lane (the engine runs them next, alone); of a burst of seven, the
    seventh is tagged more than 40 behind the head and queues. The lane holds at most the capacity: of nine idle
    tenants arriving at once, the ninth queues. A tenant at its share of the recent tokens takes no lane. The
    heavy tenant, with requests waiting, never takes the lane
    (in flight: its 80 and the lane only). FIFO never jumps
    the line."""

    async def run(fair: bool, lights: list[str], lane_burst: int = 40):
        gate = FairGate(capacity=80, fair=fair, lane_burst=lane_burst)
        heavy = Tenant("heavy")
        for _ in range(8):
            await gate.acquire(heavy, 10)  # the engine is full
        queued = [asyncio.create_task(gate.acquire(heavy, 10)) for _ in range(5)]
        await asyncio.sleep(0)
        tenants = {n: Tenant(n) for n in lights}
        burst = [asyncio.create_task(gate.acquire(tenants[n], 10)) for n in lights]
        await asyncio.sleep(0)
        admitted = [t.result()[1] if t.done() else None for t in burst]
        state = (admitted, gate.in_flight, gate.lane_in_flight)
        for t in [*queued, *burst]:
            t.cancel()
        await asyncio.gather(*queued, *burst, return_exceptions=True)
        return state

    lane = FairGate.LANE
    assert asyncio.run(run(True, ["light"] * 7)) == ([lane] * 6 + [None], 140, 60)
    assert asyncio.run(run(True, list("abcdefghi"))) == ([lane] * 8 + [None], 160, 80)
    assert FairGate(80).lane_burst == 80
    # with the default burst, a burst of nine stops at the tenant's share instead: after seven it has had 70 of the
    # 150 tokens admitted lately, over 90% of half of them
    assert asyncio.run(run(True, ["light"] * 9, lane_burst=80)) == ([lane] * 7 + [None] * 2, 150, 70)
    assert asyncio.run(run(False, ["a", "b"])) == ([None, None], 80, 0)


def test_the_hf_engine_runs_lane_work_first_and_alone_then_by_priority_and_arrival():
    from teacher_server.engines.hf import _Job

    batch = ScoreBatch.from_sequences([([1, 2, 3], 1)], 1)
    jobs = [_Job(p, i, batch, None) for i, p in enumerate([5.0, 0.0, FairGate.LANE, 5.0, 1.0, 0.0])]
    assert [j.seq for j in sorted(jobs)] == [2, 1, 5, 4, 0, 3]


def test_while_lane_work_is_about_the_hf_batcher_halves_other_forwards(tmp_path):
    """The batcher's policy, on its real loop (only the forward is replaced, by one that records what it was
    given): a backlog alone fills the token budget (40 = 4 jobs of 10); once a lane job has gone through, alone,
    the backlog's forwards take half the budget (2 jobs)."""
    from teacher_server.engines.hf import HFEngine, _Job

    batch = ScoreBatch.from_sequences([(list(range(1, 11)), 1)], 1)  # 10 tokens
    forwards: list[list[int]] = []

    async def run() -> None:
        eng = HFEngine(Settings(model=str(tmp_path), max_tokens_per_batch=40, batch_wait_ms=0))
        eng._score_jobs = lambda batches: forwards.append([b.num_tokens for b in batches]) or [None] * len(batches)
        eng._queue = asyncio.PriorityQueue()
        loop = asyncio.get_running_loop()

        async def submit(priorities):
            jobs = [_Job(p, i, batch, loop.create_future()) for i, p in enumerate(priorities)]
            for j in jobs:
                eng._queue.put_nowait(j)
            await asyncio.gather(*(j.future for j in jobs))

        worker = asyncio.create_task(eng._batch_loop())
        await submit([1.0] * 8)
        n_before = len(forwards)
        await submit([FairGate.LANE] + [1.0] * 8)
        worker.cancel()
        eng._executor.shutdown()
        assert forwards[:n_before] == [[10] * 4, [10] * 4]
        assert forwards[n_before:] == [[10], *[[10] * 2] * 4]

    asyncio.run(run())
