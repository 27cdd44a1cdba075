#!/usr/bin/env bash
# Fetch, as wheels into .whl/, the Python packages bench/gpu_check.py needs that the GPU machine's image lacks.
#
#     bash bench/gpu_wheels.sh        # here, where pip reaches the registry; then carry .whl to the GPU machine
#
# The GPU machine (Python 3.12, its own torch and transformers, nothing reachable) gets only what its image
# does not hold: the teacher server's web stack (fastapi, uvicorn, pydantic and pydantic-settings), orjson
# (protocol/codec.py), and what the trainer imports for data and answers (datasets, math-verify). torch,
# transformers, numpy, msgpack, httpx and the rest stay the image's: a carried copy would shadow them.
# typing-extensions is carried although the image has one: pydantic 2.14 needs >= 4.16.0 and a stale copy
# would stop the server at import; newer typing-extensions only adds names, so shadowing it is safe.
# Every version is the one constraints.txt pins. --no-deps: the list names every missing dependency itself.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions
  pydantic-settings python-dotenv uvicorn orjson
  datasets dill multiprocess math-verify latex2sympy2-extended antlr4-python3-runtime
)

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}

norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }  # PEP 503 names: case, '_' and '.' do not matter

pin() {  # NAME -> NAME==VERSION as constraints.txt pins it
  local want name _ version
  want=$(norm "$1")
  while IFS='=' read -r name _ version; do
    if [ "$(norm "$name")" = "$want" ]; then echo "$name==$version"; return; fi
  done < constraints.txt
  echo "gpu_wheels.sh: $1 is not pinned in constraints.txt" >&2
  exit 1
}

specs=()
for w in "${WHEELS[@]}"; do specs+=("$(pin "$w")"); done

# A fresh folder: two versions of one package would stop the install on the GPU machine.
rm -rf .whl
mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"

n=$(ls .whl/*.whl | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
  echo "gpu_wheels.sh: expected ${#WHEELS[@]} wheels, got $n" >&2
  exit 1
fi
ls -l .whl/*.whl | awk '{printf "%10d  %s\n", $5, $9}'
du -cb .whl/*.whl | tail -1 | awk '{printf "total %.1f MiB in '"$n"' wheels\n", $1 / 1048576}'
