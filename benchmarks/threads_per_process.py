"""CPU threads per process under the launcher: megacpt's share of the cores against torch's default.

Trains the demo model data-parallel with `launch/local.sh N` (the real deepspeed launcher, N processes on
this machine), once as megacpt sets it up (each process takes cores / N threads) and once with
OMP_NUM_THREADS set to all the cores (torch's default for every process, N times oversubscribed),
alternating, and reports the median tokens/s of the logged steps after the first two.

    python benchmarks/threads_per_process.py --processes 2 --reps 3

Prints JSON on its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from datagen import random_documents, read_metrics, write_indexed  # noqa: E402


def run(folder: Path, name: str, processes: int, prefix: str, steps: int, threads: str | None) -> float:
    run_dir = folder / name
    config = {
        "run_dir": str(run_dir), "model": {"preset": "cpu-small"},
        "data": {"sources": [{"name": "random", "prefix": prefix}], "cache_dir": str(folder / "cache")},
        "schedule": {"style": "constant", "max_lr": 1e-4},
        "train": {"steps": steps, "global_batch_size": 8 * processes, "micro_batch_size": 8, "log_interval": 1,
                  "eval_interval": 0, "save_interval": 0},
    }
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    subprocess.run([str(ROOT / "launch" / "local.sh"), str(processes), str(config_path)], env=env, check=True,
                   capture_output=True, text=True)
    rates = [record["tokens_per_s"] for record in read_metrics(run_dir) if "tokens_per_s" in record]
    return statistics.median(rates[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    folder = Path(tempfile.mkdtemp(prefix="megacpt-threads-"))
    prefix = write_indexed(folder / "random", random_documents(0, 400, 2000, vocab=4096))
    results = {"shared": [], "all_cores_each": []}
    for rep in range(args.reps):
        results["shared"].append(run(folder, f"shared{rep}", args.processes, prefix, args.steps, None))
        results["all_cores_each"].append(run(folder, f"all{rep}", args.processes, prefix, args.steps, str(cores)))
        print(f"rep {rep}: " + "  ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in results.items()), file=sys.stderr)
    median = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({"cores": cores, "processes": args.processes,
                      "threads_each": {"shared": max(1, cores // args.processes), "all_cores_each": cores},
                      "tokens_per_s": {k: round(v) for k, v in median.items()},
                      "ratio": round(median["shared"] / median["all_cores_each"], 3), "all": results}))


if __name__ == "__main__":
    main()
