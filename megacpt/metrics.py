"""Where training and evaluation records go: RUN_DIR/metrics.jsonl (one JSON object per line), the console
progress line and, when enabled, TensorBoard and Weights & Biases (wandb_sink.py). Only the main rank writes;
`read_metrics` reads a run back.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from megacpt.errors import UserError
from megacpt.run_dir import keep_metrics_until

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Appends records to metrics.jsonl (continuing the file on resume) and prints progress lines."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False, wandb=None):
        self.enabled = enabled
        self._wandb = wandb  # a WandbSink on the main rank, or None
        self.path = Path(run_dir) / METRICS
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard") if enabled and tensorboard else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            # evaluation records repeat stage/tokens of the training record at the same step
            scalars = flatten({"eval": record["eval"]}) if "eval" in record else flatten(record)
            for key, value in scalars.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            if "event" in record:
                self._tb.add_text("events", json.dumps(record), step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record)

    def rewind(self, step: int) -> None:
        """Drop the records of steps after `step` from metrics.jsonl (a rollback trains them again)."""
        if not self.enabled:
            return
        self._file.close()
        keep_metrics_until(self.path.parent, step)
        self._file = open(self.path, "a", encoding="utf-8")

    def checkpoint_saved(self, step: int, path: Path) -> None:
        """Sinks that show checkpoints (W&B, as text) learn of a new one."""
        if self.enabled and self._wandb is not None:
            self._wandb.log_checkpoint(step, path)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def flatten(record: dict, prefix: str = "") -> dict:
    """{'eval': {'prose': 1.0}} -> {'eval/prose': 1.0}: one series per source and per validation set."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard is true but tensorboard is not installed "
                        "(pip install 'megacpt[tb]')") from None
    return SummaryWriter(str(path))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a UserError naming the path when there are none."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else f"holds no {METRICS}"
        raise UserError(f"run directory {run_dir} {what}: give the run_dir of a `megacpt train` run")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not JSON: {e.msg}") from None
    if not any("loss" in r or "eval" in r for r in records):
        raise UserError(f"{path} holds no training or evaluation records yet")
    return records


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Throughput:
    """Tokens per second between two log points."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last_time = self.start
        self.last_tokens = 0

    def rate(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        return rate
