"""Shared fixtures: a tiny real model built offline, and the teacher app served in-process or on 127.0.0.1.
Shared non-fixture helpers live in tests/helpers.py.

Engines are expensive to start (vLLM ~25 s on CPU), so each engine is started once per test session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from student_trainer.tiny_models import build_tiny_model
from teacher_server.app import create_app
from tests.helpers import ENGINES, LiveServer, teacher_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A model whose tokenizer differs from `tiny_model_dir`'s (fewer filler words)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_other"), n_filler=100, seed=1)


@pytest.fixture(scope="session", params=ENGINES)
def live_server(request, tiny_model_dir):
    """One live teacher per engine for the whole session; tests must not change its state."""
    app = create_app(teacher_settings(tiny_model_dir, request.param))
    with LiveServer(app) as server:
        server.engine_name = request.param
        yield server
