"""A model's lineage: a run's own stage after the stages its init checkpoint records, each with the metrics
its run directory logged. What the forgetting tables, plots, sweeps' reports and loss-law fits read; training
never needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megacpt.errors import UserError
from megacpt.policy.stages import (
    STATE_FILE,
    CheckpointState,
    ImportedStage,
    StageRecord,
    VocabExtendedStage,
    read_state,
)
from megacpt.run_dir import read_metrics


@dataclass
class StageRun:
    """One stage of a model's life with what its run directory logged."""

    record: StageRecord | None  # its entry in a checkpoint's history; None for a run's own (open) stage
    run_dir: Path | None  # None: imported weights, no run
    start_tokens: int | None  # tokens seen before the stage; None when unknown (its init checkpoint is gone)
    records: list[dict] | None  # metrics.jsonl up to the step the next stage started from; None: not readable
    problem: str | None = None  # why `records` is None

    @property
    def train(self) -> list[dict]:
        """The training records, the last one per step (a resumed run logs the steps after its checkpoint again)."""
        return _last_per_step(self.records or [], "loss")

    @property
    def evals(self) -> list[dict]:
        """The evaluation records, the last one per step."""
        return _last_per_step(self.records or [], "eval")


@dataclass
class RunLineage:
    """A run directory's own stage after the stages its init checkpoint's history records."""

    own: StageRun
    start: dict[str, Any] | None  # the run's last `stage_start` metrics record (None: none logged)
    earlier: list[StageRun] | None  # oldest first; None when the init checkpoint is gone (history unknown)

    @property
    def logged(self) -> list[StageRun]:
        """The stages whose metrics are readable (imported and vanished runs left out), the run's own last."""
        return [s for s in self.earlier or [] if s.records is not None] + [self.own]


def history(state: CheckpointState) -> list[StageRun]:
    """A checkpoint's stage history, each stage with its run's metrics cut at the step the next one started from."""
    runs, tokens = [], 0
    for stage in state.stages:
        runs.append(_stage_run(stage, tokens))
        tokens += stage.tokens
    return runs


def run_lineage(run_dir: Path) -> RunLineage:
    """RUN_DIR's stage and the stages before it, followed through the `init` of its last `stage_start` record."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    starts = [r for r in records if r.get("event") == "stage_start"]
    start = starts[-1] if starts else None
    own = StageRun(None, run_dir, 0 if start else None, records)
    init = Path(start["init"]) if start and start["init"] else None
    if init is None:
        return RunLineage(own, start, [])
    if not (init / STATE_FILE).is_file():
        own.start_tokens = None
        return RunLineage(own, start, None)
    state = read_state(init)
    own.start_tokens = state.tokens
    return RunLineage(own, start, history(state))


def _stage_run(stage: StageRecord, start_tokens: int) -> StageRun:
    if isinstance(stage, ImportedStage):
        return StageRun(stage, None, start_tokens, None, f"stage {stage.index} was imported from {stage.path}")
    if isinstance(stage, VocabExtendedStage):
        return StageRun(stage, None, start_tokens, None, f"stage {stage.index} grew the vocabulary from "
                        f"{stage.base_vocab_size} to {stage.vocab_size} pieces (no training)")
    run_dir = Path(stage.run_dir)
    try:
        records = [r for r in read_metrics(run_dir) if r["step"] <= stage.steps_done]
    except UserError as e:
        return StageRun(stage, run_dir, start_tokens, None, str(e))
    return StageRun(stage, run_dir, start_tokens, records)


def _last_per_step(records: list[dict], key: str) -> list[dict]:
    by_step = {r["step"]: r for r in records if key in r}
    return [by_step[step] for step in sorted(by_step)]

