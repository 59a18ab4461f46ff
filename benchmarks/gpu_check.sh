#!/usr/bin/env bash
# The whole GPU step in one command (issues #3, #4, #5, #7): build the package (CUDA extension
# when it compiles), run the test suite compiled on the GPU (Triton kernels not interpreted, the
# 2^31-element shape included), run the benchmark suite, and pack the results.
#
#   bash benchmarks/gpu_check.sh [all|tests|bench|quant]
#   bash benchmarks/gpu_check.sh quick [--dry-run]
#
# quick: issue #16's check for a short lease, <= 8 min in one call on a fresh H100/H200:
# versions, the install with csrc/cuda built by ninja on all cores, a pinned compiled test
# selection, the benchmark rows that decide issue #15, a per-kernel profile per plan, the
# end-to-end step if time remains, and a summary against the targets. benchmarks/gpu_quick.py
# holds the selection, the time budget and the estimates; --dry-run lists them without a GPU.
# It writes $OUT/results.tgz (benchmarks/results/<device>/gpu_quick*: `tar xzf` it in the
# repository root), $OUT/summary.txt and $OUT/quick.log.
#
# quant: issue #4 only, for a short device lease: the quantization tests (csrc/cuda and the
# compiled Triton NF4/int8 paths) and the NF4 benchmark cases. TEST_ARGS / BENCH_ARGS (env)
# replace the test selection / add benchmark flags, e.g. BENCH_ARGS="--no-e2e".
#
# On the lent GPU machine (no registry): carry a bitsandbytes wheel in .whl/ (see README) so the
# NF4 comparisons run; logs and benchmarks/results/ are packed into $OUT (or /tmp/fastlora-gpu).
# Commit what lands in benchmarks/results/<device>/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${OUT:-/tmp/fastlora-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if [ "$what" = quick ] && [[ " $* " == *" --dry-run "* ]]; then
	shift
	exec python3 -m benchmarks.gpu_quick run "$@"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
	python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl &&
		export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$what" = quick ]; then
	shift
	exec python3 -m benchmarks.gpu_quick run "$@"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/build.log" 2>&1; then
	echo "CUDA extension build failed (see build.log); building the CPU extension only" | tee -a "$out/gpu.txt"
	FASTLORA_NO_CUDA=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$out/build.log" 2>&1 || exit 1
fi

tests=${TEST_ARGS:-tests}
bench=${BENCH_ARGS:-}
if [ "$what" = quant ]; then
	tests=${TEST_ARGS:-tests/test_quant.py tests/test_quant_ext.py tests/test_quant_layers.py tests/test_triton_quant.py}
	# the NF4 cases, and the dense case their "x dense" is taken against
	bench="--only nf4 --only M8192-K4096-N4096-r16-p0-bfloat16 --no-e2e $bench"
fi
rc=0
if [ "$what" != bench ]; then
	# shellcheck disable=SC2086  # word splitting of the selections is intended
	python3 -m pytest $tests -q -ra -p no:cacheprovider --junitxml="$out/junit.xml" 2>&1 | tee "$out/tests.log"
	[ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" != tests ]; then
	# a GPU run is a result to commit: write the committed folder where the CLI has --publish
	python3 -m benchmarks --help | grep -q -- --publish && bench="--publish $bench"
	# shellcheck disable=SC2086
	python3 -m benchmarks --device cuda $bench 2>&1 | tee "$out/bench.log"
	[ "${PIPESTATUS[0]}" = 0 ] || rc=1
	tar czf "$out/results.tgz" benchmarks/results
fi
exit $rc
