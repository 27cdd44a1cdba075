"""What issue #13's fixes change at a scale closer to a real student, on CPU: memory, padding, weight sync, start-up.

    python bench/scale.py [--hidden 1024] [--layers 16] [--vocab 32000] [--tokens 2048] [--skip-sync]

Builds (offline, random weights) a Qwen3-shaped student of a few hundred million parameters, float32, then:

1. Update memory, one process: peak resident memory of one forward + backward of the fused AOPD loss over one
   micro-batch of `--tokens` tokens, above the weights and Adam state, with and without activation
   checkpointing; beside it, what `student_trainer.estimate` predicts for the same terms (gradients,
   activations, the fused loss's temporaries). Two model sizes (this one and one of half the layers and width).
2. Padding: the share of an update's forward positions that are padding for one step's rollouts (64 prompts x
   8 samples, completion lengths drawn from a long-tailed distribution like reasoning traces), micro-batches of
   4 sequences cut in rollout order (before) against `optim.micro_batch_tokens` (after).
3. Weight sync, 2 ranks (torchrun, gloo): what a step pays to hand its weights to a bfloat16 vLLM engine.
   Before: the full float32 state gathered to rank 0's host, cast there, written with `save_pretrained`.
   After: each tensor cast on its rank before the all-gather, written in ~1 GiB safetensors parts. Seconds
   (median of 3) and bytes gathered / written.
4. Start-up, 2 ranks: each rank's peak resident memory after loading and sharding the student, every rank
   reading the weights (before) against rank 0 only, the other on the meta device (after).
One process per measurement (peak resident memory is per process); torch threads: 2, 1 per rank under torchrun;
MALLOC_MMAP_THRESHOLD_=131072, so freed blocks leave the resident set (glibc's default keeps them: measured on the
56M student with checkpointing, 880 MiB by default against 521 with the fixed threshold, estimate 511).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_student(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A Qwen3 config with `hidden` width (heads of 64), 2.75x MLP, random weights; no tokenizer needed."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if (out / "config.json").is_file():
        return out
    heads = hidden // 64
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      head_dim=64, max_position_embeddings=8192, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(str(out))
    return out


# ---- workers (each in its own process) ------------------------------------------------------------------------


def worker_memory(model_dir: str, tokens: int, checkpointing: bool) -> dict:
    import torch

    from student_trainer.losses import LossConfig, fused_token_losses
    from student_trainer.parallel import Policy, checkpoint_layers, init_optimizer_state, load_causal_lm

    torch.set_num_threads(2)
    model = load_causal_lm(model_dir, torch.float32).eval()
    if checkpointing:
        checkpoint_layers(model)
    policy = Policy(model)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    init_optimizer_state(opt)
    vocab, k = model.config.vocab_size, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    seq_N, row_N = torch.zeros(tokens - 1, dtype=torch.long), torch.arange(tokens - 1)
    n = tokens - 1
    t_lp = torch.log_softmax(torch.randn(n, vocab, generator=g), -1)
    topk_lp, topk_ids = t_lp.topk(k, -1)
    t_tok = t_lp.gather(1, ids[0, 1:, None]).squeeze(1)  # the teacher's logprob of each sampled token
    del t_lp  # a teacher sends top-K rows, not [N, V]
    cfg = LossConfig(mode="aopd", chunk_size=128)

    def head(hidden_ND, weight_VD, sampled_N):
        return fused_token_losses(hidden_ND, weight_VD, sampled_N, t_tok, topk_ids, topk_lp, cfg).loss_N

    base = rss_bytes()
    t0 = time.perf_counter()
    policy(ids, torch.ones_like(ids), seq_N, row_N, head).sum().backward()
    return {"base_mib": base / MIB, "peak_extra_mib": (peak_bytes() - base) / MIB, "seconds": time.perf_counter() - t0}


def worker_startup(model_dir: str, rank0: bool) -> dict:
    import torch
    import torch.distributed as dist

    from student_trainer.parallel import (
        Policy,
        fill_from_rank0,
        full_state_before_sharding,
        init_ranks,
        load_causal_lm,
        shard,
    )

    ranks, device = init_ranks("cpu", 600)
    base = rss_bytes()
    t0 = time.perf_counter()
    meta = rank0 and not ranks.main
    policy = Policy(load_causal_lm(model_dir, torch.float32, meta=meta))
    state = full_state_before_sharding(policy) if rank0 and ranks.main else None
    shard(policy, ranks, device)
    if rank0:
        fill_from_rank0(policy, ranks, device, state)
    del state
    dist.barrier()
    out = {"rank": ranks.rank, "base_mib": base / MIB, "peak_mib": peak_bytes() / MIB,
           "peak_extra_mib": (peak_bytes() - base) / MIB, "seconds": time.perf_counter() - t0}
    dist.destroy_process_group()
    return out


def worker_sync(model_dir: str, out_dir: str, repeats: int) -> dict | None:
    import shutil

    import torch
    import torch.distributed as dist

    from student_trainer.parallel import (
        Policy,
        fill_from_rank0,
        full_model_state,
        full_state_before_sharding,
        init_ranks,
        iter_full_weights,
        load_causal_lm,
        shard,
    )
    from student_trainer.rollout_vllm import write_safetensors

    ranks, device = init_ranks("cpu", 600)
    policy = Policy(load_causal_lm(model_dir, torch.float32, meta=not ranks.main))
    state = full_state_before_sharding(policy) if ranks.main else None
    shard(policy, ranks, device)
    fill_from_rank0(policy, ranks, device, state)
    del state
    engine_dtype = torch.bfloat16
    fp32_bytes = sum(p.numel() for p in policy.parameters()) * 4

    def before(d: str) -> int:  # the path of b7d11fb: full float32 gather to the host, cast there, save_pretrained
        sd = full_model_state(policy)
        if ranks.main:
            sd = {k: v.to(engine_dtype) if v.is_floating_point() else v for k, v in sd.items()}
            policy.model.save_pretrained(d, safe_serialization=True, state_dict=sd)
        return fp32_bytes

    def after(d: str) -> int:  # each rank casts its shard, the all-gathers move bfloat16
        write_safetensors(iter_full_weights(policy, engine_dtype, ranks.main), d)
        return fp32_bytes // 2

    result = {}
    for name, fn in (("before", before), ("after", after)):
        times, gathered = [], 0
        for i in range(repeats):
            d = os.path.join(out_dir, f"{name}-{i}")
            dist.barrier()
            t0 = time.perf_counter()
            gathered = fn(d)
            dist.barrier()
            times.append(time.perf_counter() - t0)
            if ranks.main:
                written = sum(f.stat().st_size for f in Path(d).iterdir() if f.suffix == ".safetensors")
                shutil.rmtree(d)
        result[name] = {"seconds": statistics.median(times), "gathered_bytes": gathered,
                        "written_bytes": written if ranks.main else 0}
    dist.destroy_process_group()
    return result if ranks.main else None


# ---- driver ---------------------------------------------------------------------------------------------------


def run_worker(args: list[str], nproc: int = 1, threads: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="aopd-scale-out-") as out:  # one result file per rank
        # glibc raises its mmap threshold as large blocks are freed, after which freed activations stay in the
        # heap and count in the peak resident memory as if live; a fixed threshold (128 KiB) returns every large
        # block to the system when it is freed, so the peak counts what was live (as a GPU's allocator reports)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "AOPD_SCALE_OUT": out, "MALLOC_MMAP_THRESHOLD_": "131072"}
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                    if nproc > 1 else [sys.executable])
        r = subprocess.run([*launcher, __file__, "--worker", *args], capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"worker {args} failed:\n{r.stderr[-4000:]}")
        return [json.loads(f.read_text()) for f in sorted(Path(out).glob("*.json"))]


def memory_table(a, dirs: list[Path]) -> None:
    from student_trainer.config import load_config
    from student_trainer.estimate import ModelShape, activation_bytes
    from student_trainer.losses import DEFAULT_CHUNK_SIZE

    print(f"\n1. update memory above weights + Adam, one micro-batch of {a.tokens} tokens (float32, fused AOPD loss, "
          f"chunk {DEFAULT_CHUNK_SIZE['cpu']})")
    print(f"{'student':<22} {'checkpointing':<13} {'measured MiB':>12} {'estimate MiB':>12} {'est/meas':>8} {'seconds':>8}")
    for d in dirs:
        shape = ModelShape.from_dir(d)
        for ckpt in (False, True):
            got = run_worker(["memory", str(d), str(a.tokens), str(int(ckpt))])[0]
            cfg = load_config(None, [f"model.path={d}", "teacher.url=http://x", f"data.train_path={d}"])
            chunk = cfg.loss.chunk_size or DEFAULT_CHUNK_SIZE["cpu"]
            est = (shape.params * 4 + activation_bytes(shape, a.tokens, ckpt, 4)  # gradients, activations
                   + 3 * chunk * shape.vocab * 4 + shape.root_params * 4)  # fused loss temporaries, head gradient
            name = f"{shape.params / 1e6:.0f}M ({shape.layers}x{shape.hidden})"
            print(f"{name:<22} {'on' if ckpt else 'off':<13} {got['peak_extra_mib']:12.0f} {est / MIB:12.0f} "
                  f"{est / MIB / got['peak_extra_mib']:8.2f} {got['seconds']:8.1f}", flush=True)


def padding_table() -> None:
    import numpy as np

    from student_trainer.train import micro_batch_groups

    rng = np.random.default_rng(0)
    prompt = 200
    lengths = prompt + np.minimum(np.exp(rng.normal(6.5, 0.8, 64 * 8)).astype(np.int64) + 16, 8192)
    print(f"\n2. padding, one step of 64 prompts x 8 samples: {prompt}-token prompts, completions median "
          f"{int(np.median(lengths - prompt))} / max {int((lengths - prompt).max())} tokens")
    print(f"{'micro-batches':<44} {'forwards':>8} {'padding':>8} {'largest forward (tokens)':>25}")
    budget = int(4 * np.median(lengths))
    for name, groups in (("4 sequences, rollout order (before)", micro_batch_groups(lengths, 4, None)),
                         (f"optim.micro_batch_tokens={budget} (after)", micro_batch_groups(lengths, 64, budget))):
        padded = sum(len(g) * int(lengths[g].max()) for g in groups)
        largest = max(len(g) * int(lengths[g].max()) for g in groups)
        print(f"{name:<44} {len(groups):8d} {1 - lengths.sum() / padded:8.1%} {largest:25d}")


def sync_table(d: Path, tmp: Path) -> None:
    res = run_worker(["sync", str(d), str(tmp / "sync"), "3"], nproc=2, threads=1)[0]
    print("\n3. weight sync to a bfloat16 engine, 2 ranks (gloo), median of 3")
    print(f"{'':<8} {'seconds':>8} {'gathered MiB':>13} {'written MiB':>12}")
    for name in ("before", "after"):
        r = res[name]
        print(f"{name:<8} {r['seconds']:8.2f} {r['gathered_bytes'] / MIB:13.0f} {r['written_bytes'] / MIB:12.0f}")


def startup_table(d: Path) -> None:
    print("\n4. start-up: peak resident memory per rank after loading + sharding, 2 ranks (gloo)")
    print(f"{'':<26} {'rank':>4} {'peak MiB':>9} {'above imports MiB':>18} {'seconds':>8}")
    for name, rank0 in (("every rank reads (before)", False), ("rank 0 reads (after)", True)):
        for r in sorted(run_worker(["startup", str(d), str(int(rank0))], nproc=2, threads=1), key=lambda x: x["rank"]):
            print(f"{name:<26} {r['rank']:4d} {r['peak_mib']:9.0f} {r['peak_extra_mib']:18.0f} {r['seconds']:8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=2048, help="tokens in the measured micro-batch")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        if kind == "memory":
            out = worker_memory(rest[0], int(rest[1]), bool(int(rest[2])))
        elif kind == "startup":
            out = worker_startup(rest[0], bool(int(rest[1])))
        else:
            out = worker_sync(rest[0], rest[1], int(rest[2]))
        if out is not None:
            Path(os.environ["AOPD_SCALE_OUT"], f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out))
        return
    with tempfile.TemporaryDirectory(prefix="aopd-scale-") as t:
        tmp = Path(t)
        big = build_student(tmp / "big", a.hidden, a.layers, a.vocab)
        small = build_student(tmp / "small", a.hidden // 2, a.layers // 2, a.vocab)
        from student_trainer.estimate import ModelShape

        shape = ModelShape.from_dir(big)
        print(f"student: Qwen3-shaped, {shape.params / 1e6:.0f}M parameters ({shape.layers} layers, hidden "
              f"{shape.hidden}, vocab {shape.vocab}), float32 on CPU")
        memory_table(a, [small, big])
        padding_table()
        if not a.skip_sync:
            sync_table(big, tmp)
        startup_table(big)


if __name__ == "__main__":
    main()
