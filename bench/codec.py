"""Codec benchmark: bytes per scored position and encode+decode throughput (binary vs JSON), then the response
compression codings on real responses, and what each saves on a link.

    python bench/codec.py [--sequences 64] [--length 1024] [--top-k 32] [--repeats 5]
    python bench/codec.py --vocab 151936 --real-sequences 32 --real-new-tokens 128   # the compression part
    python bench/codec.py --vocab                                                    # codec part only

Codec: throughput is the binary payload size (N * (4 + 8K) bytes of array data) divided by the encode+decode
time, for both encodings, so the two GB/s figures compare the same information moved. Its arrays are random.

Compression: random arrays say nothing about compressibility, so each `--vocab` builds a tiny Qwen3 with that
vocabulary (student_trainer.tiny_models), samples completions from it with the hf engine and scores them at K:
a real response, with a real model's sorted top-K logprobs and ids. 151936 is Qwen's vocabulary (ids of 18 bits);
490 is the tests' and the toy's tiny model (ids of 9 bits, which compress far better). Ratio = identity bytes /
coded bytes; MB/s of identity bytes; best of --repeats. Link table: the --sequences x --length response sent
once over each link rate, serially: compress + coded bytes / rate + decompress, against identity bytes / rate.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lz4.frame
import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import codec  # noqa: E402
from protocol.schema import ScoreBatch, ScoreResult  # noqa: E402

LINKS_GBIT = (0.2, 1.0, 10.0)
# (label, compress, decompress): the offered codings at the level the server uses marked "*", neighbours for context.
CODINGS = [
    *[(f"zstd {lv}", lambda b, lv=lv: zstandard.ZstdCompressor(level=lv, write_checksum=True).compress(b), "zstd")
      for lv in (-1, 1, 3)],
    *[(f"lz4 {lv}", lambda b, lv=lv: lz4.frame.compress(b, compression_level=lv, content_checksum=True), "lz4")
      for lv in (0, 3)],
]  # fmt: skip


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


def real_response(vocab: int, n_seq: int, new_tokens: int, k: int, workdir: Path) -> tuple[bytes, ScoreResult]:
    """A tiny Qwen3 with `vocab` tokens: `n_seq` sampled completions of addition prompts, scored at K (hf, CPU)."""
    from student_trainer.tiny_models import build_tiny_model, build_tokenizer
    from teacher_server.engines.hf import HFEngine
    from teacher_server.settings import Settings

    base = len(build_tokenizer(workdir / "base", n_filler=0))
    model_dir = build_tiny_model(workdir / f"v{vocab}", n_filler=max(0, vocab - base), seed=0)

    async def run() -> ScoreResult:
        eng = HFEngine(Settings(model=str(model_dir), engine="hf", device="cpu", dtype="float32", max_top_k=k))
        await eng.start()
        try:
            rng = np.random.default_rng(0)
            prompts = [eng.tokenizer(f"{a} + {b} =", add_special_tokens=False)["input_ids"]
                       for a, b in rng.integers(0, 100, (n_seq, 2))]  # fmt: skip
            completions = await eng.generate(prompts, 1, new_tokens, 1.0, 1.0, 0)
            seqs = [(p + c, len(p)) for p, c in zip(prompts, completions, strict=True)]
            return await eng.score(ScoreBatch.from_sequences(seqs, k))
        finally:
            await eng.close()

    result = asyncio.run(run())
    return codec.encode_response_msgpack(result), result


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def compression_table(body: bytes, positions: int, repeats: int, link_bytes: int) -> None:
    size = len(body)
    rows = []
    for label, comp, coding in CODINGS:
        tc, coded = best_of(lambda comp=comp: comp(body), repeats)
        td, back = best_of(lambda coded=coded, coding=coding: codec.decompress(coded, coding), repeats)
        assert back == body
        rows.append((label + (" *" if label in (f"zstd {codec.ZSTD_LEVEL}", f"lz4 {codec.LZ4_LEVEL}") else ""),
                     size / len(coded), len(coded) / positions, size / tc / 1e6, size / td / 1e6))  # fmt: skip
    # For comparison only, not offered: the body's bytes transposed into 4 planes (blosc's shuffle) before zstd.
    n4 = size // 4 * 4
    planes = np.ascontiguousarray(np.frombuffer(body, np.uint8, count=n4).reshape(-1, 4).T).tobytes() + body[n4:]
    tc, coded = best_of(lambda: zstandard.ZstdCompressor(level=1).compress(planes), repeats)
    rows.append(("(shuffle4+zstd 1)", size / len(coded), len(coded) / positions, size / tc / 1e6, float("nan")))

    links = "".join(f"{f'{g:g} Gbit/s ms':>16}" for g in LINKS_GBIT)
    print(f"  {'coding':<19}{'ratio':>7}{'B/pos':>8}{'comp MB/s':>11}{'decomp MB/s':>13}{links}")
    ident = "".join(f"{link_bytes / (g * 1e9 / 8) * 1e3:>16.1f}" for g in LINKS_GBIT)
    print(f"  {'identity':<19}{1.0:>7.2f}{size / positions:>8.1f}{'':>11}{'':>13}{ident}")
    for label, ratio, per_pos, comp_mbs, dec_mbs in rows:
        if np.isnan(dec_mbs):
            print(f"  {label:<19}{ratio:>7.2f}{per_pos:>8.1f}{comp_mbs:>11.0f}")
            continue
        cost = link_bytes / (comp_mbs * 1e6) + link_bytes / (dec_mbs * 1e6)
        wire = "".join(f"{(cost + link_bytes / ratio / (g * 1e9 / 8)) * 1e3:>16.1f}" for g in LINKS_GBIT)
        print(f"  {label:<19}{ratio:>7.2f}{per_pos:>8.1f}{comp_mbs:>11.0f}{dec_mbs:>13.0f}{wire}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", type=int, nargs="*", default=[151_936, 490],
                   help="vocabularies of the real responses (none: skip the compression part)")
    p.add_argument("--real-sequences", type=int, default=32, help="sampled completions per real response")
    p.add_argument("--real-new-tokens", type=int, default=128, help="tokens per sampled completion")
    a = p.parse_args()
    result = make_result(a.sequences, a.length, a.top_k)
    n = a.sequences * a.length
    payload = n * (4 + 8 * a.top_k)
    print(f"response: {a.sequences} x {a.length} positions, K={a.top_k} (array data {payload / 1e6:.1f} MB); "
          f"medians of {a.repeats}; bound 4 + 8K = {4 + 8 * a.top_k} B/position")
    print(f"{'encoding':<10}{'bytes/pos':>11}{'encode ms':>11}{'decode ms':>11}{'GB/s':>9}")
    binary_size = payload
    for name, enc, dec in [
        ("binary", codec.encode_response_msgpack, codec.decode_response_msgpack),
        ("json", codec.encode_response_json, codec.decode_response_json),
    ]:
        size, te, td = time_roundtrip(enc, dec, result, a.repeats if name == "binary" else max(1, a.repeats // 2))
        binary_size = size if name == "binary" else binary_size
        print(f"{name:<10}{size / n:>11.2f}{te * 1e3:>11.1f}{td * 1e3:>11.1f}{payload / (te + td) / 1e9:>9.2f}")
    if not a.vocab:
        return

    logging.disable(logging.WARNING)
    print(f"\ncompression of real responses (K={a.top_k}; * = the level the server uses; best of {a.repeats}); "
          f"link columns: ms to send the {binary_size / 1e6:.1f} MB response above, compress + wire + decompress")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in a.vocab:
            t0 = time.perf_counter()
            body, res = real_response(vocab, a.real_sequences, a.real_new_tokens, a.top_k, Path(tmp))
            print(f"vocab {vocab}: {res.token_logprobs_N.size} positions, {len(body) / 1e6:.2f} MB "
                  f"({len(body) / res.token_logprobs_N.size:.1f} B/pos identity), made in {time.perf_counter() - t0:.0f} s")
            compression_table(body, res.token_logprobs_N.size, a.repeats, binary_size)
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
