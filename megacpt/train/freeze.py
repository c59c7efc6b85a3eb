"""`train.freeze`: for the first steps of a stage, only the rows a vocabulary extension added train.

The new embeddings settle before they can disturb the trained weights. Freezing must leave every frozen entry
bit-identical, which masking the gradient alone does not: AdamW's decoupled weight decay shrinks a weight
whatever its gradient, and kept moments keep moving it. So the gradient of frozen entries is zeroed as it is
computed (a tensor hook, before DeepSpeed accumulates and reduces it, so that the clipping norm counts the
trained rows only), and around each update the frozen entries of the optimizer's tensors and of both moments
are copied before it and written back after it (runtime/vocab_rows.py says where they are). Adam's step count
is one per tensor, so it advances for all.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from megacpt.model.hf_mapping import VOCAB_ROWS
from megacpt.runtime.vocab_rows import MOMENTS, frozen_spans, local_rows
from megacpt.train.callbacks import Callback


class Freeze(Callback):
    """While `active()`, only the new vocabulary rows train; every other entry stays bit-identical."""

    def __init__(self, engine, rows: range, tensor_rank: int, active: Callable[[], bool]):
        self.optimizer = engine.basic_optimizer
        self.active = active
        self.spans = frozen_spans(engine, rows, tensor_rank)
        self.kept: list | None = None  # the frozen entries and moments, copied before the update
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                keep = local_rows(param, rows, tensor_rank) if name in VOCAB_ROWS else range(0)
                param.register_hook(self._masking_hook(keep))

    def _masking_hook(self, keep: range) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if not self.active():
                return None
            masked = torch.zeros_like(grad)
            masked[keep.start:keep.stop] = grad[keep.start:keep.stop]
            return masked
        return hook

    def before_update(self, loop) -> str | None:
        if not self.active():
            return None
        state = self.optimizer.state
        self.kept = [(span, span.view().clone(), [span.view(state[span.tensor][k]).clone() if k in state.get(
            span.tensor, {}) else None for k in MOMENTS]) for span in self.spans]
        return None

    def after_update(self, loop) -> None:
        if self.kept is None:
            return
        state = self.optimizer.state
        with torch.no_grad():
            for span, values, moments in self.kept:
                span.view().copy_(values)
                for key, moment in zip(MOMENTS, moments):
                    if key in state.get(span.tensor, {}):
                        target = span.view(state[span.tensor][key])
                        target.copy_(moment) if moment is not None else target.zero_()
        self.kept = None
