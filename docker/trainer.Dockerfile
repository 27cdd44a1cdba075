# Trainer: a pinned PyTorch CUDA runtime image with aopd installed (torch comes from the image).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /opt/aopd
COPY pyproject.toml README.md constraints.txt ./
COPY protocol ./protocol
COPY generation ./generation
COPY teacher_server ./teacher_server
COPY student_trainer ./student_trainer
COPY toy ./toy
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "transformers==5.19.0" "tokenizers==0.23.3" "safetensors==0.8.0" \
        "httpx==0.28.1" "pydantic==2.14.4" "pydantic-settings==2.16.3" "msgpack==1.2.4" "orjson==3.13.0" \
        "pyyaml==6.0.4" "datasets==5.2.0" "math-verify==0.9.0" "matplotlib==3.11.2" "tensorboard==2.21.0" \
        "fastapi==0.136.3" "prometheus-client==0.26.0"

WORKDIR /work
# torchrun (one process per GPU; FSDP2 when more than one), then the same `-m student_trainer` the tests run
ENTRYPOINT ["python", "-m", "torch.distributed.run", "--standalone"]
CMD ["--nproc-per-node", "1", "-m", "student_trainer", "--help"]
