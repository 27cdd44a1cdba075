"""Run `python -m teacher_server` in a subprocess for the length of a `with` block (demo, benchmarks, tests).

    with serve_in_subprocess("toy/assets/teacher", 8000, "--engine", "hf") as teacher:
        teacher.url, teacher.pid   # the server is healthy here; it is stopped on exit, also on Ctrl-C or an exception
"""

from __future__ import annotations

import contextlib
import socket
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
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"teacher server exited with status {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"teacher server did not become healthy within {start_timeout_s:.0f}s")
            time.sleep(0.3)
        yield TeacherProcess(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
