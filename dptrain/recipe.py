"""Recipes: one YAML file describes a whole run, validated by a typed schema.

Errors name the key and the fix.  Checks that need the dataset size (``delta < 1/N``) run
right after the data is read, still before any model is loaded (:func:`check_against_data`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .groups import GROUPINGS
from .tasks.schema import GenerationSection, TaskSection, check_recipe_task

# Keys a resumed run may change without becoming a different run.
RESUMABLE_KEYS = (
    "training.steps",
    "training.epochs",
    "training.checkpoint_every",
    "training.log_every",
    "training.eval_every",
    "training.report_to",
    "training.device",  # a run may resume on another device (checkpoints load on the CPU)
)
# Keys added after runs were already written: left out of the fingerprint at their default,
# so those runs still resume.
LATER_DEFAULTS = {
    "training.precision": "fp32",
    "training.loss_scale": 4096.0,
    "training.gradient_checkpointing": False,
}


# Keys added after runs were started, omitted from the fingerprint while None (their default),
# so that those runs still resume.
ADDED_KEYS = ("data.text_records",)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        description="smollm2-135m, tiny-gpt2, tiny-llama, or a local Hugging Face model directory"
    )
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"


class LoraSection(Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class CanarySection(Section):
    """Secret Sharer canaries (Carlini et al. 2019) inserted into the private training data.

    Canary ``i`` is ``template`` with a random pseudonym for ``{name}`` and a uniformly random
    ``secret_digits``-digit number for ``{secret}``.  Canaries with repetition count 1 are
    included with probability 1/2 (the one-run audit needs exactly that); those with count
    ``k > 1`` are always included, as ``k`` separate training records, so the record-level
    guarantee covers them only through group privacy over ``k`` records.
    """

    template: str = "The secret code of {name} is {secret}."
    secret_digits: int = Field(6, ge=1, le=12, description="secret space: 10^secret_digits")
    repetitions: dict[int, int] = Field(
        default_factory=lambda: {1: 128, 4: 4, 16: 4},
        description="repetition count -> number of canaries with that count",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            raise ValueError(
                "data.canaries.seed was removed: canary secrets and inclusion coins now derive "
                "from the run's secret key, so nobody can regenerate them from the recipe. "
                "Fix: delete the key (for a reproducible, NOT private run set privacy.insecure_seed)"
            )
        return data

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        import string

        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        if fields.count("secret") != 1 or set(fields) - {"name", "secret"}:
            raise ValueError(
                "the template must contain {secret} exactly once and no placeholder other than "
                "{name}, e.g. 'The secret code of {name} is {secret}.'"
            )
        return v

    @field_validator("repetitions")
    @classmethod
    def _repetitions(cls, v: dict[int, int]) -> dict[int, int]:
        if not v:
            raise ValueError("give at least one 'repetition count: number of canaries' pair")
        for k, n in v.items():
            if k < 1 or n < 1:
                raise ValueError(
                    f"{k}: {n} is invalid; counts and numbers of canaries must be >= 1, "
                    "e.g. {1: 128, 4: 4, 16: 4}"
                )
        return dict(sorted(v.items()))


class PrivacyUnitSection(Section):
    """The person as the privacy unit: neighbouring datasets differ by one person with all of
    their records (:mod:`dptrain.user_level`).  ``field`` names the JSONL field / CSV column
    holding each record's person id."""

    field: str = Field(min_length=1, description="the record field holding the person's id")
    strategy: Literal["user", "example"] = Field(
        "user",
        description="user: Poisson sampling of people, each person's records summed and clipped "
        "together (default); example: record-level DP-SGD over at most max_records_per_person "
        "records each, the person-level guarantee by group privacy",
    )
    max_records_per_person: int | None = Field(
        None,
        ge=1,
        description="records of a sampled person used per step (user; default: all of them) "
        "or kept at all (example: required), chosen by the run key",
    )

    @model_validator(mode="after")
    def _example_needs_a_cap(self) -> PrivacyUnitSection:
        """Strategy ``example`` calibrates its noise to group privacy over ``k`` records per
        person, and publishes ``k`` (run.json's ``group_size``, and through the noise).  ``k``
        must therefore be public: the recipe's cap.  Without one it would be the training
        data's largest records-per-person count, a statistic of one person's data."""
        if self.strategy == "example" and self.max_records_per_person is None:
            raise ValueError(
                "strategy example needs data.privacy_unit.max_records_per_person: a public cap "
                "on records per person (records beyond it are dropped, chosen by the run key), "
                "which sets the group size k of the accounting. Without it k would be the "
                "data's largest number of records of one person, a private statistic that the "
                "noise and run.json would publish. Fix: set max_records_per_person (e.g. 8), "
                "or use strategy user (its guarantee does not grow with a person's records)"
            )
        return self


class DataSection(Section):
    """Where the records are.  Relative paths in a recipe file are resolved against the
    recipe's folder (those given with ``--set`` against the working directory)."""

    path: str = Field(
        description="bundled:clinic_notes, a .jsonl / .json / .csv / .tsv / .txt / .parquet "
        "file, or a folder of a `datasets` dataset saved with save_to_disk (or of Parquet files)"
    )
    format: Literal["jsonl", "csv", "tsv", "txt", "paragraphs", "parquet", "arrow"] | None = None
    text_records: Literal["line", "paragraph"] | None = Field(
        None,
        description="plain text only: one record per line, or per paragraph (blocks separated "
        "by blank lines); required when a .txt file has multi-line paragraphs",
    )
    text_field: str = "text"
    max_length: int = Field(128, ge=2)
    validation_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="each record (each person, with all of their records, under "
        "privacy_unit) is held out alone with this probability",
    )
    validation_path: str | None = None
    max_records: int | None = Field(
        None,
        ge=1,
        description="development knob: keep this many records (by keyed hash); the run then "
        "also reports the 2-record group-privacy epsilon for neighbouring files",
    )
    max_validation_records: int | None = Field(256, ge=1)
    public_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="each training record is declared public (not protected) alone with this "
        "probability",
    )
    public_path: str | None = Field(None, description="a file of public (not protected) records")
    max_public_records: int | None = Field(64, ge=1)
    privacy_unit: PrivacyUnitSection | None = Field(
        None, description="default (null): the record; {field: patient_id}: the person"
    )
    person_field: str | None = Field(
        None,
        description="record-level runs: the field naming each record's person; the summary "
        "adds the person-level epsilon by group privacy (the guarantee stays per record)",
    )

    @field_validator("privacy_unit", mode="before")
    @classmethod
    def _unit(cls, v: Any) -> Any:
        if v == "record":
            return None
        if isinstance(v, str):
            raise ValueError(
                f"privacy_unit is 'record' (the default) or a mapping such as "
                f"{{field: {v}}} naming the field that holds each record's person id"
            )
        return v

    @model_validator(mode="after")
    def _one_public(self) -> DataSection:
        if self.public_fraction is not None and self.public_path is not None:
            raise ValueError("set at most one of data.public_fraction and data.public_path")
        if self.privacy_unit is not None and self.public_fraction is not None:
            raise ValueError(
                "data.public_fraction with data.privacy_unit: the public split is drawn per "
                "record, so a person could be part public and part private. Fix: give the "
                "public records as data.public_path"
            )
        if self.privacy_unit is not None and self.person_field is not None:
            raise ValueError(
                "data.person_field is for record-level runs; with data.privacy_unit the person "
                "is already the unit. Fix: delete data.person_field"
            )
        if self.public_fraction is not None and self.canaries is not None:
            raise ValueError(
                "data.canaries with data.public_fraction: a canary could land in the public "
                "split, which is not trained on, and the audit would count it as a member. "
                "Fix: give the public records as data.public_path, or audit a run without them"
            )
        return self

    canaries: CanarySection | None = None


class TrainingSection(Section):
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: float | None = Field(
        None, gt=0, description="expected logical (Poisson) batch size"
    )
    sample_rate: float | None = Field(None, gt=0, le=1)
    physical_batch_size: int = Field(8, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(25, ge=1)
    log_every: int = Field(1, ge=1)
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="auto (a GPU when CUDA is available, else the CPU), cpu, cuda or cuda:N; "
        "--nproc ranks take cuda:LOCAL_RANK",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the forward and backward (fp16 with training.loss_scale)"
    )
    loss_scale: float = Field(
        4096.0, gt=0, description="fp16 only: a fixed power of two (never adapted from data)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (Hugging Face models)"
    )

    @field_validator("loss_scale")
    @classmethod
    def _power_of_two(cls, v: float) -> float:
        if not (math.isfinite(v) and math.frexp(v)[0] == 0.5):
            raise ValueError("training.loss_scale must be a power of two, e.g. 4096")
        return v

    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="experiment loggers fed the metrics.jsonl records (tensorboard: "
        "RUN_DIR/private/tensorboard, needs the tensorboard extra)",
    )

    @model_validator(mode="after")
    def _one_of(self) -> TrainingSection:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.steps and training.epochs")
        if (self.batch_size is None) == (self.sample_rate is None):
            raise ValueError("set exactly one of training.batch_size and training.sample_rate")
        return self


class PolicySection(Section):
    """``name`` picks the policy; the remaining keys are that policy's options."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "static"
    grouping: str = "flat"
    clip: float = Field(1.0, gt=0)
    noise_multiplier: float | None = Field(None, ge=0)

    @field_validator("grouping")
    @classmethod
    def _grouping(cls, v: str) -> str:
        if v not in GROUPINGS:
            raise ValueError(f"choose one of {', '.join(GROUPINGS)}")
        return v

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrivacySection(Section):
    """The budget, and where the run's randomness comes from.

    Every private random choice (Poisson coins, noise, splits, canaries) derives from a secret
    run key drawn from the OS CSPRNG (:mod:`dptrain.secret`).  ``insecure_seed`` derives the key
    from that integer instead: the run is reproducible and has NO privacy guarantee against
    anyone who knows the seed (tests, debugging).  Neighbours: add/remove one record, with the
    training-set size ``N`` public (the default delta ``1 / (10 N)`` depends on it).
    """

    epsilon: float = Field(8.0, gt=0, description="the budget; also the calibration target")
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 N)")
    accountant: Literal["rdp", "prv", "pld"] = "rdp"
    insecure_seed: int | None = Field(
        None, description="reproducible randomness: NO guarantee against anyone knowing it"
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "secure_noise" in data:
            raise ValueError(
                "privacy.secure_noise was removed: every run now draws its noise and its Poisson "
                "coins from a secret per-run key (secure by default). Fix: delete the key; for a "
                "reproducible, NOT private run set privacy.insecure_seed: <int>"
            )
        return data


class AuditSection(Section):
    """Options of ``dptrain audit`` (see :mod:`attacks.audit`); they never change training."""

    after_training: bool = Field(False, description="audit the run as soon as it finishes")
    members: int = Field(128, ge=4, description="training records scored (at most)")
    non_members: int = Field(128, ge=4, description="held-out records scored (at most)")
    population: int = Field(64, ge=1, description="RMIA population records (at most)")
    shadows: int = Field(0, ge=0, le=64, description="shadow models (0 or even)")
    shadow_steps: int | None = Field(None, ge=1, description="default: the run's steps")
    confidence: float = Field(0.95, ge=0.5, lt=1)
    exposure_canaries: int = Field(2, ge=1, description="canaries per repetition count")
    exposure_samples: int = Field(128, ge=16, description="candidates when not enumerated")
    exposure_exact_limit: int = Field(10_000, ge=10, description="enumerate up to this many")
    min_k: float = Field(0.2, gt=0, le=1, description="fraction of tokens for min-k% prob")
    rmia_gamma: float = Field(1.0, ge=1)
    rmia_offline_a: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1, description="records per forward pass")
    whitebox: bool = Field(
        False, description="white-box canary audit of the run's privacy configuration"
    )
    whitebox_canaries: int = Field(1000, ge=16, le=100_000, description="white-box canaries")
    whitebox_simulations: int = Field(
        32, ge=0, le=1000, description="simulated runs of the perfect attacker (0: none)"
    )

    @field_validator("shadows")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(
                "use an even number of shadow models (each record is in exactly half of them)"
            )
        return v


class Recipe(Section):
    command: ClassVar[str] = "train"  # the dptrain subcommand that runs this kind of recipe

    name: str = "run"
    seed: int = Field(
        0,
        description="non-private randomness only (initialization, the rl agent, audit shadow "
        "splits); coins, noise, splits, canaries and the model's dropout in a private step "
        "come from the run key",
    )
    output_dir: str | None = None
    model: ModelSection
    lora: LoraSection | None = None
    data: DataSection
    training: TrainingSection
    policy: PolicySection = Field(default_factory=PolicySection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    audit: AuditSection | None = None
    task: TaskSection = Field(default_factory=TaskSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)

    @model_validator(mode="after")
    def _task(self) -> Recipe:
        check_recipe_task(self)  # dptrain.tasks: the rules between task and other sections
        return self

    @model_validator(mode="after")
    def _non_private(self) -> Recipe:
        """No clipping or no noise is a non-private baseline: allowed only when said so."""
        p, eps = self.policy, self.privacy.epsilon
        if math.isinf(p.clip) and p.noise_multiplier != 0:
            raise ValueError(
                "policy.clip: .inf (no clipping) leaves the sensitivity unbounded, so no noise "
                "can make the run private. For a non-private baseline on purpose set "
                "policy.noise_multiplier: 0 and privacy.epsilon: .inf; otherwise use a finite clip"
            )
        if p.noise_multiplier == 0 and not math.isinf(eps):
            raise ValueError(
                "policy.noise_multiplier: 0 adds no noise, so epsilon is infinite and the budget "
                f"{eps:g} cannot hold. For a non-private baseline on purpose set privacy.epsilon: "
                ".inf; otherwise omit noise_multiplier to calibrate it from the budget"
            )
        if math.isinf(eps) and p.noise_multiplier is None:
            raise ValueError(
                "privacy.epsilon: .inf (no budget) cannot calibrate the noise. Set "
                "policy.noise_multiplier (0 for a non-private baseline), or give a finite epsilon"
            )
        return self

    @model_validator(mode="after")
    def _unit_without_a_record_count(self) -> Recipe:
        """``data.max_records`` keeps a count of records by keyed hash, not of people: an added
        person with ``m`` records can push up to ``m`` records of other people out, and a
        person's records can be cut in part, so the person-level guarantee would not hold for
        a person added to the file (and the file-level figure, a 2-record group bound, is a
        record's).  (A federated recipe refuses ``data.privacy_unit`` on its own.)"""
        d = self.data
        if self.command == "train" and d.privacy_unit is not None and d.max_records is not None:
            raise ValueError(
                "data.max_records with data.privacy_unit: the cap keeps a count of records, not "
                "of people, so one added person with m records can push records of up to m other "
                "people out (and cut a person's records in part): the person-level guarantee "
                "would not hold for the data file. Fix: delete data.max_records (use a smaller data file), and bound each "
                "person's records with data.privacy_unit.max_records_per_person"
            )
        return self

    @model_validator(mode="after")
    def _audit_unit(self) -> Recipe:
        if self.data.privacy_unit is not None and self.audit is not None:
            raise ValueError(
                "audit with data.privacy_unit: the after-training audit scores records against "
                "a record-level claim, which would compare the wrong quantities; the "
                "person-level audit (membership by person, canary people) runs on its own. "
                "Fix: delete the audit section and run `dptrain audit RUN_DIR` after training"
            )
        return self

    def run_dir(self, override: str | Path | None = None) -> Path:
        return Path(override or self.output_dir or Path("runs") / self.name)

    def fingerprint(self, ignore: tuple[str, ...] = RESUMABLE_KEYS) -> str:
        """Hash of everything that must match for a resume (:func:`resume_identity`)."""
        d = resume_identity(self.model_dump(mode="json"), ignore)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def resume_identity(
    dumped: dict[str, Any], ignore: tuple[str, ...] = RESUMABLE_KEYS
) -> dict[str, Any]:
    """The part of a dumped recipe (``model_dump(mode="json")``, as in a run's ``recipe.yaml``)
    that must match for a resume: without ``ignore`` (the resumable keys), ``output_dir``,
    ``audit`` and ``generation``, and without keys added later while at their default."""
    d = copy.deepcopy(dumped)
    for dotted in ignore:
        section, key = dotted.split(".")
        d.get(section, {}).pop(key, None)
    for dotted, default in LATER_DEFAULTS.items():
        section, key = dotted.split(".")
        if d.get(section, {}).get(key, default) == default:
            d.get(section, {}).pop(key, None)
    d.pop("output_dir", None)
    d.pop("audit", None)  # audit options never change training
    d.pop("generation", None)  # nor do the samples drawn after it
    if d.get("task") == TaskSection().model_dump(mode="json"):
        d.pop("task")  # runs from before the task section keep their fingerprint
    for dotted in ADDED_KEYS:  # at their default, runs started before them still resume
        section, key = dotted.split(".")
        if isinstance(d.get(section), dict) and d[section].get(key) is None:
            d[section].pop(key, None)
    return d


def resume_blockers(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``KEY: OLD -> NEW`` for each key of two dumped recipes that differs and blocks a resume
    (the keys of :func:`resume_identity`; a resumable key such as ``training.steps`` never
    blocks), sorted by key."""
    a, b = resume_identity(old), resume_identity(new)
    out = []
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [
                f"{section}.{k}: {x.get(k)!r} -> {y.get(k)!r}"
                for k in sorted(set(x) | set(y))
                if x.get(k) != y.get(k)
            ]
        elif x != y:
            out.append(f"{section}: {x!r} -> {y!r}")
    return out


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


# Recipe kinds beyond `dptrain train`: a top-level section that marks the kind -> its schema
# ("module:Class", imported when a recipe with that section is parsed).
RECIPE_KINDS: dict[str, str] = {"federated": "dptrain.federated.recipe:FederatedRecipe"}


def recipe_schema(data: dict[str, Any]) -> type[Recipe]:
    """The schema for a recipe dict: a registered kind if its marker section is present."""
    for section, ref in RECIPE_KINDS.items():
        if section in data:
            module, name = ref.split(":")
            return getattr(importlib.import_module(module), name)
    return Recipe


def _friendly(
    err: ValidationError,
    source: str,
    root: type[BaseModel] = Recipe,
    origins: dict[str, str] | None = None,
) -> RecipeError:
    lines = []
    blamed = 0
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        origin = _origin(loc, origins or {})
        blamed += origin is not None
        line = _describe_error(e, loc, root)
        lines.append(line if origin is None else f"{line} [from --set {origin}]")
    if blamed and blamed == len(lines):
        return RecipeError(f"invalid --set for recipe {source}:\n  " + "\n  ".join(lines))
    return RecipeError(f"invalid recipe {source}:\n  " + "\n  ".join(lines))


def _origin(loc: str, origins: dict[str, str]) -> str | None:
    """The ``--set`` item that wrote the key at ``loc`` (or a section above it), if any."""
    for dotted, item in origins.items():
        if loc == dotted or loc.startswith(dotted + ".") or dotted.startswith(loc + "."):
            return item
    return None


def _describe_error(e: Any, loc: str, root: type[BaseModel]) -> str:
    """One line for one pydantic error: the dotted key, what is wrong, the fix."""
    kind = e["type"]
    if kind == "extra_forbidden":
        parent = _section_model(e["loc"][:-1], root)
        key = str(e["loc"][-1])
        close = difflib.get_close_matches(key, _known_keys(parent), n=1) if parent else []
        hint = f" Did you mean '{close[0]}'?" if close else ""
        known = ", ".join(_known_keys(parent)) if parent else ""
        return f"{loc}: unknown key.{hint} Known keys here: {known}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    got = e.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}{got_s}" if loc else msg


def _section_model(loc: tuple, root: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", None)
        if args:
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        model = ann
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def parse_recipe(
    data: dict[str, Any],
    source: str = "<dict>",
    schema: type[Recipe] | None = None,
    *,
    origins: dict[str, str] | None = None,
) -> Recipe:
    """Validate a recipe dict (including the chosen policy's options); ``schema`` defaults to
    the kind its sections mark (see :data:`RECIPE_KINDS`).  ``origins`` maps dotted keys set on
    the command line to their ``--set`` item, which errors about them then name."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: the top level must be a mapping of sections")
    schema = schema or recipe_schema(data)
    try:
        recipe = schema.model_validate(data)
    except ValidationError as err:
        raise _friendly(err, source, schema, origins) from None
    _check_policy(recipe, source)
    return recipe


def _check_policy(recipe: Recipe, source: str) -> None:
    """The policy's name, its accountant rule and its options, from the policy registry."""
    from .policies import accountant_refusal, policy_spec

    try:
        spec = policy_spec(recipe.policy.name)
    except RecipeError as err:
        raise RecipeError(f"invalid recipe {source}:\n  {err}") from None
    name = spec.name
    reason = accountant_refusal(spec, recipe.privacy.accountant)
    if reason is not None:
        raise RecipeError(f"invalid recipe {source}:\n  {reason}")
    schema = spec.options
    extra = recipe.policy.options
    if schema is None:
        if extra:
            raise RecipeError(
                f"invalid recipe {source}:\n  policy.{next(iter(extra))}: unknown key for policy "
                f"'{name}'. Known keys: name, grouping, clip, noise_multiplier"
            )
        return
    try:
        schema.model_validate(extra)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = "policy." + ".".join(str(x) for x in e["loc"])
            if e["type"] == "extra_forbidden":
                known = ", ".join(
                    ["name", "grouping", "clip", "noise_multiplier", *schema.model_fields]
                )
                lines.append(f"{loc}: unknown key for policy '{name}'. Known keys: {known}")
            else:
                lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
        raise RecipeError(f"invalid recipe {source}:\n  " + "\n  ".join(lines)) from None


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, command: str | None = None
) -> Recipe:
    """Read a YAML recipe; ``overrides`` are ``section.key=value`` strings (YAML values).
    With ``command``, a recipe of another kind is an error naming the command that runs it."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {path}: the top level must be a mapping of sections")
    resolve_data_paths(data, path.parent.resolve())
    origins: dict[str, str] = {}
    for item in overrides or []:
        dotted, value = _parse_override(item)
        _apply_override(data, dotted, value, item)
        origins[dotted] = item
        if dotted in _PATH_KEYS:
            resolve_data_paths(data, Path.cwd(), only=dotted)
    recipe = parse_recipe(data, str(path), origins=origins)
    if command is not None and recipe.command != command:
        raise RecipeError(
            f"{path} is a {recipe.command} recipe, not a {command} one: run it with "
            f"`dptrain {recipe.command} {path}`"
        )
    return recipe


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: plain YAML keeps the
    last silently, so a second ``privacy:`` section would replace the first's epsilon."""


def _unique_keys(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            again = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if again:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice (lines {seen[key]} and {line}); YAML would "
                "silently keep the last. Fix: merge them into one",
                key_node.start_mark,
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


_PATH_KEYS = ("data.path", "data.validation_path", "data.public_path")


def _parse_override(item: str) -> tuple[str, Any]:
    """``section.key=VALUE`` -> (dotted key, the YAML value); errors name the ``--set``."""
    usage = "write --set section.key=value, e.g. --set training.steps=10"
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: no '='; {usage}")
    dotted, text = item.split("=", 1)
    dotted = dotted.strip()
    if not dotted:
        raise RecipeError(f"--set {item!r}: no key before '='; {usage}")
    if any(not part for part in dotted.split(".")):
        raise RecipeError(f"--set {item!r}: empty part in the key {dotted!r}; {usage}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(
            f"--set {item!r}: the value {text!r} is not valid YAML ({problem}). Fix: quote the "
            "whole item for the shell and close brackets and quotes, e.g. "
            "--set 'training.steps=10' or --set 'lora.target_modules=[q_proj, v_proj]'"
        ) from None
    return dotted, value


def _apply_override(data: dict[str, Any], dotted: str, value: Any, item: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:  # e.g. `lora: null` in the file, then --set lora.r=4
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise RecipeError(
                f"--set {item!r}: {where} is {child!r}, not a section, so it has no key "
                f"{parents[i + 1] if i + 1 < len(parents) else leaf!r}. Fix: set {where} itself"
            )
        node = child
    node[leaf] = value


def resolve_data_paths(data: dict[str, Any], base: Path, only: str | None = None) -> None:
    """Make the relative data paths of a recipe dict absolute against ``base`` (the recipe's
    folder for a file's paths, the working directory for ``--set`` ones); a relative path that
    does not exist there is an error naming the folder used."""
    section = data.get("data")
    if not isinstance(section, dict):
        return
    for dotted in _PATH_KEYS:
        key = dotted.split(".")[1]
        value = section.get(key)
        if (only is not None and dotted != only) or not isinstance(value, str):
            continue
        if value.startswith("bundled:") or not value:
            continue
        p = Path(value).expanduser()
        if p.is_absolute():
            section[key] = str(p)
            continue
        resolved = (base / p).resolve()
        if not resolved.exists():
            where = "the working directory" if only else "the recipe's folder"
            hint = ""
            elsewhere = Path.cwd() / p
            if not only and elsewhere.exists():
                hint = (
                    f"; {value} exists in the working directory ({Path.cwd()}): give its "
                    f"absolute path {elsewhere.resolve()}, or a path relative to {base}"
                )
            raise RecipeError(
                f"{dotted}: {value} not found in {where} {base} (relative data paths in a "
                f"recipe file are resolved against the recipe's folder, those given with --set "
                f"against the working directory){hint}"
            )
        section[key] = str(resolved)


def default_delta(n: int) -> float:
    """``1 / (10 N)``, well below the ``1 / N`` at which (eps, delta)-DP stops protecting anyone."""
    return 1.0 / (10.0 * n)


def check_against_data(recipe: Recipe, n: int, unit: str = "records") -> tuple[float, float, int]:
    """Resolve (sample_rate, delta, steps) for a training set of ``n`` privacy units
    (``unit``: records, or people under ``data.privacy_unit``), or raise."""
    t = recipe.training
    if n < 2:
        raise RecipeError(
            f"data.path: the training set has {n} {unit}; DP training needs a dataset "
            "(the sample rate is undefined otherwise). Fix: point data.path at more records."
        )
    q = t.sample_rate if t.sample_rate is not None else t.batch_size / n
    if q > 1:
        raise RecipeError(
            f"training.batch_size: {t.batch_size} exceeds the {n} training {unit} (sample rate "
            f"{q:.3g} > 1). Fix: lower training.batch_size below {n}."
        )
    delta = recipe.privacy.delta if recipe.privacy.delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise RecipeError(
            f"privacy.delta: {delta:g} is not below 1/N = {1.0 / n:g} (N = {n} {unit}); such a "
            f"delta allows publishing a whole {'person' if unit == 'people' else 'record'}. Fix: "
            f"set privacy.delta below {1.0 / n:.2g}, "
            f"e.g. {default_delta(n):.2g}."
        )
    steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs / q))
    return q, delta, steps


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
