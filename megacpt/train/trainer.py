"""`megacpt train`: check everything, join the world, build the parts from the config, load, then loop.

One process (a world of one) or one rank under the deepspeed launcher. Reads top to bottom: preflight (the
config's data, schedule and checkpoint, and the load plan the CPT policy decides), the run dir's lock, the
world, the engine with its gated optimizer and the stage's LR scheduler, the data, the restore, the
callbacks in their order, the loop. SIGTERM and SIGUSR1 finish the current step, save and exit 0; received
during startup (which can take minutes for a large checkpoint), they stop the run before its first step and
leave the run dir as it was (`train` returns False: the command exits STOPPED_BEFORE_TRAINING, 75); so does a
start that fails: the run dir changes only right before the first step (`prepare_run_dir`).
"""
from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from megacpt import run_dir as run_dir_files
from megacpt.checkpoint.locate import plan_load
from megacpt.checkpoint.tags import set_aside_newer
from megacpt.config import RunConfig, dump_config
from megacpt.errors import ConfigError, UserError
from megacpt.files import check_writable_folder
from megacpt.policy.load_plan import LoadPlan, check_architecture, new_rows
from megacpt.policy.stage_start import check_freeze, stage_records, stream_start
from megacpt.policy.stages import SourceFile, StageRecord, TrainedStage
from megacpt.run_dir import checkpoint_dir
from megacpt.train.callbacks import Callback, Callbacks
from megacpt.train.stop_signals import STOPPED_BEFORE_TRAINING, StopSignal


def preflight(config: RunConfig, world_size: int, checksums: bool = True) -> LoadPlan | None:
    """Everything that can be checked before torch.distributed starts, for a world of `world_size` processes:
    layout, DeepSpeed config, memory, schedule, tokenizer, data, folders, checkpoint. Returns the load plan."""
    from megacpt.data.datasets import check_continued_files, check_data, check_resumed_files, continued_uses
    from megacpt.data.tokenizers import check_vocabulary
    from megacpt.runtime.deepspeed_config import derived_deepspeed_config
    from megacpt.runtime.distributed import data_parallel_size
    from megacpt.runtime.engine import check_with_deepspeed
    from megacpt.schedule import check_schedule

    ds = derived_deepspeed_config(config, data_parallel_size(world_size, config.parallel.tensor))
    check_with_deepspeed(ds)
    check_memory(config)
    check_schedule(config.schedule, config.train.steps)
    check_vocabulary(config.tokenizer, config.model.vocab_size)
    check_data(config.data, config.model.vocab_size, config.model.seq_length)
    check_writable_folder(Path(config.run_dir), "run_dir")
    run_dir_files.check_files(Path(config.run_dir))
    check_writable_folder(config.data_cache_dir, "data.cache_dir")
    if config.logging.wandb is not None:
        from megacpt.train.wandb_sink import check_available

        check_available(config.logging.wandb)
    plan = plan_load(config, checksums)
    if plan is not None:
        # weights through the universal form may change layout; a grown tag's own weights load as they are
        check_architecture(config, plan.state, plan.tag_dir,
                           other_layout=plan.load_optimizer and plan.optimizer_tag is None)
    check_freeze(config, plan)
    if plan is not None and plan.resume and isinstance(plan.state.stages[-1], TrainedStage):
        check_resumed_files(plan.state.stages[-1], plan.tag_dir.name, checksums)
    if config.data.continue_sources and plan is not None:
        earlier = plan.state.stages[:-1] if plan.resume else plan.state.stages
        check_continued_files(continued_uses(config.data, earlier, config.model.seq_length), checksums)
    return plan


def check_memory(config: RunConfig) -> None:
    """A model whose fp32 weights alone exceed this process's memory is refused before they are allocated."""
    from megacpt.model.size import parameters_per_rank
    from megacpt.runtime.distributed import memory_per_process

    params = parameters_per_rank(config.model, config.padded_vocab_size, config.parallel.tensor)
    available, what = memory_per_process()
    if 4 * params > available:
        raise ConfigError("model", f"{params:,} parameters per tensor-parallel rank need {4 * params / 1e9:,.1f} GB "
                          f"for their fp32 weights alone, more than {what} ({available / 1e9:,.1f} GB); check "
                          "model.vocab_size, hidden_size and ffn_hidden_size, or raise parallel.tensor (`megacpt plan "
                          "CONFIG` estimates all the memory a run needs)")


def train(config: RunConfig, extra_callbacks: Sequence[Callback] = ()) -> bool:
    """Check, lock RUN_DIR, join the world, build, load, loop; False when a stop came before the first step.
    `extra_callbacks` run after megacpt's own (a concern of the caller's: see docs/ARCHITECTURE.md)."""
    from megacpt.runtime.distributed import launcher_world_size, setup_world

    signals = StopSignal()  # first: a stop may arrive during the minutes the setup below can take
    main = os.environ.get("RANK", "0") == "0"  # before the world exists: the launcher's rank, else a world of one
    try:
        with run_dir_files.hold(config.run_dir, main) as start:  # a start that trains no step leaves no run dir
            # the main process checksums the tag, the others check sizes
            plan = preflight(config, launcher_world_size(), checksums=main)
            world = setup_world(config.parallel.tensor, config.train.seed)
            return run_stage(config, world, plan, signals, extra_callbacks, start.began)
    except OSError as e:
        if e.errno not in DISK_FAILURES:
            raise
        raise UserError(f"cannot write {e.filename or config.run_dir}: {e.strerror}. Free space on that disk (or make "
                        "it writable) and run the same command again: a start that trained no step left the run dir "
                        "as it found it, a run that trained resumes from its last checkpoint") from None


# a full disk, a full quota, a read-only file system: the disk's state, not a bug (the message says which file)
DISK_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def prepare_run_dir(run_dir: Path, config: RunConfig, plan: LoadPlan | None) -> None:
    """Once the start has built and restored everything, right before its first step (a start that fails or
    stops earlier changes nothing): the resolved config, and on a resume the run dir rolled back to the
    checkpoint (newer tags set aside, metrics of steps after it dropped)."""
    run_dir_files.write_config(run_dir, dump_config(config))
    if plan is None or not plan.resume:
        aside = run_dir_files.start_metrics_anew(run_dir)
        if aside:
            print(f"{run_dir / run_dir_files.METRICS} held records of an earlier start without a checkpoint; "
                  f"moved it to {aside}, this stage starts the file anew", file=sys.stderr)
    if plan is None or not plan.resume or plan.tag_dir.parent != checkpoint_dir(run_dir):
        return
    for moved in set_aside_newer(plan.tag_dir):
        print(f"resuming from {plan.tag_dir.name}: moved the newer tag to {moved}", file=sys.stderr)
    dropped = run_dir_files.keep_metrics_until(run_dir, plan.state.step)
    if dropped:
        print(f"metrics.jsonl: dropped {dropped} records of steps after {plan.tag_dir.name}, which this run "
              "trains again", file=sys.stderr)


def run_stage(config: RunConfig, world, plan: LoadPlan | None, signals: StopSignal,
              extra_callbacks: Sequence[Callback] = (), began: Callable[[], None] = lambda: None) -> bool:
    """Build the engine, the data and the callbacks, restore the checkpoint, and train the stage; False when a
    stop came before its first step. `began()` is called when the first step starts (run_dir.hold undoes a
    start that never got there)."""
    from megacpt.checkpoint.elastic import Layout
    from megacpt.checkpoint.load import follow_layout, restore
    from megacpt.runtime.deepspeed_config import zero_stage
    from megacpt.runtime.engine import build_engine, deepspeed_config
    from megacpt.schedule import StageScheduler
    from megacpt.train.loop import TrainingLoop
    from megacpt.train.spikes import SpikeLedger
    from megacpt.train.step_guard import StepGuard

    stages = stage_records(config, plan)
    stage = stages[-1]
    layout = Layout(world.tensor_size, world.data_size, zero_stage(deepspeed_config(config, world.data_size)))
    layout_change = plan and follow_layout(plan, layout, config.padded_vocab_size, world.is_main)
    spike_ledger = SpikeLedger.read(config.run_dir)  # honoured even when train.spike is off now
    callbacks = Callbacks()  # the optimizer's gate; filled below, once the engine exists
    engine, _, scheduler = build_engine(
        config, world, lambda opt: StageScheduler(opt, config.schedule, config.train.steps, stage.index,
                                                  lambda step: spike_ledger.lr_factor(step, config.train.spike)),
        load_universal=bool(plan and plan.universal and layout.zero_stage), gate=callbacks.gate_update)
    begin = stream_start(config, plan)
    stream, val_data = build_data(config, world, stages, begin)
    tokens_before = restore(plan, engine, scheduler, stream, world)
    loop = TrainingLoop(engine, scheduler, stream, world, callbacks, config.train.steps,
                        config.train.global_batch_size * config.model.seq_length, tokens_before)
    guard = StepGuard(engine.basic_optimizer, world.device, signals.requested, config.train.max_skipped_steps,
                      config.run_dir)
    try:
        if scheduler.t < config.train.steps and guard.agree_to_stop():
            if world.is_main:
                print(f"stop signal received before step {scheduler.t + 1}, the first of this run: no step "
                      f"trained, nothing new to save; exiting with status {STOPPED_BEFORE_TRAINING} (run it "
                      "again)", file=sys.stderr, flush=True)
            return False
        if world.is_main:  # the start has passed everything that can fail: now it may change the run dir
            prepare_run_dir(Path(config.run_dir), config, plan)
        metrics = build_callbacks(
            callbacks, config, world, plan, stages, engine, scheduler, stream, val_data, begin, spike_ledger, guard,
            lambda p: restore(p, engine, scheduler, stream, world))
        callbacks.add(*extra_callbacks)
        for message in (layout_change, freeze_message(config, scheduler.t, stages)):
            if message:
                metrics.print(message)
        params = sum(p.numel() for p in engine.module.parameters()) * world.tensor_size
        metrics.print(f"stage {stage.index} ({stage.name}): {config.train.steps} steps x "
                      f"{config.train.global_batch_size} samples x {config.model.seq_length} tokens; "
                      f"{params / 1e6:.1f}M parameters; world {world.size} (tensor {world.tensor_size} x data "
                      f"{world.data_size}{cpu_threads(world)}); {'resuming ' if plan and plan.resume else 'from '}"
                      f"{plan.tag_dir if plan else 'fresh weights'}")
        if plan is None or not plan.resume:
            metrics.write({"step": 0, "event": "stage_start", "stage": stage.index, "stage_name": stage.name,
                           "init": str(plan.tag_dir) if plan else None,
                           **long_document_shares(config, stream, begin)})
        began()
        loop.run()
        return True
    finally:
        callbacks.close()
        engine.checkpoint_engine.cleanup()  # checkpoint.async_save: a write in flight ends before the process


def long_document_shares(config: RunConfig, stream, begin: int) -> dict:
    """With data.long_document_tokens: {"long_document_share": {source: share of the stage's sample tokens that
    come from documents longer than it}} (from the datasets' indices; seen-only replay sources left out)."""
    threshold = config.data.long_document_tokens
    if not threshold:
        return {}
    end = begin + config.train.steps * config.train.global_batch_size
    return {"long_document_share": {name: source.long_token_share(first, stop, threshold)
                                    for name, (source, first, stop) in stream.dataset.uses(begin, end).items()}}


def build_callbacks(callbacks: Callbacks, config: RunConfig, world, plan: LoadPlan | None,
                    stages: list[StageRecord], engine, scheduler, stream, val_data, begin: int, spike_ledger,
                    guard, restore_plan):
    """The run's callbacks, in the order every hook calls them, around the step guard; returns the metrics log.

    Gates on the update, in order: the step guard (its all-reduce first, on every rank), the loss-spike test,
    the frozen rows (around an applied update). After a step: the training record (before the guard may stop
    a diverged run), the spike rollback, the sample ledger, validation, then the checkpoint."""
    from megacpt.train.checkpointing import Checkpointing
    from megacpt.train.metrics import MetricsLog, TrainLog
    from megacpt.train.spikes import Spikes
    from megacpt.train.validation import Validation

    cfg, index = config.train, stages[-1].index
    metrics = MetricsLog(metric_sinks(config, world, stages), world.is_main)
    window = plan.state.spike_window if plan and plan.resume else None
    callbacks.add(
        metrics,
        TrainLog(metrics, cfg.log_interval, cfg.steps, index, lambda: guard.diverged),
        guard,
        Spikes(cfg.spike, spike_ledger, guard, metrics, config.run_dir, world.is_main, restore_plan, window),
        freeze(config, engine, scheduler, stages, world),
        sample_ledger(config, world, stream, begin, scheduler.t if plan is not None and plan.resume else 0),
        Validation(val_data, metrics, cfg.eval_interval, cfg.eval_samples, cfg.micro_batch_size, cfg.steps, index,
                   cfg.eval_position_bucket),
        Checkpointing(config, stages, metrics, begin, source_identities(stream.dataset, stages[-1])
                      if world.is_main else {}),
    )
    return metrics


def metric_sinks(config: RunConfig, world, stages: list[StageRecord]) -> list:
    """metrics.jsonl always; TensorBoard and W&B when logging asks for them (main rank only)."""
    if not world.is_main:
        return []
    from megacpt.train.metrics import JsonlSink, TensorBoardSink

    run_dir = Path(config.run_dir)
    sinks = [JsonlSink(run_dir)]
    if config.logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if config.logging.wandb is not None:
        from megacpt.train.wandb_sink import WandbSink

        run_config = {"config": dump_config(config), "stages": [s.model_dump(mode="json") for s in stages],
                      "stage_index": stages[-1].index}
        sinks.append(WandbSink.start(config.logging.wandb, run_dir, stages[-1].index, stages[0].name, run_config))
    return sinks


def freeze(config: RunConfig, engine, scheduler, stages: list[StageRecord], world):
    """train.freeze: only the newest vocabulary rows train until step `steps` of the stage (freeze.py)."""
    from megacpt.train.freeze import Freeze

    if config.train.freeze is None or scheduler.t >= config.train.freeze.steps:
        return None
    return Freeze(engine, new_rows(stages), world.tensor_rank, lambda: scheduler.t < config.train.freeze.steps)


def freeze_message(config: RunConfig, t: int, stages: list[StageRecord]) -> str | None:
    freeze = config.train.freeze
    if freeze is None or t >= freeze.steps:
        return None
    rows = new_rows(stages)
    return (f"train.freeze: steps {t + 1}-{freeze.steps} train only the embedding and output rows of ids "
            f"{rows.start}-{rows.stop - 1}")


def sample_ledger(config: RunConfig, world, stream, begin: int, done: int):
    """logging.sample_ledger: RUN_DIR/samples.jsonl on the main rank, rewritten up to step `done`."""
    if not config.logging.sample_ledger or not world.is_main:
        return None
    from megacpt.data.ledger import SampleLedger
    from megacpt.train.sample_ledger import SampleLedgerLog

    return SampleLedgerLog(SampleLedger(Path(config.run_dir), stream.dataset, config.train.global_batch_size, begin,
                                        done))


def cpu_threads(world) -> str:
    """', N CPU threads each' on CPU, where each process's share of the cores matters; nothing on GPU."""
    return f", {torch.get_num_threads()} CPU threads each" if world.device.type == "cpu" else ""


def build_data(config: RunConfig, world, stages: list[StageRecord], start: int):
    """This rank's training batch stream (the blend with replay, covering the stage from sample `start`) and
    the validation datasets."""
    from megacpt.data.datasets import build_train_dataset, build_validation_datasets
    from megacpt.data.loader import BatchStream
    from megacpt.data.tokenizers import eod_id

    common = dict(seq_length=config.model.seq_length, cache_dir=str(config.data_cache_dir),
                  vocab_size=config.model.vocab_size, eod=eod_id(config.tokenizer))
    train_data = build_train_dataset(config.data, start + config.train.steps * config.train.global_batch_size,
                                     config.train.global_batch_size, earlier_stages=stages[:-1],
                                     stage_steps=config.train.steps, **common)
    stream = BatchStream(train_data, config.train.global_batch_size, config.train.micro_batch_size,
                         world.data_rank, world.data_size, world.device)
    return stream, build_validation_datasets(config.data, config.train.eval_samples, **common)


def source_identities(dataset, stage: TrainedStage) -> dict[str, list[SourceFile]]:
    """The files of each source the stage reads from its stream, as the stage first saw them (a resumed stage
    keeps its record's)."""
    from megacpt.data.datasets import source_files

    return {name: stage.sources[name].files if name in stage.sources else source_files(source.prefix)
            for name, (source, _, _) in dataset.uses(0, 0).items()}
