"""Recipe sections of the task layer: ``task`` (what is learned from a record) and
``generation`` (samples written after training; they never change training).

``task`` is a section or its ``kind`` alone (``task: classification``):

- ``text`` (default): the record's ``data.text_field`` as one sequence, loss on every token;
- ``instruction``: fields ``prompt_field`` / ``response_field`` (and ``system_field`` when
  set), loss on the response tokens only;
- ``chat``: a list of ``{"role", "content"}`` messages in ``messages_field``, loss on the
  assistant turns only;
- ``classification``: ``data.text_field`` and a label in ``label_field``, one of ``labels``.

One record stays one privacy unit whatever the kind (a whole conversation is one unit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from ..recipe import Recipe

TASK_KINDS = ("text", "instruction", "chat", "classification")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskSection(_Section):
    kind: Literal["text", "instruction", "chat", "classification"] = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str | None = Field(None, description="instruction: optional system message")
    messages_field: str = "messages"
    label_field: str = "label"
    labels: list[str] | None = Field(
        None,
        description="classification: the label set, given in the recipe (a label set derived "
        "from the data would itself reveal private records)",
    )
    chat_template: Literal["auto", "plain"] = Field(
        "auto",
        description="auto: the tokenizer's chat template, or the plain format when it has none; "
        "plain: always the plain format (see dptrain.tasks.chat)",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        v = [str(x) for x in v]
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("give at least two distinct labels, e.g. [negative, positive]")
        return v

    @model_validator(mode="after")
    def _needs_labels(self) -> TaskSection:
        if self.kind == "classification" and self.labels is None:
            raise ValueError(
                "task.labels is required for classification: list the classes in the recipe "
                "(a label set read from the private data would reveal a label that only one "
                "record has)"
            )
        if self.kind != "classification" and self.labels is not None:
            raise ValueError(
                f"task.labels is only used by kind: classification (kind is {self.kind})"
            )
        return self


class GenerationSection(_Section):
    """Samples from the final model in the run's summary (and, for a run with canaries, the
    check that no canary secret is generated verbatim).  Post-processing of the released model:
    it costs no privacy budget and never changes training."""

    samples: int = Field(2, ge=0, le=32, description="samples printed after training (0: none)")
    prompts: list[str] = Field(
        default_factory=lambda: [""],
        description="public prompts, cycled over the samples ('' : unconditional)",
    )
    max_new_tokens: int = Field(40, ge=1, le=1024)
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(0.95, gt=0, le=1)
    canary_check: bool = Field(True, description="with data.canaries: prompt each canary's prefix")
    seed: int = Field(0, description="sampling randomness (public: samples are post-processing)")


def check_recipe_task(recipe: Recipe) -> None:
    """Cross-section rules of the task kinds (raised as recipe errors naming the fix)."""
    kind = recipe.task.kind
    if kind == "text":
        return
    if recipe.command != "train":
        raise ValueError(
            f"task.kind {kind} is supported by `dptrain train` only; a {recipe.command} recipe "
            "trains on plain text. Fix: remove the task section"
        )
    if recipe.data.canaries is not None and kind == "classification":
        raise ValueError(
            "data.canaries with task: classification: canaries are sentences with a secret for "
            "a language model to memorize; a classifier has none. Fix: remove data.canaries"
        )
    if kind == "classification" and recipe.policy.name == "rl":
        raise ValueError(
            "policy rl rewards the public perplexity of a language model; task: classification "
            "has none. Fix: use policy static or error_feedback"
        )
