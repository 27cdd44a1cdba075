"""LoRA students (`model.lora`): peft adapters on the frozen base, trained, checkpointed, synced and merged.

peft injects its `lora.Linear` layers into the Hugging Face module in place, so the trainer keeps working on
that module (`Policy`, FSDP2 units, activation checkpointing, the fused loss reading `lm_head.weight`, which
stays frozen) and keeps the `PeftModel` wrapper for peft's own file format. Only adapter parameters require
gradients, so only they are in the optimizer; the frozen base stays in `model.dtype` (bfloat16 on a GPU, no
float32 master copy) while peft keeps the adapters in float32.

Under torchrun the adapters are sharded with their decoder layers like every other parameter (FSDP2 handles
frozen and trainable parameters in one unit); gathering them for a checkpoint or an engine sync moves only the
adapter's bytes. Checkpoints hold `adapter_config.json` + `adapter_model.safetensors` (loadable with
`PeftModel.from_pretrained(base, ckpt)`), the tokenizer and `trainer_state.pt`; `python -m
student_trainer.export` merges one into a full model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from student_trainer.config import ConfigError, LoraSection

if TYPE_CHECKING:
    from peft import PeftModel

    from student_trainer.parallel import Policy

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # a PeftModel's parameter names: this + the Hugging Face module's


def apply_lora(model: nn.Module, section: LoraSection, base_path: str | None = None) -> PeftModel:
    """Inject LoRA adapters into `model` in place (base frozen, adapters trainable, B = 0 so the policy starts
    as the base) and return peft's wrapper around it. `base_path`: recorded in the adapter config, so an
    exported checkpoint finds its base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=list(section.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # no module matched
        raise ConfigError(f"model.lora.target_modules {section.target_modules}: {exc}") from None
    if base_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_path
    assert peft_model.base_model.model is model  # injected in place: the trainer goes on with `model`
    return peft_model


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter_matches(ckpt: Path, section: LoraSection) -> None:
    """A checkpoint's adapter must have the configured shape (resuming with another rank or other targets
    would fail deep in peft with a size mismatch)."""
    saved = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    have = (saved["r"], float(saved["lora_alpha"]), sorted(saved["target_modules"]))
    want = (section.rank, float(section.alpha), sorted(section.target_modules))
    if have != want:
        raise ConfigError(
            f"{ckpt} holds a LoRA adapter with rank {have[0]}, alpha {have[1]}, targets {have[2]}; the config asks for "
            f"rank {want[0]}, alpha {want[1]}, targets {want[2]}: resume with the same model.lora, or start a new run_dir"
        )


def load_adapter(peft_model: PeftModel, ckpt: Path) -> None:
    """The adapter weights of a checkpoint into the (unsharded) injected model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model, load_file(str(ckpt / ADAPTER_WEIGHTS)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{ckpt}: adapter does not fit the model (missing {missing[:3]}, unexpected "
                          f"{list(result.unexpected_keys)[:3]})")


def trainable_parameters(policy: nn.Module) -> list[nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


def adapter_state(policy: Policy, main: bool) -> dict[str, torch.Tensor]:
    """The adapters' full weights under PeftModel names, on CPU (float32). Collective when sharded: one
    all-gather per adapter tensor (megabytes, not the model); rank 0 (`main`) gets them, the others {}."""
    from student_trainer.parallel import param_name

    out: dict[str, torch.Tensor] = {}
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if main:
            out[PEFT_PREFIX + param_name(name)] = full.detach().to("cpu", copy=True)
    return out


def save_adapter(peft_model: PeftModel, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """peft's format: adapter_config.json + adapter_model.safetensors. `state`: from `adapter_state` (needed
    when the module holds shards)."""
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state)


def adapter_nbytes(policy: nn.Module) -> int:
    """Bytes of the full adapter (numel of a DTensor shard is the global one)."""
    return sum(p.numel() * p.element_size() for p in trainable_parameters(policy))


@contextlib.contextmanager
def adapters_disabled(peft_model: PeftModel) -> Iterator[None]:
    """The base model's forward (exopd's reference policy) through the same module."""
    with peft_model.disable_adapter():
        yield


@contextlib.contextmanager
def adapter_dropout(model: nn.Module, enabled: bool) -> Iterator[None]:
    """The policy runs in eval mode (its logprobs feed the advantage); model.lora.dropout > 0 switches only
    the adapters' dropout modules to train mode, for the update's forward."""
    drops = [m for name, m in model.named_modules() if enabled and ".lora_dropout." in name + "."
             and isinstance(m, nn.Dropout)]
    for m in drops:
        m.train()
    try:
        yield
    finally:
        for m in drops:
            m.eval()


def merge(ckpt: str | Path, out_dir: str | Path, base: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """A full Hugging Face model (safetensors + tokenizer) = base + the checkpoint's adapter, merged into
    the weights; loads with `from_pretrained`, serves with `python -m teacher_server --model out_dir`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, out = Path(ckpt), Path(out_dir)
    if not is_adapter_checkpoint(ckpt):
        raise ConfigError(f"{ckpt} holds no LoRA adapter ({ADAPTER_CONFIG}): a full-weight checkpoint already "
                          "loads with from_pretrained")
    saved: dict[str, Any] = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    base = base or saved.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ConfigError(f"the base model of {ckpt} ({base!r}) is not a local directory: pass --base PATH")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
    merged = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(ckpt)).save_pretrained(str(out))
    return out
