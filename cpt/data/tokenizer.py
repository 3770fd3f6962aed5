"""Tokenizers: load a Hugging Face one, or train a byte-level BPE one on the run's own data."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cpt.config.tokenizer import TrainTokenizerConfig
from cpt.errors import CptError, first_line
from cpt.io import library_io_errors, staged_dir
from cpt.paths import gguf_path, local_dir

if TYPE_CHECKING:  # transformers imports torch: seconds that validating a recipe should not pay
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def load_tokenizer(path: str, trust_remote_code: bool = False, gguf_file: str | None = None) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer that can mark document ends, which packing relies on; from the GGUF file
    ``gguf_file`` of ``path`` when given."""
    from transformers import AutoTokenizer

    try:
        local = local_dir(path, "tokenizer")
        gguf = {"gguf_file": gguf_path(path, gguf_file, "tokenizer")} if gguf_file else {}
    except CptError as exc:
        raise CptError(f"cannot load tokenizer from {exc.message}", "tokenizer") from None
    try:
        source = str(local or path)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf)
    except Exception as e:  # transformers signals a bad or missing tokenizer with many exception types
        named = f"{path} ({gguf_file})" if gguf_file else path
        raise CptError(f"cannot load tokenizer from {named}: {first_line(e)}", where="tokenizer") from e
    if not getattr(tokenizer, "is_fast", False):
        raise CptError(f"cannot load tokenizer from {path}: it has no fast (Rust) backend", where="tokenizer")
    if tokenizer.eos_token_id is None:
        raise CptError(
            f"cannot load tokenizer from {path}: it has no end-of-sequence token to separate documents",
            where="tokenizer",
        )
    return tokenizer


def check_tokenizer_matches(model_dir: str, tokenizer, where: str) -> None:
    """Refuse to continue a model under another vocabulary: its token ids would mean other strings.

    A trained tokenizer depends on every domain of its recipe, so a recipe cut down to fewer
    stages trains a different one; continuing such a model would train on garbage silently.
    The vocabularies are compared, not ``tokenizer_fingerprint``: saving a hub tokenizer may
    rewrite settings (padding, truncation) that do not change what an id means.
    """
    saved = Path(model_dir) / "tokenizer.json"
    if saved.is_file() and load_tokenizer(str(saved.parent)).get_vocab() != tokenizer.get_vocab():
        raise CptError(
            f"the model in {model_dir} was trained with another tokenizer than this stage uses; "
            "give the stage that model's tokenizer (tokenizer: {path: ...})",
            where,
        )


def train_tokenizer(cfg: TrainTokenizerConfig, documents: Iterable[str], out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer, streaming the documents, and save it atomically."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(islice(documents, cfg.max_documents), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD
    )
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging, library_io_errors(out_dir):  # readers see the old tokenizer or the new one
        wrapped.save_pretrained(staging)
    return load_tokenizer(str(out_dir))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short hash of everything that decides the token ids: the backend definition and special tokens."""
    definition = {
        "backend": tokenizer.backend_tokenizer.to_str(),
        "special": {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())},
        "eos_token_id": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
