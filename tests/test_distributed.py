"""The multi-process trainer (torchrun + FSDP2) on CPU: gloo, 2 processes, a live teacher on 127.0.0.1.

Both runs see the same global batch (same prompts, and the same rollouts: each rank samples whole chunks with
the single-process seeds), so a 2-rank run must reproduce the single-process losses and weights up to float
reassociation: FSDP sums the ranks' gradients in another order than one process accumulates micro-batches.
Tolerance: losses to 1e-5 relative; weights to 2e-5 absolute after two AdamW steps at lr 1e-3 (Adam divides
by sqrt(v), so a ~1e-7 relative gradient difference moves an update by ~1e-7 of lr; 2e-5 still sits 50x below
the size of one update, so a mismatch of the data, the loss normalisation or the gradient averaging fails it).
Checkpoints are keyed by name: a 2-rank run writes its weights and optimizer state as shards (each rank its own,
torch.distributed.checkpoint, resharded on load), one process a full state; either resumes on 1 rank or 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer.config import ConfigError, dump_config
from student_trainer.parallel import Ranks, local_chunks
from student_trainer.tiny_models import build_tiny_model
from teacher_server.app import create_app
from tests.helpers import HAS_VLLM, LiveServer, make_cfg, teacher_settings

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.numeric, pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")]

LOSS_TOL = 1e-5
WEIGHT_TOL = 2e-5


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    student = build_tiny_model(d / "student", hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128,
                               seed=3, tokenizer_dir=tiny_model_dir)
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 4)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    with LiveServer(create_app(teacher_settings(tiny_model_dir, "hf", batch_wait_ms=0))) as server:
        yield {"student": student, "dir": d, "url": server.url}


def write_config(setup, run_dir: Path, *overrides: str) -> Path:
    """test_train's config (4 prompts x 2 samples per step in chunks of 2, micro-batches of 3, 2 steps), as a file."""
    d = setup["dir"]
    cfg = make_cfg(setup["student"], setup["url"], (d / "train.jsonl", d / "eval.jsonl"), run_dir,
                   "loss.mode=aopd", "train.eval_every=0", "train.dump_rollouts_every=1", *overrides)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    dump_config(cfg, path)
    return path


def run(config: Path, nproc: int, *args: str) -> str:
    # One thread per process: both runs then take the same float paths in the same kernels.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "student_trainer", "--config", str(config), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def steps(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "optim/grad_norm" in r]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def sharded_tensors(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """The global shapes of the tensors in a checkpoint's dcp/, by DCP's flattened key."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in md.items() if isinstance(v, TensorStorageMetadata)}


def sharded_exp_avg(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """exp_avg's global shape by parameter name (`model.` + the Hugging Face name)."""
    return {k.removeprefix("optimizer.state.").removesuffix(".exp_avg"): v for k, v in sharded_tensors(ckpt).items()
            if k.startswith("optimizer.state.") and k.endswith(".exp_avg")}


def assert_sharded_checkpoint(ckpt: Path, world: int) -> None:
    """Written by `world` ranks: the HF export, a trainer_state.pt without the optimizer state, one DCP file per
    rank holding the weights and optimizer state under their names with global (unsharded) shapes."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert "optimizer" not in state and {"step", "scheduler", "sampler", "torch_rng"} <= state.keys()
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", *(f"__{r}_0.distcp" for r in range(world))]
    full = load_file(str(ckpt / "model.safetensors"))
    tensors = sharded_tensors(ckpt)
    assert {k.removeprefix("model.model.") for k in tensors if k.startswith("model.")} == set(full)
    exp_avg = sharded_exp_avg(ckpt)
    assert {k.removeprefix("model.") for k in exp_avg} == set(full)
    assert all(exp_avg[k] == tuple(full[k.removeprefix("model.")].shape) for k in exp_avg)


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= WEIGHT_TOL, worst
    return worst


@pytest.fixture(scope="module")
def single(setup) -> Path:
    """The reference: one process, two steps."""
    run_dir = setup["dir"] / "single"
    run(write_config(setup, run_dir), 1)
    return run_dir


def test_two_ranks_match_one_process_on_the_same_global_batch(setup, single):
    run_dir = setup["dir"] / "two"
    out = run(write_config(setup, run_dir, "train.eval_every=2"), 2)
    assert out.count("step 00001/00002") == 1, "only rank 0 prints step lines"
    a, b = steps(single), steps(run_dir)
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        # the same rollouts: same lengths and correctness over the global batch
        assert ra["rollout/len_mean"] == rb["rollout/len_mean"]
        assert ra["rollout/correct_frac"] == rb["rollout/correct_frac"]
        for k in ("loss/total", "loss/pg", "loss/div", "aopd/intervention_ratio", "policy/entropy", "optim/grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=LOSS_TOL, abs=1e-7), k
        assert len(rb["adv/hist_counts"]) == len(ra["adv/hist_counts"])
        assert sum(rb["adv/hist_counts"]) == sum(ra["adv/hist_counts"])  # every rank's tokens reached rank 0
        # FSDP: each of 2 ranks holds half the weights and half the optimizer state (up to padding of odd rows)
        assert rb["memory/weights_mib"] == pytest.approx(ra["memory/weights_mib"] / 2, rel=0.02)
        assert rb["memory/optimizer_mib"] == pytest.approx(ra["memory/optimizer_mib"] / 2, rel=0.02)
    dumped = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (single / "rollouts.jsonl").read_text().splitlines()]
    assert [r["completion_ids"] for r in dumped] == [r["completion_ids"] for r in reference]
    assert_weights_close(weights(single, 2), weights(run_dir, 2))
    init = load_file(str(setup["student"] / "model.safetensors"))
    assert any(not torch.equal(v, init[k]) for k, v in weights(run_dir, 2).items()), "training changed nothing"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2]  # each rank evaluated a share; rank 0 merged and logged once


def test_two_rank_checkpoint_resumes_on_one_rank_and_back(setup, single):
    # 2 ranks, stop after step 1 -> resume on 1 process for step 2
    run_dir = setup["dir"] / "two_then_one"
    cfg = write_config(setup, run_dir, "train.stop_after_steps=1")
    run(cfg, 2)
    assert (run_dir / "checkpoints" / "step_000001").is_dir()
    assert not (run_dir / "checkpoints" / "step_000002").exists()
    assert_sharded_checkpoint(run_dir / "checkpoints" / "step_000001", world=2)
    run(write_config(setup, run_dir), 1, "--resume")  # DCP reshards: one process reads both ranks' shards
    assert [r["step"] for r in steps(run_dir)] == [1, 2]
    assert_weights_close(weights(single, 2), weights(run_dir, 2))

    # 1 process, stop after step 1 -> resume on 2 ranks for step 2. The 1-process checkpoint holds the full
    # optimizer state in trainer_state.pt, as every checkpoint did before dcp/: that format still resumes.
    run_dir = setup["dir"] / "one_then_two"
    run(write_config(setup, run_dir, "train.stop_after_steps=1"), 1)
    state = torch.load(run_dir / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=True)
    exp_avg = {k: v["exp_avg"] for k, v in state["optimizer"]["state"].items()}
    assert all(isinstance(k, str) for k in exp_avg)  # keyed by parameter name: loads on any number of ranks
    assert not (run_dir / "checkpoints" / "step_000001" / "dcp").exists()
    run(write_config(setup, run_dir), 2, "--resume")
    assert_weights_close(weights(single, 2), weights(run_dir, 2))
    assert_sharded_checkpoint(run_dir / "checkpoints" / "step_000002", world=2)


def test_sharded_checkpoint_resumes_on_two_ranks_like_an_uninterrupted_run(setup, single):
    """Two ranks save every step; a copy of the step-1 checkpoint resumed on two ranks reaches the step-2 loss,
    weights and optimizer state of the uninterrupted run (measured: bit-identical), the weights, the moments and
    the step count coming back from each rank's own shards: a resume that lost the moments or the step count
    moves a weight by ~lr = 1e-3, 50x the tolerance."""
    whole, split = setup["dir"] / "two_every_step", setup["dir"] / "two_resumed"
    run(write_config(setup, whole, "train.save_every=1"), 2)
    for step in (1, 2):
        assert_sharded_checkpoint(whole / "checkpoints" / f"step_{step:06d}", world=2)
    (split / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_000001", split / "checkpoints" / "step_000001")
    run(write_config(setup, split, "train.save_every=1"), 2, "--resume")
    assert [r["step"] for r in steps(split)] == [2]
    for k in ("loss/total", "loss/pg", "loss/div", "optim/grad_norm", "optim/lr"):
        assert steps(split)[0][k] == pytest.approx(steps(whole)[1][k], rel=LOSS_TOL, abs=1e-7), k
    a, b = weights(whole, 2), weights(split, 2)
    assert_weights_close(a, b)
    assert_weights_close(weights(single, 2), b)
    ma, mb = moments(whole, 2), moments(split, 2)
    assert ma.keys() == mb.keys() and len(ma) == 2 * len(a)
    assert all(torch.allclose(ma[k], mb[k], rtol=1e-4, atol=1e-12) for k in ma)
    print(f"resumed vs uninterrupted: weights bit-identical {all(torch.equal(a[k], b[k]) for k in a)}, "
          f"moments bit-identical {all(torch.equal(ma[k], mb[k]) for k in ma)}")


def moments(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """AdamW's exp_avg and exp_avg_sq of a sharded checkpoint, unsharded: DCP read in one process."""
    import torch.distributed.checkpoint as dcp

    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    out = {k: torch.empty(v) for k, v in sharded_tensors(ckpt).items()
           if k.startswith("optimizer.state.") and k.endswith((".exp_avg", ".exp_avg_sq"))}
    with warnings.catch_warnings():  # no process group here, on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(out, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    return out


def test_prompts_split_into_whole_chunks_with_single_process_seeds():
    one = local_chunks(8, 2, Ranks())
    two = [local_chunks(8, 2, Ranks(rank=r, world=2)) for r in range(2)]
    assert one == [(0, 0, 2), (1, 2, 4), (2, 4, 6), (3, 6, 8)]
    assert two[0] + two[1] == one
    uneven = [c for r in range(2) for c in local_chunks(6, 2, Ranks(rank=r, world=2))]  # 3 prompts per rank
    assert [(s, e) for _, s, e in uneven] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert len({ci for ci, _, _ in uneven}) == 4  # chunk indices (sampling seeds) stay unique
    with pytest.raises(ConfigError, match="multiple of 2"):
        local_chunks(5, 2, Ranks(rank=0, world=2))


def test_eval_shards_cover_every_problem_once():
    spans = [Ranks(rank=r, world=3).shard_of(7) for r in range(3)]
    assert spans == [(0, 3), (3, 5), (5, 7)]
    assert Ranks(rank=1, world=2).shard_of(1) == (1, 1)  # fewer problems than ranks: an empty share


def changed_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(int((a[k] != b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())


def test_bfloat16_compute_keeps_float32_master_weights_in_one_and_two_processes(setup):
    """model.dtype=bfloat16 with fp32 master weights (the GPU default) goes through FSDP2 mixed precision, in one
    process too. At lr 1e-5 an Adam update (~1e-5 per element) is far below bfloat16's spacing at these weights,
    so training the bfloat16 weights themselves loses most updates; float32 masters keep them."""
    common = ["model.dtype=bfloat16", "optim.lr=1e-5", "train.dump_rollouts_every=0"]
    init = load_file(str(setup["student"] / "model.safetensors"))
    init_bf16 = {k: v.bfloat16() for k, v in init.items()}
    master, plain, two = (setup["dir"] / n for n in ("bf16_master", "bf16_plain", "bf16_two"))
    run(write_config(setup, master, *common), 1)
    run(write_config(setup, plain, *common, "optim.fp32_master_weights=false"), 1)
    run(write_config(setup, two, *common), 2)
    for run_dir in (master, two):
        w = weights(run_dir, 2)
        assert all(v.dtype == torch.float32 for v in w.values())
        assert changed_fraction(init, w) > 0.5  # measured 0.81 (the rest: embeddings of tokens never seen)
        assert all(r["loss/total"] == r["loss/total"] for r in steps(run_dir))  # finite
    w_plain = weights(plain, 2)
    assert all(v.dtype == torch.bfloat16 for v in w_plain.values())
    assert changed_fraction(init_bf16, w_plain) < 0.25  # measured 0.09: most updates rounded away
    # step 1 sees the same rollouts (sampled from the same bfloat16 weights): same loss to bfloat16 precision
    assert steps(two)[0]["loss/total"] == pytest.approx(steps(master)[0]["loss/total"], rel=1e-2)


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_two_ranks_with_vllm_rollout_engines_follow_the_sharded_policy(setup):
    """Each rank runs its own vLLM engine; after every step rank 0 writes the gathered weights once and every
    engine reloads them. The importance weight p_policy / p_engine at the sampled tokens is then 1 (to float
    rounding, ~1e-6 here); an engine left on stale weights moves it by ~1e-2 after one step at lr 1e-3."""
    shm = Path("/dev/shm")
    before = set(shm.glob("aopd-student-weights-*")) if shm.is_dir() else set()
    run_dir = setup["dir"] / "two_vllm"
    run(write_config(setup, run_dir, "rollout.engine=vllm", "loss.importance_correction=true", "train.steps=3"), 2)
    records = steps(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(abs(r["is/weight_mean"] - 1.0) < 1e-3 for r in records), [r["is/weight_mean"] for r in records]
    after = set(shm.glob("aopd-student-weights-*")) if shm.is_dir() else set()
    assert after <= before, "the shared weights directory is removed at the end"


def test_index_keyed_optimizer_state_of_older_checkpoints_loads_into_a_sharded_policy(setup):
    """Checkpoints written before name-keyed optimizer states hold `optimizer.state_dict()` (keyed by index);
    they resume into an FSDP2 policy too (here over a process group of one)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from student_trainer.parallel import Policy, full_optimizer_state, load_optimizer_state, shard

    def fresh(sharded: bool = False):
        policy = Policy(AutoModelForCausalLM.from_pretrained(str(setup["student"]), dtype=torch.float32))
        if sharded:
            shard(policy, Ranks(), torch.device("cpu"))
        return policy, torch.optim.AdamW(policy.parameters(), lr=1e-3)  # after sharding, as in train()

    policy, opt = fresh()
    policy.model(torch.arange(2, 12)[None]).logits.logsumexp(-1).sum().backward()
    opt.step()
    legacy = opt.state_dict()
    assert all(isinstance(k, int) for k in legacy["state"])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded, opt2 = fresh(sharded=True)
        load_optimizer_state(sharded, opt2, legacy)
        loaded = full_optimizer_state(sharded, opt2)["state"]
        names = [n for n, _ in policy.named_parameters()]
        for i, name in enumerate(names):
            assert torch.equal(loaded[name]["exp_avg"], legacy["state"][i]["exp_avg"]), name
        ids = torch.arange(2, 12)[None]
        rows = torch.arange(9)
        loss = sharded(ids, torch.ones_like(ids), torch.zeros_like(rows), rows, lambda h, w, _: (h @ w.T).logsumexp(-1).sum())
        loss.backward()
        opt2.step()  # DTensor state: no mixed Tensor/DTensor error
    finally:
        dist.destroy_process_group()


def test_activation_checkpointing_gives_the_same_update(setup, single):
    """Recomputing each decoder layer in backward repeats the same kernels: bit-identical weights in one
    process; under FSDP2 the wrapped layers shard like the plain ones and checkpoints keep Hugging Face names."""
    one = setup["dir"] / "ac_one"
    run(write_config(setup, one, "optim.activation_checkpointing=true"), 1)
    a, b = weights(single, 2), weights(one, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    two = setup["dir"] / "ac_two"
    run(write_config(setup, two, "optim.activation_checkpointing=true"), 2)
    assert_weights_close(weights(single, 2), weights(two, 2))
    assert_sharded_checkpoint(two / "checkpoints" / "step_000002", world=2)  # Hugging Face names in dcp/ too


def lora_adapter(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "adapter_model.safetensors"))


def test_two_rank_lora_run_matches_one_process(setup, single):
    """LoRA under FSDP2: the adapters shard with their decoder layers next to the frozen base; the 2-rank
    adapters and losses equal one process's (same tolerances as the full-weight run), the base is untouched,
    and the 2-rank adapter checkpoint resumes in one process."""
    lora = ["model.lora.rank=8", "optim.lr=1e-2"]
    one, two = setup["dir"] / "lora_one", setup["dir"] / "lora_two"
    run(write_config(setup, one, *lora), 1)
    run(write_config(setup, two, *lora), 2)
    a, b = steps(one), steps(two)
    for ra, rb in zip(a, b, strict=True):
        assert ra["rollout/len_mean"] == rb["rollout/len_mean"]
        for k in ("loss/total", "loss/pg", "loss/div", "policy/entropy", "optim/grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=LOSS_TOL, abs=1e-7), k
        # the optimizer holds the adapters only, half of them on each rank
        assert rb["memory/optimizer_mib"] == pytest.approx(ra["memory/optimizer_mib"] / 2, rel=0.05)
    assert a[0]["memory/optimizer_mib"] < 0.2 * steps(single)[0]["memory/optimizer_mib"]
    wa, wb = lora_adapter(one, 2), lora_adapter(two, 2)
    assert wa.keys() == wb.keys() and all("lora_" in k for k in wa)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 10 * WEIGHT_TOL, worst  # lr 1e-2 here, 10x the full-weight run's 1e-3
    assert any(float(v.abs().max()) > 0 for k, v in wb.items() if "lora_B" in k), "training changed nothing"
    # 2 ranks stop after step 1, one process resumes for step 2
    split = setup["dir"] / "lora_split"
    run(write_config(setup, split, *lora, "train.stop_after_steps=1"), 2)
    run(write_config(setup, split, *lora), 1, "--resume")
    ws = lora_adapter(split, 2)
    assert max(float((wa[k] - ws[k]).abs().max()) for k in wa) <= 10 * WEIGHT_TOL


def test_bfloat16_lora_keeps_a_bfloat16_base_and_float32_adapters_in_one_and_two_processes(setup):
    """LoRA in bfloat16 (the GPU default): the frozen base stays bfloat16 (no float32 copy), peft keeps the
    adapters float32, so updates of lr 1e-4 do not round away; one process without FSDP, two with FSDP2 mixed
    precision (all-gathered in bfloat16, reduced in float32) see the same step-1 loss to bfloat16 precision."""
    common = ["model.dtype=bfloat16", "model.lora.rank=8", "optim.lr=1e-4", "train.dump_rollouts_every=0"]
    one, two = setup["dir"] / "lora_bf16_one", setup["dir"] / "lora_bf16_two"
    run(write_config(setup, one, *common), 1)
    run(write_config(setup, two, *common), 2)
    for run_dir in (one, two):
        w = lora_adapter(run_dir, 2)
        assert all(v.dtype == torch.float32 for v in w.values())
        b = [v for k, v in w.items() if "lora_B" in k]
        assert b and all(float(v.abs().max()) > 0 for v in b)  # every adapter moved off B = 0
        rs = steps(run_dir)
        assert all(r["loss/total"] == r["loss/total"] for r in rs)  # finite
    # the frozen base is held in bfloat16: 2 bytes per base parameter plus float32 adapters
    base = sum(v.numel() for v in load_file(str(setup["student"] / "model.safetensors")).values())
    adapter = sum(v.numel() for v in lora_adapter(one, 2).values())
    assert steps(one)[0]["memory/weights_mib"] == pytest.approx((2 * base + 4 * adapter) / 2**20, rel=1e-9)
    assert steps(two)[0]["loss/total"] == pytest.approx(steps(one)[0]["loss/total"], rel=1e-2)


@pytest.fixture(scope="module")
def two_teachers(setup, tiny_model_dir):
    d = setup["dir"]
    other = build_tiny_model(d / "teacher2", seed=7, tokenizer_dir=tiny_model_dir)
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b), "teacher": "math" if b % 2 else "code"}
            for a in range(1, 7) for b in range(1, 4)]
    (d / "routed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with LiveServer(create_app(teacher_settings(other, "hf", batch_wait_ms=0))) as server:
        yield ["teacher.url=null", f"data.train_path={d / 'routed.jsonl'}", "data.teacher_field=teacher",
               f"teacher.teachers={{math: {{url: '{setup['url']}'}}, code: {{url: '{server.url}', top_k: 4}}}}"]


def test_two_teachers_on_two_ranks_match_one_process_and_resume(setup, two_teachers):
    """Per-teacher micro-batches and metrics are summed over ranks under the same names on every rank."""
    one, two, split = (setup["dir"] / n for n in ("teachers_one", "teachers_two", "teachers_split"))
    run(write_config(setup, one, *two_teachers), 1)
    run(write_config(setup, two, *two_teachers), 2)
    for ra, rb in zip(steps(one), steps(two), strict=True):
        for k in ("loss/total", "teacher/math/loss/div", "teacher/code/loss/div", "teacher/math/aopd/intervention_ratio",
                  "teacher/code/tokens", "optim/grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=LOSS_TOL, abs=1e-7), k
        assert ra["teacher/math/tokens"] > 0 and ra["teacher/code/tokens"] > 0
    assert_weights_close(weights(one, 2), weights(two, 2))
    run(write_config(setup, split, *two_teachers, "train.stop_after_steps=1"), 2)
    run(write_config(setup, split, *two_teachers), 1, "--resume")
    assert_weights_close(weights(one, 2), weights(split, 2))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_rank0_loading_gives_every_rank_the_same_shards(tmp_path, tiny_model_dir, tied):
    """Only rank 0 reads the weights, the other rank builds on the meta device and is filled by broadcast: its
    shards and buffers equal those of every rank reading the model itself, and an HF replica built from that
    policy equals the model on disk (tied embeddings stay tied; to_empty alone would untie them)."""
    model = build_tiny_model(tmp_path / "m", hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128,
                             seed=5, tokenizer_dir=tiny_model_dir, tie_word_embeddings=tied)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "workers" / "load_ranks.py"), str(model), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(x["rank"] for x in lines) == [0, 1]
    for x in lines:
        assert x["params_equal"] and x["buffers_equal"] and x["replica_equal"] and x["logits_equal"], x
        assert x["replica_tied"] == tied


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (its absence is refused first)")
def test_vllm_rollouts_on_several_nodes_are_refused_before_anything_loads(setup, monkeypatch):
    """torchrun on two nodes (LOCAL_WORLD_SIZE 1 of WORLD_SIZE 2): the engines could not read rank 0's weights, so
    the run stops at once, naming the cause and the two ways out; no process group is needed to get there."""
    from student_trainer import train

    cfg = make_cfg(setup["student"], setup["url"], (setup["dir"] / "train.jsonl", setup["dir"] / "eval.jsonl"),
                   setup["dir"] / "multinode", "rollout.engine=vllm")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"several nodes.*/dev/shm.*one node.*rollout.engine=hf"):
        train.setup(cfg, False, Ranks(rank=1, world=2, local_rank=0), None)
