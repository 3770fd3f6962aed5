"""Test-wide settings: offline hubs, CPU DeepSpeed, and a private data cache per session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep tokenizer and block caches of tests away from the user's ~/.cache/cpt."""
    os.environ["CPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cpt-cache"))
    yield
