"""Build script for fastlora.

The Python package always installs. The C++ extension ``fastlora._C`` (sources in ``csrc/``)
is built with torch's cpp_extension when sources exist, torch is importable and a C++
compiler is found; CUDA sources in ``csrc/cuda/`` join it when torch has CUDA and nvcc exists.
Set ``FASTLORA_NO_EXT=1`` to skip the extension; the package then falls back to pure PyTorch.

``triton_kernels/`` installs as ``fastlora.triton_kernels`` so that fastlora never claims the
top-level name of the unrelated ``triton-kernels`` distribution.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"fastlora setup: {msg}", file=sys.stderr)


def _extensions():
    if os.environ.get("FASTLORA_NO_EXT", "0") not in ("", "0"):
        _log("FASTLORA_NO_EXT set: skipping the C++/CUDA extension")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        _log("no sources in csrc/: skipping the extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch absent from the build environment
        _log(f"torch not importable ({exc}); skipping the extension")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        _log("no C++ compiler found: skipping the extension")
        return [], {}
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard
    link_flags = ["-fopenmp"]
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("FASTLORA_NO_CUDA", "0") not in ("", "0"):
        use_cuda = False
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastlora._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx_flags + ["-DFASTLORA_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        if cu:
            _log("CUDA sources present but no CUDA toolkit/torch: building the CPU extension only")
        ext = cpp_extension.CppExtension(
            "fastlora._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

packages = find_packages(include=["fastlora", "fastlora.*"])
packages += ["fastlora.triton_kernels"] + [
    "fastlora.triton_kernels." + p for p in find_packages(where="triton_kernels")
]

setup(
    name="fastlora",
    version="0.1.0",
    description="Fused LoRA forward/backward kernels for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fastlora.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4", "safetensors"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "peft", "transformers", "safetensors", "bitsandbytes"],
        "bench": ["matplotlib", "tqdm", "peft"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
