"""The wire contract: both encodings round-trip exactly, the binary size bound holds, bad bytes fail cleanly."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.schema import ProtocolError, ScoreBatch, ScoreResult

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)


def random_result(rng: np.random.Generator, num_scored: list[int], k: int) -> ScoreResult:
    n = sum(num_scored)
    return ScoreResult(
        token_logprobs_N=(-rng.exponential(3, n)).astype(np.float32),
        topk_ids_NK=rng.integers(0, 151_936, (n, k), dtype=np.int32),
        topk_logprobs_NK=np.sort(-rng.exponential(3, (n, k)).astype(np.float32), axis=1)[:, ::-1],
        num_scored_B=np.array(num_scored, np.int32),
        model="m",
    )


def assert_results_identical(a: ScoreResult, b: ScoreResult) -> None:
    for name in ("token_logprobs_N", "topk_ids_NK", "topk_logprobs_NK", "num_scored_B"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs bitwise"


@pytest.mark.parametrize("encode,decode", [
    (codec.encode_response_msgpack, codec.decode_response_msgpack),
    (codec.encode_response_json, codec.decode_response_json),
])
def test_response_roundtrip_is_bit_exact(encode, decode):
    rng = np.random.default_rng(0)
    result = random_result(rng, [5, 0, 17, 1], k=8)
    back = decode(encode(result))
    assert_results_identical(result, back)
    assert back.model == "m" and back.top_k == 8


@pytest.mark.parametrize("encode,decode", [
    (codec.encode_request_msgpack, codec.decode_request_msgpack),
    (codec.encode_request_json, codec.decode_request_json),
])
def test_request_roundtrip(encode, decode):
    batch = ScoreBatch.from_sequences([([1, 2, 3, 4], 1), (np.arange(100), 50), ([7, 8], 1)], top_k=32)
    back = decode(encode(batch))
    assert back.token_ids_T.tolist() == batch.token_ids_T.tolist()
    assert back.lengths_B.tolist() == [4, 100, 2]
    assert back.score_from_B.tolist() == [1, 50, 1]
    assert back.top_k == 32
    assert back.sequence(1).tolist() == list(range(100))


def test_binary_size_per_position_at_k32():
    rng = np.random.default_rng(1)
    n_seq, length, k = 64, 1024, 32
    result = random_result(rng, [length] * n_seq, k)
    size = len(codec.encode_response_msgpack(result))
    # Per scored position exactly 4 + 8K bytes of array data; on top, per sequence its row count (4 bytes)
    # and one small header per response.
    overhead = size - n_seq * length * (4 + 8 * k)
    assert 0 < overhead <= 4 * n_seq + 256, overhead
    assert size / (n_seq * length) < 4 + 8 * k + 0.01


def test_split_gives_per_sequence_views():
    rng = np.random.default_rng(2)
    result = random_result(rng, [3, 0, 2], k=4)
    parts = result.split()
    assert [p.token_logprobs.size for p in parts] == [3, 0, 2]
    np.testing.assert_array_equal(parts[2].topk_ids, result.topk_ids_NK[3:5])


def test_binary_decoder_rejects_wrong_dtype_shape_and_extras():
    good = msgpack.unpackb(codec.encode_request_msgpack(ScoreBatch.from_sequences([([1, 2, 3], 1)], 2)))
    cases = []
    bad = dict(good, token_ids=dict(good["token_ids"], dtype="<f8"))
    cases.append(bad)
    bad = dict(good, token_ids=dict(good["token_ids"], shape=[4]))
    cases.append(bad)
    cases.append(dict(good, extra=1))
    cases.append({k: v for k, v in good.items() if k != "lengths"})
    cases.append(dict(good, top_k="3"))
    cases.append(dict(good, lengths=dict(good["lengths"], data=np.array([5], "<i4").tobytes())))
    cases.append(dict(good, token_ids=dict(good["token_ids"], shape=[2**62])))
    for obj in cases:
        with pytest.raises(ProtocolError):
            codec.decode_request_msgpack(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_binary_decoder_random_bytes_fail_cleanly(data):
    for decode in (codec.decode_request_msgpack, codec.decode_response_msgpack):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10_000))
def test_binary_decoder_truncated_bodies_fail_cleanly(cut):
    body = codec.encode_response_msgpack(random_result(np.random.default_rng(3), [7, 9], 4))
    if cut >= len(body):
        return
    with pytest.raises(ProtocolError):
        codec.decode_response_msgpack(body[:cut])


def test_response_decoder_shape_overflow_is_a_protocol_error():
    body = msgpack.unpackb(codec.encode_response_msgpack(random_result(np.random.default_rng(4), [0], 4)))
    body["topk_ids"] = dict(body["topk_ids"], shape=[2**32, 2**32], data=b"")
    with pytest.raises(ProtocolError):
        codec.decode_response_msgpack(msgpack.packb(body, use_bin_type=True))
