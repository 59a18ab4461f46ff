"""Op-level cases: one LoRA linear layer, forward and forward+backward, against its baselines.

Every implementation of a case reads the same tensors (one :class:`Bank`): the same x, the same
frozen ``nn.Linear`` and the same LoRA factors (PEFT's own parameters when PEFT is installed),
so the rows of a case differ only in the code that runs. x requires grad (it comes from a
previous layer in training); W and bias are frozen; A and B are trained.

Implementations live in :data:`IMPLS`. A new baseline or variant (PEFT + bitsandbytes NF4,
Unsloth, fastlora's quantized or DoRA paths) is one :func:`register` call with an
``available`` check and a ``layer`` builder; cases may grow fields (``quant``...) that builders
read.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from . import harness

MODES = ("fwd", "fwdbwd")  # a case's default modes
# "infer": the forward under torch.no_grad() (inference / decode: nothing recorded or saved)
ALL_MODES = (*MODES, "infer")
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # blocksize 64, double quant (DESIGN.md 5)


@dataclass(frozen=True)
class OpCase:
    """One shape: x (M, K), W (N, K), A (r, K), B (N, r); dtype a torch dtype name."""

    M: int
    K: int
    N: int
    r: int
    p: float
    dtype: str
    modes: tuple[str, ...] = MODES
    bias: bool = False
    # "lora", "dora" (both sides DoRA), "nf4" (both sides on an NF4 base) or "host-overhead"
    # (a tiny LoRA layer where host time is all there is, held against PEFT's math in plain torch)
    variant: str = "lora"
    repeat: int = 1  # calls per timed sample (times are per call): sub-millisecond cases need > 1

    @property
    def name(self) -> str:
        tail = ("-bias" if self.bias else "") + ("" if self.variant == "lora" else f"-{self.variant}")
        return f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-p{self.p:g}-{self.dtype}" + tail


@dataclass
class Bank:
    """Shared inputs of a case: ``n`` layers that all read one x (n = 3 models q/k/v)."""

    x: Tensor
    g: Tensor  # upstream gradient dL/dy (M, N)
    lins: list[nn.Linear]
    A: list[Tensor]
    B: list[Tensor]
    scale: float
    p: float
    peft_layers: list[nn.Module] | None = None
    keep: list[object] = field(default_factory=list)  # owners that must outlive the bank
    variant: str = "lora"
    magnitude: list[Tensor] = field(default_factory=list)  # DoRA
    qweight: list[object] = field(default_factory=list)  # NF4: fastlora.quant weights of lins

    def params(self) -> list[Tensor]:
        ps = [t for lin in self.lins for t in lin.parameters()] + self.A + self.B + self.magnitude
        if self.peft_layers:
            ps += [t for m in self.peft_layers for t in m.parameters()]
        return ps

    def zero_grads(self) -> None:
        self.x.grad = None
        for t in self.A + self.B + self.magnitude:
            t.grad = None


def _peft():
    try:
        import peft

        return peft
    except Exception:
        return None


def _bnb():
    try:
        import bitsandbytes

        return bitsandbytes
    except Exception:
        return None


def _bnb_base(lin: nn.Linear, device: torch.device) -> nn.Module:
    """The same weight as a bitsandbytes NF4 Linear4bit (double quant, blocksize 64)."""
    bnb = _bnb()
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4",
                          compress_statistics=True, compute_dtype=lin.weight.dtype)  # fmt: skip
    q.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False, blocksize=64,
                                 compress_statistics=True, quant_type="nf4", module=q)  # fmt: skip
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes on the move to a device


def make_bank(case: OpCase, device: torch.device, n: int = 1, seed: int = 0) -> Bank:
    dtype = getattr(torch, case.dtype)
    torch.manual_seed(seed)
    lins = [
        nn.Linear(case.K, case.N, bias=case.bias, device=device, dtype=dtype).requires_grad_(False) for _ in range(n)
    ]
    x = torch.randn(case.M, case.K, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(case.M, case.N, device=device, dtype=dtype)
    alpha = 2 * case.r
    peft = _peft()
    qweight = []
    if case.variant == "nf4":
        import fastlora

        qweight = [fastlora.quantize(lin.weight.detach(), "nf4") for lin in lins]
    if peft is None or (case.variant == "nf4" and _bnb() is None):
        A = [(torch.randn(case.r, case.K, device=device, dtype=dtype) / case.K**0.5).requires_grad_() for _ in range(n)]
        B = [(torch.randn(case.N, case.r, device=device, dtype=dtype) / case.r**0.5).requires_grad_() for _ in range(n)]
        mags = [lin.weight.norm(dim=1).requires_grad_() for lin in lins] if case.variant == "dora" else []
        return Bank(x, g, lins, A, B, alpha / case.r, case.p, variant=case.variant, magnitude=mags, qweight=qweight)
    holder = nn.Module()
    for i, lin in enumerate(lins):
        holder.add_module(f"l{i}", _bnb_base(lin, device) if case.variant == "nf4" else lin)
    cfg = peft.LoraConfig(
        r=case.r, lora_alpha=alpha, lora_dropout=case.p, target_modules=[f"l{i}" for i in range(n)],
        use_dora=case.variant == "dora",
    )  # fmt: skip
    # autocast_adapter_dtype=False keeps PEFT's adapters in the model dtype, like fastlora's
    # (PEFT's default would upcast bf16 adapters to fp32 and run the LoRA branch in fp32).
    pm = peft.get_peft_model(holder, cfg, autocast_adapter_dtype=False).train()
    layers = [getattr(pm.base_model.model, f"l{i}") for i in range(n)]
    A = [pl.lora_A["default"].weight for pl in layers]
    B = [pl.lora_B["default"].weight for pl in layers]
    mags = [pl.lora_magnitude_vector["default"].weight for pl in layers] if case.variant == "dora" else []
    with torch.no_grad():  # non-zero B, so the LoRA branch is not trivially zero
        for b in B:
            b.copy_(torch.randn(b.shape, device=device, dtype=dtype) / case.r**0.5)
    return Bank(x, g, lins, A, B, layers[0].scaling["default"], case.p, layers, [pm], case.variant, mags, qweight)


# --------------------------------------------------------------------------- implementations
@dataclass(frozen=True)
class Impl:
    """``available(device)`` returns None when usable, else why not (printed as a note);
    ``layer(bank, i)`` returns the callable computing layer i of the bank: y = f(x)."""

    name: str
    family: str  # "base", "fastlora", "peft", "reference": used for ratios, FLOPs and plots
    available: Callable[[torch.device], str | None]
    layer: Callable[[Bank, int], Callable[[Tensor], Tensor]]


IMPLS: dict[str, Impl] = {}


def register(impl: Impl) -> Impl:
    IMPLS[impl.name] = impl
    return impl


def _fastlora_layer(backend: str) -> Callable[[Bank, int], Callable[[Tensor], Tensor]]:
    def build(bank: Bank, i: int) -> Callable[[Tensor], Tensor]:
        import fastlora

        lin, A, B = bank.lins[i], bank.A[i], bank.B[i]
        kw = dict(scale=bank.scale, bias=lin.bias, dropout_p=bank.p, training=True, backend=backend)
        if bank.variant == "dora":
            m = bank.magnitude[i]
            sq = lin.weight.float().square().sum(1)  # cached by LoRALinear while W is frozen
            return lambda x: fastlora.dora_linear(x, lin.weight, A, B, m, weight_sqnorm=sq, **kw)
        W = bank.qweight[i] if bank.variant == "nf4" else lin.weight
        return lambda x: fastlora.lora_linear(x, W, A, B, **kw)

    return build


def _fastlora_available(backend: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        try:
            import fastlora
            from fastlora import backends
        except Exception as exc:
            return f"fastlora does not import ({exc})"
        if backend in ("torch", "reference", "auto"):
            return None
        if backend not in fastlora.available_backends():
            return "backend not installed" + (
                " (issue #15's hybrid plan is not in this tree)" if backend == "hybrid" else ""
            )
        if device.type != "cuda":
            return "a GPU backend (on CPU only the Triton interpreter runs it: far too slow to time)"
        # "hybrid" may be a plan inside the Triton backend rather than a module of its own
        ok = backends.usable(backend, device) or (backend == "hybrid" and backends.usable("triton", device))
        return None if ok else f"not usable on {device}"

    return check


register(Impl("base", "base", lambda d: None, lambda bank, i: bank.lins[i]))
# On a GPU (DESIGN.md 3): "torch" is cuBLAS + ATen rank-r ops; "hybrid" is cuBLAS for the two
# big GEMMs + Triton for the rank-r work; "triton" is the fused single-pass Triton plan
# (F1/F2/B1/B2/B3); "auto" is what a user gets by default (on CUDA it times hybrid and fused
# once per shape key and keeps the faster: the row's "plan" field says which it ran).
for _b in ("torch", "hybrid", "triton", "auto", "cuda"):
    register(Impl(f"fastlora-{_b}", "fastlora", _fastlora_available(_b), _fastlora_layer(_b)))
register(
    Impl("peft", "peft", lambda d: None if _peft() else "peft is not installed", lambda bank, i: bank.peft_layers[i])
)
register(Impl("reference", "reference", _fastlora_available("reference"), _fastlora_layer("reference")))


def _routed_layer(route: str) -> Callable[[Bank, int], Callable[[Tensor], Tensor]]:
    """fastlora-triton with the quantized-base route forced (the route a forward takes is kept
    for its backward, so setting it around the forward call is enough)."""

    def build(bank: Bank, i: int) -> Callable[[Tensor], Tensor]:
        import fastlora

        f = _fastlora_layer("triton")(bank, i)

        def call(x: Tensor) -> Tensor:
            before = fastlora.get_quant_route()
            fastlora.set_quant_route(route)
            try:
                return f(x)
            finally:
                fastlora.set_quant_route(before)

        return call

    return build


# The two ways the Triton backend reads an NF4 base ("auto", row fastlora-triton, picks one by
# M): W tiles dequantized in the GEMMs' registers, or W dequantized into one scratch buffer and
# the dense GEMMs. Timing both across M is what sets FUSED_MAX_M in the Triton backend.
for _route in ("fused", "scratch"):
    register(Impl(f"fastlora-triton-{_route}", "fastlora", _fastlora_available("triton"), _routed_layer(_route)))


def _gemv_layer(bank: Bank, i: int) -> Callable[[Tensor], Tensor]:
    from fastlora.quant import nf4_linear

    W, A, B, s = bank.qweight[i], bank.A[i], bank.B[i], bank.scale
    return lambda x: torch.addmm(nf4_linear(x, W), x @ A.t(), B.t(), alpha=s)


def _gemv_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the fused NF4 GEMV is a CUDA kernel"
    try:
        from fastlora.quant import _ops
    except Exception as exc:
        return f"fastlora does not import ({exc})"
    return None if _ops.op("nf4_linear", device) else "the CUDA extension (csrc/cuda) is not built"


# csrc/cuda's NF4 GEMV for the base (one read of the 4-bit W; it runs without autograd, so in
# "infer" mode at M <= 16; elsewhere nf4_linear falls back to dequantize + F.linear) plus an
# unfused ATen LoRA branch (p = 0): what decode with an adapter costs on that kernel.
register(Impl("nf4-gemv", "fastlora", _gemv_available, _gemv_layer))


def _peft_math_layer(bank: Bank, i: int) -> Callable[[Tensor], Tensor]:
    """PEFT's LoRA forward written out in plain torch (dropout -> linear -> linear -> scale ->
    add), with none of PEFT's module machinery: the floor fastlora's host code is held against
    at a shape where host time is all there is (issue #15 item 1)."""
    lin, A, B, s, p = bank.lins[i], bank.A[i], bank.B[i], bank.scale, bank.p
    F = torch.nn.functional
    if p == 0:  # PEFT's lora_dropout is nn.Identity at p = 0
        return lambda x: lin(x) + F.linear(F.linear(x, A), B) * s
    return lambda x: lin(x) + F.linear(F.linear(F.dropout(x, p, training=True), A), B) * s


register(Impl("peft-math", "peft-math", lambda d: None, _peft_math_layer))
# which implementations each variant times (the route rows only mean something on a quantized base)
VARIANT_IMPLS = {"lora": ("base", "fastlora-torch", "fastlora-hybrid", "fastlora-triton", "fastlora-auto",
                          "fastlora-cuda", "peft", "reference"),
                 "dora": ("base", "fastlora-torch", "fastlora-hybrid", "fastlora-triton", "fastlora-auto", "peft"),
                 "nf4": ("base", "fastlora-torch", "fastlora-hybrid", "fastlora-triton", "fastlora-auto",
                         "fastlora-triton-fused", "fastlora-triton-scratch", "nf4-gemv", "peft"),
                 "host-overhead": ("base", "fastlora-torch", "fastlora-auto", "peft", "peft-math")}  # fmt: skip
HOST_OVERHEAD_TARGET = 1.25  # issue #15: lora_linear fwd+bwd <= 1.25x PEFT's math in plain torch

# The plan each fixed row runs ("fastlora-auto" is looked up: auto_plan).
PLAN_OF = {"fastlora-torch": "torch", "fastlora-hybrid": "hybrid", "fastlora-triton": "fused",
           "fastlora-triton-fused": "fused", "fastlora-triton-scratch": "fused", "fastlora-cuda": "cuda",
           "reference": "reference", "nf4-gemv": "nf4-gemv"}  # fmt: skip


def _num(v) -> float | None:
    """A plan-table field as a number: 4096, "4096" or "N4096" (the key's own spelling)."""
    if isinstance(v, bool) or v is None:
        return None if v is None else float(v)
    if isinstance(v, (int, float)):
        return float(v)
    digits = re.sub(r"^[A-Za-z_]+", "", str(v))
    try:
        return float(digits)
    except ValueError:
        return None


def _plan_entry_score(e: dict, case: OpCase) -> float | None:
    """How well one fastlora.plan_table() entry matches a case: None when a field it carries
    contradicts the case, else a score (higher is closer in M). Tolerant of the table's exact
    spelling (4096 or "N4096", True or "dropout1"), since only the fields are promised."""
    for k in ("N", "K", "r"):
        if e.get(k) is not None and _num(e[k]) != getattr(case, k):
            return None
    if e.get("dtype") is not None and str(e["dtype"]).removeprefix("torch.") != case.dtype:
        return None
    drop = e.get("dropout", e.get("has_dropout"))
    if drop is not None and ((_num(drop) or 0) > 0) != (case.p > 0):
        return None
    if "quant" in e:
        q = str(e["quant"]).lower()
        dense = q in ("", "none", "dense", "false", "0")
        if dense != (case.variant != "nf4") or (not dense and q != case.variant):
            return None
    v = e.get("variant")
    if v in ("lora", "dora") and case.variant in ("lora", "dora") and v != case.variant:
        return None
    m = e.get("M", e.get("M_bucket", e.get("m_bucket", e.get("bucket"))))
    if isinstance(m, (list, tuple)) and len(m) == 2:
        return 1.0 if m[0] <= case.M <= m[1] else -abs(math.log2(max(1, m[0])) - math.log2(case.M))
    mb = _num(m)
    if mb is not None and mb > 0:
        return 2.0 if mb == case.M else -abs(math.log2(mb) - math.log2(case.M))
    return 0.0


def auto_plan(case: OpCase, device: torch.device) -> tuple[str, dict | None]:
    """What ``backend="auto"`` ran on this case (call after its first use): the plan of the
    best-matching ``fastlora.plan_table()`` entry (issue #15) with that entry, or, in a tree
    without a plan table, the backend "auto" resolves to ("triton" is the fused plan)."""
    import fastlora

    table = getattr(fastlora, "plan_table", None)
    if table is not None:
        try:
            entries = [e for e in table() if isinstance(e, dict)]
        except Exception:
            entries = []
        scored = [(sc, i, e) for i, e in enumerate(entries) if (sc := _plan_entry_score(e, case)) is not None]
        if scored:
            entry = max(scored, key=lambda t: (t[0], t[1]))[2]  # best M match, then the latest
            if entry.get("plan"):
                return str(entry["plan"]), json.loads(json.dumps(entry, default=str))
    try:
        be = fastlora.functional._resolve("auto", device, getattr(torch, case.dtype))
    except Exception as exc:
        return f"unknown ({type(exc).__name__})", None
    # "plans": auto decides per shape, and no table entry says what it decided here
    return {"triton": "fused", "plans": "auto (no plan_table entry)"}.get(be, be), None


def usable_impls(device: torch.device) -> tuple[list[Impl], list[str]]:
    """The registered implementations that run on ``device``, and a note for each that won't."""
    ok, notes = [], []
    for impl in IMPLS.values():
        why = impl.available(device)
        if why is None:
            ok.append(impl)
        else:
            notes.append(f"skipping {impl.name}: {why}")
    return ok, notes


# --------------------------------------------------------------------------- case lists
def _grid(base: dict, p_values, **axes) -> list[OpCase]:
    """One-at-a-time sweeps around ``base``: every value of each axis, the rest at base."""
    out = []
    for p in p_values:
        out.append(OpCase(**base, p=p))
        for axis, values in axes.items():
            for v in values:
                change = dict(zip(("K", "N"), v, strict=True)) if axis == "KN" else {axis: v}
                out.append(OpCase(**{**base, **change}, p=p))
    return out


def _dedupe(cases: list[OpCase]) -> list[OpCase]:
    """Merge cases of equal shape (union of their modes), keeping first-seen order."""
    merged: dict[tuple, OpCase] = {}
    for c in cases:
        key = (c.M, c.K, c.N, c.r, c.p, c.dtype, c.bias, c.variant)
        if key in merged:
            modes = tuple(m for m in ALL_MODES if m in merged[key].modes or m in c.modes)
            c = replace(merged[key], modes=modes)
        merged[key] = c
    return list(merged.values())


def host_overhead_cases(ps: tuple[float, ...] = (0.0, 0.1)) -> list[OpCase]:
    """Issue #15 item 1: fp32, M=4, K=N=64, r=8, fwd+bwd, where a call is nothing but host work.
    ``fastlora.lora_linear`` (rows fastlora-torch and fastlora-auto, the default backend) must
    cost <= 1.25x the same math written PEFT's way in plain torch (row peft-math; the field
    ``ratio_to_peft_math``). 50 calls per timed sample, since one call takes ~0.1 ms."""
    return [OpCase(4, 64, 64, 8, p, "float32", ("fwdbwd",), variant="host-overhead", repeat=50) for p in ps]


def op_cases(device: torch.device, suite: str, quick: bool = False) -> list[OpCase]:
    """The op-level cases of a suite. The first cases are the headline shape (DESIGN.md §7)."""
    if quick:
        head = [OpCase(128, 64, 64, 8, p, "float32") for p in (0.0, 0.1)]
        sweep = [OpCase(M, 64, 64, r, 0.1, "float32", ("fwdbwd",)) for r in (4, 8) for M in (64, 128)]
        nf4 = [OpCase(128, 64, 64, 8, 0.0, "float32", ("fwdbwd", "infer"), variant="nf4")]
        return _dedupe(head + sweep) + nf4 + host_overhead_cases(ps=(0.1,))
    if device.type == "cuda":
        if suite == "default":
            kn = ((4096, 4096), (4096, 14336), (14336, 4096))
            lora = [OpCase(8192, K, N, r, p, "bfloat16") for (K, N) in kn for r in (16, 64) for p in (0.0, 0.1)]
            dora = [OpCase(8192, 4096, 4096, 16, p, "bfloat16", variant="dora") for p in (0.0, 0.1)]
            nf4 = [OpCase(8192, 4096, 4096, 16, 0.0, "bfloat16", variant="nf4")]
            decode = [OpCase(M, 4096, 4096, 16, 0.0, "bfloat16", ("fwd", "infer"), variant="nf4") for M in (1, 16)]
            # the fused / scratch crossover (FUSED_MAX_M) lies somewhere in here
            cross = [OpCase(M, 4096, 4096, 16, 0.0, "bfloat16", variant="nf4") for M in (64, 256, 1024)]
            return lora + dora + nf4 + decode + cross
        base = dict(M=8192, K=4096, N=4096, r=16, dtype="bfloat16")
        return _dedupe(
            _grid(
                base,
                (0.0, 0.1),
                M=(1024, 2048, 4096, 16384),
                KN=((2048, 2048), (4096, 14336), (14336, 4096), (8192, 8192)),
                r=(8, 32, 64, 128, 256),
                dtype=("float16", "float32"),
            )
            + [OpCase(**base, p=p) for p in (0.05, 0.2)]
        )
    if suite == "default":
        head = [OpCase(2048, 1024, 1024, 16, p, "float32") for p in (0.0, 0.1)]
        sweep = [OpCase(M, 1024, 1024, r, 0.1, "float32", ("fwdbwd",)) for M in (512, 2048) for r in (8, 16, 64)]
        dora = [OpCase(2048, 1024, 1024, 16, p, "float32", ("fwdbwd",), variant="dora") for p in (0.0, 0.1)]
        nf4 = [OpCase(2048, 1024, 1024, 16, 0.0, "float32", ("fwdbwd",), variant="nf4")]
        return _dedupe(head + sweep) + dora + nf4 + host_overhead_cases()
    base = dict(M=2048, K=1024, N=1024, r=16, dtype="float32")
    return _dedupe(
        _grid(
            base,
            (0.0, 0.1),
            M=(256, 512, 1024, 4096),
            KN=((1024, 2816), (2816, 1024), (2048, 2048)),
            r=(4, 8, 32, 64, 128),
            dtype=("bfloat16",),
        )
        + [OpCase(**base, p=p) for p in (0.05, 0.2)]
    )


# --------------------------------------------------------------------------- running a case
def _saved(impl: Impl, bank: Bank) -> int:
    """Activation bytes saved for backward by a forward of all the bank's layers on one x."""
    layers = [impl.layer(bank, i) for i in range(len(bank.lins))]
    return harness.saved_activation_bytes(lambda: [f(bank.x) for f in layers], bank.params())


def _frac(d: dict[str, int], name: str, ref: str | None) -> float | None:
    return d[name] / d[ref] if ref and d[ref] else None


def run_case(
    case: OpCase, device: torch.device, impls: list[Impl], tcfg: harness.TimingConfig
) -> tuple[list[dict], list[str]]:
    """Time and measure every implementation on one case: one row per (implementation, mode),
    and a note for each implementation that failed (it is dropped, the others still run)."""
    bank = make_bank(case, device)
    bank3 = make_bank(case, device, n=3)
    layers, saved, saved_qkv, first_s, plans, notes = {}, {}, {}, {}, {}, []
    allowed = VARIANT_IMPLS.get(case.variant)
    chosen = [i for i in impls if (i.name != "peft" or bank.peft_layers) and (allowed is None or i.name in allowed)]
    # fastlora-auto makes its first call before the other fastlora rows compile anything at this
    # shape, so its first_call_s is the real first step at a new shape (compile, tuning, and
    # auto's one-time timing of both plans: the <= 20 s target of DESIGN.md 7).
    for impl in sorted(chosen, key=lambda i: i.name != "fastlora-auto"):
        try:
            f = impl.layer(bank, 0)
            bank.zero_grads()
            harness._sync(device)
            t0 = time.perf_counter()
            f(bank.x).backward(bank.g)  # smoke call: a broken implementation fails here, untimed
            harness._sync(device)
            first_s[impl.name] = time.perf_counter() - t0
            saved[impl.name] = _saved(impl, bank)
            saved_qkv[impl.name] = _saved(impl, bank3)
        except Exception as exc:
            notes.append(f"{case.name}: {impl.name} failed ({type(exc).__name__}: {exc}); row skipped")
            continue
        layers[impl.name] = f
        if impl.name == "fastlora-auto":
            plans[impl.name] = auto_plan(case, device)
        else:
            plans[impl.name] = (PLAN_OF.get(impl.name), None)
    layers = {i.name: layers[i.name] for i in chosen if i.name in layers}  # table order: registration
    del bank3
    if "base" not in layers:
        return [], notes + [f"{case.name}: no base row, case skipped"]
    fam = {impl.name: impl.family for impl in impls if impl.name in layers}
    peft_name = next((n for n, f in fam.items() if f == "peft"), None)
    elt = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()

    def fn(name: str, mode: str) -> Callable[[], object]:
        f, x, g = layers[name], bank.x, bank.g
        if mode == "fwd":
            return lambda: f(x)
        if mode == "infer":

            def infer() -> object:
                with torch.no_grad():
                    return f(x)

            return infer

        def step() -> None:
            bank.zero_grads()
            f(x).backward(g)

        return step

    def repeated(call: Callable[[], object]) -> Callable[[], object]:
        def calls() -> None:
            for _ in range(case.repeat):
                call()

        return calls

    rows = []
    for mode in case.modes:
        fns = {name: fn(name, mode) for name in layers}
        if case.repeat > 1:
            fns = {name: repeated(call) for name, call in fns.items()}
        samples, rounds = harness.time_interleaved(fns, device, tcfg)
        if case.repeat > 1:  # times per call
            samples = {n: [t / case.repeat for t in ts] for n, ts in samples.items()}
            rounds = {n: [t / case.repeat for t in ts] for n, ts in rounds.items()}
        for name in layers:
            st = harness.summarize(samples[name])
            lora = fam[name] != "base"
            sec = st["median_ms"] / 1e3
            ratio = harness.paired_ratio(rounds[name], rounds["base"])
            row = {
                "kind": "op",
                "case": case.name,
                "impl": name,
                "family": fam[name],
                "mode": mode,
                "M": case.M,
                "K": case.K,
                "N": case.N,
                "r": case.r,
                "p": case.p,
                "dtype": case.dtype,
                "bias": case.bias,
                "variant": case.variant,
                **st,
                "ratio_to_base": ratio[0],
                "ratio_p25": ratio[1],
                "ratio_p75": ratio[2],
                "speedup_vs_peft": harness.paired_ratio(rounds[peft_name], rounds[name])[0] if peft_name else None,
                "tflops": harness.op_flops(case.M, case.K, case.N, case.r, mode, lora) / sec / 1e12,
                "gbps": None,
                "peak_mem_mib": None,
                "saved_bytes": saved[name],
                "saved_bytes_qkv": saved_qkv[name],
                "saved_vs_peft": _frac(saved, name, peft_name),
                "saved_qkv_vs_peft": _frac(saved_qkv, name, peft_name),
                # the plan this row ran (None for base / PEFT); for fastlora-auto, what auto chose,
                # with its fastlora.plan_table() entry (the measured times) when there is one
                "plan": plans[name][0],
                "plan_entry": plans[name][1],
                "first_call_s": first_s[name],  # the untimed first fwd+bwd (compile, tuning)
                "repeat": case.repeat,
            }
            if "peft-math" in layers:  # host-overhead: time / PEFT's math in plain torch (<= 1.25)
                row["ratio_to_peft_math"] = harness.paired_ratio(rounds[name], rounds["peft-math"])[0]
            if device.type == "cuda":
                w_elt = NF4_BYTES_PER_PARAM if case.variant == "nf4" and lora else None
                row["gbps"] = harness.op_bytes(case.M, case.K, case.N, case.r, mode, lora, elt, w_elt) / sec / 1e9
                row["peak_mem_mib"] = harness.cuda_peak_bytes(fns[name], device) / harness.MiB
            rows.append(row)
    return rows, notes
