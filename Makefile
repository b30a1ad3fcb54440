# Two commands matter on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-secured test venv lint unit integration stack-up stack-down stack-status clean-state

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(STAMP)

## The main job end to end on the local stack: install, start (or reuse) the stack, round trip.
demo: venv
	$(BIN)/sluiceway stack up
	$(BIN)/sluiceway demo

## The same on the secured stack (TLS, SCRAM/mTLS/OAUTHBEARER, ACLs, encrypted MinIO), each
## process as its own principal; its own state folder (stop a plain stack first: same ports).
SECURED_ENV := SLUICEWAY_STACK__SECURED=true SLUICEWAY_STACK__STATE_DIR=.sluiceway-secured
demo-secured: venv
	$(SECURED_ENV) $(BIN)/sluiceway stack up
	$(SECURED_ENV) $(BIN)/sluiceway demo

## The whole suite: lint, types, the import floors, unit tests, then integration tests against
## the real stack.
test: venv lint
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/sluiceway schemas check

unit: venv
	$(BIN)/pytest -m "not integration"

integration: venv
	$(BIN)/pytest -m integration

stack-up: venv
	$(BIN)/sluiceway stack up

stack-down: venv
	$(BIN)/sluiceway stack down

stack-status: venv
	$(BIN)/sluiceway stack status

## Stop the stack and delete its data and logs (caches under ~/.cache/sluiceway stay).
clean-state: stack-down
	rm -rf .sluiceway
