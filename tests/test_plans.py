"""How ``backend="auto"`` chooses a GPU plan (fastlora/backends/plans.py), with a fake timer.

The plans themselves run here on CPU (the hybrid and fused plans' kernels under the Triton
interpreter), so the first-use check is real; only the timing is faked, so the choice is
deterministic.
"""

import json
import warnings

import pytest
import torch

import fastlora
from fastlora import backends
from fastlora.backends import plans

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _problem(M=37, K=33, N=20, r=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    W = torch.randn(N, K, generator=gen) / K**0.5
    A = torch.randn(r, K, generator=gen) / K**0.5
    B = torch.randn(N, r, generator=gen)
    b = torch.randn(N, generator=gen)
    return tuple(t.to(dtype=dtype, device=DEVICE) for t in (x, W, b, A, B))


class FakeTimer:
    """Seconds per plan module, by module name; records what it timed."""

    def __init__(self, **seconds):
        self.seconds = seconds
        self.timed = []

    def __call__(self, fn, device):
        fn()  # the step must run: a plan that fails to launch fails here
        mod = self.current
        self.timed.append(mod)
        return self.seconds[mod]


def _chooser(tmp_path, timer, overrides=None):
    """A Chooser whose timer learns which plan it is timing, with optional broken modules."""
    overrides = overrides or {}

    def load(name):
        mod = overrides.get(name) or backends.load(name)
        return mod

    chooser = plans.Chooser(timer=timer, load=load, path=tmp_path / "plans.json")
    real_step = chooser._step

    def step(mod, *args):
        timer.current = "hybrid" if mod is load("hybrid") else "fused"
        return real_step(mod, *args)

    chooser._step = step
    return chooser


def _choose(chooser, p=0.0, **kw):
    x, W, b, A, B = _problem(**kw)
    return chooser.choose(x, W, b, A, B, 0.5, p, "auto", "dense")


@pytest.fixture(autouse=True)
def no_pin(monkeypatch):
    monkeypatch.delenv(plans.PLAN_ENV, raising=False)


@pytest.mark.parametrize("faster", ["hybrid", "fused"])
def test_first_use_picks_the_faster_plan_and_keeps_it(tmp_path, faster, monkeypatch):
    monkeypatch.delenv("FASTLORA_TRITON_PIN", raising=False)  # pinned timings are never written
    slower = "fused" if faster == "hybrid" else "hybrid"
    timer = FakeTimer(**{faster: 1e-3, slower: 2e-3})
    chooser = _chooser(tmp_path, timer)
    assert _choose(chooser) == faster
    assert sorted(timer.timed) == ["fused", "hybrid"]
    assert _choose(chooser) == faster and len(timer.timed) == 2  # decided once per key
    # another key (dropout on) is decided on its own
    assert _choose(chooser, p=0.1) == faster and len(timer.timed) == 4
    # a new process (a new Chooser on the same file) reads the decision: nothing is timed
    timer2 = FakeTimer(hybrid=5.0, fused=5.0)
    again = _chooser(tmp_path, timer2)
    assert _choose(again) == faster and timer2.timed == []
    rows = again.table()
    assert {r["plan"] for r in rows} == {faster} and {r["dropout"] for r in rows} == {False, True}
    assert rows[0]["times_ms"][faster] == pytest.approx(1.0)


def test_a_decision_on_disk_is_reused_only_by_the_same_code(tmp_path, monkeypatch):
    """A kept decision skips the first-use check, so a change to the kernels or backends (a
    source checkout keeps its version string) makes a new key: checked and timed again."""
    monkeypatch.delenv("FASTLORA_TRITON_PIN", raising=False)
    timer = FakeTimer(hybrid=1e-3, fused=2e-3)
    assert _choose(_chooser(tmp_path, timer)) == "hybrid" and len(timer.timed) == 2
    digest = plans._code_digest()
    assert len(digest) == 12 and digest in plans._versions()
    monkeypatch.setattr(plans, "_code_digest", lambda: "0" * 12)
    timer2 = FakeTimer(hybrid=2e-3, fused=1e-3)
    assert _choose(_chooser(tmp_path, timer2)) == "fused" and sorted(timer2.timed) == ["fused", "hybrid"]


def test_m_bucket_and_shape_are_part_of_the_key(tmp_path):
    timer = FakeTimer(hybrid=1e-3, fused=2e-3)
    chooser = _chooser(tmp_path, timer)
    _choose(chooser, M=37)
    _choose(chooser, M=40)  # same power-of-two bucket (64)
    assert len(timer.timed) == 2
    _choose(chooser, M=70)  # bucket 128
    _choose(chooser, N=21)
    assert len(timer.timed) == 6


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLORA_TRITON_PIN", raising=False)
    path = tmp_path / "plans.json"
    for junk in ("{not json", json.dumps({"version": 1, "decisions": {"k": {"plan": "warp-drive"}}}), "[]"):
        path.write_text(junk)
        timer = FakeTimer(hybrid=2e-3, fused=1e-3)
        chooser = _chooser(tmp_path, timer)
        with pytest.warns(RuntimeWarning, match="ignoring the plan cache"):
            assert _choose(chooser) == "fused"
        data = json.loads(path.read_text())
        assert data["version"] == 1 and [d["plan"] for d in data["decisions"].values()] == ["fused"]


class _Raising:
    """A plan that fails to compile or launch."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def forward(self, *args):
        raise RuntimeError("out of resources: shared memory")


class _Wrong:
    """A plan whose forward is silently wrong (a skipped tile)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def forward(self, *args):
        y, z = self.real.forward(*args)
        y = y.clone()
        y[-1] += 1.0
        return y, z


@pytest.mark.parametrize("broken", [_Raising, _Wrong], ids=["raises", "disagrees"])
def test_first_use_check_drops_a_broken_plan(tmp_path, broken):
    """A plan that raises, or disagrees with the torch backend on the row slice, is dropped with
    one warning even when it would have been faster; the other plan runs."""
    fast_but_broken = broken(backends.load("triton"))
    timer = FakeTimer(hybrid=2e-3, fused=1e-6)
    chooser = _chooser(tmp_path, timer, overrides={"triton": fast_but_broken})
    with pytest.warns(RuntimeWarning, match="plan 'fused' dropped"):
        assert _choose(chooser) == "hybrid"
    assert timer.timed == ["hybrid"]
    row = chooser.table()[0]
    assert "fused" in row["dropped"] and "fused" not in row["times_ms"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per key, not one per call
        assert _choose(chooser) == "hybrid"


def test_first_use_check_with_every_plan_broken_falls_back_to_torch(tmp_path):
    timer = FakeTimer(hybrid=1e-3, fused=1e-3)
    overrides = {"triton": _Raising(backends.load("triton")), "hybrid": _Wrong(backends.load("hybrid"))}
    chooser = _chooser(tmp_path, timer, overrides=overrides)
    with pytest.warns(RuntimeWarning):
        assert _choose(chooser, p=0.1) == "torch"
    assert set(chooser.table()[0]["dropped"]) == {"hybrid", "fused"}


def test_first_use_check_passes_for_the_real_plans_with_quantized_bases(tmp_path):
    """The real plans agree with the torch backend (no plan dropped) on dense, NF4 and int8
    bases, with and without dropout."""
    timer = FakeTimer(hybrid=1e-3, fused=2e-3)
    chooser = _chooser(tmp_path, timer)
    x, W, b, A, B = _problem(K=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for weight, q in ((W, "dense"), (fastlora.quantize(W, "nf4"), "nf4"), (fastlora.quantize(W, "int8"), "int8")):
            for p in (0.0, 0.2):
                assert chooser.choose(x, weight, b, A, B, 0.5, p, "auto", q) == "hybrid"
    assert all(not r["dropped"] for r in chooser.table())


@pytest.mark.parametrize(
    "value,plan", [("hybrid", "hybrid"), ("fused", "fused"), ("triton", "fused"), ("torch", "torch")]
)
def test_env_pins_the_plan(tmp_path, monkeypatch, value, plan):
    monkeypatch.setenv(plans.PLAN_ENV, value)
    timer = FakeTimer(hybrid=1.0, fused=1.0)
    assert _choose(_chooser(tmp_path, timer)) == plan and timer.timed == []


def test_env_rejects_an_unknown_plan(monkeypatch):
    monkeypatch.setenv(plans.PLAN_ENV, "warp")
    with pytest.raises(ValueError, match="FASTLORA_PLAN"):
        plans.pinned_plan()


def test_cache_dir_env_moves_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(plans.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert plans.cache_path() == tmp_path / "elsewhere" / "plans.json"
    chooser = plans.Chooser(timer=FakeTimer(hybrid=1, fused=1))
    assert chooser.path() == tmp_path / "elsewhere" / "plans.json"


def test_unwritable_cache_keeps_decisions_in_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLORA_TRITON_PIN", raising=False)  # else nothing is written at all
    blocker = tmp_path / "file"
    blocker.write_text("")
    timer = FakeTimer(hybrid=1e-3, fused=2e-3)
    chooser = _chooser(blocker, timer)  # its parent "directory" is a file
    with pytest.warns(RuntimeWarning, match="could not write the plan cache"):
        assert _choose(chooser) == "hybrid"
    assert _choose(chooser) == "hybrid" and len(timer.timed) == 2


def test_auto_resolves_to_the_plan_chooser_on_cuda_only():
    from fastlora import functional

    assert functional._resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    if torch.cuda.is_available():
        assert functional._resolve("auto", torch.device("cuda"), torch.bfloat16) == "plans"
        assert functional._resolve("auto", torch.device("cuda"), torch.float64) == "torch"
    assert fastlora.plan_table() == plans.CHOOSER.table()


def test_choosing_under_torch_compile_never_breaks_the_graph(tmp_path):
    """While tracing, nothing is read from disk or timed: a decision made eagerly is used, else
    the default plan (the cold-cache file read was a graph break)."""
    import torch._dynamo

    timer = FakeTimer(hybrid=2e-3, fused=1e-3)
    chooser = _chooser(tmp_path, timer)
    x, W, b, A, B = _problem()

    def f(x):
        plan = chooser.choose(x, W, b, A, B, 0.5, 0.0, "auto", "dense")
        return x * (2.0 if plan == "fused" else 3.0)

    explain = torch._dynamo.explain(f)(x)
    assert explain.graph_break_count == 0, [str(r.reason)[:200] for r in explain.break_reasons]
    assert timer.timed == [] and not (tmp_path / "plans.json").exists()
    torch._dynamo.reset()
    assert _choose(chooser) == "fused"  # decided eagerly, then used by the next trace
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), 2.0 * x)


def test_first_use_check_exercises_the_rank_r_path_when_B_is_zero(tmp_path):
    """PEFT initialises B to zero, which makes the whole rank-r path zero on the first step: the
    check uses its own random factors, so a plan that drops the LoRA branch is still caught."""

    class NoLoRA(_Wrong):
        def forward(self, x, W, bias, A, B, scale, p, seed):
            return self.real.forward(x, W, bias, A, torch.zeros_like(B), scale, p, seed)

    timer = FakeTimer(hybrid=2e-3, fused=1e-6)
    chooser = _chooser(tmp_path, timer, overrides={"triton": NoLoRA(backends.load("triton"))})
    x, W, b, A, B = _problem()
    with pytest.warns(RuntimeWarning, match="plan 'fused' dropped"):
        assert chooser.choose(x, W, b, A, torch.zeros_like(B), 0.5, 0.0, "auto", "dense") == "hybrid"


def test_every_plan_dropped_is_not_kept_on_disk(tmp_path):
    timer = FakeTimer(hybrid=1e-3, fused=1e-3)
    overrides = {"triton": _Raising(backends.load("triton")), "hybrid": _Raising(backends.load("hybrid"))}
    chooser = _chooser(tmp_path, timer, overrides=overrides)
    with pytest.warns(RuntimeWarning):
        assert _choose(chooser) == "torch"
    assert not (tmp_path / "plans.json").exists()  # a later process measures again


def test_out_of_memory_while_measuring_drops_nothing(tmp_path):
    class OOM(_Raising):
        def forward(self, *args):
            raise torch.OutOfMemoryError("CUDA out of memory")

    timer = FakeTimer(hybrid=1e-3, fused=1e-3)
    chooser = _chooser(tmp_path, timer, overrides={"triton": OOM(backends.load("triton"))})
    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert _choose(chooser) == plans.DEFAULT
    assert chooser.table() == [] and not (tmp_path / "plans.json").exists()


def test_plan_table_rows_are_plain_fields(tmp_path):
    timer = FakeTimer(hybrid=1e-3, fused=2e-3)
    chooser = _chooser(tmp_path, timer)
    x, W, b, A, B = _problem(K=64)
    chooser.choose(x, fastlora.quantize(W, "nf4", blocksize=128), b, A, B, 0.5, 0.1, "auto", "nf4-dq-b128")
    (row,) = chooser.table()
    want = dict(dtype="float32", N=20, K=64, r=4, M_bucket=64, dropout=True, quant="nf4", double_quant=True)
    assert {k: row[k] for k in want} == want
    assert row["blocksize"] == 128 and row["route"] == "auto" and row["bias"] is True and row["plan"] == "hybrid"


def test_first_use_timings_with_pinned_configs_stay_in_memory(tmp_path, monkeypatch):
    """Untuned timings (FASTLORA_TRITON_PIN, what the compiled tests run) decide for this
    process only: a later, tuned process measures again."""
    monkeypatch.setenv("FASTLORA_TRITON_PIN", "1")
    timer = FakeTimer(hybrid=1e-3, fused=2e-3)
    chooser = _chooser(tmp_path, timer)
    assert _choose(chooser) == "hybrid" and len(chooser.table()) == 1
    assert not (tmp_path / "plans.json").exists()
