"""Data pipeline benchmark: preparation (workers, encoder, the Hugging Face way), sampler vs a training
step, memory vs corpus size.

Every ratio is measured side by side in this one run (machines are noisy); each preparation runs
in a fresh process, so that no cache, thread pool or page of another run helps it. Last line is
JSON: {"pack_vs_raw_encode", "sampler_fraction_of_step", "rss_10x_over_1x", "prepare_2w_over_1w",
"pack_vs_encode_fast", "cpt_over_datasets_map"}.

    python benchmarks/data_pipeline.py [--docs N] [--copies K]
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
from cpt.data.parallel import usable_cores  # noqa: E402
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


# One preparation in a fresh process: seconds, and the peak of the process tree's resident memory
# (the parent and its workers, sampled every 10 ms: VmHWM alone would miss the workers).
PREPARE_CHILD = """
import json, os, sys, threading, time
from pathlib import Path
import psutil
from cpt.config.data import DomainConfig
from cpt.data import units
from cpt.data.pack import load_packed
from cpt.data.tokenizer import load_tokenizer
tok_dir, source, cache, workers, unit_mb = sys.argv[1:6]
units.UNIT_BYTES = int(float(unit_mb) * (1 << 20))
tok = load_tokenizer(tok_dir)
me, peak, running = psutil.Process(), [0], [True]
def watch():
    while running[0]:
        try:
            tree = [me, *me.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
packed = load_packed(DomainConfig(source=source, heldout=1), "train", tok, 256, 0, Path(cache), workers=int(workers))
seconds = time.perf_counter() - t0
checksum = int(packed.tokens[:: max(1, len(packed) // 1000)].sum())  # touch the blocks as a reader would
running[0] = False
print(json.dumps({"seconds": seconds, "peak_mib": peak[0] / 2**20, "blocks": len(packed), "checksum": checksum}))
"""

# Tokenization alone, in this process: the encoder's own limit on the same texts.
ENCODE_CHILD = """
import json, sys, time
from cpt.data.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2])]
backend = tok.backend_tokenizer
t0 = time.perf_counter()
for i in range(0, len(texts), 1024):
    backend.encode_batch_fast(texts[i : i + 1024], add_special_tokens=False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

# The Hugging Face way (transformers' run_clm.py): datasets.map(tokenize, batched, num_proc), then
# group_texts into blocks, saved to disk.
DATASETS_CHILD = """
import json, os, sys, time
from itertools import chain
t0 = time.perf_counter()
import datasets
from transformers import AutoTokenizer
datasets.disable_caching()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
procs, block = int(sys.argv[4]), 256
raw = datasets.load_dataset("json", data_files=sys.argv[2], split="train", cache_dir=sys.argv[3])
def tokenize(batch):
    return tok([text + tok.eos_token for text in batch["text"]])
tokenized = raw.map(tokenize, batched=True, num_proc=procs, remove_columns=raw.column_names)
def group_texts(batch):
    joined = {k: list(chain(*batch[k])) for k in batch}
    total = len(joined["input_ids"]) // block * block
    return {k: [t[i : i + block] for i in range(0, total, block)] for k, t in joined.items()}
grouped = tokenized.map(group_texts, batched=True, num_proc=procs)
grouped.save_to_disk(os.path.join(sys.argv[3], "saved"))
print(json.dumps({"seconds": time.perf_counter() - t0, "blocks": len(grouped)}))
"""


def child(script: str, *args, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_corpus(texts: list[str], copies: int, path: Path) -> Path:
    with open(path, "w") as fh:
        for copy in range(copies):
            for text in texts:
                fh.write(json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n")
    return path


def best(runs: int, measure) -> dict:
    return min((measure() for _ in range(runs)), key=lambda r: r["seconds"])


def preparation(tokenizer_dir: Path, texts: list[str], copies: int, work: Path) -> dict[str, float]:
    """Workers, the encoder's limit and the Hugging Face way on one corpus; then memory at 1x and 10x."""
    corpus = write_corpus(texts, copies, work / "prep.jsonl")
    mb = corpus.stat().st_size / 1e6
    one_thread = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    counter = iter(range(10**6))
    prep = lambda workers: best(2, lambda: child(PREPARE_CHILD, tokenizer_dir, corpus,  # noqa: E731
                                                 work / f"prep{next(counter)}", workers, 2, env=one_thread))
    one, two = prep(1), prep(2)
    raw = best(2, lambda: child(ENCODE_CHILD, tokenizer_dir, corpus, env=one_thread))
    cores = usable_cores()
    ours = prep(cores)
    theirs = best(1, lambda: child(DATASETS_CHILD, tokenizer_dir, corpus, work / f"hf{next(counter)}", cores))
    print(f"prepare {mb:.1f} MB of JSON lines ({copies} copies of the stdlib sample), units of 2 MB:")
    print(f"  cpt prepare, 1 worker (1 encoder thread)   {one['seconds']:6.2f} s  {mb / one['seconds']:6.2f} MB/s")
    print(f"  cpt prepare, 2 workers (1 thread each)     {two['seconds']:6.2f} s  {mb / two['seconds']:6.2f} MB/s")
    print(f"  raw encode_batch_fast, 1 thread (in memory) {raw['seconds']:5.2f} s  {mb / raw['seconds']:6.2f} MB/s")
    print(f"  cpt prepare, {cores} workers                    {ours['seconds']:6.2f} s  {mb / ours['seconds']:6.2f} MB/s")
    print(f"  datasets.map(num_proc={cores}) + group_texts + save_to_disk {theirs['seconds']:6.2f} s  "
          f"{mb / theirs['seconds']:6.2f} MB/s")
    small = write_corpus(texts, 1, work / "rss1.jsonl")
    large = write_corpus(texts, 10, work / "rss10.jsonl")
    rss = {n: child(PREPARE_CHILD, tokenizer_dir, path, work / f"rss{n}", 2, 1) for n, path in ((1, small), (10, large))}
    for n, path in ((1, small), (10, large)):
        print(f"memory, 2 workers, units of 1 MB: corpus {n:>2}x {path.stat().st_size / 1e6:6.1f} MB, "
              f"{rss[n]['blocks']:,} blocks, peak RSS of the process tree {rss[n]['peak_mib']:.0f} MiB")
    return {
        "rss_10x_over_1x": round(rss[10]["peak_mib"] / rss[1]["peak_mib"], 3),
        "prepare_2w_over_1w": round(one["seconds"] / two["seconds"], 3),
        "pack_vs_encode_fast": round(raw["seconds"] / one["seconds"], 3),
        "cpt_over_datasets_map": round(theirs["seconds"] / ours["seconds"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400, help="stdlib documents in the 1x corpus")
    parser.add_argument("--copies", type=int, default=6, help="copies of them in the preparation corpus")
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
        }
        result |= preparation(work / "tok", list(iter_documents(domain, "train", 0)), args.copies, work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
