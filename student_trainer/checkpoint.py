"""Atomic checkpoints: `<run_dir>/checkpoints/step_000123/` holds the student in Hugging Face format
(safetensors + tokenizer: loadable by `from_pretrained`, servable by vLLM) and `trainer_state.pt` (optimizer,
scheduler, RNG states, step, data position).

A checkpoint is written into `step_000123.tmp-<pid>/`, fsynced, marked `COMPLETE` last, and only then renamed
to its final name (rename is atomic on one filesystem). A crash at any point leaves either no
`step_*` directory or a `.tmp-*` one that `latest_checkpoint` ignores (and the next save removes), never a
checkpoint that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
# `step_N.old-PID` is a complete checkpoint moved aside while step N is re-saved; it counts until step_N exists.
_STEP_RE = re.compile(r"^step_(\d+)(\.old-\d+)?$")


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any], keep: int = 2, state_dict: dict | None = None
) -> Path:
    """`state_dict`: the full weights when `model` itself holds only a shard of them (FSDP)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob("step_*.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    for aside in ckpt_root.glob("step_*.old-*"):  # superseded once the re-saved step exists
        if (ckpt_root / aside.name.split(".old-")[0]).is_dir():
            shutil.rmtree(aside, ignore_errors=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"step_{step:06d}.tmp-{os.getpid()}"
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    torch.save(state, tmp / "trainer_state.pt")
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
    # mmap: under torchrun every rank reads the full optimizer state; pages are shared, not copied per rank
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
