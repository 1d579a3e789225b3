"""Float32 ghost norms with a certified error (``outer.norm_sq_and_error32``): the bound holds
against float64 references on random, tied and crafted cancelling factors; the clip built on
it never lets a sample above C and over-clips by at most ``FLOAT32_SLACK / 2``; loose or
overflowing samples and non-IEEE float32 matmuls fall back to the float64 Grams."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dptrain.clipping import clip_and_sum
from dptrain.grad_sample import GradCapture, Outer, Recorded
from dptrain.grad_sample import outer as O

from . import test_clip_bound
from .test_clip_bound import SLACK, _cancelling_loss, _clipped_norm, _crafted


@pytest.fixture
def float32_everywhere(monkeypatch):
    """Every ghosted parameter tries float32 Grams, however small (a public length bound for
    every ``clip_and_sum`` call that passes none)."""
    monkeypatch.setattr(O, "FLOAT32_GRAM_COST", 0)
    bounded = functools.partial(clip_and_sum, max_length=1 << 16)
    monkeypatch.setattr(test_clip_bound, "clip_and_sum", bounded)
    monkeypatch.setitem(globals(), "clip_and_sum", bounded)


def _exact(fs: list[Outer]) -> torch.Tensor:
    """||sum_i G_i||^2 per sample from float64 copies of the factors (products exact)."""

    def wide(f: Outer) -> Outer:
        left = f.left if not f.left.is_floating_point() else f.left.double()
        return Outer(left, None if f.right is None else f.right.double(), f.m)

    return sum(wide(f).materialize() for f in fs).flatten(1).pow(2).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_float32_error_bound_holds(dtype):
    """|n2 - ||G||^2| <= err on dense, tied (index and dense uses, cross terms) and crafted
    cancelling factors, and S bounds sum_t ||L_t|| ||R_t||; the bound is not vacuous (err /
    n2 well below 1 for random factors)."""
    worst = 0.0
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, g=g, scale=10.0**seed):
            return (torch.randn(*shape, generator=g) * scale).to(dtype)

        cases = [
            [Outer(rnd(3, 9, 300), rnd(3, 9, 40), 300)],
            [
                Outer(torch.randint(0, 300, (3, 6), generator=g), rnd(3, 6, 40), 300),
                Outer(rnd(3, 6, 300), rnd(3, 6, 40), 300),
            ],
        ]
        for fs in cases:
            n2, err, s = O.norm_sq_and_error32(fs)
            exact = _exact(fs)
            assert bool(((n2 - exact).abs() <= err).all())
            assert bool((s >= sum(O.bound(f) for f in fs) * (1 - 1e-12)).all())
            worst = max(worst, float((err / n2).max()))
    assert worst < 0.05
    for d, ratio in [(64, 4.0), (768, 16.0), (768, 50.0), (8192, 200.0)]:
        x, r, true, _ = _crafted(d, ratio, dtype, seed=d)
        f = Outer(r, x, d)  # G = sum_t r_t x_t^T
        n2, err, _ = O.norm_sq_and_error32([f])
        assert abs(float(n2[0]) - true**2) <= float(err[0]), (d, ratio)


def _worst_case_gram(x: torch.Tensor, y: torch.Tensor):
    """A float32 Gram as bad as the rounding of normal numbers allows: every entry ``x_t . y_s``
    lowered by ``gamma_w ||x_t|| ||y_s||`` (computed exactly in float64)."""
    if O.is_index(x) or O.is_index(y):
        return O.gram(x, y), (0.0, 0.0, 0.0)
    w = x.shape[-1]
    gamma = w * 2.0**-24 / (1 - w * 2.0**-24)
    xd, yd = x.double(), y.double()
    exact = torch.bmm(xd, yd.transpose(1, 2))
    drop = gamma * xd.norm(dim=-1).unsqueeze(2) * yd.norm(dim=-1).unsqueeze(1)
    return exact - drop, (gamma, 0.0, 0.0)


@pytest.mark.parametrize("shrink", [1.0, 0.5])
def test_the_bound_is_tight_against_the_worst_rounding(monkeypatch, shrink):
    """Correlated tokens (every Gram entry positive) and Grams lowered by the most float32
    rounding may take: the computed norm falls by nearly ``err`` (the bound is not loose by
    more than 2x), and a bound half as large would not cover it."""
    monkeypatch.setattr(O, "_gram32", _worst_case_gram)
    g = torch.Generator().manual_seed(0)
    base_l, base_r = torch.randn(1, 1, 500, generator=g), torch.randn(1, 1, 300, generator=g)
    left = base_l + 0.3 * torch.randn(4, 32, 500, generator=g)
    right = base_r + 0.3 * torch.randn(4, 32, 300, generator=g)
    ids = torch.randint(0, 500, (4, 32), generator=g)
    for fs in ([Outer(left, right, 500)], [Outer(ids, right, 500), Outer(left, right, 500)]):
        n2, err, _ = O.norm_sq_and_error32(fs)
        drop = _exact(fs) - n2
        if shrink == 1.0:
            assert bool((drop <= err).all())
            assert bool((drop >= 0.5 * err).all())
        else:
            assert bool((drop > shrink * err).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ratio", [4.0, 16.0, 50.0])
@pytest.mark.parametrize("d", [64, 768])
def test_crafted_samples_stay_within_the_clip_in_float32(float32_everywhere, d, ratio, dtype):
    """A crafted cancelling sample (whose float32 Gram norm came out too small before the
    float64 Grams): contribution <= C (1 + 1e-6), and clipped at most FLOAT32_SLACK / 2 harder
    than min(||G||, C) (loose ones are redone in float64 and clipped exactly)."""
    x, r, true, _ = _crafted(d, ratio, dtype, seed=d + int(ratio))
    model = nn.Linear(d, d, bias=False).to(dtype)
    clip = 0.5 * true
    got, _ = _clipped_norm(model, (x, r), clip, "always")
    assert got <= clip * (1 + SLACK)
    assert got >= clip * (1 - O.FLOAT32_SLACK / 2 - 1e-4)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (
        F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)
    )


class _TinyLM(nn.Module):
    """A tied embedding and output layer around one MLP block: ghost norms with cross terms."""

    def __init__(self, vocab: int = 300, width: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


def _clip(model: nn.Module, batch, clip: float, ghost: str = "always"):
    cap = GradCapture(model)
    cap.attach()
    try:
        recorded, _ = cap.run(_loss, batch)
        group_of = dict.fromkeys(model.parameters(), "all")
        return clip_and_sum(recorded, group_of, {"all": clip}, ghost=ghost)
    finally:
        cap.detach()


def _per_example(model: nn.Module, batch) -> torch.Tensor:
    """Every sample's gradient (all parameters, flattened), by an explicit loop."""
    x, y = batch
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        _loss(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.zero_grad()
    return torch.stack(rows)


def test_tied_model_norms_are_certified_and_tight(float32_everywhere):
    """Against the explicit per-example loop: the float32 path's norms are upper bounds within
    FLOAT32_SLACK / 2, and the clipped sum is sum_b coef(N_b) g_b for its own norms N_b."""
    torch.manual_seed(0)
    model = _TinyLM()
    batch = (torch.randint(0, 300, (6, 24)), torch.randint(0, 300, (6, 24)))
    grads = _per_example(model, batch)
    exact = grads.norm(dim=1)
    clip = float(exact.median())
    result = _clip(model, batch, clip)
    assert result.ghosted == 5 and result.nonfinite == 0  # weights (tied: cross terms), biases
    norms = result.norms["all"]
    assert bool((norms >= exact).all())
    assert bool((norms <= exact * (1 + O.FLOAT32_SLACK / 2)).all())
    coef = torch.clamp(clip / (norms + 1e-6), max=1.0)
    want = coef @ grads
    got = torch.cat([result.sums[p].flatten() for p in model.parameters()]).double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_loose_samples_fall_back_to_float64_whatever_their_neighbours(
    float32_everywhere, monkeypatch
):
    """A benign and a crafted cancelling sample: only the crafted one is redone in float64 (its
    norm then equals the float64 path's exactly), in either order, and each sample's norm is
    the same bits in both orders: a sample's path is its own, not its batch's."""
    d = 768
    x, r, _, _ = _crafted(d, 50.0, torch.float32, seed=1)
    g = torch.Generator().manual_seed(3)
    xb, rb = torch.randn(1, 4, d, generator=g), torch.randn(1, 4, d, generator=g)
    model = nn.Linear(d, d, bias=False)

    def run(batch):
        cap = GradCapture(model)
        cap.attach()
        try:
            recorded, _ = cap.run(_cancelling_loss, batch)
            return clip_and_sum(recorded, {model.weight: "all"}, {"all": 1.0}, ghost="always")
        finally:
            cap.detach()

    mixed = run((torch.cat([xb, x]), torch.cat([rb, r])))
    swapped = run((torch.cat([x, xb]), torch.cat([r, rb])))
    assert mixed.refined == 1 and swapped.refined == 1
    assert torch.equal(mixed.norms["all"], swapped.norms["all"].flip(0))
    monkeypatch.setattr(O, "FLOAT32_GRAM_COST", 1 << 62)
    reference = run((torch.cat([xb, x]), torch.cat([rb, r])))
    assert float(mixed.norms["all"][1]) == float(reference.norms["all"][1])
    assert float(mixed.norms["all"][0]) > float(reference.norms["all"][0])  # float32 bound


def test_a_float32_overflow_is_redone_in_float64(float32_everywhere):
    """A second sample with activations of 1e22: float32 Grams overflow, float64 ones do not; it
    is redone and clipped, not dropped as non-finite."""
    model = nn.Linear(16, 8, bias=False)
    x = torch.randn(2, 5, 16)
    x[1] = torch.full((5, 16), 1e22) * x[1].sign()
    r = torch.randn(2, 5, 8)
    cap = GradCapture(model)
    cap.attach()
    try:
        recorded, _ = cap.run(_cancelling_loss, (x, r))
        result = clip_and_sum(recorded, {model.weight: "all"}, {"all": 1.0}, ghost="always")
    finally:
        cap.detach()
    assert result.nonfinite == 0 and result.refined == 1
    assert float(result.norms["all"][1]) > 1e22
    assert float(result.sums[model.weight].double().norm()) <= 2.0 + SLACK


def test_reduced_precision_float32_matmuls_use_float64(float32_everywhere):
    """With bfloat16 passes allowed for float32 matmuls (``fp32_precision = "bf16"``), whose
    rounding the float32 bound does not cover, the Grams are float64."""
    f = [Outer(torch.randn(2, 8, 32), torch.randn(2, 8, 32), 32)]
    assert O.exact_float32_matmul(torch.device("cpu")) and O.float32_for_run(f, 8, always=False)
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert not O.exact_float32_matmul(torch.device("cpu")) and not O.float32_for_run(
            f, 8, always=False
        )
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    assert O.exact_float32_matmul(torch.device("cpu"))


def test_flushed_subnormals_are_covered(float32_everywhere):
    """Factors of 1e-30 (products below float32's normal range, flushed to zero with
    ``set_flush_denormal``): the bound still holds, from its absolute terms."""
    g = torch.Generator().manual_seed(5)
    fs = [Outer(torch.randn(2, 6, 40, generator=g) * 1e-30, torch.randn(2, 6, 30, generator=g), 40)]
    flush = torch.set_flush_denormal(True)
    try:
        n2, err, _ = O.norm_sq_and_error32(fs)
    finally:
        torch.set_flush_denormal(False)
    assert bool(((n2 - _exact(fs)).abs() <= err).all())
    assert flush or bool((err > 0).all())


def test_float64_factors_are_not_rounded_to_float32():
    """A float64 model's factors would lose bits in float32 Grams: they keep the float64 ones."""
    big = [Outer(torch.randn(1, 128, 256).double(), torch.randn(1, 128, 1024).double(), 256)]
    assert not O.float32_for_run(big, 128, always=False)


def test_small_layers_keep_float64_grams():
    """Below FLOAT32_GRAM_COST multiply-adds per sample at the public bound the Grams stay
    float64 (exact to 1e-9); a transformer block linear of width 256 over 128 tokens takes
    float32, decided by the bound, not by the batch's length (also at 16 tokens)."""
    small = [Outer(torch.randn(2, 16, 64), torch.randn(2, 16, 64), 64)]
    large = [Outer(torch.randn(1, 128, 256), torch.randn(1, 128, 1024), 256)]
    short = [Outer(torch.randn(1, 16, 256), torch.randn(1, 16, 1024), 256)]
    assert not O.float32_for_run(small, 16, always=False)
    assert O.float32_for_run(large, 128, always=False)
    assert O.float32_for_run(short, 128, always=False)
    assert not O.float32_for_run(short, 16, always=False)  # cheap at that bound
    empty = [Outer(torch.randn(0, 128, 256), torch.randn(0, 128, 1024), 256)]
    assert not O.float32_for_run(empty, 128, always=False)


def test_a_use_longer_than_the_bound_is_refused():
    """The decision rests on every use being at most max_length long: a longer one raises,
    naming the fix, rather than taking a path that the bound does not cover."""
    f = [Outer(torch.randn(1, 129, 256), torch.randn(1, 129, 1024), 256)]
    with pytest.raises(ValueError, match="max_length"):
        O.float32_for_run(f, 128, always=False)


@pytest.mark.parametrize("seed", range(40))
def test_chosen_at_the_bound_means_ghosted_at_every_shorter_length(seed, monkeypatch):
    """float32_for_run (auto) implies prefer_ghost for any use lengths up to the bound, for
    random use structures (1-3 uses, index and dense factors, widths 1 to 4096): the parameter
    never leaves the float32 path because a batch is shorter."""
    g = torch.Generator().manual_seed(seed)

    def rint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    m, n, bound = rint(1, 4096), rint(1, 4096), rint(1, 512)

    kinds = [rint(0, 3) == 0 for _ in range(rint(1, 4))]  # True: an index left factor

    def factors(lengths):
        out = []
        for index, length in zip(kinds, lengths, strict=True):
            left = torch.zeros(1, length, dtype=torch.long) if index else torch.zeros(1, length, m)
            out.append(Outer(left, torch.zeros(1, length, n), m))
        return out

    at_bound = factors([bound] * len(kinds))
    monkeypatch.setattr(O, "FLOAT32_GRAM_COST", 0)
    chosen = O.float32_for_run(at_bound, bound, always=False)
    if chosen:
        for _ in range(20):
            lengths = [rint(1, bound + 1) for _ in kinds]
            assert O.prefer_ghost(factors(lengths))


def test_the_engine_refuses_a_batch_longer_than_its_bound():
    """``PrivacyEngine(max_length=L)`` states a public bound; a batch of a ghosted wide layer
    over more than ``L`` positions raises before any update, naming the fix."""
    from dptrain import PrivacyEngine, StaticPolicy

    model = nn.Linear(256, 1024, bias=False)
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=StaticPolicy(clip=1.0, noise_multiplier=0.0),
        sample_rate=0.5,
        dataset_size=8,
        loss_fn=lambda m, batch: m(batch).pow(2).sum((1, 2)),
        ghost="always",
        max_length=16,
    )
    before = model.weight.detach().clone()
    engine.step(torch.randn(3, 16, 256))  # at the bound: fine
    assert not torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="max_length"):
        engine.step(torch.randn(3, 17, 256))
    with pytest.raises(ValueError, match="positive"):
        PrivacyEngine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            policy=StaticPolicy(clip=1.0, noise_multiplier=0.0),
            sample_rate=0.5,
            dataset_size=8,
            max_length=0,
        )


def test_a_samples_certified_norm_does_not_follow_its_padding():
    """One sample padded to 12 or to 180 positions (activations on the padding, zero output
    gradients, as a right-padded batch gives): with the bound stated at the public length, its
    n2 and err agree to rounding, so whether it is accepted in float32 does not follow the
    batch's padded length."""
    g = torch.Generator().manual_seed(11)
    x, r = torch.randn(1, 180, 256, generator=g), torch.randn(1, 180, 1024, generator=g)
    r[:, 12:] = 0
    short = [Outer(x[:, :12], r[:, :12], 256)]
    padded = [Outer(x, r, 256)]
    n2s, errs, _ = O.norm_sq_and_error32(short, 256)
    n2p, errp, _ = O.norm_sq_and_error32(padded, 256)
    assert float(((n2s - n2p) / n2s).abs()) < 1e-6  # float32 Grams: their own rounding
    assert float(((errs - errp) / errs).abs()) < 1e-6
    assert float(errs / n2s) < O.FLOAT32_SLACK


class _Repeated(nn.Module):
    """One Linear applied ``k`` times, ``k`` a public argument of the call: ``k`` uses of its
    weight (cross terms between them)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32, bias=False)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        for _ in range(k):
            x = self.lin(x)
        return x


def _repeated_engine(uses: list[int]):
    from dptrain import PrivacyEngine, StaticPolicy

    torch.manual_seed(0)
    model = _Repeated()
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=StaticPolicy(clip=1.0, noise_multiplier=0.0),
        sample_rate=0.5,
        dataset_size=8,
        loss_fn=lambda m, batch: m(batch, uses[0]).pow(2).sum((1, 2)),
        ghost="always",
        max_length=16,
    )
    return model, engine


def test_a_changed_use_structure_is_refused_on_the_float32_path(monkeypatch):
    """The float32 decision and its proof hold for the use structure it was made on: a
    weight used 2 times in the run's first batch and 3 times in a later one is refused
    (before any update or ledger entry), naming the parameter and both structures; the same
    structure at other lengths and batch sizes is unaffected."""
    from dptrain import clipping

    monkeypatch.setattr(O, "FLOAT32_GRAM_COST", 0)
    taken: list[int] = []
    real = clipping._certified32
    monkeypatch.setattr(
        clipping, "_certified32", lambda fs, n: taken.append(len(fs)) or real(fs, n)
    )
    uses = [2]
    model, engine = _repeated_engine(uses)
    for rows, length in [(3, 16), (2, 5), (4, 16)]:  # stable: float32 every step
        engine.step(torch.randn(rows, length, 32))
    assert taken == [2, 2, 2] and engine.ledger.total_steps == 3
    before = model.lin.weight.detach().clone()
    uses[0] = 3
    with pytest.raises(clipping.UseStructureChanged, match=r"lin\.weight.*3 uses.*2 uses"):
        engine.step(torch.randn(3, 16, 32))
    assert torch.equal(model.lin.weight, before) and engine.ledger.total_steps == 3
    uses[0] = 2  # back to the run's structure: fine again
    engine.step(torch.randn(3, 16, 32))
    assert taken == [2, 2, 2, 2] and engine.ledger.total_steps == 4


def test_the_guard_covers_a_path_change_either_way_and_skips_injected_samples(monkeypatch):
    """Refused as well: a parameter first seen on float64 (here materialized) whose later
    batch, with another structure, would take float32; and a float32 parameter whose later
    batch would be materialized.  Samples given as per-sample gradients (the engine's
    injected ones) have no uses to compare: they pass."""
    from dptrain import clipping

    monkeypatch.setattr(O, "FLOAT32_GRAM_COST", 0)
    model = _Repeated()
    group, clip = {model.lin.weight: "all"}, {"all": 1.0}

    def recorded(k):
        cap = GradCapture(model)
        cap.attach()
        try:
            x = torch.randn(2, 8, 32)
            return cap.run(lambda m, b: m(b, k).pow(2).sum((1, 2)), x)[0]
        finally:
            cap.detach()

    def clip_sum(rec, ghost, decided):
        return clip_and_sum(rec, group, clip, ghost=ghost, max_length=16, decided=decided)

    decided: dict = {}
    clip_sum(recorded(1), "never", decided)  # materialized: recorded, float32 not taken
    clip_sum(recorded(1), "always", decided)  # same structure: float32 is fine
    with pytest.raises(clipping.UseStructureChanged):
        clip_sum(recorded(2), "always", decided)
    decided = {}
    clip_sum(recorded(1), "never", decided)
    clip_sum(recorded(2), "never", decided)  # float64 both times: as before, no refusal
    with pytest.raises(clipping.UseStructureChanged):
        clip_sum(recorded(3), "always", decided)
    decided = {}
    clip_sum(recorded(2), "always", decided)
    with pytest.raises(clipping.UseStructureChanged, match="float32"):
        clip_sum(recorded(3), "never", decided)  # float32 before: no path change either
    injected = Recorded([], {model.lin.weight: torch.randn(3, 32, 32)}, 3)
    assert clip_sum(injected, "always", decided).sums[model.lin.weight].shape == (32, 32)
    # without a run's decisions each call decides alone (as before)
    clip_and_sum(recorded(3), group, clip, ghost="always", max_length=16)


def test_the_use_structure_is_cheap_and_ignores_lengths_and_batch():
    """What the guard compares: dtypes, widths and counts of the uses, not their lengths or
    the batch size; a few microseconds per parameter."""
    import timeit

    def fs(batch, length, k=2, dtype=torch.float32):
        return [
            Outer(torch.randn(batch, length, 64).to(dtype), torch.randn(batch, length, 32), 64)
        ] * k

    assert O.use_structure(fs(3, 16)) == O.use_structure(fs(1, 5))
    assert O.use_structure(fs(3, 16)) != O.use_structure(fs(3, 16, k=3))
    assert O.use_structure(fs(3, 16)) != O.use_structure(fs(3, 16, dtype=torch.bfloat16))
    index = [Outer(torch.zeros(2, 4, dtype=torch.long), torch.randn(2, 4, 32), 100)]
    assert O.use_structure(index)[1] == ((("index",), (torch.float32, 32), 100),)
    f, first = fs(3, 16), O.use_structure(fs(3, 16))
    seconds = min(timeit.repeat(lambda: O.use_structure(f) == first, number=1000, repeat=3)) / 1000
    assert seconds < 1e-4
