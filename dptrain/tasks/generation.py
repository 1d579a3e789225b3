"""Samples from a run's final model and the canary extraction check.

Generation is post-processing of the released model: it costs no privacy budget, and its
randomness is a public seed (``generation.seed`` / ``--seed``), not the run key.  Prompts are
public text given by the user; they are formatted as the run's records were (the chat
template for instruction and chat runs, see :meth:`dptrain.tasks.Task.prompt_ids`).

Canary check (a run with ``data.canaries``): each canary's prefix -- its template up to
``{secret}``, with its pseudonym -- is completed greedily, and the canary counts as extracted
when its secret appears verbatim in the completion (the Secret Sharer's extraction test,
Carlini et al. 2019).  Canaries that were never trained on are the baseline.  Canaries are
plain-text records in every task, so their prefixes are plain text too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import rng

if TYPE_CHECKING:
    from ..data.canaries import Manifest
    from ..recipe import Recipe
    from ..rundir import RunDir
    from . import Task


@dataclass(frozen=True)
class CanaryCheck:
    """How many canary secrets greedy decoding produced verbatim from their prefixes."""

    trained: int
    trained_extracted: int
    untrained: int
    untrained_extracted: int
    max_new_tokens: int

    def line(self) -> str:
        verdict = "" if not self.trained_extracted else "  WARNING: memorized secrets"
        return (
            f"{self.trained_extracted} of {self.trained} trained canary secrets generated "
            f"verbatim from their prefix (greedy; baseline {self.untrained_extracted} of "
            f"{self.untrained} never trained on){verdict}"
        )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """The decoded continuation of each prompt (token ids), greedy at ``temperature`` 0,
    else nucleus sampling; left-padded batches, torch's global RNG left untouched."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    sample = temperature > 0
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its padding advice: the mask is passed
    try:
        with rng.seeded(seed):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[i, width - len(p) :] = 1
                options: dict[str, Any] = (
                    {"do_sample": True, "temperature": temperature, "top_p": top_p}
                    if sample
                    else {"do_sample": False}
                )
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    **options,
                )
                for row in gen[:, width:]:
                    out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    finally:
        model.train(was_training)
        hf_logging.set_verbosity(verbosity)
    return out


def canary_prefix(template: str, name: str) -> str:
    """The canary sentence up to its secret."""
    return template[: template.index("{secret}")].format(name=name)


def canary_check(model: torch.nn.Module, tokenizer: Any, manifest: Manifest) -> CanaryCheck:
    """Greedy completion of every canary's prefix; a secret in its completion is extracted.

    The prefix is tokenized without its trailing whitespace: byte-level BPE attaches a space to
    the next token (``" 482913"``), so a prompt ending in a lone space token is one the model
    never saw in training, and its completion would under-report memorization."""
    n_new = manifest.secret_digits + 4
    prompts = [
        tokenizer(canary_prefix(manifest.template, c.name).rstrip(), add_special_tokens=True)[
            "input_ids"
        ]
        for c in manifest.canaries
    ]
    texts = generate(model, tokenizer, prompts, max_new_tokens=n_new, temperature=0.0)
    hit = [c.secret in t for c, t in zip(manifest.canaries, texts, strict=True)]
    trained = [h for c, h in zip(manifest.canaries, hit, strict=True) if c.included]
    untrained = [h for c, h in zip(manifest.canaries, hit, strict=True) if not c.included]
    return CanaryCheck(len(trained), sum(trained), len(untrained), sum(untrained), n_new)


def secrets_in(texts: list[str], manifest: Manifest) -> int:
    """How many canary secrets (trained or not) appear verbatim in ``texts``."""
    return sum(any(c.secret in t for t in texts) for c in manifest.canaries)


def complete(
    model: torch.nn.Module, tokenizer: Any, task: Task, prompts: list[str], **sampling: Any
) -> list[dict]:
    """``{"prompt", "text"}`` for each prompt, formatted by the task and completed by
    :func:`generate` with ``sampling`` (max_new_tokens, temperature, top_p, seed)."""
    texts = generate(model, tokenizer, [task.prompt_ids(tokenizer, p) for p in prompts], **sampling)
    return [{"prompt": p, "text": t} for p, t in zip(prompts, texts, strict=True)]


def samples(model: torch.nn.Module, tokenizer: Any, task: Task, options: Any) -> list[dict]:
    """``options.samples`` samples of the recipe's ``generation`` section, prompts cycled."""
    prompts = [options.prompts[i % len(options.prompts)] for i in range(options.samples)]
    return complete(
        model,
        tokenizer,
        task,
        prompts,
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        seed=options.seed,
    )


def after_training(
    recipe: Recipe, run: RunDir, model: Any, tokenizer: Any, task: Task, log: Callable[[str], None]
) -> None:
    """Print the recipe's samples and the canary check after a finished run's summary, and
    record them: the samples in ``run.json`` (the released model completing public prompts
    with a public seed), the canary check's counts in ``private/stats.json`` (they split the
    canaries by their secret inclusion coins, and ``trained`` is those coins' sum: published,
    it would tell the adversary of the one-run audit how many canaries are in)."""
    from ..data.canaries import read_manifest

    options = recipe.generation
    if options.samples:
        got = samples(model, tokenizer, task, options)
        for i, s in enumerate(got, start=1):
            shown = s["text"].strip().replace("\n", " | ")
            print(f"sample {i:<13}{s['prompt']!r} -> {shown[:200]}", flush=True)
        run.update_meta(samples=got)
    manifest = read_manifest(run.path) if options.canary_check else None
    if manifest is not None:
        log("canary check: completing each canary's prefix greedily ...")
        check = canary_check(model, tokenizer, manifest)
        print(f"canary check        {check.line()} (private)", flush=True)
        run.update_stats(canary_check=asdict(check))


def load_run(run_dir: str | Path) -> tuple[Recipe, Task, torch.nn.Module, Any]:
    """A finished run's recipe, task and final model (adapter on its base, or full model)."""
    from attacks.audit import load_final_model

    from ..errors import InputError
    from ..recipe import load_recipe
    from ..rundir import RunDir
    from . import task_for

    run = RunDir(run_dir)
    if not run.recipe.exists():
        raise InputError(
            f"{run.path} is not a run directory (no recipe.yaml). Fix: pass the output "
            "directory of a `dptrain train` run"
        )
    if not run.final.exists():
        raise InputError(
            f"{run.path} has no final model yet (final/ is written when the run finishes). "
            f"Fix: finish it with `dptrain train {run.recipe} --resume {run.path}`"
        )
    recipe = load_recipe(run.recipe)
    task = task_for(recipe)
    if not task.generates:
        raise InputError(
            f"{run.path} is a {task.kind} run: its model has a classification head, not a "
            "generator. Nothing to generate"
        )
    model, tok = load_final_model(run, recipe)
    return recipe, task, model, tok
