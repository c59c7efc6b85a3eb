"""Where the loop's records go, and the training records themselves.

`MetricsLog` takes every record (training, evaluation, events) and hands it to its sinks: RUN_DIR/metrics.jsonl
always, TensorBoard and Weights & Biases (wandb_sink.py) when enabled; it also prints the progress lines. Only
the main rank writes. `TrainLog` is the callback that writes a training record every `train.log_interval`
steps (and at the last step), with the mean loss over the ranks and the steps since the last record.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Protocol

import torch

from megacpt.errors import UserError
from megacpt.files import LineFile
from megacpt.run_dir import METRICS, TENSORBOARD, keep_metrics_until
from megacpt.train.callbacks import Callback, StepResult


class Sink(Protocol):
    """A destination of metrics records."""

    def write(self, record: dict) -> None: ...

    def rewind(self, step: int) -> None: ...  # a rollback trains the steps after `step` again

    def checkpoint_saved(self, step: int, path: Path) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """RUN_DIR/metrics.jsonl, one JSON object per line, continued on resume."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS
        self.file = LineFile(self.path)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drop the records of steps after `step` (a rollback trains them again)."""
        self.file.close()
        keep_metrics_until(self.path.parent, step)
        self.file = LineFile(self.path)

    def checkpoint_saved(self, step: int, path: Path) -> None:
        pass

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Scalars per record key (nested keys joined by '/'), events as text."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("logging.tensorboard is true but tensorboard is not installed "
                            "(pip install 'megacpt[tb]')") from None
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD))

    def write(self, record: dict) -> None:
        step = record["step"]
        # evaluation records repeat stage/tokens of the training record at the same step
        scalars = flatten({"eval": record["eval"]}) if "eval" in record else flatten(record)
        for key, value in scalars.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        if "event" in record:
            self.writer.add_text("events", json.dumps(record), step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        pass  # TensorBoard shows the later value of a step trained again

    def checkpoint_saved(self, step: int, path: Path) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class MetricsLog(Callback):
    """Every record of the run, to every sink (main rank only); progress lines to stderr."""

    def __init__(self, sinks: list[Sink], enabled: bool):
        self.sinks = sinks if enabled else []
        self.enabled = enabled

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def checkpoint_saved(self, step: int, path: Path) -> None:
        """Sinks that show checkpoints (W&B, as text) learn of a new one."""
        for sink in self.sinks:
            sink.checkpoint_saved(step, path)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def rewind(self, loop, step: int) -> None:
        for sink in self.sinks:
            sink.rewind(step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TrainLog(Callback):
    """A training record every `log_interval` steps, at the last step and when the run diverged."""

    def __init__(self, metrics: MetricsLog, log_interval: int, steps: int, stage_index: int, diverged):
        self.metrics, self.log_interval, self.steps, self.stage_index = metrics, log_interval, steps, stage_index
        self.diverged = diverged  # () -> bool: the step guard's verdict, logged before it stops the run
        self.losses: list[torch.Tensor] = []
        self.throughput = Throughput()

    def on_start(self, loop) -> None:
        self.throughput = Throughput()
        self.throughput.last_tokens = loop.total_tokens()
        if loop.start_t > 0:
            self.metrics.print(f"resuming stage {self.stage_index} at step {loop.start_t}/{self.steps}")

    def before_step(self, loop, step: int) -> None:
        self.lr = loop.scheduler.current_lr()  # the LR this step's update uses

    def after_step(self, loop, result: StepResult) -> None:
        self.losses.append(result.loss)
        step = result.step
        if step % self.log_interval and step != self.steps and not self.diverged():
            return
        mean_loss = torch.stack(self.losses).mean()
        torch.distributed.all_reduce(mean_loss, group=loop.world.data_group())
        mean_loss = mean_loss.item() / loop.world.data_size
        self.losses.clear()
        grad_norm = loop.engine.get_global_grad_norm()
        tokens = loop.total_tokens()
        rate = self.throughput.rate(tokens)
        self.metrics.write({
            "step": step, "stage": self.stage_index, "lr": self.lr, "loss": mean_loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": tokens, "samples": loop.samples_per_source(), "tokens_per_s": rate,
            "skipped_steps": loop.skipped_total,
        })
        elapsed = time.perf_counter() - self.throughput.start
        eta = elapsed / max(step - loop.start_t, 1) * (self.steps - step)
        self.metrics.print(f"step {step}/{self.steps}  loss {mean_loss:.4f}  lr {self.lr:.3e}  "
                           f"{rate:,.0f} tok/s  ETA {format_duration(eta)}")

    def rewind(self, loop, step: int) -> None:
        self.losses.clear()
        self.throughput.last_tokens = loop.total_tokens()


def flatten(record: dict, prefix: str = "") -> dict:
    """{'eval': {'prose': 1.0}} -> {'eval/prose': 1.0}: one series per source and per validation set."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
