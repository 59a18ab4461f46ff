"""Distributed training and activation checkpointing with fastlora layers (issue #6, item 5).

- DDP and FSDP2 (``fully_shard``): two CPU processes on gloo train a small model with injected
  ``LoRALinear`` layers for a few steps; every step's loss and every LoRA gradient (and the final
  LoRA weights) must equal a single process's. One spawn runs every scenario (spawning costs a
  torch import per process), each scenario's outcome goes to a file, and one test per scenario
  checks it against a reference computed here, in the pytest process.
- ``torch.utils.checkpoint`` (reentrant and not) around LoRA, DyLoRA and DoRA layers with
  dropout: the recomputed forward draws the same dropout seed (and DyLoRA rank) from torch's RNG,
  which checkpoint replays, so the gradients are bit-identical to the run without checkpointing.

Why the dropout comparison is against "two half-batches in one process", not the full batch:
fastlora's mask bit for an element is a function of (seed, the element's offset in the flattened
input). Rank r sees its half-batch at offsets 0..M/2*K, not r*M/2*K.., so its mask differs from
the mask the same rows get inside the full batch; and both ranks draw the same seed because
their torch RNGs are seeded alike (as ``nn.Dropout`` masks are under DDP). The exact
single-process equivalent is therefore: replay the RNG state for each half, run the two halves,
average. With p = 0 there is no mask and the reference is the plain full batch.

Everything runs in float64 so the comparisons can be tight (rtol 1e-10): the distributed and
single-process paths differ only in summation order (all-reduce of two halves vs one GEMM over
the full batch), a few ulps; any real error (a wrong mask, a missing or doubled gradient
contribution, a stale shard) is orders of magnitude larger.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastlora
from fastlora import LoRALinear

WORLD = 2
STEPS = 3
BATCH, SEQ, DIM, HID, OUT = 8, 5, 12, 16, 3
TARGETS = ["q", "v", "o"]
TIMEOUT_S = 120  # the whole spawn; it takes ~10 s on 2 cores
SCENARIOS = [  # (wrapper, variant, dropout p)
    ("ddp", "lora", 0.0),
    ("ddp", "lora", 0.1),
    ("ddp", "dora", 0.1),
    ("fsdp2", "lora", 0.0),
    ("fsdp2", "lora", 0.1),
    ("fsdp2", "dora", 0.1),
]
RTOL, ATOL = 1e-10, 1e-12


class Net(nn.Module):
    """Attention-shaped toy: q and v read the same x (3-D, so dropout offsets span tokens)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(DIM, HID)
        self.v = nn.Linear(DIM, HID)
        self.o = nn.Linear(HID, DIM, bias=False)
        self.head = nn.Linear(DIM, OUT)

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.v(x)
        return self.head(x + self.o(h)).mean(1)


def build(variant: str, p: float) -> nn.Module:
    """The same model in every process: fixed init, and lora_B non-zero so dA is non-zero."""
    torch.manual_seed(0)
    model = Net().double()
    fastlora.inject(model, TARGETS, r=4, lora_alpha=8, lora_dropout=p, use_dora=variant == "dora")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in fastlora.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(STEPS, BATCH, SEQ, DIM, generator=g, dtype=torch.float64)
    t = torch.randn(STEPS, BATCH, OUT, generator=g, dtype=torch.float64)
    return x, t


def halves(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, t = data()
    n = BATCH // WORLD
    return [(x[step, i * n : (i + 1) * n], t[step, i * n : (i + 1) * n]) for i in range(WORLD)]


def loss_fn(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), t)  # a mean: equal halves average to the full batch


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, q) for n, q in model.named_parameters() if q.requires_grad]


def make_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([q for _, q in trainable(model)], lr=0.2, momentum=0.9)


# ---- the single-process references -------------------------------------------------------


def reference(variant: str, p: float, split: bool) -> dict:
    """Losses and LoRA grads per step, and the final LoRA weights, from one process.

    ``split=False``: the full batch at once. ``split=True``: the two half-batches each from the
    same RNG state (what each rank sees: same seeds, offsets from 0), gradients averaged.
    """
    model = build(variant, p)
    opt = make_opt(model)
    torch.manual_seed(1234)
    out = {"loss": [], "grads": []}
    x, t = data()
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if split:
            state, losses = torch.get_rng_state(), []
            for xh, th in halves(step):
                torch.set_rng_state(state)
                loss = loss_fn(model, xh, th)
                (loss / WORLD).backward()
                losses.append(loss.detach())
            loss = sum(losses) / WORLD
        else:
            loss = loss_fn(model, x[step], t[step])
            loss.backward()
        out["loss"].append(loss.item())
        out["grads"].append({n: q.grad.clone() for n, q in trainable(model)})
        opt.step()
    out["final"] = {n: q.detach().clone() for n, q in trainable(model)}
    return out


# ---- the two-process runs ----------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 shard: an all-gather, so every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run_scenario(rank: int, wrapper: str, variant: str, p: float) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build(variant, p)
    if wrapper == "ddp":
        wrapped = DDP(model)
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
        for _, layer in fastlora.lora_layers(model):  # bottom-up: one group per LoRA layer, then the root
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = make_opt(model)
    torch.manual_seed(1234)  # every rank alike, as the reference (so dropout seeds agree)
    out = {"loss": [], "grads": []}
    for step in range(STEPS):
        xh, th = halves(step)[rank]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(wrapped, xh, th)
        loss.backward()  # DDP all-reduces, FSDP2 reduce-scatters: both average over ranks
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        out["loss"].append(avg.item() / WORLD)
        out["grads"].append({n: _full(q.grad).clone() for n, q in trainable(model)})
        opt.step()
    out["final"] = {n: _full(q.detach()).clone() for n, q in trainable(model)}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2's note on view outputs
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, WORLD + 1, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    try:
        for i, scenario in enumerate(SCENARIOS):
            try:
                result = _run_scenario(rank, *scenario)
            except Exception:  # reported by that scenario's test, so the other scenarios still run
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{i}-rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict:
    """Spawn the two ranks once; ``{(scenario index, rank): result}``."""
    out_dir = tmp_path_factory.mktemp("dist")
    # The parent hosts the rendezvous store on a port the OS picks (port=0), so there is no
    # window between choosing a free port and binding it.
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", 0, WORLD + 1, is_master=True, wait_for_workers=False, timeout=timeout)
    ctx = mp.start_processes(_worker, args=(store.port, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):  # raises, with the worker's traceback, if a rank fails
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {TIMEOUT_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        del store
    return {
        (i, r): torch.load(out_dir / f"{i}-rank{r}.pt", weights_only=True)
        for i in range(len(SCENARIOS))
        for r in range(WORLD)
    }


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert "error" not in got, got.get("error")
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=RTOL, atol=ATOL)
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"], strict=True)):
        assert g.keys() == r.keys()
        for name in r:
            torch.testing.assert_close(g[name], r[name], rtol=RTOL, atol=ATOL, msg=f"{what} step {step} grad {name}")
    for name in ref["final"]:
        torch.testing.assert_close(got["final"][name], ref["final"][name], rtol=RTOL, atol=ATOL, msg=f"{what} {name}")


def _max_grad_diff(a: dict, b: dict) -> float:
    return max((a["grads"][0][n] - b["grads"][0][n]).abs().max().item() for n in a["grads"][0])


@pytest.mark.parametrize("index", range(len(SCENARIOS)), ids=[f"{w}-{v}-p{p}" for w, v, p in SCENARIOS])
def test_two_ranks_match_one_process(dist_results, index):
    wrapper, variant, p = SCENARIOS[index]
    ref = reference(variant, p, split=p > 0)
    for rank in range(WORLD):
        _assert_same(dist_results[(index, rank)], ref, f"{wrapper} rank {rank}")
    # every trainable tensor actually learns (B was made non-zero, so dA is non-zero too)
    assert all(g.abs().max() > 0 for g in ref["grads"][0].values())
    if p > 0:
        # The split reference is needed: the full batch draws different masks (offsets), so its
        # gradients differ by far more than the tolerance; and dropout does change the result.
        full = reference(variant, p, split=False)
        assert _max_grad_diff(full, ref) > 1e-4
        no_dropout = reference(variant, 0.0, split=True)
        assert _max_grad_diff(no_dropout, ref) > 1e-4


# ---- activation checkpointing ------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, **options):
        super().__init__()
        lin = lambda i, o: LoRALinear(i, o, r=6, lora_alpha=12, lora_dropout=0.2, **options)  # noqa: E731
        self.q, self.v, self.o = lin(DIM, HID), lin(DIM, HID), lin(HID, DIM)

    def forward(self, x):
        return x + self.o(torch.tanh(self.q(x)) * self.v(x))


class Stack(nn.Module):
    def __init__(self, ckpt: bool | None, **options):
        super().__init__()
        self.ckpt = ckpt  # None: no checkpointing; else use_reentrant
        self.preserve_rng_state = True
        self.blocks = nn.ModuleList(Block(**options) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            if self.ckpt is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.ckpt, preserve_rng_state=self.preserve_rng_state)
        return x.square().mean()


VARIANTS = {"lora": {}, "dylora": {"dynamic_rank": True}, "dora": {"use_dora": True}}


def _train_stack(ckpt: bool | None, variant: str, preserve_rng_state: bool = True, steps: int = 2) -> list[dict]:
    """Per step: the input grad and every trainable grad. Two SGD steps, so the second also checks
    that checkpointing left torch's RNG stream where the plain run leaves it."""
    torch.manual_seed(0)
    model = Stack(ckpt, **VARIANTS[variant]).double()
    model.preserve_rng_state = preserve_rng_state
    with torch.no_grad():
        for _, layer in fastlora.lora_layers(model):
            layer.lora_B.normal_(std=0.3)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(1234)
    out = []
    for _ in range(steps):
        # a leaf that requires grad: reentrant checkpoint needs one among its inputs
        x = torch.randn(4, SEQ, DIM, generator=g, dtype=torch.float64, requires_grad=True)
        opt.zero_grad(set_to_none=True)
        loss = model(x)
        loss.backward()
        out.append({"loss": loss.detach(), "x": x.grad, **{n: q.grad.clone() for n, q in trainable(model)}})
        opt.step()
    return out


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_regenerates_dropout_masks(variant, use_reentrant):
    plain = _train_stack(None, variant)
    ckpt = _train_stack(use_reentrant, variant)
    for step, (a, b) in enumerate(zip(plain, ckpt, strict=True)):
        assert a.keys() == b.keys()
        for name in a:  # the same ops on the same bits: exactly equal, not merely close
            assert torch.equal(a[name], b[name]), f"step {step} {name}: max diff {(a[name] - b[name]).abs().max():.3e}"
    if variant == "lora":
        # The test can fail: without RNG replay the recompute draws new seeds, so new masks.
        fresh = _train_stack(use_reentrant, variant, preserve_rng_state=False, steps=1)[0]
        assert torch.equal(fresh["loss"], plain[0]["loss"])  # the first forward is the same
        assert not torch.equal(fresh["blocks.0.q.lora_A"], plain[0]["blocks.0.q.lora_A"])
