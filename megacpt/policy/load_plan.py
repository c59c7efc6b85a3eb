"""The load plan: what a run takes from which checkpoint, decided before any engine exists.

Two modes. A *resume* continues the checkpoint's stage: weights, Adam's moments and step count, the schedule
position, the data position and this rank's RNG all come back, and only the keys resume.py lists may change.
A *new stage* always takes the weights and then, independently, as `init.load_optimizer`,
`init.load_scheduler` and `init.load_data_position` say: Adam's moments and step count, the position in the
old schedule, the position in the old sample stream. A weights-only tag that `megacpt extend-vocab` grew takes
its kept optimizer from the checkpoint it grew (the new rows' moments start at zero).

Finding, verifying and reading the tag is checkpoint/locate.py's job; loading it into an engine is
checkpoint/load.py's. This module only decides, and refuses choices that cannot mean anything. It imports
neither torch nor DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megacpt.config import InitConfig, RunConfig
from megacpt.errors import ConfigError, UserError
from megacpt.policy.resume import check_resume
from megacpt.policy.stages import CheckpointState, ModelSignature, StageRecord, TrainedStage, VocabExtendedStage
from megacpt.schedule import check_continuation


@dataclass(kw_only=True)
class LoadPlan:
    """What to load from which tag."""

    tag_dir: Path
    state: CheckpointState
    resume: bool  # continue the checkpoint's stage (own RUN_DIR, or init.mode 'resume')
    load_optimizer: bool  # Adam's moments and step count
    load_scheduler: bool  # the position in the checkpoint's schedule
    load_data_position: bool  # the position in the checkpoint's sample stream
    changes: dict[str, list] = field(default_factory=dict)  # resumable config keys changed: [old, new]
    # A weights-only tag of `megacpt extend-vocab`: the optimizer comes from the checkpoint it grew (fewer rows),
    # with this state, and the moments of the new ids' rows start at zero.
    optimizer_tag: Path | None = None
    optimizer_state: CheckpointState | None = None
    new_rows: range | None = None
    # Filled by checkpoint/load.py when the optimizer state was saved for another layout: its universal form.
    universal: Path | None = None

    @property
    def optimizer_source(self) -> tuple[Path, CheckpointState]:
        """The tag the optimizer state is loaded from, and its state."""
        if self.optimizer_tag is None:
            return self.tag_dir, self.state
        return self.optimizer_tag, self.optimizer_state

    def inherits(self) -> dict[str, bool]:
        """Which parts of the training state come from the checkpoint (the rest starts fresh)."""
        return {"weights": True, "optimizer_moments": self.load_optimizer, "optimizer_step": self.load_optimizer,
                "optimizer_hyperparameters": False,  # always this config's (checkpoint/load.py)
                "schedule_position": self.load_scheduler, "data_position": self.load_data_position,
                "rng": self.resume}


def resume_plan(config: RunConfig, tag_dir: Path, state: CheckpointState, own_run: bool) -> LoadPlan:
    """Continue the checkpoint's stage: everything comes back; a changed key must be one a resume may change."""
    if not own_run and (not state.has_optimizer or state.scheduler is None):
        raise ConfigError("init.mode", f"'resume' needs a training checkpoint; {tag_dir} holds weights only "
                                       "(imported or merged): use 'new_stage'")
    changes = check_resume(config, state.config, tag_dir, own_run=own_run)
    if config.train.steps < state.step:
        raise ConfigError("train.steps", f"is {config.train.steps}, but the checkpoint {tag_dir} being resumed has "
                          f"trained {state.step} steps of this stage already; a resume may lengthen a stage or end "
                          f"it at a step not yet trained, not undo steps (train.steps >= {state.step})")
    return LoadPlan(tag_dir=tag_dir, state=state, resume=True, load_optimizer=True, load_scheduler=True,
                    load_data_position=True, changes=changes)


def new_stage_plan(config: RunConfig, tag_dir: Path, state: CheckpointState,
                   grown: tuple[Path, CheckpointState] | None = None) -> LoadPlan:
    """Start a new stage from the checkpoint's weights, keeping what `init.load_*` ask for. `grown`: the
    checkpoint whose vocabulary this weights-only tag grew, and its state, where a kept optimizer comes from."""
    init = config.init
    optimizer_tag, optimizer_state = grown if grown is not None and init.load_optimizer else (None, None)
    if optimizer_state is not None and not optimizer_state.has_optimizer:
        raise ConfigError("init.load_optimizer", f"{tag_dir} holds weights only, and {optimizer_tag}, whose "
                          "vocabulary it grew, holds no optimizer state either; set it to false")
    check_init_combination(init if optimizer_tag is None else init.model_copy(update={"load_optimizer": False}),
                           state, config)
    return LoadPlan(tag_dir=tag_dir, state=state, resume=False, load_optimizer=init.load_optimizer,
                    load_scheduler=init.load_scheduler, load_data_position=init.load_data_position,
                    optimizer_tag=optimizer_tag, optimizer_state=optimizer_state,
                    new_rows=new_rows(state.stages) if optimizer_tag else None)


def grown_from(state: CheckpointState) -> str | None:
    """The checkpoint whose vocabulary `megacpt extend-vocab` grew into this weights-only state; None for others."""
    last = state.stages[-1]
    return last.checkpoint if isinstance(last, VocabExtendedStage) and not state.has_optimizer else None


def new_rows(stages: list[StageRecord]) -> range | None:
    """The token ids the last vocabulary extension of a lineage added; None when there was none."""
    extensions = [s for s in stages if isinstance(s, VocabExtendedStage)]
    return range(extensions[-1].base_vocab_size, extensions[-1].vocab_size) if extensions else None


def check_schedule_link(config: RunConfig, plan: LoadPlan | None) -> None:
    """schedule.rewarm for a training run: a resumed stage keeps how it started, and a new stage without a
    re-warm must continue the constant phase of the checkpoint's stage (schedule.check_continuation)."""
    if plan is not None and plan.resume:
        saved = plan.state.stages[-1].schedule.rewarm
        if saved != config.schedule.rewarm:
            raise ConfigError("schedule.rewarm", f"is {config.schedule.rewarm}, but the stage being resumed from "
                              f"{plan.tag_dir} started with {saved}; a resumed stage keeps how it started")
        return
    last = plan.state.stages[-1] if plan is not None else None
    if isinstance(last, TrainedStage):
        check_continuation(config.schedule, last.schedule, last.steps, last.steps_done)
    else:  # fresh or imported weights: no schedule to continue
        check_continuation(config.schedule, None, 0, 0)


def check_init_combination(init: InitConfig, state: CheckpointState, config: RunConfig) -> None:
    """Reject new-stage choices that cannot mean anything for this checkpoint."""
    if init.load_optimizer and not state.has_optimizer:
        raise ConfigError("init.load_optimizer",
                          f"checkpoint {init.checkpoint} holds no optimizer state (converted weights?); set it to "
                          "false")
    if init.load_scheduler and state.scheduler is None:
        raise ConfigError("init.load_scheduler",
                          f"checkpoint {init.checkpoint} holds no schedule position (imported weights); set it to "
                          "false")
    if init.load_data_position and state.data is None:
        raise ConfigError("init.load_data_position",
                          f"checkpoint {init.checkpoint} holds no data position (imported weights); set it to false")
    if init.load_data_position:
        saved = state.stages[-1]
        if not isinstance(saved, TrainedStage) or (saved.data.sources, saved.data.replay, saved.data.seed) != (
                config.data.sources, config.data.replay, config.data.seed):
            raise ConfigError("init.load_data_position",
                              "the data position only means something for the same sources, replay and seed as the "
                              "checkpoint's stage")
        for key, before, now in (("train.global_batch_size", saved.global_batch_size, config.train.global_batch_size),
                                 ("model.seq_length", saved.seq_length, config.model.seq_length)):
            if before != now:
                raise ConfigError("init.load_data_position", f"the checkpoint's stream was cut into batches and "
                                  f"samples with {key} {before}, this config has {now}; the stream continues "
                                  "exactly only with the same value")
    if init.load_data_position and config.data.continue_sources:
        raise ConfigError("data.continue_sources", "init.load_data_position already continues the checkpoint's whole "
                          "stream (and every source in it); set one of them to false")
    if init.load_data_position and config.data.schedules():
        raise ConfigError("init.load_data_position", f"{next(iter(config.data.schedules()))} is a mixture schedule "
                          "over this stage's steps, but a continued data position goes on with the checkpoint's "
                          "stream; set init.load_data_position to false (data.continue_sources continues each source "
                          "instead)")
    if init.load_scheduler and not config.schedule.rewarm:
        raise ConfigError("init.load_scheduler", "schedule.rewarm false starts this stage's own schedule at step 0 in "
                          "the constant phase; it cannot also continue the checkpoint's schedule position: set it to "
                          "false")
    if init.load_scheduler and state.scheduler.t >= state.scheduler.steps:
        raise ConfigError("init.load_scheduler", f"the checkpoint's stage finished its schedule "
                          f"({state.scheduler.t} of {state.scheduler.steps} steps), so no step is left to continue; "
                          "set it to false for a new schedule, or continue an infinite schedule with schedule.rewarm "
                          "false")
    if init.load_scheduler and state.scheduler.steps != config.train.steps:
        raise ConfigError("init.load_scheduler",
                          f"the checkpoint's stage has {state.scheduler.steps} steps, this config "
                          f"{config.train.steps}; a continued schedule needs the same train.steps")


LAYOUT_KEYS = ("padded_vocab_size", "tensor_parallel")


def check_architecture(config: RunConfig, state: CheckpointState, tag_dir: Path, other_layout: bool = False) -> None:
    """A readable error when the checkpoint's model differs from the config's (instead of a tensor-copy trace).

    `other_layout`: the load goes through the universal form (elastic.py), which changes tensor parallelism."""
    saved = state.model.model_dump()
    wanted = ModelSignature.of(config.model, config.parallel.tensor).model_dump()
    diffs = [f"{k}: checkpoint {saved[k]} vs config {v}" for k, v in wanted.items()
             if saved[k] != v and not (other_layout and k in LAYOUT_KEYS)]
    if diffs:
        tp_differs = saved["tensor_parallel"] != wanted["tensor_parallel"]
        hint = " (without optimizer state, change the TP degree with `megacpt reshard`)" if tp_differs else ""
        raise UserError(f"checkpoint {tag_dir} does not match the config's model: {'; '.join(diffs)}{hint}")
