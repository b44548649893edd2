# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench bench-mpcvit bench-report bench-attacks clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "stip needs Python 3.11 (SPU has no wheel for other versions); set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stip demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/seal_overhead.py
	$(PY) benchmarks/e2e.py

bench-mpcvit: $(STAMP)
	$(PY) benchmarks/mpcvit_latency.py

# The README's headline tables: every mode on MiniLM, then on the digits polynomial ViT (~5 min).
RESULTS := benchmarks/results
bench-report: $(STAMP)
	$(VENV)/bin/stip bench --out $(RESULTS)/bench/minilm --network wan --readme README.md
	$(VENV)/bin/stip train polyformer $(RESULTS)/polyvit-digits
	$(VENV)/bin/stip bench --model $(RESULTS)/polyvit-digits --batch 64 --network wan --out $(RESULTS)/bench/polyvit-digits --readme README.md

bench-attacks: $(STAMP)
	$(PY) benchmarks/attacks.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
