"""Documents of Hugging Face datasets, from the hub or from a local builder (hf:json, hf:parquet).

``datasets`` is imported only when a dataset is read: it is slow to import.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

from cpt.config.data import DomainConfig, HFOptions
from cpt.data.files import ROWS_PER_BATCH, as_text
from cpt.errors import CptError


def hf_texts(cfg: DomainConfig) -> Iterator[str]:
    """The text column of the dataset's split, row by row."""
    import datasets

    opts = cfg.hf or HFOptions()
    name = cfg.source.removeprefix("hf:")
    try:
        dataset = datasets.load_dataset(
            name,
            opts.name,
            split=opts.split,
            data_files=opts.data_files,
            revision=opts.revision,
            streaming=opts.streaming,
        )
    except Exception as e:  # datasets raises many unrelated types for one cause: the source cannot be read
        raise CptError(f"cannot load dataset {cfg.source}: {e}", where="source") from e
    columns = dataset.column_names
    if columns is not None and cfg.text_field not in columns:
        listed = ", ".join(columns)
        raise CptError(f"{cfg.source} has no column {cfg.text_field!r}; its columns: {listed}", where="source")
    if opts.streaming:
        for row in dataset:
            if cfg.text_field not in row:
                raise CptError(f"{cfg.source}: a row has no field {cfg.text_field!r}", where="source")
            yield as_text(row[cfg.text_field], cfg.source)
        return
    for batch in dataset.select_columns([cfg.text_field]).iter(batch_size=ROWS_PER_BATCH):
        for value in batch[cfg.text_field]:
            yield as_text(value, cfg.source)


def local_data_files(data_files: str | list[str] | dict[str, str | list[str]]) -> list[str]:
    """The local files among ``data_files`` (remote ones are identified by the options alone)."""
    groups = list(data_files.values()) if isinstance(data_files, dict) else [data_files]
    patterns = [p for group in groups for p in ([group] if isinstance(group, str) else group)]
    found = (p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    return sorted(p for p in found if os.path.isfile(p))
