# vlm-align: install, test, demo.  Every target installs into .venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch, taken on machines without CUDA; a machine with CUDA keeps its own torch.
TORCH_CPU ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo demo-smoke recipes export lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: torch comes from the package requirements"; \
	else \
		$(PY) -m pip install --quiet "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The 15 slowest tests listed at the end: make test must stay within 15 minutes on a 2-core CPU.
test: install
	$(PY) -m pytest -q --durations=15 tests

demo: install
	$(PY) -m align.demo

# Every step of the demo on a few examples for two steps: the whole pipeline checked in about 70 s (2-core CPU).
demo-smoke: install
	$(PY) -m align.demo --smoke

# Every recipe through `accelerate launch` on the tiny configs, in pipeline order (outputs in runs/tiny/).
ACCELERATE := $(VENV)/bin/accelerate launch --config_file recipes/accelerate/single.yaml
TINY := recipes/configs/tiny
recipes: install
	$(PY) -m align.zoo
	$(ACCELERATE) recipes/pretrain.py --config $(TINY)/pretrain.yaml
	$(ACCELERATE) recipes/pretrain.py --config $(TINY)/pretrain_cross_attention.yaml
	$(ACCELERATE) recipes/pretrain.py --config $(TINY)/pretrain_grounded_cross_attention.yaml
	$(ACCELERATE) recipes/pretrain.py --config $(TINY)/pretrain_binding_cross_attention.yaml
	$(ACCELERATE) recipes/pretrain.py --config $(TINY)/pretrain_anneal_cross_attention.yaml
	$(ACCELERATE) recipes/sft.py --config $(TINY)/sft.yaml --model_name_or_path runs/tiny/pretrain_anneal_cross_attention --output_dir runs/tiny/sft_cross_attention
	$(ACCELERATE) recipes/evaluate.py --config $(TINY)/evaluate.yaml --model_name_or_path runs/tiny/sft_cross_attention --output_dir runs/tiny/sft_cross_attention/eval --num_questions 600
	$(ACCELERATE) recipes/sft.py --config $(TINY)/sft.yaml
	$(ACCELERATE) recipes/dpo.py --config $(TINY)/dpo.yaml
	$(ACCELERATE) recipes/sft.py --config $(TINY)/sft_qlora.yaml
	$(ACCELERATE) recipes/dpo.py --config $(TINY)/dpo_qlora.yaml
	$(ACCELERATE) recipes/evaluate.py --config $(TINY)/evaluate.yaml
	$(ACCELERATE) recipes/evaluate.py --config $(TINY)/evaluate.yaml --output_dir runs/tiny/dpo/eval-best-of-8 --num_samples 8
	$(ACCELERATE) recipes/reward.py --config $(TINY)/reward.yaml
	$(ACCELERATE) recipes/rejection_sampling.py --config $(TINY)/rejection_sampling.yaml --reward_model_name_or_path runs/tiny/reward
	$(ACCELERATE) recipes/augment.py --config $(TINY)/augment.yaml
	$(PY) recipes/rounds.py --config $(TINY)/rounds.yaml --rounds 1 --launcher "$(ACCELERATE)"
	$(ACCELERATE) recipes/grpo.py --config $(TINY)/grpo.yaml
	$(PY) recipes/rounds.py --config $(TINY)/rounds.yaml --algorithm grpo --rounds 1 --output_dir runs/tiny/rounds_grpo --launcher "$(ACCELERATE)"
	$(ACCELERATE) recipes/distill.py --config $(TINY)/distill.yaml
	$(PY) recipes/students.py --config $(TINY)/students.yaml --launcher "$(ACCELERATE)"
	$(PY) recipes/export.py --config $(TINY)/export.yaml

# Export the default run's final model (make demo's DPO adapter) in every format that applies, verified.
export: install
	@test -f runs/demo/dpo/adapter_config.json || { echo "no runs/demo/dpo yet: run make demo first"; exit 1; }
	$(PY) recipes/export.py --config $(TINY)/export.yaml --model_name_or_path runs/demo/dpo --output_dir runs/demo/export

lint: install
	$(VENV)/bin/ruff check .

bench: install
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .cache runs
