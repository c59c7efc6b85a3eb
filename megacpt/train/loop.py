"""The step loop: train one global batch per step and let the callbacks do everything else.

Logging, validation, checkpoints, the step guard, loss spikes and frozen rows are callbacks (callbacks.py);
the loop knows only the engine, the LR scheduler, the batch stream and the world, and the counters every
callback reads: the step within the stage, the tokens seen, the skipped steps.
"""
from __future__ import annotations

import torch

from megacpt.policy.stages import CheckpointState
from megacpt.train.callbacks import Callbacks, StepResult
from megacpt.train.validation import micro_batch_loss


class TrainingLoop:
    """Trains steps `start_t + 1 .. steps` of the stage (`scheduler.t` counts them)."""

    def __init__(self, engine, scheduler, stream, world, callbacks: Callbacks, steps: int, tokens_per_step: int,
                 tokens_before: int):
        self.engine, self.scheduler, self.stream, self.world = engine, scheduler, stream, world
        self.callbacks, self.steps, self.tokens_per_step = callbacks, steps, tokens_per_step
        self.tokens_at_start, self.start_t = tokens_before, scheduler.t
        self.skipped_total = 0  # steps without an update, for every reason
        self.skipped: str | None = None  # why the current step's update was skipped (set by the callbacks' gate)
        self.stopping = False

    def run(self) -> None:
        self.callbacks.on_start(self)
        while self.scheduler.t < self.steps and not self.stopping:
            self.callbacks.before_step(self.scheduler.t + 1)
            result = self.train_step()
            self.callbacks.after_step(result)

    def train_step(self) -> StepResult:
        """One optimizer step over the accumulated micro-batches: step `scheduler.t + 1` of the stage."""
        step = self.scheduler.t + 1
        first_sample = self.stream.consumed_samples
        micro_batches = self.stream.next_step()
        self.skipped = None
        total = torch.zeros((), device=self.world.device)
        for i, mb in enumerate(micro_batches):
            loss = micro_batch_loss(self.engine, mb)
            self.engine.backward(loss)
            total = total + loss.detach()
            if i == len(micro_batches) - 1:
                self.callbacks.after_backward(total / len(micro_batches))
            self.engine.step()  # the callbacks gate the update inside (runtime/optimizer.py)
        if not self.engine.was_step_applied() and self.skipped is None:
            # fp16 overflow: DeepSpeed skipped the update and the LR step, but the batch is consumed. The step
            # counts as skipped, as a non-finite one does, and the schedule moves on with the data.
            self.scheduler.step()
            self.skipped = "non-finite"
        self.skipped_total += self.skipped is not None
        return StepResult(step, total / len(micro_batches), first_sample, self.skipped)

    def request_stop(self) -> None:
        """Stop after this step (its checkpoint is saved): every rank agreed (step_guard.py)."""
        self.stopping = True

    def rewind(self, state: CheckpointState) -> None:
        """The engine, scheduler and stream went back to the checkpoint `state` (a spike rollback): so do the
        counters and every callback."""
        self.tokens_at_start, self.start_t = state.tokens, state.step
        self.callbacks.rewind(state.step)

    def total_tokens(self) -> int:
        """Tokens trained on by this model over all stages."""
        return self.tokens_at_start + (self.scheduler.t - self.start_t) * self.tokens_per_step

    def samples_per_source(self) -> dict[str, int]:
        """Samples consumed so far, per source of the blend."""
        return self.stream.dataset.samples_per_source(self.stream.consumed_samples)
