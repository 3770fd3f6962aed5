"""Tokenizers: byte-level BPE trained on the builtin prose, reloaded by transformers; loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers

from cpt.config.data import DomainConfig
from cpt.data.sources import iter_documents
from cpt.config.tokenizer import TokenizerConfig, TrainTokenizerConfig
from cpt.data.tokenizer import EOS, PAD, check_tokenizer_matches, load_tokenizer, tokenizer_fingerprint, train_tokenizer
from cpt.errors import CptError

PROSE = DomainConfig(source="builtin:python-docs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "docs-bpe"
    train_tokenizer(TrainTokenizerConfig(vocab_size=600, max_documents=40), iter_documents(PROSE, "train", 0), out)
    return out


def test_trained_tokenizer_reloads_with_auto_tokenizer(trained: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained)
    assert tok.is_fast and len(tok) == 600
    assert (tok.eos_token, tok.bos_token, tok.unk_token, tok.pad_token) == (EOS, EOS, EOS, PAD)
    assert tok.eos_token_id != tok.pad_token_id
    text = "Return the absolute value of x. Ünïcödé → bytes 🙂"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # byte-level: any text round-trips, nothing is unknown
    assert len(ids) < len(text.encode())  # merges were learned from the prose
    assert tok(EOS, add_special_tokens=False).input_ids == [tok.eos_token_id]
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(str(trained)))


def test_training_is_deterministic_and_saved_atomically(trained: Path, tmp_path: Path):
    cfg = TrainTokenizerConfig(vocab_size=600, max_documents=40)
    again = train_tokenizer(cfg, iter_documents(PROSE, "train", 0), tmp_path / "tok")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(load_tokenizer(str(trained)))
    cfg = TrainTokenizerConfig(vocab_size=400, max_documents=40)
    smaller = train_tokenizer(cfg, iter_documents(PROSE, "train", 0), tmp_path / "tok")
    assert len(smaller) == 400 and len(load_tokenizer(str(tmp_path / "tok"))) == 400  # replaced in place
    assert tokenizer_fingerprint(smaller) != tokenizer_fingerprint(again)
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no staging directories left behind


def test_a_model_is_not_continued_under_another_vocabulary(trained: Path, tmp_path: Path):
    same = load_tokenizer(str(trained))
    check_tokenizer_matches(str(trained), same, "stages.cpt.tokenizer")  # no error
    other = train_tokenizer(TrainTokenizerConfig(vocab_size=600, max_documents=20), iter_documents(PROSE, "train", 0),
                            tmp_path / "other")
    with pytest.raises(CptError, match="trained with another tokenizer") as err:
        check_tokenizer_matches(str(trained), other, "stages.cpt.tokenizer")
    assert err.value.where == "stages.cpt.tokenizer"


def test_max_documents_limits_what_training_reads(tmp_path: Path):
    consumed = []

    def documents():
        for i in range(1000):
            consumed.append(i)
            yield f"document {i} about tokenizers and merges"

    train_tokenizer(TrainTokenizerConfig(vocab_size=300, max_documents=5), documents(), tmp_path / "tok")
    assert len(consumed) == 5


def test_load_errors_name_the_path(tmp_path: Path):
    with pytest.raises(CptError, match=r"cannot load tokenizer from .*absent: no such directory") as err:
        load_tokenizer(str(tmp_path / "absent"))
    assert err.value.where == "tokenizer"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(CptError, match="cannot load tokenizer from") as err:
        load_tokenizer(str(broken))
    assert err.value.where == "tokenizer"


def test_a_tokenizer_without_eos_is_refused(tmp_path: Path):
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "no-eos")
    with pytest.raises(CptError, match="no end-of-sequence token") as err:
        load_tokenizer(str(tmp_path / "no-eos"))
    assert err.value.where == "tokenizer"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one of path"),
        ({"path": "gpt2", "train": {"vocab_size": 1000}}, "exactly one of path"),
        ({"train": {"vocab_size": 100}}, "greater than or equal to 300"),
        ({"train": {"vocab_size": 1000, "min_frequency": 0}}, "greater than or equal to 1"),
        ({"train": {"vocab_size": 1000, "max_documents": 0}}, "greater than 0"),
        ({"train": {"vocab_size": 1000, "vocab": 3}}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(fields: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        TokenizerConfig(**fields)
