# One image for every role: init-db, web (gunicorn), worker, beat, flower. The command picks the
# role: docker-compose.yml gives each service its Procfile line. .dockerignore keeps .venv, .git
# and local data out of the build context.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/aifarm

# CPU torch from PyTorch's CPU index (no CUDA on the server: it never trains).
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY . .
RUN useradd --create-home --uid 1000 aifarm && mkdir -p logs checkpoints data && chown -R aifarm logs checkpoints data
USER aifarm

EXPOSE 8000 5555
CMD ["gunicorn", "app:create_app()"]
