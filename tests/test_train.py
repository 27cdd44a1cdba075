"""The trainer end to end on CPU against a live teacher server on 127.0.0.1: a few real steps per loss mode,
metrics.jsonl has every key, the loss goes down on a fixed batch, checkpoint/resume gives identical weights,
and bad configs / incompatible teachers are refused before training with a message that names the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from student_trainer.config import ConfigError, load_config
from student_trainer.tiny_models import build_tiny_model
from student_trainer.train import train
from teacher_server.app import create_app
from tests.helpers import LiveServer, adam_weight_tol, make_cfg, teacher_settings

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)


@pytest.fixture(scope="module")
def ref_url(student_dir):
    with LiveServer(create_app(teacher_settings(student_dir, "hf"))) as server:
        yield server.url


REQUIRED_KEYS = [
    "loss/total", "loss/pg", "loss/div", "aopd/intervention_ratio", "policy/entropy", "optim/grad_norm",
    "adv/frac_pos", "adv/frac_zero", "adv/frac_neg", "adv/p05", "adv/p50", "adv/p95", "adv/hist_counts",
    "conf/gap_sampled", "conf/gap_top1", "teacher/latency_ms", "timing/score_overlap", "throughput/tok_per_s",
    "rollout/len_mean", "teacher/topk_entropy_masked", "teacher/topk_entropy_unmasked",
]


@pytest.mark.parametrize("mode", ["opd", "aopd", "aopd_add", "gkd", "aopd_zero", "aopd_acc", "exopd", "seqkd"])
def test_each_mode_trains_and_logs_every_key(mode, student_dir, teacher_url, ref_url, data_files, tmp_path):
    extra = [f"loss.mode={mode}"] + ([f"teacher.ref_url={ref_url}"] if mode == "exopd" else [])
    cfg = make_cfg(student_dir, teacher_url, data_files, tmp_path / mode, *extra)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "optim/grad_norm" in r]
    evals = [r for r in records if "eval/pass@1" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2] and "eval/pass@2" in evals[0]
    per_problem = [json.loads(x) for x in (tmp_path / mode / "eval_problems.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_problem] == [0, 2]
    for r, e in zip(per_problem, evals, strict=True):  # the per-problem counts are what pass@1 averaged
        assert len(r["index"]) == len(r["correct"]) and all(0 <= c <= r["n"] for c in r["correct"])
        assert np.mean(r["correct"]) / r["n"] == pytest.approx(e["eval/pass@1"], abs=1e-9)
    keys = ["loss/nll", "optim/grad_norm"] if mode == "seqkd" else REQUIRED_KEYS
    for key in keys:
        assert key in steps[0], key
    assert all(torch.isfinite(torch.tensor(r["optim/grad_norm"])) for r in steps)
    ckpt = tmp_path / mode / "checkpoints" / "step_000002"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "COMPLETE").is_file()
    assert (tmp_path / mode / "config.yaml").is_file()
    if mode != "seqkd":
        dumped = [json.loads(x) for x in (tmp_path / mode / "rollouts.jsonl").read_text().splitlines()]
        assert len(dumped) == 8 and all(len(d["mask"]) == len(d["completion_ids"]) == len(d["advantage"]) for d in dumped)


def test_loss_goes_down_on_a_fixed_batch(student_dir, teacher_url, data_files, tmp_path):
    """Repeated updates on one batch of rollouts (fixed teacher scores) must reduce the GKD divergence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_trainer.data import load_problems
    from student_trainer.losses import LossConfig
    from student_trainer.parallel import Policy
    from student_trainer.rollout import HFGenerator
    from student_trainer.teacher_client import TeacherClient
    from student_trainer.train import StepBatch, micro_batch_losses

    cfg = make_cfg(student_dir, teacher_url, data_files, tmp_path, "loss.mode=gkd")
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    model = AutoModelForCausalLM.from_pretrained(str(student_dir))
    problems = load_problems(str(data_files[0]), tok, apply_chat_template=False)[:4]
    rollouts = HFGenerator(model, tok).generate([p.prompt_ids for p in problems], 2, max_new_tokens=6, seed=0)
    with TeacherClient(teacher_url) as t:
        rows = t.score([(r.token_ids, len(r.prompt_ids)) for r in rollouts], top_k=8)
    batch = StepBatch(rollouts, rows, None, [False] * len(rollouts))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = micro_batch_losses(Policy(model), batch, cfg, torch.device("cpu"))
        loss = out.loss_N.mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
    assert LossConfig(mode="gkd").mode == "gkd"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_interrupted_then_resumed_run_reaches_the_same_weights(student_dir, teacher_url, data_files, tmp_path):
    common = ["loss.mode=aopd", "train.steps=4", "train.eval_every=0", "train.save_every=1",
              "rollout.stream_chunk_prompts=4"]
    train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "full", *common))
    train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "split", *common, "train.stop_after_steps=2"))
    assert (tmp_path / "split" / "checkpoints" / "step_000002").is_dir()
    assert not (tmp_path / "split" / "checkpoints" / "step_000004").exists()
    train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "split", *common), resume=True)
    a = _weights(tmp_path / "full" / "checkpoints" / "step_000004")
    b = _weights(tmp_path / "split" / "checkpoints" / "step_000004")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = load_file(str(student_dir / "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a), "training changed nothing"


@pytest.mark.parametrize("override,message", [
    ("loss.mode=bogus", "loss.mode"),
    ("loss.beta=2", "beta=2"),
    ("loss.support_norm=teacher", None),  # valid with beta=0
    ("train.eval_ks=[1,8]", "eval_ks"),
    ("optim.lr=-1", "optim.lr"),
    ("nonsense=1", "nonsense"),
])
def test_invalid_config_refused_with_message(override, message, student_dir, data_files, tmp_path):
    args = [f"model.path={student_dir}", "teacher.url=http://127.0.0.1:1", f"data.train_path={data_files[0]}",
            f"data.eval_path={data_files[1]}", override]
    if message is None:
        load_config(None, args)
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, args)


def test_incompatible_teacher_refused_before_training(student_dir, teacher_url, data_files, tmp_path, other_model_dir):
    from student_trainer.teacher_client import TeacherIncompatibleError

    with pytest.raises(TeacherIncompatibleError, match="--max-top-k 64"):
        train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "k", "teacher.top_k=64"))
    with pytest.raises(TeacherIncompatibleError, match="max_seq_len"):
        train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "len", "rollout.max_new_tokens=1000"))
    other_student = build_tiny_model(tmp_path / "other_student", hidden_size=64, num_layers=1, tokenizer_dir=other_model_dir)
    with pytest.raises(TeacherIncompatibleError, match="tokenizer mismatch"):
        train(make_cfg(other_student, teacher_url, data_files, tmp_path / "tok"))
    with pytest.raises(ValueError, match="data.prompt_field"):
        train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "field", "data.prompt_field=question"))
    assert not (tmp_path / "k" / "metrics.jsonl").exists() or (tmp_path / "k" / "metrics.jsonl").read_text() == ""


def test_cli_runs_two_steps(student_dir, teacher_url, data_files, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"""
model: {{path: {student_dir}}}
teacher: {{url: "{teacher_url}", top_k: 8}}
data: {{train_path: {data_files[0]}, apply_chat_template: false}}
rollout: {{prompts_per_step: 2, samples_per_prompt: 2, max_new_tokens: 4}}
train: {{steps: 2, run_dir: {tmp_path / 'run'}, progress: false}}
""")
    r = subprocess.run([sys.executable, "-m", "student_trainer", "--config", str(cfg_file), "loss.mode=opd",
                        "train.tensorboard=true"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 00002/00002" in r.stdout
    assert any((tmp_path / "run" / "tb").iterdir()), "tensorboard event file"
    bad = subprocess.run([sys.executable, "-m", "student_trainer", "--config", str(cfg_file), "loss.tau=abc"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "loss.tau" in bad.stderr


def test_teacher_down_at_startup_is_waited_for_and_outage_mid_run_is_survived(
    student_dir, tiny_model_dir, data_files, tmp_path, monkeypatch
):
    """The teacher comes up 3 s after the trainer starts; at step 2 it is shut down and comes back 4 s later.
    The run waits, retries with backoff, keeps its rollouts, finishes every step, and logs the outage."""
    import threading
    import time

    from student_trainer.train import StreamingScorer
    from tests.helpers import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers = []

    def serve_after(delay: float) -> None:
        time.sleep(delay)
        server = LiveServer(create_app(teacher_settings(tiny_model_dir, "hf")))
        server.port, server.url, server.server.config.port = port, url, port
        servers.append(server.__enter__())

    threading.Thread(target=serve_after, args=(3.0,), daemon=True).start()
    calls = []
    original = StreamingScorer._score

    def score_with_outage(self, rollouts):
        calls.append(1)
        if len(calls) == 3:  # first chunk of step 2: the teacher goes away now, back in 4 s
            servers[-1].__exit__(None, None, None)
            threading.Thread(target=serve_after, args=(4.0,), daemon=True).start()
        return original(self, rollouts)

    monkeypatch.setattr(StreamingScorer, "_score", score_with_outage)
    cfg = make_cfg(student_dir, url, data_files, tmp_path / "run", "loss.mode=opd", "train.steps=3",
                   "train.eval_every=0", "teacher.max_backoff_s=1", "teacher.max_retries=2")
    t0 = time.monotonic()
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "optim/grad_norm" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[1]["teacher/outage_s"] > 0 and steps[0]["teacher/outage_s"] == 0
    assert time.monotonic() - t0 > 7.0
    servers[-1].__exit__(None, None, None)


def test_training_against_a_comma_separated_list_of_teachers(student_dir, teacher_url, data_files, tmp_path):
    cfg = make_cfg(student_dir, f"{teacher_url},{teacher_url}/", data_files, tmp_path / "pool", "loss.mode=aopd",
                   "train.eval_every=0")
    train(cfg)
    steps = [json.loads(x) for x in (tmp_path / "pool" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2]


def test_token_budget_micro_batches_give_the_same_update(student_dir, teacher_url, data_files, tmp_path):
    """Length-sorted micro-batches under a token budget: the same rollouts, masks and (up to float summation
    order) the same weights as micro-batches in rollout order; per-token dumps back in rollout order."""
    rows = [{"prompt": " + ".join(["1"] * n) + " =", "answer": str(n)} for n in (1, 7, 2, 5, 3, 6)]
    varied = tmp_path / "varied.jsonl"  # prompts of very different lengths, so that padding is real
    varied.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["loss.mode=aopd", "train.eval_every=0", "train.dump_rollouts_every=1", "optim.micro_batch_size=8"]
    files = (varied, data_files[1])
    train(make_cfg(student_dir, teacher_url, files, tmp_path / "count", *common))
    train(make_cfg(student_dir, teacher_url, files, tmp_path / "budget", *common, "optim.micro_batch_tokens=40"))
    recs = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("count", "budget")}
    assert recs["budget"][0]["optim/padding_frac"] < recs["count"][0]["optim/padding_frac"]
    dumps = {name: [json.loads(x) for x in (tmp_path / name / "rollouts.jsonl").read_text().splitlines()]
             for name in ("count", "budget")}
    first = [d for d in dumps["count"] if d["step"] == 1], [d for d in dumps["budget"] if d["step"] == 1]
    assert [d["completion_ids"] for d in first[0]] == [d["completion_ids"] for d in first[1]]
    assert [d["mask"] for d in first[0]] == [d["mask"] for d in first[1]]
    a, b = (_weights(tmp_path / name / "checkpoints" / "step_000002") for name in ("count", "budget"))
    for k in a:
        # gradients summed in another order; Adam amplifies that noise where a coordinate's gradients nearly
        # cancel (tests/helpers.py's adam_weight_tol: lr 1e-3, 2 steps)
        tol = adam_weight_tol(1e-3, 2, float(a[k].abs().max()))
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


def test_vllm_engine_without_vllm_installed_is_refused_before_anything_loads(student_dir, data_files, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    cfg = make_cfg(student_dir, "http://127.0.0.1:1", data_files, tmp_path, "rollout.engine=vllm")
    with pytest.raises(ConfigError, match=r"pip install 'aopd\[vllm\]'"):
        train(cfg)


@pytest.fixture(scope="module")
def second_teacher(tiny_model_dir, tmp_path_factory):
    """Another teacher with the same tokenizer and other weights: its distributions differ from the first's."""
    d = build_tiny_model(tmp_path_factory.mktemp("teacher2"), seed=7, tokenizer_dir=tiny_model_dir)
    with LiveServer(create_app(teacher_settings(d, "hf", batch_wait_ms=0))) as server:
        yield server.url


def _scored_sequences(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("aopd_teacher_sequences_scored_total"))


def test_two_teachers_each_score_their_own_prompts(student_dir, teacher_url, second_teacher, tmp_path):
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b), "teacher": "math" if a % 2 else "code"}
            for a in range(1, 7) for b in range(1, 4)]
    data = tmp_path / "routed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    teachers = f"teacher.teachers={{math: {{url: '{teacher_url}'}}, code: {{url: '{second_teacher}', top_k: 4}}}}"
    before = {u: _scored_sequences(u) for u in (teacher_url, second_teacher)}
    overrides = [f"model.path={student_dir}", teachers, "teacher.top_k=8", f"data.train_path={data}",
                 "data.teacher_field=teacher", "data.apply_chat_template=false", "rollout.prompts_per_step=4",
                 "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "rollout.stream_chunk_prompts=2",
                 "optim.micro_batch_size=3", "train.steps=2", f"train.run_dir={tmp_path / 'run'}", "train.progress=false",
                 "train.dump_rollouts_every=1", "loss.mode=aopd"]
    train(load_config(None, overrides))
    dumped = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(dumped) == 16
    by_row = {i: r["teacher"] for i, r in enumerate(rows)}
    assert all(d["teacher"] == by_row[d["prompt_index"]] for d in dumped)  # each rollout scored by its prompt's teacher
    # ... as each server saw: the sequences it scored are exactly the rollouts routed to it
    routed = {"math": sum(d["teacher"] == "math" for d in dumped), "code": sum(d["teacher"] == "code" for d in dumped)}
    assert _scored_sequences(teacher_url) - before[teacher_url] == routed["math"]
    assert _scored_sequences(second_teacher) - before[second_teacher] == routed["code"]
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in steps:
        used = [n for n in ("math", "code") if r[f"teacher/{n}/tokens"] > 0]
        assert sum(r[f"teacher/{n}/tokens"] for n in ("math", "code")) == pytest.approx(r["rollout/len_mean"] * 8)
        for n in used:
            assert r[f"teacher/{n}/latency_ms"] > 0 and 0 <= r[f"teacher/{n}/aopd/intervention_ratio"] <= 1
    # bad routing data is refused before training, naming the fix
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2", "teacher": "physics"}) + "\n")
    with pytest.raises(ConfigError, match=r"\['physics'\].*teacher.teachers"):
        train(load_config(None, [*overrides, f"data.train_path={bad}"]))
    bad.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="have no such field"):
        train(load_config(None, [*overrides, f"data.train_path={bad}"]))
    with pytest.raises(ConfigError, match="set data.teacher_field"):
        load_config(None, [o for o in overrides if not o.startswith("data.teacher_field")])
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, [*overrides, f"teacher.url={teacher_url}"])
