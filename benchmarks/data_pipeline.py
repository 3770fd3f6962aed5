"""Data pipeline benchmark: tokenize+pack vs raw encode, sampler vs a training step, RSS vs corpus size.

Every ratio is measured side by side in this one run (machines are noisy). Last line is JSON:
{"pack_vs_raw_encode": r, "sampler_fraction_of_step": f, "rss_10x_over_1x": m}

    python benchmarks/data_pipeline.py [--docs N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cpt.config.data import DomainConfig  # noqa: E402
from cpt.data.pack import load_blocks  # noqa: E402
from cpt.data.sampler import MixtureSampler  # noqa: E402
from cpt.data.sources import iter_documents  # noqa: E402
from cpt.config.tokenizer import TrainTokenizerConfig  # noqa: E402
from cpt.data.tokenizer import train_tokenizer  # noqa: E402
from cpt.config.load import load_recipe  # noqa: E402
from cpt.train.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 256


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pack_vs_raw(tokenizer, domain: DomainConfig, work: Path) -> float:
    texts = list(iter_documents(domain, "train", 0))
    n_bytes = sum(len(t.encode()) for t in texts)
    backend = tokenizer.backend_tokenizer
    raw = best_of(lambda: backend.encode_batch(texts, add_special_tokens=False))
    fast = best_of(lambda: backend.encode_batch_fast(texts, add_special_tokens=False))
    counter = iter(range(10**6))
    pack = best_of(lambda: load_blocks(domain, "train", tokenizer, SEQ_LEN, 0, work / f"cache{next(counter)}"))
    print(f"tokenize: {n_bytes / 1e6:.1f} MB of Python source, {len(texts)} documents")
    print(f"  raw encode_batch      {raw:7.2f} s  {n_bytes / raw / 1e6:6.2f} MB/s")
    print(f"  raw encode_batch_fast {fast:7.2f} s  {n_bytes / fast / 1e6:6.2f} MB/s (no offsets; what cpt calls)")
    print(f"  cpt tokenize+pack     {pack:7.2f} s  {n_bytes / pack / 1e6:6.2f} MB/s (reads files, writes the cache)")
    return raw / pack


def sampler_vs_step(tokenizer) -> float:
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    stage = recipe.stage("pretrain")
    batch, seq_len = stage.batch.global_batch_size, stage.seq_len
    blocks = [np.random.default_rng(i).integers(0, len(tokenizer), (5000, seq_len), dtype=np.uint16) for i in range(2)]
    steps = 200
    weights = np.tile([0.75, 0.25], (steps, 1))
    sampler = MixtureSampler(weights, [len(b) for b in blocks], batch, seed=0, key="bench")

    def draw():
        rows = sampler.next_step()
        return torch.from_numpy(np.stack([blocks[d][i] for d, i in rows]).astype(np.int64))

    for _ in range(5):
        draw()
    t0 = time.perf_counter()
    n = 100
    for _ in range(n):
        draw()
    per_batch = (time.perf_counter() - t0) / n

    torch.manual_seed(0)
    config = dict(stage.model.config, vocab_size=len(tokenizer))
    model = build_model({"config": config})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = draw()

    def train_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()
    per_step = best_of(train_step, repeats=5)
    print(f"sampler+gather per batch {per_batch * 1e3:.3f} ms; quickstart training step {per_step * 1e3:.1f} ms "
          f"(batch {batch} x {seq_len})")
    return per_batch / per_step


RSS_CHILD = """
import sys
from pathlib import Path
from cpt.config.data import DomainConfig
from cpt.data.pack import load_blocks
from cpt.data.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
domain = DomainConfig(source=sys.argv[2], heldout=1)
blocks = load_blocks(domain, "train", tok, 256, 0, Path(sys.argv[3]))
checksum = int(blocks[:: max(1, len(blocks) // 1000)].sum())  # touch the map as a reader would
# VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork/exec
peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(peak_kib, len(blocks), checksum)
"""


def rss_growth(tokenizer_dir: Path, domain: DomainConfig, work: Path) -> float:
    texts = list(iter_documents(domain, "train", 0))
    results = {}
    for copies in (1, 10):
        corpus = work / f"corpus{copies}"
        corpus.mkdir()
        with open(corpus / "docs.jsonl", "w") as fh:
            for copy in range(copies):
                for text in texts:
                    fh.write(json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n")
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(tokenizer_dir), str(corpus / "docs.jsonl"), str(work / f"rss{copies}")],
            check=True, capture_output=True, text=True,
        ).stdout.split()
        results[copies] = (int(out[0]), int(out[1]))
        print(f"corpus {copies:>2}x: {(corpus / 'docs.jsonl').stat().st_size / 1e6:7.1f} MB, "
              f"{results[copies][1]:,} blocks, peak RSS {results[copies][0] / 1024:.0f} MiB")
    return results[10][0] / results[1][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400, help="stdlib documents in the 1x corpus")
    args = parser.parse_args()
    domain = DomainConfig(source="builtin:python-stdlib", heldout=1, max_documents=args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = train_tokenizer(
            TrainTokenizerConfig(vocab_size=4096, max_documents=200), iter_documents(domain, "train", 0), work / "tok"
        )
        result = {
            "pack_vs_raw_encode": round(pack_vs_raw(tokenizer, domain, work), 3),
            "sampler_fraction_of_step": round(sampler_vs_step(tokenizer), 5),
            "rss_10x_over_1x": round(rss_growth(work / "tok", domain, work), 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
