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


# Tiny Llama-style models of the three shapes; a wide init and a large RMSNorm epsilon, so that greedy
# choices are clear-cut and an epsilon put in the wrong place shows in the logits.
LLAMA_STYLE = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-3, initializer_range=0.1,
                   bos_token_id=None, eos_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FAMILY_MODELS = {
    # grouped-query attention (4 heads, 2 key/value groups), untied, Llama 3's rope_theta
    "llama-gqa": ("Llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # tied embeddings and Llama 3.1's frequency-dependent RoPE scaling (with head_dim 16 and theta 500,000, the
    # frequencies 4-7 are scaled, and frequency 4 turns far enough within 64 positions to matter)
    "llama-tied-llama3": ("Llama", dict(tie_word_embeddings=True, max_position_embeddings=8193,
                                        rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})),
    # biases on q, k and v
    "qwen2-bias": ("Qwen2", dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 1000000.0})),
    "mistral": ("Mistral", dict(sliding_window=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # YaRN from 32 to 128 positions (Qwen2.5's long-context recipe), betas off their defaults so that both are
    # read: the ramp spans frequencies 0-3 of 8 (0-2 with the defaults)
    "qwen2-yarn": ("Qwen2", dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 4.0, "beta_slow": 0.5,
        "rope_theta": 10000.0})),
}


def random_family_model(name: str, seed: int, **config_fields):
    """One of FAMILY_MODELS (float32) with every parameter perturbed; `config_fields` change its config."""
    import transformers

    prefix, overrides = FAMILY_MODELS[name]
    config = getattr(transformers, f"{prefix}Config")(**{**LLAMA_STYLE, **overrides, **config_fields})
    torch.manual_seed(seed)
    return perturb_every_parameter(getattr(transformers, f"{prefix}ForCausalLM")(config), seed)
