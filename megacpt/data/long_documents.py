"""Per-source upsampling of long documents (`data.sources[].long_document_boost`), and its measure.

Fu et al. 2024 lengthen the context on data whose long documents are upsampled *within* each source, keeping
the mixture of sources: upsampling whole long-document sources instead hurts. Here a source's boost k puts
every document longer than `data.long_document_tokens` k times into each epoch of the source's megatron
`GPTDataset` (shuffled as usual), so the samples cut from the source hold more tokens of long documents. The
blend is untouched: which source each position of the stream takes, and so each source's share of every
batch, is the same with and without a boost. `long_token_share` measures the effect from the datasets' own
indices: the share of a source's sample tokens that come from documents longer than the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megacpt.data.packing import sample_parts


@dataclass
class BoostedGPTDatasetConfig(GPTDatasetConfig):
    """megatron's GPTDatasetConfig plus the boost; both fields are part of the dataset's cache key."""

    long_document_tokens: int = 0
    long_document_boost: int = 1


class BoostedGPTDataset(GPTDataset):
    """megatron's GPTDataset over a document list in which each long document appears `long_document_boost`
    times (megatron shuffles that list into the epoch's document order)."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        lengths = indexed_dataset.sequence_lengths[indexed_indices]
        repeats = np.where(lengths > config.long_document_tokens, config.long_document_boost, 1)
        super().__init__(indexed_dataset, dataset_path, np.repeat(indexed_indices, repeats), num_samples,
                         index_split, config)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return GPTDataset._key_config_attributes() + ["long_document_tokens", "long_document_boost"]


def long_token_share(datasets_and_indices, threshold: int) -> float:
    """Share of the tokens of these samples ((GPTDataset, index) pairs) that come from documents longer than
    `threshold` tokens, each sample's seq_length + 1 window counted as megatron reads it."""
    long = total = 0
    for dataset, index in datasets_and_indices:
        for part in sample_parts(dataset, index):
            total += part.stop - part.start
            long += (part.stop - part.start) * (part.length > threshold)
    return long / total if total else 0.0
