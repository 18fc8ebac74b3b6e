# dicomgate — two commands on a fresh machine:
#   make run    create .venv, install dicomgate, start it with examples/dicomgate.yaml
#   make test   install test dependencies (Python + Debian peers) and run the suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/dicomgate.yaml
DEBIAN_PEERS := dcmtk orthanc orthanc-dicomweb dicom3tools chromium haproxy
PYTEST_ARGS ?=
# Two test files at a time (pytest-xdist; a file's tests stay in one worker, with its
# module-scoped fixtures). Most of a test's time is a gateway, a peer or a browser starting
# and waiting, which overlaps well on 2 cores: `make test`'s SQLite pass took 10:27 this
# way against 18:23 one at a time, on the same machine the same hour. `make test XDIST=`
# runs one test at a time.
XDIST  ?= -n 2 --dist loadfile
OHIF_PACKAGE := @ohif/app@3.13.2
OHIF   := $(VENV)/ohif/package/dist

.PHONY: run install install-test peers bytecode test test-postgres test-slow lint bench clean

$(BIN)/dicomgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	@touch $@

install: $(BIN)/dicomgate

# Byte-code for our own sources: an editable install writes none when the environment sets
# PYTHONDONTWRITEBYTECODE (these machines do), and every gateway or CLI start would compile
# all of dicomgate again (~0.15 s each; the test suite starts hundreds).
bytecode:
	@$(BIN)/python -m compileall -q src tests >/dev/null

run: install bytecode
	$(BIN)/dicomgate serve --config $(CONFIG)

$(VENV)/.test-deps: pyproject.toml $(BIN)/dicomgate
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install-test: $(VENV)/.test-deps peers $(OHIF)/index.html

# OHIF, the web viewer (its prebuilt package from the npm registry), for
# tests/integration/test_ohif.py: a real DICOMweb client nobody here wrote.
$(OHIF)/index.html:
	rm -rf $(VENV)/ohif && mkdir -p $(VENV)/ohif
	cd $(VENV)/ohif && npm pack --silent $(OHIF_PACKAGE) >/dev/null && tar xzf *.tgz && rm -f *.tgz
	@test -f $@ || { echo "$(OHIF_PACKAGE) has no dist/index.html"; exit 1; }

# Debian packages the integration tests use as real peers; installed only when missing.
peers:
	@missing=""; for p in $(DEBIAN_PEERS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: install-test bytecode
	TCP_NODELAY=1 $(BIN)/pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)
	@# The database-heavy modules again, each gateway on a fresh PostgreSQL database
	@# (TEST_DATABASE=postgresql, tests/conftest.py); about 1.5 minutes here.
	TEST_DATABASE=postgresql TCP_NODELAY=1 $(BIN)/pytest -m "not slow" $(XDIST) $(PYTEST_ARGS) \
	  tests/integration/test_routing_delivery.py tests/integration/test_queue_operations.py \
	  tests/integration/test_crash_recovery.py tests/integration/test_retention.py \
	  tests/integration/test_delivery_failures.py tests/integration/test_qido.py \
	  tests/integration/test_destination_pause.py tests/integration/test_ingest_failures.py

# The whole suite on PostgreSQL (every gateway a test starts gets its own database);
# about as long as `make test`'s first pass.
test-postgres: install-test bytecode
	TEST_DATABASE=postgresql TCP_NODELAY=1 $(BIN)/pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: install-test bytecode
	TCP_NODELAY=1 $(BIN)/pytest -m slow $(PYTEST_ARGS)

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/dicomgate

bench: install-test
	$(BIN)/python bench/ingest.py --repeat 3
	$(BIN)/python bench/delivery.py --runs 3

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
