"""The rows a vocabulary extension added, in training: trained alone first (`train.freeze`), moments from zero.

`megacpt extend-vocab` appends rows for new token ids to the input embedding and the output layer; the stage
record (`VocabExtendedStage`) says which ids. A stage may then train only those rows for its first K steps
(the rest of the model is frozen), so that the new embeddings settle before they can disturb the trained
weights; and a stage that keeps the optimizer of the checkpoint the extension grew starts the new rows' Adam
moments at zero.

Freezing must leave every frozen entry bit-identical, which masking the gradient alone does not: AdamW's
decoupled weight decay shrinks a weight whatever its gradient, and kept moments keep moving it. So the
gradient of frozen entries is zeroed as it is computed (a tensor hook, before DeepSpeed accumulates and
reduces it, so that the clipping norm counts the trained rows only), and the innermost optimizer's step is
wrapped: the frozen entries of its tensors and of both moments are copied before the step and written back
after it. The optimizer's tensors are the parameters themselves (ZeRO 0 in fp32) or this rank's flat fp32
partition (ZeRO 1/2, DeepSpeed's bf16 optimizer), where DeepSpeed's own map (`param._hp_mapping`) says which
piece of each parameter lives where. Adam's step count is one per tensor, so it advances for all.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megacpt.errors import UserError
from megacpt.model.hf_mapping import VOCAB_ROWS
from megacpt.stages import StageRecord, VocabExtendedStage

MOMENTS = ("exp_avg", "exp_avg_sq")


def new_rows(stages: list[StageRecord]) -> range | None:
    """The token ids the last vocabulary extension of a lineage added; None when there was none."""
    extensions = [s for s in stages if isinstance(s, VocabExtendedStage)]
    return range(extensions[-1].base_vocab_size, extensions[-1].vocab_size) if extensions else None


@dataclass
class Span:
    """Entries [start, start + length) of one tensor the innermost optimizer updates (flattened)."""

    tensor: torch.Tensor
    start: int
    length: int

    def view(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """This span of the optimizer's tensor, or of a state tensor shaped like it."""
        return (self.tensor if tensor is None else tensor).detach().view(-1).narrow(0, self.start, self.length)


@dataclass
class Fragment:
    """Entries [start, start + length) of a flattened model parameter live at `span` in the optimizer."""

    name: str
    param: torch.nn.Parameter
    start: int
    span: Span


def fragments(engine) -> list[Fragment]:
    """Where this rank's optimizer keeps each parameter (a piece of it, or none, under ZeRO)."""
    optimizer = engine.basic_optimizer
    named = list(engine.module.named_parameters())
    if engine.optimizer is optimizer:  # ZeRO 0 in fp32: torch's AdamW updates the parameters themselves
        return [Fragment(name, p, 0, Span(p, 0, p.numel())) for name, p in named if p.requires_grad]
    if not all(hasattr(p, "_hp_mapping") for _, p in named):
        raise UserError(f"{type(engine.optimizer).__name__} keeps no map of where each parameter's master copy "
                        "lives: train.freeze and a grown checkpoint's kept moments need ZeRO stage 0 in fp32, ZeRO "
                        "stage 1 or 2, or bf16 (not fp16 without ZeRO, not ZeRO 3)")
    found = []
    for name, p in named:
        mapping = p._hp_mapping
        if mapping is None:  # no piece of it in this rank's partition
            continue
        flat = optimizer.param_groups[mapping.param_group_index]["params"][0]
        found.append(Fragment(name, p, mapping.lp_fragment_address.start,
                              Span(flat, mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)))
    return found


def local_rows(param: torch.Tensor, rows: range, tensor_rank: int) -> range:
    """The rows of `rows` (global token ids) in this tensor-parallel rank's slice of a vocabulary table."""
    first = tensor_rank * param.shape[0]
    return range(max(rows.start, first) - first, max(min(rows.stop, first + param.shape[0]) - first, 0))


def trained_entries(fragment: Fragment, rows: range, tensor_rank: int) -> range:
    """The entries of the fragment's span (span-relative) that belong to the new rows: a contiguous range."""
    if fragment.name not in VOCAB_ROWS:
        return range(0)
    mine = local_rows(fragment.param, rows, tensor_rank)
    width = fragment.param[0].numel()
    start = max(mine.start * width - fragment.start, 0)
    stop = min(mine.stop * width - fragment.start, fragment.span.length)
    return range(start, max(stop, start))


def frozen_spans(engine, rows: range, tensor_rank: int) -> list[Span]:
    """The pieces of the optimizer's tensors that hold entries outside the new rows."""
    spans = []
    for fragment in fragments(engine):
        span, trained = fragment.span, trained_entries(fragment, rows, tensor_rank)
        for start, stop in ((0, trained.start), (trained.stop, span.length)) if trained else ((0, span.length),):
            if stop > start:
                spans.append(Span(span.tensor, span.start + start, stop - start))
    return spans


def zero_new_moments(engine, rows: range, tensor_rank: int) -> None:
    """Start Adam's moments of the new rows at zero (the rest keep what the loaded optimizer holds)."""
    state = engine.basic_optimizer.state
    for fragment in fragments(engine):
        trained = trained_entries(fragment, rows, tensor_rank)
        if not trained or fragment.span.tensor not in state:
            continue
        for key in MOMENTS:
            if key in state[fragment.span.tensor]:
                fragment.span.view(state[fragment.span.tensor][key])[trained.start:trained.stop].zero_()


class Freeze:
    """While `active()`, only the new vocabulary rows train; every other entry stays bit-identical."""

    def __init__(self, engine, rows: range, tensor_rank: int, active: Callable[[], bool]):
        self.optimizer = engine.basic_optimizer
        self.active = active
        self.spans = frozen_spans(engine, rows, tensor_rank)
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                keep = local_rows(param, rows, tensor_rank) if name in VOCAB_ROWS else range(0)
                param.register_hook(self._masking_hook(keep))
        self._step = self.optimizer.step
        self.optimizer.step = self._step_keeping_frozen

    def _masking_hook(self, keep: range) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if not self.active():
                return None
            masked = torch.zeros_like(grad)
            masked[keep.start:keep.stop] = grad[keep.start:keep.stop]
            return masked
        return hook

    def _step_keeping_frozen(self, *args, **kwargs):
        if not self.active():
            return self._step(*args, **kwargs)
        state = self.optimizer.state
        kept = [(span, span.view().clone(), [span.view(state[span.tensor][k]).clone() if k in state.get(
            span.tensor, {}) else None for k in MOMENTS]) for span in self.spans]
        result = self._step(*args, **kwargs)
        with torch.no_grad():
            for span, values, moments in kept:
                span.view().copy_(values)
                for key, moment in zip(MOMENTS, moments):
                    if key in state.get(span.tensor, {}):
                        target = span.view(state[span.tensor][key])
                        target.copy_(moment) if moment is not None else target.zero_()
        return result
