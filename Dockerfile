# Two images from one file (docs/operations.md, "Production with Docker"):
#   --target worker  Celery workers, beat, Flower, init-db: the code and torch (CPU build)
#   --target web     gunicorn: the same code without torch (the web tier never imports it); the default
# docker-compose.yml builds both and gives each service its Procfile line as command.
#
# Build arguments, so that the same file builds where registries and PyTorch's index are reachable
# and where they are not (make test-docker):
#   BASE_IMAGE       a Debian-based image with python3 >= 3.11 and python3 -m venv (default the
#                    official python:3.11-slim; make test-docker: one made with debootstrap)
#   TORCH_INDEX_URL  pip's extra index for torch (default PyTorch's CPU index; empty: none)
#   PIP_FIND_LINKS   a directory URL or path where pip also looks for wheels (default none;
#                    make test-docker serves the host's CPU torch wheel on 127.0.0.1 to
#                    `docker build --network host`)
# .dockerignore keeps .venv, .git, logs and local data out of the build context.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 aifarm \
    && mkdir -p /srv/aifarm/logs /srv/aifarm/checkpoints /srv/aifarm/data /srv/aifarm/model_cache \
    && chown aifarm:aifarm /srv/aifarm/logs /srv/aifarm/checkpoints /srv/aifarm/data /srv/aifarm/model_cache
WORKDIR /srv/aifarm
COPY requirements.txt .
# Everything but torch: the web image stops here (plus the code).
RUN grep -v '^torch==' requirements.txt > /tmp/requirements-web.txt \
    && pip install -r /tmp/requirements-web.txt && rm /tmp/requirements-web.txt

FROM base AS worker
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
# Only the CPU build of torch (no CUDA: the server aggregates, it never trains on a GPU).
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} "$(grep '^torch==' requirements.txt)" \
    && python -c "import torch; assert not torch.version.cuda, torch.__version__"
COPY . .
USER aifarm
CMD ["celery", "-A", "workers", "worker", "--loglevel", "INFO", "--hostname", "worker@%h", "--queues", "celery"]

FROM base AS web
COPY . .
USER aifarm
EXPOSE 8000
CMD ["gunicorn", "app:create_app()"]
