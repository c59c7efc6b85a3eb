"""Random Hugging Face GPT-NeoX models for parity tests, with every parameter distinct.

A freshly initialised model has all Linear biases 0 and all LayerNorms (1, 0): a swapped LayerNorm pair, a
dropped bias or a bias added in the wrong place would leave its logits unchanged. Noise on every tensor makes
each bias and each LayerNorm weight and bias distinct, so a mapping mistake shows in the logits.
"""
from __future__ import annotations

import torch

NOISE = 0.05


def perturb_every_parameter(model: torch.nn.Module, seed: int, scale: float = NOISE) -> torch.nn.Module:
    """Add N(0, scale^2) noise (drawn from `seed`) to every parameter, in place; returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.add_(noise.to(param.dtype))
    return model


def random_gpt_neox(seed: int, **config):
    """A GPTNeoXForCausalLM (float32) from GPTNeoXConfig(**config), every parameter perturbed."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return perturb_every_parameter(GPTNeoXForCausalLM(GPTNeoXConfig(**config)), seed)


def assert_all_distinct(model: torch.nn.Module) -> None:
    """No LayerNorm is (1, 0) and no bias is all zeros, so every tensor matters to the logits."""
    for name, param in model.named_parameters():
        assert param.float().std() > 0 or param.numel() == 1, name
        if "norm" in name and name.endswith("weight"):
            assert not torch.all(param == 1), name
        if name.endswith("bias"):
            assert torch.any(param != 0), name
