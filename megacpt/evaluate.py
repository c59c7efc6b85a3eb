"""Loss of a model on each validation set separately: the forgetting (old data) and adaptation (new data)
numbers of continual pretraining. Shared by the training loop and `megacpt eval`, so both report the same.
"""
from __future__ import annotations

import torch

from megacpt.data.loader import BatchStream


def micro_batch_loss(model, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the unmasked tokens of one micro-batch (model: engine or GPTModel)."""
    per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
    mask = mb["loss_mask"].float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def validation_losses(model, datasets: dict, batches: int, micro_batch_size: int, data_rank: int,
                      data_size: int, device: torch.device, group=None) -> dict[str, float]:
    """Mean loss over the first `batches` micro-batches of every rank, for each dataset, averaged over ranks.

    Every evaluation reads the same samples (the start of each validation stream), so numbers taken at
    different steps or by different commands are comparable.
    """
    was_training = model.training
    model.eval()
    results = {}
    per_step = micro_batch_size * data_size
    for name, dataset in datasets.items():
        stream = BatchStream(dataset, batches * per_step, micro_batch_size, data_rank, data_size, device)
        loss = torch.stack([micro_batch_loss(model, mb) for mb in stream.next_step()]).mean()
        torch.distributed.all_reduce(loss, group=group)
        results[name] = loss.item() / data_size
    model.train(was_training)
    return results
