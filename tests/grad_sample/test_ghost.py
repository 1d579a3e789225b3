"""Ghost norms, cross terms of tied weights, LoRA layers, fused layers and raw sums, each
against materialized per-sample gradients and the explicit per-example loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dptrain.clipping import clip_and_sum
from dptrain.engine import PrivacyEngine
from dptrain.grad_sample import GradCapture, Outer
from dptrain.grad_sample.outer import (
    _gram_dot,
    bound,
    inner,
    norm_sq,
    norm_sq_and_bound,
    prefer_ghost,
)
from dptrain.losses import causal_lm_loss
from dptrain.policies import StaticPolicy
from tests._support import (
    assert_close_rel,
    lm_batch,
    loop_per_sample_grads,
    per_sample_grads,
    seeded_noise,
    tiny_gpt2,
    tiny_llama,
)


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Exactness checks in float64, restored afterwards (a process-wide default must not leak
    into other test modules, e.g. the resume-equals-uninterrupted comparison)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


dims = st.integers(1, 5)


def _factor(kind: str, b: int, t: int, m: int, n: int, g: torch.Generator) -> Outer:
    if kind == "index":
        return Outer(torch.randint(0, m, (b, t), generator=g), torch.randn(b, t, n, generator=g), m)
    if kind == "vector":
        return Outer(torch.randn(b, t, m, generator=g), None, m)
    return Outer(torch.randn(b, t, m, generator=g), torch.randn(b, t, n, generator=g), m)


@settings(max_examples=40, deadline=None)
@given(dims, dims, dims, dims, dims, st.sampled_from(["dense", "index", "vector"]), st.data())
def test_outer_algebra_matches_materialized(b, t1, t2, m, n, kind, data):
    """inner products (incl. index x dense cross terms), norms and weighted sums from factors."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    f = _factor(kind, b, t1, m, n, g)
    other = "vector" if kind == "vector" else data.draw(st.sampled_from(["dense", "index"]))
    h = _factor(other, b, t2, m, n, g)
    mf, mh = f.materialize(), h.materialize()
    if kind == "index":  # one-hot rows: scatter equals the explicit sum of outer products
        onehot = nn.functional.one_hot(f.left, m).to(f.right.dtype)
        assert_close_rel(mf, torch.einsum("btm,btn->bmn", onehot, f.right), what="scatter")
    assert_close_rel(inner(f, h), (mf * mh).flatten(1).sum(1).float(), what="inner")
    both = mf + mh
    assert_close_rel(norm_sq([f, h]), both.flatten(1).pow(2).sum(1).float(), what="norm_sq")
    coef = torch.rand(b, generator=g)
    assert_close_rel(f.weighted_sum(coef), torch.einsum("b,b...->...", coef, mf), what="sum")
    keep = torch.rand(b, generator=g) > 0.5
    kept = f.keep(keep).materialize()
    assert_close_rel(kept, mf * keep.view(-1, *[1] * (mf.dim() - 1)), what="keep")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kinds", [["dense"], ["index", "dense"], ["vector"], ["dense", "dense"]])
@pytest.mark.parametrize("t", [1, 7])
def test_norm_and_bound_in_one_pass(kinds, t, dtype):
    """The clipping's one pass (bound read off the Gram diagonals) gives norm_sq bit for bit
    and the bound ``sum_t ||L_bt|| ||R_bt||`` to float32 rounding, for a tied pair too."""
    g = torch.Generator().manual_seed(3)
    fs = [_factor(k, 4, t, 6, 5, g) for k in kinds]
    cast = lambda x: x if x is None or not x.is_floating_point() else x.to(dtype)  # noqa: E731
    fs = [Outer(cast(f.left), cast(f.right), f.m) for f in fs]
    n2, s = norm_sq_and_bound(fs)
    assert torch.equal(n2, norm_sq(fs))
    assert_close_rel(s, sum(bound(f) for f in fs), what="bound", rtol=1e-5)
    materialized = sum(f.materialize() for f in fs).flatten(1).double()
    assert bool((materialized.norm(dim=1) <= s * (1 + 1e-5)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_dot_in_place_product_is_the_two_cast_product(dtype):
    """The Gram sum multiplies into one float64 copy: bit for bit the product of two float64
    casts (float32 products are exact in float64), transposed Gram matrices too, and neither
    Gram matrix is changed (a float64 one is not the copy)."""
    g = torch.Generator().manual_seed(5)
    left = (1e3 * torch.randn(3, 9, 9, generator=g)).to(dtype)
    right = torch.randn(3, 9, 9, generator=g).to(dtype)
    keep_l, keep_r = left.clone(), right.clone()
    for a, b in [(left, right), (left.transpose(1, 2), right), (left, right.transpose(1, 2))]:
        want = (a.to(torch.float64) * b.to(torch.float64)).sum((1, 2))
        got = _gram_dot(a, b)
        assert torch.equal(got.view(torch.int64), want.view(torch.int64))
    assert torch.equal(left, keep_l) and torch.equal(right, keep_r)


def test_cost_rule_is_the_t2_vs_mn_trade_off():
    lora_a = Outer(torch.zeros(4, 128, 8), torch.zeros(4, 128, 576), 8)  # r x d_in, long T
    wide = Outer(torch.zeros(4, 16, 1024), torch.zeros(4, 16, 1024), 1024)
    bias = Outer(torch.zeros(4, 16, 1024), None, 1024)
    assert not prefer_ghost([lora_a])  # T (m + n) > m n: materialize
    assert prefer_ghost([wide])  # T (m + n) < m n: ghost
    assert not prefer_ghost([bias])  # vectors are summed directly


class TiedLM(nn.Module):
    """Embedding and output layer sharing one weight (GPT-2 / Llama style), plus a layer used
    twice: every cross-term path (index x dense, index x index, dense x dense)."""

    def __init__(self, vocab: int, width: int, padding_idx: int | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.emb(ids.flip(1))  # the embedding used twice
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))  # a linear layer used twice
        return self.head(h)


def _seq_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, target = batch
    logits = model(ids)
    return nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


def _loop_clipped(model, loss, batch, clip):
    ref = loop_per_sample_grads(model, loss, batch)
    total = sum(g.flatten(1).pow(2).sum(1) for g in ref.values()).sqrt()
    c = (clip / (total + 1e-6)).clamp(max=1)
    return ref, total, {p: torch.einsum("b,b...->...", c, g) for p, g in ref.items()}


def _capture_uses(model, loss, batch, b):
    cap = GradCapture(model)
    cap.attach()
    recorded, losses = cap.run(loss, batch)
    assert losses.shape == (b,)
    return cap, recorded


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 4),  # batch, including 1
    st.integers(1, 6),  # sequence length
    st.integers(2, 9),  # vocab
    st.integers(1, 5),  # width
    st.sampled_from([None, 0]),
    st.sampled_from(["always", "auto", "never"]),
)
def test_tied_weights_and_repeated_layers_exact(b, t, vocab, width, pad, mode):
    torch.manual_seed(b * 100 + t)
    model = TiedLM(vocab, width, pad)
    batch = (torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t)))
    cap, uses = _capture_uses(model, _seq_loss, batch, b)
    assert all(p.grad is None for p in model.parameters())  # fused: no ordinary gradients
    ref, total, want = _loop_clipped(model, _seq_loss, batch, 0.3)
    group_of = dict.fromkeys(ref, "all")
    result = clip_and_sum(uses, group_of, {"all": 0.3}, ghost=mode, raw=True)
    if mode == "always":
        assert result.ghosted == len(ref)  # tied weight and repeated layer ghosted too
    assert_close_rel(result.norms["all"], total, what="norms")
    for p, w in want.items():
        assert_close_rel(result.sums[p], w, what=f"clipped {tuple(p.shape)}")
        assert_close_rel(result.raw[p], ref[p].sum(0), what=f"raw {tuple(p.shape)}")
    cap.detach()


@pytest.mark.parametrize("mode", ["always", "never"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_whole_models_in_every_ghost_mode(build, mode):
    """Tied wte/lm_head of real models: ghost with cross terms, or materialized, equals the loop."""
    model = build()
    batch = lm_batch(61, 3, 6, seed=7)
    cap, uses = _capture_uses(model, causal_lm_loss, batch, 3)
    ref, total, want = _loop_clipped(model, causal_lm_loss, batch, 0.05)
    result = clip_and_sum(uses, dict.fromkeys(ref, "all"), {"all": 0.05}, ghost=mode)
    assert_close_rel(result.norms["all"], total, what="norms")
    names = {p: n for n, p in model.named_parameters()}
    for p, w in want.items():
        assert_close_rel(result.sums[p], w, what=names[p])
    cap.detach()


def _lora(model, targets, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=3, target_modules=targets, lora_dropout=0.0, init_lora_weights=False, **kw)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _lora(tiny_llama(), ["q_proj", "v_proj"], lora_alpha=6),
        lambda: _lora(tiny_gpt2(), ["c_attn"]),  # Conv1D base (fan_in_fan_out)
        lambda: _lora(tiny_llama(), ["q_proj"], lora_bias=True),
        lambda: _lora(tiny_llama(), ["q_proj", "embed_tokens"]),  # peft lora.Embedding
    ],
    ids=["llama", "gpt2", "lora-bias", "embedding"],
)
def test_lora_layers(build):
    model = build()
    batch = lm_batch(61, 3, 7, seed=2)
    cap, uses = _capture_uses(model, causal_lm_loss, batch, 3)
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
    ref = loop_per_sample_grads(model, causal_lm_loss, batch)
    got = per_sample_grads(uses)
    assert set(got) == set(ref)
    for p, g in ref.items():
        assert_close_rel(got[p], g, what="per-sample")
    for mode in ("always", "never"):
        total = sum(g.flatten(1).pow(2).sum(1) for g in ref.values()).sqrt()
        result = clip_and_sum(uses, dict.fromkeys(ref, "all"), {"all": 0.01}, ghost=mode)
        assert_close_rel(result.norms["all"], total, what=f"norms ({mode})")
    cap.detach()


def test_lora_with_frozen_a_records_only_b():
    model = _lora(tiny_llama(), ["q_proj"])
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    batch = lm_batch(61, 2, 5, seed=3)
    cap, uses = _capture_uses(model, causal_lm_loss, batch, 2)
    assert uses.uses and all("lora_B" in u.name for u in uses.uses)
    ref = loop_per_sample_grads(model, causal_lm_loss, batch)
    got = per_sample_grads(uses)
    for p, g in ref.items():
        assert_close_rel(got[p], g, what="lora_B")
    cap.detach()


def test_detach_restores_modules():
    model = _lora(tiny_gpt2(), ["c_attn"])
    batch = lm_batch(61, 2, 5)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    cap = GradCapture(model)
    cap.attach()
    cap.run(causal_lm_loss, batch)
    cap.detach()
    assert not any("forward" in m.__dict__ for m in model.modules())  # never replaced
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, before)


def test_in_place_change_of_a_recorded_input_is_an_error():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            out = self.b(h)
            h.mul_(2)  # corrupts b's recorded input
            return out

    model = InPlace()
    cap = GradCapture(model)
    cap.attach()
    with pytest.raises(RuntimeError, match="modified in place"):
        cap.run(lambda m, x: m(x).sum(1), torch.randn(2, 3))


class RawSumPolicy(StaticPolicy):
    """Static DP-SGD that also reads the raw (unclipped) sums, as error feedback does."""

    needs_raw_sums = True

    def release(self, sums, plan, noise):
        self.seen_raw = {p: r.clone() for p, r in sums.raw.items()}
        return super().release(sums, plan, noise)


@pytest.mark.parametrize("chunk", [None, 2])
def test_engine_gives_raw_sums_to_policies_that_need_them(chunk):
    """Fused layers never fill p.grad: raw sums come from the rules, over finite samples."""
    model = _lora(tiny_llama(), ["q_proj", "v_proj"])
    batch = lm_batch(61, 5, 6, seed=9)
    ref = loop_per_sample_grads(model, causal_lm_loss, batch)
    policy = RawSumPolicy(clip=0.01, noise_multiplier=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(params, lr=0.0),
        policy=policy,
        sample_rate=1.0,
        dataset_size=5,
        max_physical_batch_size=chunk,
    )
    engine.step(batch)
    assert set(policy.seen_raw) == set(ref)
    for p, g in ref.items():
        assert_close_rel(policy.seen_raw[p], g.sum(0), what="raw sum")


def test_ghost_mode_is_validated():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="ghost must be"):
        PrivacyEngine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            policy=StaticPolicy(noise_multiplier=1.0),
            sample_rate=0.1,
            dataset_size=10,
            ghost="sometimes",
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["auto", "always"])
def test_cuda_matches_the_loop(mode):
    """The same exactness on a GPU (fused layers, ghost norms, cross terms, device noise)."""
    for build in (tiny_gpt2, lambda: _lora(tiny_llama(), ["q_proj", "v_proj"])):
        model = build().cuda()
        batch = {k: v.cuda() for k, v in lm_batch(61, 3, 6, seed=5).items()}
        cap, uses = _capture_uses(model, causal_lm_loss, batch, 3)
        ref, total, want = _loop_clipped(model, causal_lm_loss, batch, 0.05)
        result = clip_and_sum(uses, dict.fromkeys(ref, "all"), {"all": 0.05}, ghost=mode)
        assert_close_rel(result.norms["all"], total, what="norms")
        for p, w in want.items():
            assert_close_rel(result.sums[p], w, what="clipped")
        cap.detach()
    a, b = seeded_noise(3), seeded_noise(3)
    like = torch.zeros(1000, device="cuda")
    x = a(like, 1.0)
    assert x.device.type == "cuda" and torch.equal(x.cpu(), b(like.cpu(), 1.0))  # one stream
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(like, 1.0), b(like, 1.0))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_bounded_norm_scratch_changes_no_value(build, monkeypatch):
    """Materialized norms reduced a few rows at a time (float64 scratch bounded by NORM_CHUNK)
    and tied uses summed in place give exactly the values of the one-call reduction."""
    import dptrain.clipping as clipping

    t = torch.randn(5, 3, 7, dtype=torch.float32)
    whole = torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float64).pow(2)
    for chunk in (1, 21, 22, 63, 10**9):
        assert torch.equal(clipping._sq(t, chunk), whole)
    model = build()
    batch = lm_batch(61, 3, 6, seed=7)
    results = []
    for chunk in (clipping.NORM_CHUNK, 5):  # 5 elements: one row per reduction
        monkeypatch.setattr(clipping, "NORM_CHUNK", chunk)
        cap, uses = _capture_uses(model, causal_lm_loss, batch, 3)
        results.append(
            clip_and_sum(
                uses, dict.fromkeys(cap.params.values(), "all"), {"all": 0.05}, ghost="never"
            )
        )
        cap.detach()
    a, b = results
    assert torch.equal(a.norms["all"], b.norms["all"])
    assert all(torch.equal(a.sums[p], b.sums[p]) for p in a.sums)
