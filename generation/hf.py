"""Batched sampling with transformers `generate`: n samples per prompt, left padding, cut at the first EOS; and
`load_causal_lm`, how both the trainer and the hf teacher read a model.

    samples = sample(model, tokenizer, prompts, n=4, max_new_tokens=256, temperature=1.0, seed=0)
    samples[0].completion_ids, samples[0].logprobs, samples[0].finished, samples[0].prompt_index

`logprobs` (with `record_logprobs=True`) is the sampling policy's log-probability of each completion token at
temperature 1, i.e. under the policy itself, before temperature / top-p: what a trainer needs for the
stale-policy importance weight. Logit-modifying defaults a model's generation_config may carry (repetition
penalty, n-gram bans, min_p, ...) are switched off: on-policy means the policy itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device | None = None, meta: bool = False) -> torch.nn.Module:
    """A Hugging Face causal LM from `path`: read from disk straight onto `device` (a GPU: no host copy of the
    weights; None or a CPU: the host), or, with `meta`, built from its config alone on the meta device (no
    storage: its weights come later from rank 0, see student_trainer.parallel.fill_from_rank0). Loading onto a
    GPU goes through transformers' `device_map` (accelerate), one tensor at a time from the safetensors mmap."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not meta:
        on_device = device is not None and device.type != "cpu"
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"device_map": {"": device}} if on_device else {}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    try:  # what from_pretrained would read, so that sampling defaults do not depend on the rank
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return model


@dataclass
class Sample:
    prompt_index: int  # index of the prompt in the sample() call
    completion_ids: list[int]  # up to and including the first EOS, else max_new_tokens tokens
    logprobs: np.ndarray | None  # float32 [len(completion_ids)] with record_logprobs, else None
    finished: bool  # ended with EOS (else hit max_new_tokens)


class _RecordLogprobs(LogitsProcessor):
    """Records log p(chosen token) under the raw (temperature-1) policy, one [B] vector per step.

    A logits processor sees step t's scores before sampling and step t+1's input ids, whose last column is
    the token chosen at step t; so it keeps one [B, V] log-softmax and gathers it a step later.
    transformers runs it after the model's own processors (penalties, which `sample` switches off) and
    before the temperature / top-p warpers, so it sees the raw logits.
    """

    def __init__(self) -> None:
        self.prev_logp_BV: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._collect(input_ids[:, -1])
        self.prev_logp_BV = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _collect(self, chosen_B: torch.Tensor) -> None:
        if self.prev_logp_BV is not None:
            self.steps.append(self.prev_logp_BV.gather(1, chosen_B[:, None]).squeeze(1))
            self.prev_logp_BV = None

    def finish(self, sequences_BL: torch.Tensor) -> torch.Tensor:
        self._collect(sequences_BL[:, -1])
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(sequences_BL.shape[0], 0)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[list[int]],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 64,
    record_logprobs: bool = True,
) -> list[Sample]:
    """n samples per prompt, ordered prompt-major: [p0s0, p0s1, ..., p1s0, ...]; `batch_size` sequences per
    `generate` call. `temperature=0` is greedy."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")
    expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)  # transformers samples with the global generator
    was_training = model.training
    model.eval()
    out: list[Sample] = []
    try:
        for a in range(0, len(expanded), batch_size):
            chunk = expanded[a : a + batch_size]
            width = max(len(p) for _, p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, p) in enumerate(chunk):  # per sequence, left padding
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            recorder = _RecordLogprobs() if record_logprobs else None
            seqs = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                logits_processor=LogitsProcessorList([recorder] if recorder is not None else []),
                # Neutralise logit-modifying defaults a model's generation_config may carry (they would run
                # before the recorder and change the policy being sampled): on-policy means the policy itself.
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                min_new_tokens=0,
                min_p=None,
                typical_p=1.0,
            )
            completion = seqs[:, width:].cpu()
            logp = recorder.finish(seqs).cpu() if recorder is not None else None
            is_eos = completion == eos
            # length up to and including the first EOS, else all generated tokens
            has_eos = is_eos.any(dim=1)
            first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1) + 1, completion.shape[1])
            for r, (pi, _) in enumerate(chunk):
                L = int(first_eos[r])
                lp = logp[r, :L].numpy().astype(np.float32) if logp is not None else None
                out.append(Sample(pi, completion[r, :L].tolist(), lp, bool(has_eos[r])))
    finally:
        model.train(was_training)
    return out
