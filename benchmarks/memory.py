"""Host memory of the engine: cpt's ranks against a plain DeepSpeed script, stage against stage.

One run, a Llama of about 260M parameters built from a config (hidden 1024, 20 layers; 1.04 GB in
fp32), on CPU processes. Every figure is a ratio of peaks measured in this run: each process's
peak resident memory is the kernel's high-water mark (``VmHWM``), polled until it exits.

- ``zero3_2p_rank_peak_over_plain_deepspeed``: a cpt rank over a whole two-stage ZeRO-3 run on 2
  processes (load, steps, checkpoints, export; the second stage loads the first one's export),
  over a rank of a plain DeepSpeed script (transformers' ``zero.Init``, buckets sized for the
  model) training the same model the same number of steps;
- ``two_stage_peak_over_one_stage``: a two-stage ZeRO-0 run in one process over a one-stage one;
- ``load_growth_over_model_bytes``: how much a rank's memory grows while the first stage's export
  loads as ZeRO-3 partitions on 2 processes (``load_probe.py``), over the model's fp32 bytes;
- ``act_ckpt_peak_over_plain``: one ZeRO-0 process at micro-batch 8 x seq 1024, with activation
  checkpointing over without;
- ``zero3_rank_peak_2p_over_1p``: the two-stage ZeRO-3 run's rank peak on 2 processes over 1.

    python benchmarks/memory.py [--steps 1] [--seq-len 64] [--skip-act-ckpt]
    python benchmarks/memory.py --cpt-src OLD_CHECKOUT --python PYTHON   # the same runs on other code

Last line: JSON of the figures (null where a run failed, e.g. was killed for memory).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

HERE = Path(__file__).resolve().parent
MODEL = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20,
         "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 1024}
VOCAB = 2048


def recipe(out: Path, *, stages: int, zero: int, procs: int, steps: int, seq_len: int, micro: int, batch: int,
           act_ckpt: bool = False) -> dict:
    def stage(name: str, first: bool) -> dict:
        s = {
            "name": name,
            "data": {f"{name}-text": {"source": "builtin:python-docs" if first else "builtin:python-stdlib",
                                      "heldout": 0}},
            "schedule": {"type": "constant", "lr": 1e-4, "warmup": 0},
            "steps": steps, "seq_len": seq_len, "batch": {"global_batch_size": batch, "micro_batch_size": micro},
            "evaluation": {"enabled": False},
        }
        if first:
            s.update(model={"config": MODEL}, tokenizer={"train": {"vocab_size": VOCAB, "max_documents": 200}})
        if act_ckpt:
            s["memory"] = {"activation_checkpointing": True}
        return s

    return {"name": "memory", "seed": 0, "output_dir": str(out),
            "distributed": {"zero_stage": zero, "num_processes": procs},
            "stages": [stage("first", True), stage("second", False)][:stages]}


def peak_of_tree(cmd: list[str], env: dict, log: Path, limit: int) -> dict[int, int] | None:
    """Run ``cmd``; the peak RSS of each of its processes running ``cpt.cli`` or a script of ours,
    or None when it failed or its processes together went over ``limit`` bytes (then it is killed
    before the kernel's OOM killer picks something else on the machine)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            resident = 0
            for p in tree:
                try:
                    resident += p.memory_info().rss
                    if _is_worker(p.cmdline()):
                        with open(f"/proc/{p.pid}/status") as f:
                            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
                        peaks[p.pid] = max(peaks.get(p.pid, 0), hwm)
                except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError, StopIteration):
                    pass
            if resident > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                print(f"{log.stem}: killed at {resident / 2**30:.1f} GiB resident (limit {limit / 2**30:.1f})",
                      file=sys.stderr)
                return None
            time.sleep(0.05)
    return peaks if proc.returncode == 0 else None


def _is_worker(cmdline: list[str]) -> bool:
    if "deepspeed.launcher.runner" in cmdline or "deepspeed.launcher.launch" in cmdline:
        return False
    return any(a.endswith(("plain_deepspeed.py", "load_probe")) or a == "cpt.cli" for a in cmdline)


def rank_peak(peaks: dict[int, int] | None) -> int | None:
    """The largest peak of a training process (a relaunching parent holds no model and counts too,
    but it never exceeds a rank)."""
    return max(peaks.values()) if peaks else None


def gib(n: int | None) -> str:
    return "none (failed)" if n is None else f"{n / 2**30:.2f} GiB"


def ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per stage")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--skip-act-ckpt", action="store_true", help="leave out the two micro-batch 8 x 1024 runs")
    ap.add_argument("--cpt-src", type=Path, help="run the cpt of this checkout instead (figures of older code)")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter to run cpt with (with --cpt-src: one where cpt is not installed)")
    ap.add_argument("--limit-gib", type=float, default=0.85 * psutil.virtual_memory().available / 2**30,
                    help="kill a run whose processes together hold more (default: 85%% of what is available now)")
    ap.add_argument("--keep", type=Path, help="keep the runs here instead of a temporary directory")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="cpt-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    src = args.cpt_src.resolve() if args.cpt_src else HERE.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CPT_CACHE_DIR": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(src), str(HERE)]), "TOKENIZERS_PARALLELISM": "false"}
    figures: dict[str, int | None] = {}
    limit = int(args.limit_gib * 2**30)

    def cpt_run(name: str, **kw) -> int | None:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe(work / name, **kw), sort_keys=False))
        peak = rank_peak(peak_of_tree([args.python, "-m", "cpt.cli", "run", str(path), "--overwrite"], env,
                                      work / f"{name}.log", limit))
        print(f"{name}: peak {gib(peak)}", file=sys.stderr, flush=True)
        return peak

    common = dict(steps=args.steps, seq_len=args.seq_len, micro=1, batch=2)
    figures["z3_2p_two_stage"] = cpt_run("z3-2p-two", stages=2, zero=3, procs=2, **common)
    plain = [args.python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29533", "--no_local_rank",
             str(HERE / "plain_deepspeed.py"), json.dumps(MODEL), str(VOCAB), str(2 * args.steps), str(args.seq_len)]
    figures["plain_ds_2p"] = rank_peak(peak_of_tree(plain, env, work / "plain.log", limit))
    print(f"plain deepspeed: peak {gib(figures['plain_ds_2p'])}", file=sys.stderr)
    figures["z3_1p_two_stage"] = cpt_run("z3-1p-two", stages=2, zero=3, procs=1, **common)
    figures["z0_1p_two_stage"] = cpt_run("z0-1p-two", stages=2, zero=0, procs=1, **common)
    figures["z0_1p_one_stage"] = cpt_run("z0-1p-one", stages=1, zero=0, procs=1, **common)

    export = work / "z0-1p-one" / "first" / "final"
    model_bytes = None
    if (export / "model.safetensors").is_file():
        model_bytes = (export / "model.safetensors").stat().st_size
        warm = work / "warmup"
        subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoConfig, AutoModelForCausalLM; "
                        "c = AutoConfig.for_model(model_type='llama', hidden_size=64, intermediate_size=64, "
                        "num_hidden_layers=1, num_attention_heads=4, vocab_size=64); "
                        "AutoModelForCausalLM.from_config(c).save_pretrained(sys.argv[1])", str(warm)], env=env, check=True)
        probe = [args.python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29534",
                 "--no_local_rank", "--module", "load_probe", str(export), str(warm), str(work)]
        if peak_of_tree(probe, env, work / "probe.log", limit) is not None:
            reports = [json.loads((work / f"rank-{r}.json").read_text()) for r in (0, 1)]
            figures["load_growth"] = max(r["peak_after"] - max(r["peak_before"], r["rss_before"]) for r in reports)
    if not args.skip_act_ckpt:
        big = dict(steps=1, seq_len=1024, micro=8, batch=8, stages=1, zero=0, procs=1)
        figures["act_ckpt_off"] = cpt_run("act-off", **big)
        figures["act_ckpt_on"] = cpt_run("act-on", act_ckpt=True, **big)

    print(json.dumps({"figures_bytes": figures, "model_fp32_bytes": model_bytes}), file=sys.stderr)
    print(json.dumps({
        "zero3_2p_rank_peak_over_plain_deepspeed": ratio(figures["z3_2p_two_stage"], figures["plain_ds_2p"]),
        "two_stage_peak_over_one_stage": ratio(figures["z0_1p_two_stage"], figures["z0_1p_one_stage"]),
        "load_growth_over_model_bytes": ratio(figures.get("load_growth"), model_bytes),
        "act_ckpt_peak_over_plain": ratio(figures.get("act_ckpt_on"), figures.get("act_ckpt_off")),
        "zero3_rank_peak_2p_over_1p": ratio(figures["z3_2p_two_stage"], figures["z3_1p_two_stage"]),
    }))


if __name__ == "__main__":
    main()
