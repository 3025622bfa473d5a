# Two commands: `make run` (install + start everything on embedded defaults;
# `make run WORKERS=2` adds two queue-trigger-only devhost processes)
# and `make test` (install what the tests need + run the whole suite).
# Both are idempotent: stamps make a warm re-run skip the installs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# The page's SignalR client: the npm package's browser bundle, copied beside the page (git-ignored).
WEB_VENDOR := static_web/vendor/signalr.min.js
SYS_STAMP := .local/.system-deps
# The embedded OpenSearch node (search_node/, Maven): rebuilt when its pom, lock or sources change.
SEARCH_NODE_STAMP := search_node/target/.built
SEARCH_NODE_SRC := search_node/pom.xml search_node/dependencies.lock $(shell find search_node/src -type f)

.PHONY: run test deps lint typecheck clean

deps: $(PY_STAMP) $(NODE_STAMP) $(WEB_VENDOR)

$(PY_STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(WEB_VENDOR): $(NODE_STAMP)
	mkdir -p $(dir $@)
	cp node_modules/@microsoft/signalr/dist/browser/signalr.min.js $@

# Debian packages the tests need (Dovecot for IMAP, Chromium for the page tests).
$(SYS_STAMP): scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	mkdir -p .local && touch $@

# The same build the stack and the test fixture would do on demand. Without Java 17+ or
# Maven, `make run` carries on (the stack says so in one line and uses osmem); `make test` stops.
$(SEARCH_NODE_STAMP): $(SEARCH_NODE_SRC) | $(PY_STAMP)
	$(PY) -m devhost.services.search_node build $(SEARCH_NODE_BUILD_FLAGS)

run: SEARCH_NODE_BUILD_FLAGS := --if-tools
run: deps $(SEARCH_NODE_STAMP)
	$(PY) -m devhost.stack $(if $(WORKERS),--workers $(WORKERS))

# Two workers, one per core; a test file stays on one worker so its
# module fixtures (servers) start once. The slowest tests are listed at the end.
test: deps $(SYS_STAMP) $(SEARCH_NODE_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=15

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf .local $(VENV) node_modules
