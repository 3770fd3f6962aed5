"""Resolve a recipe into what each stage will actually do: tokenizer, packed data, mixture, lr.

`cpt plan` prints this; `cpt run` trains on exactly this. Resolution is stage by stage because
replay needs the previous stage's planned tokens, and a stage's tokenizer defaults to the one
its starting model came with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import islice, zip_longest
from pathlib import Path
from typing import Iterator

import numpy as np
from transformers import PreTrainedTokenizerFast

from cpt.config.recipe import Recipe, Stage
from cpt.data.extension import RECORD, Extension, compression, extend_tokenizer, learn_merges, read_extension
from cpt.data.mixture import cap_epochs, metadata_steps, planned_blocks, weight_matrix
from cpt.data.pack import Packed, load_packed
from cpt.data.sources import fingerprint, iter_documents
from cpt.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from cpt.errors import CptError
from cpt.io import write_with
from cpt.train.schedules import lr_curve


@dataclass
class StagePlan:
    stage: Stage
    steps: int
    tokenizer: PreTrainedTokenizerFast
    domains: list[str]
    weights: np.ndarray  # (steps, len(domains)), rows sum to 1
    blocks: dict[str, Packed]  # train blocks per domain of `domains`: the ones its draws index
    lr: np.ndarray  # (steps,)
    metadata: np.ndarray  # (steps,) bool: domains with metadata are trained with it (MeCo)
    alternate: dict[str, Packed]  # domains trained both with and without metadata: the other variant
    extension: Extension | None = None  # the tokenizer extends its base's vocabulary: the model grows to match

    def read(self, step: int, domain: str, draws: np.ndarray) -> tuple[Packed, np.ndarray]:
        """The packed split that step ``step`` reads ``domain``'s drawn blocks from, and their indices there.

        Draws index ``blocks``; in steps that use the other metadata variant, draw i of n is block
        i * m // n of its m: the same place in the same documents, which the epoch of draws has
        not visited yet either.
        """
        primary = self.blocks[domain]
        other = self.alternate.get(domain)
        if other is None or bool(self.metadata[step]) == (primary.loss_mask is not None):
            return primary, draws
        return other, draws * len(other) // len(primary)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def tokens(self) -> int:
        return self.steps * self.stage.tokens_per_step

    def planned_blocks(self) -> np.ndarray:
        """Whole blocks per domain: the targets rounded so that they add up to the stage."""
        return _round_preserving_sum(planned_blocks(self.weights, self.stage.batch.global_batch_size))

    def tokens_per_domain(self) -> dict[str, int]:
        return {d: int(n) * self.stage.seq_len for d, n in zip(self.domains, self.planned_blocks())}

    def epochs(self) -> dict[str, float]:
        return {d: float(n) / len(self.blocks[d]) for d, n in zip(self.domains, self.planned_blocks())}

    def data_pins(self) -> dict[str, dict]:
        """What a checkpoint's data position indexes, per domain: the prepared split (named by the
        hash of the documents, the tokenizer, the variant, the split's settings and the format) and
        its block count; a domain's plain variant read in MeCo's cooldown too, as ``<domain>/plain``."""
        splits = {**self.blocks, **{f"{d}/plain": packed for d, packed in self.alternate.items()}}
        return {d: {"fingerprint": packed.name, "blocks": len(packed)} for d, packed in splits.items()}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "steps": self.steps,
            "tokens": self.tokens,
            "tokens_per_domain": self.tokens_per_domain(),
            "lr": [float(x) for x in self.lr],
            "weights": {d: [float(x) for x in self.weights[:, i]] for i, d in enumerate(self.domains)},
        } | ({"metadata": self.metadata.tolist()} if self.conditioned() else {})

    def conditioned(self) -> list[str]:
        """The stage's domains trained with their metadata in some of its steps (MeCo)."""
        return [d for d in self.domains if self.blocks[d].loss_mask is not None or d in self.alternate]


def plan_recipe(recipe: Recipe, workers: int | None = None) -> list[StagePlan]:
    """Every stage's plan; data not prepared yet are prepared with ``workers`` processes (default: all cores)."""
    plans: list[StagePlan] = []
    tokenizer: PreTrainedTokenizerFast | None = None
    for stage in recipe.stages:
        tokenizer, extension = stage_vocabulary(recipe, stage, tokenizer)
        plans.append(plan_stage(recipe, stage, tokenizer, plans[-1] if plans else None, workers))
        plans[-1].extension = extension
    return plans


def plan_stage(
    recipe: Recipe, stage: Stage, tokenizer: PreTrainedTokenizerFast, previous: StagePlan | None,
    workers: int | None = None,
) -> StagePlan:
    where = f"stages.{stage.name}"
    steps = stage.total_steps
    known = recipe_domains_until(recipe, stage)
    seq_len = stage.seq_len
    cache = recipe.resolved_cache_dir() / "blocks"
    metadata = metadata_steps(stage.mixture, steps)

    def blocks_of(name: str, with_metadata: bool | None = None) -> Packed:
        """The variant of ``name`` its draws index: with metadata when any step uses it."""
        if with_metadata is None:
            with_metadata = known[name].metadata is not None and bool(metadata.any())
        try:
            return load_packed(known[name], "train", tokenizer, seq_len, recipe.seed, cache, metadata=with_metadata,
                               workers=workers)
        except CptError as exc:
            raise CptError(exc.message, f"{where}.data.{name}") from None

    own_blocks = {name: blocks_of(name) for name in stage.data}
    train_tokens = {name: len(blocks) * seq_len for name, blocks in own_blocks.items()}
    replay_shares = None
    if previous is not None:
        shares = previous.planned_blocks().astype(float)
        replay_shares = {d: s / shares.sum() for d, s in zip(previous.domains, shares)}
    try:
        domains, weights = weight_matrix(
            stage.mixture, steps, list(stage.data), list(known), train_tokens, replay_shares
        )
    except CptError as exc:
        raise CptError(exc.message, f"{where}.{exc.where or 'mixture'}") from None
    blocks = {name: own_blocks[name] if name in own_blocks else blocks_of(name) for name in domains}
    caps = {name: known[name].max_epochs for name in domains if known[name].max_epochs is not None}
    try:
        weights = cap_epochs(weights, stage.batch.global_batch_size, {d: len(blocks[d]) for d in domains}, caps)
    except CptError as exc:
        raise CptError(exc.message, f"{where}.{exc.where or 'mixture'}") from None
    both = not metadata.all() and metadata.any()
    alternate = {name: blocks_of(name, with_metadata=False) for name in domains if both and known[name].metadata}
    return StagePlan(stage, steps, tokenizer, domains, weights, blocks, lr_curve(stage.schedule, steps), metadata,
                     alternate)


def recipe_domains_until(recipe: Recipe, stage: Stage) -> dict:
    """Domains defined by this stage and every earlier one: what its mixture may name."""
    known: dict = {}
    for candidate in recipe.stages:
        known.update(candidate.data)
        if candidate is stage:
            return known
    raise ValueError(f"stage {stage.name} is not part of the recipe")


# ----------------------------------------------------------------------------- tokenizers


def stage_tokenizer(recipe: Recipe, stage: Stage, previous: PreTrainedTokenizerFast | None) -> PreTrainedTokenizerFast:
    """The stage's tokenizer, extended with new tokens where it asks (:func:`stage_vocabulary`)."""
    return stage_vocabulary(recipe, stage, previous)[0]


def stage_vocabulary(
    recipe: Recipe, stage: Stage, previous: PreTrainedTokenizerFast | None
) -> tuple[PreTrainedTokenizerFast, Extension | None]:
    """The stage's tokenizer and, when it extends its base with new tokens, what the model must add."""
    base = _base_tokenizer(recipe, stage, previous)
    spec = stage.tokenizer
    if spec is None or spec.extend is None:
        return base, None
    try:
        return extended_tokenizer(recipe, stage, base)
    except CptError as exc:
        raise CptError(exc.message, f"stages.{stage.name}.tokenizer.extend") from None


def _base_tokenizer(recipe: Recipe, stage: Stage, previous: PreTrainedTokenizerFast | None) -> PreTrainedTokenizerFast:
    """The stage's own tokenizer, else its starting model's, else the previous stage's."""
    where = f"stages.{stage.name}.tokenizer"
    spec, model = stage.tokenizer, stage.model
    try:
        if spec is not None and spec.path is not None:
            where += ".gguf_file" if spec.gguf_file else ""
            return load_tokenizer(spec.path, gguf_file=spec.gguf_file)
        if spec is not None and spec.train is not None:
            return trained_tokenizer(recipe, spec.train)
        if model is not None and model.path is not None:
            where = f"stages.{stage.name}.model.gguf_file" if model.gguf_file else where  # the model's own file
            return load_tokenizer(model.path, gguf_file=model.gguf_file)
    except CptError as exc:
        raise CptError(exc.message, where) from None
    if previous is None:
        raise CptError("no tokenizer: give one, or start from a model directory that has one", where)
    return previous


def trained_tokenizer(recipe: Recipe, spec) -> PreTrainedTokenizerFast:
    """Train (once, then cached) a BPE on the training text of every domain of the recipe."""
    domains = recipe.domains()
    key_src = json.dumps(
        {"spec": spec.model_dump(mode="json"), "domains": {n: fingerprint(d, recipe.seed) for n, d in domains.items()}},
        sort_keys=True,
    )
    out = recipe.resolved_cache_dir() / "tokenizers" / hashlib.sha256(key_src.encode()).hexdigest()[:16]
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(str(out))
    return train_tokenizer(spec, _round_robin(iter_documents(d, "train", recipe.seed) for d in domains.values()), out)


def extended_tokenizer(
    recipe: Recipe, stage: Stage, base: PreTrainedTokenizerFast
) -> tuple[PreTrainedTokenizerFast, Extension]:
    """``base`` with the stage's new tokens, learned (once, then cached) on its ``extend.from`` domains.

    The cache key is what the tokens depend on: the base, the options that choose them (not
    ``init``, which only the model uses) and the documents of the named domains.
    """
    spec = stage.tokenizer.extend
    known = recipe_domains_until(recipe, stage)
    domains = {name: known[name] for name in spec.from_}
    key_src = json.dumps(
        {"base": tokenizer_fingerprint(base), "spec": spec.model_dump(mode="json", exclude={"init"}),
         "domains": {n: fingerprint(d, recipe.seed) for n, d in domains.items()}},
        sort_keys=True,
    )
    out = recipe.resolved_cache_dir() / "tokenizers" / hashlib.sha256(key_src.encode()).hexdigest()[:16]
    if not (out / RECORD).is_file():
        documents = islice(_round_robin(iter_documents(d, "train", recipe.seed) for d in domains.values()),
                           spec.max_documents)
        extend_tokenizer(base, learn_merges(base, documents, spec.add, spec.min_frequency), out)
    return load_tokenizer(str(out)), read_extension(base, out, spec.init)


def vocabulary_report(recipe: Recipe, plan: StagePlan, sample: int = 200) -> dict | None:
    """An extended vocabulary's sizes and, per domain of the stage, the compression its new tokens
    give on up to ``sample`` held-out documents (the new merges were learned on training text, where
    the gain would be overstated; a domain without held-out documents is measured on training
    text); None when the stage extends nothing."""
    extension = plan.extension
    if extension is None:
        return None
    known = recipe_domains_until(recipe, plan.stage)
    gains = {}
    for d in plan.domains:
        split = "heldout" if known[d].heldout else "train"
        documents = list(islice(iter_documents(known[d], split, recipe.seed), sample))
        gains[d] = compression(extension.base, plan.tokenizer, documents)
    return {"base_size": len(extension.base), "size": len(plan.tokenizer), "added": len(extension.ids),
            "init": extension.init, "compression": gains}


def _round_robin(iterators) -> Iterator[str]:
    """Interleave domains so a document cap still sees every domain."""
    for group in zip_longest(*iterators):
        yield from (doc for doc in group if doc is not None)


def _round_preserving_sum(values: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding: integers within 1 of each value, same total as the values."""
    floors = np.floor(values).astype(np.int64)
    missing = int(round(values.sum())) - int(floors.sum())
    order = np.argsort(-(values - floors), kind="stable")
    floors[order[:missing]] += 1
    return floors


def write_plan_png(plans: list[StagePlan], path: Path) -> None:
    """lr and the mixture (stacked weights) over each stage's steps, one column per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(plans), figsize=(5 * len(plans), 6), squeeze=False, sharex="col")
    for col, plan in enumerate(plans):
        steps = np.arange(plan.steps)
        axes[0, col].plot(steps, plan.lr)
        axes[0, col].set_title(f"stage {plan.name}: learning rate")
        axes[0, col].set_ylabel("lr")
        axes[1, col].stackplot(steps, plan.weights.T, labels=plan.domains)
        axes[1, col].set_ylim(0, 1)
        axes[1, col].set_ylabel("mixture weight")
        axes[1, col].set_xlabel("optimizer step")
        axes[1, col].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
