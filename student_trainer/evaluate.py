"""Evaluation: sample n completions per held-out problem, verify each with math-verify, report pass@k.

pass@k is the unbiased estimator of the Codex paper (Chen et al., 2021), averaged over problems. A completion
is judged by the content of its last `\\boxed{...}`; a completion without one is wrong.

    python -m student_trainer.evaluate --model DIR --data FILE.jsonl --n 4 --k 1,4 [--out results.jsonl]

prints the metrics and writes one JSON line per problem (its completions and which were correct).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from student_trainer.data import Problem
from student_trainer.rollout import Generator

logger = logging.getLogger(__name__)

VERIFY_TIMEOUT_S = 5


# ---------------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, of which c are correct, is correct).

    1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the large
    binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ---------------------------------------------------------------------------------------------------------
# Verifier
# ---------------------------------------------------------------------------------------------------------

BOXED = "\\boxed{"


def _last_boxed(text: str) -> str | None:
    start = text.rfind(BOXED)
    if start == -1:
        return None
    depth = 0
    for i in range(start + len(BOXED) - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(BOXED) : i]
    return None  # the last box never closes (e.g. the completion was cut off inside it)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None.

    Tokenizers that decode with a space between every token (our tiny word-level one turns `\\boxed{12}`
    into `\\ b o x e d { 1 2 }`) are handled by retrying with all whitespace removed when the plain text
    holds no box.
    """
    found = _last_boxed(text)
    if found is None:
        found = _last_boxed("".join(text.split()))
    return found


def _math_verify_timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which raises outside the main thread: there we run without.
    return VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _extraction_config() -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str, timeout: int | None) -> list:
    """The reference answer, parsed once per problem rather than once per sample."""
    from math_verify import parse

    gold = parse(answer if BOXED in answer else f"{BOXED}{answer}}}", _extraction_config(), parsing_timeout=timeout)
    if not gold:
        logger.warning("math-verify cannot parse the reference answer %r: every sample counts as wrong", answer[:200])
    return gold


def is_correct(completion_text: str, answer: str, *, collapse_whitespace: bool = False) -> bool:
    """Whether the last `\\boxed{}` of the completion is mathematically equal to `answer` (math-verify:
    numeric and symbolic equivalence, e.g. `1/2` = `0.5` = `\\frac{1}{2}`, `x+1` = `1+x`).

    `answer` may be plain (`1/2`) or boxed (`\\boxed{1/2}`). collapse_whitespace removes all whitespace from
    the completion first, for tokenizers that decode with spaces between tokens (`\\boxed{ 1 2 }` would
    otherwise not read as 12). Parse errors and timeouts count as incorrect.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    if collapse_whitespace:
        completion_text = "".join(completion_text.split())
    predicted = extract_boxed(completion_text)
    if predicted is None or not predicted.strip():
        return False
    timeout = _math_verify_timeout()
    try:
        gold = _parse_answer(answer, timeout)
        pred = parse(f"{BOXED}{predicted}}}", _extraction_config(), parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # math-verify handles most of its errors; sympy can still raise
        logger.debug("math-verify failed on %r vs %r", predicted[:200], answer[:200], exc_info=True)
        return False


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/pass@{k}, eval/mean_len, eval/frac_finished
    per_problem: list[dict]  # one JSON-serialisable record per problem, in input order


def evaluate(
    generator: Generator,
    tokenizer,
    problems: list[Problem],
    *,
    n: int = 4,
    ks: Sequence[int] = (1, 4),
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    verifier: Callable[[str, str], bool] = is_correct,
) -> EvalResult:
    """Sample n completions per problem, verify them, and average the unbiased pass@k over problems.

    eval/mean_len is the mean completion length in tokens (EOS included), eval/frac_finished the fraction
    of completions that ended with EOS rather than at max_new_tokens.
    """
    ks = sorted(set(ks))
    if not problems:
        raise ValueError("evaluate() needs at least one problem")
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"every k must be in [1, n={n}], got ks={list(ks)}; raise n or lower k")

    rollouts = generator.generate(
        [p.prompt_ids for p in problems],
        n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    if len(rollouts) != n * len(problems):
        raise RuntimeError(f"the generator returned {len(rollouts)} rollouts for {len(problems)} prompts x n={n}")

    per_problem = []
    for i, problem in enumerate(problems):
        group = rollouts[i * n : (i + 1) * n]  # prompt-major order
        if any(r.prompt_index != i for r in group):
            raise RuntimeError(f"rollouts for prompt {i} are out of order (expected prompt-major order)")
        texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in group]
        correct = [verifier(t, problem.answer) for t in texts]
        c = sum(correct)
        per_problem.append(
            {
                "index": problem.index,
                "prompt": problem.prompt,
                "answer": problem.answer,
                "n": n,
                "correct": c,
                **{f"pass@{k}": pass_at_k(n, c, k) for k in ks},
                "completions": texts,
                "is_correct": correct,
                "lengths": [len(r.completion_ids) for r in group],
                "finished": [r.finished for r in group],
            }
        )

    return EvalResult(metrics=eval_metrics(per_problem, ks), per_problem=per_problem)


def eval_metrics(per_problem: list[dict], ks: Sequence[int]) -> dict[str, float]:
    """pass@k averaged over problems, mean completion length and finished fraction over all completions; also
    merges the per-problem records of several ranks, each of which evaluated a share of the problems."""
    metrics = {f"eval/pass@{k}": float(np.mean([p[f"pass@{k}"] for p in per_problem])) for k in sorted(set(ks))}
    metrics["eval/mean_len"] = float(np.mean([n for p in per_problem for n in p["lengths"]]))
    metrics["eval/frac_finished"] = float(np.mean([f for p in per_problem for f in p["finished"]]))
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items())


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pass@k of a causal LM on a file of math problems")
    parser.add_argument("--model", required=True, help="model directory (transformers format)")
    parser.add_argument("--data", required=True, help="problems, .jsonl or .parquet")
    parser.add_argument("--n", type=int, default=4, help="samples per problem")
    parser.add_argument("--k", type=_parse_ks, default=[1, 4], help="comma-separated k values, each <= n")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as plain text")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="per-problem JSONL (default: <model>/eval_results.jsonl)")
    args = parser.parse_args(argv)
    if max(args.k) > args.n:
        parser.error(f"--k {max(args.k)} exceeds --n {args.n}: pass@k needs at least k samples per problem")
    if args.n < 1:
        parser.error("--n must be >= 1")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_trainer.data import load_problems
    from student_trainer.rollout import HFGenerator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    problems = load_problems(
        args.data,
        tokenizer,
        prompt_field=args.prompt_field,
        answer_field=args.answer_field,
        apply_chat_template=False if args.no_chat_template else None,
        system_prompt=args.system_prompt,
        limit=args.limit,
    )
    result = evaluate(
        HFGenerator(model, tokenizer, batch_size=args.batch_size),
        tokenizer,
        problems,
        n=args.n,
        ks=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )

    if args.out:
        out = Path(args.out)
    else:  # next to the model when it is a local directory
        out = (Path(args.model) if Path(args.model).is_dir() else Path()) / "eval_results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for record in result.per_problem:
            f.write(json.dumps(record) + "\n")
    print(f"{len(problems)} problems x {args.n} samples, {args.model}")
    print(format_metrics(result.metrics))
    print(f"per-problem results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
