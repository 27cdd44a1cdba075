"""Fuzzing the live teacher server with schemathesis, from its own OpenAPI schema (>= 1,000 generated requests):
no request may get a 5xx, and a good request still succeeds afterwards."""

from __future__ import annotations

import httpx
import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from protocol import codec
from protocol.schema import ScoreBatch
from teacher_server.app import create_app
from teacher_server.settings import Settings
from tests.helpers import LiveServer, teacher_settings

CALLS: list[int] = []


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    # Small limits keep generated-but-valid requests (e.g. 8 x 500-token generations) fast on a CPU.
    app = create_app(teacher_settings(tiny_model_dir, "hf", max_seq_len=64, max_sequences_per_request=4,
                                      max_tokens_per_request=256))
    with LiveServer(app) as server:
        yield server


@schemathesis.serializer("application/msgpack")
def _msgpack_body(ctx, value) -> bytes:
    """Binary bodies are sent as generated (random bytes); anything structured is packed as msgpack."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return msgpack.packb(value, use_bin_type=True, default=str)


# The schema comes from the app factory (no model is loaded to build it); requests go to the live server.
# (schemathesis.pytest.from_fixture does not work with pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(Settings(model="unused")).openapi())


@schema.parametrize()
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, timeout=30)
    CALLS.append(response.status_code)
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"


def test_enough_requests_and_server_still_serves(fuzz_server):
    assert len(CALLS) >= 1000, len(CALLS)
    body = codec.encode_request_msgpack(ScoreBatch.from_sequences([([2, 10, 11, 12], 1)], 4))
    r = httpx.post(fuzz_server.url + "/v1/score", content=body, headers={"content-type": "application/msgpack"})
    assert r.status_code == 200
