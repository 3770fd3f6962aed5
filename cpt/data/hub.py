"""Documents of Hugging Face datasets, from the hub or from a local builder (hf:json, hf:parquet).

``datasets`` is imported only when a dataset is read: it is slow to import.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence

from cpt.config.data import DomainConfig, HFOptions
from cpt.data.files import ROWS_PER_BATCH, Document, batch_documents, row_document
from cpt.errors import CptError


def hf_documents(cfg: DomainConfig, fields: Sequence[str] = (), share: tuple[int, int] | None = None) -> Iterator[Document]:
    """The documents of the dataset's split in row order, each with its values of the columns
    ``fields``; ``share``: only rows ``[start, end)`` of a prepared dataset, or shard ``(index,
    count)`` of a stream (its data files, in order)."""
    dataset = _load(cfg)
    wanted = list(dict.fromkeys([cfg.text_field, *fields]))
    columns = dataset.column_names
    missing = [name for name in wanted if columns is not None and name not in columns]
    if missing:
        listed = ", ".join(columns)
        raise CptError(f"{cfg.source} has no column {missing[0]!r}; its columns: {listed}", where="source")
    try:
        if cfg.hf is not None and cfg.hf.streaming:
            if share is not None:
                dataset = dataset.shard(num_shards=share[1], index=share[0], contiguous=True)
            for row in dataset:
                yield row_document(row, cfg.text_field, fields, f"{cfg.source}: a row")
            return
        if share is not None:
            dataset = dataset.select(range(*share))
        for batch in dataset.select_columns(wanted).iter(batch_size=ROWS_PER_BATCH):
            yield from batch_documents(batch, cfg.text_field, fields, cfg.source)
    except OSError as e:  # a stream cut off, a file gone since the dataset was prepared
        raise CptError(f"cannot read dataset {cfg.source}: {e}", where="source") from e


def stream_shards(cfg: DomainConfig) -> int:
    """How many shards (data files) a streamed dataset has: its units, read independently."""
    return _load(cfg).n_shards


def dataset_size(cfg: DomainConfig) -> tuple[int, int]:
    """Rows and bytes of a dataset that is not streamed (``datasets`` prepares it on disk once)."""
    dataset = _load(cfg)
    return dataset.num_rows, dataset.data.nbytes


_loaded: dict[str, object] = {}  # per process: every unit of a dataset reads the same one


def _load(cfg: DomainConfig):
    key = cfg.model_dump_json()
    if key not in _loaded:
        _loaded[key] = _load_dataset(cfg)
    return _loaded[key]


def _load_dataset(cfg: DomainConfig):
    import datasets

    opts = cfg.hf or HFOptions()
    name = cfg.source.removeprefix("hf:")
    try:
        return datasets.load_dataset(
            name, opts.name, split=opts.split, data_files=opts.data_files, revision=opts.revision, streaming=opts.streaming,
        )
    except Exception as e:  # datasets raises many unrelated types for one cause: the source cannot be read
        raise CptError(f"cannot load dataset {cfg.source}: {e}", where="source") from e


def local_data_files(data_files: str | list[str] | dict[str, str | list[str]]) -> list[str]:
    """The local files among ``data_files`` (remote ones are identified by the options alone)."""
    groups = list(data_files.values()) if isinstance(data_files, dict) else [data_files]
    patterns = [p for group in groups for p in ([group] if isinstance(group, str) else group)]
    found = (p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    return sorted(p for p in found if os.path.isfile(p))
