"""Problem loading and prompt sampling: JSONL and Parquet files through `datasets`, errors that name the
available fields and the config key to fix, prompt tokenization with and without a chat template (and a
system prompt), answers coerced to str, `limit`; PromptSampler epochs, determinism and exact resume."""

from __future__ import annotations

import json

import datasets
import pytest

from student_trainer.data import Problem, PromptSampler, load_problems
from student_trainer.tiny_models import build_tokenizer

ROWS = [
    {"prompt": "1 + 2", "answer": 3},
    {"prompt": "2 * 5", "answer": 10},
    {"prompt": "7 - 9", "answer": -2},
]
# Under this template the user turn becomes `<bos> <content> =` and the generation prompt `:`.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}# {{ m['content'] }} ; "
    "{% else %}<bos> {{ m['content'] }} ={% endif %}{% endfor %}{% if add_generation_prompt %} :{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def chat_tokenizer(tmp_path):
    tok = build_tokenizer(tmp_path)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_plain_prompt(tmp_path, tokenizer):
    problems = load_problems(write_jsonl(tmp_path / "p.jsonl", ROWS), tokenizer)
    assert [p.index for p in problems] == [0, 1, 2]
    assert [p.prompt for p in problems] == ["1 + 2", "2 * 5", "7 - 9"]
    assert [p.answer for p in problems] == ["3", "10", "-2"]  # ints coerced to str
    assert problems[0].prompt_ids == tokenizer("1 + 2")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(problems[0].prompt_ids) == ["1", "+", "2"]
    assert problems[1].raw == {"prompt": "2 * 5", "answer": 10}


def test_parquet_equals_jsonl(tmp_path, tokenizer):
    rows = [{"question": r["prompt"], "solution": str(r["answer"])} for r in ROWS]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    write_jsonl(tmp_path / "p.jsonl", rows)
    kw = dict(prompt_field="question", answer_field="solution")
    from_parquet = load_problems(tmp_path / "p.parquet", tokenizer, **kw)
    from_jsonl = load_problems(tmp_path / "p.jsonl", tokenizer, **kw)
    assert from_parquet == from_jsonl
    assert [p.answer for p in from_parquet] == ["3", "10", "-2"]


def test_limit(tmp_path, tokenizer):
    problems = load_problems(write_jsonl(tmp_path / "p.jsonl", ROWS), tokenizer, limit=2)
    assert [p.index for p in problems] == [0, 1]
    assert len(load_problems(tmp_path / "p.jsonl", tokenizer, limit=10)) == 3


def test_prompts_without_answers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in ROWS])
    assert [p.answer for p in load_problems(path, tokenizer, answer_field=None)] == ["", "", ""]
    with pytest.raises(ValueError, match="field 'answer' not in .* \\(fields: prompt\\); set data.answer_field"):
        load_problems(path, tokenizer)


def test_missing_field_names_fields_and_config_key(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError) as e:
        load_problems(path, tokenizer, prompt_field="question")
    assert str(e.value) == f"field 'question' not in dataset {path} (fields: prompt, answer); set data.prompt_field"
    with pytest.raises(ValueError, match="field 'solution' not in .*set data.answer_field"):
        load_problems(path, tokenizer, answer_field="solution")


def test_bad_files(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl", tokenizer)
    (tmp_path / "p.csv").write_text("prompt,answer\n1,2\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_problems(tmp_path / "p.csv", tokenizer)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "1", "answer": \n')
    with pytest.raises(ValueError, match="could not read"):
        load_problems(tmp_path / "broken.jsonl", tokenizer)


def test_chat_template_applied_when_present(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    problems = load_problems(path, chat_tokenizer)
    assert chat_tokenizer.convert_ids_to_tokens(problems[0].prompt_ids) == ["<bos>", "1", "+", "2", "=", ":"]
    assert all(isinstance(t, int) for t in problems[0].prompt_ids)
    assert problems[0].prompt == "1 + 2"  # the raw text, not the templated one

    plain = load_problems(path, chat_tokenizer, apply_chat_template=False)
    assert chat_tokenizer.convert_ids_to_tokens(plain[0].prompt_ids) == ["1", "+", "2"]

    with_system = load_problems(path, chat_tokenizer, system_prompt="w1 w2")
    assert chat_tokenizer.convert_ids_to_tokens(with_system[0].prompt_ids) == [
        "#", "w1", "w2", ";", "<bos>", "1", "+", "2", "=", ":"
    ]  # fmt: skip


def test_chat_template_required_but_missing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(ValueError, match="no chat template; set data.apply_chat_template"):
        load_problems(path, tokenizer, apply_chat_template=True)
    # without a template, a system prompt is prepended to the text
    problems = load_problems(path, tokenizer, system_prompt="w7")
    assert tokenizer.convert_ids_to_tokens(problems[0].prompt_ids) == ["w7", "1", "+", "2"]


def problems_(n: int) -> list[Problem]:
    return [Problem(prompt=str(i), answer=str(i), prompt_ids=[i + 4], index=i) for i in range(n)]


def indices(batch: list[Problem]) -> list[int]:
    return [p.index for p in batch]


def test_sampler_epochs_are_permutations():
    sampler = PromptSampler(problems_(10), seed=3)
    epoch0 = indices(sampler.next_batch(4) + sampler.next_batch(4) + sampler.next_batch(2))
    epoch1 = indices(sampler.next_batch(10))
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and epoch0 != list(range(10))  # shuffled, differently per epoch
    assert sampler.epoch == 1 and sampler.position == 10


def test_sampler_batch_crosses_epoch_boundary():
    sampler = PromptSampler(problems_(5), seed=0)
    first = indices(sampler.next_batch(3))
    crossing = indices(sampler.next_batch(4))  # the last 2 of epoch 0, then 2 of epoch 1
    assert sorted(first + crossing[:2]) == list(range(5))
    assert sampler.epoch == 1 and sampler.position == 2
    assert len(indices(sampler.next_batch(12))) == 12  # a batch larger than the dataset wraps around


def test_sampler_deterministic_per_seed():
    def stream(seed):
        sampler = PromptSampler(problems_(7), seed=seed)
        return [indices(sampler.next_batch(3)) for _ in range(6)]

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)
    unshuffled = PromptSampler(problems_(7), shuffle=False)
    assert indices(unshuffled.next_batch(9)) == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_sampler_resume_mid_epoch():
    reference = PromptSampler(problems_(7), seed=5)
    for _ in range(3):
        reference.next_batch(3)  # 9 problems in: epoch 1, position 2
    state = json.loads(json.dumps(reference.state_dict()))  # as it would be saved in a checkpoint
    assert state["epoch"] == 1 and state["position"] == 2 and state["seed"] == 5

    resumed = PromptSampler(problems_(7), seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    for _ in range(5):
        assert indices(resumed.next_batch(3)) == indices(reference.next_batch(3))


def test_sampler_resume_rejects_other_dataset():
    state = PromptSampler(problems_(7)).state_dict()
    with pytest.raises(ValueError, match="saved with 7 problems but 6"):
        PromptSampler(problems_(6)).load_state_dict(state)
