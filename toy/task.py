"""3-digit addition solved column by column, with verifiable `\\boxed{}` answers.

    prompt:     Q : 4 7 3 + 2 8 9 = ?
    completion: 3 + 9 = 1 2 ; 7 + 8 + 1 = 1 6 ; 4 + 2 + 1 = 7 ; \\boxed{ 7 6 2 } <eos>

Each column adds the two digits and the carry (written as `+ 1` when there is one), right to left; the answer
is the digits of the sum. Tokens are whitespace-separated words; digits are single tokens. The vocabulary is
padded with filler words that never occur in the task, to ~430 tokens, so that a teacher top-K of 32 is a real
truncation of a distribution over a vocabulary much larger than K, as at 151K. The tokenizer decodes without
spaces (`\\boxed{762}`), which is what the math-verify based verifier reads.

Held-out problems are chosen by a non-linear hash of (a, b) (sha256), not a linear one: a linear hash mod 10
once held out exactly the sums ending in 0.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
WORDS = list("0123456789") + ["+", "=", "?", ":", ";", "Q", "\\boxed{", "}"]
N_FILLER = 400
LOW, HIGH = 100, 999


def build_tokenizer(out_dir: str | Path | None = None, extra_words: Sequence[str] = ()):
    """The word-level tokenizer; `extra_words` (another toy task's own words, e.g. `wait`) go after WORDS and
    before the fillers, so the default vocabulary is the addition task's, unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + list(extra_words) + [f"w{i}" for i in range(N_FILLER)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()  # "\boxed{762}", not "\boxed{ 7 6 2 }"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def spaced(n: int) -> str:
    return " ".join(str(n))


def prompt(a: int, b: int) -> str:
    return f"Q : {spaced(a)} + {spaced(b)} = ?"


def solution(a: int, b: int) -> str:
    """The clean column-wise solution (without EOS)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lhs = f"{x} + {y}" + (" + 1" if carry else "")
        steps.append(f"{lhs} = {spaced(s)}")
        carry = s // 10
    return " ; ".join(steps) + f" ; \\boxed{{ {spaced(a + b)} }}"


def is_held_out(a: int, b: int) -> bool:
    return hashlib.sha256(f"{a}+{b}".encode()).digest()[0] % 10 == 0


def sample_pairs(n: int, held_out: bool, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out: list[tuple[int, int]] = []
    seen = set()
    while len(out) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if is_held_out(a, b) == held_out and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": prompt(a, b), "answer": str(a + b), "a": a, "b": b} for a, b in pairs]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def first_mistake(completion_tokens: list[str], a: int, b: int) -> int | None:
    """Index of the first completion token that departs from the clean solution (None if none does)."""
    ref = solution(a, b).split() + ["<eos>"]
    for i, tok in enumerate(completion_tokens):
        if i >= len(ref) or tok != ref[i]:
            return i
    return None
