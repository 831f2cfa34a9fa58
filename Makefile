# Two commands do everything on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
STORE  ?= ./store

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install run serve test test-heavy clean

install: $(STAMP)

# constraints.txt pins every package to the versions checked together (torch 2.13.0 CPU build,
# prefect 3.8.8 with fastapi <0.151 and sqlalchemy <2.1; docs/operations.md#pinned-versions).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

LANDING ?= sample

# The main job, end to end, on the small real sample shipped in sample/: the first refresh
# (ingest, embed, evaluate, fit, publish a bundle into $(STORE)); it prints how to use the bundle.
run: install
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(VENV)/bin/benchroute refresh $(LANDING) --store $(STORE)

# A local Prefect server (UI at http://127.0.0.1:4200) serving the hourly refresh of $(LANDING)
# and the manual backfill; Ctrl-C stops both.
serve: install
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect} $(VENV)/bin/benchroute deploy --landing $(LANDING) --store $(STORE)


test: install
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q

# The checks kept out of `make test` for CI's 20 minutes (marker `heavy`): the refresh on a Dask
# cluster of worker processes (~2-3 min on 2 cores; the thread-worker run of the same test is in
# `make test`).
test-heavy: install
	PREFECT_HOME=$$(mktemp -d) $(PY) -m pytest -q -m heavy

clean:
	rm -rf $(VENV) $(STORE) .prefect .pytest_cache
