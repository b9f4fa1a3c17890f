# glmctl — set-up, tests, benchmarks and the demo pipeline.
#
#   make test     create .venv if missing, install everything, run the test suite
#   make demo     run every stage on the sample corpus (see the README)
#
# Targets of the pipeline are artifact manifests: a stage reruns only when its inputs changed.

SHELL := /bin/bash
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GLMCTL := $(VENV)/bin/glmctl

# Building the kernels: nvcc on PATH here is a wrapper, torch needs the real toolkit root, and a
# machine without a GPU has no arch to detect, so the list is given.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export TORCH_CUDA_ARCH_LIST ?= 8.0;8.6;8.9;9.0
export MAX_JOBS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

STAMP := $(VENV)/.glmctl-installed
SETUP_INPUTS := pyproject.toml setup.py constraints.txt $(wildcard kernels/build.py kernels/csrc/*)

.PHONY: help setup test test-fast browser bench gpu-check kernels-report clean-venv
help:
	@echo "make setup           install into $(VENV) (idempotent)"
	@echo "make test            set up, then run the whole test suite"
	@echo "make demo            the whole pipeline on the sample corpus (demo/REPORT.md)"
	@echo "make bench           CPU benchmarks (ratios against baselines in the same run)"
	@echo "make gpu-check       on a CUDA machine: build, check and benchmark the CUDA kernels"
	@echo "make kernels-report  registers / spills / shared memory of every CUDA kernel"
	@echo "make rehearsal-130b  GLM-130B's workflow at full width, 2 layers, on this CPU machine"

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt "setuptools>=64" wheel torch numpy ninja
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-build-isolation -e ".[dev]"
	@touch $@

test: setup browser
	$(PY) -m pytest -q -ra

# tests/test_serve_page.py drives Debian's Chromium headless: install it when missing (CI runs as
# root); without it that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "installing chromium (apt-get) for the web page test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 || \
	    echo "could not install chromium: tests/test_serve_page.py will be skipped"; }

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: setup
	$(PY) bench/kernels_cpu.py
	$(PY) bench/tokenize_throughput.py
	$(PY) bench/pretrain.py
	$(PY) bench/evaluate.py
	$(PY) bench/generate.py
	$(PY) bench/convert_memory.py

# On a GPU machine that already has torch (no .venv needed): builds with the machine's torch.
gpu-check:
	python3 bench/gpu_check.py

kernels-report: setup
	$(PY) -m glmctl.kernels.report

# GLM-130B's workflow at its real widths, 2 layers (bench/glm130b_rehearsal.py): ~11 GB fp16,
# peak disk < 40 GB under REHEARSAL_DIR; hours on 2 CPU cores. Results: REHEARSAL_DIR/stats.jsonl.
REHEARSAL_DIR ?= $(CURDIR)/.rehearsal-130b
.PHONY: rehearsal-130b
rehearsal-130b: setup
	nice $(PY) bench/glm130b_rehearsal.py --dir $(REHEARSAL_DIR)

clean-venv:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------
# The demo pipeline: every stage on the sample corpus. Targets are manifests (written last by
# each stage), so a finished stage never reruns and deleting an artifact reruns what depends on it.
# Each stage's settings live in the variables below, in one place.
DEMO ?= demo
VOCAB_SIZE      ?= 8000
# The demo's budget is about 10 minutes of 2 CPU cores: 4000 steps of 8 x 128 tokens (three passes
# over the sample corpus) of the `small` preset (4 layers x 128). At equal CPU time a few narrow
# layers and many small steps beat wider models by far (docs/pretrain.md), and embedding gradient
# shrink is off (1): it steadies 100B-scale runs and slowed these in ours.
PRETRAIN_FLAGS  ?= --preset small --seq-len 128 --micro-batch-size 8 --global-batch-size 8 \
                   --steps 4000 --dropout 0 --embedding-grad-shrink 1 --eval-interval 1000 --save-interval 1000 \
                   --seed 1234
INT8_FLAGS      ?= --bits 8 --seq-len 128 --max-ppl-increase 0.5
INT4_FLAGS      ?= --bits 4 --group-size 128 --method gptq --seq-len 128 --compare rtn:row,rtn:g128,gptq:row \
                   --max-ppl-increase 10
EVAL_TASKS      ?= cloze_en cloze_zh mc_en mc_zh ppl_en ppl_zh
# Sampling (seeded): beam search on a model this small ends every blank at once (empty samples).
# Temperature 0.7 and seed 3: of seeds 1-3 on the demo model, seed 1's English continuation was a
# run of capitals; the others were word-level English (bench/RESULTS.md shows what we saw).
GEN_FLAGS       ?= --max-new-tokens 32 --no-stream --strategy sample --top-p 0.9 --temperature 0.7 \
                   --min-new-tokens 16 --no-repeat-ngram-size 3 --seed 3
DEMO_PROMPTS    := "The Python interpreter" "中国人民" "The function returns [MASK] when the list is [MASK]."
# Fine-tuning (docs/finetune.md): the built-in task numerals_zh ("写出 4 2 7：" -> "四百二十七"),
# exact match on its test split before and after full fine-tuning, LoRA, P-tuning v2, and LoRA on
# the INT4 model; each run is sized to stay within 5 minutes of 2 CPU cores (bench/RESULTS.md).
FT_TASK         := glmctl/tasks/finetune/numerals_zh.yaml
FT_FLAGS        ?= --data numerals_zh --seq-len 128 --micro-batch-size 16 --log-interval 20 --seed 1234
FT_FULL_FLAGS   ?= --method full --steps 250 --lr 3e-3
FT_LORA_FLAGS   ?= --method lora --steps 300 --lr 5e-3 --lora-rank 8 --lora-alpha 64 --warmup 0.1 --train-tokens
FT_PT_FLAGS     ?= --method ptuning --steps 400 --lr 1e-2 --prefix-length 16 --prefix-projection 256 --warmup 0.1 \
                   --train-tokens
FT_EVALS        := $(foreach r,base full lora ptuning int4 lora-int4,$(DEMO)/eval-numerals-$(r)/manifest.json)

.PHONY: demo demo-clean
demo: $(DEMO)/REPORT.md
	@$(GLMCTL) report $(DEMO) --samples $(DEMO)/samples.jsonl
	@echo; echo "Serve the demo model (then open http://127.0.0.1:8000/):"; echo "  $(GLMCTL) serve $(DEMO)/model"

$(DEMO)/corpus/manifest.json: | $(STAMP)
	$(GLMCTL) sample-corpus $(DEMO)/corpus
$(DEMO)/tokenizer/manifest.json: $(DEMO)/corpus/manifest.json
	$(GLMCTL) tokenizer train $(DEMO)/corpus/train/en.jsonl $(DEMO)/corpus/train/zh.jsonl \
	    --out $(DEMO)/tokenizer --vocab-size $(VOCAB_SIZE)
$(DEMO)/tokens/manifest.json: $(DEMO)/tokenizer/manifest.json
	$(GLMCTL) tokenize $(DEMO)/corpus/train --tokenizer $(DEMO)/tokenizer --out $(DEMO)/tokens
$(DEMO)/tokens-valid/manifest.json: $(DEMO)/tokenizer/manifest.json
	$(GLMCTL) tokenize $(DEMO)/corpus/valid --tokenizer $(DEMO)/tokenizer --out $(DEMO)/tokens-valid
$(DEMO)/run/final/manifest.json: $(DEMO)/tokens/manifest.json $(DEMO)/tokens-valid/manifest.json
	$(GLMCTL) pretrain --data $(DEMO)/tokens --valid-data $(DEMO)/tokens-valid --out $(DEMO)/run \
	    --tokenizer $(DEMO)/tokenizer $(PRETRAIN_FLAGS) --resume auto
$(DEMO)/model-tp2/manifest.json: $(DEMO)/run/final/manifest.json
	$(GLMCTL) convert $(DEMO)/run/final $(DEMO)/model-tp2 --tp 2 --verify
$(DEMO)/model/manifest.json: $(DEMO)/model-tp2/manifest.json
	$(GLMCTL) convert $(DEMO)/model-tp2 $(DEMO)/model --tp 1 --verify
$(DEMO)/model-int8/manifest.json: $(DEMO)/model/manifest.json $(DEMO)/tokens-valid/manifest.json
	$(GLMCTL) quantize $(DEMO)/model $(DEMO)/model-int8 $(INT8_FLAGS) --eval $(DEMO)/tokens-valid
$(DEMO)/model-int4/manifest.json: $(DEMO)/model/manifest.json $(DEMO)/tokens/manifest.json $(DEMO)/tokens-valid/manifest.json
	$(GLMCTL) quantize $(DEMO)/model $(DEMO)/model-int4 $(INT4_FLAGS) --calibration $(DEMO)/tokens --eval $(DEMO)/tokens-valid
$(DEMO)/eval-fp/manifest.json: $(DEMO)/model/manifest.json
	$(GLMCTL) evaluate $(DEMO)/model $(EVAL_TASKS) --out $(DEMO)/eval-fp
$(DEMO)/eval-int4/manifest.json: $(DEMO)/model-int4/manifest.json $(DEMO)/eval-fp/manifest.json
	$(GLMCTL) evaluate $(DEMO)/model-int4 $(EVAL_TASKS) --out $(DEMO)/eval-int4 --compare $(DEMO)/eval-fp
$(DEMO)/samples.jsonl: $(DEMO)/model/manifest.json
	$(GLMCTL) generate $(DEMO)/model $(DEMO_PROMPTS) $(GEN_FLAGS) --output $@
$(DEMO)/ft-full/final/manifest.json: $(DEMO)/model/manifest.json
	$(GLMCTL) finetune $(DEMO)/model --out $(DEMO)/ft-full $(FT_FLAGS) $(FT_FULL_FLAGS) --resume auto
$(DEMO)/ft-lora/final/manifest.json: $(DEMO)/model/manifest.json
	$(GLMCTL) finetune $(DEMO)/model --out $(DEMO)/ft-lora $(FT_FLAGS) $(FT_LORA_FLAGS) --resume auto
$(DEMO)/ft-ptuning/final/manifest.json: $(DEMO)/model/manifest.json
	$(GLMCTL) finetune $(DEMO)/model --out $(DEMO)/ft-ptuning $(FT_FLAGS) $(FT_PT_FLAGS) --resume auto
$(DEMO)/ft-lora-int4/final/manifest.json: $(DEMO)/model-int4/manifest.json
	$(GLMCTL) finetune $(DEMO)/model-int4 --out $(DEMO)/ft-lora-int4 $(FT_FLAGS) $(FT_LORA_FLAGS) --resume auto
$(DEMO)/eval-numerals-base/manifest.json: $(DEMO)/model/manifest.json
	$(GLMCTL) evaluate $(DEMO)/model $(FT_TASK) --out $(@D)
$(DEMO)/eval-numerals-int4/manifest.json: $(DEMO)/model-int4/manifest.json
	$(GLMCTL) evaluate $(DEMO)/model-int4 $(FT_TASK) --out $(@D)
$(DEMO)/eval-numerals-full/manifest.json: $(DEMO)/ft-full/final/manifest.json
	$(GLMCTL) evaluate $(DEMO)/ft-full/final $(FT_TASK) --out $(@D)
$(DEMO)/eval-numerals-lora/manifest.json: $(DEMO)/ft-lora/final/manifest.json
	$(GLMCTL) evaluate $(DEMO)/model $(FT_TASK) --adapter $(DEMO)/ft-lora --out $(@D)
$(DEMO)/eval-numerals-ptuning/manifest.json: $(DEMO)/ft-ptuning/final/manifest.json
	$(GLMCTL) evaluate $(DEMO)/model $(FT_TASK) --adapter $(DEMO)/ft-ptuning --out $(@D)
$(DEMO)/eval-numerals-lora-int4/manifest.json: $(DEMO)/ft-lora-int4/final/manifest.json
	$(GLMCTL) evaluate $(DEMO)/model-int4 $(FT_TASK) --adapter $(DEMO)/ft-lora-int4 --out $(@D)
$(DEMO)/REPORT.md: $(DEMO)/model-int8/manifest.json $(DEMO)/eval-int4/manifest.json $(DEMO)/samples.jsonl $(FT_EVALS)
	$(GLMCTL) report $(DEMO) --samples $(DEMO)/samples.jsonl > /dev/null

demo-clean:
	rm -rf $(DEMO)
