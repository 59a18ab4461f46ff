"""The GPU code compiles for an H100 (sm_90) on this CPU-only machine, with nothing run.

Triton: tests/sm90_aot.py drives the real launchers with a compile-only sm_90 driver and the
ptxas the running triton bundles for sm_90 (CUDA 12.9 with triton 3.9; 12.8 with the GPU
machine's 3.6, which ``make test-triton36`` runs this file with).
It proves what the interpreter cannot: every kernel lowers to a cubin, fits in the shared memory
an sm_90 block may use (a config over it cannot launch; when every config the autotuner keeps is
over, the kernel fails), bf16/fp16 dots reach the tensor cores, and the double-quant absmax sum
is an explicit, non-flushing ``add.rn.f32`` (bit-exact NF4, DESIGN.md section 5: rounded as the
host code rounds it). CUDA C++: csrc/cuda compiles with nvcc for sm_90 against torch's headers.

CI compiles each autotuner's first config for bf16 and fp32 (fp16 takes the bf16 code path);
``python tests/sm90_aot.py --all-configs`` sweeps every config and dtype (a result is
committed in benchmarks/results/sm90-aot/).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# With a GPU the kernels are compiled and run for real by the other tests (the worker also
# patches triton internals that differ between releases); this stands in where there is none.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles and runs the kernels for real")
SM90_MAX_SHARED = 232448  # bytes, as in tests/sm90_aot.py
KERNELS = {
    "_lora_shrink_kernel",
    "_lora_fwd_kernel",
    "_lora_bwd_dz_dB_kernel",
    "_lora_bwd_dx_kernel",
    "_dequantize_kernel",
    "_dequantize_nf4_flat_kernel",
    "_keep_mask_kernel",
    "_dropout_kernel",
    "_lora_tail_kernel",
    "_lora_dA_tail_kernel",
}
NO_DOTS = {"_dequantize_kernel", "_dequantize_nf4_flat_kernel", "_dropout_kernel", "_keep_mask_kernel"}
NF4_DQ = 2  # triton_kernels.quant.NF4_DQ (not imported: this process interprets the kernels)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Rows of every kernel compiled, from two worker processes (one per core)."""
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton's default, made explicit (it warns otherwise)
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile for real, not from an earlier run's cache
    shards = 2
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "sm90_aot.py"), "--dtypes", "bfloat16,float32"]
            + ["--shard", f"{i}/{shards}", "--json", str(out / f"{i}.json")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(shards)
    ]
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    rows, failures, versions = [], [], {}
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        path = out / f"{i}.json"
        assert path.exists(), f"worker {i} exited {p.returncode} without results:\n{log[-4000:]}"
        data = json.loads(path.read_text())
        rows += data["rows"]
        failures += data["failures"]
        versions = data["versions"]
    print("\n".join(logs))
    return rows, failures, versions


def test_sweep_uses_the_ptxas_its_triton_bundles(compiled):
    """The sweep proves something about a triton release only with that release's own ptxas: not
    the system's CUDA, not another triton's (a leg with its own venv must not borrow one)."""
    import importlib.metadata

    versions = compiled[2]
    assert versions["triton"] == importlib.metadata.version("triton"), versions
    if not {"TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH"} & set(os.environ):  # a user's choice is kept
        assert versions["ptxas_path"].startswith(versions["triton_path"] + os.sep), versions


def test_every_kernel_compiles_for_sm90(compiled):
    rows, failures, _ = compiled
    assert not failures, "\n\n".join(f"{f['case']}: {f['error']}" for f in failures)
    assert {r["kernel"] for r in rows} == KERNELS
    cases = {r["case"] for r in rows}
    for fmt in ("nf4", "nf4dq", "int8"):  # both directions, both the training and decode tiles
        for case in (f"fwd-{fmt}", f"bwd-dx-{fmt}", f"fwd-{fmt}-M16", f"bwd-dx-{fmt}-M16"):
            assert f"{case}-bfloat16" in cases and f"{case}-float32" in cases
    for case in ("fwd-dense", "fwd-fused-shrink", "bwd-dx-dense", "fwd-nf4dq", "bwd-dx-nf4dq"):
        assert f"{case}-tf32" in cases


def test_kernels_fit_sm90_shared_memory(compiled):
    rows, *_ = compiled
    over = [r for r in rows if r["shared"] > SM90_MAX_SHARED]
    assert not over, [(r["case"], r["kernel"], r["constexprs"], r["shared"]) for r in over]


def test_bf16_and_tf32_dots_use_tensor_cores(compiled):
    """bf16 operands are widened to fp32 only under the interpreter (common.mma): compiled,
    every bf16 GEMM, and every fp32 one with TF32 allowed, must issue mma/wgmma, not FMA loops."""
    rows, *_ = compiled
    dots = [r for r in rows if r["case"].endswith(("bfloat16", "tf32")) and r["kernel"] not in NO_DOTS]
    assert dots and all(r["mma"] in ("mma", "wgmma") for r in dots), [
        (r["case"], r["kernel"], r["mma"]) for r in dots if r["mma"] == "fma"
    ]


def test_double_quant_absmax_add_is_rounded_alone(compiled):
    """absmax = nested_code[q] * nested_absmax + offset as two roundings, like the host code:
    an explicit add.rn.f32 (no FMA contraction, no flush-to-zero) in every NF4_DQ kernel."""
    rows, *_ = compiled
    dq = [r for r in rows if r["constexprs"].get("WQ") == NF4_DQ]
    assert dq and all(r["add_rn"] for r in dq), [(r["case"], r["kernel"]) for r in dq if not r["add_rn"]]
    plain = [r for r in rows if r["constexprs"].get("WQ") in (0, 1, 3)]
    assert plain and not any(r["add_rn"] for r in plain), "add.rn.f32 found where no double quant runs"


def test_ieee_fp32_gemms_hold_one_accumulator(compiled):
    """IEEE fp32 F2/B2 sum the GEMM apart from the tail (issue 16's accumulation order) and park
    that sum in the output tile while the tail is formed (triton_kernels/gemm.py, ``park``):
    holding both fp32 accumulators, their first tile (64x128, the largest the IEEE pruning keeps)
    spilled 320 bytes a thread (F2) and 1.4 KB (B2); parked, 8-56 bytes with ptxas 12.8 and 12.9."""
    rows, *_ = compiled
    gemms = [
        r
        for r in rows
        if r["case"] in ("fwd-dense-float32", "bwd-dx-dense-float32")
        and r["kernel"] in ("_lora_fwd_kernel", "_lora_bwd_dx_kernel")
    ]
    assert {r["kernel"] for r in gemms} == {"_lora_fwd_kernel", "_lora_bwd_dx_kernel"}
    assert all(r["local"] + r["stack"] <= 64 for r in gemms), [
        (r["case"], r["constexprs"], r["local"] + r["stack"]) for r in gemms
    ]


def test_ieee_fp32_f2_adds_the_scaled_tail_in_one_rounding(compiled):
    """y = (parked x W^T) + s * tail as one FMA an element, as F2 compiled before its sum was
    parked in the output tile (a review of that change found a multiply and an add, a second
    rounding in ~5% of elements, which the interpreter, never contracting, cannot show)."""
    rows, *_ = compiled
    f2 = [r for r in rows if r["case"] == "fwd-dense-float32" and r["kernel"] == "_lora_fwd_kernel"]
    assert f2 and all(r["fp32_ops"].get("fma.rn.f32", 0) > 0 for r in f2)
    assert not [r["fp32_ops"] for r in f2 if "mul.f32" in r["fp32_ops"] or "mul.rn.f32" in r["fp32_ops"]]


def test_compare_reports_what_changed(tmp_path):
    """``sm90_aot.py --compare``, the check behind a kernel refactor made without a GPU: same
    configs counted, a changed one shown with its (regs, spill, shared, SASS) before and after,
    and a config in one sweep only listed."""

    def row(kernel, block, regs, sass):
        facts = {"shared": 1024, "regs": regs, "stack": 0, "local": 0, "sass": sass}
        config = {"constexprs": {"BLOCK_M": block, "IEEE": False}, "num_warps": 4, "num_stages": 3}
        return {"case": "fwd-dense-bfloat16", "kernel": kernel, **config, **facts}

    f2 = "_lora_fwd_kernel"
    old = [row(f2, 64, 200, 1000), row(f2, 128, 240, 1500), row("_gone", 16, 1, 1)]
    new = [row(f2, 64, 200, 1000), row(f2, 128, 240, 1512), row("_new", 16, 1, 1)]
    paths = []
    for name, rows in (("old", old), ("new", new)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"rows": rows}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sm90_aot.py"), "--compare", *map(str, paths)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "(240, 0, 1024, 1500, None) -> (240, 0, 1024, 1512, None)" in res.stdout
    assert "only_old: fwd-dense-bfloat16 _gone" in res.stdout and "only_new: fwd-dense-bfloat16 _new" in res.stdout
    assert "1 of 2 configs in both sweeps the same" in res.stdout


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if nvcc is None or not os.path.exists(nvcc):
        if os.environ.get("CI"):
            pytest.fail("nvcc is not installed on this CI machine: csrc/cuda cannot be compile-checked")
        pytest.skip("nvcc not installed")
    return nvcc


def test_cuda_sources_compile_for_sm90(tmp_path):
    """Every file in csrc/cuda compiles to an sm_90 object against the installed torch's headers,
    with no register spills. A CPU build of torch ships c10/cuda's headers but not the one its CUDA
    build generates (cuda_cmake_macros.h); a stand-in with the shared-library define fills it."""
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    stub = tmp_path / "include" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig

    includes = [str(tmp_path / "include"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources
    for src in sources:
        cmd = [nvcc, "-c", "-std=c++17", "-O3", "-arch=sm_90", "-Xptxas", "-v", "-o", str(tmp_path / "out.o")]
        cmd += [f"-I{p}" for p in includes]
        cmd += ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", str(src)]
        cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        log = res.stdout + res.stderr
        assert res.returncode == 0, f"nvcc failed on {src.name}:\n{log[-6000:]}"
        entries = log.count("Compiling entry function")
        assert entries >= 2, f"{src.name}: ptxas compiled {entries} kernels:\n{log[-3000:]}"
        assert log.count("0 bytes spill stores, 0 bytes spill loads") == entries, log[-6000:]
