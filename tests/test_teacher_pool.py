"""Several teacher endpoints: requests spread over two live servers on 127.0.0.1 (least outstanding), one is
shut down mid-run and restarted: no request is lost, it is marked down and taken back when healthy; endpoints
serving different tokenizers are refused at connect; training runs against a comma-separated URL list."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import numpy as np
import pytest

from protocol.schema import ScoreBatch
from student_trainer.teacher_client import TeacherIncompatibleError
from student_trainer.teacher_pool import TeacherPool
from teacher_server.app import create_app
from tests.helpers import LiveServer, teacher_settings


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + "{") or x.startswith(name + " "))


def restartable(model_dir, port: int | None = None) -> LiveServer:
    server = LiveServer(create_app(teacher_settings(model_dir, "hf")))
    if port is not None:
        server.port, server.url, server.server.config.port = port, f"http://127.0.0.1:{port}", port
    return server.__enter__()


def test_spread_failover_and_recovery(tiny_model_dir):
    a, b = restartable(tiny_model_dir), restartable(tiny_model_dir)
    rng = np.random.default_rng(0)
    batches = [ScoreBatch.from_sequences([(rng.integers(4, 400, 60).tolist(), 10)] * 2, 4) for _ in range(40)]
    pool = TeacherPool([a.url, b.url], recheck_s=0.5, backoff_s=0.05)
    try:
        pool.connect()
        with cf.ThreadPoolExecutor(4) as ex:
            first = list(ex.map(pool.score_batch, batches[:20]))
        served = [_metric(s.url, "aopd_teacher_sequences_scored_total") for s in (a, b)]
        assert all(x > 0 for x in served), f"both replicas must get work: {served}"

        port_b = b.port
        b.__exit__(None, None, None)  # replica b goes away mid-run
        with cf.ThreadPoolExecutor(4) as ex:
            second = list(ex.map(pool.score_batch, batches[20:]))
        assert pool.down_since[1] is not None
        assert all(r.token_logprobs_N.size == 100 for r in first + second), "no request may be lost"

        b = restartable(tiny_model_dir, port_b)  # it comes back on the same address
        deadline = time.monotonic() + 20
        while pool.down_since[1] is not None and time.monotonic() < deadline:
            pool.score_batch(batches[0])
            time.sleep(0.2)
        assert pool.down_since[1] is None, "a healthy replica must be taken back"
        before = _metric(b.url, "aopd_teacher_sequences_scored_total")
        with cf.ThreadPoolExecutor(4) as ex:
            list(ex.map(pool.score_batch, batches[:12]))
        assert _metric(b.url, "aopd_teacher_sequences_scored_total") > before
    finally:
        pool.close()
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)


def test_replicas_with_different_tokenizers_are_refused(tiny_model_dir, other_model_dir):
    a, b = restartable(tiny_model_dir), restartable(other_model_dir)
    try:
        with pytest.raises(TeacherIncompatibleError, match="disagree on tokenizer_fingerprint"):
            TeacherPool([a.url, b.url]).connect()
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
