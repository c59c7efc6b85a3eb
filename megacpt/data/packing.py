"""The documents inside a packed sample, and the sample's layout over them (document masking, positions).

A megatron `GPTDataset` sample is a window of seq_length + 1 tokens cut across documents: its tokens are the
first seq_length, its labels the last seq_length. Which documents fill the window, and where it cuts them, is
in the dataset's own indices (shuffle, sample and document index); `sample_parts` reads it from there, so the
boundaries are exact whether or not the data ends its documents with an EOD token, and no token is read.

`PackedLayout` turns that into what training needs when `data.document_mask` or `data.reset_position_ids`
is set: per-token document numbers (from which the model's attention mask is built, see
`megacpt.model.attention.document_attention_mask`), positions that restart at every document, and, under
document masking, no loss on the label that starts a new document (its token sees only the previous
document, so it has nothing to predict it from: the packed sample's loss is then exactly the sum of its
documents' losses when each runs alone). This module does not touch the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplePart:
    """One document's share of a sample's seq_length + 1 tokens: tokens [start, stop) of document `document`,
    which holds `length` tokens in all."""

    document: int
    start: int
    stop: int
    length: int


def sample_parts(dataset, index: int) -> list[SamplePart]:
    """The document pieces of sample `index` of a megatron GPTDataset, in order (the window's extra token
    included, as megatron reads it)."""
    lengths = dataset.dataset.sequence_lengths
    documents, samples = dataset.document_index, dataset.sample_index
    j = dataset.shuffle_index[index]
    (first, first_offset), (last, last_offset) = samples[j], samples[j + 1]
    parts = []
    for k in range(int(first), int(last) + 1):
        doc = int(documents[k])
        start = int(first_offset) if k == first else 0
        stop = int(last_offset) + 1 if k == last else int(lengths[doc])
        parts.append(SamplePart(doc, start, stop, int(lengths[doc])))
    return parts


def document_numbers(parts: list[SamplePart]) -> np.ndarray:
    """The number (0, 1, ...) of the part each of the window's seq_length + 1 tokens comes from."""
    return np.repeat(np.arange(len(parts)), [p.stop - p.start for p in parts])


@dataclass(frozen=True)
class PackedLayout:
    """How a sample's documents are presented to the model."""

    document_mask: bool = False
    reset_position_ids: bool = False

    @property
    def plain(self) -> bool:
        return not (self.document_mask or self.reset_position_ids)

    def apply(self, sample: dict, parts: list[SamplePart]) -> dict:
        """`sample` (a GPTDataset item) laid out over its documents: adds `document_ids` under document masking,
        restarts `position_ids` per document, and drops the loss of labels that start a new document."""
        window = document_numbers(parts)
        if len(window) != len(sample["tokens"]) + 1:
            raise ValueError(f"sample parts cover {len(window)} tokens, the sample holds {len(sample['tokens']) + 1}")
        ids = window[:-1]
        out = dict(sample)
        if self.reset_position_ids:
            starts = np.searchsorted(ids, ids, side="left")  # ids are sorted: the first index of each number
            out["position_ids"] = torch.from_numpy(np.arange(len(ids)) - starts)
        if self.document_mask:
            out["document_ids"] = torch.from_numpy(ids.astype(np.int64))
            out["loss_mask"] = sample["loss_mask"] * torch.from_numpy(window[1:] == ids).to(sample["loss_mask"].dtype)
        return out
