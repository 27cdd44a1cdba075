"""`python -m student_trainer --config run.yaml [section.key=value ...] [--resume]`: train a student.

The config is validated before any work (model loading, teacher connection); a bad one exits with status 2
and a message naming the key and the fix. A teacher that cannot serve this student (unreachable after
teacher.startup_wait_s, or incompatible) exits with status 3. `--help` lists every config key.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before torch starts CUDA: a training step's tensors change size every step (rollout lengths vary), and the
# caching allocator's fixed segments fragment; expandable segments grow in place. vLLM's sleep-mode allocator
# turns them off around its own pool, so the rollout engine is unaffected. A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from student_trainer.config import ConfigError, describe_config, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m student_trainer", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML sections, or dotted overrides such as loss.tau=-0.5):\n\n" + describe_config(),
    )
    parser.add_argument("--config", help="YAML file with sections loss, model, teacher, data, rollout, optim, train")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in train.run_dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.mode=opd train.steps=50")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from student_trainer.teacher_client import TeacherError
    from student_trainer.train import setup_logging, train

    setup_logging()
    try:
        train(cfg, resume=args.resume)
    except ConfigError as exc:  # found once the model, data or devices are known
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TeacherError as exc:  # refused or unreachable at start; mid-run outages are waited out (teacher.outage_timeout_s)
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
