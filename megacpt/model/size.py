"""The parameter count of the model megacpt builds for a config's family, per tensor-parallel rank: pure
arithmetic on the model config, shared by `megacpt plan` (planning/capacity.py) and the trainer's preflight,
which refuses a model whose weights alone exceed the machine's memory before allocating them.
"""
from __future__ import annotations

from megacpt.config import ModelConfig
from megacpt.model.families import FAMILIES


def parameter_count(model: ModelConfig, padded_vocab: int) -> int:
    """All parameters of the model megacpt builds for the config's family."""
    return parameters_per_rank(model, padded_vocab, 1)


def parameters_per_rank(model: ModelConfig, padded_vocab: int, tensor: int) -> int:
    """Parameters held by one tensor-parallel rank.

    Column-parallel QKV and fc1 split weights and biases, row-parallel proj and fc2 split weights and keep
    their biases whole, norms are replicated, the input embedding and output layer split the vocabulary (one
    matrix when tied). GPT-NeoX: biases everywhere, LayerNorms (weight and bias), a GELU MLP. Llama-style
    families: grouped-query QKV (H + 2G heads of d), a SwiGLU MLP (gate, up, down), RMSNorms (weight only),
    biases only on Qwen2's QKV.
    """
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * d
    family = FAMILIES[model.family]
    mlp_in = 2 * f if family.gated_mlp else f
    split = qkv * h + h * h + mlp_in * h + f * h  # QKV, proj, fc1, fc2 weights
    whole = 0
    if family.qkv_bias:
        split += qkv
    if family.linear_bias:
        split += mlp_in  # fc1 bias
        whole += 2 * h  # proj and fc2 biases
    norm = 2 * h if family.normalization == "LayerNorm" else h
    per_layer = split // tensor + whole + 2 * norm
    embeddings = (1 if model.tie_embeddings else 2) * padded_vocab * h // tensor
    return model.num_layers * per_layer + embeddings + norm  # + final norm
