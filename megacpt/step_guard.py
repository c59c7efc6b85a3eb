"""Skip optimizer updates whose loss or gradients are not finite, and agree on stopping.

DeepSpeed skips steps only for fp16 overflow. megacpt wraps the innermost optimizer's `step` (the torch
AdamW that every DeepSpeed wrapper, ZeRO or not, finally calls) so that a non-finite loss or gradient on
any rank leaves the weights and Adam's moments untouched on every rank. A skipped step still counts as a
step of the stage: the schedule and the data move on, the model does not. The loop counts DeepSpeed's
fp16-overflow steps the same way (`count_skipped`): they consumed their batch too.

The same one-element-per-question all-reduce also tells every rank whether any rank received a stop
signal, so the loop needs no second collective (and no second host sync) per step.
"""
from __future__ import annotations

from typing import Callable

import torch


class StepGuard:
    """Decides, with one tiny all-reduce per step, whether the update about to happen is applied."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, stop_requested: Callable[[], bool]):
        self.optimizer = optimizer
        self.device = device
        self.stop_requested = stop_requested
        self.stop_agreed = False
        self.loss_is_finite = torch.ones((), dtype=torch.bool, device=device)
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self._step = optimizer.step
        optimizer.step = self._guarded_step

    def _gradients_finite(self) -> torch.Tensor:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads)).to(self.device)).all()

    def count_skipped(self) -> None:
        """One more step without an update: skipped here, or by DeepSpeed on an fp16 overflow."""
        self.skipped_in_a_row += 1
        self.skipped_total += 1

    def _guarded_step(self, *args, **kwargs):
        ok = (self.loss_is_finite & self._gradients_finite()).float()
        stop = torch.tensor(1.0 if self.stop_requested() else 0.0, device=self.device)
        flags = torch.stack([ok, -stop])  # MIN over ranks: all finite?  -MAX: any stop?
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        all_finite, minus_stop = flags.tolist()
        self.stop_agreed = minus_stop < 0
        if all_finite < 1:
            self.count_skipped()
            return None
        self.skipped_in_a_row = 0
        return self._step(*args, **kwargs)

    def agree_to_stop(self) -> bool:
        """Outside a step (before the first one): did any rank receive a stop signal? One all-reduce."""
        stop = torch.tensor(1.0 if self.stop_requested() else 0.0, device=self.device)
        torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        self.stop_agreed = stop.item() > 0
        return self.stop_agreed
