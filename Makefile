# Two commands a user needs: `make run` and `make test`. Everything else is a convenience.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
RUNSTAMP := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck bench cluster clean venv

$(RUNSTAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(RUNSTAMP) $@

venv: $(STAMP)

run: $(RUNSTAMP)
	$(BIN)/tq up --data-dir ./.tq-data

# A 3-node Raft cluster on loopback (data in ./.tq-cluster); Ctrl-C stops all three.
cluster: $(RUNSTAMP)
	mkdir -p .tq-cluster
	test -s .tq-cluster/secret || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > .tq-cluster/secret)
	trap 'kill 0' INT TERM; \
	$(BIN)/tq broker --node-id n1 --port 7700 --http-port 7701 --raft-port 7800 --peers 127.0.0.1:7801,127.0.0.1:7802 --data-dir .tq-cluster/n1 --raft-secret-file .tq-cluster/secret & \
	$(BIN)/tq broker --node-id n2 --port 7710 --http-port 7711 --raft-port 7801 --peers 127.0.0.1:7800,127.0.0.1:7802 --data-dir .tq-cluster/n2 --raft-secret-file .tq-cluster/secret & \
	$(BIN)/tq broker --node-id n3 --port 7720 --http-port 7721 --raft-port 7802 --peers 127.0.0.1:7800,127.0.0.1:7801 --data-dir .tq-cluster/n3 --raft-secret-file .tq-cluster/secret & \
	wait

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Two test processes: most tests wait on the brokers and workers they start, so two share the
# two cores well (the suite took 10.4 min alone, 6.3 with -n 2; measured 2026-12-03).
test: lint typecheck
	$(BIN)/pytest -n 2

test-fast: $(STAMP)
	$(BIN)/pytest -n 2 -m "not slow and not cluster"

bench: $(STAMP)
	$(BIN)/tq bench --json bench.json

clean:
	rm -rf $(VENV) .tq-data .tq-cluster .pytest_cache .mypy_cache .ruff_cache
