"""Reliability and security of the teacher server: API key (401 / 200, /health open), the bounded queue (429 +
Retry-After, absorbed by the client's retries), and a dead engine (503 everywhere, the server stops itself so
its orchestrator restarts it). The dead engine is injected: a real hf engine whose health is switched off."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from protocol import codec
from protocol.schema import ScoreBatch
from student_trainer.teacher_client import TeacherClient, TeacherError
from teacher_server.app import create_app
from teacher_server.engines.hf import HFEngine
from tests.helpers import LiveServer, teacher_settings

BODY = codec.encode_request_msgpack(ScoreBatch.from_sequences([([2, 10, 11, 12], 1)], 4))
MSGPACK = {"content-type": "application/msgpack"}


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir):
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf", api_key="s3cret-key"))) as server:
        yield server


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer s3cret-ke", "s3cret-key", "Basic s3cret-key"])
def test_missing_or_wrong_key_is_401_with_envelope(keyed_server, header):
    headers = dict(MSGPACK, **({"authorization": header} if header else {}))
    r = httpx.post(keyed_server.url + "/v1/score", content=BODY, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(keyed_server.url + "/v1/generate", json={"prompts": [[2, 3]], "max_new_tokens": 2},
                   headers={} if header is None else {"authorization": header})
    assert r.status_code == 401


def test_right_key_is_200_and_health_stays_open(keyed_server, monkeypatch):
    r = httpx.post(keyed_server.url + "/v1/score", content=BODY, headers=dict(MSGPACK, authorization="Bearer s3cret-key"))
    assert r.status_code == 200
    assert httpx.get(keyed_server.url + "/health").status_code == 200
    monkeypatch.setenv("TEACHER_API_KEY", "s3cret-key")  # the client takes the key from the environment
    with TeacherClient(keyed_server.url) as client:
        assert client.score([([2, 10, 11], 1)], top_k=2)[0].topk_ids.shape == (2, 2)
    with TeacherClient(keyed_server.url, api_key="nope") as client:
        with pytest.raises(TeacherError, match="401"):
            client.score([([2, 10, 11], 1)], top_k=2)


def test_over_capacity_gets_429_with_retry_after_and_client_absorbs_it(tiny_model_dir):
    app = create_app(teacher_settings(tiny_model_dir, "hf", max_queued_requests=1, batch_wait_ms=50))
    long = ScoreBatch.from_sequences([(list(range(4, 400)), 1)] * 8, 8)
    body = codec.encode_request_msgpack(long)
    with LiveServer(app) as server:
        with cf.ThreadPoolExecutor(8) as pool:
            def post(_):
                return httpx.post(server.url + "/v1/score", content=body, headers=MSGPACK, timeout=60)

            responses = list(pool.map(post, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "overloaded"
        with TeacherClient(server.url, backoff_s=0.05) as client, cf.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: client.score_batch(long), range(4)))  # all succeed through retries
        assert all(r.token_logprobs_N.size == long.num_scored_B.sum() for r in results)


class DyingEngine(HFEngine):
    """A real hf engine whose health can be switched off (failure injection)."""

    dead = False

    def healthy(self) -> bool:
        return not self.dead and super().healthy()


def test_dead_engine_answers_503_and_stops_the_server(tiny_model_dir):
    settings = teacher_settings(tiny_model_dir, "hf")
    engine = DyingEngine(settings)
    app = create_app(settings, engine)
    with LiveServer(app) as server:
        app.state.server = server.server
        assert httpx.post(server.url + "/v1/score", content=BODY, headers=MSGPACK).status_code == 200
        engine.dead = True
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        r = httpx.post(server.url + "/v1/score", content=BODY, headers=MSGPACK)
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
        deadline = time.monotonic() + 10
        while server.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.thread.is_alive(), "the server should stop itself when its engine dies"
        assert app.state.engine_failed
