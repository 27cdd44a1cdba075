"""Memory at real scale, the parts a CPU can show: the optimizer state exists before the rollout engine sizes
itself (and changes no update), and the weights handed to the engine go to disk when /dev/shm has no room."""

from __future__ import annotations

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
