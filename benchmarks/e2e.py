"""End to end: LoRA training steps on a Llama-architecture model with random weights.

The model is built from a ``transformers.LlamaConfig`` (nothing is downloaded). Every decoder
linear (q, k, v, o, gate, up, down) gets a LoRA adapter: once with ``fastlora.inject`` and once
with PEFT's ``get_peft_model``, from identical base weights and identical A (B starts at zero in
both, as PEFT initialises it). A step is forward + backward + AdamW on the LoRA parameters;
steps of the two models alternate so drift hits both alike.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass

import torch

from . import harness

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class E2EConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    dtype: str
    r: int
    p: float
    steps: int
    warmup: int

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-L{self.layers}-b{self.batch}-s{self.seq}-r{self.r}-p{self.p:g}-{self.dtype}"


def e2e_configs(device: torch.device, suite: str, quick: bool = False) -> list[E2EConfig]:
    """Small on CPU (hidden 512, 4 layers, 512 tokens a step: about 15M parameters), about 1B on
    a GPU (Llama-3.2-1B shapes with a 32k vocabulary, 8192 tokens a step)."""
    if quick:
        return [E2EConfig(64, 128, 1, 2, 2, 128, 2, 16, "float32", 4, 0.1, steps=3, warmup=1)]
    ps = (0.0, 0.1)
    if device.type == "cuda":
        rs = (16,) if suite == "default" else (16, 64)
        steps = 10 if suite == "default" else 20
        return [E2EConfig(2048, 8192, 16, 32, 8, 32000, 4, 2048, "bfloat16", r, p, steps, 3) for r in rs for p in ps]
    steps = 6 if suite == "default" else 15
    return [E2EConfig(512, 1376, 4, 8, 8, 4096, 2, 256, "float32", 16, p, steps, 2) for p in ps]


def _models(cfg: E2EConfig, device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastlora

    lc = LlamaConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        vocab_size=cfg.vocab,
        max_position_embeddings=cfg.seq,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(lc).to(getattr(torch, cfg.dtype))
    kw = dict(r=cfg.r, lora_alpha=2 * cfg.r, lora_dropout=cfg.p)
    fl = fastlora.inject(copy.deepcopy(base), TARGETS, **kw).train()
    backend = fastlora.functional._resolve(None, device)
    models = {f"fastlora-{backend}": fl}
    try:
        import peft
    except Exception:
        return models
    with warnings.catch_warnings():  # deprecation chatter between peft and transformers versions
        warnings.simplefilter("ignore", FutureWarning)
        pm = peft.get_peft_model(
            base, peft.LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **kw), autocast_adapter_dtype=False
        ).train()
    with torch.no_grad():
        for name, layer in fastlora.lora_layers(fl):
            pl = pm.base_model.model.get_submodule(name)
            layer.lora_A.copy_(pl.lora_A["default"].weight)
            layer.lora_B.copy_(pl.lora_B["default"].weight)
    models["peft"] = pm
    return models


def _plans_used(device: torch.device) -> str | None:
    """The plans "auto" chose across the model's layer shapes (fastlora.plan_table(), issue #15),
    e.g. "hybrid,fused"; in a tree without a plan table, the backend the default resolves to."""
    import fastlora

    table = getattr(fastlora, "plan_table", None)
    if table is not None:
        try:
            plans = sorted({str(e["plan"]) for e in table() if isinstance(e, dict) and e.get("plan")})
        except Exception:
            plans = []
        if plans:
            return ",".join(plans)
    try:
        return fastlora.functional._resolve(None, device)
    except Exception:
        return None


def run_e2e(cfg: E2EConfig, device: torch.device) -> tuple[list[dict], list[str]]:
    """Tokens/s, per-step time and memory of fastlora and PEFT on one config."""
    try:
        models = _models(cfg, device)
    except Exception as exc:
        return [], [f"{cfg.name}: end-to-end skipped ({type(exc).__name__}: {exc})"]
    notes = [] if "peft" in models else [f"{cfg.name}: peft is not installed, fastlora only"]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device) for _ in range(4)]
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}

    def step(name: str, i: int) -> float:
        ids = batches[i % len(batches)]
        harness._sync(device)
        t0 = time.perf_counter()
        models[name](input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        harness._sync(device)
        return (time.perf_counter() - t0) * 1e3

    # Saved activations of one training forward (loss included), before any optimizer state.
    saved = {}
    ids = batches[0]
    for name, m in models.items():
        saved[name] = harness.saved_activation_bytes(lambda m=m: m(input_ids=ids, labels=ids).loss, m.parameters())
    for name in models:
        for i in range(cfg.warmup):
            step(name, i)
    times: dict[str, list[float]] = {n: [] for n in models}
    peak: dict[str, int] = dict.fromkeys(models, 0)
    names = list(models)
    for i in range(cfg.steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            times[name].append(step(name, i))
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) - before)

    plan = _plans_used(device) if any(n != "peft" for n in names) else None
    rows = []
    for name in names:
        st = harness.summarize(times[name])
        rows.append(
            {
                "kind": "e2e",
                "case": cfg.name,
                "impl": name,
                "family": "peft" if name == "peft" else "fastlora",
                "mode": "train_step",
                "dtype": cfg.dtype,
                "r": cfg.r,
                "p": cfg.p,
                "M": cfg.batch * cfg.seq,
                "config": {k: v for k, v in vars(cfg).items() if k not in ("steps", "warmup")},
                **st,
                "tokens_per_s": cfg.batch * cfg.seq / (st["median_ms"] / 1e3),
                "speedup_vs_peft": harness.paired_ratio(times["peft"], times[name])[0] if "peft" in models else None,
                "saved_bytes": saved[name],
                "saved_vs_peft": saved[name] / saved["peft"] if "peft" in saved else None,
                "peak_mem_mib": peak[name] / harness.MiB if device.type == "cuda" else None,
                "params_mib": sum(p.numel() * p.element_size() for p in models[name].parameters()) / harness.MiB,
                "plan": None if name == "peft" else plan,
            }
        )
    return rows, notes
