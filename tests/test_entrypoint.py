"""`python -m teacher_server` as a user runs it: a real subprocess, configured by flags and TEACHER_* env."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from student_trainer.teacher_client import TeacherClient
from tests.helpers import free_port


def test_cli_serves_and_env_settings_apply(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "TEACHER_MAX_TOP_K": "7"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "teacher_server", "--model", str(tiny_model_dir), "--port", str(port), "--dtype", "float32"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
        with TeacherClient(url) as client:
            assert client.connect().max_top_k == 7
            rows = client.score([([2, 3, 4, 5], 1)], top_k=7)
            assert rows[0].topk_ids.shape == (3, 7)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit status -15 is expected).
    assert proc.returncode in (0, -15), out
    assert "Application shutdown complete" in out, out


def test_cli_rejects_bad_flags_with_message(tiny_model_dir):
    r = subprocess.run(
        [sys.executable, "-m", "teacher_server", "--model", str(tiny_model_dir), "--max-top-k", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "--max-top-k" in r.stderr
