"""When the loop saves, and what megacpt's state in each checkpoint holds. The mechanism (files, manifest,
`latest`, failures) is checkpoint/save.py.

A checkpoint is saved every `train.save_interval` steps, at the stage's last step and when the ranks agreed
to stop (SIGTERM/SIGUSR1). With `checkpoint.async_save` DeepSpeed's files are written from a host copy while
the next steps compute: the save is finished (manifest, `latest`) after the first step at which every rank's
writer is done, at the latest when the next save starts (never two in flight), and at once after the last
step or a stop. With loss-spike handling (`train.spike`) it is finished before the next update, since a
rollback may go back to it.
"""
from __future__ import annotations

import time

from megacpt.checkpoint.save import PendingSave, save
from megacpt.config import RunConfig, dump_config
from megacpt.policy.stages import (
    CheckpointState,
    DataPosition,
    ModelSignature,
    SavedConfig,
    SchedulerState,
    SourceFile,
    SourceUse,
    StageRecord,
)
from megacpt.train.callbacks import Callback, StepResult
from megacpt.train.metrics import MetricsLog


class Checkpointing(Callback):
    """Saves at the stage's save points; `files`: the identities of the sources' files, recorded with them."""

    def __init__(self, config: RunConfig, stages: list[StageRecord], metrics: MetricsLog, begin: int,
                 files: dict[str, list[SourceFile]]):
        self.config, self.stages, self.metrics = config, stages, metrics
        self.begin, self.files = begin, files  # where the stage starts in the stream; its sources' files
        self.pending: tuple[PendingSave, int, float] | None = None  # a started save, its step, seconds waited

    def after_backward(self, loop, loss) -> None:
        if self.pending is not None and (self.config.train.spike is not None
                                         or self.pending[0].ready(loop.engine, loop.world.device)):
            self.finish(loop)

    def after_step(self, loop, result: StepResult) -> None:
        step, cfg = result.step, self.config.train
        last = step == cfg.steps
        if last or loop.stopping or (cfg.save_interval and step % cfg.save_interval == 0):
            self.save(loop, step, finish=last or loop.stopping)
        if loop.stopping:
            self.metrics.print(f"stop signal received: saved a checkpoint at step {step}, exiting")

    def save(self, loop, step: int, finish: bool) -> None:
        """Start a save, once the previous one is finished; with checkpoint.async_save DeepSpeed's files are
        written while the next steps compute, unless `finish` (the last step, a stop) waits for them now."""
        self.finish(loop)
        start = time.perf_counter()
        dataset, consumed = loop.stream.dataset, loop.stream.consumed_samples
        samples = dataset.samples_per_source(consumed)
        sources = {name: SourceUse(prefix=source.prefix, seed=source.seed, start=first, stop=stop,
                                   files=self.files.get(name, []))
                   for name, (source, first, stop) in dataset.uses(self.begin, consumed).items()}
        stage = self.stages[-1].model_copy(update={"steps_done": step, "samples": samples, "sources": sources})
        state = CheckpointState(
            step=step, tokens=loop.total_tokens(), config=SavedConfig.model_validate(dump_config(self.config)),
            model=ModelSignature.of(self.config.model, self.config.parallel.tensor), tokenizer=self.config.tokenizer,
            has_optimizer=True, stages=self.stages[:-1] + [stage],
            scheduler=SchedulerState.model_validate(loop.scheduler.state_dict()),
            data=DataPosition(**loop.stream.state_dict(), samples=samples), **loop.callbacks.state())
        pending = save(loop.engine, self.config.run_dir, step, state, loop.world.rank, self.config.checkpoint.keep_last)
        self.pending = (pending, step, time.perf_counter() - start)
        if finish or not self.config.checkpoint.async_save:
            self.finish(loop)

    def finish(self, loop) -> None:
        """Complete the started save, if any (manifest, `latest`); record how long the loop waited for it."""
        if self.pending is None:
            return
        start = time.perf_counter()
        pending, step, waited = self.pending
        tag_dir = pending.finish(loop.engine)
        self.pending = None
        waited += time.perf_counter() - start
        self.metrics.checkpoint_saved(step, tag_dir)
        self.metrics.write({"step": step, "event": "checkpoint", "tag": tag_dir.name, "blocked_s": waited,
                            "async": self.config.checkpoint.async_save})
        self.metrics.print(f"saved checkpoint {tag_dir} (the loop waited {waited:.2f} s for it)")
