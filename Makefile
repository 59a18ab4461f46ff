# Two entry points for a fresh machine: `make bench` (the main job) and `make test`.
# Both install what they need first. torch: an existing install is reused; otherwise the CPU
# build is pinned when there is no NVIDIA GPU (an unpinned `torch` pulls a multi-GB CUDA build).
# The other dependencies are pinned in requirements-dev.txt, with torch held at what is installed
# (pip does not touch the network when everything is already satisfied).
PYTHON ?= python3
TORCH_CPU_VERSION ?= 2.13.0
BENCH_ARGS ?=
TEST_ARGS ?=

# The CI leg on the GPU machine's triton (3.6; .ci/run runs it after `make test`): the tests that
# go through the Triton kernels, interpreted, and the sm_90 compile sweep with that triton's own
# ptxas, in a clean venv pinned by requirements-triton36.txt, so API drift shows before a GPU
# lease does. The C++ extension is not built there; a fastlora/_C.so that `make test` built
# against the same torch is used, otherwise the tests take the pure-PyTorch path.
TRITON36_VENV ?= .venv-triton36
TRITON36_TESTS ?= tests/test_triton.py tests/test_triton_quant.py tests/test_sm90_aot.py \
	tests/test_hybrid.py tests/test_plans.py \
	tests/test_compile.py::test_first_call_compiled_in_a_fresh_process_with_dropout \
	tests/test_philox.py::test_triton_randint4x_is_the_same_philox \
	tests/test_variants.py::test_variants_on_triton_match_torch_backend

.PHONY: install test bench lint test-triton36

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

# csrc/cuda's nvcc check does not involve triton: `make test` runs it.
test-triton36:
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q -r requirements-triton36.txt "torch==$(TORCH_CPU_VERSION)"
	FASTLORA_NO_EXT=1 $(TRITON36_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(TRITON36_VENV)/bin/python -c "import numpy, torch, triton; \
		print(f'test-triton36: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
	FASTLORA_TEST_DEPS="triton bitsandbytes peft" \
	FASTLORA_EXPECT_VERSIONS="$$(grep -oE '^(triton|numpy)==[0-9.]+' requirements-triton36.txt | xargs)" \
		$(TRITON36_VENV)/bin/python -m pytest $(TRITON36_TESTS) \
		--deselect tests/test_sm90_aot.py::test_cuda_sources_compile_for_sm90 $(TEST_ARGS)

bench: install
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

lint:
	$(PYTHON) -m ruff check fastlora triton_kernels benchmarks tests setup.py
