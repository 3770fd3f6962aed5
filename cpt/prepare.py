"""`cpt prepare`: tokenize every domain a recipe trains or evaluates on, before (and without) training.

Each stage reads its domains (its own and earlier stages' replayed ones) with the stage's
tokenizer: plain text always (training, and held-out evaluation), and with metadata prefixes
where a domain defines them (MeCo). Each such (domain, tokenizer, variant) is prepared once,
both splits in one pass (:mod:`cpt.data.parallel`). ``cpt run`` reads the result, or does the
same work first when nothing was prepared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cpt.config.data import source_kind
from cpt.config.recipe import Recipe
from cpt.data import builtin
from cpt.data.mixture import metadata_steps
from cpt.data.parallel import Shard, domain_entry, prepare, read_index
from cpt.errors import CptError
from cpt.plan import recipe_domains_until, stage_tokenizer


@dataclass(frozen=True)
class Prepared:
    domain: str
    source: str
    metadata: bool
    entry: Path
    index: dict | None  # the stitched splits' counts; None for a shard's share


def prepare_recipe(recipe: Recipe, workers: int | None = None, shard: Shard | None = None) -> list[Prepared]:
    """Prepare every (domain, tokenizer, variant) the recipe reads; with ``shard``, only that
    share of each domain's units, left for a later call without ``shard`` to stitch."""
    cache = recipe.resolved_cache_dir() / "blocks"
    done: dict[Path, Prepared] = {}
    tokenizer = None
    for stage in recipe.stages:
        tokenizer = stage_tokenizer(recipe, stage, tokenizer)
        conditioned = bool(metadata_steps(stage.mixture, stage.total_steps).any())  # as cpt.plan reads them
        for name, cfg in recipe_domains_until(recipe, stage).items():
            for metadata in (False, True) if cfg.metadata is not None and conditioned else (False,):
                entry = domain_entry(cfg, tokenizer, cache, metadata)
                if entry in done:
                    continue
                try:
                    index = prepare(cfg, tokenizer, cache, recipe.seed, metadata=metadata, workers=workers, shard=shard)
                except CptError as exc:
                    raise CptError(exc.message, f"stages.{stage.name}.data.{name}") from None
                done[entry] = Prepared(name, cfg.source, metadata, entry, None if index is None else read_index(index))
    return list(done.values())


def describe(prepared: Prepared) -> str:
    """One line per prepared domain: what it holds and where."""
    variant = " (with metadata)" if prepared.metadata else ""
    size = sum(f.stat().st_size for f in prepared.entry.rglob("*") if f.is_file())
    if prepared.index is None:
        units = len(list((prepared.entry / "units").glob("u*")))
        return f"{prepared.domain}{variant}: {units} unit(s) of {prepared.source} ready, {size / 1e6:,.1f} MB in {prepared.entry}"
    train, heldout = prepared.index["splits"]["train"], prepared.index["splits"]["heldout"]
    return (
        f"{prepared.domain}{variant}: {train['n_documents']:,} training documents ({train['n_tokens']:,} tokens), "
        f"{heldout['n_documents']:,} held out ({heldout['n_tokens']:,} tokens) of {prepared.source}; "
        f"{len(prepared.index['units'])} unit(s), {size / 1e6:,.1f} MB in {prepared.entry}"
    )


def builtin_builds(recipe: Recipe) -> dict[str, dict]:
    """The Python build each builtin corpus of the recipe reads: figures from builtin data differ
    slightly across builds (another version, or a distribution without the test suite)."""
    found: dict[str, dict] = {}
    for cfg in recipe.domains().values():
        if source_kind(cfg.source) == "builtin" and cfg.source not in found:
            found[cfg.source] = builtin.installation(cfg.source.removeprefix("builtin:"))
    return found


def builtin_lines(recipe: Recipe) -> list[str]:
    return [
        f"{source}: {info['files']:,} files of Python {str(info['python']).split()[0]} at {info['stdlib']}"
        for source, info in builtin_builds(recipe).items()
    ]
