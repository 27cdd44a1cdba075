"""`make demo`: the scoring path end to end, on an embedded default (no GPU, no downloads).

Builds a tiny Qwen3 teacher offline, starts `python -m teacher_server` on 127.0.0.1 in a subprocess, scores a
batch of sequences through the client (binary encoding), prints a summary, and stops the server it started
(also on Ctrl-C or failure). The training demo replaces this once the trainer exists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def teacher_process(model_dir: str, port: int, *extra: str) -> Iterator[str]:
    """Run the teacher server in a subprocess until the block exits; yields its URL once healthy."""
    import httpx

    cmd = [sys.executable, "-m", "teacher_server", "--model", model_dir, "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"teacher server exited with status {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("teacher server did not become healthy within 300 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from student_trainer.teacher_client import TeacherClient
    from student_trainer.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="aopd-demo-") as tmp:
        model_dir = str(build_tiny_model(os.path.join(tmp, "teacher"), hidden_size=128, num_layers=2))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        print(f"[demo] starting teacher ({args.engine}) on 127.0.0.1:{port} with a tiny Qwen3 built offline")
        with teacher_process(model_dir, port, "--engine", args.engine, "--dtype", "float32") as url:
            rng = np.random.default_rng(0)
            seqs = [(rng.integers(4, len(tokenizer), args.length).tolist(), args.length // 2) for _ in range(args.sequences)]
            with TeacherClient(url) as client:
                info = client.connect(tokenizer=tokenizer, top_k=args.top_k)
                t0 = time.perf_counter()
                rows = client.score(seqs, top_k=args.top_k)
                dt = time.perf_counter() - t0
        n = sum(r.token_logprobs.size for r in rows)
        lp = np.concatenate([r.token_logprobs for r in rows])
        in_topk = np.concatenate(
            [(r.topk_ids == np.array(ids[s:])[:, None]).any(axis=1) for r, (ids, s) in zip(rows, seqs, strict=True)]
        )
        print(f"[demo] teacher: model={info.model} engine={info.engine} vocab={info.vocab_size} "
              f"fingerprint={info.tokenizer_fingerprint[:20]}...")
        print(f"[demo] scored {len(rows)} sequences, {n} positions at K={args.top_k} in {dt * 1000:.0f} ms "
              f"({n / dt:,.0f} positions/s over HTTP, binary encoding)")
        print(f"[demo] mean actual-token logprob {lp.mean():.3f}; actual token inside the teacher's top-{args.top_k}: "
              f"{in_topk.mean():.1%} of positions")
        print("[demo] server stopped; done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
