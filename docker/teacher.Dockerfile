# Teacher service: vLLM's own CUDA image (pinned to the vLLM version aopd's engine hook is tested against),
# with aopd installed on top. torch and vllm come from the image and are not touched.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/aopd
COPY pyproject.toml README.md constraints.txt ./
COPY protocol ./protocol
COPY generation ./generation
COPY teacher_server ./teacher_server
COPY toy ./toy
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "msgpack==1.2.4" "orjson==3.13.0" "pydantic-settings==2.16.3" \
        "prometheus-client==0.26.0" "httpx==0.28.1" "math-verify==0.9.0"

ENV TEACHER_HOST=0.0.0.0 \
    TEACHER_PORT=8000 \
    TEACHER_ENGINE=vllm
EXPOSE 8000
# The image's own entrypoint is `vllm serve`; ours is the aopd teacher (same command the tests run).
ENTRYPOINT ["python3", "-m", "teacher_server"]
CMD ["--help"]
