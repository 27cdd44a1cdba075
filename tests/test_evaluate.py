"""Evaluation: the unbiased pass@k against brute-force enumeration of k-subsets, `\\boxed{}` extraction
(nesting, last box, spaced-out decodes), math-verify equivalences (also off the main thread), evaluate() on
hand-made completions with exactly known pass@k, evaluate() with a real HFGenerator on a tiny model, and the
`python -m student_trainer.evaluate` command in a subprocess."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.data import Problem
from student_trainer.evaluate import evaluate, extract_boxed, is_correct, main, pass_at_k
from student_trainer.rollout import Generator, HFGenerator, Rollout

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(200, 100) overflows float64 in the naive ratio; the product form does not
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(1000, 0, 500) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_rejects_invalid():
    with pytest.raises(ValueError, match="at least k=5 samples"):
        pass_at_k(4, 2, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


# ---------------------------------------------------------------------------------------------------------
# Verifier
# ---------------------------------------------------------------------------------------------------------


def spaced(text: str) -> str:
    """How the tiny word-level tokenizer decodes text written one character per token."""
    return " ".join(text.replace(" ", ""))


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{a{b{c}}d} then \boxed{7}") == "7"
    assert extract_boxed(r"first \boxed{3}, then \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_boxed("the answer is 12") is None
    assert extract_boxed(r"\boxed{3} and cut off \boxed{\frac{1}{2}") is None  # the last box never closes
    assert extract_boxed(spaced(r"w1 \boxed{12}")) == "12"
    assert extract_boxed(r"\boxed{}") == ""


@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"The answer is \boxed{1/2}.", "0.5"),
        (r"\boxed{\frac{1}{2}}", "1/2"),
        (r"\boxed{x+1}", "1+x"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{2^{10}}", "1024"),
        (r"\boxed{12}", r"\boxed{12}"),  # a boxed reference answer
        (r"first \boxed{3}, finally \boxed{12}", "12"),  # the last box is the answer
        (spaced(r"\boxed{12}"), "12"),  # a spaced-out decode
    ],
)
def test_is_correct_equivalences(completion, answer):
    assert is_correct(completion, answer)


@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"\boxed{13}", "12"),
        (r"\boxed{x-1}", "x+1"),
        ("the answer is 12", "12"),  # no box
        (r"\boxed{12}, no wait: \boxed{13}", "12"),
        (r"\boxed{}", "12"),
        (r"\boxed{\frac{1}{2}", "1/2"),  # cut off inside the box
        (r"\boxed{)(}", "12"),  # unparseable
    ],
)
def test_is_correct_rejects(completion, answer):
    assert not is_correct(completion, answer)


def test_is_correct_collapse_whitespace():
    # A tokenizer with `\boxed{` as one word decodes as `\boxed{ 1 2 }`, which math-verify does not read as 12.
    assert not is_correct(r"\boxed{ 1 2 }", "12")
    assert is_correct(r"\boxed{ 1 2 }", "12", collapse_whitespace=True)


def test_is_correct_off_the_main_thread():
    # math-verify's signal-based timeouts raise outside the main thread; the verifier must still work there
    results = []
    thread = threading.Thread(target=lambda: results.extend([is_correct(r"\boxed{1/2}", "0.5"), is_correct("x", "1")]))
    thread.start()
    thread.join()
    assert results == [True, False]


# ---------------------------------------------------------------------------------------------------------
# evaluate() with pre-set completions
# ---------------------------------------------------------------------------------------------------------


class FakeGenerator(Generator):
    """Returns pre-set completions per prompt: {tuple(prompt_ids): [(completion_ids, finished), ...]}."""

    def __init__(self, table: dict[tuple[int, ...], list[tuple[list[int], bool]]]):
        self.table = table
        self.calls = []

    def generate(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        self.calls.append(dict(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed))
        out = []
        for i, p in enumerate(prompts):
            samples = self.table[tuple(p)]
            assert len(samples) == n
            for ids, finished in samples:
                out.append(Rollout(list(p), ids, np.zeros(len(ids), np.float32), finished, i))
        return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


# (answer, [(completion text as the model writes it, correct?, finished?)])
HAND_MADE = {
    "A": ("12", [(r"w1 \boxed{12}", True, True), (r"\boxed{13}", False, True), ("w2 12", False, True),
                 (r"\boxed{24/2}", True, False)]),
    "B": ("1/2", [(r"\boxed{2}", False, True), (r"\boxed{}", False, True), (r"w3 \boxed{1/2", False, False),
                  ("w4 w5", False, False)]),
    "C": ("x+1", [(r"\boxed{1+x}", True, True), (r"\boxed{x+1}", True, True), (r"\boxed{\frac{2x+2}{2}}", True, True),
                  (r"\boxed{3} w6 \boxed{1+x}", True, True)]),
}  # fmt: skip


def test_evaluate_known_pass_at_k(tokenizer):
    problems, table, expected_lens = [], {}, []
    for index, (name, (answer, samples)) in enumerate(HAND_MADE.items()):
        prompt_ids = tokenizer(f"w{100 + index} {name}")["input_ids"]
        problems.append(Problem(prompt=name, answer=answer, prompt_ids=prompt_ids, index=10 + index))
        rows = []
        for text, _, finished in samples:
            ids = tokenizer(spaced(text))["input_ids"] + ([tokenizer.eos_token_id] if finished else [])
            rows.append((ids, finished))
            expected_lens.append(len(ids))
        table[tuple(prompt_ids)] = rows
    generator = FakeGenerator(table)

    result = evaluate(generator, tokenizer, problems, n=4, ks=(1, 2, 4), max_new_tokens=32, temperature=0.7, seed=3)

    assert generator.calls == [dict(n=4, max_new_tokens=32, temperature=0.7, top_p=1.0, seed=3)]
    # A: 2 of 4 correct, B: 0 of 4, C: 4 of 4; pass@2 for c=2 of 4 is 1 - C(2,2)/C(4,2) = 5/6
    assert result.metrics["eval/pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert result.metrics["eval/pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert result.metrics["eval/pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    assert result.metrics["eval/mean_len"] == pytest.approx(np.mean(expected_lens))
    assert result.metrics["eval/frac_finished"] == pytest.approx(9 / 12)
    assert set(result.metrics) == {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/mean_len", "eval/frac_finished"}

    a, b, c = result.per_problem
    assert [p["index"] for p in result.per_problem] == [10, 11, 12]
    assert (a["correct"], b["correct"], c["correct"]) == (2, 0, 4)
    assert (a["pass@1"], a["pass@2"], a["pass@4"]) == pytest.approx((0.5, 5 / 6, 1.0))
    for record, (_, samples) in zip(result.per_problem, HAND_MADE.values(), strict=True):
        assert record["is_correct"] == [ok for _, ok, _ in samples]
        assert record["completions"] == [spaced(text) for text, _, _ in samples]  # special tokens skipped
        assert record["n"] == 4
    assert a["prompt"] == "A" and a["answer"] == "12"
    json.dumps(result.per_problem)  # the CLI writes these as JSONL


def test_evaluate_rejects_k_above_n(tokenizer):
    problems = [Problem(prompt="p", answer="1", prompt_ids=[4], index=0)]
    with pytest.raises(ValueError, match=r"every k must be in \[1, n=2\]"):
        evaluate(FakeGenerator({}), tokenizer, problems, n=2, ks=(1, 4))


def test_evaluate_rejects_wrong_rollout_count(tokenizer):
    problems = [Problem(prompt="p", answer="1", prompt_ids=[4], index=0)]

    class Short(FakeGenerator):
        def generate(self, prompts, n, **kw):
            return super().generate(prompts, n, **kw)[:1]

    with pytest.raises(RuntimeError, match="returned 1 rollouts for 1 prompts x n=2"):
        evaluate(Short({(4,): [([5], True), ([6], True)]}), tokenizer, problems, n=2, ks=(1,))


# ---------------------------------------------------------------------------------------------------------
# evaluate() on a real tiny model, and the CLI
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_with_hf_generator(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    generator = HFGenerator(model, tokenizer, batch_size=3)
    problems = [
        Problem(prompt=text, answer=answer, prompt_ids=tokenizer(text)["input_ids"], index=i)
        for i, (text, answer) in enumerate([("1 + 2 =", "3"), ("w5 w6 w7 ?", "12")])
    ]
    kw = dict(n=2, ks=(1, 2), max_new_tokens=6, seed=0)
    result = evaluate(generator, tokenizer, problems, **kw)
    for key in ("eval/pass@1", "eval/pass@2", "eval/frac_finished"):
        assert 0.0 <= result.metrics[key] <= 1.0
    assert 1 <= result.metrics["eval/mean_len"] <= 6
    assert [len(p["completions"]) for p in result.per_problem] == [2, 2]
    again = evaluate(generator, tokenizer, problems, **kw)  # seeded: the same samples
    assert [p["completions"] for p in again.per_problem] == [p["completions"] for p in result.per_problem]


def test_cli_subprocess(tiny_model_dir, tmp_path):
    data = tmp_path / "problems.jsonl"
    rows = [{"question": "1 + 2 =", "answer": "3"}, {"question": "w9 ?", "answer": "1/2"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "results" / "eval.jsonl"
    cmd = [sys.executable, "-m", "student_trainer.evaluate", "--model", str(tiny_model_dir), "--data", str(data),
           "--n", "2", "--k", "1,2", "--max-new-tokens", "5", "--prompt-field", "question", "--batch-size", "2",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/pass@1" in proc.stdout and "eval/pass@2" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert [r["answer"] for r in records] == ["3", "1/2"]
    assert all(len(r["completions"]) == 2 and 0 <= r["pass@1"] <= 1 for r in records)


def test_cli_k_above_n_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "unused", "--data", "unused.jsonl", "--n", "2", "--k", "1,4"])
    assert e.value.code == 2
    assert "--k 4 exceeds --n 2" in capsys.readouterr().err
