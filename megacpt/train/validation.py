"""Loss of a model on each validation set separately: the forgetting (old data) and adaptation (new data)
numbers of continual pretraining. Shared by the training loop (the `Validation` callback, every
`train.eval_interval` steps and at the last step) and `megacpt eval`, so both report the same.
"""
from __future__ import annotations

import math

import torch

from megacpt.data.datasets import validation_bytes
from megacpt.data.loader import collate
from megacpt.model.attention import document_attention_mask
from megacpt.train.callbacks import Callback, StepResult
from megacpt.train.metrics import MetricsLog


def scored_losses(model, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token loss of every token of one micro-batch times its loss mask [b, s], and the mask [b, s]."""
    mask = document_attention_mask(mb["document_ids"]) if "document_ids" in mb else None
    per_token = model(mb["tokens"], mb["position_ids"], mask, labels=mb["labels"])
    mask = mb["loss_mask"].float()
    return per_token.float() * mask, mask


def token_losses(model, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the next-token losses over the unmasked tokens of one micro-batch, and their number."""
    losses, mask = scored_losses(model, mb)
    return losses.sum(), mask.sum()


def micro_batch_loss(model, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the unmasked tokens of one micro-batch (model: engine or GPTModel)."""
    total, count = token_losses(model, mb)
    return total / count.clamp(min=1)


@torch.no_grad()
def validation_losses(model, datasets: dict, num_samples: int, micro_batch_size: int, data_rank: int,
                      data_size: int, device: torch.device, group=None,
                      position_bucket: int = 0) -> tuple[dict[str, float], dict[str, int], dict[str, dict]]:
    """Mean loss per scored token over the first `num_samples` samples of each dataset, the tokens scored, and
    (with a `position_bucket` of N tokens) the mean loss of positions 0..N-1, N..2N-1, ... of the samples
    ({name: {"0-127": loss, ...}}; {} without).

    The samples are cut into micro-batches (the last may be short) dealt round-robin to the data-parallel
    ranks, and the sums are added over ranks: the same samples and the same number whatever the world size,
    and every evaluation reads the start of each validation stream, so numbers taken at different steps or
    by different commands are comparable.
    """
    was_training = model.training
    model.eval()
    losses, tokens, by_position = {}, {}, {}
    chunks = [range(start, min(start + micro_batch_size, num_samples))
              for start in range(0, num_samples, micro_batch_size)]
    rounds = -(-len(chunks) // data_size)  # every rank runs as many forward passes (ZeRO-3 gathers in each)
    for name, dataset in datasets.items():
        sums, per_position = torch.zeros(2, dtype=torch.float64, device=device), None
        for r in range(rounds):
            k = r * data_size + data_rank
            scored, mask = scored_losses(model, collate([dataset[i] for i in chunks[min(k, len(chunks) - 1)]], device))
            if per_position is None:
                per_position = torch.zeros(2, scored.shape[1], dtype=torch.float64, device=device)
            if k < len(chunks):
                sums += torch.stack([scored.sum().double(), mask.sum().double()])
                per_position += torch.stack([scored.sum(0).double(), mask.sum(0).double()])
        torch.distributed.all_reduce(sums, group=group)
        losses[name] = (sums[0] / sums[1].clamp(min=1)).item()
        tokens[name] = int(sums[1].item())
        if position_bucket:
            torch.distributed.all_reduce(per_position, group=group)
            by_position[name] = bucket_means(per_position, position_bucket)
    model.train(was_training)
    return losses, tokens, by_position


def bucket_means(per_position: torch.Tensor, bucket: int) -> dict[str, float]:
    """{"first-last": mean loss} of consecutive buckets of `bucket` positions from [2, seq] (loss sums; counts)."""
    seq = per_position.shape[1]
    out = {}
    for start in range(0, seq, bucket):
        total, count = per_position[:, start:start + bucket].sum(1).tolist()
        out[f"{start}-{min(start + bucket, seq) - 1}"] = total / max(count, 1)
    return out


def bits_per_byte(losses: dict[str, float], datasets: dict, num_samples: int) -> dict[str, float]:
    """Bits per byte of each validation set whose data records document bytes (PREFIX.bytes.npy).

    The summed loss of the evaluated tokens in nats over ln 2 x the bytes of the text they encode: a number
    that does not depend on the tokenizer, so models with different tokenizers compare on the same text.
    `losses` are per-token means over the same `num_samples` samples (every label token counts).
    """
    out = {}
    for name, loss in losses.items():
        counted = validation_bytes(datasets[name], num_samples)
        if counted is not None:
            tokens, size = counted
            out[name] = loss * tokens / (math.log(2) * size)
    return out


class Validation(Callback):
    """Evaluates every validation set every `eval_interval` steps and at the stage's last step (before its
    checkpoint); writes one evaluation record."""

    def __init__(self, datasets: dict, metrics: MetricsLog, eval_interval: int | None, eval_samples: int,
                 micro_batch_size: int, steps: int, stage_index: int, position_bucket: int = 0):
        self.datasets, self.metrics = datasets, metrics
        self.eval_interval, self.eval_samples, self.micro_batch_size = eval_interval, eval_samples, micro_batch_size
        self.steps, self.stage_index, self.position_bucket = steps, stage_index, position_bucket

    def after_step(self, loop, result: StepResult) -> None:
        step = result.step
        at_interval = self.eval_interval and step % self.eval_interval == 0 and step != self.steps
        if at_interval or (step == self.steps and self.datasets):
            self.evaluate(loop, step)

    def evaluate(self, loop, step: int) -> None:
        world = loop.world
        results, tokens, by_position = validation_losses(
            loop.engine, self.datasets, self.eval_samples, self.micro_batch_size, world.data_rank, world.data_size,
            world.device, world.data_group(), self.position_bucket)
        if not results:
            return
        bpb = bits_per_byte(results, self.datasets, self.eval_samples)
        self.metrics.write({"step": step, "stage": self.stage_index, "tokens": loop.total_tokens(),
                            "eval": results, "eval_tokens": tokens, **({"eval_bpb": bpb} if bpb else {}),
                            **({"eval_by_position": by_position} if by_position else {})})
        self.metrics.print(f"eval step {step}: " + "  ".join(
            f"{k} {v:.4f}" + (f" ({bpb[k]:.4f} bits/byte)" if k in bpb else "") for k, v in results.items()))
