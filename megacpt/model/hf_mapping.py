"""Weight mapping between Hugging Face `GPTNeoXForCausalLM` and megacpt's megatron-core GPT-NeoX.

Both use the same fused QKV layout ([heads, 3, head_dim] rows), so the mapping is a renaming plus two
megatron concerns: the vocabulary is padded to a multiple of 128 x TP, and tensor parallelism splits
column-parallel weights by rows and row-parallel weights by columns. Pure functions over state dicts, so
the conversion tools, the parity tests and resharding all share them.
"""
from __future__ import annotations

import re

import torch

# megatron name template -> HF name template ({i} is the layer index)
_LAYER_NAMES = {
    "decoder.layers.{i}.input_layernorm.weight": "gpt_neox.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.input_layernorm.bias": "gpt_neox.layers.{i}.input_layernorm.bias",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "gpt_neox.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.bias": "gpt_neox.layers.{i}.post_attention_layernorm.bias",
    "decoder.layers.{i}.self_attention.linear_qkv.weight": "gpt_neox.layers.{i}.attention.query_key_value.weight",
    "decoder.layers.{i}.self_attention.linear_qkv.bias": "gpt_neox.layers.{i}.attention.query_key_value.bias",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "gpt_neox.layers.{i}.attention.dense.weight",
    "decoder.layers.{i}.self_attention.linear_proj.bias": "gpt_neox.layers.{i}.attention.dense.bias",
    "decoder.layers.{i}.mlp.linear_fc1.weight": "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
    "decoder.layers.{i}.mlp.linear_fc1.bias": "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
    "decoder.layers.{i}.mlp.linear_fc2.bias": "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias",
}
_GLOBAL_NAMES = {
    "embedding.word_embeddings.weight": "gpt_neox.embed_in.weight",
    "decoder.final_layernorm.weight": "gpt_neox.final_layer_norm.weight",
    "decoder.final_layernorm.bias": "gpt_neox.final_layer_norm.bias",
    "output_layer.weight": "embed_out.weight",
}
# Older/newer transformers name the output layer differently; accept both on input.
_HF_OUTPUT_ALIASES = ("embed_out.weight", "lm_head.weight")
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
# How tensor parallelism splits each parameter, as full-name regular expressions (DeepSpeed's universal
# checkpoint takes the same ones): column-parallel linears and the vocabulary by rows (dim 0; each rank holds
# whole attention heads, so the fused QKV rows of the ranks concatenate to the full [heads, 3, head_dim]
# layout), row-parallel weights by columns (dim 1), LayerNorms and row-parallel biases replicated.
VOCAB_PATTERN = r"(embedding\.word_embeddings|output_layer)\.weight$"
COLUMN_PARALLEL_PATTERN = r".*(linear_qkv|linear_fc1)\.(weight|bias)$"
ROW_PARALLEL_PATTERN = r".*(linear_proj|linear_fc2)\.weight$"
REPLICATED_PATTERN = r".*(layernorm\.(weight|bias)|(linear_proj|linear_fc2)\.bias)$"


def tensor_parallel_dim(name: str) -> int | None:
    """The dimension megatron splits this parameter along under tensor parallelism (None: replicated)."""
    if re.match(VOCAB_PATTERN, name) or re.match(COLUMN_PARALLEL_PATTERN, name):
        return 0
    if re.match(ROW_PARALLEL_PATTERN, name):
        return 1
    if re.match(REPLICATED_PATTERN, name):
        return None
    raise ValueError(f"no tensor-parallel rule for parameter {name}")


def name_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(megatron name, HF name) for every weight of a model with `num_layers` layers."""
    pairs = list(_GLOBAL_NAMES.items())
    for i in range(num_layers):
        pairs += [(m.format(i=i), h.format(i=i)) for m, h in _LAYER_NAMES.items()]
    return pairs


def hf_to_megatron(hf_state: dict[str, torch.Tensor], num_layers: int,
                   padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Full (unsplit) megatron state dict from an HF GPT-NeoX state dict; vocab rows zero-padded."""
    hf_state = dict(hf_state)
    for alias in _HF_OUTPUT_ALIASES:
        if alias in hf_state:
            hf_state["embed_out.weight"] = hf_state.pop(alias)
    out = {}
    for mname, hname in name_pairs(num_layers):
        if hname not in hf_state:
            raise KeyError(hname)
        tensor = hf_state[hname]
        if mname in VOCAB_ROWS:
            tensor = pad_vocab(tensor, padded_vocab_size)
        out[mname] = tensor
    return out


def megatron_to_hf(state: dict[str, torch.Tensor], num_layers: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF GPT-NeoX state dict from a full megatron one, padding rows beyond `vocab_size` removed."""
    out = {}
    for mname, hname in name_pairs(num_layers):
        tensor = state[mname]
        if mname in VOCAB_ROWS:
            tensor = tensor[:vocab_size]
        out[hname] = tensor.clone()
    return out


def pad_vocab(tensor: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Zero rows appended up to the padded vocabulary size."""
    extra = padded_vocab_size - tensor.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary of {tensor.shape[0]} rows is larger than the padded size {padded_vocab_size}")
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])


def split_for_rank(state: dict[str, torch.Tensor], tp_size: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """This tensor-parallel rank's shard of a full megatron state dict."""
    out = {}
    for name, tensor in state.items():
        dim = tensor_parallel_dim(name)
        out[name] = tensor if dim is None else torch.chunk(tensor, tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full megatron state dict from every tensor-parallel rank's shard (in rank order)."""
    out = {}
    for name in shards[0]:
        dim = tensor_parallel_dim(name)
        out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def model_fields_from_hf(hf_config: dict) -> dict:
    """megacpt `model` fields from an HF GPT-NeoX config.json (transformers 4.x and 5.x spellings)."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    return {
        "num_layers": hf_config["num_hidden_layers"],
        "hidden_size": hf_config["hidden_size"],
        "num_attention_heads": hf_config["num_attention_heads"],
        "ffn_hidden_size": hf_config["intermediate_size"],
        "seq_length": hf_config.get("max_position_embeddings", 2048),
        "vocab_size": hf_config["vocab_size"],
        "rotary_pct": rope.get("partial_rotary_factor", hf_config.get("rotary_pct", 0.25)),
        "rotary_base": int(rope.get("rope_theta", hf_config.get("rotary_emb_base", 10000))),
        "parallel_residual": hf_config.get("use_parallel_residual", True),
        "layernorm_eps": hf_config.get("layer_norm_eps", 1e-5),
    }
