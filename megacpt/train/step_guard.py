"""Skip optimizer updates whose loss or gradients are not finite, agree on stopping, and stop a diverged run.

DeepSpeed skips steps only for fp16 overflow. The guard is the first gate on every update (train/callbacks.py):
a non-finite loss or gradient on any rank leaves the weights and Adam's moments untouched on every rank. A
skipped step still counts as a step of the stage: the schedule and the data move on, the model does not.
The loop counts DeepSpeed's fp16-overflow steps the same way: they consumed their batch too.

The same one-element-per-question all-reduce also tells every rank whether any rank received a stop signal
and sums the ranks' losses, so the loop needs no second collective (and no second host sync) per step:
`step_loss`, the mean over the ranks, is the number every rank judges loss spikes by (spikes.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from megacpt.errors import UserError
from megacpt.run_dir import checkpoint_dir
from megacpt.train.callbacks import Callback, StepResult

NON_FINITE = "non-finite"


class StepGuard(Callback):
    """Decides, with one tiny all-reduce per step, whether the update about to happen is applied."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, stop_requested: Callable[[], bool],
                 max_skipped_steps: int, run_dir: str):
        self.optimizer = optimizer  # the innermost optimizer, whose tensors hold the reduced gradients
        self.device = device
        self.stop_requested = stop_requested
        self.max_skipped_steps = max_skipped_steps
        self.run_dir = run_dir
        self.rank_loss = torch.zeros((), device=device)  # this rank's mean loss of the step
        self.step_loss: float | None = None  # the step's loss, mean over the ranks (once the update is decided)
        self.skipped_in_a_row = 0  # non-finite and fp16-overflow steps

    @property
    def diverged(self) -> bool:
        return self.skipped_in_a_row >= self.max_skipped_steps

    def after_backward(self, loop, loss: torch.Tensor) -> None:
        self.rank_loss = loss

    def before_update(self, loop) -> str | None:
        bad = 1.0 - (torch.isfinite(self.rank_loss) & self._gradients_finite()).float()
        stop = torch.tensor(1.0 if self.stop_requested() else 0.0, device=self.device)
        # SUM over ranks: how many not finite, how many stop, the losses (tensor-parallel ranks share their
        # data-parallel rank's loss, so the world's mean is the data-parallel mean)
        flags = torch.stack([bad, stop, self.rank_loss.float()])
        torch.distributed.all_reduce(flags)
        not_finite, stops, losses = flags.tolist()
        if stops > 0:
            loop.request_stop()
        self.step_loss = losses / torch.distributed.get_world_size()
        return NON_FINITE if not_finite > 0 else None

    def _gradients_finite(self) -> torch.Tensor:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads)).to(self.device)).all()

    def after_step(self, loop, result: StepResult) -> None:
        if result.skipped is None:
            self.skipped_in_a_row = 0
        elif result.skipped == NON_FINITE:
            self.skipped_in_a_row += 1
        if self.diverged:
            raise UserError(
                f"{self.skipped_in_a_row} consecutive steps up to step {result.step} had a non-finite loss or "
                f"gradient or an fp16 overflow (train.max_skipped_steps = {self.max_skipped_steps}); stopping "
                f"without saving. The last good checkpoint in {checkpoint_dir(self.run_dir)} is kept; lower "
                "schedule.max_lr or check the data")

    def rewind(self, loop, step: int) -> None:
        self.skipped_in_a_row = 0

    def agree_to_stop(self) -> bool:
        """Outside a step (before the first one): did any rank receive a stop signal? One all-reduce."""
        stop = torch.tensor(1.0 if self.stop_requested() else 0.0, device=self.device)
        torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        return stop.item() > 0
