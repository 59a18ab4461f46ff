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
