"""bench/continual.py: the second task's examples, the one recipe, and the table (one file per recipe)."""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def continual():
    return _load("continual")


@pytest.mark.parametrize("task", ["max", "multisum"])
def test_task_b_examples_are_training_split_in_the_addition_vocabulary(continual, task):
    from toy.task import build_tokenizer

    tok = build_tokenizer()
    tb = continual.TaskB(task)
    rng = random.Random(0)
    held = {p for p, _ in tb.held_out(200)}
    for _ in range(200):
        prompt, completion, answer = tb.example(rng)
        assert prompt not in held
        ids = tok.convert_tokens_to_ids(prompt.split() + completion)
        assert tok.unk_token_id not in ids, (prompt, completion)
        assert completion[-1] == "<eos>" and "".join(completion[-2 - len(answer):-2]) == answer


def test_adapt_fits_task_b_from_the_committed_weak_student(continual):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ROOT / "toy" / "assets" / "student_weak"
    tok, model = AutoTokenizer.from_pretrained(str(path)), AutoModelForCausalLM.from_pretrained(str(path))
    first = continual.adapt(model, tok, continual.TaskB("max"), steps=1, batch=16, lr=0.0, seed=0)
    last = continual.adapt(model, tok, continual.TaskB("max"), steps=30, batch=16, lr=3e-3, seed=0)
    assert last < 0.5 * first  # a new format: the loss falls well below the untrained one


def test_table_pairs_against_opd_and_keeps_one_file_per_recipe(continual, tmp_path):
    reproduce = _load("reproduce")
    rng = np.random.default_rng(0)

    def row(add_after: float, recipe: str) -> dict:
        return {"recipe": recipe, "before": {"addition": [0.9] * 100, "task_b": [0.0] * 100},
                "after": {"addition": list(np.clip(add_after + 0.05 * rng.standard_normal(100), 0, 1)),
                          "task_b": [0.5] * 100}}

    for lr, kept in ((3e-5, {"opd": 0.4, "aopd": 0.6}), (3e-4, {"opd": 0.0, "aopd": 0.0})):
        a = argparse.Namespace(init="strong", task_b="max", steps=100, batch=32, lr=lr, methods="opd,aopd",
                               seeds="2,3,4", eval_problems=100)
        recipe = f"recipe lr {lr}"
        done = {f"strong/{m}/seed{s}": row(v, recipe) for m, v in kept.items() for s in (2, 3, 4)}
        continual.write_table(tmp_path, done, a, recipe, reproduce.paired_bootstrap)
    mild = (tmp_path / "CONTINUAL_strong_max_100x32_lr3e-05.md").read_text()
    harsh = (tmp_path / "CONTINUAL_strong_max_100x32_lr0.0003.md").read_text()
    aopd_mild = next(line for line in mild.splitlines() if line.startswith("| AOPD | 3 | +"))
    assert "(3 of 3 ahead)" in aopd_mild and "no difference" not in aopd_mild.split("|")[4]
    assert "| OPD | 3 | 90.0 ± 0.0 |" in harsh and "+0.0 (0 of 3 ahead)" in harsh
