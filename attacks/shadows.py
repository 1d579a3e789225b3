"""Shadow models: the run's own recipe trained on random halves of the data, cached in
``RUN_DIR/audit/shadows/`` and reused by later audits.

Every record of the pool (the run's training records, canaries excluded, plus as many of its
held-out records, the audited ones first) is assigned to exactly ``K / 2`` of the ``K`` shadow models, at random (seeded), so
each audited record has as many "in" as "out" models (LiRA's online setting).  Shadow ``k`` is
``dptrain train`` with the run's resolved recipe, except: its data is its half of the pool
(``shadow-k/train.jsonl``, private data: it stays in the run directory), validation is 8
records it did not train on, the sample rate is the run's (so a record is sampled as often as
in the run), delta is the run's, there are no canaries, and ``steps`` may be lowered with
``shadow_steps`` (the noise is then calibrated to the same budget over fewer steps; a cheaper,
less faithful imitation of the run).  A shadow whose plan is the run's (the same epsilon,
delta, q, steps, accountant and policy: no ``shadow_steps``) takes the run's calibrated sigma
from ``run.json`` instead of calibrating again (:class:`dptrain.plan.CalibratedNoise`).  Shadow models are audit artifacts, never released.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dptrain.data import TextDataset
from dptrain.errors import InputError
from dptrain.plan import CalibratedNoise
from dptrain.recipe import Recipe, load_recipe, parse_recipe
from dptrain.rundir import RunDir, read_json, write_json

__all__ = ["Shadow", "shadow_models"]

_VALIDATION_RECORDS = 8


@dataclass
class Shadow:
    path: Path
    recipe: Recipe
    members: set[str]  # record ids it trained on


def _key(recipe: Recipe, pool: TextDataset, count: int, steps: int | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([recipe.fingerprint(), count, steps, recipe.seed]).encode())
    for rid in pool.ids:
        h.update(rid.encode() + b"\0")
    return h.hexdigest()[:16]


def _write_jsonl(path: Path, data: TextDataset, kind: str) -> None:
    """The records as JSONL: ``text`` for plain text; a structured record's canonical fields
    (:mod:`dptrain.tasks.records`), which :func:`_shadow_recipe` names as the task's fields."""
    from dptrain.rundir import atomic_write
    from dptrain.tasks.records import decode_record

    def write(f: Any) -> None:
        for rid, text in zip(data.ids, data.texts, strict=True):
            fields = decode_record(text, rid) if kind != "text" else None
            f.write(json.dumps({"id": rid, **(fields or {"text": text})}) + "\n")

    atomic_write(path, write)


def _shadow_recipe(
    recipe: Recipe, meta: dict[str, Any], path: Path, k: int, steps: int | None
) -> Recipe:
    d = recipe.model_dump()  # python mode: keeps inf (a non-private run's clip and budget)
    d["name"] = f"{recipe.name}-shadow-{k}"
    d["output_dir"] = str(path)
    d["audit"] = None
    d["data"].update(
        path=str(path / "train.jsonl"),
        format="jsonl",
        text_field="text",
        validation_path=str(path / "validation.jsonl"),
        max_records=None,
        max_validation_records=None,
        canaries=None,
    )
    n_steps = steps or int(meta["planned_steps"])
    d["training"].update(
        steps=n_steps,
        epochs=None,
        sample_rate=float(meta["sample_rate"]),
        batch_size=None,
        checkpoint_every=n_steps,
        eval_every=0,
    )
    if d["task"]["kind"] != "text":  # the canonical field names of _write_jsonl
        d["task"].update(
            prompt_field="prompt",
            response_field="response",
            messages_field="messages",
            label_field="label",
            system_field="system" if d["task"]["system_field"] is not None else None,
        )
    d["privacy"]["delta"] = float(meta["delta"])
    seed = d["privacy"].get("insecure_seed")
    if seed is not None:  # a reproducible audit: still one independent stream per shadow
        digest = hashlib.sha256(f"{seed}:shadow:{k}".encode()).digest()
        d["privacy"]["insecure_seed"] = int.from_bytes(digest[:7], "big")
    return parse_recipe(d, f"shadow {k} of {recipe.name}")


def shadow_models(
    run: RunDir,
    meta: dict[str, Any],
    pool: TextDataset,
    count: int,
    *,
    steps: int | None = None,
    progress: bool = True,
    log=print,
) -> list[Shadow]:
    """Train (or reuse) ``count`` shadow models of ``run`` on random halves of ``pool``."""
    from dptrain.train import train

    if count == 0:
        return []
    if count % 2:
        raise InputError("use an even number of shadow models")
    recipe = load_recipe(run.recipe)
    root = run.path / "audit" / "shadows"
    key = _key(recipe, pool, count, steps)
    index = root / "index.json"
    if root.exists() and (not index.exists() or read_json(index).get("key") != key):
        log(f"shadow models in {root} were made for another pool or count: rebuilding them")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json(index, {"key": key, "count": count, "steps": steps})

    rng = np.random.default_rng([recipe.seed, 0x5AD0])
    order = np.argsort(rng.random((len(pool), count)), axis=1)
    member = np.zeros((count, len(pool)), dtype=bool)
    member[order[:, : count // 2].T, np.arange(len(pool))[None, :]] = True

    # the run's sigma, taken by a shadow whose plan is the run's (calibrated anew otherwise)
    calibrated = CalibratedNoise.of_run(meta, recipe)
    shadows = []
    for k in range(count):
        path = root / f"shadow-{k:02d}"
        inside = np.flatnonzero(member[k])
        outside = np.flatnonzero(~member[k])
        srecipe = _shadow_recipe(recipe, meta, path, k, steps)
        shadow_run = RunDir(path)
        done = shadow_run.exists() and shadow_run.read_meta().get("status") == "finished"
        if not done:
            if shadow_run.exists() and not shadow_run.checkpoint_files():
                # nothing to resume from, and its used key must not start over: a fresh start
                # with a fresh key (a shadow model is never released)
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
            kind = recipe.task.kind
            _write_jsonl(path / "train.jsonl", pool.subset(inside.tolist()), kind)
            pick = np.random.default_rng([recipe.seed, 0x5AD0, k])
            val_idx = pick.choice(outside, min(_VALIDATION_RECORDS, len(outside)), replace=False)
            _write_jsonl(path / "validation.jsonl", pool.subset(sorted(val_idx.tolist())), kind)
            resume = shadow_run.exists()
            log(
                f"{'resuming' if resume else 'training'} shadow model {k + 1}/{count} "
                f"({len(inside)} records, {srecipe.training.steps} steps) in {path}"
            )
            with contextlib.redirect_stdout(sys.stderr):
                train(
                    srecipe,
                    path,
                    resume=resume,
                    progress=progress,
                    cross_check=False,
                    calibrated=calibrated,
                )
            shutil.rmtree(shadow_run.checkpoints, ignore_errors=True)
        shadows.append(Shadow(path, srecipe, {pool.ids[i] for i in inside}))
    return shadows
