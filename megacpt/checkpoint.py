"""Checkpoints: DeepSpeed's files plus megacpt's own state, saved atomically, loaded as resume or new stage.

A tag folder holds what `engine.save_checkpoint` writes, `megacpt_state.json` (a `stages.CheckpointState`:
resolved config, stage history, data position and samples per source, schedule state, model signature) and
one RNG file per rank.
`latest` names the newest complete tag and is replaced (atomically) only after every rank has finished
writing, so a crash during a save leaves the previous checkpoint in charge.

Loading follows the CPT policy: a run whose RUN_DIR holds a checkpoint resumes it (same stage, same t,
same data position). `init.checkpoint` with mode `new_stage` loads the weights and then, independently,
the optimizer, the scheduler position and the data position as `init.load_*` say.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megacpt import elastic
from megacpt.config import InitConfig, RunConfig
from megacpt.elastic import Layout
from megacpt.errors import ConfigError, UserError
from megacpt.files import write_atomic
from megacpt.stages import (
    STATE_FILE,
    CheckpointState,
    ModelSignature,
    TrainedStage,
    read_state,
    write_state,
)

LATEST = "latest"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def resolve_tag(path: str | Path, key: str = "init.checkpoint") -> Path:
    """A checkpoints folder (follow its `latest`) or one tag folder in it -> the tag folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = path / latest.read_text().strip()
        if (tag / STATE_FILE).is_file():
            return tag
        raise UserError(f"{key}: {latest} names {tag}, which holds no {STATE_FILE} (incomplete checkpoint)")
    if not path.exists():
        raise UserError(f"{key}: checkpoint path {path} does not exist")
    raise UserError(f"{key}: {path} is neither a megacpt checkpoint tag (no {STATE_FILE}) nor a checkpoints folder (no "
                    f"'{LATEST}')")


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


@dataclass
class LoadPlan:
    """What to load from which tag, decided before the engine exists."""

    tag_dir: Path
    state: CheckpointState
    resume: bool  # continue the checkpoint's stage (own RUN_DIR, or init.mode 'resume')
    load_optimizer: bool
    load_scheduler: bool
    load_data_position: bool
    universal: Path | None = None  # the tag's universal form, when it was saved in another layout


def follow_layout(plan: LoadPlan, current: Layout, padded_vocab_size: int, is_main: bool) -> str | None:
    """Point the plan at the tag's universal form when its optimizer state is laid out for another world.

    Global rank 0 converts the tag once (every rank waits for it); returns what happened, for the log. A load
    without optimizer state needs nothing: DeepSpeed loads the weights of any data-parallel size or ZeRO stage.
    """
    if not plan.load_optimizer:
        return None
    saved = elastic.saved_layout(plan.tag_dir, plan.state.model.tensor_parallel)
    if saved is not None and saved.loads_as(current):
        return None
    if current.zero_stage > 2:
        raise UserError(f"checkpoint {plan.tag_dir} was saved at {saved}; ZeRO stage 3 cannot load it on another "
                        "layout: use ZeRO stage 0, 1 or 2, or the checkpoint's own layout")
    rows = min(plan.state.model.padded_vocab_size, padded_vocab_size)
    outcome = [None]
    if is_main:
        try:
            outcome = [elastic.ensure_universal(plan.tag_dir, saved, rows)[1]]
        except UserError as e:
            outcome = [str(e)]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise UserError(outcome[0])
    plan.universal = plan.tag_dir / elastic.UNIVERSAL
    done = "converted it to DeepSpeed's universal form in" if outcome[0] else "loading its universal form from"
    saved_as = f"was saved at {saved}" if saved else "holds its optimizer state in universal form only"
    return f"checkpoint {plan.tag_dir.name} {saved_as}, this run is {current}: {done} {plan.universal}"


def plan_load(config: RunConfig) -> LoadPlan | None:
    """Resume RUN_DIR's own checkpoint if it has one, else follow `init`, else nothing (fresh weights)."""
    own = checkpoint_dir(config.run_dir)
    if (own / LATEST).is_file():
        tag_dir = resolve_tag(own, key="run_dir")
        return LoadPlan(tag_dir, read_state(tag_dir), True, True, True, True)
    return plan_init(config)


def plan_init(config: RunConfig, key: str = "init.checkpoint") -> LoadPlan | None:
    """What `init` asks to load, ignoring RUN_DIR (`megacpt eval` loads weights this way too); `key` names
    the checkpoint's setting in messages."""
    init = config.init
    if init.checkpoint is None:
        return None
    tag_dir = resolve_tag(init.checkpoint, key=key)
    state = read_state(tag_dir)
    if init.mode == "resume":
        if not state.has_optimizer or state.scheduler is None:
            raise ConfigError("init.mode", f"'resume' needs a training checkpoint; {tag_dir} holds weights only "
                                           "(imported or merged): use 'new_stage'")
        return LoadPlan(tag_dir, state, True, True, True, True)
    check_init_combination(init, state, config)
    return LoadPlan(tag_dir, state, False, init.load_optimizer, init.load_scheduler, init.load_data_position)


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
    if init.load_scheduler and state.scheduler.steps != config.train.steps:
        raise ConfigError("init.load_scheduler",
                          f"the checkpoint's stage has {state.scheduler.steps} steps, this config "
                          f"{config.train.steps}; a continued schedule needs the same train.steps")


# Param-group entries that a loaded optimizer state may set: the parameters themselves, and ZeRO's step count.
_LOADED_GROUP_KEYS = ("params", "step")


def load_into_engine(engine, plan: LoadPlan, world) -> None:
    """Load the weights (and, per the plan, the optimizer) through DeepSpeed; restore this rank's RNG on resume.

    A kept optimizer brings Adam's moments and step counts, never its hyperparameters: torch's (and ZeRO's)
    `load_state_dict` replaces every param group with the saved one, betas, eps and weight decay included,
    so the groups this stage's config built are put back afterwards (the LR is the schedule's anyway).
    From a universal form, ZeRO 1/2 engines load through DeepSpeed (configured with `load_universal`), ZeRO 0
    ones through elastic.py; the RNG files then belong to other ranks, so dropout draws anew.
    """
    groups = engine.basic_optimizer.param_groups  # evaluation builds the same engine, optimizer included
    configured = [{k: v for k, v in group.items() if k not in _LOADED_GROUP_KEYS} for group in groups]
    if plan.universal is not None and engine.zero_optimization_stage() == 0:
        elastic.load_unpartitioned(engine, plan.universal, world.tensor_rank, world.tensor_size)
    else:
        _load_through_deepspeed(engine, plan)
    # a load replaces the param group dicts
    for group, hyperparameters in zip(engine.basic_optimizer.param_groups, configured, strict=True):
        group.update(hyperparameters)
    rng_file = plan.tag_dir / f"rng_rank{world.rank}.pt"
    if plan.resume and plan.universal is None and rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=True))


def _load_through_deepspeed(engine, plan: LoadPlan) -> None:
    where = plan.universal or plan.tag_dir
    path, _ = engine.load_checkpoint(
        str(where.parent), tag=where.name, load_module_strict=True,
        load_optimizer_states=plan.load_optimizer, load_lr_scheduler_states=False,
        load_module_only=not plan.load_optimizer)
    if path is None:
        raise UserError(f"DeepSpeed found no checkpoint files in {where}")


def rng_states() -> dict:
    """Every generator dropout draws from: the default ones and megatron's tensor-parallel tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(states["cpu"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save(engine, run_dir: str | Path, step: int, state: CheckpointState, world_rank: int,
         keep_last: int | None) -> Path:
    """Write a complete tag, then move `latest` to it, then apply retention. Call on every rank."""
    root = checkpoint_dir(run_dir)
    tag = tag_name(step)
    tag_dir = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_states(), tag_dir / f"rng_rank{world_rank}.pt")
    if world_rank == 0:
        write_state(tag_dir, state)
    torch.distributed.barrier()
    if world_rank == 0:
        write_atomic(root / LATEST, tag)
        if keep_last:
            prune(root, keep_last)
    torch.distributed.barrier()
    return tag_dir


def prune(root: Path, keep_last: int) -> None:
    """Remove the oldest complete tags beyond `keep_last` (never the one `latest` names)."""
    latest = (root / LATEST).read_text().strip()
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and (p / STATE_FILE).is_file())
    for old in tags[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old)

