"""Checkpoints: DeepSpeed's files plus megacpt's own state, saved atomically, verified, loaded as resume or new stage.

A tag folder holds what `engine.save_checkpoint` writes, `megacpt_state.json` (resolved config, stage
history, data position and samples per source, schedule state, model dimensions), one RNG file per rank and,
written last, `manifest.json` (every file's size and checksum, see manifest.py). `latest` names the newest
complete tag and is replaced (atomically) only after the manifest is on disk, so a crash during a save leaves
the previous checkpoint in charge; a write failure (full disk, permissions) removes the partial tag and says so.
Every load verifies the tag against its manifest first.

Loading follows the CPT policy: a run whose RUN_DIR holds a checkpoint resumes it (same stage, same t,
same data position; resume.py says which config keys may change). `init.checkpoint` with mode `new_stage`
loads the weights and then, independently, the optimizer, the scheduler position and the data position as
`init.load_*` say.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megacpt import elastic, manifest
from megacpt.config import InitConfig, RunConfig
from megacpt.elastic import Layout
from megacpt.errors import ConfigError, UserError
from megacpt.files import write_atomic
from megacpt.resume import check_resume
from megacpt.schedule import check_continuation
from megacpt.stages import (
    STATE_FILE,
    CheckpointState,
    ModelSignature,
    TrainedStage,
    VocabExtendedStage,
    read_state,
    write_state,
)
from megacpt.vocab_rows import new_rows, zero_new_moments

LATEST = "latest"
_TAG = re.compile(r"step\d{8}")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def list_tags(root: Path) -> list[Path]:
    """The tag folders of a checkpoints folder, oldest first, complete or not."""
    return sorted(p for p in root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)) if root.is_dir() else []


def is_complete(tag_dir: Path) -> bool:
    """A save that finished: it wrote its manifest (which may still fail to verify)."""
    return (tag_dir / manifest.MANIFEST).is_file()


def newest_verified(root: Path, before: str | None = None) -> Path | None:
    """The newest tag of `root` (older than tag `before`, if given) that verifies completely."""
    for tag_dir in reversed(list_tags(root)):
        if (before is None or tag_dir.name < before) and not manifest.problems(tag_dir):
            return tag_dir
    return None


def _use_hint(key: str, tag_dir: Path) -> str:
    """How to load `tag_dir` instead, in the terms of the key that chose the damaged one."""
    if key in ("run_dir", "checkpoint.load_tag"):
        return (f"resume from it with --set checkpoint.load_tag={tag_dir.name} (newer tags are then moved aside, "
                "not overwritten)")
    return f"give {key} {tag_dir}"


def resolve_tag(path: str | Path, key: str = "init.checkpoint") -> Path:
    """A checkpoints folder (follow its `latest`) or one tag folder in it -> the tag folder (not yet verified)."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or is_complete(path) or (_TAG.fullmatch(path.name) and path.is_dir()):
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = path / latest.read_text().strip()
        if is_complete(tag) or (tag / STATE_FILE).is_file():  # the loaders verify it (open_tag)
            return tag
        raise UserError(f"{key}: {latest} names {tag}, which is not a complete checkpoint{_newest_complete(path, key)}")
    if not path.exists():
        raise UserError(f"{key}: checkpoint path {path} does not exist")
    if any(is_complete(t) for t in list_tags(path)):
        raise UserError(f"{key}: {path} holds checkpoint tags but no '{LATEST}' pointer{_newest_complete(path, key)}")
    raise UserError(f"{key}: {path} is neither a megacpt checkpoint tag (no {STATE_FILE}) nor a checkpoints folder (no "
                    f"'{LATEST}')")


def _newest_complete(root: Path, key: str) -> str:
    found = newest_verified(root)
    if found is None:
        return f"; no tag in {root} verifies (`megacpt checkpoint verify {root}` lists them)"
    return f"; the newest tag that verifies is {found.name}: {_use_hint(key, found)}"


def verify_tag(tag_dir: Path, key: str, checksums: bool = True) -> None:
    """Check the tag against its manifest; a damaged or unfinished tag is a UserError naming the file and the
    newest older tag that verifies."""
    found = manifest.problems(tag_dir, checksums)
    if not found:
        return
    older = newest_verified(tag_dir.parent, before=tag_dir.name)
    alternative = (f"the newest older tag that verifies is {older.name}: {_use_hint(key, older)}" if older
                   else f"no older tag in {tag_dir.parent} verifies")
    raise UserError(f"{key}: checkpoint {tag_dir} does not verify: {'; '.join(found[:3])}"
                    f"{'; ...' if len(found) > 3 else ''}. {alternative}")


def open_tag(path: str | Path, key: str = "init.checkpoint", checksums: bool = True) -> Path:
    """resolve_tag, then verify_tag: the tag folder every loader (train, eval, the tools) reads from."""
    tag_dir = resolve_tag(path, key)
    verify_tag(tag_dir, key, checksums)
    return tag_dir


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
    changes: dict[str, list] = field(default_factory=dict)  # resumable config keys changed: [old, new]
    # A weights-only tag of `megacpt extend-vocab`: the optimizer comes from the checkpoint it grew (fewer rows),
    # and the moments of the new ids' rows start at zero.
    optimizer_tag: Path | None = None
    new_rows: range | None = None

    @property
    def optimizer_source(self) -> tuple[Path, CheckpointState]:
        """The tag the optimizer state is loaded from, and its state."""
        return (self.tag_dir, self.state) if self.optimizer_tag is None else (
            self.optimizer_tag, read_state(self.optimizer_tag))


def follow_layout(plan: LoadPlan, current: Layout, padded_vocab_size: int, is_main: bool) -> str | None:
    """Point the plan at the tag's universal form when its optimizer state is laid out for another world.

    Global rank 0 converts the tag once (every rank waits for it); returns what happened, for the log. A load
    without optimizer state needs nothing: DeepSpeed loads the weights of any data-parallel size or ZeRO stage.
    """
    if not plan.load_optimizer:
        return None
    tag_dir, state = plan.optimizer_source
    saved = elastic.saved_layout(tag_dir, state.model.tensor_parallel)
    grown = state.model.padded_vocab_size != padded_vocab_size  # rows added by a vocabulary extension
    if saved is not None and saved.loads_as(current) and not grown:
        return None
    if current.zero_stage > 2:
        raise UserError(f"checkpoint {tag_dir} was saved at {saved}; ZeRO stage 3 cannot load it on another "
                        "layout or vocabulary size: use ZeRO stage 0, 1 or 2, or the checkpoint's own layout")
    rows = min(state.model.padded_vocab_size, padded_vocab_size)
    outcome = [None]
    if is_main:
        try:
            outcome = [elastic.ensure_universal(tag_dir, saved, rows)[1]]
        except UserError as e:
            outcome = [str(e)]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise UserError(outcome[0])
    plan.universal = tag_dir / elastic.UNIVERSAL
    done = "converted it to DeepSpeed's universal form in" if outcome[0] else "loading its universal form from"
    saved_as = f"was saved at {saved}" if saved else "holds its optimizer state in universal form only"
    now = f"{current}, {padded_vocab_size} vocabulary rows (it has {state.model.padded_vocab_size})" if grown \
        else str(current)
    return f"checkpoint {tag_dir.name} {saved_as}, this run is {now}: {done} {plan.universal}"


def plan_load(config: RunConfig, checksums: bool = True) -> LoadPlan | None:
    """Resume RUN_DIR's own checkpoint if it has one, else follow `init`, else nothing (fresh weights).

    The tag is verified first (`checksums` false checks only names and sizes); a resume must not change what
    the stage means (resume.py).
    """
    own = checkpoint_dir(config.run_dir)
    load_tag = config.checkpoint.load_tag
    if load_tag is not None:
        tag_dir = own / load_tag
        if not tag_dir.is_dir():
            names = ", ".join(t.name for t in list_tags(own)) or "none"
            raise ConfigError("checkpoint.load_tag", f"{tag_dir} does not exist; the tags in {own}: {names}")
    elif (own / LATEST).is_file() or any(is_complete(t) for t in list_tags(own)):
        tag_dir = resolve_tag(own, key="run_dir")
    else:
        plan = plan_init(config, checksums=checksums)
        check_schedule_link(config, plan)
        return plan
    verify_tag(tag_dir, "checkpoint.load_tag" if load_tag else "run_dir", checksums)
    state = read_state(tag_dir)
    changes = check_resume(config, state.config, tag_dir, own_run=True)
    plan = LoadPlan(tag_dir, state, True, True, True, True, changes=changes)
    check_schedule_link(config, plan)
    return plan


def plan_init(config: RunConfig, key: str = "init.checkpoint", checksums: bool = True) -> LoadPlan | None:
    """What `init` asks to load, ignoring RUN_DIR (`megacpt eval` loads weights this way too); `key` names
    the checkpoint's setting in messages. The tag is verified first."""
    init = config.init
    if init.checkpoint is None:
        return None
    tag_dir = open_tag(init.checkpoint, key=key, checksums=checksums)
    state = read_state(tag_dir)
    if init.mode == "resume":
        if not state.has_optimizer or state.scheduler is None:
            raise ConfigError("init.mode", f"'resume' needs a training checkpoint; {tag_dir} holds weights only "
                                           "(imported or merged): use 'new_stage'")
        changes = check_resume(config, state.config, tag_dir, own_run=False)
        return LoadPlan(tag_dir, state, True, True, True, True, changes=changes)
    optimizer_tag = grown_from(tag_dir, state) if init.load_optimizer and not state.has_optimizer else None
    if optimizer_tag is not None and not read_state(optimizer_tag).has_optimizer:
        raise ConfigError("init.load_optimizer", f"{tag_dir} holds weights only, and {optimizer_tag}, whose "
                          "vocabulary it grew, holds no optimizer state either; set it to false")
    check_init_combination(init if optimizer_tag is None else init.model_copy(update={"load_optimizer": False}),
                           state, config)
    return LoadPlan(tag_dir, state, False, init.load_optimizer, init.load_scheduler, init.load_data_position,
                    optimizer_tag=optimizer_tag, new_rows=new_rows(state.stages) if optimizer_tag else None)


def grown_from(tag_dir: Path, state: CheckpointState) -> Path | None:
    """The checkpoint whose vocabulary `megacpt extend-vocab` grew into this weights-only tag (verified); its
    optimizer state, with the new rows' moments at zero, is what init.load_optimizer keeps. None for other tags."""
    last = state.stages[-1]
    if not isinstance(last, VocabExtendedStage):
        return None
    try:
        source = open_tag(last.checkpoint, key="init.load_optimizer")
    except UserError as e:
        raise UserError(f"{e} (the checkpoint whose vocabulary {tag_dir} grew, where init.load_optimizer finds "
                        "Adam's moments)") from None
    return source


def set_aside_newer(tag_dir: Path) -> list[Path]:
    """Before resuming from an older tag: move newer complete tags to NAME.superseded (never written over or
    deleted) and point `latest` at `tag_dir`. Returns the new names."""
    moved = []
    for newer in list_tags(tag_dir.parent):
        if newer.name > tag_dir.name and is_complete(newer):
            target = newer.with_name(newer.name + ".superseded")
            n = 1
            while target.exists():
                n += 1
                target = newer.with_name(f"{newer.name}.superseded{n}")
            os.replace(newer, target)
            moved.append(target)
    latest = tag_dir.parent / LATEST
    if not latest.is_file() or latest.read_text().strip() != tag_dir.name:
        write_atomic(latest, tag_dir.name)
    return moved


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
    if plan.optimizer_tag is not None:  # the optimizer came with the grown checkpoint's weights: take the new ones
        _load_weights(engine, plan.tag_dir, world.tensor_rank)
        zero_new_moments(engine, plan.new_rows, world.tensor_rank)
    # a load replaces the param group dicts
    for group, hyperparameters in zip(engine.basic_optimizer.param_groups, configured, strict=True):
        group.update(hyperparameters)
    rng_file = plan.tag_dir / f"rng_rank{world.rank}.pt"
    if plan.resume and plan.universal is None and rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=True))


def _load_weights(engine, tag_dir: Path, tensor_rank: int) -> None:
    """The weights of `tag_dir` into a loaded engine, the fp32 master copy of a ZeRO/bf16 optimizer included."""
    saved = torch.load(tag_dir / elastic.MODEL_STATES.format(tensor_rank), map_location="cpu", weights_only=False)
    engine.module.load_state_dict(saved["module"], strict=True)
    if engine.optimizer is not engine.basic_optimizer:
        engine.optimizer.refresh_fp32_params()


def _load_through_deepspeed(engine, plan: LoadPlan) -> None:
    where = plan.universal or plan.optimizer_source[0]
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
         keep_last: int | None) -> "PendingSave":
    """Start a tag: DeepSpeed's files, RNG and state; the returned PendingSave's `finish` completes it (manifest,
    `latest`, retention).

    Call on every rank. A write failure removes the partial tag and raises a UserError saying why
    (no space, permission denied) with `latest` untouched. With DeepSpeed's decoupled checkpoint engine
    (checkpoint.async_save) its files are still being written when this returns; `finish`, called before the
    weights change again, waits for them.
    """
    root = checkpoint_dir(run_dir)
    tag = tag_name(step)
    tag_dir = root / tag
    if world_rank == 0 and tag_dir.exists():
        if is_complete(tag_dir):  # only a bug could get here: resumes set newer tags aside first
            raise UserError(f"refusing to write over the complete checkpoint {tag_dir}")
        shutil.rmtree(tag_dir)  # what a crashed save left
    torch.distributed.barrier()
    with _removed_on_write_failure(tag_dir):
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save(rng_states(), tag_dir / f"rng_rank{world_rank}.pt")
        if world_rank == 0:
            write_state(tag_dir, state)
    return PendingSave(tag_dir, world_rank, keep_last)


@dataclass
class PendingSave:
    """A tag whose DeepSpeed files may still be being written: no manifest yet, `latest` not moved."""

    tag_dir: Path
    world_rank: int
    keep_last: int | None

    def finish(self, engine) -> Path:
        """Wait until this rank's files are written (DeepSpeed's commit), then manifest, `latest`, retention."""
        writer = engine.checkpoint_engine
        if writer.get_commit_info() is not None:  # None: written synchronously, or already committed
            writer.commit(writer.get_commit_info())
        root = self.tag_dir.parent
        with _removed_on_write_failure(self.tag_dir):
            torch.distributed.barrier()
            _write_manifest(self.tag_dir, self.world_rank)
            if self.world_rank == 0:
                write_atomic(root / LATEST, self.tag_dir.name)  # durable: file and folder entry
        if self.world_rank == 0 and self.keep_last:
            prune(root, self.keep_last)
        torch.distributed.barrier()
        return self.tag_dir


def _write_manifest(tag_dir: Path, world_rank: int) -> None:
    """Every rank checksums (and fsyncs) its share of the tag's files; rank 0 writes the manifest."""
    names = [manifest.tag_files(tag_dir) if world_rank == 0 else None]
    torch.distributed.broadcast_object_list(names, src=0)
    world = torch.distributed.get_world_size()
    shares: list = [None] * world
    torch.distributed.all_gather_object(shares, manifest.describe(tag_dir, names[0][world_rank::world]))
    if world_rank == 0:
        manifest.write_manifest(tag_dir, {name: entry for share in shares for name, entry in sorted(share.items())})


_WRITE_FAILURES = ("No space left", "Permission denied", "Read-only", "inline_container", "file write failed",
                   "Parent directory")


@contextmanager
def _removed_on_write_failure(tag_dir: Path) -> Iterator[None]:
    """Turn an I/O failure while writing `tag_dir` into a UserError that says why, after removing the tag.

    torch's writer reports a full disk as `RuntimeError: [enforce fail at inline_container.cc...]`, without
    an errno, so the reason is also read off the folder (free space, write permission).
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(w in str(error) for w in _WRITE_FAILURES):
            raise
        root = tag_dir.parent
        reason = _write_failure_reason(error, root)
        shutil.rmtree(tag_dir, ignore_errors=True)
        latest = root / LATEST
        kept = (f"`latest` still names {latest.read_text().strip()}" if latest.is_file()
                else "there is no earlier checkpoint")
        raise UserError(f"cannot write checkpoint {tag_dir}: {reason} in {root}. The partial tag was removed and "
                        f"{kept}; make room or fix the folder, then run the same command again to resume") from None


def _write_failure_reason(error: BaseException, root: Path) -> str:
    code, text = getattr(error, "errno", None), str(error)
    if code == errno.ENOSPC or "No space left" in text or _free_bytes(root) < (1 << 20):
        return "no space left on device"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only" in text \
            or not os.access(root, os.W_OK):
        return "permission denied"
    return getattr(error, "strerror", None) or text


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def prune(root: Path, keep_last: int) -> None:
    """Remove the oldest complete tags beyond `keep_last` (never the one `latest` names)."""
    latest = (root / LATEST).read_text().strip()
    tags = [t for t in list_tags(root) if is_complete(t)]
    for old in tags[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old)
