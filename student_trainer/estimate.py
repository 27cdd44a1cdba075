"""Per-GPU memory of a training run, from its config and the model's config.json alone (nothing is loaded).

    python -m student_trainer.estimate --config run.yaml --gpu-memory 80 [--gpus 4] [--prompt-tokens 512]

prints the budget of one trainer GPU in its two phases, and whether it fits:

* generation: the sharded float32 master weights and Adam state, plus the rollout engine (vLLM: its
  `rollout.vllm_gpu_memory_utilization` share of the GPU, by default derived at start from the free memory,
  see `engine_share`; hf: a full copy of the weights in the compute dtype and its KV cache);
* update: weights, gradients and Adam state (sharded over the GPUs by FSDP2), the unsharded compute copies of the
  layers being run, the activations of one micro-batch (each decoder layer's input with activation
  checkpointing plus one layer's saved tensors, else every layer's saved tensors), the fused loss's [chunk, V]
  float32 temporaries, and the engine again unless it sleeps.

The arithmetic, per float32 master parameter: 4 bytes of weight, 4 of gradient, 8 of Adam moments, divided over
the GPUs; a decoder layer keeps, per token, what its backward reads (`LAYER_SAVED_ELEMENTS`); tests/test_memory.py
checks the parameter count exactly and the activation terms against the tensors autograd really saves. What it
does not count (the CUDA context, allocator fragmentation, NCCL buffers) is covered by `OVERHEAD_BYTES` and the
headroom of `FIT_FRACTION`. The trainer runs the same estimate at start on a GPU and refuses a run that cannot
fit, naming the knob (`optim.memory_check=false` skips it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from student_trainer.config import ConfigError, RunConfig, load_config
from student_trainer.losses import DEFAULT_CHUNK_SIZE

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB  # CUDA context, cuBLAS workspaces, NCCL buffers
FIT_FRACTION = 0.92  # of the GPU's memory: headroom for fragmentation


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.path: {path} does not exist (the estimate reads the model's config.json)")
        c = json.loads(path.read_text())
        c = c.get("text_config", c)
        heads = int(c["num_attention_heads"])
        return cls(
            vocab=int(c["vocab_size"]), hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads), intermediate=int(c["intermediate_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        """One Qwen3/Llama-style decoder layer: q, k, v, o projections, gate/up/down MLP, two RMSNorms, q/k norms."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d + 3 * d * self.intermediate + 2 * d + 2 * self.head_dim

    @property
    def root_params(self) -> int:
        """Outside the layers: embedding, final norm, and the output layer unless tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """LoRA adapter parameters of the whole model: rank x (in + out) per adapted projection and layer (names
        outside Qwen3's projections count 0)."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
        return self.layers * sum(rank * sum(dims[t]) for t in set(targets) if t in dims)

    @property
    def layer_saved_elements(self) -> int:
        """Elements per token one layer's backward reads (its saved tensors), counted on transformers 5.19's
        Qwen3 layer with SDPA (tests/test_memory.py measures them through autograd's saved-tensor hooks): 6 x hidden
        (both RMSNorms' input and output, the two projections' flattened inputs), 4 x q and 4 x kv width (q/k before
        and after their norm and rotary embedding, v, the attention output), 4 x intermediate (gate, up, their
        activation, the product), and the norms' reciprocal RMS values."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return 6 * d + 4 * q + 4 * kv + 4 * i + 2 + self.heads + self.kv_heads


# Published Qwen3 configs (config.json of Qwen/Qwen3-*), for estimating before the weights are on this machine.
KNOWN_SHAPES = {
    "qwen3-1.7b": ModelShape(151936, 2048, 28, 16, 8, 128, 6144, True),
    "qwen3-4b": ModelShape(151936, 2560, 36, 32, 8, 128, 9728, True),
    "qwen3-8b": ModelShape(151936, 4096, 36, 32, 8, 128, 12288, False),
    "qwen3-32b": ModelShape(151936, 5120, 64, 64, 8, 128, 25600, False),
}


@dataclass(frozen=True)
class Line:
    name: str
    nbytes: float
    note: str


@dataclass(frozen=True)
class Estimate:
    generation: list[Line]
    update: list[Line]
    gpu_bytes: float
    advice: list[str]
    reserve_bytes: float = 0.0  # vLLM without sleep: memory its derived share leaves for the update

    @property
    def peak(self) -> float:
        return max(sum(x.nbytes for x in self.generation), sum(x.nbytes for x in self.update))

    @property
    def fits(self) -> bool:
        return self.peak <= FIT_FRACTION * self.gpu_bytes

    def table(self) -> str:
        rows = []
        for phase, lines in (("generation", self.generation), ("update", self.update)):
            rows.append(f"{phase}:")
            rows += [f"  {x.name:<34} {x.nbytes / GIB:8.2f} GiB  {x.note}" for x in lines]
            rows.append(f"  {'total':<34} {sum(x.nbytes for x in lines) / GIB:8.2f} GiB")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"peak {self.peak / GIB:.2f} GiB of {self.gpu_bytes / GIB:.0f} GiB per GPU "
                    f"(limit {FIT_FRACTION:.0%}): {verdict}")
        rows += [f"  - {a}" for a in self.advice]
        return "\n".join(rows)


def engine_share(free_bytes: float, total_bytes: float, reserve_bytes: float = 0.0) -> float:
    """The student's vLLM engine's `gpu_memory_utilization` (a share of the whole GPU) when it is not configured:
    what is free when the engine starts (the trainer's weights and Adam state already allocated), less
    `reserve_bytes` (the update's own memory, when the engine stays awake through it) and the headroom the
    estimate keeps (1 - FIT_FRACTION of the GPU), floored to a thousandth. 0 when nothing is left."""
    share = (free_bytes - reserve_bytes - (1 - FIT_FRACTION) * total_bytes) / total_bytes
    return max(0.0, math.floor(share * 1000) / 1000)


def activation_bytes(shape: ModelShape, tokens: int, checkpointing: bool, compute_bytes: int) -> float:
    """Saved activations of one micro-batch of `tokens` (padded) tokens."""
    per_layer = shape.layer_saved_elements * tokens * compute_bytes
    if checkpointing:  # each layer's input, plus one layer recomputed in backward
        return shape.layers * shape.hidden * tokens * compute_bytes + per_layer
    return shape.layers * per_layer


def estimate(
    cfg: RunConfig, gpu_bytes: float, gpus: int = 1, prompt_tokens: int = 512, shape: ModelShape | None = None
) -> Estimate:
    """The budget of one trainer GPU; `shape` defaults to model.path's config.json."""
    shape = shape or ModelShape.from_dir(cfg.model.path)
    p, w = shape.params, max(1, gpus)
    low = cfg.model.dtype in ("bfloat16", "auto")  # auto: bfloat16 on a GPU
    compute = 2 if low else 4
    master = 4 if (not low or cfg.optim.fp32_master_weights) else 2
    ckpt = cfg.optim.activation_checkpointing is not False  # None: on with a GPU
    seq = prompt_tokens + cfg.rollout.max_new_tokens
    mb_tokens = cfg.optim.micro_batch_tokens or cfg.optim.micro_batch_size * seq
    mb_tokens = max(mb_tokens, seq)  # a micro-batch holds at least one sequence
    chunk = cfg.loss.chunk_size or DEFAULT_CHUNK_SIZE["cuda"]

    lora = cfg.model.lora
    if lora is None:
        weights = Line("weights (sharded)", p * master / w, f"{p / 1e9:.2f}B params x {master} B / {w} GPU(s)")
        adam = Line("Adam moments (sharded)", 2 * p * master / w, f"2 x {master} B per param / {w}")
        grads = Line("gradients (sharded)", p * master / w, f"{master} B per param / {w}")
    else:  # frozen base in the compute dtype; float32 adapters with their gradients and Adam moments
        a = shape.lora_params(lora.rank, lora.target_modules)
        weights = Line("weights (sharded)", (p * compute + a * 4) / w,
                       f"{p / 1e9:.2f}B frozen x {compute} B + {a / 1e6:.1f}M LoRA x 4 B / {w} GPU(s)")
        adam = Line("Adam moments (sharded)", 2 * a * 4 / w, f"2 x 4 B per LoRA param / {w}")
        grads = Line("gradients (sharded)", a * 4 / w, f"4 B per LoRA param / {w}")
    gathered = Line("unsharded compute copies", (2 * shape.layer_params + shape.root_params) * compute,
                    "two layers (one prefetched) + embedding and output layer")
    acts = Line("activations, one micro-batch", activation_bytes(shape, mb_tokens, ckpt, compute),
                f"{mb_tokens} tokens, checkpointing {'on' if ckpt else 'off'}")
    head_grad = shape.root_params * 4 if lora is None else 0  # LoRA: lm_head is frozen
    loss = Line("fused loss temporaries", 3 * chunk * shape.vocab * 4 + head_grad,
                f"3 x [{chunk}, {shape.vocab}] float32" + (" + the output layer's float32 gradient" if head_grad else ""))
    overhead = Line("CUDA context, workspaces", OVERHEAD_BYTES, "fixed")
    reserve = 0.0  # what the update adds while the engine stays awake (the vLLM engine leaves it free)
    if cfg.rollout.engine == "vllm":
        asleep = cfg.rollout.vllm_sleep
        util = cfg.rollout.vllm_gpu_memory_utilization
        if not asleep:
            reserve = sum(x.nbytes for x in (grads, gathered, acts, loss))
        if util is not None:
            engine = Line("rollout engine (vLLM)", util * gpu_bytes, f"rollout.vllm_gpu_memory_utilization={util}")
        else:  # derived at start (`engine_share`): what is free then, less the headroom and the reserve
            free = gpu_bytes - weights.nbytes - adam.nbytes - overhead.nbytes
            derived = engine_share(free, gpu_bytes, reserve) * gpu_bytes
            kv_one = seq * shape.layers * 2 * shape.kv_heads * shape.head_dim * compute
            need = p * compute + kv_one  # its weights and one longest sequence's KV cache
            engine = Line("rollout engine (vLLM)", max(derived, need),
                          f"derived share {derived / gpu_bytes:.2f}" + (" (sleeps during the update)" if asleep else
                          f", {reserve / GIB:.1f} GiB left for the update") +
                          ("" if derived >= need else f"; BELOW its weights + one sequence's KV, {need / GIB:.1f} GiB"))
    else:
        kv = cfg.rollout.generation_batch_size * seq * shape.layers * 2 * shape.kv_heads * shape.head_dim * compute
        engine = Line("rollout (hf): weights + KV cache", p * compute + kv,
                      f"a full copy in the compute dtype + {cfg.rollout.generation_batch_size} x {seq} tokens of KV")
        asleep = True  # freed after generation
    generation = [weights, adam, engine, overhead]
    update = [weights, grads, adam, gathered, acts, loss, overhead] + ([] if asleep else [engine])
    est = Estimate(generation, update, gpu_bytes, [], reserve)
    if not est.fits:
        est.advice.extend(_advice(est, cfg, shape, gpus, compute, ckpt, seq))
    return est


def _advice(est: Estimate, cfg: RunConfig, shape: ModelShape, gpus: int, compute: int, ckpt: bool, seq: int) -> list[str]:
    limit = FIT_FRACTION * est.gpu_bytes
    out = []
    update_total = sum(x.nbytes for x in est.update)
    acts = next(x.nbytes for x in est.update if x.name.startswith("activations"))
    if update_total > limit:
        if not ckpt:
            out.append("optim.activation_checkpointing=true: keep one layer's activations instead of every layer's")
        others = update_total - acts
        per_token = activation_bytes(shape, 1, ckpt, compute)
        room = int((limit - others) // per_token) if limit > others else 0
        if 0 < room < (cfg.optim.micro_batch_tokens or cfg.optim.micro_batch_size * seq):
            if room >= seq:
                out.append(f"optim.micro_batch_tokens={room} (or fewer): the update's activations then fit")
            else:
                out.append(f"one {seq}-token sequence alone does not fit ({room} tokens would): shorten "
                           "rollout.max_new_tokens, or use more GPUs")
    states = sum(x.nbytes for x in est.update if "sharded" in x.name)
    if states > 0.5 * limit:
        need = math.ceil(states * gpus / (0.5 * limit))
        out.append(f"weights, gradients and Adam state take {states / GIB:.1f} GiB per GPU: shard them over about "
                   f"{need} GPUs (torchrun --nproc-per-node {need})")
    if sum(x.nbytes for x in est.generation) > limit:
        if cfg.rollout.engine == "vllm":
            out.append("lower rollout.vllm_gpu_memory_utilization: the engine's share and the trainer's state do not "
                       "fit together")
        else:
            kv_per_seq = seq * shape.layers * 2 * shape.kv_heads * shape.head_dim * compute
            out.append(f"rollout.engine=vllm (paged KV cache in a fixed share), or lower rollout.generation_batch_size: "
                       f"HF generate keeps {kv_per_seq / GIB:.2f} GiB of KV cache per {seq}-token sequence")
    return out or ["use a GPU with more memory, or more GPUs"]


def check_fits(cfg: RunConfig, gpu_bytes: float, gpus: int, prompt_tokens: int) -> Estimate:
    """The trainer's start-up check on a GPU: a ConfigError with the budget and the knobs when the run cannot fit."""
    est = estimate(cfg, gpu_bytes, gpus, prompt_tokens)
    if not est.fits:
        raise ConfigError(
            "this run does not fit in GPU memory by the estimate (python -m student_trainer.estimate):\n" + est.table()
            + "\n(optim.memory_check=false starts it anyway)"
        )
    return est


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's YAML config")
    parser.add_argument("--gpu-memory", type=float, required=True, help="GiB of memory per GPU (80, 141, ...)")
    parser.add_argument("--gpus", type=int, default=1, help="trainer GPUs (torchrun ranks) sharing the FSDP2 shards")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="longest prompt, in tokens")
    parser.add_argument("--shape", choices=sorted(KNOWN_SHAPES),
                        help="a published model's shape, instead of model.path's config.json (not on this machine)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.micro_batch_tokens=16384")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        shape = KNOWN_SHAPES[args.shape] if args.shape else ModelShape.from_dir(cfg.model.path)
        est = estimate(cfg, args.gpu_memory * GIB, args.gpus, args.prompt_tokens, shape)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.shape or cfg.model.path}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}, "
          f"vocab {shape.vocab}; {args.gpus} trainer GPU(s) of {args.gpu_memory:g} GiB")
    print(est.table())
    return 0 if est.fits else 1


if __name__ == "__main__":
    sys.exit(main())
