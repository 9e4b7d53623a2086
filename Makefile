# ainode: `make run` serves with the embedded default config; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests need: executable -> package
SYSTEM_DEPS := /usr/sbin/Orthanc:orthanc /usr/bin/storescu:dcmtk /usr/bin/dciodvfy:dicom3tools \
  /usr/lib/postgresql/15/bin/postgres:postgresql-15 \
  /usr/bin/chromium:chromium /usr/bin/systemd-analyze:systemd

.PHONY: run test lint typecheck pytest unit integration e2e system-deps venv clean bench train

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of PyTorch first, pinned, so nothing pulls CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do \
	  [ -x "$${pair%%:*}" ] || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: $(STAMP)
	$(BIN)/ainode serve

lint: $(STAMP)
	$(BIN)/ruff check node models db tests

typecheck: $(STAMP)
	$(BIN)/mypy

# Tests in tiers, fastest first; a tier that fails stops the run.
unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP) system-deps
	$(BIN)/pytest tests/integration

e2e: $(STAMP) system-deps
	$(BIN)/pytest tests/e2e

pytest: unit integration e2e

test: system-deps lint typecheck unit integration e2e

# Benchmarks print numbers (they are not tests): ingest vs Orthanc and storescp,
# inference per model, turnaround from last instance to results in the PACS.
bench: $(STAMP) system-deps
	$(BIN)/python -m node.bench.ingest
	$(BIN)/python -m node.bench.inference
	$(BIN)/python -m node.bench.turnaround
	$(BIN)/python -m node.bench.load

# Retrains the built-in cxr-pneumonia weights from ../shared/datasets (see its model card).
train: $(STAMP)
	$(BIN)/python -m models.training.train_cxr_pneumonia \
	  --data ../shared/datasets/pneumoniamnist.npz --out models/weights/cxr_pneumonia.safetensors

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
