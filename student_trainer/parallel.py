"""Several trainer processes, one per GPU: `torchrun --nproc-per-node N -m student_trainer --config run.yaml`.

Data parallel with FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer is one FSDP unit, the rest
(embeddings, final norm, lm_head) is the root unit, so each rank holds 1/N of the parameters, gradients and
optimizer state. Each step's prompts are split across ranks; every rank generates its share, streams it to the
teacher over its own connection, and backpropagates its share of the step's loss (normalised by the global
token / sequence count, so the summed gradient equals the single-process one). Rank 0 logs. Checkpoints hold
full (unsharded) weights in Hugging Face format, written by rank 0, and the weights and optimizer state as each
rank's own shards (torch.distributed.checkpoint, keyed by parameter name; see student_trainer/checkpoint.py),
so a run can resume on any number of ranks, one included.

Mixed precision (model.dtype bfloat16 with optim.fp32_master_weights, the GPU default) also goes through
FSDP2, in one process too (a process group of one): float32 weights, gradients and optimizer state, bfloat16
compute, float32 gradient reduction. Otherwise, without torchrun, nothing here starts a process group and
`Ranks` is the trivial one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from generation.hf import load_causal_lm
from student_trainer.config import ConfigError

logger = logging.getLogger(__name__)

# Shape letters as in train.py: b = sequences, L = padded length, D = hidden, N = completion positions, V = vocab.


class Policy(nn.Module):
    """The student as one module whose forward ends in the per-token losses.

    FSDP gathers a unit's parameters around that unit's forward. The fused loss reads `lm_head.weight` itself
    (logits = hidden @ W.T in chunks, never the full [N, V] logits), so it has to run inside a forward of the
    unit that owns lm_head: this one. Without FSDP it is a thin wrapper, so both paths run the same code.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids_bL, attention_mask_bL, seq_N, row_N, head: Callable[..., Any]):
        """`head(hidden_ND, weight_VD, sampled_N)`: the losses at the completion positions (row t-1 predicts t)."""
        # use_cache=False: transformers would otherwise build a DynamicCache and copy every layer's K/V
        decoder = self.model.get_decoder()
        hidden_bLD = decoder(input_ids=input_ids_bL, attention_mask=attention_mask_bL, use_cache=False).last_hidden_state
        weight_VD = self.model.get_output_embeddings().weight
        return head(hidden_bLD[seq_N, row_N].to(weight_VD.dtype), weight_VD, input_ids_bL[seq_N, row_N + 1])


@dataclass(frozen=True)
class Ranks:
    """This process's place among the trainer processes; every collective is a no-op when world == 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over ranks, by name (float64, on every rank; every rank passes the same names)."""
        if self.world == 1:
            return dict(values)
        names = sorted(values)
        t = torch.tensor([values[k] for k in names], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return dict(zip(names, t.cpu().tolist(), strict=True))

    def max(self, value: float) -> float:
        """The largest `value` over ranks (on every rank)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0, in rank order (None elsewhere). Picklable objects; in-process only."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shard_of(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of n items (shares differ by at most one)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (self.rank < extra)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(device: str, timeout_s: float, *, single_group: torch.device | None = None) -> tuple[Ranks, torch.device | None]:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU). Returns (ranks, this rank's device);
    the device is None when not launched by torchrun (the caller resolves it as before). `single_group`: not
    under torchrun, but FSDP is wanted on this one device (mixed precision): a process group of one."""
    world = world_from_env()
    if world == 1:
        if single_group is not None and not dist.is_initialized():
            backend = "nccl" if single_group.type == "cuda" else "gloo"
            if single_group.type == "cuda" and single_group.index is not None:
                torch.cuda.set_device(single_group)  # FSDP places the shards on the current device
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return Ranks(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"model.device={device!r} under torchrun: each rank takes the GPU of its LOCAL_RANK; use model.device=auto "
            "(or cuda / cpu) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    return Ranks(rank, world, local_rank), dev


def close_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the classes a transformers model lists in `_no_split_modules`
    (their activation-checkpoint wrappers where `checkpoint_layers` wrapped them)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    wrapped = {id(m._checkpoint_wrapped_module) for m in model.modules() if isinstance(m, CheckpointWrapper)}
    return [
        m for m in model.modules()
        if (isinstance(m, CheckpointWrapper) and type(m._checkpoint_wrapped_module).__name__ in names)
        or (type(m).__name__ in names and id(m) not in wrapped)
    ]


def checkpoint_layers(model: nn.Module) -> int:
    """Activation checkpointing of every decoder layer (torch's non-reentrant checkpoint wrapper, as torchtitan
    applies before `fully_shard`): a layer keeps only its input for backward and recomputes the rest, so
    activation memory is one layer's worth plus an [L, D] input per layer. transformers' own
    `gradient_checkpointing_enable()` would do nothing here: it checkpoints only in train() mode, and the
    policy stays in eval(). The gradients are the same (recomputation repeats the same kernels). Parameter
    names gain a `_checkpoint_wrapped_module.` part; state dicts do not. Returns the number of layers wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    names = set(getattr(model, "_no_split_modules", None) or [])
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: type(m).__name__ in names,
    )
    return sum(isinstance(m, CheckpointWrapper) for m in model.modules())


def param_name(name: str) -> str:
    """A policy parameter's Hugging Face name (no `model.` prefix, no checkpoint-wrapper part)."""
    return name.removeprefix("model.").replace("._checkpoint_wrapped_module", "")


def shard(policy: Policy, ranks: Ranks, device: torch.device, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2: one unit per decoder layer, then the root unit; parameters move to `device`, 1/N on each rank.
    `compute_dtype`: mixed precision; the sharded weights keep their dtype (float32 masters), each unit's
    forward and backward run in `compute_dtype`, and gradients are reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(policy.model)
    if not layers:
        raise ConfigError(
            f"{type(policy.model).__name__} names no decoder layer class in _no_split_modules, so FSDP cannot shard it "
            "layer by layer; use a transformers causal LM (Llama, Qwen, Mistral, ...)"
        )
    mesh = init_device_mesh(device.type, (ranks.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)


def full_state_before_sharding(policy: Policy) -> dict[str, torch.Tensor]:
    """Rank 0's full state under the names `set_model_state_dict` expects (references, no copy)."""
    return get_model_state_dict(policy)


@torch.no_grad()
def fill_from_rank0(policy: Policy, ranks: Ranks, device: torch.device, state: dict[str, torch.Tensor] | None) -> None:
    """After `shard`: the ranks whose model was built on the meta device (every rank but 0) get storage on
    `device`, then each rank's shards are filled from rank 0's full `state` (one broadcast per tensor; rank 0
    alone ever holds the full model on its host), and the buffers the state dict does not hold (rotary
    frequencies, ...) are broadcast from rank 0. Collective."""
    if not ranks.main:
        policy.to_empty(device=device)
    set_model_state_dict(policy, state if ranks.main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for _, buf in sorted(policy.named_buffers()):
        dist.broadcast(buf, src=0)


@torch.no_grad()
def build_replica(policy: Policy, path: str, dtype: torch.dtype, device: torch.device, lora=None) -> nn.Module:
    """A full, unsharded copy of the sharded policy on `device` for HF generate, made from the policy itself
    (one all-gather per parameter, frozen ones included) rather than read from disk again by every rank.
    Collective."""
    replica = load_causal_lm(path, dtype, meta=True)
    if lora is not None:
        from student_trainer.lora import apply_lora

        apply_lora(replica, lora)
    replica.to_empty(device=device)
    replica.tie_weights()  # to_empty gives each module its own new parameter: tie lm_head to the embeddings again
    copy_weights(policy, replica, frozen=True)
    for name, buf in policy.named_buffers():
        replica.get_buffer(param_name(name)).copy_(buf)
    return replica.eval()


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ over DTensor gradients returns a DTensor: its full value is the global norm."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def local_mib(policy: Policy, optimizer: torch.optim.Optimizer) -> tuple[float, float, float]:
    """MiB of weights, of gradients (at backward: one per trainable parameter) and of optimizer state this
    rank holds (its shards when sharded)."""

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    weights = sum(nbytes(p) for p in policy.parameters())
    grads = sum(nbytes(p) for p in policy.parameters() if p.requires_grad)
    state = sum(nbytes(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return weights / 2**20, grads / 2**20, state / 2**20


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(policy: Policy) -> dict[str, torch.Tensor]:
    """The student's full weights under their Hugging Face names, on CPU. Collective; rank 0 gets them, the
    others an empty dict."""
    sd = get_model_state_dict(policy, options=_FULL)
    return {k.removeprefix("model."): v for k, v in sd.items()}


def full_optimizer_state(policy: Policy, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state unsharded, keyed by parameter name (loads on any number of ranks). Collective when
    sharded; then only rank 0 gets it."""
    return get_optimizer_state_dict(policy, optimizer, options=_FULL)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate Adam(W)'s state now, exactly as its first step would (step 0, zero moments, like each parameter,
    sharded like it): on a GPU it is 8 bytes per float32 parameter, and it must exist before the rollout engine
    sizes its share of the memory, not appear after step 1 when the engine wakes up into it. Updates are
    bit-identical to the lazy initialisation (tests/test_memory.py)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"init_optimizer_state knows Adam and AdamW, not {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            on_device = group.get("capturable") or group.get("fused")
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else None)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_optimizer_state(policy: Policy, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `full_optimizer_state` on any number of ranks (each rank keeps its shard of the full state).
    Also reads the index-keyed `optimizer.state_dict()` of checkpoints written before name-keyed states."""
    if any(isinstance(k, int) for k in state.get("state", {})) or any(
        isinstance(p, int) for g in state.get("param_groups", []) for p in g["params"]
    ):  # index-keyed: indices follow policy.parameters(), i.e. named_parameters() order
        names = [n.replace("._checkpoint_wrapped_module", "") for n, _ in policy.named_parameters()]
        state = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
    optimizer.zero_grad(set_to_none=True)  # the loader initialises the state only when no gradient is present
    set_optimizer_state_dict(policy, optimizer, state, options=StateDictOptions(full_state_dict=True))


@dataclass(frozen=True)
class StudentWeights:
    """The trainer's current policy, as a sampler takes it after each update (`Generator.after_update`)."""

    policy: Policy
    ranks: Ranks
    sharded: bool  # FSDP2: each rank holds 1/N of the parameters
    peft: Any = None  # model.lora: peft's wrapper around `model`; the trained weights are only its adapters

    @property
    def model(self) -> nn.Module:
        """The Hugging Face module (its config and names; its weights are shards when `sharded`)."""
        return self.policy.model

    @property
    def lora(self) -> bool:
        return self.peft is not None

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (collective when sharded); None in one process, where `model` has them.
        LoRA: the adapter's weights only, under peft's names (also in one process)."""
        if self.lora:
            from student_trainer.lora import adapter_state

            return adapter_state(self.policy, self.ranks.main)
        return full_model_state(self.policy) if self.sharded else None

    def engine_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights under their Hugging Face names, one tensor at a time, cast to `dtype` (the engine's)
        on this rank's device before the all-gather (a bfloat16 engine: half the bytes of a float32 gather, and
        no single-threaded cast on the host), then copied to the host. Collective when sharded: every rank must
        exhaust the iterator; only rank 0 receives tensors. Tied weights come once (as `named_parameters`)."""
        yield from iter_full_weights(self.policy, dtype, self.ranks.main)

    def copy_into(self, replica: nn.Module) -> None:
        """Make a full replica equal to the policy (collective when sharded)."""
        copy_weights(self.policy, replica)


@torch.no_grad()
def iter_full_weights(policy: Policy, dtype: torch.dtype, main: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """See `StudentWeights.engine_tensors`. Parameters, then the persistent buffers."""
    persistent = {param_name(k) for k in policy.state_dict()}
    tensors = [*policy.named_parameters(), *((n, b) for n, b in policy.named_buffers() if param_name(n) in persistent)]
    for name, t in tensors:
        t = t.detach()
        if t.is_floating_point():
            t = t.to(dtype)
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            yield param_name(name), full.cpu()


@torch.no_grad()
def copy_weights(policy: Policy, replica: nn.Module, frozen: bool = False) -> None:
    """Make `replica` (a full, unsharded copy for generation) equal to the sharded policy. Collective: one
    all-gather per parameter, so at most one full parameter is in flight besides the replica. Frozen parameters
    (a LoRA base) never change and are copied only with `frozen` (once, when the replica is made)."""
    for name, p in policy.named_parameters():
        if not (p.requires_grad or frozen):
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p
        replica.get_parameter(param_name(name)).copy_(full)


def local_chunks(n_prompts: int, chunk: int, ranks: Ranks) -> list[tuple[int, int, int]]:
    """This rank's share of a step's prompts as (global chunk index, start, stop) triples.

    Rank r takes prompts [r*n/W, (r+1)*n/W) in chunks of `chunk`. When (n/W) is a multiple of `chunk`, the
    chunks and their indices (which seed the sampling) are the single-process ones, so rollouts do not depend
    on the number of ranks; otherwise indices stay unique across ranks.
    """
    if n_prompts % ranks.world:
        raise ConfigError(
            f"rollout.prompts_per_step={n_prompts} does not split evenly over {ranks.world} ranks (every rank must run "
            f"the same number of micro-batches); use a multiple of {ranks.world}"
        )
    per = n_prompts // ranks.world
    lo, first = ranks.rank * per, ranks.rank * math.ceil(per / chunk)
    return [(first + i, lo + a, lo + min(a + chunk, per)) for i, a in enumerate(range(0, per, chunk))]
