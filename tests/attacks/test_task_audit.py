"""The audit of instruction, chat and classification runs scores each record as training saw
it: the task's encoding (chat template, labels on the response only; a classifier's label)
and the task's loss, and the released model with its head."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from attacks.audit import _starting_point, audit_run, load_final_model
from attacks.people import audit_people
from attacks.scores import score_texts, scored_tokens, trained_texts
from dptrain.data import TextDataset
from dptrain.data.splits import split_data
from dptrain.errors import RecipeError
from dptrain.recipe import load_recipe, parse_recipe
from dptrain.rundir import RunDir
from dptrain.secret import run_key
from dptrain.tasks import Task
from dptrain.train import train

ROOT = Path(__file__).resolve().parents[2]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INSTRUCTION = [
    {"prompt": "List the drugs in: metformin 500 mg daily.", "response": "metformin"},
    {"prompt": "Kind of record?", "response": "a clinic note about a follow-up visit"},
    {"prompt": "Summarize.", "response": "Patient well.", "system": "Be brief."},
]
CHAT = [
    {"messages": [{"role": "user", "content": "Kind?"}, {"role": "assistant", "content": "note"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Kind of record 7?"},
            {"role": "assistant", "content": "lab notice"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, a lab notice."},
        ]
    },
]
LABELLED = [{"text": f"note {i} " * (1 + i), "label": "ab"[i % 2]} for i in range(5)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/attacks/conftest.py


def _recipe(task: dict) -> object:
    return parse_recipe(
        {
            "model": {"name": "tiny-gpt2", "dtype": "float64"},
            "data": {"path": "x.jsonl", "max_length": 64},
            "training": {"steps": 1, "batch_size": 2},
            "task": task,
        }
    )


@pytest.mark.parametrize(
    ("task", "rows", "template"),
    [
        ({"kind": "instruction", "system_field": "system"}, INSTRUCTION, None),
        ({"kind": "instruction"}, [{k: r[k] for k in ("prompt", "response")} for r in INSTRUCTION], CHATML),
        ({"kind": "chat"}, CHAT, CHATML),
        ({"kind": "classification", "labels": ["a", "b"]}, LABELLED, None),
    ],
    ids=["instruction-plain", "instruction-template", "chat-template", "classification"],
)  # fmt: skip
def test_a_record_scores_its_training_loss(task, rows, template) -> None:
    """The audit's loss of each record (batched, padded) is the loss ``dptrain train``'s
    engine takes for that record alone: the task's encoding and the task's loss function."""
    r = _recipe(task)
    t = Task(r.task)
    model, tok = t.build_model(r)
    if template is not None:
        tok.chat_template = CHATML
    texts = [json.dumps(_canonical(row, t.kind), sort_keys=True) for row in rows]
    ids = [f"r{i}" for i in range(len(rows))]
    if t.generates:  # a canary is plain text in every generating task, trained on every token
        texts.append("The secret code of Bo Ka is 123456.")
        ids.append("canary-00000-0")
    ds = TextDataset(texts, ids)
    ex = t.encode(ds, tok, r.data.max_length)  # what train() builds (dptrain.train.build)
    model.eval()
    with torch.no_grad():
        per_record = torch.stack([t.loss_fn(model, ex.batch([i]))[0] for i in range(len(ds))])
    stats = score_texts(
        model, tok, texts, ids=ids, task=t, max_length=r.data.max_length, batch_size=4,
        progress=False,
    )  # fmt: skip
    # token_nll and the classifier loss take the cross-entropy in float32: its rounding
    loss, scored = per_record.double().numpy(), stats.tokens > 0
    assert stats.mean_nll[scored] == pytest.approx(loss[scored], rel=1e-6)
    # a record max_length left without a target (the long chat) trains a zero loss, and
    # the audit gives it no score (NaN), not that 0
    assert (loss[~scored] == 0).all() and np.isnan(stats.mean_nll[~scored]).all()
    if t.kind == "classification":
        assert (stats.tokens == 1).all() and trained_texts(t, tok, texts, ids, 64) is None
        return
    targets = (ex.labels[:, 1:] != -100).sum(1).numpy()
    assert (stats.tokens == targets).all()
    # the JSON text as plain text (what the audit scored before) is another record entirely
    as_json = score_texts(model, tok, texts, max_length=64, progress=False)
    assert (as_json.tokens[: len(rows)] > stats.tokens[: len(rows)]).all()
    # zlib's text is what the loss is on: the responses (and the canary past its first token,
    # which nothing predicts: the tiny tokenizer has no BOS)
    seen = trained_texts(t, tok, texts, ids, 64)
    assert seen[-1] == texts[-1][1:] + tok.eos_token
    assert all("Kind" not in s and "drugs" not in s for s in seen)


def _canonical(row: dict, kind: str) -> dict:
    return row if kind != "classification" else {"text": row["text"], "label": row["label"]}


def _tiny_recipe(tmp_path: Path, name: str, **changes) -> Path:
    d = yaml.safe_load((ROOT / "recipes" / name).read_text())
    for section, values in changes.items():
        d[section] = {**(d.get(section) or {}), **values} if isinstance(values, dict) else values
    d["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_audit_of_an_instruction_run_with_canaries(tmp_path: Path) -> None:
    """Every record scored as it trained; the records whose responses max_length cuts off
    (every fifth: a long prompt) have no loss to score, so they are left out of the attacks
    and counted (in the summary, the table and the report), never scored."""
    long = "describe " * 60  # > max_length 48 tokens: the response is cut off
    rows = [
        {"q": (long if i % 5 == 0 else "") + f"Kind of record {i}?", "a": ["clinic note", "lab notice"][i % 2]}
        for i in range(60)
    ]  # fmt: skip
    data = tmp_path / "instr.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = _tiny_recipe(
        tmp_path, "tiny.yaml",
        data={"path": str(data), "max_records": None, "max_validation_records": None,
              "validation_fraction": 0.3, "canaries": {"secret_digits": 2, "repetitions": {1: 8, 2: 2}}},
        training={"steps": 2}, generation={"samples": 0},
        task={"kind": "instruction", "prompt_field": "q", "response_field": "a"},
        audit={"members": 1000, "non_members": 1000, "population": 1, "exposure_canaries": 2,
               "shadows": 2, "shadow_steps": 1},
    )  # fmt: skip
    recipe = load_recipe(path)  # audit.after_training is no longer refused for a task run
    assert parse_recipe({**recipe.model_dump(), "audit": {"after_training": True}})
    result = train(recipe, progress=False)
    table = io.StringIO()
    s = audit_run(result.run_dir, progress=False, out=table)
    n, u = s["records"], s["records"]["unscored"]
    assert u["members"] + u["non_members"] == 12  # every fifth record of 60: all audited
    assert n["n_members"] + n["n_non_members"] == 48 and u["population"] == 0
    assert "no scored token within data.max_length" in table.getvalue()
    html = (result.run_dir / "audit" / "report.html").read_text()
    assert f"Left out: {u['members']} training, {u['non_members']} held-out" in html
    assert {"loss", "zlib", "min_k", "lira_online"} <= set(s["attacks"])
    # shadow models train on the run's records under the run's task (canonical fields)
    shadow = load_recipe(result.run_dir / "audit" / "shadows" / "shadow-00" / "recipe.yaml")
    assert shadow.task.kind == "instruction" and shadow.task.prompt_field == "prompt"
    assert s["canaries"]["count"] == 10 and "one_run" in s["canaries"]
    assert 0.0 <= s["attacks"]["loss"]["auc"] <= 1.0
    # the audited model is the released one, and a member's score is its training loss
    run = RunDir(result.run_dir)
    model, tok = load_final_model(run, recipe)
    train_ds, _, _ = split_data(recipe, run_key(run.path, None, create=False))
    task = Task(recipe.task)
    two = [i for i, t in enumerate(train_ds.texts) if "describe" not in t][:2]  # scored ones
    ex = task.encode(train_ds.subset(two), tok, recipe.data.max_length)
    stats = score_texts(
        model, tok, [train_ds.texts[i] for i in two], ids=[train_ds.ids[i] for i in two],
        task=task, max_length=48, progress=False,
    )  # fmt: skip
    with torch.no_grad():
        model.eval()
        loss = task.loss_fn(model, ex.batch([0, 1]))
    assert stats.mean_nll == pytest.approx(loss.double().numpy(), rel=1e-5)


def test_audit_of_a_lora_classification_run(tmp_path: Path) -> None:
    lora = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    path = _tiny_recipe(
        tmp_path, "classification_tiny.yaml", lora=lora,
        training={"steps": 3, "lr": 0.05},
        audit={"members": 16, "non_members": 16, "population": 4},
    )  # fmt: skip
    recipe = load_recipe(path)
    result = train(recipe, progress=False)
    s = audit_run(result.run_dir, progress=False, out=io.StringIO())
    assert "loss" in s["attacks"] and math.isfinite(s["attacks"]["loss"]["auc"])
    assert set(s["skipped_attacks"]) >= {"zlib", "min_k"}
    assert "one label per record" in s["skipped_attacks"]["zlib"]
    # the released classifier is loaded with its trained head: the run's validation accuracy
    run = RunDir(result.run_dir)
    model, tok = load_final_model(run, recipe)
    task = Task(recipe.task)
    _, val, _ = split_data(recipe, run_key(run.path, None, create=False))
    ex = task.encode(val, tok, recipe.data.max_length)
    got = task.evaluate(model, [ex.batch(range(len(ex)))])
    assert got["accuracy"] == pytest.approx(run.read_stats()["validation_after"]["accuracy"])
    start = _starting_point(recipe)
    head = {n: p for n, p in model.named_parameters() if "modules_to_save" in n}
    start_head = {n: p for n, p in start.named_parameters() if "modules_to_save" in n}
    assert head and any(not torch.equal(head[n], start_head[n]) for n in head)


def test_audit_by_person_of_an_instruction_run(tmp_path: Path) -> None:
    """A person-level instruction run: its people are read beside the task fields, each
    record is scored as it trained, and every canary person (coin of the run key) enters the
    one-run bound, per person."""
    rows = [
        {"q": f"Kind of record {i}?", "a": ["clinic note", "lab notice"][i % 2], "who": f"p{i // 3}"}
        for i in range(90)
    ]  # fmt: skip
    data = tmp_path / "instr.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = _tiny_recipe(
        tmp_path, "tiny.yaml",
        data={"path": str(data), "max_records": None, "max_validation_records": None,
              "validation_fraction": 0.3, "privacy_unit": {"field": "who"},
              "canaries": {"secret_digits": 2, "repetitions": {1: 4, 2: 4}}},
        training={"steps": 2, "batch_size": 6}, generation={"samples": 0},
        task={"kind": "instruction", "prompt_field": "q", "response_field": "a"},
    )  # fmt: skip
    result = train(load_recipe(path), progress=False)
    s = audit_people(result.run_dir, people=8)
    assert s["members"] >= 4 and s["records"] >= s["members"] + s["non_members"]
    one_run = s["canary_people"]["one_run"]
    assert one_run["canaries"] == 8 and one_run["unit"] == "who"
    assert s["epsilon_lower_bounds"]["one_run"] <= s["claim"]["epsilon"] and s["consistent"]


def test_a_record_without_a_scored_token_has_no_score() -> None:
    """An instruction record whose response ``max_length`` cuts off entirely has no loss:
    NaN statistics (0 would read as a perfect member), and ``scored_tokens`` says so before
    any model runs."""
    r = _recipe({"kind": "instruction"})
    t = Task(r.task)
    model, tok = t.build_model(r)
    rows = [{"prompt": "word " * 80, "response": "cut off"}, {"prompt": "Hi?", "response": "kept"}]
    texts = [json.dumps(row, sort_keys=True) for row in rows]
    stats = score_texts(model, tok, texts, ids=["a", "b"], task=t, max_length=32, progress=False)
    ex = t.encode(TextDataset(texts, ["a", "b"]), tok, 32)
    assert list(scored_tokens(ex)) == list(stats.tokens) and stats.tokens[0] == 0
    assert stats.tokens[1] > 0 and math.isfinite(stats.mean_nll[1])
    for column in (stats.mean_nll, stats.sum_nll, stats.min_k, stats.log_prob):
        assert math.isnan(column[0])


def test_canaries_that_max_length_would_cut_are_refused(tmp_path: Path) -> None:
    """A canary truncated by max_length loses its secret (and may have no scored token): the
    run is refused when the canaries are planted, naming data.max_length (the tiny recipe's
    48 tokens hold them: the instruction run above trains with canaries)."""
    path = _tiny_recipe(
        tmp_path, "tiny.yaml",
        data={"max_length": 6, "canaries": {"repetitions": {1: 4}}}, training={"steps": 1},
    )  # fmt: skip
    with pytest.raises(RecipeError, match=r"data.max_length = 6.*Fix: raise data.max_length"):
        train(load_recipe(path), progress=False)
