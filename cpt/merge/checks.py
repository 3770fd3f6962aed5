"""Whether models can be merged tensor by tensor: one architecture, one vocabulary, the same tensors.

Every check reads configs, tokenizers and safetensors headers only, so a mismatch is reported
before any weight is read or anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpt.errors import CptError
from cpt.merge.inputs import Source

WHERE = "merge"


def check_compatible(sources: Sequence[Source]) -> None:
    """Raise a CptError naming the first difference between ``sources[0]`` and another input."""
    first = sources[0]
    for other in sources[1:]:
        _same_architecture(first, other)
        _same_vocabulary(first, other)
        _same_positions(first, other)
        _same_tensors(first, other)


# Config fields that change what the weights compute without changing any tensor's shape: the
# output copies the first input's config, so they must agree (a long-context stage's RoPE base).
_SAME_MEANING = ("rope_parameters", "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings")


def _same_positions(a: Source, b: Source) -> None:
    for field in _SAME_MEANING:
        if a.config.get(field) != b.config.get(field):
            raise CptError(f"different {field}: {a.config.get(field)!r} in {a.name}, {b.config.get(field)!r} in "
                           f"{b.name}; the merged model would keep only the first", WHERE)


def _same_architecture(a: Source, b: Source) -> None:
    """The same ``model_type``, and the same ``architectures`` where both name theirs (a config
    saved without a model, as in a checkpoint, names none)."""
    type_a, type_b = a.config.get("model_type"), b.config.get("model_type")
    arch_a, arch_b = a.config.get("architectures"), b.config.get("architectures")
    if type_a != type_b or (arch_a and arch_b and arch_a != arch_b):
        raise CptError(f"different architectures: {a.name} is {_described(type_a, arch_a)}, "
                       f"{b.name} is {_described(type_b, arch_b)}", WHERE)


def _described(model_type: str | None, architectures: list[str] | None) -> str:
    return f"{model_type} ({', '.join(architectures)})" if architectures else str(model_type)


def _same_vocabulary(a: Source, b: Source) -> None:
    """Rows of the embeddings mean the same tokens: equal ``vocab_size`` and equal tokenizer maps."""
    size_a, size_b = a.config.get("vocab_size"), b.config.get("vocab_size")
    if size_a != size_b:
        raise CptError(f"different vocabularies: vocab_size {size_a} in {a.name}, {size_b} in {b.name} "
                       "(embedding rows differ)", WHERE)
    ids_a, ids_b = a.token_ids, b.token_ids
    if ids_a is not None and ids_b is not None and ids_a != ids_b:
        if len(ids_a) != len(ids_b):
            detail = f"{len(ids_a)} tokens in {a.name}, {len(ids_b)} in {b.name}"
        else:
            token = next(t for t in sorted(ids_a) if ids_a[t] != ids_b.get(t))
            detail = f"token {token!r} is {ids_a[token]} in {a.name}, {ids_b.get(token)} in {b.name}"
        raise CptError(f"different vocabularies: the tokenizers differ ({detail})", WHERE)


def _same_tensors(a: Source, b: Source) -> None:
    only_a, only_b = sorted(a.specs.keys() - b.specs.keys()), sorted(b.specs.keys() - a.specs.keys())
    if only_a or only_b:
        names, has, lacks = (only_a, a, b) if only_a else (only_b, b, a)
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise CptError(f"different tensors: {has.name} has {names[0]}{more}, which {lacks.name} lacks", WHERE)
    for name, spec in a.specs.items():
        other = b.specs[name]
        if spec.shape != other.shape:
            raise CptError(f"{name} has shape {list(spec.shape)} in {a.name}, {list(other.shape)} in {b.name}", WHERE)
        if spec.dtype.is_floating_point != other.dtype.is_floating_point:
            raise CptError(f"{name} is {spec.dtype} in {a.name}, {other.dtype} in {b.name}", WHERE)
