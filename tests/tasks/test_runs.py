"""Whole runs of the non-text tasks on tiny models, ``dptrain generate`` and the canary check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dptrain.cli import main
from dptrain.data.canaries import Canary, Manifest
from dptrain.data.loading import DataError
from dptrain.data.people import person_ids, read_people, recipe_person_ids
from dptrain.data.splits import split_data
from dptrain.models import load_model_and_tokenizer
from dptrain.recipe import load_recipe
from dptrain.rundir import RunDir
from dptrain.secret import run_key
from dptrain.tasks.generation import canary_check, canary_prefix
from dptrain.tasks.schema import TaskSection

ROOT = Path(__file__).resolve().parents[2]


def test_classification_recipe_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cls"
    argv = ["train", str(ROOT / "recipes" / "classification_tiny.yaml"), "--no-progress"]
    assert main([*argv, "--output", str(out), "--set", "training.steps=3"]) == 0
    meta, stats = RunDir(out).read_meta(), RunDir(out).read_stats()
    assert meta["task"] == "classification" and meta["status"] == "finished"
    for key in ("validation_before", "validation_after"):  # private: not in run.json
        assert set(stats[key]) == {"accuracy", "macro_f1"} and key not in meta
        assert 0.0 <= stats[key]["accuracy"] <= 1.0
    assert "val accuracy" in capsys.readouterr().out
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"] and len(cfg["id2label"]) == 5
    assert main(["generate", str(out)]) == 2
    assert "classification head" in capsys.readouterr().err


def test_instruction_run_with_canaries_then_generate(tmp_path: Path, capsys) -> None:
    rows = [
        {"q": f"Kind of record {i}?", "a": ["clinic note", "lab notice"][i % 2]} for i in range(120)
    ]
    data = tmp_path / "instr.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["data"].update(path=str(data), max_records=None, canaries={"repetitions": {1: 4, 2: 1}})
    d["training"].update(steps=3)
    d["task"] = {"kind": "instruction", "prompt_field": "q", "response_field": "a"}
    d["generation"] = {"samples": 1, "prompts": ["Kind of record 7?"], "max_new_tokens": 4}
    d["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sample 1" in printed and "canary check" in printed
    meta = RunDir(tmp_path / "run").read_meta()
    assert meta["task"] == "instruction" and len(meta["samples"]) == 1
    assert "canary_check" not in meta  # its counts split the canaries by their secret coins
    check = RunDir(tmp_path / "run").read_stats()["canary_check"]
    assert check["trained"] + check["untrained"] == 5 and check["trained"] >= 1
    argv = ["generate", str(tmp_path / "run"), "--prompt", "Kind?", "--samples", "2"]
    assert main([*argv, "--max-new-tokens", "3", "--canary-check", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["prompt"] for s in got["samples"]] == ["Kind?", "Kind?"]
    assert got["canary_secrets_in_samples"] >= 0 and got["canary_check"]["trained"] >= 1


def test_canary_check_of_a_run_without_canaries_says_so(tmp_path: Path, capsys) -> None:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["data"].update(max_records=32, max_validation_records=4)
    d["training"].update(steps=1, batch_size=4)
    d["generation"] = {"samples": 0}
    d["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["generate", str(tmp_path / "run"), "--max-new-tokens", "2", "--canary-check"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no canaries" in err and "drop --canary-check" in err


def test_canary_check_finds_a_memorized_secret() -> None:
    """A model trained without privacy on one canary completes its prefix with the secret;
    the never-trained canary is not produced."""
    model, tok = load_model_and_tokenizer("tiny-gpt2")
    template = "The secret code of {name} is {secret}."
    seen = Canary(0, "Mavoru Kestin", "482913", 1, True)
    unseen = Canary(1, "Tobale Rin", "905117", 1, False)
    ids = torch.tensor([tok(seen.text(template))["input_ids"]])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert canary_prefix(template, seen.name) == "The secret code of Mavoru Kestin is "
    check = canary_check(model, tok, Manifest(template, 6, [seen, unseen]))
    assert (check.trained, check.trained_extracted) == (1, 1)
    assert (check.untrained, check.untrained_extracted) == (1, 0)


def test_instruction_run_per_person(tmp_path: Path) -> None:
    """``data.privacy_unit`` with a structured task: each record's person is read beside its
    task fields (the records' own ids), and the run samples, clips and accounts per person."""
    rows = [
        {
            "q": f"Kind of record {i}?",
            "a": ["clinic note", "lab notice"][i % 2],
            "who": f"p{i // 3}",
        }
        for i in range(90)
    ]
    data = tmp_path / "instr.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["data"].update(
        path=str(data), max_records=None, validation_fraction=0.3, privacy_unit={"field": "who"}
    )
    d["training"].update(steps=2, batch_size=6)
    d["task"] = {"kind": "instruction", "prompt_field": "q", "response_field": "a"}
    d["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    meta = RunDir(tmp_path / "run").read_meta()
    unit = meta["privacy_unit"]
    assert meta["task"] == "instruction" and meta["status"] == "finished"
    assert unit["unit"] == "who" and 0 < unit["people"] < 30
    assert meta["sample_rate"] == pytest.approx(6 / unit["people"])
    # the audit by person reads the people as training did (keyed by the task records' ids)
    run = RunDir(tmp_path / "run")
    again = load_recipe(run.recipe)
    train, val, _ = split_data(again, run_key(run.path, again.privacy.insecure_seed, create=False))
    persons = recipe_person_ids(again, "who")
    assert len(read_people(train, persons)) + len(read_people(val, persons)) == 30
    numbered = [
        {**r, "who": [i // 3, float(i // 3), str(i // 3)][i % 3]} for i, r in enumerate(rows)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in numbered))  # 1, 1.0, "1": one person
    assert len(set(recipe_person_ids(again, "who").values())) == 30
    rows[4]["who"] = ""  # a record without its person is refused, naming its line
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"instr\.jsonl:5: the record has no 'who'"):
        person_ids(str(data), "who", task=TaskSection.model_validate(d["task"]))
