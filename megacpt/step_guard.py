"""Skip optimizer updates whose loss or gradients are not finite, and agree on stopping.

DeepSpeed skips steps only for fp16 overflow. megacpt wraps the innermost optimizer's `step` (the torch
AdamW that every DeepSpeed wrapper, ZeRO or not, finally calls) so that a non-finite loss or gradient on
any rank leaves the weights and Adam's moments untouched on every rank. A skipped step still counts as a
step of the stage: the schedule and the data move on, the model does not. The loop counts DeepSpeed's
fp16-overflow steps the same way (`count_skipped`): they consumed their batch too.

The same one-element-per-question all-reduce also tells every rank whether any rank received a stop
signal and sums the ranks' losses, so the loop needs no second collective (and no second host sync) per
step. With `train.spike`, the step's loss (the mean over ranks: every rank judges the same number) is judged
against a window of recent ones (spikes.py), and a spike is skipped the same way; so is a step whose batch
the spike ledger names (`skip_batch`, set by the loop).
"""
from __future__ import annotations

from typing import Callable

import torch

from megacpt.spikes import SpikeDetector


class StepGuard:
    """Decides, with one tiny all-reduce per step, whether the update about to happen is applied."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, stop_requested: Callable[[], bool],
                 spikes: SpikeDetector | None = None):
        self.optimizer = optimizer
        self.device = device
        self.stop_requested = stop_requested
        self.spikes = spikes
        self.stop_agreed = False
        self.loss_is_finite = torch.ones((), dtype=torch.bool, device=device)
        self.loss = torch.zeros((), device=device)  # this rank's mean loss of the step, set with loss_is_finite
        self.skip_batch = False  # set by the loop for a step whose batch the spike ledger names
        self.step_loss: float | None = None  # the step's loss, mean over the ranks (once the step is decided)
        self.skipped_because: str | None = None  # why the last step made no update: "non-finite", "spike", "ledger"
        self.skipped_in_a_row = 0  # non-finite and fp16-overflow steps
        self.spikes_in_a_row = 0
        self.skipped_total = 0  # every step without an update
        self._step = optimizer.step
        optimizer.step = self._guarded_step

    def _gradients_finite(self) -> torch.Tensor:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads)).to(self.device)).all()

    def count_skipped(self) -> None:
        """One more step without an update: skipped here, or by DeepSpeed on an fp16 overflow."""
        self.skipped_because = "non-finite"
        self.skipped_in_a_row += 1
        self.skipped_total += 1

    def _guarded_step(self, *args, **kwargs):
        bad = 1.0 - (self.loss_is_finite & self._gradients_finite()).float()
        stop = torch.tensor(1.0 if self.stop_requested() else 0.0, device=self.device)
        # SUM over ranks: how many not finite, how many stop, the losses (tensor-parallel ranks share their
        # data-parallel rank's loss, so the world's mean is the data-parallel mean)
        flags = torch.stack([bad, stop, self.loss.float()])
        torch.distributed.all_reduce(flags)
        not_finite, stops, losses = flags.tolist()
        self.stop_agreed = stops > 0
        self.step_loss = losses / torch.distributed.get_world_size()
        if not_finite > 0:
            self.count_skipped()
            return None
        if self.skip_batch or (self.spikes is not None and self.spikes.is_spike(self.step_loss)):
            self.skipped_because = "ledger" if self.skip_batch else "spike"
            self.spikes_in_a_row += not self.skip_batch
            self.skipped_total += 1
            return None
        self.skipped_because = None
        self.skipped_in_a_row = self.spikes_in_a_row = 0
        if self.spikes is not None:
            self.spikes.accept(self.step_loss)
        return self._step(*args, **kwargs)

    def agree_to_stop(self) -> bool:
        """Outside a step (before the first one): did any rank receive a stop signal? One all-reduce."""
        stop = torch.tensor(1.0 if self.stop_requested() else 0.0, device=self.device)
        torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        self.stop_agreed = stop.item() > 0
        return self.stop_agreed
