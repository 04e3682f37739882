# Two commands for a new machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps quickstart lifecycle sft rl lint test test-slow test-beam bench clean

$(STAMP): requirements.txt requirements-test.txt requirements-reference.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-reference.txt
	touch $(STAMP)

install: $(STAMP)

# Debian packages, installed once: bubblewrap isolates the code-execution service (sandbox/); Chromium
# renders the lifecycle report in its test (tests/lifecycle/test_report.py).
SYSTEM_PACKAGES := bwrap:bubblewrap chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; fi

quickstart: install
	$(PY) -m train.pretrain --config=configs/quickstart.py

# The whole lifecycle on the embedded default: corpus, curation, pretraining, SFT, RL against a private
# execution service, pass@k of every checkpoint, and a report (runs/lifecycle/report/report.html).
# Finished stages are skipped and an interrupted one resumes when the command runs again.
lifecycle: install system-deps
	$(PY) -m lifecycle.run --config=configs/lifecycle/default.py

# Fine-tunes the main job's model (runs/quickstart; run `make quickstart` first) on the embedded SFT
# set, with held-out loss and pass@1 on held-out problems through a private execution service.
sft: install system-deps
	@test -f runs/quickstart/run_config.json || { echo "runs/quickstart missing: run make quickstart first"; exit 1; }
	$(PY) -m train.sft --config=configs/sft/quickstart.py

# RL with execution rewards from the SFT default's model (runs/sft-quickstart; run `make sft` first) on the
# generated train problems, held-out pass@1 before/after, reward curve and time split in runs/rl-quickstart.
rl: install system-deps
	@test -f runs/sft-quickstart/run_config.json || { echo "runs/sft-quickstart missing: run make sft first"; exit 1; }
	$(PY) -m rl.train --config=configs/rl/quickstart.py

# ruff (style, bugs) and import-linter (the one-way layers in pyproject.toml), then the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: install system-deps lint
	$(PY) -m pytest -q -m "not slow" --durations=25 tests

# The Beam curation pipeline in its own environment (apache-beam needs protobuf<7; codelm pins 7):
# the DirectRunner with worker processes against the local driver, same documents and report.
BEAM_VENV := .venv-beam
$(BEAM_VENV)/.installed: launch/dataflow_requirements.txt
	test -x $(BEAM_VENV)/bin/python || $(PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/python -m pip install -q -r launch/dataflow_requirements.txt pytest==9.2.0 datasketch==2.0.0 sentencepiece==0.2.3
	touch $@

test-beam: $(BEAM_VENV)/.installed
	$(BEAM_VENV)/bin/python -m pytest -q -m "slow or not slow" tests/data/test_curation_beam.py

test-slow: install system-deps
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf runs artifacts .pytest_cache
