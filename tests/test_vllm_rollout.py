"""The vLLM rollout engine for the student (vLLM's CPU build): its sampling logprobs equal the trainer model's,
also after new weights are pushed into the running engine, and training runs several steps with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import HAS_VLLM

pytestmark = [pytest.mark.numeric, pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")]

# Both sides run the same float32 model with different kernels: differences are rounding, measured ~3e-6 here;
# 1e-4 leaves a wide margin while a stale weight (the perturbation below moves logprobs by ~1e-2) fails it.
ATOL = 1e-4


def reference_logprobs(model, rollout) -> np.ndarray:
    with torch.no_grad():
        logp = model(torch.tensor([rollout.token_ids])).logits[0].log_softmax(-1)
    p = len(rollout.prompt_ids)
    return logp[p - 1 : -1].gather(1, torch.tensor(rollout.completion_ids)[:, None]).squeeze(1).numpy()


def test_engine_logprobs_equal_trainer_model_before_and_after_update(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_trainer import rollout_vllm
    from student_trainer.rollout_vllm import VLLMGenerator

    # weights handed over in several files (as an 8B model's are, in 1 GiB parts): the engine must read them all
    monkeypatch.setattr(rollout_vllm, "SHARD_BYTES", 256 << 10)

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    gen = VLLMGenerator(str(tiny_model_dir), tok, dtype="float32", max_model_len=128, weights_dir=str(tmp_path / "w"))
    try:
        prompts = [[2, 10, 11, 12], [2, 40]]
        rolls = gen.generate(prompts, 2, max_new_tokens=16, temperature=1.0, seed=0)
        assert len(rolls) == 4 and [r.prompt_index for r in rolls] == [0, 0, 1, 1]
        for r in rolls:
            np.testing.assert_allclose(r.behaviour_logprobs, reference_logprobs(model, r), atol=ATOL, rtol=0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        stale = gen.generate(prompts, 1, max_new_tokens=16, temperature=1.0, seed=1)
        assert any(np.abs(r.behaviour_logprobs - reference_logprobs(model, r)).max() > 10 * ATOL for r in stale)
        gen.load_weights(model)
        parts = sorted(p.name for p in (tmp_path / "w").glob("*.safetensors"))
        assert len(parts) > 2 and parts[0] == "model-00000.safetensors", parts
        assert gen.sync_bytes == sum(p.numel() * 4 for p in model.parameters())
        for r in gen.generate(prompts, 2, max_new_tokens=16, temperature=1.0, seed=2):
            np.testing.assert_allclose(r.behaviour_logprobs, reference_logprobs(model, r), atol=ATOL, rtol=0)
        # all prompts at once, each group as it finishes: every prompt once, n samples each, the same policy
        many = [[2, 10 + i] for i in range(6)]
        groups = list(gen.stream(many, 3, max_new_tokens=16, temperature=1.0, seeds=list(range(6))))
        assert sorted(g[0].prompt_index for g in groups) == list(range(6))
        for g in groups:
            assert len(g) == 3 and {r.prompt_index for r in g} == {g[0].prompt_index}
            assert all(r.prompt_ids == many[g[0].prompt_index] for r in g)
            for r in g:
                np.testing.assert_allclose(r.behaviour_logprobs, reference_logprobs(model, r), atol=ATOL, rtol=0)
        # a consumer that stops after the first group leaves nothing behind in the engine
        next(iter(gen.stream(many, 2, max_new_tokens=16, temperature=1.0, seeds=list(range(6)))))
        assert not gen.llm.llm_engine.has_unfinished_requests()
        assert len(gen.generate(prompts, 2, max_new_tokens=4, seed=5)) == 4
    finally:
        gen.close()


def test_training_runs_with_the_vllm_rollout_engine(tiny_model_dir, tmp_path):
    from student_trainer.config import load_config
    from student_trainer.train import train
    from teacher_server.app import create_app
    from tests.helpers import LiveServer, teacher_settings

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "answer": str(2 * a)}) + "\n" for a in range(1, 9)))
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf"))) as teacher:
        cfg = load_config(None, [
            f"model.path={tiny_model_dir}", f"teacher.url={teacher.url}", "teacher.top_k=8", f"data.train_path={data}",
            "data.apply_chat_template=false", "rollout.engine=vllm", "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "loss.mode=aopd",
            "loss.importance_correction=true", "optim.lr=1e-3", "train.steps=3", f"train.run_dir={tmp_path / 'run'}",
            "train.progress=false",
        ])
        train(cfg)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # the weights are reloaded after every step, so the engine samples from the current policy: weights ~1
    assert all(abs(r["is/weight_mean"] - 1.0) < 1e-3 for r in steps), [r["is/weight_mean"] for r in steps]


def test_weights_are_written_in_parts_and_stale_parts_removed(tmp_path):
    """`write_safetensors`: parts of about the given size, every tensor once, and a later write with fewer
    parts removes the rest (the engine reads every *.safetensors file in the directory)."""
    from safetensors.torch import load_file

    from student_trainer.rollout_vllm import write_safetensors

    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    assert write_safetensors(iter(tensors.items()), str(tmp_path), shard_bytes=3 << 10) == 10 << 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model-{i:05d}.safetensors" for i in range(4)]
    assert write_safetensors(iter(tensors.items()), str(tmp_path), shard_bytes=1 << 20) == 10 << 10
    assert [p.name for p in tmp_path.iterdir()] == ["model-00000.safetensors"]
    got = load_file(str(tmp_path / "model-00000.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())
    assert write_safetensors(iter(()), str(tmp_path)) == 0  # a rank that receives nothing writes nothing
    assert [p.name for p in tmp_path.iterdir()] == ["model-00000.safetensors"]
