"""Shared fixtures: a tiny real model built offline, and the teacher app served in-process or on 127.0.0.1.
Shared non-fixture helpers live in tests/helpers.py.

Engines are expensive to start (vLLM ~25 s on CPU), so each engine is started once per test session.
"""

from __future__ import annotations

import json
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


# The trainer tests' setting (test_train, test_lora): a smaller student sharing the teacher's tokenizer, the
# hf-engine teacher on 127.0.0.1, and addition prompts. Module-scoped: each module gets its own.


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A smaller student sharing the teacher's tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("student"), hidden_size=64, num_layers=1, num_heads=1,
                            intermediate_size=128, seed=3, tokenizer_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def teacher_url(tiny_model_dir):
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf", batch_wait_ms=0))) as server:
        yield server.url


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    train_rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 4)]
    eval_rows = [{"prompt": f"{a} + {a} =", "answer": str(2 * a)} for a in range(1, 4)]
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        (d / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d / "train.jsonl", d / "eval.jsonl"
