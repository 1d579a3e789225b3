"""The task layer: recipe keys, structured records, response-only labels, classification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dptrain.data import TextDataset
from dptrain.data.lm import IGNORE_INDEX
from dptrain.data.loading import DataError
from dptrain.models import build_tiny_tokenizer
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.tasks import Task
from dptrain.tasks.chat import ChatTemplateError, encode_chat
from dptrain.tasks.classification import macro_f1
from dptrain.tasks.records import load_records
from dptrain.tasks.schema import TaskSection

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def recipe(**extra):
    base = {
        "model": {"name": "tiny-gpt2"},
        "data": {"path": "x.jsonl"},
        "training": {"steps": 1, "batch_size": 2},
    }
    return parse_recipe({**base, **extra})


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_task_keys_are_validated() -> None:
    assert recipe().task.kind == "text"
    assert recipe(task="chat").task.kind == "chat"  # the kind alone
    with pytest.raises(RecipeError, match=r"task\.labels is required"):
        recipe(task="classification")
    with pytest.raises(RecipeError, match="Did you mean 'label_field'"):
        recipe(task={"kind": "classification", "labels": ["a", "b"], "label_feld": "y"})
    with pytest.raises(RecipeError, match="canaries"):
        recipe(
            task={"kind": "classification", "labels": ["a", "b"]},
            data={"path": "x.jsonl", "canaries": {}},
        )
    # generation options never change the run's fingerprint; the default task neither
    assert recipe().fingerprint() == recipe(generation={"samples": 0}).fingerprint()
    assert recipe().fingerprint() != recipe(task="instruction").fingerprint()


def test_structured_records_are_one_canonical_text_each(tmp_path: Path) -> None:
    rows = [{"q": "Say hi", "a": "hi"}, {"q": "Say yo", "a": "yo", "id": "r2"}]
    task = TaskSection(kind="instruction", prompt_field="q", response_field="a")
    ds = load_records(write_jsonl(tmp_path / "i.jsonl", rows), task)
    assert json.loads(ds.texts[0]) == {"prompt": "Say hi", "response": "hi"}
    assert ds.ids[0].startswith("text-") and ds.ids[1] == "r2"
    # the wording of data.text_field's (tests/data/test_loading.py): the same helper
    one_wording = (
        r"i\.jsonl:1: no field 'answer'; available fields: q, a\. Fix: set task\.response_field "
        r"in the recipe to the field that holds the response$"
    )
    with pytest.raises(DataError, match=one_wording):
        load_records(
            str(tmp_path / "i.jsonl"),
            TaskSection(kind="instruction", prompt_field="q", response_field="answer"),
        )
    with pytest.raises(DataError, match=r"no field 'messages'.*Fix: set task\.messages_field"):
        load_records(write_jsonl(tmp_path / "m.jsonl", rows), TaskSection(kind="chat"))
    bodies = [{"body": "a", "label": "pos"}]
    with pytest.raises(DataError, match=r"no field 'text'.*Fix: set data\.text_field"):
        load_records(
            write_jsonl(tmp_path / "t.jsonl", bodies),
            TaskSection(kind="classification", labels=["pos", "neg"]),
        )
    chat = [{"messages": [{"role": "user", "content": "x"}]}]
    with pytest.raises(DataError, match="no assistant message"):
        load_records(write_jsonl(tmp_path / "c.jsonl", chat), TaskSection(kind="chat"))
    labelled = [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}]
    with pytest.raises(DataError, match=r":2: .*not one of task.labels"):
        load_records(
            write_jsonl(tmp_path / "l.jsonl", labelled),
            TaskSection(kind="classification", labels=["pos", "neg"]),
        )


def _targets(ex, tok, row: int) -> str:
    labels = ex.labels[row]
    return tok.decode(labels[labels != IGNORE_INDEX].tolist())


def test_plain_format_trains_on_the_response_only() -> None:
    tok = build_tiny_tokenizer()
    rec = json.dumps({"prompt": "List the drugs.", "response": "metformin 500 mg"})
    canary = "The secret code of Bo Ka is 123456."
    ds = TextDataset([rec, canary], ["r1", "canary-00000-0"])
    ex = encode_chat(ds, tok, 64, "auto")  # the tiny tokenizer has no chat template
    assert _targets(ex, tok, 0) == "metformin 500 mg" + tok.eos_token
    n = int(ex.lengths[0])
    assert tok.decode(ex.input_ids[0, :n].tolist()).startswith("<|user|>\nList the drugs.\n")
    assert _targets(ex, tok, 1) == canary + tok.eos_token  # canaries: every token
    assert (ex.labels[ex.attention_mask == 0] == IGNORE_INDEX).all()


def test_chat_template_multi_turn_masks_all_but_assistant_turns() -> None:
    tok = build_tiny_tokenizer()
    tok.chat_template = CHATML
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Kind?"},
        {"role": "assistant", "content": "clinic note"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    ds = TextDataset([json.dumps({"messages": msgs})], ["c1"])
    ex = encode_chat(ds, tok, 128, "auto")
    assert _targets(ex, tok, 0) == "clinic note<|im_end|>\nYes.<|im_end|>\n"
    n = int(ex.lengths[0])
    assert tok.decode(ex.input_ids[0, :n].tolist()) == tok.apply_chat_template(msgs, tokenize=False)
    plain = encode_chat(ds, tok, 128, "plain")
    assert _targets(plain, tok, 0) == f"clinic note{tok.eos_token}Yes.{tok.eos_token}"
    # a template whose renderings do not extend each other cannot be split: refused
    tok.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match=r"task\.chat_template: plain"):
        encode_chat(ds, tok, 128, "auto")


def test_truncation_keeps_the_row_and_counts_it() -> None:
    tok = build_tiny_tokenizer()
    rec = json.dumps({"prompt": "word " * 40, "response": "answer"})
    ex = encode_chat(TextDataset([rec], ["r"]), tok, 16, "auto")
    assert ex.input_ids.shape[1] == 16 and ex.truncated == 1
    assert (ex.labels == IGNORE_INDEX).all()  # no response token left: a zero gradient


def test_macro_f1() -> None:
    pred = torch.tensor([0, 0, 1, 2])
    truth = torch.tensor([0, 1, 1, 1])
    # class 0: tp1 fp1 -> 2/3; class 1: tp1 fn2 -> 2/4; class 2: fp1 -> 0; class 3 absent
    assert macro_f1(pred, truth, 4) == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


def test_classifier_per_sample_gradients_are_exact(tmp_path: Path) -> None:
    from dptrain import check_model

    rows = [{"text": f"note {i} " * (1 + i), "label": "ab"[i % 2]} for i in range(6)]
    r = recipe(
        task={"kind": "classification", "labels": ["a", "b"]},
        data={"path": write_jsonl(tmp_path / "c.jsonl", rows)},
        lora={"r": 2, "alpha": 4, "target_modules": ["c_attn"]},
        model={"name": "tiny-gpt2", "dtype": "float64"},
    )
    task = Task(r.task)
    model, tok = task.build_model(r)
    ex = task.encode(task.load(r.data.path, "text", None), tok, 32)
    assert ex.labels.tolist() == [0, 1, 0, 1, 0, 1]
    result = check_model(model, task.loss_fn, [ex.batch([0, 1, 2]), ex.batch([3, 4, 5])])
    assert result.exact, result.render()


@pytest.mark.parametrize(
    ("model", "lora"),
    [("tiny-gpt2", {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}), ("tiny-llama", None)],
)
def test_classifier_with_gradient_checkpointing_is_exact(tmp_path: Path, model, lora) -> None:
    """training.gradient_checkpointing reaches the classifier's transformer (with and without
    a peft wrapper), and the engine's update stays the per-example loop's."""
    from dptrain import check_model

    rows = [{"text": f"note {i} " * (1 + i), "label": "ab"[i % 2]} for i in range(4)]
    r = recipe(
        task={"kind": "classification", "labels": ["a", "b"]},
        data={"path": write_jsonl(tmp_path / "c.jsonl", rows)},
        training={"steps": 1, "batch_size": 2, "gradient_checkpointing": True},
        lora=lora,
        model={"name": model, "dtype": "float64"},
    )
    task = Task(r.task)
    net, tok = task.build_model(r)
    inner = net.get_base_model() if lora else net
    assert inner.is_gradient_checkpointing and net.training
    ex = task.encode(task.load(r.data.path, "text", None), tok, 32)
    result = check_model(net, task.loss_fn, [ex.batch([0, 1, 2, 3])])
    assert result.exact, result.render()


def test_gradient_checkpointing_is_refused_where_the_model_lacks_it(tmp_path, monkeypatch):
    from transformers import GPT2ForSequenceClassification

    monkeypatch.setattr(GPT2ForSequenceClassification, "supports_gradient_checkpointing", False)
    r = recipe(
        task={"kind": "classification", "labels": ["a", "b"]},
        training={"steps": 1, "batch_size": 2, "gradient_checkpointing": True},
    )
    with pytest.raises(RecipeError, match=r"GPT2ForSequenceClassification does not support.*Fix"):
        Task(r.task).build_model(r)


def test_federated_recipes_refuse_other_tasks() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    d = yaml.safe_load((root / "recipes" / "federated_tiny.yaml").read_text())
    parse_recipe(d)  # the text task is the federated default
    with pytest.raises(RecipeError, match="dptrain train` only"):
        parse_recipe({**d, "task": "instruction"})
