"""Memory at real scale, the parts a CPU can show: the optimizer state exists before the rollout engine sizes
itself (and changes no update), and the weights handed to the engine go to disk when /dev/shm has no room."""

from __future__ import annotations

import math
import os
import shutil
from collections import namedtuple

import pytest
import torch

from student_trainer import rollout_vllm
from student_trainer.parallel import init_optimizer_state


@pytest.mark.parametrize("amsgrad", [False, True])
def test_optimizer_state_made_up_front_changes_no_update(amsgrad):
    def run(eager: bool) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        unused = torch.nn.Parameter(torch.ones(3))  # never gets a gradient: Adam must keep skipping it
        opt = torch.optim.AdamW([*model.parameters(), unused], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
        if eager:
            init_optimizer_state(opt)
            assert all(len(opt.state[p]) == (4 if amsgrad else 3) for p in [*model.parameters(), unused])
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(5, 8, generator=gen)).pow(2).mean().backward()
            opt.step()
        assert torch.equal(unused.detach(), torch.ones(3))
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()

    lazy_params, lazy_state = run(False)
    eager_params, eager_state = run(True)
    for a, b in zip(lazy_params, eager_params, strict=True):
        assert torch.equal(a, b)  # bit for bit
    for i, st in lazy_state["state"].items():
        for key, value in st.items():
            assert torch.equal(value, eager_state["state"][i][key]), key


Usage = namedtuple("Usage", "total used free")


def test_weights_go_to_disk_when_shm_is_too_small(tmp_path, monkeypatch, caplog):
    shm = tmp_path / "shm"
    shm.mkdir()
    gib = 2**30
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(64 * gib, 0, 20 * gib))
    roomy = rollout_vllm.new_weights_dir(16 * gib, shm=str(shm))
    assert os.path.dirname(roomy) == str(shm)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(64 * 2**20, 0, 60 * 2**20))  # docker's 64 MB
    with caplog.at_level("WARNING"):
        fallback = rollout_vllm.new_weights_dir(16 * gib, shm=str(shm))
    assert os.path.dirname(fallback) != str(shm) and os.path.isdir(fallback)
    assert "--shm-size" in caplog.text
    assert os.path.dirname(rollout_vllm.new_weights_dir(None, shm=str(tmp_path / "absent"))) != str(tmp_path / "absent")
    for d in (roomy, fallback):
        shutil.rmtree(d)


def test_weights_nbytes_counts_in_the_engines_dtype():
    model = torch.nn.Linear(10, 3)  # 33 parameters
    assert rollout_vllm.weights_nbytes(model, torch.bfloat16) == 66
    assert rollout_vllm.weights_nbytes(model, torch.float32) == 132


# ----------------------------------------------------------------------------------------------------------
# the memory estimate (python -m student_trainer.estimate)
# ----------------------------------------------------------------------------------------------------------


def saved_activation_elements(model, tokens: int) -> float:
    """Elements autograd saves for backward in a forward of `tokens` tokens, parameters left out (deduplicated by
    storage: views of one tensor count once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 300, (1, tokens)), use_cache=False)
    return float(sum(seen.values()))


@pytest.mark.parametrize(("hidden", "inter", "heads", "kv_heads"), [(128, 256, 2, 1), (256, 704, 4, 2)])
def test_estimate_counts_parameters_exactly_and_activations_as_measured(tmp_path, hidden, inter, heads, kv_heads):
    from transformers import AutoModelForCausalLM

    from student_trainer.estimate import ModelShape
    from student_trainer.tiny_models import build_tiny_model

    tokens, saved = 384, {}
    for layers in (1, 3):
        d = build_tiny_model(tmp_path / f"m{layers}", hidden_size=hidden, num_layers=layers, num_heads=heads,
                             num_kv_heads=kv_heads, intermediate_size=inter)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        shape = ModelShape.from_dir(d)
        assert shape.params == sum(p.numel() for p in model.parameters())
        saved[layers] = saved_activation_elements(model, tokens)
    per_layer_per_token = (saved[3] - saved[1]) / 2 / tokens  # what one more decoder layer keeps for backward
    assert per_layer_per_token == pytest.approx(shape.layer_saved_elements, rel=0.02)


def test_estimate_counts_lora_parameters_exactly_and_drops_the_full_states(tmp_path):
    from transformers import AutoModelForCausalLM

    from student_trainer.config import LoraSection, load_config
    from student_trainer.estimate import GIB, KNOWN_SHAPES, ModelShape, estimate
    from student_trainer.lora import apply_lora, trainable_parameters
    from student_trainer.tiny_models import build_tiny_model

    d = build_tiny_model(tmp_path / "m", hidden_size=128, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=256)
    for section in (LoraSection(rank=8), LoraSection(rank=16, target_modules=["q_proj", "v_proj", "down_proj"])):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        apply_lora(model, section)
        assert ModelShape.from_dir(d).lora_params(section.rank, section.target_modules) == sum(
            p.numel() for p in trainable_parameters(model))
    # an 8B student on one 80 GB GPU: full weights do not fit, LoRA rank 64 does (bfloat16 base, float32 adapters)
    example = load_config("docker/run.example.yaml", [])
    shape = KNOWN_SHAPES["qwen3-8b"]
    assert not estimate(example, 80 * GIB, 1, 512, shape).fits
    lora = load_config("docker/run.example.yaml", ["model.lora.rank=64"])
    est = estimate(lora, 80 * GIB, 1, 512, shape)
    assert est.fits
    adapters = shape.lora_params(64, list(LoraSection().target_modules))
    by_name = {x.name: x.nbytes for x in est.update}
    assert by_name["weights (sharded)"] == shape.params * 2 + adapters * 4
    assert by_name["Adam moments (sharded)"] == 8 * adapters and by_name["gradients (sharded)"] == 4 * adapters


def test_estimate_refuses_what_cannot_fit_and_names_the_knob(tmp_path):
    from student_trainer.config import ConfigError, load_config
    from student_trainer.estimate import GIB, KNOWN_SHAPES, check_fits, estimate
    from student_trainer.tiny_models import build_tiny_model

    d = build_tiny_model(tmp_path / "m")
    cfg = load_config(None, [f"model.path={d}", "teacher.url=http://x", f"data.train_path={d}",
                             "rollout.max_new_tokens=8192", "optim.micro_batch_size=4", "optim.activation_checkpointing=false"])
    est = estimate(cfg, 80 * GIB, 1, 512, KNOWN_SHAPES["qwen3-4b"])
    assert not est.fits
    assert any("activation_checkpointing=true" in a for a in est.advice)
    # the shipped example: one 141 GB GPU (H200) fits a Qwen3-4B student at 8K new tokens, and so do two 80 GB
    # GPUs; one 80 GB GPU fits only because the engine's share is derived (it gets what the trainer leaves): a
    # fixed 0.35 share of it does not
    example = load_config("docker/run.example.yaml", [])
    assert estimate(example, 141 * GIB, 1, 512, KNOWN_SHAPES["qwen3-4b"]).fits
    assert estimate(example, 80 * GIB, 2, 512, KNOWN_SHAPES["qwen3-4b"]).fits
    assert estimate(example, 80 * GIB, 1, 512, KNOWN_SHAPES["qwen3-4b"]).fits
    fixed = load_config("docker/run.example.yaml", ["rollout.vllm_gpu_memory_utilization=0.35"])
    assert not estimate(fixed, 80 * GIB, 1, 512, KNOWN_SHAPES["qwen3-4b"]).fits
    with pytest.raises(ConfigError, match="does not fit"):
        check_fits(cfg, 1.5 * GIB, 1, 512)  # less than the fixed CUDA overhead


def test_waking_the_rollout_engine_checks_its_memory_is_free(monkeypatch):
    """The CUDA path of VLLMGenerator's sleep/wake, with the CUDA calls and the engine faked: the engine must get
    back what it released, or the trainer stops with the budget's knobs instead of an allocator crash."""
    gib = 2**30
    free = {"bytes": 10 * gib}
    calls = []

    class FakeLLM:
        def sleep(self, level):
            calls.append(("sleep", level))
            free["bytes"] += 30 * gib  # weights and KV cache released

        def wake_up(self, tags):
            calls.append(("wake", tuple(tags)))
            free["bytes"] -= (10 if tags == ["weights"] else 20) * gib  # taken back

        def collective_rpc(self, name, kwargs):
            calls.append((name,))

        def reset_prefix_cache(self):
            pass

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free["bytes"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    gen = object.__new__(rollout_vllm.VLLMGenerator)
    gen.llm, gen.sleep_enabled, gen.asleep, gen.wake_bytes, gen.weights_dir = FakeLLM(), True, False, 0, "/unused"
    gen.lora, gen.lora_request = False, None
    gen.sleep()
    assert gen.asleep and gen.wake_bytes == 30 * gib
    gen.reload()  # all of it is free again: wakes
    assert not gen.asleep and ("wake", ("weights",)) in calls and ("wake", ("kv_cache",)) in calls
    gen.sleep()
    free["bytes"] -= 25 * gib  # the update's activations took most of it and the allocator could not return it
    with pytest.raises(RuntimeError, match="vllm_gpu_memory_utilization"):
        gen.reload()
    # LoRA: the base must survive the sleep (level 1: offloaded, not discarded); a new adapter wakes everything
    calls.clear()

    class FakeEngine:
        def add_lora(self, request):
            calls.append(("add_lora", request.lora_int_id))

        def remove_lora(self, lora_id):
            calls.append(("remove_lora", lora_id))

    free["bytes"] = 10 * gib
    gen.llm.llm_engine = FakeEngine()
    gen.lora, gen.asleep = True, False
    gen.sleep()
    assert ("sleep", 1) in calls
    gen.load_adapter()
    gen.sleep()
    gen.load_adapter()
    assert not gen.asleep and ("wake", ("weights", "kv_cache")) in calls
    assert [c for c in calls if "lora" in c[0]] == [("add_lora", 1), ("add_lora", 2), ("remove_lora", 1)]
    assert not any(c[0] == "reload_weights" for c in calls)  # the base is never reloaded


def test_the_engines_memory_share_is_derived_from_what_is_free(tmp_path, monkeypatch):
    """rollout.vllm_gpu_memory_utilization unset: the engine takes what is free at its start less the
    estimate's headroom, and, when it stays awake through the update, less what the update needs; the
    estimate counts the same share; too little left is a ConfigError naming the knobs. (CUDA calls faked.)"""
    from student_trainer.config import ConfigError, load_config
    from student_trainer.estimate import FIT_FRACTION, GIB, KNOWN_SHAPES, engine_share, estimate

    assert engine_share(60 * GIB, 80 * GIB) == math.floor((60 - (1 - FIT_FRACTION) * 80) / 80 * 1000) / 1000
    assert engine_share(60 * GIB, 80 * GIB, 20 * GIB) < engine_share(60 * GIB, 80 * GIB)
    assert engine_share(4 * GIB, 80 * GIB, 2 * GIB) == 0.0

    example = load_config("docker/run.example.yaml", ["rollout.vllm_gpu_memory_utilization=null"])
    shape = KNOWN_SHAPES["qwen3-4b"]
    asleep = estimate(example, 141 * GIB, 1, 512, shape)
    engine = next(x for x in asleep.generation if x.name.startswith("rollout engine"))
    assert asleep.reserve_bytes == 0 and "derived" in engine.note
    assert sum(x.nbytes for x in asleep.generation) <= FIT_FRACTION * 141 * GIB + 1  # takes the rest, no more
    assert asleep.fits
    awake = estimate(
        load_config("docker/run.example.yaml", ["rollout.vllm_gpu_memory_utilization=null", "rollout.vllm_sleep=false"]),
        141 * GIB, 1, 512, shape)
    awake_engine = next(x for x in awake.generation if x.name.startswith("rollout engine"))
    assert awake.reserve_bytes > 0 and awake_engine.nbytes < engine.nbytes

    free = {"bytes": 50 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free["bytes"], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert rollout_vllm.derive_memory_share(0, 10 * GIB) == engine_share(50 * GIB, 80 * GIB, 10 * GIB)
    free["bytes"] = 8 * GIB
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        rollout_vllm.derive_memory_share(0, 1 * GIB)
