"""Loss spikes: judge each step's loss against a window of recent ones, and the ledger of rollbacks.

A step whose loss (the mean over the data-parallel ranks, so every rank judges the same number) exceeds the
mean of the window by more than `zscore` standard deviations is a spike; step_guard.py skips it like a
non-finite step. The window holds the losses of the most recent applied steps and is saved with every
checkpoint, so a resumed run judges exactly as the uninterrupted one would have.

After `max_in_a_row` spikes the loop rolls back to the newest checkpoint before the first of them. The
rollback is recorded first in RUN_DIR/spike_ledger.json (written atomically): which batches spiked (by step
and sample range) and where the run went back to. The ledger is the run's memory across rollbacks and kills:
a step whose batch it names is skipped without being judged, the LR is lowered for `lr_steps` steps after
each rollback's checkpoint, and the number of rollbacks is bounded by `max_rollbacks`. This module knows
nothing about engines or checkpoints' contents.
"""
from __future__ import annotations

import json
import statistics
from collections import deque
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megacpt.config import SpikeConfig
from megacpt.errors import UserError
from megacpt.files import write_atomic

LEDGER = "spike_ledger.json"


class SpikeDetector:
    """The window of recent applied steps' losses and the z-score test against it."""

    def __init__(self, config: SpikeConfig, window: list[float] | None = None):
        self.zscore = config.zscore
        self.losses: deque[float] = deque(window or (), maxlen=config.window)

    def is_spike(self, loss: float) -> bool:
        """Judged only once the window is full; identical inputs give identical answers on every rank."""
        if len(self.losses) < self.losses.maxlen:
            return False
        mean, std = self.stats()
        return loss > mean + self.zscore * std

    def stats(self) -> tuple[float, float]:
        """Mean and (sample) standard deviation of the window."""
        return statistics.fmean(self.losses), statistics.stdev(self.losses)

    def accept(self, loss: float) -> None:
        """An applied step's loss joins the window (the oldest leaves it)."""
        self.losses.append(loss)

    def state(self) -> list[float]:
        return list(self.losses)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpikedBatch(_Entry):
    step: int = Field(gt=0, description="The step that trained on the batch.")
    samples: list[int] = Field(min_length=2, max_length=2, description="[first, end) of the global sample stream.")
    loss: float = Field(description="The batch's loss (mean over the data-parallel ranks).")


class Rollback(_Entry):
    at_step: int = Field(gt=0, description="The step whose spike made the run roll back.")
    to_step: int = Field(ge=0, description="The step of the checkpoint the run went back to.")
    batches: list[SpikedBatch] = Field(min_length=1, description="The batches that spiked; skipped from then on.")


class SpikeLedger(_Entry):
    format: int = 1
    rollbacks: list[Rollback] = Field(default_factory=list)

    @classmethod
    def read(cls, run_dir: str | Path) -> "SpikeLedger":
        """RUN_DIR's ledger, empty when there is none; a damaged one is a UserError naming the file."""
        path = Path(run_dir) / LEDGER
        if not path.is_file():
            return cls()
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except ValidationError as e:
            err = e.errors()[0]
            problem = f"field '{'.'.join(map(str, err['loc']))}': {err['msg']}"
        except (OSError, ValueError) as e:
            problem = str(e)
        raise UserError(f"cannot read the spike ledger {path}: {problem}. It records which batches this run skips; "
                        "restore it, or remove it to judge those batches again")

    def add(self, run_dir: str | Path, rollback: Rollback) -> None:
        """Record one more rollback, atomically: after a kill the ledger holds it entirely or not at all."""
        self.rollbacks.append(rollback)
        write_atomic(Path(run_dir) / LEDGER, self.model_dump_json(indent=1))

    def skips(self, step: int) -> bool:
        """Whether the batch of `step` spiked before a rollback (and is skipped from then on)."""
        return any(b.step == step for r in self.rollbacks for b in r.batches)

    def lr_factor(self, step: int, config: SpikeConfig | None) -> float:
        """The LR multiplier of `step`: lowered for `lr_steps` steps after a rollback's checkpoint."""
        if config is None or not any(r.to_step < step <= r.to_step + config.lr_steps for r in self.rollbacks):
            return 1.0
        return config.lr_factor
