"""The file-level guarantee (dptrain.plan.file_level): what holds for a record added to the data
file when validation and public splits are drawn from it by key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from dptrain.plan import file_level
from dptrain.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2]
EPS, DELTA = 2.0, 1e-5


def recipe(**data):
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["data"] = {"path": "bundled:clinic_notes", "validation_fraction": 0.25, **data}
    return parse_recipe(d)


def test_validation_records_cost_nothing_while_their_perplexity_stays_private():
    level = file_level(recipe(), EPS, DELTA)
    assert (level["epsilon"], level["delta"]) == (EPS, DELTA)
    assert level["validation_probability"] == 0.25 and level["public_probability"] == 0
    assert "private/" in level["why"]


def test_a_record_that_may_be_declared_public_adds_that_probability_to_delta():
    level = file_level(recipe(public_fraction=0.1), EPS, DELTA)
    b = 0.75 * (2**64 * 0.1 // 1) / 2**64  # the exact keyed threshold, after validation
    assert level["public_probability"] == pytest.approx(b, rel=1e-15)
    assert level["epsilon"] == EPS and level["delta"] == pytest.approx(DELTA + b)
    assert "declared public" in level["why"]


def test_max_records_is_group_privacy_and_the_swapped_record_may_be_public():
    group = (1 + math.exp(EPS)) * DELTA
    level = file_level(recipe(max_records=100), EPS, DELTA)
    assert level["epsilon"] == 2 * EPS and level["delta"] == pytest.approx(group)
    level = file_level(recipe(max_records=100, public_fraction=0.1), EPS, DELTA)
    assert level["delta"] == pytest.approx(group + 0.75 * 0.1 + 0.1)


def test_a_separate_validation_file_leaves_the_training_split_the_whole_file():
    separate = recipe(
        path="bundled:clinic_notes:train", validation_path="bundled:clinic_notes:validation"
    )
    level = file_level(separate, EPS, DELTA)
    assert (level["epsilon"], level["delta"], level["validation_probability"]) == (EPS, DELTA, 0)
    assert "whole file" in level["why"]
    assert file_level(recipe(public_fraction=0.5), math.inf, DELTA)["delta"] == 1.0
