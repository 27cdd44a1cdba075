"""Merge a LoRA checkpoint into a full Hugging Face model:

    python -m student_trainer.export runs/x/checkpoints/step_000200 merged/ [--base /models/Qwen3-4B] [--dtype bfloat16]

The result loads with `AutoModelForCausalLM.from_pretrained(merged)` and serves as a teacher or a reference
endpoint (`python -m teacher_server --model merged`). The base defaults to the one the adapter records.
"""

from __future__ import annotations

import argparse
import sys

import torch

from student_trainer.config import ConfigError
from student_trainer.lora import merge


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m student_trainer.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint directory holding adapter_config.json (model.lora runs)")
    ap.add_argument("out", help="where the merged model (safetensors + tokenizer) is written")
    ap.add_argument("--base", help="the base model directory (default: the one recorded in the adapter config)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="dtype of the merged weights (auto: the base's)")
    args = ap.parse_args(argv)
    try:
        out = merge(args.checkpoint, args.out, base=args.base,
                    dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
