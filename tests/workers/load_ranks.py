"""Run under torchrun (gloo, CPU): load a student the two ways `train.setup` can and compare the shards.

`every`: each rank reads the full model from disk, then shards it (what setup did before rank-0 loading).
`rank0`: rank 0 reads it, the other ranks build it on the meta device, and `fill_from_rank0` broadcasts.
Both are sharded the same way; each rank checks that its local shards and buffers are bit-identical, and that
an HF replica built from the rank-0-loaded policy equals the model on disk. Writes OUT_DIR/rank<r>.json per rank
(a file each: two ranks printing to one pipe can interleave their lines).
usage: torchrun --nproc-per-node 2 tests/workers/load_ranks.py MODEL_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from student_trainer.parallel import (
    Policy,
    Ranks,
    build_replica,
    fill_from_rank0,
    full_state_before_sharding,
    init_ranks,
    load_causal_lm,
    shard,
)


def sharded(path: str, ranks: Ranks, device: torch.device, rank0: bool) -> Policy:
    meta = rank0 and not ranks.main
    policy = Policy(load_causal_lm(path, torch.float32, meta=meta))
    state = full_state_before_sharding(policy) if rank0 and ranks.main else None
    shard(policy, ranks, device)
    if rank0:
        fill_from_rank0(policy, ranks, device, state)
    return policy


def main() -> None:
    path = sys.argv[1]
    ranks, device = init_ranks("cpu", 60)
    every, rank0 = sharded(path, ranks, device, False), sharded(path, ranks, device, True)
    names = [n for n, _ in every.named_parameters()]
    assert names == [n for n, _ in rank0.named_parameters()]
    params_equal = all(torch.equal(a.to_local(), b.to_local())
                       for a, b in zip(every.parameters(), rank0.parameters(), strict=True))
    buffers_equal = all(torch.equal(a, b) for a, b in zip(every.buffers(), rank0.buffers(), strict=True))
    replica = build_replica(rank0, path, torch.float32, device)
    disk = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    replica_equal = all(torch.equal(a, b) for a, b in zip(replica.state_dict().values(), disk.state_dict().values(), strict=True))
    tied = replica.get_output_embeddings().weight is replica.get_input_embeddings().weight
    x = torch.tensor([[1, 2, 3, 4]])
    logits_equal = torch.equal(replica(x).logits, disk(x).logits)
    result = {"rank": ranks.rank, "params_equal": params_equal, "buffers_equal": buffers_equal,
              "replica_equal": replica_equal, "replica_tied": tied, "logits_equal": logits_equal, "n_params": len(names)}
    (Path(sys.argv[2]) / f"rank{ranks.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
