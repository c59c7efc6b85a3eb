"""The one way to extend the training loop: a `Callback` with named hooks, called in the order of a list.

Every concern of the loop (the step guard, loss spikes, the frozen vocabulary rows, logging, validation,
checkpoints, the sample ledger) is a callback in its own file; loop.py only trains steps and calls the
hooks. The order of `Callbacks` is the order of every hook, and `trainer.build_callbacks` writes it down in
one place.

Hooks, in the order one step calls them:

- `before_step(loop, step)`: step `step` (1-based within the stage) is about to train.
- `after_backward(loop, loss)`: the step's gradients are complete (`loss`: this rank's mean over its
  micro-batches, a tensor); the weights change next.
- `before_update(loop)`: inside the optimizer step, after DeepSpeed reduced and clipped the gradients.
  Return a reason (a short string) to skip the update, or None. The first callback that returns a reason
  wins and the later ones are not asked. Every rank must reach the same decision, so a callback that runs a
  collective here must come before any that may skip.
- `after_update(loop)`: the optimizer updated the weights (not called for a skipped update).
- `after_step(loop, result)`: the step is over (`result` says whether and why its update was skipped).
  A callback may call `loop.rewind(...)` here; the hooks after it are then not called for this step.

Outside the steps: `on_start(loop)` before the first step, `rewind(loop, step)` when the loop went back to
the checkpoint of step `step` (every callback forgets what came after it), `state()` for what a checkpoint
saves of the callback (merged into megacpt's checkpoint state) and `close()` at the end, also on errors.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class StepResult:
    """What one step did."""

    step: int  # 1-based within the stage
    loss: torch.Tensor  # this rank's mean loss over its micro-batches (no host sync)
    first_sample: int  # the stream position of the step's first sample
    skipped: str | None  # why the update was skipped ("non-finite", "spike", "ledger"), None when applied


class TrainingLoop(Protocol):
    """What a callback may use of the training loop (train/loop.py)."""

    engine: Any  # the DeepSpeed engine
    scheduler: Any  # schedule.StageScheduler: `t` counts the stage's steps
    stream: Any  # data.loader.BatchStream
    world: Any  # runtime.distributed.World
    callbacks: Callbacks
    start_t: int  # the step the run started (or was rewound) at
    skipped: str | None  # why the current step's update was skipped
    skipped_total: int
    stopping: bool

    def total_tokens(self) -> int: ...

    def samples_per_source(self) -> dict[str, int]: ...

    def request_stop(self) -> None: ...

    def rewind(self, state: Any) -> None: ...


class Callback:
    """Override the hooks a concern needs; each does nothing by default."""

    def on_start(self, loop: TrainingLoop) -> None:
        pass

    def before_step(self, loop: TrainingLoop, step: int) -> None:
        pass

    def after_backward(self, loop: TrainingLoop, loss: torch.Tensor) -> None:
        pass

    def before_update(self, loop: TrainingLoop) -> str | None:
        return None

    def after_update(self, loop: TrainingLoop) -> None:
        pass

    def after_step(self, loop: TrainingLoop, result: StepResult) -> None:
        pass

    def rewind(self, loop: TrainingLoop, step: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Callbacks:
    """The callbacks of one run, in order; calls a hook on each of them."""

    def __init__(self) -> None:
        self.items: list[Callback] = []
        self.loop: TrainingLoop | None = None
        self.rewound = False  # set by a rewind during after_step: the rest of the step's hooks are skipped

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.items)

    def add(self, *callbacks: Callback | None) -> None:
        """Append callbacks (None: a concern this run does not have)."""
        self.items.extend(c for c in callbacks if c is not None)

    def on_start(self, loop: TrainingLoop) -> None:
        self.loop = loop
        for callback in self.items:
            callback.on_start(loop)

    def before_step(self, step: int) -> None:
        for callback in self.items:
            callback.before_step(self.loop, step)

    def after_backward(self, loss: torch.Tensor) -> None:
        for callback in self.items:
            callback.after_backward(self.loop, loss)

    def gate_update(self, update: Callable[[], Any]) -> Any:
        """Run `update` (the optimizer's own step) unless a callback skips it; the optimizer calls this
        (runtime/optimizer.py). The reason of a skip is kept for the step's result."""
        if self.loop is None:  # no loop (evaluation, tools): nothing to gate
            return update()
        for callback in self.items:
            reason = callback.before_update(self.loop)
            if reason is not None:
                self.loop.skipped = reason
                return None
        result = update()
        for callback in self.items:
            callback.after_update(self.loop)
        return result

    def after_step(self, result: StepResult) -> None:
        self.rewound = False
        for callback in self.items:
            callback.after_step(self.loop, result)
            if self.rewound:
                return

    def rewind(self, step: int) -> None:
        self.rewound = True
        for callback in self.items:
            callback.rewind(self.loop, step)

    def state(self) -> dict[str, Any]:
        """What the callbacks save with a checkpoint, merged."""
        merged: dict[str, Any] = {}
        for callback in self.items:
            merged.update(callback.state())
        return merged

    def close(self) -> None:
        for callback in reversed(self.items):
            callback.close()
