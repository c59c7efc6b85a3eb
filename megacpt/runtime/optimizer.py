"""The optimizer megacpt hands DeepSpeed: AdamW (torch's fused one, or DeepSpeed's CPU Adam where ZeRO offloads
it) whose step passes through a gate, and the parameter groups it is built with.

The gate is the training loop's callbacks (train/callbacks.py): they decide, after DeepSpeed reduced and
clipped the gradients and right before the update, whether it happens (a non-finite step, a loss spike) and
what surrounds it (frozen vocabulary rows). Gating the innermost optimizer, not the engine, keeps DeepSpeed's
own bookkeeping (micro-steps, ZeRO partitions, fp16 loss scale) as it is: a skipped update leaves the
weights and Adam's moments bit-identical while the step still counts. DeepSpeed accepts a subclass of its
tested optimizers under ZeRO with `zero_allow_untested_optimizer`, which runtime/engine.py sets.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Gate = Callable[[Callable[[], Any]], Any]  # gate(update) runs update() or skips it


def no_gate(update: Callable[[], Any]) -> Any:
    return update()


class GatedStep:
    """Mixin for a torch optimizer: `step` asks the gate first."""

    gate: Gate = staticmethod(no_gate)

    def step(self, *args, **kwargs):
        return self.gate(lambda: super(GatedStep, self).step(*args, **kwargs))


class GatedAdamW(GatedStep, torch.optim.AdamW):
    """torch's AdamW behind a gate."""


def build_optimizer(groups: list[dict], params: dict[str, Any], offload: bool,
                    gate: Gate | None) -> torch.optim.Optimizer:
    """AdamW over `groups` with the `deepspeed.optimizer.params` of the derived config; DeepSpeed's CPU Adam when
    ZeRO offloads the optimizer (`offload`), which DeepSpeed compiles on first use."""
    kwargs = {k: v for k, v in params.items() if k not in ("torch_adam", "adam_w_mode")}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        base = type("GatedCPUAdam", (GatedStep, DeepSpeedCPUAdam), {})
        optimizer = base(groups, adamw_mode=True, **{k: v for k, v in kwargs.items() if k != "fused"})
    else:
        optimizer = GatedAdamW(groups, **kwargs)
    if gate is not None:
        optimizer.gate = gate
    return optimizer


def decays(ndim: int) -> bool:
    """Weight decay on matrices only; biases and LayerNorm parameters are not decayed (as in GPT-NeoX)."""
    return ndim >= 2


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The decayed parameters, then the others (the order their optimizer state is numbered in)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if decays(param.ndim) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
