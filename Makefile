# Two commands: `make demo` and `make test`. Both create .venv from requirements*.txt when missing.
# `make up` runs the production topology locally (Procfile).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv lint test test-docker demo bench up clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first: a wheel already on disk (pip's find-links) wins, offline; else, without an NVIDIA
	@# GPU, the CPU build from TORCH_INDEX_URL (not PyPI's multi-GB CUDA build). TORCH_INDEX_URL= (empty)
	@# takes PyPI's default build. docs/client.md, "Install".
	torch="$$(grep -m1 -E '^torch==' requirements.txt | cut -d' ' -f1)"; \
	$(BIN)/pip install --quiet --disable-pip-version-check --no-index --no-deps "$$torch" 2>/dev/null || { \
	  index="$${TORCH_INDEX_URL-$$(command -v nvidia-smi >/dev/null || echo https://download.pytorch.org/whl/cpu)}"; \
	  $(BIN)/pip install --quiet --disable-pip-version-check $${index:+--extra-index-url "$$index"} "$$torch"; }
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The tests in TEST_WORKERS processes (pytest-xdist; 0: in this one), a file to each in turn:
# most of their time is spent waiting on servers and workers they start, so two share two cores.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# docker-compose.yml end to end (docs/operations.md, "Production with Docker"; as root where no
# Docker engine runs yet): install and start the engine when missing (docker/engine.sh), build
# the local base image when missing and the images (docker/build.sh), then bring the stack up and
# run a federated task against it (tests/docker/stack_e2e.py, which `make test` does not collect).
test-docker: venv
	docker/engine.sh
	docker/build.sh
	$(BIN)/python -m pytest tests/docker/stack_e2e.py

demo: venv
	$(BIN)/python demo.py

bench: venv
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/federated.py
	$(BIN)/python bench/aggregation.py

# The production topology in the foreground (Procfile; docs/operations.md): gunicorn, two Celery
# workers, beat and Flower, prefixed output, Ctrl-C stops them all. MariaDB and Redis must run;
# DATABASE_URL and REDIS_URL default to the local ones. honcho reads $(UP_ENV) too, if it exists
# (its values win), for init-db as for the processes. FLOWER_BASIC_AUTH, unset, is made up and shown.
UP_ENV ?= .env
up: venv
	@export DATABASE_URL="$${DATABASE_URL:-mysql+pymysql://root@127.0.0.1:3306/ai_farm}" \
	  REDIS_URL="$${REDIS_URL:-redis://127.0.0.1:6379/0}" PATH="$(CURDIR)/$(BIN):$$PATH"; \
	if [ -z "$${FLOWER_BASIC_AUTH:-}" ] && ! grep -qs "^FLOWER_BASIC_AUTH=" "$(UP_ENV)"; then \
	  export FLOWER_BASIC_AUTH="ops:$$(python -c 'import secrets; print(secrets.token_urlsafe(12))')"; \
	  echo "Flower: http://127.0.0.1:$${FLOWER_PORT:-5555} as $$FLOWER_BASIC_AUTH (user:password)"; \
	fi; \
	honcho --env "$(UP_ENV)" run python -m app init-db && exec python -c '$(HONCHO)' --env "$(UP_ENV)" start

# honcho, except that what still runs 10 s (docker's grace), not 5 s, after the first process
# exited is SIGKILLed: a worker's soft shutdown (4 s, celeryconfig.py) and the hand-back of the
# jobs it cancels must fit (docs/operations.md, "Stopping and restarting").
HONCHO := import sys, honcho.command, honcho.manager as m; \
  m.KILL_WAIT = max(m.KILL_WAIT, 10); sys.exit(honcho.command.main(sys.argv[1:]))

clean:
	rm -rf data logs checkpoints model_cache .pytest_cache .mypy_cache .ruff_cache
