"""How long the training loop waits for each checkpoint, with and without `checkpoint.async_save`.

Runs `megacpt train` (one process, fp32 on the CPU, ZeRO stage `--zero`) on random tokens, saving every
`--save-interval` steps, once with synchronous saves and once with `checkpoint.async_save` (a host copy written
by a background thread), and reads the loop's wait per save (`blocked_s` of the `checkpoint` records in
metrics.jsonl: the save call, which for an asynchronous save is the host copy, plus the finish: for an
asynchronous save the wait for the writer, if any, and the manifest and `latest`). The last save of a run is
always waited for, so it is reported apart. Also the run's wall time, since the writer competes for the same
cores.

    python benchmarks/async_save.py --size demo
    python benchmarks/async_save.py --size cpu-100m --steps 8 --save-interval 2

Prints a table and, on its last line, JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from datagen import random_documents, write_indexed  # noqa: E402

# The demo's model (megacpt/demo/configs.py FULL) and larger ones; seq 128 and batch 4 keep steps short on 2 cores.
SIZES = {
    "demo": {"num_layers": 4, "hidden_size": 192, "num_attention_heads": 6, "vocab_size": 2048},
    "cpu-25m": {"preset": "cpu-25m"},
    "cpu-100m": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "vocab_size": 8192},  # 98M
    "pythia-160m": {"preset": "pythia-160m", "vocab_size": 50304},
}


def run(workdir: Path, size: str, zero: int, asynchronous: bool, steps: int, save_interval: int, data: str) -> dict:
    run_dir = workdir / ("async" if asynchronous else "sync")
    config = {
        "run_dir": str(run_dir),
        "model": {**SIZES[size], "seq_length": 128},
        "data": {"sources": [{"name": "random", "prefix": data}], "cache_dir": str(workdir / "cache")},
        "schedule": {"style": "constant", "max_lr": 1e-4, "warmup": 0},
        "train": {"steps": steps, "global_batch_size": 4, "micro_batch_size": 4, "save_interval": save_interval,
                  "log_interval": 1},
        "checkpoint": {"async_save": asynchronous},
        "deepspeed": {"zero_optimization": {"stage": zero}},
    }
    path = workdir / f"{run_dir.name}.json"
    path.write_text(json.dumps(config))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "megacpt", "train", str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"megacpt train failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = [r["blocked_s"] for r in records if r.get("event") == "checkpoint"]
    size_mb = sum(f.stat().st_size for f in (run_dir / "checkpoints" / f"step{steps:08d}").iterdir()) / 2**20
    return {"async": asynchronous, "mid_run_saves": len(saves) - 1,
            "mid_run_blocked_s_median": round(statistics.median(saves[:-1]), 3),
            "mid_run_blocked_s": [round(s, 3) for s in saves[:-1]], "last_save_blocked_s": round(saves[-1], 3),
            "checkpoint_mb": round(size_mb), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-interval", type=int, default=4)
    parser.add_argument("--zero", type=int, choices=[0, 1, 2], default=1, help="ZeRO stage (default 1)")
    parser.add_argument("--workdir", help="default: a temporary folder, removed afterwards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        vocab = SIZES[args.size].get("vocab_size", 8192)
        data = write_indexed(workdir / "random", random_documents(0, 4 * args.steps + 8, 1024, vocab))
        rows = [run(workdir, args.size, args.zero, asynchronous, args.steps, args.save_interval, data)
                for asynchronous in (False, True)]
    print(f"{'save':6} {'mid-run saves: loop waits (median, s)':38} {'last save (s)':14} {'checkpoint MB':14} wall s")
    for row in rows:
        print(f"{'async' if row['async'] else 'sync':6} {row['mid_run_blocked_s_median']:<38} "
              f"{row['last_save_blocked_s']:<14} {row['checkpoint_mb']:<14} {row['wall_s']}")
    print(json.dumps({"size": args.size, "zero": args.zero, "steps": args.steps, "save_interval": args.save_interval,
                      "runs": rows}))


if __name__ == "__main__":
    main()
