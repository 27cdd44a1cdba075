"""Faults on both sides, for real: the teacher process SIGKILLed and restarted during training (the run finishes
every step and logs the outage); the trainer process SIGKILLed mid-run and resumed with --resume (final weights
bit-identical to an uninterrupted run on CPU); a checkpoint write interrupted at any point never leaves a
checkpoint that loads as complete."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer import checkpoint as ckpt_mod
from student_trainer.tiny_models import build_tiny_model
from teacher_server.process import free_port

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("student"), hidden_size=64, num_layers=1, num_heads=1,
                            intermediate_size=128, seed=3, tokenizer_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = ({"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 4))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def start_teacher(model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "teacher_server", "--model", str(model_dir), "--port", str(port),
                             "--dtype", "float32", "--max-top-k", "8", "--log-level", "warning"])
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("teacher did not start")


def trainer_cmd(student_dir, url, train_file, run_dir, steps, *extra):
    return [sys.executable, "-m", "student_trainer", f"model.path={student_dir}", f"teacher.url={url}", "teacher.top_k=8",
            f"data.train_path={train_file}", "data.apply_chat_template=false", "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "rollout.stream_chunk_prompts=4",
            "optim.lr=1e-3", f"train.steps={steps}", f"train.run_dir={run_dir}", "train.progress=false",
            "train.save_every=1", "teacher.max_backoff_s=1", "teacher.max_retries=2", *extra]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "trainer exited early"
        if metrics.exists() and any(json.loads(x).get("step") == step for x in metrics.read_text().splitlines() if x.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_teacher_sigkilled_and_restarted_during_training(student_dir, tiny_model_dir, train_file, tmp_path):
    port = free_port()
    teacher = start_teacher(tiny_model_dir, port)
    run_dir = tmp_path / "run"
    # slow rollouts down a little (more tokens) so the kill lands mid-run
    trainer = subprocess.Popen(trainer_cmd(student_dir, f"http://127.0.0.1:{port}", train_file, run_dir, 8,
                                           "rollout.max_new_tokens=24"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 2, trainer)
        teacher.send_signal(signal.SIGKILL)
        teacher.wait()
        time.sleep(3.0)
        teacher = start_teacher(tiny_model_dir, port)
        out, _ = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
        teacher.kill()
    assert trainer.returncode == 0, out[-3000:]
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "optim/grad_norm" in x]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert sum(r["teacher/outage_s"] for r in steps) > 0, "the outage must be logged"
    assert "teacher outage" in out


def test_trainer_sigkilled_then_resumed_reaches_bit_identical_weights(student_dir, tiny_model_dir, train_file, tmp_path):
    port = free_port()
    teacher = start_teacher(tiny_model_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        full = tmp_path / "full"
        subprocess.run(trainer_cmd(student_dir, url, train_file, full, 5), check=True, capture_output=True, timeout=300)
        split = tmp_path / "split"
        trainer = subprocess.Popen(trainer_cmd(student_dir, url, train_file, split, 5), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        wait_for_step(split, 2, trainer)
        trainer.send_signal(signal.SIGKILL)  # possibly in the middle of writing checkpoint 2 or step 3
        trainer.wait()
        assert not (split / "checkpoints" / "step_000005").exists()
        subprocess.run(trainer_cmd(student_dir, url, train_file, split, 5) + ["--resume"], check=True,
                       capture_output=True, timeout=300)
    finally:
        teacher.kill()
    a = load_file(str(full / "checkpoints" / "step_000005" / "model.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_000005" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(Exception):
    pass


@pytest.mark.parametrize("point", ["save_pretrained", "tokenizer", "torch_save", "marker", "fsync", "rename"])
def test_interrupted_checkpoint_write_never_looks_complete(point, student_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(student_dir))
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    run = tmp_path / "run"
    ckpt_mod.save_checkpoint(run, 1, model, tok, {"step": 1})

    def boom(*a, **k):
        raise Crash(point)

    targets = {
        "save_pretrained": (type(model), "save_pretrained"),
        "tokenizer": (type(tok), "save_pretrained"),
        "torch_save": (ckpt_mod.torch, "save"),
        "fsync": (ckpt_mod, "_fsync_tree"),
        "rename": (ckpt_mod.os, "replace"),
    }
    if point == "marker":
        original = Path.write_text
        monkeypatch.setattr(
            Path, "write_text", lambda self, *a, **k: boom() if self.name == "COMPLETE" else original(self, *a, **k)
        )
    else:
        obj, name = targets[point]
        monkeypatch.setattr(obj, name, boom)
    with pytest.raises(Crash):
        ckpt_mod.save_checkpoint(run, 2, model, tok, {"step": 2})
    monkeypatch.undo()
    latest = ckpt_mod.latest_checkpoint(run)
    assert latest is not None and latest.name == "step_000001", latest
    assert ckpt_mod.load_trainer_state(latest)["step"] == 1
    # the next save clears the leftover and completes
    ckpt_mod.save_checkpoint(run, 2, model, tok, {"step": 2})
    assert ckpt_mod.latest_checkpoint(run).name == "step_000002"
    assert not list((run / "checkpoints").glob("*.tmp-*"))


def test_resaving_a_step_never_hides_it(student_dir, tmp_path, monkeypatch):
    """Re-saving step N moves the old copy aside before renaming the new one in: a crash between the two renames
    still leaves step N loadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(student_dir))
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    run = tmp_path / "run"
    ckpt_mod.save_checkpoint(run, 3, model, tok, {"step": 3}, keep=1)
    real_replace = ckpt_mod.os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise Crash("between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_second)
    with pytest.raises(Crash):
        ckpt_mod.save_checkpoint(run, 3, model, tok, {"step": 3}, keep=1)
    monkeypatch.undo()
    latest = ckpt_mod.latest_checkpoint(run)
    assert latest is not None and ckpt_mod.load_trainer_state(latest)["step"] == 3
    ckpt_mod.save_checkpoint(run, 3, model, tok, {"step": 3}, keep=1)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000003"]
