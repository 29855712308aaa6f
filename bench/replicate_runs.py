"""Train the replication's models: every setting x every training seed, at one common step budget.

    python bench/replicate_runs.py --runs /work/runs [--steps 2000] [--seeds 0,1,2] [--jobs 2]
                                   [--only simple,kl-importance] [--dry-run]

One `fastddpm train` per (setting, seed) into RUNS/SETTING-seedS, `--threads 1` each and --jobs of
them at a time. A run folder that already holds a checkpoint is continued with `--resume` (a run
killed part-way, or one trained to fewer steps), one that has reached --steps is skipped, so the
script can be rerun at any time. Every run shares the flags of COMMON and differs only in its
setting's flags and --seed: the settings are the five whose likelihood ordering DDPM and IDDPM
claim (docs/REPLICATION.md, "The models").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COMMON = ["--data", "digits", "--model", "tiny", "--batch", "128", "--lr", "5e-4", "--warmup", "500",
          "--ema", "0.999", "--save-every", "500", "--log-every", "25", "--no-progress", "--sample-every", "0",
          "--threads", "1"]
SETTINGS = {
    "simple": ["--loss", "simple"],
    "hybrid-linear": ["--loss", "hybrid", "--schedule", "linear"],
    "hybrid-cosine": ["--loss", "hybrid", "--schedule", "cosine"],
    "kl-uniform": ["--loss", "kl"],
    "kl-importance": ["--loss", "kl", "--timestep-sampler", "loss-second-moment"],
}


def run_name(setting: str, seed: int) -> str:
    return f"{setting}-seed{seed}"


def reached_step(folder: Path) -> int | None:
    """The step of folder/last.safetensors (None without one), read from its JSON header only."""
    path = folder / "last.safetensors"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return int(json.loads(header["__metadata__"]["config"])["meta"]["step"])


def command(setting: str, seed: int, folder: Path, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "fastddpm.cli", "train", *COMMON, *SETTINGS[setting],
           "--steps", str(steps), "--seed", str(seed), "--out", str(folder)]
    return cmd + ["--resume"] if reached_step(folder) is not None else cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="/work/runs")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default=",".join(SETTINGS))
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    todo = []
    for seed in seeds:  # seed-major: every setting gets its first seed before any gets its second
        for setting in a.only.split(","):
            if setting not in SETTINGS:
                p.error(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
            folder = Path(a.runs) / run_name(setting, seed)
            step = reached_step(folder)
            if step is not None and step >= a.steps:
                print(f"{folder.name}: at step {step}, nothing to do")
                continue
            todo.append((setting, seed, folder))
    if a.dry_run:
        for setting, seed, folder in todo:
            print(" ".join(command(setting, seed, folder, a.steps)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def one(job) -> int:
        setting, seed, folder = job
        folder.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(f"{folder}.log", "ab") as log:
            rc = subprocess.call(command(setting, seed, folder, a.steps), stdout=log, stderr=subprocess.STDOUT,
                                 env=env)
        print(f"{folder.name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        return rc

    with ThreadPoolExecutor(a.jobs) as pool:
        codes = list(pool.map(one, todo))
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
