"""The recipe: a typed, validated description of a continual pre-training run.

A recipe is YAML read with ``yaml.safe_load`` (tags that build Python objects are refused),
merged with named mixtures from ``data_mixtures/`` and ``--set`` overrides, then validated by
pydantic. Every problem is reported as ``<file>: <field.path>: <message>`` so the CLI can
print one actionable line per problem.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, Field, ValidationError, model_validator

from cpt.config.data import DomainConfig
from cpt.config.evaluation import EvaluationConfig, task_problem
from cpt.config.mixture import MixtureConfig
from cpt.data.mixture import weight_matrix
from cpt.data.sources import check_domain
from cpt.config.tokenizer import TokenizerConfig
from cpt.errors import CptError, CptErrors
from cpt.schema import Strict
from cpt.config.training import DistributedConfig, EmaConfig, OptimizerConfig
from cpt.config.schedule import ScheduleConfig, validate_schedule

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(value: str) -> str:
    if not STAGE_NAME.match(value):
        raise ValueError("must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return value


# Names of recipes and stages become directory names.
Name = Annotated[str, AfterValidator(_check_name)]


class ModelConfig(Strict):
    """Where a stage's starting weights come from: an HF directory / hub id, or a fresh config."""

    path: str | None = Field(
        default=None,
        description="A Hugging Face model directory or hub id to load the weights from; give this or config.",
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="A transformers model config (needs model_type) to build freshly initialised weights from, "
        "seeded by seed plus the stage's index; vocab_size defaults to the tokenizer's size.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelConfig:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of a path / hub id or {config: {...}}")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config needs a model_type (e.g. llama, gpt2, qwen2)")
        return self


class BatchConfig(Strict):
    """Global batch in sequences per optimizer step; accumulation follows from the world size."""

    global_batch_size: int = Field(
        gt=0,
        description="Sequences (of seq_len tokens) per optimizer step, summed over all processes; "
        "a multiple of micro_batch_size that splits evenly over the processes.",
    )
    micro_batch_size: int = Field(
        gt=0,
        description="Sequences per forward and backward pass on one process; gradients are accumulated "
        "over `global_batch_size / (micro_batch_size * processes)` passes.",
    )


class CheckpointConfig(Strict):
    every: int | None = Field(
        default=None,
        gt=0,
        description="Also checkpoint at every multiple of this many optimizer steps; null: only at the stage's end, "
        "at the end of each schedule decay and when the run is asked to stop.",
    )
    keep: int | None = Field(
        default=2,
        gt=0,
        description="How many of the stage's newest checkpoints stay on disk (older ones are deleted); null: all.",
    )


class Stage(Strict):
    name: Name = Field(
        description="The stage's name: its directory under output_dir, and how `--set` addresses it (`stages.<name>`)."
    )
    model: ModelConfig | None = Field(
        default=None,
        description="Starting weights; null: the previous stage's final weights (the first stage must give one).",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Let transformers run model code that ships with the checkpoint (custom architectures).",
    )
    tokenizer: TokenizerConfig | None = Field(
        default=None,
        description="The stage's tokenizer; null: the one in the model directory, else the previous stage's.",
    )
    data: dict[str, DomainConfig] = Field(
        default_factory=dict,
        description="The domains this stage introduces, by name (at least one); a name is defined once per recipe, "
        "and later stages can mix or replay it.",
    )
    mixture: MixtureConfig = Field(
        default_factory=MixtureConfig,
        description="Which share of every step's batch each domain gets; default: the natural proportions "
        "of the stage's own domains.",
    )
    schedule: ScheduleConfig = Field(
        description="The learning rate over the stage's steps, chosen by type; every stage starts its schedule "
        "and optimizer afresh."
    )
    steps: int | None = Field(
        default=None, gt=0, description="Length of the stage in optimizer steps; give exactly one of steps and tokens."
    )
    tokens: int | None = Field(
        default=None,
        gt=0,
        description="Length of the stage in training tokens, rounded up to whole steps of "
        "`global_batch_size * seq_len` tokens; give exactly one of steps and tokens.",
    )
    seq_len: int = Field(
        gt=1,
        description="Tokens per training sequence: documents, each ended by EOS, are packed into blocks this long.",
    )
    batch: BatchConfig = Field(description="Sequences per optimizer step and per forward pass.")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="AdamW settings and the policy for non-finite steps."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="When resumable checkpoints are saved and how many are kept."
    )
    log_every: int = Field(
        default=1,
        gt=0,
        description="Write a training record to metrics.jsonl at every multiple of this many optimizer steps "
        "(and always at the last step and after a skipped one).",
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Held-out loss and harness tasks measured during the stage."
    )
    ema: EmaConfig | None = Field(
        default=None,
        description="Keep an exponential moving average of the weights during the stage, evaluated beside them; "
        "null: none.",
    )

    @model_validator(mode="after")
    def _budget(self) -> Stage:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        if self.batch.global_batch_size % self.batch.micro_batch_size:
            raise ValueError(
                f"batch.global_batch_size {self.batch.global_batch_size} is not a multiple of "
                f"batch.micro_batch_size {self.batch.micro_batch_size}"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the stage; a token budget rounds up to whole steps."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / self.tokens_per_step)


class Recipe(Strict):
    name: Name = Field(description="The run's name; output_dir defaults to `runs/<name>`.")
    output_dir: str | None = Field(
        default=None,
        description="The run directory: the resolved recipe, and per stage its metrics, checkpoints and final model; "
        "null: `runs/<name>`. `cpt run --output-dir` overrides it.",
    )
    seed: int = Field(
        default=0,
        description="Seed of every random choice: held-out splits, the order of training blocks, "
        "fresh weights and generated evaluation tasks.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where packed token blocks, trained tokenizers and built harness tasks are cached; "
        "null: `$CPT_CACHE_DIR`, else `~/.cache/cpt`.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Processes, ZeRO stage and precision, shared by every stage.",
    )
    tensorboard: bool = Field(
        default=False,
        description="Also write every metrics record as TensorBoard scalars under `<stage>/tensorboard` "
        "(needs the tensorboard package).",
    )
    stages: list[Stage] = Field(
        min_length=1,
        description="The stages, trained in order; each starts from its model or the previous stage's final weights.",
    )

    @model_validator(mode="after")
    def _defaults(self) -> Recipe:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        return self

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise CptError(f"no stage named {name!r} (stages: {', '.join(s.name for s in self.stages)})", "stages")

    def domains(self) -> dict[str, DomainConfig]:
        """Every domain the recipe defines, in order of first definition."""
        found: dict[str, DomainConfig] = {}
        for stage in self.stages:
            found.update(stage.data)
        return found

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache" / "cpt"))


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = (), *, check_files: bool = True) -> Recipe:
    """Read, merge and validate a recipe; raise :class:`CptErrors` listing every problem."""
    path = Path(path)
    return recipe_from_mapping(read_yaml_mapping(path), path, overrides, check_files=check_files)


def recipe_from_mapping(raw: dict[str, Any], path: Path, overrides: list[str] = (), *, check_files: bool = True) -> Recipe:
    """Validate an already-read recipe mapping (changed in place by ``overrides``); ``path`` names it in errors."""
    errors: list[CptError] = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except CptError as exc:
            errors.append(CptError(exc.message, f"{path}: --set {item}"))
    for index, stage in enumerate(raw.get("stages") or []):
        if isinstance(stage, dict):
            try:
                _include_mixture(stage, path)
                _ratio_from_fit(stage, path)
            except CptError as exc:
                errors.append(CptError(exc.message, f"{path}: stages.{_stage_label(stage, index)}.mixture"))
    if errors:
        raise CptErrors(errors)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise CptErrors([CptError(msg, f"{path}: {loc}") for loc, msg in _pydantic_problems(exc, raw)]) from None
    problems = check_recipe(recipe, check_files=check_files)
    if problems:
        raise CptErrors([CptError(e.message, f"{path}: {e.where}") for e in problems])
    return recipe


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CptErrors([CptError(f"cannot read file: {exc.strerror or exc}", str(path))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}: line {mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CptErrors([CptError(f"invalid YAML: {problem}", where)]) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise CptErrors([CptError(f"a recipe must be a YAML mapping, got {kind}", str(path))])
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=VALUE`` in place; VALUE is YAML; ``null`` removes the key (its default returns).

    Inside ``stages`` the path element after ``stages`` is a stage name, not an index.
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise CptError("expected FIELD.PATH=VALUE")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CptError(f"value is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _stage_by_name(node, part)
            continue
        if not isinstance(node, dict):
            raise CptError(f"{'.'.join(parts[:depth])} is not a mapping")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        raise CptError("a whole stage cannot be replaced; set its fields")
    if not isinstance(node, dict):
        raise CptError(f"{'.'.join(parts[:-1])} is not a mapping")
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def _stage_by_name(stages: list[Any], name: str) -> dict[str, Any]:
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == name:
            return stage
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    raise CptError(f"no stage named {name!r} (stages: {', '.join(map(str, names))})")


def mixture_search_path(recipe_path: Path) -> list[Path]:
    here = recipe_path.resolve().parent
    return [here / "data_mixtures", here.parent / "data_mixtures", Path.cwd() / "data_mixtures"]


def _include_mixture(stage: dict[str, Any], recipe_path: Path) -> None:
    """Replace ``mixture: NAME`` / ``mixture: {include: NAME, ...}`` by the named file's mapping."""
    mixture = stage.get("mixture")
    if isinstance(mixture, str):
        mixture = {"include": mixture}
    if not isinstance(mixture, dict) or "include" not in mixture:
        return
    name = mixture.pop("include")
    if not isinstance(name, str) or not STAGE_NAME.match(name):
        raise CptError(f"include must be a mixture name, got {name!r}")
    candidates = [folder / f"{name}.yaml" for folder in mixture_search_path(recipe_path)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CptError(f"no mixture named {name!r} in {', '.join(str(c.parent) for c in candidates)}")
    included = read_yaml_mapping(found)
    stage["mixture"] = {**copy.deepcopy(included), **mixture}


def _ratio_from_fit(stage: dict[str, Any], recipe_path: Path) -> None:
    """Replace ``ratio: {from_fit: FIT.json, tokens: T}`` by the replay share it implies.

    FIT.json is what ``cpt fit --law cmr --json`` printed; the critical mixture ratio R at T
    tokens is the share of the stage's own domains, so the earlier domains replay 1 - R. The
    resolved recipe records the number, not the file.
    """
    mixture = stage.get("mixture")
    if not isinstance(mixture, dict) or "ratio" not in mixture:
        return
    spec = mixture.pop("ratio")
    if not isinstance(spec, dict) or set(spec) != {"from_fit", "tokens"}:
        raise CptError("ratio must be {from_fit: FIT.json, tokens: T}")
    if "replay" in mixture:
        raise CptError("set either ratio or replay, not both")
    candidates = [recipe_path.resolve().parent / str(spec["from_fit"]), Path(str(spec["from_fit"]))]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CptError(
            f"ratio.from_fit: {spec['from_fit']} does not exist (looked beside the recipe and in the working directory)"
        )
    try:
        fit = json.loads(found.read_text())
        tokens = float(spec["tokens"])
    except (ValueError, TypeError) as exc:
        raise CptError(f"ratio: cannot read {found}: {exc}") from None
    if not isinstance(fit, dict) or fit.get("law") != "cmr":
        raise CptError(f"ratio.from_fit: {found} is not the JSON of `cpt fit --law cmr --json`")
    from cpt.laws.cmr import cmr_ratio_at

    ratio = cmr_ratio_at(fit, tokens)
    if not ratio > 0:
        raise CptError(
            f"the fit in {found} gives a critical mixture ratio of {ratio:g} at {tokens:g} tokens: no domain data"
        )
    mixture["replay"] = 1.0 - ratio


def _stage_label(stage: Any, index: int) -> str:
    if isinstance(stage, dict) and isinstance(stage.get("name"), str):
        return stage["name"]
    return str(index)


def _pydantic_problems(exc: ValidationError, raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Turn pydantic errors into (field path, message), naming stages by name.

    Union and discriminator tags that pydantic inserts into locations are dropped by walking
    the raw data alongside the location.
    """
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        parts: list[str] = []
        node: Any = raw
        for item in err["loc"]:
            if isinstance(node, list) and isinstance(item, int) and item < len(node):
                parts.append(_stage_label(node[item], item) if parts == ["stages"] else str(item))
                node = node[item]
            elif isinstance(node, dict) and item in node:
                parts.append(str(item))
                node = node[item]
            elif isinstance(node, dict) and item != node.get("type"):
                parts.append(str(item))
                node = None
            # otherwise a discriminator tag that pydantic inserts: skip it
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        entry = (".".join(parts) or "<recipe>", message)
        if entry not in problems:
            problems.append(entry)
    return problems


# ----------------------------------------------------------------------------- semantic checks


def check_recipe(recipe: Recipe, *, check_files: bool = True) -> list[CptError]:
    """Problems that need the whole recipe (or the file system) to see."""
    errors: list[CptError] = []
    seen: set[str] = set()
    known: set[str] = set()
    for index, stage in enumerate(recipe.stages):
        where = f"stages.{stage.name}"
        if stage.name in seen:
            errors.append(CptError(f"duplicate stage name {stage.name!r}", f"stages.{index}.name"))
        seen.add(stage.name)
        if index == 0 and stage.model is None:
            errors.append(CptError("the first stage needs a model (an HF dir, a hub id or {config: ...})", f"{where}.model"))
        if index == 0 and stage.tokenizer is None and (stage.model is None or stage.model.path is None):
            errors.append(CptError("a model built from a config needs a tokenizer (a path or {train: ...})", f"{where}.tokenizer"))
        redefined = sorted(set(stage.data) & known)
        if redefined:
            errors.append(CptError(f"domain {redefined[0]!r} is already defined by an earlier stage", f"{where}.data"))
        previous_known = set(known)
        known |= set(stage.data)
        if not stage.data:
            errors.append(CptError("the stage defines no data domains of its own", f"{where}.data"))
        else:
            errors.extend(_mixture_problems(stage, previous_known, known, where))
        unknown = [d for d in stage.evaluation.targets or [] if d not in known]
        if unknown:
            errors.append(CptError(f"unknown domain {unknown[0]!r}; known domains: {', '.join(sorted(known))}",
                                   f"{where}.evaluation.targets"))
        for task in stage.evaluation.harness.tasks:
            problem = task_problem(task, recipe.domains())
            if problem:
                errors.append(CptError(problem, f"{where}.evaluation.harness.tasks"))
        try:
            validate_schedule(stage.schedule, stage.total_steps)
        except CptError as exc:
            errors.append(CptError(exc.message, f"{where}.{exc.where or 'schedule'}"))
        if check_files:
            errors.extend(_file_problems(stage, where))
    return errors


def _mixture_problems(stage: Stage, previous_known: set[str], known: set[str], where: str) -> list[CptError]:
    """Run the real mixture resolution with placeholder sizes: catches every naming problem."""
    replay_shares = dict.fromkeys(sorted(previous_known), 1.0) or None
    try:
        weight_matrix(stage.mixture, 1, list(stage.data), sorted(known), dict.fromkeys(stage.data, 1), replay_shares)
    except CptError as exc:
        return [CptError(exc.message, f"{where}.{exc.where}")]
    return []


def _file_problems(stage: Stage, where: str) -> list[CptError]:
    errors = []
    for name, domain in stage.data.items():
        try:
            check_domain(domain)
        except CptError as exc:
            errors.append(CptError(exc.message, f"{where}.data.{name}.{exc.where or 'source'}"))
    for field, path in (("model", stage.model and stage.model.path), ("tokenizer", stage.tokenizer and stage.tokenizer.path)):
        if path is None:
            continue
        local = Path(path).expanduser()
        if local.exists():
            if not local.is_dir():
                errors.append(CptError(f"{path} is not a directory", f"{where}.{field}"))
        elif path.startswith((".", "/", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1":
            errors.append(CptError(f"{path} does not exist (and the hub is not reachable for it)", f"{where}.{field}"))
    return errors


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML: what a run writes beside its results."""
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

