# The two commands of README: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench bench-full clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

# One xdist worker per core (tests start their own processes, each with one compute thread: tests/conftest.py);
# tests that share an expensive module fixture carry an xdist_group mark and run on one worker.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=30

# The main job on the embedded defaults: shards from the sample photos (tiny random TransFace; one identity held
# out for validation, in $(DEMO)/shards/val), a short tiny-config training run on CPU (TensorBoard logs with
# validation every 50 steps, checkpoints, exported adapters), then portraits generated with the adapter it trained.
DEMO := demo_out
demo: $(STAMP)
	$(VENV)/bin/fact-data build --src tests/fixtures/faces/raw --out $(DEMO)/shards \
		--resolution 128 --encoder tiny --random-encoder --images-per-shard 4 --vae tiny --val-identities 1
	$(VENV)/bin/fact-train fit --config configs/tiny.yaml --data.root $(DEMO)/shards \
		--data.val_root $(DEMO)/shards/val --trainer.default_root_dir $(DEMO)/runs/tiny
	$(VENV)/bin/fact-generate --tiny --adapter $(DEMO)/runs/tiny/adapters/final/adapter.safetensors \
		--reference tests/fixtures/faces/raw/fr_obama/1.jpg --prompt "a photo of a man, best quality" \
		--seed 0 --seed 1 --steps 10 --height 128 --width 128 --out $(DEMO)/generate --overwrite
	@echo
	@echo "shards:      $(DEMO)/shards (fact-data inspect $(DEMO)/shards)"
	@echo "run folder:  $(DEMO)/runs/tiny (events, config.yaml, checkpoints/, adapters/, previews/)"
	@echo "adapter:     $(DEMO)/runs/tiny/adapters/final/adapter.safetensors (+ fact_adapter.bin, official format)"
	@echo "portraits:   $(DEMO)/generate/images"
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO)/runs"

bench: $(STAMP)
	$(PY) -m benchmarks.run --out bench_results

# SD1.5 size, random weights, CPU float32: minutes and ~10 GB of memory; not in CI.
bench-full: $(STAMP)
	$(PY) -m benchmarks.full_size --out bench_results

clean:
	rm -rf $(VENV) demo_out bench_results
