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


TINY_RECIPE = """
name: tiny
seed: 0
output_dir: {out}
stages:
  - name: pretrain
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
    tokenizer:
      train: {{vocab_size: 512, max_documents: 60}}
    data:
      prose: {{source: "builtin:python-docs", heldout: 4, max_documents: 40}}
    schedule: {{type: cosine, lr: 1.0e-2, warmup: 2}}
    steps: 12
    seq_len: 32
    batch: {{global_batch_size: 8, micro_batch_size: 4}}
    checkpoint: {{every: 4, keep: 2}}
    evaluation: {{every: 4, max_tokens_per_domain: 512, harness: {{limit: 12}}}}
  - name: cpt
    data:
      code: {{source: "builtin:python-stdlib", heldout: 4, max_documents: 40}}
    mixture: {{replay: 0.25}}
    schedule: {{type: wsd, lr: 2.0e-3, warmup: 2, decay: 0.25}}
    steps: 12
    seq_len: 32
    batch: {{global_batch_size: 8, micro_batch_size: 4}}
    checkpoint: {{every: 4, keep: 2}}
    evaluation: {{every: 4, max_tokens_per_domain: 512, harness: {{limit: 12}}}}
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """A two-stage recipe (prose pre-training, then code with replay) that trains in seconds."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(out=tmp_path / "run"))
    return path
