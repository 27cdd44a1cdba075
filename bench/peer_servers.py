"""Scoring throughput over the peers' protocol: stock `vllm serve` against our teacher, end to end at the client.

One request shape for all three (default 16 sequences x 1024 tokens, K = 32, every position but the first
scored), on the same small Qwen3 (hidden 256, 4 layers, float32), the vLLM engine on both servers, prefix
caching off, fresh random prompts in every repetition, one untimed warm-up, median of --repeats:

    (a) stock `vllm serve`, POST /v1/completions with prompt_logprobs=K (what TRL >= 1.11 and ms-swift send)
    (b) ours, `python -m teacher_server --engine vllm`, the identical request to /v1/completions
    (c) ours, POST /v1/score with application/msgpack (our own protocol: the fast path)

Each is timed from sending the request to having the response decoded at the client: (a) and (b) with the
standard library's `json.loads` (what `requests`' `.json()`, TRL's client and the openai client do), (c) with our
client's msgpack decoder. "server" is the share until the last byte arrived (the server's work plus the
loopback transfer); "decode" the client's. Servers run one at a time, so they never share the CPU.

    python bench/peer_servers.py
    python bench/peer_servers.py --sequences 16 --seq-len 1024 --top-k 32 --repeats 3

Target: (b) >= 2 x (a) in positions per second, end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model dir (default: build a small Qwen3 in a temp dir)")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens-per-batch", type=int, default=16384,
                   help="both servers' token budget per engine step (max_num_batched_tokens), as bench/teacher_throughput.py")
    return p.parse_args(argv)


def timed(post, decode) -> tuple[float, float, int]:
    """(seconds until the body arrived, seconds to decode it, body bytes)."""
    t0 = time.perf_counter()
    resp = post()
    t1 = time.perf_counter()
    resp.raise_for_status()
    decode(resp.content)
    return t1 - t0, time.perf_counter() - t1, len(resp.content)


def measure(name: str, make_call, repeats: int, positions: int) -> dict:
    make_call(-1)()  # warm-up, untimed
    runs = [make_call(r)() for r in range(repeats)]
    server = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    total = statistics.median(r[0] + r[1] for r in runs)
    out = {"name": name, "server_s": server, "decode_s": decode, "total_s": total,
           "positions_per_s": positions / total, "bytes": runs[0][2]}
    print(f"{name:<48} {total:7.2f} s  (server {server:6.2f} s, decode {decode:5.2f} s)  "
          f"{out['positions_per_s']:9.0f} positions/s  {out['bytes'] / 1e6:7.1f} MB", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from protocol import codec
    from protocol.schema import MSGPACK_MEDIA_TYPE, ScoreBatch
    from student_trainer.tiny_models import build_tiny_model
    from teacher_server.process import serve_in_subprocess, stock_vllm_in_subprocess

    b, length, k = args.sequences, args.seq_len, args.top_k
    positions = b * (length - 1)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_model(Path(tmp) / "model", hidden_size=256, num_layers=4, num_heads=4,
                                                   num_kv_heads=2, intermediate_size=1024))
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]

        def prompts(r: int) -> list[list[int]]:  # fresh prompts per repetition: no cache can help
            rng = np.random.default_rng(args.seed * 1000 + r + 1)
            return rng.integers(0, vocab, (b, length)).tolist()

        budget = str(max(args.max_tokens_per_batch, length))
        common = ["--max-model-len", str(length + 1), "--max-num-batched-tokens", budget]
        http = httpx.Client(timeout=600)
        print(f"{b} sequences x {length} tokens, K = {k}; model {model} (vocab {vocab}); load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        results = []

        with stock_vllm_in_subprocess(model, None, "--dtype", "float32", "--max-logprobs", str(k),
                                      "--no-enable-prefix-caching", *common) as stock:
            name = http.get(stock.url + "/v1/models").json()["data"][0]["id"]

            def stock_call(r: int):
                body = {"model": name, "prompt": prompts(r), "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
                return lambda: timed(lambda: http.post(stock.url + "/v1/completions", json=body), json.loads)

            results.append(measure("(a) stock vllm serve  /v1/completions", stock_call, args.repeats, positions))

        with serve_in_subprocess(model, None, "--engine", "vllm", "--dtype", "float32", "--max-top-k", str(k),
                                 "--max-seq-len", str(length), "--max-tokens-per-batch", budget) as ours:

            def ours_call(r: int):
                body = {"prompt": prompts(r), "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
                return lambda: timed(lambda: http.post(ours.url + "/v1/completions", json=body), json.loads)

            def score_call(r: int):
                data = codec.encode_request_msgpack(ScoreBatch.from_sequences([(p, 1) for p in prompts(r)], k))
                headers = {"Content-Type": MSGPACK_MEDIA_TYPE, "Accept": MSGPACK_MEDIA_TYPE}
                return lambda: timed(lambda: http.post(ours.url + "/v1/score", content=data, headers=headers),
                                     codec.decode_response_msgpack)

            results.append(measure("(b) ours (vllm engine) /v1/completions", ours_call, args.repeats, positions))
            results.append(measure("(c) ours (vllm engine) /v1/score msgpack", score_call, args.repeats, positions))

    a, b_, c = (r["positions_per_s"] for r in results)
    ratio = b_ / a
    print(f"ours /v1/completions vs stock: {ratio:.2f}x (target >= {TARGET:.1f}x: {'met' if ratio >= TARGET else 'NOT met'}); "
          f"/v1/score msgpack vs stock: {c / a:.2f}x", flush=True)
    return {"results": results, "completions_vs_stock": ratio, "score_vs_stock": c / a}


if __name__ == "__main__":
    main()
