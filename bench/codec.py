"""Codec benchmark: bytes per scored position and encode+decode throughput, binary (msgpack) vs JSON.

    python bench/codec.py [--sequences 64] [--length 1024] [--top-k 32] [--repeats 5]

Throughput is the binary payload size (N * (4 + 8K) bytes of array data) divided by the encode+decode
time, for both encodings, so the two GB/s figures compare the same information moved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import codec  # noqa: E402
from protocol.schema import ScoreResult  # noqa: E402


def make_result(n_seq: int, length: int, k: int, seed: int = 0) -> ScoreResult:
    rng = np.random.default_rng(seed)
    n = n_seq * length
    return ScoreResult(
        token_logprobs_N=(-rng.exponential(3, n)).astype(np.float32),
        topk_ids_NK=rng.integers(0, 151_936, (n, k), dtype=np.int32),
        topk_logprobs_NK=np.sort(-rng.exponential(3, (n, k)).astype(np.float32), axis=1)[:, ::-1].copy(),
        num_scored_B=np.full(n_seq, length, np.int32),
        model="bench",
    )


def time_roundtrip(encode, decode, result: ScoreResult, repeats: int) -> tuple[int, float, float]:
    enc_t, dec_t, size = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        body = encode(result)
        t1 = time.perf_counter()
        back = decode(body)
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
        size = len(body)
    assert back.topk_ids_NK.tobytes() == result.topk_ids_NK.tobytes()
    assert back.topk_logprobs_NK.tobytes() == result.topk_logprobs_NK.tobytes()
    return size, statistics.median(enc_t), statistics.median(dec_t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    result = make_result(a.sequences, a.length, a.top_k)
    n = a.sequences * a.length
    payload = n * (4 + 8 * a.top_k)
    print(f"response: {a.sequences} x {a.length} positions, K={a.top_k} (array data {payload / 1e6:.1f} MB); "
          f"medians of {a.repeats}; bound 4 + 8K = {4 + 8 * a.top_k} B/position")
    print(f"{'encoding':<10}{'bytes/pos':>11}{'encode ms':>11}{'decode ms':>11}{'GB/s':>9}")
    for name, enc, dec in [
        ("binary", codec.encode_response_msgpack, codec.decode_response_msgpack),
        ("json", codec.encode_response_json, codec.decode_response_json),
    ]:
        size, te, td = time_roundtrip(enc, dec, result, a.repeats if name == "binary" else max(1, a.repeats // 2))
        print(f"{name:<10}{size / n:>11.2f}{te * 1e3:>11.1f}{td * 1e3:>11.1f}{payload / (te + td) / 1e9:>9.2f}")


if __name__ == "__main__":
    main()
