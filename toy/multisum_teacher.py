"""Train the multisum teacher (toy/multisum.py): a Qwen3 (head_dim 64, so vLLM's CPU build can serve it) fitted
by supervised training on training-split problems, half of them clean solutions in a uniformly drawn order of
the 12, half a student-style mistake followed by `wait` and the redone step (no loss on the mistaken tokens,
so the teacher learns to recover without learning to err). Its weights are committed in
toy/assets/multisum/teacher; this script and its seed reproduce them.

    python -m toy.multisum_teacher [--steps 1500] [--out toy/assets/multisum/teacher] [--init DIR]

The committed teacher took two stages (see its TRAINING.md): 5000 steps from scratch (a 4 x 256 Qwen3, 3.4M
parameters; p_corrupt 0.6, lr 3e-3), then 2500 more from that checkpoint with --init (p_corrupt 0.8, lr 1e-3).
A 3 x 192 one (1.45M) trained likewise recovered from half as many of the weak student's mistakes.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from toy import multisum as ms
from toy.train_teacher import cosine, optimizer_step, padded_batch, qwen3

MAX_NEW_TOKENS = 64  # a clean solution is 25 tokens with EOS; one with a redone step up to ~55


def example(nums: ms.Problem, rng: random.Random, p_corrupt: float) -> tuple[list[str], list[int]]:
    """One training completion (tokens, EOS included) and its loss mask."""
    if rng.random() >= p_corrupt:
        toks = list(rng.choice(ms.clean_tokens(nums)))
        return toks, [1] * len(toks)
    c = ms.corrupted_example(nums, rng)
    mask = [1] * c.mistake + [0] * (len(c.prefix) - c.mistake) + [1] * len(c.redo)
    return c.prefix + c.redo, mask


def masked_batch(tok, examples: Sequence[tuple[ms.Problem, list[str], list[int]]]):
    """(problem, completion tokens, loss mask) -> input ids, attention mask, labels (-100 off the mask)."""
    seqs, labels = [], []
    for nums, toks, mask in examples:
        p_ids = tok.convert_tokens_to_ids(ms.prompt(nums).split())
        c_ids = tok.convert_tokens_to_ids(toks)
        seqs.append(p_ids + c_ids)
        labels.append([-100] * len(p_ids) + [i if m else -100 for i, m in zip(c_ids, mask, strict=True)])
    return padded_batch(seqs, labels, tok.pad_token_id)


def train_step(model, opt, sched, tok, examples) -> float:
    return optimizer_step(model, opt, sched, *masked_batch(tok, examples))


@torch.no_grad()
def complete(model, tok, problems: Sequence[ms.Problem], prefixes: Sequence[Sequence[str]] | None = None, *,
             n: int = 1, temperature: float = 1.0, seed: int = 0) -> list[list[str]]:
    """n sampled completions (as tokens, EOS kept) per problem, after each problem's completion prefix (the
    returned tokens include the prefix); prompt-major order."""
    from student_trainer.rollout import HFGenerator

    prefixes = prefixes if prefixes is not None else [[] for _ in problems]
    starts = [ms.prompt(p).split() + list(x) for p, x in zip(problems, prefixes, strict=True)]
    rolls = HFGenerator(model, tok, batch_size=256).generate(
        [tok.convert_tokens_to_ids(s) for s in starts], n, max_new_tokens=MAX_NEW_TOKENS, temperature=temperature,
        seed=seed)
    return [list(prefixes[r.prompt_index]) + tok.convert_ids_to_tokens(r.completion_ids) for r in rolls]


def accuracy(model, tok, problems: Sequence[ms.Problem], temperature: float = 1.0, seed: int = 0) -> float:
    """Share of completions that are a valid path to the right answer (ms.verify)."""
    outs = complete(model, tok, problems, temperature=temperature, seed=seed)
    return sum(ms.verify(o, p) for o, p in zip(outs, problems, strict=True)) / len(problems)


def recovery(model, tok, problems: Sequence[ms.Problem], seed: int = 0) -> float:
    """Share of the teacher's samples (T = 1) after a prefix with a student-style mistake whose last box is
    the right answer."""
    rng = random.Random(seed)
    prefixes = [ms.corrupted_example(p, rng).prefix for p in problems]
    outs = complete(model, tok, problems, prefixes, seed=seed)
    return sum(ms.last_boxed(o) == sum(p) for o, p in zip(outs, problems, strict=True)) / len(problems)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ms.ASSETS / "teacher"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--p-corrupt", type=float, default=0.5, help="share of examples with a mistake and its redo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", default=None, help="continue from this checkpoint (a second stage) instead of a fresh model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = ms.build_tokenizer()
    if a.init is None:
        model = qwen3(tok, a.hidden, a.layers, a.hidden // 64, max(1, a.hidden // 128), a.seed)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.init, dtype=torch.float32).train()
        a.hidden, a.layers = model.config.hidden_size, model.config.num_hidden_layers
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(100, a.steps))
    test = ms.sample_problems(200, held_out=True, seed=12345)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        batch = []
        while len(batch) < a.batch:
            nums = ms.random_problem(rng)
            if not ms.is_held_out(nums):
                batch.append((nums, *example(nums, rng, a.p_corrupt)))
        loss = train_step(model, opt, sched, tok, batch)
        if step % 100 == 0 or step == a.steps:
            msg = f"step {step} loss {loss:.4f}"
            if step % 500 == 0 or step == a.steps:
                model.eval()
                msg += (f" held-out sampled acc {accuracy(model, tok, test[:100]):.3f}"
                        f" recovery {recovery(model, tok, test[100:]):.3f}")
                model.train()
            print(f"{msg} ({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0
    model.eval()
    greedy, sampled = accuracy(model, tok, test, temperature=0.0), accuracy(model, tok, test)
    rec = recovery(model, tok, test, seed=1)
    line = (f"Held-out (200 problems): valid path to the right answer, greedy {greedy:.3f}, sampled at T=1 "
            f"{sampled:.3f}; after a student-style mistake (T=1) right final answer {rec:.3f}.")
    print(line)
    out = Path(a.out)
    model.to(torch.bfloat16).save_pretrained(str(out))  # bf16 on disk: a few MB; served in float32
    tok.save_pretrained(str(out))
    stage = f" --init {a.init}" if a.init else ""
    before = Path(a.init) / "TRAINING.md" if a.init else None
    history = ""
    if before is not None and before.exists():
        history = "\nIts --init checkpoint's TRAINING.md:\n\n> " + before.read_text().replace("\n", "\n> ")
    (out / "TRAINING.md").write_text(
        f"Trained by `python -m toy.multisum_teacher{stage} --steps {a.steps} --batch {a.batch} --lr {a.lr} --hidden "
        f"{a.hidden} --layers {a.layers} --p-corrupt {a.p_corrupt} --seed {a.seed} --threads {a.threads}` in "
        f"{train_s:.0f}s on the CPU with torch threads {a.threads}.\n{line}\n"
        "Measured properties: `python -m toy.multisum_properties`.\n" + history
    )


if __name__ == "__main__":
    main()
