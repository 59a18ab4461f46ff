# Two entry points for a fresh machine: `make bench` (the main job) and `make test`.
# Both install what they need first. torch: an existing install is reused; otherwise the CPU
# build is pinned when there is no NVIDIA GPU (an unpinned `torch` pulls a multi-GB CUDA build).
# The other dependencies are pinned in requirements-dev.txt, with torch held at what is installed
# (pip does not touch the network when everything is already satisfied).
PYTHON ?= python3
TORCH_CPU_VERSION ?= 2.13.0
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: install test bench lint

install:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "fastlora: reusing torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PYTHON) -m pip install torch; \
	else \
		$(PYTHON) -m pip install "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(PYTHON) -m pip install -q -r requirements-dev.txt "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__)')"
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

test: install
	$(PYTHON) -m pytest tests $(TEST_ARGS)

bench: install
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

lint:
	$(PYTHON) -m ruff check fastlora triton_kernels benchmarks tests setup.py
