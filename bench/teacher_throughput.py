"""Teacher scoring throughput: the vLLM engine against vLLM's plain prefill, vLLM's stock path and transformers.

One batch shape for every path (default 64 sequences x 1024 tokens, K = 32, every position scored):

    (a)  vLLM plain prefill, no logprobs (max_tokens=1), on our engine's AsyncLLM      <- the reference
    (a2) our vllm engine in-process: VLLMEngine.score -> numpy (no HTTP)
    (b)  vLLM's stock prompt-logprobs path (prompt_logprobs=K, defaults: detokenize, Logprob dicts),
         timed until the RequestOutputs exist (turning the dicts into arrays would cost more)
    (c)  our server end to end: `python -m teacher_server --engine vllm` on 127.0.0.1, httpx, application/msgpack
         (client encode + HTTP + server + client decode)
    (d)  the same with application/json
    (e)  the same server with --engine hf (transformers), msgpack

Fair comparison: prefix caching off, fresh random prompts in every repetition, one untimed warm-up per path,
median of --repeats, paths that share an engine timed alternately. The load average is printed: other
processes on the machine make wall times noisy. Throughput = submitted tokens / wall time. Target: (c)/(a) >= 0.90.

    python bench/teacher_throughput.py                       # builds a small Qwen3 (hidden 256, 4 layers)
    python bench/teacher_throughput.py --model DIR --sequences 16 --seq-len 2048

On a small model the forward is cheap, so fixed per-position costs weigh far more than on a real teacher:
read every ratio with the model size printed next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 0.90


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model dir (default: build a small Qwen3 in a temp dir)")
    p.add_argument("--sequences", type=int, default=64, help="sequences per batch B")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--top-k", type=int, default=32, help="K")
    p.add_argument("--score-from", type=int, default=1, help="first scored position of every sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported)")
    p.add_argument("--max-tokens-per-batch", type=int, default=16384, help="vLLM max_num_batched_tokens / hf budget")
    p.add_argument("--skip", default="", help="comma-separated paths to skip, e.g. 'b,d,e'")
    p.add_argument("--hidden-size", type=int, default=256, help="built model: hidden size")
    p.add_argument("--layers", type=int, default=4, help="built model: layers")
    p.add_argument("--intermediate-size", type=int, default=1024, help="built model: MLP width")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------


def make_batch(args, vocab: int, rep: int):
    """Fresh random sequences for every (path, repetition): nothing can be served from a cache."""
    from protocol.schema import ScoreBatch

    rng = np.random.default_rng(1000 + rep)
    ids = rng.integers(4, vocab, size=(args.sequences, args.seq_len))
    return ScoreBatch.from_sequences([(row, args.score_from) for row in ids], top_k=args.top_k)


def describe_model(model_dir: str) -> tuple[str, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    text = (
        f"{cfg.model_type}, {n_params / 1e6:.2f}M params (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"MLP {cfg.intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
        f"vocab {cfg.vocab_size})"
    )
    return text, int(cfg.vocab_size)


def interleaved(jobs: dict[str, Callable[[int], None]], repeats: int, counter: list[int]) -> dict[str, list[float]]:
    """One warm-up per job, then `repeats` rounds that run every job once, alternating, so that a slow spell of
    the machine hits all jobs alike. Every run gets a new repetition index, hence new prompts."""
    times: dict[str, list[float]] = {key: [] for key in jobs}
    for rnd in range(repeats + 1):
        for key, run_once in jobs.items():
            t0 = time.perf_counter()
            run_once(counter[0])
            if rnd > 0:
                times[key].append(time.perf_counter() - t0)
            counter[0] += 1
    return times


async def ainterleaved(
    jobs: dict[str, Callable[[int], Awaitable]], repeats: int, counter: list[int]
) -> dict[str, list[float]]:
    """`interleaved` for coroutines, run on the engine's own event loop."""
    times: dict[str, list[float]] = {key: [] for key in jobs}
    for rnd in range(repeats + 1):
        for key, run_once in jobs.items():
            t0 = time.perf_counter()
            await run_once(counter[0])
            if rnd > 0:
                times[key].append(time.perf_counter() - t0)
            counter[0] += 1
    return times


# ---------------------------------------------------------------------------------------------------------------
# in-process vLLM: (a), (a2), (b)
# ---------------------------------------------------------------------------------------------------------------


def settings_for(args, model_dir: str, engine: str):
    from teacher_server.settings import Settings

    return Settings(
        model=model_dir, engine=engine, dtype="float32", max_top_k=args.top_k, max_seq_len=args.seq_len,
        max_tokens_per_batch=args.max_tokens_per_batch, enable_prefix_caching=False, log_level="warning",
    )


async def _generate_all(llm, batch, params, tag: str) -> list:
    from vllm.inputs import tokens_input

    async def one(i: int):
        async for out in llm.generate(tokens_input(batch.sequence(i).tolist()), params, request_id=f"{tag}-{i}"):
            final = out
        return final

    return await asyncio.gather(*(one(i) for i in range(batch.num_sequences)))


def bench_in_process(args, model_dir: str, vocab: int, results: dict, counter: list[int]) -> None:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from teacher_server.engines.vllm import VLLMEngine, engine_args

    async def main() -> None:
        plain = SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )
        if {"a", "a2"} - args.skip_set:
            engine = VLLMEngine(settings_for(args, model_dir, "vllm"))
            await engine.start()
            try:
                jobs = {
                    "a": lambda rep: _generate_all(engine.llm, make_batch(args, vocab, rep), plain, f"plain{rep}"),
                    "a2": lambda rep: engine.score(make_batch(args, vocab, rep)),
                }
                jobs = {key: job for key, job in jobs.items() if key not in args.skip_set}
                results.update(await ainterleaved(jobs, args.repeats, counter))
            finally:
                await engine.close()
        if "b" not in args.skip_set:
            # Stock: vLLM's defaults (tokenizer, detokenize, Logprob dicts); same engine arguments otherwise.
            stock_args = engine_args(settings_for(args, model_dir, "vllm"), skip_tokenizer_init=False)
            llm = AsyncLLM.from_engine_args(stock_args)
            try:
                stock = SamplingParams(max_tokens=1, prompt_logprobs=args.top_k)
                job = lambda rep: _generate_all(llm, make_batch(args, vocab, rep), stock, f"stock{rep}")  # noqa: E731
                results.update(await ainterleaved({"b": job}, args.repeats, counter))
            finally:
                llm.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------------------
# servers over HTTP: (c), (d), (e)
# ---------------------------------------------------------------------------------------------------------------


class Server:
    """`python -m teacher_server` in a subprocess on 127.0.0.1."""

    def __init__(self, args, model_dir: str, engine: str, log_dir: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{engine}.log"
        cmd = [
            sys.executable, "-m", "teacher_server", "--model", model_dir, "--engine", engine, "--port", str(self.port),
            "--max-top-k", str(args.top_k), "--dtype", "float32", "--max-seq-len", str(args.seq_len),
            "--max-tokens-per-batch", str(args.max_tokens_per_batch), "--no-enable-prefix-caching",
            "--log-level", "warning",
        ]
        self.cmd = " ".join(cmd)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after 600 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def http_job(client, url: str, args, vocab: int, media: str):
    from protocol import codec

    encode = codec.encode_request_msgpack if media == "application/msgpack" else codec.encode_request_json
    decode = codec.decode_response_msgpack if media == "application/msgpack" else codec.decode_response_json
    expected = args.sequences * (args.seq_len - args.score_from)

    def run_once(rep: int) -> None:
        body = encode(make_batch(args, vocab, rep))
        resp = client.post(url + "/v1/score", content=body, headers={"content-type": media, "accept": media})
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        result = decode(resp.content)
        if result.token_logprobs_N.size != expected or result.top_k != args.top_k:
            raise RuntimeError("response has the wrong shape")

    return run_once


def bench_http(args, model_dir: str, vocab: int, results: dict, counter: list[int], log_dir: Path) -> list[str]:
    import httpx

    commands = []
    plan = [("vllm", [("c", "application/msgpack"), ("d", "application/json")]), ("hf", [("e", "application/msgpack")])]
    for engine, jobs in plan:
        jobs = [(key, media) for key, media in jobs if key not in args.skip_set]
        if not jobs:
            continue
        with Server(args, model_dir, engine, log_dir) as server, httpx.Client(timeout=1800) as client:
            commands.append(server.cmd)
            runs = {key: http_job(client, server.url, args, vocab, media) for key, media in jobs}
            results.update(interleaved(runs, args.repeats, counter))
    return commands


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

LABELS = {
    "a": "(a)  vLLM plain prefill, no logprobs",
    "a2": "(a2) vllm engine in-process (score -> numpy)",
    "b": "(b)  vLLM stock prompt_logprobs (dicts, detok)",
    "c": "(c)  server --engine vllm, HTTP msgpack",
    "d": "(d)  server --engine vllm, HTTP JSON",
    "e": "(e)  server --engine hf, HTTP msgpack",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="teacher_bench_") as tmp:
        model_dir = args.model
        if model_dir is None:
            from student_trainer.tiny_models import build_tiny_model

            model_dir = str(
                build_tiny_model(
                    Path(tmp) / "model", hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4,
                    num_kv_heads=2, intermediate_size=args.intermediate_size,
                    max_position_embeddings=max(2048, args.seq_len + 1), seed=0,
                )
            )
        model_text, vocab = describe_model(model_dir)
        results: dict[str, list[float]] = {}
        counter = [0]  # repetition index: every timed or warm-up run gets new prompts
        bench_in_process(args, model_dir, vocab, results, counter)
        commands = bench_http(args, model_dir, vocab, results, counter, Path(tmp))

    import torch
    import vllm

    tokens = args.sequences * args.seq_len
    print()
    print(f"model:  {model_text}")
    print(
        f"batch:  {args.sequences} sequences x {args.seq_len} tokens = {tokens} tokens, K={args.top_k}, "
        f"score_from={args.score_from}, float32, prefix caching off, max_num_batched_tokens={args.max_tokens_per_batch}"
    )
    print(
        f"host:   {os.cpu_count()} CPUs, torch {torch.__version__}, vllm {vllm.__version__}; "
        f"median of {args.repeats} after 1 warm-up, fresh prompts per run"
    )
    print(f"load:   1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    for cmd in commands:
        print(f"server: {cmd}")
    print()
    print(f"| {'path':<48} | {'median s':>8} | {'min s':>7} | {'max s':>7} | {'tok/s':>9} | {'vs (a)':>6} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 8}|")
    base = statistics.median(results["a"]) if "a" in results else None
    for key, label in LABELS.items():
        if key not in results:
            continue
        med = statistics.median(results[key])
        ratio = f"{base / med:6.3f}" if base else "   n/a"
        print(f"| {label:<48} | {med:8.3f} | {min(results[key]):7.3f} | {max(results[key]):7.3f} | "
              f"{tokens / med:9.0f} | {ratio} |")
    if base and "c" in results:
        ratio = base / statistics.median(results["c"])
        print(f"\n(c)/(a) = {ratio:.3f}: target >= {TARGET:.2f} {'met' if ratio >= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
