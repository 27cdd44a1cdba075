"""The second toy task: the sum of three 2-digit numbers, added two at a time in any order with the partial sums
written out, and a `wait` that takes back a wrong step and redoes it.

    prompt:     Q : 4 7 + 2 8 + 9 1 = ?
    completion: 4 7 + 9 1 = 1 3 8 ; 2 8 + 1 3 8 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>
    corrected:  4 7 + 9 1 = 1 3 9 ; 1 3 wait 4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>

A step adds any two of the values still pending (the numbers not yet used and the partial sums), written in
either order, and the box holds the last value. With three distinct numbers there are 12 solutions (which pair
first, in which order, then the order of the second step), all valid and all reaching the same answer: unlike
the addition task, the solution has choice points where several continuations are right (`valid_next`).

`wait` rolls the text back to the start of its first wrong item (a step, or the box) since the last rollback,
and what follows redoes that item; the text before the wrong item stands. `parse` applies these rollbacks and
judges the path: valid when every item left standing is right and it ends with the right box. The trainer's
own verifier (student_trainer.evaluate.is_correct) reads only the last `\\boxed{}`, which a rollback never
leaves behind: `\\boxed{166}` is the last box of the decoded text in every valid path.

The teacher (toy/multisum_teacher.py) learns the 12 orders uniformly and, from `corrupted_example`, to say
`wait` after a student-style mistake (a wrong partial sum, a miscopied or reused operand, an early or wrong
box, a stray token) and redo the step; the mistaken tokens carry no loss, so it never learns to make them.

Tokens are the addition task's words plus `wait` (toy.task.build_tokenizer, 423 tokens with the fillers, so
top-K = 32 truncates). Held-out problems are chosen by sha256 of the sorted numbers: the order of the numbers
in a prompt does not change its solutions, so a held-out problem has no reordered twin in training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from toy.task import build_tokenizer as _build_tokenizer
from toy.task import spaced, write_jsonl

WAIT = "wait"
EOS = "<eos>"
BOX, CLOSE, SEP = "\\boxed{", "}", ";"
N_NUMS = 3
LOW, HIGH = 10, 99
STRAY = list("0123456789") + ["+", "=", SEP, BOX, CLOSE]  # tokens a student writes in the wrong place
ROOT = Path(__file__).parent
ASSETS = ROOT / "assets" / "multisum"
DATA = ROOT / "data" / "multisum"

Problem = tuple[int, ...]  # the numbers, in prompt order
Step = tuple[int, int, int]  # x + y = s


def build_tokenizer(out_dir: str | Path | None = None):
    return _build_tokenizer(out_dir, extra_words=[WAIT])


def prompt(nums: Problem) -> str:
    return "Q : " + " + ".join(spaced(x) for x in nums) + " = ?"


def solution(steps: Sequence[Step]) -> str:
    """The text of a solution (without EOS) from its steps; the box holds the last partial sum."""
    items = [f"{spaced(x)} + {spaced(y)} = {spaced(s)}" for x, y, s in steps]
    return " ; ".join(items) + f" ; {BOX} {spaced(steps[-1][2])} {CLOSE}"


@functools.lru_cache(maxsize=65536)
def paths(nums: Problem) -> tuple[tuple[Step, ...], ...]:
    """Every valid solution (as its steps), each distinct text once, in a fixed order."""
    out: set[tuple[Step, ...]] = set()

    def walk(pending: tuple[int, ...], steps: tuple[Step, ...]) -> None:
        if len(pending) == 1:
            out.add(steps)
            return
        for i, x in enumerate(pending):
            for j, y in enumerate(pending):
                if i != j:
                    rest = [v for k, v in enumerate(pending) if k not in (i, j)]
                    walk(tuple(sorted([*rest, x + y])), (*steps, (x, y, x + y)))

    walk(tuple(sorted(nums)), ())
    return tuple(sorted(out))


@functools.lru_cache(maxsize=65536)
def clean_tokens(nums: Problem) -> tuple[tuple[str, ...], ...]:
    """The token lists of every valid solution, EOS included."""
    return tuple((*solution(p).split(), EOS) for p in paths(nums))


def valid_next(prefix: Sequence[str], nums: Problem) -> set[str]:
    """The tokens that continue `prefix` (a wait-free completion prefix) along some valid solution; empty when
    the prefix has already left every one. A choice point is a prefix with more than one."""
    n = len(prefix)
    return {t[n] for t in clean_tokens(nums) if len(t) > n and list(t[:n]) == list(prefix)}


def first_mistake(tokens: Sequence[str], nums: Problem) -> int | None:
    """Index of the first token that no valid solution continues with (None if the tokens are all on one)."""
    live = clean_tokens(nums)
    for i, tok in enumerate(tokens):
        live = tuple(t for t in live if len(t) > i and t[i] == tok)
        if not live:
            return i
    return None


def item_start(tokens: Sequence[str], i: int) -> int:
    """Start of the item (step or box) that token i belongs to: just after the last `;` before i."""
    for k in range(i - 1, -1, -1):
        if tokens[k] == SEP:
            return k + 1
    return 0


def last_boxed(tokens: Sequence[str]) -> int | None:
    """The value of the last `\\boxed{ ... }` (digits only), as the trainer's verifier reads it, or None."""
    text = "".join(tokens)
    start = text.rfind(BOX)
    end = text.find(CLOSE, start)
    body = text[start + len(BOX) : end] if start >= 0 and end >= 0 else ""
    return int(body) if body.isdigit() else None


@dataclass(frozen=True)
class Verdict:
    valid: bool  # after the rollbacks, a valid solution that ends with EOS
    answer: int | None  # the last box's value
    waits: int
    effective: tuple[str, ...]  # the text left standing after the rollbacks


def parse(tokens: Sequence[str], nums: Problem) -> Verdict:
    """Apply the rollbacks of every `wait` and judge the path that is left (see the module docstring)."""
    tokens = list(tokens)
    ended = EOS in tokens
    if ended:
        tokens = tokens[: tokens.index(EOS)]
    segments: list[list[str]] = [[]]
    for tok in tokens:
        if tok == WAIT:
            segments.append([])
        else:
            segments[-1].append(tok)
    standing: list[str] = []
    for seg in segments[:-1]:
        cand = standing + seg
        fm = first_mistake(cand, nums)
        standing = cand[: item_start(cand, len(cand) if fm is None else fm)]
    final = standing + segments[-1] + ([EOS] if ended else [])
    valid = ended and tuple(final) in clean_tokens(nums)
    return Verdict(valid, last_boxed(tokens), len(segments) - 1, tuple(final))


def verify(completion: str | Sequence[str], nums: Problem) -> bool:
    """Whether a completion (space-separated tokens, or a token list) is a valid path to the right answer."""
    tokens = completion.split() if isinstance(completion, str) else completion
    return parse(tokens, nums).valid and parse(tokens, nums).answer == sum(nums)


# ---------------------------------------------------------------------------------------------------------
# Student-style mistakes, for the teacher's training and for measuring its recovery
# ---------------------------------------------------------------------------------------------------------


def _slip(v: int, rng: random.Random) -> int:
    """A wrong value a student would write for v: one digit changed, or a carry lost or added."""
    while True:
        if rng.random() < 0.5:
            d = list(str(v))
            k = rng.randrange(len(d))
            d[k] = str(rng.choice([x for x in range(10) if str(x) != d[k] and (x or k or len(d) == 1)]))
            w = int("".join(d))
        else:
            w = v + rng.choice([-100, -10, -1, 1, 10, 100] if v >= 100 else [-10, -1, 1, 10])
        if w != v and w >= 0:
            return w


def _mistaken_text(nums: Problem, steps: Sequence[Step], rng: random.Random) -> list[str]:
    """The solution `steps` with one student-style mistake, continued as the student would (consistently with
    the wrong value) where that is defined."""
    kind = rng.choices(["result", "operand", "box", "stray"], weights=[45, 20, 15, 20])[0]
    k = rng.randrange(len(steps))
    if kind == "stray":
        toks = solution(steps).split()
        i = rng.randrange(len(toks))
        toks[i] = rng.choice([t for t in STRAY if t != toks[i]])
        return toks
    if kind == "box":
        if k < len(steps) - 1 and rng.random() < 0.5:  # boxes a partial sum, a step too early
            return solution(steps[: k + 1]).split()
        toks = solution(steps).split()
        return toks[: toks.index(BOX) + 1] + spaced(_slip(steps[-1][2], rng)).split() + [CLOSE]
    wrong = [list(s) for s in steps]
    if kind == "result":
        wrong[k][2] = _slip(wrong[k][2], rng)
    else:  # an operand miscopied, or another of the numbers (one already used, or the same one twice)
        side = rng.randrange(2)
        others = [x for x in nums if x != wrong[k][side]]
        wrong[k][side] = rng.choice(others) if others and rng.random() < 0.4 else _slip(wrong[k][side], rng)
        wrong[k][2] = wrong[k][0] + wrong[k][1]
    for j in range(k + 1, len(wrong)):  # the wrong partial sum flows on, as the student would carry it
        prev = steps[j - 1][2]
        wrong[j] = [wrong[j - 1][2] if x == prev else x for x in wrong[j][:2]] + [0]
        wrong[j][2] = wrong[j][0] + wrong[j][1]
    return solution([(x, y, z) for x, y, z in wrong]).split()


@dataclass(frozen=True)
class Corrupted:
    prefix: list[str]  # clean tokens, then the mistake and up to `max_after` tokens after it (no wait)
    mistake: int  # index in prefix of the first wrong token
    redo: list[str]  # what the teacher learns to write after the prefix: wait, the redone item, the rest, EOS


def corrupted_example(nums: Problem, rng: random.Random, max_after: int = 5) -> Corrupted:
    """A solution with a student-style mistake, cut 1 .. max_after + 1 tokens after its first wrong token, and
    its correction: `wait`, then the wrong item redone (with the operands the student meant, where it named
    them right) and the rest of a valid solution."""
    while True:
        steps = rng.choice(paths(nums))
        toks = _mistaken_text(nums, steps, rng)
        m = first_mistake(toks, nums)
        if m is not None:  # a "mistake" that lands on another valid path is no mistake
            break
    cut = rng.randint(m + 1, min(m + 1 + max_after, len(toks)))
    r = item_start(toks, m)
    # redo the item the student meant: the valid solutions that share the most of its text before the mistake
    shared = {t: next((i for i in range(m) if t[i] != toks[i]), m) for t in clean_tokens(nums)}
    redo = rng.choice(sorted(t for t, n in shared.items() if n == max(shared.values())))
    return Corrupted(toks[:cut], m, [WAIT, *redo[r:]])


# ---------------------------------------------------------------------------------------------------------
# Problems and the held-out split
# ---------------------------------------------------------------------------------------------------------


def is_held_out(nums: Problem) -> bool:
    return hashlib.sha256(",".join(map(str, sorted(nums))).encode()).digest()[0] % 10 == 0


def random_problem(rng: random.Random) -> Problem:
    return tuple(rng.randint(LOW, HIGH) for _ in range(N_NUMS))


def sample_problems(n: int, held_out: bool, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    out: list[Problem] = []
    seen = set()
    while len(out) < n:
        nums = random_problem(rng)
        if is_held_out(nums) == held_out and nums not in seen:
            seen.add(nums)
            out.append(nums)
    return out


def rows(problems: list[Problem]) -> list[dict]:
    return [{"prompt": prompt(p), "answer": str(sum(p)), "nums": list(p)} for p in problems]


def read_problems(path: str | Path) -> list[Problem]:
    return [tuple(json.loads(x)["nums"]) for x in Path(path).read_text().splitlines()]


def write_data(n_train: int = 8000, n_test: int = 1000) -> tuple[Path, Path]:
    """toy/data/multisum/{train,test}.jsonl, the trainer's format (prompt, answer) plus the numbers."""
    train = write_jsonl(DATA / "train.jsonl", rows(sample_problems(n_train, held_out=False, seed=1)))
    test = write_jsonl(DATA / "test.jsonl", rows(sample_problems(n_test, held_out=True, seed=12345)))
    return train, test
