"""The teacher server on a live uvicorn (127.0.0.1), for every engine: exact results against a direct
transformers forward, JSON == binary, every bad input gets its 4xx envelope and the server keeps serving,
concurrent requests share forwards and equal serial results, /v1/info, /health, /metrics, /docs."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from protocol import codec
from protocol.schema import MSGPACK_MEDIA_TYPE, ScoreBatch
from tests.helpers import assert_topk_match, float32_tol, model_terms

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)

HAND_MADE = [
    ([2, 10, 11, 12, 13, 14], 1),  # score everything after the first token
    ([2, 20, 21, 22, 23, 24, 25, 26], 5),  # a prompt of 5, completion of 3
    ([2, 30], 1),  # shortest possible: one scored position
    (list(range(4, 104)), 60),  # longer, different length from the others (padding inside a forward)
]


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def reference_scores(model, token_ids: list[int], score_from: int, k: int):
    """Obviously-correct scores: full forward of one sequence, full log-softmax, row t-1 predicts token t."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    rows = logp[score_from - 1 : len(token_ids) - 1]
    actual = rows.gather(1, torch.tensor(token_ids[score_from:])[:, None]).squeeze(1)
    top = torch.topk(rows, k, dim=-1)
    return actual.numpy(), top.indices.numpy(), top.values.numpy()


def post(url: str, batch: ScoreBatch, media: str = MSGPACK_MEDIA_TYPE, **headers) -> httpx.Response:
    body = codec.encode_request_msgpack(batch) if media == MSGPACK_MEDIA_TYPE else codec.encode_request_json(batch)
    return httpx.post(url + "/v1/score", content=body, headers={"content-type": media, **headers}, timeout=120)


def score(url: str, batch: ScoreBatch, media: str = MSGPACK_MEDIA_TYPE):
    r = post(url, batch, media)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(media)
    return codec.decode_response_msgpack(r.content) if media == MSGPACK_MEDIA_TYPE else codec.decode_response_json(r.content)


# Tolerance: float32 on both sides through different kernel paths (the server pads sequences into one batched
# forward, the reference runs each alone; vLLM also has its own attention and fused MLP kernels), so rounding
# only: tests/helpers.py's rule from the magnitudes and the model's depth (~1e-4 here), not a measured number.
def tol(values, model_dir) -> float:
    return float32_tol(values, model_terms(model_dir))


def test_scores_equal_direct_transformers_forward(live_server, reference_model, tiny_model_dir):
    k = 8
    result = score(live_server.url, ScoreBatch.from_sequences(HAND_MADE, k))
    assert result.num_scored_B.tolist() == [len(t) - s for t, s in HAND_MADE]
    outside_topk = 0
    for (ids, s), got in zip(HAND_MADE, result.split(), strict=True):
        actual, top_ids, top_lp = reference_scores(reference_model, ids, s, k)
        t = tol(top_lp, tiny_model_dir)
        np.testing.assert_allclose(got.token_logprobs, actual, atol=tol(actual, tiny_model_dir), rtol=0)
        assert_topk_match(got.topk_ids, got.topk_logprobs, top_ids, top_lp, t)
        assert (np.diff(got.topk_logprobs, axis=1) <= 0).all(), "top-k must be sorted by descending logprob"
        outside_topk += int((~(got.topk_ids == np.array(ids[s:])[:, None]).any(axis=1)).sum())
    assert outside_topk > 0, "the hand-made sequences must exercise actual tokens outside the top-k"


def test_json_and_binary_are_identical(live_server):
    batch = ScoreBatch.from_sequences(HAND_MADE, 5)
    a, b = score(live_server.url, batch, "application/json"), score(live_server.url, batch)
    for name in ("token_logprobs_N", "topk_ids_NK", "topk_logprobs_NK", "num_scored_B"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


def test_accept_header_chooses_response_encoding(live_server):
    batch = ScoreBatch.from_sequences(HAND_MADE[:1], 3)
    r = post(live_server.url, batch, "application/json", accept=MSGPACK_MEDIA_TYPE)
    assert r.status_code == 200 and r.headers["content-type"] == MSGPACK_MEDIA_TYPE
    codec.decode_response_msgpack(r.content)


def _json(top_k=4, sequences=None, version=1):
    seqs = [{"token_ids": [2, 10, 11, 12], "score_from": 1}] if sequences is None else sequences
    return {"protocol_version": version, "top_k": top_k, "sequences": seqs}


BAD_INPUTS = [
    ("wrong protocol version", dict(json=_json(version=99)), 400, "unsupported_protocol_version"),
    ("K = 0", dict(json=_json(top_k=0)), 400, "invalid_top_k"),
    ("K above max_top_k", dict(json=_json(top_k=33)), 400, "invalid_top_k"),
    ("empty sequence list", dict(json=_json(sequences=[])), 400, "empty_request"),
    ("token id >= vocab", dict(json=_json(sequences=[{"token_ids": [2, 10, 10**6], "score_from": 1}])), 400, "invalid_token_id"),
    ("negative token id", dict(json=_json(sequences=[{"token_ids": [2, -1, 3], "score_from": 1}])), 400, "invalid_token_id"),
    ("score_from = 0", dict(json=_json(sequences=[{"token_ids": [2, 10, 11], "score_from": 0}])), 400, "invalid_score_from"),
    ("score_from beyond int32", dict(json=_json(sequences=[{"token_ids": [2, 10, 11], "score_from": 2**40}])), 400,
     "invalid_score_from"),
    ("score_from = len", dict(json=_json(sequences=[{"token_ids": [2, 10, 11], "score_from": 3}])), 400, "invalid_score_from"),
    ("sequence longer than max", dict(json=_json(sequences=[{"token_ids": [5] * 600, "score_from": 1}])), 400,
     "sequence_too_long"),
    ("too many tokens", dict(json=_json(sequences=[{"token_ids": [5] * 500, "score_from": 1}] * 3000)), 413, "request_too_large"),
    ("malformed JSON", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "malformed_body"),
    ("unknown field", dict(json={**_json(), "extra": 1}), 400, "malformed_body"),
    ("malformed msgpack", dict(content=b"\xc1\xff", headers={"content-type": MSGPACK_MEDIA_TYPE}), 400, "malformed_body"),
    ("wrong content type", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ("body over max_body_bytes", dict(content=b"x" * (65 << 20), headers={"content-type": "application/json"}), 413,
     "body_too_large"),
]


@pytest.mark.parametrize("name,kwargs,status,error_type", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_4xx_envelope_and_server_keeps_serving(live_server, name, kwargs, status, error_type):
    r = httpx.post(live_server.url + "/v1/score", timeout=120, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    assert 0 < len(body["error"]["message"]) <= 500
    score(live_server.url, ScoreBatch.from_sequences(HAND_MADE[:1], 2))  # still serving


def test_unknown_route_and_method_use_the_envelope(live_server):
    r = httpx.get(live_server.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.get(live_server.url + "/v1/score")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def test_concurrent_requests_equal_serial_and_share_forwards(live_server, tiny_model_dir):
    rng = np.random.default_rng(0)
    batches = [
        ScoreBatch.from_sequences(
            [(rng.integers(4, 400, int(rng.integers(20, 120))).tolist(), int(rng.integers(1, 15))) for _ in range(3)], 6
        )
        for _ in range(16)
    ]
    serial = [score(live_server.url, b) for b in batches]
    forwards0 = _metric(live_server.url, "aopd_teacher_forward_requests_count")
    requests0 = _metric(live_server.url, "aopd_teacher_forward_requests_sum")
    with cf.ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda b: score(live_server.url, b), batches))
    for a, b in zip(serial, concurrent, strict=True):
        # Co-batched with other requests, a sequence gets different padding, so float32 sums are reordered.
        np.testing.assert_allclose(a.token_logprobs_N, b.token_logprobs_N, atol=tol(a.token_logprobs_N, tiny_model_dir), rtol=0)
        t = tol(a.topk_logprobs_NK, tiny_model_dir)
        assert_topk_match(b.topk_ids_NK, b.topk_logprobs_NK, a.topk_ids_NK, a.topk_logprobs_NK, t)
    if live_server.engine_name == "hf":
        forwards = _metric(live_server.url, "aopd_teacher_forward_requests_count") - forwards0
        served = _metric(live_server.url, "aopd_teacher_forward_requests_sum") - requests0
        assert served == 16 and forwards < 16, f"16 concurrent requests ran in {forwards} forwards: none was shared"


def test_info_health_metrics_docs(live_server, tiny_model_dir):
    info = httpx.get(live_server.url + "/v1/info").json()
    assert info["engine"] == live_server.engine_name
    assert info["protocol_version"] == 1 and info["max_top_k"] == 32 and info["max_seq_len"] == 512
    assert info["vocab_size"] > 32 and info["tokenizer_fingerprint"].startswith("sha256:")
    assert httpx.get(live_server.url + "/health").status_code == 200
    text = httpx.get(live_server.url + "/metrics").text
    for name in ("aopd_teacher_requests_total", "aopd_teacher_tokens_scored_total", "aopd_teacher_request_latency_seconds_bucket",
                 "aopd_teacher_errors_total", "aopd_teacher_request_sequences_bucket"):
        assert name in text, name
    assert httpx.get(live_server.url + "/docs").status_code == 200
    spec = httpx.get(live_server.url + "/openapi.json").json()
    assert "application/msgpack" in spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]


def test_health_is_503_until_engine_ready(tiny_model_dir):
    from fastapi.testclient import TestClient

    from teacher_server.app import create_app
    from tests.helpers import teacher_settings

    app = create_app(teacher_settings(tiny_model_dir, "hf"))
    client = TestClient(app)  # not entered: lifespan has not run, no engine
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"
    with TestClient(app) as live:
        assert live.get("/health").status_code == 200


@pytest.mark.parametrize("body,status,error_type", [
    ({"prompts": [[2, 3]], "max_new_tokens": 2, "seed": 2**64}, 400, "malformed_body"),
    ({"prompts": [[2, 3]] * 65, "n": 64, "max_new_tokens": 1}, 413, "too_many_sequences"),
    ({"prompts": [[2, 3]], "n": 0, "max_new_tokens": 2}, 400, "invalid_n"),
    ({"prompts": [], "max_new_tokens": 2}, 400, "empty_request"),
    ({"prompts": [[2, 10**6]], "max_new_tokens": 2}, 400, "invalid_token_id"),
])
def test_generate_bad_input(live_server, body, status, error_type):
    r = httpx.post(live_server.url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == status and r.json()["error"]["type"] == error_type, r.text


def test_generate_total_token_limit(tiny_model_dir):
    from fastapi.testclient import TestClient

    from teacher_server.app import create_app
    from tests.helpers import teacher_settings

    with TestClient(create_app(teacher_settings(tiny_model_dir, "hf", max_tokens_per_request=100))) as client:
        r = client.post("/v1/generate", json={"prompts": [[2, 3, 4]] * 4, "n": 2, "max_new_tokens": 20})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        r = client.post("/v1/generate", json={"prompts": [[2, 3, 4]], "n": 2, "max_new_tokens": 5, "seed": 0})
        assert r.status_code == 200 and len(r.json()["completions"]) == 2
