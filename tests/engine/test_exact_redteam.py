"""Red-team cases, round 3 (``builders_redteam``), each with the clip binding (half the median
per-sample norm) and with a clip so large that clipping is the identity: a per-sample gradient
given to the wrong sample sums to the right update and shows only when clipping binds."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from dptrain import UnsupportedLayerError
from dptrain.check import EngineProbe, ExactnessCheck, compare
from dptrain.engine import keyed_rng

from .builders import lm_batch
from .builders_redteam import (
    DROPOUT_CASES,
    HF_NEW,
    PEFT_NEW,
    REDTEAM_CASES,
    VARLEN_CASES,
    dropout_reference,
    hf_new_case,
    mixtral_aux_case,
    numpy_mask_reference,
    wav2vec2_masked,
)
from .harness import EXPECTED_BATCH_SIZE, REFUSE_CLIP

CLIPS = {"": "auto", " clip-identity": 1e6}


def _clips(case):
    return {"": "auto"} if case.refuse is not None else CLIPS


@pytest.mark.parametrize(
    "name,clip",
    [(n, c) for n, case in REDTEAM_CASES.items() for c in _clips(case)],
)
def test_redteam_layer(exact, name, clip):
    exact("red team (redteam)", name + clip, REDTEAM_CASES[name], clip=CLIPS[clip])


@pytest.mark.parametrize("name,clip", [(n, c) for n in PEFT_NEW for c in CLIPS])
def test_redteam_peft(exact, name, clip):
    exact("red team (redteam)", name + clip, PEFT_NEW[name], clip=CLIPS[clip])


@pytest.mark.parametrize("arch,clip", [(a, c) for a in HF_NEW for c in CLIPS])
def test_redteam_hf(exact, arch, clip):
    exact("red team (redteam)", arch + clip, hf_new_case(arch), clip=CLIPS[clip])


def test_redteam_moe_aux_loss_refused():
    """The router's load-balancing loss of the whole batch added to each sample's loss: the
    losses move by 8e-6 when a sample joins (within the value tolerance), the gradients by far
    more.  The refusal used to say that no sample's loss changes; it now names the term."""
    case = mixtral_aux_case()
    torch.manual_seed(0)
    check = ExactnessCheck(case.build(), case.loss, REFUSE_CLIP, "flat", EXPECTED_BATCH_SIZE)
    try:
        with pytest.raises(UnsupportedLayerError, match=r"within rounding.*aux_loss.*Fix"):
            check.engine_step(case.batch(3, 0))
    finally:
        check.close()


def test_redteam_nan_loss_is_not_called_random():
    """The yardstick's determinism check compared NaN losses with ``torch.equal`` and called a
    deterministic model with a NaN sample random (advising to turn dropout off)."""
    case = hf_new_case("mistral-window-2")
    batch = lm_batch(3, 0)  # right padding beyond the window of 2: a NaN row in eager attention
    with pytest.raises(ValueError, match=r"losses of samples \[1\] .* are NaN"):
        ExactnessCheck(case.build(), case.loss, 1.0).reference(batch)


def test_redteam_functional_max_norm_names_the_model():
    """``F.embedding(..., max_norm=1)`` in the root module's own forward: the refusal said
    "layer ''"; it names the model's class now."""
    case = REDTEAM_CASES["refuse-functional-embedding-max-norm"]
    check = ExactnessCheck(case.build(), case.loss, REFUSE_CLIP, "flat", EXPECTED_BATCH_SIZE)
    try:
        with pytest.raises(UnsupportedLayerError, match=r"layer '<model>' \(FunctionalMaxNorm\)"):
            check.engine_step(case.batch(3, 0))
    finally:
        check.close()


@pytest.mark.parametrize("clip", ["binding", "identity"])
@pytest.mark.parametrize("name", list(DROPOUT_CASES))
def test_redteam_dropout_replayed(name, clip):
    """Dropout in train mode (the yardstick refuses random models): the engine's step against
    the loop replaying the masks the step's generator state draws for the batch (the engine
    seeds torch's generators from its run key for each step, :func:`dptrain.engine.keyed_rng`).
    Exact: each sample's gradient is taken with the mask its own forward used (no re-run
    redraws one)."""
    case = DROPOUT_CASES[name]
    torch.manual_seed(0)
    model = case.build()
    batch = case.batch(3, 0)

    def run(c: float) -> tuple:
        clean = copy.deepcopy(model)  # before the engine's hooks (they cannot be copied)
        probe = EngineProbe(model, case.loss, c, "flat", EXPECTED_BATCH_SIZE)
        engine = probe.engine
        key = getattr(engine.noise, "key", None)

        @contextlib.contextmanager
        def seeding():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(5)  # the generator without a key
                with keyed_rng(key, engine.steps_taken, torch.device("cpu")):
                    yield

        ref, calls = dropout_reference(clean, case.loss, batch, seeding, c, EXPECTED_BATCH_SIZE)
        try:
            torch.manual_seed(5)
            got = probe.step(batch)
        finally:
            probe.close()
        return ref, calls, got

    c = 1e6
    if clip == "binding":
        free, _, _ = run(1e12)
        c = 0.5 * float(torch.cat(list(free.norms.values())).median())
    ref, calls, got = run(c)
    assert calls > 0
    cmp = compare(got.update, ref.update)
    assert cmp.ok(1e-5), cmp.summary()


def test_redteam_rnn_dropout_refusal_names_dropout():
    """``LSTM(num_layers=2, dropout=0.5)`` in train mode was refused as a layer that mixes
    samples (advising LayerNorm); the cause is its kernel's dropout masks."""
    case = REDTEAM_CASES["refuse-lstm-dropout-between-layers"]
    check = ExactnessCheck(case.build(), case.loss, REFUSE_CLIP, "flat", EXPECTED_BATCH_SIZE)
    try:
        with pytest.raises(UnsupportedLayerError, match=r"'rnn' \(LSTM\) applies dropout.*Fix"):
            check.engine_step(case.batch(3, 0))
    finally:
        check.close()


@pytest.mark.parametrize("clip", ["binding", "identity"])
def test_redteam_numpy_random_masks_replayed(clip):
    """wav2vec2's SpecAugment draws its time masks from NumPy: the probes drew different masks
    and refused the model as mixing samples (naming its feature projection). The probes now
    draw the same NumPy/Python numbers, restore the generators for the step, and re-run no
    module; the step (its NumPy stream keyed like torch's) is exact against the loop
    replaying the masks drawn from that stream."""
    import numpy as np

    from dptrain.noise import GaussianNoise
    from dptrain.secret import RunKey

    build, batch_fn, loss = wav2vec2_masked()
    key = RunKey.from_insecure_seed(7)  # a private step draws NumPy's numbers from its key
    word = int(key.prf("model-rng").at(0, np.array([0], dtype=np.uint64))[0, 0]) >> 1
    model, batch, seed = build(), batch_fn(3, 0), [word & 0xFFFFFFFF, word >> 32]
    if clip == "binding":
        free, _ = numpy_mask_reference(model, loss, batch, seed, 1e12, EXPECTED_BATCH_SIZE)
        c = 0.5 * float(torch.cat(list(free.norms.values())).median())
    else:
        c = 1e6
    ref, calls = numpy_mask_reference(model, loss, batch, seed, c, EXPECTED_BATCH_SIZE)
    assert calls > 0
    probe = EngineProbe(model, loss, c, "flat", EXPECTED_BATCH_SIZE, noise=GaussianNoise(key))
    try:
        np.random.seed(0)  # the user's own seed has no say in the step's masks
        got = probe.step(batch)
    finally:
        probe.close()
    cmp = compare(got.update, ref.update)
    assert cmp.ok(1e-5), cmp.summary()


@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_redteam_varlen_rows(exact, name):
    """Rows gathered without padding (``lin(h[mask])``) were silently wrong (4.9e-02): the rows
    path took an (N, d) input for sample-major blocks whenever N % B == 0 and the B + 1
    probe's rows extended the B probe's, which a gather meets when sample 0 holds the mean
    count, and a plan made on a batch without padding was reused on a ragged one.  Rows per
    sample must now equal a size of the batch's own tensors (T of input_ids) in the probes and
    at every step: the ragged gather is differentiated directly, exact."""
    case, kwargs = VARLEN_CASES[name]
    exact("red team (redteam)", name, case, **kwargs)


@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_redteam_varlen_rows_unclipped(exact, name):
    """The same models with clipping the identity: exact (the per-sample split is wrong, the
    sum is not)."""
    case, kwargs = VARLEN_CASES[name]
    exact("red team (redteam)", f"{name} clip-identity", case, clip=1e6, **kwargs)


def test_redteam_spectral_norm_train_refusal_fits():
    """Spectral norm in train mode was refused as a norm layer's running statistics of the
    data (fix: GroupNorm or LayerNorm); its buffers follow the weight, and eval mode is the fix."""
    case = REDTEAM_CASES["refuse-spectral-norm-train"]
    check = ExactnessCheck(case.build(), case.loss, REFUSE_CLIP, "flat", EXPECTED_BATCH_SIZE)
    try:
        with pytest.raises(UnsupportedLayerError, match=r"power iteration.*Fix: put the spectral"):
            check.engine_step(case.batch(3, 0))
    finally:
        check.close()
