"""Cutting the bytes of a scoring response: the binary codec's fast path is msgpack byte for byte; zstd and lz4
content codings round-trip and refuse bad data; Accept-Encoding negotiation (RFC 9110 q-values); the server on a
live uvicorn compresses /v1/score when asked and only then, and decodes compressed requests with clear 4xx
errors; the client asks per its `compression` setting and decodes each coding exactly once (httpx undoes zstd
itself, lz4 the client)."""

from __future__ import annotations

import asyncio

import httpx
import msgpack
import numpy as np
import pytest
import zstandard
from pydantic import ValidationError

from protocol import codec
from protocol.schema import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE, ProtocolError, ScoreBatch, ScoreResult
from student_trainer.config import TeacherSection
from student_trainer.teacher_client import AsyncTeacherClient, TeacherClient, TeacherError

SEQS = [([2, 10, 11, 12, 13, 14, 15, 16], 2), ([2, 40, 41, 42], 1), (list(range(4, 200)), 20)]
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from teacher_server.app import create_app
    from tests.helpers import LiveServer, teacher_settings

    # batch_wait_ms=0 and one request at a time: each batch is scored alone, so a repeat gives the same bytes
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf", batch_wait_ms=0, max_body_bytes=MAX_BODY))) as s:
        yield s


def _result(rng: np.random.Generator, lengths: list[int], k: int) -> ScoreResult:
    n = sum(lengths)
    return ScoreResult(
        token_logprobs_N=-rng.exponential(2, n).astype(np.float32),
        topk_ids_NK=rng.integers(0, 151_936, (n, k), dtype=np.int32),
        topk_logprobs_NK=-np.sort(rng.exponential(2, (n, k)).astype(np.float32), axis=1),
        num_scored_B=np.array(lengths, np.int32),
        model="m" * 40,
    )


def _post_raw(url: str, body: bytes, **headers) -> tuple[httpx.Response, bytes]:
    """POST /v1/score; the response and its body exactly as it came off the wire (no content decoding)."""
    headers = {"content-type": MSGPACK_MEDIA_TYPE, **headers}
    with httpx.Client(timeout=120) as c:
        if "accept-encoding" not in {k.lower() for k in headers}:
            del c.headers["accept-encoding"]  # httpx's default asks for gzip, deflate, zstd: send none at all
        with c.stream("POST", url + "/v1/score", content=body, headers=headers) as r:
            return r, b"".join(r.iter_raw())


# ------------------------------------------------------------------------------------------------------
# the codec: bytes, codings, negotiation
# ------------------------------------------------------------------------------------------------------


def _packb_reference(fields: dict) -> bytes:
    def arr(a, dtype):
        a = np.ascontiguousarray(a, dtype=dtype)
        return {"dtype": dtype, "shape": list(a.shape), "data": a.tobytes()}

    return msgpack.packb({k: arr(*v) if isinstance(v, tuple) else v for k, v in fields.items()}, use_bin_type=True)


# positions x K around msgpack's bin8 / bin16 / bin32 limits (255 and 65535 bytes), and empty arrays
@pytest.mark.parametrize("lengths,k", [([0], 1), ([1], 1), ([63], 1), ([64], 1), ([16383], 1), ([16384], 1),
                                       ([0, 5, 0], 3), ([300, 700], 32)])  # fmt: skip
def test_binary_encoding_is_msgpack_byte_for_byte(lengths, k):
    r = _result(np.random.default_rng(sum(lengths) + k), lengths, k)
    expected = _packb_reference({
        "protocol_version": r.protocol_version, "model": r.model, "top_k": r.top_k,
        "num_scored": (r.num_scored_B, "<i4"), "token_logprobs": (r.token_logprobs_N, "<f4"),
        "topk_ids": (r.topk_ids_NK, "<i4"), "topk_logprobs": (r.topk_logprobs_NK, "<f4"),
    })  # fmt: skip
    assert codec.encode_response_msgpack(r) == expected
    batch = ScoreBatch.from_sequences([(list(range(n + 1)), 1) for n in lengths], k)
    assert codec.encode_request_msgpack(batch) == _packb_reference({
        "protocol_version": batch.protocol_version, "top_k": batch.top_k, "token_ids": (batch.token_ids_T, "<i4"),
        "lengths": (batch.lengths_B, "<i4"), "score_from": (batch.score_from_B, "<i4"),
    })  # fmt: skip


def test_encoding_takes_strided_and_big_endian_arrays():
    r = _result(np.random.default_rng(0), [50], 8)
    wide_ids = np.zeros((50, 16), np.int32)
    wide_ids[:, ::2] = r.topk_ids_NK
    odd = ScoreResult(r.token_logprobs_N.astype(">f4"), wide_ids[:, ::2], r.topk_logprobs_NK.astype(">f4"),
                      r.num_scored_B, r.model)  # fmt: skip
    assert codec.encode_response_msgpack(odd) == codec.encode_response_msgpack(r)


@pytest.mark.parametrize("coding", codec.CONTENT_CODINGS)
def test_codings_round_trip(coding):
    body = codec.encode_response_msgpack(_result(np.random.default_rng(1), [400, 600], 32))
    coded = codec.compress(body, coding)  # (random arrays barely compress; real responses do: see the server tests)
    assert codec.decompress(coded, coding, limit=len(body)) == body
    assert codec.decompress(coded, coding.upper()) == body  # header values are case-insensitive
    assert codec.decompress(body, "identity") == body and codec.decompress(body, "") == body


@pytest.mark.parametrize("coding", codec.CONTENT_CODINGS)
def test_bad_coded_bodies_are_400_and_oversized_ones_413(coding):
    body = bytes(range(256)) * 400
    coded = codec.compress(body, coding)
    mid = len(coded) // 2
    bad = {
        "truncated": coded[:-7],
        "a flipped bit": coded[:mid] + bytes([coded[mid] ^ 0x10]) + coded[mid + 1 :],
        "trailing bytes": coded + b"\0",
        "not a frame": b"definitely not compressed",
        "empty": b"",
    }
    for what, data in bad.items():
        with pytest.raises(ProtocolError) as exc:
            codec.decompress(data, coding, limit=len(body))
        assert (exc.value.status, exc.value.error_type) == (400, "invalid_content_encoding"), what
        assert coding in str(exc.value)
    with pytest.raises(ProtocolError) as exc:
        codec.decompress(coded, coding, limit=len(body) - 1)
    assert (exc.value.status, exc.value.error_type) == (413, "body_too_large")


def test_a_small_bomb_is_refused_from_its_header():
    bomb = zstandard.ZstdCompressor().compress(bytes(200 << 20))  # 200 MB of zeros in ~6 kB
    assert len(bomb) < 64 << 10
    with pytest.raises(ProtocolError) as exc:
        codec.decompress(bomb, "zstd", limit=MAX_BODY)
    assert exc.value.status == 413


def test_unknown_coding_is_415():
    with pytest.raises(ProtocolError) as exc:
        codec.decompress(b"x", "gzip")
    assert (exc.value.status, exc.value.error_type) == (415, "unsupported_content_encoding")
    assert "zstd, lz4" in str(exc.value)


@pytest.mark.parametrize("header,coding", [
    (None, "identity"), ("", "identity"), ("identity", "identity"), ("gzip, deflate", "identity"),
    ("gzip, deflate, br, zstd", "zstd"),  # httpx / curl --compressed
    ("zstd", "zstd"), ("lz4", "lz4"), ("ZSTD", "zstd"), (codec.ACCEPT_ENCODING["auto"], "zstd"),
    ("lz4, zstd", "zstd"),  # equal q: the server's order
    ("zstd;q=0.5, lz4", "lz4"), ("zstd;q=0, lz4;q=0", "identity"), ("zstd;q=0.4, identity;q=0.5", "identity"),
    ("*", "zstd"), ("*;q=0.2, zstd;q=0", "lz4"), ("identity;q=0, lz4", "lz4"), ("gzip;q=1.0, , zstd ; q=0.3", "zstd"),
])  # fmt: skip
def test_negotiation_follows_q_values(header, coding):
    assert codec.negotiate_coding(header) == coding


@pytest.mark.parametrize("header,status,error_type", [
    ("identity;q=0", 406, "unacceptable_encoding"), ("*;q=0", 406, "unacceptable_encoding"),
    ("gzip, identity;q=0", 406, "unacceptable_encoding"),
    ("zstd;q=2", 400, "invalid_accept_encoding"), ("zstd;q=high", 400, "invalid_accept_encoding"),
])  # fmt: skip
def test_negotiation_refusals(header, status, error_type):
    with pytest.raises(ProtocolError) as exc:
        codec.negotiate_coding(header)
    assert (exc.value.status, exc.value.error_type) == (status, error_type)


# ------------------------------------------------------------------------------------------------------
# the server (live uvicorn)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.numeric
@pytest.mark.parametrize("coding", codec.CONTENT_CODINGS)
@pytest.mark.parametrize("media", [MSGPACK_MEDIA_TYPE, JSON_MEDIA_TYPE])
def test_server_compresses_when_asked(server, coding, media):
    batch = ScoreBatch.from_sequences(SEQS, 16)
    body = codec.encode_request_msgpack(batch)
    plain, plain_body = _post_raw(server.url, body, accept=media)
    coded, coded_body = _post_raw(server.url, body, accept=media, **{"accept-encoding": coding})
    assert plain.status_code == coded.status_code == 200
    assert "content-encoding" not in plain.headers and plain.headers["vary"] == "Accept-Encoding"
    assert coded.headers["content-encoding"] == coding and coded.headers["vary"] == "Accept-Encoding"
    assert int(coded.headers["content-length"]) == len(coded_body) < len(plain_body)
    assert codec.decompress(coded_body, coding) == plain_body  # the same scores, bit for bit


@pytest.mark.parametrize("header", [None, "identity", "gzip, deflate", "br;q=1, zstd;q=0"])
def test_server_sends_identity_unless_asked(server, header):
    body = codec.encode_request_msgpack(ScoreBatch.from_sequences(SEQS[:1], 4))
    r, raw = _post_raw(server.url, body, **({} if header is None else {"accept-encoding": header}))
    assert r.status_code == 200 and "content-encoding" not in r.headers
    assert codec.decode_response_msgpack(raw).num_scored_B.tolist() == [6]


@pytest.mark.numeric
@pytest.mark.parametrize("coding", codec.CONTENT_CODINGS)
def test_server_decodes_compressed_requests(server, coding):
    body = codec.encode_request_msgpack(ScoreBatch.from_sequences(SEQS, 8))
    _, plain = _post_raw(server.url, body)
    r, raw = _post_raw(server.url, codec.compress(body, coding), **{"content-encoding": coding})
    assert r.status_code == 200 and raw == plain


@pytest.mark.parametrize("headers,body,status,error_type", [
    ({"content-encoding": "gzip"}, b"\x1f\x8b not really", 415, "unsupported_content_encoding"),
    ({"content-encoding": "zstd, lz4"}, b"", 415, "unsupported_content_encoding"),
    ({"content-encoding": "zstd"}, b"\x28\xb5\x2f\xfd garbage", 400, "invalid_content_encoding"),
    ({"content-encoding": "lz4"}, b"plain msgpack is not lz4", 400, "invalid_content_encoding"),
    ({"content-encoding": "zstd"}, zstandard.ZstdCompressor().compress(bytes(2 * MAX_BODY)), 413, "body_too_large"),
    ({"accept-encoding": "identity;q=0"}, None, 406, "unacceptable_encoding"),
    ({"accept-encoding": "zstd;q=1.5"}, None, 400, "invalid_accept_encoding"),
])  # fmt: skip
def test_server_bad_codings_get_the_envelope(server, headers, body, status, error_type):
    body = codec.encode_request_msgpack(ScoreBatch.from_sequences(SEQS[:1], 4)) if body is None else body
    r, raw = _post_raw(server.url, body, **{"accept-encoding": "zstd", **headers})
    assert r.status_code == status
    assert "content-encoding" not in r.headers  # errors travel as plain JSON whatever was asked for
    env = httpx.Response(status, content=raw).json()["error"]
    assert env["type"] == error_type and len(env["message"]) <= 500
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------------------
# the client
# ------------------------------------------------------------------------------------------------------


class _Recording(httpx.HTTPTransport):
    """A real transport that notes each /v1/score exchange's Accept-Encoding and Content-Encoding."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str | None, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        if request.url.path == "/v1/score":
            self.seen.append((request.headers.get("accept-encoding"), resp.headers.get("content-encoding")))
        return resp


@pytest.mark.numeric
def test_client_decodes_each_coding_once(server):
    results = {}
    for compression, wire in [("auto", None), ("zstd", "zstd"), ("lz4", "lz4"), ("none", None)]:  # auto: loopback
        transport = _Recording()
        with TeacherClient(server.url, compression=compression, transport=transport) as client:
            results[compression] = client.score_batch(ScoreBatch.from_sequences(SEQS, 16))
        assert transport.seen == [(codec.ACCEPT_ENCODING["none" if compression == "auto" else compression], wire)]
    ref = results["none"]
    for compression, got in results.items():
        for name in ("token_logprobs_N", "topk_ids_NK", "topk_logprobs_NK", "num_scored_B"):
            assert np.array_equal(getattr(got, name), getattr(ref, name)), (compression, name)


@pytest.mark.numeric
async def test_async_client_with_each_coding(server):
    with TeacherClient(server.url, compression="none") as client:
        ref = client.score_batch(ScoreBatch.from_sequences(SEQS, 8))
    for compression in ("zstd", "lz4"):
        async with AsyncTeacherClient(server.url, compression=compression) as client:
            rows = await asyncio.gather(*[client.score_batch(ScoreBatch.from_sequences(SEQS, 8)) for _ in range(2)])
        for got in rows:
            assert got.topk_ids_NK.shape == ref.topk_ids_NK.shape and got.num_scored_B.tolist() == ref.num_scored_B.tolist()


def _serving(coded: bytes, coding: str) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(
        200, content=coded, headers={"content-type": MSGPACK_MEDIA_TYPE, "content-encoding": coding}))  # fmt: skip


@pytest.mark.parametrize("coding", ["zstd", "lz4", "x-unknown"])
def test_client_refuses_an_undecodable_body_with_a_teacher_error(coding):
    client = TeacherClient("http://teacher", transport=_serving(b"\x28\xb5\x2f\xfd\x04 not a frame", coding))
    with pytest.raises(TeacherError) as exc:
        client.score_batch(ScoreBatch.from_sequences(SEQS[:1], 4))
    assert exc.value.error_type == "invalid_response" and "undecodable" in str(exc.value)


def test_client_reads_a_mocked_coded_response():
    batch = ScoreBatch.from_sequences(SEQS, 4)
    result = _result(np.random.default_rng(2), batch.num_scored_B.tolist(), 4)
    body = codec.encode_response_msgpack(result)
    for coding in codec.CONTENT_CODINGS:
        client = TeacherClient("http://teacher", transport=_serving(codec.compress(body, coding), coding))
        assert codec.encode_response_msgpack(client.score_batch(batch)) == body


def test_compression_setting_is_checked():
    with pytest.raises(ValueError, match="auto, zstd, lz4, none"):
        TeacherClient("http://teacher", compression="gzip")
    # auto asks a remote teacher for zstd first, a loopback one for nothing
    with TeacherClient("http://10.0.0.7:8000") as remote:
        assert codec.negotiate_coding(remote.accept_encoding) == "zstd"
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        with TeacherClient(url) as local:
            assert local.accept_encoding == "identity"
    assert TeacherSection().compression == "auto" and TeacherSection(compression="none").compression == "none"
    with pytest.raises(ValidationError):
        TeacherSection(compression="brotli")
