"""The teacher client: against a live uvicorn on 127.0.0.1 (sync and async, both encodings), the connect-time
handshake (tokenizer fingerprint, vocab, K, length), and retry policy with injected failures (MockTransport)."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from protocol import codec
from protocol.schema import ScoreBatch
from student_trainer.teacher_client import (
    AsyncTeacherClient,
    TeacherClient,
    TeacherError,
    TeacherIncompatibleError,
    TeacherUnavailableError,
)
from tests.helpers import assert_topk_match, float32_tol, model_terms

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)

SEQS = [([2, 10, 11, 12, 13], 2), ([2, 40, 41], 1)]


@pytest.fixture(scope="module")
def hf_server(tiny_model_dir):
    from teacher_server.app import create_app
    from tests.helpers import LiveServer, teacher_settings

    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf"))) as server:
        server.model_dir = tiny_model_dir
        yield server


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_sync_client_scores_numpy_per_sequence(hf_server, tiny_model_dir, encoding):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with TeacherClient(hf_server.url, encoding=encoding) as client:
        info = client.connect(tokenizer=tok, top_k=8, max_seq_len=256)
        assert info.engine == "hf"
        rows = client.score(SEQS, top_k=8)
    assert [r.token_logprobs.shape for r in rows] == [(3,), (2,)]
    assert rows[0].topk_ids.shape == (3, 8) and rows[0].topk_ids.dtype == np.int32
    assert rows[1].topk_logprobs.dtype == np.float32 and (rows[1].topk_logprobs <= 0).all()


async def test_async_client_matches_sync(hf_server):
    with TeacherClient(hf_server.url) as client:
        sync_rows = client.score(SEQS, top_k=4)
    async with AsyncTeacherClient(hf_server.url) as client:
        await client.connect()
        many = await asyncio.gather(*[client.score(SEQS, top_k=4) for _ in range(4)])
    for rows in many:
        for a, b in zip(sync_rows, rows, strict=True):
            # the async requests are co-batched with each other (other padding): float32 rounding only
            t = float32_tol(a.topk_logprobs, model_terms(hf_server.model_dir))
            assert_topk_match(b.topk_ids, b.topk_logprobs, a.topk_ids, a.topk_logprobs, t)
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=t, rtol=0)


def test_tokenizer_mismatch_is_refused_naming_both(hf_server, other_model_dir):
    other = AutoTokenizer.from_pretrained(str(other_model_dir))
    with TeacherClient(hf_server.url) as client:
        info = client.info()
        with pytest.raises(TeacherIncompatibleError) as exc:
            client.connect(tokenizer=other)
    msg = str(exc.value)
    assert info.tokenizer_fingerprint in msg and "sha256:" in msg.replace(info.tokenizer_fingerprint, "")


def test_limits_checked_at_connect(hf_server):
    with TeacherClient(hf_server.url) as client:
        with pytest.raises(TeacherIncompatibleError, match="--max-top-k 64"):
            client.connect(top_k=64)
        with pytest.raises(TeacherIncompatibleError, match="max_seq_len=512"):
            client.connect(max_seq_len=4096)
        with pytest.raises(TeacherIncompatibleError, match="vocab size mismatch"):
            client.connect(vocab_size=12345)


def test_server_error_surfaces_with_its_message(hf_server):
    with TeacherClient(hf_server.url) as client:
        with pytest.raises(TeacherError) as exc:
            client.score([([2, 10, 10**6], 1)], top_k=4)
    assert exc.value.status == 400 and exc.value.error_type == "invalid_token_id"
    assert "outside the vocabulary" in str(exc.value)


# ------------------------------------------------------------------------------------------------------
# Retry policy, with failures injected by a fake transport.
# ------------------------------------------------------------------------------------------------------


def _ok_response(request: httpx.Request) -> httpx.Response:
    batch = codec.decode_request_msgpack(request.content)
    n = int(batch.num_scored_B.sum())
    from protocol.schema import ScoreResult

    result = ScoreResult(
        np.zeros(n, np.float32), np.zeros((n, batch.top_k), np.int32), np.zeros((n, batch.top_k), np.float32), batch.num_scored_B
    )
    return httpx.Response(200, content=codec.encode_response_msgpack(result), headers={"content-type": "application/msgpack"})


def _flaky(failures: list):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if failures:
            f = failures.pop(0)
            if isinstance(f, Exception):
                raise f
            return f
        return _ok_response(request)

    return handler, calls


def _envelope(status: int, **headers) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": "busy", "message": "try later"}}, headers=headers)


def test_retries_on_connect_error_429_502_503_then_succeeds():
    failures = [httpx.ConnectError("refused"), _envelope(429), _envelope(502), _envelope(503, **{"Retry-After": "0"})]
    handler, calls = _flaky(failures)
    client = TeacherClient("http://teacher", transport=httpx.MockTransport(handler), backoff_s=0.01)
    rows = client.score(SEQS, top_k=2)
    assert len(calls) == 5 and len(rows) == 2


def test_retry_after_is_honoured():
    handler, calls = _flaky([_envelope(503, **{"Retry-After": "0.3"})])
    client = TeacherClient("http://teacher", transport=httpx.MockTransport(handler), backoff_s=0.0)
    client.score(SEQS, top_k=2)
    assert calls[1] - calls[0] >= 0.28


def test_no_retry_on_other_errors():
    handler, calls = _flaky([_envelope(400), _envelope(500)])
    client = TeacherClient("http://teacher", transport=httpx.MockTransport(handler), backoff_s=0.01)
    with pytest.raises(TeacherError, match="400"):
        client.score(SEQS, top_k=2)
    with pytest.raises(TeacherError, match="500"):
        client.score(SEQS, top_k=2)
    assert len(calls) == 2


def test_retries_are_bounded():
    handler, calls = _flaky([_envelope(503)] * 10)
    client = TeacherClient("http://teacher", transport=httpx.MockTransport(handler), backoff_s=0.001, max_retries=3)
    with pytest.raises(TeacherError, match="503"):
        client.score(SEQS, top_k=2)
    assert len(calls) == 4


async def test_async_client_retries_too():
    failures = [httpx.ConnectError("refused"), _envelope(503, **{"Retry-After": "0"})]
    handler, calls = _flaky(failures)
    client = AsyncTeacherClient("http://teacher", transport=httpx.MockTransport(handler), backoff_s=0.01)
    rows = await client.score(ScoreBatch.from_sequences(SEQS, 2))
    assert len(calls) == 3 and len(rows) == 2
    await client.close()


def test_response_for_other_sequences_is_rejected():
    def handler(request):
        resp = _ok_response(request)
        result = codec.decode_response_msgpack(resp.content)
        wrong = type(result)(result.token_logprobs_N[:-1], result.topk_ids_NK[:-1], result.topk_logprobs_NK[:-1],
                             result.num_scored_B - np.array([1] + [0] * (result.num_scored_B.size - 1), np.int32))
        return httpx.Response(200, content=codec.encode_response_msgpack(wrong), headers={"content-type": "application/msgpack"})

    client = TeacherClient("http://teacher", transport=httpx.MockTransport(handler))
    with pytest.raises(TeacherError, match="expected 2") as exc:
        client.score(SEQS, top_k=2)
    assert not isinstance(exc.value, TeacherUnavailableError), "a bad response is not an outage: waiting will not fix it"


def test_read_timeout_surfaces_as_an_outage_error_not_a_crash():
    def handler(request):
        raise httpx.ReadTimeout("slow", request=request)

    client = TeacherClient("http://teacher", transport=httpx.MockTransport(handler))
    with pytest.raises(TeacherUnavailableError) as exc:
        client.score(SEQS, top_k=2)
    assert exc.value.status is None


@pytest.mark.parametrize("status,outage", [(429, True), (502, True), (503, True), (400, False), (401, False),
                                           (413, False), (500, False)])
def test_only_busy_or_down_answers_are_outages(status, outage):
    """429 / 502 / 503 (after the retries) are TeacherUnavailableError, which the trainer waits out; a refusal is
    a plain TeacherError that stops the run with the server's message."""
    def handler(request):
        return httpx.Response(status, json={"error": {"type": "t", "message": "m"}}, headers={"retry-after": "0"})

    client = TeacherClient("http://teacher", transport=httpx.MockTransport(handler), max_retries=1, backoff_s=0.0)
    with pytest.raises(TeacherError) as exc:
        client.score(SEQS, top_k=2)
    assert isinstance(exc.value, TeacherUnavailableError) == outage and exc.value.status == status


