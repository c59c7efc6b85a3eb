"""The documents inside a packed sample, and document masking over them.

A megatron `GPTDataset` sample is a window of seq_length + 1 tokens cut across documents: its tokens are the
first seq_length, its labels the last seq_length. Which documents fill the window, and where it cuts them, is
in the dataset's own indices (shuffle, sample and document index); `sample_parts` reads it from there, so the
boundaries are exact whether or not the data ends its documents with an EOD token, and no token is read.

Under `data.document_mask`, `mask_documents` gives a sample the number of the document each token belongs to
(from which the model's attention mask is built, see `megacpt.model.attention`) and drops the loss of the
label that starts a new document: its token sees only the previous document, so nothing it may attend to
predicts it, and the packed sample's loss is then exactly the sum of its documents' losses each run alone.
Positions need no restart: rotary attention depends only on the distance between two tokens, so a masked
document computes what it computes alone at positions 0, 1, ... This module does not touch the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def mask_documents(sample: dict, parts: list[SamplePart]) -> dict:
    """`sample` (a GPTDataset item) with `document_ids` (the number, 0, 1, ..., of the part each token comes
    from) and no loss on the labels that start a new document."""
    import torch  # here, so that commands reading only the index (megacpt schedule) start without torch

    window = np.repeat(np.arange(len(parts)), [p.stop - p.start for p in parts])
    if len(window) != len(sample["tokens"]) + 1:
        raise ValueError(f"sample parts cover {len(window)} tokens, the sample holds {len(sample['tokens']) + 1}")
    ids = window[:-1]
    same = torch.from_numpy(window[1:] == ids).to(sample["loss_mask"].dtype)
    return {**sample, "document_ids": torch.from_numpy(ids.astype(np.int64)), "loss_mask": sample["loss_mask"] * same}
