"""What a run learns from a record: the task layer between the data and the engine.

A :class:`Task` reads the recipe's records (:mod:`.records` for structured ones), builds the
model, tokenizes records into examples, gives the engine its per-sample loss and scores the
validation split.  ``task.kind`` in the recipe picks one (:mod:`.schema`):

=============== ============================== ============================ =================
kind            records                        loss (per record)            validation metric
=============== ============================== ============================ =================
text            ``data.text_field``            mean NLL of every token      perplexity
instruction     prompt / response (/ system)   mean NLL of response tokens  response perplexity
chat            ``messages`` list              mean NLL of assistant turns  response perplexity
classification  text + label of ``labels``     cross-entropy of the label   accuracy, macro-F1
=============== ============================== ============================ =================
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .schema import TASK_KINDS, GenerationSection, TaskSection, check_recipe_task

if TYPE_CHECKING:
    from torch import nn

    from ..data import TextDataset
    from ..losses import LossFn
    from ..recipe import Recipe

__all__ = [
    "TASK_KINDS",
    "GenerationSection",
    "Task",
    "TaskSection",
    "check_recipe_task",
    "task_for",
    "validation_line",
]


class Task:
    """One recipe's task: data, model, examples, loss and metrics (see the module table)."""

    def __init__(self, section: TaskSection) -> None:
        self.section = section
        self.kind = section.kind

    @property
    def generates(self) -> bool:
        """Whether the model is a generator (it has samples and a canary check)."""
        return self.kind != "classification"

    def load(
        self, path: str, text_field: str, format: str | None, *, text_records: str | None = None
    ) -> TextDataset:
        if self.kind == "text":
            from ..data.loading import load_texts

            return load_texts(path, text_field=text_field, format=format, text_records=text_records)
        from .records import load_records

        return load_records(path, self.section, text_field=text_field, format=format)

    def build_model(self, recipe: Recipe) -> tuple[nn.Module, Any]:
        if self.kind == "classification":
            from .classification import build_classifier

            return build_classifier(recipe)
        from ..models import build_model

        return build_model(recipe)

    def encode(self, ds: TextDataset, tokenizer: Any, max_length: int) -> Any:
        if self.kind == "text":
            from ..data import tokenize

            return tokenize(ds, tokenizer, max_length)
        if self.kind == "classification":
            from .classification import encode_classification

            return encode_classification(ds, tokenizer, max_length, self.section.labels or [])
        from .chat import encode_chat

        return encode_chat(ds, tokenizer, max_length, self.section.chat_template)

    @property
    def loss_fn(self) -> LossFn:
        if self.kind == "classification":
            from .classification import classification_head_loss

            return classification_head_loss
        from ..losses import causal_lm_loss

        return causal_lm_loss

    def evaluate(self, model: nn.Module, batches: list[Any]) -> dict[str, float]:
        """Validation metrics (statistics of the validation records: not covered by the
        guarantee, like every number computed from data without noise)."""
        if self.kind == "classification":
            from .classification import classification_metrics

            return classification_metrics(model, batches, len(self.section.labels or []))
        from ..losses import perplexity

        return {"perplexity": perplexity(model, batches)}

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """Token ids of a generation prompt, formatted as the run's records were."""
        if self.kind in ("instruction", "chat"):
            from .chat import generation_prompt

            return generation_prompt(tokenizer, prompt, self.section.chat_template)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        if not ids:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
            start = start if start is not None else tokenizer.eos_token_id
            ids = [start]
        return list(ids)


def task_for(recipe: Recipe) -> Task:
    return Task(recipe.task)


def validation_line(meta: dict[str, Any]) -> str:
    """The summary's validation line: ``val perplexity a -> b`` or accuracy / macro-F1."""
    before, after = meta.get("validation_before") or {}, meta.get("validation_after") or {}
    if "accuracy" in before:
        a, b = before, after
        return (
            f"val accuracy        {a['accuracy']:.3f} -> {b.get('accuracy', math.nan):.3f}  "
            f"(macro-F1 {a['macro_f1']:.3f} -> {b.get('macro_f1', math.nan):.3f})"
        )
    what = "val perplexity" if meta.get("task", "text") == "text" else "val response ppl"
    return (
        f"{what:<20}{meta.get('perplexity_before', math.nan):.3f} -> "
        f"{meta.get('perplexity_after', math.nan):.3f}"
    )
