"""The loss laws' input: the LR of every step of a model's life and its validation losses, as `LrLossCurve`s.

A finished run (RUN_DIR) gives its own stage's LRs and evaluation losses from RUN_DIR/metrics.jsonl. The
stages it continues are named by its `stage_start` record's `init` checkpoint, whose megacpt state lists the
whole stage history: each earlier stage's run directory and the step the next stage started from, so their
metrics.jsonl supply the LRs before. A planned stage (a config for `megacpt train`) gets its LRs from
`megacpt.schedule.lr_at` after the history of its `init.checkpoint`. The LRs come from the training records
when every step is logged (train.log_interval 1); otherwise from the run's config.json through `lr_at`,
checked against every logged LR. The loss laws need the whole life, so a missing earlier run directory is an
error, not a shorter history. A model imported from Hugging Face has no LR history here: its first megacpt
stage counts as the start of training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megacpt.checkpoint.tags import resolve_tag
from megacpt.config import DataConfig, load_config
from megacpt.errors import ConfigError, UserError
from megacpt.evaluation.lineage import StageRun, history, run_lineage
from megacpt.policy.stages import STATE_FILE, TrainedStage, read_state
from megacpt.prediction.losslaw import LrLossCurve
from megacpt.run_dir import CONFIG, METRICS
from megacpt.schedule import check_schedule, lr_at


def run_curve(run_dir: Path, val: str) -> LrLossCurve:
    """The curve of RUN_DIR's evaluation losses on validation set `val`, over the LRs of the model's life."""
    lineage = run_lineage(run_dir)
    records = lineage.own.records
    if lineage.start is None:
        raise UserError(f"{run_dir / METRICS} has no stage_start record, so the stage history cannot be "
                        f"followed; is it from `megacpt train`?")
    if lineage.earlier is None:
        raise UserError(f"{run_dir} started from {lineage.start['init']}, which holds no {STATE_FILE} any more; "
                        f"the loss laws need the LR history of the stages before it")
    steps_done = max(r["step"] for r in records if "loss" in r or "eval" in r)
    own = stage_lrs(run_dir, records, lineage.start["stage"], steps_done)
    evals = {r["step"]: r["eval"][val] for r in lineage.own.evals if val in r["eval"]}
    if not evals:
        names = sorted({name for r in lineage.own.evals for name in r["eval"]})
        raise UserError(f"{run_dir / METRICS} has no evaluation records for validation set '{val}' "
                        f"(it has: {', '.join(names) or 'no evaluation records at all'})")
    data = load_config(run_dir / CONFIG).data if lineage.earlier else None
    lrs, offset, shift_start, replay = life(lineage.earlier, own, data, str(run_dir))
    steps = np.array(sorted(evals))
    return LrLossCurve(lrs, offset + steps, np.array([evals[s] for s in steps]), shift_start, replay)


def planned_curve(config_path: Path) -> LrLossCurve:
    """The curve of a planned new stage: a point after each of its steps, following its init checkpoint's
    history; no losses."""
    config = load_config(config_path)
    steps = config.train.steps
    check_schedule(config.schedule, steps)
    init = config.init
    if init.checkpoint is not None and (init.mode == "resume" or init.load_scheduler):
        raise ConfigError("init.mode" if init.mode == "resume" else "init.load_scheduler",
                          "megacpt predict plans new stages that start their schedule at step 0", str(config_path))
    earlier = history(read_state(resolve_tag(init.checkpoint))) if init.checkpoint else []
    own = np.array([lr_at(config.schedule, steps, t, len(earlier)) for t in range(steps)])
    lrs, offset, shift_start, replay = life(earlier, own, config.data, str(config_path))
    return LrLossCurve(lrs, offset + np.arange(1, steps + 1), shift_start=shift_start, replay=replay)


def life(earlier: list[StageRun], own: np.ndarray, own_data: DataConfig | None,
         who: str) -> tuple[np.ndarray, int, int | None, float]:
    """(LRs of the whole life, steps before the own stage, first step of the last stage on new data, its replay).

    A stage is on new data when its sources' prefixes differ from the stage before it (an imported model's
    stage has no data, so the first megacpt stage after it is always new data).
    """
    parts, starts, datas, offset = [], [], [], 0
    for run in earlier:
        starts.append(offset)
        trained = isinstance(run.record, TrainedStage)
        datas.append(run.record.data if trained else None)
        if trained and run.record.steps_done:
            parts.append(_earlier_lrs(run, who))
            offset += len(parts[-1])
    starts.append(offset)
    datas.append(own_data)
    shift_start, replay = None, 0.0
    for i in range(1, len(datas)):
        if datas[i] is not None and (datas[i - 1] is None or _prefixes(datas[i - 1]) != _prefixes(datas[i])):
            if isinstance(datas[i].replay.fraction, list):
                raise UserError(f"{who}: the loss laws take one replay fraction per stage, but the stage that "
                                "switched to new data schedules data.replay.fraction; predict a constant fraction")
            shift_start, replay = starts[i], float(datas[i].replay.fraction)
    return np.concatenate(parts + [own]), offset, shift_start, replay


def stage_lrs(run_dir: Path, records: list[dict], stage_index: int, steps_done: int) -> np.ndarray:
    """The LR of steps 1..steps_done of the stage in RUN_DIR.

    The logged ones, or config.json's schedule checked against them."""
    logged = {r["step"]: r["lr"] for r in records if "lr" in r and r["step"] <= steps_done}
    if len(logged) == steps_done:
        return np.array([logged[s] for s in range(1, steps_done + 1)])
    config = load_config(run_dir / CONFIG)
    lrs = np.array([lr_at(config.schedule, config.train.steps, t, stage_index) for t in range(steps_done)])
    for step, lr in logged.items():
        if not np.isclose(lr, lrs[step - 1], rtol=1e-6, atol=0.0):
            raise UserError(f"{run_dir / METRICS} logs LR {lr:.6g} at step {step} but the schedule in "
                            f"{run_dir / 'config.json'} gives {lrs[step - 1]:.6g}; the LR of every step is needed: "
                            f"train with train.log_interval 1")
    return lrs


def _earlier_lrs(run: StageRun, who: str) -> np.ndarray:
    """The LRs of an earlier stage, from its run directory, up to the step the next stage started from."""
    stage = run.record
    try:
        if run.records is None:
            raise UserError(run.problem)
        return stage_lrs(run.run_dir, run.records, stage.index, stage.steps_done)
    except UserError as e:
        raise UserError(f"{who} continues stage {stage.index} ('{stage.name}'), whose LR history the loss "
                        f"laws need: {e}") from None


def _prefixes(data: DataConfig) -> set[str]:
    return {source.prefix for source in data.sources}
