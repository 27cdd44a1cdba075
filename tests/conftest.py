"""Shared fixtures: a tiny real model built offline, and the teacher app served in-process or on 127.0.0.1.

Engines are expensive to start (vLLM ~25 s on CPU), so each engine is started once per test session.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from student_trainer.tiny_models import build_tiny_model
from teacher_server.app import create_app
from teacher_server.process import free_port
from teacher_server.settings import Settings

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ENGINES = [
    "hf",
    pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")]),
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A model whose tokenizer differs from `tiny_model_dir`'s (fewer filler words)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_other"), n_filler=100, seed=1)


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def teacher_settings(model_dir: Path, engine: str, **overrides) -> Settings:
    base = dict(model=str(model_dir), engine=engine, max_top_k=32, dtype="float32", max_seq_len=512)
    if engine == "vllm":
        base.update(max_tokens_per_batch=2048)
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="session", params=ENGINES)
def live_server(request, tiny_model_dir):
    """One live teacher per engine for the whole session; tests must not change its state."""
    app = create_app(teacher_settings(tiny_model_dir, request.param))
    with LiveServer(app) as server:
        server.engine_name = request.param
        yield server
