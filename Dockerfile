# mriq: one image for every service (api, workers, beat, flower, migrate); the compose file
# picks the command. torch from PyPI ships its CUDA runtime, so the same image serves the GPU
# worker (with the NVIDIA container toolkit on the host) and CPU-only services.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MRIQ_DATA_DIR=/var/lib/mriq \
    MRIQ_DATA_ROOTS=/data:/var/lib/mriq

# libgomp: torch's OpenMP runtime on slim images; tini: reaps the children the CLI execs/spawns.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first (cached layer): only the metadata is needed to resolve them.
COPY pyproject.toml README.md ./
COPY core/__init__.py core/__init__.py
COPY scheduler/__init__.py scheduler/__init__.py
COPY worker/__init__.py worker/__init__.py
RUN pip install .

# Then the code; installs the `mriq` console script (scheduler.cli:main).
COPY core core
COPY scheduler scheduler
COPY worker worker
RUN pip install --no-deps . \
    && mriq --help >/dev/null

# Unprivileged user owning the data/artifact volumes' mount points.
RUN useradd --create-home --uid 10001 mriq \
    && mkdir -p /var/lib/mriq /data \
    && chown -R mriq:mriq /var/lib/mriq /data
USER mriq

VOLUME ["/var/lib/mriq", "/data"]
EXPOSE 8000 5555

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["mriq", "api", "--host", "0.0.0.0", "--port", "8000"]
