"""Measure the two properties the multisum task was made for (issue 20), on held-out problems, and print each
beside its target:

1. Several valid paths: the committed teacher's entropy at the choice points of its own samples (T = 1), the
   positions where more than one token continues a valid solution (ms.valid_next), and that the paths it takes
   are valid and reach the right answer.
2. A teacher that recovers: the share of its samples (T = 1) that end with the right answer after a prefix with
   a student-style mistake: (a) synthetic mistakes (ms.corrupted_example, the training distribution's kinds,
   cut 1-6 tokens after the mistake); (b) the student's own wrong samples (--student, the weak one by default),
   cut 1-6 tokens after their first mistake (ms.first_mistake).

    python -m toy.multisum_properties [--n 1000] [--teacher DIR] [--student DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch

from toy import multisum as ms
from toy.multisum_teacher import complete

TARGET_ENTROPY, TARGET_RECOVERY = 0.5, 0.8
LINES: list[str] = []


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


@torch.no_grad()
def next_token_logprobs(model, tok, problems, completions) -> list[torch.Tensor]:
    """log p(. | prompt, completion[:i]) for every completion position i, one [len(completion), V] per sample."""
    out = []
    for a in range(0, len(problems), 128):
        seqs = [tok.convert_tokens_to_ids(ms.prompt(p).split() + c) for p, c in
                zip(problems[a : a + 128], completions[a : a + 128], strict=True)]
        lens = [len(s) for s in seqs]
        L = max(lens)
        ids = torch.tensor([s + [tok.pad_token_id] * (L - len(s)) for s in seqs])
        attn = (torch.arange(L)[None, :] < torch.tensor(lens)[:, None]).long()
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), dim=-1)
        for r, (p, c) in enumerate(zip(problems[a : a + 128], completions[a : a + 128], strict=True)):
            n_prompt = len(ms.prompt(p).split())
            out.append(logp[r, n_prompt - 1 : n_prompt - 1 + len(c)])
    return out


def several_paths(teacher, tok, problems, seed: int) -> None:
    n = 4
    outs = complete(teacher, tok, problems, n=n, seed=seed)
    probs = [p for p in problems for _ in range(n)]
    lps = next_token_logprobs(teacher, tok, probs, outs)
    h_choice, h_valid, mass, h_other = [], [], [], []
    for p, o, lp in zip(probs, outs, lps, strict=True):
        for i in range(len(o)):
            if o[i] == ms.WAIT:  # the clean choice points are those before any rollback
                break
            valid = ms.valid_next(o[:i], p)
            if not valid:
                break
            h = -(lp[i].exp() * lp[i]).sum().item()
            if len(valid) > 1:
                v = torch.tensor(tok.convert_tokens_to_ids(sorted(valid)))
                pv = lp[i, v].exp()
                q = pv / pv.sum()
                h_choice.append(h)
                h_valid.append(-(q * q.log()).sum().item())
                mass.append(pv.sum().item())
            else:
                h_other.append(h)
    h = mean(h_choice)
    right = [ms.verify(o, p) for p, o in zip(probs, outs, strict=True)]
    boxed = [ms.last_boxed(o) == sum(p) for p, o in zip(probs, outs, strict=True)]
    orders = [len({tuple(outs[k * n + j]) for j in range(n) if right[k * n + j]}) for k in range(len(problems))]
    all_accepted = all(ms.verify(t, p) for p in problems for t in ms.clean_tokens(p))
    n_paths = sum(len(ms.paths(p)) for p in problems) / len(problems)
    say(f"[1] several valid paths: teacher samples at T=1, {len(problems)} held-out problems x {n}")
    say(f"    entropy at choice points (nats): {h:.3f}  (target >= {TARGET_ENTROPY})  "
          f"{'MET' if h >= TARGET_ENTROPY else 'NOT MET'}")
    say(f"    choice points: {len(h_choice)} ({len(h_choice) / len(outs):.2f} per sample); teacher mass on the valid "
          f"continuations there {mean(mass):.3f}; entropy over the valid ones (renormalised) "
          f"{mean(h_valid):.3f} (uniform over the orders: ln 3 = {math.log(3):.3f} / ln 2 = "
          f"{math.log(2):.3f}); entropy at the other positions {mean(h_other):.4f}")
    say(f"    samples that are a valid path to the right answer {mean(right):.3f}; right last box "
          f"{mean(boxed):.3f}; with a wait {sum(ms.WAIT in o for o in outs) / len(outs):.3f}")
    say(f"    distinct valid orders among a problem's {n} samples: mean {mean(orders):.2f} "
          f"({dict(sorted(Counter(orders).items()))}); valid orders per problem {n_paths:.2f}, every one accepted "
          f"by the verifier with the right answer: {all_accepted}")


def recovery(teacher, student, tok, problems, seed: int, student_name: str) -> None:
    rng = random.Random(seed)
    synth = [ms.corrupted_example(p, rng).prefix for p in problems]
    outs = complete(teacher, tok, problems, synth, seed=seed)
    rate = sum(ms.last_boxed(o) == sum(p) for o, p in zip(outs, problems, strict=True)) / len(problems)
    valid = sum(ms.verify(o, p) for o, p in zip(outs, problems, strict=True)) / len(problems)
    waited = sum(ms.WAIT in o[len(x):] for o, x in zip(outs, synth, strict=True)) / len(problems)
    say("[2] recovery: teacher samples at T=1 after a prefix with a mistake, held-out problems")
    say(f"    (a) synthetic student-style mistakes, {len(problems)} prefixes: right final answer {rate:.3f}  "
          f"(target >= {TARGET_RECOVERY})  {'MET' if rate >= TARGET_RECOVERY else 'NOT MET'}; valid path after "
          f"the rollbacks {valid:.3f}; said wait {waited:.3f}")
    if student is None:
        return
    s_outs = complete(student, tok, problems, seed=seed)
    cut_probs, prefixes = [], []
    for p, o in zip(problems, s_outs, strict=True):
        body = o[: o.index(ms.EOS)] if ms.EOS in o else o
        m = ms.first_mistake(body + ([ms.EOS] if ms.EOS in o else []), p)
        if m is not None and m < len(body):
            cut_probs.append(p)
            prefixes.append(body[: rng.randint(m + 1, min(m + 6, len(body)))])
    outs = complete(teacher, tok, cut_probs, prefixes, seed=seed + 1)
    rate = sum(ms.last_boxed(o) == sum(p) for o, p in zip(outs, cut_probs, strict=True)) / max(1, len(cut_probs))
    say(f"    (b) {student_name}'s own wrong samples ({len(cut_probs)} of {len(problems)}), cut 1-6 tokens after "
          f"the first mistake: right final answer {rate:.3f}  (target >= {TARGET_RECOVERY})  "
          f"{'MET' if rate >= TARGET_RECOVERY else 'NOT MET'}")
    for p, x, o in list(zip(cut_probs, prefixes, outs, strict=True))[:3]:
        say(f"        e.g. {ms.prompt(p)} | {' '.join(x)} || {' '.join(o[len(x):])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ms.ASSETS / "teacher"))
    ap.add_argument("--student", default=str(ms.ASSETS / "student_weak"), help="'' to skip measurement (b)")
    ap.add_argument("--n", type=int, default=1000, help="held-out problems (toy/data/multisum/test.jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="also write the report to <teacher>/../PROPERTIES.md")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    t0 = time.time()
    tok = ms.build_tokenizer()
    problems = ms.read_problems(ms.DATA / "test.jsonl")[: a.n]
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32).eval() if a.student else None
    several_paths(teacher, tok, problems[: max(1, a.n // 4)], a.seed)
    recovery(teacher, student, tok, problems, a.seed, Path(a.student).name if a.student else "student")
    say(f"({time.time() - t0:.0f}s)")
    if a.write:
        cmd = f"python -m toy.multisum_properties --n {a.n} --seed {a.seed}"
        (Path(a.teacher).parent / "PROPERTIES.md").write_text(f"`{cmd}` printed:\n\n```\n" + "\n".join(LINES) + "\n```\n")


if __name__ == "__main__":
    main()
