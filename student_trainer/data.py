"""Problems for training and evaluation: loading a local JSONL/Parquet file and sampling prompts from it.

`load_problems(path, tokenizer)` reads one problem per row (a prompt field and a reference answer field),
tokenizes the prompt (through the tokenizer's chat template when it has one) and returns `Problem`s.
`PromptSampler` walks the problems in shuffled epochs, deterministically for a seed, and saves/restores its
position so that a resumed run sees the same prompts it would have seen without the interruption.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Problem:
    prompt: str  # the prompt text as stored in the dataset (before any chat template)
    answer: str  # reference answer, coerced to str
    prompt_ids: list[int]  # what the student is conditioned on (chat template and special tokens applied)
    index: int  # row in the data file
    raw: dict = field(default_factory=dict, repr=False)  # the whole row, for fields the caller may want


def load_problems(
    path: str | Path,
    tokenizer,
    *,
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    apply_chat_template: bool | None = None,
    system_prompt: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Read problems from a local `.jsonl`/`.json` or `.parquet` file.

    apply_chat_template: None uses the tokenizer's chat template when it has one; True requires one;
      False tokenizes the prompt text as is (with the tokenizer's own special tokens, e.g. BOS if it adds one).
    answer_field: None for prompts without reference answers (plain distillation); every answer is then "".
    system_prompt: a system message under a chat template; without one it is prepended to the prompt text.
    limit: keep only the first `limit` rows.
    """
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"data file {path} has an unsupported extension; use one of {', '.join(FORMATS)}")
    try:
        ds = load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # pyarrow/datasets errors (bad JSON, mixed column types) -> one clear error
        raise ValueError(f"could not read {path} as {fmt}: {type(e).__name__}: {e}") from e

    fields = ", ".join(ds.column_names)
    for name, key in ((prompt_field, "prompt_field"), (answer_field, "answer_field")):
        if name is not None and name not in ds.column_names:
            raise ValueError(f"field {name!r} not in dataset {path} (fields: {fields}); set data.{key}")
    if len(ds) == 0:
        raise ValueError(f"dataset {path} has no rows")

    has_template = getattr(tokenizer, "chat_template", None) is not None
    if apply_chat_template is None:
        apply_chat_template = has_template
    elif apply_chat_template and not has_template:
        raise ValueError("the tokenizer has no chat template; set data.apply_chat_template to false")

    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))

    problems = []
    for i, row in enumerate(ds):
        prompt, answer = row[prompt_field], row[answer_field] if answer_field is not None else ""
        if not isinstance(prompt, str):
            raise ValueError(
                f"row {i} of {path}: field {prompt_field!r} must be a string, got {type(prompt).__name__}"
            )
        if answer is None:
            raise ValueError(f"row {i} of {path}: field {answer_field!r} is empty")
        if apply_chat_template:
            prompt_ids = _chat_ids(tokenizer, prompt, system_prompt)
        else:
            text = prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
            prompt_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if not prompt_ids:
            raise ValueError(f"row {i} of {path}: the prompt tokenizes to no tokens")
        problems.append(Problem(prompt=prompt, answer=str(answer), prompt_ids=prompt_ids, index=i, raw=dict(row)))
    logger.info("loaded %d problems from %s (chat template: %s)", len(problems), path, apply_chat_template)
    return problems


def _chat_ids(tokenizer, prompt: str, system_prompt: str | None) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    out: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; older versions a plain list
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):  # batched form of a single conversation
        (out,) = out
    return [int(t) for t in out]


class PromptSampler:
    """Problems in shuffled epochs: epoch e is a permutation drawn from (seed, e), so the order depends only
    on the seed and the number of problems, and `state_dict()` (epoch, position) pins the next batch exactly.

    A batch that runs past the end of an epoch continues into the next one.
    """

    def __init__(self, problems: list[Problem], *, seed: int = 0, shuffle: bool = True):
        if not problems:
            raise ValueError("PromptSampler needs at least one problem")
        self.problems = problems
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.problems))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def next_batch(self, n: int) -> list[Problem]:
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(batch), len(self._order) - self.position)
            batch += [self.problems[i] for i in self._order[self.position : self.position + take]]
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "shuffle": self.shuffle,
            "num_problems": len(self.problems),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_problems"] != len(self.problems):
            raise ValueError(
                f"the sampler state was saved with {state['num_problems']} problems but {len(self.problems)} are "
                "loaded now; resume with the same data file"
            )
        if not 0 <= state["position"] <= state["num_problems"]:
            raise ValueError(f"invalid sampler position {state['position']} for {state['num_problems']} problems")
        self.seed = state["seed"]
        self.shuffle = state.get("shuffle", True)
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._epoch_order(self.epoch)
