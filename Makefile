# duotok: the two commands.
#   make repro   -> set up everything, then `dvc repro` the whole pipeline on the embedded corpus
#   make test    -> set up everything, then the whole test suite (nbdev checks, nbdev-test, pytest)
# Both are idempotent: set-up steps are skipped when their inputs have not changed.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
PY_STAMP := $(VENV)/.stamp-$(REQ_HASH)
APT_STAMP := $(VENV)/.stamp-apt-$(shell sha1sum apt-packages.txt | cut -c1-12)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: setup repro test test-slow paper lab mlflow-ui bench dvc-graph pretrained demo

setup: $(PY_STAMP) $(APT_STAMP)

$(APT_STAMP):
	@pkgs=$$(grep -v '^#' apt-packages.txt | xargs); missing=""; \
	for p in $$pkgs; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "[setup] apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	@mkdir -p $(VENV) && touch $@

$(PY_STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] pip install -r requirements.txt (first time: a few minutes)"
	@$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v WARNING || true
	@$(BIN)/pip install -q -r requirements.txt 2>&1 | grep -v WARNING || true
	@$(BIN)/pip install -q --no-deps -e . 2>&1 | grep -v WARNING || true
	@$(BIN)/python -c "import torch, torchaudio, duotok; print('[setup] torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
	@rm -f $(VENV)/.stamp-[0-9a-f]* && touch $@

repro: setup
	@source $(BIN)/activate && dvc pull -q data.dvc 2>/dev/null || true
	source $(BIN)/activate && dvc repro
	@cat eval/results.md
	@echo "[repro] all metrics: dvc metrics show (or eval/metrics.json); report: outputs/report/report.html"

# A pretrained tokenizer in three minutes: pull the package from the in-repo DVC store (offline), encode and decode its
# example song; writes outputs/demo/ (original_*.wav, decoded_*.wav, spectrograms.png, tokens.npz).
demo: setup
	@source $(BIN)/activate && dvc pull -q pretrained/default.dvc
	source $(BIN)/activate && duotok demo

# After make repro: outputs/decoder/package -> pretrained/default (+ example/, MODEL_CARD.md; pretrained/default.md is
# the card for git), tracked by DVC and pushed to dvcstore/; store objects no .dvc file uses any more (the previous
# package) are deleted (git history keeps them). Idempotent: the same outputs give the same .dvc file.
# Then commit what it staged (it prints the command).
pretrained: setup
	source $(BIN)/activate && python -m duotok.demo pretrained
	source $(BIN)/activate && dvc add -q pretrained/default && dvc push -q -r store pretrained/default.dvc
	source $(BIN)/activate && python -m duotok.demo prune-store
	git add -A pretrained/default.dvc pretrained/.gitignore pretrained/default.md dvcstore
	@echo "[pretrained] staged; commit with: git commit -m 'pretrained/default: package of the current dvc.lock'"

# One empty numba cache for the whole test command, filled by ONE process: librosa's cache=True gufuncs (YIN's
# localmin, pyin) segfault when two processes compile and write the same entry at once (numba issue #10128,
# open). A segfault at address 0 killed an nbdev-test worker of a fresh-venv CI run with 2 workers (most likely
# this race; the run had no Python stack), and pytest once crashed loading entries two workers had written.
# So nbdev-test runs one notebook at a time (about a minute more) and pytest, run after it, finds the entries.
# PYTHONFAULTHANDLER prints the Python stack of any crash. The folder is removed when the command ends (exit status kept).
test: setup
	source $(BIN)/activate && python scripts/check_nbdev.py
	source $(BIN)/activate && d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && export NUMBA_CACHE_DIR=$$d PYTHONFAULTHANDLER=1 && \
	  nbdev-test --n-workers 1 --skip-folder-re '^reports$$' && python -m pytest -q -m "not slow" tests

# The long tests (pytest -m slow): the paper profile trained for 2 steps per stage end to end (~80 min on one core,
# ~12 GB RAM, ~10 GB disk), the report notebook, ViSQOL.
test-slow: setup
	source $(BIN)/activate && d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && NUMBA_CACHE_DIR=$$d python -m pytest -q -s -m slow tests

# The paper profile on the devices present (1 GPU, N GPUs on this node, or CPU), MFU logged to MLflow: docs/scale.md.
paper: setup
	source $(BIN)/activate && bash scripts/paper.sh

# overrides.json: no "get notified about Jupyter news?" prompt (the news and update checks need the internet)
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
$(LAB_OVERRIDES): $(PY_STAMP)
	@mkdir -p $(dir $@) && echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $@

lab: setup $(LAB_OVERRIDES)
	source $(BIN)/activate && jupyter lab --ip 127.0.0.1 --no-browser --allow-root \
	  --LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate nbs

mlflow-ui: setup
	source $(BIN)/activate && python -m duotok.tracking ui --port 5000

# Recompute the deps and params of every stage in dvc.yaml from the code (after moving code between modules):
# runs the toy chain in a temporary project to record the params keys each stage reads (~3-5 min).
dvc-graph: setup
	source $(BIN)/activate && python scripts/dvc_graph.py --toy --write

bench: setup
	source $(BIN)/activate && python -m duotok.bench
