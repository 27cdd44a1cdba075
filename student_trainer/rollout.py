"""Rollout generation behind a small interface: the student samples completions for prompts.

`Generator.generate(prompts, n, ...)` returns one `Rollout` per (prompt, sample): prompt ids, completion ids
(ending at EOS or the length limit), whether EOS was reached, and the sampling policy's log-probability of
each completion token (temperature 1, i.e. the policy itself, before temperature/top-p), which the losses
use for the stale-policy importance weight. `HFGenerator` uses transformers `generate` (`generation.hf`);
`VLLMGenerator` (student_trainer/rollout_vllm.py) a vLLM engine.

A generator also carries its own lifecycle, so the training loop never asks which engine it has:
`before_update()` once a step's rollouts are in (vLLM frees its GPU memory for the update),
`after_update(weights)` after the optimizer step (the engine or replica takes the new weights), `close()`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from generation.hf import sample

if TYPE_CHECKING:
    from student_trainer.parallel import StudentWeights


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: np.ndarray  # float32 [len(completion_ids)]
    finished: bool  # ended with EOS (else hit max_new_tokens)
    prompt_index: int  # index of the prompt in the generate() call

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


class Generator(abc.ABC):
    @abc.abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Rollout]:
        """n samples per prompt, ordered prompt-major: [p0s0, p0s1, ..., p1s0, ...]."""

    def before_update(self) -> None:  # noqa: B027 (a no-op unless the engine holds memory the update needs)
        """The step's rollouts are generated; the optimizer update comes next."""

    def after_update(self, weights: StudentWeights) -> None:  # noqa: B027
        """The optimizer stepped: sample from `weights` (the trainer's current policy) from now on."""

    def close(self) -> None:  # noqa: B027
        """Release the engine."""


class HFGenerator(Generator):
    """Batched sampling with transformers `generate` (left padding), `batch_size` sequences at a time.

    `model` is the trainer's own module in one process; under FSDP it is a full replica on each rank, which
    `after_update` makes equal to the sharded policy."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")

    def generate(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=None) -> list[Rollout]:
        samples = sample(
            self.model, self.tokenizer, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, batch_size=self.batch_size,
        )
        return [Rollout(list(prompts[s.prompt_index]), s.completion_ids, s.logprobs, s.finished, s.prompt_index)
                for s in samples]

    def after_update(self, weights: StudentWeights) -> None:
        if self.model is not weights.model:  # a replica: copy the sharded policy in (collective)
            weights.copy_into(self.model)
