"""Atomic checkpoints: `<run_dir>/checkpoints/step_000123/` holds the student in Hugging Face format
(safetensors + tokenizer: loadable by `from_pretrained`, servable by vLLM) and `trainer_state.pt` (scheduler,
RNG states, step, data position; in one process also the full optimizer state).

A sharded run (several ranks) also writes `dcp/`: the model and optimizer state with
`torch.distributed.checkpoint`, each rank its own shards (`__<rank>_0.distcp`, plus rank 0's `.metadata`), so no
rank ever holds the whole optimizer state; keyed by parameter name with global shapes, so it loads on any number
of ranks (DCP reshards on load), one process without a process group included. The Hugging Face export is
gathered onto rank 0 and written by it, as in one process. Checkpoints written before `dcp/` existed keep the
full optimizer state in `trainer_state.pt` and still resume (`has_sharded_state` tells them apart).

A checkpoint is written into `step_000123.tmp-<pid>/` (rank 0's pid: rank 0 names it, every rank writes into
it), fsynced, marked `COMPLETE` last, and only then renamed to its final name by rank 0 once every rank is done
(rename is atomic on one filesystem). A crash at any point leaves either no `step_*` directory or a `.tmp-*`
one that `latest_checkpoint` ignores (and the next save removes), never a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
SHARDED_DIR = "dcp"  # torch.distributed.checkpoint's files of a sharded run
# `step_N.old-PID` is a complete checkpoint moved aside while step N is re-saved; it counts until step_N exists.
_STEP_RE = re.compile(r"^step_(\d+)(\.old-\d+)?$")


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)  # every directory's entries, `dcp/` included
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def begin_checkpoint(run_dir: str | Path, step: int, ranks=None) -> Path:
    """The temporary directory step `step` is written into. Removes what a crash left behind first. With
    `ranks` (several ranks): collective; rank 0 cleans up and names the directory, every rank gets its name
    only after the clean-up."""
    tmp = None
    if ranks is None or ranks.main:
        ckpt_root = Path(run_dir) / "checkpoints"
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob("step_*.tmp-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        for aside in ckpt_root.glob("step_*.old-*"):  # superseded once the re-saved step exists
            if (ckpt_root / aside.name.split(".old-")[0]).is_dir():
                shutil.rmtree(aside, ignore_errors=True)
        tmp = ckpt_root / f"step_{step:06d}.tmp-{os.getpid()}"
        tmp.mkdir()
    return tmp if ranks is None else ranks.broadcast(tmp)


def write_export(tmp: Path, model, tokenizer, state: dict[str, Any], state_dict: dict | None = None) -> None:
    """The Hugging Face export and `trainer_state.pt` (one process, or rank 0). `state_dict`: the full weights
    when `model` itself holds only a shard of them (FSDP)."""
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    torch.save(state, tmp / "trainer_state.pt")


def commit_checkpoint(run_dir: str | Path, step: int, tmp: Path, keep: int = 2, ranks=None) -> Path:
    """Mark `tmp` complete and rename it to `step_NNNNNN`; prune to the `keep` newest. With `ranks`: collective;
    rank 0 does it after every rank has finished writing."""
    if ranks is not None:
        ranks.barrier()  # every rank's shards are on disk (DCP's writer fsyncs each file it writes)
        if not ranks.main:
            return Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): move the old one aside first, so a
        os.replace(final, ckpt_root / f"step_{step:06d}.old-{os.getpid()}")  # crash in between: still complete
    os.replace(tmp, final)
    for aside in ckpt_root.glob(f"step_{step:06d}.old-*"):  # this one, or one left by a crash mid-re-save
        shutil.rmtree(aside, ignore_errors=True)
    fd = os.open(ckpt_root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    complete = list_checkpoints(run_dir)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint saved: %s", final)
    return final


def save_checkpoint(
    run_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any], keep: int = 2, state_dict: dict | None = None
) -> Path:
    """One process writes the whole checkpoint. `state_dict`: the full weights when `model` itself holds only a
    shard of them (FSDP)."""
    tmp = begin_checkpoint(run_dir, step)
    write_export(tmp, model, tokenizer, state, state_dict)
    return commit_checkpoint(run_dir, step, tmp, keep)


def _sharded_options(strict: bool = True):
    # only what trains: a LoRA run's frozen base never changes (it is the configured base model). Loading is
    # not strict about the frozen keys it leaves out; every trainable one was asked of DCP, which fails on a
    # key the checkpoint lacks.
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded_state(tmp: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """`tmp/dcp/`: the trainable weights and the optimizer state, each rank writing its own shards (DTensor
    local shards, no gather, no copy; one file per rank). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy, optimizer, options=_sharded_options())
    dcp.save({"model": model_sd, "optimizer": optim_sd},
             storage_writer=dcp.FileSystemWriter(str(tmp / SHARDED_DIR), single_file_per_rank=True, sync_files=True))


def has_sharded_state(ckpt: Path) -> bool:
    return (ckpt / SHARDED_DIR / ".metadata").is_file()


def load_sharded_state(ckpt: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Inverse of `save_sharded_state` on any number of ranks: each rank reads the parts of the saved shards
    that overlap its own (a plain module in one process reads whole tensors). The optimizer state must exist
    already (`init_optimizer_state`): DCP loads in place. Collective when a process group is up."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opts = _sharded_options(strict=False)
    model_sd, optim_sd = get_state_dict(policy, optimizer, options=opts)
    target = {"model": model_sd, "optimizer": optim_sd}
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # one process without a process group: intended, DCP warns all the same
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(ckpt / SHARDED_DIR)), no_dist=no_dist)
    set_state_dict(policy, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"], options=opts)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).is_file() and (p / "trainer_state.pt").is_file():
            step = int(m.group(1))
            if step not in found or m.group(2) is None:  # the final name wins over a moved-aside copy
                found[step] = p
    return [found[k] for k in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    # weights_only: the state holds tensors, numbers, strings and dicts only; nothing executable is unpickled.
    # mmap: a checkpoint with the full optimizer state in it (one process, or one written before `dcp/`) is read
    # by every rank under torchrun; pages are shared, not copied per rank
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
