"""`megacpt train CONFIG`: build the parts from the config, then loop.

One process (a world of one) or one rank under the deepspeed launcher. Reads top to bottom: validate the
config and the data, join the world, build model / data / engine / schedule, load a checkpoint as the CPT
policy says, then train with periodic logging, per-dataset evaluation and checkpoints. SIGTERM and SIGUSR1
finish the current step, save and exit 0; received during startup (which can take minutes for a large
checkpoint), they stop the run before its first step, exit 0 and leave the checkpoints as they were.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from megacpt import checkpoint
from megacpt import run_dir as run_dir_files
from megacpt.cli_helpers import add_set_argument
from megacpt.config import RunConfig, dump_config, load_config
from megacpt.errors import ConfigError, UserError
from megacpt.evaluate import bits_per_byte, micro_batch_loss, validation_losses
from megacpt.metrics import MetricsWriter, Throughput, format_duration
from megacpt.spikes import LEDGER, Rollback, SpikedBatch, SpikeDetector, SpikeLedger
from megacpt.stages import (
    CheckpointState,
    DataPosition,
    ModelSignature,
    Resume,
    SavedConfig,
    SchedulerState,
    SourceFile,
    SourceUse,
    StageRecord,
    TrainedStage,
    read_state,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="JSON run config")
    add_set_argument(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, build no model, write nothing; print what the run would do and what "
                             "it inherits from the checkpoint")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print it as one JSON object (last line)")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.json and not args.dry_run:
        raise UserError("--json is an option of --dry-run")
    if args.dry_run:
        from megacpt.dry_run import describe, format_text

        summary = describe(config, preflight(config))
        print(json.dumps(summary) if args.json else format_text(summary))
        return 0
    train(config)
    return 0


def preflight(config: RunConfig, checksums: bool = True) -> checkpoint.LoadPlan | None:
    """Everything that can be checked before torch.distributed starts: schedule, tokenizer, data, checkpoint.
    Returns the load plan."""
    from megacpt.data.datasets import check_data
    from megacpt.data.tokenizers import check_vocabulary
    from megacpt.schedule import check_schedule

    check_schedule(config.schedule, config.train.steps)
    check_vocabulary(config.tokenizer, config.model.vocab_size)
    check_data(config.data, config.model.vocab_size, config.model.seq_length)
    if config.logging.wandb is not None:
        from megacpt.wandb_sink import check_available

        check_available(config.logging.wandb)
    if config.checkpoint.async_save and int(config.deepspeed.get("zero_optimization", {}).get("stage", 0)) > 0:
        raise ConfigError("checkpoint.async_save", "works with ZeRO stage 0 only: DeepSpeed's decoupled checkpoint "
                          "engine cannot hand ZeRO's optimizer partitions to its writer process (torch refuses to "
                          "serialize a non-leaf tensor that requires grad); set it to false or use stage 0")
    plan = checkpoint.plan_load(config, checksums)
    if plan is not None:
        # weights through the universal form may change layout; a grown tag's own weights load as they are
        checkpoint.check_architecture(config, plan.state, plan.tag_dir,
                                      other_layout=plan.load_optimizer and plan.optimizer_tag is None)
    check_freeze(config, plan)
    if config.data.continue_sources and plan is not None:
        from megacpt.data.datasets import check_continued_files, continued_uses

        earlier = plan.state.stages[:-1] if plan.resume else plan.state.stages
        check_continued_files(continued_uses(config.data, earlier, config.model.seq_length), checksums)
    return plan


def check_freeze(config: RunConfig, plan: checkpoint.LoadPlan | None) -> None:
    """train.freeze needs new vocabulary rows to train: an extension in the history of the loaded checkpoint."""
    from megacpt.vocab_rows import new_rows

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


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can finish the step, save and exit cleanly.

    The launch scripts start the ranks with both signals blocked, so that one sent while Python starts is kept
    pending rather than lost or fatal; installing the handler unblocks them and delivers it. Interrupted system
    calls restart: the handler only sets a flag, and a save must not fail because a signal arrived during it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for sig in self.SIGNALS:  # once is enough; and a repeat must not kill the exiting interpreter, which
            signal.signal(sig, signal.SIG_IGN)  # puts back the default action (death) of Python handlers

    def requested(self) -> bool:
        return self.received is not None


def train(config: RunConfig) -> None:
    """Check, lock RUN_DIR, join the world, build, load, loop."""
    from megacpt.distributed import setup_world

    signals = StopSignal()  # first: a stop may arrive during the minutes the setup below can take
    main = os.environ.get("RANK", "0") == "0"  # before the world exists: the launcher's rank, else a world of one
    with run_dir_files.hold(config.run_dir, main):
        plan = preflight(config, checksums=main)  # the main process checksums the tag, the others check sizes
        world = setup_world(config.parallel.tensor, config.train.seed)
        if world.is_main:
            prepare_run_dir(Path(config.run_dir), config, plan)
        _train(config, world, plan, signals)


def prepare_run_dir(run_dir: Path, config: RunConfig, plan: checkpoint.LoadPlan | None) -> None:
    """Once the start has passed its checks: the resolved config, and on a resume the run dir rolled back to
    the checkpoint (newer tags set aside, metrics of steps after it dropped)."""
    run_dir_files.write_config(run_dir, dump_config(config))
    if plan is None or not plan.resume or plan.tag_dir.parent != checkpoint.checkpoint_dir(run_dir):
        return
    for moved in checkpoint.set_aside_newer(plan.tag_dir):
        print(f"resuming from {plan.tag_dir.name}: moved the newer tag to {moved}", file=sys.stderr)
    dropped = run_dir_files.keep_metrics_until(run_dir, plan.state.step)
    if dropped:
        print(f"metrics.jsonl: dropped {dropped} records of steps after {plan.tag_dir.name}, which this run "
              "trains again", file=sys.stderr)


def _train(config: RunConfig, world, plan: checkpoint.LoadPlan | None, signals: StopSignal) -> None:
    from megacpt.elastic import Layout
    from megacpt.engine import build_engine, deepspeed_config, zero_stage
    from megacpt.schedule import StageScheduler
    from megacpt.step_guard import StepGuard

    run_dir = Path(config.run_dir)
    stages = stage_records(config, plan)
    stage = stages[-1]

    layout = Layout(world.tensor_size, world.data_size, zero_stage(deepspeed_config(config, world.data_size)))
    layout_change = plan and checkpoint.follow_layout(plan, layout, config.padded_vocab_size, world.is_main)
    engine, _, scheduler = build_engine(
        config, world, lambda opt: StageScheduler(opt, config.schedule, config.train.steps, stage.index),
        load_universal=bool(plan and plan.universal and layout.zero_stage))
    begin = stream_start(config, plan)
    stream, val_data = build_data(config, world, stages, begin)
    tokens_before = restore(plan, engine, scheduler, stream, world)
    files = source_identities(stream.dataset, stage) if world.is_main else {}
    sample_ledger = None
    if config.logging.sample_ledger and world.is_main:
        from megacpt.data.ledger import SampleLedger

        done = scheduler.t if plan is not None and plan.resume else 0
        sample_ledger = SampleLedger(run_dir, stream.dataset, config.train.global_batch_size, begin, done)
    freeze_message = start_freeze(config, engine, scheduler, stages, world)

    metrics = MetricsWriter(run_dir, world.is_main, config.logging.tensorboard, start_wandb(config, world, stages))
    for message in (layout_change, freeze_message):
        if message:
            metrics.print(message)
    params = sum(p.numel() for p in engine.module.parameters()) * world.tensor_size
    metrics.print(f"stage {stage.index} ({stage.name}): {config.train.steps} steps x {config.train.global_batch_size} "
                  f"samples x {config.model.seq_length} tokens; {params / 1e6:.1f}M parameters; world {world.size} "
                  f"(tensor {world.tensor_size} x data {world.data_size}{cpu_threads(world)}); "
                  f"{'resuming ' if plan and plan.resume else 'from '}{plan.tag_dir if plan else 'fresh weights'}")
    spike = config.train.spike
    window = plan.state.spike_window if plan and plan.resume else None
    guard = StepGuard(engine.basic_optimizer, world.device, signals.requested,
                      SpikeDetector(spike, window) if spike else None)
    try:
        if scheduler.t < config.train.steps and guard.agree_to_stop():
            metrics.print(f"stop signal received before step {scheduler.t + 1}, the first of this run: no step "
                          f"trained, nothing new to save; exiting")
            return
        if plan is None or not plan.resume:
            metrics.write({"step": 0, "event": "stage_start", "stage": stage.index, "stage_name": stage.name,
                           "init": str(plan.tag_dir) if plan else None})
        TrainingLoop(config, world, engine, scheduler, stream, val_data, metrics, stages, tokens_before, guard,
                     begin, files, sample_ledger).run()
    finally:
        metrics.close()
        if sample_ledger is not None:
            sample_ledger.close()
        if engine.checkpoint_engine.is_decoupled():  # stop the writer process, which outlives us otherwise
            engine.checkpoint_engine.cleanup()


def start_freeze(config: RunConfig, engine, scheduler, stages: list[StageRecord], world) -> str | None:
    """train.freeze: only the newest vocabulary rows train until step `steps` of the stage (vocab_rows.py)."""
    from megacpt.vocab_rows import Freeze, new_rows

    freeze = config.train.freeze
    if freeze is None or scheduler.t >= freeze.steps:
        return None
    rows = new_rows(stages)
    Freeze(engine, rows, world.tensor_rank, lambda: scheduler.t < freeze.steps)
    return (f"train.freeze: steps {scheduler.t + 1}-{freeze.steps} train only the embedding and output rows of ids "
            f"{rows.start}-{rows.stop - 1}")


def start_wandb(config: RunConfig, world, stages: list[StageRecord]):
    """The W&B sink of the main rank when logging.wandb asks for one (its run config: config + stage history)."""
    if config.logging.wandb is None or not world.is_main:
        return None
    from megacpt.wandb_sink import WandbSink

    run_config = {"config": dump_config(config), "stages": [s.model_dump(mode="json") for s in stages],
                  "stage_index": stages[-1].index}
    return WandbSink.start(config.logging.wandb, Path(config.run_dir), stages[-1].index, stages[0].name, run_config)


def cpu_threads(world) -> str:
    """', N CPU threads each' on CPU, where each process's share of the cores matters; nothing on GPU."""
    return f", {torch.get_num_threads()} CPU threads each" if world.device.type == "cpu" else ""


def stream_start(config: RunConfig, plan: checkpoint.LoadPlan | None) -> int:
    """Where this run's stage begins in its sample stream: a continued data position, else 0."""
    if plan is None or not plan.load_data_position:
        return 0
    t = plan.state.scheduler.t if plan.load_scheduler else 0
    return plan.state.data.consumed_samples - t * config.train.global_batch_size


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


def restore(plan: checkpoint.LoadPlan | None, engine, scheduler, stream, world) -> int:
    """Load what the plan says into the engine, scheduler and stream; returns the tokens the model has seen."""
    if plan is not None:
        checkpoint.load_into_engine(engine, plan, world)
        if plan.load_scheduler:
            scheduler.load_state_dict(plan.state.scheduler.model_dump(mode="json"))
        if plan.load_data_position:
            stream.load_state_dict(plan.state.data.model_dump())
    scheduler.apply()  # the schedule, not a loaded optimizer, decides the LR of every group
    return plan.state.tokens if plan is not None else 0


def stage_records(config: RunConfig, plan: checkpoint.LoadPlan | None) -> list[StageRecord]:
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
        schedule=config.schedule, data=config.data, samples={}, steps_done=0)]


class TrainingLoop:
    """The step loop: train, log, evaluate, checkpoint, stop on signals or too many non-finite steps, roll back
    after too many loss spikes."""

    def __init__(self, config, world, engine, scheduler, stream, val_data, metrics, stages, tokens_before, guard,
                 begin: int, files: dict[str, list[SourceFile]], sample_ledger=None):
        self.config, self.world, self.engine, self.guard = config, world, engine, guard
        self.begin, self.files = begin, files  # where the stage starts in the stream; its sources' files
        self.sample_ledger = sample_ledger  # RUN_DIR/samples.jsonl on the main rank, if logging.sample_ledger
        self.scheduler, self.stream, self.val_data = scheduler, stream, val_data
        self.metrics, self.stages = metrics, stages
        self.tokens_per_step = config.train.global_batch_size * config.model.seq_length
        self.tokens_at_start, self.start_t = tokens_before, scheduler.t
        self.ledger = SpikeLedger.read(config.run_dir)  # honoured even when train.spike is off now
        self.spiked, self.spike_records = [], []  # the current row of spikes: SpikedBatch, metrics record
        self.pending = None  # a started save: (checkpoint.PendingSave, step, seconds the loop waited so far)

    def total_tokens(self) -> int:
        """Tokens trained on by this model over all stages."""
        return self.tokens_at_start + (self.scheduler.t - self.start_t) * self.tokens_per_step

    def run(self) -> None:
        cfg = self.config.train
        throughput = Throughput()
        throughput.last_tokens = self.total_tokens()
        losses = []
        start_t = self.start_t
        if start_t > 0:
            self.metrics.print(f"resuming stage {self.stages[-1].index} at step {start_t}/{cfg.steps}")
        while self.scheduler.t < cfg.steps:  # one global batch per step
            step = self.scheduler.t
            self.guard.skip_batch = self.ledger.skips(step + 1)
            self.scheduler.lr_factor = self.ledger.lr_factor(step + 1, cfg.spike)
            lr = self.scheduler.current_lr()
            first_sample = self.stream.consumed_samples
            loss = self.train_step()
            if self.sample_ledger is not None:
                self.sample_ledger.write(step + 1, first_sample)
            losses.append(loss)
            done = step + 1
            self.note_skip(done, first_sample)
            diverged = self.guard.skipped_in_a_row >= cfg.max_skipped_steps
            if done % cfg.log_interval == 0 or done == cfg.steps or diverged:
                mean_loss = torch.stack(losses).mean()
                torch.distributed.all_reduce(mean_loss, group=_dp_group())
                mean_loss = mean_loss.item() / self.world.data_size
                losses.clear()
                grad_norm = self.engine.get_global_grad_norm()
                self.log_train(done, lr, mean_loss, grad_norm, throughput, start_t)
            if diverged:
                raise UserError(
                    f"{self.guard.skipped_in_a_row} consecutive steps up to step {done} had a non-finite loss or "
                    f"gradient or an fp16 overflow (train.max_skipped_steps = {cfg.max_skipped_steps}); stopping "
                    f"without saving. The last good checkpoint in {checkpoint.checkpoint_dir(self.config.run_dir)} "
                    "is kept; lower schedule.max_lr or check the data")
            if cfg.spike and self.guard.spikes_in_a_row >= cfg.spike.max_in_a_row:
                self.roll_back(done)
                losses.clear()
                throughput.last_tokens = self.total_tokens()
                continue
            if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.steps:
                self.evaluate(done)
            stop = self.guard.stop_agreed  # every rank agrees (decided in the step's one all-reduce)
            if done == cfg.steps or stop or (cfg.save_interval and done % cfg.save_interval == 0):
                if done == cfg.steps and self.val_data:
                    self.evaluate(done)
                self.save(done, finish=done == cfg.steps or stop)
            if stop:
                self.metrics.print(f"stop signal received: saved a checkpoint at step {done}, exiting")
                return

    def note_skip(self, step: int, first_sample: int) -> None:
        """Log a spike or a ledger skip; keep the current row of spikes (an applied step ends it)."""
        reason, loss = self.guard.skipped_because, self.guard.step_loss
        if reason is None:
            self.spiked, self.spike_records = [], []
        if reason == "spike":
            self.spiked.append(SpikedBatch(step=step, samples=[first_sample, self.stream.consumed_samples], loss=loss))
            mean, std = self.guard.spikes.stats()
            self.spike_records.append({"step": step, "event": "spike", "loss": loss, "window_mean": mean,
                                       "window_std": std, "in_a_row": self.guard.spikes_in_a_row})
            self.metrics.write(self.spike_records[-1])
            self.metrics.print(f"step {step}: loss {loss:.4f} is a spike (window mean {mean:.4f}, std {std:.4f}): "
                               f"skipped, {self.guard.spikes_in_a_row} in a row")
        elif reason == "ledger":
            self.metrics.write({"step": step, "event": "spike_ledger_skip", "loss": loss})
            self.metrics.print(f"step {step}: its batch spiked before a rollback ({LEDGER}): skipped")

    def roll_back(self, step: int) -> None:
        """Go back to the newest checkpoint before the first spike of the row, record the spiked batches in
        the ledger and continue from there. Every rank takes part."""
        cfg = self.config.train.spike
        root = checkpoint.checkpoint_dir(self.config.run_dir)
        first = self.spiked[0].step
        steps = ", ".join(str(b.step) for b in self.spiked)
        if len(self.ledger.rollbacks) >= cfg.max_rollbacks:
            raise UserError(
                f"steps {steps} were loss spikes in a row, and this run has rolled back "
                f"{len(self.ledger.rollbacks)} times already (train.spike.max_rollbacks = {cfg.max_rollbacks}); "
                f"stopping without saving. The rollbacks are in {Path(self.config.run_dir) / LEDGER}, the "
                f"checkpoints in {root} are kept; check the data of those steps or lower schedule.max_lr")
        target = [checkpoint.newest_verified(root, before=checkpoint.tag_name(first)) if self.world.is_main else None]
        torch.distributed.broadcast_object_list(target, src=0)
        if target[0] is None:
            raise UserError(f"steps {steps} were loss spikes in a row, but no checkpoint of this run before step "
                            f"{first} verifies, so there is nothing to roll back to; stopping without saving. Set "
                            "train.save_interval so that one exists")
        tag_dir = target[0]
        state = read_state(tag_dir)
        if self.world.is_main:  # newer tags aside first: a kill before the ledger entry replays the same spikes
            checkpoint.set_aside_newer(tag_dir)
            self.ledger.add(self.config.run_dir, Rollback(at_step=step, to_step=state.step, batches=self.spiked))
        else:
            self.ledger.rollbacks.append(Rollback(at_step=step, to_step=state.step, batches=self.spiked))
        torch.distributed.barrier()
        plan = checkpoint.LoadPlan(tag_dir, state, True, True, True, True)
        restore(plan, self.engine, self.scheduler, self.stream, self.world)
        self.guard.spikes = SpikeDetector(cfg, state.spike_window)
        self.guard.skipped_in_a_row = self.guard.spikes_in_a_row = 0
        self.tokens_at_start, self.start_t = state.tokens, state.step
        self.metrics.rewind(state.step)  # the steps after it are trained again; the record keeps the spikes
        if self.sample_ledger is not None:
            self.sample_ledger.rewind(state.step)
        self.metrics.write({"step": state.step, "event": "rollback", "rollback": len(self.ledger.rollbacks),
                            "at_step": step, "spiked_steps": [b.step for b in self.spiked],
                            "spikes": self.spike_records, "checkpoint": str(tag_dir)})
        self.spiked, self.spike_records = [], []
        lowered = f"; LR x {cfg.lr_factor} for {cfg.lr_steps} steps" if cfg.lr_steps and cfg.lr_factor < 1 else ""
        self.metrics.print(f"steps {steps} were loss spikes in a row: rolled back to {tag_dir} (rollback "
                           f"{len(self.ledger.rollbacks)} of at most {cfg.max_rollbacks}); their batches are skipped "
                           f"from now on{lowered}")

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the accumulated micro-batches; returns this rank's mean loss (no host sync)."""
        micro_batches = self.stream.next_step()
        total = torch.zeros((), device=self.world.device)
        for i, mb in enumerate(micro_batches):
            loss = micro_batch_loss(self.engine, mb)
            self.engine.backward(loss)
            total = total + loss.detach()
            if i == len(micro_batches) - 1:
                self.guard.loss_is_finite = torch.isfinite(total)
                self.guard.loss = total / len(micro_batches)
                self.finish_save()  # before the update changes what an asynchronous save is writing
            self.engine.step()
        if not self.engine.was_step_applied():
            # fp16 overflow: DeepSpeed skipped the update and the LR step, but the batch is consumed. The step
            # counts as skipped, as a non-finite one does, and the schedule moves on with the data.
            self.scheduler.step()
            self.guard.count_skipped()
        return total / len(micro_batches)

    def evaluate(self, step: int) -> dict[str, float]:
        results, tokens = validation_losses(self.engine, self.val_data, self.config.train.eval_samples,
                                            self.config.train.micro_batch_size, self.world.data_rank,
                                            self.world.data_size, self.world.device, _dp_group())
        if results:
            bpb = bits_per_byte(results, self.val_data, self.config.train.eval_samples)
            self.metrics.write({"step": step, "stage": self.stages[-1].index, "tokens": self.total_tokens(),
                                "eval": results, "eval_tokens": tokens, **({"eval_bpb": bpb} if bpb else {})})
            self.metrics.print(f"eval step {step}: " + "  ".join(
                f"{k} {v:.4f}" + (f" ({bpb[k]:.4f} bits/byte)" if k in bpb else "") for k, v in results.items()))
        return results

    def log_train(self, step: int, lr: float, loss: float, grad_norm, throughput: Throughput, start_t: int) -> None:
        cfg = self.config.train
        tokens = self.total_tokens()
        rate = throughput.rate(tokens)
        samples = self.stream.dataset.samples_per_source(self.stream.consumed_samples)
        record = {
            "step": step, "stage": self.stages[-1].index, "lr": lr, "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": tokens, "samples": samples, "tokens_per_s": rate,
            "skipped_steps": self.guard.skipped_total,
        }
        self.metrics.write(record)
        elapsed = time.perf_counter() - throughput.start
        eta = elapsed / max(step - start_t, 1) * (cfg.steps - step)
        self.metrics.print(f"step {step}/{cfg.steps}  loss {loss:.4f}  lr {lr:.3e}  "
                           f"{rate:,.0f} tok/s  ETA {format_duration(eta)}")

    def save(self, step: int, finish: bool) -> None:
        """Start a save; with checkpoint.async_save DeepSpeed's files are written while the next step computes,
        unless `finish` (the last step, a stop) waits for them now."""
        start = time.perf_counter()
        samples = self.stream.dataset.samples_per_source(self.stream.consumed_samples)
        sources = {name: SourceUse(prefix=source.prefix, seed=source.seed, start=first, stop=stop,
                                   files=self.files.get(name, []))
                   for name, (source, first, stop) in self.stream.dataset.uses(self.begin,
                                                                               self.stream.consumed_samples).items()}
        stage = self.stages[-1].model_copy(update={"steps_done": step, "samples": samples, "sources": sources})
        state = CheckpointState(
            step=step, tokens=self.total_tokens(), config=SavedConfig.model_validate(dump_config(self.config)),
            model=ModelSignature.of(self.config.model, self.config.parallel.tensor), tokenizer=self.config.tokenizer,
            has_optimizer=True, stages=self.stages[:-1] + [stage],
            scheduler=SchedulerState.model_validate(self.scheduler.state_dict()),
            data=DataPosition(**self.stream.state_dict(), samples=samples),
            spike_window=self.guard.spikes.state() if self.guard.spikes else None)
        pending = checkpoint.save(self.engine, self.config.run_dir, step, state, self.world.rank,
                                  self.config.checkpoint.keep_last)
        self.pending = (pending, step, time.perf_counter() - start)
        if finish or not self.config.checkpoint.async_save:
            self.finish_save()

    def finish_save(self) -> None:
        """Complete the started save, if any (manifest, `latest`); record how long the loop waited for it."""
        if self.pending is None:
            return
        start = time.perf_counter()
        pending, step, waited = self.pending
        tag_dir = pending.finish(self.engine)
        self.pending = None
        waited += time.perf_counter() - start
        self.metrics.checkpoint_saved(step, tag_dir)
        self.metrics.write({"step": step, "event": "checkpoint", "tag": tag_dir.name, "blocked_s": waited,
                            "async": self.config.checkpoint.async_save})
        self.metrics.print(f"saved checkpoint {tag_dir} (the loop waited {waited:.2f} s for it)")


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()
