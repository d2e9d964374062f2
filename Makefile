# `make test` and `make demo` work on a fresh machine: they create .venv here
# and install norton with its pinned dependencies (quick when already done).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test demo docs docs-check bench gpu-bench compare zoo fashion-mnist clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || \
		{ echo "norton needs Python >= 3.11 in $(VENV); remove it and set PYTHON=python3.11"; exit 1; }
	@# a download cut off midway (seen once in CI: urllib3's read error after 16 s) is not
	@# retried by pip itself, so the install is tried up to three times before giving up
	@for try in 1 2 3; do \
		$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --retries 10 -e '.[test]' && exit 0; \
		echo "pip install failed (try $$try of 3)"; sleep $$((try * 10)); \
	done; exit 1
	@touch $(STAMP)

test: $(STAMP) fashion-mnist
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/python -m pytest -q -n 2 --dist worksteal -m 'not benchmark and not timing'
	$(VENV)/bin/python -m pytest -q -m 'timing and not benchmark'

FASHION_MNIST := /usr/share/datasets/fashion-mnist

# Debian's package; a bare machine has no package lists, hence the update first.  Without
# apt (or root) the dataset stays missing: the demo then stops with an error naming the
# directory, and the test reading the real files is skipped with that reason.
fashion-mnist:
	@test -d $(FASHION_MNIST) || ! command -v apt-get >/dev/null || \
		{ echo "installing Debian's dataset-fashion-mnist"; \
		  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		  $$SUDO apt-get update -q >/dev/null && \
		  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
		echo "could not install dataset-fashion-mnist: $(FASHION_MNIST) stays missing"

# the documentation site into site/: the generated references first, then a strict build
docs: $(STAMP)
	$(VENV)/bin/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# the documentation's long commands (the tutorial's comparison, the guides' benchmarks and torchrun runs), run as written
docs-check: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m benchmark tests/test_tutorial.py tests/test_doc_blocks.py

demo: $(STAMP) fashion-mnist
	$(VENV)/bin/norton demo $(DEMO_ARGS)

# NORTON vs pruning / decomposition baselines, then the paper's analyses (~15 + ~8 min on 2 cores)
compare: $(STAMP) fashion-mnist
	$(VENV)/bin/norton compare --budget small --resume
	$(VENV)/bin/norton report --compare runs/compare --resume

# every torchvision classifier through decompose+prune, prune, deploy and ONNX (resumable: docs/zoo.json; --timm: timm CNNs)
zoo: $(STAMP)
	$(VENV)/bin/python benchmarks/zoo.py --timeout 180 --resume
	$(VENV)/bin/python benchmarks/zoo.py --timm --timeout 120 --resume

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/cp_speed.py --cases kaiming:256:256,kaiming:512:512,uniform:256:256
	$(VENV)/bin/python benchmarks/decompose_speed.py
	$(VENV)/bin/python benchmarks/decompose_speed.py --device cuda
	$(VENV)/bin/python benchmarks/pabs_speed.py
	$(VENV)/bin/python benchmarks/latency.py --train
	$(VENV)/bin/python benchmarks/train_overhead.py
	NORTON_ALLOCATOR=default $(VENV)/bin/python benchmarks/train_overhead.py
	$(VENV)/bin/python benchmarks/allocator.py
	$(VENV)/bin/python benchmarks/train_layout.py --rounds 4
	$(VENV)/bin/python benchmarks/planner.py
	$(VENV)/bin/python benchmarks/latency.py --train-only --device cuda
	$(VENV)/bin/python benchmarks/gpu.py --resume
	$(VENV)/bin/python -m pytest -q -m benchmark
	# the full zoo, measured afresh (~1 h on 2 cores; resumable: rows kept in runs/zoo*.json)
	$(VENV)/bin/python benchmarks/zoo.py --timeout 180 --cache runs/zoo.json --out runs/zoo.md --resume
	$(VENV)/bin/python benchmarks/zoo.py --timm --timeout 120 --cache runs/zoo_timm.json --out runs/zoo_timm.md --resume

# the GPU measurement alone (a machine with CUDA; docs/results/gpu.json and gpu.md, resumable)
gpu-bench: $(STAMP)
	$(VENV)/bin/python benchmarks/gpu.py --resume

clean:
	rm -rf $(VENV) .pytest_cache site
