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
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import orjson
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


def _pack_array(arr: np.ndarray, dtype: str) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr, dtype=_ALLOWED_DTYPES[dtype])
    return {"dtype": dtype, "shape": list(arr.shape), "data": memoryview(arr.reshape(-1).view(np.uint8))}


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
    return msgpack.packb(
        {
            "protocol_version": batch.protocol_version,
            "top_k": batch.top_k,
            "token_ids": _pack_array(batch.token_ids_T, "<i4"),
            "lengths": _pack_array(batch.lengths_B, "<i4"),
            "score_from": _pack_array(batch.score_from_B, "<i4"),
        },
        use_bin_type=True,
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
    return msgpack.packb(
        {
            "protocol_version": result.protocol_version,
            "model": result.model,
            "top_k": result.top_k,
            "num_scored": _pack_array(result.num_scored_B, "<i4"),
            "token_logprobs": _pack_array(result.token_logprobs_N, "<f4"),
            "topk_ids": _pack_array(result.topk_ids_NK, "<i4"),
            "topk_logprobs": _pack_array(result.topk_logprobs_NK, "<f4"),
        },
        use_bin_type=True,
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
