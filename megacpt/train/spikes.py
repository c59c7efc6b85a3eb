"""Loss spikes: judge each step's loss against a window of recent ones, and the ledger of rollbacks.

A step whose loss (the mean over the data-parallel ranks, so every rank judges the same number) exceeds the
mean of the window by more than `zscore` standard deviations is a spike, and its update is skipped like a
non-finite step's (the `Spikes` callback gates it, after the step guard). The window holds the losses of the
most recent applied steps and is saved with every
checkpoint, so a resumed run judges exactly as the uninterrupted one would have.

After `max_in_a_row` spikes the loop rolls back to the newest checkpoint before the first of them. The
rollback is recorded first in RUN_DIR/spike_ledger.json (written atomically): which batches spiked (by step
and sample range) and where the run went back to. The ledger is the run's memory across rollbacks and kills:
a step whose batch it names is skipped without being judged, the LR is lowered for `lr_steps` steps after
each rollback's checkpoint (the scheduler asks `lr_factor`), and the number of rollbacks is bounded by
`max_rollbacks`. The ledger is honoured even when `train.spike` is off now.
"""
from __future__ import annotations

import json
import statistics
from collections import deque
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megacpt.checkpoint.tags import newest_verified, set_aside_newer, tag_name
from megacpt.config import SpikeConfig
from megacpt.errors import UserError
from megacpt.files import write_atomic
from megacpt.policy.load_plan import LoadPlan
from megacpt.policy.stages import read_state
from megacpt.run_dir import SPIKE_LEDGER, checkpoint_dir
from megacpt.train.callbacks import Callback, StepResult
from megacpt.train.metrics import MetricsLog
from megacpt.train.step_guard import StepGuard

SPIKE, LEDGER_SKIP = "spike", "ledger"


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
        path = Path(run_dir) / SPIKE_LEDGER
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
        write_atomic(Path(run_dir) / SPIKE_LEDGER, self.model_dump_json(indent=1))

    def skips(self, step: int) -> bool:
        """Whether the batch of `step` spiked before a rollback (and is skipped from then on)."""
        return any(b.step == step for r in self.rollbacks for b in r.batches)

    def lr_factor(self, step: int, config: SpikeConfig | None) -> float:
        """The LR multiplier of `step`: lowered for `lr_steps` steps after a rollback's checkpoint."""
        if config is None or not any(r.to_step < step <= r.to_step + config.lr_steps for r in self.rollbacks):
            return 1.0
        return config.lr_factor


class Spikes(Callback):
    """Gates updates on the spike ledger and the z-score test, logs each skip, and rolls back after
    `max_in_a_row` spikes. `restore(plan)` loads a checkpoint into the engine, scheduler and stream."""

    def __init__(self, config: SpikeConfig | None, ledger: SpikeLedger, guard: StepGuard, metrics: MetricsLog,
                 run_dir: str, is_main: bool, restore, window: list[float] | None = None):
        self.config, self.ledger, self.guard, self.metrics = config, ledger, guard, metrics
        self.run_dir, self.is_main, self.restore = run_dir, is_main, restore
        self.detector = SpikeDetector(config, window) if config else None
        self.current_step = 0  # the step being trained
        self.spiked: list[SpikedBatch] = []  # the current row of spikes
        self.records: list[dict] = []  # their metrics records

    def before_step(self, loop, step: int) -> None:
        self.current_step = step

    def before_update(self, loop) -> str | None:
        if self.ledger.skips(self.current_step):
            return LEDGER_SKIP
        loss = self.guard.step_loss
        if self.detector is not None and self.detector.is_spike(loss):
            return SPIKE
        if self.detector is not None:
            self.detector.accept(loss)
        return None

    def after_step(self, loop, result: StepResult) -> None:
        loss = self.guard.step_loss
        if result.skipped is None:
            self.spiked, self.records = [], []
        elif result.skipped == SPIKE:
            self.spiked.append(SpikedBatch(step=result.step, samples=[result.first_sample,
                                                                      loop.stream.consumed_samples], loss=loss))
            mean, std = self.detector.stats()
            self.records.append({"step": result.step, "event": "spike", "loss": loss, "window_mean": mean,
                                 "window_std": std, "in_a_row": len(self.spiked)})
            self.metrics.write(self.records[-1])
            self.metrics.print(f"step {result.step}: loss {loss:.4f} is a spike (window mean {mean:.4f}, std "
                               f"{std:.4f}): skipped, {len(self.spiked)} in a row")
            if len(self.spiked) >= self.config.max_in_a_row:
                self.roll_back(loop, result.step)
        elif result.skipped == LEDGER_SKIP:
            self.metrics.write({"step": result.step, "event": "spike_ledger_skip", "loss": loss})
            self.metrics.print(f"step {result.step}: its batch spiked before a rollback ({SPIKE_LEDGER}): skipped")

    def roll_back(self, loop, step: int) -> None:
        """Go back to the newest checkpoint before the first spike of the row, record the spiked batches in
        the ledger and continue from there. Every rank takes part."""
        cfg = self.config
        root = checkpoint_dir(self.run_dir)
        first = self.spiked[0].step
        steps = ", ".join(str(b.step) for b in self.spiked)
        if len(self.ledger.rollbacks) >= cfg.max_rollbacks:
            raise UserError(
                f"steps {steps} were loss spikes in a row, and this run has rolled back "
                f"{len(self.ledger.rollbacks)} times already (train.spike.max_rollbacks = {cfg.max_rollbacks}); "
                f"stopping without saving. The rollbacks are in {Path(self.run_dir) / SPIKE_LEDGER}, the "
                f"checkpoints in {root} are kept; check the data of those steps or lower schedule.max_lr")
        target = [newest_verified(root, before=tag_name(first)) if self.is_main else None]
        torch.distributed.broadcast_object_list(target, src=0)
        if target[0] is None:
            raise UserError(f"steps {steps} were loss spikes in a row, but no checkpoint of this run before step "
                            f"{first} verifies, so there is nothing to roll back to; stopping without saving. Set "
                            "train.save_interval so that one exists")
        tag_dir = target[0]
        state = read_state(tag_dir)
        rollback = Rollback(at_step=step, to_step=state.step, batches=self.spiked)
        if self.is_main:  # newer tags aside first: a kill before the ledger entry replays the same spikes
            set_aside_newer(tag_dir)
            self.ledger.add(self.run_dir, rollback)
        else:
            self.ledger.rollbacks.append(rollback)
        torch.distributed.barrier()
        self.restore(LoadPlan(tag_dir=tag_dir, state=state, resume=True, load_optimizer=True, load_scheduler=True,
                              load_data_position=True))
        loop.rewind(state)  # every callback forgets the steps after it; the record below keeps the spikes
        self.detector = SpikeDetector(cfg, state.spike_window)
        self.metrics.write({"step": state.step, "event": "rollback", "rollback": len(self.ledger.rollbacks),
                            "at_step": step, "spiked_steps": [b.step for b in self.spiked],
                            "spikes": self.records, "checkpoint": str(tag_dir)})
        lowered = f"; LR x {cfg.lr_factor} for {cfg.lr_steps} steps" if cfg.lr_steps and cfg.lr_factor < 1 else ""
        self.metrics.print(f"steps {steps} were loss spikes in a row: rolled back to {tag_dir} (rollback "
                           f"{len(self.ledger.rollbacks)} of at most {cfg.max_rollbacks}); their batches are skipped "
                           f"from now on{lowered}")
        self.spiked, self.records = [], []

    def state(self) -> dict:
        return {"spike_window": self.detector.state() if self.detector else None}
