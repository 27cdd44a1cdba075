"""The peers' protocols, both ways: our teacher answers TRL's clients (1.16 over /v1/completions, 1.10 over
/get_sequence_logprobs/) and the official openai client; our trainer's client reads any vLLM-compatible server.

The comparisons with our own `/v1/score` score the same sequences on the same engine in another request: the
peer routes only repack the numbers (float32 -> JSON float64 -> float32 is exact), but vLLM may batch the two
requests' sequences with others, so values get the float32 tolerance rule (`tests/helpers.py`) and top-k ids
may swap only at near-ties; a wrong row or normalisation is orders of magnitude beyond it. TRL's clients run in
subprocesses, from the pinned releases `make install` puts under .venv/peers/ (two TRL versions cannot share
one environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from protocol.peer import PeerResponseError, PromptLogprobRows, TokenTables, prompt_logprobs_json, read_prompt_logprobs
from protocol.schema import ScoreBatch
from student_trainer.teacher_client import TeacherClient
from tests.helpers import HAS_VLLM, assert_topk_match, cfg_overrides, float32_tol, model_terms

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".venv" / "peers"
K = 5


def sequences(seed: int = 0, lengths=(7, 1, 12, 2, 30)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 300, n).tolist() for n in lengths]


def our_scores(url: str, seqs: list[list[int]], score_from: list[int], k: int):
    """Our own `/v1/score` for the same sequences: the reference every peer route must repack exactly."""
    with TeacherClient(url, protocol="aopd") as client:
        return client.score_batch(ScoreBatch.from_sequences(list(zip(seqs, score_from, strict=True)), k))


# ----------------------------------------------------------------------------------------------------------
# protocol/peer.py: the builder against vLLM's own dict construction, and the reader against the builder
# ----------------------------------------------------------------------------------------------------------


def random_rows(n: int, k: int, vocab: int, seed: int) -> tuple[np.ndarray, PromptLogprobRows]:
    rng = np.random.default_rng(seed)
    lps = -np.sort(rng.exponential(2.0, (n, vocab)), axis=1).astype(np.float32)  # sorted, so id order = rank order
    perm = np.argsort(rng.random((n, vocab)), axis=1)  # ids of the sorted values
    j = np.where(rng.random(n) < 0.5, rng.integers(0, k, n), rng.integers(k, vocab, n))  # in the top-k or not
    target, rank = perm[np.arange(n), j], j + 1
    rows = PromptLogprobRows(
        token_logprobs_N=lps[np.arange(n), rank - 1], token_ranks_N=rank.astype(np.int64),
        topk_ids_NK=perm[:, :k].astype(np.int32), topk_logprobs_NK=lps[:, :k],
    )
    return target, rows


def vllm_dict(target: int, lp: float, rank: int, ids, lps, k: int) -> dict[str, dict]:
    """vLLM 0.32's `append_logprobs_for_next_position`, verbatim in effect (a dict comprehension: the actual
    token's key first, a duplicate top-k key overwriting its value), then its JSON round trip."""
    all_ids = [target, *[int(i) for i in ids[:k]]]
    all_lps = [lp, *[float(x) for x in lps[:k]]]
    ranks = [rank, *range(1, k + 1)]
    d = {tid: {"logprob": float(np.float32(v)), "rank": r} for tid, v, r in zip(all_ids, all_lps, ranks, strict=True)}
    return {str(t): v for t, v in d.items()}


@pytest.mark.parametrize("k", [0, 1, 4])
def test_prompt_logprobs_json_is_vllms_dict(k):
    lengths = np.array([5, 1, 9, 2])
    n = int((lengths - 1).sum())
    target, rows = random_rows(n, max(k, 1), vocab=40, seed=k)
    tables = TokenTables(40, [f"t{i}\"\\" for i in range(40)])  # decoded tokens that need JSON escaping
    lists = [orjson.loads(b) for b in prompt_logprobs_json(lengths, target, rows, k, tables)]
    r = 0
    for length, got in zip(lengths, lists, strict=True):
        assert len(got) == length and got[0] is None
        for pos in range(1, length):
            want = vllm_dict(int(target[r]), float(rows.token_logprobs_N[r]), int(rows.token_ranks_N[r]),
                             rows.topk_ids_NK[r], rows.topk_logprobs_NK[r], k)
            entry = got[pos]
            assert list(entry) == list(want)  # same keys in the same order
            assert {t: {"logprob": e["logprob"], "rank": e["rank"]} for t, e in entry.items()} == want
            assert all(e["decoded_token"] == f"t{t}\"\\" for t, e in entry.items())
            r += 1


def test_read_prompt_logprobs_round_trips_and_slices_score_from():
    lengths = np.array([6, 3, 10])
    n = int((lengths - 1).sum())
    target, rows = random_rows(n, 4, vocab=50, seed=3)
    seqs, off = [], 0
    for length in lengths:  # sequences whose tokens are the targets
        seqs.append(np.concatenate([[7], target[off : off + length - 1]]))
        off += length - 1
    body = b'{"choices":[' + b",".join(
        b'{"index":%d,"prompt_logprobs":%s}' % (i, lp)
        for i, lp in enumerate(prompt_logprobs_json(lengths, target, rows, 4, TokenTables(50, None)))
    ) + b"]}"
    score_from = np.array([1, 2, 5])
    got = read_prompt_logprobs(body, seqs, score_from, 4)
    starts = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]])
    sel = np.concatenate([np.arange(s + f - 1, s + length - 1) for s, f, length in zip(starts, score_from, lengths, strict=True)])
    np.testing.assert_array_equal(got.token_logprobs_N, rows.token_logprobs_N[sel])
    np.testing.assert_array_equal(got.token_ranks_N, rows.token_ranks_N[sel])
    np.testing.assert_array_equal(got.topk_ids_NK, rows.topk_ids_NK[sel])
    np.testing.assert_array_equal(got.topk_logprobs_NK, rows.topk_logprobs_NK[sel])
    # Python's own json layout (", " and ": ") reads the same
    spaced = json.dumps(json.loads(body)).encode()
    again = read_prompt_logprobs(spaced, seqs, score_from, 4)
    np.testing.assert_array_equal(again.topk_ids_NK, got.topk_ids_NK)


def test_read_prompt_logprobs_refuses_what_it_cannot_trust():
    seq = np.array([3, 4, 5])
    ok = b'[null,{"4":{"logprob":-0.1,"rank":1}},{"9":{"logprob":-0.2,"rank":1},"5":{"logprob":-3.0,"rank":7}}]'
    read_prompt_logprobs(b'{"choices":[{"prompt_logprobs":%s}]}' % ok, [seq], np.array([1]), 1)
    no_actual = ok.replace(b'"5":', b'"6":')
    with pytest.raises(PeerResponseError, match="actual token 5"):
        read_prompt_logprobs(b'{"choices":[{"prompt_logprobs":%s}]}' % no_actual, [seq], np.array([1]), 1)
    with pytest.raises(PeerResponseError, match="positions"):
        read_prompt_logprobs(b'{"choices":[{"prompt_logprobs":%s}]}' % ok, [np.array([3, 4, 5, 6])], np.array([1]), 1)
    with pytest.raises(PeerResponseError, match="entries"):
        read_prompt_logprobs(b'{"choices":[{"prompt_logprobs":%s}]}' % ok, [seq], np.array([1]), 2)


# ----------------------------------------------------------------------------------------------------------
# our server, through the peers' own clients
# ----------------------------------------------------------------------------------------------------------

TRL_SCRIPT = r"""
import json, sys
import trl, trl.import_utils as iu
iu.is_vllm_available = lambda *a, **k: False     # keep trl.generation from importing its vLLM generation path
import trl.generation.vllm_client as vc
vc.is_vllm_available = lambda *a, **k: True      # the client refuses to start without vLLM; it never uses it here
args = json.load(sys.stdin)
client = vc.VLLMClient(base_url=args["url"], connection_timeout=30)
kw = {} if args["binary"] is None else {"use_binary": args["binary"]}
out = client.get_sequence_logprobs(args["sequences"], args["prompt_lengths"], top_logprobs=args["k"], temperature=1.0, **kw)
print(json.dumps({"version": trl.__version__, **out}))
"""


def run_trl(version: str, url: str, seqs, prompt_lengths, k: int, binary: bool | None) -> dict:
    target = PEERS / f"trl-{version}"
    assert target.is_dir(), f"{target} is missing: `make install` puts the pinned TRL releases there"
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{REPO}", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", TRL_SCRIPT], input=json.dumps(
            {"url": url, "sequences": seqs, "prompt_lengths": prompt_lengths, "k": k, "binary": binary}),
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"] == version
    return out


def assert_trl_equals_ours(out: dict, ref, seqs, prompt_lengths, k: int, tol: float) -> None:
    """TRL's ragged per-sequence lists equal our packed rows (positions max(p, 1) .. len - 1); a prompt length of
    0 adds TRL's padding row for position 0 first."""
    row = 0
    for i, (seq, p) in enumerate(zip(seqs, prompt_lengths, strict=True)):
        n_rows = len(seq) - max(p, 1)
        assert len(out["logprobs"][i]) == len(seq) - p
        pad = 1 if p == 0 and len(seq) else 0
        lps = np.array([r[:k] for r in out["logprobs"][i][pad:]], np.float32).reshape(n_rows, k)
        ids = np.array([r[:k] for r in out["logprob_token_ids"][i][pad:]], np.int64).reshape(n_rows, k)
        assert_topk_match(ids, lps, ref.topk_ids_NK[row : row + n_rows], ref.topk_logprobs_NK[row : row + n_rows], tol)
        if "actual_logprobs" in out:
            act = np.array(out["actual_logprobs"][i][pad:], np.float32).reshape(n_rows)
            np.testing.assert_allclose(act, ref.token_logprobs_N[row : row + n_rows], atol=tol, rtol=0)
            act_ids = np.array(out["actual_token_ids"][i][pad:], np.int64).reshape(n_rows)
            np.testing.assert_array_equal(act_ids, np.asarray(seq[max(p, 1):]))
        row += n_rows


@pytest.mark.numeric
def test_trl_1_16_client_over_v1_completions(live_server, tiny_model_dir):
    seqs = sequences(1)
    prompt_lengths = [3, 1, 11, 1, 4]
    out = run_trl("1.16.0", live_server.url, seqs, prompt_lengths, K, None)
    ref = scores_for_trl(live_server.url, seqs, prompt_lengths)
    assert_trl_equals_ours(out, ref, seqs, prompt_lengths, K, float32_tol(ref.topk_logprobs_NK, model_terms(tiny_model_dir)))


def scores_for_trl(url: str, seqs, prompt_lengths):
    """Our scores of the positions TRL asks for: max(p, 1) .. len - 1 of the sequences that have any."""
    scored = [i for i, (s, p) in enumerate(zip(seqs, prompt_lengths, strict=True)) if max(p, 1) < len(s)]
    return our_scores(url, [seqs[i] for i in scored], [max(prompt_lengths[i], 1) for i in scored], K)


@pytest.mark.numeric
@pytest.mark.parametrize("binary", [True, False])
def test_trl_1_10_client_over_get_sequence_logprobs(live_server, tiny_model_dir, binary):
    seqs = sequences(2, lengths=(7, 1, 12, 5, 30))
    prompt_lengths = [3, 0, 12, 0, 4]  # prompt length 0 (position 0 unscored) and len (nothing to score)
    out = run_trl("1.10.0", live_server.url, seqs, prompt_lengths, K, binary)
    ref = scores_for_trl(live_server.url, seqs, prompt_lengths)
    assert_trl_equals_ours(out, ref, seqs, prompt_lengths, K, float32_tol(ref.topk_logprobs_NK, model_terms(tiny_model_dir)))
    if not binary:  # the JSON format sends every entry of vLLM's dict: the actual token too where it is not top-K
        flat = [len(r) for seq in out["logprobs"] for r in seq if r]
        assert set(flat) <= {K, K + 1} and K + 1 in flat


TRL_TRAINER_SCRIPT = r"""
import json, sys
import trl.import_utils as iu
iu.is_vllm_available = lambda *a, **k: False
import trl.generation.vllm_client as vc
vc.is_vllm_available = lambda *a, **k: True
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer
url, student, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(student)
model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
data = Dataset.from_list([{"prompt": f"{a} + {b} ="} for a in range(1, 5) for b in range(1, 3)])
args = ServerDistillationConfig(
    output_dir=out, teacher_model_server_url=url, max_steps=1, per_device_train_batch_size=4, max_completion_length=8,
    loss_top_k=4, beta=0.0, use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", learning_rate=1e-3)
trainer = ServerDistillationTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
result = trainer.train()
changed = sum(int(not torch.equal(before[n], p.detach())) for n, p in model.named_parameters())
print(json.dumps({"loss": result.training_loss, "changed": changed, "total": len(before)}))
"""


@pytest.mark.slow
def test_trl_server_distillation_trainer_takes_a_step_against_our_teacher(tiny_model_dir, tmp_path):
    """TRL 1.16's own `ServerDistillationTrainer` (transformers generation on CPU, its top-K forward KL loss),
    with `teacher_model_server_url` at our server: one optimizer step, every parameter moved, and the teacher
    logprobs came through our /v1/completions."""
    from student_trainer.tiny_models import build_tiny_model
    from teacher_server.app import create_app
    from tests.helpers import LiveServer, teacher_settings

    student = build_tiny_model(tmp_path / "student", hidden_size=64, num_layers=1, num_heads=1, intermediate_size=128,
                               seed=3, tokenizer_dir=tiny_model_dir)
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf"))) as server:
        env = {**os.environ, "PYTHONPATH": str(PEERS / "trl-1.16.0"), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-c", TRL_TRAINER_SCRIPT, server.url, str(student), str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = httpx.get(server.url + "/metrics").text
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    assert out["changed"] == out["total"]
    served = [line for line in metrics.splitlines() if line.startswith("aopd_teacher_requests_total")
              and 'route="/v1/completions"' in line and 'status="200"' in line]
    assert served and float(served[0].split()[-1]) >= 1, metrics[:2000]


@pytest.mark.numeric
def test_openai_client_completions_create(live_server, tiny_model_dir):
    import openai

    seqs = sequences(3)
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    resp = client.completions.create(model=model, prompt=seqs, max_tokens=1, temperature=1.0,
                                     extra_body={"prompt_logprobs": K})
    assert [c.index for c in resp.choices] == list(range(len(seqs)))
    scored = [s for s in seqs if len(s) > 1]
    ref = our_scores(live_server.url, scored, [1] * len(scored), K)
    tol = float32_tol(ref.topk_logprobs_NK, model_terms(tiny_model_dir))
    row = 0
    for choice, seq in zip(resp.choices, seqs, strict=True):
        plp = choice.model_extra["prompt_logprobs"]
        assert len(plp) == len(seq) and plp[0] is None
        for pos in range(1, len(seq)):
            entry = plp[pos]
            assert len(entry) in (K, K + 1) and str(seq[pos]) in entry
            top = sorted(entry.items(), key=lambda kv: kv[1]["rank"])
            top = [kv for kv in top if not (kv[0] == str(seq[pos]) and len(entry) == K + 1)][:K]
            assert_topk_match(np.array([[int(t) for t, _ in top]]), np.array([[v["logprob"] for _, v in top]]),
                              ref.topk_ids_NK[row : row + 1], ref.topk_logprobs_NK[row : row + 1], tol)
            actual = entry[str(seq[pos])]
            assert abs(actual["logprob"] - float(ref.token_logprobs_N[row])) <= tol
            in_top = np.flatnonzero(ref.topk_ids_NK[row] == seq[pos])
            # in the top-K: its place there; else beyond K (test_ranks_... checks the value itself)
            assert actual["rank"] == int(in_top[0]) + 1 if in_top.size else actual["rank"] > K
            assert isinstance(actual["decoded_token"], str)
            row += 1
    assert resp.usage.prompt_tokens == sum(map(len, seqs))


def test_ranks_are_ranks_in_the_full_vocabulary(live_server, tiny_model_dir):
    """The actual token's rank, checked against a direct forward of the model (rank = #logits >= its logit)."""
    import torch
    from transformers import AutoModelForCausalLM

    seq = sequences(4, lengths=(40,))[0]
    with TeacherClient(live_server.url, protocol="openai") as client:
        client.connect(top_k=K)
        ref = client.score_batch(ScoreBatch.from_sequences([(seq, 1)], K))  # ranks as /v1/completions sends them
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].double()
    target = logits.gather(1, torch.tensor(seq[1:])[:, None])
    lo = (logits > target + 1e-4).sum(1) + 1  # ranks within rounding of the tie boundary
    hi = (logits >= target - 1e-4).sum(1)
    ranks = torch.from_numpy(ref.token_ranks_N)
    assert ((ranks >= lo) & (ranks <= hi)).all(), (ranks, lo, hi)
    assert (ranks > K).any() and (ranks <= K).any()  # both cases occur


@pytest.mark.numeric
def test_our_client_speaks_openai_to_our_server(live_server, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    seqs = [s for s in sequences(5) if len(s) > 3]
    batch = ScoreBatch.from_sequences([(s, 2) for s in seqs], K)
    with TeacherClient(live_server.url, protocol="openai") as client:
        info = client.connect(tokenizer=tok, top_k=K, max_seq_len=100)
        assert info.engine == "openai" and client.protocol == "openai"
        got = client.score_batch(batch)
    with TeacherClient(live_server.url) as client:
        client.connect(tokenizer=tok, top_k=K)
        assert client.protocol == "aopd"  # auto-detect prefers our own protocol where it is served
        ref = client.score_batch(batch)
    tol = float32_tol(ref.topk_logprobs_NK, model_terms(tiny_model_dir))
    np.testing.assert_allclose(got.token_logprobs_N, ref.token_logprobs_N, atol=tol, rtol=0)
    assert_topk_match(got.topk_ids_NK, got.topk_logprobs_NK, ref.topk_ids_NK, ref.topk_logprobs_NK, tol)
    np.testing.assert_array_equal(got.num_scored_B, ref.num_scored_B)


def test_openai_handshake_refuses_other_tokenizer_and_large_k(live_server, tiny_model_dir, other_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from student_trainer.teacher_client import TeacherIncompatibleError
    from student_trainer.tiny_models import build_tokenizer

    # Same size, other ids (two words inserted before the fillers): only the tokenisation probe can tell.
    shifted = build_tokenizer(tmp_path, words=["alpha", "beta"], n_filler=398)
    teacher_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(shifted) == len(teacher_tok)
    with TeacherClient(live_server.url, protocol="openai") as client:
        with pytest.raises(TeacherIncompatibleError, match="tokenise a probe text differently"):
            client.connect(tokenizer=shifted, top_k=K)
    # A smaller student vocabulary (a prefix of the teacher's): the teacher's top-k ids would fall outside it.
    with TeacherClient(live_server.url, protocol="openai") as client:
        with pytest.raises(TeacherIncompatibleError, match="vocabulary"):
            client.connect(tokenizer=AutoTokenizer.from_pretrained(other_model_dir), top_k=K)
    with TeacherClient(live_server.url, protocol="openai") as client:
        with pytest.raises(TeacherIncompatibleError, match="--max-logprobs 33"):
            client.connect(top_k=33)


BAD_COMPLETIONS = [
    ({"prompt": [[1, 2, 3]], "max_tokens": 1}, 400, "unsupported_parameter"),  # no prompt_logprobs
    ({"prompt": [[1, 2, 3]], "max_tokens": 16, "prompt_logprobs": 2}, 400, "unsupported_parameter"),
    ({"prompt": [[1, 2, 3]], "max_tokens": 1, "prompt_logprobs": 2, "stream": True}, 400, "unsupported_parameter"),
    ({"prompt": [[1, 2, 3]], "max_tokens": 1, "prompt_logprobs": 2, "n": 2}, 400, "unsupported_parameter"),
    ({"prompt": [[1, 2, 3]], "max_tokens": 1, "prompt_logprobs": 2, "logprobs": 2, "echo": True}, 400, "unsupported_parameter"),
    ({"prompt": [[1, 2, 3]], "max_tokens": 1, "prompt_logprobs": 2, "suffix": "x"}, 400, "unsupported_parameter"),
    ({"prompt": [[1, 2, 3]], "max_tokens": 1, "prompt_logprobs": 33}, 400, "invalid_top_k"),
    ({"prompt": [[1, 2, 3]], "max_tokens": 1, "prompt_logprobs": -1}, 400, "invalid_top_k"),
    ({"prompt": [[1, 2, 10**6]], "max_tokens": 1, "prompt_logprobs": 2}, 400, "invalid_token_id"),
    ({"prompt": [[1, 2, -3]], "max_tokens": 1, "prompt_logprobs": 2}, 400, "malformed_body"),
    ({"prompt": [[1] * 600], "max_tokens": 1, "prompt_logprobs": 2}, 400, "sequence_too_long"),
    ({"prompt": [], "max_tokens": 1, "prompt_logprobs": 2}, 400, "empty_request"),
    ({"prompt": [[]], "max_tokens": 1, "prompt_logprobs": 2}, 400, "invalid_sequence"),
    ({"prompt": [[1, 2]], "max_tokens": 1, "prompt_logprobs": 2, "model": "gpt-4"}, 404, "model_not_found"),
    ({"prompt": {"a": 1}, "prompt_logprobs": 2}, 400, "malformed_body"),
]
BAD_TRL = [
    ({"sequences": [[1, 2, 3]], "prompt_lengths": [1, 2], "top_logprobs": 2}, 400, "invalid_shape"),
    ({"sequences": [[1, 2, 3]], "prompt_lengths": [4], "top_logprobs": 2}, 400, "invalid_score_from"),
    ({"sequences": [[1, 2, 3]], "prompt_lengths": [1]}, 400, "invalid_top_k"),  # TRL's default top_logprobs=100
    ({"sequences": [[1, 2, 10**6]], "prompt_lengths": [1], "top_logprobs": 2}, 400, "invalid_token_id"),
    ({"sequences": [[1, 2, 3]], "prompt_lengths": [1], "top_logprobs": 2, "response_format": "npy"}, 400, "malformed_body"),
    ({"sequences": [], "prompt_lengths": [], "top_logprobs": 2}, 400, "empty_request"),
]


@pytest.mark.parametrize(("route", "body", "status", "error_type"),
                         [("/v1/completions", *b) for b in BAD_COMPLETIONS] + [("/get_sequence_logprobs/", *b) for b in BAD_TRL])
def test_bad_input_on_peer_routes_gets_4xx_envelope(live_server, route, body, status, error_type):
    r = httpx.post(live_server.url + route, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == error_type
    assert httpx.get(live_server.url + "/health/").json() == {"status": "ok"}


@pytest.mark.numeric
def test_text_prompts_are_tokenised_with_the_teachers_tokenizer(live_server, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "w1 w2 w3 w4 w5 w6"
    ids = tok(text)["input_ids"]
    a = httpx.post(live_server.url + "/v1/completions", json={"prompt": text, "max_tokens": 0, "prompt_logprobs": 2,
                                                               "echo": True}).json()
    b = httpx.post(live_server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}).json()
    pa, pb = a["choices"][0]["prompt_logprobs"], b["choices"][0]["prompt_logprobs"]
    assert [list(e) for e in pa[1:]] == [list(e) for e in pb[1:]] and pa[0] is None is pb[0]  # same ids, order
    tol = float32_tol([1.0], model_terms(tiny_model_dir))
    for ea, eb in zip(pa[1:], pb[1:], strict=True):
        assert all(abs(ea[t]["logprob"] - eb[t]["logprob"]) <= tol for t in ea)
    assert a["choices"][0]["text"] == tok.decode(ids)
    t = httpx.post(live_server.url + "/tokenize", json={"prompt": text}).json()
    assert t["tokens"] == ids and t["count"] == len(ids)


# ----------------------------------------------------------------------------------------------------------
# a stock vLLM server (vLLM's own code, the pinned CPU build) as the teacher of our client and trainer
# ----------------------------------------------------------------------------------------------------------

def stock(test):
    """A test against the stock vLLM server: needs vLLM, and starts one (~30 s on CPU)."""
    for mark in (pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def stock_vllm(tiny_model_dir):
    from teacher_server.process import stock_vllm_in_subprocess

    with stock_vllm_in_subprocess(str(tiny_model_dir), None, "--dtype", "float32", "--max-logprobs", "32",
                                  "--max-model-len", "513", "--no-enable-prefix-caching",
                                  "--max-num-batched-tokens", "2048") as server:
        yield server


def direct_logits(model_dir, seqs) -> list:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0, :-1].double() for s in seqs]


@stock
@pytest.mark.numeric
def test_our_client_on_stock_vllm_equals_our_server(stock_vllm, live_server, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    seqs = [s for s in sequences(6, lengths=(9, 40, 3, 25)) if len(s) > 2]
    batch = ScoreBatch.from_sequences([(s, 2) for s in seqs], K)
    with TeacherClient(stock_vllm.url) as client:  # protocol auto: stock vLLM has no /v1/info
        info = client.connect(tokenizer=tok, top_k=K, max_seq_len=512)
        assert client.protocol == "openai" and info.engine == "openai" and info.max_seq_len == 512
        got = client.score_batch(batch)
    ref = our_scores(live_server.url, seqs, [2] * len(seqs), K)
    tol = float32_tol(ref.topk_logprobs_NK, model_terms(tiny_model_dir))
    np.testing.assert_allclose(got.token_logprobs_N, ref.token_logprobs_N, atol=tol, rtol=0)
    assert_topk_match(got.topk_ids_NK, got.topk_logprobs_NK, ref.topk_ids_NK, ref.topk_logprobs_NK, tol)


@stock
@pytest.mark.numeric
def test_our_completions_match_stock_vllm(stock_vllm, live_server, tiny_model_dir):
    """The same request to both servers: the same response shape (keys, choices, one dict per prompt token, the
    actual token's key first), values within float tolerance, and ranks that are true ranks on both."""
    seqs = sequences(7, lengths=(12, 1, 30))
    body = {"prompt": seqs, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": K}
    stock = httpx.post(stock_vllm.url + "/v1/completions", json={"model": str(tiny_model_dir), **body}, timeout=60)
    ours = httpx.post(live_server.url + "/v1/completions", json=body, timeout=60)
    assert stock.status_code == ours.status_code == 200
    s_json, o_json = stock.json(), ours.json()
    assert set(o_json) <= set(s_json) and set(o_json["choices"][0]) <= set(s_json["choices"][0])
    assert [c["index"] for c in o_json["choices"]] == [c["index"] for c in s_json["choices"]]
    for sc, oc, seq in zip(s_json["choices"], o_json["choices"], seqs, strict=True):
        assert len(sc["prompt_logprobs"]) == len(oc["prompt_logprobs"]) == len(seq)
        assert sc["prompt_logprobs"][0] is None and oc["prompt_logprobs"][0] is None
        for pos in range(1, len(seq)):
            assert next(iter(sc["prompt_logprobs"][pos])) == next(iter(oc["prompt_logprobs"][pos])) == str(seq[pos])
            assert len(sc["prompt_logprobs"][pos]) == len(oc["prompt_logprobs"][pos])
    arrays = [np.asarray(s) for s in seqs]
    ones = np.ones(len(seqs), np.int64)
    s_rows = read_prompt_logprobs(stock.content, arrays, ones, K)
    o_rows = read_prompt_logprobs(ours.content, arrays, ones, K)
    tol = float32_tol(o_rows.topk_logprobs_NK, model_terms(tiny_model_dir))
    np.testing.assert_allclose(s_rows.token_logprobs_N, o_rows.token_logprobs_N, atol=tol, rtol=0)
    assert_topk_match(s_rows.topk_ids_NK, s_rows.topk_logprobs_NK, o_rows.topk_ids_NK, o_rows.topk_logprobs_NK, tol)
    logits = direct_logits(tiny_model_dir, [s for s in seqs if len(s) > 1])
    import torch

    for rows in (s_rows, o_rows):
        r = 0
        for seq, lg in zip([s for s in seqs if len(s) > 1], logits, strict=True):
            target = lg.gather(1, torch.tensor(seq[1:])[:, None])
            ranks = torch.from_numpy(rows.token_ranks_N[r : r + len(seq) - 1])
            assert ((ranks >= (lg > target + tol).sum(1) + 1) & (ranks <= (lg >= target - tol).sum(1))).all()
            r += len(seq) - 1


@stock
@pytest.mark.numeric
def test_temperature_does_not_change_prompt_logprobs_on_stock_vllm_or_ours(stock_vllm, live_server, tiny_model_dir):
    """What the README says about `temperature`: stock vLLM 0.32 returns log_softmax(logits) for prompt
    positions whatever the request's temperature, and so do we."""
    seqs = sequences(8, lengths=(10, 6))
    for url, model in ((stock_vllm.url, str(tiny_model_dir)), (live_server.url, None)):
        outs = []
        for temperature in (1.0, 0.3):
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": seqs, "max_tokens": 1,
                                                          "temperature": temperature, "prompt_logprobs": 3}, timeout=60)
            assert r.status_code == 200, r.text
            outs.append(read_prompt_logprobs(r.content, [np.asarray(q) for q in seqs], np.ones(len(seqs), np.int64), 3))
        # T = 0.3 would move every logprob by O(1); only float rounding between the two requests is allowed
        tol = float32_tol(outs[0].topk_logprobs_NK, model_terms(tiny_model_dir))
        np.testing.assert_allclose(outs[1].token_logprobs_N, outs[0].token_logprobs_N, atol=tol, rtol=0)
        assert_topk_match(outs[1].topk_ids_NK, outs[1].topk_logprobs_NK, outs[0].topk_ids_NK, outs[0].topk_logprobs_NK, tol)


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from student_trainer.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("student"), hidden_size=64, num_layers=1, num_heads=1,
                            intermediate_size=128, seed=3, tokenizer_dir=tiny_model_dir)


@stock
@pytest.mark.numeric
def test_trainer_with_stock_vllm_serve_as_teacher(stock_vllm, live_server, student_dir, tmp_path):
    """`python -m student_trainer` with teacher.url at a stock vLLM server: it trains, and the advantages it
    computed from that teacher's logprobs equal the ones from our server for the same rollouts."""
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 4)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dumps = {}
    for name, url in (("stock", stock_vllm.url), ("ours", live_server.url)):
        overrides = cfg_overrides(student_dir, url, (data, data), tmp_path / name, "train.steps=1", "train.eval_every=0",
                                  "train.dump_rollouts_every=1", "loss.mode=aopd")
        proc = subprocess.run([sys.executable, "-m", "student_trainer", *overrides], capture_output=True, text=True,
                              timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert any("optim/grad_norm" in m and np.isfinite(m["loss/total"]) for m in metrics)
        dumps[name] = [json.loads(x) for x in next((tmp_path / name).glob("rollouts*")).read_text().splitlines()]
    assert [d["completion_ids"] for d in dumps["stock"]] == [d["completion_ids"] for d in dumps["ours"]]
    adv_stock = np.concatenate([d["advantage"] for d in dumps["stock"]])
    adv_ours = np.concatenate([d["advantage"] for d in dumps["ours"]])
    # advantages are dumped rounded to 1e-4; beyond that the two teachers differ by float rounding only
    np.testing.assert_allclose(adv_stock, adv_ours, atol=1e-4 + 1e-4, rtol=0)
