"""Where a run stands in its model's life once the load plan is known: the stage records (the new stage's
appended, or the resumed one's updated), where the stage begins in its sample stream, and whether
`train.freeze` has new vocabulary rows to train. Imports neither torch nor DeepSpeed.
"""
from __future__ import annotations

from pathlib import Path

from megacpt.config import RunConfig
from megacpt.errors import ConfigError
from megacpt.policy.load_plan import LoadPlan, new_rows
from megacpt.policy.stages import Resume, StageRecord, TrainedStage


def stage_records(config: RunConfig, plan: LoadPlan | None) -> list[StageRecord]:
    """The stage records of this model, ending with the current one (appended when this run is a new stage)."""
    if plan is not None and plan.resume:
        stages = list(plan.state.stages)
        # a lengthened (or shortened) stage says so in its record, as does what else the resume changed
        update = {"steps": config.train.steps}
        if plan.changes:  # resume.RESUMABLE keys only
            update["resumes"] = [*stages[-1].resumes, Resume(step=plan.state.step, changed=plan.changes)]
        stages[-1] = stages[-1].model_copy(update=update)
        return stages
    earlier = list(plan.state.stages) if plan is not None else []
    return earlier + [TrainedStage(
        index=len(earlier), name=Path(config.run_dir).name, run_dir=str(Path(config.run_dir).resolve()),
        init=str(plan.tag_dir) if plan else None, steps=config.train.steps,
        global_batch_size=config.train.global_batch_size, seq_length=config.model.seq_length,
        rotary_base=config.model.rotary_base, rope_scaling=config.model.rope_scaling,
        schedule=config.schedule, data=config.data, samples={}, steps_done=0)]


def stream_start(config: RunConfig, plan: LoadPlan | None) -> int:
    """Where this run's stage begins in its sample stream: a continued data position, else 0."""
    if plan is None or not plan.load_data_position:
        return 0
    t = plan.state.scheduler.t if plan.load_scheduler else 0
    return plan.state.data.consumed_samples - t * config.train.global_batch_size


def check_freeze(config: RunConfig, plan: LoadPlan | None) -> None:
    """train.freeze needs new vocabulary rows to train: an extension in the history of the loaded checkpoint."""
    freeze = config.train.freeze
    if freeze is None or freeze.steps == 0:
        return
    if freeze.steps > config.train.steps:
        raise ConfigError("train.freeze.steps", f"is {freeze.steps}, more than the stage's train.steps "
                          f"{config.train.steps}")
    if plan is None or new_rows(plan.state.stages) is None:
        where = f"the history of {plan.tag_dir}" if plan else "fresh weights"
        raise ConfigError("train.freeze", f"trains the rows of the last vocabulary extension only, but {where} has "
                          "no `megacpt extend-vocab` stage; remove train.freeze or start from an extended checkpoint")
