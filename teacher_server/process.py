"""Run `python -m teacher_server` in a subprocess for the length of a `with` block (demo, benchmarks, tests).

    with serve_in_subprocess("toy/assets/teacher", 8000, "--engine", "hf") as teacher:
        teacher.url, teacher.pid   # the server is healthy here; it is stopped on exit, also on Ctrl-C or an exception
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TeacherProcess:
    url: str
    pid: int


@contextlib.contextmanager
def serve_in_subprocess(
    model_dir: str, port: int | None = None, *extra: str, start_timeout_s: float = 300
) -> Iterator[TeacherProcess]:
    port = free_port() if port is None else port
    cmd = [sys.executable, "-m", "teacher_server", "--model", model_dir, "--port", str(port), "--log-level", "warning", *extra]
    with _server_process(cmd, port, start_timeout_s) as teacher:
        yield teacher


@contextlib.contextmanager
def stock_vllm_in_subprocess(
    model_dir: str, port: int | None = None, *extra: str, start_timeout_s: float = 600
) -> Iterator[TeacherProcess]:
    """A stock `vllm serve` (vLLM's own OpenAI-compatible server, none of our code) on 127.0.0.1: the peer
    teacher of the tests and `bench/peer_servers.py`. On CPU its KV cache gets 1 GiB unless the caller set
    VLLM_CPU_KVCACHE_SPACE.

    Started as `python -m vllm.entrypoints.openai.api_server`, the same server `vllm serve` runs: the `vllm` CLI
    reads its own version from the distribution named "vllm", and the CPU build is distributed as "vllm-cpu"."""
    port = free_port() if port is None else port
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--uvicorn-log-level", "warning", "--disable-log-stats", *extra]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with _server_process(cmd, port, start_timeout_s, env=env) as teacher:
        yield teacher


@contextlib.contextmanager
def _server_process(
    cmd: list[str], port: int, start_timeout_s: float, env: dict[str, str] | None = None, *,
    scheme: str = "http", verify: str | bool = True,
) -> Iterator[TeacherProcess]:
    """Start `cmd`, wait until /health answers 200, yield; terminate it (then kill) on the way out. `scheme`
    https with `verify` (a CA file): a teacher serving TLS."""
    proc = subprocess.Popen(cmd, env=env)
    url = f"{scheme}://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=1, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy within {start_timeout_s:.0f}s: {' '.join(cmd)}")
            time.sleep(0.3)
        yield TeacherProcess(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
