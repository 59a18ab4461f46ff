"""Compile every Triton kernel of fastlora for an H100 (sm_90) on a machine with no GPU.

The interpreter (how CI runs the kernels) never lowers them: a kernel can pass every
interpreted test and still fail to compile, overflow shared memory, spill registers, or round
differently once the compiler contracts ``a * b + c`` into an FMA (numpy never does). This
worker drives the real launchers in ``fastlora.triton_kernels`` with CPU tensors, but with a
stand-in driver whose target is sm_90 and with every launch turned into a compile (triton's
warmup): the same arguments, constexprs and autotune configs the GPU would see, taken through
TTIR, TTGIR, LLVM, PTX and ptxas (bundled with triton: see :func:`use_legacy_ptxas`) to a
cubin. Nothing runs.

    python tests/sm90_aot.py [--all-configs] [--json FILE]
    python tests/sm90_aot.py --compare OLD.json NEW.json   # two sweeps, config by config

``--all-configs`` compiles every autotune config (minutes per kernel family on two cores);
by default only each autotuner's first config, the one with the largest tiles. Prints a table
and writes one JSON row per compiled kernel: name, constexprs, warps, stages, shared memory,
registers, spill bytes and SASS instruction count (from the bundled cuobjdump), whether its
PTX rounds adds explicitly, and its PTX's fp32 arithmetic by opcode.
Used by tests/test_sm90_aot.py; TRITON_INTERPRET must not be set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from functools import partial

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("sm90_aot: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# the checkout this file is in, as pytest sees it from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = GPUTarget("cuda", 90, 32)
# H100 / H200: the most shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SM90_MAX_SHARED = 232448


class _SM90Utils:
    @staticmethod
    def get_device_properties(device):
        # an H100 SXM / H200: what the launchers' autotune pruning reads (common.max_shared_memory)
        return {"max_shared_mem": SM90_MAX_SHARED, "multiprocessor_count": 132}


class CompileOnlyDriver:
    """What ``JITFunction.run`` and the launchers ask of the active driver before a kernel is
    compiled; launching is never reached (every run is a warmup)."""

    utils = _SM90Utils()

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    def __init__(self, all_configs: bool):
        self.all_configs = all_configs
        self.rows: list[dict] = []
        self.case = ""

    def install(self) -> None:
        driver.set_active(CompileOnlyDriver())
        recorder = self
        jit_run, do_compile = JITFunction.run, JITFunction._do_compile

        def run(fn, *args, grid, warmup, **kwargs):
            return jit_run(fn, *args, grid=grid, warmup=True, **kwargs)

        def compile_and_record(fn, key, signature, device, constexprs, options, attrs, warmup):
            kernel = do_compile(fn, key, signature, device, constexprs, options, attrs, warmup)
            recorder.record(fn, constexprs, kernel)
            return kernel

        def tune(tuner, *args, **kwargs):
            # every config the autotuner would time (after its pruning), or its first
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            configs = tuner.prune_configs(kwargs)
            for config in configs if recorder.all_configs else configs[:1]:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        JITFunction.run = run
        JITFunction._do_compile = compile_and_record
        Autotuner.run = tune

    def record(self, fn: JITFunction, constexprs: dict, kernel) -> None:
        names = fn.arg_names
        consts = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1 and not hasattr(v, "dtype")}
        consts = {k: v for k, v in consts.items() if isinstance(v, (bool, int, float, str))}
        md = kernel.metadata
        ptx = kernel.asm["ptx"]
        self.rows.append(
            {
                "case": self.case,
                "kernel": fn.__name__,
                "constexprs": consts,
                "num_warps": md.num_warps,
                "num_stages": md.num_stages,
                "shared": md.shared,
                **resource_usage(kernel.asm["cubin"]),
                "add_rn": bool(re.search(r"\badd\.rn\.f32\b", ptx)),
                # fp32 arithmetic in the PTX by opcode: a change in how sums are contracted or
                # rounded (an FMA become a multiply and an add) shows here, not in the counts above
                "fp32_ops": dict(sorted(Counter(_FP32_OP.findall(ptx)).items())),
                "mma": "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync\b", ptx) else "fma"),
            }
        )


_FP32_OP = re.compile(r"\b((?:fma|mul|add|sub|div|neg|abs|max|min)(?:\.[a-z]+)*\.f32)\b")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> dict:
    """Registers and spill bytes of the one kernel in ``cubin`` (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {
        "regs": int(usage["REG"]),
        "stack": int(usage.get("STACK", 0)),
        "local": int(usage.get("LOCAL", 0)),
        # SASS instructions (each line "/*0a30*/ INSTR ;"): a code-size measure to compare
        # two versions of a kernel by, e.g. before and after a refactor that should not change it
        "sass": len(re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s", sass, flags=re.M)),
    }


def cases(dtypes: list[torch.dtype]):
    """(name, thunk) pairs: every kernel family, each dtype, each weight format, dropout on; the
    quantized ones also at M = 16, where ``set_quant_route("auto")`` takes the fused route and
    the autotuner keeps only the short tiles; with fp32, the GEMMs again in TF32 (``-tf32``)."""
    from fastlora.triton_kernels import (
        dequantize,
        dropout,
        keep_mask,
        lora_bwd_dA,
        lora_bwd_dx,
        lora_bwd_dz_dB,
        lora_dA_tail,
        lora_forward,
        lora_tail,
    )

    from fastlora.backends.triton_backend import _kernel_weight as quant_weight
    from fastlora.quant import quantize

    M, K, N, r, p, seed = 4096, 512, 384, 16, 0.1, 1234
    w32 = torch.randn(N, K)
    formats = {
        "nf4": quantize(w32, "nf4", double_quant=False),
        "nf4dq": quantize(w32, "nf4", double_quant=True),
        "int8": quantize(w32, "int8"),
    }
    for dt in dtypes:
        d = str(dt).removeprefix("torch.")
        x, g = torch.randn(M, K, dtype=dt), torch.randn(M, N, dtype=dt)
        w, bias = w32.to(dt), torch.randn(N, dtype=dt)
        A, B = torch.randn(r, K, dtype=dt), torch.randn(N, r, dtype=dt)
        z, dz = torch.randn(M, r, dtype=dt), torch.randn(M, r)
        # partial binds this dtype's tensors now: the cases are listed before any is compiled
        yield f"fwd-dense-{d}", partial(lora_forward, x, w, bias, A, B, 2.0, p, seed)
        yield f"fwd-fused-shrink-{d}", partial(lora_forward, x, w, bias, A, B, 2.0, p, seed, fuse_shrink=True)
        yield f"bwd-dz-dB-{d}", partial(lora_bwd_dz_dB, g, z, B, 2.0, True)
        yield f"bwd-dx-dense-{d}", partial(lora_bwd_dx, g, dz, w, A, p, seed)
        yield f"bwd-dA-{d}", partial(lora_bwd_dA, dz, x, p, seed)
        # the hybrid plan's rank-r kernels and the CUDA mask
        yield f"hybrid-tail-{d}", partial(lora_tail, z, B, bias, 2.0, torch.empty(M, N, dtype=dt), False)
        yield f"hybrid-tail-acc-{d}", partial(lora_tail, z, B, None, 2.0, torch.empty(M, N, dtype=dt), True)
        yield f"hybrid-dA-tail-{d}", partial(lora_dA_tail, dz, x, A, p, seed, torch.empty(M, K, dtype=dt))
        yield f"hybrid-tail-only-{d}", partial(lora_dA_tail, dz, None, A, p, seed, torch.empty(M, K, dtype=dt))
        yield f"dropout-{d}", partial(dropout, x, p, seed)
        for name, qw in formats.items():
            q = quant_weight(qw)
            yield f"fwd-{name}-{d}", partial(lora_forward, x, q, bias, A, B, 2.0, 0.0, seed)
            yield f"bwd-dx-{name}-{d}", partial(lora_bwd_dx, g, dz, q, A, p, seed)
            yield f"fwd-{name}-M16-{d}", partial(lora_forward, x[:16], q, bias, A, B, 2.0, 0.0, seed)
            yield f"bwd-dx-{name}-M16-{d}", partial(lora_bwd_dx, g[:16], dz[:16], q, A, p, seed)
            yield f"dequantize-{name}-{d}", partial(dequantize, q, torch.empty(N, K, dtype=dt))
            yield f"dequantize-{name}-strided-{d}", partial(dequantize, q, torch.empty(K, N, dtype=dt).t())
    if torch.float32 in dtypes:  # fp32 GEMMs with TF32 allowed: the tensor-core path, other tiles
        x, g, w = x.float(), g.float(), w32
        bias, A, B = bias.float(), A.float(), B.float()
        q = quant_weight(formats["nf4dq"])
        yield "fwd-dense-tf32", partial(_tf32, lora_forward, x, w, bias, A, B, 2.0, p, seed)
        yield "fwd-fused-shrink-tf32", partial(_tf32, lora_forward, x, w, bias, A, B, 2.0, p, seed, fuse_shrink=True)
        yield "bwd-dx-dense-tf32", partial(_tf32, lora_bwd_dx, g, dz, w, A, p, seed)
        yield "fwd-nf4dq-tf32", partial(_tf32, lora_forward, x, q, bias, A, B, 2.0, 0.0, seed)
        yield "bwd-dx-nf4dq-tf32", partial(_tf32, lora_bwd_dx, g, dz, q, A, p, seed)
    yield "keep-mask", partial(keep_mask, M, K, p, seed, torch.device("cpu"))


def _tf32(fn, *args, **kwargs):
    """``fn`` with fp32 matmuls in TF32 (torch's flag, which the launchers read)."""
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return fn(*args, **kwargs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def _root_cause(exc: BaseException) -> str:
    """triton wraps a failure once per inlined call; the innermost message names it."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return f"{type(exc).__name__}: {exc}"


def versions() -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(TARGET.arch).path  # the assembler triton compiles sm_90 with
    ptxas = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "target": f"{TARGET.backend} sm_{TARGET.arch}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": (ptxas.splitlines()[-1] if ptxas else "unknown") + f" ({os.path.basename(tool)})",
        "ptxas_path": os.path.realpath(tool),
        "triton_path": os.path.realpath(os.path.dirname(triton.__file__)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def use_legacy_ptxas() -> None:
    """Assemble with the ptxas that triton up to 3.8, the GPU machine's 3.6 among them, uses for
    sm_90: the bundled ``ptxas`` (CUDA 12.x). triton 3.9 takes ``ptxas-blackwell`` (CUDA 13.4)
    for sm_90 too, which allocates some of these kernels 32 registers and spills kilobytes
    where 12.9 and the system's 13.0 use ~230 registers and spill nothing. An explicit
    TRITON_PTXAS_BLACKWELL_PATH is kept."""
    if os.path.exists(_tool("ptxas")):
        os.environ.setdefault("TRITON_PTXAS_BLACKWELL_PATH", _tool("ptxas"))


def _rows(paths: str) -> list[dict]:
    rows = []
    for path in paths.split(","):
        with open(path) as f:
            rows += json.load(f)["rows"]
    return rows


def _config(row: dict) -> tuple:
    """A compiled kernel's identity across two sweeps: case, kernel, tiles, warps, stages."""
    tiles = {k: v for k, v in row["constexprs"].items() if k.startswith("BLOCK") or k in ("GROUP_M", "ELEMS")}
    return row["case"], row["kernel"], tuple(sorted(tiles.items())), row["num_warps"], row["num_stages"]


def compare(old: list[dict], new: list[dict]) -> dict:
    """Two sweeps' rows side by side (e.g. before and after a refactor that should not change the
    compiled code): per config in both, equal or the (regs, spill bytes, shared bytes, SASS
    instructions, fp32 PTX opcodes) of each; configs in one only are listed."""

    def facts(r):
        ops = r.get("fp32_ops")
        return r["regs"], r["local"] + r["stack"], r["shared"], r.get("sass"), ops and tuple(sorted(ops.items()))

    a, b = {_config(r): r for r in old}, {_config(r): r for r in new}
    both = sorted(set(a) & set(b), key=str)
    changed = [(k, facts(a[k]), facts(b[k])) for k in both if facts(a[k]) != facts(b[k])]
    return {
        "same": len(both) - len(changed),
        "changed": changed,
        "only_old": sorted(set(a) - set(b), key=str),
        "only_new": sorted(set(b) - set(a), key=str),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--compare",
        nargs=2,
        metavar=("OLD", "NEW"),
        help="compare two sweeps' JSON (each a comma-separated list of shard files) and exit",
    )
    ap.add_argument("--all-configs", action="store_true", help="compile every autotune config, not only the first")
    ap.add_argument("--json", help="write the rows and versions here")
    ap.add_argument("--only", action="append", default=[], help="cases whose name contains this (repeatable)")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32", help="comma-separated torch dtypes")
    ap.add_argument("--shard", default="0/1", help="I/N: compile every N-th case from the I-th (parallel runs)")
    args = ap.parse_args(argv)
    if args.compare:
        diff = compare(*map(_rows, args.compare))
        for key, before, after in diff["changed"]:
            print(f"{key[0]:<26} {key[1]:<24} {dict(key[2])} {key[3]}w {key[4]}s  {before} -> {after}")
        for side in ("only_old", "only_new"):
            for key in diff[side]:
                print(f"{side}: {key[0]} {key[1]} {dict(key[2])} {key[3]}w {key[4]}s")
        n = diff["same"] + len(diff["changed"])
        print(f"(regs, spill, shared, SASS, fp32 ops): {diff['same']} of {n} configs in both sweeps the same")
        return 0
    shard, shards = map(int, args.shard.split("/"))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]

    use_legacy_ptxas()
    rec = Recorder(args.all_configs)
    rec.install()
    failures = []
    selected = [c for c in cases(dtypes) if not args.only or any(s in c[0] for s in args.only)]
    for name, thunk in selected[shard::shards]:
        rec.case = name
        try:
            thunk()
        except Exception as exc:  # a kernel that does not compile: report it, go on with the rest
            failures.append({"case": name, "error": _root_cause(exc)[:4000], "where": str(exc)[-2000:]})
            print(f"FAILED {name}: {_root_cause(exc)[:600]}", file=sys.stderr)

    print(f"{'case':<26} {'kernel':<24} {'warps':>5} {'stages':>6} {'smem KiB':>8} {'regs':>4} {'spill':>5} mma")
    for row in rec.rows:
        spill = row["local"] + row["stack"]
        print(
            f"{row['case']:<26} {row['kernel']:<24} {row['num_warps']:>5} {row['num_stages']:>6} "
            f"{row['shared'] / 1024:>8.1f} {row['regs']:>4} {spill:>5} {row['mma']}"
            + ("  OVER the sm_90 shared-memory limit" if row["shared"] > SM90_MAX_SHARED else "")
        )
    info = versions()
    print(f"{len(rec.rows)} kernels compiled for {info['target']} (triton {info['triton']}, {info['ptxas']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": info, "rows": rec.rows, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
