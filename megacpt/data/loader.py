"""Per-rank micro-batches of the global sample stream, resumable from a consumed-sample count.

Step s trains on samples [c, c + G) of the blended stream (c = consumed samples, G = global batch).
Micro-batch m of data-parallel rank r holds samples c + (m x dp + r) x mb ... + mb - 1, so the ranks read
disjoint samples whose union is the global batch, whatever the data-parallel size. The position is one
integer, saved in checkpoints: a resumed run reads exactly the samples the uninterrupted run would have.
"""
from __future__ import annotations

import torch


def collate(samples: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into one micro-batch on `device` (with their `document_ids` under document
    masking, megacpt.data.packing)."""
    keys = [key for key in ("tokens", "labels", "loss_mask", "position_ids", "document_ids") if key in samples[0]]
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device, non_blocking=True)
            for key in keys}


class BatchStream:
    """Yields the micro-batches of each optimizer step for one data-parallel rank."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, data_rank: int,
                 data_size: int, device: torch.device, consumed_samples: int = 0):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_rank = data_rank
        self.data_size = data_size
        self.device = device
        self.consumed_samples = consumed_samples

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_size)

    def micro_batch_indices(self, micro_step: int) -> range:
        """Sample indices of this rank's micro-batch `micro_step` of the current step."""
        start = self.consumed_samples + (micro_step * self.data_size + self.data_rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step; advances the position by one global batch."""
        end = self.consumed_samples + self.global_batch_size
        if end > len(self.dataset):
            raise RuntimeError(f"the sample stream holds {len(self.dataset)} samples, step needs up to {end}")
        batches = [collate([self.dataset[i] for i in self.micro_batch_indices(m)], self.device)
                   for m in range(self.accumulation_steps)]
        self.consumed_samples = end
        return batches

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
