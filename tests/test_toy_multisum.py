"""The multisum toy task (toy/multisum.py): its verifier accepts every order and rejects wrong answers and
invalid steps, `wait` rolls back to the first wrong step, its student-style mistakes are mistakes and their
corrections verify, the trainer's verifier reads the right box, and the held-out split is disjoint from the
training data (also under reordering of the numbers)."""

from __future__ import annotations

import json
import random

import pytest

from toy import multisum as ms

NUMS = (47, 28, 91)


def toks(text: str) -> list[str]:
    return text.split()


def test_every_order_is_a_valid_path_to_the_answer():
    sols = ms.clean_tokens(NUMS)
    assert len(sols) == 12  # 3 first pairs x 2 written orders x 2 written orders of the second step
    assert all(ms.verify(list(t), NUMS) for t in sols)
    assert {ms.last_boxed(t) for t in sols} == {166}
    assert ms.verify("4 7 + 9 1 = 1 3 8 ; 2 8 + 1 3 8 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>", NUMS)
    assert ms.verify("2 8 + 4 7 = 7 5 ; 7 5 + 9 1 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>", NUMS)
    assert len(ms.clean_tokens((47, 47, 28))) < 12  # equal numbers: fewer distinct texts, still all valid
    assert all(ms.verify(list(t), (47, 47, 28)) for t in ms.clean_tokens((47, 47, 28)))


@pytest.mark.parametrize("text", [
    "4 7 + 9 1 = 1 3 8 ; 2 8 + 1 3 8 = 1 6 6 ; \\boxed{ 1 6 7 } <eos>",  # wrong box
    "4 7 + 9 1 = 1 3 9 ; 2 8 + 1 3 9 = 1 6 7 ; \\boxed{ 1 6 7 } <eos>",  # wrong partial sum carried on
    "4 7 + 4 7 = 9 4 ; 9 4 + 2 8 = 1 2 2 ; \\boxed{ 1 2 2 } <eos>",  # a number used twice
    "4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 6 6 ; \\boxed{ 1 6 6 }",  # no EOS (cut off)
    "4 7 + 9 1 + 2 8 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>",  # right answer, no valid path
    "\\boxed{ 1 6 6 } <eos>",
])
def test_wrong_answers_and_invalid_paths_are_rejected(text):
    assert not ms.verify(text, NUMS)


def test_wait_rolls_back_to_the_first_wrong_step():
    # the mistake in step 1, noticed inside step 2: step 1 is redone, step 2 follows
    text = "4 7 + 9 1 = 1 3 9 ; 1 3 wait 4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>"
    v = ms.parse(toks(text), NUMS)
    assert v.valid and v.answer == 166 and v.waits == 1
    assert v.effective == ms.parse(toks(text.split("wait ")[1]), NUMS).effective
    # a right step before the mistake stands: the redo starts at the wrong step
    text = "4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 7 6 wait 1 3 8 + 2 8 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>"
    assert ms.verify(text, NUMS)
    # a wrong box, boxed again
    text = "4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 6 6 ; \\boxed{ 1 6 8 } wait \\boxed{ 1 6 6 } <eos>"
    assert ms.verify(text, NUMS) and ms.last_boxed(toks(text)) == 166
    # redoing from the start instead is not what wait means: step 1 is already standing
    text = "4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 7 6 wait 4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 6 6 ; \\boxed{ 1 6 6 } <eos>"
    assert not ms.verify(text, NUMS)
    # a correction that repeats the mistake does not verify
    text = "4 7 + 9 1 = 1 3 9 wait 4 7 + 9 1 = 1 3 9 ; 1 3 9 + 2 8 = 1 6 7 ; \\boxed{ 1 6 7 } <eos>"
    assert not ms.verify(text, NUMS)


def test_the_trainers_verifier_reads_the_corrected_box():
    from student_trainer.evaluate import is_correct

    tok = ms.build_tokenizer()
    text = "4 7 + 9 1 = 1 3 8 ; 1 3 8 + 2 8 = 1 6 6 ; \\boxed{ 1 6 8 } wait \\boxed{ 1 6 6 } <eos>"
    decoded = tok.decode(tok.convert_tokens_to_ids(toks(text)), skip_special_tokens=True)
    assert is_correct(decoded, "166") and not is_correct(decoded, "168")
    assert len(tok) > 400 and tok.convert_tokens_to_ids(ms.WAIT) != tok.unk_token_id


def test_choice_points_and_first_mistake():
    assert ms.valid_next([], NUMS) == {"4", "2", "9"}
    assert ms.valid_next(toks("4 7 +"), NUMS) == {"2", "9"}
    assert ms.valid_next(toks("4 7 + 9 1 = 1 3 8 ;"), NUMS) == {"1", "2"}  # 138 + 28 or 28 + 138
    assert ms.valid_next(toks("4 7 + 9 1 = 1 3"), NUMS) == {"8"}
    assert ms.first_mistake(toks("4 7 + 9 1 = 1 3 9 ;"), NUMS) == 8
    assert ms.first_mistake(toks("2 8 + 4 7 = 7 5"), NUMS) is None


def test_corrupted_examples_are_mistakes_and_their_corrections_verify():
    rng = random.Random(0)
    for _ in range(500):
        nums = ms.random_problem(rng)
        c = ms.corrupted_example(nums, rng)
        assert ms.first_mistake(c.prefix, nums) == c.mistake < len(c.prefix) <= c.mistake + 6
        assert ms.WAIT not in c.prefix and c.redo[0] == ms.WAIT and c.redo[-1] == ms.EOS
        assert ms.verify(c.prefix + c.redo, nums)
        assert not ms.verify(c.prefix + c.redo[1:], nums)  # without the wait it is wrong


def test_held_out_split_is_disjoint_and_order_free():
    rng = random.Random(0)
    for _ in range(2000):
        nums = ms.random_problem(rng)
        assert ms.is_held_out(nums) == ms.is_held_out(tuple(reversed(nums)))
    data = ms.DATA
    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    assert len(test) >= 1000 and len(train) >= 8000
    key = lambda r: tuple(sorted(r["nums"]))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert all(ms.is_held_out(tuple(r["nums"])) for r in test) and not any(ms.is_held_out(tuple(r["nums"])) for r in train)
    assert all(r["prompt"] == ms.prompt(tuple(r["nums"])) and r["answer"] == str(sum(r["nums"])) for r in train + test)
