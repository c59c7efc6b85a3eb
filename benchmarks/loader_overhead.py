"""What the data path and logging add to a training step of the CPU demo model.

Builds a 3-source blended dataset with 25% replay (megacpt's real datasets and batch stream), then times
(a) `BatchStream.next_step()` alone, (b) a full training step on a batch already in memory, and (c) the
metrics record of a log step (samples per source + JSON line). Reports each as a share of the step.

    python benchmarks/loader_overhead.py
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_vs_hf import SIZES, megacpt_engine, megacpt_trainer, model_config  # noqa: E402

from datagen import write_indexed  # noqa: E402

REPS = 20


def main() -> None:
    from megacpt.config import validate_config
    from megacpt.data.datasets import build_train_dataset
    from megacpt.data.loader import BatchStream
    from megacpt.train.metrics import JsonlSink

    cpu = torch.device("cpu")
    step = megacpt_trainer(megacpt_engine("demo", cpu), "demo", cpu)  # sets up the world of one
    model, batch_size = model_config("demo"), SIZES["demo"][1]
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    prefixes = {n: write_indexed(folder / n, [rng.integers(0, model.vocab_size, 2000).tolist() for _ in range(200)])
                for n in ("new", "old1", "old2")}
    data = validate_config({
        "run_dir": str(folder / "run"), "model": {"preset": "cpu-small"},
        "data": {"sources": [{"name": "new", "prefix": prefixes["new"]}],
                 "replay": {"fraction": 0.25, "sources": [{"name": "old1", "prefix": prefixes["old1"]},
                                                          {"name": "old2", "prefix": prefixes["old2"]}]}},
        "train": {"steps": 100, "global_batch_size": batch_size},
    }).data
    dataset = build_train_dataset(data, 100 * batch_size, batch_size, model.seq_length, str(folder / "cache"),
                                  model.vocab_size, -1)
    stream = BatchStream(dataset, batch_size, batch_size, 0, 1, device=None)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    load = [timed(stream.next_step) for _ in range(REPS)]
    batch = stream.next_step()[0]
    train = [timed(lambda: step(batch["tokens"], batch["labels"])) for _ in range(REPS)]
    (folder / "metrics").mkdir()
    writer = JsonlSink(folder / "metrics")
    log = [timed(lambda: writer.write({"step": 1, "loss": 1.0,
                                       "samples": dataset.samples_per_source(stream.consumed_samples)}))
           for _ in range(REPS)]
    med = {k: statistics.median(v) for k, v in {"loader": load, "step": train, "log": log}.items()}
    print(json.dumps({
        "model": "demo (4 layers, hidden 256, seq 256, batch 8)",
        "step_ms": round(med["step"] * 1e3, 2), "loader_ms": round(med["loader"] * 1e3, 3),
        "log_record_ms": round(med["log"] * 1e3, 3),
        "loader_share_pct": round(100 * med["loader"] / med["step"], 3),
        "log_share_pct_at_interval_1": round(100 * med["log"] / med["step"], 3),
    }))


if __name__ == "__main__":
    main()
