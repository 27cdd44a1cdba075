"""Encodings of the scoring contract: JSON (debugging, curl) and binary (msgpack + raw little-endian arrays).

Binary layout: one msgpack map. Scalars are msgpack ints/strings; each array is a map
`{"dtype": "<i4" | "<f4", "shape": [...], "data": <bin>}` holding the raw little-endian buffer, so encoding
is one copy per array and decoding is `np.frombuffer` (zero copy). Nothing executes code on decode (no
pickle, no ext types); only the dtypes in `_ALLOWED_DTYPES` are accepted.

    request:  {protocol_version, top_k, token_ids: int32[T], lengths: int32[B], score_from: int32[B]}
    response: {protocol_version, model, top_k, num_scored: int32[B],
               token_logprobs: float32[N], topk_ids: int32[N, K], topk_logprobs: float32[N, K]}

Per scored position the response costs 4 + 8 K bytes (+ a constant header).

JSON round-trips exactly too: float32 values are written as float64 (exactly representable), so parsing
and casting back to float32 gives the same bits.

Either body may travel compressed (HTTP Content-Encoding, negotiated per request with Accept-Encoding): zstd,
or lz4 (the LZ4 frame format; not an IANA-registered coding, so only a client asking for "lz4" by name gets it).
`negotiate_coding` is the server's choice, `compress` / `decompress` the codings themselves.
"""

from __future__ import annotations

import math
from typing import Any

import lz4.frame
import msgpack
import numpy as np
import orjson
import zstandard
from pydantic import ValidationError

from protocol.schema import (
    PROTOCOL_VERSION,
    ProtocolError,
    ScoreBatch,
    ScoreRequestJSON,
    ScoreResponseJSON,
    ScoreResult,
    cap_message,
)

_ALLOWED_DTYPES = {"<i4": np.dtype("<i4"), "<f4": np.dtype("<f4")}


# ----------------------------------------------------------------------------------------------------------
# Arrays inside msgpack
# ----------------------------------------------------------------------------------------------------------


def _bin_header(n: int) -> bytes:
    """The bin8 / bin16 / bin32 header msgpack writes before `n` bytes of binary data."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ProtocolError(
        f"an array of {n} bytes exceeds msgpack's 4 GiB limit; split the request", error_type="response_too_large", status=413
    )


def _pack_map(fields: dict[str, Any]) -> bytes:
    """`msgpack.packb(fields, use_bin_type=True)` byte for byte, where a value `(array, dtype)` stands for the
    array map `{"dtype", "shape", "data"}`.

    Each array's buffer is copied once, straight into the body by `bytes.join`. packb copies it into a buffer that
    grows by doubling (each growth fresh memory whose pages fault in) and then once more into the bytes: on a 17 MB
    response (bench/codec.py) 15-27 ms against 4-8 ms (median of the first 5 in a process, the allocator handing out
    fresh memory), 2.5 against 1.4 ms once it reuses freed memory.
    """
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    parts: list[bytes | memoryview] = [packer.pack_map_header(len(fields))]
    for key, value in fields.items():
        parts.append(pack(key))
        if not isinstance(value, tuple):
            parts.append(pack(value))
            continue
        arr, dtype = value
        arr = np.ascontiguousarray(arr, dtype=_ALLOWED_DTYPES[dtype])
        data = memoryview(arr.reshape(-1).view(np.uint8))
        parts += [packer.pack_map_header(3), pack("dtype"), pack(dtype), pack("shape"), pack(list(arr.shape)),
                  pack("data"), _bin_header(data.nbytes), data]  # fmt: skip
    return b"".join(parts)


def _unpack_array(obj: Any, name: str, dtype: str, ndim: int) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"field '{name}' must be an array map with keys dtype, shape, data", error_type="malformed_body")
    if obj["dtype"] != dtype:
        raise ProtocolError(
            f"field '{name}' must have dtype {dtype}, got {str(obj['dtype'])[:16]!r}", error_type="malformed_body"
        )
    shape, data = obj["shape"], obj["data"]
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"field '{name}' must have a {ndim}-d shape of non-negative ints", error_type="malformed_body")
    if not isinstance(data, bytes):
        raise ProtocolError(f"field '{name}'.data must be binary", error_type="malformed_body")
    np_dtype = _ALLOWED_DTYPES[dtype]
    expected = math.prod(shape) * np_dtype.itemsize  # Python ints: no int64 wrap-around
    if expected != len(data):
        raise ProtocolError(
            f"field '{name}' has {len(data)} bytes but shape {shape} needs {expected}", error_type="malformed_body"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def _unpack_map(body: bytes, required: dict[str, type]) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"body is not valid msgpack: {type(exc).__name__}", error_type="malformed_body") from None
    if not isinstance(obj, dict):
        raise ProtocolError("msgpack body must be a map", error_type="malformed_body")
    missing = [k for k in required if k not in obj]
    extra = [str(k)[:40] for k in obj if k not in required]
    if missing or extra:
        raise ProtocolError(f"msgpack body: missing fields {missing}, unknown fields {extra}", error_type="malformed_body")
    for key, typ in required.items():
        if typ is not dict and (not isinstance(obj[key], typ) or isinstance(obj[key], bool)):
            raise ProtocolError(f"field '{key}' must be of type {typ.__name__}", error_type="malformed_body")
    return obj


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------


def encode_request_msgpack(batch: ScoreBatch) -> bytes:
    return _pack_map(
        {
            "protocol_version": batch.protocol_version,
            "top_k": batch.top_k,
            "token_ids": (batch.token_ids_T, "<i4"),
            "lengths": (batch.lengths_B, "<i4"),
            "score_from": (batch.score_from_B, "<i4"),
        }
    )


def decode_request_msgpack(body: bytes) -> ScoreBatch:
    obj = _unpack_map(
        body,
        {"protocol_version": int, "top_k": int, "token_ids": dict, "lengths": dict, "score_from": dict},
    )
    batch = ScoreBatch(
        token_ids_T=_unpack_array(obj["token_ids"], "token_ids", "<i4", 1),
        lengths_B=_unpack_array(obj["lengths"], "lengths", "<i4", 1),
        score_from_B=_unpack_array(obj["score_from"], "score_from", "<i4", 1),
        top_k=obj["top_k"],
        protocol_version=obj["protocol_version"],
    )
    batch.check_shapes()
    return batch


def encode_request_json(batch: ScoreBatch) -> bytes:
    off = batch.offsets_B1
    return orjson.dumps(
        {
            "protocol_version": batch.protocol_version,
            "top_k": batch.top_k,
            "sequences": [
                {"token_ids": batch.token_ids_T[a:b], "score_from": int(s)}
                for a, b, s in zip(off[:-1], off[1:], batch.score_from_B, strict=True)
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def decode_request_json(body: bytes) -> ScoreBatch:
    try:
        req = ScoreRequestJSON.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(
            cap_message(f"invalid JSON request at '{where}': {first.get('msg', 'invalid')} ({exc.error_count()} errors)"),
            error_type="malformed_body",
        ) from None
    lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    for i, seq in enumerate(req.sequences):
        if seq.token_ids and (min(seq.token_ids) < lo or max(seq.token_ids) > hi):
            raise ProtocolError(f"sequence {i}: token ids must fit in int32", error_type="invalid_token_id")
        if not lo <= seq.score_from <= hi:
            raise ProtocolError(f"sequence {i}: score_from={seq.score_from} is out of range", error_type="invalid_score_from")
    if not lo <= req.top_k <= hi or not lo <= req.protocol_version <= hi:
        raise ProtocolError("top_k and protocol_version must fit in int32", error_type="invalid_top_k")
    batch = ScoreBatch.from_sequences([(s.token_ids, s.score_from) for s in req.sequences], req.top_k)
    return ScoreBatch(batch.token_ids_T, batch.lengths_B, batch.score_from_B, req.top_k, req.protocol_version)


# ----------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------


def encode_response_msgpack(result: ScoreResult) -> bytes:
    return _pack_map(
        {
            "protocol_version": result.protocol_version,
            "model": result.model,
            "top_k": result.top_k,
            "num_scored": (result.num_scored_B, "<i4"),
            "token_logprobs": (result.token_logprobs_N, "<f4"),
            "topk_ids": (result.topk_ids_NK, "<i4"),
            "topk_logprobs": (result.topk_logprobs_NK, "<f4"),
        }
    )


def decode_response_msgpack(body: bytes) -> ScoreResult:
    obj = _unpack_map(
        body,
        {
            "protocol_version": int,
            "model": str,
            "top_k": int,
            "num_scored": dict,
            "token_logprobs": dict,
            "topk_ids": dict,
            "topk_logprobs": dict,
        },
    )
    result = ScoreResult(
        token_logprobs_N=_unpack_array(obj["token_logprobs"], "token_logprobs", "<f4", 1),
        topk_ids_NK=_unpack_array(obj["topk_ids"], "topk_ids", "<i4", 2),
        topk_logprobs_NK=_unpack_array(obj["topk_logprobs"], "topk_logprobs", "<f4", 2),
        num_scored_B=_unpack_array(obj["num_scored"], "num_scored", "<i4", 1),
        model=obj["model"],
        protocol_version=obj["protocol_version"],
    )
    result.check_shapes()
    if result.top_k != obj["top_k"]:
        raise ProtocolError("top_k does not match the width of topk_ids", error_type="invalid_response")
    return result


def encode_response_json(result: ScoreResult) -> bytes:
    off = result.offsets_B1
    # float64 so that the decimal text round-trips to the same float32 bits.
    lp64, tk64 = result.token_logprobs_N.astype(np.float64), result.topk_logprobs_NK.astype(np.float64)
    return orjson.dumps(
        {
            "protocol_version": result.protocol_version,
            "model": result.model,
            "top_k": result.top_k,
            "results": [
                {"token_logprobs": lp64[a:b], "topk_ids": result.topk_ids_NK[a:b], "topk_logprobs": tk64[a:b]}
                for a, b in zip(off[:-1], off[1:], strict=True)
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def decode_response_json(body: bytes) -> ScoreResult:
    # orjson + numpy conversion per sequence (C loops); pydantic over nested float lists is ~10x slower.
    try:
        obj = orjson.loads(body)
        ScoreResponseJSON.model_validate({**obj, "results": []})  # header fields, strictly
        rows = obj["results"]
        if not isinstance(rows, list):
            raise TypeError("results must be a list")
        k = int(obj["top_k"])
        lp = [np.asarray(r["token_logprobs"], dtype=np.float32).reshape(-1) for r in rows]
        ids = [np.asarray(r["topk_ids"], dtype=np.int32).reshape(-1, k) for r in rows]
        lps = [np.asarray(r["topk_logprobs"], dtype=np.float32).reshape(-1, k) for r in rows]
    except (orjson.JSONDecodeError, ValidationError, TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise ProtocolError(cap_message(f"invalid JSON response: {exc}"), error_type="invalid_response") from None
    result = ScoreResult(
        token_logprobs_N=np.concatenate(lp) if lp else np.zeros(0, np.float32),
        topk_ids_NK=np.concatenate(ids) if ids else np.zeros((0, k), np.int32),
        topk_logprobs_NK=np.concatenate(lps) if lps else np.zeros((0, k), np.float32),
        num_scored_B=np.array([a.size for a in lp], dtype=np.int32),
        model=obj["model"],
        protocol_version=obj["protocol_version"],
    )
    result.check_shapes()
    return result


def check_protocol_version(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol_version={version} is not supported; this server speaks protocol_version={PROTOCOL_VERSION}. "
            "Upgrade the client or the server so both use the same aopd release.",
            error_type="unsupported_protocol_version",
        )


# ----------------------------------------------------------------------------------------------------------
# Content codings (HTTP Content-Encoding of a whole body)
# ----------------------------------------------------------------------------------------------------------

IDENTITY = "identity"
# The server's preference where a client rates several codings equally. On real K=32 responses (bench/codec.py:
# tiny Qwen3s, sampled completions) zstd level 1 compresses 1.31x with a 151936-token vocabulary and 1.66x with
# the tests' 490, at ~450-650 MB/s, decompressing at ~1.2-1.6 GB/s; lz4 (level 0, as fast) only 1.05x and 1.36x.
# Sent serially (compress, wire, decompress), zstd saves 18-32% of a response's time at 200 Mbit/s and breaks even
# near 1 Gbit/s; lz4 never beats it there. Higher levels gain a few % of bytes at 1.5-4x the compression time.
CONTENT_CODINGS = ("zstd", "lz4")
ZSTD_LEVEL = 1
LZ4_LEVEL = 0
# What the client's `compression` setting asks for. "auto" takes zstd and, from a server without it, lz4.
ACCEPT_ENCODING = {"auto": "zstd, lz4;q=0.5", "zstd": "zstd", "lz4": "lz4", "none": IDENTITY}


def compress(body: bytes, coding: str) -> bytes:
    """`body` in `coding` (one of `CONTENT_CODINGS`, or identity), with the codec's checksum of the content, so a
    body damaged on the way fails to decode instead of giving other numbers."""
    if coding == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(body)
    if coding == "lz4":
        return lz4.frame.compress(body, compression_level=LZ4_LEVEL, content_checksum=True)
    if coding == IDENTITY:
        return body
    raise ValueError(f"unknown content coding {coding!r}")


def decompress(body: bytes, coding: str, limit: int | None = None) -> bytes:
    """Undo `coding` (a Content-Encoding header value): one zstd or lz4 frame, checksum verified where it has one.

    Corrupt or truncated data is a 400 ProtocolError and an unknown coding a 415. A frame declaring more than `limit`
    decoded bytes is a 413 before anything is decoded (a small body may claim gigabytes), and decoding never
    produces more than `limit` + 1 bytes.
    """
    coding = coding.strip().lower()
    if coding in ("", IDENTITY):
        return body
    if coding not in CONTENT_CODINGS:
        raise ProtocolError(
            f"Content-Encoding {coding[:40]!r} is not supported; use one of {', '.join(CONTENT_CODINGS)} or identity",
            error_type="unsupported_content_encoding",
            status=415,
        )
    too_large = ProtocolError(f"the {coding} body decodes to more than {limit} bytes", error_type="body_too_large", status=413)
    try:
        if coding == "zstd":
            declared = zstandard.frame_content_size(body)  # -1: not in the frame header
            if limit is not None and declared > limit:
                raise too_large
            dctx = zstandard.ZstdDecompressor()
            if declared >= 0 or limit is not None:  # max_output_size: the output buffer where the size is unknown
                out = dctx.decompress(body, max_output_size=0 if declared >= 0 else limit, allow_extra_data=False)
            else:
                obj = dctx.decompressobj()
                out = obj.decompress(body)
                if not obj.eof:
                    raise ValueError("the frame is truncated")
                if obj.unused_data:
                    raise ValueError(f"{len(obj.unused_data)} bytes follow the end of the frame")
        else:
            declared = lz4.frame.get_frame_info(body)["content_size"]  # 0: not in the frame header
            if limit is not None and declared > limit:
                raise too_large
            dec = lz4.frame.LZ4FrameDecompressor()
            out = dec.decompress(body, max_length=-1 if limit is None else limit + 1)
            if limit is not None and len(out) > limit:
                raise too_large
            if not dec.eof:
                raise ValueError("the frame is truncated")
            if dec.unused_data:
                raise ValueError(f"{len(dec.unused_data)} bytes follow the end of the frame")
    except ProtocolError:
        raise
    except (zstandard.ZstdError, RuntimeError, ValueError) as exc:  # lz4 raises RuntimeError on corrupt frames
        raise ProtocolError(
            cap_message(f"body is not valid {coding} data: {exc}"), error_type="invalid_content_encoding"
        ) from None
    return out


def negotiate_coding(accept_encoding: str | None) -> str:
    """The server's content coding for a response, from the request's Accept-Encoding (RFC 9110 12.5.3): the
    supported coding with the highest q > 0 (ties: `CONTENT_CODINGS` order), unless identity is rated higher;
    identity when no supported coding is acceptable (or there is no header). A malformed q is a 400; excluding
    identity ("identity;q=0", or "*;q=0" without identity) and everything offered, a 406."""
    if not accept_encoding or not accept_encoding.strip():
        return IDENTITY
    q: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, *params = (p.strip() for p in item.split(";"))
        if not name:
            continue
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() != "q":
                continue
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if not 0.0 <= weight <= 1.0:
                raise ProtocolError(
                    cap_message(f"Accept-Encoding {accept_encoding!r}: q must be a number in [0, 1]"),
                    error_type="invalid_accept_encoding",
                )
        q[name.lower()] = weight
    star = q.get("*")
    rated = [(q.get(c, star or 0.0), -i, c) for i, c in enumerate(CONTENT_CODINGS)]
    best_q, _, best = max(rated)
    identity_q = q.get(IDENTITY, star)  # None: not rated, so acceptable but the last choice
    if best_q > 0 and (identity_q is None or best_q >= identity_q):
        return best
    if identity_q is None or identity_q > 0:
        return IDENTITY
    raise ProtocolError(
        cap_message(f"Accept-Encoding {accept_encoding!r} allows none of {', '.join(CONTENT_CODINGS)} or identity"),
        error_type="unacceptable_encoding",
        status=406,
    )
