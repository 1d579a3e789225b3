"""DPTrainer: the Trainer's steps are the engine's, its ledger and budget hold, and every
setting that would break the guarantee is refused."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import dptrain
from accountants import Event, get_accountant
from dptrain.integrations import hf
from dptrain.integrations.hf import DPTrainer, DPTrainerError, PrivacyArguments
from dptrain.integrations.hf.data import record_ids
from dptrain.integrations.hf.trainer import PRIVACY_STATE
from dptrain.secret import RunKey
from tests._support import tiny_gpt2

VOCAB, N, WIDTH = 61, 40, 8


def _model(seed: int = 0) -> torch.nn.Module:
    return tiny_gpt2(VOCAB, layers=1, seed=seed)  # one block: the steps stay cheap


@pytest.fixture(scope="module")
def records() -> list[dict[str, torch.Tensor]]:
    """N right-padded LM records of 4..8 tokens (labels -100 on padding)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(N):
        ids = torch.randint(0, VOCAB, (WIDTH,), generator=g)
        mask = (torch.arange(WIDTH) < 4 + i % 5).long()
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


def _args(out: Path, **kw) -> TrainingArguments:
    base = dict(
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(str(out), **base)


PRIVACY = dict(epsilon=4.0, clip=1.0, insecure_seed=3)


@pytest.fixture(scope="module")
def run(records, tmp_path_factory) -> DPTrainer:
    """3 private steps: expected batch 8 = 4 x 2 accumulation steps (a virtual batch),
    checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("hf") / "run"
    trainer = DPTrainer(
        _model(), _args(out), train_dataset=records, privacy=PrivacyArguments(**PRIVACY)
    )
    trainer.train()
    return trainer


def test_ledger_has_every_planned_step_and_epsilon_is_logged(run) -> None:
    plan, engine = run.plan, run.engine
    assert plan.sample_rate == pytest.approx(8 / N) and plan.steps == 3
    assert engine.ledger.total_steps == 3 == run.state.global_step
    for e in engine.ledger.events:  # consecutive equal steps are one event with a count
        assert (e.sample_rate, e.noise_multiplier) == (plan.sample_rate, plan.noise_multiplier)
    assert engine.max_physical_batch_size == 4  # per_device_train_batch_size is the chunk
    rdp = get_accountant("rdp")
    steps = [h for h in run.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    for h in steps:
        want = rdp.epsilon([Event(plan.sample_rate, plan.noise_multiplier, h["step"])], plan.delta)
        assert h["epsilon"] == pytest.approx(want, rel=1e-9)
    assert steps[-1]["epsilon"] <= 4.0
    out = Path(run.args.output_dir)
    report = json.loads((out / "privacy.json").read_text())
    assert report["steps"] == 3 and report["epsilon"] == pytest.approx(run.epsilon())
    assert "INSECURE" in report["randomness"]
    # no split of train_dataset: the file-level guarantee is the record-level one
    level = report["file_level"]
    assert (level["epsilon"], level["delta"]) == (report["epsilon"], report["delta_total"])
    assert level["validation_probability"] == 0.0 and "validation split" not in level["why"]
    assert (out / "checkpoint-2" / PRIVACY_STATE).exists()
    assert dptrain.Ledger.load(out / "ledger.json").total_steps == 3


def test_update_equals_a_direct_engine_step_for_the_same_key(run, records) -> None:
    """The same key, model, optimizer and Poisson batches through PrivacyEngine directly."""
    plan = run.plan
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    key = RunKey.from_insecure_seed(3)
    engine = dptrain.PrivacyEngine(
        model,
        opt,
        policy=dptrain.StaticPolicy(clip=1.0, noise_multiplier=plan.noise_multiplier),
        sample_rate=plan.sample_rate,
        dataset_size=N,
        loss_fn=hf.causal_lm_loss(),  # what DPTrainer picks for a causal LM
        max_physical_batch_size=4,
        noise=dptrain.GaussianNoise(key),
    )
    sampler = dptrain.PoissonSampler(record_ids(records), plan.sample_rate, key)
    for t in range(3):
        idx = sampler.sample(t).tolist()
        engine.step(default_data_collator([records[i] for i in idx]) if idx else None)
    got = dict(run.model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name].detach(), p.detach(), rtol=1e-10, atol=1e-12)
    assert engine.ledger.to_dict() == run.engine.ledger.to_dict()


def test_resume_from_a_checkpoint_continues_the_same_run(run, records, tmp_path) -> None:
    ckpt = Path(run.args.output_dir) / "checkpoint-2"
    again = DPTrainer(
        _model(seed=5),
        _args(tmp_path),
        train_dataset=records,
        privacy=PrivacyArguments(**PRIVACY),
    )
    again.train(resume_from_checkpoint=str(ckpt))
    assert again.engine.ledger.to_dict() == run.engine.ledger.to_dict()
    got = dict(again.model.named_parameters())
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(got[name].detach(), p.detach(), rtol=1e-10, atol=1e-12)


def test_lora_trains_only_the_adapter_and_evaluates(records, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _model(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(
        tmp_path, max_steps=1, gradient_accumulation_steps=1, per_device_train_batch_size=6
    )
    trainer = DPTrainer(
        model,
        args,
        train_dataset=records,
        eval_dataset=records[:6],
        privacy=PrivacyArguments(**PRIVACY),
    )
    trainer.train()
    assert trainer.engine.ledger.total_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["epsilon"] == trainer.epsilon()


def test_training_stops_cleanly_at_the_budget(records, tmp_path) -> None:
    q, sigma, delta = 6 / N, 0.8, 1e-3
    eps2 = get_accountant("rdp").epsilon([Event(q, sigma, 2)], delta)  # 2 of the 10 steps fit
    args = _args(
        tmp_path, max_steps=10, gradient_accumulation_steps=1, per_device_train_batch_size=6
    )
    privacy = PrivacyArguments(
        epsilon=eps2 * 1.0001, delta=delta, noise_multiplier=sigma, clip=1.0, insecure_seed=1
    )
    trainer = DPTrainer(_model(), args, train_dataset=records, privacy=privacy)
    trainer.train()
    assert trainer.engine.ledger.total_steps == 2 == trainer.state.global_step
    assert trainer.epsilon() <= privacy.epsilon
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert "budget" in report["stopped_by_budget"] and report["steps"] == 2
    assert (tmp_path / "checkpoint-2" / PRIVACY_STATE).exists()  # the last model is kept


def test_a_budget_too_small_for_one_step_is_refused_before_training(records, tmp_path) -> None:
    privacy = PrivacyArguments(epsilon=0.01, delta=1e-3, noise_multiplier=0.5, clip=1.0)
    trainer = DPTrainer(_model(), _args(tmp_path), train_dataset=records, privacy=privacy)
    with pytest.raises(dptrain.errors.RecipeError, match=r"privacy\.epsilon"):
        trainer.train()
    assert not (tmp_path / "ledger.json").exists()


@pytest.mark.parametrize(
    ("setting", "name"),
    [
        (dict(train_sampling_strategy="group_by_length"), "train_sampling_strategy"),
        (dict(train_sampling_strategy="sequential"), "train_sampling_strategy"),
        (dict(dataloader_drop_last=True), "dataloader_drop_last"),
        (dict(fp16=True), "fp16"),
        (dict(max_grad_norm=2.0), "max_grad_norm"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),  # with a custom loss_fn
        (dict(neftune_noise_alpha=5.0), "neftune_noise_alpha"),
        (dict(auto_find_batch_size=True), "auto_find_batch_size"),
        (dict(load_best_model_at_end=True, eval_strategy="steps"), "load_best_model_at_end"),
        (dict(ignore_data_skip=True), "ignore_data_skip"),
        (dict(torch_compile=True), "torch_compile"),
        (dict(optim="lomo"), "optim"),
    ],
)
def test_settings_that_break_the_guarantee_are_refused(records, tmp_path, setting, name) -> None:
    args = _args(tmp_path, **setting)
    with pytest.raises(DPTrainerError, match=rf"- {name}: .*Fix"):
        DPTrainer(
            _model(),
            args,
            train_dataset=records,
            eval_dataset=records[:4],
            privacy=PrivacyArguments(**PRIVACY),
            loss_fn=dptrain.causal_lm_loss,
        )


def test_sharded_and_distributed_settings_are_refused(records, tmp_path) -> None:
    """DeepSpeed, FSDP and several processes need their launchers; the refusal is checked
    on the arguments (set after construction, as a launcher would)."""
    from dptrain.integrations.hf.arguments import refusals

    args = _args(tmp_path)
    for attr, value, name in [
        ("deepspeed", "ds.json", "deepspeed"),
        ("fsdp", ["full_shard"], "fsdp"),
        ("push_to_hub", True, "push_to_hub"),
    ]:
        old = getattr(args, attr)
        setattr(args, attr, value)
        assert any(
            r.startswith(f"{name}:")
            for r in refusals(args, PrivacyArguments(clip=1.0), custom_loss=False)
        )
        setattr(args, attr, old)


def test_batch_mean_losses_samplers_and_missing_privacy_state_are_refused(
    records, tmp_path
) -> None:
    privacy = PrivacyArguments(**PRIVACY)
    with pytest.raises(DPTrainerError, match="compute_loss_func"):
        DPTrainer(
            _model(),
            _args(tmp_path),
            train_dataset=records,
            privacy=privacy,
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss,
        )

    class Shuffled(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.RandomSampler(self.train_dataset)

    with pytest.raises(DPTrainerError, match="_get_train_sampler"):
        Shuffled(_model(), _args(tmp_path), train_dataset=records, privacy=privacy)
    with pytest.raises(DPTrainerError, match="model_init"):
        DPTrainer(args=_args(tmp_path), model_init=_model, train_dataset=records, privacy=privacy)
    plain = tmp_path / "plain"  # a checkpoint written by the ordinary Trainer
    Trainer(
        _model(), _args(plain, max_steps=1, gradient_accumulation_steps=1), train_dataset=records
    ).train()
    trainer = DPTrainer(_model(), _args(tmp_path), train_dataset=records, privacy=privacy)
    with pytest.raises(DPTrainerError, match="no privacy state"):
        trainer.train(resume_from_checkpoint=str(plain / "checkpoint-1"))


def test_max_grad_norm_is_the_per_sample_clip_when_no_clip_is_given(records, tmp_path) -> None:
    args = _args(tmp_path, max_grad_norm=0.5)
    trainer = DPTrainer(
        _model(), args, train_dataset=records, privacy=PrivacyArguments(epsilon=4.0)
    )
    assert trainer.values.clip == 0.5
    with pytest.raises(DPTrainerError, match=r"max_grad_norm: 0 and PrivacyArguments\.clip unset"):
        DPTrainer(_model(), _args(tmp_path), train_dataset=records, privacy=PrivacyArguments())


def test_record_ids_are_content_derived_and_keep_duplicates_apart(records) -> None:
    ids = record_ids([*records, records[0]])
    assert len(set(ids)) == N + 1 and ids[-1] == ids[0] + "~1"
    assert record_ids(records[1:]) == ids[1:N]  # removing a record changes no other id
    named = [{**r, "id": f"r{i}"} for i, r in enumerate(records)]
    assert record_ids(named) == [f"r{i}" for i in range(N)]


def test_readme_sample_runs(tmp_path, monkeypatch) -> None:
    """The README's DPTrainer sample, on 48 bundled notes with the tiny Llama, for 1 step."""
    from dptrain.data import load_texts

    text = (Path(__file__).parents[2] / "README.md").read_text()
    m = re.search(r"<!-- hf-trainer-sample -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its DPTrainer sample"
    code = m.group(1)
    for old, new in [
        ('"smollm2-135m"', '"tiny-llama"'),
        ("max_steps=100", "max_steps=1"),
        ("max_length=128", "max_length=32"),
    ]:
        assert old in code
        code = code.replace(old, new)
    notes = load_texts("bundled:clinic_notes")
    lines = [json.dumps({"id": notes.ids[i], "text": notes.texts[i]}) for i in range(48)]
    (tmp_path / "my_notes.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.engine.ledger.total_steps == 1
    assert trainer.plan.sample_rate == pytest.approx(32 / 48)
    assert (tmp_path / "runs/hf-notes/secret.key").stat().st_mode & 0o077 == 0
    again = DPTrainer(
        trainer.model, trainer.args, train_dataset=trainer.train_dataset, privacy=trainer.privacy
    )
    with pytest.raises(DPTrainerError, match="belongs to another run"):
        again.train()  # a new run never reuses a started run's key


def test_built_in_losses_are_per_sample_and_match_the_models_own(records) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from dptrain.integrations.hf import causal_lm_loss, default_loss, sequence_classification_loss

    model = _model()
    batch = default_data_collator(records[:5])
    assert default_loss(model) is not None
    rows = causal_lm_loss()(model, batch)
    for b in range(5):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        assert rows[b].item() == pytest.approx(model(**one).loss.item(), rel=1e-6)  # HF: float32
    smooth = causal_lm_loss(0.1)(model, batch)
    assert smooth[2].item() == pytest.approx(
        causal_lm_loss(0.1)(model, {k: v[2:3] for k, v in batch.items()}).item(), rel=1e-9
    )
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=3)
    cls = GPT2ForSequenceClassification(cfg).double().eval()
    cls.config.pad_token_id = 0
    x = {"input_ids": batch["input_ids"], "labels": torch.tensor([0, 1, 2, 1, 0])}
    losses = sequence_classification_loss()(cls, x)
    assert losses.shape == (5,)
    assert losses.mean().item() == pytest.approx(cls(**x).loss.item(), rel=1e-6)
    with pytest.raises(DPTrainerError, match="loss_fn"):
        default_loss(torch.nn.Linear(2, 2))


def test_epochs_and_the_scheduler_are_the_trainers(records, tmp_path) -> None:
    """num_train_epochs E -> ceil(E / q) steps, as the recipe's training.epochs; the lr
    scheduler acts on the optimizer the engine steps."""
    args = _args(
        tmp_path, max_steps=-1, num_train_epochs=0.3, per_device_train_batch_size=8,
        gradient_accumulation_steps=1, save_strategy="no", lr_scheduler_type="linear",
    )  # fmt: skip
    trainer = DPTrainer(_model(), args, train_dataset=records, privacy=PrivacyArguments(**PRIVACY))
    trainer.train()
    assert trainer.plan.steps == math.ceil(0.3 / (8 / N)) == 2 == trainer.state.max_steps
    assert trainer.engine.ledger.total_steps == 2 and not list(tmp_path.glob("checkpoint-*"))
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert lrs == [0.1, 0.05]  # the Trainer's scheduler sets the lr of the engine's optimizer
    assert trainer.engine.optimizer.param_groups[0]["lr"] == 0.0


def _tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the Trainer's TensorBoard integration wrote under ``out``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(out.glob("runs/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


@pytest.mark.parametrize("opt_in", [False, True])
def test_the_ledger_on_disk_covers_each_log_line_and_trackers_get_released_values(
    records, tmp_path, opt_in
) -> None:
    """A user callback reads ``ledger.json`` as each line is shown; the ``report_to``
    TensorBoard run gets the un-noised loss and eval metrics only when opted in."""
    from transformers import TrainerCallback

    seen: list[tuple[dict, int, int]] = []

    class Watch(TrainerCallback):  # the user's own callback: it gets the whole line
        def on_log(self, args, state, control, logs=None, **kwargs):
            ledger = dptrain.Ledger.load(Path(args.output_dir) / "ledger.json")
            seen.append((dict(logs), ledger.total_steps, state.global_step))

    args = _args(
        tmp_path, report_to="tensorboard", save_strategy="no", eval_strategy="steps", eval_steps=2
    )
    privacy = PrivacyArguments(**PRIVACY, report_private_metrics=opt_in, public_eval=opt_in)
    trainer = DPTrainer(
        _model(),
        args,
        train_dataset=records,
        eval_dataset=records[:4],
        privacy=privacy,
        callbacks=[Watch()],
    )
    trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))  # no checkpoint: log lines save the ledger
    for logs, on_disk, step in seen:  # the ledger on disk covers every step a line shows
        assert on_disk == step, logs
    assert [step for logs, _, step in seen if "loss" in logs] == [1, 2, 3]
    assert any("eval_loss" in logs for logs, _, _ in seen) and "train_loss" in seen[-1][0]

    scalars = _tensorboard_scalars(tmp_path)
    eps = {step: logs["epsilon"] for logs, _, step in seen}
    assert {step for step, _ in scalars["train/epsilon"]} == {1, 2, 3}
    for step, value in scalars["train/epsilon"]:
        assert value == pytest.approx(eps[step], rel=1e-6)
    assert "train/learning_rate" in scalars and "train/grad_norm" in scalars
    private = {"train/loss", "train/train_loss", "eval/loss", "train/train_runtime"}
    if opt_in:
        assert private <= set(scalars), sorted(scalars)
    else:
        assert not private & set(scalars), sorted(scalars)
        assert set(scalars) <= {"train/epsilon", "train/grad_norm", "train/learning_rate",
                                "train/epoch"}  # fmt: skip


def test_record_ids_of_an_id_column_have_one_canonical_text(records) -> None:
    named = [
        {**r, "id": [i, float(i), torch.tensor(i), f" {i} "][i % 4]} for i, r in enumerate(records)
    ]
    assert record_ids(named) == [str(i) for i in range(N)]
    named[3]["id"] = " "
    with pytest.raises(DPTrainerError, match="record 3 has no 'id' \\(missing, null or blank\\)"):
        record_ids(named)


def test_logged_loss_is_the_trainers_mean_whatever_the_accumulation(tmp_path) -> None:
    """Under gradient_accumulation_steps 1 and 3 (physical chunks of 1): one ledger step per
    optimizer step at the same q, the same model, and each line's ``loss`` is the mean over
    its optimizer steps of the model's own (HF) loss on that step's whole Poisson batch
    (records of equal length: HF's token mean is the per-record mean); steps with an empty
    batch are left out, not counted as 0, and a line of empty steps only has no loss."""
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, VOCAB, (WIDTH,), generator=g)} for _ in range(N)]
    rows = [{**r, "attention_mask": torch.ones(WIDTH, dtype=torch.long)} for r in rows]
    rows = [{**r, "labels": r["input_ids"].clone()} for r in rows]
    q, steps = 1 / N, 8
    privacy = PrivacyArguments(epsilon=20.0, clip=1.0, insecure_seed=3, sample_rate=q)
    runs = {}
    for ga, every in ((1, 2), (3, 1)):
        trainer = DPTrainer(
            _model(),
            _args(
                tmp_path / f"ga{ga}",
                max_steps=steps,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=ga,
                logging_steps=every,
                save_strategy="no",
            ),
            train_dataset=rows,
            privacy=privacy,
        )
        runs[ga] = (trainer, trainer.train())
    plan = runs[1][0].plan
    # the same steps directly, each batch's loss taken by the model itself before its step
    model = _model()
    engine = dptrain.PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=dptrain.StaticPolicy(clip=1.0, noise_multiplier=plan.noise_multiplier),
        sample_rate=q,
        dataset_size=N,
        loss_fn=hf.causal_lm_loss(),
        max_physical_batch_size=1,
        noise=dptrain.GaussianNoise(RunKey.from_insecure_seed(3)),
    )
    sampler = dptrain.PoissonSampler(record_ids(rows), q, RunKey.from_insecure_seed(3))
    hf_loss: list[float | None] = []
    for t in range(steps):
        idx = sampler.sample(t).tolist()
        batch = default_data_collator([rows[i] for i in idx]) if idx else None
        with torch.no_grad():
            hf_loss.append(float(model(**batch).loss) if idx else None)
        engine.step(batch)
    assert None in hf_loss, "the key gives no empty batch: the test would not test it"
    for ga, every in ((1, 2), (3, 1)):
        trainer, output = runs[ga]
        assert trainer.engine.ledger.to_dict() == engine.ledger.to_dict()
        assert trainer.engine.ledger.total_steps == steps
        lines = [h for h in trainer.state.log_history if "grad_norm" in h]  # not train_loss's
        got = {h["step"]: h.get("loss") for h in lines}
        assert sorted(got) == list(range(every, steps + 1, every))
        for end in range(every, steps + 1, every):
            window = [v for v in hf_loss[end - every : end] if v is not None]
            want = sum(window) / len(window) if window else None
            # HF's loss upcasts the logits to float32 only: equal to ~1e-7
            assert got[end] == (pytest.approx(want, rel=1e-6) if window else None), (ga, end)
        mean = sum(v for v in hf_loss if v is not None) / sum(v is not None for v in hf_loss)
        assert output.training_loss == pytest.approx(mean, rel=1e-6)
        assert trainer.state.log_history[-1]["train_loss"] == output.training_loss
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                dict(trainer.model.named_parameters())[name].detach(), p.detach(), rtol=1e-10,
                atol=1e-12,
            )  # fmt: skip


def test_a_resume_of_a_run_stopped_at_the_budget_is_refused_before_the_checkpoint_loads(
    records, tmp_path
) -> None:
    """The Trainer runs static and error_feedback only (no adaptive policy): the planned event
    prices the next step, so the run plan refuses the resume (``dptrain train``'s message)
    before an engine is built or the checkpoint's weights are loaded."""
    q, sigma, delta = 6 / N, 0.8, 1e-3
    eps2 = get_accountant("rdp").epsilon([Event(q, sigma, 2)], delta)  # 2 of the 10 steps fit
    privacy = PrivacyArguments(
        epsilon=eps2 * 1.0001, delta=delta, noise_multiplier=sigma, clip=1.0, insecure_seed=1
    )
    args = _args(
        tmp_path, max_steps=10, gradient_accumulation_steps=1, per_device_train_batch_size=6
    )
    DPTrainer(_model(), args, train_dataset=records, privacy=privacy).train()
    fresh = _model(seed=5)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    again = DPTrainer(fresh, args, train_dataset=records, privacy=privacy)
    with pytest.raises(dptrain.errors.RecipeError, match=r"already spent .*after 2 steps"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.engine is None
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())
