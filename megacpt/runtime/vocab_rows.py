"""Where the rows of given token ids live in a DeepSpeed engine's optimizer, and their Adam moments.

`megacpt extend-vocab` appends rows for new token ids to the input embedding and the output layer. A stage
that keeps the optimizer of the checkpoint the extension grew starts the new rows' Adam moments at zero
(`zero_new_moments`), and `train.freeze` (train/freeze.py) trains those rows alone at first. Both need to
know which entries of the optimizer's tensors belong to which rows: the tensors are the parameters
themselves (ZeRO 0 in fp32) or this rank's flat fp32 partition (ZeRO 1/2, DeepSpeed's bf16 optimizer), where
DeepSpeed's own map (`param._hp_mapping`) says which piece of each parameter lives where.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megacpt.errors import UserError
from megacpt.model.hf_mapping import VOCAB_ROWS

MOMENTS = ("exp_avg", "exp_avg_sq")


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
