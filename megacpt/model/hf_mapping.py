"""Weight mapping between Hugging Face checkpoints and megacpt's megatron-core models, for every family.

GPT-NeoX: Hugging Face's fused QKV has megatron's layout ([heads, 3, head_dim] rows), so the mapping is a
renaming. Llama, Mistral and Qwen2: Hugging Face keeps q_proj [H*d, h], k_proj and v_proj [G*d, h] apart,
while megatron fuses them per key/value group as [G, H/G + 2, d] rows (the group's H/G queries, then its key,
then its value); the MLP's gate_proj and up_proj are megatron's one fc1 [gate; up]. On top of that, two
megatron concerns: the vocabulary is padded to a multiple of 128 x TP, and tensor parallelism splits
column-parallel weights by rows and row-parallel weights by columns (whole key/value groups per rank; a
SwiGLU fc1 as [gate; up] of each rank's slice of both). A full state dict here is always the TP 1 layout.
Pure functions over state dicts, so the conversion tools, the parity tests and resharding all share them.
"""
from __future__ import annotations

import re

import torch

from megacpt.config import ModelConfig
from megacpt.model.families import FAMILIES

# megatron name template -> HF name template ({i} is the layer index)
_NEOX_LAYER = {
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
_NEOX_GLOBAL = {
    "embedding.word_embeddings.weight": "gpt_neox.embed_in.weight",
    "decoder.final_layernorm.weight": "gpt_neox.final_layer_norm.weight",
    "decoder.final_layernorm.bias": "gpt_neox.final_layer_norm.bias",
    "output_layer.weight": "embed_out.weight",
}
_LLAMA_LAYER = {
    "decoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LLAMA_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
# Older/newer transformers name GPT-NeoX's output layer differently; accept both on input.
_HF_OUTPUT_ALIASES = ("embed_out.weight", "lm_head.weight")
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
# How tensor parallelism splits each parameter, as full-name regular expressions (DeepSpeed's universal
# checkpoint takes the same ones): column-parallel linears and the vocabulary by rows (dim 0; each rank holds
# whole attention heads, so the fused QKV rows of the ranks concatenate to the full [groups, H/G + 2, head_dim]
# layout), row-parallel weights by columns (dim 1), norms and row-parallel biases replicated.
VOCAB_PATTERN = r"(embedding\.word_embeddings|output_layer)\.weight$"
COLUMN_PARALLEL_PATTERN = r".*(linear_qkv|linear_fc1)\.(weight|bias)$"
ROW_PARALLEL_PATTERN = r".*(linear_proj|linear_fc2)\.weight$"
REPLICATED_PATTERN = r".*(layernorm\.(weight|bias)|(linear_proj|linear_fc2)\.bias)$"
# A SwiGLU fc1 holds two matrices, [gate; up]; each rank holds its slice of both.
GATED_FC1_PATTERN = r".*linear_fc1\.(weight|bias)$"


def gated_mlp(model: ModelConfig) -> bool:
    """Whether the model's fc1 is SwiGLU's [gate; up] (tensor parallelism splits both halves)."""
    return FAMILIES[model.family].gated_mlp


def tensor_parallel_dim(name: str) -> int | None:
    """The dimension megatron splits this parameter along under tensor parallelism (None: replicated)."""
    if re.match(VOCAB_PATTERN, name) or re.match(COLUMN_PARALLEL_PATTERN, name):
        return 0
    if re.match(ROW_PARALLEL_PATTERN, name):
        return 1
    if re.match(REPLICATED_PATTERN, name):
        return None
    raise ValueError(f"no tensor-parallel rule for parameter {name}")


# ------------------------------------------------------------------------------------ names and layouts

# How one megatron tensor is made of Hugging Face ones: "same" (one tensor, renamed), "qkv" (q, k, v fused per
# key/value group), "glu" (gate and up stacked).
Rule = tuple[str, tuple[str, ...], str]


def mapping(model: ModelConfig) -> list[Rule]:
    """(megatron name, HF names, how they combine) for every weight of the model."""
    if model.family == "neox":
        rules = [(m, (h,), "same") for m, h in _NEOX_GLOBAL.items()]
        for i in range(model.num_layers):
            rules += [(m.format(i=i), (h.format(i=i),), "same") for m, h in _NEOX_LAYER.items()]
        return rules
    globals_ = {m: h for m, h in _LLAMA_GLOBAL.items() if not (model.tie_embeddings and m == "output_layer.weight")}
    rules = [(m, (h,), "same") for m, h in globals_.items()]
    qkv = ("weight", "bias") if FAMILIES[model.family].qkv_bias else ("weight",)
    for i in range(model.num_layers):
        rules += [(m.format(i=i), (h.format(i=i),), "same") for m, h in _LLAMA_LAYER.items()]
        attention = f"model.layers.{i}.self_attn"
        rules += [(f"decoder.layers.{i}.self_attention.linear_qkv.{p}",
                   tuple(f"{attention}.{x}_proj.{p}" for x in "qkv"), "qkv") for p in qkv]
        rules.append((f"decoder.layers.{i}.mlp.linear_fc1.weight",
                      (f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"), "glu"))
    return rules


def hf_names(model: ModelConfig) -> set[str]:
    """Every Hugging Face weight name the mapping reads (the output layer as transformers 5 calls it)."""
    names = {h for _, hs, _ in mapping(model) for h in hs}
    return {"lm_head.weight" if n == "embed_out.weight" else n for n in names}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """megatron's fused QKV rows [G, H/G + 2, d] from Hugging Face's q [H*d], k and v [G*d] rows."""
    q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v))  # [G, H/G*d | d | d, ...]
    head_dim = k.shape[1]
    q = q.reshape(groups, -1, head_dim, *q.shape[2:])
    return torch.cat([q, k.unsqueeze(1), v.unsqueeze(1)], dim=1).reshape(-1, *q.shape[3:])


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hugging Face's q, k and v rows from megatron's fused [G, H/G + 2, d] rows."""
    per_group = heads // groups
    grouped = qkv.reshape(groups, per_group + 2, -1, *qkv.shape[1:])
    q, k, v = torch.split(grouped, [per_group, 1, 1], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).clone() for t in (q, k, v))


def hf_to_megatron(hf_state: dict[str, torch.Tensor], model: ModelConfig,
                   padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Full (TP 1 layout) megatron state dict from an HF state dict of the model's family; vocab rows zero-padded.
    Raises KeyError naming a missing HF tensor."""
    hf_state = dict(hf_state)
    if model.family == "neox":
        for alias in _HF_OUTPUT_ALIASES:
            if alias in hf_state:
                hf_state["embed_out.weight"] = hf_state.pop(alias)
    out = {}
    for mname, hnames, how in mapping(model):
        missing = [h for h in hnames if h not in hf_state]
        if missing:
            raise KeyError(missing[0])
        tensors = [hf_state[h] for h in hnames]
        if how == "qkv":
            tensor = fuse_qkv(*tensors, model.num_query_groups)
        elif how == "glu":
            tensor = torch.cat(tensors)
        else:
            tensor = tensors[0]
        out[mname] = pad_vocab(tensor, padded_vocab_size) if mname in VOCAB_ROWS else tensor
    return out


def megatron_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict of the model's family from a full megatron one, padding rows beyond its vocab removed."""
    out = {}
    for mname, hnames, how in mapping(model):
        tensor = state[mname]
        if mname in VOCAB_ROWS:
            tensor = tensor[:model.vocab_size]
        if how == "qkv":
            parts = split_qkv(tensor, model.num_attention_heads, model.num_query_groups)
        elif how == "glu":
            parts = tuple(t.clone() for t in torch.chunk(tensor, 2))
        else:
            parts = (tensor.clone(),)
        out.update(zip(hnames, parts))
    return out


def pad_vocab(tensor: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Zero rows appended up to the padded vocabulary size."""
    extra = padded_vocab_size - tensor.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary of {tensor.shape[0]} rows is larger than the padded size {padded_vocab_size}")
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])


def split_for_rank(state: dict[str, torch.Tensor], tp_size: int, tp_rank: int, *,
                   gated_mlp: bool) -> dict[str, torch.Tensor]:
    """This tensor-parallel rank's shard of a full megatron state dict (`gated_mlp`: fc1 is SwiGLU's [gate; up])."""
    out = {}
    for name, tensor in state.items():
        dim = tensor_parallel_dim(name)
        if dim is None:
            out[name] = tensor
        elif gated_mlp and re.match(GATED_FC1_PATTERN, name):
            out[name] = torch.cat([torch.chunk(half, tp_size)[tp_rank] for half in torch.chunk(tensor, 2)])
        else:
            out[name] = torch.chunk(tensor, tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_shards(shards: list[dict[str, torch.Tensor]], *, gated_mlp: bool) -> dict[str, torch.Tensor]:
    """The full megatron state dict from every tensor-parallel rank's shard (in rank order)."""
    out = {}
    for name in shards[0]:
        dim = tensor_parallel_dim(name)
        if dim is None:
            out[name] = shards[0][name]
        elif gated_mlp and re.match(GATED_FC1_PATTERN, name):
            halves = [torch.chunk(s[name], 2) for s in shards]
            out[name] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        else:
            out[name] = torch.cat([s[name] for s in shards], dim=dim)
    return out


# Hugging Face's YaRN keys that megacpt takes only at what they compute by default (the converter checks them).
YARN_AT_THEIR_DEFAULTS = ("attention_factor", "mscale", "mscale_all_dim", "truncate")


def model_fields_from_hf(hf_config: dict) -> dict:
    """megacpt `model` fields from an HF config.json of a known family (transformers 4.x and 5.x spellings:
    `rope_theta` / `rope_scaling` or `rope_parameters`). Raises KeyError for a missing key."""
    from megacpt.model.families import family_of_hf_model_type

    family = family_of_hf_model_type(hf_config.get("model_type"))
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    fields = {
        "family": family.name,
        "num_layers": hf_config["num_hidden_layers"],
        "hidden_size": hf_config["hidden_size"],
        "num_attention_heads": hf_config["num_attention_heads"],
        "ffn_hidden_size": hf_config["intermediate_size"],
        "seq_length": hf_config.get("max_position_embeddings", 2048),
        "vocab_size": hf_config["vocab_size"],
    }
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "partial_rotary_factor",
                                                          *YARN_AT_THEIR_DEFAULTS)} | {"rope_type": rope_type}
    if family.name == "neox":
        return fields | {
            "rope_scaling": None if rope_type == "default" else scaling,
            "rotary_pct": rope.get("partial_rotary_factor", hf_config.get("rotary_pct", 0.25)),
            "rotary_base": int(rope.get("rope_theta", hf_config.get("rotary_emb_base", 10000))),
            "parallel_residual": hf_config.get("use_parallel_residual", True),
            "layernorm_eps": hf_config.get("layer_norm_eps", 1e-5),
        }
    window = hf_config.get("sliding_window") if family.name == "mistral" else None
    return fields | {
        "num_query_groups": hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "rotary_base": int(rope.get("rope_theta", hf_config.get("rope_theta", 10000))),
        "rope_scaling": None if rope_type == "default" else scaling,
        "layernorm_eps": hf_config.get("rms_norm_eps", 1e-6),
        "sliding_window": window,
        "seq_length": min(fields["seq_length"], window or fields["seq_length"]),
    }
